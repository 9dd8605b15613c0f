"""The pretrain stage: train an iGPT model on a prepared token set, AR or BERT, on CPU or GPU, in one process
or under torchrun (DDP, or FSDP with `fsdp=True`). Only rank 0 logs and saves.

The run directory is self-describing and resumable: `resume=True` continues from the newest readable
checkpoint and, on CPU, reproduces the uninterrupted run's losses and weights exactly.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint import (
    check_writable,
    clean_partial,
    latest_readable,
    list_checkpoints,
    save_checkpoint,
)
from .compiling import compile_error_types, fallback_notice
from .config import TrainConfig
from .data import PreparedData
from .engine import Batcher, all_reduce, evaluate, lr_at, mirror_index, shift_table, train_step
from .errors import IgptError
from .files import write_json_atomic, write_text_atomic
from .hardware import cpu_has_amx, cpu_has_avx512_bf16
from .model import IGPT, IGPTConfig
from .optim import Optimizers
from .runs import Run, read_metrics

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
SCHEDULE_WORDS = {
    "cosine": "cosine to 0",
    "linear": "linear to 0",
    "wsd": "stable, then linear to 0 over the last {:.0%}",
}
MODEL_KEYS = ("preset", "objective", "n_layer", "n_embd", "n_head", "bias", "prefix_causal")


def pretrain(
    data: str | Path | None = None,
    out: str | Path | None = None,
    *,
    preset: str | None = None,
    objective: str | None = None,
    n_layer: int | None = None,
    n_embd: int | None = None,
    n_head: int | None = None,
    bias: bool | None = None,
    prefix_causal: bool | None = None,
    steps: int | None = None,
    minutes: float | None = None,
    batch_size: int | None = None,
    grad_accum: int | None = None,
    lr: float | None = None,
    optimizer: str | None = None,
    schedule: str | None = None,
    warmup: float | None = None,
    cooldown: float | None = None,
    weight_decay: float | None = None,
    grad_clip: float | None = None,
    mask_ratio: float | None = None,
    flip: bool | None = None,
    shift: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    compile: bool | None = None,
    fsdp: bool | None = None,
    eval_interval: int | None = None,
    eval_images: int | None = None,
    log_interval: int | None = None,
    keep_steps: list[int] | str | None = None,
    keep_every: int | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Pretrain a model on the prepared set `data` into the run directory `out` and return its summary
    (summary.json's content). Every setting left None takes its default (`TrainConfig`'s; the model is the
    `tiny` preset, AR, without biases) or, with `resume`, the run's own. `resume` continues the run in
    `out`; only the budget (steps, minutes, checkpointing, compile) may change, and the model must match.
    Under torchrun every process calls this; only rank 0 writes."""
    if out is None:
        raise IgptError("pretrain needs out, the run directory to create or resume")
    given = {k: v for k, v in locals().items() if k not in ("out", "resume", "progress") and v is not None}
    if isinstance(given.get("keep_steps"), str):
        text = given["keep_steps"]
        try:
            given["keep_steps"] = [int(s) for s in text.split(",") if s.strip()]
        except ValueError:
            raise IgptError(f"--keep-steps must be comma-separated integers, got '{text}'") from None
    model_given = {k: given.pop(k) for k in MODEL_KEYS if k in given}
    out = Path(out)
    resuming = resume and (out / "run.json").is_file()
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
    env = Dist(device or "cpu")
    lock = None
    try:
        if env.world > 1:  # every process must have been given the same settings: one decision for all
            seen: list[Any] = [None] * env.world
            dist.all_gather_object(seen, {"given": given, "model": model_given, "resume": resume})
            if any(x != seen[0] for x in seen):
                bad = next(i for i, x in enumerate(seen) if x != seen[0])
                raise IgptError(
                    f"the processes were given different settings (rank 0 and rank {bad}); "
                    "launch every rank with the same command"
                )
        # rank 0 creates or checks the run directory, then tells the others what it decided (or why not)
        msg: list[Any] = [None]
        if env.main:
            try:
                out.mkdir(parents=True, exist_ok=True)
                lock = RunLock(out)
                msg = [_setup_run(out, resume, given, model_given)]
            except IgptError as e:
                msg = [str(e)]
        if env.world > 1:
            dist.broadcast_object_list(msg, src=0)
        if isinstance(msg[0], str):
            raise IgptError(msg[0])
        cfg, info, resuming = msg[0]
        return Trainer(cfg, Run(out, info), env, resuming, progress=progress).fit()
    finally:
        if lock:
            lock.release()
        env.close()


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


def check_batch_split(batch_size: int, world: int, grad_accum: int) -> None:
    """The global batch must split evenly over processes and accumulation steps."""
    if batch_size % (world * grad_accum):
        raise IgptError(
            f"--batch-size {batch_size} must divide by processes x --grad-accum = {world * grad_accum}"
        )


def _model_config(model_given: dict[str, Any], data: PreparedData) -> tuple[IGPTConfig, str]:
    """The model of a new run: the preset (tiny by default) with the given overrides, sized to the data."""
    preset = model_given.get("preset", "tiny")
    shape = {k: model_given.get(k) for k in ("n_layer", "n_embd", "n_head")}
    cfg = IGPTConfig.from_preset(
        preset,
        vocab_size=data.clusters,
        n_positions=data.seq_len,
        objective=model_given.get("objective", "ar"),
        bias=bool(model_given.get("bias")),
        prefix_causal=bool(model_given.get("prefix_causal")),
        **shape,
    )
    return cfg, preset


def _setup_run(
    out: Path, resume: bool, given: dict[str, Any], model_given: dict[str, Any]
) -> tuple[TrainConfig, dict, bool]:
    """Create or reopen the run directory (rank 0 only). Returns (config, run record, resuming)."""
    exists = (out / "run.json").is_file()
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


class Dist:
    """torchrun's environment: rank, world size, local device."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = device
        if device == "cuda":  # checked first, on every rank, so no rank waits for one that failed
            if not torch.cuda.is_available():
                raise IgptError("--device cuda, but no CUDA GPU is available")
            if self.local_rank >= torch.cuda.device_count():
                raise IgptError(f"local rank {self.local_rank}, but only {torch.cuda.device_count()} GPU(s)")
            self.device = f"cuda:{self.local_rank}"
        if self.world > 1:
            backend = "nccl" if device == "cuda" else "gloo"
            if device == "cuda":
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class RunLock:
    """An exclusive flock on RUN/.lock: the kernel drops it when the process dies, so a stale lock file
    left by a killed run never blocks a resume."""

    def __init__(self, run: Path):
        self.f = open(run / ".lock", "w")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IgptError(f"another igpt process is training {run}") from None

    def release(self) -> None:
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


class Trainer:
    """The pretraining loop of one process."""

    def __init__(self, cfg: TrainConfig, run: Run, env: Dist, resuming: bool, progress: bool = True):
        self.cfg, self.run, self.env = cfg, run.path, env
        self.progress = progress and env.main
        self.data = PreparedData(cfg.data)
        self.mcfg = mcfg = run.model_config
        self.preset = run.preset or "custom"
        if self.data.clusters != mcfg.vocab_size or self.data.seq_len != mcfg.n_positions:
            raise IgptError(
                f"the prepared data ({self.data.clusters} clusters, {self.data.seq_len} tokens) "
                f"does not match the run's model ({mcfg.vocab_size}, {mcfg.n_positions})"
            )
        tokens = self.data.tokens("train")
        G = cfg.batch_size
        if G > len(tokens):
            raise IgptError(f"--batch-size {G} is larger than the {len(tokens)} training images")
        check_batch_split(G, env.world, cfg.grad_accum)
        bf16_hw = cpu_has_amx() or cpu_has_avx512_bf16()
        if cfg.device == "cpu" and cfg.precision == "bf16" and env.main and not bf16_hw:
            print(
                "igpt: warning: this CPU has neither AMX tiles nor AVX512_BF16; bf16 is likely far slower "
                "than fp32 here",
                file=sys.stderr,
            )
        torch.manual_seed(cfg.seed)
        self.model = IGPT(mcfg).to(env.device)  # the module saved in checkpoints
        self.batcher = Batcher(tokens, G, cfg.seed)
        self.step, self.tokens_seen, self.elapsed_before = 0, 0, 0.0
        self._clock = 0.0
        self.last_val: float | None = None
        if resuming:
            self._restore()
        self.wrapped = self._wrap()
        # parameter groups are taken after wrapping: FSDP replaces parameters with sharded ones
        self.opt = Optimizers(
            list(self.model.named_parameters()),
            cfg.optimizer,
            cfg.lr,
            cfg.weight_decay,
            cfg.beta2,
            fused=env.device.startswith("cuda") and not (cfg.fsdp and env.world > 1),  # one kernel per step
        )
        self.opt_names = self.opt.adamw_names
        if resuming and self._opt_tensors:
            self._load_optimizer(self._opt_tensors)
        order = self.data.meta["order"]
        self.flip_perm = mirror_index(self.data.resolution, order) if cfg.flip else None
        self.shifts = shift_table(self.data.resolution, order, cfg.shift) if cfg.shift else None
        self.stop_requested = False  # agreed by every process (see _tick)
        self._stop_local = False  # this process received a stop signal

    # ------------------------------------------------------------------------------------------ state
    def _restore(self) -> None:
        if self.env.main:
            check_writable(self.run)
            clean_partial(self.run)
        shapes = {k: v.shape for k, v in self.model.state_dict().items()}
        found = latest_readable(self.run, quiet=not self.env.main, expected=shapes)
        self._opt_tensors = {}
        if found is None:
            if self.env.main:
                print("igpt: no checkpoint yet; starting the run from step 0", file=sys.stderr)
                self._truncate_metrics()  # rows of the killed attempt would stand beside the new ones
            return
        path, weights, extra, state = found
        self.model.load_state_dict(weights)
        self._opt_tensors = extra
        if "rng.torch" in extra:
            torch.set_rng_state(extra["rng.torch"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.elapsed_before = state["elapsed_seconds"]
        self.last_val = state.get("val_nll")
        if self.env.main:
            print(f"igpt: resuming {self.run} from {path.name}", file=sys.stderr)
            self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Drop metric rows past the checkpoint we resume from (they will be produced again), and rows that
        do not read as a metrics row (cut mid-line by a kill, damaged bytes, a step that is not a number)."""
        p = self.run / "metrics.jsonl"
        if p.is_file():
            keep = [row for row in read_metrics(self.run) if row["step"] <= self.step]
            write_text_atomic(p, "".join(json.dumps(row) + "\n" for row in keep))

    def _wrap(self) -> torch.nn.Module:
        m: torch.nn.Module = self.model
        if self.env.world > 1:
            if self.cfg.fsdp:
                from torch.distributed.fsdp import fully_shard

                for block in self.model.h:
                    fully_shard(block)
                fully_shard(self.model)
            else:
                from torch.nn.parallel import DistributedDataParallel

                m = DistributedDataParallel(
                    self.model, device_ids=[self.env.local_rank] if "cuda" in self.env.device else None
                )
        if self.cfg.compile:
            m = torch.compile(m)
        return m

    def _train_step(self, lr: float) -> tuple[float, float]:
        """One optimizer step through the wrapped model. If torch.compile fails (no C++ compiler, say), the
        notice is printed, the half-done gradients are dropped and the step is redone eagerly."""
        c, env = self.cfg, self.env
        kw = dict(
            rank=env.rank,
            world=env.world,
            grad_accum=c.grad_accum,
            objective=self.mcfg.objective,
            mask_ratio=c.mask_ratio,
            flip_perm=self.flip_perm,
            shifts=self.shifts,
            prefix_causal=self.mcfg.prefix_causal,
            seed=c.seed,
            lr=lr,
            grad_clip=c.grad_clip,
            device=env.device,
            precision=c.precision,
        )
        try:
            return train_step(self.wrapped, self.opt, self.batcher, self.step, **kw)
        except compile_error_types() as e:
            if not hasattr(self.wrapped, "_orig_mod"):
                raise
            if env.main:
                fallback_notice("the training step", e)
            self.opt.zero_grad(set_to_none=True)
            self.wrapped = self.wrapped._orig_mod
            return train_step(self.wrapped, self.opt, self.batcher, self.step, **kw)

    def _load_optimizer(self, tensors: dict[str, torch.Tensor]) -> None:
        if not (self.cfg.fsdp and self.env.world > 1):
            self.opt.load(tensors)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        o = StateDictOptions(full_state_dict=True)  # every rank gets the template, and loads its own copy
        osd = get_optimizer_state_dict(self.model, self.opt.adamw, options=o)
        names = self.opt_names
        state: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            if key.startswith("opt."):
                _, i, k = key.split(".", 2)
                state.setdefault(names[int(i)], {})[k] = t
        osd["state"] = state
        o = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.model, self.opt.adamw, osd, options=o)

    def _full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Model and optimizer tensors as full (unsharded) CPU tensors."""
        if self.cfg.fsdp and self.env.world > 1:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            o = StateDictOptions(full_state_dict=True, cpu_offload=True)
            msd = get_model_state_dict(self.model, options=o)
            osd = get_optimizer_state_dict(self.model, self.opt.adamw, options=o)
            if not self.env.main:  # the full state is gathered on rank 0 only
                return {}, {}
            names = self.opt_names
            extra = {
                f"opt.{names.index(n)}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).contiguous()
                for n, st in osd["state"].items()
                for k, v in st.items()
            }
            return msd, extra
        return self.model.state_dict(), self.opt.tensors()

    def save(self, train_loss: float | None) -> None:
        msd, extra = self._full_state()
        if not self.env.main:
            return
        extra["rng.torch"] = torch.get_rng_state()
        keep = set(self.cfg.keep_steps)
        if self.cfg.keep_every:
            keep |= set(range(self.cfg.keep_every, self.step + 1, self.cfg.keep_every))
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed_seconds": self.elapsed(),
            "epoch": self.batcher.epoch_of(self.step),
            "train_loss": train_loss,
            "val_nll": self.last_val,
            "lr": self.opt.param_groups[0]["lr"],
        }
        save_checkpoint(self.run, self.step, msd, extra, state, keep)

    # ------------------------------------------------------------------------------------------ loop
    def elapsed(self) -> float:
        """Seconds of the budget used, as of the last `_tick`: the same number on every process."""
        return self._clock

    def _tick(self) -> None:
        """Agree on the clock and on stop requests. Under torchrun every process takes rank 0's elapsed time
        and stops if any process was asked to, in one small collective, so the learning rate, `done()` and
        the checkpoints are one decision made the same on every rank, however skewed their starts."""
        local = self.elapsed_before + (time.perf_counter() - self.t_start)
        if self.env.world == 1:
            self._clock, self.stop_requested = local, self._stop_local
            return
        # the signal handler only sets _stop_local: a signal that lands during this collective is not lost,
        # and stop_requested changes here alone, the same on every rank
        t = torch.tensor([local if self.env.main else 0.0, float(self._stop_local)], dtype=torch.float64)
        t = t.to(self.env.device)
        all_reduce(t, self.env.device)
        self._clock, self.stop_requested = float(t[0]), bool(t[1] > 0)

    def lr_progress(self) -> float:
        """Share of the budget that the coming step completes: by steps, by time, or the larger of both."""
        p = (self.step + 1) / self.cfg.steps if self.cfg.steps else 0.0
        if self.cfg.minutes:
            p = max(p, self.elapsed() / (60 * self.cfg.minutes))
        return p

    def done(self) -> bool:
        if self.cfg.steps and self.step >= self.cfg.steps:
            return True
        return bool(self.cfg.minutes and self.elapsed() >= 60 * self.cfg.minutes)

    def _on_stop(self, signum, frame) -> None:
        """SIGINT or SIGTERM (torchrun forwards its own as SIGTERM): finish the step, then every process
        saves and stops together (see `_tick`). A second signal aborts."""
        if self._stop_local:
            raise KeyboardInterrupt
        self._stop_local = True
        who = f" (rank {self.env.rank})" if self.env.world > 1 else ""
        print(
            f"\nigpt: interrupt{who}: finishing this step and saving a checkpoint (Ctrl-C again to abort)",
            file=sys.stderr,
        )

    def _replica_digests(self) -> list[str] | None:
        """Under DDP, a digest of each process's weights, gathered on every process: equal digests show the
        replicas ended identical. None in one process or under FSDP (whose processes hold shards)."""
        if self.env.world == 1 or self.cfg.fsdp:
            return None
        h = hashlib.sha256()
        for k, v in sorted(self.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        out: list[Any] = [None] * self.env.world
        dist.all_gather_object(out, h.hexdigest()[:16])
        return out

    def _log(self, row: dict[str, Any]) -> None:
        if not self.env.main:
            return
        with open(self.run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def _validate(self) -> float:
        c = self.cfg
        v = evaluate(
            self.model,
            self.data.tokens("val"),
            c.eval_images,
            self.mcfg.objective,
            c.mask_ratio,
            self.env.device,
            c.precision,
        )
        self.last_val = v
        return v

    def fit(self) -> dict[str, Any]:
        c, env = self.cfg, self.env
        T = self.data.seq_len
        per_step_tokens = c.batch_size * T
        self.tb = None
        if env.main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run / "tb"))
            except ImportError:
                pass
            n = self.model.num_params()
            why = f" ({c.precision_reason})" if c.precision_reason else ""
            augment = "".join(
                [
                    ", random flips" if c.flip else "",
                    f", random shifts up to {c.shift} px" if c.shift else "",
                    ", prefix-causal attention" if self.mcfg.prefix_causal else "",
                ]
            )
            micro = c.batch_size // (env.world * c.grad_accum)
            budget = " and ".join(
                s
                for s in (f"{c.steps} steps" if c.steps else "", f"{c.minutes} min" if c.minutes else "")
                if s
            )
            print(
                f"igpt pretrain: {self.mcfg.objective.upper()} {self.preset} ({n:,} parameters), "
                f"{T} tokens/image, {self.data.meta['n_train']:,} training images\n"
                f"  global batch {c.batch_size} = {env.world} process(es) x {c.grad_accum} accumulation x "
                f"{micro} micro-batch; {per_step_tokens:,} tokens/step\n  {c.optimizer}, peak lr {c.lr:g}, "
                f"warm-up {c.warmup:.0%} of {budget}, {SCHEDULE_WORDS[c.schedule].format(c.cooldown)}"
                f"{augment}\n  device {env.device} {c.precision}{why}"
                f"{' torch.compile' if c.compile else ''}; run {self.run}",
                file=sys.stderr,
            )
        prev_handlers = {sig: signal.signal(sig, self._on_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        skew = os.environ.get("IGPT_START_SKEW", "")  # "RANK:SECONDS", for the test of skewed starts
        if skew.partition(":")[0] == str(env.rank):
            time.sleep(float(skew.partition(":")[2] or 0))
        self.t_start = time.perf_counter()
        self._tick()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=c.steps,
                initial=self.step,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=1.0,
            )
        window: list[float] = []
        t_window, tok_window = time.perf_counter(), 0
        tok_rate, train_loss = 0.0, None
        run_t0, run_tok0, eval_seconds = time.perf_counter(), self.tokens_seen, 0.0
        try:
            self.wrapped.train()
            while not self.done():
                lr = lr_at(self.lr_progress(), c.lr, c.warmup, c.schedule, c.cooldown)
                loss, gnorm = self._train_step(lr)
                if not (math.isfinite(loss) and math.isfinite(gnorm)):
                    saved = list_checkpoints(self.run)
                    last = saved[-1].name if saved else "none yet"
                    raise IgptError(
                        f"the loss became {loss} (gradient norm {gnorm}) at step {self.step + 1}; "
                        f"stopped without saving it (last good checkpoint: {last}); try a lower --lr"
                    )
                self.step += 1
                self._tick()
                self.tokens_seen += per_step_tokens
                tok_window += per_step_tokens
                window.append(loss)
                if self.step % c.log_interval == 0 or self.done():
                    now = time.perf_counter()
                    tok_rate = tok_window / max(1e-9, now - t_window)
                    train_loss = sum(window) / len(window)
                    self._log(
                        {
                            "step": self.step,
                            "loss": train_loss,
                            "lr": lr,
                            "grad_norm": gnorm,
                            "tokens_per_second": tok_rate,
                            "elapsed": self.elapsed(),
                            "epoch": self.batcher.epoch_of(self.step),
                        }
                    )
                    window, t_window, tok_window = [], now, 0
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{loss:.4f}", tok_s=f"{tok_rate:,.0f}", lr=f"{lr:.2e}", refresh=False
                    )
                    if c.minutes and not c.steps:
                        bar.set_description(f"{self.elapsed() / 60:.1f}/{c.minutes:g} min")
                if self.step % c.eval_interval == 0 or self.done() or self.stop_requested:
                    t_eval = time.perf_counter()
                    val = self._validate()
                    self._log({"step": self.step, "val_nll": val, "val_bits_per_token": val / math.log(2)})
                    self.save(train_loss if train_loss is not None else loss)
                    paused = time.perf_counter() - t_eval  # validation and saving are not training time
                    t_window += paused
                    eval_seconds += paused
                    if env.main and bar is None:
                        print(
                            f"step {self.step}: loss {loss:.4f}, val_nll {val:.4f}, {tok_rate:,.0f} tokens/s",
                            file=sys.stderr,
                        )
                if self.stop_requested:
                    break
        finally:
            if bar is not None:
                bar.close()
            for sig, handler in prev_handlers.items():
                signal.signal(sig, handler)
            if self.tb is not None:
                self.tb.close()
        digests = self._replica_digests()
        t_test = time.perf_counter()  # the test split, touched once, at the end of the run
        if self.last_val is None:  # the budget ended before the first step: validate the weights as they are
            self._validate()
        test = self.data.tokens("test")
        test_nll = evaluate(
            self.model, test, c.eval_images, self.mcfg.objective, c.mask_ratio, env.device, c.precision
        )
        eval_seconds += time.perf_counter() - t_test
        wall = time.perf_counter() - run_t0
        summary = {
            "objective": self.mcfg.objective,
            "preset": self.preset,
            "params": self.model.num_params(),
            "steps": self.step,
            "tokens_seen": self.tokens_seen,
            "train_loss": train_loss,
            "val_nll": self.last_val,
            "val_bits_per_token": None if self.last_val is None else self.last_val / math.log(2),
            "val_images": min(c.eval_images, self.data.meta["n_val"]),
            "test_nll": test_nll,
            "test_bits_per_token": test_nll / math.log(2),
            "test_images": min(c.eval_images, self.data.meta["n_test"]),
            "tokens_per_second": (self.tokens_seen - run_tok0) / max(wall - eval_seconds, 1e-9),
            "validation_seconds": round(eval_seconds, 2),
            "elapsed_seconds": self.elapsed(),
            "epochs": self.batcher.epoch_of(self.step),
            "world_size": env.world,
            "finished": self.done(),
            "device": env.device,
            "precision": c.precision,
            "compiled": hasattr(self.wrapped, "_orig_mod"),  # False too where --compile fell back to eager
        }
        if digests is not None:
            summary["replica_weight_digests"] = digests
        if env.device.startswith("cuda"):
            summary["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated(env.device) / 2**20, 1)
        if env.main:
            write_json_atomic(self.run / "summary.json", summary)
            state = "interrupted" if self.stop_requested else "done"
            print(
                f"igpt pretrain {state}: {self.step} steps, train loss {train_loss}, val_nll "
                f"{self.last_val:.4f} ({summary['val_bits_per_token']:.4f} bits/token), "
                f"{summary['tokens_per_second']:,.0f} tokens/s; {self.run}/summary.json"
            )
        if self.stop_requested:
            raise KeyboardInterrupt
        return summary
