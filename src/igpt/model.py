"""The iGPT model in one file: a GPT-2 decoder with iGPT's specifics, in plain PyTorch.

- pre-norm blocks: x + attn(norm(x)); x + mlp(norm(x))
- the norm divides by the root mean square and scales: no centring, no bias (eps 1e-5)
- quick-gelu x * sigmoid(1.702 x) in an MLP of width 4d
- learned position embeddings; untied input and output embeddings
- an SOS token that is input only: K + 1 input embeddings (row K is SOS), K output logits
- attention through scaled_dot_product_attention: causal for AR, bidirectional for BERT, where masked
  positions read a learned mask embedding instead of their token

Parameter names follow Hugging Face's ImageGPT (wte, wpe, h.i.ln_1, attn.c_attn, ...), so its weights map
one to one (Conv1D's (in, out) weights are transposed on conversion).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

OBJECTIVES = ("ar", "bert")

# Shapes as data: (n_layer, n_embd, n_head). The igpt-* rows are the paper's; "tiny" and "small" fit a CPU.
PRESETS: dict[str, dict[str, int]] = {
    "micro": {"n_layer": 2, "n_embd": 32, "n_head": 2},  # for tests and smoke runs
    "tiny": {"n_layer": 4, "n_embd": 128, "n_head": 4},  # ~0.9M parameters at 28x28, K=16
    "small": {"n_layer": 8, "n_embd": 256, "n_head": 8},  # ~6.5M parameters at 28x28, K=16
    "igpt-s": {"n_layer": 24, "n_embd": 512, "n_head": 8},
    "igpt-m": {"n_layer": 36, "n_embd": 1024, "n_head": 8},
    "igpt-l": {"n_layer": 48, "n_embd": 1536, "n_head": 16},
    "igpt-xl": {"n_layer": 60, "n_embd": 3072, "n_head": 24},
}


@dataclass
class IGPTConfig:
    """The model's shape. Everything a run needs to rebuild the module lives here."""

    vocab_size: int = 512
    """K: palette clusters, the number of output classes. Inputs have K + 1 ids (K is SOS)."""
    n_positions: int = 1024
    """T: sequence length, resolution squared."""
    n_layer: int = 24
    """Number of transformer blocks."""
    n_embd: int = 512
    """Width d of the residual stream."""
    n_head: int = 8
    """Attention heads; n_embd must divide evenly."""
    bias: bool = False
    """Biases in the linear layers (OpenAI's model has none; Hugging Face's format carries them)."""
    objective: str = "ar"
    """ar (causal, next-token) or bert (bidirectional, masked tokens)."""
    norm_eps: float = 1e-5
    """Epsilon inside the root-mean-square norm."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_layer", "n_embd", "n_head"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be ar or bert, got '{self.objective}'")

    @property
    def sos_id(self) -> int:
        return self.vocab_size

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g: iGPT's norm, without centring or bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x), computed as silu(1.702 x) / 1.702: the same function, but silu's fused kernel
    and backward make it about 1.6x faster on CPU than the three-op form."""
    return F.silu(1.702 * x) * (1 / 1.702)


class KVCache:
    """Preallocated keys and values of every layer for incremental decoding: (L, B, nh, Tmax, hs) each."""

    def __init__(self, cfg: IGPTConfig, batch: int, max_len: int, device, dtype):
        hs = cfg.n_embd // cfg.n_head
        self.k = torch.zeros(cfg.n_layer, batch, cfg.n_head, max_len, hs, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = 0  # positions filled so far


class Attention(nn.Module):
    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # fused q | k | v
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(
        self, x: torch.Tensor, causal: bool, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            p = cache.pos
            cache.k[layer, :, :, p : p + T] = k
            cache.v[layer, :, :, p : p + T] = v
            k, v = cache.k[layer, :, :, : p + T], cache.v[layer, :, :, : p + T]  # (B, nh, p+T, hs)
            # a chunk that starts at 0 is causal within itself; a single new token sees every cached key
            causal = causal and p == 0 and T > 1
            assert p == 0 or T == 1, "the cache takes one prefill from position 0, then one token at a time"
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(quick_gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, causal: bool, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal, cache, layer)
        return x + self.mlp(self.ln_2(x))


class IGPT(nn.Module):
    """iGPT. `forward(tokens, mask)` returns `(logits, loss)`; `logits`, `features`,
    `get_intermediate_layers` and `generate` are the public API."""

    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size + 1, cfg.n_embd)  # row K is SOS
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.mask_token = nn.Parameter(torch.zeros(cfg.n_embd)) if cfg.objective == "bert" else None
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) weights, zero biases, residual projections scaled by
        1/sqrt(2 n_layer); the output head starts at zero, so the first loss is exactly ln K."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * self.config.n_layer))
            elif p.dim() >= 2 or name == "mask_token":
                nn.init.normal_(p, 0.0, 0.02)
            else:
                nn.init.ones_(p)  # norm gains
        nn.init.zeros_(self.lm_head.weight)

    @property
    def causal(self) -> bool:
        return self.config.objective == "ar"

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------------------------ trunk
    def embed(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings (B, T, d) for image tokens (B, T). AR: the input is [SOS, x_0 .. x_{T-2}], so
        position t sees tokens before t. BERT: the tokens themselves, masked positions replaced by the
        learned mask embedding."""
        B, T = tokens.shape
        if self.causal:
            sos = torch.full((B, 1), self.config.sos_id, dtype=tokens.dtype, device=tokens.device)
            inp = torch.cat([sos, tokens[:, :-1]], dim=1)
            x = self.wte(inp)  # (B, T, d)
        else:
            x = self.wte(tokens)  # (B, T, d)
            if mask is not None:
                x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        return x + self.wpe.weight[:T]

    def get_intermediate_layers(
        self, tokens: torch.Tensor, layers: list[int], mask: torch.Tensor | None = None, norm: bool = True
    ) -> dict[int, torch.Tensor]:
        """Hidden states (B, T, d) of the chosen layers (0 = after the embeddings, n_layer = last block's
        output). With `norm`, each is passed through the norm that the model itself applies to it next:
        block l's ln_1 for l < n_layer, ln_f for the last."""
        L = self.config.n_layer
        bad = [i for i in layers if not 0 <= i <= L]
        if bad:
            raise ValueError(f"layers {bad} out of range 0..{L}")
        want, out = set(layers), {}
        x = self.embed(tokens, mask)
        for i in range(L + 1):
            if i in want:
                out[i] = (self.h[i].ln_1(x) if i < L else self.ln_f(x)) if norm else x
            if i == max(want):
                break
            x = self.h[i](x, self.causal)
        return out

    # ------------------------------------------------------------------------------------------ API
    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None, reduction: str = "mean"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, K) and the training loss on image tokens (B, T). AR: next-token cross entropy at
        every position (the SOS predicts the first pixel). BERT: cross entropy on the positions where `mask`
        (B, T) is True, which read the mask embedding. `reduction` "sum" returns the summed NLL, for callers
        that normalise over a larger batch than this one."""
        logits = self.lm_head(self.final_states(tokens, mask))  # (B, T, K)
        if self.causal:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction=reduction)
        else:
            if mask is None:
                raise ValueError("a BERT model's loss needs a mask")
            # unmasked positions are ignored; no boolean indexing, so shapes stay static under torch.compile
            targets = tokens.masked_fill(~mask, -100)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)
        return logits, loss

    def final_states(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The last block's output after ln_f, (B, T, d): what the output head reads and what fine-tuning and
        Hugging Face's classifier mean-pool."""
        x = self.embed(tokens, mask)
        for block in self.h:
            x = block(x, self.causal)
        return self.ln_f(x)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, K) logits; for AR, row t predicts token t from tokens before t."""
        return self.lm_head(self.final_states(tokens, mask))

    @torch.no_grad()
    def features(
        self, tokens: torch.Tensor, layers: list[int], mask: torch.Tensor | None = None, batch_size: int = 256
    ) -> dict[int, torch.Tensor]:
        """The paper's probe features: for each chosen layer, the normed hidden state averaged over positions,
        (B, d) in float32, computed in batches without gradients."""
        out: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
        for s in range(0, len(tokens), batch_size):
            m = None if mask is None else mask[s : s + batch_size]
            hs = self.get_intermediate_layers(tokens[s : s + batch_size], layers, m)
            for i, h in hs.items():
                out[i].append(h.float().mean(1))
        return {i: torch.cat(v) for i, v in out.items()}

    @torch.no_grad()
    def generate(
        self,
        prefix: torch.Tensor,
        n_new: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue `prefix` (B, P) by `n_new` sampled tokens -> (B, P + n_new), AR runs only. Uses a
        preallocated key/value cache: one prefill pass over [SOS, prefix], then one position per token.
        temperature 0 means greedy."""
        out = prefix.clone()
        for buf, _ in self.generate_steps(prefix, n_new, temperature, top_k, top_p, generator):
            out = buf
        return out

    @torch.no_grad()
    def generate_steps(
        self,
        prefix: torch.Tensor,
        n_new: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[tuple[torch.Tensor, int]]:
        """`generate`, one token at a time: yields (buffer (B, P + n_new), tokens filled so far) after every
        sampled token, so a caller can show a completion as it grows. The buffer is reused between yields."""
        if not self.causal:
            raise ValueError("generate needs an AR model; BERT runs complete images by mask-predict")
        B, P = prefix.shape
        if P + n_new > self.config.n_positions:
            raise ValueError(
                f"prefix {P} + {n_new} new tokens exceed the context of {self.config.n_positions}"
            )
        if n_new <= 0:
            return
        dev = self.wte.weight.device
        w = DecodeWeights(self)  # in the autocast dtype when autocast is on, so the decode step casts nothing
        cache = KVCache(self.config, B, P + n_new, dev, w.dtype)
        out = torch.zeros(B, P + n_new, dtype=torch.long, device=dev)
        out[:, :P] = prefix
        with _decode_attention(dev):
            # prefill: [SOS, prefix] through the blocks in one causal pass, filling the cache
            sos = torch.full((B, 1), self.config.sos_id, dtype=torch.long, device=dev)
            inp = torch.cat([sos, prefix.to(dev, torch.long)], dim=1)  # (B, P+1)
            x = self.wte(inp) + self.wpe.weight[: P + 1]
            for i, block in enumerate(self.h):
                x = block(x, True, cache, i)
            cache.pos = P + 1
            logits = self.lm_head(self.ln_f(x[:, -1]))  # (B, K)
        for t in range(n_new):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            out[:, P + t] = nxt
            yield out, P + t + 1
            if t + 1 < n_new:
                with _decode_attention(dev):
                    logits = self.decode_step(nxt, cache, w)

    def decode_step(self, tok: torch.Tensor, cache: KVCache, w: DecodeWeights) -> torch.Tensor:
        """Logits (B, K) for the position after the cache's, given the token there (B,): the blocks' maths for
        one position, written with as few operations as it allows, because at small batch the time per
        token is mostly per-operation overhead. Appends this position's keys and values to the cache."""
        B, c, p = tok.shape[0], self.config, cache.pos
        d, nh, eps = c.n_embd, c.n_head, c.norm_eps
        x = (self.wte.weight[tok] + self.wpe.weight[p]).to(w.dtype)  # (B, d)
        for i, (g1, w_qkv, b_qkv, w_o, b_o, g2, w_fc, b_fc, w_pr, b_pr) in enumerate(w.layers):
            qkv = _affine(F.rms_norm(x, (d,), g1, eps), w_qkv, b_qkv).view(B, 3, nh, 1, d // nh)
            cache.k[i, :, :, p : p + 1] = qkv[:, 1]  # (B, nh, 1, hs)
            cache.v[i, :, :, p : p + 1] = qkv[:, 2]
            k, v = cache.k[i, :, :, : p + 1], cache.v[i, :, :, : p + 1]  # (B, nh, p+1, hs)
            y = F.scaled_dot_product_attention(qkv[:, 0], k, v).reshape(B, d)  # heads side by side
            x = _affine(y, w_o, b_o, residual=x)
            u = _affine(F.rms_norm(x, (d,), g2, eps), w_fc, b_fc)  # (B, 4d)
            x = _affine(F.silu(u) if w.folded else quick_gelu(u), w_pr, b_pr, residual=x)
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
    """A model's weights arranged for `IGPT.decode_step`: matrices as transposed views for `x @ W^T`. A model
    small enough to copy (FOLD_LIMIT) also has each norm's gain folded into the matrix that follows it, and
    quick-gelu's 1.702 into the MLP's matrices, so a norm is one call without a gain and quick-gelu is one
    silu; that saves about 7% per token at width 128. Larger models keep their own weights (no copies)."""

    FOLD_LIMIT = 32_000_000

    def __init__(self, model: IGPT):
        self.folded = model.num_params() <= self.FOLD_LIMIT
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
            self.layers.append((g1, w_qkv.t(), a.c_attn.bias, a.c_proj.weight.t(), a.c_proj.bias, g2, w_fc.t(),
                                b_fc, w_pr.t(), m.c_proj.bias))  # fmt: skip
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
    temperature, top-k (keep the k largest) and top-p (keep the smallest set whose probability reaches p)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
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
