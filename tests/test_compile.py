"""torch.compile on CPU: a compiled training run and a compiled feature pass agree with eager PyTorch, and a
machine without a working C++ compiler gets one notice and the eager result, not a crash."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from igpt.model.compiling import CompiledOrEager
from igpt.model.gpt import IGPT, IGPTConfig
from igpt.probes.features import extract_features

BASE = "--preset micro --steps 6 --batch-size 16 --eval-interval 6 --log-interval 1 --eval-images 32".split()
BASE += ["--no-progress"]


def pretrain_subprocess(data: Path, out: Path, *extra: str, env: dict | None = None) -> str:
    cmd = [sys.executable, "-m", "igpt", "pretrain", "--data", str(data), "--out", str(out), *BASE, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr
    return r.stderr


def losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_compiled_training_follows_eager(digits, tmp_path):
    pretrain_subprocess(digits, tmp_path / "eager")
    err = pretrain_subprocess(digits, tmp_path / "compiled", "--compile")
    assert "torch.compile" in err and "failed" not in err
    assert json.loads((tmp_path / "compiled" / "run.json").read_text())["train"]["compile"] is True
    assert json.loads((tmp_path / "compiled" / "summary.json").read_text())["compiled"] is True
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 6
    np.testing.assert_allclose(compiled, eager, rtol=1e-4)  # same maths, differently fused kernels


def test_no_cxx_compiler_falls_back_to_eager(digits, tmp_path):
    pretrain_subprocess(digits, tmp_path / "eager")
    env = {"CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    err = pretrain_subprocess(digits, tmp_path / "fallback", "--compile", env=env)
    notices = [ln for ln in err.splitlines() if "torch.compile of the training step failed" in ln]
    assert len(notices) == 1 and "running it eagerly" in notices[0]
    assert losses(tmp_path / "fallback") == losses(tmp_path / "eager")  # the very same eager steps
    assert json.loads((tmp_path / "fallback" / "summary.json").read_text())["compiled"] is False


@torch.no_grad()
def test_compiled_features_match_eager_with_a_short_last_batch():
    torch.manual_seed(0)
    model = IGPT(IGPTConfig(vocab_size=8, n_positions=16, n_layer=2, n_embd=32, n_head=2)).eval()
    tokens = np.random.default_rng(0).integers(0, 8, (21, 16))  # batches of 8, 8 and 5 (padded to 8)
    kw = dict(layers=[0, 1, 2], batch_size=8, pool="grid", resolution=4)
    eager = extract_features(model, tokens, **kw)
    compiled = extract_features(model, tokens, compile=True, **kw)
    for i in eager:
        assert compiled[i].shape == (21, 4 * 32)
        torch.testing.assert_close(compiled[i], eager[i], atol=1e-5, rtol=1e-5)


def test_compiled_or_eager_passes_computation_errors_through():
    def bad(x):
        raise ValueError("not a compile error")

    f = CompiledOrEager(bad, "a test function", enabled=True)
    assert f.active  # the compiled path runs, and the error of the computation reaches the caller
    with pytest.raises(ValueError, match="not a compile error"):
        f(torch.zeros(1))
