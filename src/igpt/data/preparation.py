"""The prepare stage: images -> resized -> palette -> tokens in raster or snake order, written as a prepared
directory (tokens, labels, palette, meta.json) that every later stage reads.

The directory is built in a temporary sibling and renamed into place at the end, so an interrupted or failed
prepare never leaves a half-written `--out`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from igpt.checks import check_seed
from igpt.errors import IgptError
from igpt.files import atomic_directory, exclusive, write_json_atomic
from igpt.settings import build_config, check_choices, choice

from .palette import (
    ORDERS,
    decode,
    fit_palette,
    load_palette,
    quantize,
    resize_images,
    to_channels,
    to_sequence,
    token_dtype,
)
from .prepared import MAX_RESOLUTION, meta_record
from .sources import Split, load_source, source, split_validation
from .streaming import list_streamed, prepare_streamed  # also registers the streamed sources

VAL_FRACTION = 5000 / 60000  # 5,000 of Fashion-MNIST's 60,000 training images


@dataclass
class PrepareConfig:
    """Settings of one prepare; recorded in meta.json, and a second prepare with equal settings reuses the
    directory instead of redoing it."""

    dataset: str
    """A registered dataset source (`igpt.data.sources.SOURCES`; `igpt prepare --help` lists them)."""
    data_dir: str | None = None
    """Where the source lives (its default place when None)."""
    resolution: int | None = None
    """Square side after box resizing; None keeps the source's own (square) size."""
    clusters: int | None = None
    """Palette size K; None means 16 for grey images and 512 for colour."""
    order: str = choice("raster", ORDERS)
    """raster (row by row) or snake (every other row reversed)."""
    palette: str | None = None
    """Reuse this palette file (ours or OpenAI's kmeans_centers.npy) instead of fitting one."""
    limit: int | None = None
    """Keep only the first N images of each split."""
    seed: int = 0
    """Seed of the k-means sampling and initialisation, and of folder/npz test splits."""
    test_fraction: float = 0.1
    """Share of images held out for testing where the source has no test split (folder, npz)."""
    val_fraction: float = VAL_FRACTION
    """Share of the training split held out for validation (seeded, class-stratified): every choice is made
    on it and nothing trains on it. The default keeps 5,000 of Fashion-MNIST's 60,000."""
    workers: int | None = None
    """The cores a folder's or downsampled ImageNet's prepare uses (default: the cores this process may
    use): processes decoding a folder's images, processes quantizing, threads fitting the palette. The
    output is byte-identical for any number; it is not part of the settings a reuse or resume compares."""
    strict: bool = False
    """Fail on an unreadable image in a folder instead of skipping and counting it."""

    def compared_settings(self) -> dict[str, Any]:
        """The settings that make a prepared set what it is: recorded in meta.json, compared by a reuse and
        by a resume (everything but `workers`, which does not change the output)."""
        return {k: v for k, v in asdict(self).items() if k != "workers"}

    def __post_init__(self) -> None:
        check_choices(self)
        source(self.dataset)  # one line naming the registered sources for any other
        if self.resolution is not None and not 0 < self.resolution <= MAX_RESOLUTION:
            raise IgptError(
                f"--resolution must be in [1, {MAX_RESOLUTION}] (a positive image side in pixels), got "
                f"{self.resolution}"
            )
        if self.clusters is not None and self.clusters < 2:
            raise IgptError(f"--clusters must be at least 2, got {self.clusters}")
        if self.limit is not None and self.limit <= 0:
            raise IgptError(f"--limit must be positive, got {self.limit}")
        if not 0.0 < self.test_fraction < 1.0:
            raise IgptError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        if not 0.0 < self.val_fraction < 1.0:
            raise IgptError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        check_seed(self.seed)
        if self.workers is not None and not 1 <= self.workers <= 256:
            raise IgptError(f"--workers must be in [1, 256], got {self.workers}")
        if self.palette is not None:
            self.palette = str(Path(self.palette).resolve())
        if self.data_dir is not None:
            self.data_dir = str(Path(self.data_dir).expanduser().resolve())


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare(
    dataset: str | PrepareConfig,
    out: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """The prepare stage: read `dataset` (see `PrepareConfig` for every setting, given as the config or by
    name), box-resize it, fit or reuse a palette, and write the token sets to `out`; returns meta.json's
    content. An existing directory prepared with the same settings is reused; one with other settings is
    refused unless `force`."""
    if isinstance(dataset, PrepareConfig):
        cfg = dataset
    else:
        cfg = build_config(PrepareConfig, "prepare", dataset=dataset, **settings)
    return prepare_config(cfg, out, force, progress)


def prepare_config(
    cfg: PrepareConfig, out: str | Path, force: bool = False, progress: bool = True
) -> dict[str, Any]:
    """`prepare` from a ready `PrepareConfig`. A folder and the downsampled ImageNet files are streamed in
    chunks, in parallel and resumably (`igpt.data.streaming`); the other sources are small enough to read
    whole: load and split, resize, fit (or reuse) the palette, quantize, write."""
    out = check_out(Path(out), cfg.data_dir)
    with exclusive(out, "preparing"):  # a second prepare into OUT is refused, not raced on its chunks
        return _prepare_locked(cfg, out, force, progress)


def _prepare_locked(cfg: PrepareConfig, out: Path, force: bool, progress: bool) -> dict[str, Any]:
    """`prepare_config` once `out` is checked and locked."""
    settings = cfg.compared_settings()
    listed = list_streamed(cfg) if source(cfg.dataset).streamed else None
    reused = _reuse_or_refuse(out, settings, force, listed[0].digest() if listed else None)
    if reused is not None:
        return reused
    if listed is not None:
        return prepare_streamed(cfg, out, settings, force, progress, listed)
    t0 = time.perf_counter()
    data, splits = _load_splits(cfg)
    train, val, test = splits
    h, w = train.images.shape[1:3]
    resolution = cfg.resolution
    if resolution is None:
        if h != w:
            raise IgptError(f"the images are {h}x{w}, not square; pass --resolution")
        resolution = h
    t_load = time.perf_counter()
    x = [resize_images(sp.images, resolution) for sp in splits]
    t_resize = time.perf_counter()
    palette, x = _palette(cfg, x)
    t_fit = time.perf_counter()
    dtype = token_dtype(len(palette))
    grids = [quantize(xs, palette) for xs in x]
    tokens = [to_sequence(g, cfg.order).astype(dtype) for g in grids]
    err = decode(grids[2], palette).astype(np.float64) - x[2].astype(np.float64)
    rmse = float(np.sqrt(np.mean(err**2)))  # on the test split
    t_quant = time.perf_counter()
    labelled = np.concatenate([sp.labels for sp in splits])
    meta = meta_record(
        settings,
        resolution=resolution,
        palette=palette,
        counts=tuple(len(t) for t in tokens),
        class_names=data.class_names if (labelled >= 0).any() else [],
        rmse=rmse,
        source=data.source,
        skipped=len(data.skipped),
        palette_from="k-means fit on the training split",
        seconds={
            "load": round(t_load - t0, 3),
            "resize": round(t_resize - t_load, 3),
            "palette": round(t_fit - t_resize, 3),
            "quantize": round(t_quant - t_fit, 3),
        },
        source_size=[int(h), int(w)],
    )
    with atomic_directory(out) as tmp:
        for name, tok, sp in zip(("train", "val", "test"), tokens, splits, strict=True):
            np.save(tmp / f"{name}_tokens.npy", tok)
            np.save(tmp / f"{name}_labels.npy", sp.labels.astype(np.int64))
        np.save(tmp / "palette.npy", palette.astype(np.float32))
        write_json_atomic(tmp / "meta.json", meta)
    meta["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    return meta


PREPARED_FILES = frozenset(
    ["meta.json", "palette.npy"]
    + [f"{s}_{k}.npy" for s in ("train", "val", "test") for k in ("tokens", "labels")]
)
"""Every file a prepared set holds: a directory with anything else is not igpt's to replace."""


def is_prepared_set(out: Path) -> bool:
    """True when `out` is a directory igpt's prepare wrote: a meta.json with its settings and nothing but the
    files a prepare writes. Only such a directory may be replaced (`--force`)."""
    if out.is_symlink() or not out.is_dir():
        return False
    try:
        names = {p.name for p in out.iterdir()}
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        names <= PREPARED_FILES
        and isinstance(meta, dict)
        and isinstance(meta.get("settings"), dict)
        and "dataset" in meta["settings"]
    )


def check_out(out: Path, data_dir: str | None = None) -> Path:
    """`out` made absolute, refused in one line when writing there could delete what igpt did not write: the
    file system's root, the working directory or a folder above it, the source images (`data_dir`) or a
    folder above them."""
    try:
        full = out.expanduser().resolve()
    except (OSError, RuntimeError) as e:
        raise IgptError(f"--out {out}: {e}") from None
    if full == full.parent:
        raise IgptError(f"--out {out} is the file system's root; choose a directory of its own")
    if full == Path.cwd() or full in Path.cwd().parents:
        raise IgptError(f"--out {out} is the working directory or holds it; choose a directory of its own")
    if data_dir is not None:
        src = Path(data_dir).expanduser().resolve()
        if full == src or full in src.parents:
            raise IgptError(f"--out {out} is the source's --data-dir or holds it; choose another --out")
    return full


def _reuse_or_refuse(
    out: Path, settings: dict[str, Any], force: bool, digest: str | None = None
) -> dict[str, Any] | None:
    """An earlier prepare's meta when `out` holds a set with these settings; None when `out` may be written
    (empty, missing, or a set igpt prepared with other settings and `force`); one line otherwise. `--force`
    replaces only a directory `is_prepared_set` recognises: never a user's folder."""
    if out.exists() and not out.is_dir():
        raise IgptError(f"--out {out} exists and is not a directory; choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return None
    if not is_prepared_set(out):
        raise IgptError(
            f"{out} exists, is not empty and is not a set igpt prepared; choose another --out "
            "(igpt replaces only directories it wrote)"
        )
    old = json.loads((out / "meta.json").read_text())
    if old.get("settings") == settings:
        if digest is None or old.get("source_digest") in (None, digest):
            _log(f"{out} already holds this prepared set; reusing it")
            return old
        if not force:
            raise IgptError(
                f"{out} was prepared from {old.get('source', 'its source')} before it changed (images "
                "added, removed or replaced since); pass --force to prepare it again"
            )
    elif not force:
        raise IgptError(f"{out} holds a set prepared with other settings; pass --force to replace it")
    return None


def _load_splits(cfg: PrepareConfig) -> tuple[Any, tuple[Split, Split, Split]]:
    """The source read whole, cut to `limit`, with the seeded class-stratified validation split held out of
    its training images: (the source, (train, val, test))."""
    data = load_source(cfg.dataset, cfg.data_dir, cfg)
    if data.skipped:
        _log(f"warning: skipped {len(data.skipped)} unreadable file(s), e.g. {data.skipped[0]}")
    train, test = data.train, data.test
    if cfg.limit:
        train = Split(train.images[: cfg.limit], train.labels[: cfg.limit])
        test = Split(test.images[: cfg.limit], test.labels[: cfg.limit])
    if len(train.labels) < 2:
        raise IgptError("need at least two training images to hold out a validation split")
    tr_rows, va_rows = split_validation(train.labels, cfg.val_fraction, cfg.seed)
    if len(tr_rows) == 0 or len(va_rows) == 0:
        raise IgptError(f"--val-fraction {cfg.val_fraction} leaves no training or no validation images")
    val = Split(train.images[va_rows], train.labels[va_rows])
    train = Split(train.images[tr_rows], train.labels[tr_rows])
    labelled = train.labels[train.labels >= 0]
    every = np.unique(np.concatenate([labelled, val.labels[val.labels >= 0]]))
    if len(labelled) and len(np.unique(labelled)) < len(every):
        raise IgptError(f"--val-fraction {cfg.val_fraction} leaves a class without training images")
    return data, (train, val, test)


def _palette(cfg: PrepareConfig, x: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The palette given (the images brought to its channels) or k-means fitted on the training images
    (x[0]); returns (palette, images)."""
    if cfg.palette:
        palette = load_palette(cfg.palette)
        x = [to_channels(xs, palette.shape[1]) for xs in x]
        if cfg.clusters is not None and cfg.clusters != len(palette):
            raise IgptError(f"--clusters {cfg.clusters} does not match the palette's {len(palette)} colours")
        return palette, x
    k = cfg.clusters or (16 if x[0].shape[3] == 1 else 512)
    return fit_palette(x[0], k, seed=cfg.seed), x


def summary_lines(meta: dict[str, Any], out: str | Path) -> list[str]:
    """A human summary of a prepared set, printed by the CLI."""
    tr = meta["n_train"]
    return [
        f"prepared {meta['dataset']} -> {out}",
        f"  images      train {tr:,}  validation {meta['n_val']:,}  test {meta['n_test']:,}  "
        f"({meta['num_classes']} classes)",
        f"  tokens      {meta['resolution']}x{meta['resolution']} = {meta['seq_len']} per image, "
        f"{meta['order']} order, "
        f"dtype {meta['token_dtype']}",
        f"  palette     {meta['clusters']} colours x {meta['channels']} channel(s), "
        f"quantization RMSE {meta['quantization_rmse']:.3f} (0-255 scale)",
        f"  time        {meta['seconds'].get('total', sum(meta['seconds'].values())):.2f} s",
    ]
