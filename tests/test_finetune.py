"""Fine-tuning's control and low-data protocol: `--init scratch`, K subsets of N labels per class with a
validation draw of at most N per class, the grid-pooled head, and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import igpt
from igpt.cli import main
from igpt.data.prepared import PreparedData
from igpt.errors import IgptError
from igpt.finetuning.classifier import HEAD_LAMBDAS
from igpt.finetuning.saving import load_classifier
from igpt.probes.logistic import balanced_subset

QUICK = {
    "epochs": 1,
    "progress": False,
    "test_limit": 64,
    "layer": 2,
    "pool": "mean",
}  # not the shared run's probe


def _backbone_gap(ft_dir, run_dir) -> float:
    """Largest absolute difference between a fine-tuned run's backbone and the pretrained run's weights."""
    ft = load_file(ft_dir / "model.safetensors")
    pre = igpt.load_run(run_dir).state_dict()
    return max(float((ft[f"backbone.{k}"] - v).abs().max()) for k, v in pre.items())


def test_scratch_init_trains_the_same_architecture_from_random_weights(micro_run, tmp_path):
    kw = {**QUICK, "lr": 1e-7, "train_limit": 64}
    pre = igpt.finetune(micro_run, out=tmp_path / "pre", **kw)
    scratch = igpt.finetune(micro_run, out=tmp_path / "scratch", init="scratch", **kw)
    assert pre["init"] == "pretrained" and scratch["init"] == "scratch"
    # a tiny lr keeps the pretrained weights; scratch starts elsewhere and stays there
    assert _backbone_gap(tmp_path / "pre", micro_run) < 1e-3
    assert _backbone_gap(tmp_path / "scratch", micro_run) > 1e-2
    info = json.loads((tmp_path / "scratch" / "run.json").read_text())
    assert info["finetune"]["init"] == "scratch"
    assert info["model"] == json.loads((micro_run / "run.json").read_text())["model"]


def test_low_data_subsets_match_the_probes_and_validation_holds_n_per_class(micro_run, tmp_path):
    res = igpt.finetune(micro_run, out=tmp_path / "ft", labels_per_class=3, seeds=2, seed=5, **QUICK)
    assert len(res["accuracies"]) == 2 and len(res["subsets"]) == 2
    assert res["mean_accuracy"] == pytest.approx(np.mean(res["accuracies"]))
    assert res["std_accuracy"] == pytest.approx(np.std(res["accuracies"]))
    assert res["test_accuracy"] == res["mean_accuracy"]
    data = PreparedData(igpt.Run.open(micro_run).data_dir)
    C = data.num_classes
    for sub in res["subsets"]:
        assert sub["n_train"] == 3 * C and sub["n_val"] <= 3 * C and sub["labels_per_class"] == 3
    # the subsets are the low-data probe's for the same seed: same rows as balanced_subset(seed + s)
    y = data.labels("train")
    for s, sub in enumerate(res["subsets"]):
        assert sub["train_rows"] == balanced_subset(y, 3, 5 + s).tolist()
    assert res["subsets"][0]["train_rows"] != res["subsets"][1]["train_rows"]
    assert json.loads((tmp_path / "ft" / "finetune.json").read_text())["saved_subset"] == 0


def test_grid_pooled_head_round_trips(micro_run, tmp_path):
    res = igpt.finetune(micro_run, out=tmp_path / "ft", train_limit=64, **{**QUICK, "pool": "grid"})
    assert res["pool"] == "grid"
    clf = load_classifier(tmp_path / "ft")
    d = clf.backbone.config.n_embd
    assert clf.head.in_features == 4 * d
    x = torch.randint(0, clf.backbone.config.vocab_size, (2, clf.backbone.config.n_positions))
    assert clf(x)[0].shape == (2, 10)


@pytest.mark.parametrize(
    "extra, expect",
    [
        (["--init", "random"], "unknown --init 'random'; choose one of pretrained, scratch"),
        (["--minutes", "nan"], "--minutes must be a positive number"),
        (["--minutes", "0"], "--minutes must be a positive number"),
        (["--seeds", "3"], "give --labels-per-class too"),
        (["--labels-per-class", "100000"], "exceeds"),
        (["--layer", "0"], "--layer must be at least 1"),
        (["--layer", "5"], "--layer 5 is not a block of this 2-layer model; choose 1..2"),
        (["--layer-decay", "0"], "--layer-decay must be in (0, 1]"),
        (["--layer-decay", "nan"], "--layer-decay must be in (0, 1]"),
        (["--optimizer", "sgd"], "choose one of adamw, muon"),
        (["--optimizer", "muon", "--layer-decay", "0.7"], "--layer-decay applies to adamw"),
        (["--precision", "fp16"], "unknown --precision 'fp16'; choose one of fp32, bf16, auto"),
    ],
)
def test_refusals_create_nothing(micro_run, tmp_path, capsys, extra, expect):
    with pytest.raises(SystemExit):
        main(["finetune", str(micro_run), "--out", str(tmp_path / "f"), *extra])
    err = capsys.readouterr().err.strip()
    assert expect in err and len(err.splitlines()) == 1
    assert not (tmp_path / "f").exists()


def test_scratch_from_a_finetuned_run_is_refused(micro_run, tmp_path):
    igpt.finetune(micro_run, out=tmp_path / "ft", train_limit=32, **QUICK)
    with pytest.raises(IgptError, match="takes the pretrained run it came from"):
        igpt.finetune(tmp_path / "ft", out=tmp_path / "again", init="scratch", **{**QUICK, "layer": None})
    assert not (tmp_path / "again").exists()


def test_the_heads_start_is_kept_when_training_only_hurts(micro_run, tmp_path):
    """Epoch 0 (the linear-probe start) is a candidate of early stopping: a rate that wrecks the backbone
    cannot end below the start on validation."""
    kw = {**QUICK, "epochs": 2, "patience": 2, "train_limit": 256}
    res = igpt.finetune(micro_run, out=tmp_path / "ft", lr=5.0, **kw)
    hist = [h["val_accuracy"] for h in res["history"]]
    assert max(hist) < res["initial_val_accuracy"]  # training hurt
    assert res["best_epoch"] == 0 and res["best_val_accuracy"] == res["initial_val_accuracy"]


def test_truncated_backbone_reads_exactly_the_probes_layer(micro_run):
    from igpt.finetuning.classifier import truncate

    model = igpt.load_run(micro_run).eval()
    x = torch.randint(0, model.config.vocab_size, (3, model.config.n_positions))
    cut = truncate(model, 1).eval()
    assert cut.config.n_layer == 1 and len(cut.h) == 1
    assert cut.num_params() < model.num_params()
    with torch.no_grad():
        torch.testing.assert_close(cut.final_states(x), model.get_intermediate_layers(x, [1])[1])
    assert truncate(model, model.config.n_layer) is model
    with pytest.raises(IgptError, match="choose 1..2"):
        truncate(model, 3)


def test_head_on_a_lower_layer_saves_the_cut_model(micro_run, tmp_path):
    res = igpt.finetune(
        micro_run, out=tmp_path / "ft", train_limit=64, precision="bf16", **{**QUICK, "layer": 1}
    )
    assert res["layer"] == 1 and res["settings"]["precision"] == "bf16"
    info = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert info["model"]["n_layer"] == 1 and info["finetune"]["blocks_dropped"] == 1
    clf = load_classifier(tmp_path / "ft")
    x = torch.randint(0, clf.backbone.config.vocab_size, (2, clf.backbone.config.n_positions))
    assert len(clf.backbone.h) == 1 and clf(x)[0].shape == (2, 10)


def test_layer_decay_scales_each_depth(micro_run):
    from igpt.finetuning.classifier import Classifier, param_groups

    clf = Classifier(igpt.load_run(micro_run), 10)
    groups = param_groups(clf, 0.5)
    scale_of = {id(p): g["scale"] for g in groups for p in g["params"]}
    named = dict(clf.named_parameters())
    assert scale_of[id(named["head.weight"])] == 1.0
    assert scale_of[id(named["backbone.h.1.attn.c_attn.weight"])] == 0.5  # L - 1 = 1 step below the top
    assert scale_of[id(named["backbone.h.0.attn.c_attn.weight"])] == 0.25
    assert scale_of[id(named["backbone.wte.weight"])] == 0.125
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_muon_fine_tuning_steps_the_blocks_matrices_with_muon(micro_run, tmp_path):
    """`optimizer="muon"`: Muon owns exactly the blocks' 2-D weights, AdamW the rest (head included), every
    group at scale 1; the run trains, moves the backbone, and records its optimizer."""
    from igpt.finetuning.classifier import Classifier, make_optimizer
    from igpt.finetuning.config import FinetuneConfig

    clf = Classifier(igpt.load_run(micro_run), 10)
    opt = make_optimizer(clf, FinetuneConfig(run=str(micro_run), out="x", optimizer="muon"), 1e-3)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    named = dict(clf.named_parameters())
    want = {id(p) for n, p in named.items() if n.startswith("backbone.h.") and p.dim() == 2}
    assert muon == want and id(named["head.weight"]) not in muon
    assert all(g["scale"] == 1.0 for g in opt.param_groups)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)
    w = named["backbone.h.0.mlp.c_fc.weight"]
    before = w.detach().clone()
    _, l_gen = clf(torch.randint(0, 8, (4, 64)))  # the head starts at zero: L_GEN reaches the blocks
    l_gen.backward()
    opt.step()
    assert float((w.detach() - before).abs().max()) > 1e-5  # Muon moved the block's matrix
    res = igpt.finetune(micro_run, out=tmp_path / "m", optimizer="muon", lr=1e-3, train_limit=64, **QUICK)
    assert res["optimizer"] == "muon" and res["steps"] > 0


def test_schedule_follows_the_clock_when_the_budget_ends_first():
    from igpt.finetuning.engine import Recipe

    none = dict.fromkeys(("model", "opt", "lr", "aug", "flip", "mask_ratio", "gen", "forward"))
    r = Recipe(**none, total_steps=10_000, budget_seconds=100.0, precision="fp32", precision_reason="")
    r.started -= 50.0  # half the budget gone after one step of ten thousand
    assert r.progress() == pytest.approx(0.5, abs=0.01)
    r.budget_seconds = None
    assert r.progress() == pytest.approx(1 / 10_000)


def test_validation_only_reads_no_test_image_and_saves_nothing(micro_run, tmp_path, monkeypatch):
    from igpt.finetuning.config import FinetuneConfig
    from igpt.finetuning.finetune import validation_only

    read = PreparedData.tokens

    def tokens(self, split):
        assert split != "test", "the sweep read the test split"
        return read(self, split)

    monkeypatch.setattr(PreparedData, "tokens", tokens)
    cfg = FinetuneConfig(str(micro_run), str(tmp_path / "never"), epochs=1, progress=False, train_limit=64)
    (res,) = validation_only(cfg)
    assert res["test_accuracy"] is None and res["n_test"] == 0
    assert res["head_lambda"] in HEAD_LAMBDAS  # the head's probe start chose its strength on validation
    assert 0 <= res["best_val_accuracy"] <= 1
    assert not (tmp_path / "never").exists()


def test_finetune_sweep_writes_a_validation_table(micro_run, tmp_path, finetune_sweep):
    fs = finetune_sweep
    out = tmp_path / "sw"
    argv = [
        "--run",
        str(micro_run),
        "--out",
        str(out),
        "--minutes",
        "0.05",
        "--variants",
        "base,scratch",
        "--no-compile",
    ]
    assert fs.main(argv) == 0
    rows = json.loads((out / "finetune_sweep_0.05min.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["base", "scratch"]
    assert all(0 <= r["val_accuracy"] <= 1 and "test_accuracy" not in r for r in rows)
    assert "validation figures only" in (out / "finetune_sweep_0.05min.md").read_text()
    assert fs.main(argv) == 0  # run again: both rows are read back and skipped, not run twice
    assert json.loads((out / "finetune_sweep_0.05min.json").read_text())["rows"] == rows
    assert fs.main([*argv[:4], "--variants", "nope"]) == 2
