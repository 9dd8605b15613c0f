"""The probe at scale: where its features live, and the checks that choice needs before any pass. One
process whose features fit keeps them in memory, as it always has (`FeatureCache`). Otherwise they go
through the run's feature store (`StoreCache`): under torchrun, whose processes each compute a share of
every pass, and wherever the full probe's training features would not fit in memory, which its fits then
read from disk in row chunks (the same objective, so the same optimum to float tolerance)."""

from __future__ import annotations

import shutil

import numpy as np

from igpt.data.prepared import PreparedData
from igpt.errors import IgptError
from igpt.model.gpt import IGPT
from igpt.runs import Run
from igpt.training.distributed import Dist, rank0_decides

from .low_data import further_pool
from .memory import feature_budget, out_of_core_bytes, probe_bytes, store_bytes
from .setup import Labelled, ProbeConfig, feature_settings
from .store import STORE, FeatureStore, StoreCache, note_on_disk
from .variants import VARIANTS


def open_cache(
    cfg: ProbeConfig, run: Run, model: IGPT, data: PreparedData, layers: list[int], env: Dist
) -> StoreCache | None:
    """The probe's feature cache on every rank: None where one process holds its features in memory (the
    probe makes its own `FeatureCache`), else a `StoreCache` (rank 0 decides, or refuses, and tells the
    others, so every rank fails with the same line)."""
    on_disk = rank0_decides(env, lambda: _on_disk(cfg, run, model, data, layers, env.world))
    if on_disk is None:
        return None
    kw = feature_settings(cfg, data)
    kw["device"] = env.device
    about = {"precision": cfg.precision, "resolution": data.resolution, "order": kw["order"]}
    store = FeatureStore(run.path, model, about, main=env.main)
    cache = StoreCache(model, data, layers, store, env.world, env.rank, on_disk, not cfg.progress, **kw)
    return cache


def _on_disk(
    cfg: ProbeConfig, run: Run, model: IGPT, data: PreparedData, layers: list[int], world: int
) -> bool | None:
    """True: fit the training features from disk; False: the store, read into memory (torchrun); None: in
    memory, one process. Refuses, in one line and before any pass, a probe that fits nowhere."""
    in_memory = False if world > 1 else None
    if cfg.labels_per_class:  # a low-data probe's features are a few labelled rows: in memory
        return in_memory
    L = Labelled.of(cfg, data)
    fine = further_pool(cfg.pool, cfg.fine_pool, data.resolution)
    sizes = (len(L.tr), len(L.va) + len(L.te), len(layers), model.config.n_embd, cfg.pool, fine)
    budget = feature_budget(cfg.memory_limit)
    need = probe_bytes(*sizes)
    if budget is None or need <= budget:
        return in_memory
    held = f"about {need / 2**30:.1f} GiB of features, more than the {budget / 2**30:.1f} GiB they may take"
    wanted = [v.key for v in VARIANTS if v.wanted(cfg)]
    if wanted:
        raise IgptError(
            f"the probe would hold {held}; fitting from disk serves the linear probes, not "
            f"{', '.join(wanted)} (they hold every training feature): drop them or pass --train-limit N"
        )
    memory = out_of_core_bytes(*sizes)
    if memory > budget:
        raise IgptError(
            f"the probe would hold {held}, and even fitting the training features from disk it holds "
            f"{memory / 2**30:.1f} GiB (the validation and test features, the sweep's rows); pass a coarser "
            "--pool, --fine-pool none or --test-limit N"
        )
    disk, where = store_bytes(*sizes), run.path / STORE
    free = shutil.disk_usage(run.path).free
    if disk > free:
        raise IgptError(
            f"the probe would hold {held}; fitting them from disk needs a feature store of "
            f"{disk / 2**30:.1f} GiB in {where}, where {free / 2**30:.1f} GiB is free; free some space or "
            "pass --train-limit N"
        )
    note_on_disk(disk, where)
    return True


class PixelRows:
    """The raw-pixel baseline's training features read a block of rows at a time (`RowChunks` takes it):
    decoded from the tokens on each read, never held whole (ImageNet's at 32x32 would be 16 GB)."""

    def __init__(self, data: PreparedData, split: str, rows: np.ndarray):
        self.data, self.split, self.rows = data, split, rows
        self.ndim, self.dtype = 2, np.dtype(np.float32)
        self.shape = (len(rows), data.resolution**2 * data.palette.shape[1])

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        picked = self.rows[rows]
        return self.data.images(self.split, picked).reshape(len(picked), -1).astype(np.float32)
