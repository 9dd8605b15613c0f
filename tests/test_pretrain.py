"""`igpt pretrain`: run directories, resume equality (after a crash, SIGKILL, a half-written checkpoint),
DDP equality, checkpoint round trip, and refusals of bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import PRETRAIN_BASE, assert_same_weights, losses, pretrain, run_cli, weights

import igpt
from igpt.training import trainer
from igpt.training.checkpoint import list_checkpoints


def test_run_directory_and_summary(digits, tmp_path):
    run = tmp_path / "run"
    pretrain(digits, run, "--steps", "20")
    s = json.loads((run / "summary.json").read_text())
    for k in (
        "objective",
        "params",
        "steps",
        "tokens_seen",
        "train_loss",
        "val_nll",
        "val_bits_per_token",
        "tokens_per_second",
    ):
        assert s[k] is not None, k
    assert s["steps"] == 20 and s["tokens_seen"] == 20 * 16 * 64
    info = json.loads((run / "run.json").read_text())
    assert info["data"]["dir"] == str(digits) and info["train"]["seed"] == 0 and info["model"]["n_layer"] == 2
    assert (run / "palette.npy").is_file() and (run / "data_meta.json").is_file()
    assert s["val_nll"] < 2.0794  # below ln 8 after 20 steps


def test_checkpoint_round_trip(digits, tmp_path):
    run = tmp_path / "run"
    pretrain(digits, run, "--steps", "10")
    m = igpt.load_run(str(run))
    assert not m.training
    sd = weights(run, 10)
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k])
    x = torch.randint(0, 8, (2, 64))
    assert m.logits(x).shape == (2, 64, 8)


def test_resume_after_crash_equals_uninterrupted(digits, tmp_path, monkeypatch):
    straight, crashed = tmp_path / "a", tmp_path / "b"
    pretrain(digits, straight, "--steps", "40")
    real = trainer.train_step

    def crashing(*a, **k):
        if a[3] == 27:  # the step argument: die in the middle of the run, after the step-20 checkpoint
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(trainer, "train_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(digits, crashed, "--steps", "40")
    monkeypatch.setattr(trainer, "train_step", real)
    assert [p.name for p in list_checkpoints(crashed)][-1] == "step_00000020"
    pretrain(digits, crashed, "--steps", "40", "--resume")
    assert losses(crashed) == losses(straight)
    assert_same_weights(weights(crashed, 40), weights(straight, 40))


def test_resume_after_sigkill_and_half_written_checkpoint(digits, tmp_path):
    straight, killed = tmp_path / "a", tmp_path / "b"
    args = ["--steps", "60", *PRETRAIN_BASE]
    pretrain(digits, straight, "--steps", "60")
    cmd = [sys.executable, "-m", "igpt", "pretrain", "--data", str(digits), "--out", str(killed), *args]
    # first kill: soon after start, before any checkpoint exists
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    p.kill()
    p.wait()
    # second kill: once a checkpoint exists, mid-run
    p = subprocess.Popen(
        cmd + (["--resume"] if (killed / "run.json").exists() else []),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not list_checkpoints(killed) and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    # leave what a kill in the middle of a checkpoint write leaves: a temporary directory with a partial file
    tmp = killed / "checkpoints" / ".tmp-step_00000050-99999"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "model.safetensors").write_bytes(b"partial")
    (killed / ".lock").write_text("stale")
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not tmp.exists()
    assert losses(killed) == losses(straight)
    assert_same_weights(weights(killed, 60), weights(straight, 60))


def test_truncated_checkpoint_falls_back(digits, tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(digits, run, "--steps", "20")
    f = run / "checkpoints" / "step_00000020" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(igpt.errors.IgptError, match="damaged"):
        igpt.load_run(str(run), "step_00000020")
    m = igpt.load_run(str(run))  # the previous checkpoint still loads
    assert "using the previous checkpoint" in capsys.readouterr().err
    for k, v in m.state_dict().items():
        assert torch.equal(v, weights(run, 10)[k])
    pretrain(digits, run, "--steps", "20", "--resume")  # resumes from step 10 and rewrites step 20
    assert weights(run, 20).keys() == m.state_dict().keys()


def test_bert_grad_accumulation_equals_one_batch(digits, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    pretrain(digits, a, "--steps", "10", "--objective", "bert")
    pretrain(digits, b, "--steps", "10", "--objective", "bert", "--grad-accum", "4")
    assert_same_weights(weights(a, 10), weights(b, 10), atol=1e-5)
    assert json.loads((a / "summary.json").read_text())["objective"] == "bert"


def test_ddp_two_processes_equal_one(digits, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    pretrain(digits, one, "--steps", "12")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [
            sys.executable,
            *"-m torch.distributed.run --nproc_per_node 2 --master_port 29517".split(),
            *"-m igpt pretrain --data".split(),
            str(digits),
            "--out",
            str(two),
            *PRETRAIN_BASE,
            *"--steps 12".split(),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    assert_same_weights(weights(one, 12), weights(two, 12), atol=1e-5)


def test_ctrl_c_saves_a_checkpoint(digits, tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        *"-m igpt pretrain --data".split(),
        str(digits),
        "--out",
        str(run),
        *PRETRAIN_BASE,
        *"--steps 100000 --eval-interval 100000".split(),
    ]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    ckpts = list_checkpoints(run)
    assert ckpts and int(ckpts[-1].name[5:]) >= 5
    assert json.loads((run / "summary.json").read_text())["finished"] is False


def test_nan_loss_stops_and_keeps_last_good(digits, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real = trainer.train_step
    monkeypatch.setattr(
        trainer, "train_step", lambda *a, **k: (float("nan"), 1.0) if a[3] >= 13 else real(*a, **k)
    )
    with pytest.raises(SystemExit):
        pretrain(digits, run, "--steps", "30")
    err = capsys.readouterr().err
    assert "nan" in err and "at step 14" in err and "last good checkpoint: step_00000010" in err
    assert [p.name for p in list_checkpoints(run)] == ["step_00000010"]


def test_bad_input(digits, tmp_path):
    run = tmp_path / "run"
    r = run_cli("pretrain", "--data", digits, "--out", run, *PRETRAIN_BASE, "--steps", "5")
    assert r.returncode == 0, r.stderr
    cases = [
        (["--data", digits, "--out", run, "--steps", "5"], "--resume"),
        (
            ["--data", digits, "--out", run, "--steps", "5", "--resume", "--preset", "small"],
            "preset 'micro' -> 'small'",
        ),
        (["--data", tmp_path / "nope", "--out", tmp_path / "r2"], "not a prepared directory"),
        (["--data", digits, "--out", tmp_path / "r3", "--preset", "huge"], "unknown --preset 'huge'"),
        (["--data", digits, "--out", tmp_path / "r4", "--batch-size", "100000"], "larger than"),
    ]
    for args, expect in cases:
        r = run_cli("pretrain", *args)
        assert r.returncode != 0 and expect in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "r3").exists() and not (tmp_path / "r4" / "run.json").exists()


def test_a_minutes_budget_is_replanned_once_without_a_jump_in_the_rate(digits, tmp_path):
    """`replan` is asked once, halfway through a wsd minutes budget, and its minutes are taken: the rate stays
    at its peak past the old budget's cool-down (no jump), and run.json records the new budget."""
    asked = []

    def replan(elapsed: float, least: float, most: float) -> float:
        asked.append((elapsed, least, most))
        return 0.08  # from 3 s to 4.8 s

    run = tmp_path / "run"
    settings = dict(preset="micro", batch_size=16, lr=1e-3, eval_images=64, log_interval=2, progress=False)
    s = igpt.pretrain(digits, run, minutes=0.05, schedule="wsd", replan=replan, **settings)
    assert len(asked) == 1
    elapsed, least, most = asked[0]
    assert 1.5 <= elapsed < 2.4 and least == pytest.approx(elapsed / 60 / 0.8)
    assert most == pytest.approx(elapsed / 60 / 0.05)
    assert json.loads((run / "run.json").read_text())["train"]["minutes"] == 0.08
    assert s["finished"] and s["elapsed_seconds"] >= 0.08 * 60
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    flat = [r["lr"] for r in rows if "lr" in r and 2.6 <= r["elapsed"] <= 3.6]  # old cool-down, new flat
    assert flat and all(lr == pytest.approx(1e-3) for lr in flat), flat
    # other schedules (whose rate depends on the budget throughout) and step budgets are not re-planned
    igpt.pretrain(digits, tmp_path / "cos", minutes=0.02, schedule="cosine", replan=replan, **settings)
    # nor a cool-down that starts before the asking point
    late = dict(schedule="wsd", cooldown=0.6)
    igpt.pretrain(digits, tmp_path / "cd", minutes=0.02, replan=replan, **late, **settings)
    assert len(asked) == 1
