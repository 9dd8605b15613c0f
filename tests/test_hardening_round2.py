"""Hostile and broken input, round two (#27): prepared and run directories checked when read, every setting
checked before anything is written, bounded augmentation and memory, runs that never get stuck, and outputs
with the modes a plain `open` gives. One test per cause."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import igpt
from igpt.data.decode import load_image
from igpt.data.prepared import PreparedData
from igpt.data.sources import list_folder
from igpt.errors import IgptError
from igpt.files import atomic_directory, write_json_atomic
from igpt.runs import Run, read_metrics

MICRO = dict(preset="micro", batch_size=16, eval_images=16, progress=False)


def tampered(digits: Path, tmp_path: Path, name: str, value) -> Path:
    """A copy of the prepared digits with one file replaced: an array (.npy) or a JSON value (meta.json)."""
    d = tmp_path / "bad"
    shutil.copytree(digits, d)
    if name.endswith(".npy"):
        np.save(d / name, value, allow_pickle=True)
    else:
        (d / name).write_text(json.dumps(value))
    return d


def _meta(digits: Path, **change) -> dict:
    m = json.loads((digits / "meta.json").read_text())
    m.update(change)
    return {k: v for k, v in m.items() if v is not None}


# 6: prepared directories are checked when read
@pytest.mark.parametrize(
    "name, make, expect",
    [
        ("train_tokens.npy", lambda t, y, p: np.where(t == 0, 8, t), "must be in [0, 8)"),
        ("train_tokens.npy", lambda t, y, p: t.astype(np.int16) - 1, "must be in [0, 8)"),
        ("train_tokens.npy", lambda t, y, p: t.reshape(-1), "2-D integer array"),
        ("train_tokens.npy", lambda t, y, p: t[:, :, None], "2-D integer array"),
        ("train_tokens.npy", lambda t, y, p: t[:, :32], "rows of 32 tokens"),
        ("train_tokens.npy", lambda t, y, p: t.astype(np.float32), "2-D integer array"),
        ("train_labels.npy", lambda t, y, p: np.concatenate([y, y[:5]]), "labels for"),
        ("train_labels.npy", lambda t, y, p: np.where(y == 0, 10, y), "must be in [0, 10)"),
        ("palette.npy", lambda t, y, p: p.astype(object), "allow_pickle"),
        ("palette.npy", lambda t, y, p: p[:4], "expected 8 colours"),
        ("palette.npy", lambda t, y, p: p.reshape(-1), "numeric (K, channels)"),
        ("palette.npy", lambda t, y, p: np.repeat(p, 3, axis=1), "expected 8 colours of 1 channel"),
        ("palette.npy", lambda t, y, p: np.where(p == p.max(), np.nan, p), "finite values"),
    ],
)
def test_damaged_arrays_are_refused_before_a_run_is_made(digits, tmp_path, cli_error, name, make, expect):
    arrays = [np.load(digits / f) for f in ("train_tokens.npy", "train_labels.npy", "palette.npy")]
    bad = tampered(digits, tmp_path, name, make(*arrays))
    err = cli_error("pretrain", "--data", bad, "--out", tmp_path / "r", "--preset", "micro", "--steps", "2")
    assert expect in err and name in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "meta, expect",
    [
        (lambda d: _meta(d, resolution=None), "'resolution' must be an integer"),
        (lambda d: _meta(d, resolution="8"), "'resolution' must be an integer"),
        (lambda d: _meta(d, resolution=4), "rows of 64 tokens, but meta.json's resolution 4"),
        (lambda d: [1, 2], "is not a JSON object"),
    ],
)
def test_damaged_meta_is_refused(digits, tmp_path, cli_error, meta, expect):
    bad = tampered(digits, tmp_path, "meta.json", meta(digits))
    err = cli_error("pretrain", "--data", bad, "--out", tmp_path / "r", "--preset", "micro", "--steps", "2")
    assert expect in err and not (tmp_path / "r").exists()


def test_damaged_data_under_a_run_is_one_line_for_probe_and_sample(micro_run, tmp_path, cli_error):
    data = tmp_path / "d"
    shutil.copytree(Run.open(micro_run).data_dir, data)
    t = np.load(data / "test_tokens.npy")
    np.save(data / "test_tokens.npy", np.full_like(t, 200))
    assert "must be in [0, 8)" in cli_error("probe", micro_run, "--data", data)
    with pytest.raises(IgptError, match="must be in"):
        PreparedData(data).tokens("test")


# 7: every setting checked before anything is written
@pytest.mark.parametrize("cmd", ["pretrain", "prepare"])
def test_huge_seed_is_refused_before_anything_is_written(digits, tmp_path, cli_error, cmd):
    seed = str(10**23)
    if cmd == "pretrain":
        argv = ["pretrain", "--data", digits, "--out", tmp_path / "r", "--preset", "micro", "--seed", seed]
    else:
        argv = ["prepare", "digits", "--out", tmp_path / "r", "--seed", seed]
    assert "--seed must be an integer in [0, 2^32)" in cli_error(*argv)
    assert not (tmp_path / "r").exists()


# 1: the shift is bounded by the image side
def test_shift_past_the_image_is_refused(digits, tmp_path, cli_error):
    argv = ["--preset", "micro", "--shift", "100000"]
    err = cli_error("pretrain", "--data", digits, "--out", tmp_path / "r", *argv)
    assert "--shift 100000 must be smaller than the image side (8 pixels)" in err
    assert not (tmp_path / "r").exists()


# 2: what training needs is counted before anything is created
def test_model_too_big_to_train_is_refused_before_the_run_exists(digits, tmp_path, cli_error):
    argv = ["--n-layer", "8", "--n-embd", "4096", "--n-head", "8", "--steps", "1"]
    err = cli_error("pretrain", "--data", digits, "--out", tmp_path / "r", *argv)
    assert "optimizer state, activations" in err and "GiB" in err
    assert not (tmp_path / "r").exists()
    from igpt.model.gpt import IGPTConfig

    cfg = IGPTConfig.from_preset("tiny", vocab_size=16, n_positions=196)
    assert cfg.training_bytes(64) > cfg.training_bytes(32) > 16 * cfg.num_params()


# 8: a budget that ends before the first step still validates
def test_tiny_budget_still_writes_a_whole_summary(digits, tmp_path):
    s = igpt.pretrain(data=digits, out=tmp_path / "r", minutes=1e-9, **MICRO)
    assert s["steps"] == 1 and s["val_nll"] > 0 and s["test_nll"] > 0  # one step: a checkpoint to resume


# 9: a classifier needs two classes
@pytest.mark.parametrize("cmd", ["probe", "finetune"])
def test_one_training_image_is_refused(micro_run, tmp_path, cli_error, cmd):
    extra = ["--out", tmp_path / "f"] if cmd == "finetune" else []
    err = cli_error(cmd, micro_run, *extra, "--train-limit", "1")
    assert "needs at least two classes" in err


# 10: resolution-1 sets
def test_resolution_one_refusals(tmp_path, cli_error):
    igpt.prepare("digits", out=tmp_path / "d1", resolution=1, clusters=4)
    assert "needs images of at least 2 pixels" in cli_error(
        "pretrain", "--data", tmp_path / "d1", "--out", tmp_path / "p", "--preset", "micro", "--prefix-causal"
    )
    igpt.pretrain(data=tmp_path / "d1", out=tmp_path / "r", steps=2, **MICRO)
    assert "use --pool mean" in cli_error("probe", tmp_path / "r", "--pool", "grid3")


# 12: stray names and symlink loops in checkpoints/
def test_odd_checkpoint_names_are_ignored_and_a_loop_is_refused_early(micro_run, tmp_path, cli_error, digits):
    run = tmp_path / "r"
    shutil.copytree(micro_run, run)
    (run / "checkpoints" / "step_best").mkdir()
    (run / "checkpoints" / "step_best" / "state.json").write_text("{}")
    assert [p.name for p in Run.open(run).checkpoints()] == [
        p.name for p in Run.open(micro_run).checkpoints()
    ]
    igpt.sample(run, out=tmp_path / "g.png", num=1, count=1)
    loop = tmp_path / "loop"
    igpt.pretrain(data=digits, out=loop, steps=2, **MICRO)
    shutil.rmtree(loop / "checkpoints")
    (loop / "checkpoints").symlink_to(loop / "checkpoints")
    err = cli_error("pretrain", "--out", loop, "--resume", "--steps", "4", "--no-progress")
    assert "cannot write checkpoints" in err


# 13: metrics.jsonl after kills and damage
def test_resume_survives_damaged_metrics_and_drops_a_killed_attempts_rows(digits, tmp_path):
    run = tmp_path / "r"
    igpt.pretrain(data=digits, out=run, steps=4, log_interval=1, eval_interval=2, **MICRO)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": null}\n\xff\xfe not utf-8\n{"step": 9, "loss": 1.0}\n{"step": 10, "lo')
    igpt.pretrain(out=run, steps=6, resume=True, progress=False)
    rows = read_metrics(run)
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)) and max(steps) == 6 and 9 not in steps
    # a kill before the first checkpoint: the attempt's rows go, not doubled beside the new ones
    fresh = tmp_path / "k"
    igpt.pretrain(data=digits, out=fresh, steps=3, log_interval=1, eval_interval=100, **MICRO)
    shutil.rmtree(fresh / "checkpoints")
    (fresh / "summary.json").unlink()
    igpt.pretrain(out=fresh, steps=3, resume=True, progress=False)
    steps = [r["step"] for r in read_metrics(fresh) if "loss" in r]
    assert steps == [1, 2, 3]


# 14: damaged records read by probe
def test_probe_skips_a_damaged_state_and_refuses_a_garbage_probe_json(micro_run, tmp_path, cli_error):
    run = tmp_path / "r"
    shutil.copytree(micro_run, run)
    (run / "probe.json").write_bytes(b"\xff\x00garbage")
    assert "does not name a best layer" in cli_error("probe", run, "--layers", "best")


# 15: EXIF orientation
def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # stored rotated: display rotates 90 degrees clockwise
    img.save(tmp_path / "p.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "p.jpg", None)
    assert out.shape[:2] == (40, 20)  # upright: taller than wide
    assert out[:20].mean() > 200 and out[20:].mean() < 50  # the white half is now on top


# 16: outputs get the modes a plain open gives
def test_atomic_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        with atomic_directory(tmp_path / "d") as d:
            (d / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


# 5: what a SIGKILL left is removed by the next run
def test_leftovers_of_killed_processes_are_removed(tmp_path):
    dead = 4_000_000  # no such process
    (tmp_path / f".out.old-{dead}-123").mkdir()
    (tmp_path / ".out.old-1700000000000000000").mkdir()  # an older name, without a pid
    (tmp_path / f".probe.tmp-{dead}-abc.png").write_bytes(b"x")
    with atomic_directory(tmp_path / "out") as d:
        (d / "f").write_text("x")
    write_json_atomic(tmp_path / "probe.png", {})  # any atomic write of probe.png cleans its own leftovers
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["out", "probe.png"]


# 18: an empty class folder is not a class
def test_empty_class_folder_is_left_out(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / c / "x.png")
    (tmp_path / "empty").mkdir()
    classes, entries, notes = list_folder(tmp_path)
    assert classes == ["a", "b"] and {e[1] for e in entries} == {0, 1} and "empty class folder" in notes[0]


# messages
def test_sample_into_a_directory_is_one_line(micro_run, tmp_path, cli_error):
    assert "is a directory" in cli_error("sample", micro_run, "--out", tmp_path)


def test_prepare_resolution_past_the_largest(tmp_path, cli_error):
    assert "--resolution must be in [1, 256]" in cli_error(
        "prepare", "digits", "--out", tmp_path / "d", "--resolution", "100000"
    )


def test_a_diverging_run_names_only_checkpoints_that_exist(digits, tmp_path, cli_error, monkeypatch):
    from igpt.training import trainer

    # a loss that is no longer finite (rates of 1e30 are refused now, so the step itself is made to diverge)
    monkeypatch.setattr(trainer, "train_step", lambda *a, **k: (float("nan"), float("nan")))
    err = cli_error(
        "pretrain",
        "--data",
        digits,
        "--out",
        tmp_path / "r",
        "--preset",
        "micro",
        "--lr",
        "10",
        "--steps",
        "50",
        "--eval-interval",
        "1000",
        "--no-progress",
    )
    assert "last good checkpoint: none yet" in err
