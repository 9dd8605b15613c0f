"""The pretraining loop of one process (`Trainer`): restore or start, step, validate and save, summarise.
Deterministic in (seed, step) on CPU, so a resumed run reproduces the uninterrupted one."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from igpt.data.prepared import PreparedData
from igpt.errors import IgptError
from igpt.files import write_text_atomic
from igpt.hardware import cpu_has_amx, cpu_has_avx512_bf16, muon_ns_dtype
from igpt.model.compiling import fallback_notice, is_compile_error
from igpt.model.gpt import IGPT
from igpt.runs import Run, read_metrics

from .checkpoint import (
    check_writable,
    clean_partial,
    latest_readable,
    list_checkpoints,
    save_checkpoint,
)
from .config import TrainConfig
from .distributed import Dist, check_batch_split
from .engine import Batcher, StepRecipe, all_reduce, evaluate, lr_at, mirror_index, shift_table, train_step
from .optim import Optimizers

SCHEDULE_WORDS = {
    "cosine": "cosine to 0",
    "linear": "linear to 0",
    "wsd": "stable, then linear to 0 over the last {:.0%}",
}
"""How the start-up line describes each learning-rate schedule after warm-up."""

REPLAN_AT = 0.5
"""Share of a minutes budget after which `Trainer.replan` is asked, once, for the budget's new minutes."""

Replan = Callable[[float, float, float], "float | None"]
"""(elapsed seconds, least minutes, most minutes) -> the budget's new minutes, or None to keep it."""


@dataclass
class _Meter:
    """The running numbers of one `Trainer.fit`: the loss window since the last metrics row and its tokens,
    the last rate and mean loss, and the seconds spent validating (which are not training time)."""

    tokens0: int
    start: float = field(default_factory=time.perf_counter)
    window: list[float] = field(default_factory=list)
    window_start: float = field(default_factory=time.perf_counter)
    window_tokens: int = 0
    tok_rate: float = 0.0
    train_loss: float | None = None
    eval_seconds: float = 0.0


class Trainer:
    """The pretraining loop of one process."""

    def __init__(
        self,
        cfg: TrainConfig,
        run: Run,
        env: Dist,
        resuming: bool,
        progress: bool = True,
        replan: Replan | None = None,
    ):
        self.cfg, self.run, self.env, self.record = cfg, run.path, env, run
        self.replan, self._replanned = replan, False
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
            ns_dtype=muon_ns_dtype(env.device),
            adamw_lr_ratio=cfg.adamw_lr_ratio,
        )
        self.opt_names = self.opt.adamw_names
        if resuming and self._opt_tensors:
            self._load_optimizer(self._opt_tensors)
        order = self.data.meta["order"]
        self.recipe = StepRecipe(  # what every step of this run does the same way
            rank=env.rank,
            world=env.world,
            grad_accum=cfg.grad_accum,
            objective=mcfg.objective,
            mask_ratio=cfg.mask_ratio,
            seed=cfg.seed,
            grad_clip=cfg.grad_clip,
            device=env.device,
            precision=cfg.precision,
            flip_perm=mirror_index(self.data.resolution, order) if cfg.flip else None,
            shifts=shift_table(self.data.resolution, order, cfg.shift) if cfg.shift else None,
            prefix_causal=mcfg.prefix_causal,
        )
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
        p = self.record.metrics_file
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
        env, recipe = self.env, self.recipe
        try:
            return train_step(self.wrapped, self.opt, self.batcher, self.step, lr, recipe)
        except Exception as e:
            if not is_compile_error(e) or not hasattr(self.wrapped, "_orig_mod"):
                raise
            if env.main:
                fallback_notice("the training step", e)
            self.opt.zero_grad(set_to_none=True)
            self.wrapped = self.wrapped._orig_mod
            return train_step(self.wrapped, self.opt, self.batcher, self.step, lr, recipe)

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
            "lr": self.opt.param_groups[0]["lr"] / self.opt.param_groups[0].get("scale", 1.0),
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

    def _maybe_replan(self) -> None:
        """Once, after REPLAN_AT of a minutes budget on the wsd schedule: ask `replan` for new minutes and
        take them. The new budget is kept inside the schedule's flat stretch (past warm-up, before the
        cool-down), where the learning rate does not depend on the budget, so the change makes no jump. The
        quickstart uses this to re-time its later stages mid-run. One process only (torchrun runs skip it)."""
        c = self.cfg
        if self.replan is None or self._replanned or self.env.world > 1:
            return
        if not c.minutes or c.steps or c.schedule != "wsd" or not c.warmup <= REPLAN_AT <= 1 - c.cooldown:
            return  # no flat stretch at the asking point: a new budget would move the rate
        if self.elapsed() < REPLAN_AT * 60 * c.minutes:
            return
        self._replanned = True
        now = self.elapsed() / 60
        lo = now / (1 - c.cooldown)
        hi = now / c.warmup if c.warmup > 0 else math.inf
        new = self.replan(60 * now, lo, hi)
        if new is None:
            return
        new = round(min(max(new, lo), hi), 2)
        if new != c.minutes:
            c.minutes = new
            self.record.info["train"] = c.to_dict()
            self.record.save()

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
        with open(self.record.metrics_file, "a") as f:
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
        """Train until the budget ends (or a stop is asked for), validating and saving every
        `eval_interval` steps; then score the test split once and write the summary."""
        self._start_up()
        prev_handlers = {sig: signal.signal(sig, self._on_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        skew = os.environ.get("IGPT_START_SKEW", "")  # "RANK:SECONDS", for the test of skewed starts
        if skew.partition(":")[0] == str(self.env.rank):
            time.sleep(float(skew.partition(":")[2] or 0))
        self.t_start = time.perf_counter()
        self._tick()
        m = _Meter(tokens0=self.tokens_seen)
        bar = self._progress_bar()
        try:
            self.wrapped.train()
            while not self.done():
                loss, lr = self._step(m)
                self._show(bar, m, loss, lr)
                self._maybe_replan()
                if self.step % self.cfg.eval_interval == 0 or self.done() or self.stop_requested:
                    self._validate_and_save(m, loss, bar is None)
                if self.stop_requested:
                    break
        finally:
            if bar is not None:
                bar.close()
            for sig, handler in prev_handlers.items():
                signal.signal(sig, handler)
            if self.tb is not None:
                self.tb.close()
        summary = self._summary(m)
        if self.stop_requested:
            raise KeyboardInterrupt
        return summary

    def _start_up(self) -> None:
        """TensorBoard where installed, and the start-up lines: the model, the derived batch and token
        numbers, the optimizer and schedule, the device and precision (rank 0 only)."""
        c, env, T = self.cfg, self.env, self.data.seq_len
        self.tb = None
        if not env.main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run / "tb"))
        except ImportError:
            pass
        why = f" ({c.precision_reason})" if c.precision_reason else ""
        augment = "".join(
            [
                ", random flips" if c.flip else "",
                f", random shifts up to {c.shift} px" if c.shift else "",
                ", prefix-causal attention" if self.mcfg.prefix_causal else "",
            ]
        )
        micro = c.batch_size // (env.world * c.grad_accum)
        ns = f" (Newton-Schulz in {muon_ns_dtype(env.device)})" if c.optimizer == "muon" else ""
        ratio = f" (embeddings, head, gains x{c.adamw_lr_ratio:g})" if c.adamw_lr_ratio != 1 else ""
        parts = (f"{c.steps} steps" if c.steps else "", f"{c.minutes} min" if c.minutes else "")
        budget = " and ".join(s for s in parts if s)
        print(
            f"igpt pretrain: {self.mcfg.objective.upper()} {self.preset} ({self.model.num_params():,} "
            f"parameters), {T} tokens/image, {self.data.meta['n_train']:,} training images\n"
            f"  global batch {c.batch_size} = {env.world} process(es) x {c.grad_accum} accumulation x "
            f"{micro} micro-batch; {c.batch_size * T:,} tokens/step\n"
            f"  {c.optimizer}{ns}, peak lr {c.lr:g}{ratio}, "
            f"warm-up {c.warmup:.0%} of {budget}, {SCHEDULE_WORDS[c.schedule].format(c.cooldown)}"
            f"{augment}\n  device {env.device} {c.precision}{why}"
            f"{' torch.compile' if c.compile else ''}; run {self.run}",
            file=sys.stderr,
        )

    def _progress_bar(self):
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.cfg.steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            mininterval=1.0,
        )

    def _step(self, m: _Meter) -> tuple[float, float]:
        """One optimizer step at the schedule's rate, refused when the loss is no longer finite; logs a
        metrics row every `log_interval` steps. Returns (loss, lr)."""
        c = self.cfg
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
        tokens = c.batch_size * self.data.seq_len
        self.tokens_seen += tokens
        m.window_tokens += tokens
        m.window.append(loss)
        if self.step % c.log_interval == 0 or self.done():
            now = time.perf_counter()
            m.tok_rate = m.window_tokens / max(1e-9, now - m.window_start)
            m.train_loss = sum(m.window) / len(m.window)
            row = {"step": self.step, "loss": m.train_loss, "lr": lr, "grad_norm": gnorm}
            row.update(
                tokens_per_second=m.tok_rate, elapsed=self.elapsed(), epoch=self.batcher.epoch_of(self.step)
            )
            self._log(row)
            m.window, m.window_start, m.window_tokens = [], now, 0
        return loss, lr

    def _show(self, bar, m: _Meter, loss: float, lr: float) -> None:
        if bar is None:
            return
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{m.tok_rate:,.0f}", lr=f"{lr:.2e}", refresh=False)
        if self.cfg.minutes and not self.cfg.steps:
            bar.set_description(f"{self.elapsed() / 60:.1f}/{self.cfg.minutes:g} min")

    def _validate_and_save(self, m: _Meter, loss: float, say: bool) -> None:
        """val_nll on the validation images, a metrics row, a checkpoint; the time it takes is not training
        time (neither for the budget's tokens/s nor the window's)."""
        t_eval = time.perf_counter()
        val = self._validate()
        self._log({"step": self.step, "val_nll": val, "val_bits_per_token": val / math.log(2)})
        self.save(m.train_loss if m.train_loss is not None else loss)
        paused = time.perf_counter() - t_eval
        m.window_start += paused
        m.eval_seconds += paused
        if self.env.main and say:
            print(
                f"step {self.step}: loss {loss:.4f}, val_nll {val:.4f}, {m.tok_rate:,.0f} tokens/s",
                file=sys.stderr,
            )

    def _summary(self, m: _Meter) -> dict[str, Any]:
        """Score the test split (once, at the end), then write and print the summary (rank 0)."""
        c, env = self.cfg, self.env
        digests = self._replica_digests()
        t_test = time.perf_counter()
        if self.last_val is None:  # the budget ended before the first step: validate the weights as they are
            self._validate()
        test = self.data.tokens("test")
        test_nll = evaluate(
            self.model, test, c.eval_images, self.mcfg.objective, c.mask_ratio, env.device, c.precision
        )
        m.eval_seconds += time.perf_counter() - t_test
        wall = time.perf_counter() - m.start
        summary = {
            "objective": self.mcfg.objective,
            "preset": self.preset,
            "params": self.model.num_params(),
            "steps": self.step,
            "tokens_seen": self.tokens_seen,
            "train_loss": m.train_loss,
            "val_nll": self.last_val,
            "val_bits_per_token": None if self.last_val is None else self.last_val / math.log(2),
            "val_images": min(c.eval_images, self.data.meta["n_val"]),
            "test_nll": test_nll,
            "test_bits_per_token": test_nll / math.log(2),
            "test_images": min(c.eval_images, self.data.meta["n_test"]),
            "tokens_per_second": (self.tokens_seen - m.tokens0) / max(wall - m.eval_seconds, 1e-9),
            "validation_seconds": round(m.eval_seconds, 2),
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
            written = self.record.write_summary(summary)
            state = "interrupted" if self.stop_requested else "done"
            print(
                f"igpt pretrain {state}: {self.step} steps, train loss {m.train_loss}, val_nll "
                f"{self.last_val:.4f} ({summary['val_bits_per_token']:.4f} bits/token), "
                f"{summary['tokens_per_second']:,.0f} tokens/s; {written}"
            )
        return summary
