"""`igpt quickstart --smoke` end to end (on the digits, so it needs no Debian package): every stage's output,
a self-contained report, resuming without redoing finished stages, and the Fashion-MNIST fallback notice."""

import json
import re
import time
from dataclasses import replace

import pytest

from igpt import results
from igpt.cli import main
from igpt.data.prepared import PreparedData
from igpt.finetuning.config import HEAD_POOLS, MUON_LR
from igpt.pipeline import budget, plans, schedule
from igpt.pipeline import quickstart as pipeline
from igpt.pipeline.budget import Speeds
from igpt.probes.logistic import balanced_subset

ARGS = ["--smoke", "--dataset", "digits", "--pretrain-minutes", "0.1", "--no-progress"]


@pytest.fixture(scope="module")
def qs(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "out"
    main(["quickstart", "--out", str(out), *ARGS])
    return out


def test_every_stage_leaves_its_output(qs):
    state = json.loads((qs / "quickstart.json").read_text())
    assert state["done"] == ["prepare", "pretrain", "probe", "low_data", "completions", "report"]
    assert state["peak_rss_mib"] > 50
    assert json.loads((qs / "run" / "summary.json").read_text())["finished"]
    full = json.loads((qs / "run" / "probe.json").read_text())
    assert "labels_per_class" not in full and sorted(full["layers"], key=int) == ["0", "1", "2"]
    assert full["raw_pixel_accuracy"] > 0.8 and full["best_accuracy"] > 0.3  # 10 classes: chance is 0.1
    low = json.loads((qs / "run" / "probe_10_per_class.json").read_text())
    assert low["labels_per_class"] == 10 and 0 <= low["std_accuracy"] < 0.5
    # the subsets choose among the finer grid's layers, so the plan's coarser grid is not fitted: the fine
    # grid is the low-data probes' pooling, beside the paper's mean
    assert low["pools_compared"] == ["grid7", "mean"] and low["pool"] == low["choice_pool"] == "grid7"
    assert sorted(low["layers"], key=int) == ["0", "1", "2"]
    assert (qs / "completions.png").stat().st_size > 500


def test_report_is_self_contained_and_shows_the_numbers(qs):
    page = (qs / "report.html").read_text()
    full = json.loads((qs / "run" / "probe.json").read_text())
    assert f"{full['best_accuracy']:.4f}" in page and f"{full['raw_pixel_accuracy']:.4f}" in page
    # the loss curve, the probe plot and the completion grid, all inline
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 3
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from the network
    assert "Low-data probes" in page and "tokens/s" in page
    assert f"Probe precision: {full['precision']} for the feature pass" in page


def test_second_run_resumes_instead_of_redoing(qs, capsys):
    before = json.loads((qs / "quickstart.json").read_text())["seconds"]
    mtime = (qs / "run" / "probe_full.json").stat().st_mtime
    main(["quickstart", "--out", str(qs), *ARGS])
    out = capsys.readouterr().out
    assert out.count("already done") == 4  # pretrain, probe, low-data, completions
    assert (qs / "run" / "probe_full.json").stat().st_mtime == mtime
    assert json.loads((qs / "quickstart.json").read_text())["seconds"]["pretrain"] == before["pretrain"]


def test_a_resumed_pretraining_keeps_the_settings_it_began_with(qs, tmp_path, monkeypatch):
    """Continuing a quickstart's pretraining (a larger budget, or after an interruption) passes the budget
    alone: the run keeps its own optimizer and rates, so a run begun by an older plan (say, before
    --adamw-lr-ratio) is continued, not refused as changed; a fresh run gets the plan's settings."""
    import shutil

    seen: list[dict] = []

    def fake_pretrain(data, out, **kw):
        seen.append(kw)
        return json.loads((qs / "run" / "summary.json").read_text())

    monkeypatch.setattr(pipeline, "pretrain", fake_pretrain)
    plan, _ = pipeline.make_plan(pipeline.QuickstartOptions(smoke=True, dataset="digits"))
    for name, copy in (("resumed", True), ("fresh", False)):
        out = tmp_path / name
        if copy:
            shutil.copytree(qs, out)
        else:
            out.mkdir()
        job = pipeline.Job(plan, pipeline.QuickstartOptions(out=str(out)), pipeline.Stages(out, plan))
        job.pre_minutes = 0.2
        next(s for s in pipeline.STAGES if s.name == "pretrain").run(job)
    resumed, fresh = seen
    assert resumed["resume"] and not set(plan.pretrain_settings()) & set(resumed)
    assert resumed["minutes"] == 0.2 and resumed["eval_interval"] == plan.eval_interval
    assert not fresh["resume"] and {k: fresh[k] for k in plan.pretrain_settings()} == plan.pretrain_settings()


def test_missing_fashion_mnist_falls_back_to_digits_with_a_notice(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(plans, "FASHION_DIR", tmp_path / "absent")
    plan, notice = pipeline.make_plan(pipeline.QuickstartOptions(smoke=True))
    assert plan.dataset == "digits" and plan.resolution == 8 and "dataset-fashion-mnist" in notice


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--minutes", "0"], "--minutes must be positive"),
        (["--minutes", "nan"], "--minutes must be positive"),
        (["--minutes", "-3"], "--minutes must be positive"),
        (["--pretrain-minutes", "0"], "--pretrain-minutes must be positive"),
        (["--data-dir", "/nonexistent"], "no Fashion-MNIST IDX files"),
        (["--resolution", "40"], "--resolution must be in"),
    ],
)
def test_refusals(tmp_path, capsys, args, expect):
    with pytest.raises(SystemExit):
        main(["quickstart", "--out", str(tmp_path / "q"), *args])
    assert expect in capsys.readouterr().err


def test_foreign_out_directory_refused(tmp_path, capsys):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "mine.txt").write_text("x")
    with pytest.raises(SystemExit):
        main(["quickstart", "--out", str(tmp_path / "q"), *ARGS])
    assert "not made by igpt quickstart" in capsys.readouterr().err


def test_finetune_minutes_adds_a_fine_tuning_stage_to_the_report(qs, capsys):
    main(["quickstart", "--out", str(qs), *ARGS, "--finetune-minutes", "0.05"])
    printed = capsys.readouterr().out
    assert "pretrained init: test accuracy" in printed and "scratch init: test accuracy" in printed
    state = json.loads((qs / "quickstart.json").read_text())
    assert state["done"][-2:] == ["finetune", "finetune_scratch"]
    assert state["plan"]["finetune_minutes"] == 0.05
    ft = json.loads((qs / "finetune" / "finetune.json").read_text())
    scratch = json.loads((qs / "finetune_scratch" / "finetune.json").read_text())
    assert ft["best_epoch"] >= 0 and ft["n_val"] > 0
    assert (ft["init"], scratch["init"]) == ("pretrained", "scratch")
    # the recipe: the head on the full probe's chosen layer and pooling, no augmentation, for both
    probe = json.loads((qs / "run" / "probe_full.json").read_text())
    for r in (ft, scratch):
        assert r["layer"] == max(1, probe["best_layer"]) and r["pool"] == probe["pool"]
        assert r["settings"]["augment"] is False
        # one recipe for both arms, igpt finetune's defaults: Muon at MUON_LR
        assert (r["settings"]["optimizer"], r["settings"]["lr"]) == ("muon", MUON_LR)
    page = (qs / "report.html").read_text()
    assert "fine-tuned" in page and f"{ft['test_accuracy']:.4f}" in page
    assert "from scratch (control)" in page and f"{scratch['test_accuracy']:.4f}" in page


def test_low_data_fine_tunings_join_the_low_data_table(qs, capsys):
    main(["quickstart", "--out", str(qs), *ARGS, "--finetune-minutes", "0.05", "--finetune-low-data"])
    printed = capsys.readouterr().out
    assert "pretrained init, 10 labels per class: test accuracy" in printed
    state = json.loads((qs / "quickstart.json").read_text())
    assert {"finetune_10_per_class", "finetune_scratch_10_per_class"} <= set(state["done"])
    low = {}
    for name in ("finetune_10_per_class", "finetune_scratch_10_per_class"):
        low[name] = json.loads((qs / name / "finetune.json").read_text())
        assert len(low[name]["accuracies"]) == 2  # the smoke plan's two subsets
        assert all(s["n_train"] == 100 and s["n_val"] <= 100 for s in low[name]["subsets"])
        assert (low[name]["settings"]["optimizer"], low[name]["settings"]["lr"]) == ("muon", MUON_LR)
    ft = low["finetune_10_per_class"]
    low_probe = json.loads((qs / "run" / "probe_10_per_class.json").read_text())
    # the head takes the probe's choice; a pooling no head has (the fine 7x7 grid) falls back to the full
    # probe's pooling setting, the plan's coarse grid
    full_pool = json.loads((qs / "run" / "probe_full.json").read_text())["pool"]
    pool = next(p for p in (low_probe["best_pool"], low_probe["pool"], full_pool) if p in HEAD_POOLS)
    assert pool == plans.SMOKE.pool
    assert ft["layer"] == max(1, low_probe["best_layer"]) and ft["pool"] == pool
    y = PreparedData(qs / "data").labels("train")  # the low-data probes' subsets: balanced_subset(seed + s)
    assert [s["train_rows"] for s in ft["subsets"]] == [balanced_subset(y, 10, s).tolist() for s in (0, 1)]
    page = (qs / "report.html").read_text()
    assert "fine-tuned (same subsets)" in page
    assert f"{ft['mean_accuracy']:.4f} ± {ft['std_accuracy']:.4f}" in page


def test_low_data_fine_tuning_needs_its_minutes(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["quickstart", "--out", str(tmp_path / "q"), *ARGS, "--finetune-low-data"])
    assert "give --finetune-minutes too" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
    with pytest.raises(SystemExit):
        main(["quickstart", "--out", str(qs), *ARGS, "--finetune-minutes", "-1"])
    assert "--finetune-minutes must be positive" in capsys.readouterr().err


FAST = Speeds(feature_seconds_per_image=1e-3, fit_flops_per_second=2e11, calibration_seconds=0.5)
FASHION_COUNTS = (
    55_000,
    5_000,
    10_000,
    10,
)  # Fashion-MNIST as the quickstart prepares it: train, val, test, classes


def test_budget_shares_out_the_minutes_and_a_rerun_keeps_the_plan(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(schedule, "read_counts", lambda d: FASHION_COUNTS)
    monkeypatch.setattr(schedule, "calibrate", lambda *a, **k: calls.append(a) or FAST)
    plan, _ = pipeline.make_plan(pipeline.QuickstartOptions(minutes=30))
    st = pipeline.Stages(tmp_path, plan)
    minutes = schedule.plan_budget(plan, tmp_path, st)
    b = st.state["budget"]
    predicted = budget.predict(budget.workload(plan, FASHION_COUNTS), FAST)
    assert set(b["predicted"]) == {"probe", "low_data", "completions", "report"}
    want = 30 - (sum(predicted.values()) * budget.MARGIN + budget.MARGIN_SECONDS + b["spent_before"]) / 60
    assert minutes == b["pretrain_minutes"] == pytest.approx(want, abs=0.01) and 3 < minutes < 30
    # a slower machine leaves pretraining less of the same budget
    slow = Speeds(FAST.feature_seconds_per_image * 2, FAST.fit_flops_per_second / 2, 0.5)
    monkeypatch.setattr(schedule, "calibrate", lambda *a, **k: slow)
    assert schedule.plan_budget(plan, tmp_path, st) == minutes  # same budget: the plan is kept, not remade
    plan60, _ = pipeline.make_plan(pipeline.QuickstartOptions(minutes=60))

    def fresh(name: str, p: pipeline.QuickstartPlan) -> float:
        (tmp_path / name).mkdir()
        return schedule.plan_budget(p, tmp_path / name, pipeline.Stages(tmp_path / name, p))

    slow60 = fresh("slow", plan60)
    monkeypatch.setattr(schedule, "calibrate", lambda *a, **k: FAST)
    fast60 = fresh("fast", plan60)
    assert fast60 == pytest.approx(minutes + 30, abs=0.05) and slow60 < fast60 - 2
    # fine-tuning's minutes come out of the budget too (pretrained and the control)
    ft, _ = pipeline.make_plan(pipeline.QuickstartOptions(minutes=60, finetune_minutes=5))
    assert fresh("ft", ft) < fast60 - 10


def test_budget_too_small_is_refused_with_the_least_that_works(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(schedule, "calibrate", lambda *a, **k: FAST)
    with pytest.raises(SystemExit):
        main(["quickstart", "--out", str(tmp_path / "q"), "--minutes", "2"])
    err = capsys.readouterr().err.strip()
    least = int(re.search(r"use --minutes (\d+) or more", err).group(1))
    assert "leaves no time for pretraining" in err and len(err.splitlines()) == 1 and least > 2
    assert not (tmp_path / "q").exists()  # the refused job removes what it made (its prepared set)
    monkeypatch.setattr(schedule, "read_counts", lambda d: FASHION_COUNTS)
    plan, _ = pipeline.make_plan(
        pipeline.QuickstartOptions(minutes=least)
    )  # the least budget named is enough
    assert schedule.plan_budget(plan, tmp_path, pipeline.Stages(tmp_path, plan)) >= plan.min_pretrain_minutes


def test_calibration_measures_this_machine():
    from igpt.model.gpt import IGPTConfig

    cfg = IGPTConfig.from_preset("micro", vocab_size=8, n_positions=16)
    s = budget.calibrate(cfg, "fp32", 64, images=32, shapes=[(40, 30), (40, 40)], num_classes=4)
    assert s.feature_seconds_per_image > 0 and s.fit_flops_per_second > 1e6 and s.calibration_seconds < 30
    assert s.fp32_fit_flops_per_second is None and s.low_data_rate == s.fit_flops_per_second
    assert set(s.cv_fit_seconds) == {"40,30", "40,40"} and all(0 < v < 10 for v in s.cv_fit_seconds.values())


def test_low_data_stage_is_predicted_from_its_timed_cross_validation_fits():
    """Each low-data fit is predicted from the timing of its own shape (rows, width capped at the rows):
    every (pooling, layer) and raw pixels, per subset, times CV_FIT_FACTOR (the poolings: the fine grid
    and the mean, not the probe's coarser grid); shapes not timed fall back to
    the product rate; the faster of two calibrations keeps each shape's faster timing."""
    plan, _ = pipeline.make_plan(pipeline.QuickstartOptions(minutes=30))
    w = budget.workload(plan, FASHION_COUNTS)
    shapes = budget.cv_shapes(w)
    # tiny-deep: the mean's width 96 and the 7x7 grid's 4,704, each capped at the rows, and raw pixels' 196
    assert shapes == [(100, 96), (100, 100), (1000, 96), (1000, 196), (1000, 1000)]
    one = replace(FAST, cv_fit_seconds={f"{r},{k}": 1.0 for r, k in shapes})
    two = replace(FAST, cv_fit_seconds={f"{r},{k}": 2.0 for r, k in shapes})
    fits = sum(subsets * (2 * (w.n_layer + 1) + 1) for _, subsets in w.low_data)  # 2 poolings and raw
    gap = budget.predict(w, two)["low_data"] - budget.predict(w, one)["low_data"]
    assert gap == pytest.approx(fits * budget.CV_FIT_FACTOR)
    # the 1,000-row fits are the 100-label setting's; timing them slower raises only their share
    slow_big = replace(one, cv_fit_seconds={**one.cv_fit_seconds, "1000,1000": 3.0})
    gap = budget.predict(w, slow_big)["low_data"] - budget.predict(w, one)["low_data"]
    assert gap == pytest.approx(3 * (w.n_layer + 1) * 2.0 * budget.CV_FIT_FACTOR)  # grid7's
    assert budget.predict(w, FAST)["low_data"] > 0  # none timed: the product rate's estimate
    assert slow_big.faster(two).cv_fit_seconds == {**one.cv_fit_seconds, "1000,1000": 2.0}


def test_bf16_fits_are_predicted_with_their_own_factor(monkeypatch):
    """Fits with bf16 products (an fp32 rate timed beside) are predicted with BF16_FIT_FACTOR, fp32 fits with
    FIT_FACTOR: at equal product rates the bf16 probe is predicted shorter, by the factors' ratio alone."""
    plan, _ = pipeline.make_plan(pipeline.QuickstartOptions(minutes=30))
    w = budget.workload(plan, FASHION_COUNTS)
    bf16 = replace(FAST, fp32_fit_flops_per_second=FAST.fit_flops_per_second)
    fp32, low = budget.predict(w, FAST)["probe"], budget.predict(w, bf16)["probe"]
    assert low < fp32
    monkeypatch.setattr(budget, "BF16_FIT_FACTOR", budget.FIT_FACTOR)
    assert budget.predict(w, bf16)["probe"] == pytest.approx(fp32)


def test_low_data_fits_are_predicted_at_the_fp32_rate_they_run_at():
    """With bf16 probes the full probe's fits run in bf16 and the low-data probes' in fp32: each stage's
    prediction follows its own rate (both are timed when the precisions differ)."""
    plan, _ = pipeline.make_plan(pipeline.QuickstartOptions(minutes=30))
    w = budget.workload(plan, FASHION_COUNTS)
    bf16 = Speeds(
        FAST.feature_seconds_per_image, FAST.fit_flops_per_second * 3, 0.5, FAST.fit_flops_per_second
    )
    a, b = budget.predict(w, FAST), budget.predict(w, bf16)
    assert b["low_data"] == pytest.approx(a["low_data"]) and b["probe"] < a["probe"]
    # products 10x faster in bf16 (AMX) are predicted to speed the fits up no more than MAX_BF16_FIT_GAIN
    amx = Speeds(
        FAST.feature_seconds_per_image, FAST.fit_flops_per_second * 10, 0.5, FAST.fit_flops_per_second
    )
    assert amx.probe_rate == budget.MAX_BF16_FIT_GAIN * FAST.fit_flops_per_second
    assert budget.predict(w, amx)["probe"] == pytest.approx(b["probe"])
    assert bf16.faster(FAST).fp32_fit_flops_per_second == FAST.fit_flops_per_second


def test_calibration_keeps_the_fastest_round(monkeypatch):
    """One slow moment (a timed round at 0.3 s) must not set the predicted feature speed."""
    from igpt.model.gpt import IGPTConfig

    delays = iter([0.0, 0.3, 0.02, 0.3])  # the warm-up batch, then three timed rounds
    monkeypatch.setattr(budget, "extract_features", lambda *a, **k: time.sleep(next(delays)))
    s = budget.calibrate(IGPTConfig.from_preset("micro", vocab_size=8, n_positions=16), "fp32", 64, images=32)
    assert 0.02 / 32 <= s.feature_seconds_per_image < 0.1 / 32


def test_low_data_summary_leads_with_each_subsets_own_choice(qs):
    low = json.loads((qs / "run" / "probe_10_per_class.json").read_text())
    line = results.probe_line(low)
    assert line.startswith(f"10 labels per class: accuracy {low['mean_accuracy']:.4f}")
    assert f"shared by all subsets (layer {low['best_layer']}" in line
    page = (qs / "report.html").read_text()
    assert page.index("each subset&#x27;s own choice") < page.index("shared by all subsets")


def test_budget_is_replanned_once_with_the_faster_timing(monkeypatch, tmp_path, capsys):
    """Halfway through pretraining the machine is timed again: after a slow first timing pretraining gets
    what a fast one would have given it; the re-plan is recorded (a rerun keeps it, and is not asked
    again); a slower second timing takes nothing away; the schedule's flat stretch bounds the minutes."""
    monkeypatch.setattr(schedule, "read_counts", lambda d: FASHION_COUNTS)
    slow = Speeds(FAST.feature_seconds_per_image * 2, FAST.fit_flops_per_second / 2, 0.5)
    plan, _ = pipeline.make_plan(pipeline.QuickstartOptions(minutes=30))

    def started(name: str, first: Speeds) -> pipeline.Job:
        (tmp_path / name).mkdir()
        monkeypatch.setattr(schedule, "calibrate", lambda *a, **k: first)
        st = pipeline.Stages(tmp_path / name, plan)
        job = pipeline.Job(plan, pipeline.QuickstartOptions(out=str(tmp_path / name)), st)
        job.pre_minutes = schedule.plan_budget(plan, tmp_path / name, st)
        return job

    fast_plan = started("fast", FAST).pre_minutes
    job = started("slow", slow)
    first = job.pre_minutes
    monkeypatch.setattr(schedule, "calibrate", lambda *a, **k: FAST)
    new = schedule.replan_budget(job, 60 * first / 2, first / 2 / 0.8, first / 2 / 0.05)
    assert new == pytest.approx(fast_plan, abs=0.01) and new > first + 1
    b = job.st.state["budget"]
    assert b["pretrain_minutes"] == new == job.pre_minutes and b["replanned"]["from_minutes"] == first
    assert f"pretraining {first:g} -> {new:g} min" in capsys.readouterr().out
    assert schedule.replan_budget(job, 60 * first / 2, 0, 100) is None  # once only, also after a resume
    assert schedule.plan_budget(plan, job.out, job.st) == new  # a rerun resumes with the new minutes

    job = started("fast2", FAST)
    monkeypatch.setattr(schedule, "calibrate", lambda *a, **k: slow)
    assert schedule.replan_budget(job, 300, 1, 100) == job.pre_minutes == fast_plan
    job = started("bounded", slow)
    monkeypatch.setattr(schedule, "calibrate", lambda *a, **k: FAST)
    assert schedule.replan_budget(job, 300, 1, first + 0.5) == pytest.approx(first + 0.5)


def test_a_quickstart_whose_probe_would_not_fit_in_memory_is_refused_before_pretraining(
    monkeypatch, tmp_path, capsys
):
    import igpt.probes.memory as memory

    monkeypatch.setattr(memory, "available_memory", lambda: 1 << 16)  # 64 KiB available
    with pytest.raises(SystemExit):
        main(["quickstart", "--out", str(tmp_path / "q"), *ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert "GiB available; free some memory, or pass a smaller --resolution or --preset" in err[-1], err
    assert not (tmp_path / "q" / "run").exists()


def test_the_smoke_quickstart_runs_as_documented_even_where_its_stages_are_predicted_slow(
    tmp_path, monkeypatch, capsys
):
    """`igpt quickstart --smoke --out DIR`, as the README writes it, on a machine whose timing predicts the
    later stages at more than the smoke budget (a slow or noisy calibration): pretraining shrinks to its
    floor instead of the job being refused."""
    real = schedule.calibrate

    def slow(*a, **k):
        s = real(*a, **k)
        return replace(s, feature_seconds_per_image=s.feature_seconds_per_image * 200)

    monkeypatch.setattr(schedule, "calibrate", slow)
    main(["quickstart", "--smoke", "--out", str(tmp_path / "qs")])
    err = capsys.readouterr().err
    assert "pretraining gets its floor of 0.1 minutes" in err
    state = json.loads((tmp_path / "qs" / "quickstart.json").read_text())
    assert state["budget"]["pretrain_minutes"] == plans.SMOKE.min_pretrain_minutes
    assert state["done"][-1] == "report" and (tmp_path / "qs" / "report.html").is_file()
