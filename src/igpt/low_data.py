"""The low-data probe (the paper's Table 4 protocol): K seeded class-balanced subsets of N labels per class,
the L2 strength, pooling and layer chosen by cross-validation inside each subset, test accuracy as mean and
std over the subsets beside raw pixels on the same subsets."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .data import PreparedData
from .errors import IgptError
from .features import FeatureCache, grid_side, raw_pixels
from .logistic import CV_FOLDS, balanced_subset, cv_lambda, fit_logistic
from .model import IGPT
from .probe_setup import ProbeConfig, feature_settings, labelled_rows

ENSEMBLE_TOP, ENSEMBLE_MAX_LABELS = 5, 10
"""With at most ENSEMBLE_MAX_LABELS labels per class, each subset's own choice averages the test probabilities
of the ENSEMBLE_TOP (pooling, layer) probes its cross-validation ranks highest, instead of taking the single
best, whose pick is noisy with so few labels; with more, the single best. On the validation split (a
3,059-step default quickstart model, 2-core AMD EPYC with AVX512_BF16; grid3, mean and grid7 at layers 0-4),
at 10 labels per class (5 subsets) the single best scored 0.7225 (std 0.0209), the top 3 0.7280, the top 5
0.7299 (std 0.0097), raw pixels 0.6872; at 100 (3 subsets) the single best 0.8369, the top 3 0.8352, the
top 5 0.8333. The probes are fitted anyway, so it costs nothing."""


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
    acc: dict[tuple[str, int], list[float]] = {k: [] for k in keys}
    cv: dict[tuple[str, int], list[float]] = {k: [] for k in keys}
    raw = []
    own_choice = []  # each subset's test accuracy with its own CV's top ENSEMBLE_TOP choices averaged
    single_choice = []  # ... with its own CV's single best choice

    def fit(key: Any, k: np.ndarray, y: torch.Tensor, s: int) -> tuple[torch.Tensor, float]:
        """(test probabilities, choice score) of one feature set on subset `s`: L2 by CV inside the subset,
        or, with one label per class, a fixed L2 and the validation split's accuracy as the score."""
        xtr, xte = (rtr[k], rte) if key == "raw" else (ftr[key[0]][key[1]][k], fte[key[0]][key[1]])
        lam, score = cv_lambda(xtr, y, C, folds, cfg.seed + s, cfg.device) if folds >= 2 else (1e-2, 0.0)
        probe = fit_logistic(xtr, y, C, lam, device=cfg.device)
        if folds < 2 and key != "raw":
            score = probe.accuracy(fva[key[0]][key[1]], yva)
        return torch.softmax(probe.logits(xte), -1).cpu(), score

    top = ENSEMBLE_TOP if N <= ENSEMBLE_MAX_LABELS else 1

    def accuracy(prob: torch.Tensor) -> float:
        return float((prob.argmax(-1) == yte).float().mean())

    for s, sub in enumerate(subsets):
        k = np.array([pos[r] for r in sub])
        y = torch.from_numpy(ytr_all[sub])
        probs = {}
        for key in keys:
            probs[key], score = fit(key, k, y, s)
            acc[key].append(accuracy(probs[key]))
            cv[key].append(score)
        raw.append(accuracy(fit("raw", k, y, s)[0]))
        ranked = sorted(keys, key=lambda q: (cv[q][-1], q[0] == "mean", -q[1]), reverse=True)
        single_choice.append(acc[ranked[0]][-1])
        own_choice.append(accuracy(torch.stack([probs[q] for q in ranked[:top]]).mean(0)))
    best_pool, best = max(keys, key=lambda q: (np.mean(cv[q]), q[0] == "mean", -q[1]))
    by_pool = {p: {str(i): float(np.mean(acc[(p, i)])) for i in layers} for p in pools}
    return {
        "labels_per_class": N,
        "seeds": cfg.seeds,
        "layers": by_pool[cfg.pool],
        "layers_std": {str(i): float(np.std(acc[(cfg.pool, i)])) for i in layers},
        "layers_by_pool": by_pool,
        "cv_accuracy_by_pool": {p: {str(i): float(np.mean(cv[(p, i)])) for i in layers} for p in pools},
        "best_layer": best,
        "best_pool": best_pool,
        "best_accuracy": float(np.mean(acc[(best_pool, best)])),
        "best_std": float(np.std(acc[(best_pool, best)])),
        "mean_accuracy": float(np.mean(own_choice)),
        "std_accuracy": float(np.std(own_choice)),
        "ensemble_top": top,
        "single_choice_accuracy": float(np.mean(single_choice)),
        "single_choice_std": float(np.std(single_choice)),
        "raw_pixel_accuracy": float(np.mean(raw)),
        "raw_pixel_std": float(np.std(raw)),
        "raw_pixel_accuracies": raw,
        "n_test": len(te),
        "pool": cfg.pool,
        "pools_compared": pools,
        "head": "linear",
        "classifier": _classifier(folds, top),
    }


def _classifier(folds: int, top: int) -> str:
    """How the low-data probe fits and chooses, as recorded in its result."""
    if folds < 2:
        how = (
            "L2 1e-2 (one label per class: no CV), pooling and layer chosen on the validation split (the top "
            f"{top} averaged for mean_accuracy)"
        )
    else:
        how = (
            f"L2 by {folds}-fold CV within each subset; pooling and layer chosen by that CV: "
            "best_accuracy at the choice with the best CV over all subsets, mean_accuracy/std_accuracy with "
            f"each subset's own choice (the test probabilities of its CV's top {top} averaged; "
            "single_choice_accuracy with its single best)"
        )
    return f"multinomial logistic regression, torch L-BFGS, {how}"
