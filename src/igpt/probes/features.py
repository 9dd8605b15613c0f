"""The feature pass: the normed hidden states of chosen layers for every image, one batched forward pass per
batch for all layers (`layer_batches`, shared with the attentive probe's token states), pooled over positions
(the paper's mean) or over a coarse spatial grid, and cached per split so that later probes index instead of
running the model again. Also the raw-pixel baseline's features."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from igpt.data.palette import order_index
from igpt.data.prepared import PreparedData
from igpt.errors import IgptError
from igpt.model.compiling import CompiledOrEager
from igpt.model.gpt import IGPT
from igpt.training.engine import autocast, bert_mask


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
WIDE_FEATURES = 4096
"""Pooled features wider than this (the 7x7 grid's 49 cells of a 128-wide model: 6,272) are held in bfloat16,
which halves the largest caches; the fits standardise them in float32."""


def held_bytes(rows: int, width: int) -> int:
    """Bytes a FeatureCache holds for `rows` pooled features of `width` (bfloat16 past WIDE_FEATURES)."""
    return rows * width * (2 if width > WIDE_FEATURES else 4)


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


def pooled_batches(
    model: IGPT,
    tokens: np.ndarray,
    wants: dict[str, list[int]],
    batch_size: int = 128,
    resolution: int | None = None,
    order: str = "raster",
    **pass_settings: Any,
) -> Iterator[tuple[int, int, dict[str, dict[int, torch.Tensor]]]]:
    """(first row, rows, {pooling: {layer: float32 features (rows, width)}}) for each batch of `tokens`
    (N, T): every pooling of `wants` at its own layers, from one pass of `layer_batches` (whose settings
    `pass_settings` are: device, compile, precision, progress, mask_ratio, seed), on the CPU."""
    layers = sorted({i for ls in wants.values() for i in ls})
    for s, n, hs in layer_batches(model, tokens, layers, batch_size, **pass_settings):
        yield (
            s,
            n,
            {
                p: {i: pool_states(hs[i].float(), p, resolution, order).cpu() for i in ls}
                for p, ls in wants.items()
            },
        )


def extract_pooled(
    model: IGPT,
    tokens: np.ndarray,
    wants: dict[str, list[int]],
    into: dict[str, dict[int, tuple[torch.Tensor, np.ndarray]]] | None = None,
    **settings: Any,
) -> dict[str, dict[int, torch.Tensor]]:
    """{pooling: {layer: features}} of every row of `tokens` (N, T): `pooled_batches` (its `settings`)
    gathered. Features wider than WIDE_FEATURES are kept in bfloat16. With `into` ({pooling: {layer:
    (tensor, destination row of each token row, -1 for none)}}), each row is written straight into its place
    in a tensor the caller holds (`FeatureCache` grows its store so, without a second copy of the new rows),
    and those tensors are returned."""
    out: dict[str, dict[int, torch.Tensor]] = {p: {} for p in wants}  # filled in place: no second copy
    for s, n, pooled in pooled_batches(model, tokens, wants, **settings):
        for p, by_layer in pooled.items():
            for i, f in by_layer.items():
                if into is not None:
                    out[p][i], dest = into[p][i]
                    d = dest[s : s + n]
                    keep = d >= 0
                    out[p][i][torch.from_numpy(d[keep])] = f[torch.from_numpy(keep)].to(out[p][i].dtype)
                    continue
                if i not in out[p]:
                    out[p][i] = torch.empty(len(tokens), f.shape[1], dtype=feature_dtype(f.shape[1]))
                out[p][i][s : s + n] = f
    return out


def feature_dtype(width: int) -> torch.dtype:
    """How pooled features of `width` are held: bfloat16 past WIDE_FEATURES, else float32."""
    return torch.bfloat16 if width > WIDE_FEATURES else torch.float32


def extract_features(
    model: IGPT, tokens: np.ndarray, layers: list[int], pool: str = "mean", **settings: Any
) -> dict[int, torch.Tensor]:
    """Pooled normed hidden states of the chosen layers for every row of `tokens` (N, T): `extract_pooled`
    with one pooling (its other `settings`: batch_size, resolution, order and the pass's)."""
    return extract_pooled(model, tokens, {pool: layers}, **settings)[pool]


def raw_pixels(data: PreparedData, split: str, rows: np.ndarray) -> torch.Tensor:
    """Decoded palette intensities of the rows, flattened: the raw-pixel baseline's features."""
    out = []
    for s in range(0, len(rows), 8192):
        out.append(
            torch.from_numpy(data.images(split, rows[s : s + 8192]).reshape(len(rows[s : s + 8192]), -1))
        )
    return torch.cat(out).float()


def merged_wants(wants: dict[str, list[int]], more: dict[str, list[int]] | None) -> dict[str, list[int]]:
    """{pooling: sorted layers} of `wants` and `more` together: what one feature pass computes."""
    out = {p: sorted(ls) for p, ls in wants.items()}
    for p, ls in (more or {}).items():
        out[p] = sorted(set(out.get(p, [])) | set(ls))
    return out


class FeatureCache:
    """Pooled features of a model's layers, held per (split, pooling, layer) with the sorted rows computed:
    a request for rows held (a low-data subset after the full probe, say) is answered by indexing; for rows
    missing, one forward pass over them computes every pooling asked for at once and merges it into what is
    held. `sibling` views the same store with another default pooling."""

    def __init__(self, model: IGPT, data: PreparedData, layers: list[int], quiet: bool = False, **kw: Any):
        self.model, self.data, self.layers, self.quiet = model, data, layers, quiet
        self.pool: str = kw.pop("pool", "mean")
        self.kw = kw
        self.store: dict[tuple[str, str, int], tuple[np.ndarray, torch.Tensor]] = {}

    def sibling(self, pool: str) -> FeatureCache:
        """This cache with `pool` as its default pooling, sharing its store (every feature computed)."""
        view = copy.copy(self)
        view.pool = pool
        return view

    def drop(self, split: str, pool: str, keep: list[int] | None = None) -> None:
        """Forget `split`'s features at `pool` (but the layers in `keep`): wide features are large."""
        for key in [k for k in self.store if k[:2] == (split, pool) and k[2] not in (keep or [])]:
            del self.store[key]

    def __call__(
        self,
        split: str,
        rows: np.ndarray,
        label: str,
        mean: bool = False,
        also: dict[str, list[int]] | None = None,
        layers: list[int] | None = None,
    ) -> dict[int, torch.Tensor]:
        """Features of the sorted `rows` of `split` at the default pooling (with `mean`, the paper's mean
        pooling), of every layer or of `layers`. A pass that computes missing rows also yields the poolings
        and layers of `also` (asked for later through `sibling`), and the mean of every layer (the paper's
        probe asks for it)."""
        pool = "mean" if mean else self.pool
        layers = list(self.layers if layers is None else layers)
        wants = merged_wants({pool: layers}, also)
        missing = np.unique(
            np.concatenate(
                [np.setdiff1d(rows, self._held(split, p, i)) for p, ls in wants.items() for i in ls]
            )
        )
        if len(missing):
            wants = merged_wants(wants, {"mean": self.layers})
            into = {p: {i: self._grow((split, p, i), missing) for i in ls} for p, ls in wants.items()}
            try:
                extract_pooled(
                    self.model,
                    self.data.tokens(split)[missing],
                    wants,
                    into=into,
                    progress=None if self.quiet or not label else label,
                    **self.kw,
                )
            except BaseException:  # rows not yet written must never be served: forget what was growing
                for p, ls in wants.items():
                    for i in ls:
                        self.store.pop((split, p, i), None)
                raise
        return {i: self._rows((split, pool, i), rows) for i in layers}

    def _held(self, split: str, pool: str, layer: int) -> np.ndarray:
        entry = self.store.get((split, pool, layer))
        return entry[0] if entry is not None else np.empty(0, dtype=np.int64)

    def _grow(self, key: tuple[str, str, int], missing: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Make room in `key`'s entry for the sorted `missing` rows it lacks, keeping its rows sorted: one
        tensor of the grown size, the held rows copied in and the old tensor let go at once (no second copy
        of a split's features, which are the probe's peak). Returns it with each missing row's place in it
        (-1 for a row the entry already holds, which keeps its features)."""
        have, held = self.store.get(key, (np.empty(0, dtype=np.int64), None))
        fresh = ~np.isin(missing, have)
        if held is not None and not fresh.any():  # holds them all already: nothing to grow or write
            return held, np.full(len(missing), -1)
        rows = np.union1d(have, missing[fresh])
        width = grid_side(key[1]) ** 2 * self.model.config.n_embd
        grown = torch.empty(len(rows), width, dtype=feature_dtype(width))
        if held is not None:
            grown[torch.from_numpy(np.searchsorted(rows, have))] = held
        self.store[key] = (rows, grown)
        del held
        return grown, np.where(fresh, np.searchsorted(rows, missing), -1)

    def _rows(self, key: tuple[str, str, int], rows: np.ndarray) -> torch.Tensor:
        have, f = self.store[key]
        if len(rows) == len(have):  # the very rows held: no copy (wide features are large)
            return f
        return f[torch.from_numpy(np.searchsorted(have, rows))]
