"""The attentive probe: a small head trained on a frozen model's token states, as AIM and the
efficient-probing benchmark read generative features. Learned queries cross-attend over one layer's normed
states (or the average of several layers'), and a linear classifier reads the attended summary. It sees
every position, weighted by what the class needs, where the linear probe sees a fixed average.

The token states are computed once and cached in float16 (N x T x d: about 2.8 GB for Fashion-MNIST's
55,000 training images at 14x14 with d = 128), because the head trains for several epochs and a forward
pass of the backbone per epoch would cost more than the head itself. float16 keeps three significant
digits of normed states of order 1, ample for a classifier's input, at half of float32's memory; a set
whose states would not fit is refused before anything is computed.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from igpt.errors import IgptError
from igpt.hardware import available_memory
from igpt.model.gpt import IGPT
from igpt.training.engine import EarlyStopping, lr_at

from .features import layer_batches


class AttentiveHead(nn.Module):
    """`queries` learned queries attend (multi-head) over token states (B, T, d) through key and value
    projections; the attended vectors are averaged, normalised and classified linearly. The states are first
    standardised per position and channel with fixed training-set statistics (`mean`, `std`, (T, d), set by
    `fit_attentive`), as the linear probe standardises its features: the states of one position share a
    large component across images (its position embedding, the background), and the differences between
    images, which carry the class, are small beside it."""

    def __init__(self, d: int, num_classes: int, queries: int = 4, heads: int = 4, seq_len: int = 1):
        super().__init__()
        if d % heads:
            heads = 1
        self.heads = heads
        self.register_buffer("mean", torch.zeros(seq_len, d))
        self.register_buffer("std", torch.ones(seq_len, d))
        self.query = nn.Parameter(torch.randn(queries, d) * 0.02)
        self.kv = nn.Linear(d, 2 * d)
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, d = h.shape
        nh, Q = self.heads, self.query.shape[0]
        h = (h - self.mean) / self.std
        k, v = self.kv(h).split(d, dim=2)
        k = k.view(B, T, nh, d // nh).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, d // nh).transpose(1, 2)  # (B, nh, T, hs)
        q = self.query.view(1, Q, nh, d // nh).transpose(1, 2).expand(B, -1, -1, -1)  # (B, nh, Q, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, Q, hs)
        y = y.transpose(1, 2).reshape(B, Q, d).mean(1)  # (B, d)
        return self.fc(self.norm(y))  # (B, C)


def states_bytes(n_images: int, seq_len: int, d: int) -> int:
    """Bytes of float16 token states for `n_images` images."""
    return 2 * n_images * seq_len * d


def check_states_fit(n_images: int, seq_len: int, d: int, share: float = 0.5, n_fixed: int = 0) -> None:
    """Refuse an attentive probe whose cached states would take more than `share` of the memory available
    now, with the size and what to pass instead: the `--train-limit` that fits beside the `n_fixed`
    images (validation and test) that are cached whatever the limit."""
    need, avail = states_bytes(n_images, seq_len, d), available_memory()
    if avail is not None and need > share * avail:
        per_image = states_bytes(1, seq_len, d)
        fits = int(share * avail / per_image)
        raise IgptError(
            f"the attentive probe caches {n_images:,} images x {seq_len} tokens x {d} in float16, "
            f"{need / 2**30:.1f} GiB, more than half of the {avail / 2**30:.1f} GiB available; pass "
            f"--train-limit {max(1, fits - n_fixed):,} or less (or --head linear)"
        )


@torch.no_grad()
def token_states(
    model: IGPT,
    tokens: np.ndarray,
    layers: list[int],
    batch_size: int = 128,
    **pass_settings: Any,
) -> torch.Tensor:
    """(N, T, d) float16 normed token states of `tokens` (N, T), averaged over `layers` when several, from
    the feature pass's batches (`features.layer_batches`; `pass_settings` are its device, compile,
    precision and progress)."""
    cfg = model.config
    out = torch.empty(len(tokens), cfg.n_positions, cfg.n_embd, dtype=torch.float16)
    for s, n, hs in layer_batches(model, tokens, layers, batch_size, **pass_settings):
        out[s : s + n] = torch.stack([hs[i].float() for i in layers]).mean(0).to(torch.float16).cpu()
    return out


def _accuracy(head: AttentiveHead, x: torch.Tensor, y: torch.Tensor, device: str, batch: int = 512) -> float:
    head.eval()
    right = 0
    with torch.no_grad():
        for s in range(0, len(x), batch):
            right += int(
                (head(x[s : s + batch].to(device).float()).argmax(-1).cpu() == y[s : s + batch]).sum()
            )
    head.train()
    return right / max(1, len(y))


def fit_attentive(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    epochs: int = 10,
    patience: int = 3,
    lr: float = 3e-3,
    weight_decay: float = 0.05,
    batch_size: int | None = None,
    queries: int = 4,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Train an AttentiveHead on cached states with AdamW and a cosine schedule over `epochs`, keeping the
    epoch with the best validation accuracy and stopping after `patience` epochs without a better one.
    Returns the head (at its best epoch), the best epoch, and the validation accuracy of every epoch. The
    default batch is 256, smaller for small sets (at least about 100 steps per epoch, at least 32 rows).
    `train` and `val` are (token states (N, T, d), labels (N,))."""
    (xtr, ytr), (xva, yva) = train, val
    if batch_size is None:
        batch_size = int(min(256, max(32, len(xtr) // 100)))
    torch.manual_seed(seed)
    head = AttentiveHead(xtr.shape[-1], num_classes, queries, seq_len=xtr.shape[1])
    sample = xtr[torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))[:5000]].float()
    head.mean.copy_(sample.mean(0))
    head.std.copy_(sample.std(0).clamp(min=1e-3))
    head = head.to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(xtr) / batch_size)
    total, step = epochs * steps_per_epoch, 0
    history: list[float] = []
    stop = EarlyStopping(patience)
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(xtr), generator=gen)
        for s in range(0, len(xtr), batch_size):
            idx = perm[s : s + batch_size]
            for g in opt.param_groups:  # warm-up over the first epoch, then cosine to zero
                g["lr"] = lr_at((step + 1) / total, lr, 1 / epochs)
            loss = F.cross_entropy(head(xtr[idx].to(device).float()), ytr[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        acc = _accuracy(head, xva, yva, device)
        history.append(round(acc, 4))
        if progress:
            print(
                f"  attentive epoch {epoch}: val {acc:.4f} ({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
            )
        if stop.update(epoch, acc, head):
            break
    stop.restore(head)
    return {
        "head": head,
        "best_epoch": stop.best_epoch,
        "val_accuracy": stop.best_score,
        "val_history": history,
    }


def attentive_probe(
    model: IGPT,
    splits: dict[str, tuple[np.ndarray, torch.Tensor]],
    layers: list[int],
    num_classes: int,
    epochs: int = 10,
    batch_size: int = 128,
    device: str = "cpu",
    compile: bool = False,
    precision: str = "fp32",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """The attentive probe of `layers` (their states averaged): `splits` maps train, val and test to (tokens,
    labels). Every choice (the epoch) is made on val; test is scored once at the end."""
    cfg = model.config
    n_all = sum(len(t) for t, _ in splits.values())
    n_fixed = len(splits["val"][0]) + len(splits["test"][0])
    check_states_fit(n_all, cfg.n_positions, cfg.n_embd, n_fixed=n_fixed)
    t0 = time.perf_counter()
    states = {
        name: token_states(
            model,
            toks,
            layers,
            batch_size,
            device=device,
            compile=compile,
            progress=f"{name} states" if progress else None,
            precision=precision,
        )
        for name, (toks, _) in splits.items()
    }
    t_states = time.perf_counter() - t0
    (_, ytr), (_, yva), (_, yte) = splits["train"], splits["val"], splits["test"]
    fit = fit_attentive(
        (states["train"], ytr),
        (states["val"], yva),
        num_classes,
        epochs=epochs,
        seed=seed,
        device=device,
        progress=progress,
    )
    test = _accuracy(fit["head"], states["test"], yte, device)
    return {
        "layers": layers,
        "val_accuracy": fit["val_accuracy"],
        "test_accuracy": test,
        "best_epoch": fit["best_epoch"],
        "val_history": fit["val_history"],
        "epochs": epochs,
        "queries": fit["head"].query.shape[0],
        "states_gib": round(states_bytes(n_all, cfg.n_positions, cfg.n_embd) / 2**30, 2),
        "seconds": {"states": round(t_states, 2), "training": round(time.perf_counter() - t0 - t_states, 2)},
        "classifier": "4 learned queries, 4-head cross-attention over the layer's normed token states "
        "(float16 cache, standardised per position and channel), LayerNorm, linear; AdamW lr 3e-3, weight "
        "decay 0.05, batch 256 (less for small sets), cosine; epoch chosen on validation (patience 3)",
    }
