"""The low-data probe (the paper's Table 4 protocol): K seeded class-balanced subsets of N labels per class,
the L2 strength and layer chosen by cross-validation inside each subset (among the finest pooling compared;
the coarser ones are fitted and reported beside it), test accuracy as mean and std over the subsets beside
raw pixels on the same subsets."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from igpt.data.prepared import PreparedData
from igpt.errors import IgptError
from igpt.model.gpt import IGPT

from .features import FeatureCache, grid_side, raw_pixels
from .logistic import CV_FOLDS, CVScore, balanced_subset, cv_lambda, fit_logistic
from .setup import ProbeConfig, feature_settings, labelled_rows

# Each subset chooses its layer (and L2 strength) among the finest pooling compared, by its cross-validation's
# log-loss (`logistic.cv_lambda`), and keeps that single probe; the coarser poolings are fitted and reported
# beside it (chosen on validation: docs/decisions/probe-settings.md).


def choice_pool(pools: list[str]) -> str:
    """The pooling whose layers the low-data probes choose among: the finest compared (with few labels the
    finer the grid, the better; see `probe_setup.FINE_POOL`)."""
    return max(pools, key=grid_side)


def compared_pools(pool: str, fine_pool: str, resolution: int) -> list[str]:
    """The poolings a low-data probe weighs: the asked-for `pool`, the paper's mean (from the same pass) and
    `fine_pool` ("none" for none) where the images have room for its grid, each once."""
    pools = dict.fromkeys([pool, "mean", fine_pool])
    return [p for p in pools if p != "none" and grid_side(p) <= resolution]


def further_pool(pool: str, fine_pool: str, resolution: int) -> str | None:
    """The pooling `fine_pool` adds beyond `pool` and the mean (None: none, or a grid finer than the images):
    the one the full probe fits at its chosen layer and the low-data probes weigh at every layer."""
    rest = [p for p in compared_pools(pool, fine_pool, resolution) if p not in (pool, "mean")]
    return rest[0] if rest else None


def low_data_probe(
    cfg: ProbeConfig, model: IGPT, data: PreparedData, layers: list[int], cache: FeatureCache | None = None
) -> dict[str, Any]:
    """Table 4's protocol: K seeded class-balanced subsets of N labels per class; lambda by k-fold
    cross-validation within each subset; mean and std of test accuracy, beside raw pixels on the same
    subsets."""
    N, C = cfg.labels_per_class, data.num_classes
    if N < 1 or cfg.seeds < 1:
        raise IgptError("--labels-per-class and --seeds must be at least 1")
    ytr_all = data.labels("train")
    counts = np.bincount(ytr_all[ytr_all >= 0], minlength=C)
    if N > counts.min():
        raise IgptError(f"--labels-per-class {N} exceeds the {counts.min()} images of the rarest class")
    subsets = [balanced_subset(ytr_all, N, cfg.seed + s) for s in range(cfg.seeds)]
    rows = np.unique(np.concatenate(subsets))
    te = labelled_rows(data.labels("test"), cfg.test_limit)
    yte = torch.from_numpy(data.labels("test")[te])
    kw = feature_settings(cfg, data)
    cache = cache or FeatureCache(model, data, layers, quiet=not cfg.progress, **kw)
    # the pooling is chosen per regime, on each subset's own cross-validation; every pooling compared comes
    # from one pass over the rows the cache lacks (none where a full probe sharing the cache read them)
    pools = compared_pools(cfg.pool, cfg.fine_pool, data.resolution)

    def features(split: str, r: np.ndarray, label: str) -> dict[str, dict[int, torch.Tensor]]:
        cache(split, r, label, also={p: layers for p in pools}, layers=layers)
        return {p: cache.sibling(p)(split, r, "", layers=layers) for p in pools}

    ftr, fte = features("train", rows, "train features"), features("test", te, "test features")
    rtr, rte = raw_pixels(data, "train", rows), raw_pixels(data, "test", te)
    pos = {r: k for k, r in enumerate(rows)}
    folds = min(CV_FOLDS, N)
    if folds < 2:  # one label per class: no cross-validation; the choice is made on the validation split
        va = labelled_rows(data.labels("val"), None)
        yva = torch.from_numpy(data.labels("val")[va])
        fva = features("val", va, "validation features")
    keys = [(p, i) for p in pools for i in layers]
    chooser = choice_pool(pools)
    candidates = [(chooser, i) for i in layers]
    acc: dict[tuple[str, int], list[float]] = {k: [] for k in keys}
    cv_acc: dict[tuple[str, int], list[float]] = {k: [] for k in keys}
    cv_loss: dict[tuple[str, int], list[float]] = {k: [] for k in keys}
    raw = []
    own_choice = []  # each subset's test accuracy at its own CV's best layer of the choosing pooling

    def fit(key: Any, k: np.ndarray, y: torch.Tensor, s: int) -> tuple[float, float, float]:
        """(test accuracy, CV accuracy, CV log-loss) of one feature set on subset `s`: L2 by CV inside the
        subset, or, with one label per class, a fixed L2 scored on the validation split."""
        xtr, xte = (rtr[k], rte) if key == "raw" else (ftr[key[0]][key[1]][k], fte[key[0]][key[1]])
        cv = cv_lambda(xtr, y, C, folds, cfg.seed + s, cfg.device) if folds >= 2 else None
        probe = fit_logistic(xtr, y, C, cv.lam if cv else 1e-2, device=cfg.device)
        if cv is None and key != "raw":
            xva = fva[key[0]][key[1]]
            cv = CVScore(1e-2, *probe.scores(xva, yva))
        return probe.accuracy(xte, yte), cv.accuracy if cv else 0.0, cv.log_loss if cv else 0.0

    for s, sub in enumerate(subsets):
        k = np.array([pos[r] for r in sub])
        y = torch.from_numpy(ytr_all[sub])
        for key in keys:
            a, ca, cl = fit(key, k, y, s)
            acc[key].append(a)
            cv_acc[key].append(ca)
            cv_loss[key].append(cl)
        raw.append(fit("raw", k, y, s)[0])
        own = min(candidates, key=lambda q: (cv_loss[q][-1], q[1]))  # ties: the shallower layer
        own_choice.append(acc[own][-1])
    best_pool, best = min(candidates, key=lambda q: (np.mean(cv_loss[q]), q[1]))
    by_pool = {p: {str(i): float(np.mean(acc[(p, i)])) for i in layers} for p in pools}
    return {
        "labels_per_class": N,
        "seeds": cfg.seeds,
        "layers": by_pool[cfg.pool],
        "layers_std": {str(i): float(np.std(acc[(cfg.pool, i)])) for i in layers},
        "layers_by_pool": by_pool,
        "cv_accuracy_by_pool": {p: {str(i): float(np.mean(cv_acc[(p, i)])) for i in layers} for p in pools},
        "cv_log_loss_by_pool": {p: {str(i): float(np.mean(cv_loss[(p, i)])) for i in layers} for p in pools},
        "best_layer": best,
        "best_pool": best_pool,
        "best_accuracy": float(np.mean(acc[(best_pool, best)])),
        "best_std": float(np.std(acc[(best_pool, best)])),
        "mean_accuracy": float(np.mean(own_choice)),
        "std_accuracy": float(np.std(own_choice)),
        "choice_pool": chooser,
        "raw_pixel_accuracy": float(np.mean(raw)),
        "raw_pixel_std": float(np.std(raw)),
        "raw_pixel_accuracies": raw,
        "n_test": len(te),
        "pool": cfg.pool,
        "pools_compared": pools,
        "head": "linear",
        "classifier": _classifier(folds, chooser),
    }


def _classifier(folds: int, chooser: str) -> str:
    """How the low-data probe fits and chooses, as recorded in its result."""
    if folds < 2:
        how = (
            f"L2 1e-2 (one label per class: no CV), the layer of {chooser} pooling with the lowest log-loss "
            "on the validation split"
        )
    else:
        how = (
            f"L2 by {folds}-fold CV within each subset (lowest held-out log-loss); the layer of {chooser} "
            "pooling chosen by that CV's log-loss: mean_accuracy/std_accuracy with each subset's own choice, "
            "best_accuracy at the choice with the lowest log-loss over all subsets"
        )
    return f"multinomial logistic regression, torch L-BFGS, {how}"
