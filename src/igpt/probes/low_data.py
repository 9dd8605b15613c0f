"""The low-data probe (the paper's Table 4 protocol): K seeded class-balanced subsets of N labels per class,
the L2 strength and layer chosen by cross-validation inside each subset (among the finest pooling compared;
the coarser ones are fitted and reported beside it), test accuracy as mean and std over the subsets beside
raw pixels on the same subsets."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    C, ytr_all = data.num_classes, data.labels("train")
    subsets = _subsets(cfg, ytr_all, C)
    rows = np.unique(np.concatenate(subsets))
    cache = cache or FeatureCache(model, data, layers, quiet=not cfg.progress, **feature_settings(cfg, data))
    # the pooling is chosen per regime, on each subset's own cross-validation; every pooling compared comes
    # from one pass over the rows the cache lacks (none where a full probe sharing the cache read them)
    pools = compared_pools(cfg.pool, cfg.fine_pool, data.resolution)
    folds = min(CV_FOLDS, cfg.labels_per_class)
    feats = _Features.read(cache, data, pools, layers, rows, cfg.test_limit, validation=folds < 2)
    keys = [(p, i) for p in pools for i in layers]
    chooser = choice_pool(pools)
    candidates = [(chooser, i) for i in layers]
    scores = {k: _Scores() for k in keys}
    raw, own_choice = [], []  # own_choice: each subset's test accuracy at its own CV's best choosing layer
    pos = {r: k for k, r in enumerate(rows)}
    for s, sub in enumerate(subsets):
        k = np.array([pos[r] for r in sub])
        y = torch.from_numpy(ytr_all[sub])
        for key in keys:
            scores[key].add(*_fit(cfg, feats, key, k, y, s, C, folds))
        raw.append(_fit(cfg, feats, "raw", k, y, s, C, folds)[0])
        own = min(candidates, key=lambda q: (scores[q].cv_loss[-1], q[1]))  # ties: the shallower layer
        own_choice.append(scores[own].acc[-1])
    best_pool, best = min(candidates, key=lambda q: (np.mean(scores[q].cv_loss), q[1]))

    def by_pool(what: str) -> dict[str, dict[str, float]]:
        return {p: {str(i): float(np.mean(getattr(scores[(p, i)], what))) for i in layers} for p in pools}

    return {
        "labels_per_class": cfg.labels_per_class,
        "seeds": cfg.seeds,
        "layers": by_pool("acc")[cfg.pool],
        "layers_std": {str(i): float(np.std(scores[(cfg.pool, i)].acc)) for i in layers},
        "layers_by_pool": by_pool("acc"),
        "cv_accuracy_by_pool": by_pool("cv_acc"),
        "cv_log_loss_by_pool": by_pool("cv_loss"),
        "best_layer": best,
        "best_pool": best_pool,
        "best_accuracy": float(np.mean(scores[(best_pool, best)].acc)),
        "best_std": float(np.std(scores[(best_pool, best)].acc)),
        "mean_accuracy": float(np.mean(own_choice)),
        "std_accuracy": float(np.std(own_choice)),
        "choice_pool": chooser,
        "raw_pixel_accuracy": float(np.mean(raw)),
        "raw_pixel_std": float(np.std(raw)),
        "raw_pixel_accuracies": raw,
        "n_test": len(feats.yte),
        "pool": cfg.pool,
        "pools_compared": pools,
        "head": "linear",
        "classifier": _classifier(folds, chooser),
    }


def _subsets(cfg: ProbeConfig, ytr_all: np.ndarray, C: int) -> list[np.ndarray]:
    """The K seeded class-balanced subsets of N training rows per class; one line where N is impossible."""
    N = cfg.labels_per_class
    if N < 1 or cfg.seeds < 1:
        raise IgptError("--labels-per-class and --seeds must be at least 1")
    counts = np.bincount(ytr_all[ytr_all >= 0], minlength=C)
    if N > counts.min():
        raise IgptError(f"--labels-per-class {N} exceeds the {counts.min()} images of the rarest class")
    return [balanced_subset(ytr_all, N, cfg.seed + s) for s in range(cfg.seeds)]


@dataclass
class _Scores:
    """One feature set's figures over the subsets, in subset order."""

    acc: list[float] = field(default_factory=list)
    """Test accuracy."""
    cv_acc: list[float] = field(default_factory=list)
    """Cross-validated accuracy inside the subset (or on the validation split with one label per class)."""
    cv_loss: list[float] = field(default_factory=list)
    """The same cross-validation's log-loss: what the layer is chosen by."""

    def add(self, acc: float, cv_acc: float, cv_loss: float) -> None:
        self.acc.append(acc)
        self.cv_acc.append(cv_acc)
        self.cv_loss.append(cv_loss)


@dataclass
class _Features:
    """What a low-data probe fits: {pool: {layer: features}} of the subsets' rows (`train`, in sorted row
    order) and of the test rows, raw pixels of both, and with one label per class the validation split's."""

    train: dict[str, dict[int, torch.Tensor]]
    test: dict[str, dict[int, torch.Tensor]]
    raw_train: torch.Tensor
    raw_test: torch.Tensor
    yte: torch.Tensor
    val: dict[str, dict[int, torch.Tensor]] | None = None
    yva: torch.Tensor | None = None

    @classmethod
    def read(
        cls,
        cache: FeatureCache,
        data: PreparedData,
        pools: list[str],
        layers: list[int],
        rows: np.ndarray,
        test_limit: int | None,
        validation: bool,
    ) -> _Features:
        """Every pooling of `pools` at `layers` from the cache (one pass over the rows it lacks)."""

        def of(split: str, r: np.ndarray, label: str) -> dict[str, dict[int, torch.Tensor]]:
            cache(split, r, label, also={p: layers for p in pools}, layers=layers)
            return {p: cache.sibling(p)(split, r, "", layers=layers) for p in pools}

        te = labelled_rows(data.labels("test"), test_limit)
        feats = cls(
            of("train", rows, "train features"),
            of("test", te, "test features"),
            raw_pixels(data, "train", rows),
            raw_pixels(data, "test", te),
            torch.from_numpy(data.labels("test")[te]),
        )
        if validation:  # one label per class: no cross-validation; the choice is made on the validation split
            va = labelled_rows(data.labels("val"), None)
            feats.val, feats.yva = (
                of("val", va, "validation features"),
                torch.from_numpy(data.labels("val")[va]),
            )
        return feats


def _fit(
    cfg: ProbeConfig, f: _Features, key: Any, k: np.ndarray, y: torch.Tensor, s: int, C: int, folds: int
) -> tuple[float, float, float]:
    """(test accuracy, CV accuracy, CV log-loss) of one feature set (a (pool, layer) key, or "raw") on subset
    `s` (rows `k` of the features): L2 by CV inside the subset, or, with one label per class, a fixed L2
    scored on the validation split."""
    xtr, xte = (
        (f.raw_train[k], f.raw_test) if key == "raw" else (f.train[key[0]][key[1]][k], f.test[key[0]][key[1]])
    )
    cv = cv_lambda(xtr, y, C, folds, cfg.seed + s, cfg.device) if folds >= 2 else None
    probe = fit_logistic(xtr, y, C, cv.lam if cv else 1e-2, device=cfg.device)
    if cv is None and key != "raw":
        cv = CVScore(1e-2, *probe.scores(f.val[key[0]][key[1]], f.yva))
    return probe.accuracy(xte, f.yte), cv.accuracy if cv else 0.0, cv.log_loss if cv else 0.0


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
