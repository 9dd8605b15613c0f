"""Colour handling: box resizing, the k-means palette ("context reduction"), quantization, decoding, and the
raster / snake pixel orders.

Palettes are float32 (K, C) arrays on the 0-255 scale. OpenAI's `kmeans_centers.npy` (512x3 in [-1, 1]) is
converted on load with 127.5 * (c + 1), which keeps nearest-centre assignments unchanged because the map is
a uniform scaling plus a shift.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from igpt.errors import IgptError

# torch is imported only by the resize (a downsampled ImageNet's batches): a folder's prepare, its workers
# and its k-means run on numpy alone, without torch's seconds-long import

ORDERS = ("raster", "snake")


# ---------------------------------------------------------------------------------------------- resizing
def _box_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of an exact area filter: output pixel i averages the input interval
    [i * n_in / n_out, (i + 1) * n_in / n_out), each input pixel weighted by the length it overlaps."""
    scale = n_in / n_out
    lo = np.arange(n_out)[:, None] * scale
    hi = lo + scale
    left = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, left + 1) - np.maximum(lo, left), 0, None)
    return (overlap / scale).astype(np.float32)


def resize_images(images: np.ndarray, resolution: int, chunk: int = 4096) -> np.ndarray:
    """Box-resize uint8 (N, H, W, C) images to (N, R, R, C), vectorised over chunks of images.
    Downscaling averages exactly the covered area (as Pillow's BOX filter); channels are kept."""
    if resolution <= 0:
        raise IgptError(f"resolution must be positive, got {resolution}")
    n, h, w, c = images.shape
    if (h, w) == (resolution, resolution):
        return images
    import torch

    wh = torch.from_numpy(_box_weights(h, resolution))
    ww = torch.from_numpy(_box_weights(w, resolution))
    out = np.empty((n, resolution, resolution, c), dtype=np.uint8)
    for s in range(0, n, chunk):
        x = torch.from_numpy(np.array(images[s : s + chunk], dtype=np.float32))
        y = torch.einsum("rh,nhwc,sw->nrsc", wh, x, ww)
        out[s : s + chunk] = y.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Convert (N, H, W, C) images to `channels` channels: grey is repeated to RGB, RGB becomes luma
    (ITU-R 601-2, as Pillow's "L" mode)."""
    c = images.shape[3]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return np.repeat(images, 3, axis=3)
    luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.round(luma).clip(0, 255).astype(np.uint8)[..., None]


# ---------------------------------------------------------------------------------------------- k-means
def _distinct_colours(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct colours of uint8 (M, C) pixels and how often each occurs."""
    if pixels.shape[1] == 1:
        counts = np.bincount(pixels[:, 0], minlength=256)
        values = np.flatnonzero(counts)
        return values[:, None].astype(np.float32), counts[values].astype(np.float64)
    packed = (pixels[:, 0].astype(np.int64) << 16) | (pixels[:, 1].astype(np.int64) << 8) | pixels[:, 2]
    values, counts = np.unique(packed, return_counts=True)
    rgb = np.stack([(values >> 16) & 255, (values >> 8) & 255, values & 255], axis=1)
    return rgb.astype(np.float32), counts.astype(np.float64)


def _assign(
    points: np.ndarray, centres: np.ndarray, threads: int = 1, chunk: int = 32768
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centre (squared Euclidean, float32) of each of the float32 `points` (n, C), and that squared
    distance: the k-means fit's assignment (quantizing uses `nearest`). Chunks of `chunk` points, so memory
    stays at chunk x K floats, shared among `threads` threads (numpy's products and argmin let go of the
    GIL)."""
    c2 = (centres * centres).sum(1)
    m = -2.0 * centres.T
    idx = np.empty(len(points), dtype=np.int64)
    dist = np.empty(len(points), dtype=np.float32)

    def part(s: int) -> None:
        p = points[s : s + chunk]
        d = p @ m  # (n, K): |c|^2 - 2 p.c
        d += c2
        i = d.argmin(1)
        idx[s : s + chunk] = i
        dist[s : s + chunk] = np.maximum(d[np.arange(len(p)), i] + (p * p).sum(1), 0.0)

    starts = range(0, len(points), chunk)
    if threads > 1 and len(starts) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(part, starts))
    else:
        for s in starts:
            part(s)
    return idx, dist


def fit_palette(
    images: np.ndarray,
    clusters: int,
    seed: int = 0,
    max_pixels: int = 500_000,
    max_iter: int = 100,
    threads: int = 1,
) -> np.ndarray:
    """Fit a K-cluster palette to uint8 (N, H, W, C) images: weighted k-means (k-means++ seeding, Lloyd
    iterations) over the distinct colours of up to `max_pixels` pixels sampled with `seed`. Grey images use
    every pixel (a 256-bin histogram is exact and cheap). Returns float32 (K, C) centres on 0-255, sorted by
    brightness so that token order is meaningful to a human. The assignments run on `threads` threads (the
    prepare's `--workers`), each product on one BLAS thread: the same palette for any number."""
    from threadpoolctl import threadpool_limits

    c = images.shape[3]
    pixels = images.reshape(-1, c)
    rng = np.random.default_rng(seed)
    if c != 1 and len(pixels) > max_pixels:
        pixels = pixels[rng.choice(len(pixels), max_pixels, replace=False)]
    pts, w = _distinct_colours(pixels)
    if clusters < 2:
        raise IgptError(f"--clusters must be at least 2, got {clusters}")
    if clusters > len(pts):
        raise IgptError(
            f"--clusters {clusters} exceeds the {len(pts)} distinct colours in the training images"
        )
    with threadpool_limits(1):
        # k-means++: each new centre drawn with probability proportional to weight x squared distance
        centres = np.empty((clusters, c), dtype=np.float32)
        centres[0] = pts[rng.choice(len(pts), p=w / w.sum())]
        best = ((pts - centres[0]) ** 2).sum(1).astype(np.float64)
        for k in range(1, clusters):
            p = w * best
            total = p.sum()
            centres[k] = pts[rng.choice(len(pts), p=p / total) if total > 0 else rng.integers(len(pts))]
            best = np.minimum(best, ((pts - centres[k]) ** 2).sum(1))
        prev = None
        for _ in range(max_iter):
            idx, dist = _assign(pts, centres, threads)
            if prev is not None and np.array_equal(idx, prev):
                break
            prev = idx
            mass = np.bincount(idx, weights=w, minlength=clusters)
            sums = np.stack(
                [np.bincount(idx, weights=pts[:, j] * w, minlength=clusters) for j in range(c)], 1
            )
            empty = mass == 0
            new = (sums / np.maximum(mass, 1e-12)[:, None]).astype(np.float32)
            if empty.any():  # re-seed empty clusters at the worst-served colours
                far = np.argsort(-(dist.astype(np.float64) * w), kind="stable")[: int(empty.sum())]
                new[empty] = pts[far]
            centres = new
    order = np.argsort(centres.sum(1), kind="stable")
    return centres[order].astype(np.float32)


# ---------------------------------------------------------------------------------------------- quantizing
SNAP = 2.0**-14
"""Centre coordinates nearer zero than this count as zero in `nearest`'s distances (a 60,000th of a grey
level): with them, every product of an integer colour and a centre, and their sums, are exact in float64."""


def nearest(colours: np.ndarray, palette: np.ndarray, block: int = 8192) -> np.ndarray:
    """Index of the nearest centre of `palette` (K, C) for each integer colour of `colours` (n, C), ties to
    the lower index, as argmin of |c|^2 - 2 p.c in float64. That is the same on every machine, thread count
    and batch: p.c is exact (8-bit integers times float32 centres at least SNAP from zero sum without
    rounding whatever order a BLAS kernel takes), and |c|^2 is computed once per palette. So a colour's token
    never depends on which worker, or with which other colours, it was quantized."""
    c = palette.astype(np.float64)
    c[np.abs(c) < SNAP] = 0.0
    c2 = (c * c).sum(1)
    out = np.empty(len(colours), dtype=np.int64)
    for s in range(0, len(colours), block):
        p = np.asarray(colours[s : s + block], dtype=np.float64)
        out[s : s + block] = (c2 - 2.0 * (p @ c.T)).argmin(1)
    return out


def quantize(
    images: np.ndarray, palette: np.ndarray, chunk_pixels: int = 1 << 22, lut: np.ndarray | None = None
) -> np.ndarray:
    """Nearest-centre tokens of uint8 (N, H, W, C) images: (N, H, W) int64 (`nearest`, numpy only).
    Vectorised through a lookup table: every distinct colour is matched once (256 entries for grey; for
    RGB, the colours met so far in a table of 2^24 entries filled chunk by chunk, the new ones found with a
    2^24-bit map rather than a sort), then tokens are one gather per pixel. `lut`, a table this palette
    filled before (-1 where not yet), carries the colours met from call to call (a prepare's worker keeps
    one: a colour's token is the same whichever call meets it first)."""
    n, h, w, c = images.shape
    if c != palette.shape[1]:
        raise IgptError(f"the images have {c} channel(s) but the palette has {palette.shape[1]}")
    if c == 1:
        return nearest(np.arange(256)[:, None], palette)[images[..., 0]]
    lut = np.full(1 << 24, -1, dtype=np.int32) if lut is None else lut
    flat = images.reshape(-1, 3)
    out = np.empty(len(flat), dtype=np.int64)
    for s in range(0, len(flat), chunk_pixels):
        p = flat[s : s + chunk_pixels]
        packed = (p[:, 0].astype(np.int32) << 16) | (p[:, 1].astype(np.int32) << 8) | p[:, 2]
        tok = lut[packed]
        new = tok < 0
        if new.any():
            seen = np.zeros(1 << 24, dtype=bool)
            seen[packed[new]] = True
            missing = np.flatnonzero(seen)
            rgb = np.stack([(missing >> 16) & 255, (missing >> 8) & 255, missing & 255], 1)
            lut[missing] = nearest(rgb, palette)
            tok = lut[packed]
        out[s : s + chunk_pixels] = tok
    return out.reshape(n, h, w)


def decode(tokens: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Palette indices (..., H, W) back to uint8 images (..., H, W, C), each centre rounded to 0-255."""
    colours = np.round(palette).clip(0, 255).astype(np.uint8)
    return colours[tokens]


def token_dtype(clusters: int) -> np.dtype:
    """The smallest unsigned dtype that holds indices 0..clusters-1."""
    return np.dtype(np.uint8 if clusters <= 256 else np.uint16 if clusters <= 65536 else np.uint32)


# ---------------------------------------------------------------------------------------------- palette files
def load_palette(path: str | Path) -> np.ndarray:
    """Read a palette: the project's own `palette.npy` (K x C on 0-255), a prepared directory or run holding
    one, or OpenAI's `kmeans_centers.npy` (512 x 3 in [-1, 1], recognised by its negative values; a palette
    beside a meta.json or run.json is igpt's own, whatever its range)."""
    p = Path(path)
    if p.is_dir():
        p = p / "palette.npy"
    if not p.is_file():
        raise IgptError(f"palette file {p} does not exist")
    try:
        a = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise IgptError(f"cannot read palette {p} ({e.__class__.__name__}: {e})") from None
    if a.ndim != 2 or a.shape[1] not in (1, 3) or a.shape[0] < 2 or not np.issubdtype(a.dtype, np.number):
        raise IgptError(
            f"palette {p} must be a numeric (K, 1) or (K, 3) array with K >= 2, got {a.dtype} {a.shape}"
        )
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise IgptError(f"palette {p} holds NaN or infinite values")
    own = (p.parent / "meta.json").is_file() or (p.parent / "run.json").is_file()
    if not own and (a.min() < 0 or (a.shape == (512, 3) and a.max() <= 1.0)):  # OpenAI's [-1, 1] centres
        if a.min() < -1.0001 or a.max() > 1.0001:
            raise IgptError(f"palette {p} mixes the [-1, 1] and 0-255 scales")
        a = 127.5 * (a + 1.0)
    if a.max() > 255.0001:
        raise IgptError(f"palette {p} has values above 255")
    return a


# ---------------------------------------------------------------------------------------------- orders
def order_index(resolution: int, order: str) -> np.ndarray:
    """Position in the flattened (row-major) image of each sequence element: raster reads rows left to
    right; snake reverses every other row (rows 1, 3, ...)."""
    if order not in ORDERS:
        raise IgptError(f"unknown order '{order}'; choose raster or snake")
    grid = np.arange(resolution * resolution).reshape(resolution, resolution)
    if order == "snake":
        grid[1::2] = grid[1::2, ::-1]
    return grid.reshape(-1)


def to_sequence(grid_tokens: np.ndarray, order: str) -> np.ndarray:
    """(..., R, R) tokens to (..., R*R) sequences in the given order."""
    r = grid_tokens.shape[-1]
    flat = grid_tokens.reshape(*grid_tokens.shape[:-2], r * r)
    return flat[..., order_index(r, order)]


def from_sequence(seq: np.ndarray, resolution: int, order: str) -> np.ndarray:
    """Inverse of `to_sequence`: (..., R*R) sequences back to (..., R, R) grids."""
    inv = np.argsort(order_index(resolution, order))
    return seq[..., inv].reshape(*seq.shape[:-1], resolution, resolution)
