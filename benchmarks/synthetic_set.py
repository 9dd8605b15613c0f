"""Write a synthetic labelled image set as an `.npz` (for `igpt prepare npz`) and an 8x8x8 RGB-grid palette
(512 colours, for `--palette`), so a GPU check can pretrain the paper's 32x32, K=512 shape without any
download and without fitting k-means.

Each image is a smooth colour field: a few sinusoidal stripes whose orientation depends on the class, with
random phase, frequency jitter and colours. A model has something to learn and a probe something to find.

Run:  python benchmarks/synthetic_set.py OUT_DIR [--train 5000] [--test 1000] [--resolution 32]
      -> OUT_DIR/synthetic.npz, OUT_DIR/palette_rgb512.npy
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def synthetic_images(n: int, resolution: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, R, R, 3) uint8 images and (n,) int64 labels: class c is stripes at angle pi * c / classes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    yy, xx = np.mgrid[0:resolution, 0:resolution].astype(np.float32) / resolution
    angle = np.pi * y / classes + rng.normal(0, 0.05, n)
    freq = rng.uniform(2.0, 4.0, n) * 2 * np.pi
    phase = rng.uniform(0, 2 * np.pi, n)
    proj = np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy  # (n, R, R)
    wave = 0.5 + 0.5 * np.sin(freq[:, None, None] * proj + phase[:, None, None])  # (n, R, R) in [0, 1]
    lo, hi = rng.uniform(0, 120, (n, 1, 1, 3)), rng.uniform(135, 255, (n, 1, 1, 3))
    img = lo + (hi - lo) * wave[..., None] + rng.normal(0, 6, (n, resolution, resolution, 3))
    return np.clip(img, 0, 255).astype(np.uint8), y.astype(np.int64)


def grid_palette(levels: int = 8) -> np.ndarray:
    """(levels^3, 3) float32 colours on the 0-255 scale: every mix of `levels` evenly spaced values."""
    v = (np.arange(levels, dtype=np.float32) + 0.5) * (256.0 / levels)
    r, g, b = np.meshgrid(v, v, v, indexing="ij")
    return np.stack([r.ravel(), g.ravel(), b.ravel()], 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=5000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    xtr, ytr = synthetic_images(a.train, a.resolution, a.classes, 0)
    xte, yte = synthetic_images(a.test, a.resolution, a.classes, 1)
    np.savez(out / "synthetic.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    np.save(out / "palette_rgb512.npy", grid_palette())
    print(
        f"wrote {out / 'synthetic.npz'} ({a.train} + {a.test} images, {a.resolution}x{a.resolution} RGB, "
        f"{a.classes} classes) and {out / 'palette_rgb512.npy'}"
    )


if __name__ == "__main__":
    main()
