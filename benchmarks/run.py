"""One benchmark runner (figures, not tests): everything measured in the same process on the same machine, so
every ratio is like for like. Prints a table and writes JSON.

- fp32 matrix-multiply peak of this machine (the yardstick for model FLOP/s);
- training tokens/s (forward, backward, AdamW), ours against transformers' ImageGPT at the same shape and
  batch, eager and both through torch.compile, with model FLOPs per token (attention included) and the
  achieved share of the matmul peak;
- the probes' feature pass, eager against compiled;
- sampling tokens/s, ours with the key/value cache against HF `generate(use_cache=True)`, batch 1, 8 and 16;
- prepare's throughput on Fashion-MNIST (when the Debian files are present);
- the quickstart's peak memory, read from a finished quickstart's quickstart.json.

Run:  .venv/bin/python benchmarks/run.py [--quick] [--no-compile] [--out runs/bench/cpu.json]
          [--quickstart runs/quickstart]
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
from igpt.generation.complete import generate
from igpt.model.gpt import IGPT, IGPTConfig

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

    cfg = ImageGPTConfig(
        vocab_size=K + 1,
        n_positions=res * res,
        n_embd=d,
        n_layer=L,
        n_head=h,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return ImageGPTForCausalImageModeling(cfg)


def hf_generate_kwargs(B: int, K: int, device: str = "cpu") -> dict:
    """Arguments of HF `generate` that sample B images from the SOS token (id K) with its key/value cache,
    plain softmax sampling like ours; `max_length` (tokens + 1) is left to the caller."""
    sos = torch.full((B, 1), K, device=device)
    return dict(
        input_ids=sos,
        attention_mask=torch.ones_like(sos),
        do_sample=True,
        top_k=0,
        use_cache=True,
        pad_token_id=K,
    )


def make_step(model: torch.nn.Module, loss_fn, call: torch.nn.Module | None = None):
    """One training step (forward, backward, AdamW) of `model`, as a closure; the forward goes through
    `call` (a compiled wrapper of the model) when given."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    call = model if call is None else call

    def step() -> None:
        loss_fn(call).backward()
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


def bench_train(
    steps: int, shapes: list[tuple], peak: float, compile: bool = True, rounds: int = 2
) -> list[dict]:
    """Training tokens/s of ours and HF's, eager and (with `compile`) through torch.compile. The variants are
    timed in alternating rounds and each keeps its best round, so a slow spell on a shared machine does not
    land on one side only."""
    rows = []
    for name, res, d, L, h, B, K in shapes:
        T = res * res
        x = torch.randint(0, K, (B, T))
        inp = torch.cat([torch.full((B, 1), K), x[:, :-1]], 1)  # HF's input: [SOS, x_0 .. x_{T-2}]
        torch.manual_seed(0)
        ours = IGPT(IGPTConfig(vocab_size=K, n_positions=T, n_layer=L, n_embd=d, n_head=h)).train()
        hf = hf_model(res, d, L, h, K).train()

        def ours_loss(m, x=x):
            return m(x)[1]

        def hf_loss(m, x=x, inp=inp, K=K):
            return F.cross_entropy(m(input_ids=inp).logits.reshape(-1, K), x.reshape(-1))

        variants = {"ours": make_step(ours, ours_loss), "hf": make_step(hf, hf_loss)}
        if compile:
            variants["ours_compiled"] = make_step(ours, ours_loss, torch.compile(ours))
            variants["hf_compiled"] = make_step(hf, hf_loss, torch.compile(hf))
        compile_s = {}
        for k, step in variants.items():  # warm-up; the compiled variants compile here
            t = time.perf_counter()
            step()
            compile_s[k] = time.perf_counter() - t
            step()
        best = {k: float("inf") for k in variants}
        for _ in range(rounds):
            for k, step in variants.items():
                best[k] = min(best[k], time_steps(step, 0, steps))
        fpt = flops_per_token(res, d, L, K)
        row = {
            "shape": name,
            "resolution": res,
            "width": d,
            "layers": L,
            "batch": B,
            "clusters": K,
            "flops_per_token": fpt,
        }
        for k, t in best.items():
            row[f"{k}_tokens_per_s"] = B * T / t
        row["ratio"] = best["hf"] / best["ours"]
        row["ours_gflops"] = fpt * B * T / best["ours"] / 1e9
        row["share_of_matmul_peak"] = row["ours_gflops"] / peak
        if compile:
            row["ratio_compiled"] = best["hf_compiled"] / best["ours_compiled"]
            row["ratio_ours_compiled_to_hf_eager"] = best["hf"] / best["ours_compiled"]
            row["ours_compiled_gflops"] = fpt * B * T / best["ours_compiled"] / 1e9
            row["share_of_matmul_peak_compiled"] = row["ours_compiled_gflops"] / peak
            row["compile_seconds"] = {"ours": compile_s["ours_compiled"], "hf": compile_s["hf_compiled"]}
        rows.append(row)
        del ours, hf, variants
    return rows


@torch.no_grad()
def bench_features(
    batch: int = 128, res: int = 14, d: int = 128, L: int = 4, h: int = 4, K: int = 16, rounds: int = 3
) -> dict:
    """The probes' feature pass (every layer's hidden states, no gradients) at the quickstart's shape,
    eager against compiled."""
    T = res * res
    m = IGPT(IGPTConfig(vocab_size=K, n_positions=T, n_layer=L, n_embd=d, n_head=h)).eval()
    x = torch.randint(0, K, (batch, T))
    layers = list(range(L + 1))
    compiled = torch.compile(m.get_intermediate_layers)
    t = time.perf_counter()
    compiled(x, layers)
    compile_s = time.perf_counter() - t
    fns = {"eager": lambda: m.get_intermediate_layers(x, layers), "compiled": lambda: compiled(x, layers)}
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            f()
            t = time.perf_counter()
            for _ in range(3):
                f()
            best[k] = min(best[k], (time.perf_counter() - t) / 3)
    return {
        "shape": f"tiny {res}x{res}",
        "batch": batch,
        "eager_tokens_per_s": batch * T / best["eager"],
        "compiled_tokens_per_s": batch * T / best["compiled"],
        "speedup": best["eager"] / best["compiled"],
        "compile_seconds": compile_s,
    }


@torch.no_grad()
def bench_sample(
    batches: list[int], res: int = 28, d: int = 128, L: int = 4, h: int = 4, K: int = 16, rounds: int = 3
) -> list[dict]:
    """Sampling tokens/s of a whole image per row, ours (KV cache, decode step) against HF `generate` with its
    cache, at each batch size, in alternating rounds (the best round of each side kept)."""
    T = res * res
    cfg = IGPTConfig(vocab_size=K, n_positions=T, n_layer=L, n_embd=d, n_head=h, bias=True)
    torch.manual_seed(0)
    ours = IGPT(cfg).eval()
    for p in ours.parameters():
        p.normal_(0, 0.05)
    hf = hf_model(res, d, L, h, K).eval()
    hf.load_state_dict(igpt_to_hf_state(ours.state_dict(), cfg))
    rows = []
    for B in batches:
        kw = hf_generate_kwargs(B, K)
        sides = {
            "ours": lambda n, B=B: generate(
                ours, torch.zeros(B, 0, dtype=torch.long), n, generator=torch.Generator().manual_seed(0)
            ),
            "hf": lambda n, kw=kw: hf.generate(max_length=n + 1, **kw),
        }
        for f in sides.values():
            f(16)  # warm-up
        best = {k: float("inf") for k in sides}
        for _ in range(rounds):  # alternating, best round kept: the machine's drift hits both sides
            for k, f in sides.items():
                t = time.perf_counter()
                f(T)
                best[k] = min(best[k], time.perf_counter() - t)
        rows.append(
            {
                "batch": B,
                "resolution": res,
                "width": d,
                "layers": L,
                "ours_tokens_per_s": B * T / best["ours"],
                "hf_tokens_per_s": B * T / best["hf"],
                "ratio": best["hf"] / best["ours"],
            }
        )
    return rows


def bench_prepare() -> dict | None:
    from igpt.data.preparation import PrepareConfig

    if not os.path.isfile("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"):
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_prepare import timed

    with tempfile.TemporaryDirectory() as tmp:
        s, meta = timed(PrepareConfig("fashion-mnist", resolution=28, clusters=16), f"{tmp}/fm")
    return {
        "dataset": "fashion-mnist 28x28 K=16",
        "images": 70000,
        "seconds": s,
        "images_per_s": 70000 / s,
        "quantization_rmse": meta["quantization_rmse"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=8, help="timed training steps per shape")
    ap.add_argument("--quick", action="store_true", help="two training shapes, batch 8 sampling only")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--out", default="runs/bench/cpu.json")
    ap.add_argument(
        "--quickstart", default="runs/quickstart", help="a finished quickstart, for its peak memory"
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    res: dict = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
    }
    peak = matmul_peak()
    res["matmul_peak_gflops"] = peak
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; matmul peak {peak:,.1f} GFLOP/s"
    )
    shapes = TRAIN_SHAPES[:3:2] if a.quick else TRAIN_SHAPES
    res["train"] = bench_train(a.steps, shapes, peak, compile=not a.no_compile)
    print("\ntraining (forward + backward + AdamW), eager; share of peak = model FLOP/s / matmul peak")
    print(
        f"{'shape':24} {'batch':>5} {'ours tok/s':>10} {'HF tok/s':>9} {'ratio':>6} {'MFLOP/tok':>9} "
        f"{'GFLOP/s':>7} {'peak':>5}"
    )
    for r in res["train"]:
        print(
            f"{r['shape']:24} {r['batch']:5d} {r['ours_tokens_per_s']:10,.0f} {r['hf_tokens_per_s']:9,.0f} "
            f"{r['ratio']:5.2f}x {r['flops_per_token'] / 1e6:9.2f} {r['ours_gflops']:7.1f} "
            f"{r['share_of_matmul_peak']:5.0%}"
        )
    if not a.no_compile:
        print("\ntraining through torch.compile (both sides compiled; compile seconds ours / HF)")
        print(
            f"{'shape':24} {'ours tok/s':>10} {'HF tok/s':>9} {'ratio':>6} {'vs HF eager':>11} {'peak':>5} "
            f"{'compile s':>10}"
        )
        for r in res["train"]:
            cs = r["compile_seconds"]
            print(
                f"{r['shape']:24} {r['ours_compiled_tokens_per_s']:10,.0f} "
                f"{r['hf_compiled_tokens_per_s']:9,.0f} "
                f"{r['ratio_compiled']:5.2f}x {r['ratio_ours_compiled_to_hf_eager']:10.2f}x "
                f"{r['share_of_matmul_peak_compiled']:5.0%} {cs['ours']:5.0f}/{cs['hf']:<4.0f}"
            )
        f = res["features"] = bench_features()
        print(
            f"\nfeature pass ({f['shape']}, batch {f['batch']}, every layer, no gradients): eager "
            f"{f['eager_tokens_per_s']:,.0f} tok/s, compiled {f['compiled_tokens_per_s']:,.0f} tok/s "
            f"({f['speedup']:.2f}x; {f['compile_seconds']:.0f} s to compile)"
        )
    res["sample"] = bench_sample([8] if a.quick else [1, 8, 16])
    print("\nsampling, 28x28 width 128, 4 layers (ours: KV cache; HF: generate(use_cache=True))")
    print(f"{'batch':>5} {'ours tok/s':>11} {'HF tok/s':>10} {'ratio':>6}")
    for r in res["sample"]:
        print(
            f"{r['batch']:5d} {r['ours_tokens_per_s']:11,.0f} {r['hf_tokens_per_s']:10,.0f} "
            f"{r['ratio']:5.2f}x"
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
