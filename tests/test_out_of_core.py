"""Fits larger than memory (#47): the logistic regression read from disk in row chunks reaches the optimum
the in-memory fit reaches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from igpt.errors import IgptError
from igpt.probes.chunks import RowChunks
from igpt.probes.logistic import column_stats, fit_logistic_many


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


# ----------------------------------------------------------------------------- the probe through the store
KW = dict(pool="grid", fine_pool="grid4", progress=False)
KEYS = ("best_layer", "layers", "val_accuracy", "lambda", "raw_pixel_accuracy", "chosen", "fine_probe")


def close(a, b, tol: float = 1e-5) -> bool:
    """Equal JSON values, numbers within `tol` (nested dicts and lists compared item by item)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(close, a, b))
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= tol
    return a == b


def _own_run(micro_run, tmp_path):
    """A copy of the shared micro run with its data, so this module's probes write into its own run."""
    import shutil

    shutil.copytree(micro_run.parent, tmp_path / "m")
    return tmp_path / "m" / "run"


def _between(run) -> float:
    """A --memory-limit (GiB) under what the in-memory probe holds, over what the probe from disk holds."""
    from igpt.data.prepared import PreparedData
    from igpt.probes.memory import out_of_core_bytes, probe_bytes
    from igpt.runs import Run

    info = Run.open(run)
    d = PreparedData(info.data_dir)
    m = info.load_model()
    n_train = int((d.labels("train") >= 0).sum())
    sizes = (n_train, len(d.labels("val")) + len(d.labels("test")), m.config.n_layer + 1, m.config.n_embd)
    low, high = out_of_core_bytes(*sizes, "grid", "grid4"), probe_bytes(*sizes, "grid", "grid4")
    assert low < high
    return (low + high) / 2 / 2**30


def test_a_probe_forced_out_of_core_gives_the_in_memory_probe_figures(micro_run, tmp_path, capsys):
    import igpt

    run = _own_run(micro_run, tmp_path)
    mem = igpt.probe(run, **KW)
    assert not (run / "features").exists()  # one process whose features fit: in memory, as always
    disk = igpt.probe(run, memory_limit=_between(run), **KW)
    assert "fits read them from the feature store" in capsys.readouterr().err
    for k in KEYS:
        assert close(mem[k], disk[k]), (k, mem[k], disk[k])
    entries = sorted(p for p in (run / "features").glob("*/*") if p.is_dir())
    assert {p.name.split("-")[0] for p in entries} == {"train", "val", "test"}
    stamps = [p.stat().st_mtime_ns for p in entries]
    again = igpt.probe(run, memory_limit=_between(run), **KW)  # the same weights: the store is reused
    assert [p.stat().st_mtime_ns for p in entries] == stamps
    assert sorted(p for p in (run / "features").glob("*/*") if p.is_dir()) == entries
    assert all(again[k] == disk[k] for k in KEYS)


def test_a_probe_that_fits_nowhere_is_refused_before_any_pass(micro_run, tmp_path, cli_error):
    run = _own_run(micro_run, tmp_path)
    err = cli_error("probe", run, "--memory-limit", "0.0001", "--no-progress")
    assert "even fitting the training features from disk" in err and "GiB" in err
    err = cli_error("probe", run, "--memory-limit", str(_between(run)), "--concat", "1,2", "--no-progress")
    assert "not concat" in err
    assert not list((run / "features").glob("*/*-*"))  # no pass ran
    assert "--memory-limit must be a positive" in cli_error("probe", run, "--memory-limit", "0")


def _store_cache(run, data_dir=None, model=None):
    from igpt.data.prepared import PreparedData
    from igpt.probes.store import FeatureStore, StoreCache
    from igpt.runs import Run

    info = Run.open(run)
    model = model or info.load_model()
    data = PreparedData(data_dir or info.data_dir)
    store = FeatureStore(info.path, model, {"precision": "fp32", "resolution": 8, "order": "raster"})
    return StoreCache(model, data, [0, 1], store, pool="mean", resolution=8, order="raster"), store


def test_the_store_is_never_reused_for_other_weights_or_other_tokens(micro_run, tmp_path):
    run = _own_run(micro_run, tmp_path)
    cache, store = _store_cache(run)
    rows = np.arange(40)
    first = cache("val", rows, "")[1].clone()
    assert len(list(store.root.glob("val-*"))) == 1
    # another prepared set, its tokens changed, same file names: a new pass, not the stored features
    other = tmp_path / "other"
    import shutil

    shutil.copytree(run.parent / "data", other)
    tok = np.load(other / "val_tokens.npy")
    np.save(other / "val_tokens.npy", (tok + 1) % tok.max())
    cache2, _ = _store_cache(run, other)
    assert not torch.equal(cache2("val", rows, "")[1], first)
    assert len(list(store.root.glob("val-*"))) == 2
    # other weights: another key; opening its store removes the old one
    model = cache.model
    with torch.no_grad():
        model.lm_head.weight.add_(0.5) if hasattr(model, "lm_head") else next(model.parameters()).add_(0.5)
    _, store3 = _store_cache(run, model=model)
    assert store3.root != store.root and not store.root.exists() and store3.root.is_dir()


def test_a_pass_that_fails_or_dies_leaves_nothing_a_rerun_trusts(micro_run, tmp_path, monkeypatch):
    import errno
    import os

    from igpt.errors import IgptError
    from igpt.probes import store as store_mod

    run = _own_run(micro_run, tmp_path)
    cache, store = _store_cache(run)
    calls = []

    def dies(self, first, block):
        calls.append(first)
        raise RuntimeError("killed mid-pass")

    monkeypatch.setattr(store_mod.EntryWriter, "write", dies)
    with pytest.raises(RuntimeError):
        cache("val", np.arange(100), "")
    assert calls and not list(store.root.glob("*val-*"))  # neither an entry nor its temporary directory
    monkeypatch.undo()
    # a full disk when the pass reserves its space: one line, nothing left
    monkeypatch.setattr(
        os, "posix_fallocate", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
    )
    with pytest.raises(IgptError, match="no space left"):
        cache("val", np.arange(100), "")
    assert not list(store.root.glob("*val-*"))
    monkeypatch.undo()
    # a process killed outright leaves its temporary directory; the next store removes it, trusts nothing
    dead = store.root / ".tmp-999999999-val-0123456789abcdef0123"
    dead.mkdir()
    (dead / "mean-0.npy").write_bytes(b"half")
    damaged = store.root / "val-fedcba98765432100000"  # an entry without its record: never read
    damaged.mkdir()
    np.save(damaged / "rows.npy", np.arange(100))
    cache, store = _store_cache(run)
    assert not dead.exists()
    got = cache("val", np.arange(100), "")
    assert got[0].shape[0] == 100 and torch.isfinite(got[0]).all()
    assert len([p for p in store.root.glob("val-*") if (p / "entry.json").is_file()]) == 1


def test_store_arrays_are_read_with_plain_reads_in_any_order(tmp_path):
    from igpt.probes.store import NpyRows

    a = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)
    np.save(tmp_path / "a.npy", a)
    rows = NpyRows(tmp_path / "a.npy")
    assert rows.shape == (40, 3) and (rows[5:17] == a[5:17]).all() and (rows[slice(None)] == a).all()
    pick = np.array([30, 2, 3, 4, 39, 0])
    assert (rows[pick] == a[pick]).all()
    chunks = RowChunks(rows, rows=7, index=np.array([1, 5, 6, 7, 20]))
    assert torch.equal(chunks[1:4], torch.from_numpy(a[[5, 6, 7]])) and torch.equal(
        chunks.held(), torch.from_numpy(a[[1, 5, 6, 7, 20]])
    )
