"""Pretraining's optimizers: AdamW for every parameter, or Muon for the blocks' weight matrices beside
AdamW for the rest, behind one small interface the training step and the checkpoints use.

Muon (`torch.optim.Muon`) orthogonalises each matrix's momentum with Newton-Schulz iterations; it is meant
for hidden 2-D weights only, so embeddings, the output head, norm gains and biases stay with AdamW. With
`adjust_lr_fn="match_rms_adamw"` its update has AdamW's root-mean-square size, so one `--lr` serves both.
"""

from __future__ import annotations

import math

import torch

from igpt.errors import IgptError

from .checkpoint import load_optimizer_tensors, optimizer_tensors
from .config import OPTIMIZERS


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` with its Newton-Schulz iterations in `ns_dtype`: bf16 as torch runs them, or fp32,
    on CPUs where bf16 matrix products are slow (see `hardware.muon_ns_dtype`). The update is otherwise
    torch's, step for step: momentum, Nesterov, the quintic iteration, the AdamW-matched rate, decoupled
    weight decay; the state (`momentum_buffer`) is the same, so checkpoints move between the two."""

    def __init__(self, params, ns_dtype: str = "bf16", **kw) -> None:
        super().__init__(params, **kw)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        if self.ns_dtype == "bf16":
            return super().step(closure)
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            self._init_group(group, params, grads, bufs)
            lr, momentum = group["lr"], group["momentum"]
            for p, g, buf in zip(params, grads, bufs, strict=True):
                buf.lerp_(g, 1 - momentum)
                update = g.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-muon_lr(lr, group["adjust_lr_fn"], p.shape))
        return None


def muon_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's rate for a matrix of `shape` (rows A, columns B), as torch's Muon adjusts it: "original" (or
    None) scales by sqrt(max(1, A/B)) (Keller Jordan's Muon), "match_rms_adamw" by 0.2 sqrt(max(A, B)), so
    the update's RMS matches AdamW's (Moonshot's recipe); anything else leaves `lr`. Written here rather than
    imported from torch's private module; tests/test_levers.py checks the update against torch's Muon."""
    A, B = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, A / B))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(A, B))
    return lr


def newton_schulz(
    g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """torch's quintic Newton-Schulz orthogonalisation of a 2-D matrix, in fp32."""
    a, b, c = coefficients
    x = g.float()
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def muon_owns(name: str, p: torch.nn.Parameter) -> bool:
    """Whether Muon steps this parameter: the 2-D weights inside the transformer blocks."""
    return name.startswith("h.") and p.dim() == 2


class Optimizers:
    """AdamW, and Muon where chosen, stepped together. `param_groups` spans both, so setting each group's
    learning rate (its `scale` times the schedule's) sets the schedule for all of them. With Muon, AdamW's
    groups may run at `adamw_lr_ratio` times the rate."""

    def __init__(
        self,
        named: list[tuple[str, torch.nn.Parameter]],
        kind: str,
        lr: float,
        weight_decay: float,
        beta2: float,
        fused: bool,
        ns_dtype: str = "bf16",
        adamw_lr_ratio: float = 1.0,
    ):
        if kind not in OPTIMIZERS:
            raise IgptError(f"unknown optimizer '{kind}'; choose one of {', '.join(OPTIMIZERS)}")
        self.kind = kind
        to_muon = [p for n, p in named if kind == "muon" and muon_owns(n, p)]
        rest = [(n, p) for n, p in named if not (kind == "muon" and muon_owns(n, p))]
        decay = [p for _, p in rest if p.dim() >= 2]
        other = [p for _, p in rest if p.dim() < 2]
        # parameter names in AdamW's index order, for full (unsharded) optimizer state under FSDP
        self.adamw_names = [n for n, p in rest if p.dim() >= 2] + [n for n, p in rest if p.dim() < 2]
        self.adamw = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
            lr=lr,
            betas=(0.9, beta2),
            eps=1e-8,
            fused=fused,
        )
        self.muon = (
            Muon(
                to_muon,
                ns_dtype=ns_dtype,
                lr=lr,
                weight_decay=weight_decay,
                momentum=0.95,
                adjust_lr_fn="match_rms_adamw",
            )
            if to_muon
            else None
        )
        self.all = [o for o in (self.adamw, self.muon) if o is not None]
        for g in self.adamw.param_groups:  # the schedule sets each group's rate to `scale` times its own
            g["scale"] = adamw_lr_ratio if self.muon is not None else 1.0
        for g in self.muon.param_groups if self.muon is not None else []:
            g["scale"] = 1.0

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.all for g in o.param_groups]

    def step(self) -> None:
        for o in self.all:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.all:
            o.zero_grad(set_to_none=set_to_none)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state of both as flat tensors: AdamW's under `opt.`, Muon's under `muon.`."""
        out = optimizer_tensors(self.adamw, "opt")
        if self.muon is not None:
            out.update(optimizer_tensors(self.muon, "muon"))
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        load_optimizer_tensors(self.adamw, tensors, "opt")
        if self.muon is not None:
            load_optimizer_tensors(self.muon, tensors, "muon")
