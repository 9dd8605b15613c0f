"""Pretraining sweep: each variant is pretrained for the same wall-clock budget from the same prepared data,
then probed on the validation split only. Writes sweep_<M>min.json and .md (one row per variant: settings,
steps, tokens/s, validation NLL, validation probe accuracy per layer for the paper's mean pooling and for
3x3 grid pooling). The test split is never read. This is how the quickstart's defaults are chosen; rerun it
on your own machine to choose yours.

    python benchmarks/sweep.py --out runs/sweep --minutes 3                    # every variant
    python benchmarks/sweep.py --out runs/sweep --minutes 3 --variants base,muon
    python benchmarks/sweep.py --list

Each variant is the quickstart's pretraining settings with a few changed. Run nothing else beside it:
the variants compete for the same CPU-minutes, and a second job skews every figure. A finished variant
(its row in the budget's table) is skipped when the sweep is run again with the same --out, so an
interrupted sweep goes on where it stopped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sweep_table import SweepTable  # benchmarks/, beside this script

import igpt
from igpt.data.sources import split_validation
from igpt.errors import IgptError
from igpt.model.gpt import IGPTConfig
from igpt.pipeline.plans import DEFAULT, FASHION_DIR
from igpt.probes.features import FeatureCache
from igpt.probes.logistic import probe_with_validation
from igpt.probes.setup import open_labelled_run
from igpt.training.config import TrainConfig

# The baseline is the quickstart's pretraining (plans.DEFAULT); each variant changes what it names. The
# README's tables were measured when the defaults were AdamW with a cosine schedule (the "adamw" row's
# settings); Muon with warm-up-stable-decay won, so those are the defaults now.
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "adamw": {"optimizer": "adamw", "schedule": "cosine", "adamw_lr_ratio": 1.0},
    "adamw-ratio1": {"adamw_lr_ratio": 1.0},  # Muon with AdamW's parameters at --lr (the default before)
    "tiny": {"preset": "tiny"},  # 4 x 128, the default shape before tiny-deep (6 x 96)
    "muon": {"optimizer": "muon"},
    "bf16": {"precision": "bf16"},
    "augment": {"shift": 1, "flip": True},
    "wsd": {"schedule": "wsd"},
    "prefix": {"prefix_causal": True},
    "lr3e-3": {"lr": 3e-3},
    "batch64": {"batch_size": 64, "lr": 3e-3},
    "deep6x96": {"n_layer": 6, "n_embd": 96, "n_head": 4},
    "wide3x192": {"n_layer": 3, "n_embd": 192, "n_head": 6},
    "muon+augment": {"optimizer": "muon", "shift": 1, "flip": True},
    "muon-lr1e-3": {"optimizer": "muon", "lr": 1e-3},
    "muon-lr4e-3": {"optimizer": "muon", "lr": 4e-3},
    "muon+bf16": {"optimizer": "muon", "precision": "bf16"},
    "muon+wsd": {"optimizer": "muon", "schedule": "wsd"},
    "muon+prefix": {"optimizer": "muon", "prefix_causal": True},
    "muon+bf16-wide": {"optimizer": "muon", "precision": "bf16", "n_embd": 192, "n_head": 6},
    "bf16-wide": {"precision": "bf16", "n_embd": 192, "n_head": 6},
    "bf16-deep": {"precision": "bf16", "n_layer": 6},
    "bert": {"objective": "bert"},  # AR against BERT at the same budget (the paper's Table 3 question)
}
MODEL_KEYS = ("n_layer", "n_embd", "n_head", "prefix_causal", "preset", "objective")
PROBE_SECONDS = 90  # about what one variant's validation probe costs the quickstart's model on 2 cores


def base_settings() -> dict[str, Any]:
    """The quickstart's pretraining settings, which every variant starts from."""
    return {**DEFAULT.pretrain_settings(), "compile": DEFAULT.compile}


def check_variants(names: list[str], minutes: float, total: float | None, data: Path) -> None:
    """Refuse unknown names, settings that do not validate and a sweep that cannot fit `total` minutes,
    before any variant runs."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise IgptError(f"unknown variant(s) {', '.join(unknown)}; --list shows them")
    for n in names:
        s = {**base_settings(), **VARIANTS[n]}
        model = {k: s.pop(k) for k in MODEL_KEYS if k in s}
        TrainConfig(data=str(data), minutes=minutes, **s)
        IGPTConfig.from_preset(model.get("preset", "tiny"), **{k: model.get(k) for k in MODEL_KEYS[:4]})
    need = len(names) * (minutes + PROBE_SECONDS / 60)
    if total is not None and need > total:
        raise IgptError(
            f"{len(names)} variants of {minutes:g} min each need about {need:.0f} min with their probes, "
            f"more than --total-minutes {total:g}; pass fewer --variants or a smaller --minutes"
        )


def validation_probe(run: Path, train_rows: int, seed: int = 0) -> dict[str, Any]:
    """Per-layer validation accuracy of linear probes (L2 strength chosen on validation) fitted on a
    class-stratified subset of `train_rows` training images, for mean and 3x3 grid pooling."""
    _, model, data = open_labelled_run(str(run), None)
    layers = list(range(model.config.n_layer + 1))
    ytr_all = data.labels("train")
    tr = np.flatnonzero(ytr_all >= 0)
    if train_rows < len(tr):
        keep, _ = split_validation(ytr_all[tr], 1 - train_rows / len(tr), seed)
        tr = np.sort(tr[keep])
    va = np.flatnonzero(data.labels("val") >= 0)
    cache = FeatureCache(
        model,
        data,
        layers,
        quiet=True,
        batch_size=128,
        pool="grid3",
        resolution=data.resolution,
        order=data.meta["order"],
        compile=True,
    )
    ytr = torch.from_numpy(ytr_all[tr].astype(np.int64))
    yva = torch.from_numpy(data.labels("val")[va].astype(np.int64))
    out: dict[str, Any] = {}
    for pool, mean in (("mean", True), ("grid3", False)):
        ftr, fva = cache("train", tr, "train", mean=mean), cache("val", va, "val", mean=mean)
        accs = {}
        for i in layers:
            # the validation rows stand in for the test rows: nothing here reads the test split
            r = probe_with_validation(ftr[i], ytr, fva[i], yva, fva[i], yva, data.num_classes)
            accs[str(i)] = round(r["val_accuracy"], 4)
        out[pool] = accs
    return out


def markdown(rows: list[dict[str, Any]], minutes: float, cpu: str) -> str:
    lines = [
        f"Pretraining sweep: {minutes:g} min of pretraining per variant; validation figures only ({cpu}).",
        "",
        "| variant | settings | steps | tokens/s | val NLL | mean-pool probe by layer (best) "
        "| grid3 probe by layer (best) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, g = r["val_probe"]["mean"], r["val_probe"]["grid3"]
        fmt = lambda d: " / ".join(f"{v:.3f}" for v in d.values()) + f" (**{max(d.values()):.3f}**)"  # noqa: E731
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "quickstart defaults"
        lines.append(
            f"| {r['variant']} | {settings} | {r['steps']} | {r['tokens_per_second']:,.0f} "
            f"| {r['val_nll']:.4f} | {fmt(m)} | {fmt(g)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/sweep", help="sweep directory (data, one run per variant, tables)")
    ap.add_argument("--minutes", type=float, default=3.0, help="pretraining budget of every variant")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (--list)")
    ap.add_argument("--total-minutes", type=float, help="refuse a sweep that would take longer than this")
    ap.add_argument("--train-rows", type=int, default=10000, help="training images the probes fit on")
    ap.add_argument("--data-dir", default=str(FASHION_DIR), help="Fashion-MNIST IDX directory")
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    args = ap.parse_args(argv)
    if args.list:
        for n, v in VARIANTS.items():
            print(f"{n:14s} {v or 'the quickstart defaults'}")
        return 0
    try:
        out = Path(args.out)
        names = [n for n in args.variants.split(",") if n]
        if not args.minutes > 0:
            raise IgptError(f"--minutes must be positive, got {args.minutes}")
        data = out / "data"
        check_variants(names, args.minutes, args.total_minutes, data)  # before anything is prepared or run
        if not (data / "meta.json").is_file():
            igpt.prepare(
                "fashion-mnist",
                out=data,
                data_dir=args.data_dir,
                resolution=DEFAULT.resolution,
                clusters=DEFAULT.clusters,
            )
        # one table per budget
        table = SweepTable(
            out / f"sweep_{args.minutes:g}min.json",
            args.minutes,
            lambda rows, cpu: markdown(rows, args.minutes, cpu),
        )
        for n in names:
            if table.skip(n):
                continue
            run = out / "runs" / n
            settings = {**base_settings(), **VARIANTS[n]}
            print(f"\n== {n}: {VARIANTS[n] or 'the quickstart defaults'}, {args.minutes:g} min", flush=True)
            t = time.perf_counter()
            summary = igpt.pretrain(
                data,
                run,
                minutes=args.minutes,
                eval_images=1000,
                resume=run.exists(),
                progress=False,
                **settings,
            )
            t_probe = time.perf_counter()
            vp = validation_probe(run, args.train_rows)
            row = {
                "variant": n,
                "settings": VARIANTS[n],
                "minutes": args.minutes,
                "steps": summary["steps"],
                "tokens_per_second": summary["tokens_per_second"],
                "precision": summary["precision"],
                "params": summary["params"],
                "val_nll": summary["val_nll"],
                "val_probe": vp,
                "best_layer_mean": int(max(vp["mean"], key=vp["mean"].get)),
                "best_layer_grid3": int(max(vp["grid3"], key=vp["grid3"].get)),
                "pretrain_seconds": round(t_probe - t, 1),
                "probe_seconds": round(time.perf_counter() - t_probe, 1),
            }
            table.add(row)
        print(table.text())
    except IgptError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
