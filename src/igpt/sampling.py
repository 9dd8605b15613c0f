"""The sample stage: unconditional samples, or completions of test images or of given image files (keep the
top rows, sample the rest), written as a PNG grid plus the tokens as .npy."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checks
from .data import PreparedData
from .errors import IgptError
from .files import atomic_file
from .generation import check_sampling_options, complete
from .images import default_scale, grid_image, load_images, mark_hidden, save_png
from .palette import decode, from_sequence, quantize, to_sequence
from .runs import Run

MAX_SAMPLES = 4096  # sampled images per call: beyond this a grid (and its memory) is no longer useful


def check_device(device: str) -> str:
    """`device` if it is usable here; one clear line otherwise."""
    checks.check_device(device)
    return device


def _parse_indices(images: str | Sequence[int]) -> list[int]:
    if isinstance(images, str):
        try:
            return [int(i) for i in images.split(",") if i.strip()]
        except ValueError:
            raise IgptError(f"--images must be comma-separated integers, got '{images}'") from None
    return [int(i) for i in images]


def sample(
    run: str | Path,
    out: str | Path,
    *,
    num: int = 4,
    keep_rows: int | None = None,
    images: str | Sequence[int] | None = None,
    count: int = 4,
    image_files: Sequence[str] | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    rounds: int = 8,
    checkpoint: str | None = None,
    scale: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Complete test images (the first `count`, or `images`) or `image_files`, keeping their top `keep_rows`
    rows (half by default; 0 samples unconditionally), `num` samples each; write the grid to `out` and the
    tokens to `out` with `.npy`. AR runs sample with the key/value cache, BERT runs by mask-predict. Returns
    what was written and how fast."""
    check_sampling_options(temperature, top_k, top_p, seed)
    if num < 1 or count < 1 or rounds < 1:
        raise IgptError("--num, --count and --rounds must be at least 1")
    indices = None if images is None else _parse_indices(images)
    n_images = len(image_files) if image_files else (count if indices is None else len(indices))
    if num * n_images > MAX_SAMPLES or rounds > 1000:
        raise IgptError(
            f"--num x images ({num} x {n_images}) must be at most {MAX_SAMPLES:,}, and --rounds at most 1000"
        )
    if scale is not None and not 1 <= scale <= 64:
        raise IgptError(f"--scale must be in [1, 64], got {scale}")
    check_device(device)
    if Path(out).is_dir():
        raise IgptError(f"--out {out} is a directory; give the PNG file to write ({out}/grid.png, say)")
    r = Run.open(run)
    palette = r.palette()
    R, order = r.resolution, r.order
    keep_rows = R // 2 if keep_rows is None else keep_rows
    if not 0 <= keep_rows <= R:
        raise IgptError(f"--keep-rows must be in [0, {R}], got {keep_rows}")
    model = r.load_model(checkpoint, device)
    if keep_rows == 0:
        seqs = torch.zeros(1, R * R, dtype=torch.long)
        originals = None
    elif image_files:
        imgs = load_images(list(image_files), R, palette.shape[1])
        seqs = torch.from_numpy(to_sequence(quantize(imgs, palette), order).astype(np.int64))
        originals = imgs
    else:
        if not r.data_dir or not (Path(r.data_dir) / "meta.json").is_file():
            raise IgptError(f"the run's data directory {r.data_dir} is not available; pass --image-files")
        data = PreparedData(r.data_dir)
        n_test = data.meta["n_test"]
        idx = indices if indices is not None else list(range(min(count, n_test)))
        bad = [i for i in idx if not 0 <= i < n_test]
        if bad or not idx:
            raise IgptError(
                f"image indices {bad or idx} are out of range: the test split has {n_test} images"
            )
        seqs = torch.from_numpy(np.asarray(data.tokens("test")[idx], dtype=np.int64))
        originals = data.images("test", idx)
    n = num if keep_rows else num * count
    t0 = time.perf_counter()
    tokens = complete(model, seqs.to(device), keep_rows * R, n, temperature, top_k, top_p, seed, rounds).cpu()
    secs = time.perf_counter() - t0
    new_tokens = tokens.shape[0] * tokens.shape[1] * (R * R - keep_rows * R)
    samples = decode(from_sequence(tokens.numpy(), R, order), palette)  # (B, num, R, R, C)
    if originals is None:
        per_row = min(n, 8)
        flat = list(samples[0])
        rows = [flat[i : i + per_row] for i in range(0, len(flat), per_row)]
    else:
        kept = decode(from_sequence(seqs.numpy(), R, order), palette)
        rows = [[originals[i], mark_hidden(kept[i], keep_rows), *samples[i]] for i in range(len(samples))]
    out = Path(out)
    save_png(grid_image(rows, scale or default_scale(R)), out)
    npy = out.with_suffix(".npy")
    with atomic_file(npy) as tmp:
        np.save(tmp, from_sequence(tokens.numpy(), R, order).astype(np.int16))
    result = {
        "png": str(out),
        "tokens": str(npy),
        "rows": len(rows),
        "samples_per_image": n,
        "keep_rows": keep_rows,
        "new_tokens": new_tokens,
        "seconds": round(secs, 3),
        "tokens_per_second": new_tokens / max(secs, 1e-9),
        "method": "AR with KV cache" if model.causal else "mask-predict",
    }
    return result
