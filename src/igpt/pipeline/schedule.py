"""The quickstart's budget shared out: before pretraining, this machine is timed and the later stages
predicted (`igpt.pipeline.budget`), and pretraining gets the rest (`plan_budget`); halfway through pretraining
it is timed again and re-planned with the faster timing (`replan_budget`); at the end, predicted against
actual seconds (`budget_lines`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from igpt.errors import IgptError
from igpt.model.gpt import IGPTConfig
from igpt.probes.memory import check_features_fit
from igpt.probes.setup import ProbeConfig

from .budget import (
    BudgetPlan,
    Speeds,
    calibrate,
    cv_shapes,
    fine_pool,
    predict,
    read_counts,
    share_out,
    workload,
)
from .job import Job, Stages
from .plans import QuickstartPlan


def _share(
    plan: QuickstartPlan, out: Path, spent: float, floor: Speeds | None = None
) -> tuple[BudgetPlan | float, dict[str, float]]:
    """Time this machine (`calibrate`), predict the later stages and share out the budget (`share_out`).
    Returns a plan or the least budget in minutes that works here, and the prediction (seconds per stage).
    `spent`: seconds of the budget used outside pretraining; the timing adds its own, except in a re-plan
    (`floor`: the first timing, of which the faster is kept), which runs inside pretraining's minutes."""
    w = workload(plan, read_counts(out / "data"))
    cfg = IGPTConfig.from_preset(plan.preset, vocab_size=plan.clusters, n_positions=plan.resolution**2)
    precision = ProbeConfig(run=str(out), precision=plan.probe_precision).precision
    speeds = calibrate(
        cfg, precision, w.n_embd * w.pool_cells, shapes=cv_shapes(w), num_classes=w.num_classes
    )
    if floor is None:
        spent += speeds.calibration_seconds
    else:
        speeds = speeds.faster(floor)
    predicted = predict(w, speeds)
    shared = share_out(plan.minutes, spent, predicted, speeds, plan.min_pretrain_minutes, shrink=plan.shrinks)
    return shared, predicted


def _plan_words(shared: BudgetPlan) -> str:
    return ", ".join(f"{k} {v / 60:.1f}" for k, v in shared.predicted.items())


def plan_budget(plan: QuickstartPlan, out: Path, st: Stages) -> float:
    """Pretraining's minutes: given outright, kept from an earlier call with the same budget (so a rerun
    resumes instead of replanning), or shared out from the budget after timing this machine (a few seconds).
    A budget too small for the stages here is refused in one line naming the least one that works."""
    w = workload(
        plan, read_counts(out / "data")
    )  # refused before pretraining where the probe's features would not fit in memory
    advice = "free some memory, or pass a smaller --resolution or --preset"
    check_features_fit(
        w.n_train, w.n_val + w.n_test, w.n_layer + 1, w.n_embd, plan.pool, fine_pool(plan), advice=advice
    )
    if plan.pretrain_minutes is not None:
        st.state.pop("budget", None)
        return plan.pretrain_minutes
    old = st.state.get("budget")
    if old and old.get("minutes") == plan.minutes and old.get("pretrain_minutes"):
        return float(old["pretrain_minutes"])
    shared, predicted = _share(plan, out, st.state["seconds"].get("prepare", 2.0))
    if not isinstance(shared, BudgetPlan):
        raise IgptError(
            f"--minutes {plan.minutes:g} leaves no time for pretraining on this machine: the other stages "
            f"are predicted to take about {sum(predicted.values()) / 60:.1f} minutes here; use --minutes "
            f"{shared:g} or more"
        )
    over = shared.spent_before / 60 + sum(shared.predicted.values()) / 60 + shared.pretrain_minutes
    if over > plan.minutes:  # a shrinking plan (the smoke run): pretraining at its floor, said once
        print(
            f"igpt: notice: the later stages are predicted to take {sum(predicted.values()) / 60:.1f} "
            f"minutes here, more than --minutes {plan.minutes:g} leaves; pretraining gets its floor of "
            f"{shared.pretrain_minutes:g} minutes and the job may end after its budget",
            file=sys.stderr,
        )
    st.state["budget"] = shared.to_json()
    st.save()
    print(
        f"budget {plan.minutes:g} min: pretraining {shared.pretrain_minutes:g} min; then predicted "
        f"{_plan_words(shared)} min (timed here in {shared.speeds['calibration_seconds']:.1f} s)",
        flush=True,
    )
    return shared.pretrain_minutes


def replan_budget(job: Job, elapsed: float, least: float, most: float) -> float | None:
    """Pretraining's new minutes, asked once halfway through it (`Trainer._maybe_replan`): the machine is
    timed again and the faster of both timings predicts the later stages, so one slow moment at the first
    timing no longer costs pretraining minutes for good. Kept within [least, most] (the schedule's flat
    stretch) and recorded in the budget (`replanned`), so a resumed job neither re-plans again nor
    disagrees with the run about its minutes."""
    b = job.st.state.get("budget")
    if not b or "replanned" in b:
        return None
    shared, _ = _share(job.plan, job.out, b["spent_before"], Speeds(**b["speeds"]))
    new = shared.pretrain_minutes if isinstance(shared, BudgetPlan) else least
    new = round(min(max(new, least), most), 2)
    b["replanned"] = {"at_minutes": round(elapsed / 60, 2), "from_minutes": b["pretrain_minutes"]}
    b["pretrain_minutes"] = new
    if isinstance(shared, BudgetPlan):
        b.update(predicted=shared.predicted, speeds=shared.speeds)
    job.pre_minutes = new
    job.st.save()
    print(
        f"budget re-planned after {elapsed / 60:.1f} min of pretraining: pretraining "
        f"{b['replanned']['from_minutes']:g} -> {new:g} min"
        + (f"; then predicted {_plan_words(shared)} min" if isinstance(shared, BudgetPlan) else ""),
        flush=True,
    )
    return new


def budget_lines(state: dict[str, Any]) -> list[str]:
    """Predicted against actual seconds of each stage after pretraining, as printed lines."""
    b = state.get("budget")
    if not b:
        return []
    sec = state["seconds"]
    lines = ["stage        predicted  actual (seconds)"]
    for k, v in b["predicted"].items():
        actual = sum(s for n, s in sec.items() if n == k or n.startswith(k + "_"))
        lines.append(f"{k:<12} {v:>9.0f}  {actual:>6.0f}" if actual else f"{k:<12} {v:>9.0f}       -")
    pre = sec.get("pretrain")
    lines.append(f"{'pretrain':<12} {60 * b['pretrain_minutes']:>9.0f}  {pre or 0:>6.0f}")
    return lines
