"""Does averaging a run's last checkpoints beat its final weights? Prints the validation NLL (every image of
the prepared validation split) of the final weights and of uniform averages of the last 2, 3, ... kept
checkpoints. An average costs nothing at inference, so it would be worth keeping if it scored lower; with
the wsd schedule's cool-down it has not (README, "The levers not yet measured at the full budget").

    .venv/bin/python benchmarks/bench_checkpoint_average.py runs/quickstart/run --last 3
"""

from __future__ import annotations

import argparse
import time

import torch
from safetensors.torch import load_file

from igpt.data.prepared import PreparedData
from igpt.errors import IgptError
from igpt.runs import Run
from igpt.training.checkpoint import list_checkpoints
from igpt.training.engine import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a pretrained run directory with kept checkpoints (--keep-every)")
    ap.add_argument("--last", type=int, default=3, help="average up to this many of the last checkpoints")
    args = ap.parse_args()
    try:
        run = Run.open(args.run)
    except IgptError as e:
        raise SystemExit(f"bench_checkpoint_average: {e}") from None
    model = run.load_model()
    if run.data_dir is None:
        raise SystemExit(f"{args.run}: no prepared data recorded (a converted model has no validation split)")
    data = PreparedData(run.data_dir)
    train = run.train_config
    mask_ratio = train.mask_ratio if train is not None else 0.15  # BERT: as the run was pretrained
    val = data.tokens("val")
    kept = list_checkpoints(args.run)
    if len(kept) < 2:
        raise SystemExit(f"{args.run}: fewer than two checkpoints kept; pretrain with --keep-every")
    print(f"{len(val):,} validation images; checkpoints {', '.join(p.name for p in kept[-args.last :])}")
    for k in range(1, min(args.last, len(kept)) + 1):
        states = [load_file(str(p / "model.safetensors")) for p in kept[-k:]]
        model.load_state_dict({n: sum(s[n].float() for s in states) / k for n in states[0]})
        t = time.perf_counter()
        with torch.no_grad():
            objective = model.config.objective
            nll = evaluate(model, val, len(val), objective, mask_ratio, "cpu", "fp32", batch_size=100)
        names = "final" if k == 1 else f"mean of the last {k}"
        print(f"{names:<20} val NLL {nll:.4f}  ({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
