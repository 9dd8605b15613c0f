"""Preparing large image sets in bounded memory: a folder of images (decoded in parallel worker processes) or
the downsampled ImageNet batch files, streamed in chunks through a work directory and resumable.

How it goes:
1. The source is listed (files and labels, or batch files) and cut into chunks of CHUNK images in a fixed
   order. Each chunk is decoded, centre-cropped and box-resized (by `workers` processes for a folder), and
   saved as its own file in the work directory `.OUT.partial/`, written under a temporary name and renamed:
   a chunk file either exists whole or not at all.
2. An interrupted run (Ctrl-C, SIGKILL, a full disk) leaves the finished chunks there; the same command again
   skips them, so at most the chunk that was being written is redone. A rerun with other settings, or over a
   folder that changed, is refused with a message naming what differs (`--force` starts over).
3. The palette is fitted on a seeded sample of the training images (bounded by pixels), the validation split
   is drawn from the training labels, and the tokens are written chunk by chunk (plain file writes, which do
   not stay resident) into the final directory, which appears atomically. Peak memory depends on the chunk
   size and the sample, not on the number of images.

The output depends only on the settings and the source, never on the number of workers: chunk boundaries
and their order are fixed, and each image is decoded on its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from igpt.errors import IgptError
from igpt.files import NpyWriter, atomic_directory, disk_errors, write_json_atomic

from .listing import Listing, read_imagenet_batch
from .prepared import meta_record
from .sources import (
    data_path,
    source,
    split_validation,
)
from .workers import colour_table, decode_and_store, quantize_stored, run_jobs, save_chunk, stored_channels

CHUNK = 1024
"""Images per chunk: the unit of work of a worker, of a resume, and of memory."""
PALETTE_SAMPLE_PIXELS = 4_000_000
"""Pixels of the seeded sample of training images that the palette is fitted on (fit_palette then takes
at most 500,000 of them)."""


def default_workers() -> int:
    """The cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------- the store
def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


class ChunkStore:
    """The work directory of one streamed prepare: `progress.json` (the settings and the listing's digest)
    and one `.npz` per finished chunk (`{split}_{index:06d}.npz`: images, ok mask, labels, colour flag)."""

    def __init__(self, work: Path, settings: dict[str, Any], digest: str, force: bool):
        self.work = work
        record = work / "progress.json"
        if work.is_dir() and record.is_file() and not force:
            try:
                old = json.loads(record.read_text())
            except ValueError:
                old = {}
            prev = old.get("settings", {}) if isinstance(old, dict) else {}
            differ = sorted(k for k in set(prev) | set(settings) if prev.get(k) != settings.get(k))
            if differ:
                k = differ[0]
                raise IgptError(
                    f"an interrupted prepare in {work} used {k}={prev.get(k)!r}, not {settings.get(k)!r}; "
                    "run it with the same settings to resume, or pass --force to start over"
                )
            if old.get("digest") != digest:
                raise IgptError(
                    f"the source changed since the interrupted prepare in {work}; pass --force to start over"
                )
        elif work.is_symlink() or (work.exists() and not (record.is_file() or _empty_dir(work))):
            raise IgptError(
                f"{work} exists and is not an interrupted prepare of igpt's; move it away and retry"
            )
        elif work.exists():  # an interrupted prepare's chunks (progress.json names it igpt's), with --force
            shutil.rmtree(work)
        with disk_errors(work / "x"):
            work.mkdir(parents=True, exist_ok=True)
        write_json_atomic(record, {"settings": settings, "digest": digest})

    def path(self, split: str, index: int) -> Path:
        return self.work / f"{split}_{index:06d}.npz"

    def done(self, split: str, index: int) -> bool:
        """Whether chunk `index` is stored with every image read: a chunk that skipped a file is decoded
        again on resume (the file may be readable now: its permissions restored, a decoding limit raised)."""
        if not self.path(split, index).is_file():
            return False
        try:
            return bool(self.get(split, index, ("ok",))["ok"].all())
        except (OSError, ValueError, KeyError):
            return False

    def put(
        self,
        split: str,
        index: int,
        images: np.ndarray,
        ok: np.ndarray,
        labels: np.ndarray,
        colour: bool,
        notes: list[str],
    ) -> None:
        """Save a finished chunk whole (a temporary file renamed into place), with its skip notes."""
        save_chunk(self.path(split, index), images, ok, labels, colour, notes)

    def notes(self) -> list[str]:
        """The skip notes of every stored chunk, in split and chunk order."""
        out: list[str] = []
        for split in ("train", "test"):
            for i in self.chunks(split):
                out += [str(n) for n in self.get(split, i, ("notes",)).get("notes", [])]
        return out

    def get(self, split: str, index: int, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """A stored chunk's arrays (only those of `keys` it holds, when given: the others are not read)."""
        with np.load(self.path(split, index), allow_pickle=False) as z:
            return {k: z[k] for k in (keys or z.files) if k in z.files}

    def chunks(self, split: str) -> list[int]:
        return sorted(int(p.stem.split("_")[-1]) for p in self.work.glob(f"{split}_*.npz"))


def _jobs(listing: Listing, split: str) -> list[tuple[int, list[tuple[str, int]]]]:
    """(chunk index, entries) of a split: CHUNK files each for a folder, one batch file each for ImageNet."""
    rows = listing.entries[split]
    size = CHUNK if listing.kind == "folder" else 1
    return [(i, rows[s : s + size]) for i, s in enumerate(range(0, len(rows), size))]


def fill_store(
    store: ChunkStore, listing: Listing, size: int, workers: int, strict: bool, progress: bool
) -> list[str]:
    """Decode every chunk not yet in the store, or stored with skipped files (a folder's in `workers`
    processes, each storing its own chunks), and save it; returns the skip notes of every chunk, decoded
    now or before."""
    todo = [(s, i, rows) for s in ("train", "test") for i, rows in _jobs(listing, s) if not store.done(s, i)]
    if not todo:
        return store.notes()
    from tqdm import tqdm

    folder = listing.kind == "folder"
    total = sum(len(r) for s in ("train", "test") for _, r in _jobs(listing, s))
    bar = tqdm(
        total=total if folder else None,
        initial=total - sum(len(r) for _, _, r in todo) if folder else 0,
        desc="decoding" if folder else "reading batches",
        unit="img",
        disable=not progress,
        mininterval=1.0,
        file=sys.stderr,
    )
    try:
        if folder:
            jobs = [
                ([f for f, _ in rows], size, strict, str(store.path(split, i)), [lab for _, lab in rows])
                for split, i, rows in todo
            ]
            for n, _, _ in run_jobs(decode_and_store, jobs, workers):
                bar.update(n)
        else:
            from .palette import resize_images

            for split, i, rows in todo:
                images, labels = read_imagenet_batch(Path(rows[0][0]))
                if images.shape[1] != size:
                    images = resize_images(images, size)
                store.put(split, i, images, np.ones(len(images), bool), labels, True, [])
                bar.update(len(images))
    finally:
        bar.close()
    return store.notes()


# ---------------------------------------------------------------------------------------------- assembly
def stored_rows(store: ChunkStore, split: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """(chunk index and row within it of every readable image, their labels, whether any was in colour)."""
    where, labels, colour = [], [], False
    for i in store.chunks(split):
        c = store.get(split, i, ("ok", "labels", "colour"))
        rows = np.flatnonzero(c["ok"])
        where.append(np.stack([np.full(len(rows), i), rows], 1))
        labels.append(c["labels"][rows])
        colour |= bool(c["colour"])
    if not where:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.int64), colour
    return np.concatenate(where), np.concatenate(labels), colour


def gather(store: ChunkStore, split: str, where: np.ndarray) -> np.ndarray:
    """The stored images at (chunk, row) positions `where`, in that order, reading each chunk once."""
    out = None
    for i in np.unique(where[:, 0]):
        sel = np.flatnonzero(where[:, 0] == i)
        imgs = store.get(split, int(i), ("images",))["images"][where[sel, 1]]
        if out is None:
            out = np.empty((len(where), *imgs.shape[1:]), np.uint8)
        out[sel] = imgs
    return out if out is not None else np.zeros((0,), np.uint8)


def skip_summary(notes: list[str]) -> list[str]:
    """Skipped files counted by cause, with one example each."""
    causes = Counter(n.split("\t", 1)[0] for n in notes)
    first = {}
    for n in notes:
        first.setdefault(n.split("\t", 1)[0], n.split("\t", 1)[-1])
    return [f"{k}: {v:,} (e.g. {first[k]})" for k, v in causes.most_common()]


CHUNK_SETTINGS = ("dataset", "data_dir", "resolution", "test_fraction", "seed", "limit", "strict")
"""The settings a chunk's content depends on (which files, their split, their size): a resume compares these
alone, so a prepare refused after decoding (say, for --clusters) resumes once the palette's setting is put
right."""


def list_streamed(cfg: Any) -> tuple[Listing, int]:
    """What a streamed source will read, and the image side: the source's listing."""
    kind = source(cfg.dataset)
    return kind.listing(data_path(kind, cfg.data_dir), cfg)


def prepare_streamed(
    cfg: Any,
    out: Path,
    settings: dict[str, Any],
    force: bool,
    progress: bool = True,
    listed: tuple[Listing, int] | None = None,
) -> dict[str, Any]:
    """`igpt prepare folder` and the downsampled ImageNet sources, streamed and resumable (see the module's
    docstring); a resume compares the settings in CHUNK_SETTINGS. `listed`: the source's listing when the
    caller has it. Returns meta.json's content."""
    t0 = time.perf_counter()
    listing, size = listed or list_streamed(cfg)
    work = out.parent / f".{out.name}.partial"
    digest = listing.digest()
    store = ChunkStore(work, {k: settings[k] for k in CHUNK_SETTINGS}, digest, force)
    try:
        return _prepare_from_store(cfg, out, settings, store, listing, size, digest, progress, t0)
    except BaseException:
        if not store.chunks("train") and not store.chunks("test"):  # refused before any work was kept
            shutil.rmtree(work, ignore_errors=True)
        raise


def _prepare_from_store(
    cfg: Any,
    out: Path,
    settings: dict[str, Any],
    store: ChunkStore,
    listing: Listing,
    size: int,
    digest: str,
    progress: bool,
    t0: float,
) -> dict[str, Any]:
    """Fill the store, fit the palette on its sample, and write the prepared set from it."""
    workers = cfg.workers or default_workers()
    t_list = time.perf_counter()
    notes = listing.notes + fill_store(store, listing, size, workers, cfg.strict, progress)
    t_decode = time.perf_counter()

    (tr_where, tr_labels, tr_rows, va_rows), (te_where, te_labels), colour = _stored_splits(
        cfg, store, listing
    )
    channels = 3 if colour else 1
    palette, n_sample = _streamed_palette(cfg, store, (tr_where, tr_rows), size, channels, colour, workers)
    t_fit = time.perf_counter()

    labelled = bool((np.concatenate([tr_labels, te_labels]) >= 0).any())
    with atomic_directory(out) as tmp:
        parts = {"train": tr_where[tr_rows], "val": tr_where[va_rows], "test": te_where}
        sq_err = _write_tokens(tmp, store, parts, palette, size, channels, cfg.order, workers)
        labels = {"train": tr_labels[tr_rows], "val": tr_labels[va_rows], "test": te_labels}
        for name, y in labels.items():
            np.save(tmp / f"{name}_labels.npy", y.astype(np.int64))
        np.save(tmp / "palette.npy", palette.astype(np.float32))
        rmse = float(np.sqrt(sq_err / max(1, len(te_where) * size * size * palette.shape[1])))
        meta = meta_record(
            settings,
            resolution=size,
            palette=palette,
            counts=(len(tr_rows), len(va_rows), len(te_where)),
            class_names=listing.class_names if labelled else [],
            rmse=rmse,
            source=listing.source,
            skipped=len(notes),
            palette_from=f"k-means fit on a seeded sample of {n_sample:,} training images",
            seconds={
                "list": round(t_list - t0, 3),
                "decode": round(t_decode - t_list, 3),
                "palette": round(t_fit - t_decode, 3),
                "quantize": round(time.perf_counter() - t_fit, 3),
            },
            skipped_by_cause=dict(Counter(n.split("\t", 1)[0] for n in notes)),
            workers=workers,
            source_digest=digest,
        )
        write_json_atomic(tmp / "meta.json", meta)
    shutil.rmtree(store.work, ignore_errors=True)
    if notes:
        print(f"warning: skipped {len(notes)} file(s) that could not be used, by cause:", file=sys.stderr)
        for line in skip_summary(notes):
            print(f"  {line}", file=sys.stderr)
    meta["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    return meta


def _stored_splits(cfg: Any, store: ChunkStore, listing: Listing) -> tuple[tuple, tuple, bool]:
    """Where the readable images lie in the store: (train positions, their labels, the training and the
    validation rows among them), (test positions, their labels), and whether any image was in colour;
    refused in one line when too few images were readable or the validation split leaves nothing."""
    tr_where, tr_labels, colour_tr = stored_rows(store, "train")
    te_where, te_labels, colour_te = stored_rows(store, "test")
    if cfg.limit and listing.kind == "imagenet":  # a folder's limit applied when listing
        tr_where, tr_labels = tr_where[: cfg.limit], tr_labels[: cfg.limit]
        te_where, te_labels = te_where[: cfg.limit], te_labels[: cfg.limit]
    if len(tr_labels) < 2 or len(te_labels) < 1:
        raise IgptError(
            f"too few readable images in {listing.source} ({len(tr_labels)} train, {len(te_labels)} test)"
        )
    tr_rows, va_rows = split_validation(tr_labels, cfg.val_fraction, cfg.seed)
    if len(tr_rows) == 0 or len(va_rows) == 0:
        raise IgptError(f"--val-fraction {cfg.val_fraction} leaves no training or no validation images")
    return (tr_where, tr_labels, tr_rows, va_rows), (te_where, te_labels), colour_tr or colour_te


def _streamed_palette(
    cfg: Any,
    store: ChunkStore,
    train: tuple[np.ndarray, np.ndarray],
    size: int,
    channels: int,
    colour: bool,
    workers: int,
) -> tuple[np.ndarray, int]:
    """The palette given, or k-means fitted on a seeded sample of the training images (as many as
    PALETTE_SAMPLE_PIXELS allows), its products on `workers` threads: (palette, images sampled)."""
    from .palette import fit_palette, load_palette

    if cfg.palette:
        palette = load_palette(cfg.palette)
        if cfg.clusters is not None and cfg.clusters != len(palette):
            raise IgptError(f"--clusters {cfg.clusters} does not match the palette's {len(palette)} colours")
        return palette, 0
    tr_where, tr_rows = train  # where each stored training image is, and the rows kept for training
    n_sample = max(1, min(len(tr_rows), PALETTE_SAMPLE_PIXELS // (size * size)))
    pick = np.sort(np.random.default_rng(cfg.seed).choice(tr_rows, n_sample, replace=False))
    sample = stored_channels(gather(store, "train", tr_where[pick]), channels, colour)
    clusters = cfg.clusters or (16 if channels == 1 else 512)
    return fit_palette(sample, clusters, seed=cfg.seed, threads=workers), n_sample


def _write_tokens(
    tmp: Path,
    store: ChunkStore,
    parts: dict[str, np.ndarray],
    palette: np.ndarray,
    size: int,
    channels: int,
    order: str,
    workers: int,
) -> float:
    """Quantize each split's stored images, CHUNK rows at a time in `workers` processes (`quantize_stored`:
    the same tokens on any worker), into SPLIT_tokens.npy, written in order as they come; returns the test
    split's summed squared error against the palette (for the quantization RMSE)."""
    from .palette import token_dtype

    dtype, sq_err = token_dtype(len(palette)), 0.0
    table = colour_table(store.work / "colours.lut") if palette.shape[1] == 3 else None
    jobs = [  # every split's chunks in one stream, so that one pool serves them all
        (
            name,
            (
                _parts(store, "test" if name == "test" else "train", where[s : s + CHUNK]),
                palette,
                channels == 3,
                order,
                dtype.str,
                name == "test",
                table,
            ),
        )
        for name, where in parts.items()
        for s in range(0, len(where), CHUNK)
    ]
    with contextlib.ExitStack() as files:
        toks = {
            name: files.enter_context(NpyWriter(tmp / f"{name}_tokens.npy", dtype, (len(where), size * size)))
            for name, where in parts.items()
        }
        results = run_jobs(quantize_stored, [job for _, job in jobs], workers)
        for (name, _), (rows, err) in zip(jobs, results, strict=True):
            toks[name].write(rows)
            sq_err += err
    if table:
        Path(table).unlink(missing_ok=True)
    return sq_err


def _parts(store: ChunkStore, split: str, where: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(chunk file, rows in it) of the stored images at (chunk, row) positions `where`, in order."""
    if not len(where):
        return []
    cut = np.flatnonzero(np.diff(where[:, 0])) + 1
    return [(str(store.path(split, int(w[0, 0]))), w[:, 1]) for w in np.split(where, cut)]
