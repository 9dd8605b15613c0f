"""`Run` names, writes and reads every file of a run directory, and the typed results read back what the
stages wrote, exactly (and what older files lack, at defaults)."""

from __future__ import annotations

import json
import shutil

import igpt
from igpt.results import FinetuneResult, LowDataResult, PretrainSummary, ProbeResult
from igpt.runs import FULL_PROBE, LATEST_PROBE, Run, low_data_stem


def test_summary_round_trips_through_its_typed_view(micro_run):
    run = Run.open(micro_run)
    raw = json.loads((micro_run / "summary.json").read_text())
    s = run.pretrain_summary()
    assert isinstance(s, PretrainSummary) and s.finished and s.steps == 20 == raw["steps"]
    assert s.val_nll == raw["val_nll"] and s.tokens_per_second == raw["tokens_per_second"]
    assert s.to_json() == raw  # nothing lost, nothing added
    assert run.metrics_file == micro_run / "metrics.jsonl" and run.metrics_file.is_file()


def test_probe_results_are_written_and_read_through_the_run(micro_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(micro_run, copy)
    res = igpt.probe(copy, train_limit=400, progress=False)
    run = Run.open(copy)
    assert run.probe_result(LATEST_PROBE) == res == run.probe_result(FULL_PROBE)
    full = run.full_probe()
    assert isinstance(full, ProbeResult) and full.best_layer == res["best_layer"]
    assert full.lambdas == res["lambda"] and full.to_json() == res
    assert run.probe_file(FULL_PROBE, ".png").is_file()
    low = igpt.probe(copy, labels_per_class=3, seeds=2, progress=False)
    assert run.probe_file(low_data_stem(3)).is_file()
    got = dict(run.low_data_results())[3]
    typed = next(r for r in run.low_data_probes() if r.labels_per_class == 3)
    assert got == low and isinstance(typed, LowDataResult)
    assert typed.mean_accuracy == low["mean_accuracy"] and typed.to_json() == low


def test_older_files_open_with_defaults_and_keep_unknown_keys():
    old = {"test_accuracy": 0.5, "best_epoch": 2, "something_new": [1, 2]}
    r = FinetuneResult.from_json(old)
    assert r.init == "pretrained" and r.std_accuracy is None and r.extra == {"something_new": [1, 2]}
    assert r.to_json() == old
    empty = PretrainSummary.from_json({})
    assert empty.to_json() == {} and not empty.finished and empty.val_nll is None
