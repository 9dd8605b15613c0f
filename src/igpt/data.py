"""Reading a prepared directory (what `igpt prepare` writes). Tokens are memory-mapped, so training and
evaluation touch only the rows they use and never need the whole set in RAM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import IgptError
from .palette import decode, from_sequence

SPLITS = ("train", "val", "test")


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
        if not isinstance(self.meta, dict) or "n_val" not in self.meta:
            raise IgptError(
                f"{self.dir} was prepared before igpt held out a validation split; prepare it again "
                "(igpt prepare ... --force)"
            )
        self.palette = np.load(self.dir / "palette.npy", allow_pickle=False)
        self._tokens: dict[str, np.ndarray] = {}
        self._labels: dict[str, np.ndarray] = {}

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
        """(N, T) tokens of a split, memory-mapped read-only."""
        if split not in self._tokens:
            self._tokens[split] = self._load(f"{split}_tokens.npy", mmap=True)
        return self._tokens[split]

    def labels(self, split: str) -> np.ndarray:
        """(N,) int64 labels of a split; -1 marks unlabeled images."""
        if split not in self._labels:
            self._labels[split] = self._load(f"{split}_labels.npy", mmap=False).astype(np.int64)
        return self._labels[split]

    def images(self, split: str, index: np.ndarray | list[int]) -> np.ndarray:
        """Decoded uint8 (n, R, R, C) images of the given rows."""
        seq = np.asarray(self.tokens(split)[np.asarray(index)], dtype=np.int64)
        return decode(from_sequence(seq, self.resolution, self.meta["order"]), self.palette)

    def _load(self, name: str, mmap: bool) -> np.ndarray:
        path = self.dir / name
        if not path.is_file():
            raise IgptError(f"{path} is missing; the prepared directory is incomplete")
        try:
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise IgptError(f"cannot read {path} ({e.__class__.__name__}: {e})") from None
