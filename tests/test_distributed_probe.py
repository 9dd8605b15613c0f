"""The probe under torchrun (gloo, 2 CPU processes): the processes share every feature pass through the run's
feature store and rank 0 fits; the figures are one process's, and bad launches fail on every rank."""

import json
import os
import shutil
import subprocess
import sys

from test_out_of_core import KEYS, KW, close

import igpt


def torchrun(*argv: object, port: int, script: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
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
