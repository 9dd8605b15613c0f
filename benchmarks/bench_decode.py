"""Decode speed on CPU: tokens per second of AR sampling with the key/value cache, random weights.

Prints one JSON line. To compare two revisions, run this file under each one's `src` alternately (the
machine's drift then hits both) and compare medians, for example:

    git worktree add /tmp/old 8c1a752
    for i in 1 2 3 4 5; do
        PYTHONPATH=src .venv/bin/python benchmarks/bench_decode.py
        PYTHONPATH=/tmp/old/src .venv/bin/python benchmarks/bench_decode.py
    done
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import igpt
from igpt.model.gpt import IGPT, IGPTConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--side", type=int, default=14, help="image side: the context is side*side tokens")
    ap.add_argument("--vocab", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="timed generations; the fastest is kept")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    T = a.side * a.side
    cfg = IGPTConfig(vocab_size=a.vocab, n_positions=T, n_embd=a.width, n_layer=a.layers, n_head=8)
    model = IGPT(cfg).eval()
    try:  # the sampler lives outside the model since the cycle between them was cut
        from igpt.generation.complete import generate

        def run(n: int) -> torch.Tensor:
            return generate(model, torch.zeros(a.batch, 0, dtype=torch.long), n, generator=g)
    except ImportError:

        def run(n: int) -> torch.Tensor:
            return model.generate(torch.zeros(a.batch, 0, dtype=torch.long), n, generator=g)

    g = torch.Generator().manual_seed(0)
    run(16)  # warm-up
    best = float("inf")
    for _ in range(a.rounds):
        t = time.perf_counter()
        run(T)
        best = min(best, time.perf_counter() - t)
    tok_s = a.batch * T / best
    print(json.dumps({"igpt": igpt.__file__, "batch": a.batch, "tokens_per_s": round(tok_s, 1)}))


if __name__ == "__main__":
    main()
