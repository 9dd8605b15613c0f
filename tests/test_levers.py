"""Pretraining levers (#17): Muon for the block matrices, learning-rate schedules, random shifts,
prefix-causal attention, precision chosen by the hardware, and the sweep runner's refusals."""

import json

import numpy as np
import pytest
import torch
from conftest import assert_same_weights, losses, pretrain, weights

from igpt import hardware
from igpt.data.palette import from_sequence, to_sequence
from igpt.errors import IgptError
from igpt.model.gpt import IGPT, IGPTConfig
from igpt.training.config import TrainConfig
from igpt.training.engine import lr_at, random_shifts, shift_table
from igpt.training.optim import Optimizers, muon_owns, newton_schulz


def tiny_model(**kw) -> IGPT:
    torch.manual_seed(0)
    return IGPT(IGPTConfig(vocab_size=8, n_positions=16, n_layer=2, n_embd=16, n_head=2, **kw))


def test_muon_steps_block_matrices_as_torch_muon_defines():
    model = tiny_model()
    ref = tiny_model()
    named = list(model.named_parameters())
    opt = Optimizers(named, "muon", lr=0.02, weight_decay=0.1, beta2=0.95, fused=False)
    owned = {n for n, p in named if muon_owns(n, p)}
    assert owned == {n for n, p in named if n.startswith("h.") and p.dim() == 2}
    assert "wte.weight" not in owned and "lm_head.weight" not in owned and "wpe.weight" not in owned
    x = torch.randint(0, 8, (4, 16))
    for m in (model, ref):
        m(x)[1].backward()
    # the reference: torch's own Muon on the same matrices, torch's own AdamW on the rest
    ref_named = dict(ref.named_parameters())
    ref_muon = torch.optim.Muon(
        [ref_named[n] for n in owned],
        lr=0.02,
        weight_decay=0.1,
        momentum=0.95,
        adjust_lr_fn="match_rms_adamw",
    )
    ref_muon.step()
    opt.step()
    for n, p in model.named_parameters():
        if n in owned:
            assert torch.equal(p, ref_named[n]), n
            assert not torch.equal(p, tiny_model().state_dict()[n]), n  # it did move
    # the optimizer state round-trips through the checkpoint tensors
    again = Optimizers(named, "muon", lr=0.02, weight_decay=0.1, beta2=0.95, fused=False)
    again.load(opt.tensors())
    assert {k for k in opt.tensors() if k.startswith("muon.")} == {
        k for k in again.tensors() if k.startswith("muon.")
    }
    for k, v in opt.tensors().items():
        assert torch.equal(v, again.tensors()[k]), k


def test_adamw_lr_ratio_speeds_up_only_adamws_parameters(digits, tmp_path):
    """With Muon, `adamw_lr_ratio` multiplies the rate of AdamW's parameters (embeddings, head, gains) and
    leaves Muon's matrices alone. The output head starts at zero, so the first step moves it alone (nothing
    below it has a gradient yet), by Adam's first update: lr times the gradient's sign. From the same start
    the two runs' heads therefore differ by (15 - 1) x lr; checkpoints record the schedule's rate."""
    named = list(tiny_model().named_parameters())
    opt = Optimizers(named, "muon", 1e-3, 0.0, 0.95, fused=False, adamw_lr_ratio=15.0)
    assert [g["scale"] for g in opt.adamw.param_groups] == [15.0, 15.0]
    assert opt.muon is not None and [g["scale"] for g in opt.muon.param_groups] == [1.0]
    plain = Optimizers(named, "adamw", 1e-3, 0.0, 0.95, fused=False)
    assert {g["scale"] for g in plain.param_groups} == {1.0}
    runs = {}
    for ratio in ("1", "15"):
        run = tmp_path / ratio
        flags = ["--steps", "2", "--optimizer", "muon", "--lr", "1e-3", "--warmup", "0", "--schedule", "wsd"]
        flags += ["--cooldown", "0.5", "--eval-interval", "1", "--keep-steps", "1"]  # step 1 at the peak rate
        pretrain(digits, run, *flags, "--adamw-lr-ratio", ratio, "--precision", "fp32")
        runs[ratio] = weights(run, 1)
        state = json.loads((run / "checkpoints" / "step_00000001" / "state.json").read_text())
        assert state["lr"] == pytest.approx(1e-3)
        assert json.loads((run / "run.json").read_text())["train"]["adamw_lr_ratio"] == float(ratio)
    gap = {k: (runs["15"][k] - runs["1"][k]).abs().max().item() for k in runs["1"]}
    assert gap["lm_head.weight"] == pytest.approx(14e-3, rel=1e-3)
    assert all(v == 0 for k, v in gap.items() if k != "lm_head.weight")


def test_muon_with_fp32_newton_schulz_is_torchs_update_at_fp32():
    """Where bf16 is slow, Newton-Schulz runs in fp32: the same iteration as torch's (bf16) one, so the
    orthogonalised matrix and the step agree within bf16's rounding, and the state is torch's."""
    g = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
    coeffs = (3.4445, -4.7750, 2.0315)
    ours = newton_schulz(g, coeffs, 5, 1e-7)
    theirs = torch.optim._muon._zeropower_via_newtonschulz(g, coeffs, 5, 1e-7).float()
    assert ours.dtype == torch.float32 and ours.shape == g.shape
    torch.testing.assert_close(ours, theirs, atol=3e-2, rtol=3e-2)
    assert (ours - theirs).abs().max() > 0  # it did not run in bf16
    model, ref = tiny_model(), tiny_model()
    x = torch.randint(0, 8, (4, 16))
    for m in (model, ref):
        m(x)[1].backward()
    fp32 = Optimizers(list(model.named_parameters()), "muon", 0.02, 0.1, 0.95, fused=False, ns_dtype="fp32")
    bf16 = Optimizers(list(ref.named_parameters()), "muon", 0.02, 0.1, 0.95, fused=False)
    fp32.step()
    bf16.step()
    for (n, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0, msg=n)
    assert fp32.tensors().keys() == bf16.tensors().keys()


def test_schedules():
    assert lr_at(0.025, 1.0, 0.05) == pytest.approx(0.5)  # warm-up
    for s in ("cosine", "linear", "wsd"):
        assert lr_at(0.05, 1.0, 0.05, s) == pytest.approx(1.0) and lr_at(1.0, 1.0, 0.05, s) == pytest.approx(
            0.0
        )
    assert lr_at(0.525, 1.0, 0.05, "linear") == pytest.approx(0.5)
    assert lr_at(0.525, 1.0, 0.05, "cosine") == pytest.approx(0.5)
    steps = [lr_at(p, 1.0, 0.05, "linear") for p in (0.3, 0.4, 0.6, 0.7)]
    assert steps[0] - steps[1] == pytest.approx(steps[2] - steps[3])  # a constant rate of decay
    assert lr_at(0.79, 1.0, 0.05, "wsd", 0.2) == 1.0 and lr_at(0.9, 1.0, 0.05, "wsd", 0.2) == pytest.approx(
        0.5
    )


@pytest.mark.parametrize("order", ["raster", "snake"])
def test_shift_table_moves_the_image_and_replicates_edges(order):
    r = 5
    img = np.arange(r * r).reshape(r, r) + 100
    seq = torch.from_numpy(to_sequence(img, order)[None].astype(np.int64))
    table = shift_table(r, order, 2)
    assert table.shape == (25, r * r) and torch.equal(table[0], torch.arange(r * r))
    assert len({tuple(t.tolist()) for t in table}) == 25  # every offset distinct
    shifted = from_sequence(random_shifts(seq, torch.tensor([1]), table)[0].numpy(), r, order)
    # row 1 is offset (dy, dx) = (-2, -2): pixel (y, x) takes the source pixel (y + 2, x + 2), clamped
    want = img[np.clip(np.arange(r) + 2, 0, r - 1)][:, np.clip(np.arange(r) + 2, 0, r - 1)]
    assert np.array_equal(shifted, want)


def test_prefix_causal_attention_is_bidirectional_inside_the_prefix_only():
    model = tiny_model(prefix_causal=True).eval()
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # the head starts at zero: give the logits a say
    T, P = 16, 6
    x = torch.randint(0, 8, (1, T))
    prefix = torch.tensor(P)
    base, loss = model(x, prefix=prefix)
    # token k is the input of position k + 1: inside the prefix, changing it moves position 0's output
    y = x.clone()
    y[0, 2] = (y[0, 2] + 1) % 8
    assert not torch.allclose(model(y, prefix=prefix)[0][0, 0], base[0, 0])
    # after the prefix, attention is causal: changing token 10 (input of position 11) leaves 0..10 alone
    z = x.clone()
    z[0, 10] = (z[0, 10] + 1) % 8
    out = model(z, prefix=prefix)[0]
    assert torch.allclose(out[0, :11], base[0, :11], atol=1e-6) and not torch.allclose(
        out[0, 11], base[0, 11]
    )
    # the loss skips positions before P - 1, whose targets a bidirectional prefix could see
    want = torch.nn.functional.cross_entropy(base[0, P - 1 :], x[0, P - 1 :])
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    # features of such a model are read bidirectionally: the first position sees the last token
    w = x.clone()
    w[0, -2] = (w[0, -2] + 1) % 8
    a, b = (model.get_intermediate_layers(t, [2])[2][0, 0] for t in (x, w))
    assert not torch.allclose(a, b)
    with pytest.raises(IgptError, match="AR objective"):
        IGPTConfig(prefix_causal=True, objective="bert")


def test_augmented_muon_prefix_run_resumes_exactly(digits, tmp_path, monkeypatch):
    from igpt.training import trainer

    extra = ["--optimizer", "muon", "--shift", "1", "--flip", "--prefix-causal", "--schedule", "wsd"]
    straight, crashed = tmp_path / "a", tmp_path / "b"
    pretrain(digits, straight, "--steps", "30", *extra)
    real = trainer.train_step

    def crashing(*a, **k):
        if a[3] == 24:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(trainer, "train_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(digits, crashed, "--steps", "30", *extra)
    monkeypatch.setattr(trainer, "train_step", real)
    pretrain(digits, crashed, "--steps", "30", "--resume")
    assert losses(crashed) == losses(straight)
    assert_same_weights(weights(crashed, 30), weights(straight, 30))
    plain = tmp_path / "c"
    pretrain(digits, plain, "--steps", "30")
    assert losses(plain) != losses(straight)  # the levers did change the run


def test_bf16_speedup_is_a_measured_ratio():
    r = hardware.bf16_speedup(32, repeats=1)
    assert 0 < r < 1000


def test_precision_auto_follows_the_hardware_and_the_width(monkeypatch, digits, tmp_path):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "amx_bf16", "amx_tile"})
    assert hardware.auto_precision("cpu", 512) == ("bf16", "this CPU has AMX bf16 tiles")
    p, why = hardware.auto_precision("cpu", 128)
    assert p == "fp32" and "width 128" in why
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    for speedup, want in ((1.6, "bf16"), (0.9, "fp32")):  # AVX512_BF16 without AMX: the measurement decides
        monkeypatch.setattr(hardware, "bf16_speedup", lambda n, s=speedup: s)
        p, why = hardware.auto_precision("cpu", 512)
        assert p == want and f"{speedup:.2f}x" in why and "no AMX" in why
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "avx512f"})
    monkeypatch.setattr(hardware, "bf16_speedup", lambda n: pytest.fail("measured bf16 without the flags"))
    p, why = hardware.auto_precision("cpu", 512)
    assert p == "fp32" and "no AMX" in why
    # a run records what auto chose and why; its resume keeps it
    pretrain(digits, tmp_path / "r", "--steps", "2", "--precision", "auto")
    info = json.loads((tmp_path / "r" / "run.json").read_text())["train"]
    assert info["precision"] == "fp32" and "no AMX" in info["precision_reason"]
    pretrain(digits, tmp_path / "r", "--steps", "4", "--precision", "auto", "--resume")
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps"] == 4


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"optimizer": "sgd"}, "unknown --optimizer 'sgd'"),
        ({"schedule": "step"}, "unknown --schedule 'step'"),
        ({"shift": -1}, "--shift"),
        ({"schedule": "wsd", "warmup": 0.5, "cooldown": 0.6}, "--cooldown"),
        ({"optimizer": "muon", "fsdp": True}, "does not run with --fsdp"),
        ({"precision": "fp8"}, "unknown --precision 'fp8'; choose one of fp32, bf16, auto"),
        ({"precision": "auto", "schedule": "cosine", "seed": -1}, "--seed"),
        ({"optimizer": "muon", "adamw_lr_ratio": 0.0}, "--adamw-lr-ratio must be positive"),
        ({"optimizer": "muon", "adamw_lr_ratio": float("nan")}, "--adamw-lr-ratio must be positive"),
        ({"optimizer": "adamw", "adamw_lr_ratio": 15.0}, "applies with --optimizer muon"),
    ],
)
def test_bad_lever_settings_are_refused(kw, match):
    with pytest.raises(IgptError, match=match):
        TrainConfig(data="x", **kw)


def test_bad_lever_flags_are_one_line(digits, tmp_path, capsys):
    from igpt.cli import main

    for extra, msg in (
        (["--optimizer", "lion"], "unknown --optimizer 'lion'"),
        (["--objective", "bert", "--prefix-causal"], "option of the AR objective"),
    ):
        with pytest.raises(SystemExit):
            main(["pretrain", "--data", str(digits), "--out", str(tmp_path / "r"), "--steps", "2", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
        assert not (tmp_path / "r" / "run.json").exists()


def test_sweep_refuses_unknown_variants_and_budgets_it_cannot_meet(digits, tmp_path, capsys, sweep):

    with pytest.raises(IgptError, match="unknown variant"):
        sweep.check_variants(["base", "nope"], 1.0, None, digits)
    with pytest.raises(IgptError, match="more than --total-minutes 10"):
        sweep.check_variants(["base", "muon", "bf16"], 4.0, 10, digits)
    sweep.check_variants(list(sweep.VARIANTS), 1.0, None, digits)  # every shipped variant validates
    assert sweep.main(["--out", str(tmp_path / "s"), "--variants", "nope", "--data-dir", "/nonexistent"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_available_memory_counts_the_page_cache_the_kernel_gives_back():
    from igpt.hardware import available_memory, meminfo_available

    text = "MemTotal:       24683664 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n"
    assert meminfo_available(text) == 20000000 * 1024  # not MemFree
    assert meminfo_available("MemTotal: 5 kB\n") is None  # an older kernel: the caller falls back
    got = available_memory()
    assert got is None or got > 0
