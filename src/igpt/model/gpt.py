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
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from igpt.checks import is_whole
from igpt.errors import IgptError

from .decoding import generate
from .objectives import DEFAULT_OBJECTIVE, objective

# Shapes as data: (n_layer, n_embd, n_head). The igpt-* rows are the paper's; "tiny", "tiny-deep" and "small"
# fit a CPU. "tiny-deep" is the quickstart's: about tiny's cost per token, two more layers to probe.
PRESETS: dict[str, dict[str, int]] = {
    "micro": {"n_layer": 2, "n_embd": 32, "n_head": 2},  # for tests and smoke runs
    "tiny": {"n_layer": 4, "n_embd": 128, "n_head": 4},  # ~0.9M parameters at 28x28, K=16
    "tiny-deep": {"n_layer": 6, "n_embd": 96, "n_head": 3},  # ~0.7M parameters at 28x28, K=16
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
    objective: str = DEFAULT_OBJECTIVE
    """ar (causal, next-token) or bert (bidirectional, masked tokens)."""
    norm_eps: float = 1e-5
    """Epsilon inside the root-mean-square norm."""
    prefix_causal: bool = False
    """AR only: trained with prefix-causal attention (AIM's): at each step a random prefix of positions
    attends both ways and the loss skips it, so that the features (`features`, `get_intermediate_layers`)
    can be read with bidirectional attention, as they are for such a model. Logits and generation stay
    causal."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_layer", "n_embd", "n_head"):
            v = getattr(self, name)
            if not is_whole(v, 1):
                raise IgptError(f"{name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise IgptError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        objective(self.objective)  # one line naming the known objectives for any other
        if self.prefix_causal and not objective(self.objective).causal:
            raise IgptError(
                f"prefix-causal attention is an option of the AR objective (or another causal one), "
                f"not {self.objective.upper()}"
            )
        if not (isinstance(self.norm_eps, float | int) and 0 < self.norm_eps < 1):
            raise IgptError(f"norm_eps must be in (0, 1), got {self.norm_eps!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> IGPTConfig:
        """The named preset's shape (PRESETS) with `overrides` applied (None values are ignored), e.g.
        `IGPTConfig.from_preset("tiny", vocab_size=16, n_positions=196, n_layer=6)`."""
        if name not in PRESETS:
            raise IgptError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})

    def num_params(self) -> int:
        """The model's parameter count, from the shape alone (nothing is allocated)."""
        d, K, T, L = self.n_embd, self.vocab_size, self.n_positions, self.n_layer
        block = 2 * d + 12 * d * d + (9 * d if self.bias else 0)  # norms, q|k|v, proj, fc, proj (+ biases)
        mask = d if objective(self.objective).masks_inputs else 0  # the learned mask token
        return (K + 1) * d + T * d + mask + L * block + d + K * d

    def training_bytes(self, micro_batch: int) -> int:
        """About what training needs in fp32 with a micro-batch of `micro_batch` images: weights, gradients
        and optimizer state (16 bytes a parameter), the activations kept for the backward pass (about 18 x
        n_embd floats per token and layer) and the logits with their gradient (3 x K floats per token)."""
        tokens = micro_batch * self.n_positions
        acts = tokens * (self.n_layer * 18 * self.n_embd + 3 * self.vocab_size) * 4
        return 16 * self.num_params() + acts

    def check_fits_in_memory(self, share: float = 0.8, micro_batch: int | None = None) -> None:
        """Refuse a shape whose fp32 weights alone (or, with `micro_batch`, whose training at that batch: see
        `training_bytes`) would take more than `share` of this machine's memory, before anything is allocated
        or created (a hostile config.json could otherwise ask for tens of gigabytes)."""
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return
        if micro_batch:
            need = self.training_bytes(micro_batch)
            if need > share * total:
                raise IgptError(
                    f"training a model of {self.num_params():,} parameters at {micro_batch} images per "
                    f"micro-batch needs about {need / 2**30:.1f} GiB (weights, gradients, optimizer state, "
                    f"activations); this machine has {total / 2**30:.1f} GiB: choose a smaller model, "
                    "--batch-size or more --grad-accum"
                )
            return
        need = 4 * self.num_params()
        if need > share * total:
            raise IgptError(
                f"a model of {self.num_params():,} parameters needs {need / 2**30:.1f} GiB for its weights "
                f"alone; this machine has {total / 2**30:.1f} GiB of memory"
            )

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
    """x * sigmoid(1.702 x), computed as silu(1.702 x) / 1.702: the same function, through silu's fused
    kernel and backward instead of three separate operations."""
    return F.silu(1.702 * x) * (1 / 1.702)


MATMUL_ATTENTION_MAX_T = 256
"""The longest sequence whose training attention on CPU in bf16 runs as plain matrix products (see
`attention`)."""


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool | torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention of (B, nh, T, hs) queries, keys and values -> (B, nh, T, hs); `causal` is
    a bool (is_causal) or a (T, T) boolean mask (True: may attend).

    Through `F.scaled_dot_product_attention`, except in one measured case: training on CPU in bf16 with short
    sequences (T <= MATMUL_ATTENTION_MAX_T, with gradients), where the (T, T) scores are small and the same
    softmax(q k^T / sqrt(hs)) v as two batched products (the softmax in fp32) trains faster than the CPU's
    fused kernel, whose backward pass dominated the step (1.24x faster for `tiny`; elsewhere the fused kernel
    was as fast or faster: docs/decisions/probe-settings.md, benchmarks/bench_attention.py)."""
    T, S = q.shape[-2], k.shape[-2]  # causal masks align at the top left, as the fused kernel's do
    if not (
        q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and q.requires_grad
        and S <= MATMUL_ATTENTION_MAX_T
    ):
        if isinstance(causal, torch.Tensor):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal)  # (B, nh, T, hs)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, nh, T, hs)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, T, S)
    if isinstance(causal, torch.Tensor):
        att = att.masked_fill(~causal, float("-inf"))
    elif causal:
        att = att.masked_fill(torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(att.float(), dim=-1).to(v.dtype) @ v  # (B, nh, T, hs)


# One layer's key/value cache during generation: key and value buffers (B, nh, Tmax, hs) and the number of
# positions already filled (see igpt.model.decoding.KVCache).
KVSlot = tuple[torch.Tensor, torch.Tensor, int]


class Attention(nn.Module):
    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # fused q | k | v
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor, causal: bool | torch.Tensor, kv: KVSlot | None = None) -> torch.Tensor:
        """Self-attention of (B, T, C); `causal` is a bool, or a (T, T) boolean mask (True: may attend).
        With `kv` (this layer's cache buffers and the number of positions
        already in them), this chunk's keys and values are stored there and attention also reads the
        earlier ones: one prefill from position 0, or one new token after it."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv is not None:
            k_buf, v_buf, p = kv  # (B, nh, Tmax, hs) each
            k_buf[:, :, p : p + T] = k
            v_buf[:, :, p : p + T] = v
            k, v = k_buf[:, :, : p + T], v_buf[:, :, : p + T]  # (B, nh, p+T, hs)
            # a chunk that starts at 0 is causal within itself; a single new token sees every cached key
            causal = causal and p == 0 and T > 1
        y = attention(q, k, v, causal)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    act = staticmethod(quick_gelu)
    """iGPT's activation, named here so the decode step (`igpt.model.decoding`) uses the model's own."""

    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, causal: bool | torch.Tensor, kv: KVSlot | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal, kv)
        return x + self.mlp(self.ln_2(x))


class IGPT(nn.Module):
    """iGPT. `forward(tokens, mask)` returns `(logits, loss)`; `logits`, `features`,
    `get_intermediate_layers` and `generate` are the public API; the key/value cache, the one-token decode
    step and the samplers live in `igpt.model.decoding`, which does not import the model."""

    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        if torch.get_default_device().type != "meta":  # a meta model allocates nothing
            cfg.check_fits_in_memory()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size + 1, cfg.n_embd)  # row K is SOS
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        masked = objective(cfg.objective).masks_inputs
        self.mask_token = nn.Parameter(torch.zeros(cfg.n_embd)) if masked else None
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
        return objective(self.config.objective).causal

    @property
    def reads_causal(self) -> bool:
        """Whether features are read with causal attention: AR runs, except prefix-causal ones."""
        return self.causal and not self.config.prefix_causal

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
            x = self.h[i](x, self.reads_causal)
        return out

    # ------------------------------------------------------------------------------------------ API
    def forward(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor | None = None,
        reduction: str = "mean",
        prefix: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, K) and the training loss on image tokens (B, T). AR: next-token cross entropy at
        every position (the SOS predicts the first pixel). BERT: cross entropy on the positions where `mask`
        (B, T) is True, which read the mask embedding. `prefix` (AR, a 0-d integer tensor P in [1, T)):
        prefix-causal attention, where the first P input positions attend both ways and the loss starts at
        position P - 1, the first whose target no position it sees holds. `reduction` "sum" returns the
        summed NLL, for callers that normalise over a larger batch than this one."""
        T = tokens.shape[1]
        attn: bool | torch.Tensor = self.causal
        targets = tokens
        if prefix is not None:
            if not self.causal:
                raise ValueError("prefix-causal attention is for AR models")
            pos = torch.arange(T, device=tokens.device)
            inside = pos < prefix  # (T,)
            attn = (pos[:, None] >= pos[None, :]) | (inside[:, None] & inside[None, :])  # (T, T)
            targets = tokens.masked_fill(pos[None, :] < prefix - 1, -100)  # a tensor, so no recompiles
        logits = self.lm_head(self.final_states(tokens, mask, attn))  # (B, T, K)
        if not self.causal:
            if mask is None:
                raise ValueError("a BERT model's loss needs a mask")
            # unmasked positions are ignored; no boolean indexing, so shapes stay static under torch.compile
            targets = tokens.masked_fill(~mask, -100)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)
        return logits, loss

    def final_states(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None, attn: bool | torch.Tensor | None = None
    ) -> torch.Tensor:
        """The last block's output after ln_f, (B, T, d): what the output head reads and what fine-tuning and
        Hugging Face's classifier mean-pool. `attn` overrides the attention pattern (default: causal for
        AR, bidirectional for BERT)."""
        attn = self.causal if attn is None else attn
        x = self.embed(tokens, mask)
        for block in self.h:
            x = block(x, attn)
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

    def generate(
        self,
        prefix: torch.Tensor,
        n_new: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue `prefix` (B, P) by `n_new` sampled tokens -> (B, P + n_new), AR models only, with a
        key/value cache (`igpt.model.decoding`, which does not import this module). temperature 0 is greedy;
        top_k 0 or None is off."""
        return generate(self, prefix, n_new, temperature, top_k, top_p, generator)
