"""The quickstart's time budget: how long the stages after pretraining will take on this machine, predicted
before pretraining starts, so that pretraining gets what the whole job's `--minutes` leaves.

The prediction times two primitives here (a few seconds): the probes' feature pass on a model of the planned
shape with random weights (speed does not depend on the weights), and the matrix products that the probes'
L-BFGS fits are made of, at the planned feature width. Each stage's cost is then counted in those units from
the known sizes (images, layers, feature widths, subsets, the solver's iteration caps) and scaled by factors
measured on full default quickstarts (see FEATURE_FACTOR and FIT_FACTOR). The quickstart times the machine
again halfway through pretraining and re-plans with the faster of both timings
(`igpt.pipeline.schedule.replan_budget`)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from igpt.data.prepared import PreparedData
from igpt.model.gpt import IGPT, IGPTConfig
from igpt.probes.features import extract_features, grid_side
from igpt.probes.logistic import (
    CV_FOLDS,
    CV_ITERS,
    CV_LAMBDAS,
    FINE_CANDIDATES,
    FINE_LAMBDAS,
    FINE_REFIT_ITERS,
    FIT_DTYPES,
    LAMBDAS,
    REFIT_ITERS,
    SWEEP_ITERS,
    SWEEP_ROWS,
    cv_problems,
    fit_logistic_many,
)
from igpt.probes.low_data import further_pool
from igpt.probes.setup import FINE_POOL

from .plans import QuickstartPlan

# Factors that turn a few seconds of timing into a stage's time; the evidence for each value is in
# docs/decisions/budget-calibration.md.
FEATURE_FACTOR = 0.8
"""The compiled feature pass against its eager timing."""
FIT_FACTOR = 3.8
"""fp32 fits against their matrix products at the timed rate (line searches and softmaxes on top)."""
BF16_FIT_FACTOR = 3.0
"""FIT_FACTOR where the full probe's fits run their products in bf16 (`Speeds.fp32_fit_flops_per_second`)."""
LOW_DATA_FACTOR = 4.0
"""Low-data fits of shapes that were not timed, against their products at the timed rate."""
CV_FIT_FACTOR = 1.5
"""The low-data stage against its timed cross-validation fits (`Speeds.cv_fit_seconds`): refits, scoring and
bookkeeping come on top."""
MAX_BF16_FIT_GAIN = 3.0
"""bf16 products speed a whole fit up by at most this (softmaxes, line searches and updates stay fp32)."""
COMPILE_SECONDS = 30.0
"""Compiling the feature pass (the first compiled batch), where --compile is on."""
REPORT_SECONDS = 10.0
"""Writing report.html and its plots."""
MARGIN = 1.1
"""Predictions are multiplied by this, and MARGIN_SECONDS added, before pretraining gets the rest."""
MARGIN_SECONDS = 20.0


@dataclass(frozen=True)
class Speeds:
    """What the calibration measured on this machine."""

    feature_seconds_per_image: float
    """The eager feature pass of every layer at the planned shape and precision, per image."""
    fit_flops_per_second: float
    """Rate of the full probe's fits' matrix products (features (N, D) against P*C columns, both
    directions), in the probes' precision (`logistic.FIT_DTYPES`)."""
    calibration_seconds: float
    """How long measuring took."""
    fp32_fit_flops_per_second: float | None = None
    """The same products in fp32, which the low-data probes' fits run in; None where the probes' precision
    is fp32 (the rate above is then theirs)."""
    cv_fit_seconds: dict[str, float] = field(default_factory=dict)
    """Seconds of one low-data cross-validation fit per shape ("rows,width", see `cv_shapes`): a few L-BFGS
    iterations of the real solver on random data, scaled to its iteration cap. These fits are small, so
    their time is as much the solver's per-iteration overhead as arithmetic, which a product rate misses."""

    @property
    def low_data_rate(self) -> float:
        """The products' rate that the low-data probes' fits run at."""
        return self.fp32_fit_flops_per_second or self.fit_flops_per_second

    @property
    def probe_rate(self) -> float:
        """The products' rate the full probe's fits are predicted at: their own, but at most
        MAX_BF16_FIT_GAIN times fp32's, since the rest of a fit does not speed up with them."""
        return min(self.fit_flops_per_second, MAX_BF16_FIT_GAIN * self.low_data_rate)

    def faster(self, other: Speeds) -> Speeds:
        """The faster of two calibrations, primitive by primitive (a slow moment only ever slows a timing
        down, so the fastest seen is the best estimate of what this machine does); their seconds summed."""
        fp32 = [s.fp32_fit_flops_per_second for s in (self, other) if s.fp32_fit_flops_per_second]
        cv = {**other.cv_fit_seconds, **self.cv_fit_seconds}
        for k, v in other.cv_fit_seconds.items():
            cv[k] = min(cv[k], v)
        return Speeds(
            min(self.feature_seconds_per_image, other.feature_seconds_per_image),
            max(self.fit_flops_per_second, other.fit_flops_per_second),
            self.calibration_seconds + other.calibration_seconds,
            max(fp32) if fp32 else None,
            cv,
        )


@dataclass(frozen=True)
class Workload:
    """The sizes the stages after pretraining work on."""

    n_train: int
    n_val: int
    n_test: int
    num_classes: int
    resolution: int
    n_layer: int
    n_embd: int
    pool_cells: int
    """Grid cells of the probe's pooling (mean 1, grid 4, grid3 9, grid4 16)."""
    low_data: tuple[tuple[int, int], ...]
    completions: tuple[int, int]
    compile: bool
    finetune_minutes: float | None = None
    finetune_low_data: bool = False
    fine_cells: int = 0
    """Grid cells of the probes' further pooling (`--fine-pool`; 0: none). The full probe fits it at the
    layer it chose, from its own pass (where it also pools the test split at every layer); the low-data
    probes fit it and the mean (not the probe's pooling) at every layer, after a pass of their own over the
    subsets' rows."""
    attentive: bool = False


def cv_shapes(w: Workload) -> list[tuple[int, int]]:
    """The distinct (rows, width) of the low-data probes' cross-validation fits: each setting's labelled rows
    against each feature width, capped at the rows (wider features are fitted in the span of the rows)."""
    C = w.num_classes
    shapes = {
        (n * C, min(k, n * C))
        for n, _ in w.low_data
        if min(CV_FOLDS, n) >= 2
        for k in [*_low_dims(w), w.resolution**2]
    }
    return sorted(shapes)


def _low_dims(w: Workload) -> list[int]:
    """The low-data probes' feature widths, each fitted at every layer: the further grid where there is one,
    in place of the probe's pooling, and the paper's mean."""
    d = w.n_embd
    return list(dict.fromkeys([d * (w.fine_cells or w.pool_cells), d]))


def calibrate(
    cfg: IGPTConfig,
    precision: str,
    feature_dim: int,
    images: int = 128,
    rounds: int = 3,
    shapes: list[tuple[int, int]] | None = None,
    num_classes: int = 10,
) -> Speeds:
    """Time the feature pass (eager, after a warm-up batch) and a fit's product pair on this machine, both in
    the probes' `precision` (the products in fp32 too where that differs: the low-data probes fit in fp32),
    and a low-data cross-validation fit of each of `shapes` (`cv_shapes`), each the fastest of `rounds`
    timings (two for the fits): on a shared machine one slow moment would otherwise be scaled up to whole
    stages, and the minutes it over-predicts are taken from pretraining. The global random state is left as
    it was (a re-plan calibrates in the middle of a pretraining)."""
    with torch.random.fork_rng(devices=[]):
        return _calibrate(cfg, precision, feature_dim, images, rounds, shapes or [], num_classes)


CV_TIMED_ITERS = 20
"""L-BFGS iterations timed per low-data fit shape; a fit's time grows linearly with them
(docs/decisions/probe-settings.md)."""


def _cv_fit_seconds(rows: int, width: int, num_classes: int, rounds: int) -> float:
    """Seconds of one cross-validation fit (every L2 strength and fold at once, as `logistic.cv_lambda`
    fits them) at its iteration cap, from CV_TIMED_ITERS iterations on random data (the fastest of
    `rounds`)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=g)
    y = torch.arange(rows) % num_classes
    lams, weights = cv_problems(np.arange(rows) % CV_FOLDS, CV_FOLDS)
    best = math.inf
    for _ in range(rounds):
        t = time.perf_counter()
        fit_logistic_many(x, y, num_classes, lams, weights, max_iter=CV_TIMED_ITERS)
        best = min(best, time.perf_counter() - t)
    return best * CV_ITERS / CV_TIMED_ITERS


def _calibrate(
    cfg: IGPTConfig,
    precision: str,
    feature_dim: int,
    images: int,
    rounds: int,
    shapes: list[tuple[int, int]],
    num_classes: int,
) -> Speeds:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = IGPT(cfg).eval()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (images, cfg.n_positions), dtype=np.int64)
    layers = list(range(cfg.n_layer + 1))
    extract_features(model, tokens[:64], layers, batch_size=64, precision=precision)  # warm-up
    per_image = math.inf
    for _ in range(rounds):
        t = time.perf_counter()
        extract_features(model, tokens, layers, batch_size=128, precision=precision)
        per_image = min(per_image, (time.perf_counter() - t) / images)
    rate = _product_rate(feature_dim, FIT_DTYPES[precision], rounds)
    fp32 = _product_rate(feature_dim, torch.float32, rounds) if precision != "fp32" else None
    cv = {f"{r},{k}": _cv_fit_seconds(r, k, num_classes, min(rounds, 2)) for r, k in shapes}
    return Speeds(per_image, rate, time.perf_counter() - t0, fp32, cv)


def _product_rate(feature_dim: int, dt: torch.dtype, rounds: int) -> float:
    """FLOP/s of a fit's product pair in `dt` (the fastest of `rounds`), done as `fit_logistic_many` does."""
    n, cols = 4096, 10 * len(LAMBDAS)
    x, w = torch.randn(n, feature_dim).to(dt), torch.randn(feature_dim, cols)
    best = math.inf
    for _ in range(rounds):
        t = time.perf_counter()
        g = (x @ w.to(dt)).float()
        (g.to(dt).T @ x).T.float().contiguous()
        best = min(best, time.perf_counter() - t)
    return 4 * n * feature_dim * cols / max(best, 1e-9)


def _fit_flops(rows: int, dim: int, cols: int, iters: int) -> float:
    """Products of one L-BFGS fit at its iteration cap: two (rows x dim x cols) products per evaluation."""
    return 4.0 * rows * dim * cols * iters


def predict(w: Workload, s: Speeds) -> dict[str, float]:
    """Seconds per stage after pretraining (probe, low_data, completions, report, and the optional
    finetune and attentive work), before the margin."""
    L1, d, C = w.n_layer + 1, w.n_embd, w.num_classes
    raw_dim, grid_dim = w.resolution**2, d * w.pool_cells
    n_all = w.n_train + w.n_val + w.n_test
    features = n_all * s.feature_seconds_per_image * FEATURE_FACTOR + (COMPILE_SECONDS if w.compile else 0)

    def probe_fits(dim: int) -> float:  # lambda sweep on <= 20k rows, then the refit on all rows
        sweep = _fit_flops(min(SWEEP_ROWS, w.n_train), dim, C * len(LAMBDAS), SWEEP_ITERS)
        return sweep + _fit_flops(w.n_train, dim, C, REFIT_ITERS)

    dims = [grid_dim] + ([d] if w.pool_cells > 1 else [])  # the asked-for pooling and the paper's mean
    fits = sum(L1 * probe_fits(k) for k in dims) + probe_fits(raw_dim)
    if w.fine_cells:  # the further pooling at the chosen layer: fewer strengths, a shorter refit
        k = d * w.fine_cells
        fits += FINE_CANDIDATES * _fit_flops(
            min(SWEEP_ROWS, w.n_train), k, C * len(FINE_LAMBDAS), SWEEP_ITERS
        )
        fits += _fit_flops(w.n_train, k, C, FINE_REFIT_ITERS)
    low, low_pass = 0.0, 0.0
    low_dims = _low_dims(w)
    if w.fine_cells and w.low_data:
        # the further pooling's own pass over each setting's subsets (the test split's came with the probe)
        low_images = sum(per_class * C * subsets for per_class, subsets in w.low_data)
        low_pass = low_images * s.feature_seconds_per_image * FEATURE_FACTOR
    low_timed = 0.0  # seconds of the cross-validation fits timed at their shapes
    for per_class, subsets in w.low_data:
        rows = per_class * C
        folds = min(CV_FOLDS, per_class)
        cv_cols = C * len(CV_LAMBDAS) * folds if folds >= 2 else 0
        for k in [*(kk for kk in low_dims for _ in range(L1)), raw_dim]:
            k = min(k, rows)  # wider features are fitted in the span of the rows (`fit_logistic_many`)
            timed = s.cv_fit_seconds.get(f"{rows},{k}")
            if timed is not None:
                low_timed += subsets * timed
            else:  # not timed (a budget planned by an older igpt): from the product rate
                low += subsets * (
                    _fit_flops(rows, k, cv_cols, CV_ITERS) + _fit_flops(rows, k, C, REFIT_ITERS)
                )
    n_img, n_samp = w.completions
    # sampling the bottom half token by token costs about as much as T/2 feature passes of the batch
    completions = n_img * n_samp * (w.resolution**2 / 2) * s.feature_seconds_per_image / 8 + 5
    out = {
        "probe": features
        + fits * (BF16_FIT_FACTOR if s.fp32_fit_flops_per_second else FIT_FACTOR) / s.probe_rate,
        "low_data": low_pass + low * LOW_DATA_FACTOR / s.low_data_rate + low_timed * CV_FIT_FACTOR,
        "completions": completions,
        "report": REPORT_SECONDS,
    }
    if w.finetune_minutes:
        # two fine-tunings (pretrained and the control), each with its budget plus its evaluation passes
        evals = (min(w.n_train, 10_000) + 4 * w.n_val + w.n_test) * s.feature_seconds_per_image
        out["finetune"] = 2 * (60 * w.finetune_minutes + evals)
        if w.finetune_low_data:  # per setting: its subsets share the minutes; each scores the test split
            per_subset = (2 * 10 * w.num_classes + w.n_test) * s.feature_seconds_per_image
            out["finetune"] += sum(2 * (60 * w.finetune_minutes + k * per_subset) for _, k in w.low_data)
    if w.attentive:
        out["attentive"] = 3 * n_all * s.feature_seconds_per_image + 60
    return out


@dataclass(frozen=True)
class BudgetPlan:
    """How the quickstart's minutes are shared out: what was predicted and what pretraining gets."""

    minutes: float
    """The whole job's budget."""
    pretrain_minutes: float
    """What pretraining gets."""
    predicted: dict[str, float]
    """Seconds per later stage, margin included."""
    spent_before: float
    """Seconds already spent (prepare, calibration) when the plan was made."""
    speeds: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def share_out(
    minutes: float,
    spent_before: float,
    predicted: dict[str, float],
    speeds: Speeds,
    min_pretrain: float,
    shrink: bool = False,
) -> BudgetPlan | float:
    """Pretraining's minutes from the budget, or (when too little is left) the least budget, in minutes,
    that leaves `min_pretrain` minutes of pretraining here; with `shrink`, pretraining gets `min_pretrain`
    instead (the job may then end past its minutes)."""
    rest = sum(predicted.values()) * MARGIN + MARGIN_SECONDS
    left = (60 * minutes - spent_before - rest) / 60
    if left < min_pretrain and shrink:
        left = min_pretrain
    elif left < min_pretrain:
        return math.ceil((spent_before + rest) / 60 + min_pretrain)
    shares = {k: round(v * MARGIN, 1) for k, v in predicted.items()}
    return BudgetPlan(minutes, round(left, 2), shares, round(spent_before, 1), asdict(speeds))


def read_counts(directory: Path) -> tuple[int, int, int, int]:
    """(n_train, n_val, n_test, classes) of the prepared set in `directory`, as its meta.json records them."""
    m = PreparedData(directory).meta
    return int(m["n_train"]), int(m["n_val"]), int(m["n_test"]), int(m["num_classes"])


def fine_pool(plan: QuickstartPlan) -> str | None:
    """The finer grid the quickstart's probes add (`--fine-pool`'s default), None where the images are too
    small for it."""
    return further_pool(plan.pool, FINE_POOL, plan.resolution)


def workload(plan: QuickstartPlan, counts: tuple[int, int, int, int]) -> Workload:
    """The sizes the quickstart's stages after pretraining work on: the plan's model, poolings and stages,
    and the prepared set's `counts` (n_train, n_val, n_test, classes; `read_counts`)."""
    cfg = IGPTConfig.from_preset(plan.preset)
    fine = fine_pool(plan)
    return Workload(
        *counts,
        resolution=plan.resolution,
        n_layer=cfg.n_layer,
        n_embd=cfg.n_embd,
        pool_cells=grid_side(plan.pool) ** 2,
        fine_cells=grid_side(fine) ** 2 if fine else 0,
        low_data=plan.low_data,
        completions=plan.completions,
        compile=plan.compile,
        finetune_minutes=plan.finetune_minutes,
        finetune_low_data=plan.finetune_low_data,
        attentive=plan.attentive,
    )
