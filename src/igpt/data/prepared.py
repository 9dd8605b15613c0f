"""Reading a prepared directory (what `igpt prepare` writes). Tokens are memory-mapped, so training and
evaluation touch only the rows they use and never need the whole set in RAM.

Nothing in a prepared directory is trusted: meta.json and the palette are checked when it is opened, and each
split's tokens and labels when first read (shapes, dtypes, and value ranges by a chunked pass over the
memory map), so a damaged or hand-edited set fails with one line naming the file, not deep inside a stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from igpt.checks import is_whole
from igpt.errors import IgptError

from .palette import decode, from_sequence

SPLITS = ("train", "val", "test")
MAX_RESOLUTION = 256
"""The largest image side igpt prepares or reads: 65,536 tokens per image, far past the paper's 64x64."""


class PreparedData:
    """A prepared token set: `meta`, `palette` (K, C) on 0-255, and per split memory-mapped `tokens` (N, T)
    and `labels` (N,) (-1 where unlabeled)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise IgptError(
                f"{self.dir} is not a prepared directory (no meta.json); run `igpt prepare` first"
            )
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise IgptError(f"{meta_path} is not valid JSON ({e})") from None
        if not isinstance(self.meta, dict):
            raise IgptError(f"{meta_path} is not a JSON object; the prepared directory is damaged")
        if "n_val" not in self.meta:
            raise IgptError(
                f"{self.dir} was prepared before igpt held out a validation split; prepare it again "
                "(igpt prepare ... --force)"
            )
        self._check_meta(meta_path)
        self.palette = self._load("palette.npy", mmap=False)
        self._check_palette()
        self._tokens: dict[str, np.ndarray] = {}
        self._labels: dict[str, np.ndarray] = {}

    def _check_meta(self, path: Path) -> None:
        m = self.meta
        for key, least in (("resolution", 1), ("clusters", 2), ("num_classes", 0)):
            v = m.get(key)
            if not is_whole(v, least):
                raise IgptError(f"{path}: '{key}' must be an integer of at least {least}, got {v!r}")
        if m["resolution"] > MAX_RESOLUTION:
            raise IgptError(
                f"{path}: 'resolution' {m['resolution']} is past the largest igpt handles ({MAX_RESOLUTION})"
            )
        if m.get("order", "raster") not in ("raster", "snake"):
            raise IgptError(f"{path}: 'order' must be raster or snake, got {m.get('order')!r}")
        m.setdefault("order", "raster")

    def _check_palette(self) -> None:
        p, K = self.palette, self.clusters
        where = self.dir / "palette.npy"
        if p.ndim != 2 or p.dtype.kind not in "fiu":
            raise IgptError(f"{where}: expected a numeric (K, channels) array, got {p.dtype} {p.shape}")
        channels = self.meta.get("channels", p.shape[1])
        if p.shape != (K, channels) or channels not in (1, 3):
            raise IgptError(
                f"{where}: expected {K} colours of {channels} channel(s) (meta.json), got shape {p.shape}"
            )
        if not np.isfinite(p).all() or p.min() < 0 or p.max() > 255:
            raise IgptError(f"{where}: colours must be finite values on 0-255")

    @property
    def resolution(self) -> int:
        return int(self.meta["resolution"])

    @property
    def clusters(self) -> int:
        return int(self.meta["clusters"])

    @property
    def seq_len(self) -> int:
        return self.resolution * self.resolution

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def tokens(self, split: str) -> np.ndarray:
        """(N, T) tokens of a split, memory-mapped read-only; checked on first use: two dimensions, integer
        dtype, T = resolution^2 and every value in [0, clusters)."""
        if split not in self._tokens:
            name = f"{split}_tokens.npy"
            t = self._load(name, mmap=True)
            where = self.dir / name
            if t.ndim != 2 or t.dtype.kind not in "iu":
                raise IgptError(f"{where}: expected a 2-D integer array of tokens, got {t.dtype} {t.shape}")
            if t.shape[1] != self.seq_len:
                raise IgptError(
                    f"{where}: rows of {t.shape[1]} tokens, but meta.json's resolution "
                    f"{self.resolution} means {self.seq_len}"
                )
            lo, hi = _value_range(t)
            if t.shape[0] and (lo < 0 or hi >= self.clusters):
                raise IgptError(
                    f"{where}: token values must be in [0, {self.clusters}) (the palette's size), found "
                    f"{lo}..{hi}"
                )
            self._tokens[split] = t
        return self._tokens[split]

    def labels(self, split: str) -> np.ndarray:
        """(N,) int64 labels of a split; -1 marks unlabeled images. Checked on first use: one label per
        token row, integers in [-1, num_classes)."""
        if split not in self._labels:
            name = f"{split}_labels.npy"
            y = self._load(name, mmap=False)
            where = self.dir / name
            if y.ndim != 1 or y.dtype.kind not in "iu":
                raise IgptError(f"{where}: expected a 1-D integer array of labels, got {y.dtype} {y.shape}")
            n = len(self.tokens(split))
            if len(y) != n:
                raise IgptError(f"{where}: {len(y)} labels for {n} images in {split}_tokens.npy")
            y = y.astype(np.int64)
            C = self.num_classes
            if len(y) and (y.min() < -1 or y.max() >= C):
                raise IgptError(
                    f"{where}: labels must be in [0, {C}) (num_classes in meta.json) or -1 for unlabeled, "
                    f"found {y.min()}..{y.max()}"
                )
            self._labels[split] = y
        return self._labels[split]

    def images(self, split: str, index: np.ndarray | list[int]) -> np.ndarray:
        """Decoded uint8 (n, R, R, C) images of the given rows."""
        seq = np.asarray(self.tokens(split)[np.asarray(index)], dtype=np.int64)
        return decode(from_sequence(seq, self.resolution, self.meta["order"]), self.palette)

    def check(self) -> PreparedData:
        """Read and check every split now (what a stage does before it creates anything)."""
        for split in SPLITS:
            self.labels(split)
        return self

    def _load(self, name: str, mmap: bool) -> np.ndarray:
        path = self.dir / name
        if not path.is_file():
            raise IgptError(f"{path} is missing; the prepared directory is incomplete")
        try:
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise IgptError(f"cannot read {path} ({e.__class__.__name__}: {e})") from None


def _value_range(a: np.ndarray, rows: int = 65_536) -> tuple[int, int]:
    """(min, max) of a memory-mapped array, read in chunks of rows so memory stays flat."""
    lo, hi = 0, 0
    for s in range(0, len(a), rows):
        chunk = np.asarray(a[s : s + rows])
        c_lo, c_hi = int(chunk.min()), int(chunk.max())
        lo, hi = (c_lo, c_hi) if s == 0 else (min(lo, c_lo), max(hi, c_hi))
    return lo, hi


def meta_record(
    settings: dict[str, Any],
    *,
    resolution: int,
    palette: np.ndarray,
    counts: tuple[int, int, int],
    class_names: list[str],
    rmse: float,
    source: str,
    skipped: int,
    palette_from: str,
    seconds: dict[str, float],
    **extra: Any,
) -> dict[str, Any]:
    """meta.json's content for a prepared set (the one place its keys are written; `PreparedData` reads
    them): `settings` are the prepare settings compared on reuse, `counts` (n_train, n_val, n_test),
    `class_names` empty for an unlabeled set; `extra` keys are added after the common ones."""
    from igpt import __version__

    from .palette import token_dtype

    k = len(palette)
    n_train, n_val, n_test = counts
    return {
        "dataset": settings["dataset"],
        "resolution": resolution,
        "channels": int(palette.shape[1]),
        "clusters": k,
        "order": settings["order"],
        "n_train": n_train,
        "n_val": n_val,
        "val_fraction": settings["val_fraction"],
        "n_test": n_test,
        "num_classes": len(class_names),
        "class_names": class_names,
        "quantization_rmse": round(rmse, 4),
        "seq_len": resolution * resolution,
        "token_dtype": np.dtype(token_dtype(k)).name,
        "source": source,
        "skipped_files": skipped,
        "palette_from": settings["palette"] or palette_from,
        **extra,
        "seconds": seconds,
        "igpt_version": __version__,
        "settings": settings,
    }
