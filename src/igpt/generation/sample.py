"""The sample stage: unconditional samples, or completions of test images or of given image files (keep the
top rows, sample the rest), written as a PNG grid plus the tokens as .npy."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from igpt.checks import check_device
from igpt.data.images import default_scale, grid_image, load_images, mark_hidden, save_png
from igpt.data.palette import decode, from_sequence, quantize, to_sequence
from igpt.data.prepared import PreparedData
from igpt.errors import IgptError
from igpt.files import atomic_file
from igpt.runs import Run
from igpt.settings import build_config

from .complete import check_sampling_options, complete

MAX_SAMPLES = 4096  # sampled images per call: beyond this a grid (and its memory) is no longer useful


@dataclass
class SampleConfig:
    """Every setting of `igpt sample`; `sample()` builds it from its keyword arguments."""

    run: str
    """The run directory whose model samples."""
    out: str
    """The PNG grid to write (the tokens go beside it, with .npy)."""
    num: int = 4
    """Samples per image."""
    keep_rows: int | None = None
    """Rows kept from each image, the rest sampled; 0 samples unconditionally (default: half)."""
    images: str | None = None
    """Test image indices, e.g. 0,5,9 (default: the first `count`)."""
    count: int = 4
    """How many test images when `images` is not given."""
    image_files: list[str] | None = None
    """Complete these image files instead of test images."""
    temperature: float = 1.0
    """Softmax temperature; 0 is greedy (1.0 is the paper's)."""
    top_k: int | None = None
    """Keep the k likeliest tokens (0 or None: off)."""
    top_p: float | None = None
    """Keep the smallest set of tokens whose probability reaches p."""
    seed: int = 0
    """Seed of the sampling."""
    rounds: int = 8
    """BERT runs: mask-predict rounds."""
    checkpoint: str | None = None
    """Which checkpoint (default: the latest)."""
    scale: int | None = None
    """Enlargement of each grid cell (default: about 96 px per image)."""
    device: str = "cpu"
    """cpu, cuda or cuda:N."""

    def __post_init__(self) -> None:
        check_sampling_options(self.temperature, self.top_k, self.top_p, self.seed)
        if self.num < 1 or self.count < 1 or self.rounds < 1:
            raise IgptError("--num, --count and --rounds must be at least 1")
        if self.num * self.n_images > MAX_SAMPLES or self.rounds > 1000:
            raise IgptError(
                f"--num x images ({self.num} x {self.n_images}) must be at most {MAX_SAMPLES:,}, and "
                "--rounds at most 1000"
            )
        if self.scale is not None and not 1 <= self.scale <= 64:
            raise IgptError(f"--scale must be in [1, 64], got {self.scale}")
        check_device(self.device)
        if Path(self.out).is_dir():
            raise IgptError(
                f"--out {self.out} is a directory; give the PNG file to write ({self.out}/grid.png, say)"
            )

    @property
    def indices(self) -> list[int] | None:
        """The test image indices asked for, or None."""
        return None if self.images is None else _parse_indices(self.images)

    @property
    def n_images(self) -> int:
        """How many images are completed."""
        if self.image_files:
            return len(self.image_files)
        return self.count if self.images is None else len(self.indices or [])


def _parse_indices(images: str | Sequence[int]) -> list[int]:
    if isinstance(images, str):
        try:
            return [int(i) for i in images.split(",") if i.strip()]
        except ValueError:
            raise IgptError(f"--images must be comma-separated integers, got '{images}'") from None
    return [int(i) for i in images]


def sample(run: str | Path | SampleConfig, out: str | Path | None = None, **settings: Any) -> dict[str, Any]:
    """Complete test images (the first `count`, or `images`) or `image_files`, keeping their top `keep_rows`
    rows (half by default; 0 samples unconditionally), `num` samples each; write the grid to `out` and the
    tokens to `out` with `.npy`. AR runs sample with the key/value cache, BERT runs by mask-predict. Takes a
    `SampleConfig`, or the run, `out` and its fields by name. Returns what was written and how fast."""
    if isinstance(run, SampleConfig):
        cfg = run
    else:
        if out is None:
            raise IgptError("sample needs out, the PNG file to write")
        if "images" in settings and not isinstance(settings["images"], (str, type(None))):
            settings["images"] = ",".join(str(int(i)) for i in settings["images"])
        if settings.get("image_files") is not None:
            settings["image_files"] = [str(f) for f in settings["image_files"]]
        cfg = build_config(SampleConfig, "sample", run=str(run), out=str(out), **settings)
    r = Run.open(cfg.run)
    R = r.resolution
    keep_rows = R // 2 if cfg.keep_rows is None else cfg.keep_rows
    if not 0 <= keep_rows <= R:
        raise IgptError(f"--keep-rows must be in [0, {R}], got {keep_rows}")
    check_grid_size(cfg, R, keep_rows)
    seqs, originals = _inputs(cfg, r, keep_rows)
    model = r.load_model(cfg.checkpoint, cfg.device)
    n = cfg.num if keep_rows else cfg.num * cfg.count
    t0 = time.perf_counter()
    tokens = complete(
        model,
        seqs.to(cfg.device),
        keep_rows * R,
        n,
        cfg.temperature,
        cfg.top_k,
        cfg.top_p,
        cfg.seed,
        cfg.rounds,
    ).cpu()
    secs = time.perf_counter() - t0
    new_tokens = tokens.shape[0] * tokens.shape[1] * (R * R - keep_rows * R)
    rows = _write_grid(cfg, r, tokens, seqs, originals, keep_rows)
    return {
        "png": str(cfg.out),
        "tokens": str(Path(cfg.out).with_suffix(".npy")),
        "rows": rows,
        "samples_per_image": n,
        "keep_rows": keep_rows,
        "new_tokens": new_tokens,
        "seconds": round(secs, 3),
        "tokens_per_second": new_tokens / max(secs, 1e-9),
        "method": "AR with KV cache" if model.causal else "mask-predict",
    }


MAX_GRID_PIXELS = 50_000_000
"""The largest PNG grid `igpt sample` writes (about 150 MB of RGB while it is built)."""


def check_grid_size(cfg: SampleConfig, R: int, keep_rows: int) -> None:
    """Refuse, before sampling, a grid larger than MAX_GRID_PIXELS (its side from --num, the images and
    --scale), naming what to lower."""
    scale = cfg.scale or default_scale(R)
    cols = cfg.num + 2 if keep_rows else min(cfg.num * cfg.count, 8)
    rows = cfg.n_images if keep_rows else -(-cfg.num * cfg.count // 8)
    side = R * scale + 2
    pixels = (rows * side + 2) * (cols * side + 2)
    if pixels > MAX_GRID_PIXELS:
        raise IgptError(
            f"the grid would be {cols * side + 2:,} x {rows * side + 2:,} pixels, above "
            f"{MAX_GRID_PIXELS:,}; lower --num, the images or --scale"
        )


def _inputs(cfg: SampleConfig, r: Run, keep_rows: int) -> tuple[torch.Tensor, np.ndarray | None]:
    """The token sequences to complete (B, T) and the original images beside them (None when sampling
    unconditionally)."""
    palette, R = r.palette(), r.resolution
    if keep_rows == 0:
        return torch.zeros(1, R * R, dtype=torch.long), None
    if cfg.image_files:
        imgs = load_images(list(cfg.image_files), R, palette.shape[1])
        return torch.from_numpy(to_sequence(quantize(imgs, palette), r.order).astype(np.int64)), imgs
    if not r.data_dir or not (Path(r.data_dir) / "meta.json").is_file():
        raise IgptError(f"the run's data directory {r.data_dir} is not available; pass --image-files")
    data = PreparedData(r.data_dir)
    n_test = data.meta["n_test"]
    idx = cfg.indices if cfg.indices is not None else list(range(min(cfg.count, n_test)))
    bad = [i for i in idx if not 0 <= i < n_test]
    if bad or not idx:
        raise IgptError(f"image indices {bad or idx} are out of range: the test split has {n_test} images")
    return torch.from_numpy(np.asarray(data.tokens("test")[idx], dtype=np.int64)), data.images("test", idx)


def _write_grid(
    cfg: SampleConfig,
    r: Run,
    tokens: torch.Tensor,
    seqs: torch.Tensor,
    originals: np.ndarray | None,
    keep_rows: int,
) -> int:
    """Write the PNG grid (each original, its kept part, its samples; or rows of unconditional samples) and
    the tokens beside it; returns the grid's rows."""
    palette, R, order = r.palette(), r.resolution, r.order
    samples = decode(from_sequence(tokens.numpy(), R, order), palette)  # (B, num, R, R, C)
    if originals is None:
        per_row = min(tokens.shape[1], 8)
        flat = list(samples[0])
        rows = [flat[i : i + per_row] for i in range(0, len(flat), per_row)]
    else:
        kept = decode(from_sequence(seqs.numpy(), R, order), palette)
        rows = [[originals[i], mark_hidden(kept[i], keep_rows), *samples[i]] for i in range(len(samples))]
    out = Path(cfg.out)
    save_png(grid_image(rows, cfg.scale or default_scale(R)), out)
    with atomic_file(out.with_suffix(".npy")) as tmp:
        np.save(tmp, from_sequence(tokens.numpy(), R, order).astype(np.int16))
    return len(rows)
