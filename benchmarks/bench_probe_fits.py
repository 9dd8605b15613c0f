"""The linear probe's cost against its quality: how the lambda sweep's rows, L-BFGS iterations and the
products' precision trade the fits' seconds for validation accuracy, on a trained run's real features (test
accuracy printed beside, never used to choose). Prints one table; the features are cached in --cache so
variants can be added cheaply.

    .venv/bin/python benchmarks/bench_probe_fits.py runs/quickstart/run --layers 3,4 --cache /tmp/feats.pt
    .venv/bin/python benchmarks/bench_probe_fits.py runs/quickstart/run --layers 2,3,4 --pool grid3 \
        --variants "fp32,bf16 products"
    .venv/bin/python benchmarks/bench_probe_fits.py runs/quickstart/run --layers 3 --pool grid7 \
        --variants "fp32,bf16 products"
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from igpt.data.sources import split_validation
from igpt.probes.features import FeatureCache
from igpt.probes.logistic import (
    FINE_LAMBDAS,
    FINE_REFIT_ITERS,
    LAMBDAS,
    REFIT_ITERS,
    SWEEP_ITERS,
    feature_std,
    fit_logistic,
    fit_logistic_many,
)
from igpt.probes.setup import labelled_rows, open_labelled_run

VARIANTS = {  # name: (sweep rows, sweep iterations, refit iterations, precision of the products)
    "fp32": (20_000, SWEEP_ITERS, REFIT_ITERS, "fp32"),
    "bf16 products": (20_000, SWEEP_ITERS, REFIT_ITERS, "bf16"),
    "10k rows": (10_000, SWEEP_ITERS, REFIT_ITERS, "fp32"),
    "5k rows": (5_000, SWEEP_ITERS, REFIT_ITERS, "fp32"),
    "300 sweep iterations": (20_000, 300, REFIT_ITERS, "fp32"),
}
"""With --pool grid7 (the fine grid), the refit iterations are FINE_REFIT_ITERS and the strengths
FINE_LAMBDAS, as the full probe fits it."""


def features(run: str, layers: list[int], pool: str, cache: Path | None, precision: str) -> dict:
    """{pool name: {split: {layer: (N, D)}}, labels} for the run's labelled rows, from the cache if there."""
    if cache and cache.is_file():
        return torch.load(cache)
    _, model, data = open_labelled_run(run, None)
    fc = FeatureCache(
        model,
        data,
        layers,
        pool=pool,
        resolution=data.resolution,
        order=data.meta["order"],
        compile=True,
        precision=precision,
    )
    out: dict = {"labels": {}, pool: {}, "mean": {}}
    for split in ("train", "val", "test"):
        rows = labelled_rows(data.labels(split), None)
        out[pool][split] = fc(split, rows, f"{split} features")
        out["mean"][split] = fc(split, rows, "", mean=True)
        out["labels"][split] = torch.from_numpy(data.labels(split)[rows])
    if cache:
        torch.save(out, cache)
    return out


def sweep(xtr, ytr, xva, yva, xte, yte, variant: tuple, fine: bool) -> tuple[float, ...]:
    """The probe's protocol with these settings: (seconds, chosen lambda, refit val accuracy, test acc)."""
    rows, iters, refit, precision = variant
    lams = FINE_LAMBDAS if fine else LAMBDAS
    refit = FINE_REFIT_ITERS if fine else refit
    t = time.perf_counter()
    tr = np.arange(len(ytr))
    if len(tr) > rows:
        keep, _ = split_validation(ytr.numpy(), 1 - rows / len(tr), 1)
        tr = tr[keep]
    stats = (xtr[tr].double().mean(0), feature_std(xtr[tr].double()))
    probes = fit_logistic_many(
        xtr[tr], ytr[tr], 10, list(lams), stats=stats, max_iter=iters, precision=precision
    )
    val = {p.lam: p.accuracy(xva, yva) for p in probes}
    best = max(lams, key=lambda k: (val[k], k))
    chosen = probes[list(lams).index(best)]
    init = (chosen.weight, chosen.bias)
    probe = fit_logistic(xtr, ytr, 10, best, init=init, max_iter=refit, precision=precision)
    return time.perf_counter() - t, best, probe.accuracy(xva, yva), probe.accuracy(xte, yte)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--layers", default="3,4")
    ap.add_argument("--pool", default="grid3")
    ap.add_argument("--cache", type=Path)
    ap.add_argument(
        "--feature-precision", default="bf16", choices=("fp32", "bf16"), help="as the quickstart's"
    )
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    a = ap.parse_args()
    layers = [int(x) for x in a.layers.split(",")]
    names = [n.strip() for n in a.variants.split(",")]
    if unknown := [n for n in names if n not in VARIANTS]:
        raise SystemExit(f"bench_probe_fits: unknown variants {unknown}; choose from {list(VARIANTS)}")
    f = features(a.run, layers, a.pool, a.cache, a.feature_precision)
    y = f["labels"]
    print(f"{'features':<14} {'variant':<30} {'seconds':>8} {'lambda':>8} {'val acc':>8} {'test acc':>8}")
    for pool in (a.pool, "mean"):
        for i in layers:
            x = {s: f[pool][s][i] for s in ("train", "val", "test")}
            for name in names:
                fine = pool == "grid7"
                secs, lam, va, te = sweep(
                    x["train"], y["train"], x["val"], y["val"], x["test"], y["test"], VARIANTS[name], fine
                )
                print(f"{pool} L{i:<8} {name:<30} {secs:>8.1f} {lam:>8g} {va:>8.4f} {te:>8.4f}", flush=True)


if __name__ == "__main__":
    main()
