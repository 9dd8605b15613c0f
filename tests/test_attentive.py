"""The attentive probe, low-data choices per regime, and fine-tuning inside the quickstart (#16): heads that
learn, choices made on validation (or the subsets' own CV) that a permuted test split cannot move, and
refusals."""

import json

import numpy as np
import pytest
import torch
from conftest import permuted_test_copy

import igpt
from igpt.errors import IgptError
from igpt.probes.attentive import AttentiveHead, check_states_fit, fit_attentive
from igpt.probes.setup import ProbeConfig


def test_attentive_head_learns_what_a_mean_hides():
    """Class c: one position carries pattern c among noise tokens. Averaging over 16 positions drowns the
    pattern; attention can find it."""
    g = torch.Generator().manual_seed(0)
    N, T, d, C = 900, 16, 8, 3
    patterns = torch.randn(C, d, generator=g) * 3
    y = torch.randint(0, C, (N,), generator=g)
    x = torch.randn(N, T, d, generator=g)
    pos = torch.randint(0, T, (N,), generator=g)
    x[torch.arange(N), pos] = patterns[y] + 0.1 * torch.randn(N, d, generator=g)
    x = x.half()
    r = fit_attentive(
        (x[:600], y[:600]), (x[600:750], y[600:750]), C, epochs=15, patience=15, lr=3e-3, batch_size=32
    )
    head = r["head"]
    with torch.no_grad():
        acc = float((head(x[750:].float()).argmax(-1) == y[750:]).float().mean())
    assert acc > 0.9 and r["val_accuracy"] > 0.9
    assert r["best_epoch"] == 1 + int(np.argmax(r["val_history"]))  # the epoch kept is the best on val
    assert AttentiveHead(8, 3)(torch.zeros(2, 5, 8)).shape == (2, 3)


def test_attentive_states_that_would_not_fit_are_refused_with_the_size():
    with pytest.raises(IgptError, match=r"GiB.*--train-limit .* \(or --head linear\)"):
        check_states_fit(10**9, 784, 512)


def test_attentive_probe_end_to_end_and_blind_to_the_test_split(micro_run, tmp_path):
    data = micro_run.parent / "data"
    shuffled = permuted_test_copy(data, tmp_path / "shuffled", seed=0)
    kw = dict(head="attentive", attentive_epochs=5, layers="1,2", progress=False)
    a = igpt.probe(micro_run, data=str(data), **kw)
    b = igpt.probe(micro_run, data=str(shuffled), **kw)
    att = a["attentive"]
    assert a["head"] == "attentive" and a["best_accuracy"] == att["test_accuracy"]
    assert att["layers"] == [a["best_layer"]] and 1 <= att["best_epoch"] <= 5 and len(att["val_history"]) >= 1
    assert "linear_best_accuracy" in a and a["chosen"]["val_accuracy"] >= att["val_accuracy"]
    for k in ("best_epoch", "val_history", "val_accuracy", "layers"):
        assert a["attentive"][k] == b["attentive"][k], k
    assert a["chosen"]["probe"] == b["chosen"]["probe"]
    assert att["test_accuracy"] > 0.25  # ten classes: chance is 0.1
    saved = json.loads((micro_run / "probe.json").read_text())
    assert saved["head"] == "attentive" and "attentive" in saved


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"head": "mlp"}, "unknown --head 'mlp'; choose one of linear, attentive"),
        ({"head": "attentive", "labels_per_class": 10}, "--head attentive runs with the full probe"),
        ({"head": "attentive", "attentive_epochs": 0}, "--attentive-epochs"),
    ],
)
def test_bad_heads_are_refused(kw, match):
    with pytest.raises(IgptError, match=match):
        ProbeConfig(run="x", **kw)


def test_low_data_chooses_pooling_per_regime_on_the_subsets_own_cv(micro_run, tmp_path):
    data = micro_run.parent / "data"
    shuffled = permuted_test_copy(data, tmp_path / "shuffled", seed=1)
    kw = dict(pool="grid", labels_per_class=5, seeds=3, layers="1,2", progress=False)
    a = igpt.probe(micro_run, data=str(data), **kw)
    b = igpt.probe(micro_run, data=str(shuffled), **kw)
    # --pool, the paper's mean (same pass) and the fine 7x7 grid (--fine-pool's default, its own pass)
    assert a["pools_compared"] == ["grid", "mean", "grid7"] and a["best_pool"] in ("grid", "mean", "grid7")
    assert set(a["layers_by_pool"]) == set(a["pools_compared"])
    assert a["layers"] == a["layers_by_pool"]["grid"]
    assert a["best_accuracy"] == a["layers_by_pool"][a["best_pool"]][str(a["best_layer"])]
    assert len(a["raw_pixel_accuracies"]) == 3
    for k in ("best_pool", "best_layer", "cv_accuracy_by_pool"):
        assert a[k] == b[k], k
    assert a["layers_by_pool"] != b["layers_by_pool"]  # the test labels did change


def test_bert_finetune_end_to_end(tmp_path):
    igpt.prepare("digits", tmp_path / "d", resolution=8, clusters=8)
    igpt.pretrain(
        tmp_path / "d",
        tmp_path / "bert",
        preset="micro",
        objective="bert",
        mask_ratio=0.3,
        steps=20,
        batch_size=16,
        eval_images=32,
        progress=False,
    )
    r = igpt.finetune(tmp_path / "bert", out=tmp_path / "ft", epochs=2, progress=False)
    assert 0 <= r["test_accuracy"] <= 1 and r["best_epoch"] in (0, 1, 2)
    assert igpt.load_run(tmp_path / "ft").config.objective == "bert"
    p = igpt.probe(tmp_path / "bert", mask_ensemble=2, layers="1,2", train_limit=300, progress=False)
    assert p["mask_ensemble"]["mask_ratio"] == 0.3  # the run's own ratio, not a hard-coded 0.15
