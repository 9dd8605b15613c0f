"""Streamed preparation (#26): a folder decoded by worker processes into chunks, byte-identical output for
any number of workers, resuming after an interruption without redoing finished chunks, the train/val folder
layout, and the downsampled ImageNet batch files (pickled or .npz) with their refusals."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import igpt
from igpt.data import streaming, workers
from igpt.data.prepared import PreparedData
from igpt.errors import IgptError

ARRAYS = ("train_tokens", "val_tokens", "test_tokens", "train_labels", "val_labels", "test_labels", "palette")


def image_folder(root: Path, per_class: int = 12, classes: str = "abc") -> Path:
    rng = np.random.default_rng(0)
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = (rng.integers(0, 80, (30 + i, 26 + 2 * i, 3)) + 60 * ci).astype(np.uint8)
            Image.fromarray(arr).save(root / c / (f"{i}.jpg" if i % 2 else f"{i}.png"))
    (root / classes[0] / "broken.jpg").write_bytes(b"not an image")
    return root


def same_arrays(a: Path, b: Path) -> None:
    for name in ARRAYS:
        assert (a / f"{name}.npy").read_bytes() == (b / f"{name}.npy").read_bytes(), name


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(streaming, "CHUNK", 5)


def test_output_is_the_same_for_any_number_of_workers(tmp_path, small_chunks):
    src = image_folder(tmp_path / "img")
    kw = dict(data_dir=str(src), resolution=8, clusters=8, progress=False)
    one = igpt.prepare("folder", out=tmp_path / "w1", workers=1, **kw)
    two = igpt.prepare("folder", out=tmp_path / "w2", workers=2, **kw)
    same_arrays(tmp_path / "w1", tmp_path / "w2")
    assert one["skipped_files"] == two["skipped_files"] == 1
    assert one["n_train"] + one["n_val"] + one["n_test"] == 36
    assert one["settings"] == two["settings"] and "workers" not in one["settings"]
    data = PreparedData(tmp_path / "w1").check()
    assert data.num_classes == 3 and not (tmp_path / ".w1.partial").exists()


def test_an_interrupted_prepare_resumes_without_redoing_finished_chunks(tmp_path, small_chunks, monkeypatch):
    src = image_folder(tmp_path / "img")
    kw = dict(data_dir=str(src), resolution=8, clusters=8, workers=1, progress=False)
    igpt.prepare("folder", out=tmp_path / "straight", **kw)
    real, calls = workers.decode_files, []

    def dying(job):
        calls.append(len(job[0]))
        if len(calls) == 4:
            raise KeyboardInterrupt  # as Ctrl-C (or a kill) in the middle of the fourth chunk
        return real(job)

    monkeypatch.setattr(workers, "decode_files", dying)
    with pytest.raises(KeyboardInterrupt):
        igpt.prepare("folder", out=tmp_path / "r", **kw)
    # three chunks of 5 finished; the fourth died half-way and left nothing
    stored = list((tmp_path / ".r.partial").glob("*.npz"))
    assert not (tmp_path / "r").exists() and len(stored) == 3
    clean = sum(bool(np.load(p)["ok"].all()) for p in stored)  # a chunk that skipped a file is retried
    calls.clear()
    monkeypatch.setattr(workers, "decode_files", lambda job: calls.append(len(job[0])) or real(job))
    igpt.prepare("folder", out=tmp_path / "r", **kw)
    assert sum(calls) == 37 - clean * 5  # of 37 files, only those of unfinished chunks are decoded again
    same_arrays(tmp_path / "straight", tmp_path / "r")
    # a resume with another decoding setting is refused, naming it; a palette setting may change
    calls.clear()
    monkeypatch.setattr(workers, "decode_files", dying)
    with pytest.raises(KeyboardInterrupt):
        igpt.prepare("folder", out=tmp_path / "s", **kw)
    with pytest.raises(IgptError, match="used resolution=8, not 6"):
        igpt.prepare("folder", out=tmp_path / "s", **{**kw, "resolution": 6})
    monkeypatch.setattr(workers, "decode_files", real)
    assert igpt.prepare("folder", out=tmp_path / "s", **{**kw, "clusters": 16})["clusters"] == 16


def test_given_train_and_val_folders_keep_their_split(tmp_path):
    image_folder(tmp_path / "set" / "train", per_class=6)
    image_folder(tmp_path / "set" / "val", per_class=2)
    src = str(tmp_path / "set")
    meta = igpt.prepare("folder", out=tmp_path / "p", data_dir=src, resolution=8, progress=False)
    assert meta["n_test"] == 6 and meta["n_train"] + meta["n_val"] == 18
    assert meta["class_names"] == ["a", "b", "c"]
    assert sorted(np.load(tmp_path / "p" / "test_labels.npy").tolist()) == [0, 0, 1, 1, 2, 2]


def imagenet_files(d: Path, fmt: str = "pickle", R: int = 16, n: int = 40, bad: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name in ("train_data_batch_1", "train_data_batch_2", "val_data"):
        labels = rng.integers(1, 4, n)
        data = rng.integers(0, 256, (n, 3 * R * R), dtype=np.uint8)
        data[:, : R * R] = (labels[:, None] * 60).astype(np.uint8)  # red channel says the class
        batch = {"data": data, "labels": [int(v) for v in labels], **(bad or {})}
        if fmt == "npz":
            np.savez(d / f"{name}.npz", **batch)
        else:
            (d / name).write_bytes(pickle.dumps(batch))
    return d


@pytest.mark.parametrize("fmt", ["pickle", "npz"])
def test_downsampled_imagenet_batches(tmp_path, fmt):
    src = imagenet_files(tmp_path / "in16", fmt)
    meta = igpt.prepare("imagenet16", out=tmp_path / "p", data_dir=str(src), clusters=16, progress=False)
    assert meta["resolution"] == 16 and meta["n_test"] == 40 and meta["n_train"] + meta["n_val"] == 80
    y = np.load(tmp_path / "p" / "test_labels.npy")
    assert y.min() >= 0 and y.max() <= 2  # stored from 1, written from 0
    assert meta["num_classes"] == 1000 and PreparedData(tmp_path / "p").check().resolution == 16
    auto = igpt.prepare("downsampled-imagenet", out=tmp_path / "q", data_dir=str(src), clusters=16)
    assert auto["resolution"] == 16
    same_arrays(tmp_path / "p", tmp_path / "q")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "bad, expect",
    [
        ({"mean": Evil()}, "refusing to load"),
        ({"data": np.zeros((40, 100), np.uint8)}, "not uint8 rows of 3 x R x R"),
        ({"labels": [0] * 40}, "labels must be in 1..1000"),
        ({"labels": [1] * 39}, "40 images but"),
    ],
)
def test_bad_imagenet_files_are_one_line_and_write_nothing(tmp_path, cli_error, bad, expect):
    src = imagenet_files(tmp_path / "in", bad=bad)
    err = cli_error("prepare", "imagenet16", "--data-dir", src, "--out", tmp_path / "p", "--no-progress")
    assert expect in err
    assert not (tmp_path / "p").exists()


def test_missing_imagenet_files_are_named(tmp_path, cli_error):
    (tmp_path / "empty").mkdir()
    err = cli_error("prepare", "imagenet32", "--data-dir", tmp_path / "empty", "--out", tmp_path / "p")
    assert "train_data_batch_1" in err


def test_a_train_split_with_classes_and_a_flat_val_is_one_line(tmp_path, cli_error):
    image_folder(tmp_path / "set" / "train", per_class=3)
    (tmp_path / "set" / "val").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "set" / "val" / "x.png")
    argv = ["--data-dir", tmp_path / "set", "--out", tmp_path / "p", "--resolution", "8"]
    err = cli_error("prepare", "folder", *argv)
    assert "train/ has class folders and the other split does not" in err
    assert not (tmp_path / "p").exists()


def test_a_folders_prepare_runs_without_torch_and_its_quantizer_is_the_same_however_fed(tmp_path):
    """The workers (and the k-means) use numpy alone, and a colour's token is the nearest centre whatever
    batch and table state meets it, so any worker count gives the same bytes."""
    import subprocess
    import sys

    from igpt.data.palette import nearest, quantize

    src = image_folder(tmp_path / "img")
    code = (
        "import sys; from igpt.data.preparation import prepare; "
        f"prepare('folder', out=r'{tmp_path / 'p'}', data_dir=r'{src}', resolution=8, clusters=8, workers=2, "
        "progress=False); print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-1000:]
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (6, 9, 9, 3), dtype=np.uint8)
    pal = rng.uniform(0, 255, (40, 3)).astype(np.float32)
    pal[0, 1] = 1e-7  # a coordinate nearer zero than SNAP
    whole = quantize(imgs, pal)
    lut = np.full(1 << 24, -1, dtype=np.int32)
    halves = np.concatenate([quantize(imgs[3:], pal, lut=lut), quantize(imgs[:3], pal, lut=lut)])
    assert (np.concatenate([halves[3:], halves[:3]]) == whole).all()
    brute = ((imgs[..., None, :].astype(np.float64) - pal.astype(np.float64)) ** 2).sum(-1).argmin(-1)
    assert (whole == brute).mean() > 0.999 and (nearest(imgs.reshape(-1, 3), pal) == whole.ravel()).all()
