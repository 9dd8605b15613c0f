"""The feature pass: the normed hidden states of chosen layers for every image, one batched forward pass per
batch for all layers (`layer_batches`, shared with the attentive probe's token states), pooled over positions
(the paper's mean) or over a coarse spatial grid, and cached per split so that later probes index instead of
running the model again. Also the raw-pixel baseline's features."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .compiling import CompiledOrEager
from .data import PreparedData
from .engine import autocast, bert_mask
from .errors import IgptError
from .model import IGPT
from .palette import order_index


@torch.no_grad()
def layer_batches(
    model: IGPT,
    tokens: np.ndarray,
    layers: list[int],
    batch_size: int = 128,
    device: str = "cpu",
    compile: bool = False,
    precision: str = "fp32",
    progress: str | None = None,
    mask_ratio: float | None = None,
    seed: int = 0,
) -> Iterator[tuple[int, int, dict[int, torch.Tensor]]]:
    """(first row, rows, {layer: normed states (rows, T, d)}) for each batch of `tokens` (N, T): the one
    batching loop of every feature pass. With `compile`, the forward runs through torch.compile (eagerly if
    that fails) and a short last batch is padded to `batch_size`, so one compiled shape serves every batch;
    with `precision` bf16, under bf16 autocast; with `mask_ratio` (BERT), inputs are randomly masked."""
    model = model.to(device).eval()
    forward = CompiledOrEager(model.get_intermediate_layers, "the feature pass", enabled=compile)
    gen = torch.Generator().manual_seed(seed)
    it = range(0, len(tokens), batch_size)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=progress, unit="batch", leave=False, mininterval=1.0)
    for s in it:
        x = torch.from_numpy(np.asarray(tokens[s : s + batch_size], dtype=np.int64)).to(device)
        mask = None if not mask_ratio else bert_mask(tuple(x.shape), mask_ratio, gen).to(device)
        n = len(x)
        if forward.active and n < batch_size:  # pad: padded rows are computed and dropped
            x = torch.cat([x, x.new_zeros(batch_size - n, x.shape[1])])
            mask = None if mask is None else torch.cat([mask, mask.new_zeros(batch_size - n, mask.shape[1])])
        with autocast(device, precision):
            hs = forward(x, layers, mask)
        yield s, n, {i: h[:n] for i, h in hs.items()}


POOLS = ("mean", "grid", "grid3", "grid4", "grid7")


def grid_side(pool: str) -> int:
    """Cells along each side of a pooling: 1 for mean, 2 for grid, 3 for grid3 (and so on). A pooled
    feature is grid_side(pool)**2 times the width of the states."""
    if pool not in POOLS:
        raise ValueError(f"unknown pooling '{pool}'")
    return 1 if pool == "mean" else 2 if pool == "grid" else int(pool[4:])


def pool_states(h: torch.Tensor, pool: str, resolution: int | None, order: str = "raster") -> torch.Tensor:
    """(B, T, d) -> (B, d) with "mean" (the paper's feature), or a coarse spatial grid of means concatenated
    in raster order: "grid" 2 x 2 -> (B, 4d), "grid3" 3 x 3 -> (B, 9d), "grid4" -> (B, 16d), "grid7" ->
    (B, 49d). Sequence positions are put back in image order first (`order`: raster or snake), so every cell
    holds the pixels of its region; cells split the side as evenly as it allows."""
    n = grid_side(pool)
    if n == 1:
        return h.mean(1)
    B, T, d = h.shape
    R = resolution or int(round(T**0.5))
    if R < n:
        raise ValueError(f"{pool} pooling needs images of at least {n}x{n}")
    if order != "raster":  # sequence position -> pixel: reorder the states into raster order
        h = h[:, torch.from_numpy(np.argsort(order_index(R, order))).to(h.device)]
    g = h.reshape(B, R, R, d)
    e = [round(i * R / n) for i in range(n + 1)]
    cells = [g[:, e[i] : e[i + 1], e[j] : e[j + 1]].mean((1, 2)) for i in range(n) for j in range(n)]
    return torch.cat(cells, dim=1)


def check_pool(pool: str, resolution: int) -> None:
    """A grid pooling needs at least one pixel per cell: one line otherwise."""
    n = grid_side(pool)
    if resolution < n:
        raise IgptError(
            f"--pool {pool} splits the image into {n}x{n} cells, but these images are "
            f"{resolution}x{resolution}; use --pool mean"
        )


def extract_features(
    model: IGPT,
    tokens: np.ndarray,
    layers: list[int],
    batch_size: int = 128,
    pool: str = "mean",
    resolution: int | None = None,
    order: str = "raster",
    mean_out: dict[int, torch.Tensor] | None = None,
    **pass_settings: Any,
) -> dict[int, torch.Tensor]:
    """Pooled normed hidden states of the chosen layers for every row of `tokens` (N, T), pooled by
    `pool_states` as each batch comes out of `layer_batches` (whose settings `pass_settings` are: device,
    compile, precision, progress, mask_ratio, seed). With `mean_out` (a dict to fill), the same pass also
    yields the paper's mean-pooled features of every layer there. Pooling runs in float32."""
    out: dict[int, torch.Tensor] = {}  # filled in place: no second copy of wide features at the end
    for s, n, hs in layer_batches(model, tokens, layers, batch_size, **pass_settings):
        for i, h in hs.items():
            f = pool_states(h.float(), pool, resolution, order).cpu()
            if i not in out:
                out[i] = torch.empty(len(tokens), f.shape[1], dtype=torch.float32)
            out[i][s : s + n] = f
            if mean_out is not None:
                if i not in mean_out:
                    mean_out[i] = torch.empty(len(tokens), h.shape[-1], dtype=torch.float32)
                mean_out[i][s : s + n] = h.float().mean(1).cpu()
    return out


def raw_pixels(data: PreparedData, split: str, rows: np.ndarray) -> torch.Tensor:
    """Decoded palette intensities of the rows, flattened: the raw-pixel baseline's features."""
    out = []
    for s in range(0, len(rows), 8192):
        out.append(
            torch.from_numpy(data.images(split, rows[s : s + 8192]).reshape(len(rows[s : s + 8192]), -1))
        )
    return torch.cat(out).float()


class FeatureCache:
    """Pooled features of the chosen layers, keyed by split: a request for rows already computed (a low-data
    subset after the full probe, say) is answered by indexing instead of another forward pass."""

    def __init__(self, model: IGPT, data: PreparedData, layers: list[int], quiet: bool = False, **kw: Any):
        self.model, self.data, self.layers, self.kw, self.quiet = model, data, layers, kw, quiet
        self.store: dict[str, tuple[np.ndarray, dict[int, torch.Tensor], dict[int, torch.Tensor]]] = {}
        self.siblings: dict[str, FeatureCache] = {}

    def sibling(self, pool: str) -> FeatureCache:
        """The cache of the same model and pass settings with another pooling (this one for its own): made
        once and kept, so that every probe asking for that pooling (the low-data probes' fine grid, say)
        shares its features instead of running the model again."""
        if pool == self.kw.get("pool", "mean"):
            return self
        if pool not in self.siblings:
            kw = {**self.kw, "pool": pool}
            self.siblings[pool] = FeatureCache(self.model, self.data, self.layers, self.quiet, **kw)
        return self.siblings[pool]

    def __call__(
        self, split: str, rows: np.ndarray, label: str, mean: bool = False
    ) -> dict[int, torch.Tensor]:
        """Features of the sorted `rows` of `split`; with `mean`, the paper's mean-pooled ones (computed in
        the same pass when the cache's pooling is another)."""
        if split in self.store:
            have, feats, means = self.store[split]
            pos = np.minimum(np.searchsorted(have, rows), len(have) - 1)
            if len(have) and (have[pos] == rows).all():
                chosen = means if mean and means else feats
                if len(rows) == len(have):  # the very rows stored: no copy (wide features are large)
                    return dict(chosen)
                return {i: f[torch.from_numpy(pos)] for i, f in chosen.items()}
        means: dict[int, torch.Tensor] = {}
        feats = extract_features(
            self.model,
            self.data.tokens(split)[rows],
            self.layers,
            progress=None if self.quiet else label,
            mean_out=means if self.kw.get("pool", "mean") != "mean" else None,
            **self.kw,
        )
        self.store[split] = (rows, feats, means)
        return means if mean and means else feats
