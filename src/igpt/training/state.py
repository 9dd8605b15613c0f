"""The state one pretraining process trains and keeps (`TrainerState`): the prepared data and the model, the
optimizer (wrapped for torchrun where launched so), the step recipe, and the checkpoint it resumes from and
saves to. Deterministic in (seed, step) on CPU, so a resumed run reproduces the uninterrupted one."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import torch

from igpt.data.prepared import PreparedData
from igpt.errors import IgptError
from igpt.files import write_text_atomic
from igpt.hardware import cpu_has_amx, cpu_has_avx512_bf16, muon_ns_dtype
from igpt.model.gpt import IGPT
from igpt.runs import Run, read_metrics

from .checkpoint import (
    check_writable,
    clean_partial,
    latest_readable,
    save_checkpoint,
)
from .config import TrainConfig
from .distributed import Dist, check_batch_split
from .engine import Batcher, StepRecipe, mirror_index, shift_table
from .optim import Optimizers
from .parallel import full_state, load_optimizer, wrap_model

Replan = Callable[[float, float, float], "float | None"]
"""(elapsed seconds, least minutes, most minutes) -> the budget's new minutes, or None to keep it."""


class TrainerState:
    """What one process trains and keeps: the data and model, the optimizer and the step recipe, restored
    from the run's latest readable checkpoint or started fresh, and saved back (`save`). `Trainer` runs the
    loop over it."""

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
        self.wrapped = wrap_model(self.model, cfg, env)
        self.opt = self._optimizer()
        self.sharded = cfg.fsdp and env.world > 1  # FSDP over several processes: the state is in shards
        if resuming and self._opt_tensors:
            load_optimizer(self.model, self.opt, self._opt_tensors, sharded=self.sharded)
        self.recipe = self._step_recipe()
        self.stop_requested = False  # agreed by every process (see _tick)
        self._stop_local = False  # this process received a stop signal

    def _optimizer(self) -> Optimizers:
        """The optimizer over the model's parameters, taken after wrapping (FSDP replaces parameters with
        sharded ones); fused on CUDA (one kernel per step) except under FSDP."""
        cfg, env = self.cfg, self.env
        return Optimizers(
            list(self.model.named_parameters()),
            cfg.optimizer,
            cfg.lr,
            cfg.weight_decay,
            cfg.beta2,
            fused=env.device.startswith("cuda") and not (cfg.fsdp and env.world > 1),
            ns_dtype=muon_ns_dtype(env.device),
            adamw_lr_ratio=cfg.adamw_lr_ratio,
        )

    def _step_recipe(self) -> StepRecipe:
        """What every step of this run does the same way: its share of the batch, masks, flips and shifts,
        clipping, device and precision."""
        cfg, env, mcfg = self.cfg, self.env, self.mcfg
        order, R = self.data.meta["order"], self.data.resolution
        return StepRecipe(
            rank=env.rank,
            world=env.world,
            grad_accum=cfg.grad_accum,
            objective=mcfg.objective,
            mask_ratio=cfg.mask_ratio,
            seed=cfg.seed,
            grad_clip=cfg.grad_clip,
            device=env.device,
            precision=cfg.precision,
            flip_perm=mirror_index(R, order) if cfg.flip else None,
            shifts=shift_table(R, order, cfg.shift) if cfg.shift else None,
            prefix_causal=mcfg.prefix_causal,
        )

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

    def save(self, train_loss: float | None) -> None:
        msd, extra = full_state(self.model, self.opt, self.env, sharded=self.sharded)
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
