"""The CUDA path: bf16 autocast against fp32, the decode step against the full forward, a pretrain that
resumes to the same losses, and a probe and a fine-tuning step, all on a GPU. Every test here is marked
`cuda` and skipped where torch sees no CUDA device (as on CI); `benchmarks/gpu_check.sh` runs them on a lent
GPU with `pytest -m cuda`."""

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli

import igpt
from igpt.generation.complete import DecodeWeights, KVCache, decode_step, generate
from igpt.model.gpt import IGPT, IGPTConfig
from igpt.training import trainer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"


def small(objective: str = "ar", **kw) -> IGPT:
    torch.manual_seed(0)
    cfg = IGPTConfig(vocab_size=32, n_positions=64, n_layer=3, n_embd=64, n_head=4, objective=objective, **kw)
    m = IGPT(cfg)
    with torch.no_grad():  # the zero-initialised head would make every logit equal
        m.lm_head.weight.normal_(0, 0.05)
    return m.to(DEV)


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_bf16_autocast_matches_fp32(objective):
    m = small(objective)
    x = torch.randint(0, 32, (4, 64), device=DEV)
    mask = torch.rand(4, 64, device=DEV) < 0.15 if objective == "bert" else None
    logits32, loss32 = m(x, mask)
    loss32.backward()
    g32 = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits16, loss16 = m(x, mask)
    loss16.backward()
    assert logits16.dtype == torch.bfloat16 and loss16.dtype == torch.float32
    torch.testing.assert_close(logits16.float(), logits32, atol=3e-2, rtol=3e-2)
    assert abs(float(loss16.detach()) - float(loss32.detach())) < 1e-2
    for n, p in m.named_parameters():
        # gradients agree in direction and size (elementwise tolerances are meaningless for tiny entries)
        a, b = p.grad.flatten().float(), g32[n].flatten()
        if b.norm() > 1e-6:
            assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.98, n
            assert 0.9 < float(a.norm() / b.norm()) < 1.1, n


@pytest.mark.parametrize("bias", [False, True])
def test_decode_step_logits_match_full_forward(bias):
    m = small(bias=bias).eval()
    B, P, n = 3, 10, 6
    x = torch.randint(0, 32, (B, P + n), device=DEV)
    full = m.logits(x)  # (B, T, K): row t predicts token t
    cache = KVCache(m.config, B, P + n, DEV, torch.float32)
    with torch.no_grad():
        sos = torch.full((B, 1), m.config.sos_id, device=DEV)
        h = m.wte(torch.cat([sos, x[:, :P]], 1)) + m.wpe.weight[: P + 1]
        for i, block in enumerate(m.h):
            h = block(h, True, cache.slot(i))
        cache.pos = P + 1
        w = DecodeWeights(m)
        for t in range(n - 1):
            step = decode_step(m, x[:, P + t], cache, w)  # predicts token P + t + 1
            torch.testing.assert_close(step, full[:, P + t + 1], atol=1e-4, rtol=1e-4)


def test_generate_greedy_matches_full_forward_under_bf16():
    m = small().eval()
    prefix = torch.randint(0, 32, (2, 8), device=DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = generate(m, prefix, 12, temperature=0)
    assert out.shape == (2, 20) and out.device.type == "cuda"
    assert torch.equal(out[:, :8], prefix)
    # each greedy token is the argmax of the fp32 full forward at its position, bar near-ties under bf16
    logits = m.logits(out)
    top2 = logits[:, 8:].float().topk(2, -1).values
    agree = logits[:, 8:].argmax(-1) == out[:, 8:]
    assert bool((agree | (top2[..., 0] - top2[..., 1] < 0.05)).all())


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


CUDA_RUN = dict(
    preset="micro", batch_size=16, device="cuda", precision="bf16", eval_images=64, progress=False
)


def test_pretrain_and_resume_on_cuda(digits, tmp_path, monkeypatch):
    kw = dict(CUDA_RUN, steps=20, eval_interval=10, log_interval=5)
    straight, crashed = tmp_path / "a", tmp_path / "b"
    igpt.pretrain(digits, straight, **kw)
    real = trainer.train_step

    def crashing(*a, **k):
        if a[3] == 13:  # the step argument: die after the step-10 checkpoint
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(trainer, "train_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        igpt.pretrain(digits, crashed, **kw)
    monkeypatch.setattr(trainer, "train_step", real)
    s = igpt.pretrain(out=crashed, resume=True, progress=False)  # the run's own device and settings
    a, b = _losses(straight), _losses(crashed)
    assert sorted(a) == sorted(b) == [5, 10, 15, 20]
    for step in a:  # cuBLAS and flash attention need not be bitwise deterministic; the run is the same run
        assert abs(a[step] - b[step]) < 1e-3 * max(1.0, abs(a[step])), (step, a[step], b[step])
    assert s["device"].startswith("cuda") and s["steps"] == 20 and s["val_nll"] < 2.0794


def test_pretrain_compiled_on_cuda(digits, tmp_path):
    s = igpt.pretrain(digits, tmp_path / "c", compile=True, steps=12, **CUDA_RUN)
    assert s["compiled"] is True and s["steps"] == 12


def test_probe_finetune_and_sample_on_cuda(micro_run, tmp_path):
    r = run_cli("probe", micro_run, "--device", "cuda")
    assert r.returncode == 0, r.stderr
    p = json.loads((micro_run / "probe.json").read_text())
    assert 0.0 <= p["best_accuracy"] <= 1.0 and len(p["layers"]) == 3
    r = run_cli(
        "finetune", micro_run, "--out", tmp_path / "ft", "--device", "cuda", "--epochs", "1", "--no-progress"
    )
    assert r.returncode == 0, r.stderr
    f = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert 0.0 <= f["test_accuracy"] <= 1.0
    r = run_cli(
        "sample", micro_run, "--out", tmp_path / "s.png", "--device", "cuda", "--count", "2", "--num", "2"
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "s.png").is_file()
