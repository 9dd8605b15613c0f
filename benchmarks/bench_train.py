"""Training-step throughput (forward, backward, AdamW step), ours against transformers' ImageGPT, fp32 on
CPU, at the same shape and batch, in one run. Prints tokens/s for both and the ratio (a figure, not a test).

Run:  .venv/bin/python benchmarks/bench_train.py [--steps 10] [--threads 2]
transformers is a test dependency (scripts/setup.sh --test installs it).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from igpt.model import IGPT, IGPTConfig

SHAPES = [  # (resolution, width, layers, heads, batch, clusters)
    (28, 128, 4, 4, 16, 16),
    (14, 256, 4, 8, 16, 16),
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU")
    for res, d, L, h, B, K in SHAPES:
        T = res * res
        x = torch.randint(0, K, (B, T))
        torch.manual_seed(0)
        ours = IGPT(IGPTConfig(vocab_size=K, n_positions=T, n_layer=L, n_embd=d, n_head=h)).train()
        hf = hf_model(res, d, L, h, K).train()
        inp = torch.cat([torch.full((B, 1), K), x[:, :-1]], 1)  # HF's input: [SOS, x_0 .. x_{T-2}]
        step_ours = make_step(ours, lambda m, x=x: m(x)[1])
        step_hf = make_step(hf, lambda m, x=x, inp=inp, K=K: F.cross_entropy(m(input_ids=inp).logits.reshape(-1, K),
                                                                              x.reshape(-1)))  # fmt: skip
        t_ours = time_steps(step_ours, 2, a.steps)
        t_hf = time_steps(step_hf, 2, a.steps)
        tok = B * T
        fl = flops_per_token(res, d, L, K) * tok / t_ours
        print(f"{res}x{res} width {d} layers {L} batch {B}: ours {tok / t_ours:,.0f} tokens/s, "
              f"HF {tok / t_hf:,.0f} tokens/s, ratio {t_hf / t_ours:.2f}x; ours {fl / 1e9:.1f} GFLOP/s")  # fmt: skip


if __name__ == "__main__":
    main()
