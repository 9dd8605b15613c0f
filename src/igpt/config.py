"""Typed settings of pretraining, validated on construction and stored in a run's `run.json`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import IgptError
from .model import OBJECTIVES, PRESETS


@dataclass
class TrainConfig:
    """Every setting of `igpt pretrain`. A run records these, so `--resume` and later stages need only RUN."""

    data: str
    """The prepared directory (absolute path)."""
    preset: str = "tiny"
    """Model shape: micro, tiny, small (CPU-sized) or igpt-s/m/l/xl (the paper's)."""
    objective: str = "ar"
    """ar (next-token, causal) or bert (masked tokens, bidirectional)."""
    n_layer: int | None = None
    """Override the preset's depth."""
    n_embd: int | None = None
    """Override the preset's width."""
    n_head: int | None = None
    """Override the preset's number of heads."""
    bias: bool = False
    """Biases in the linear layers (Hugging Face's format has them; OpenAI's model does not)."""
    steps: int | None = None
    """Optimizer steps to train; with --minutes, whichever ends first. Default 2000 when neither is given."""
    minutes: float | None = None
    """Wall-clock budget in minutes (the schedule follows elapsed time as well as steps)."""
    batch_size: int = 32
    """Global batch in images per optimizer step, summed over processes and accumulation."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (per process)."""
    lr: float = 2e-3
    """Peak learning rate of AdamW."""
    warmup: float = 0.05
    """Share of the budget spent in linear warm-up, before cosine decay to zero."""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices (the paper needs none)."""
    beta2: float = 0.95
    """Adam beta2 (the paper found 0.999 caused loss spikes)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    mask_ratio: float = 0.15
    """BERT: share of positions replaced by the mask token."""
    flip: bool = False
    """Random horizontal flips (for colour photographs, not for digits or clothes)."""
    seed: int = 0
    """Seed of the initialisation, the data order, BERT masks and flips."""
    device: str = "cpu"
    """cpu or cuda."""
    precision: str = "fp32"
    """fp32, or bf16 autocast (CUDA; about 10x slower than fp32 on CPUs without AMX)."""
    compile: bool = False
    """torch.compile the training step: 1.04-1.16x faster on a 2-core CPU (which needs a C++ compiler); if
    compiling fails, training goes on eagerly after a notice."""
    fsdp: bool = False
    """Under torchrun: shard parameters per block with FSDP instead of replicating them with DDP."""
    eval_interval: int = 250
    """Validate (and checkpoint) every N steps, and at the end."""
    eval_images: int = 1000
    """Test images used for val_nll (the first N of the test split)."""
    log_interval: int = 10
    """Write a metrics.jsonl row every N steps."""
    keep_steps: list[int] = field(default_factory=list)
    """Checkpoints kept for good at these steps (the loss-versus-probe study uses them)."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (0: none)."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise IgptError(f"unknown preset '{self.preset}'; choose one of {', '.join(PRESETS)}")
        if self.objective not in OBJECTIVES:
            raise IgptError(f"--objective must be ar or bert, got '{self.objective}'")
        if self.steps is not None and self.steps <= 0:
            raise IgptError(f"--steps must be positive, got {self.steps}")
        if self.minutes is not None and self.minutes <= 0:
            raise IgptError(f"--minutes must be positive, got {self.minutes}")
        if self.steps is None and self.minutes is None:
            self.steps = 2000
        if self.batch_size <= 0 or self.grad_accum <= 0:
            raise IgptError("--batch-size and --grad-accum must be positive")
        if not self.lr > 0:
            raise IgptError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise IgptError(f"--warmup must be in [0, 1), got {self.warmup}")
        if not 0 < self.mask_ratio < 1:
            raise IgptError(f"--mask-ratio must be in (0, 1), got {self.mask_ratio}")
        if self.device not in ("cpu", "cuda"):
            raise IgptError(f"--device must be cpu or cuda, got '{self.device}'")
        if self.precision not in ("fp32", "bf16"):
            raise IgptError(f"--precision must be fp32 or bf16, got '{self.precision}'")
        if min(self.eval_interval, self.eval_images, self.log_interval) <= 0:
            raise IgptError("--eval-interval, --eval-images and --log-interval must be positive")

    def model_shape(self) -> dict[str, int]:
        """The preset's shape with any overrides applied."""
        shape = dict(PRESETS[self.preset])
        for k in ("n_layer", "n_embd", "n_head"):
            if getattr(self, k) is not None:
                shape[k] = getattr(self, k)
        return shape

    def to_dict(self) -> dict:
        return asdict(self)
