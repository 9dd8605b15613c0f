"""What every probe shares: its settings (`ProbeConfig`), the run and labelled data it opens, the layers it
names, and the feature pass's settings it derives."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from igpt.checks import check_device, check_seed, is_whole
from igpt.data.prepared import PreparedData
from igpt.errors import IgptError
from igpt.hardware import PRECISIONS, auto_precision
from igpt.model.gpt import IGPT
from igpt.runs import LATEST_PROBE, Run
from igpt.settings import check_choices, choice

from .features import POOLS
from .logistic import check_trainable

HEADS = ("linear", "attentive")
FINE_POOL = "grid7"
"""The probes' further, finer pooling: the low-data probes choose among its layers, and the full probe fits
it at the layer chosen on validation (its fits cost minutes per layer with all labels); chosen on validation,
docs/decisions/probe-settings.md."""


MAX_SEEDS = 1000
"""The most subsets a low-data probe or fine-tuning may draw (`--seeds`): their mean's standard error has long
stopped shrinking, and each costs a fit."""
MAX_MASKS = 100
"""The most masks a BERT mask ensemble may average (`--mask-ensemble`): each is a feature pass and fits."""


@dataclass
class ProbeConfig:
    """Every setting of one probe of a run; `probe()` builds it from its keyword arguments."""

    run: str
    """The run directory to probe."""
    layers: str = "all"
    """all, best (the best layer of an earlier full probe) or comma-separated layer indices."""
    labels_per_class: int | None = None
    """Low-data mode: N labelled training images per class (Table 4's protocol)."""
    seeds: int = 5
    """Low-data mode: how many seeded subsets to average."""
    mask_ensemble: int = 0
    """BERT runs: also vote over M random 15% masks (Figure 4's protocol)."""
    train_limit: int | None = None
    """Use only the first N labelled training images."""
    test_limit: int | None = None
    """Use only the first N labelled test images."""
    checkpoints: str = choice("latest", ("latest", "all"))
    """latest, or all: every kept checkpoint probed at its best layer, against its val_nll."""
    checkpoint: str | None = None
    """Probe this checkpoint instead of the latest."""
    pool: str = choice("mean", POOLS)
    """mean over positions (the paper's), or means over a coarse grid: grid (2x2), grid3, grid4, grid7."""
    fine_pool: str = choice(FINE_POOL, ("none", *POOLS))
    """A further pooling weighed beside --pool and the mean (none: only those two): in low-data mode fitted at
    every layer, each subset choosing its layer among the finest pooling compared; in the full probe at the
    layer chosen on validation, where `chosen` then picks between the poolings on validation. Fine grids help
    most (see `FINE_POOL`)."""
    concat: str | None = None
    """Also probe these layers' features concatenated, e.g. "2,3,4"."""
    head: str = choice("linear", HEADS)
    """linear (the paper's), or attentive: learned queries cross-attending over token states, trained beside
    the linear probes (see `igpt.probes.attentive`); the reported best is then the attentive head's."""
    attentive_layers: str = "best"
    """Attentive head: best (the linear probe's best layer, chosen on validation) or i,j,... (their normed
    states averaged)."""
    attentive_epochs: int = 10
    """Attentive head: most epochs (the epoch is chosen on validation, with early stopping)."""
    data: str | None = None
    """Another prepared directory (with the run's palette) to probe on; default the run's own."""
    batch_size: int = 128
    """Images per feature batch."""
    device: str = "cpu"
    """cpu or cuda."""
    seed: int = 0
    """Seed of the validation split, subsets and masks."""
    compile: bool = False
    """torch.compile the feature pass (eagerly if compiling fails)."""
    precision: str = choice("fp32", PRECISIONS)
    """The probe's arithmetic: the feature pass (fp32, or bf16 autocast) and the full probe's linear fits'
    matrix products (`logistic.FIT_DTYPES`: about 3x faster in bf16 on a CPU with AVX512_BF16, validation
    accuracies within noise of fp32's); auto: bf16 where the hardware does it fast (a CUDA card with bf16, a
    CPU with AMX tiles, or AVX512_BF16 measured faster; `hardware.auto_precision`). The low-data probes fit
    in fp32 whatever this says: their fits are small (1.3x faster in bf16), and with 10 labels per class a
    rounding is enough to move a subset's cross-validated choices."""
    progress: bool = True
    """Progress bars and per-layer lines on stderr."""
    memory_limit: float | None = None
    """GiB the full probe's features may take in memory (default: 90% of the memory available). Past it,
    the training features are written to the run's feature store (RUN/features/, reused by later probes of
    the same weights) and the fits read them from disk in row chunks."""

    def __post_init__(self) -> None:
        check_choices(self)
        if self.precision == "auto":
            self.precision = auto_precision(self.device)[0]
        if self.mask_ensemble > MAX_MASKS:
            raise IgptError(f"--mask-ensemble must be at most {MAX_MASKS}, got {self.mask_ensemble}")
        if self.mask_ensemble < 0:
            raise IgptError("--mask-ensemble must be 0 or more")
        for name in ("train_limit", "test_limit", "batch_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise IgptError(f"--{name.replace('_', '-')} must be positive")
        if self.labels_per_class is not None and self.labels_per_class < 1:
            raise IgptError(f"--labels-per-class must be at least 1, got {self.labels_per_class}")
        if self.labels_per_class and (self.mask_ensemble or self.concat):
            raise IgptError("--mask-ensemble and --concat apply to the full probe, not to --labels-per-class")
        if not 1 <= self.seeds <= MAX_SEEDS:
            raise IgptError(f"--seeds must be in [1, {MAX_SEEDS}], got {self.seeds}")
        if self.head == "attentive" and (self.labels_per_class or self.checkpoints == "all"):
            raise IgptError(
                "--head attentive runs with the full probe; --labels-per-class and --checkpoints all use "
                "linear heads"
            )
        if self.memory_limit is not None and not self.memory_limit > 0:
            raise IgptError(f"--memory-limit must be a positive number of GiB, got {self.memory_limit}")
        if self.attentive_epochs < 1:
            raise IgptError(f"--attentive-epochs must be at least 1, got {self.attentive_epochs}")
        check_seed(self.seed)
        check_device(self.device)


def open_labelled_run(
    run: str, data_dir: str | None, checkpoint: str | None = None
) -> tuple[Run, IGPT, PreparedData]:
    """The run, its model and its (labelled) prepared data; clear errors for what is missing. Says so when the
    run is unfinished, since its latest checkpoint is then what gets evaluated."""
    r = Run.open(run)
    data_dir = data_dir or r.data_dir
    if not data_dir:
        raise IgptError(f"{run} records no data directory (a converted model?); pass --data DIR")
    data = PreparedData(data_dir)
    if data.num_classes == 1:
        raise IgptError(
            f"{data_dir} has one class, nothing to tell apart; a probe or classifier needs two or more"
        )
    if data.num_classes < 2 or (data.labels("train") < 0).all():
        raise IgptError(f"{data_dir} has no labels, so there is nothing to probe; prepare a labelled dataset")
    model = r.load_model(checkpoint)
    cfg = model.config
    if data.clusters != cfg.vocab_size or data.seq_len != cfg.n_positions:
        raise IgptError(
            f"{data_dir} ({data.clusters} clusters, {data.seq_len} tokens) does not match the model "
            f"({cfg.vocab_size}, {cfg.n_positions})"
        )
    if data.meta.get("order", "raster") != r.order:
        raise IgptError(
            f"{data_dir} was prepared in {data.meta.get('order')} order and the run reads {r.order} order, "
            f"so its tokens would be read in the wrong places; prepare it with --order {r.order}"
        )
    if (r.path / "palette.npy").is_file():
        own = r.palette()
        if own.shape != data.palette.shape or not np.allclose(own, data.palette, atol=0.5):
            raise IgptError(
                f"{data_dir} was prepared with another palette than the run's, so its tokens mean other "
                "colours; prepare it with --palette RUN/palette.npy"
            )
    if not r.finished:
        last = r.checkpoints()[-1].name if r.checkpoints() else "none"
        print(
            f"igpt: note: the run is unfinished; evaluating its latest checkpoint ({last})", file=sys.stderr
        )
    return r, model, data


def labelled_rows(labels: np.ndarray, limit: int | None) -> np.ndarray:
    rows = np.flatnonzero(labels >= 0)
    return rows[:limit] if limit else rows


def parse_layers(text: str, n_layer: int, run: Run, flag: str = "--layers") -> list[int]:
    """The layers `--layers` (or the named `flag`) names: all, best (of the run's latest probe) or i,j,..."""
    if text == "all":
        return list(range(n_layer + 1))
    if text == "best":
        p = run.probe_file(LATEST_PROBE)
        if not p.is_file():
            raise IgptError(f"{flag} best needs an earlier full probe ({p.name}); run `igpt probe RUN` first")
        best = (run.probe_result(LATEST_PROBE) or {}).get("best_layer")  # None when damaged
        if not is_whole(best, 0, n_layer):
            raise IgptError(
                f"{p} does not name a best layer of this model (damaged, or from another run); run "
                "`igpt probe RUN` again"
            )
        return [best]
    try:
        layers = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise IgptError(f"{flag} must be all, best or comma-separated integers, got '{text}'") from None
    bad = [i for i in layers if not 0 <= i <= n_layer]
    if bad or not layers:
        raise IgptError(f"{flag}: layers {bad or text} are out of range: this model has layers 0..{n_layer}")
    return layers


def feature_settings(cfg: ProbeConfig, data: PreparedData) -> dict[str, Any]:
    """The feature pass's settings of a probe (batch, pooling, device, compile)."""
    return dict(
        batch_size=cfg.batch_size,
        pool=cfg.pool,
        resolution=data.resolution,
        order=data.meta.get("order", "raster"),
        device=cfg.device,
        compile=cfg.compile,
        precision=cfg.precision,
    )


@dataclass
class Labelled:
    """The labelled rows of each split a probe uses, and their labels as tensors."""

    tr: np.ndarray
    va: np.ndarray
    te: np.ndarray
    ytr: torch.Tensor
    yva: torch.Tensor
    yte: torch.Tensor

    @classmethod
    def of(cls, cfg: ProbeConfig, data: PreparedData) -> Labelled:
        """All labelled rows (or the first `train_limit`/`test_limit`); refuses a split without any."""
        tr = labelled_rows(data.labels("train"), cfg.train_limit)
        va = labelled_rows(data.labels("val"), None)
        te = labelled_rows(data.labels("test"), cfg.test_limit)
        if not len(va):
            raise IgptError(f"{data.dir} has no labelled validation images to choose on")
        check_trainable(data.labels("train")[tr], f"--train-limit {cfg.train_limit}")
        y = {k: torch.from_numpy(data.labels(k)[r]) for k, r in (("train", tr), ("val", va), ("test", te))}
        return cls(tr, va, te, y["train"], y["val"], y["test"])
