"""What a streamed prepare will read, and the streamed sources themselves: a folder of images listed with
its labels and split (`list_image_folder`), the downsampled ImageNet batch files (`list_imagenet`,
`read_imagenet_batch`), each as a `Listing` whose digest catches a source that changed. Registers the
sources `folder`, `imagenet16/32/64` and `downsampled-imagenet`."""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from igpt.errors import IgptError

from .sources import (
    Source,
    list_folder,
    register_source,
)

IMAGENET_ROW = {16: 768, 32: 3072, 64: 12288}


@dataclass
class Listing:
    """What will be read: per split, the (file, label) entries (folder) or the batch files (ImageNet), the
    class names, and notes on what was left out while listing."""

    kind: str
    """folder or imagenet."""
    entries: dict[str, list[tuple[str, int]]]
    class_names: list[str]
    notes: list[str]
    source: str

    def digest(self) -> str:
        """A fingerprint of what was listed (names, labels, sizes and modification times), so that a resume,
        or a reuse of a finished set, over a source that changed since (an image replaced by another of the
        same size included) is caught."""
        h = hashlib.sha1()
        for split in sorted(self.entries):
            for name, label in self.entries[split]:
                try:
                    st = os.stat(name)
                    size, mtime = st.st_size, st.st_mtime_ns
                except OSError:
                    size, mtime = -1, -1
                h.update(f"{split}\0{name}\0{label}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()


def list_image_folder(directory: Path, test_fraction: float, seed: int, limit: int | None) -> Listing:
    """A folder of images: `train/<class>/...` beside `val/<class>/...` (or `test/`) keeps that split (the
    ImageNet and torchvision layout); otherwise one sub-directory per class (or a flat folder), split into
    train and test by a seeded draw of `test_fraction` of the files."""
    if not directory.is_dir():
        raise IgptError(f"image folder {directory} does not exist")
    given_test = next((directory / n for n in ("test", "val") if (directory / n).is_dir()), None)
    if given_test is not None and given_test.name == "test" and (directory / "val").is_dir():
        print(
            f"igpt: note: {directory} has train/, val/ and test/: test/ is the test split and val/ is not "
            "read (the validation split is held out of train/, --val-fraction)",
            file=sys.stderr,
        )
    if (directory / "train").is_dir() and given_test is not None:
        classes, train, notes = list_folder(directory / "train")
        test_classes, test, test_notes = list_folder(given_test)
        notes += test_notes
        if bool(classes) != bool(test_classes):
            with_classes = "train/" if classes else f"{given_test.name}/"
            raise IgptError(
                f"{directory}: {with_classes} has class folders and the other split does not; lay out "
                "both as <split>/<class>/<images>, or both flat"
            )
        if classes:
            index = {c: i for i, c in enumerate(classes)}
            unknown = sorted(set(test_classes) - set(index))
            if unknown:
                notes.append(f"{given_test.name}/ classes without training images skipped: {unknown[:3]}")
            test = [(p, index[test_classes[lab]]) for p, lab in test if test_classes[lab] in index]
        split = {"train": train, "test": test}
    else:
        classes, entries, notes = list_folder(directory)
        if len(entries) < 2:
            raise IgptError(f"no images to split in {directory} (need at least two files)")
        perm = np.random.default_rng(seed).permutation(len(entries))
        n_test = min(max(1, round(len(entries) * test_fraction)), len(entries) - 1)
        te, tr = np.sort(perm[:n_test]), np.sort(perm[n_test:])
        split = {"train": [entries[i] for i in tr], "test": [entries[i] for i in te]}
    out = {k: [(str(p), int(lab)) for p, lab in v[:limit]] for k, v in split.items()}
    if not out["train"]:
        raise IgptError(f"no training images in {directory}")
    return Listing("folder", out, classes, notes, str(directory))


def list_imagenet(directory: Path) -> Listing:
    """The downsampled ImageNet files (Chrabaszcz et al. 2017): `train_data_batch_1` ... `_10` and `val_data`,
    pickled or `.npz` (each with `data`, N rows of 3 x R x R uint8 in channel-major order, and `labels`
    numbered from 1). `val_data` is the test split."""
    if not directory.is_dir():
        raise IgptError(f"data directory {directory} does not exist")

    def find(stem: str) -> Path | None:
        for name in (stem, stem + ".npz", stem + ".pkl", stem + ".pickle"):
            if (directory / name).is_file():
                return directory / name
        return None

    train = []
    for i in range(1, 1000):
        p = find(f"train_data_batch_{i}")
        if p is not None:
            train.append((str(p), i))
    numbers = [i for _, i in train]
    if numbers and numbers != list(range(1, len(numbers) + 1)):  # said once; no file was skipped
        missing = sorted(set(range(1, max(numbers) + 1)) - set(numbers))
        print(
            f"igpt: note: {directory} has no train_data_batch_{missing[0]}; the "
            f"{len(numbers)} batches present are read",
            file=sys.stderr,
        )
    test = find("val_data")
    if not train or test is None:
        raise IgptError(
            f"{directory} does not hold the downsampled ImageNet files (train_data_batch_1, ..., val_data, "
            "pickled or .npz)"
        )
    names = [str(i) for i in range(1000)]
    return Listing("imagenet", {"train": train, "test": [(str(test), 0)]}, names, [], str(directory))


def read_imagenet_batch(path: Path, classes: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """One downsampled ImageNet batch file -> (uint8 (N, R, R, 3) images, int64 labels from 0). Pickles are
    read with the allow-list unpickler (plain data only); rows of the wrong length, labels outside 1..1000
    and any other object are refused with one line."""
    from .decode import unpickle

    if path.suffix == ".npz":
        from .decode import check_declared, npz_headers

        check_declared(path, npz_headers(path))
        try:
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        except Exception as e:  # noqa: BLE001 - damaged or not an npz
            why = f"{e.__class__.__name__}: {e}"
            raise IgptError(f"{path} is not a downsampled ImageNet .npz ({why})") from None
    else:
        try:
            d = unpickle(path)
        except IgptError as e:
            raise IgptError(str(e).replace("a CIFAR python batch", "a downsampled ImageNet batch")) from None
    if "data" not in d or "labels" not in d:
        raise IgptError(f"{path} is not a downsampled ImageNet batch (no 'data' or 'labels')")
    data = np.asarray(d["data"])
    try:
        raw = np.asarray(d["labels"])
        labels = raw.astype(np.int64)
    except (TypeError, ValueError):
        raise IgptError(f"{path}: 'labels' is not a list of integers") from None
    if raw.dtype.kind == "f" and not np.array_equal(raw, labels):  # 5.7 is not a class
        raise IgptError(f"{path}: 'labels' holds numbers that are not whole, e.g. {raw[raw != labels][0]}")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] not in IMAGENET_ROW.values():
        raise IgptError(
            f"{path}: 'data' is {data.dtype} {data.shape}, not uint8 rows of 3 x R x R for R in 16, 32, 64"
        )
    if labels.ndim != 1 or len(labels) != len(data):
        raise IgptError(f"{path}: {len(data)} images but {labels.shape} labels")
    if len(labels) and (labels.min() < 1 or labels.max() > classes):
        raise IgptError(f"{path}: labels must be in 1..{classes}, found {labels.min()}..{labels.max()}")
    R = int(round((data.shape[1] // 3) ** 0.5))
    return data.reshape(-1, 3, R, R).transpose(0, 2, 3, 1), labels - 1


def _imagenet_resolution(dataset: str, test_file: Path) -> int:
    """The side of the downsampled ImageNet images: from the source's name, or read from the data."""
    if dataset in ("imagenet16", "imagenet32", "imagenet64"):
        return int(dataset[8:])
    images, _ = read_imagenet_batch(test_file)
    return int(images.shape[1])


# ---------------------------------------------------------------------------------------------- the sources
def _folder_listing(directory: Path, cfg: Any) -> tuple[Listing, int]:
    listing = list_image_folder(directory, cfg.test_fraction, cfg.seed, cfg.limit)
    if cfg.resolution is None:
        raise IgptError("igpt prepare folder needs --resolution (images of any size are resized to it)")
    return listing, cfg.resolution


def _imagenet_listing(directory: Path, cfg: Any) -> tuple[Listing, int]:
    listing = list_imagenet(directory)
    return listing, cfg.resolution or _imagenet_resolution(cfg.dataset, Path(listing.entries["test"][0][0]))


register_source(
    Source(
        "folder",
        "a directory of images, one sub-directory per class (or train/ and val/ beside each other)",
        listing=_folder_listing,
    )
)
for _side in (16, 32, 64):
    register_source(
        Source(
            f"imagenet{_side}",
            f"downsampled ImageNet at {_side}x{_side} (batch files)",
            listing=_imagenet_listing,
        )
    )
register_source(
    Source(
        "downsampled-imagenet",
        "downsampled ImageNet batch files, their side read from the data",
        listing=_imagenet_listing,
    )
)
