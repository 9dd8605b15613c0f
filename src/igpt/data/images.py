"""Images on the way out and in: tiling samples into a PNG grid (enlarged without blurring, hidden rows
hatched), PNG bytes for the web page, and reading image files to complete."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from igpt.errors import IgptError
from igpt.files import atomic_file

from .palette import to_channels


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
    """Write an (H, W, 3) uint8 image as a PNG, atomically."""
    from PIL import Image

    with atomic_file(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def png_bytes(img: np.ndarray, scale: int) -> bytes:
    """(H, W, 1 or 3) uint8 -> an enlarged PNG file's bytes."""
    from PIL import Image

    a = upscale(img if img.shape[2] == 3 else np.repeat(img, 3, axis=2), scale)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def default_scale(resolution: int) -> int:
    """An integer enlargement that makes each cell at least about 96 pixels wide."""
    return max(1, math.ceil(96 / resolution))


def load_images(files: list[str], resolution: int, channels: int) -> np.ndarray:
    """Image files -> uint8 (N, R, R, C), centre-cropped and box-resized like `igpt prepare folder`."""
    from .decode import load_image

    out = []
    for f in files:
        if not Path(f).is_file():
            raise IgptError(f"image file {f} does not exist")
        try:
            out.append(to_channels(load_image(Path(f), resolution)[None], channels)[0])
        except IgptError:
            raise
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
            raise IgptError(f"cannot read image {f} ({e.__class__.__name__})") from None
    return np.stack(out)
