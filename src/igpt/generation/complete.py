"""Completing images: AR runs continue the kept rows left to right with the key/value cache
(`igpt.model.decoding`); BERT runs cannot sample left to right, so they complete by iterative mask-predict:
the hidden region starts fully masked; each round predicts every masked position, keeps the most confident
share of the predictions and masks the rest again, until none are left (a linear schedule over `rounds`)."""

from __future__ import annotations

import torch

from igpt.errors import IgptError
from igpt.model.decoding import (
    DecodeWeights,
    KVCache,
    check_sampling_options,
    decode_step,
    generate,
    generate_steps,
    sample_next,
)
from igpt.model.gpt import IGPT

__all__ = [
    "DecodeWeights",
    "KVCache",
    "check_sampling_options",
    "complete",
    "decode_step",
    "generate",
    "generate_steps",
    "mask_predict",
    "sample_next",
]


@torch.no_grad()
def mask_predict(
    model: IGPT,
    tokens: torch.Tensor,
    hidden: torch.Tensor,
    rounds: int = 8,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fill the positions where `hidden` (B, T) is True, BERT style, over `rounds` rounds."""
    out = tokens.clone()
    masked = hidden.clone()
    total = hidden.sum(1)  # (B,)
    for r in range(rounds):
        if not masked.any():
            break
        logits = model.logits(out, masked)  # (B, T, K)
        B, T, K = logits.shape
        flat = logits.reshape(B * T, K)
        pick = sample_next(flat, temperature, top_k, top_p, generator).view(B, T)
        conf = torch.log_softmax(logits.float(), -1).gather(-1, pick[..., None]).squeeze(-1)  # (B, T)
        out = torch.where(masked, pick, out)
        # how many stay masked after this round: a linear schedule reaching 0 at the last round
        remain = (total.float() * (1 - (r + 1) / rounds)).floor().long()
        conf = conf.masked_fill(~masked, float("inf"))  # known tokens are never re-masked
        order = conf.argsort(dim=1)  # least confident first
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(T, device=order.device).expand(B, T))
        masked = masked & (ranks < remain[:, None])
    return out


@torch.no_grad()
def complete(
    model: IGPT,
    tokens: torch.Tensor,
    keep: int,
    num: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    rounds: int = 8,
) -> torch.Tensor:
    """Keep the first `keep` tokens of each sequence (B, T) and sample the rest, `num` times per image:
    (B, num, T). With raster or snake order, keeping R x rows tokens keeps the top rows. `keep` 0 samples
    unconditionally (the tokens' values are then unused)."""
    check_sampling_options(temperature, top_k, top_p, seed)
    B, T = tokens.shape
    if not 0 <= keep <= T:
        raise IgptError(f"cannot keep {keep} of {T} tokens")
    gen = torch.Generator(device=tokens.device).manual_seed(seed)  # on the tokens' device, as sampling is
    rep = tokens.repeat_interleave(num, dim=0)  # (B*num, T)
    if keep == T:
        out = rep
    elif model.causal:
        out = generate(model, rep[:, :keep], T - keep, temperature, top_k, top_p, generator=gen)
    else:
        hidden = torch.zeros_like(rep, dtype=torch.bool)
        hidden[:, keep:] = True
        out = mask_predict(model, rep, hidden, rounds, temperature, top_k, top_p, generator=gen)
    return out.view(B, num, T)
