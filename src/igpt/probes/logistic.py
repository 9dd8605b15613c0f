"""The linear probe's classifier: multinomial logistic regression on standardised features, fitted with
full-batch L-BFGS in torch (on a GPU too), several L2 strengths at once; its strength chosen on a validation
split, or by cross-validation where only a few labels exist; and the seeded class-balanced subsets of the
low-data protocol.

Features are standardised with the training statistics; the classifier minimises mean cross entropy plus
lambda * ||W||^2 / 2. Fitting 60,000 x 512 features takes seconds, so a sweep over lambda is cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from igpt.data.sources import split_validation
from igpt.errors import IgptError

from .chunks import RowChunks

LAMBDAS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
CV_LAMBDAS = (10.0, 1.0, *LAMBDAS)
"""The low-data probes' cross-validated strengths reach further (docs/decisions/probe-settings.md)."""
SWEEP_ROWS = 20_000
"""The lambda sweep fits on at most this many training rows (a seeded, class-stratified share)."""
SWEEP_ITERS, REFIT_ITERS, CV_ITERS = 150, 150, 100
"""L-BFGS iteration caps: the sweep, the refit on all rows at the chosen lambda, the cross-validation fits
(halved from 300 and 200 on validation evidence: docs/decisions/probe-settings.md)."""
FINE_LAMBDAS, FINE_REFIT_ITERS = LAMBDAS[:3], 75
"""The finer pooling's probe at the chosen layer (`--fine-pool`) sweeps only the three strongest L2
strengths and refits with half the iterations (docs/decisions/probe-settings.md)."""
FINE_CANDIDATES = 2
"""The finer pooling is swept at this many layers, those whose coarse-pooled sweeps score best on validation,
and fitted at the one whose own sweep scores best there (docs/decisions/probe-settings.md)."""
CV_FOLDS = 5
"""Folds of the low-data probes' cross-validation (fewer when a class has fewer labels)."""
FIT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""The fits' matrix products by precision: in bf16 the standardised features are rounded to bf16 once and
the products run in bf16; the loss, the gradient's sums, the weights and L-BFGS's state stay fp32 (about 3x
faster, the same choices: docs/decisions/probe-settings.md)."""


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

    def scores(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(accuracy, mean cross entropy of the true classes in nats) from one pass over `x`; the log-loss
        is a smoother score than accuracy on few rows."""
        logits, y = self.logits(x).cpu(), y.cpu()
        return float((logits.argmax(-1) == y).float().mean()), float(F.cross_entropy(logits, y))


def feature_std(x: torch.Tensor) -> torch.Tensor:
    """Per-feature standard deviation for standardising, at least 1e-6; 1 where it is undefined (one row)."""
    return torch.nan_to_num(x.std(0), nan=1.0).clamp(min=1e-6)


def column_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and standard deviation (as `feature_std`) in float64, summed over chunks of rows: no
    float64 copy of a wide feature matrix is made (55,000 x 6,272 would take 2.8 GB)."""
    n, d = x.shape
    total = torch.zeros(d, dtype=torch.float64, device=x.device)
    for s in range(0, n, chunk):
        total += x[s : s + chunk].double().sum(0)
    mean = total / max(n, 1)
    sq = torch.zeros_like(total)
    for s in range(0, n, chunk):
        sq += ((x[s : s + chunk].double() - mean) ** 2).sum(0)
    std = (sq / (n - 1)).sqrt() if n > 1 else torch.full_like(sq, float("nan"))
    return mean, torch.nan_to_num(std, nan=1.0).clamp(min=1e-6)


def standardised(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype, device: str, chunk: int = 8192
) -> torch.Tensor:
    """One copy of `x` on `device` in `dtype`, each column standardised by `mean` and `std` in float32,
    chunk by chunk: a bf16 copy never passes through a whole float32 one."""
    out = torch.empty(x.shape, dtype=dtype, device=device)
    for s in range(0, len(x), chunk):
        out[s : s + chunk] = (x[s : s + chunk].to(device, torch.float32) - mean) / std
    return out


def check_trainable(y: np.ndarray, what: str) -> None:
    """A classifier needs labelled rows of at least two classes; one line otherwise."""
    classes = np.unique(y[y >= 0])
    if len(classes) < 2:
        raise IgptError(
            f"{what} leaves {int((y >= 0).sum())} labelled training image(s) of {len(classes)} class(es); a "
            "classifier needs at least two classes"
        )


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    lam: float,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = REFIT_ITERS,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    device: str = "cpu",
    precision: str = "fp32",
) -> LinearProbe:
    """Full-batch L-BFGS (strong Wolfe line search) on mean cross entropy + lam/2 ||W||^2 over standardised
    features (standardising keeps the problem well conditioned, so float32 converges reliably)."""
    return fit_logistic_many(
        x, y, num_classes, [lam], None, init, max_iter, stats, device, precision=precision
    )[0]


def fit_logistic_many(
    x: torch.Tensor | RowChunks,
    y: torch.Tensor,
    num_classes: int,
    lams: list[float],
    weights: torch.Tensor | None = None,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = REFIT_ITERS,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    device: str = "cpu",
    span: bool = True,
    precision: str = "fp32",
) -> list[LinearProbe]:
    """P independent logistic regressions on the same features, fitted as one: problem p has L2 strength
    lams[p] and uses the rows where weights[p] (P, N) is nonzero (all rows if `weights` is None). Their sum is
    minimised by one L-BFGS, so every pass over the N x d features serves all P problems (one (N, d) @
    (d, P*C) product instead of P skinny ones): a lambda sweep or a k-fold cross-validation costs about one
    fit, since on CPU these products are bound by reading the features, not by arithmetic.

    With `span` and more features than rows (a low-data subset of 7x7-grid features: 100 rows of 6,272), the
    problems are solved in an orthonormal basis of the rows' span, which is exact: the logits see only the
    weights' component in that span, and the L2 term drives the rest to zero. L-BFGS then moves (n, P*C)
    weights instead of (d, P*C), which made the low-data probes several times faster.

    `precision` bf16 runs the two products in bf16 (see FIT_DTYPES), where this CPU does them faster.

    `x` may be `RowChunks`, features on disk larger than memory: the statistics, then every L-BFGS pass,
    read them a chunk of rows at a time and sum the loss and gradient over the chunks (the same objective,
    so the same optimum as the fit in memory to float tolerance), holding one chunk and the solver's state."""
    if precision not in FIT_DTYPES:
        raise IgptError(f"unknown fit precision '{precision}'; choose one of {', '.join(FIT_DTYPES)}")
    pd = FIT_DTYPES[precision]
    mean, std = stats if stats is not None else column_stats(x)
    mean, std = mean.to(device, torch.float32), std.to(device, torch.float32)
    on_disk = isinstance(x, RowChunks)
    xs, basis, init = (x, None, init) if on_disk else _fit_space(x, mean, std, init, span, pd, device)
    (n, d), P, C = xs.shape, len(lams), num_classes
    if weights is None:
        weights = torch.ones(P, n)
    m = (weights / weights.sum(1, keepdim=True)).T.to(device, torch.float32)  # (N, P): each problem's mean
    lam = torch.tensor(lams, dtype=torch.float32, device=device).repeat_interleave(C)  # (P*C,)
    w = torch.zeros(d, P * C, dtype=torch.float32, device=device)
    b = torch.zeros(P * C, dtype=torch.float32, device=device)
    if init is not None:
        w.copy_(init[0].to(device).repeat(1, P))
        b.copy_(init[1].to(device).repeat(P))
    onehot = F.one_hot(y.to(device), C).to(torch.float32)[:, None, :]  # (N, 1, C)
    _minimise(_blocks(xs, onehot, m, (mean, std, pd, device)), lam, w, b, max_iter)
    if basis is not None:
        w = basis @ w  # back to one weight per feature
    return [
        LinearProbe(mean, std, w[:, p * C : (p + 1) * C].clone(), b[p * C : (p + 1) * C].clone(), lams[p])
        for p in range(P)
    ]


Block = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""Rows of a fit: standardised features (n, d), one-hot labels (n, 1, C), row weights (n, P)."""


def _blocks(
    xs: torch.Tensor | RowChunks, onehot: torch.Tensor, m: torch.Tensor, standardise: tuple
) -> Callable[[], Iterator[Block]]:
    """What each L-BFGS pass iterates over: the standardised features in memory as one block, or features
    on disk read and standardised (`standardise`: mean, std, dtype, device) a chunk of rows at a time."""
    if not isinstance(xs, RowChunks):

        def whole() -> Iterator[Block]:
            yield xs, onehot, m

        return whole

    def chunks() -> Iterator[Block]:
        for s in xs.starts():
            rows = slice(s, s + xs.rows)
            yield standardised(xs[rows], *standardise), onehot[rows], m[rows]

    return chunks


def _fit_space(
    x: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    init: tuple[torch.Tensor, torch.Tensor] | None,
    span: bool,
    pd: torch.dtype,
    device: str,
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """The features L-BFGS works on, standardised, in dtype `pd`: with `span` and more features than rows,
    each row's coordinates in an orthonormal basis of the rows' span (`init` carried into it). Returns the
    features, the basis (None: the features themselves) and `init`."""
    if not (span and x.shape[1] > x.shape[0]):
        return standardised(x, mean, std, pd, device), None, init
    xs = standardised(x, mean, std, torch.float32, device)
    basis = torch.linalg.qr(xs.T).Q  # (d, n): orthonormal columns spanning the rows
    if init is not None:
        init = (basis.T @ init[0].to(device, torch.float32), init[1])
    return (xs @ basis).to(pd), basis, init  # (n, n): each row's coordinates in that basis


def _minimise(
    parts: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]],
    lam: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    max_iter: int,
) -> None:
    """Fit the P problems' weights `w` (d, P*C) and biases `b` in place by one L-BFGS on the sum of their
    row-weighted cross-entropies plus L2 (`lam`, per column). `parts()` yields the rows as (standardised
    features (n, d), one-hot labels (n, 1, C), row weights (n, P)) blocks: one block in memory, or row chunks
    read from disk for features larger than memory; the loss and gradient are summed over the blocks, so
    both give the same optimum."""
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        loss = 0.5 * (lam * (w * w).sum(0)).sum()
        gw, gb = lam * w, torch.zeros_like(b)
        for xs, onehot, m in parts():
            n, P, C = xs.shape[0], m.shape[1], onehot.shape[-1]
            # the gradient by hand: autograd would form xs.T @ g through a transposed view, much slower on
            # CPU than (g.T @ xs).T, and these products over the N x d features are the whole cost of a probe
            logits = ((xs @ w.to(xs.dtype)).float() + b).view(n, P, C)
            logp = torch.log_softmax(logits, -1)
            loss = loss - (m * (logp * onehot).sum(-1)).sum()
            g = ((logp.exp() - onehot) * m[..., None]).view(n, P * C)  # (n, P*C)
            gw = gw + (g.to(xs.dtype).T @ xs).T.float()
            gb = gb + g.sum(0)
        w.grad, b.grad = gw.contiguous(), gb
        return loss

    opt.step(closure)


def sweep_rows(y: np.ndarray, seed: int = 0, select_rows: int | None = SWEEP_ROWS) -> np.ndarray:
    """Positions of the training rows a lambda sweep fits on: all of them, or at most `select_rows` (a
    seeded, class-stratified share). They rank the strengths about as well as all rows would, at a fraction
    of the cost for wide (grid-pooled) features."""
    tr = np.arange(len(y))
    if select_rows and len(tr) > select_rows:
        keep, _ = split_validation(y, 1 - select_rows / len(tr), seed + 1)
        tr = tr[keep]
    return tr


@dataclass
class Sweep:
    """A lambda sweep's outcome: the probe fitted at the strength chosen on validation, and the validation
    accuracy of every strength."""

    probe: LinearProbe
    val_accuracy: dict[float, float]

    @property
    def best(self) -> float:
        return self.val_accuracy[self.probe.lam]


def sweep_lambda(
    xtr: torch.Tensor,
    ytr: torch.Tensor,
    xva: torch.Tensor,
    yva: torch.Tensor,
    num_classes: int,
    lambdas: tuple[float, ...] = LAMBDAS,
    device: str = "cpu",
    precision: str = "fp32",
) -> Sweep:
    """Fit every strength on the (sweep's) training rows and choose one on the validation rows; ties go to
    the stronger regularisation."""
    probes = fit_logistic_many(
        xtr,
        ytr,
        num_classes,
        list(lambdas),
        stats=column_stats(xtr),
        max_iter=SWEEP_ITERS,
        device=device,
        precision=precision,
    )
    val_acc = {p.lam: p.accuracy(xva, yva) for p in probes}
    best = max(lambdas, key=lambda k: (val_acc[k], k))
    return Sweep(probes[list(lambdas).index(best)], val_acc)


def refit(
    xtr: torch.Tensor,
    ytr: torch.Tensor,
    num_classes: int,
    sweep: Sweep,
    device: str = "cpu",
    max_iter: int = REFIT_ITERS,
    precision: str = "fp32",
) -> LinearProbe:
    """The probe refitted on all training rows at the sweep's strength, warm-started from its solution."""
    p = sweep.probe
    init = (p.weight, p.bias)
    return fit_logistic(
        xtr, ytr, num_classes, p.lam, init=init, max_iter=max_iter, device=device, precision=precision
    )


def probe_with_validation(
    xtr: torch.Tensor,
    ytr: torch.Tensor,
    xva: torch.Tensor,
    yva: torch.Tensor,
    xte: torch.Tensor,
    yte: torch.Tensor,
    num_classes: int,
    seed: int = 0,
    lambdas: tuple[float, ...] = LAMBDAS,
    device: str = "cpu",
    select_rows: int | None = SWEEP_ROWS,
    precision: str = "fp32",
) -> dict:
    """Choose lambda on the validation rows (`sweep_lambda` on the `sweep_rows`), refit on all training rows
    with it, and score the test rows, which choose nothing. Returns accuracies, the chosen lambda and the
    fitted probe."""
    tr = sweep_rows(ytr.numpy(), seed, select_rows)
    sweep = sweep_lambda(xtr[tr], ytr[tr], xva, yva, num_classes, lambdas, device, precision)
    probe = refit(xtr, ytr, num_classes, sweep, device, precision=precision)
    return {
        "val_accuracy": sweep.best,
        "test_accuracy": probe.accuracy(xte, yte),
        "lambda": sweep.probe.lam,
        "probe": probe,
    }


def balanced_subset(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """`per_class` random rows of every class (seeded), sorted."""
    rng = np.random.default_rng(seed)
    out = [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in np.unique(y[y >= 0])]
    return np.sort(np.concatenate(out))


@dataclass(frozen=True)
class CVScore:
    """A cross-validation's outcome at its chosen L2 strength: the mean over the held-out folds of the
    accuracy and of the log-loss (cross entropy of the true class, nats)."""

    lam: float
    accuracy: float
    log_loss: float


def cv_lambda(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, folds: int, seed: int, device: str = "cpu"
) -> CVScore:
    """The L2 strength with the lowest mean held-out log-loss over k class-balanced folds (ties go to the
    stronger), for low-data probes where no separate validation split can be spared.

    The log-loss chooses, not the accuracy: with 10 labels per class a fold holds 20 rows, so its accuracy
    moves in steps of 5 points and ties are common (they fell to the strongest L2), where the log-loss ranks
    smoothly; it chose better on validation (docs/decisions/probe-settings.md)."""
    rng = np.random.default_rng(seed)
    yn = y.numpy()
    fold = np.empty(len(yn), dtype=np.int64)
    for c in np.unique(yn):
        idx = rng.permutation(np.flatnonzero(yn == c))
        fold[idx] = np.arange(len(idx)) % folds
    lams, weights = cv_problems(fold, folds)
    probes = fit_logistic_many(x, y, num_classes, lams, weights, max_iter=CV_ITERS, device=device)
    scores = {}
    for j, lam in enumerate(CV_LAMBDAS):
        accs, losses = [], []
        for f in range(folds):
            va = np.flatnonzero(fold == f)
            acc, loss = probes[j * folds + f].scores(x[va], y[va])
            accs.append(acc)
            losses.append(loss)
        scores[lam] = CVScore(lam, float(np.mean(accs)), float(np.mean(losses)))
    return min(scores.values(), key=lambda s: (s.log_loss, -s.lam))


def cv_problems(fold: np.ndarray, folds: int) -> tuple[list[float], torch.Tensor]:
    """The problems of one cross-validation fitted as one (`fit_logistic_many`): every CV_LAMBDAS strength
    for every fold, as (strengths, (P, N) row weights), each problem leaving its fold's rows out. `fold`
    holds each row's fold."""
    lams = [lam for lam in CV_LAMBDAS for _ in range(folds)]
    weights = torch.stack([torch.from_numpy(fold != f).float() for _ in CV_LAMBDAS for f in range(folds)])
    return lams, weights
