"""Hostile and broken input: one test per defect found when igpt was tried as a hostile-but-realistic user
would. Every case ends in one clear line (or a 4xx), leaves nothing half-written, and cannot exhaust the
machine; tests that could allocate much set a memory limit first, so a regression fails fast."""

import io
import json
import os
import resource
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import igpt
from igpt.cli import main
from igpt.errors import IgptError
from igpt.runs import Run

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from igpt.serving.app import Completer, create_app  # noqa: E402

MICRO = dict(preset="micro", batch_size=16, eval_images=16, progress=False)


def one_line_error(capsys, *argv: str, after_progress: bool = False) -> str:
    """Run the CLI in-process; assert a non-zero exit with exactly one `igpt: error:` line (the only line, or
    with `after_progress` the last, after the command's progress lines) and no traceback; return it."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("igpt: error:") and (after_progress or len(err) == 1), err
    assert sum(ln.startswith("igpt: error:") for ln in err) == 1 and not any("Traceback" in ln for ln in err)
    return err[-1]


@pytest.fixture
def memory_cap():
    """Cap this process's address space at 6 GiB for the test (a regression fails with MemoryError fast)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# 1, 6: npz labels
@pytest.mark.parametrize(
    "labels, expect",
    [
        (np.array([0] * 9 + [10**12]), "class indices in [0, 100000)"),
        (np.array([0] * 9 + [3 * 10**6]), "class indices in [0, 100000)"),
        (np.array([0.0] * 9 + [np.nan]), "NaN, infinite or fractional"),
        (np.array(["cat"] * 10), "integer class labels"),
        (np.arange(10), "has no entry in class_names"),
    ],
)
def test_npz_labels_are_checked_before_anything_is_sized_by_them(
    tmp_path, capsys, memory_cap, labels, expect
):
    p = tmp_path / "d.npz"
    np.savez(p, x_train=np.zeros((10, 4, 4), np.uint8), y_train=labels, class_names=np.array(["a", "b"]))
    if "class_names" not in expect:  # only the last case keeps its class names
        np.savez(p, x_train=np.zeros((10, 4, 4), np.uint8), y_train=labels)
    assert expect in one_line_error(capsys, "prepare", "npz", "--data-dir", p, "--out", tmp_path / "o")
    assert not (tmp_path / "o").exists()


# 2: a chunked upload is refused as its bytes arrive
def test_chunked_upload_is_refused_before_it_is_stored(micro_run):
    import asyncio

    from igpt.serving.requests import BadRequest, bounded_body

    client = TestClient(create_app(Completer(micro_run), 64 * 1024))
    chunks = (b"x" * 65536 for _ in range(64))  # 4 MiB without Content-Length
    r = client.post(
        "/api/complete", content=chunks, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert r.status_code == 413 and "KiB limit" in r.json()["error"]
    consumed = 0

    class Chunked:  # the server side: how much of an endless body is read before the refusal
        async def stream(self):
            nonlocal consumed
            for _ in range(16384):  # 1 GiB, if it were all read
                consumed += 65536
                yield b"x" * 65536

    with pytest.raises(BadRequest) as e:
        asyncio.run(bounded_body(Chunked(), 64 * 1024 + 1000, 64 * 1024))
    assert e.value.status == 413 and consumed <= 3 * 65536


# 3: decompression bombs
BOMB = png(np.zeros((7000, 7000), np.uint8))  # 49 M pixels in a file of about 50 KB


def test_decompression_bomb_is_refused_without_decoding(micro_run, tmp_path, memory_cap):
    assert len(BOMB) < 200_000
    client = TestClient(create_app(Completer(micro_run), 2 * 2**20))
    r = client.post("/api/complete", data={"source": "upload"}, files={"file": ("b.png", BOMB, "image/png")})
    assert r.status_code == 413 and "over the limit" in r.json()["error"], r.text
    (tmp_path / "bomb.png").write_bytes(BOMB)
    with pytest.raises(IgptError, match="over the limit of 40,000,000 .*IGPT_MAX_IMAGE_PIXELS"):
        igpt.sample(micro_run, out=tmp_path / "s.png", image_files=[str(tmp_path / "bomb.png")])
    folder = tmp_path / "folder" / "a"
    folder.mkdir(parents=True)
    (folder / "bomb.png").write_bytes(BOMB)
    (folder / "ok.png").write_bytes(png(np.zeros((4, 4), np.uint8)))
    with pytest.raises(IgptError, match="over the limit"):
        igpt.prepare("folder", tmp_path / "p", data_dir=str(tmp_path / "folder"), resolution=8, strict=True)


def test_the_pixel_limit_can_be_raised(monkeypatch, tmp_path):
    from igpt.data.decode import load_image

    monkeypatch.setenv("IGPT_MAX_IMAGE_PIXELS", str(60_000_000))
    assert load_image(io.BytesIO(BOMB), 8).shape == (8, 8, 1)


# 4: a hostile config.json cannot make convert allocate
def test_convert_checks_the_model_size_before_allocating(tmp_path, capsys, memory_cap):
    hf = tmp_path / "hf"
    hf.mkdir()
    cfg = dict(model_type="imagegpt", vocab_size=17, n_positions=64, n_embd=10**9, n_layer=2, n_head=1)
    (hf / "config.json").write_text(json.dumps(cfg))
    save_file({"x": torch.zeros(1)}, hf / "model.safetensors")
    err = one_line_error(capsys, "convert", "--from-hf", hf, "--out", tmp_path / "r")
    assert "GiB for its weights alone" in err and not (tmp_path / "r").exists()


# 5: 16-bit images are scaled, not clipped
def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
    from igpt.data.decode import load_image

    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    (tmp_path / "g.png").write_bytes(png(ramp))
    a = load_image(tmp_path / "g.png", None)[..., 0].astype(int)
    want = np.round(ramp / 257.0).astype(int)
    assert np.abs(a - want).max() <= 1 and 120 < a.mean() < 135  # not almost all 255


# 7, 10: settings are validated before anything is created
@pytest.mark.parametrize(
    "extra, expect",
    [
        (["--minutes", "nan"], "--minutes must be a positive number"),
        (["--keep-every", "-3"], "--keep-every must be 0 or positive"),
        (["--grad-clip", "nan"], "--grad-clip must be 0 (off) or positive"),
        (["--grad-clip", "-1"], "--grad-clip must be 0 (off) or positive"),
        (["--weight-decay", "-5"], "--weight-decay must be 0 or positive"),
        (["--seed", "-1"], "--seed must be an integer in [0, 2^32)"),
        (["--n-layer", "0"], "n_layer must be a positive integer"),
        (["--n-embd", "33", "--n-head", "4"], "n_embd 33 is not divisible by n_head 4"),
    ],
)
def test_bad_pretrain_settings_create_nothing(micro_run, tmp_path, capsys, extra, expect):
    data = micro_run.parent / "data"
    out = tmp_path / "r"
    assert expect in one_line_error(capsys, "pretrain", "--data", data, "--out", out, "--steps", "2", *extra)
    assert not out.exists()  # so a corrected retry is not refused as "already holds a run"


def test_labels_per_class_zero_is_refused(micro_run, capsys, tmp_path):
    assert "at least 1" in one_line_error(capsys, "probe", micro_run, "--labels-per-class", "0")
    err = one_line_error(capsys, "finetune", micro_run, "--out", tmp_path / "f", "--labels-per-class", "0")
    assert "at least 1" in err


# 8: a full disk
@pytest.fixture
def tiny_disk(tmp_path):
    """A 3 MiB tmpfs (root only; skipped elsewhere)."""
    d = tmp_path / "disk"
    d.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(d)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:80]})")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_full_disk_is_one_line_and_leaves_no_partial_files(micro_run, tiny_disk, capsys):
    data = micro_run.parent / "data"
    run = tiny_disk / "run"
    # width 256: a checkpoint (weights and AdamW moments) of about 7 MB cannot fit in 3 MiB
    flags = "--preset micro --n-embd 256 --n-head 4 --steps 2 --batch-size 16 --eval-images 16 --no-progress"
    err = one_line_error(
        capsys, "pretrain", "--data", data, "--out", run, *flags.split(), after_progress=True
    )
    assert "no space left on the device" in err and "MB needed" in err
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the partial checkpoint is gone
    filler = tiny_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # fill the disk to the last byte
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    err = one_line_error(
        capsys, "sample", micro_run, "--out", tiny_disk / "grid.png", "--num", "8", "--count", "8"
    )
    assert "no space left on the device" in err
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler", "run"]  # no temporary PNG left


def test_full_disk_keeps_the_last_good_checkpoint(micro_run, tmp_path, monkeypatch):
    from igpt.training import checkpoint

    data = micro_run.parent / "data"
    igpt.pretrain(data=data, out=tmp_path / "r", steps=10, eval_interval=5, **MICRO)
    real = checkpoint.save_tensors

    def full(tensors, path, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_tensors", full)
    with pytest.raises(IgptError, match="no space left on the device"):
        igpt.pretrain(out=tmp_path / "r", steps=20, resume=True, progress=False)
    monkeypatch.setattr(checkpoint, "save_tensors", real)
    names = [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()]
    assert "step_00000010" in names and not [n for n in names if n.startswith(".tmp")]
    assert igpt.pretrain(out=tmp_path / "r", steps=20, resume=True, progress=False)["steps"] == 20


# 9: a checkpoint that does not fit the model falls back
def test_misshapen_checkpoint_falls_back_to_the_previous_one(micro_run, tmp_path, capsys):
    data = micro_run.parent / "data"
    igpt.pretrain(data=data, out=tmp_path / "r", steps=10, eval_interval=5, **MICRO)
    latest = tmp_path / "r" / "checkpoints" / "step_00000010" / "model.safetensors"
    w = load_file(latest)
    w["wpe.weight"] = torch.zeros(3, 3)
    save_file(w, latest)
    model = igpt.load_run(tmp_path / "r")
    assert "does not fit the run's model" in capsys.readouterr().err
    assert torch.equal(
        model.wpe.weight,
        load_file(latest.parent.parent / "step_00000005" / "model.safetensors")["wpe.weight"],
    )
    res = igpt.probe(tmp_path / "r", progress=False)
    assert res["checkpoint"] == "step_00000005"  # the checkpoint actually used, not "latest"
    s = igpt.pretrain(out=tmp_path / "r", steps=12, resume=True, progress=False)
    assert s["steps"] == 12


# 11: broken run records
@pytest.mark.parametrize(
    "content", [b"\xff\xfe\x00garbage", b"{}", b"[]", b'{"model": 5}', b'{"model": {"n_layer": "x"}}']
)
def test_broken_run_json_is_one_line(micro_run, tmp_path, capsys, content):
    run = tmp_path / "r"
    shutil.copytree(micro_run, run)
    (run / "run.json").write_bytes(content)
    err = one_line_error(capsys, "sample", run, "--out", tmp_path / "s.png")
    assert str(run) in err


@pytest.mark.parametrize("content", [b"\xff\xfe", b"[]", b'{"step": "x"}'])
def test_broken_state_json_falls_back(micro_run, tmp_path, capsys, content):
    run = tmp_path / "r"
    shutil.copytree(micro_run, run)
    ckpts = sorted((run / "checkpoints").iterdir())
    (ckpts[-1] / "state.json").write_bytes(content)
    if len(ckpts) > 1:
        igpt.load_run(run)
        assert "is damaged" in capsys.readouterr().err
    else:
        err = one_line_error(capsys, "sample", run, "--out", tmp_path / "s.png", after_progress=True)
        assert "no readable checkpoint" in err


# 12: out-of-range sampling options
def test_serve_refuses_extreme_temperature_and_seed_before_streaming(micro_run):
    client = TestClient(create_app(Completer(micro_run), 64 * 1024))
    for field, value in (("temperature", "1e-320"), ("seed", str(2**64))):
        r = client.post("/api/complete", data={"source": "test", field: value})
        assert r.status_code == 400 and field in r.json()["error"], r.text


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--num", "1000000000"], "must be at most 4,096"),
        (["--temperature", "1e-320"], "--temperature must be 0 (greedy) or at least"),
        (["--seed", str(10**23)], "--seed must be an integer in"),
        (["--scale", "-1"], "--scale must be in"),
    ],
)
def test_sample_refuses_extreme_options(micro_run, tmp_path, capsys, args, expect):
    assert expect in one_line_error(capsys, "sample", micro_run, "--out", tmp_path / "s.png", *args)


def test_probe_refuses_a_negative_seed(micro_run, capsys):
    assert "--seed must be an integer in" in one_line_error(capsys, "probe", micro_run, "--seed", "-1")


def test_malicious_bin_is_refused_without_suggesting_to_unpickle(tmp_path, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    hf = tmp_path / "hf"
    hf.mkdir()
    cfg = dict(model_type="imagegpt", vocab_size=9, n_positions=16, n_embd=8, n_layer=1, n_head=1)
    (hf / "config.json").write_text(json.dumps(cfg))
    (hf / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    err = one_line_error(capsys, "convert", "--from-hf", hf, "--out", tmp_path / "r")
    assert "never unpickles" in err and "weights_only=False" not in err
    assert not (tmp_path / "pwned").exists()


# 13: smaller ones
def test_a_killed_prepare_leaves_no_partial_directory_behind(tmp_path):
    stale = tmp_path / ".d.tmp-999999999-abc"  # a pid that cannot be alive
    stale.mkdir()
    (stale / "half.npy").write_bytes(b"x")
    live = tmp_path / f".d.tmp-{os.getpid()}-xyz"  # one of a process still running stays
    live.mkdir()
    igpt.prepare("digits", tmp_path / "d", resolution=8, clusters=4)
    assert not stale.exists() and live.exists()


def test_out_of_memory_message_names_no_missing_option(monkeypatch, capsys, micro_run):
    from igpt.probes import features

    def oom(*a, **k):
        raise MemoryError

    monkeypatch.setattr(features, "extract_pooled", oom)
    with pytest.raises(SystemExit):
        main(["probe", str(micro_run)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "igpt: error: out of memory; use a smaller batch size or fewer images"


def test_probe_data_with_another_palette_is_refused(micro_run, tmp_path, capsys):
    other = tmp_path / "other"
    igpt.prepare("digits", other, resolution=8, clusters=8, seed=3)
    pal = np.load(other / "palette.npy")
    np.save(other / "palette.npy", pal[::-1].copy())  # the same K, other colours
    assert "another palette" in one_line_error(capsys, "probe", micro_run, "--data", other)


def test_file_names_cannot_forge_error_lines(tmp_path, capsys):
    d = tmp_path / "f" / "a"
    d.mkdir(parents=True)
    for i in range(12):
        Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(d / f"{i}.png")
    (d / "x\nigpt: error: forged.png").write_bytes(b"not an image")
    flags = "--resolution 8 --clusters 2 --test-fraction 0.3".split()
    main(["prepare", "folder", "--data-dir", str(tmp_path / "f"), "--out", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    assert "skipped 1" in err and not any(ln.startswith("igpt: error:") for ln in err.splitlines())


def test_what_holds_still_holds(micro_run, tmp_path):
    """From the list of what held: a run directory of another kind is not resumed as a pretraining, and a
    run record from a newer igpt is refused, not misread."""
    ft = tmp_path / "ft"
    igpt.finetune(micro_run, out=ft, epochs=1, progress=False)
    with pytest.raises(IgptError, match="is a finetuned run"):
        igpt.pretrain(out=ft, steps=5, resume=True)
    info = json.loads((ft / "run.json").read_text())
    (ft / "run.json").write_text(json.dumps({**info, "schema": 99}))
    with pytest.raises(IgptError, match="newer igpt"):
        Run.open(ft)
    assert Path(ft / "finetune.json").is_file()
