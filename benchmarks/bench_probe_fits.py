"""The linear probe's cost against its quality: how the lambda sweep's rows and L-BFGS iterations trade the
fits' seconds for validation accuracy, on a trained run's real features (test accuracy printed beside, never
used to choose). Prints one table; the features are cached in --cache so variants can be added cheaply.

    .venv/bin/python benchmarks/bench_probe_fits.py runs/quickstart/run --layers 3,4 --cache /tmp/feats.pt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from igpt.features import FeatureCache
from igpt.logistic import LAMBDAS, feature_std, fit_logistic, fit_logistic_many
from igpt.probe_setup import labelled_rows, open_labelled_run
from igpt.sources import split_validation

VARIANTS = {  # name: (sweep rows, sweep iterations, refit iterations)
    "20k rows x 300 it (default)": (20_000, 300, 150),
    "10k rows x 300 it": (10_000, 300, 150),
    "20k rows x 150 it": (20_000, 150, 150),
    "10k rows x 150 it": (10_000, 150, 150),
    "5k rows x 300 it": (5_000, 300, 150),
}


def features(run: str, layers: list[int], pool: str, cache: Path | None) -> dict:
    """{pool name: {split: {layer: (N, D)}}, labels} for the run's labelled rows, from the cache if there."""
    if cache and cache.is_file():
        return torch.load(cache)
    _, model, data = open_labelled_run(run, None)
    fc = FeatureCache(model, data, layers, pool=pool, resolution=data.resolution, order=data.meta["order"])
    out: dict = {"labels": {}, pool: {}, "mean": {}}
    for split in ("train", "val", "test"):
        rows = labelled_rows(data.labels(split), None)
        out[pool][split] = fc(split, rows, f"{split} features")
        out["mean"][split] = fc(split, rows, "", mean=True)
        out["labels"][split] = torch.from_numpy(data.labels(split)[rows])
    if cache:
        torch.save(out, cache)
    return out


def sweep(xtr, ytr, xva, yva, xte, yte, rows: int, iters: int, refit: int) -> tuple[float, ...]:
    """The probe's protocol with these settings: (seconds, chosen lambda, refit val accuracy, test acc)."""
    t = time.perf_counter()
    tr = np.arange(len(ytr))
    if len(tr) > rows:
        keep, _ = split_validation(ytr.numpy(), 1 - rows / len(tr), 1)
        tr = tr[keep]
    stats = (xtr[tr].double().mean(0), feature_std(xtr[tr].double()))
    probes = fit_logistic_many(xtr[tr], ytr[tr], 10, list(LAMBDAS), stats=stats, max_iter=iters)
    val = {p.lam: p.accuracy(xva, yva) for p in probes}
    best = max(LAMBDAS, key=lambda k: (val[k], k))
    chosen = probes[list(LAMBDAS).index(best)]
    probe = fit_logistic(xtr, ytr, 10, best, init=(chosen.weight, chosen.bias), max_iter=refit)
    return time.perf_counter() - t, best, probe.accuracy(xva, yva), probe.accuracy(xte, yte)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--layers", default="3,4")
    ap.add_argument("--pool", default="grid3")
    ap.add_argument("--cache", type=Path)
    a = ap.parse_args()
    layers = [int(x) for x in a.layers.split(",")]
    f = features(a.run, layers, a.pool, a.cache)
    y = f["labels"]
    print(f"{'features':<14} {'variant':<30} {'seconds':>8} {'lambda':>8} {'val acc':>8} {'test acc':>8}")
    for pool in (a.pool, "mean"):
        for i in layers:
            x = {s: f[pool][s][i] for s in ("train", "val", "test")}
            for name, (rows, iters, refit) in VARIANTS.items():
                secs, lam, va, te = sweep(
                    x["train"], y["train"], x["val"], y["val"], x["test"], y["test"], rows, iters, refit
                )
                print(f"{pool} L{i:<8} {name:<30} {secs:>8.1f} {lam:>8g} {va:>8.4f} {te:>8.4f}", flush=True)


if __name__ == "__main__":
    main()
