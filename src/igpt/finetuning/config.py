"""Every setting of a fine-tuning (`FinetuneConfig`), its defaults (the recipe measured best, see
docs/decisions/finetune-recipe.md), and how the head's layer and pooling resolve from the run's probe."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from igpt.checks import check_device, check_seed
from igpt.errors import IgptError
from igpt.hardware import PRECISIONS
from igpt.probes.features import POOLS
from igpt.probes.setup import MAX_SEEDS
from igpt.runs import Run
from igpt.settings import check_choices, choice
from igpt.training.config import MAX_LR, MAX_MINUTES, OPTIMIZERS

INITS = ("pretrained", "scratch")


HEAD_POOLS = tuple(p for p in POOLS if p in ("mean", "grid", "grid3"))


MUON_LR = 5e-4
"""Fine-tuning's default peak rate with Muon, pretrained and from scratch alike
(docs/decisions/finetune-recipe.md)."""


COMPILE_MIN_ROWS = 10_000
"""Training images from which `compile` defaults on: compiling costs tens of seconds on a CPU, repaid over
thousands of steps, not over a few-label subset's hundreds."""


@dataclass
class FinetuneConfig:
    """Every setting of one fine-tuning; `finetune()` builds it from its keyword arguments."""

    run: str
    """The pretrained (or converted) run directory."""
    out: str
    """The directory to write the fine-tuned run to (must not exist, or be empty)."""
    epochs: int = 5
    """Most epochs to train (early stopping may end sooner)."""
    minutes: float | None = None
    """Stop after this many minutes, keeping the best epoch (an epoch may be cut short); with several
    subsets (`seeds`), each subset gets this budget."""
    lr: float | None = None
    """Peak learning rate; default 5e-4 with Muon (the measured recipe), the pretraining's lr / 10 with
    AdamW."""
    gen_weight: float = 1.0
    """Weight of L_GEN (the run's own generative loss) beside L_CLF."""
    layer_decay: float = 1.0
    """Layer-wise rate decay: block i of L trains at lr x layer_decay^(L - i), the embeddings at
    lr x layer_decay^(L + 1); the head and the final norm at lr (1: one rate for all)."""
    optimizer: str = choice("muon", OPTIMIZERS)
    """adamw, or muon: Muon for the blocks' matrices (its updates scaled to AdamW's size, so the same lr
    means the same step size) and AdamW for the rest, as pretraining's `--optimizer muon`; one rate for all
    (no layer decay)."""
    labels_per_class: int | None = None
    """Fine-tune on N labelled images per class (the low-data regime); early stopping then uses a seeded
    class-balanced draw of at most N images per class from the validation split, as a user with N labels per
    class would have. Runs in one process: refused under torchrun (the subsets are small)."""
    seeds: int = 1
    """With `labels_per_class`: fine-tune on this many seeded subsets (the low-data probes' subsets for the
    same `seed`) and report their mean and std."""
    init: str = choice("pretrained", INITS)
    """pretrained (the run's weights), or scratch: the same architecture from random weights, trained with
    the same recipe, labels and budget (the control that shows what pretraining buys)."""
    pool: str = choice("probe", ("probe", *HEAD_POOLS))
    """The head's input: probe (the pooling the run's probe chose on validation, or the coarsest grid of it
    a head has; mean where the run has no probe), mean (the paper's mean over positions of the final normed
    states), or a coarse spatial grid of means: grid (2x2) or grid3 (3x3)."""
    layer: int | None = None
    """Put the head on this block's output (1..n_layer, normed as the probe reads it) and drop the blocks
    above it; default the layer the run's probe chose on validation (at least 1), the final layer where the
    run has no probe."""
    augment: bool = False
    """Random shifts, and flips where the data suits them (see `engine.mirror_index`); off by default, as
    the measured recipe has it (shifts and flips cost the grid heads accuracy)."""
    head_init: str = choice("probe", ("probe", "zero"))
    """probe (start the head at a linear probe of the features, its L2 strength chosen on the validation rows
    early stopping reads) or zero."""
    batch_size: int = 32
    """Images per step (under torchrun the global batch, split evenly over the processes)."""
    patience: int = 2
    """Epochs without validation gain before stopping."""
    train_limit: int | None = None
    """Use only the first N labelled training images."""
    test_limit: int | None = None
    """Use only the first N labelled test images."""
    data: str | None = None
    """Prepared directory (default: the run's own)."""
    device: str = "cpu"
    """cpu or cuda."""
    seed: int = 0
    """Seed of the subsets, the order, augmentation, masks and (with init scratch) the weights."""
    compile: bool | None = None
    """torch.compile the training forward (eagerly if compiling fails); default on for at least
    COMPILE_MIN_ROWS training images, where the steps repay compiling's start-up."""
    precision: str = choice("auto", PRECISIONS)
    """fp32, bf16 autocast, or auto: bf16 where this machine runs it faster (CUDA, AMX, AVX512_BF16 where a
    start-up measurement says so; never on AVX2-only CPUs), for training and evaluation alike."""
    progress: bool = True
    """Progress bars and per-epoch lines on stderr."""
    fsdp: bool = False
    """Under torchrun: shard the classifier over the processes (FSDP2: each block, then the whole) instead
    of replicating it (DDP), for backbones too large for one device; with --optimizer adamw (Muon needs
    whole matrices), as pretraining's --fsdp."""

    def __post_init__(self) -> None:
        check_choices(self)
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise IgptError("--epochs, --batch-size and --patience must be at least 1")
        if self.lr is not None and not (math.isfinite(self.lr) and 0 < self.lr <= MAX_LR):
            raise IgptError(f"--lr must be positive and at most {MAX_LR:g}, got {self.lr}")
        if self.minutes is not None and not (math.isfinite(self.minutes) and 0 < self.minutes <= MAX_MINUTES):
            raise IgptError(
                f"--minutes must be a positive number of at most {MAX_MINUTES:,}, got {self.minutes}"
            )
        if not (math.isfinite(self.layer_decay) and 0 < self.layer_decay <= 1):
            raise IgptError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if self.optimizer == "muon" and self.fsdp:
            raise IgptError("--optimizer muon needs whole matrices; it does not run with --fsdp (use adamw)")
        if self.optimizer == "muon" and self.layer_decay < 1:
            raise IgptError("--layer-decay applies to adamw; --optimizer muon trains every layer at one rate")
        if not (math.isfinite(self.gen_weight) and self.gen_weight >= 0):
            raise IgptError("--gen-weight must be 0 or more")
        if self.layer is not None and self.layer < 1:
            raise IgptError(f"--layer must be at least 1 (a block's output), got {self.layer}")
        if self.labels_per_class is not None and self.labels_per_class < 1:
            raise IgptError(f"--labels-per-class must be at least 1, got {self.labels_per_class}")
        if not 1 <= self.seeds <= MAX_SEEDS:
            raise IgptError(f"--seeds must be in [1, {MAX_SEEDS}], got {self.seeds}")
        if self.seeds > 1 and self.labels_per_class is None:
            raise IgptError("--seeds K draws K subsets of --labels-per-class N; give --labels-per-class too")
        check_seed(self.seed)
        for name in ("train_limit", "test_limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise IgptError(f"--{name.replace('_', '-')} must be positive")
        check_device(self.device)
        out = Path(self.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise IgptError(f"{out} exists and is not empty; choose another --out")


def head_from_probe(run: Run, labels_per_class: int | None) -> tuple[int | None, str, str]:
    """The head's layer and pooling as the run's probes chose them on validation, and where they came from:
    with all labels the full probe's best layer and pooling; with N labels per class the N-labels probe's
    (chosen by cross-validation inside its subsets, so the fine-tuning reads no label beyond its own). A
    pooling no head has (a finer grid) gives way to the probe's coarser one, then to the mean; layer 0 (the
    embeddings) becomes 1. (None, "mean") where no such probe exists: the final layer's mean, the paper's.
    A low-data probe whose choice is a grid finer than a head has takes the full probe's pooling setting (the
    coarse grid it was asked for), not any choice the full probe made on the validation labels."""
    if labels_per_class:
        low = {r.labels_per_class: r for r in run.low_data_probes()}.get(labels_per_class)
        if low is None:
            return None, "mean", f"no {labels_per_class}-labels-per-class probe in the run"
        full = run.full_probe()  # its pooling setting only (no choice made on labels): the coarse grid beside
        layer, pools = low.best_layer, [low.best_pool, low.pool, full.pool if full else "mean"]
        source = f"its {labels_per_class}-label probe"
    else:
        full = run.full_probe()
        if full is None:
            return None, "mean", "the run has no probe"
        layer, pools, source = full.best_layer, [full.pool], "its probe"
    pool = next((p for p in pools if p in HEAD_POOLS), "mean")
    return (None if layer is None else max(1, int(layer))), pool, f"as {source} chose on validation"


def resolve_head(args: FinetuneConfig, info: Run) -> tuple[FinetuneConfig, str]:
    """`args` with the head's layer and pooling settled (`pool="probe"` or no `layer`: from the run's probe,
    `head_from_probe`), and one line saying which it uses and why (empty when both were given)."""
    if args.pool != "probe" and args.layer is not None:
        return args, ""
    layer, pool, source = head_from_probe(info, args.labels_per_class)
    given = [
        w for w, v in (("layer", args.layer), ("pool", None if args.pool == "probe" else args.pool)) if v
    ]
    out = dataclasses.replace(
        args,
        layer=args.layer if args.layer is not None else layer,
        pool=pool if args.pool == "probe" else args.pool,
    )
    top = "the final layer" if out.layer is None else f"layer {out.layer}"
    why = source + (f" (the {' and '.join(given)} as given)" if given else "")
    return out, f"igpt finetune: the head reads {top} with {out.pool} pooling, {why}"
