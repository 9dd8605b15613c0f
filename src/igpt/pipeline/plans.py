"""The quickstart's plan: the default settings (`DEFAULT`, and `SMOKE` for a run of about a minute) as data,
the options a user may change (`QuickstartOptions`, from which `igpt quickstart`'s flags are derived), and
the plan they make together (`make_plan`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from igpt import settings
from igpt.errors import IgptError
from igpt.model.gpt import PRESETS
from igpt.training.config import MAX_MINUTES

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
RECORD = "quickstart.json"
"""The quickstart's own record in its directory: the plan, the stages done and their seconds, the budget."""


def finetune_name(init: str, labels_per_class: int | None = None) -> str:
    """The quickstart's directory (and stage) name of one fine-tuning: finetune, finetune_scratch, and with
    N labels per class finetune_N_per_class, finetune_scratch_N_per_class."""
    base = "finetune" if init == "pretrained" else "finetune_scratch"
    return f"{base}_{labels_per_class}_per_class" if labels_per_class else base


@dataclass(frozen=True)
class QuickstartPlan:
    """The settings of one quickstart: data, model, budget and evaluation."""

    dataset: str
    """fashion-mnist, or digits when the Fashion-MNIST files are missing."""
    resolution: int
    """Square side the images are box-resized to; 14 trades detail for 4x shorter sequences than 28."""
    clusters: int
    """Grey levels of the palette."""
    limit: int | None
    """Images per split kept (None: all)."""
    preset: str
    """Model shape preset. `tiny-deep` (6 blocks of width 96) costs about what `tiny` (4 x 128) costs per
    token; pretrained for the steps each gets here, its 10-labels-per-class probe scored 0.7557 on validation
    against tiny's 0.7473 and 0.7498 (two seeds), its full probe level (0.8954 against 0.8920 and 0.8938)
    (`benchmarks/gpu_budget_sweep.py`, README)."""
    minutes: float
    """The whole job's wall-clock budget: pretraining gets what the other stages are predicted to leave."""
    pretrain_minutes: float | None
    """Pretraining's minutes, given outright (no budget sharing); None: shared out from `minutes`."""
    min_pretrain_minutes: float
    """The least pretraining worth running; a budget that leaves less is refused."""
    batch_size: int
    lr: float
    optimizer: str
    """adamw or muon (see `igpt.training.optim`)."""
    adamw_lr_ratio: float
    """With muon: the rate of the parameters AdamW steps (embeddings, output head, norm gains) as a multiple
    of `lr` (see `TrainConfig.adamw_lr_ratio`)."""
    schedule: str
    """Learning-rate decay after warm-up: cosine, linear or wsd."""
    shift: int
    """Random translations of up to this many pixels during pretraining (0: none)."""
    flip: bool
    """Random horizontal flips during pretraining (Fashion-MNIST's classes survive them)."""
    precision: str
    """fp32, bf16, or auto (bf16 where the CPU has AMX, else fp32)."""
    prefix_causal: bool
    """AR with prefix-causal attention, features read bidirectionally."""
    probe_precision: str
    """The probes' feature pass: fp32, bf16, or auto (bf16 where the CPU has AMX)."""
    pool: str
    """Probe pooling: 'grid3' (means over a 3x3 grid) beat the paper's 'mean' here (docs/decisions)."""
    low_data: tuple[tuple[int, int], ...]
    """(labels per class, seeds) pairs for the low-data probes."""
    completions: tuple[int, int]
    """(test images, samples per image) in the completion grid."""
    eval_interval: int
    """Validation loss (on 1,000 images) and a resumable checkpoint every N pretraining steps. Each costs
    about as much as 10 steps, so 500 gives pretraining back about 2% of its minutes against 250."""
    keep_every: int
    """Checkpoints kept every N steps, so `igpt probe RUN --checkpoints all` can
    plot probe accuracy against validation loss over the run."""
    finetune_minutes: float | None
    """Fine-tune the pretrained model (joint loss, early-stopped on validation) for this many minutes after
    the probes; None skips it."""
    finetune_low_data: bool
    """With `finetune_minutes`: also fine-tune, and train from scratch, on every low-data setting's subsets
    (the low-data probes' own), each subset for finetune_minutes / subsets."""
    attentive: bool
    """Also train the attentive probe on the best layer's token states (see `igpt.probes.attentive`)."""
    compile: bool
    """torch.compile pretraining and the probes' feature pass (faster on CPU after some seconds of compiling;
    see BENCHMARKS.md); each falls back to eager PyTorch, with a notice, where compiling fails."""
    shrinks: bool = False
    """Where the later stages are predicted to leave pretraining less than its floor, pretrain for the floor
    (and perhaps end past the budget) instead of refusing: the smoke run's way, whose predictions are
    dominated by fixed costs that vary from machine to machine."""

    def pretrain_settings(self) -> dict[str, Any]:
        """The plan's pretraining settings as `igpt.pretrain` keywords (all but the budget)."""
        keys = (
            "preset",
            "batch_size",
            "lr",
            "optimizer",
            "adamw_lr_ratio",
            "schedule",
            "shift",
            "flip",
            "precision",
        )
        return {"prefix_causal": self.prefix_causal or None, **{k: getattr(self, k) for k in keys}}


DEFAULT = QuickstartPlan(
    dataset="fashion-mnist",
    resolution=14,
    clusters=16,
    limit=None,
    preset="tiny-deep",
    minutes=30.0,
    pretrain_minutes=None,
    min_pretrain_minutes=3.0,
    batch_size=32,
    lr=2e-3,
    optimizer="muon",
    adamw_lr_ratio=15.0,
    schedule="wsd",
    shift=0,
    flip=False,
    precision="auto",
    prefix_causal=False,
    probe_precision="auto",
    pool="grid3",
    low_data=((10, 5), (100, 3)),
    completions=(8, 5),
    eval_interval=500,
    keep_every=500,
    finetune_minutes=None,
    finetune_low_data=False,
    attentive=False,
    compile=True,
)


SMOKE = QuickstartPlan(
    dataset="fashion-mnist",
    resolution=8,
    clusters=8,
    limit=2000,
    preset="micro",
    minutes=1.5,
    pretrain_minutes=None,
    min_pretrain_minutes=0.1,
    batch_size=32,
    lr=3e-3,
    optimizer="adamw",
    adamw_lr_ratio=1.0,
    schedule="cosine",
    shift=0,
    flip=False,
    precision="fp32",
    prefix_causal=False,
    probe_precision="fp32",
    pool="grid",
    low_data=((10, 2),),
    completions=(3, 3),
    eval_interval=250,
    keep_every=1000,
    finetune_minutes=None,
    finetune_low_data=False,
    attentive=False,
    compile=False,
    shrinks=True,
)


@dataclass
class QuickstartOptions:
    """What a user of `igpt quickstart` may change; everything else comes from the plan (DEFAULT, or SMOKE
    with `smoke`). A setting left None takes the plan's value."""

    out: str = "runs/quickstart"
    """Directory for everything: the prepared data, the run, the probes, the report."""
    minutes: float | None = None
    """The whole job's budget in minutes (default 30); pretraining gets what the other stages are predicted
    to leave."""
    pretrain_minutes: float | None = None
    """Pretrain for exactly this long instead of sharing out `minutes`."""
    smoke: bool = False
    """A tiny model on a subset: the pipeline in about a minute."""
    dataset: str | None = settings.choice(None, ("fashion-mnist", "digits"))
    """fashion-mnist (default), or scikit-learn's 8x8 digits."""
    data_dir: str | None = None
    """Where the Fashion-MNIST IDX files are (default /usr/share/datasets/fashion-mnist)."""
    preset: str | None = settings.choice(None, PRESETS)
    """Model shape (default tiny-deep, 6 x 96)."""
    resolution: int | None = None
    """Image side, 2 to 28 (default 14)."""
    finetune_minutes: float | None = None
    """Also fine-tune the model for this many minutes, then the from-scratch control (default off)."""
    finetune_low_data: bool | None = None
    """With --finetune-minutes M: also fine-tune and train from scratch on the low-data probes' subsets,
    M / subsets minutes per subset, for the low-data table (off by default: 2 x M minutes per setting)."""
    attentive: bool | None = None
    """Also train the attentive probe on the best layer (default off)."""
    compile: bool | None = None
    """torch.compile pretraining and the feature pass (default on; off with smoke)."""
    progress: bool = True
    """Progress bars."""

    def __post_init__(self) -> None:
        settings.check_choices(self)
        budgets = {"minutes": self.minutes, "pretrain_minutes": self.pretrain_minutes}
        for name, value in {**budgets, "finetune_minutes": self.finetune_minutes}.items():
            if value is not None and not (math.isfinite(value) and 0 < value <= MAX_MINUTES):
                raise IgptError(
                    f"--{name.replace('_', '-')} must be positive and at most {MAX_MINUTES:,.0f}, got {value}"
                )
        if self.finetune_low_data and not self.finetune_minutes:
            raise IgptError(
                "--finetune-low-data fine-tunes for --finetune-minutes; give --finetune-minutes too"
            )
        if self.resolution is not None and not 2 <= self.resolution <= 28:
            raise IgptError(f"--resolution must be in [2, 28] for Fashion-MNIST, got {self.resolution}")


def make_plan(opts: QuickstartOptions) -> tuple[QuickstartPlan, str | None]:
    """The plan from the defaults (or the smoke plan) and the options; with a notice when Fashion-MNIST is
    missing and the digits stand in."""
    base = SMOKE if opts.smoke else DEFAULT
    names = (
        "minutes",
        "pretrain_minutes",
        "finetune_minutes",
        "finetune_low_data",
        "attentive",
        "preset",
        "compile",
        "resolution",
    )
    over: dict[str, Any] = {k: getattr(opts, k) for k in names if getattr(opts, k) is not None}
    data_dir = opts.data_dir
    notice = None
    dataset = opts.dataset or base.dataset
    if dataset == "fashion-mnist":
        d = Path(data_dir) if data_dir else FASHION_DIR
        if not any(d.glob("train-images*")):
            if data_dir:
                raise IgptError(f"no Fashion-MNIST IDX files in {d}")
            dataset = "digits"
            notice = (
                f"Fashion-MNIST is not in {FASHION_DIR} (install it with `apt-get install "
                "dataset-fashion-mnist`); using scikit-learn's 8x8 digits instead"
            )
    if dataset == "digits":  # 8x8 images: a side up to 8 is the user's, a larger one is refused or noted
        side = opts.resolution or 8
        if side > 8 and not notice:
            raise IgptError(f"--resolution must be at most 8 for the digits (8x8 images), got {side}")
        if notice and side > 8:
            notice += f", at 8x8 (not {side}x{side})"
        over.update(resolution=min(side, 8), limit=None)
    over["dataset"] = dataset
    return QuickstartPlan(**{**asdict(base), **over}), notice
