"""Fits larger than memory (#47): the logistic regression read from disk in row chunks reaches the optimum
the in-memory fit reaches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from igpt.errors import IgptError
from igpt.probes.logistic import RowChunks, column_stats, fit_logistic_many


def _problem(n: int = 900, d: int = 20, C: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 3.0, d) + torch.linspace(-2, 2, d)
    y = (x[:, :C] + 0.8 * torch.randn(n, C, generator=g)).argmax(1)
    return x, y


def test_a_fit_read_from_disk_in_row_chunks_matches_the_fit_in_memory(tmp_path):
    x, y = _problem()
    np.save(tmp_path / "f.npy", x.numpy())
    disk = RowChunks(np.load(tmp_path / "f.npy", mmap_mode="r"), rows=97)  # chunks that do not divide N
    mean, std = column_stats(x)
    dmean, dstd = column_stats(disk)
    assert torch.allclose(mean, dmean) and torch.allclose(std, dstd)
    weights = (torch.rand(2, len(x), generator=torch.Generator().manual_seed(1)) > 0.3).float()
    mem = fit_logistic_many(x, y, 4, [1e-1, 1e-3], weights=weights, max_iter=200)
    out = fit_logistic_many(disk, y, 4, [1e-1, 1e-3], weights=weights, max_iter=200)
    for a, b in zip(mem, out, strict=True):
        assert torch.allclose(a.weight, b.weight, atol=2e-3) and torch.allclose(a.bias, b.bias, atol=2e-3)
        assert a.accuracy(x, y) == pytest.approx(b.accuracy(x, y), abs=2 / len(x))
    assert mem[0].accuracy(x, y) > 0.5  # a real problem, not a constant


def test_features_on_disk_must_be_a_float_matrix(tmp_path):
    np.save(tmp_path / "i.npy", np.zeros((4, 3), np.int64))
    with pytest.raises(IgptError, match="2-D float array"):
        RowChunks(np.load(tmp_path / "i.npy", mmap_mode="r"))
