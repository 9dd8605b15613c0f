"""Training-step time on CPU with attention as two matrix products against the fused kernel.

`igpt.model.gpt.attention` trains short sequences in bf16 on CPU through plain products, because the fused
kernel's backward pass dominated the step there. This script measures that choice: each round runs one
child process per path (alternately, so the machine's drift hits both), each timing compiled Muon steps of
random tokens, and prints a JSON line per run and the medians. For example (the quickstart's shape):

    .venv/bin/python benchmarks/bench_attention.py --rounds 3 --precision bf16 --side 14 --batch 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

PATHS = ("fused", "matmul")


def child(a: argparse.Namespace) -> None:
    """One timing in this process: `a.steps` compiled steps after `a.warmup` untimed ones."""
    import igpt.model.gpt as M
    from igpt.hardware import cpu_name, muon_ns_dtype
    from igpt.training.engine import autocast
    from igpt.training.optim import Optimizers

    if a.path == "fused":
        M.MATMUL_ATTENTION_MAX_T = 0  # every sequence takes the fused kernel
    torch.manual_seed(0)
    T = a.side * a.side
    cfg = M.IGPTConfig.from_preset(a.preset, vocab_size=16, n_positions=T)
    model = M.IGPT(cfg)
    opt = Optimizers(list(model.named_parameters()), "muon", 2e-3, 0.0, 0.95, False, muon_ns_dtype("cpu"))
    step_fn = torch.compile(model)
    x = torch.randint(0, 16, (a.batch, T))

    def step() -> None:
        with autocast("cpu", a.precision):
            _, loss = step_fn(x, None, reduction="sum")
            (loss / x.numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(a.warmup):
        step()
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    dt = (time.perf_counter() - t) / a.steps
    row = dict(
        path=a.path,
        precision=a.precision,
        preset=a.preset,
        tokens=T,
        batch=a.batch,
        ms_per_step=round(dt * 1e3, 1),
        tokens_per_second=round(a.batch * T / dt),
        cpu=cpu_name(),
    )
    print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="alternating pairs of runs")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--side", type=int, default=14, help="image side: side*side tokens")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)  # set in the child processes
    a = ap.parse_args()
    if a.path:
        child(a)
        return
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    for _ in range(a.rounds):
        for p in PATHS:
            out = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--path", p],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            times[p].append(row["ms_per_step"])
    med = {p: statistics.median(v) for p, v in times.items()}
    print(json.dumps({"median_ms_per_step": med, "matmul_speedup": round(med["fused"] / med["matmul"], 2)}))


if __name__ == "__main__":
    main()
