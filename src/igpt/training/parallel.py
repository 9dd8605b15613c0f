"""Pretraining over several processes (torchrun): the model wrapped for DDP or FSDP, its full state gathered
for a checkpoint and scattered back on resume, and a check that DDP's replicas ended identical. In one
process every function here is the plain thing (the model itself, its own state)."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist

from igpt.model.gpt import IGPT

from .config import TrainConfig
from .distributed import Dist
from .optim import Optimizers


def wrap_model(model: IGPT, cfg: TrainConfig, env: Dist) -> torch.nn.Module:
    """The module the training step runs: DDP or FSDP (each block sharded, then the whole) over several
    processes, then torch.compile where asked; the model itself in one eager process."""
    m: torch.nn.Module = model
    if env.world > 1:
        if cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in model.h:
                fully_shard(block)
            fully_shard(model)
        else:
            from torch.nn.parallel import DistributedDataParallel

            m = DistributedDataParallel(model, device_ids=[env.local_rank] if "cuda" in env.device else None)
    if cfg.compile:
        m = torch.compile(m)
    return m


def load_optimizer(model: IGPT, opt: Optimizers, tensors: dict[str, torch.Tensor], sharded: bool) -> None:
    """Restore the optimizer from a checkpoint's full tensors: directly, or (FSDP) through torch's
    distributed state-dict API, every rank loading its own shard of the full state."""
    if not sharded:
        opt.load(tensors)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    o = StateDictOptions(full_state_dict=True)  # every rank gets the template, and loads its own copy
    osd = get_optimizer_state_dict(model, opt.adamw, options=o)
    names = opt.adamw_names
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(names[int(i)], {})[k] = t
    osd["state"] = state
    set_optimizer_state_dict(model, opt.adamw, osd, options=StateDictOptions(full_state_dict=True))


def full_state(
    model: IGPT, opt: Optimizers, env: Dist, sharded: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Model and optimizer tensors as full (unsharded) CPU tensors; under FSDP gathered on rank 0 only (the
    others get empty dicts)."""
    if not sharded:
        return model.state_dict(), opt.tensors()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=o)
    osd = get_optimizer_state_dict(model, opt.adamw, options=o)
    if not env.main:  # the full state is gathered on rank 0 only
        return {}, {}
    names = opt.adamw_names
    extra = {
        f"opt.{names.index(n)}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).contiguous()
        for n, st in osd["state"].items()
        for k, v in st.items()
    }
    return msd, extra


def replica_digests(model: IGPT, env: Dist) -> list[str] | None:
    """Under DDP, a digest of each process's weights, gathered on every process: equal digests show the
    replicas ended identical. None in one process (under FSDP, whose processes hold shards, do not ask)."""
    if env.world == 1:
        return None
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    out: list[Any] = [None] * env.world
    dist.all_gather_object(out, h.hexdigest()[:16])
    return out
