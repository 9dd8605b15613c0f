"""GPU benchmark (figures, not a test) for a lent H100 / H200: iGPT-S (24 layers x 512, 8 heads) at 32x32 with
512 colours, trained in bf16 autocast with flash attention through SDPA and `torch.compile`; tokens/s and MFU
against the card's bf16 matrix-multiply rate measured in the same run; sampling throughput with the key/value
cache (eager; CUDA graphs for the decode step are not implemented yet).
Also the same training step for transformers' ImageGPT at the same shape, eager and compiled, and its
`generate` at batch 16, when transformers is installed.

Run:  python benchmarks/bench_gpu.py [--batch 64] [--steps 20] [--out gpu.json]
      python benchmarks/bench_gpu.py --cpu-check     # a seconds-long dry run on CPU with a tiny shape
Record the printed table in BENCHMARKS.md with the card's name.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import flops_per_token, hf_generate_kwargs, hf_model, save_json  # noqa: E402

from igpt.generation.complete import generate  # noqa: E402
from igpt.model.gpt import IGPT, IGPTConfig  # noqa: E402


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def matmul_rate(dev: str, dtype: torch.dtype, n: int, reps: int = 20) -> float:
    """Best TFLOP/s of an n^3 matrix product in `dtype` on `dev`."""
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(dev)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def time_train(model: torch.nn.Module, x: torch.Tensor, dev: str, bf16: bool, steps: int, warm: int, loss_fn):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=dev == "cuda")

    def step() -> None:
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warm):
        step()
    sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(dev)
    return (time.perf_counter() - t) / steps


@torch.no_grad()
def time_sample(model: IGPT, B: int, n: int, dev: str, bf16: bool) -> float:
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
        generate(model, torch.zeros(B, 0, dtype=torch.long, device=dev), 8)
        sync(dev)
        t = time.perf_counter()
        generate(model, torch.zeros(B, 0, dtype=torch.long, device=dev), n)
        sync(dev)
    return B * n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--sample-only", action="store_true", help="skip the training benchmark")
    ap.add_argument("--cpu-check", action="store_true", help="tiny shape on CPU: checks the script runs")
    ap.add_argument("--out", default="runs/bench/gpu.json")
    a = ap.parse_args()
    dev = "cpu" if a.cpu_check else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device; use --cpu-check for a dry run")
    torch.backends.cuda.matmul.allow_tf32 = True
    L, d, h, R, K = 24, 512, 8, 32, 512
    B, steps, warm = a.batch, a.steps, 5
    if a.cpu_check:
        L, d, h, R, K, B, steps, warm = 2, 64, 2, 8, 16, 2, 2, 1
    T = R * R
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (dry run)"
    out: dict = {
        "device": name,
        "torch": torch.__version__,
        "shape": {"layers": L, "width": d, "heads": h, "resolution": R, "clusters": K, "batch": B},
    }
    bf16 = dev == "cuda"
    n = 8192 if bf16 else 256
    out["matmul_tflops_bf16"] = matmul_rate(dev, torch.bfloat16 if bf16 else torch.float32, n)
    print(
        f"{name}, torch {torch.__version__}: {'bf16' if bf16 else 'fp32'} matmul "
        f"{out['matmul_tflops_bf16']:.2f} TFLOP/s ({n}^3)"
    )
    torch.manual_seed(0)
    model = IGPT(IGPTConfig(vocab_size=K, n_positions=T, n_layer=L, n_embd=d, n_head=h)).to(dev).train()
    x = torch.randint(0, K, (B, T), device=dev)
    fpt = flops_per_token(R, d, L, K)
    rows, hf_eval = [], None
    variants = [] if a.sample_only else [("eager", model), *([] if a.no_compile else [("compiled", None)])]
    for label, m in variants:
        m = torch.compile(model) if m is None else m
        t = time_train(m, x, dev, bf16, steps, warm, lambda mm, xx: mm(xx)[1])
        tok = B * T / t
        mfu = tok * fpt / (out["matmul_tflops_bf16"] * 1e12)
        rows.append({"variant": f"ours {label}", "tokens_per_s": tok, "mfu": mfu, "step_ms": 1000 * t})
        print(f"train ours {label:9}: {tok:12,.0f} tokens/s, {1000 * t:8.1f} ms/step, MFU {mfu:.1%}")
    if not a.no_hf:
        try:
            import torch.nn.functional as F

            hf = hf_model(R, d, L, h, K).to(dev).train()
            inp = torch.cat([torch.full((B, 1), K, device=dev), x[:, :-1]], 1)
            hf_variants = (
                [] if a.sample_only else [("eager", hf), *([] if a.no_compile else [("compiled", None)])]
            )
            for label, m in hf_variants:
                m = torch.compile(hf) if m is None else m
                t = time_train(
                    m,
                    x,
                    dev,
                    bf16,
                    steps,
                    warm,
                    lambda mm, xx: F.cross_entropy(
                        mm(input_ids=inp).logits.float().reshape(-1, K), xx.reshape(-1)
                    ),
                )
                rows.append(
                    {
                        "variant": f"HF ImageGPT {label}",
                        "tokens_per_s": B * T / t,
                        "mfu": B * T / t * fpt / (out["matmul_tflops_bf16"] * 1e12),
                        "step_ms": 1000 * t,
                    }
                )
                print(f"train HF {label:11}: {B * T / t:12,.0f} tokens/s, {1000 * t:8.1f} ms/step")
            hf_eval = hf.eval()
        except ImportError as e:
            print(f"train HF: skipped ({e})")
    out["train"] = rows
    model.eval()
    samp = []
    for Bs in (1, 16, 64):
        r = time_sample(model, Bs, T if not a.cpu_check else 16, dev, bf16)
        samp.append({"batch": Bs, "tokens_per_s": r})
        print(f"sample batch {Bs:3d}: {r:12,.0f} tokens/s (KV cache, eager)")
    if hf_eval is not None:  # HF generate with its cache at batch 16, for the ratio
        Bs, n = 16, T if not a.cpu_check else 16
        kw = hf_generate_kwargs(Bs, K, dev)
        with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            hf_eval.generate(max_length=9, **kw)
            sync(dev)
            t = time.perf_counter()
            hf_eval.generate(max_length=n + 1, **kw)
            sync(dev)
        r = Bs * n / (time.perf_counter() - t)
        samp.append({"batch": Bs, "hf_tokens_per_s": r})
        print(f"sample batch {Bs:3d}: {r:12,.0f} tokens/s (HF generate, use_cache=True)")
    out["sample"] = samp
    save_json(out, a.out)


if __name__ == "__main__":
    main()
