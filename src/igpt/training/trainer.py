"""The pretraining loop of one process (`Trainer`): restore or start, step, validate and save, summarise.
Deterministic in (seed, step) on CPU, so a resumed run reproduces the uninterrupted one."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from igpt.errors import IgptError
from igpt.model.compiling import fallback_notice, is_compile_error

from .checkpoint import list_checkpoints
from .console import open_tensorboard, progress_bar, start_up_lines
from .engine import all_reduce, evaluate, lr_at, train_step
from .parallel import replica_digests
from .state import TrainerState

REPLAN_AT = 0.5
"""Share of a minutes budget after which `Trainer.replan` is asked, once, for the budget's new minutes."""


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


class Trainer(TrainerState):
    """The pretraining loop of one process: the shared clock and stop requests, steps at the schedule's
    rate, validation, checkpoints, the mid-run re-plan, and the summary."""

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
        """Whether the budget is spent: its steps, or its minutes once at least one step was taken (so a
        finished run always has a checkpoint, however small its budget)."""
        if self.cfg.steps and self.step >= self.cfg.steps:
            return True
        return bool(self.cfg.minutes and self.step > 0 and self.elapsed() >= 60 * self.cfg.minutes)

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
        self.tb = open_tensorboard(self.run) if self.env.main else None
        if self.env.main:
            print(
                start_up_lines(self.cfg, self.env, self.model, self.data, self.preset, self.run),
                file=sys.stderr,
            )
        prev_handlers = {sig: signal.signal(sig, self._on_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        skew = os.environ.get("IGPT_START_SKEW", "")  # "RANK:SECONDS", for the test of skewed starts
        if skew.partition(":")[0] == str(self.env.rank):
            time.sleep(float(skew.partition(":")[2] or 0))
        self.t_start = time.perf_counter()
        self._tick()
        m = _Meter(tokens0=self.tokens_seen)
        bar = progress_bar(self.cfg.steps, self.step) if self.progress else None
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
        digests = None if self.cfg.fsdp else replica_digests(self.model, self.env)
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
