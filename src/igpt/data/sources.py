"""Image sources: each turns a dataset on disk into uint8 images (N, H, W, C), integer labels and class names,
for a train and a test split. `SOURCES` is the registry of every source `igpt prepare` knows (a name, a reader
or a streamed listing, its default place, one line of description): adding a source is one
`register_source` call beside its reader, and the CLI's help, the refusals and `PrepareConfig` follow.

Every reader validates what it reads and raises `IgptError` with one clear sentence when a file is missing,
truncated or not what it claims to be, so `igpt prepare` never fails with a traceback on bad input.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from igpt.data.decode import (
    IMAGE_EXTENSIONS,
    check_declared,
    npz_headers,
    printable_text,
    safe_name,
    unpickle,
)
from igpt.errors import IgptError

FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


@dataclass
class Split:
    """One split: `images` uint8 (N, H, W, C) with C in {1, 3}; `labels` int64 (N,), -1 where unlabeled."""

    images: np.ndarray
    labels: np.ndarray


@dataclass
class ImageSet:
    """A dataset as read from disk, before resizing and quantization."""

    train: Split
    test: Split
    class_names: list[str]
    source: str
    """Where the images came from (a directory or file), recorded in meta.json."""
    skipped: list[str] = field(default_factory=list)
    """Files that could not be read (folder source), each as 'path (reason)'."""


# ---------------------------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Source:
    """One dataset source `igpt prepare` can read. A source read whole gives `read`; one too large for memory
    gives `listing` instead and is prepared in chunks by `igpt.data.streaming`."""

    name: str
    """The DATASET argument of `igpt prepare`."""
    description: str
    """One line for `igpt prepare --help` and the refusal that lists the sources."""
    read: Callable[[Path | None, Any], ImageSet] | None = None
    """(data directory or None, the prepare's settings) -> the whole dataset; the settings carry
    `test_fraction`, `seed`, `resolution` and `strict`."""
    listing: Callable[[Path, Any], tuple[Any, int]] | None = None
    """(data directory, settings) -> (a `listing.Listing` of what to decode, the image side)."""
    default_dir: str | None = None
    """Where the source lives when no --data-dir is given."""
    needs_dir: bool = True
    """False for a source bundled with a package (scikit-learn's digits)."""

    @property
    def streamed(self) -> bool:
        return self.listing is not None


SOURCES: dict[str, Source] = {}
"""Every registered source by name: the one list `--help`, the refusals and `PrepareConfig` read."""


def register_source(src: Source) -> Source:
    """Add a source to `SOURCES` (a name registered twice is a programming error)."""
    if src.name in SOURCES:
        raise ValueError(f"dataset source '{src.name}' is registered already")
    if (src.read is None) == (src.listing is None):
        raise ValueError(f"dataset source '{src.name}' needs exactly one of read and listing")
    SOURCES[src.name] = src
    return src


def source(name: str) -> Source:
    """The source called `name`; one line naming every registered one otherwise."""
    if name not in SOURCES:
        raise IgptError(f"unknown dataset '{name}'; choose one of {', '.join(SOURCES)}")
    return SOURCES[name]


def source_lines() -> list[str]:
    """`name: description` for every registered source, for help texts."""
    return [f"{s.name}: {s.description}" for s in SOURCES.values()]


def data_path(src: Source, data_dir: str | None) -> Path | None:
    """The directory (or file) a source reads: --data-dir, else its default place, else one line."""
    if not src.needs_dir:
        return None
    if data_dir is None:
        if src.default_dir is None:
            raise IgptError(f"dataset '{src.name}' needs --data-dir")
        data_dir = src.default_dir
    return Path(os.path.expanduser(data_dir))


# ---------------------------------------------------------------------------------------------- IDX (MNIST)
def read_idx(path: Path, expect_dims: int) -> np.ndarray:
    """Read one IDX file of unsigned bytes (gzipped or not) and check its magic number and length."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise IgptError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise IgptError(f"{path} is not an IDX file of unsigned bytes (wrong magic number)")
    ndim = raw[3]
    if ndim != expect_dims:
        raise IgptError(f"{path}: expected an IDX file with {expect_dims} dimension(s), found {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IgptError(f"{path} is truncated (incomplete header)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    n = int(np.prod(shape))
    if len(raw) - header != n:
        raise IgptError(
            f"{path} is truncated or padded: header promises {n} bytes, file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise IgptError(f"missing file {directory / stem}[.gz]")


def load_idx_dataset(directory: Path, name: str) -> ImageSet:
    """MNIST-format data: the four IDX files (train/t10k images and labels), gzipped or not."""
    if not directory.is_dir():
        hint = " (install it with: apt-get install dataset-fashion-mnist)" if name == "fashion-mnist" else ""
        raise IgptError(f"data directory {directory} does not exist{hint}")
    splits = []
    for prefix in ("train", "t10k"):
        images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"), 3)
        labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"), 1)
        if len(images) != len(labels):
            raise IgptError(f"{directory}: {prefix} has {len(images)} images but {len(labels)} labels")
        splits.append(Split(images[..., None], labels.astype(np.int64)))
    names = FASHION_CLASSES if name == "fashion-mnist" else [str(i) for i in range(10)]
    return ImageSet(splits[0], splits[1], names, str(directory))


# ---------------------------------------------------------------------------------------------- CIFAR


def _cifar_batch(path: Path, label_key: str) -> Split:
    d = unpickle(path)
    if "data" not in d or label_key not in d:
        raise IgptError(f"{path} is not a CIFAR python batch (no 'data' or '{label_key}')")
    data = np.asarray(d["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise IgptError(
            f"{path} is not a CIFAR python batch (data is {data.dtype} {data.shape}, not uint8 (N, 3072))"
        )
    labels = np.asarray(d[label_key], dtype=np.int64)
    if len(labels) != len(data):
        raise IgptError(f"{path}: {len(data)} images but {len(labels)} labels")
    return Split(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels)


def load_cifar(directory: Path, name: str) -> ImageSet:
    """CIFAR-10/100 as distributed: the python batch directory (`cifar-10-batches-py`, `cifar-100-python`)."""
    if not directory.is_dir():
        raise IgptError(f"data directory {directory} does not exist")
    if name == "cifar10":
        parts = [_cifar_batch(directory / f"data_batch_{i}", "labels") for i in range(1, 6)]
        train = Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))
        test = _cifar_batch(directory / "test_batch", "labels")
        meta = unpickle(directory / "batches.meta")
        names = meta.get("label_names")
    else:
        train = _cifar_batch(directory / "train", "fine_labels")
        test = _cifar_batch(directory / "test", "fine_labels")
        names = unpickle(directory / "meta").get("fine_label_names")
    if names is None:
        raise IgptError(f"{directory}: the meta file has no class names")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return ImageSet(train, test, names, str(directory))


# ---------------------------------------------------------------------------------------------- folder


def list_folder(directory: Path) -> tuple[list[str], list[tuple[Path, int]], list[str]]:
    """(class names, (file, label) entries in a fixed order, notes of what was left out) of an image folder:
    one sub-directory per class (sorted names; a sub-directory without files is left out, with a note, rather
    than becoming a class no image has), or a flat folder of unlabeled files (label -1)."""
    dirs = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    entries: list[tuple[Path, int]] = []
    classes: list[str] = []
    notes: list[str] = []
    root = directory.resolve()
    looping = [d for d in dirs if d.resolve() == root or d.resolve() in root.parents]
    if looping:
        raise IgptError(
            f"{safe_name(looping[0])} leads back to {safe_name(directory)} (a link to the folder itself or "
            "above it): its images would be listed twice; remove the link"
        )
    top = [p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")]
    if dirs and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in top):
        raise IgptError(
            f"{safe_name(directory)} holds images at its top beside class folders "
            f"({safe_name(dirs[0].name)}, ...): put every image in a class folder, or none of them"
        )
    if dirs:
        for d in dirs:
            try:  # rglob passes over a folder it may not read, as if it were empty: ask first
                with os.scandir(d) as it:
                    next(it, None)
            except OSError as e:
                notes.append(f"an unreadable class folder ({e.strerror}; not made a class)\t{safe_name(d)}")
                continue
            files = [p for p in sorted(d.rglob("*")) if p.is_file() and not p.name.startswith(".")]
            if not files:
                notes.append(f"an empty class folder (not made a class)\t{safe_name(d)}")
                continue
            entries += [(p, len(classes)) for p in files]
            classes.append(printable_text(d.name))
    else:
        entries = [(p, -1) for p in sorted(directory.iterdir()) if p.is_file() and not p.name.startswith(".")]
    return classes, entries, notes


def split_validation(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of row indices into (train, validation), stratified by class (unlabeled rows, -1, are
    one more stratum). Every class with two or more rows gives at least one to validation."""
    rng = np.random.default_rng(seed)
    tr, va = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n = max(1, int(round(len(idx) * fraction))) if len(idx) > 1 else 0
        va.append(idx[:n])
        tr.append(idx[n:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))


def split_train_test(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> tuple[Split, Split]:
    """A seeded random split; at least one image lands in each split when there are two or more."""
    if not 0.0 < test_fraction < 1.0:
        raise IgptError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    if len(x) < 2:
        raise IgptError("need at least two images to make a train and a test split")
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = min(max(1, round(len(x) * test_fraction)), len(x) - 1)
    te, tr = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return Split(x[tr], y[tr]), Split(x[te], y[te])


# ---------------------------------------------------------------------------------------------- npz, digits
def _as_nhwc(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype != np.uint8:
        raise IgptError(f"{what} must be uint8, got {a.dtype}")
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[3] not in (1, 3):
        raise IgptError(f"{what} must be (N, H, W) or (N, H, W, C) with C 1 or 3, got shape {a.shape}")
    return a


MAX_CLASSES = 100_000


def _labels(y: np.ndarray | None, n: int, what: str) -> np.ndarray:
    """Integer class labels (n,) in [0, MAX_CLASSES), or -1 for unlabeled; one clear line for anything else
    (strings, NaN, fractions, negatives, labels so large that a class list would exhaust memory)."""
    if y is None:
        return np.full(n, -1, dtype=np.int64)
    y = np.asarray(y).reshape(-1)
    if y.dtype.kind not in "iufb":
        raise IgptError(f"{what} must hold integer class labels, got {y.dtype} values")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise IgptError(f"{what} must hold integer class labels; it holds NaN, infinite or fractional values")
    if len(y) and (y.min() < -1 or y.max() >= MAX_CLASSES):
        raise IgptError(
            f"{what} labels must be class indices in [0, {MAX_CLASSES}) or -1 for unlabeled; "
            f"found {y.min()} .. {y.max()}"
        )
    return y.astype(np.int64)


def load_npz(path: Path, test_fraction: float, seed: int) -> ImageSet:
    """A `.npz` with `x_train` (and usually `x_test`), optional `y_train`/`y_test`, optional `class_names`.
    Without `x_test`, a seeded `test_fraction` of `x_train` becomes the test split."""
    if not path.is_file():
        raise IgptError(f"npz file {path} does not exist")
    check_declared(path, npz_headers(path))
    try:
        z = np.load(path, allow_pickle=False)
        arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001
        raise IgptError(f"cannot read {path} as an npz archive ({e.__class__.__name__}: {e})") from None
    if "x_train" not in arrays:
        raise IgptError(f"{path} has no 'x_train' array (found: {', '.join(arrays) or 'nothing'})")
    xtr = _as_nhwc(arrays["x_train"], "x_train")
    ytr = _labels(arrays.get("y_train"), len(xtr), "y_train")
    if len(ytr) != len(xtr):
        raise IgptError(f"{path}: x_train has {len(xtr)} images but y_train has {len(ytr)} labels")
    if "x_test" in arrays:
        xte = _as_nhwc(arrays["x_test"], "x_test")
        if xte.shape[1:] != xtr.shape[1:]:
            raise IgptError(
                f"{path}: x_test images {xte.shape[1:]} differ from x_train images {xtr.shape[1:]}"
            )
        yte = _labels(arrays.get("y_test"), len(xte), "y_test")
        if len(yte) != len(xte):
            raise IgptError(f"{path}: x_test has {len(xte)} images but y_test has {len(yte)} labels")
        train, test = Split(xtr, ytr), Split(xte, yte)
    else:
        train, test = split_train_test(xtr, ytr, test_fraction, seed)
    labelled = np.concatenate([train.labels, test.labels])
    top = int(labelled.max(initial=-1))
    if "class_names" in arrays:
        names = [str(n) for n in np.asarray(arrays["class_names"]).reshape(-1)]
        if top >= len(names):
            raise IgptError(f"{path}: label {top} has no entry in class_names ({len(names)} names)")
    else:
        names = [str(i) for i in range(top + 1)]
    return ImageSet(train, test, names, str(path))


def load_digits_set() -> ImageSet:
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0-16 scaled to 0-255); a fixed split of 20%
    for testing (seed 0), so every machine gets the same sets."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    train, test = split_train_test(x, d.target.astype(np.int64), 0.2, seed=0)
    return ImageSet(train, test, [str(i) for i in range(10)], "sklearn.datasets.load_digits")


def load_source(name: str, data_dir: str | None, settings: Any = None) -> ImageSet:
    """Read the whole dataset `name` from `data_dir` (or its default place); `settings` are the prepare's
    (`PrepareConfig`: test_fraction, seed, resolution, strict), defaults where None."""
    src = source(name)
    if src.read is None:  # streamed: it can hold more images than fit in memory
        raise IgptError(
            f"'{name}' is prepared in chunks by igpt.data.streaming; call igpt.prepare('{name}', ...)"
        )
    return src.read(data_path(src, data_dir), settings if settings is not None else _DEFAULTS)


@dataclass(frozen=True)
class _Defaults:
    test_fraction: float = 0.1
    seed: int = 0
    resolution: int | None = None
    strict: bool = False


_DEFAULTS = _Defaults()

register_source(
    Source(
        "fashion-mnist",
        "Fashion-MNIST's four IDX files (Debian's dataset-fashion-mnist by default)",
        read=lambda path, s: load_idx_dataset(path, "fashion-mnist"),
        default_dir="/usr/share/datasets/fashion-mnist",
    )
)
register_source(
    Source(
        "mnist",
        "MNIST's four IDX files",
        read=lambda path, s: load_idx_dataset(path, "mnist"),
        default_dir="/usr/share/datasets/mnist",
    )
)
register_source(
    Source(
        "cifar10",
        "the CIFAR-10 python batches (cifar-10-batches-py)",
        read=lambda p, s: load_cifar(p, "cifar10"),
    )
)
register_source(
    Source(
        "cifar100",
        "the CIFAR-100 python batches (cifar-100-python)",
        read=lambda p, s: load_cifar(p, "cifar100"),
    )
)
register_source(
    Source(
        "npz",
        "an .npz with x_train, x_test and optional y_train, y_test",
        read=lambda path, s: load_npz(path, s.test_fraction, s.seed),
    )
)
register_source(
    Source(
        "digits",
        "scikit-learn's bundled 8x8 digits (smoke runs and tests)",
        read=lambda path, s: load_digits_set(),
        needs_dir=False,
    )
)
