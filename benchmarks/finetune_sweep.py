"""Fine-tuning sweep: each recipe fine-tunes the same pretrained run (or trains its architecture from scratch)
for the same wall-clock budget and is scored on the validation split only; no test image is read and nothing
is saved (`igpt.finetuning.finetune.validation_only`). Writes finetune_sweep_<M>min.json and .md in --out, one
row per variant. This is how `igpt finetune`'s recipe and the quickstart's fine-tuning are chosen.

    python benchmarks/finetune_sweep.py --run runs/quickstart/run --out runs/ft_sweep --minutes 3
    python benchmarks/finetune_sweep.py --run RUN --out DIR --variants base,layer3 \
        --labels-per-class 10 --seeds 3
    python benchmarks/finetune_sweep.py --list

Run nothing else beside it: the variants compete for the same CPU-minutes. A variant already in the table for
the same budget and labels is skipped, so an interrupted sweep goes on where it stopped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from sweep_table import SweepTable  # benchmarks/, beside this script

from igpt.errors import IgptError
from igpt.finetuning.config import FinetuneConfig
from igpt.finetuning.finetune import validation_only

# Each variant is `igpt finetune`'s defaults with the named settings changed.
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "grid3": {"pool": "grid3"},
    "layer3": {"layer": 3},
    "layer3-grid3": {"layer": 3, "pool": "grid3"},
    "layer3-grid3-gen0": {"layer": 3, "pool": "grid3", "gen_weight": 0.0},
    "layer3-grid3-lr5e-5": {"layer": 3, "pool": "grid3", "lr": 5e-5},
    "layer3-grid3-gen0-lr5e-5": {"layer": 3, "pool": "grid3", "gen_weight": 0.0, "lr": 5e-5},
    "layer3-grid3-no-augment": {"layer": 3, "pool": "grid3", "augment": False},
    "layer3-grid3-no-augment-lr5e-4": {"layer": 3, "pool": "grid3", "augment": False, "lr": 5e-4},
    "lr5e-5": {"lr": 5e-5},
    "lr5e-4": {"lr": 5e-4},
    "gen0.25": {"gen_weight": 0.25},
    "gen0": {"gen_weight": 0.0},
    "decay0.7": {"layer_decay": 0.7},
    "no-augment": {"augment": False},
    "batch64": {"batch_size": 64},
    "scratch": {"init": "scratch"},
    "scratch-lr2e-3": {"init": "scratch", "lr": 2e-3},
    "scratch-lr5e-4": {"init": "scratch", "lr": 5e-4},
    # the control for the layer-3, grid3, unaugmented recipe: the same 3 blocks from random weights
    "scratch-layer3-grid3-no-augment": {"init": "scratch", "layer": 3, "pool": "grid3", "augment": False},
    "scratch-layer3-grid3-no-augment-lr2e-3": {
        "init": "scratch",
        "layer": 3,
        "pool": "grid3",
        "augment": False,
        "lr": 2e-3,
    },
}


def config(
    run: str, out: Path, name: str, minutes: float, labels: int | None, seeds: int, compile: bool = True
) -> FinetuneConfig:
    """The variant's settings as a checked config (its --out is never written); compiled, as the quickstart
    fine-tunes, and at `igpt finetune`'s automatic precision."""
    low = {"labels_per_class": labels, "seeds": seeds} if labels else {}
    return FinetuneConfig(
        run=run,
        out=str(out / "unused" / name),
        minutes=minutes,
        epochs=1000,
        progress=False,
        compile=compile,
        **low,
        **VARIANTS[name],
    )


def markdown(rows: list[dict[str, Any]], minutes: float, labels: int | None, cpu: str) -> str:
    who = f"{labels} labels per class" if labels else "all labels"
    lines = [
        f"Fine-tuning sweep: {minutes:g} min per variant (per subset), {who}; "
        f"validation figures only ({cpu}).",
        "",
        "| variant | settings | best validation accuracy | the head's probe start | after the last epoch "
        "| steps | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "igpt finetune's defaults"
        acc = f"{r['val_accuracy']:.4f}" + (f" ± {r['val_std']:.4f}" if r["subsets"] > 1 else "")
        last = np.mean([h[-1]["val_accuracy"] for h in r["history"]])
        steps = f"{r['steps']:.0f}" if r.get("steps") is not None else "-"
        lines.append(
            f"| {r['variant']} | {s} | {acc} | {r['initial_val_accuracy']:.4f} | {last:.4f} | {steps} "
            f"| {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def row(name: str, minutes: float, labels: int | None, results: list[dict[str, Any]], secs: float) -> dict:
    vals = [r["best_val_accuracy"] for r in results]
    return {
        "variant": name,
        "settings": VARIANTS[name],
        "minutes": minutes,
        "labels_per_class": labels,
        "subsets": len(results),
        "val_accuracy": float(np.mean(vals)),
        "val_std": float(np.std(vals)),
        "val_accuracies": vals,
        "initial_val_accuracy": float(np.mean([r["initial_val_accuracy"] for r in results])),
        "epochs": float(np.mean([len(r["history"]) for r in results])),
        "steps": float(np.mean([r["steps"] for r in results])),
        "best_epochs": [r["best_epoch"] for r in results],
        "history": [r["history"] for r in results],
        "seconds": round(secs, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="the pretrained run every variant starts from")
    ap.add_argument("--out", default="runs/finetune_sweep", help="where the tables go")
    ap.add_argument("--minutes", type=float, default=3.0, help="each variant's budget (per subset)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (--list)")
    ap.add_argument("--labels-per-class", type=int, help="fine-tune on N labels per class (low data)")
    ap.add_argument("--seeds", type=int, default=1, help="subsets of --labels-per-class N to average")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile")
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    args = ap.parse_args(argv)
    if args.list:
        for n, v in VARIANTS.items():
            print(f"{n:16s} {v or 'igpt finetune defaults'}")
        return 0
    try:
        if not args.run:
            raise IgptError("--run RUN is required: the pretrained run to fine-tune")
        out, names = Path(args.out), [n for n in args.variants.split(",") if n]
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise IgptError(f"unknown variant(s) {', '.join(unknown)}; --list shows them")
        if not args.minutes > 0:
            raise IgptError(f"--minutes must be positive, got {args.minutes}")
        configs = {
            n: config(args.run, out, n, args.minutes, args.labels_per_class, args.seeds, args.compile)
            for n in names
        }
        low = f"_{args.labels_per_class}pc" if args.labels_per_class else ""
        table = SweepTable(
            out / f"finetune_sweep_{args.minutes:g}min{low}.json",
            args.minutes,
            lambda rows, cpu: markdown(rows, args.minutes, args.labels_per_class, cpu),
        )
        for n in names:
            if table.skip(n):
                continue
            print(f"\n== {n}: {VARIANTS[n] or 'igpt finetune defaults'}, {args.minutes:g} min", flush=True)
            t = time.perf_counter()
            results = validation_only(configs[n])
            table.add(row(n, args.minutes, args.labels_per_class, results, time.perf_counter() - t))
        print(table.text())
    except IgptError as e:
        print(f"finetune_sweep: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
