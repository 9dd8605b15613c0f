"""The probe variants: the extra probes a full probe runs beside the per-layer linear probes when its
settings ask (`--concat`, `--mask-ensemble`, `--head attentive`), as one list. `full_probe` runs each one
wanted, stores its result under its key in probe.json, and offers its candidate to `chosen` (the best probe
by validation accuracy); the report shows every variant that ran. Adding a probe is one `ProbeVariant` in
`VARIANTS` (and the setting that asks for it in `ProbeConfig`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from igpt.data.prepared import PreparedData
from igpt.errors import IgptError
from igpt.model.gpt import IGPT
from igpt.runs import Run, is_run

from .features import extract_features
from .logistic import fit_logistic, probe_with_validation
from .setup import Labelled, ProbeConfig, parse_layers


@dataclass
class ProbeContext:
    """What a variant may read: the settings, the model and data, the layers probed, the labelled rows, the
    number of classes, the features of every probed layer (train, val, test), the best layer chosen on
    validation, and the feature pass's settings."""

    cfg: ProbeConfig
    model: IGPT
    data: PreparedData
    layers: list[int]
    rows: Labelled
    classes: int
    feats: tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor]]
    best: int
    feature_kw: dict[str, Any]


@dataclass(frozen=True)
class ProbeVariant:
    """One extra probe."""

    key: str
    """Its result's key in probe.json."""
    title: str
    """Its name in the report."""
    wanted: Callable[[ProbeConfig], bool]
    """Whether these settings ask for it."""
    run: Callable[[ProbeContext, dict[str, Any]], dict[str, Any]]
    """Its result, from the context and the linear probes' results so far."""
    candidate: Callable[[dict[str, Any], dict[str, Any]], tuple[str, float, float]] | None = None
    """(name, validation accuracy, test accuracy) it offers to `chosen`, from its result and the whole
    probe's; None for a variant that is not a candidate."""
    check: Callable[[ProbeConfig, IGPT, list[int]], None] | None = None
    """Refuses impossible settings in one line before the feature pass."""
    finish: Callable[[dict[str, Any]], None] | None = None
    """Adjusts the whole probe's result after it ran (the attentive head becomes the reported best)."""
    summary: Callable[[dict[str, Any]], str] | None = None
    """The report's note on its result."""
    score: Callable[[dict[str, Any]], float | None] = lambda r: r.get("test_accuracy")
    """The test accuracy the report shows for it."""


# ---------------------------------------------------------------------------------------------- concat
def _concat_layers(cfg: ProbeConfig, model: IGPT) -> list[int]:
    run = Run.open(cfg.run) if is_run(cfg.run) else None
    return parse_layers(cfg.concat, model.config.n_layer, run, flag="--concat")


def _check_concat(cfg: ProbeConfig, model: IGPT, layers: list[int]) -> None:
    missing = [i for i in _concat_layers(cfg, model) if i not in layers]
    if missing:
        raise IgptError(f"--concat layers {missing} must also be among --layers")


def concat_probe(ctx: ProbeContext, res: dict[str, Any]) -> dict[str, Any]:
    """One probe of several layers' features side by side (`--concat`)."""
    cfg, L = ctx.cfg, ctx.rows
    cat = _concat_layers(cfg, ctx.model)
    x = [torch.cat([f[i] for i in cat], 1) for f in ctx.feats]
    r = probe_with_validation(
        x[0],
        L.ytr,
        x[1],
        L.yva,
        x[2],
        L.yte,
        ctx.classes,
        cfg.seed,
        device=cfg.device,
        precision=cfg.precision,
    )
    return {"layers": cat, "test_accuracy": r["test_accuracy"], "val_accuracy": r["val_accuracy"]}


# ---------------------------------------------------------------------------------------------- attentive
def attentive(ctx: ProbeContext, res: dict[str, Any]) -> dict[str, Any]:
    """The attentive head on the best linear layer's token states (or the `--attentive-layers` asked for)."""
    from .attentive import attentive_probe

    cfg, model, data, L = ctx.cfg, ctx.model, ctx.data, ctx.rows
    if cfg.attentive_layers == "best":
        att_layers = [ctx.best]
    else:
        att_layers = parse_layers(cfg.attentive_layers, model.config.n_layer, Run.open(cfg.run))
    splits = {
        "train": (data.tokens("train")[L.tr], L.ytr),
        "val": (data.tokens("val")[L.va], L.yva),
        "test": (data.tokens("test")[L.te], L.yte),
    }
    return attentive_probe(
        model,
        splits,
        att_layers,
        data.num_classes,
        epochs=cfg.attentive_epochs,
        batch_size=cfg.batch_size,
        device=cfg.device,
        compile=cfg.compile,
        precision=cfg.precision,
        seed=cfg.seed,
        progress=cfg.progress,
    )


def _attentive_best(res: dict[str, Any]) -> None:
    res.update(
        head="attentive",
        best_accuracy=res["attentive"]["test_accuracy"],
        linear_best_accuracy=res["best_accuracy"],
    )


# ---------------------------------------------------------------------------------------------- mask ensemble
def _check_mask_ensemble(cfg: ProbeConfig, model: IGPT, layers: list[int]) -> None:
    if model.causal:
        raise IgptError("--mask-ensemble applies to BERT runs only")


def _mask_ensemble_variant(ctx: ProbeContext, res: dict[str, Any]) -> dict[str, Any]:
    lambdas = {i: res["lambda"][str(i)] for i in ctx.layers}
    L = ctx.rows
    return mask_ensemble(ctx.cfg, ctx.model, ctx.data, L.tr, L.te, L.ytr, L.yte, lambdas, ctx.feature_kw)


def mask_ensemble(
    cfg: ProbeConfig,
    model: IGPT,
    data: PreparedData,
    tr: np.ndarray,
    te: np.ndarray,
    ytr: torch.Tensor,
    yte: torch.Tensor,
    lambdas: dict[int, float],
    kw: dict,
) -> dict[str, Any]:
    """BERT, Figure 4's protocol: the evaluation is repeated M times, each with its own random mask on the
    training and test images, at the run's own mask ratio (the input BERT saw in pretraining); the test
    prediction is the argmax of the M probes' averaged probabilities. Each layer keeps the L2 strength chosen
    on its unmasked validation split."""
    if model.causal:
        raise IgptError("--mask-ensemble applies to BERT runs only")
    train_cfg = Run.open(cfg.run).train_config if is_run(cfg.run) else None
    ratio = train_cfg.mask_ratio if train_cfg is not None else 0.15
    layers = list(lambdas)
    votes: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    single: dict[int, list[float]] = {i: [] for i in layers}
    for m in range(cfg.mask_ensemble):
        label = f"mask {m + 1}/{cfg.mask_ensemble}"
        ftr = extract_features(
            model,
            data.tokens("train")[tr],
            layers,
            mask_ratio=ratio,
            seed=1000 + m,
            progress=label + " train",
            **kw,
        )
        fte = extract_features(
            model,
            data.tokens("test")[te],
            layers,
            mask_ratio=ratio,
            seed=2000 + m,
            progress=label + " test",
            **kw,
        )
        for i in layers:
            p = fit_logistic(
                ftr[i], ytr, data.num_classes, lambdas[i], device=kw["device"], precision=cfg.precision
            )
            prob = torch.softmax(p.logits(fte[i]).float(), -1).cpu()
            votes[i].append(prob)
            single[i].append(float((prob.argmax(-1) == yte).float().mean()))
    out = {}
    for i in layers:  # the ensemble averages the probes' probabilities (no ties broken toward class 0)
        mean = torch.stack(votes[i]).mean(0)
        out[str(i)] = float((mean.argmax(-1) == yte).float().mean())
    return {
        "masks": cfg.mask_ensemble,
        "mask_ratio": ratio,
        "layers": out,
        "single_mask_mean": {str(i): float(np.mean(v)) for i, v in single.items()},
    }


VARIANTS: list[ProbeVariant] = [
    ProbeVariant(
        "concat",
        "concatenated layers",
        wanted=lambda cfg: bool(cfg.concat),
        run=concat_probe,
        candidate=lambda r, res: (
            f"linear, {res['pool']} pooling, layers {r['layers']} concatenated",
            r["val_accuracy"],
            r["test_accuracy"],
        ),
        check=_check_concat,
        summary=lambda r: f"layers {r['layers']} side by side, L2 chosen on validation; test accuracy",
    ),
    ProbeVariant(
        "mask_ensemble",
        "BERT mask ensemble",
        wanted=lambda cfg: bool(cfg.mask_ensemble),
        run=_mask_ensemble_variant,
        check=_check_mask_ensemble,
        summary=lambda r: f"{r['masks']} masks at ratio {r['mask_ratio']:g}, the best layer; test accuracy",
        score=lambda r: max(r["layers"].values()),
    ),
    ProbeVariant(
        "attentive",
        "attentive probe",
        wanted=lambda cfg: cfg.head == "attentive",
        run=attentive,
        candidate=lambda r, res: (
            f"attentive, layer(s) {r['layers']}",
            r["val_accuracy"],
            r["test_accuracy"],
        ),
        finish=_attentive_best,
        summary=lambda r: f"layer(s) {r['layers']}, epoch {r.get('best_epoch')} chosen on validation; test",
    ),
]
"""Every extra probe, in the order `full_probe` runs them."""
