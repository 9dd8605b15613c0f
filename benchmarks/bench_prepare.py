"""Benchmark of `igpt prepare` speed (prints figures; not a test).

1. All of Fashion-MNIST (70,000 28x28 grey images) at K=16, when the Debian files are present.
2. 50,000 32x32 RGB crops cut from scikit-learn's bundled sample photos, at K=512, palette fit included.

Run:  .venv/bin/python benchmarks/bench_prepare.py
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from igpt.preparation import PrepareConfig, prepare_config


def photo_crops(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """n random square crops (side 32 to 160 pixels, box-resized to `size`) of sklearn's sample photos."""
    from sklearn.datasets import load_sample_images

    from igpt.palette import resize_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    sides = rng.choice([32, 64, 96, 128, 160], n)
    for s in np.unique(sides):
        idx = np.flatnonzero(sides == s)
        crops = []
        for _ in idx:
            ph = photos[rng.integers(len(photos))]
            y, x = rng.integers(0, ph.shape[0] - s), rng.integers(0, ph.shape[1] - s)
            crops.append(ph[y : y + s, x : x + s])
        out[idx] = resize_images(np.stack(crops), size)
    return out


def timed(cfg: PrepareConfig, out: str) -> tuple[float, dict]:
    t = time.perf_counter()
    meta = prepare_config(cfg, out)
    return time.perf_counter() - t, meta


def main() -> None:
    tmp = tempfile.mkdtemp(prefix="bench_prepare_")
    if os.path.isdir("/usr/share/datasets/fashion-mnist"):
        s, meta = timed(PrepareConfig("fashion-mnist", resolution=28, clusters=16), f"{tmp}/fm")
        print(
            f"fashion-mnist 70,000 x 28x28 grey, K=16: {s:.2f} s (target 10 s), "
            f"quantization RMSE {meta['quantization_rmse']:.3f}, phases {meta['seconds']}"
        )
    else:
        print("fashion-mnist: Debian files absent, skipped")
    x = photo_crops(55_000)
    np.savez(f"{tmp}/crops.npz", x_train=x[:50_000], x_test=x[50_000:])
    s, meta = timed(PrepareConfig("npz", data_dir=f"{tmp}/crops.npz", clusters=512), f"{tmp}/rgb")
    print(
        f"photo crops 50,000 train + 5,000 test x 32x32 RGB, K=512 (fit included): {s:.2f} s (target 60 s), "
        f"quantization RMSE {meta['quantization_rmse']:.3f}, phases {meta['seconds']}"
    )


if __name__ == "__main__":
    main()
