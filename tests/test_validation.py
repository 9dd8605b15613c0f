"""Three splits: `igpt prepare` holds out a seeded, class-stratified validation split that nothing trains on;
every choice (L2 strength, layer, early stopping) is made on it, and the test split is touched only for the
reported number. The leakage tests permute the test labels (and, separately, the test images) and check
that no selection and no validation figure moves."""

import json

import numpy as np
import pytest
from conftest import permuted_test_copy

import igpt
from igpt.data.prepared import PreparedData
from igpt.data.sources import split_validation
from igpt.errors import IgptError


def test_validation_rows_are_disjoint_stratified_and_seeded():
    y = np.repeat(np.arange(4), [100, 50, 10, 2])
    tr, va = split_validation(y, 0.1, seed=3)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(y)
    assert [int((y[va] == c).sum()) for c in range(4)] == [10, 5, 1, 1]  # every class, in proportion
    again, _ = split_validation(y, 0.1, seed=3)
    assert np.array_equal(tr, again) and not np.array_equal(tr, split_validation(y, 0.1, seed=4)[0])


def test_prepare_holds_out_validation_from_training(tmp_path):
    meta = igpt.prepare("digits", tmp_path / "d", resolution=8, clusters=8)
    assert meta["n_train"] + meta["n_val"] == 1438 and meta["n_val"] == 118  # about 1/12, per class
    data = PreparedData(tmp_path / "d")
    assert len(data.tokens("val")) == meta["n_val"] and set(np.unique(data.labels("val"))) == set(range(10))
    with pytest.raises(IgptError, match="leaves"):
        igpt.prepare("digits", tmp_path / "e", resolution=8, clusters=8, val_fraction=0.9999)


def test_a_set_prepared_before_the_validation_split_is_refused(tmp_path):
    igpt.prepare("digits", tmp_path / "d", resolution=8, clusters=8)
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    del meta["n_val"]
    (tmp_path / "d" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IgptError, match="before igpt held out a validation split; prepare it again"):
        PreparedData(tmp_path / "d")


def _selections(res: dict) -> tuple:
    return res["best_layer"], res["lambda"], res["val_accuracy"], res["raw_pixel_val_accuracy"]


@pytest.mark.parametrize("what", ["labels", "images"])
def test_permuting_the_test_split_changes_no_choice(micro_run, tmp_path, what):
    data = micro_run.parent / "data"
    name = "test_labels.npy" if what == "labels" else "test_tokens.npy"
    shuffled = permuted_test_copy(data, tmp_path / "shuffled", name)
    first = igpt.probe(micro_run, data=str(data), progress=False)
    second = igpt.probe(micro_run, data=str(shuffled), progress=False)
    assert _selections(first) == _selections(second)
    assert first["layers"] != second["layers"]  # the test split itself did change


def test_pretrain_reports_validation_and_test_separately(micro_run):
    s = json.loads((micro_run / "summary.json").read_text())
    assert s["val_images"] == 32 and s["test_images"] == 32
    assert s["val_nll"] != s["test_nll"] and abs(s["test_bits_per_token"] * np.log(2) - s["test_nll"]) < 1e-9


def test_finetune_early_stopping_ignores_the_test_split(micro_run, tmp_path):
    data = micro_run.parent / "data"
    shuffled = permuted_test_copy(data, tmp_path / "shuffled")
    kw = dict(epochs=2, patience=1, progress=False)
    a = igpt.finetune(micro_run, out=tmp_path / "a", data=str(data), **kw)
    b = igpt.finetune(micro_run, out=tmp_path / "b", data=str(shuffled), **kw)
    assert a["best_epoch"] == b["best_epoch"] and a["history"] == b["history"]
    assert a["n_val"] == 118 and a["test_accuracy"] != b["test_accuracy"]
