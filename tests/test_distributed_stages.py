"""The stages after pretraining under torchrun (gloo, 2 CPU processes). The probe: the processes share every
feature pass through the run's feature store and rank 0 fits. Fine-tuning: DDP over the global batch's
shares. The figures are one process's; bad launches fail on every rank; the whole chain runs on downsampled
ImageNet."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from test_out_of_core import KEYS, KW, close
from test_streaming import imagenet_files

import igpt


def torchrun(
    *argv: object, port: int, script: str | None = None, procs: int = 2
) -> subprocess.CompletedProcess:
    """`igpt ARGV` over `procs` processes (1: plain `python -m igpt`), one thread each."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(procs),
        "--master_port",
        str(port),
    ]
    if procs == 1:
        cmd = [sys.executable]
    cmd += [script] if script else ["-m", "igpt"]
    return subprocess.run([*cmd, *map(str, argv)], capture_output=True, text=True, timeout=300, env=env)


def test_a_two_process_probe_gives_one_process_figures(micro_run, tmp_path):
    shutil.copytree(micro_run.parent, tmp_path / "m")
    run = tmp_path / "m" / "run"
    one = igpt.probe(run, **KW)
    r = torchrun("probe", run, "--pool", "grid", "--fine-pool", "grid4", "--no-progress", port=29561)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("best layer") == 1  # rank 0 reports; rank 1 only computed its share
    two = json.loads((run / "probe_full.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    for k in KEYS:
        assert close(one[k], two[k]), (k, one[k], two[k])
    assert list((run / "features").glob("*/train-*"))  # the passes went through the store


def test_ranks_given_other_settings_are_refused_on_every_rank(micro_run, tmp_path):
    wrapper = tmp_path / "launch.py"
    wrapper.write_text(
        "import os, sys\n"
        "from igpt.cli import main\n"
        "argv = sys.argv[1:]\n"
        "if os.environ.get('RANK') == '1':\n"
        "    argv += ['--layers', '1']\n"
        "main(argv)\n"
    )
    r = torchrun("probe", micro_run, "--no-progress", port=29562, script=str(wrapper))
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("igpt: error:")]
    assert 1 <= len(lines) <= 2 and all("different settings" in ln for ln in lines), r.stderr[-1500:]


FT = "--epochs 2 --train-limit 200 --batch-size 16 --optimizer adamw --head-init zero --no-progress".split()


@pytest.mark.parametrize("how", ["ddp", "fsdp"])
def test_a_two_process_finetune_follows_one_process_and_writes_once(micro_run, tmp_path, how):
    one = torchrun("finetune", micro_run, "--out", tmp_path / "one", *FT, port=0, procs=1)
    extra = ["--fsdp"] if how == "fsdp" else []
    two = torchrun(
        "finetune", micro_run, "--out", tmp_path / "two", *FT, *extra, port=29563 + 10 * (how == "fsdp")
    )
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("test accuracy") == 1  # rank 0 reports and writes
    a, b = (json.loads((tmp_path / k / "finetune.json").read_text()) for k in ("one", "two"))
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert a["best_epoch"] == b["best_epoch"] and a["steps"] == b["steps"] > 0
    assert close(a["history"], b["history"]) and close(a["test_accuracy"], b["test_accuracy"])
    wa, wb = (load_file(tmp_path / k / "model.safetensors") for k in ("one", "two"))
    assert wa.keys() == wb.keys()
    assert max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa) <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no stray output


def test_finetunes_that_cannot_share_are_refused_on_every_rank(micro_run, tmp_path):
    for extra, expect in (
        (["--labels-per-class", "5"], "run in one process"),
        (["--batch-size", "15"], "must divide by the 2 processes"),
        (["--fsdp"], "muon needs whole matrices"),
    ):
        r = torchrun("finetune", micro_run, "--out", tmp_path / "o", "--no-progress", *extra, port=29564)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("igpt: error:")]
        assert r.returncode != 0 and 1 <= len(lines) <= 2, r.stderr[-1500:]  # the ranks' lines may interleave
        assert all(expect in ln for ln in lines) and r.stderr.count(expect) == 2
        assert not (tmp_path / "o").exists()


def test_the_chain_on_downsampled_imagenet_under_torchrun(tmp_path):
    src = imagenet_files(tmp_path / "in", n=48)
    data, run = tmp_path / "data", tmp_path / "run"
    igpt.prepare("imagenet16", out=data, data_dir=str(src), resolution=8, clusters=8, progress=False)
    steps = "--preset micro --steps 6 --batch-size 16 --eval-images 32 --no-progress".split()
    r = torchrun("pretrain", "--data", data, "--out", run, *steps, port=29565)
    assert r.returncode == 0, r.stderr[-2000:]
    r = torchrun("probe", run, "--fine-pool", "none", "--no-progress", port=29566)
    assert r.returncode == 0, r.stderr[-2000:]
    r = torchrun(
        "finetune",
        run,
        "--out",
        tmp_path / "ft",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--no-progress",
        port=29567,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    for path in (run / "summary.json", run / "probe.json", tmp_path / "ft" / "finetune.json"):
        assert json.loads(path.read_text())["world_size"] == 2, path


def test_fsdp_fine_tuning_needs_torchrun(micro_run, tmp_path, cli_error):
    err = cli_error("finetune", micro_run, "--out", tmp_path / "o", "--fsdp", "--optimizer", "adamw")
    assert "launch with torchrun" in err and not (tmp_path / "o").exists()
