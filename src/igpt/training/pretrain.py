"""The pretrain stage: train an iGPT model on a prepared token set, AR or BERT, on CPU or GPU, in one process
or under torchrun (DDP, or FSDP with `fsdp=True`). Only rank 0 logs and saves.

The run directory is self-describing and resumable: `resume=True` continues from the newest readable
checkpoint and, on CPU, reproduces the uninterrupted run's losses and weights exactly.
"""

from __future__ import annotations

import os
import typing
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from igpt.data.prepared import PreparedData
from igpt.errors import IgptError
from igpt.model.gpt import IGPTConfig
from igpt.model.objectives import DEFAULT_OBJECTIVE
from igpt.runs import Run, is_run
from igpt.settings import checked_value, flag_name

from .config import ModelChoice, TrainConfig
from .distributed import Dist, RunLock, check_batch_split, check_same_settings, rank0_decides
from .state import Replan
from .trainer import Trainer

# settings a resume may change: the budget and its bookkeeping, and whether the step is compiled
BUDGET_KEYS = (
    "steps",
    "minutes",
    "eval_interval",
    "log_interval",
    "keep_steps",
    "keep_every",
    "eval_images",
    "compile",
)
MODEL_KEYS = tuple(f.name for f in fields(ModelChoice))
TRAIN_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name != "precision_reason")


def given_settings(
    data: str | Path | None, config: TrainConfig | None, model: ModelChoice | None, settings: dict[str, Any]
) -> dict[str, Any]:
    """The settings a pretraining was given, by name (None counts as not given): the objects' fields, then
    the keywords over them. Unknown names are refused; `keep_steps` may be "500,1000"."""
    unknown = sorted(set(settings) - {*MODEL_KEYS, *TRAIN_KEYS})
    if unknown:
        raise TypeError(
            f"pretrain() got unknown settings {unknown}; it takes {sorted({*MODEL_KEYS, *TRAIN_KEYS})}"
        )
    hints = {**typing.get_type_hints(TrainConfig), **typing.get_type_hints(ModelChoice)}
    given = {
        **({k: v for k, v in asdict(config).items() if k in TRAIN_KEYS} if config else {}),
        **(asdict(model) if model else {}),
        **{
            k: v if k == "keep_steps" else checked_value(flag_name(k), v, hints[k])
            for k, v in settings.items()
            if v is not None
        },
    }
    if data is not None:
        given["data"] = str(data)
    if isinstance(given.get("keep_steps"), str):
        text = given["keep_steps"]
        try:
            given["keep_steps"] = [int(s) for s in text.split(",") if s.strip()]
        except ValueError:
            raise IgptError(f"--keep-steps must be comma-separated integers, got '{text}'") from None
    ModelChoice(**{k: given[k] for k in MODEL_KEYS if k in given})  # one-line refusals of a bad model
    return given


def pretrain(
    data: str | Path | None = None,
    out: str | Path | None = None,
    *,
    config: TrainConfig | None = None,
    model: ModelChoice | None = None,
    resume: bool = False,
    progress: bool = True,
    replan: Replan | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Pretrain a model on the prepared set `data` into the run directory `out` and return its summary
    (summary.json's content). The settings are `TrainConfig`'s and `ModelChoice`'s fields, given as
    `config`/`model` objects or by name (`igpt.pretrain(data, out, preset="small", minutes=5)`); a setting
    not given takes its default (the `tiny` preset, AR) or, with `resume`, the run's own. `resume` continues
    the run in `out`; only the budget (steps, minutes, checkpointing, compile) may change, and the model must
    match. `replan`, for a minutes budget on the wsd schedule in one process, is asked once, halfway, for the
    budget's new minutes (`Trainer._maybe_replan`; the quickstart re-times its later stages there). Under
    torchrun every process calls this; only rank 0 writes."""
    if out is None:
        raise IgptError("pretrain needs out, the run directory to create or resume")
    given = given_settings(data, config, model, settings)
    model_given = {k: given.pop(k) for k in MODEL_KEYS if k in given}
    out = Path(out)
    resuming = resume and is_run(out)
    device = _checked_before_writing(out, given, model_given, resuming)
    env = Dist(device or "cpu")
    locks: list[RunLock] = []  # rank 0's, on the run directory, released however training ends
    try:
        if env.world > 1:  # every process must have been given the same settings: one decision for all
            check_same_settings(env, {"given": given, "model": model_given, "resume": resume})

        def set_up() -> tuple:  # rank 0 creates or checks the run directory; the others hear what it decided
            out.mkdir(parents=True, exist_ok=True)
            locks.append(RunLock(out))
            return _setup_run(out, resume, given, model_given)

        cfg, info, resuming = rank0_decides(env, set_up)
        return Trainer(cfg, Run(out, info), env, resuming, progress=progress, replan=replan).fit()
    finally:
        for lock in locks:
            lock.release()
        env.close()


def _checked_before_writing(
    out: Path, given: dict[str, Any], model_given: dict[str, Any], resuming: bool
) -> str | None:
    """Everything a pretraining's settings must satisfy before the run directory is touched (a new run's
    against its data and this machine; --fsdp's launcher and torch). Returns the device to start on: the
    one given, else a resumed run's own."""
    if resuming and given.get("precision") == "auto":
        del given["precision"]  # the run keeps the precision that auto chose when it was created
    if not resuming:
        if "data" not in given:
            raise IgptError("pretrain needs data, a prepared directory (from igpt prepare)")
        cfg = TrainConfig(**given)  # validate everything before touching the disk
        check_new_run(cfg, PreparedData(given["data"]), model_given)
    device = given.get("device")
    if device is None and resuming:  # the run's own device, not the default
        stored = Run.open(out).train_config
        device = stored.device if stored else None
    if given.get("fsdp"):
        if int(os.environ.get("WORLD_SIZE", "1")) < 2:
            raise IgptError(
                "--fsdp shards the model over torchrun processes; launch with torchrun --nproc_per_node N"
            )
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError:
            raise IgptError(
                f"--fsdp needs torch 2.6 or newer (FSDP2); this is torch {torch.__version__}"
            ) from None
    return device


def check_new_run(cfg: TrainConfig, prepared: PreparedData, model_given: dict[str, Any]) -> None:
    """Everything a new run's settings must satisfy against its data and this machine, checked before the
    run directory is created: the whole prepared set (shapes, token and label ranges), the model sized to
    it, the shift against the image side, the batch against the images, and the memory training needs."""
    prepared.check()
    mcfg, _ = _model_config(model_given, prepared)
    R = prepared.resolution
    if cfg.shift >= R:
        raise IgptError(f"--shift {cfg.shift} must be smaller than the image side ({R} pixels)")
    if mcfg.prefix_causal and mcfg.n_positions < 2:
        raise IgptError("--prefix-causal needs images of at least 2 pixels (a prefix and what follows it)")
    n_train = len(prepared.tokens("train"))
    if cfg.batch_size > n_train:
        raise IgptError(f"--batch-size {cfg.batch_size} is larger than the {n_train} training images")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_batch_split(cfg.batch_size, world, cfg.grad_accum)
    mcfg.check_fits_in_memory(micro_batch=cfg.batch_size // (world * cfg.grad_accum))


def _model_config(model_given: dict[str, Any], data: PreparedData) -> tuple[IGPTConfig, str]:
    """The model of a new run: the preset (tiny by default) with the given overrides, sized to the data."""
    preset = model_given.get("preset", "tiny")
    shape = {k: model_given.get(k) for k in ("n_layer", "n_embd", "n_head")}
    cfg = IGPTConfig.from_preset(
        preset,
        vocab_size=data.clusters,
        n_positions=data.seq_len,
        objective=model_given.get("objective", DEFAULT_OBJECTIVE),
        bias=bool(model_given.get("bias")),
        prefix_causal=bool(model_given.get("prefix_causal")),
        **shape,
    )
    return cfg, preset


def _setup_run(
    out: Path, resume: bool, given: dict[str, Any], model_given: dict[str, Any]
) -> tuple[TrainConfig, dict, bool]:
    """Create or reopen the run directory (rank 0 only). Returns (config, run record, resuming)."""
    exists = is_run(out)
    if exists and not resume:
        raise IgptError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if exists:
        run = Run.open(out)
        if run.kind != "pretrained":
            raise IgptError(f"{out} is a {run.kind} run, not a pretraining to resume")
        stored, mcfg = run.train_config, run.model_config
        have = {"preset": run.preset, **{k: getattr(mcfg, k, None) for k in MODEL_KEYS if k != "preset"}}
        clash = {k: (have[k], v) for k, v in model_given.items() if have[k] != v}
        if clash:
            what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in clash.items())
            raise IgptError(f"--resume must keep the run's model ({what}); the run keeps its own")
        changed = {
            k: (getattr(stored, k), v) for k, v in given.items() if k != "data" and getattr(stored, k) != v
        }
        if "data" in given and Path(given["data"]).resolve() != Path(stored.data):
            changed["data"] = (stored.data, str(Path(given["data"]).resolve()))
        refused = {k: v for k, v in changed.items() if k not in BUDGET_KEYS}
        if refused:
            what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in refused.items())
            raise IgptError(f"--resume with changed settings is refused ({what}); the run keeps its own")
        cfg = TrainConfig(**{**stored.to_dict(), **{k: given[k] for k in changed}})
        if changed or run.upgraded:
            # a new budget (steps, minutes, keeps) is recorded, so the run stays self-describing
            run.info["train"] = cfg.to_dict()
            run.save()
        return cfg, run.info, True
    if any(p.name != ".lock" for p in out.iterdir()):
        raise IgptError(f"{out} exists and is not an igpt run; choose another --out")
    given["data"] = str(Path(given["data"]).resolve())
    cfg = TrainConfig(**given)
    data = PreparedData(cfg.data)
    mcfg, preset = _model_config(model_given, data)
    cfg.resolve_precision(mcfg.n_embd)
    run = Run.create(
        out,
        "pretrained",
        mcfg,
        preset=preset,
        train=cfg,
        data_dir=cfg.data,
        data_meta=data.meta,
        palette=data.palette,
        seed=cfg.seed,
    )
    return cfg, run.info, False
