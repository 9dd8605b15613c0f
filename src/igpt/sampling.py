"""Sampling and image completion from a loaded model, and the PNG grid that shows them.

AR runs sample token by token with the model's key/value cache. BERT runs cannot sample left to right, so
they complete by iterative mask-predict: the hidden region starts fully masked; each round predicts every
masked position, keeps the most confident share of the predictions, and masks the rest again, until none are
left (a linear schedule over `rounds`). Both give users a completion from either kind of run.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .errors import IgptError
from .model import IGPT, sample_next


def check_sampling_options(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse impossible sampling settings with one clear message."""
    if temperature < 0 or not math.isfinite(temperature):
        raise IgptError(f"--temperature must be 0 (greedy) or positive, got {temperature}")
    if top_k is not None and top_k < 1:
        raise IgptError(f"--top-k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise IgptError(f"--top-p must be in (0, 1], got {top_p}")


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
    check_sampling_options(temperature, top_k, top_p)
    B, T = tokens.shape
    if not 0 <= keep <= T:
        raise IgptError(f"cannot keep {keep} of {T} tokens")
    gen = torch.Generator(device=tokens.device).manual_seed(seed)  # on the tokens' device, as sampling is
    rep = tokens.repeat_interleave(num, dim=0)  # (B*num, T)
    if keep == T:
        out = rep
    elif model.causal:
        out = model.generate(rep[:, :keep], T - keep, temperature, top_k, top_p, generator=gen)
    else:
        hidden = torch.zeros_like(rep, dtype=torch.bool)
        hidden[:, keep:] = True
        out = mask_predict(model, rep, hidden, rounds, temperature, top_k, top_p, generator=gen)
    return out.view(B, num, T)


# ---------------------------------------------------------------------------------------------- grids
def upscale(img: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement (H, W, C) -> (H*f, W*f, C): every pixel stays a crisp square."""
    return img.repeat(factor, axis=0).repeat(factor, axis=1)


def mark_hidden(img: np.ndarray, keep_rows: int) -> np.ndarray:
    """The kept part of an image, its hidden rows replaced by a grey-and-red hatch so they read as absent."""
    out = img.astype(np.uint8).copy()
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    h, w = out.shape[:2]
    yy, xx = np.mgrid[keep_rows:h, 0:w]
    hatch = ((yy + xx) % 2 == 0)[..., None]
    out[keep_rows:] = np.where(hatch, np.array([200, 60, 60], np.uint8), np.array([90, 90, 90], np.uint8))
    return out


def grid_image(rows: list[list[np.ndarray]], scale: int, pad: int = 2) -> np.ndarray:
    """Tile rows of equally sized uint8 images (H, W, 1 or 3) into one RGB image on a white background."""
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    H, W = h * scale, w * scale
    canvas = np.full((len(rows) * (H + pad) + pad, ncol * (W + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            cell = upscale(img if img.shape[2] == 3 else np.repeat(img, 3, axis=2), scale)
            y, x = pad + i * (H + pad), pad + j * (W + pad)
            canvas[y : y + H, x : x + W] = cell
    return canvas


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Write a PNG atomically (temporary file, then rename)."""
    import os

    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def default_scale(resolution: int) -> int:
    """An integer enlargement that makes each cell at least about 96 pixels wide."""
    return max(1, math.ceil(96 / resolution))
