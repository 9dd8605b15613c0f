"""The fine-tuned classifier: the backbone with a linear head on its pooled final normed states (the paper's
mean pool, or a coarse grid), the head's start from a probe of the features, the augmentation fine-tuning
trains with, and accuracy."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from igpt.data.palette import order_index
from igpt.errors import IgptError
from igpt.hardware import muon_ns_dtype
from igpt.model.gpt import IGPT
from igpt.probes.features import extract_features, grid_side, pool_states
from igpt.probes.logistic import feature_std, fit_logistic, fit_logistic_many
from igpt.training.engine import autocast, mirror_index, random_flips
from igpt.training.optim import Optimizers

from .config import FinetuneConfig


def check_layer(layer: int, n_layer: int) -> None:
    """Refuse a head layer that is not a block of an `n_layer`-block model, in one line."""
    if not 1 <= layer <= n_layer:
        raise IgptError(f"--layer {layer} is not a block of this {n_layer}-layer model; choose 1..{n_layer}")


def truncate(backbone: IGPT, layer: int) -> IGPT:
    """The backbone cut at `layer` (1..n_layer): its first `layer` blocks, with block `layer`'s input norm as
    the final norm, so that `final_states` of the result are exactly the probe's features of that layer
    (`get_intermediate_layers`) and the blocks above, which a head on this layer would not read, cost
    nothing. The output head is kept, so the generative loss still has a head (now read from `layer`)."""
    L = backbone.config.n_layer
    check_layer(layer, L)
    if layer == L:
        return backbone
    cfg = dataclasses.replace(backbone.config, n_layer=layer)
    with torch.device("meta"):
        cut = IGPT(cfg)
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith(("h.", "ln_f."))}
    state |= {f"h.{i}.{k}": v for i in range(layer) for k, v in backbone.h[i].state_dict().items()}
    state["ln_f.weight"] = backbone.h[layer].ln_1.weight.detach()
    cut.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    return cut


class Classifier(nn.Module):
    """Backbone + linear head on pooled final normed states; `forward` returns (class logits, L_GEN).

    `pool` is "mean" (the paper's: the mean over positions) or a coarse spatial grid of means
    ("grid" 2x2, "grid3" 3x3; `features.pool_states`), which keeps where in the image a feature was seen.
    The pooled features are standardised with fixed statistics of the training set (buffers set by
    `standardise_head`) before the head: averaged over positions they vary little between images, and a head
    on the raw pool needs weights so large that it learns slowly and amplifies every change of the
    backbone."""

    def __init__(
        self, backbone: IGPT, num_classes: int, pool: str = "mean", resolution: int = 0, order: str = "raster"
    ):
        super().__init__()
        self.backbone = backbone
        self.pool, self.resolution, self.order = pool, resolution, order
        d = backbone.config.n_embd * grid_side(pool) ** 2
        self.head = nn.Linear(d, num_classes)
        self.register_buffer("feat_mean", torch.zeros(d))
        self.register_buffer("feat_std", torch.ones(d))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone.final_states(tokens, mask)  # (B, T, d)
        pooled = self.pooled(h)  # (B, d * cells)
        logits = self.head((pooled - self.feat_mean) / self.feat_std)  # (B, C)
        gen = self.backbone.lm_head(h)  # (B, T, K)
        if self.backbone.causal:
            l_gen = F.cross_entropy(gen.flatten(0, 1), tokens.flatten())
        elif mask is not None and mask.any():
            l_gen = F.cross_entropy(gen[mask], tokens[mask])
        else:
            l_gen = gen.sum() * 0.0
        return logits, l_gen

    def pooled(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, d) final states -> (B, d * cells) head input."""
        return pool_states(h, self.pool, self.resolution or None, self.order)


class Augment:
    """Random flips (`engine.random_flips`, where `flip` is set) and translations up to `shift` pixels (edges
    replicated: a crop of a padded image), applied in token space for either sequence order."""

    def __init__(self, resolution: int, order: str, shift: int, flip: bool):
        self.R, self.shift = resolution, shift
        self.mirror = mirror_index(resolution, order) if flip else None
        self.seq_to_raster = torch.from_numpy(np.argsort(order_index(resolution, order)))
        self.raster_to_seq = torch.from_numpy(order_index(resolution, order))

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        B, R = x.shape[0], self.R
        if self.mirror is not None:
            x = random_flips(x, torch.rand(B, generator=gen) < 0.5, self.mirror)
        g = x[:, self.seq_to_raster]  # (B, R*R) in raster order
        ii = torch.arange(R)
        dy = torch.randint(-self.shift, self.shift + 1, (B, 1, 1), generator=gen)
        dx = torch.randint(-self.shift, self.shift + 1, (B, 1, 1), generator=gen)
        rows = (ii.view(1, R, 1) - dy).clamp(0, R - 1)
        cols = (ii.view(1, 1, R) - dx).clamp(0, R - 1)
        idx = (rows * R + cols).view(B, R * R)
        return g.gather(1, idx)[:, self.raster_to_seq]


HEAD_LAMBDAS = (1e-1, 1e-2, 1e-3, 1e-4)
"""L2 strengths the head's probe start chooses from on the validation rows (1e-2 without any)."""


def standardise_head(
    model: Classifier,
    tokens: np.ndarray,
    labels: np.ndarray,
    C: int,
    device: str,
    probe: bool,
    val: tuple[np.ndarray, np.ndarray] | None = None,
) -> float | None:
    """Set the head's feature statistics from up to 10,000 training rows and, with `probe`, start the head
    at a linear probe of those standardised features (linear probe, then fine-tune) instead of at zero. With
    `val` (tokens, labels: the rows that early stopping reads) the probe's L2 strength is the one of
    HEAD_LAMBDAS that scores best there; returns it (None without a probe)."""
    n = model.backbone.config.n_layer

    def feats(t: np.ndarray) -> torch.Tensor:
        kw = {"pool": model.pool, "resolution": model.resolution or None, "order": model.order}
        return extract_features(model.backbone, t, [n], device=device, **kw)[n]

    x = feats(tokens)
    model.feat_mean.copy_(x.mean(0))
    model.feat_std.copy_(feature_std(x))
    if not probe:
        model.train()
        return None
    stats = (model.feat_mean.cpu(), model.feat_std.cpu())
    y = torch.from_numpy(labels)
    if val is not None and len(val[1]):
        xva, yva = feats(val[0]), torch.from_numpy(np.asarray(val[1]))
        fits = fit_logistic_many(x, y, C, list(HEAD_LAMBDAS), stats=stats, device=device)
        p = max(fits, key=lambda f: (f.accuracy(xva, yva), f.lam))  # ties: the stronger regularisation
    else:
        p = fit_logistic(x, y, C, 1e-2, stats=stats, device=device)
    with torch.no_grad():
        model.head.weight.copy_(p.weight.T)
        model.head.bias.copy_(p.bias)
    model.train()
    return p.lam


@torch.no_grad()
def accuracy(
    model: Classifier,
    tokens: np.ndarray,
    labels: np.ndarray,
    device: str,
    precision: str = "fp32",
    batch: int = 128,
    batches: int | None = None,
) -> float:
    """Share of `tokens` whose predicted class is `labels`, in eval mode (under bf16 autocast with
    `precision` bf16). `batches`: run exactly this many forward passes (at least those the rows need),
    the extra ones on a repeated row and not counted, so that every FSDP rank runs the same collectives."""
    model.eval()
    correct = 0
    starts = list(range(0, len(tokens), batch))
    for s in starts + [None] * max(0, (batches or 0) - len(starts)):
        rows = slice(s, s + batch) if s is not None else slice(0, 1)
        x = torch.from_numpy(np.asarray(tokens[rows], dtype=np.int64)).to(device)
        if not len(x):  # an empty share: one dummy row, for the collectives
            x = torch.zeros(1, model.backbone.config.n_positions, dtype=torch.long, device=device)
        with autocast(device, precision):
            logits = model(x)[0]
        if s is None:
            continue
        pred = logits.argmax(-1).cpu().numpy()
        correct += int((pred == labels[s : s + batch]).sum())
    model.train()
    return correct / max(1, len(tokens))


def make_optimizer(model: Classifier, args: FinetuneConfig, lr: float) -> torch.optim.Optimizer | Optimizers:
    """AdamW over the layer-decay groups, or Muon for the blocks' matrices beside AdamW for the rest (no
    weight decay either way); every group carries the `scale` the schedule multiplies its rate by."""
    if args.optimizer == "adamw":
        return torch.optim.AdamW(
            param_groups(model, args.layer_decay), lr=lr, betas=(0.9, 0.95), weight_decay=0.0
        )
    named = [(n.removeprefix("backbone."), p) for n, p in model.named_parameters()]
    return Optimizers(named, "muon", lr, 0.0, 0.95, fused=False, ns_dtype=muon_ns_dtype(args.device))


def param_groups(model: Classifier, decay: float) -> list[dict[str, Any]]:
    """AdamW groups with a rate `scale`: decay^(L - i) for block i, decay^(L + 1) for the embeddings
    (and BERT's mask token), 1 for the final norm, the output head and the classifier head."""
    L = model.backbone.config.n_layer
    scales: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if name.startswith("backbone.h."):
            depth = int(name.split(".")[2])
            s = decay ** (L - depth)
        elif name.startswith(("backbone.wte", "backbone.wpe", "backbone.mask_token")):
            s = decay ** (L + 1)
        else:
            s = 1.0
        scales.setdefault(s, []).append(p)
    return [{"params": ps, "scale": s} for s, ps in scales.items()]
