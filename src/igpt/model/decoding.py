"""Decoding with a key/value cache: the cache, the one-token decode step, the token samplers (temperature,
top-k, top-p) and `generate`, the left-to-right loop that `IGPT.generate` runs.

This module does not import the model: it works on any module laid out as `igpt.model.gpt.IGPT` (embeddings
`wte`/`wpe`, blocks `h` with `attn` and `mlp`, `ln_f`, `lm_head`, `config`), so the model can offer
`generate` while the dependency runs one way, model -> decoding. One prefill pass over [SOS, prefix] fills a
preallocated cache, then `decode_step` computes one position at a time with the blocks' maths written out
with as few operations as it allows (at small batch, the time per token is mostly per-operation overhead).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from igpt.checks import check_seed
from igpt.errors import IgptError


class KVCache:
    """Preallocated keys and values of every layer for incremental decoding: (L, B, nh, Tmax, hs) each."""

    def __init__(self, cfg: Any, batch: int, max_len: int, device, dtype):
        hs = cfg.n_embd // cfg.n_head
        self.k = torch.zeros(cfg.n_layer, batch, cfg.n_head, max_len, hs, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = 0  # positions filled so far

    def slot(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Layer `layer`'s buffers and fill position, as `Block.forward` takes them."""
        return self.k[layer], self.v[layer], self.pos


@torch.no_grad()
def generate(
    model: Any,
    prefix: torch.Tensor,
    n_new: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue `prefix` (B, P) by `n_new` sampled tokens -> (B, P + n_new), AR models only."""
    out = prefix.clone()
    for buf, _ in generate_steps(model, prefix, n_new, temperature, top_k, top_p, generator):
        out = buf
    return out


@torch.no_grad()
def generate_steps(
    model: Any,
    prefix: torch.Tensor,
    n_new: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, int]]:
    """`generate`, one token at a time: yields (buffer (B, P + n_new), tokens filled so far) after every
    sampled token, so a caller can show a completion as it grows. The buffer is reused between yields."""
    check_sampling_options(temperature, top_k, top_p)
    if not model.causal:
        raise IgptError("generate needs an AR model; BERT runs complete images by mask-predict")
    B, P = prefix.shape
    if n_new < 0 or P + n_new > model.config.n_positions:
        raise IgptError(f"prefix {P} + {n_new} new tokens must fit the context of {model.config.n_positions}")
    if n_new == 0:
        return
    dev = model.wte.weight.device
    w = DecodeWeights(model)  # in the autocast dtype when autocast is on, so the decode step casts nothing
    cache = KVCache(model.config, B, P + n_new, dev, w.dtype)
    out = torch.zeros(B, P + n_new, dtype=torch.long, device=dev)
    out[:, :P] = prefix
    with _decode_attention(dev):
        # prefill: [SOS, prefix] through the blocks in one causal pass, filling the cache
        sos = torch.full((B, 1), model.config.sos_id, dtype=torch.long, device=dev)
        inp = torch.cat([sos, prefix.to(dev, torch.long)], dim=1)  # (B, P+1)
        x = model.wte(inp) + model.wpe.weight[: P + 1]
        for i, block in enumerate(model.h):
            x = block(x, True, cache.slot(i))
        cache.pos = P + 1
        logits = model.lm_head(model.ln_f(x[:, -1]))  # (B, K)
    for t in range(n_new):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        out[:, P + t] = nxt
        yield out, P + t + 1
        if t + 1 < n_new:
            with _decode_attention(dev):
                logits = decode_step(model, nxt, cache, w)


def decode_step(model: Any, tok: torch.Tensor, cache: KVCache, w: DecodeWeights) -> torch.Tensor:
    """Logits (B, K) for the position after the cache's, given the token there (B,): the blocks' maths for
    one position, written with as few operations as it allows, because at small batch the time per
    token is mostly per-operation overhead. Appends this position's keys and values to the cache."""
    B, c, p = tok.shape[0], model.config, cache.pos
    d, nh, eps = c.n_embd, c.n_head, c.norm_eps
    x = (model.wte.weight[tok] + model.wpe.weight[p]).to(w.dtype)  # (B, d)
    for i, (g1, w_qkv, b_qkv, w_o, b_o, g2, w_fc, b_fc, w_pr, b_pr) in enumerate(w.layers):
        qkv = _affine(F.rms_norm(x, (d,), g1, eps), w_qkv, b_qkv).view(B, 3, nh, 1, d // nh)
        cache.k[i, :, :, p : p + 1] = qkv[:, 1]  # (B, nh, 1, hs)
        cache.v[i, :, :, p : p + 1] = qkv[:, 2]
        k, v = cache.k[i, :, :, : p + 1], cache.v[i, :, :, : p + 1]  # (B, nh, p+1, hs)
        y = F.scaled_dot_product_attention(qkv[:, 0], k, v).reshape(B, d)  # heads side by side
        x = _affine(y, w_o, b_o, residual=x)
        u = _affine(F.rms_norm(x, (d,), g2, eps), w_fc, b_fc)  # (B, 4d)
        x = _affine(F.silu(u) if w.folded else w.act(u), w_pr, b_pr, residual=x)
    cache.pos = p + 1
    return F.rms_norm(x, (d,), w.g_f, eps) @ w.w_head


def _decode_attention(device: torch.device):
    """On CUDA, attention over a growing key/value cache without the cuDNN backend: cuDNN builds a graph for
    every new sequence length, so a token would cost a graph build. Elsewhere, SDPA's own choice."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _affine(
    x: torch.Tensor, wt: torch.Tensor, b: torch.Tensor | None, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ wt (+ b) (+ residual) for (B, n) rows, with the residual added inside the product (addmm)."""
    y = x @ wt if residual is None else torch.addmm(residual, x, wt)
    return y if b is None else y + b


class DecodeWeights:
    """A model's weights arranged for `decode_step`: matrices as transposed views for `x @ W^T`. A model
    small enough to copy (FOLD_LIMIT) also has each norm's gain folded into the matrix that follows it, and
    quick-gelu's 1.702 into the MLP's matrices, so a norm is one call without a gain and quick-gelu is one
    silu, fewer operations per token. Larger models keep their own weights (no copies)."""

    FOLD_LIMIT = 32_000_000

    def __init__(self, model: Any):
        self.folded = model.num_params() <= self.FOLD_LIMIT
        self.act = model.h[0].mlp.act  # the model's own activation (quick-gelu), where it is not folded
        dev = model.wte.weight.device.type
        on = torch.is_autocast_enabled(dev)
        self.dtype = torch.get_autocast_dtype(dev) if on else model.wte.weight.dtype
        self.layers: list[tuple] = []
        for blk in model.h:
            a, m, g1, g2 = blk.attn, blk.mlp, blk.ln_1.weight, blk.ln_2.weight
            w_qkv, w_fc, w_pr, b_fc = a.c_attn.weight, m.c_fc.weight, m.c_proj.weight, m.c_fc.bias
            if self.folded:  # norm(x) W^T = (x / rms(x)) (W * g)^T; silu(1.702 u) / 1.702 = quick_gelu(u)
                w_qkv, w_fc, w_pr = w_qkv * g1, w_fc * (g2 * 1.702), w_pr / 1.702
                b_fc = None if b_fc is None else b_fc * 1.702
                g1 = g2 = None
            self.layers.append(
                (
                    g1,
                    w_qkv.t(),
                    a.c_attn.bias,
                    a.c_proj.weight.t(),
                    a.c_proj.bias,
                    g2,
                    w_fc.t(),
                    b_fc,
                    w_pr.t(),
                    m.c_proj.bias,
                )
            )
        head, self.g_f = model.lm_head.weight, model.ln_f.weight
        if self.folded:
            head, self.g_f = head * self.g_f, None
        self.w_head = head.t()
        if on:  # one cast per generation instead of autocast casting every matrix at every token
            self.layers = [tuple(None if t is None else t.to(self.dtype) for t in lay) for lay in self.layers]
            self.w_head = self.w_head.to(self.dtype)
            self.g_f = None if self.g_f is None else self.g_f.to(self.dtype)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of (B, K) logits: greedy at temperature 0, otherwise softmax sampling after
    temperature, top-k (keep the k largest; 0 or None is off, as in Hugging Face) and top-p (keep the smallest
    set whose probability reaches p)."""
    check_sampling_options(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        srt, idx = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(srt, -1).cumsum(-1)
        drop = cum - torch.softmax(srt, -1) >= top_p  # mass before this token already reaches p
        srt = srt.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, srt)
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


MIN_TEMPERATURE = 1e-6  # below this (but above 0, which is greedy), logits / T can overflow float32


def check_sampling_options(
    temperature: float, top_k: int | None, top_p: float | None, seed: int | None = None
) -> None:
    """Refuse impossible sampling settings with one clear message."""
    if not math.isfinite(temperature) or temperature < 0 or 0 < temperature < MIN_TEMPERATURE:
        raise IgptError(
            f"--temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {temperature:g}"
        )
    if top_k is not None and top_k < 0:
        raise IgptError(f"--top-k must be 0 (off) or positive, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise IgptError(f"--top-p must be in (0, 1], got {top_p}")
    if seed is not None:
        check_seed(seed)
