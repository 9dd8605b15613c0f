"""Inputs that used to give a silently wrong result (#49, the outside sweep's eighth and fifth causes): each
is now read correctly or refused in one line. One test per cause."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import igpt
from igpt.data.palette import load_palette


def _images(d: Path, n: int = 6, colour: int = 0) -> None:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(colour)
    for i in range(n):
        Image.fromarray((rng.integers(0, 60, (10, 10, 3)) + colour).astype(np.uint8)).save(d / f"{i}.png")


def _batches(d: Path, numbers, labels=None, n: int = 20, R: int = 16) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"train_data_batch_{i}" for i in numbers] + ["val_data"]:
        y = labels if labels is not None else [int(v) for v in rng.integers(1, 4, n)]
        batch = {"data": rng.integers(0, 256, (n, 3 * R * R), dtype=np.uint8), "labels": y}
        (d / name).write_bytes(pickle.dumps(batch))
    return d


def test_an_npz_declaring_gigabytes_is_refused_before_it_is_read(tmp_path, cli_error):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (10**8, 64, 64)}
    )
    p = tmp_path / "bomb.npz"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x_train.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + b"\x00" * 64)
    msg = cli_error("prepare", "npz", "--data-dir", p, "--out", tmp_path / "o")
    assert "declares" in msg and "GiB" in msg
    assert not (tmp_path / "o").exists()


def test_imagenet_batches_with_a_gap_are_all_read_and_fractional_labels_refused(tmp_path, cli_error, capsys):
    src = _batches(tmp_path / "gap", (1, 3))
    meta = igpt.prepare("imagenet16", out=tmp_path / "p", data_dir=src, clusters=8, progress=False)
    assert meta["n_train"] + meta["n_val"] == 40  # both batches, not only the first
    assert meta["skipped_files"] == 0  # a missing batch is said, not counted as a skipped file
    assert "no train_data_batch_2" in capsys.readouterr().err
    bad = _batches(tmp_path / "frac", (1,), labels=[5.7] * 20)
    msg = cli_error("prepare", "imagenet16", "--data-dir", bad, "--out", tmp_path / "q", "--clusters", "8")
    assert "not whole" in msg and "5.7" in msg


def test_a_folder_with_images_beside_its_class_folders_is_refused(tmp_path, cli_error):
    _images(tmp_path / "f" / "cats")
    _images(tmp_path / "f", 3)
    msg = cli_error(
        "prepare", "folder", "--data-dir", tmp_path / "f", "--out", tmp_path / "o", "--resolution", "8"
    )
    assert "images at its top beside class folders" in msg


def test_a_class_folder_linking_back_is_refused(tmp_path, cli_error):
    _images(tmp_path / "f" / "cats")
    _images(tmp_path / "f" / "dogs", colour=120)
    os.symlink(tmp_path / "f", tmp_path / "f" / "all")
    msg = cli_error(
        "prepare", "folder", "--data-dir", tmp_path / "f", "--out", tmp_path / "o", "--resolution", "8"
    )
    assert "leads back to" in msg and "listed twice" in msg


def test_train_val_and_test_folders_use_test_as_the_test_split(tmp_path, capsys):
    for split, n in (("train", 8), ("val", 2), ("test", 3)):
        _images(tmp_path / "f" / split / "cats", n)
        _images(tmp_path / "f" / split / "dogs", n, colour=120)
    meta = igpt.prepare(
        "folder",
        data_dir=tmp_path / "f",
        out=tmp_path / "o",
        resolution=8,
        clusters=4,
        workers=1,
        progress=False,
    )
    assert meta["n_test"] == 6 and "val/ is not read" in capsys.readouterr().err


def test_probing_with_a_set_in_another_order_is_refused(micro_run, tmp_path, cli_error):
    snake = tmp_path / "snake"
    igpt.prepare(
        "digits",
        out=snake,
        resolution=8,
        clusters=8,
        order="snake",
        palette=str(micro_run / "palette.npy"),
        progress=False,
    )
    msg = cli_error("probe", micro_run, "--data", snake)
    assert "snake order" in msg and "raster" in msg


@pytest.mark.parametrize("bad", ["nan", "huge", "channels"])
def test_a_damaged_run_palette_is_refused(micro_run, tmp_path, cli_error, bad):
    run = tmp_path / "r"
    shutil.copytree(micro_run, run)
    pal = np.load(run / "palette.npy")
    pal = {
        "nan": np.where(pal == pal.max(), np.nan, pal),
        "huge": pal * 1e6,
        "channels": np.repeat(pal, 3, axis=1),
    }[bad]
    np.save(run / "palette.npy", pal.astype(np.float32))
    msg = cli_error("sample", run, "--out", tmp_path / "g.png", "--num", "1")
    assert "palette" in msg or "channel" in msg
    assert not (tmp_path / "g.png").exists()


def test_igpts_own_dark_palette_is_not_read_as_openais_scale(tmp_path):
    d = tmp_path / "set"
    d.mkdir()
    pal = np.array([[0.0], [1.0]], np.float32)  # a 0-255 palette whose colours happen to be at most 1
    np.save(d / "palette.npy", pal)
    (d / "meta.json").write_text(json.dumps({"dataset": "x"}))
    assert np.array_equal(load_palette(d / "palette.npy"), pal)
    openai = tmp_path / "kmeans_centers.npy"
    np.save(openai, np.linspace(-1, 1, 512 * 3, dtype=np.float32).reshape(512, 3))
    assert load_palette(openai).min() == pytest.approx(0.0) and load_palette(openai).max() == pytest.approx(
        255
    )


def test_an_unreadable_class_folder_is_named_unreadable_not_empty(tmp_path, monkeypatch):
    from igpt.data import sources

    _images(tmp_path / "f" / "cats")
    _images(tmp_path / "f" / "dogs", colour=100)
    _images(tmp_path / "f" / "owls", colour=180)
    real = os.scandir

    def scandir(path):  # as a folder without read permission behaves for a user who is not root
        if Path(path).name == "owls":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(sources.os, "scandir", scandir)
    classes, entries, notes = sources.list_folder(tmp_path / "f")
    assert classes == ["cats", "dogs"] and len(entries) == 12
    assert notes == [
        f"an unreadable class folder (Permission denied; not made a class)\t{tmp_path / 'f' / 'owls'}"
    ]


def test_a_one_class_set_is_named_so_by_the_probe(tmp_path, cli_error):
    _images(tmp_path / "f" / "cats", 12)
    data = tmp_path / "d"
    igpt.prepare("folder", data_dir=tmp_path / "f", out=data, resolution=8, clusters=4, progress=False)
    igpt.pretrain(data=data, out=tmp_path / "r", preset="micro", steps=1, batch_size=4, progress=False)
    msg = cli_error("probe", tmp_path / "r")
    assert "has one class, nothing to tell apart" in msg
