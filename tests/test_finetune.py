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
from igpt.data import PreparedData
from igpt.errors import IgptError
from igpt.finetuning import load_classifier
from igpt.logistic import balanced_subset

QUICK = {"epochs": 1, "progress": False, "test_limit": 64}


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
    res = igpt.finetune(micro_run, out=tmp_path / "ft", pool="grid", train_limit=64, **QUICK)
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
        igpt.finetune(tmp_path / "ft", out=tmp_path / "again", init="scratch", **QUICK)
    assert not (tmp_path / "again").exists()


def test_the_heads_start_is_kept_when_training_only_hurts(micro_run, tmp_path):
    """Epoch 0 (the linear-probe start) is a candidate of early stopping: a rate that wrecks the backbone
    cannot end below the start on validation."""
    kw = {**QUICK, "epochs": 2, "patience": 2, "train_limit": 256}
    res = igpt.finetune(micro_run, out=tmp_path / "ft", lr=5.0, **kw)
    hist = [h["val_accuracy"] for h in res["history"]]
    assert max(hist) < res["initial_val_accuracy"]  # training hurt
    assert res["best_epoch"] == 0 and res["best_val_accuracy"] == res["initial_val_accuracy"]
