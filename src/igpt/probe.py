"""Linear probes: features of every layer in one pass, and a multinomial logistic regression fitted with
full-batch L-BFGS in torch (it runs on a GPU too), its L2 strength chosen on a validation split.

Features are standardised with the training statistics; the classifier minimises mean cross entropy plus
lambda * ||W||^2 / 2. Fitting 60,000 x 512 features takes seconds, so a sweep over lambda is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .model import IGPT

LAMBDAS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)


@torch.no_grad()
def extract_features(
    model: IGPT,
    tokens: np.ndarray,
    layers: list[int],
    batch_size: int = 128,
    pool: str = "mean",
    resolution: int | None = None,
    mask_ratio: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: str | None = None,
) -> dict[int, torch.Tensor]:
    """Pooled normed hidden states of the chosen layers for every row of `tokens` (N, T), one batched forward
    pass per batch for all layers. `pool` "mean" averages over positions (the paper's feature); "grid"
    averages each quarter of the image (2 x 2 coarse grid, rows split by sequence position) and concatenates
    them, keeping coarse spatial layout (4d features). With `mask_ratio` (BERT), inputs are randomly masked."""
    model = model.to(device).eval()
    out: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    gen = torch.Generator().manual_seed(seed)
    it = range(0, len(tokens), batch_size)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=progress, unit="batch", leave=False, mininterval=1.0)
    for s in it:
        x = torch.from_numpy(np.asarray(tokens[s : s + batch_size], dtype=np.int64)).to(device)
        mask = None
        if mask_ratio:
            from .engine import bert_mask

            mask = bert_mask(tuple(x.shape), mask_ratio, gen).to(device)
        hs = model.get_intermediate_layers(x, layers, mask)
        for i, h in hs.items():
            out[i].append(pool_states(h.float(), pool, resolution).cpu())
    return {i: torch.cat(v) for i, v in out.items()}


def pool_states(h: torch.Tensor, pool: str, resolution: int | None) -> torch.Tensor:
    """(B, T, d) -> (B, d) mean, or (B, 4d) for the 2 x 2 grid (top-left, top-right, bottom-left,
    bottom-right; positions mapped through raster order, a close approximation for snake order)."""
    if pool == "mean":
        return h.mean(1)
    if pool != "grid":
        raise ValueError(f"unknown pooling '{pool}'")
    B, T, d = h.shape
    R = resolution or int(round(T**0.5))
    if R < 2:
        raise ValueError("grid pooling needs images of at least 2x2")
    g = h.view(B, R, R, d)
    a = R // 2
    parts = [g[:, :a, :a], g[:, :a, a:], g[:, a:, :a], g[:, a:, a:]]
    return torch.cat([p.mean((1, 2)) for p in parts], dim=1)


@dataclass
class LinearProbe:
    """A fitted multinomial logistic regression on standardised features."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # (d, C)
    bias: torch.Tensor  # (C,)
    lam: float

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.to(self.weight) - self.mean) / self.std
        return x @ self.weight + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(-1)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.predict(x).cpu() == y.cpu()).float().mean())


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    lam: float,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 150,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    device: str = "cpu",
) -> LinearProbe:
    """Full-batch L-BFGS (strong Wolfe line search) on mean cross entropy + lam/2 ||W||^2 over standardised
    features (standardising keeps the problem well conditioned, so float32 converges reliably)."""
    x = x.to(device, torch.float32)
    y = y.to(device)
    mean, std = stats if stats is not None else (x.mean(0), x.std(0).clamp(min=1e-6))
    mean, std = mean.to(device, torch.float32), std.to(device, torch.float32)
    xs = (x - mean) / std
    d = x.shape[1]
    w = torch.zeros(d, num_classes, dtype=torch.float32, device=device)
    b = torch.zeros(num_classes, dtype=torch.float32, device=device)
    if init is not None:
        w.copy_(init[0])
        b.copy_(init[1])
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w + b, y) + 0.5 * lam * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(mean, std, w.detach(), b.detach(), lam)


def split_validation(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of row indices into (train, validation), stratified by class."""
    rng = np.random.default_rng(seed)
    tr, va = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n = max(1, int(round(len(idx) * fraction))) if len(idx) > 1 else 0
        va.append(idx[:n])
        tr.append(idx[n:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))


def probe_with_validation(
    xtr: torch.Tensor,
    ytr: torch.Tensor,
    xte: torch.Tensor,
    yte: torch.Tensor,
    num_classes: int,
    val_fraction: float = 0.1,
    seed: int = 0,
    lambdas: tuple[float, ...] = LAMBDAS,
    device: str = "cpu",
) -> dict:
    """Choose lambda on a validation split carved from the training rows, refit on all training rows with it,
    and score the test rows. Returns accuracies, the chosen lambda and the fitted probe."""
    tr, va = split_validation(ytr.numpy(), val_fraction, seed)
    stats = (xtr[tr].double().mean(0), xtr[tr].double().std(0).clamp(min=1e-6))
    best, init, val_acc = None, None, {}
    for lam in lambdas:  # strong to weak regularisation, each warm-started from the previous solution
        p = fit_logistic(xtr[tr], ytr[tr], num_classes, lam, init=init, stats=stats, device=device)
        init = (p.weight, p.bias)
        val_acc[lam] = p.accuracy(xtr[va], ytr[va])
        if best is None or val_acc[lam] > val_acc[best]:
            best = lam
    probe = fit_logistic(xtr, ytr, num_classes, best, device=device)
    return {
        "val_accuracy": val_acc[best],
        "test_accuracy": probe.accuracy(xte, yte),
        "lambda": best,
        "probe": probe,
    }


def balanced_subset(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """`per_class` random rows of every class (seeded), sorted."""
    rng = np.random.default_rng(seed)
    out = [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in np.unique(y[y >= 0])]
    return np.sort(np.concatenate(out))


def cv_lambda(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, folds: int, seed: int, device: str = "cpu"
) -> tuple[float, float]:
    """(lambda, its mean accuracy) with the best mean k-fold accuracy (class-balanced folds), for low-data
    probes where no separate validation split can be spared."""
    rng = np.random.default_rng(seed)
    yn = y.numpy()
    fold = np.empty(len(yn), dtype=np.int64)
    for c in np.unique(yn):
        idx = rng.permutation(np.flatnonzero(yn == c))
        fold[idx] = np.arange(len(idx)) % folds
    scores = {}
    for lam in LAMBDAS:
        accs = []
        for f in range(folds):
            tr, va = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
            p = fit_logistic(x[tr], y[tr], num_classes, lam, max_iter=100, device=device)
            accs.append(p.accuracy(x[va], y[va]))
        scores[lam] = float(np.mean(accs))
    best = max(scores, key=lambda k: (scores[k], k))
    return best, scores[best]
