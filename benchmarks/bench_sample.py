"""Sampling throughput (a figure, not a test): ours with the key/value cache, ours without it (a full forward
pass per new token), and transformers' `ImageGPTForCausalImageModeling.generate(use_cache=True)`, at the same
shape, batch and weights, fp32 on CPU, in one run.

Run:  .venv/bin/python benchmarks/bench_sample.py [--batch 8] [--res 28] [--width 128] [--layers 4]
"""

from __future__ import annotations

import argparse
import time

import torch

from igpt.convert import igpt_to_hf_state
from igpt.model import IGPT, IGPTConfig, sample_next


@torch.no_grad()
def sample_without_cache(m: IGPT, B: int, n: int, gen: torch.Generator) -> torch.Tensor:
    seq = torch.zeros(B, 0, dtype=torch.long)
    for _ in range(n):
        logits = m.logits(torch.cat([seq, torch.zeros(B, 1, dtype=torch.long)], 1))[:, -1]
        seq = torch.cat([seq, sample_next(logits, 1.0, None, None, gen)[:, None]], 1)
    return seq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--res", type=int, default=28)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--clusters", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-cache-tokens", type=int, default=196, help="tokens sampled on the uncached path")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    T, K, B = a.res * a.res, a.clusters, a.batch
    torch.manual_seed(0)
    cfg = IGPTConfig(vocab_size=K, n_positions=T, n_layer=a.layers, n_embd=a.width, n_head=a.heads, bias=True)
    ours = IGPT(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.05)
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    hf = ImageGPTForCausalImageModeling(ImageGPTConfig(vocab_size=K + 1, n_positions=T, n_embd=a.width,
                                                       n_layer=a.layers, n_head=a.heads, resid_pdrop=0.0,
                                                       embd_pdrop=0.0, attn_pdrop=0.0)).eval()  # fmt: skip
    hf.load_state_dict(igpt_to_hf_state(ours.state_dict(), cfg))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {a.res}x{a.res} ({T} tokens), width "
          f"{a.width}, {a.layers} layers, batch {B}, fp32 CPU")  # fmt: skip

    ours.generate(torch.zeros(B, 0, dtype=torch.long), 16)  # warm-up
    t = time.perf_counter()
    ours.generate(torch.zeros(B, 0, dtype=torch.long), T, generator=torch.Generator().manual_seed(0))
    r_ours = B * T / (time.perf_counter() - t)

    n = min(a.no_cache_tokens, T)
    t = time.perf_counter()
    sample_without_cache(ours, B, n, torch.Generator().manual_seed(0))
    r_nocache = B * n / (time.perf_counter() - t)

    sos = torch.full((B, 1), K)
    with torch.no_grad():
        hf.generate(input_ids=sos, attention_mask=torch.ones_like(sos), max_length=17, do_sample=True, top_k=0,
                    use_cache=True, pad_token_id=K)  # fmt: skip
        t = time.perf_counter()
        hf.generate(input_ids=sos, attention_mask=torch.ones_like(sos), max_length=T + 1, do_sample=True, top_k=0,
                    use_cache=True, pad_token_id=K)  # fmt: skip
    r_hf = B * T / (time.perf_counter() - t)
    print(f"ours, KV cache:           {r_ours:10,.0f} tokens/s")
    print(
        f"ours, no cache ({n} tok): {r_nocache:10,.0f} tokens/s  (cache speed-up {r_ours / r_nocache:.1f}x)"
    )
    print(f"HF generate(use_cache):   {r_hf:10,.0f} tokens/s  (ours / HF = {r_ours / r_hf:.2f}x)")


if __name__ == "__main__":
    main()
