"""`igpt probe RUN`: linear probes on every layer's features beside a raw-pixel baseline; low-data probes
(`--labels-per-class N --seeds K`); BERT mask ensembles; and loss against probe accuracy across checkpoints
(`--checkpoints all`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import list_checkpoints, load_run, read_run_json
from .data import PreparedData, write_json_atomic
from .errors import IgptError
from .model import IGPT
from .probe import (
    LAMBDAS,
    POOLS,
    balanced_subset,
    cv_lambda,
    extract_features,
    fit_logistic,
    probe_with_validation,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="linear probes of every layer, low-data probes, loss against probe")
    p.add_argument("run", help="run directory")
    p.add_argument(
        "--layers", default="all", help="all, best (from an earlier probe) or i,j,... (default all)"
    )
    p.add_argument("--labels-per-class", type=int, help="low-data mode: N labelled images per class")
    p.add_argument(
        "--seeds", type=int, default=5, help="low-data mode: random subsets to average (default 5)"
    )
    p.add_argument("--mask-ensemble", type=int, default=0, help="BERT runs: vote over M random masks")
    p.add_argument("--train-limit", type=int, help="use only the first N training images")
    p.add_argument("--test-limit", type=int, help="use only the first N test images")
    p.add_argument("--checkpoints", choices=["latest", "all"], default="latest",
                   help="all: probe every kept checkpoint at its best layer, against its val_nll")  # fmt: skip
    p.add_argument("--checkpoint", help="probe this checkpoint instead of the latest")
    p.add_argument("--pool", choices=POOLS, default="mean",
                   help="mean over positions (the paper's), or means over a coarse grid: grid (2x2, 4x wider), "
                   "grid3 (3x3), grid4 (4x4)")  # fmt: skip
    p.add_argument("--concat", help="also probe these layers' features concatenated, e.g. 2,3,4")
    p.add_argument("--data", help="prepared directory to probe on (default: the run's own)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation share of the training split")
    p.add_argument("--batch-size", type=int, default=128, help="images per feature batch")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the feature pass (1.26-1.45x faster on a 2-core CPU; eager if compiling fails)")  # fmt: skip
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------- shared
def open_labelled_run(
    run: str, data_dir: str | None, checkpoint: str | None = None
) -> tuple[dict, IGPT, PreparedData]:
    """The run's record, its model and its (labelled) prepared data; clear errors for what is missing. Says so
    when the run is unfinished, since its latest checkpoint is then what gets evaluated."""
    info = read_run_json(run)
    data_dir = data_dir or (info.get("data") or {}).get("dir")
    if not data_dir:
        raise IgptError(f"{run} records no data directory (a converted model?); pass --data DIR")
    data = PreparedData(data_dir)
    if data.num_classes < 2 or (data.labels("train") < 0).all():
        raise IgptError(f"{data_dir} has no labels, so there is nothing to probe; prepare a labelled dataset")
    model = load_run(run, checkpoint)
    cfg = model.config
    if data.clusters != cfg.vocab_size or data.seq_len != cfg.n_positions:
        raise IgptError(f"{data_dir} ({data.clusters} clusters, {data.seq_len} tokens) does not match the model "
                        f"({cfg.vocab_size}, {cfg.n_positions})")  # fmt: skip
    summary = Path(run) / "summary.json"
    if info.get("train") and (
        not summary.is_file() or not json.loads(summary.read_text()).get("finished", False)
    ):
        last = list_checkpoints(run)[-1].name if list_checkpoints(run) else "none"
        print(
            f"igpt: note: the run is unfinished; evaluating its latest checkpoint ({last})", file=sys.stderr
        )
    return info, model, data


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
        self.store: dict[str, tuple[np.ndarray, dict[int, torch.Tensor]]] = {}

    def __call__(self, split: str, rows: np.ndarray, label: str) -> dict[int, torch.Tensor]:
        """Features of the sorted `rows` of `split`."""
        if split in self.store:
            have, feats = self.store[split]
            pos = np.minimum(np.searchsorted(have, rows), len(have) - 1)
            if len(have) and (have[pos] == rows).all():
                return {i: f[torch.from_numpy(pos)] for i, f in feats.items()}
        feats = extract_features(
            self.model,
            self.data.tokens(split)[rows],
            self.layers,
            progress=None if self.quiet else label,
            **self.kw,
        )
        self.store[split] = (rows, feats)
        return feats


def parse_layers(text: str, n_layer: int, run: str) -> list[int]:
    if text == "all":
        return list(range(n_layer + 1))
    if text == "best":
        p = Path(run) / "probe.json"
        if not p.is_file():
            raise IgptError(
                "--layers best needs an earlier full probe (probe.json); run `igpt probe RUN` first"
            )
        return [int(json.loads(p.read_text())["best_layer"])]
    try:
        layers = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise IgptError(f"--layers must be all, best or comma-separated integers, got '{text}'") from None
    bad = [i for i in layers if not 0 <= i <= n_layer]
    if bad or not layers:
        raise IgptError(f"layers {bad or text} are out of range: this model has layers 0..{n_layer}")
    return layers


def save_figure(fig, path: Path) -> None:
    """Lay out, write to a temporary file, rename into place and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def plot_layers(
    path: Path, layers: dict[str, float], raw: float, title: str, extra: dict[str, float]
) -> None:
    """Accuracy against layer, with the raw-pixel baseline (and any named reference) as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs = [int(k) for k in layers]
    ax.plot(xs, [layers[k] for k in layers], "o-", label="linear probe")
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
def full_probe(args, model: IGPT, data: PreparedData, layers: list[int], device: str,
               cache: FeatureCache | None = None) -> dict[str, Any]:  # fmt: skip
    """The standard protocol: all training rows, lambda chosen on a validation split, test accuracy."""
    C = data.num_classes
    tr = labelled_rows(data.labels("train"), args.train_limit)
    te = labelled_rows(data.labels("test"), args.test_limit)
    ytr, yte = torch.from_numpy(data.labels("train")[tr]), torch.from_numpy(data.labels("test")[te])
    t0 = time.perf_counter()
    kw = dict(batch_size=args.batch_size, pool=args.pool, resolution=data.resolution, device=device,
              compile=args.compile)  # fmt: skip
    cache = cache or FeatureCache(model, data, layers, **kw)
    ftr, fte = cache("train", tr, "train features"), cache("test", te, "test features")
    t_feat = time.perf_counter() - t0
    res: dict[str, Any] = {"layers": {}, "val_accuracy": {}, "lambda": {}}
    for i in layers:
        r = probe_with_validation(ftr[i], ytr, fte[i], yte, C, args.val_fraction, args.seed, device=device)
        res["layers"][str(i)], res["val_accuracy"][str(i)], res["lambda"][str(i)] = (
            r["test_accuracy"], r["val_accuracy"], r["lambda"])  # fmt: skip
        print(f"  layer {i}: test {r['test_accuracy']:.4f} (val {r['val_accuracy']:.4f}, lambda {r['lambda']:g})",
              file=sys.stderr)  # fmt: skip
    t_fit = time.perf_counter() - t0 - t_feat
    best = max(layers, key=lambda i: (res["val_accuracy"][str(i)], -i))  # chosen on validation, not test
    raw = probe_with_validation(raw_pixels(data, "train", tr), ytr, raw_pixels(data, "test", te), yte, C,
                                args.val_fraction, args.seed, device=device)  # fmt: skip
    res.update(best_layer=best, best_accuracy=res["layers"][str(best)], raw_pixel_accuracy=raw["test_accuracy"],
               n_train=len(tr), n_test=len(te), feature_dim=int(ftr[layers[0]].shape[1]), pool=args.pool,
               classifier="multinomial logistic regression, torch L-BFGS, L2 chosen on a "
               f"{args.val_fraction:.0%} validation split from {list(LAMBDAS)} (the sweep fitted on at most "
               "20,000 training rows), then refitted on all",
               seconds={"features": round(t_feat, 2), "probes": round(t_fit, 2)})  # fmt: skip
    if args.concat:
        cat = parse_layers(args.concat, model.config.n_layer, args.run)
        missing = [i for i in cat if i not in ftr]
        if missing:
            raise IgptError(f"--concat layers {missing} must also be among --layers")
        r = probe_with_validation(torch.cat([ftr[i] for i in cat], 1), ytr, torch.cat([fte[i] for i in cat], 1), yte,
                                  C, args.val_fraction, args.seed, device=device)  # fmt: skip
        res["concat"] = {
            "layers": cat,
            "test_accuracy": r["test_accuracy"],
            "val_accuracy": r["val_accuracy"],
        }
    if args.mask_ensemble:
        lambdas = {i: res["lambda"][str(i)] for i in layers}
        res["mask_ensemble"] = mask_ensemble(args, model, data, tr, te, ytr, yte, lambdas, kw)
    return res


def mask_ensemble(args, model: IGPT, data: PreparedData, tr: np.ndarray, te: np.ndarray, ytr: torch.Tensor,
                  yte: torch.Tensor, lambdas: dict[int, float], kw: dict) -> dict[str, Any]:  # fmt: skip
    """BERT, Figure 4's protocol: the evaluation is repeated M times, each with its own random 15% mask on the
    training and test images (the input BERT saw in pretraining); the test prediction is the modal class over
    the M probes. Each layer keeps the L2 strength chosen on its unmasked validation split."""
    if model.causal:
        raise IgptError("--mask-ensemble applies to BERT runs only")
    layers = list(lambdas)
    votes: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    single: dict[int, list[float]] = {i: [] for i in layers}
    for m in range(args.mask_ensemble):
        label = f"mask {m + 1}/{args.mask_ensemble}"
        ftr = extract_features(model, data.tokens("train")[tr], layers, mask_ratio=0.15, seed=1000 + m,
                               progress=label + " train", **kw)  # fmt: skip
        fte = extract_features(model, data.tokens("test")[te], layers, mask_ratio=0.15, seed=2000 + m,
                               progress=label + " test", **kw)  # fmt: skip
        for i in layers:
            p = fit_logistic(ftr[i], ytr, data.num_classes, lambdas[i], device=kw["device"])
            pred = p.predict(fte[i]).cpu()
            votes[i].append(pred)
            single[i].append(float((pred == yte).float().mean()))
    out = {}
    for i in layers:
        mode = torch.mode(torch.stack(votes[i]), dim=0).values
        out[str(i)] = float((mode == yte).float().mean())
    return {"masks": args.mask_ensemble, "layers": out,
            "single_mask_mean": {str(i): float(np.mean(v)) for i, v in single.items()}}  # fmt: skip


def low_data_probe(args, model: IGPT, data: PreparedData, layers: list[int], device: str,
                   cache: FeatureCache | None = None) -> dict[str, Any]:  # fmt: skip
    """Table 4's protocol: K seeded class-balanced subsets of N labels per class; lambda by k-fold
    cross-validation within each subset; mean and std of test accuracy, beside raw pixels on the same subsets."""
    N, C = args.labels_per_class, data.num_classes
    if N < 1 or args.seeds < 1:
        raise IgptError("--labels-per-class and --seeds must be at least 1")
    ytr_all = data.labels("train")
    counts = np.bincount(ytr_all[ytr_all >= 0], minlength=C)
    if N > counts.min():
        raise IgptError(f"--labels-per-class {N} exceeds the {counts.min()} images of the rarest class")
    subsets = [balanced_subset(ytr_all, N, args.seed + s) for s in range(args.seeds)]
    rows = np.unique(np.concatenate(subsets))
    te = labelled_rows(data.labels("test"), args.test_limit)
    yte = torch.from_numpy(data.labels("test")[te])
    kw = dict(batch_size=args.batch_size, pool=args.pool, resolution=data.resolution, device=device,
              compile=args.compile)  # fmt: skip
    cache = cache or FeatureCache(model, data, layers, **kw)
    ftr, fte = cache("train", rows, "train features"), cache("test", te, "test features")
    rtr, rte = raw_pixels(data, "train", rows), raw_pixels(data, "test", te)
    pos = {r: k for k, r in enumerate(rows)}
    folds = min(5, N)
    acc = {str(i): [] for i in layers}
    cv = {str(i): [] for i in layers}
    raw = []
    for s, sub in enumerate(subsets):
        k = np.array([pos[r] for r in sub])
        y = torch.from_numpy(ytr_all[sub])
        for name, xtr, xte in [*((str(i), ftr[i][k], fte[i]) for i in layers), ("raw", rtr[k], rte)]:
            lam, score = cv_lambda(xtr, y, C, folds, args.seed + s, device) if folds >= 2 else (1e-2, 0.0)
            a = fit_logistic(xtr, y, C, lam, device=device).accuracy(xte, yte)
            if name == "raw":
                raw.append(a)
            else:
                acc[name].append(a)
                cv[name].append(score)
    best = max(layers, key=lambda i: (np.mean(cv[str(i)]), -i))
    return {
        "labels_per_class": N,
        "seeds": args.seeds,
        "layers": {k: float(np.mean(v)) for k, v in acc.items()},
        "layers_std": {k: float(np.std(v)) for k, v in acc.items()},
        "best_layer": best,
        "best_accuracy": float(np.mean(acc[str(best)])),
        "mean_accuracy": float(np.mean(acc[str(best)])),
        "std_accuracy": float(np.std(acc[str(best)])),
        "raw_pixel_accuracy": float(np.mean(raw)),
        "raw_pixel_std": float(np.std(raw)),
        "n_test": len(te),
        "pool": args.pool,
        "classifier": f"multinomial logistic regression, torch L-BFGS, L2 by {folds}-fold CV within each subset",
    }


def checkpoints_probe(args, info: dict, data: PreparedData, layers: list[int], device: str) -> dict[str, Any]:
    """Figure 3: every kept checkpoint probed (all chosen layers, its best on validation) against val_nll."""
    ckpts = list_checkpoints(args.run)
    if not ckpts:
        raise IgptError(f"{args.run} has no checkpoint")
    rows = []
    for path in ckpts:
        state = json.loads((path / "state.json").read_text())
        if state.get("val_nll") is None:
            continue
        model = load_run(args.run, path.name)
        print(f"checkpoint {path.name} (val_nll {state['val_nll']:.4f})", file=sys.stderr)
        r = full_probe(args, model, data, layers, device)
        rows.append({"checkpoint": path.name, "step": state["step"], "val_nll": state["val_nll"],
                     "best_layer": r["best_layer"], "best_accuracy": r["best_accuracy"], "layers": r["layers"]})  # fmt: skip
    if len(rows) < 2:
        raise IgptError("loss against probe needs at least two kept checkpoints with val_nll; pretrain with "
                        "--keep-every N")  # fmt: skip
    return {"checkpoints": rows, "raw_pixel_accuracy": r["raw_pixel_accuracy"]}


def plot_checkpoints(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs, ys = [r["val_nll"] for r in rows], [r["best_accuracy"] for r in rows]
    ax.plot(xs, ys, "o-")
    for r in rows:
        ax.annotate(str(r["step"]), (r["val_nll"], r["best_accuracy"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")  # fmt: skip
    ax.set_xlabel("validation NLL (nats per token)")
    ax.set_ylabel("best-layer probe accuracy")
    ax.set_title("Better generative loss, better features (labels: step)")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def run(args: argparse.Namespace) -> None:
    if args.mask_ensemble < 0:
        raise IgptError("--mask-ensemble must be 0 or more")
    if not 0 < args.val_fraction < 1:
        raise IgptError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    for name in ("train_limit", "test_limit", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise IgptError(f"--{name.replace('_', '-')} must be positive")
    info, model, data = open_labelled_run(args.run, args.data, args.checkpoint)
    layers = parse_layers(args.layers, model.config.n_layer, args.run)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise IgptError("--device cuda, but no CUDA GPU is available")
    run_dir = Path(args.run)
    if args.checkpoints == "all":
        res = checkpoints_probe(args, info, data, layers, device)
        write_json_atomic(run_dir / "probe_checkpoints.json", res)
        plot_checkpoints(run_dir / "probe_checkpoints.png", res["checkpoints"])
        for r in res["checkpoints"]:
            print(f"{r['checkpoint']}: val_nll {r['val_nll']:.4f} -> best layer {r['best_layer']} "
                  f"accuracy {r['best_accuracy']:.4f}")  # fmt: skip
        print(f"wrote {run_dir / 'probe_checkpoints.json'} and probe_checkpoints.png")
        return
    probe_and_save(args, model, data, layers, device)


def probe_and_save(args: argparse.Namespace, model: IGPT, data: PreparedData, layers: list[int], device: str,
                   cache: FeatureCache | None = None, baselines: dict[str, float] | None = None) -> dict[str, Any]:  # fmt: skip
    """One full or low-data probe of `args.run`: probe_full.json or probe_N_per_class.json, probe.json (the
    latest probe) and the matching plots; `baselines` are extra named lines for the plot."""
    run_dir = Path(args.run)
    t0 = time.perf_counter()
    if args.labels_per_class:
        res = low_data_probe(args, model, data, layers, device, cache)
        name = f"probe_{args.labels_per_class}_per_class"
        title = f"{args.labels_per_class} labels per class, mean of {args.seeds} subsets"
    else:
        res = full_probe(args, model, data, layers, device, cache)
        name = "probe_full"
        title = f"linear probe, {res['n_train']:,} training images"
    res.update(objective=model.config.objective, checkpoint=args.checkpoint or "latest",
               seconds_total=round(time.perf_counter() - t0, 2))  # fmt: skip
    write_json_atomic(run_dir / f"{name}.json", res)
    write_json_atomic(run_dir / "probe.json", res)
    plot_layers(run_dir / "probe.png", res["layers"], res["raw_pixel_accuracy"], title, baselines or {})
    (run_dir / f"{name}.png").write_bytes((run_dir / "probe.png").read_bytes())
    acc = res["best_accuracy"]
    extra = f" (std {res['std_accuracy']:.4f})" if "std_accuracy" in res else ""
    print(f"best layer {res['best_layer']}: accuracy {acc:.4f}{extra}; raw pixels {res['raw_pixel_accuracy']:.4f}; "
          f"wrote {run_dir / 'probe.json'} and probe.png")  # fmt: skip
    return res
