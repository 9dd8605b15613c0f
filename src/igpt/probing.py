"""Probing: the features of every layer in one pass, a multinomial logistic regression fitted with
full-batch L-BFGS in torch (it runs on a GPU too), and the evaluation protocols built on them: the linear
probe of every layer beside raw pixels (L2 strength and best layer chosen on a validation split), low-data
probes over seeded class-balanced subsets, BERT mask ensembles, and probe accuracy across checkpoints.

Features are standardised with the training statistics; the classifier minimises mean cross entropy plus
lambda * ||W||^2 / 2. Fitting 60,000 x 512 features takes seconds, so a sweep over lambda is cheap.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .checks import check_device, check_seed
from .compiling import CompiledOrEager
from .data import PreparedData
from .engine import autocast
from .errors import IgptError
from .files import atomic_file, write_json_atomic
from .hardware import auto_precision
from .model import IGPT
from .palette import order_index
from .runs import Run
from .sources import split_validation

LAMBDAS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


@torch.no_grad()
def extract_features(
    model: IGPT,
    tokens: np.ndarray,
    layers: list[int],
    batch_size: int = 128,
    pool: str = "mean",
    resolution: int | None = None,
    order: str = "raster",
    mask_ratio: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: str | None = None,
    compile: bool = False,
    mean_out: dict[int, torch.Tensor] | None = None,
    precision: str = "fp32",
) -> dict[int, torch.Tensor]:
    """Pooled normed hidden states of the chosen layers for every row of `tokens` (N, T), one batched forward
    pass per batch for all layers, pooled by `pool_states`. With `mask_ratio` (BERT), inputs are randomly
    masked. With `compile`, the forward pass runs through torch.compile (eagerly if that fails), and a short
    last batch is padded to `batch_size` so that one compiled shape serves every batch. With `mean_out` (a
    dict to fill), the same pass also yields the paper's mean-pooled features of every layer there. With
    `precision` bf16 the pass runs under bf16 autocast (pooled in float32)."""
    model = model.to(device).eval()
    forward = CompiledOrEager(model.get_intermediate_layers, "the feature pass", enabled=compile)
    out: dict[int, torch.Tensor] = {}  # filled in place: no second copy of wide features at the end
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
        n = len(x)
        if forward.active and n < batch_size:  # pad: padded rows are computed and dropped
            x = torch.cat([x, x.new_zeros(batch_size - n, x.shape[1])])
            mask = None if mask is None else torch.cat([mask, mask.new_zeros(batch_size - n, mask.shape[1])])
        with autocast(device, precision):
            hs = forward(x, layers, mask)
        for i, h in hs.items():
            f = pool_states(h[:n].float(), pool, resolution, order).cpu()
            if i not in out:
                out[i] = torch.empty(len(tokens), f.shape[1], dtype=torch.float32)
            out[i][s : s + len(f)] = f
            if mean_out is not None:
                if i not in mean_out:
                    mean_out[i] = torch.empty(len(tokens), h.shape[-1], dtype=torch.float32)
                mean_out[i][s : s + len(f)] = h[:n].float().mean(1).cpu()
    return out


POOLS = ("mean", "grid", "grid3", "grid4")
HEADS = ("linear", "attentive")


def grid_side(pool: str) -> int:
    """Cells along each side of a pooling: 1 for mean, 2 for grid, 3 for grid3, 4 for grid4. A pooled
    feature is grid_side(pool)**2 times the width of the states."""
    if pool not in POOLS:
        raise ValueError(f"unknown pooling '{pool}'")
    return 1 if pool == "mean" else 2 if pool == "grid" else int(pool[4:])


def pool_states(h: torch.Tensor, pool: str, resolution: int | None, order: str = "raster") -> torch.Tensor:
    """(B, T, d) -> (B, d) with "mean" (the paper's feature), or a coarse spatial grid of means concatenated
    in raster order: "grid" 2 x 2 -> (B, 4d), "grid3" 3 x 3 -> (B, 9d), "grid4" 4 x 4 -> (B, 16d). Sequence
    positions are put back in image order first (`order`: raster or snake), so every cell holds the pixels of
    its region; cells split the side as evenly as it allows."""
    n = grid_side(pool)
    if n == 1:
        return h.mean(1)
    B, T, d = h.shape
    R = resolution or int(round(T**0.5))
    if R < n:
        raise ValueError(f"{pool} pooling needs images of at least {n}x{n}")
    if order != "raster":  # sequence position -> pixel: reorder the states into raster order
        h = h[:, torch.from_numpy(np.argsort(order_index(R, order))).to(h.device)]
    g = h.reshape(B, R, R, d)
    e = [round(i * R / n) for i in range(n + 1)]
    cells = [g[:, e[i] : e[i + 1], e[j] : e[j + 1]].mean((1, 2)) for i in range(n) for j in range(n)]
    return torch.cat(cells, dim=1)


def check_pool(pool: str, resolution: int) -> None:
    """A grid pooling needs at least one pixel per cell: one line otherwise."""
    n = grid_side(pool)
    if resolution < n:
        raise IgptError(
            f"--pool {pool} splits the image into {n}x{n} cells, but these images are "
            f"{resolution}x{resolution}; use --pool mean"
        )


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


def feature_std(x: torch.Tensor) -> torch.Tensor:
    """Per-feature standard deviation for standardising, at least 1e-6; 1 where it is undefined (one row)."""
    return torch.nan_to_num(x.std(0), nan=1.0).clamp(min=1e-6)


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
    max_iter: int = 150,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    device: str = "cpu",
) -> LinearProbe:
    """Full-batch L-BFGS (strong Wolfe line search) on mean cross entropy + lam/2 ||W||^2 over standardised
    features (standardising keeps the problem well conditioned, so float32 converges reliably)."""
    return fit_logistic_many(x, y, num_classes, [lam], None, init, max_iter, stats, device)[0]


def fit_logistic_many(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    lams: list[float],
    weights: torch.Tensor | None = None,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 150,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    device: str = "cpu",
) -> list[LinearProbe]:
    """P independent logistic regressions on the same features, fitted as one: problem p has L2 strength
    lams[p] and uses the rows where weights[p] (P, N) is nonzero (all rows if `weights` is None). Their sum is
    minimised by one L-BFGS, so every pass over the N x d features serves all P problems (one (N, d) @
    (d, P*C) product instead of P skinny ones): a lambda sweep or a k-fold cross-validation costs about one
    fit, since on CPU these products are bound by reading the features, not by arithmetic."""
    x = x.to(device, torch.float32)
    y = y.to(device)
    mean, std = stats if stats is not None else (x.mean(0), feature_std(x))
    mean, std = mean.to(device, torch.float32), std.to(device, torch.float32)
    xs = (x - mean) / std
    (n, d), P, C = x.shape, len(lams), num_classes
    if weights is None:
        weights = torch.ones(P, n)
    m = (weights / weights.sum(1, keepdim=True)).T.to(device, torch.float32)  # (N, P): each problem's mean
    lam = torch.tensor(lams, dtype=torch.float32, device=device).repeat_interleave(C)  # (P*C,)
    w = torch.zeros(d, P * C, dtype=torch.float32, device=device)
    b = torch.zeros(P * C, dtype=torch.float32, device=device)
    if init is not None:
        w.copy_(init[0].to(device).repeat(1, P))
        b.copy_(init[1].to(device).repeat(P))
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )
    onehot = F.one_hot(y, C).to(torch.float32)[:, None, :]  # (N, 1, C)

    def closure() -> torch.Tensor:
        # the gradient by hand: autograd would form xs.T @ g through a transposed view, much slower on CPU
        # than (g.T @ xs).T, and these products over the N x d features are the whole cost of a probe
        logits = (xs @ w + b).view(n, P, C)
        logp = torch.log_softmax(logits, -1)
        loss = -(m * (logp * onehot).sum(-1)).sum() + 0.5 * (lam * (w * w).sum(0)).sum()
        g = ((logp.exp() - onehot) * m[..., None]).view(n, P * C)  # (N, P*C)
        w.grad = (g.T @ xs).T.contiguous() + lam * w
        b.grad = g.sum(0)
        return loss

    opt.step(closure)
    return [
        LinearProbe(mean, std, w[:, p * C : (p + 1) * C].clone(), b[p * C : (p + 1) * C].clone(), lams[p])
        for p in range(P)
    ]


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
    select_rows: int | None = 20000,
) -> dict:
    """Choose lambda on the validation rows, refit on all training rows with it (warm-started from the
    chosen solution), and score the test rows, which choose nothing. The lambda sweep fits on at most
    `select_rows` training rows (a seeded, class-stratified share): it ranks the strengths about as well as
    all rows would, at a fraction of the cost for wide (grid-pooled) features. Returns accuracies, the
    chosen lambda and the fitted probe."""
    tr = np.arange(len(ytr))
    if select_rows and len(tr) > select_rows:
        keep, _ = split_validation(ytr.numpy(), 1 - select_rows / len(tr), seed + 1)
        tr = tr[keep]
    stats = (xtr[tr].double().mean(0), feature_std(xtr[tr].double()))
    probes = fit_logistic_many(
        xtr[tr], ytr[tr], num_classes, list(lambdas), stats=stats, max_iter=300, device=device
    )
    val_acc = {p.lam: p.accuracy(xva, yva) for p in probes}
    best = max(lambdas, key=lambda k: (val_acc[k], k))  # ties go to the stronger regularisation
    chosen = probes[list(lambdas).index(best)]
    probe = fit_logistic(xtr, ytr, num_classes, best, init=(chosen.weight, chosen.bias), device=device)
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
    lams = [lam for lam in LAMBDAS for _ in range(folds)]
    weights = torch.stack([torch.from_numpy(fold != f).float() for _ in LAMBDAS for f in range(folds)])
    probes = fit_logistic_many(x, y, num_classes, lams, weights, max_iter=200, device=device)
    scores = {}
    for j, lam in enumerate(LAMBDAS):
        accs = []
        for f in range(folds):
            va = np.flatnonzero(fold == f)
            accs.append(probes[j * folds + f].accuracy(x[va], y[va]))
        scores[lam] = float(np.mean(accs))
    best = max(scores, key=lambda k: (scores[k], k))
    return best, scores[best]


# ---------------------------------------------------------------------------------------------- shared
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
    if data.num_classes < 2 or (data.labels("train") < 0).all():
        raise IgptError(f"{data_dir} has no labels, so there is nothing to probe; prepare a labelled dataset")
    model = r.load_model(checkpoint)
    cfg = model.config
    if data.clusters != cfg.vocab_size or data.seq_len != cfg.n_positions:
        raise IgptError(
            f"{data_dir} ({data.clusters} clusters, {data.seq_len} tokens) does not match the model "
            f"({cfg.vocab_size}, {cfg.n_positions})"
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


def raw_pixels(data: PreparedData, split: str, rows: np.ndarray) -> torch.Tensor:
    """Decoded palette intensities of the rows, flattened: the raw-pixel baseline's features."""
    out = []
    for s in range(0, len(rows), 8192):
        out.append(
            torch.from_numpy(data.images(split, rows[s : s + 8192]).reshape(len(rows[s : s + 8192]), -1))
        )
    return torch.cat(out).float()


class FeatureCache:
    """Pooled features of the chosen layers, keyed by split: a request for rows already computed (a low-data
    subset after the full probe, say) is answered by indexing instead of another forward pass."""

    def __init__(self, model: IGPT, data: PreparedData, layers: list[int], quiet: bool = False, **kw: Any):
        self.model, self.data, self.layers, self.kw, self.quiet = model, data, layers, kw, quiet
        self.store: dict[str, tuple[np.ndarray, dict[int, torch.Tensor], dict[int, torch.Tensor]]] = {}

    def __call__(
        self, split: str, rows: np.ndarray, label: str, mean: bool = False
    ) -> dict[int, torch.Tensor]:
        """Features of the sorted `rows` of `split`; with `mean`, the paper's mean-pooled ones (computed in
        the same pass when the cache's pooling is another)."""
        if split in self.store:
            have, feats, means = self.store[split]
            pos = np.minimum(np.searchsorted(have, rows), len(have) - 1)
            if len(have) and (have[pos] == rows).all():
                chosen = means if mean and means else feats
                return {i: f[torch.from_numpy(pos)] for i, f in chosen.items()}
        means: dict[int, torch.Tensor] = {}
        feats = extract_features(
            self.model,
            self.data.tokens(split)[rows],
            self.layers,
            progress=None if self.quiet else label,
            mean_out=means if self.kw.get("pool", "mean") != "mean" else None,
            **self.kw,
        )
        self.store[split] = (rows, feats, means)
        return means if mean and means else feats


def parse_layers(text: str, n_layer: int, run: str) -> list[int]:
    if text == "all":
        return list(range(n_layer + 1))
    if text == "best":
        p = Path(run) / "probe.json"
        if not p.is_file():
            raise IgptError(
                "--layers best needs an earlier full probe (probe.json); run `igpt probe RUN` first"
            )
        try:
            best = json.loads(p.read_text()).get("best_layer")
        except (ValueError, OSError, AttributeError):  # damaged JSON, bytes that are not UTF-8, not an object
            best = None
        if isinstance(best, bool) or not isinstance(best, int) or not 0 <= best <= n_layer:
            raise IgptError(
                f"{p} does not name a best layer of this model (damaged, or from another run); run "
                "`igpt probe RUN` again"
            )
        return [best]
    try:
        layers = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise IgptError(f"--layers must be all, best or comma-separated integers, got '{text}'") from None
    bad = [i for i in layers if not 0 <= i <= n_layer]
    if bad or not layers:
        raise IgptError(f"layers {bad or text} are out of range: this model has layers 0..{n_layer}")
    return layers


def save_figure(fig, path: Path) -> None:
    """Lay out, write atomically and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def plot_layers(
    path: Path,
    layers: dict[str, float],
    raw: float,
    title: str,
    extra: dict[str, float],
    pool: str = "mean",
    paper: dict[str, float] | None = None,
) -> None:
    """Accuracy against layer (with `paper`, the paper's mean-pooled probe beside it), with the raw-pixel
    baseline (and any named reference) as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs = [int(k) for k in layers]
    ax.plot(xs, [layers[k] for k in layers], "o-", label=f"linear probe, {pool} pooling")
    if paper and pool != "mean":
        ax.plot(xs, [paper[k] for k in layers], "s--", color="tab:orange", label="the paper's: mean pooling")
    ax.axhline(raw, color="tab:red", ls="--", label=f"raw pixels ({raw:.3f})")
    for (name, v), c in zip(extra.items(), ("tab:green", "tab:purple", "tab:gray"), strict=False):
        ax.axhline(v, color=c, ls=":", label=f"{name} ({v:.3f})")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- modes
def _paper_probe(
    cfg: ProbeConfig,
    cache: FeatureCache,
    layers: list[int],
    rows: tuple[np.ndarray, np.ndarray, np.ndarray],
    labels: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    C: int,
    main: dict[str, Any],
    best: int,
) -> dict[str, Any]:
    """The paper's protocol beside whatever pooling was asked for: a linear probe of each layer's normed
    states averaged over positions, its L2 strength and best layer chosen on validation. Under mean pooling
    it is the main probe itself; otherwise its features come from the same forward pass."""
    out: dict[str, Any] = {"pool": "mean", "head": "linear"}
    if cfg.pool == "mean":
        out.update(layers=main["layers"], val_accuracy=main["val_accuracy"], **{"lambda": main["lambda"]})
        out.update(best_layer=best, best_accuracy=main["layers"][str(best)])
        return out
    tr, va, te = rows
    ytr, yva, yte = labels
    ftr, fva, fte = (
        cache("train", tr, "", mean=True),
        cache("val", va, "", mean=True),
        cache("test", te, "", mean=True),
    )
    acc, val, lam = {}, {}, {}
    for i in layers:
        r = probe_with_validation(ftr[i], ytr, fva[i], yva, fte[i], yte, C, cfg.seed, device=cfg.device)
        acc[str(i)], val[str(i)], lam[str(i)] = r["test_accuracy"], r["val_accuracy"], r["lambda"]
    pb = max(layers, key=lambda i: (val[str(i)], -i))
    out.update(layers=acc, val_accuracy=val, **{"lambda": lam}, best_layer=pb, best_accuracy=acc[str(pb)])
    return out


def _feature_settings(cfg: ProbeConfig, data: PreparedData) -> dict[str, Any]:
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


def full_probe(
    cfg: ProbeConfig,
    model: IGPT,
    data: PreparedData,
    layers: list[int],
    cache: FeatureCache | None = None,
    raw_cache: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The standard protocol: all training rows, lambda chosen on a validation split, test accuracy."""
    C = data.num_classes
    tr = labelled_rows(data.labels("train"), cfg.train_limit)
    va = labelled_rows(data.labels("val"), None)
    te = labelled_rows(data.labels("test"), cfg.test_limit)
    if not len(va):
        raise IgptError(f"{data.dir} has no labelled validation images to choose on")
    check_trainable(data.labels("train")[tr], f"--train-limit {cfg.train_limit}")
    ytr, yte = torch.from_numpy(data.labels("train")[tr]), torch.from_numpy(data.labels("test")[te])
    yva = torch.from_numpy(data.labels("val")[va])
    t0 = time.perf_counter()
    kw = _feature_settings(cfg, data)
    cache = cache or FeatureCache(model, data, layers, quiet=not cfg.progress, **kw)
    ftr, fte = cache("train", tr, "train features"), cache("test", te, "test features")
    fva = cache("val", va, "validation features")
    t_feat = time.perf_counter() - t0
    res: dict[str, Any] = {"layers": {}, "val_accuracy": {}, "lambda": {}}
    for i in layers:
        r = probe_with_validation(ftr[i], ytr, fva[i], yva, fte[i], yte, C, cfg.seed, device=cfg.device)
        res["layers"][str(i)], res["val_accuracy"][str(i)], res["lambda"][str(i)] = (
            r["test_accuracy"],
            r["val_accuracy"],
            r["lambda"],
        )
        if cfg.progress:
            print(
                f"  layer {i}: test {r['test_accuracy']:.4f} "
                f"(val {r['val_accuracy']:.4f}, lambda {r['lambda']:g})",
                file=sys.stderr,
            )
    best = max(layers, key=lambda i: (res["val_accuracy"][str(i)], -i))  # chosen on validation, not test
    res["paper_probe"] = _paper_probe(cfg, cache, layers, (tr, va, te), (ytr, yva, yte), C, res, best)
    t_fit = time.perf_counter() - t0 - t_feat
    raw = (raw_cache or {}).get("raw") or probe_with_validation(
        raw_pixels(data, "train", tr),
        ytr,
        raw_pixels(data, "val", va),
        yva,
        raw_pixels(data, "test", te),
        yte,
        C,
        cfg.seed,
        device=cfg.device,
    )
    if raw_cache is not None:
        raw_cache["raw"] = raw
    res.update(
        best_layer=best,
        best_accuracy=res["layers"][str(best)],
        raw_pixel_accuracy=raw["test_accuracy"],
        raw_pixel_val_accuracy=raw["val_accuracy"],
        n_train=len(tr),
        n_val=len(va),
        n_test=len(te),
        feature_dim=int(ftr[layers[0]].shape[1]),
        pool=cfg.pool,
        head="linear",
        classifier="multinomial logistic regression, torch L-BFGS, L2 chosen on the validation split from "
        f"{list(LAMBDAS)} (the sweep fitted on at most 20,000 training rows), then refitted on all",
        seconds={"features": round(t_feat, 2), "probes": round(t_fit, 2)},
    )
    if cfg.concat:
        cat = parse_layers(cfg.concat, model.config.n_layer, cfg.run)
        missing = [i for i in cat if i not in ftr]
        if missing:
            raise IgptError(f"--concat layers {missing} must also be among --layers")
        r = probe_with_validation(
            torch.cat([ftr[i] for i in cat], 1),
            ytr,
            torch.cat([fva[i] for i in cat], 1),
            yva,
            torch.cat([fte[i] for i in cat], 1),
            yte,
            C,
            cfg.seed,
            device=cfg.device,
        )
        res["concat"] = {
            "layers": cat,
            "test_accuracy": r["test_accuracy"],
            "val_accuracy": r["val_accuracy"],
        }
    if cfg.mask_ensemble:
        lambdas = {i: res["lambda"][str(i)] for i in layers}
        res["mask_ensemble"] = mask_ensemble(cfg, model, data, tr, te, ytr, yte, lambdas, kw)
    if cfg.head == "attentive":
        from .attentive import attentive_probe

        att_layers = (
            [best]
            if cfg.attentive_layers == "best"
            else parse_layers(cfg.attentive_layers, model.config.n_layer, cfg.run)
        )
        splits = {
            "train": (data.tokens("train")[tr], ytr),
            "val": (data.tokens("val")[va], yva),
            "test": (data.tokens("test")[te], yte),
        }
        att = attentive_probe(
            model,
            splits,
            att_layers,
            C,
            epochs=cfg.attentive_epochs,
            batch_size=cfg.batch_size,
            device=cfg.device,
            compile=cfg.compile,
            precision=cfg.precision,
            seed=cfg.seed,
            progress=cfg.progress,
        )
        res["attentive"] = att
        res.update(
            head="attentive", best_accuracy=att["test_accuracy"], linear_best_accuracy=res["best_accuracy"]
        )
    res["chosen"] = _chosen(res)
    return res


def _chosen(res: dict[str, Any]) -> dict[str, Any]:
    """Of the probes run (the linear probe of each layer, concatenated layers, the attentive head), the one
    with the best validation accuracy, and its test accuracy: the honest answer to "which probe is best"."""
    pp = res.get("paper_probe") or {}
    cands = [
        (f"linear, {res['pool']} pooling, layer {k}", v, res["layers"][k])
        for k, v in res["val_accuracy"].items()
    ]
    cands += [
        (f"linear, mean pooling, layer {k}", v, pp["layers"][k])
        for k, v in (pp.get("val_accuracy") or {}).items()
    ]
    if "concat" in res:
        c = res["concat"]
        cands.append(
            (
                f"linear, {res['pool']} pooling, layers {c['layers']} concatenated",
                c["val_accuracy"],
                c["test_accuracy"],
            )
        )
    if "attentive" in res:
        a = res["attentive"]
        cands.append((f"attentive, layer(s) {a['layers']}", a["val_accuracy"], a["test_accuracy"]))
    probe, val, test = max(cands, key=lambda c: c[1])
    return {"probe": probe, "val_accuracy": val, "test_accuracy": test}


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
    train_cfg = Run.open(cfg.run).train_config if (Path(cfg.run) / "run.json").is_file() else None
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
            p = fit_logistic(ftr[i], ytr, data.num_classes, lambdas[i], device=kw["device"])
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
    kw = _feature_settings(cfg, data)
    cache = cache or FeatureCache(model, data, layers, quiet=not cfg.progress, **kw)
    # the pooling is chosen per regime, on each subset's own cross-validation: the asked-for pooling and the
    # paper's mean (computed in the same pass); wide grid features can overfit a few labels per class
    pools = [cfg.pool] + (["mean"] if cfg.pool != "mean" else [])
    ftr = {p: cache("train", rows, "train features", mean=p != cfg.pool) for p in pools}
    fte = {p: cache("test", te, "test features", mean=p != cfg.pool) for p in pools}
    rtr, rte = raw_pixels(data, "train", rows), raw_pixels(data, "test", te)
    pos = {r: k for k, r in enumerate(rows)}
    folds = min(5, N)
    if folds < 2:  # one label per class: no cross-validation; the choice is made on the validation split
        va = labelled_rows(data.labels("val"), None)
        yva = torch.from_numpy(data.labels("val")[va])
        fva = {p: cache("val", va, "validation features", mean=p != cfg.pool) for p in pools}
    keys = [(p, i) for p in pools for i in layers]
    acc: dict[tuple[str, int], list[float]] = {k: [] for k in keys}
    cv: dict[tuple[str, int], list[float]] = {k: [] for k in keys}
    raw = []
    own_choice = []  # each subset's test accuracy at the pooling and layer its own CV chose
    for s, sub in enumerate(subsets):
        k = np.array([pos[r] for r in sub])
        y = torch.from_numpy(ytr_all[sub])
        for key in [*keys, "raw"]:
            xtr, xte = (rtr[k], rte) if key == "raw" else (ftr[key[0]][key[1]][k], fte[key[0]][key[1]])
            if folds >= 2:
                lam, score = cv_lambda(xtr, y, C, folds, cfg.seed + s, cfg.device)
            else:
                lam, score = 1e-2, 0.0
            probe = fit_logistic(xtr, y, C, lam, device=cfg.device)
            if folds < 2 and key != "raw":
                score = probe.accuracy(fva[key[0]][key[1]], yva)
            a = probe.accuracy(xte, yte)
            if key == "raw":
                raw.append(a)
            else:
                acc[key].append(a)
                cv[key].append(score)
        pick = max(keys, key=lambda q: (cv[q][-1], q[0] == "mean", -q[1]))
        own_choice.append(acc[pick][-1])
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
        "raw_pixel_accuracy": float(np.mean(raw)),
        "raw_pixel_std": float(np.std(raw)),
        "raw_pixel_accuracies": raw,
        "n_test": len(te),
        "pool": cfg.pool,
        "pools_compared": pools,
        "head": "linear",
        "classifier": "multinomial logistic regression, torch L-BFGS, "
        + (
            f"L2 by {folds}-fold CV within each subset; pooling and layer chosen by that CV: "
            "best_accuracy at the choice with the best CV over all subsets, mean_accuracy/std_accuracy with "
            "each subset's own choice"
            if folds >= 2
            else "L2 1e-2 (one label per class: no CV), pooling and layer chosen on the validation split"
        ),
    }


def checkpoints_probe(cfg: ProbeConfig, data: PreparedData, layers: list[int]) -> dict[str, Any]:
    """Figure 3: every kept checkpoint probed (all chosen layers, its best on validation) against val_nll."""
    run = Run.open(cfg.run)
    ckpts = run.checkpoints()
    if not ckpts:
        raise IgptError(f"{cfg.run} has no checkpoint")
    rows: list[dict[str, Any]] = []
    raw_cache: dict[str, Any] = {}  # the raw-pixel baseline does not depend on the checkpoint: fitted once
    for path in ckpts:
        try:
            state = json.loads((path / "state.json").read_text())
        except (ValueError, OSError):
            state = None
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            print(f"igpt: warning: checkpoint {path.name} is damaged (state.json); skipped", file=sys.stderr)
            continue
        if not isinstance(state.get("val_nll"), int | float):
            continue
        try:
            model = run.load_model(path.name)
        except IgptError as e:
            print(f"igpt: warning: {e}; skipped", file=sys.stderr)
            continue
        print(f"checkpoint {path.name} (val_nll {state['val_nll']:.4f})", file=sys.stderr)
        r = full_probe(cfg, model, data, layers, raw_cache=raw_cache)
        rows.append(
            {
                "checkpoint": path.name,
                "step": state["step"],
                "val_nll": state["val_nll"],
                "best_layer": r["best_layer"],
                "best_accuracy": r["best_accuracy"],
                "layers": r["layers"],
            }
        )
    if len(rows) < 2:
        raise IgptError(
            "loss against probe needs at least two kept checkpoints with val_nll; pretrain with "
            "--keep-every N"
        )
    return {"checkpoints": rows, "raw_pixel_accuracy": r["raw_pixel_accuracy"]}


def plot_checkpoints(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs, ys = [r["val_nll"] for r in rows], [r["best_accuracy"] for r in rows]
    ax.plot(xs, ys, "o-")
    for r in rows:
        ax.annotate(
            str(r["step"]),
            (r["val_nll"], r["best_accuracy"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("validation NLL (nats per token)")
    ax.set_ylabel("best-layer probe accuracy")
    ax.set_title("Better generative loss, better features (labels: step)")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def probe_and_save(
    cfg: ProbeConfig,
    model: IGPT,
    data: PreparedData,
    layers: list[int],
    cache: FeatureCache | None = None,
    baselines: dict[str, float] | None = None,
    checkpoint_used: str | None = None,
) -> dict[str, Any]:
    """One full or low-data probe of `cfg.run`: probe_full.json or probe_N_per_class.json, probe.json (the
    latest probe) and the matching plots; `baselines` are extra named lines for the plot."""
    run_dir = Path(cfg.run)
    t0 = time.perf_counter()
    if cfg.labels_per_class:
        res = low_data_probe(cfg, model, data, layers, cache)
        name = f"probe_{cfg.labels_per_class}_per_class"
        title = f"{cfg.labels_per_class} labels per class, mean of {cfg.seeds} subsets"
    else:
        res = full_probe(cfg, model, data, layers, cache)
        name = "probe_full"
        title = f"linear probe, {res['n_train']:,} training images"
    res.update(
        objective=model.config.objective,
        checkpoint=checkpoint_used or cfg.checkpoint or "latest",
        seconds_total=round(time.perf_counter() - t0, 2),
    )
    write_json_atomic(run_dir / f"{name}.json", res)
    write_json_atomic(run_dir / "probe.json", res)
    paper = (res.get("paper_probe") or {}).get("layers")
    plot_layers(
        run_dir / "probe.png",
        res["layers"],
        res["raw_pixel_accuracy"],
        title,
        baselines or {},
        cfg.pool,
        paper,
    )
    with atomic_file(run_dir / f"{name}.png") as tmp:
        tmp.write_bytes((run_dir / "probe.png").read_bytes())
    return res


# ---------------------------------------------------------------------------------------------- the stage
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
    checkpoints: str = "latest"
    """latest, or all: every kept checkpoint probed at its best layer, against its val_nll."""
    checkpoint: str | None = None
    """Probe this checkpoint instead of the latest."""
    pool: str = "mean"
    """mean over positions (the paper's), or means over a coarse grid: grid (2x2), grid3, grid4."""
    concat: str | None = None
    """Also probe these layers' features concatenated, e.g. "2,3,4"."""
    head: str = "linear"
    """linear (the paper's), or attentive: learned queries cross-attending over token states, trained beside
    the linear probes (see `igpt.attentive`); the reported best is then the attentive head's."""
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
    precision: str = "fp32"
    """The feature pass's precision: fp32, bf16 autocast, or auto (bf16 where the hardware has it: a CUDA
    card with bf16, a CPU with AMX tiles)."""
    progress: bool = True
    """Progress bars and per-layer lines on stderr."""

    def __post_init__(self) -> None:
        if self.precision == "auto":
            self.precision = auto_precision(self.device)[0]
        if self.precision not in ("fp32", "bf16"):
            raise IgptError(f"--precision must be fp32, bf16 or auto, got '{self.precision}'")
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
        if self.seeds < 1:
            raise IgptError("--seeds must be at least 1")
        if self.head not in HEADS:
            raise IgptError(f"--head must be one of {', '.join(HEADS)}, got '{self.head}'")
        if self.head == "attentive" and (self.labels_per_class or self.checkpoints == "all"):
            raise IgptError(
                "--head attentive runs with the full probe; --labels-per-class and --checkpoints all use "
                "linear heads"
            )
        if self.attentive_epochs < 1:
            raise IgptError(f"--attentive-epochs must be at least 1, got {self.attentive_epochs}")
        check_seed(self.seed)
        if self.pool not in POOLS:
            raise IgptError(f"--pool must be one of {', '.join(POOLS)}, got '{self.pool}'")
        if self.checkpoints not in ("latest", "all"):
            raise IgptError(f"--checkpoints must be latest or all, got '{self.checkpoints}'")
        check_device(self.device)


def probe(run: str | Path, **settings: Any) -> dict[str, Any]:
    """Probe a run's features and return what is written to RUN/probe.json (or, with `checkpoints="all"`,
    to probe_checkpoints.json). Keyword arguments are `ProbeConfig`'s fields, named as the command's flags:
    `igpt.probe("runs/r", pool="grid3", labels_per_class=10, seeds=3)`."""
    known = set(ProbeConfig.__dataclass_fields__) - {"run"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"probe() got unknown settings {unknown}; it takes {sorted(known)}")
    cfg = ProbeConfig(run=str(run), **settings)
    info, model, data = open_labelled_run(cfg.run, cfg.data, cfg.checkpoint)
    check_pool(cfg.pool, data.resolution)
    layers = parse_layers(cfg.layers, model.config.n_layer, cfg.run)
    run_dir = Path(cfg.run)
    if cfg.checkpoints == "all":
        res = checkpoints_probe(cfg, data, layers)
        write_json_atomic(run_dir / "probe_checkpoints.json", res)
        plot_checkpoints(run_dir / "probe_checkpoints.png", res["checkpoints"])
        return res
    return probe_and_save(cfg, model, data, layers, checkpoint_used=info.loaded_checkpoint)
