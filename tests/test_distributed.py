"""Training across processes (torchrun, gloo, 2 CPU processes): a wall-clock budget with skewed starts ends
cleanly on every rank with identical replicas; a stop request to one rank stops every rank with a checkpoint;
FSDP follows a 1-process run (weights and gradient norm) and resumes; every collective's tensor lives on the
training device; bad launches fail with one line on every rank instead of hanging."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import igpt
from igpt.training import engine
from igpt.training.checkpoint import list_checkpoints

BASE = "--preset micro --batch-size 16 --eval-images 32 --log-interval 2 --no-progress".split()


def torchrun(data: Path, out: Path, *extra: str, port: int, env: dict | None = None, **popen) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    return [*cmd, "-m", "igpt", "pretrain", "--data", str(data), "--out", str(out), *BASE, *extra]


def run2(data: Path, out: Path, *extra: str, port: int, env_extra: dict | None = None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run(
        torchrun(data, out, *extra, port=port), capture_output=True, text=True, timeout=300, env=env
    )


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_skewed_starts_with_a_time_budget_end_cleanly_with_identical_replicas(digits, tmp_path):
    run = tmp_path / "r"
    # rank 1 starts its clock 4 s after rank 0: the ranks must still agree on the learning rate and the end
    skew = {"IGPT_START_SKEW": "1:4"}
    r = run2(digits, run, "--minutes", "0.25", "--eval-interval", "1000000", port=29531, env_extra=skew)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["finished"] and s["world_size"] == 2
    digests = s["replica_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # every rank's weights, not only rank 0's
    assert list_checkpoints(run)[-1].name == f"step_{s['steps']:08d}"  # the final checkpoint was saved
    assert "Traceback" not in r.stderr


def _rank_pid(parent: int, rank: int, deadline: float) -> int | None:
    """The pid of the torchrun worker with RANK=rank (a child of `parent`)."""
    while time.time() < deadline:
        for task in Path(f"/proc/{parent}/task").glob("*"):
            for pid in (task / "children").read_text().split():
                try:
                    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in env:
                    return int(pid)
        time.sleep(0.1)
    return None


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_request_to_one_rank_stops_every_rank_with_a_checkpoint(digits, tmp_path, sig):
    run = tmp_path / "r"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    port = 29532 if sig == signal.SIGINT else 29533
    cmd = torchrun(digits, run, "--steps", "1000000", "--eval-interval", "1000000", port=port)
    log = (tmp_path / "log").open("w+")  # a file, not a pipe: a full pipe would block the workers
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.1)
    pid = _rank_pid(p.pid, 1, deadline)
    assert pid is not None
    os.kill(pid, sig)  # to rank 1 alone: rank 0 must learn of it and stop at the same step
    try:
        p.wait(timeout=120)
    finally:
        p.kill()
    err = (tmp_path / "log").read_text()
    s = json.loads((run / "summary.json").read_text())
    assert not s["finished"] and s["replica_weight_digests"][0] == s["replica_weight_digests"][1]
    assert list_checkpoints(run)[-1].name == f"step_{s['steps']:08d}"
    assert "interrupt (rank 1)" in err and "/igpt/" not in err  # no traceback from igpt's code


def test_fsdp_follows_one_process_and_resumes(digits, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    kw = dict(preset="micro", batch_size=16, eval_images=32, log_interval=2, progress=False)
    igpt.pretrain(digits, one, steps=8, eval_interval=4, **kw)
    r = run2(digits, two, "--steps", "8", "--eval-interval", "4", "--fsdp", port=29534)
    assert r.returncode == 0, r.stderr[-2000:]

    def same(step: int) -> None:
        a = load_file(one / "checkpoints" / f"step_{step:08d}" / "model.safetensors")
        b = load_file(two / "checkpoints" / f"step_{step:08d}" / "model.safetensors")
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)

    same(8)
    ga = {m["step"]: m["grad_norm"] for m in metrics(one) if "grad_norm" in m}
    gb = {m["step"]: m["grad_norm"] for m in metrics(two) if "grad_norm" in m}
    assert ga.keys() == gb.keys() and all(abs(ga[k] - gb[k]) <= 1e-4 * ga[k] for k in ga)  # the full norm
    igpt.pretrain(out=one, steps=12, resume=True, progress=False)
    r = run2(digits, two, "--steps", "12", "--fsdp", "--resume", port=29535)
    assert r.returncode == 0, r.stderr[-2000:]
    same(12)


def test_every_collective_is_on_the_training_device(monkeypatch, digits):
    """The loss all-reduce must run on the device the process trains on (NCCL takes only CUDA tensors). On
    the meta device, a step that moved it to the CPU first would be caught here, on a CPU machine."""
    seen = []
    monkeypatch.setattr(engine.dist, "all_reduce", lambda t, op=None: seen.append(t.device))
    with torch.device("meta"):
        model = igpt.IGPT(igpt.IGPTConfig(vocab_size=8, n_positions=64, n_layer=1, n_embd=16, n_head=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    from igpt.data.prepared import PreparedData

    batcher = engine.Batcher(PreparedData(digits).tokens("train"), 8, 0)
    recipe = engine.StepRecipe(
        rank=0,
        world=2,
        grad_accum=1,
        objective="ar",
        mask_ratio=0.15,
        seed=0,
        grad_clip=1.0,
        device="meta",
        precision="fp32",
    )
    with pytest.raises((RuntimeError, NotImplementedError)):  # values cannot be read off the meta device
        engine.train_step(model, opt, batcher, 0, 0.1, recipe)
    assert seen and all(d.type == "meta" for d in seen), seen
    with pytest.raises(RuntimeError, match="collective on a cpu tensor"):
        engine.all_reduce(torch.zeros(1), "meta")


@pytest.mark.parametrize(
    "extra, env_extra, expect",
    [
        (["--fsdp", "--steps", "2"], {}, None),  # run without torchrun below
        (["--batch-size", "15", "--steps", "2"], {}, "must divide by processes"),
        (["--device", "cuda", "--steps", "2"], {}, "no CUDA GPU"),
    ],
)
def test_bad_launches_fail_with_one_line_on_every_rank(digits, tmp_path, capsys, extra, env_extra, expect):
    if expect is None:  # --fsdp without torchrun
        from igpt.cli import main

        with pytest.raises(SystemExit):
            main(["pretrain", "--data", str(digits), "--out", str(tmp_path / "f"), *BASE, *extra])
        assert "launch with torchrun" in capsys.readouterr().err
        return
    if expect == "no CUDA GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = run2(digits, tmp_path / "r", *extra, port=29536 + len(extra), env_extra=env_extra)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("igpt: error:")]
    # one line per rank that got to print it: torchrun ends the other rank once the first one exits
    assert 1 <= len(lines) <= 2 and all(expect in ln for ln in lines), r.stderr[-1500:]
    assert "/igpt/" not in r.stderr  # no traceback from igpt's code


def test_mismatched_settings_across_ranks_are_refused_on_every_rank(digits, tmp_path):
    """Rank 1 is launched with another learning rate (through a wrapper): both ranks refuse, neither hangs."""
    wrapper = tmp_path / "launch.py"
    wrapper.write_text(
        "import os, sys\n"
        "from igpt.cli import main\n"
        "argv = sys.argv[1:]\n"
        "if os.environ.get('RANK') == '1':\n"
        "    argv += ['--lr', '0.5']\n"
        "main(argv)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        *"-m torch.distributed.run --nproc_per_node 2 --master_port 29541".split(),
        str(wrapper),
    ]
    cmd += ["pretrain", "--data", str(digits), "--out", str(tmp_path / "r"), *BASE, "--steps", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("igpt: error:")]
    assert 1 <= len(lines) <= 2 and all("different settings" in ln for ln in lines), r.stderr[-1500:]
