"""The recipes of docs/architecture.md, each done once: a dataset source registered and prepared end to end,
a pretraining objective added as one row of the table and trained, and a probe variant added to the list and
found in probe.json, in the choice of the best probe and in the report. Each touches one module's registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import igpt
from igpt.cli import build_parser
from igpt.data import sources
from igpt.model import objectives
from igpt.pipeline import report
from igpt.probes import variants
from igpt.results import PretrainSummary, ProbeResult

MICRO = dict(preset="micro", batch_size=16, eval_images=16, progress=False)


def _toy_read(path, settings) -> sources.ImageSet:
    """40 grey 6x6 images in two classes, a quarter of them held out for testing."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 6, 6, 1)).astype(np.uint8)
    y = np.arange(40) % 2
    train, test = sources.split_train_test(x, y, 0.25, seed=settings.seed)
    return sources.ImageSet(train, test, ["even", "odd"], "generated in the test")


def test_a_registered_source_is_prepared_end_to_end(tmp_path, monkeypatch, cli_error):
    monkeypatch.setattr(sources, "SOURCES", dict(sources.SOURCES))  # the registration ends with the test
    sources.register_source(sources.Source("toy", "a toy source", read=_toy_read, needs_dir=False))
    meta = igpt.prepare("toy", out=tmp_path / "toy", clusters=4, progress=False)
    assert meta["dataset"] == "toy" and meta["class_names"] == ["even", "odd"]
    assert meta["n_train"] + meta["n_val"] == 30 and meta["n_test"] == 10 and meta["resolution"] == 6
    help_text = build_parser()._subparsers._group_actions[0].choices["prepare"].format_help()
    assert "toy: a toy source" in help_text
    with pytest.raises(ValueError, match="registered already"):
        sources.register_source(sources.Source("toy", "again", read=_toy_read))
    msg = cli_error("prepare", "nope", "--out", tmp_path / "x")
    assert "toy" in msg and "digits" in msg  # the refusal lists the registry


@pytest.mark.parametrize("causal", [True, False])
def test_an_objective_added_to_the_table_trains_and_samples(digits, tmp_path, monkeypatch, causal):
    """A copy of AR (causal) or of BERT (masked inputs) under a new name: pretraining, the model's attention
    and mask token, and completion all follow the table's row."""
    name = "toy-causal" if causal else "toy-masked"
    row = objectives.Objective(
        name, "a toy", causal, not causal, "autoregressive" if causal else "mask-predict", causal
    )
    monkeypatch.setitem(objectives.OBJECTIVES, name, row)
    s = igpt.pretrain(data=digits, out=tmp_path / "r", objective=name, steps=3, **MICRO)
    assert s["objective"] == name and s["steps"] == 3
    model = igpt.load_run(tmp_path / "r")
    assert model.causal is causal and (model.mask_token is None) is causal
    x = torch.zeros(1, model.config.n_positions, dtype=torch.long)
    done = igpt.complete(model, x, keep=32, num=1, seed=0)
    assert done.shape == (1, 1, model.config.n_positions) and torch.equal(done[0, 0, :32], x[0, :32])


def test_a_probe_variant_added_to_the_list_is_run_chosen_and_reported(digits, tmp_path, monkeypatch):
    igpt.pretrain(data=digits, out=tmp_path / "r", steps=3, **MICRO)

    def toy(ctx: variants.ProbeContext, res: dict) -> dict:
        return {"layers": list(ctx.layers), "val_accuracy": 1.0, "test_accuracy": 0.123}

    toy_variant = variants.ProbeVariant(
        "toy",
        "toy probe",
        wanted=lambda cfg: True,
        run=toy,
        candidate=lambda r, res: ("the toy probe", r["val_accuracy"], r["test_accuracy"]),
        summary=lambda r: "a toy that always wins on validation",
    )
    monkeypatch.setattr(variants, "VARIANTS", [*variants.VARIANTS, toy_variant])
    monkeypatch.setattr("igpt.probes.probing.VARIANTS", variants.VARIANTS)
    monkeypatch.setattr(report, "VARIANTS", variants.VARIANTS)
    res = igpt.probe(tmp_path / "r", layers="1,2", progress=False)
    assert res["toy"]["layers"] == [1, 2]
    assert res["chosen"] == {"probe": "the toy probe", "val_accuracy": 1.0, "test_accuracy": 0.123}
    saved = json.loads((tmp_path / "r" / "probe.json").read_text())
    assert saved["toy"] == res["toy"]
    inputs = report.Inputs(
        out=tmp_path,
        run=None,
        qs={},
        summ=PretrainSummary(),
        full=ProbeResult.from_json(saved),
        low=[],
        ft=None,
        scratch=None,
        low_ft={},
    )
    page = "".join(report.headline(inputs))
    assert "toy probe" in page and "0.1230" in page and "a toy that always wins" in page
