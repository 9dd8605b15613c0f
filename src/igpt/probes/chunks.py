"""Features larger than memory, read a chunk of rows at a time (`RowChunks`): what a fit from disk takes in
place of a tensor (`logistic.fit_logistic_many`, `column_stats`), over the feature store's files or any
row-indexable source (the raw pixels decoded on each read)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from igpt.errors import IgptError

CHUNK_BYTES = 1 << 28
"""A fit from disk reads its features in chunks of about this many bytes of float32 (256 MiB)."""


def chunk_rows(width: int) -> int:
    """Rows of features `width` wide that make one chunk of a fit from disk (`CHUNK_BYTES`)."""
    return max(256, CHUNK_BYTES // (4 * width))


class RowChunks:
    """Features larger than memory: an (N, d) array on disk (a read-only `np.load(..., mmap_mode="r")`, or
    any object with `shape`, `ndim`, `dtype` and numpy row indexing), read `rows` rows at a time as float32
    tensors. `fit_logistic_many` and `column_stats` take it where they take a tensor; the fit then holds one
    chunk and its own state, never the whole matrix. `index` serves those rows of the array (in that order);
    `bf16` reads uint16 words as bfloat16 (numpy has no bfloat16; the feature store writes it so)."""

    def __init__(self, array: Any, rows: int = 16_384, index: np.ndarray | None = None, bf16: bool = False):
        kind_ok = array.dtype.kind == "f" or (bf16 and array.dtype == np.uint16)
        if array.ndim != 2 or not kind_ok:
            raise IgptError(f"features on disk must be a 2-D float array, got {array.dtype} {array.shape}")
        self.array, self.rows, self.index, self.bf16 = array, rows, index, bf16

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.array.shape[1])

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def __len__(self) -> int:
        return self.array.shape[0] if self.index is None else len(self.index)

    def __getitem__(self, rows: slice | np.ndarray) -> torch.Tensor:
        """These rows (a slice, or positions) as a float32 tensor in memory."""
        if self.index is not None:
            rows = self.index[rows]
        elif not isinstance(rows, slice):
            rows = np.asarray(rows)
        a = np.asarray(self.array[rows])
        if self.bf16:
            return torch.from_numpy(np.array(a)).view(torch.bfloat16).float()  # a copy: the map is read-only
        return torch.from_numpy(np.array(a, dtype=np.float32))  # a copy: the map is read-only

    def held(self) -> torch.Tensor:
        """All the rows in memory (one copy), in their stored precision: bfloat16 stays bfloat16."""
        a = self.array[slice(None)] if self.index is None else self.array[self.index]
        t = torch.from_numpy(np.array(a) if isinstance(a, np.memmap) else np.ascontiguousarray(a))
        return t.view(torch.bfloat16) if self.bf16 else t.float()

    def starts(self) -> range:
        return range(0, len(self), self.rows)
