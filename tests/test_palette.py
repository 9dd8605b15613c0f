"""The palette (fit / quantize / decode), box resizing, and the raster / snake orders."""

import numpy as np
import pytest

from igpt.data.palette import (
    decode,
    fit_palette,
    from_sequence,
    load_palette,
    order_index,
    quantize,
    resize_images,
    to_sequence,
    token_dtype,
)
from igpt.errors import IgptError


def test_fit_quantize_decode_round_trip_exact_when_k_covers_colours():
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (8, 3)).astype(np.uint8)
    imgs = colours[rng.integers(0, 8, (20, 6, 6))]  # exactly 8 distinct colours
    pal = fit_palette(imgs, 8, seed=1)
    tok = quantize(imgs, pal)
    assert tok.shape == (20, 6, 6) and tok.min() >= 0 and tok.max() < 8
    np.testing.assert_array_equal(decode(tok, pal), imgs)


def test_fit_is_seeded_and_quantize_is_nearest():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (50, 8, 8, 3)).astype(np.uint8)
    a, b = fit_palette(imgs, 16, seed=3), fit_palette(imgs, 16, seed=3)
    np.testing.assert_array_equal(a, b)
    tok = quantize(imgs, a)
    d = ((imgs.reshape(-1, 1, 3).astype(np.float64) - a[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(d[np.arange(len(d)), tok.reshape(-1)], d.min(1), rtol=1e-5, atol=1e-3)


def test_quantize_chunks_agree_with_one_pass():
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (30, 8, 8, 3)).astype(np.uint8)
    pal = fit_palette(imgs, 12, seed=0)
    np.testing.assert_array_equal(quantize(imgs, pal, chunk_pixels=100), quantize(imgs, pal))


def test_grey_palette_reduces_error_with_more_clusters():
    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (40, 8, 8, 1)).astype(np.uint8)
    errs = []
    for k in (2, 4, 16):
        pal = fit_palette(imgs, k)
        errs.append(np.sqrt(np.mean((decode(quantize(imgs, pal), pal).astype(float) - imgs) ** 2)))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 10


def test_k_outside_range_refused():
    imgs = np.zeros((2, 4, 4, 1), np.uint8)
    imgs[0] = 200
    with pytest.raises(IgptError, match="distinct colours"):
        fit_palette(imgs, 3)
    with pytest.raises(IgptError, match="at least 2"):
        fit_palette(imgs, 1)


def test_box_resize_averages_covered_area():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (28, 28)).astype(np.uint8)
    ours = resize_images(img[None, ..., None], 14)[0, ..., 0]
    np.testing.assert_array_equal(ours, img.reshape(14, 2, 14, 2).mean((1, 3)).round().astype(np.uint8))
    # 3 -> 2: output pixel 0 covers input 0 fully and half of input 1
    row = np.array([[30, 90, 150]] * 3, np.uint8)
    out = resize_images(row[None, ..., None], 2)[0, ..., 0]
    np.testing.assert_array_equal(out[0], [round((30 + 0.5 * 90) / 1.5), round((0.5 * 90 + 150) / 1.5)])
    # colour channels are kept, and an image's mean brightness is preserved
    rgb = rng.integers(0, 256, (2, 30, 30, 3)).astype(np.uint8)
    small = resize_images(rgb, 7)
    assert small.shape == (2, 7, 7, 3)
    assert abs(small.astype(float).mean() - rgb.astype(float).mean()) < 1.0


def test_orders_and_inverses():
    grid = np.arange(2 * 16).reshape(2, 4, 4)
    for order in ("raster", "snake"):
        seq = to_sequence(grid, order)
        np.testing.assert_array_equal(from_sequence(seq, 4, order), grid)
    np.testing.assert_array_equal(to_sequence(grid, "raster")[0], np.arange(16))
    np.testing.assert_array_equal(order_index(3, "snake"), [0, 1, 2, 5, 4, 3, 6, 7, 8])
    with pytest.raises(IgptError):
        order_index(3, "zigzag")


def test_token_dtype_smallest():
    assert token_dtype(16) == np.uint8 and token_dtype(256) == np.uint8 and token_dtype(512) == np.uint16


def test_openai_palette_scale(tmp_path):
    c = np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32)
    np.save(tmp_path / "kmeans_centers.npy", c)
    pal = load_palette(tmp_path / "kmeans_centers.npy")
    np.testing.assert_allclose(pal, 127.5 * (c + 1), rtol=1e-6)
    np.save(tmp_path / "bad.npy", np.zeros((4, 2)))
    with pytest.raises(IgptError, match="must be"):
        load_palette(tmp_path / "bad.npy")
