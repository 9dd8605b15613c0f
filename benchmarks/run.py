"""One benchmark runner (figures, not tests): everything measured in the same process on the same machine, so
every ratio is like for like. Prints a table and writes JSON.

- fp32 matrix-multiply peak of this machine (the yardstick for model FLOP/s);
- training tokens/s (forward, backward, AdamW), ours against transformers' ImageGPT at the same shape and
  batch, with model FLOPs per token (attention included) and the achieved share of the matmul peak;
- sampling tokens/s, ours with the key/value cache against HF `generate(use_cache=True)`, batch 1, 8 and 16;
- prepare's throughput on Fashion-MNIST (when the Debian files are present);
- the quickstart's peak memory, read from a finished quickstart's quickstart.json.

Run:  .venv/bin/python benchmarks/run.py [--quick] [--out runs/bench/cpu.json] [--quickstart runs/quickstart]
transformers is a test dependency (scripts/setup.sh --test installs it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from igpt.convert import igpt_to_hf_state
from igpt.model import IGPT, IGPTConfig

# (name, resolution, width, layers, heads, batch, clusters)
TRAIN_SHAPES = [
    ("tiny 28x28", 28, 128, 4, 4, 16, 16),
    ("tiny 14x14 (quickstart)", 14, 128, 4, 4, 32, 16),
    ("w256 14x14", 14, 256, 4, 8, 16, 16),
    ("small 14x14", 14, 256, 8, 8, 16, 16),
    ("w512 32x32", 32, 512, 2, 8, 4, 512),
]


def hf_model(res: int, d: int, L: int, h: int, K: int):
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    cfg = ImageGPTConfig(vocab_size=K + 1, n_positions=res * res, n_embd=d, n_layer=L, n_head=h, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return ImageGPTForCausalImageModeling(cfg)


def make_step(model: torch.nn.Module, loss_fn):
    """One training step (forward, backward, AdamW) of `model`, as a closure."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))

    def step() -> None:
        loss_fn(model).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_steps(step, n_warm: int, n: int) -> float:
    for _ in range(n_warm):
        step()
    t = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t) / n


def flops_per_token(res: int, d: int, L: int, K: int) -> float:
    """Training FLOPs per token: 6 x (matrix parameters) plus attention's 6 x 2 x T x d per layer (causal
    attention does half the work of full attention: we count the full product, as is customary)."""
    T = res * res
    matrix_params = L * 12 * d * d + d * K
    return 6 * matrix_params + 6 * 2 * L * T * d


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Best fp32 GFLOP/s of an n x n x n matrix product on the current threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def bench_train(steps: int, shapes: list[tuple], peak: float) -> list[dict]:
    rows = []
    for name, res, d, L, h, B, K in shapes:
        T = res * res
        x = torch.randint(0, K, (B, T))
        torch.manual_seed(0)
        ours = IGPT(IGPTConfig(vocab_size=K, n_positions=T, n_layer=L, n_embd=d, n_head=h)).train()
        hf = hf_model(res, d, L, h, K).train()
        inp = torch.cat([torch.full((B, 1), K), x[:, :-1]], 1)  # HF's input: [SOS, x_0 .. x_{T-2}]
        t_ours = time_steps(make_step(ours, lambda m, x=x: m(x)[1]), 2, steps)
        t_hf = time_steps(make_step(hf, lambda m, x=x, inp=inp, K=K: F.cross_entropy(
            m(input_ids=inp).logits.reshape(-1, K), x.reshape(-1))), 2, steps)  # fmt: skip
        fpt = flops_per_token(res, d, L, K)
        gflops = fpt * B * T / t_ours / 1e9
        rows.append({"shape": name, "resolution": res, "width": d, "layers": L, "batch": B, "clusters": K,
                     "ours_tokens_per_s": B * T / t_ours, "hf_tokens_per_s": B * T / t_hf, "ratio": t_hf / t_ours,
                     "flops_per_token": fpt, "ours_gflops": gflops, "share_of_matmul_peak": gflops / peak})  # fmt: skip
        del ours, hf
    return rows


@torch.no_grad()
def bench_sample(
    batches: list[int], res: int = 28, d: int = 128, L: int = 4, h: int = 4, K: int = 16
) -> list[dict]:
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    T = res * res
    cfg = IGPTConfig(vocab_size=K, n_positions=T, n_layer=L, n_embd=d, n_head=h, bias=True)
    torch.manual_seed(0)
    ours = IGPT(cfg).eval()
    for p in ours.parameters():
        p.normal_(0, 0.05)
    hf = ImageGPTForCausalImageModeling(ImageGPTConfig(vocab_size=K + 1, n_positions=T, n_embd=d, n_layer=L,
                                                       n_head=h, resid_pdrop=0.0, embd_pdrop=0.0,
                                                       attn_pdrop=0.0)).eval()  # fmt: skip
    hf.load_state_dict(igpt_to_hf_state(ours.state_dict(), cfg))
    rows = []
    for B in batches:
        ours.generate(torch.zeros(B, 0, dtype=torch.long), 16)  # warm-up
        t = time.perf_counter()
        ours.generate(torch.zeros(B, 0, dtype=torch.long), T, generator=torch.Generator().manual_seed(0))
        r_ours = B * T / (time.perf_counter() - t)
        sos = torch.full((B, 1), K)
        kw = dict(input_ids=sos, attention_mask=torch.ones_like(sos), do_sample=True, top_k=0, use_cache=True,
                  pad_token_id=K)  # fmt: skip
        hf.generate(max_length=17, **kw)
        t = time.perf_counter()
        hf.generate(max_length=T + 1, **kw)
        r_hf = B * T / (time.perf_counter() - t)
        rows.append({"batch": B, "resolution": res, "width": d, "layers": L, "ours_tokens_per_s": r_ours,
                     "hf_tokens_per_s": r_hf, "ratio": r_ours / r_hf})  # fmt: skip
    return rows


def bench_prepare() -> dict | None:
    from igpt.prepare import PrepareConfig

    if not os.path.isfile("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"):
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_prepare import timed

    with tempfile.TemporaryDirectory() as tmp:
        s, meta = timed(PrepareConfig("fashion-mnist", resolution=28, clusters=16), f"{tmp}/fm")
    return {"dataset": "fashion-mnist 28x28 K=16", "images": 70000, "seconds": s, "images_per_s": 70000 / s,
            "quantization_rmse": meta["quantization_rmse"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=8, help="timed training steps per shape")
    ap.add_argument("--quick", action="store_true", help="two training shapes, batch 8 sampling only")
    ap.add_argument("--out", default="runs/bench/cpu.json")
    ap.add_argument(
        "--quickstart", default="runs/quickstart", help="a finished quickstart, for its peak memory"
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    res: dict = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                             "threads": torch.get_num_threads(), "torch": torch.__version__}}  # fmt: skip
    peak = matmul_peak()
    res["matmul_peak_gflops"] = peak
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; matmul peak {peak:,.1f} GFLOP/s"
    )
    shapes = TRAIN_SHAPES[:3:2] if a.quick else TRAIN_SHAPES
    res["train"] = bench_train(a.steps, shapes, peak)
    print("\ntraining (forward + backward + AdamW)")
    print(
        f"{'shape':26} {'batch':>5} {'ours tok/s':>11} {'HF tok/s':>10} {'ratio':>6} {'MFLOP/tok':>9} {'GFLOP/s':>8} {'peak':>5}"
    )
    for r in res["train"]:
        print(f"{r['shape']:26} {r['batch']:5d} {r['ours_tokens_per_s']:11,.0f} {r['hf_tokens_per_s']:10,.0f} "
              f"{r['ratio']:5.2f}x {r['flops_per_token'] / 1e6:9.2f} {r['ours_gflops']:8.1f} "
              f"{r['share_of_matmul_peak']:5.0%}")  # fmt: skip
    res["sample"] = bench_sample([8] if a.quick else [1, 8, 16])
    print("\nsampling, 28x28 width 128, 4 layers (ours: KV cache; HF: generate(use_cache=True))")
    print(f"{'batch':>5} {'ours tok/s':>11} {'HF tok/s':>10} {'ratio':>6}")
    for r in res["sample"]:
        print(
            f"{r['batch']:5d} {r['ours_tokens_per_s']:11,.0f} {r['hf_tokens_per_s']:10,.0f} {r['ratio']:5.2f}x"
        )
    res["prepare"] = bench_prepare()
    if res["prepare"]:
        p = res["prepare"]
        print(f"\nprepare {p['dataset']}: {p['seconds']:.2f} s, {p['images_per_s']:,.0f} images/s")
    qs = Path(a.quickstart) / "quickstart.json"
    if qs.is_file():
        q = json.loads(qs.read_text())
        res["quickstart"] = {"peak_rss_mib": q.get("peak_rss_mib"), "seconds": q.get("seconds")}
        print(f"quickstart ({qs}): peak memory {q.get('peak_rss_mib')} MiB, stages {q.get('seconds')}")
    else:
        print(f"quickstart: no {qs}; run `igpt quickstart` first for its peak memory")
    save_json(res, a.out)


def save_json(obj: dict, path: str) -> None:
    """Write the results as indented JSON (creating the folder) and say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(obj, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
