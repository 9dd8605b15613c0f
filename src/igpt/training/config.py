"""Typed settings of pretraining (optimisation, budget, system), validated on construction and stored in a
run's `run.json`, and the choice of a new run's model (`ModelChoice`: a preset and its overrides). The
model's shape itself lives in `IGPTConfig` alone; `igpt pretrain`'s flags are derived from these fields
(see `igpt.flags`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from igpt.checks import check_seed
from igpt.errors import IgptError
from igpt.hardware import PRECISIONS, auto_precision
from igpt.model.gpt import PRESETS
from igpt.model.objectives import DEFAULT_OBJECTIVE, OBJECTIVES
from igpt.settings import check_choices, choice

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "linear", "wsd")


MAX_LR = 10.0
"""The largest peak rate a setting may ask for: far above any useful one, far below float32's overflow."""
MAX_MINUTES = 525_600.0
"""The longest budget a setting may ask for: a year of minutes."""


@dataclass
class ModelChoice:
    """The model of a new pretraining run: a preset shape, optionally overridden, and the objective. The
    vocabulary and context come from the prepared data. Stored in run.json as the model's `IGPTConfig`."""

    preset: str = choice("tiny", PRESETS)
    """Model shape: the named preset's depth, width and heads."""
    objective: str = choice(DEFAULT_OBJECTIVE, OBJECTIVES)
    """ar (next pixel) or bert (masked pixels)."""
    n_layer: int | None = None
    """Override the preset's depth."""
    n_embd: int | None = None
    """Override the preset's width."""
    n_head: int | None = None
    """Override the preset's heads."""
    bias: bool = False
    """Biases in the linear layers (as Hugging Face's ImageGPT has them)."""
    prefix_causal: bool = False
    """AR, prefix-causal: a random prefix attends both ways, and features are read bidirectionally."""

    def __post_init__(self) -> None:
        check_choices(self)
        # the shape itself (positive sizes, heads dividing the width) is IGPTConfig's to check


@dataclass
class TrainConfig:
    """Every setting of `igpt pretrain` but the model's shape. A run records these, so `--resume` and later
    stages need only RUN."""

    data: str
    """The prepared directory (from igpt prepare), stored as an absolute path; a resume may leave it out."""
    steps: int | None = None
    """Optimizer steps to train; with --minutes, whichever ends first. Default 2000 when neither is given."""
    minutes: float | None = None
    """Wall-clock budget in minutes (the schedule follows elapsed time as well as steps)."""
    batch_size: int = 32
    """Global batch in images per optimizer step, summed over processes and accumulation."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (per process)."""
    lr: float = 2e-3
    """Peak learning rate (of AdamW, and of Muon, whose updates are scaled to AdamW's size)."""
    optimizer: str = choice("adamw", OPTIMIZERS)
    """adamw for every parameter, or muon for the blocks' weight matrices with AdamW for the rest."""
    adamw_lr_ratio: float = 1.0
    """With muon: the peak rate of the parameters AdamW steps (the embeddings, the output head, the norm
    gains) as a multiple of `lr`. They are few and unlike the blocks' matrices; the quickstart's 15 is
    measured in its README section on pretraining levers."""
    schedule: str = choice("cosine", SCHEDULES)
    """Learning rate after warm-up: cosine or linear decay to zero, or wsd (warm-up, stable, then a linear
    decay to zero over the last `cooldown` share of the budget)."""
    warmup: float = 0.05
    """Share of the budget spent in linear warm-up."""
    cooldown: float = 0.2
    """wsd: share of the budget spent decaying to zero at the end."""
    weight_decay: float = 0.0
    """Decoupled weight decay on matrices (the paper needs none)."""
    beta2: float = 0.95
    """Adam beta2 (the paper found 0.999 caused loss spikes)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    mask_ratio: float = 0.15
    """BERT: share of positions replaced by the mask token."""
    flip: bool = False
    """Random horizontal flips of the training images (see `engine.mirror_index` for which data suit them)."""
    shift: int = 0
    """Random translations of the training images by up to this many pixels each way, edges replicated."""
    seed: int = 0
    """Seed of the initialisation, the data order, BERT masks and flips."""
    device: str = choice("cpu", ("cpu", "cuda"))
    """cpu or cuda (under torchrun, each process takes the GPU of its local rank)."""
    precision: str = choice("fp32", PRECISIONS)
    """fp32, or bf16 autocast (for CUDA, and CPUs with AMX; far slower than fp32 on CPUs without it), or
    auto: bf16 where the machine has it in hardware and the model is wide enough for it to pay, else fp32
    (resolved by `resolve_precision` when the run is created; see `precision_reason`)."""
    precision_reason: str = ""
    """Why `auto` chose what it chose (empty when the precision was given)."""
    compile: bool = False
    """torch.compile the training step (a CPU needs a C++ compiler); if compiling fails, training goes on
    eagerly after a notice."""
    fsdp: bool = False
    """Under torchrun: shard parameters per block with FSDP instead of replicating them with DDP."""
    eval_interval: int = 250
    """Validate (and checkpoint) every N steps, and at the end."""
    eval_images: int = 1000
    """Images for val_nll (the first N of the validation split) and, once at the end, for test_nll (the
    first N of the test split)."""
    log_interval: int = 10
    """Write a metrics.jsonl row every N steps."""
    keep_steps: list[int] = field(default_factory=list)
    """Checkpoints kept for good at these steps (the loss-versus-probe study uses them)."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (0: none)."""

    def __post_init__(self) -> None:
        check_choices(self)
        if self.steps is not None and self.steps <= 0:
            raise IgptError(f"--steps must be positive, got {self.steps}")
        if self.minutes is not None and not (math.isfinite(self.minutes) and 0 < self.minutes <= MAX_MINUTES):
            raise IgptError(
                f"--minutes must be a positive number of at most {MAX_MINUTES:,}, got {self.minutes}"
            )
        if self.steps is None and self.minutes is None:
            self.steps = 2000
        if self.batch_size <= 0 or self.grad_accum <= 0:
            raise IgptError("--batch-size and --grad-accum must be positive")
        if not (math.isfinite(self.lr) and 0 < self.lr <= MAX_LR):
            raise IgptError(f"--lr must be positive and at most {MAX_LR:g}, got {self.lr}")
        if not (math.isfinite(self.adamw_lr_ratio) and 0 < self.adamw_lr_ratio * self.lr <= MAX_LR):
            raise IgptError(
                f"--adamw-lr-ratio must be positive, with --lr x ratio at most {MAX_LR:g}, "
                f"got {self.adamw_lr_ratio}"
            )
        if self.adamw_lr_ratio != 1 and self.optimizer != "muon":
            raise IgptError(
                "--adamw-lr-ratio applies with --optimizer muon (AdamW alone steps every parameter)"
            )
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise IgptError(f"--weight-decay must be 0 or positive, got {self.weight_decay}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise IgptError(f"--grad-clip must be 0 (off) or positive, got {self.grad_clip}")
        if not 0 < self.beta2 < 1:
            raise IgptError(f"beta2 must be in (0, 1), got {self.beta2}")
        check_seed(self.seed)
        if self.keep_every < 0 or any(s <= 0 for s in self.keep_steps):
            raise IgptError("--keep-every must be 0 or positive, and --keep-steps positive steps")
        if not 0 < self.cooldown <= 1 or self.warmup + (self.cooldown if self.schedule == "wsd" else 0) > 1:
            raise IgptError(f"--cooldown must be in (0, 1] and leave room for --warmup, got {self.cooldown}")
        if self.shift < 0:
            raise IgptError(f"--shift must be 0 or a positive number of pixels, got {self.shift}")
        if self.optimizer == "muon" and self.fsdp:
            raise IgptError("--optimizer muon needs whole matrices; it does not run with --fsdp")
        if not 0 <= self.warmup < 1:
            raise IgptError(f"--warmup must be in [0, 1), got {self.warmup}")
        if not 0 < self.mask_ratio < 1:
            raise IgptError(f"--mask-ratio must be in (0, 1), got {self.mask_ratio}")
        if min(self.eval_interval, self.eval_images, self.log_interval) <= 0:
            raise IgptError("--eval-interval, --eval-images and --log-interval must be positive")

    def resolve_precision(self, n_embd: int) -> None:
        """Turn `auto` into fp32 or bf16 for a model of width `n_embd` on this machine, recording why."""
        if self.precision == "auto":
            self.precision, self.precision_reason = auto_precision(self.device, n_embd)

    def to_dict(self) -> dict:
        return asdict(self)
