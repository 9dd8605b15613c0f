"""The quickstart: the whole pipeline on Fashion-MNIST as one resumable call.

Stages: prepare -> AR pretraining -> a linear probe of every layer -> low-data probes -> a completion grid ->
`report.html`, all within `--minutes` (the whole job's budget): before pretraining, the later stages' time is
predicted on this machine (`igpt.pipeline.budget`), and pretraining gets the rest (re-planned once, halfway
through pretraining, with a second timing: `replan_budget`). Each finished stage leaves its output in `--out`,
and a second run with the same `--out` skips what is done (an interrupted pretraining resumes from its last
checkpoint). The defaults were chosen by measured sweeps on 2-core CPUs (see README)."""

from __future__ import annotations

import functools
import json
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from igpt.data.preparation import PrepareConfig, prepare_config, summary_lines
from igpt.data.prepared import PreparedData
from igpt.errors import IgptError
from igpt.files import write_json_atomic
from igpt.finetuning.finetune import HEAD_POOLS, finetune
from igpt.generation.sample import sample
from igpt.model.gpt import IGPTConfig
from igpt.probes.features import FeatureCache
from igpt.probes.probing import check_features_fit, probe_and_save, probe_line
from igpt.probes.setup import ProbeConfig, open_labelled_run
from igpt.results import FinetuneResult, PretrainSummary
from igpt.runs import FULL_PROBE, LATEST_PROBE, Run, is_run, low_data_stem
from igpt.settings import build_config
from igpt.training.pretrain import pretrain

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
from .plans import FINETUNE_RECIPE, RECORD, QuickstartOptions, QuickstartPlan, finetune_name, make_plan
from .report import CLASSICAL_BASELINES, write_report


class Stages:
    """The record of finished stages and their seconds in OUT/quickstart.json, summed over resumed runs."""

    def __init__(self, out: Path, plan: QuickstartPlan):
        self.path = out / RECORD
        self.state: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.state["plan"] = asdict(plan)
        self.state.setdefault("seconds", {})
        self.state.setdefault("done", [])

    def done(self, name: str) -> bool:
        return name in self.state["done"]

    def finish(self, name: str, seconds: float) -> None:
        self.state["seconds"][name] = round(self.state["seconds"].get(name, 0.0) + seconds, 2)
        if name not in self.state["done"]:
            self.state["done"].append(name)
        self.save()

    def reset_after(self, name: str) -> None:
        """Forget the stages after `name` (the model changed, so its evaluations are stale)."""
        order = ["prepare", "pretrain", "probe", "low_data", "completions"]
        later = order[order.index(name) + 1 :]  # and every fine-tuning
        self.state["done"] = [
            s for s in self.state["done"] if s not in later and not s.startswith("finetune")
        ]
        self.save()

    def save(self) -> None:
        self.state["peak_rss_mib"] = max(self.state.get("peak_rss_mib", 0), peak_rss_mib())
        write_json_atomic(self.path, self.state)


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class Job:
    """One quickstart in progress: the plan, the output directory, the stage record, and the model, data and
    feature cache that the probe stages share (opened once, so the low-data probes index the full probe's
    features instead of running the model again)."""

    def __init__(self, plan: QuickstartPlan, opts: QuickstartOptions, st: Stages):
        self.plan, self.opts, self.st = plan, opts, st
        self.out = Path(opts.out)
        self.data_dir, self.run_dir = self.out / "data", self.out / "run"
        self.progress = opts.progress
        self.pre_minutes = 0.0
        self.baselines = CLASSICAL_BASELINES if plan.dataset == "fashion-mnist" else {}

    @functools.cached_property
    def probe_precision(self) -> str:
        """The probes' precision (feature pass and fits), `auto` resolved for this machine."""
        return ProbeConfig(run=str(self.run_dir), precision=self.plan.probe_precision).precision

    @functools.cached_property
    def evaluation(self) -> tuple[Any, PreparedData, list[int], FeatureCache]:
        """(model, data, every layer, feature cache) of the pretrained run."""
        _, model, data = open_labelled_run(str(self.run_dir), None)
        layers = list(range(model.config.n_layer + 1))
        cache = FeatureCache(
            model,
            data,
            layers,
            batch_size=128,
            pool=self.plan.pool,
            resolution=data.resolution,
            order=data.meta["order"],
            device="cpu",
            quiet=not self.progress,
            compile=self.plan.compile,
            precision=self.probe_precision,
        )
        return model, data, layers, cache

    def probe_config(self, **settings: Any) -> ProbeConfig:
        """A probe of the run with the plan's pooling (unless `settings` name one) and progress."""
        return ProbeConfig(
            **{"run": str(self.run_dir), "pool": self.plan.pool, "progress": self.progress, **settings}
        )


@dataclass(frozen=True)
class Stage:
    """One stage of the quickstart: `run` does it (and records its seconds), unless `is_done` finds it done
    by an earlier call; `wanted` leaves optional stages out."""

    name: str
    title: Callable[[Job], str]
    is_done: Callable[[Job], bool]
    run: Callable[[Job], None]
    wanted: Callable[[Job], bool] = lambda job: True


def _prepare(job: Job) -> None:
    plan = job.plan
    source = PrepareConfig(
        dataset=plan.dataset,
        data_dir=job.opts.data_dir if plan.dataset != "digits" else None,
        resolution=plan.resolution,
        clusters=plan.clusters,
        limit=plan.limit,
    )
    meta = prepare_config(source, job.data_dir)
    print("\n".join(summary_lines(meta, job.data_dir)))


def _pretrain_done(job: Job) -> bool:
    run = Run.open(job.run_dir) if is_run(job.run_dir) else None
    return run is not None and run.finished and run.train_config.minutes == job.pre_minutes


def _pretrain(job: Job) -> None:
    plan = job.plan
    resuming = is_run(job.run_dir)
    # a resumed run keeps the settings it began with: an older igpt's plan may have chosen others
    settings = {} if resuming else plan.pretrain_settings()
    summary = pretrain(
        job.data_dir,
        job.run_dir,
        minutes=job.pre_minutes,
        **settings,
        eval_images=1000,
        eval_interval=plan.eval_interval,
        keep_every=plan.keep_every,
        compile=plan.compile,
        resume=resuming,
        progress=job.progress,
        replan=functools.partial(replan_budget, job) if "budget" in job.st.state else None,
    )
    if not PretrainSummary.from_json(summary).finished:
        raise IgptError("pretraining stopped before its budget; run the same command again to resume it")
    job.st.reset_after("pretrain")


def _probe(job: Job) -> None:
    model, data, layers, cache = job.evaluation
    head = "attentive" if job.plan.attentive else "linear"
    cfg = job.probe_config(head=head, compile=job.plan.compile, precision=job.probe_precision)
    print(probe_line(probe_and_save(cfg, model, data, layers, cache, job.baselines)))


def _low_data(job: Job) -> None:
    model, data, layers, cache = job.evaluation
    y = data.labels("train")
    for n, k in job.plan.low_data:
        if n > np.bincount(y[y >= 0]).min():
            continue
        cfg = job.probe_config(
            labels_per_class=n, seeds=k, precision=job.probe_precision, **_low_data_pools(job)
        )
        print(probe_line(probe_and_save(cfg, model, data, layers, cache, job.baselines)))


def _low_data_pools(job: Job) -> dict[str, str]:
    """The low-data probes' poolings: where the quickstart adds a finer grid, that grid as `pool` (no further
    one) beside the paper's mean. Each subset chooses its layer among the finest grid's
    (`low_data.choice_pool`), so the plan's coarser grid would only be reported: about a minute of fits in
    the default quickstart, which pretraining gets instead."""
    fine = fine_pool(job.plan)
    return {"pool": fine, "fine_pool": "none"} if fine else {}


def _completions(job: Job) -> None:
    n_img, n_samp = job.plan.completions
    images = pick_one_per_class(job.data_dir, n_img)
    sample(job.run_dir, job.out / "completions.png", images=images, num=n_samp)


def _finetuned(job: Job, name: str) -> bool:
    d = job.out / name
    return job.st.done(name) and is_run(d) and Run.open(d).finetune_result() is not None


def _finetunings(job: Job) -> list[tuple[str, int | None, int]]:
    """(init, labels per class, subsets) of every fine-tuning the plan asks for, the control after each."""
    settings: list[tuple[int | None, int]] = [(None, 1)]
    if job.plan.finetune_low_data:
        settings += list(job.plan.low_data)
    return [(init, n, k) for n, k in settings for init in ("pretrained", "scratch")]


def _finetune_head(job: Job, labels_per_class: int | None) -> dict[str, Any]:
    """The head's layer and pooling for one fine-tuning, as the probes chose them: with all labels the full
    probe's (on the validation split), with N labels per class the low-data probe's choice shared by the
    subsets (cross-validated inside them), so a low-data fine-tuning reads no label beyond its own. Layer 0
    (the embeddings) becomes 1: fine-tuning needs a block."""
    run = Run.open(job.run_dir)
    layer, pools = None, []  # the probe's choices, best first; the first pooling a head has is taken
    if labels_per_class is None:
        full = run.full_probe()
        if full is not None:
            layer, pools = full.best_layer, [full.pool]
    else:
        low = {r.labels_per_class: r for r in run.low_data_probes()}.get(labels_per_class)
        if low is not None:  # its best pooling, else (the fine grid, which no head has) the plan's
            layer, pools = low.best_layer, [low.best_pool or low.pool, low.pool, job.plan.pool]
    return {
        "layer": None if layer is None else max(1, layer),
        "pool": next(p for p in [*pools, "mean"] if p in HEAD_POOLS),
    }


def _finetune(job: Job) -> None:
    """The fine-tunings and their from-scratch controls, each recorded as its own stage, with the recipe
    chosen on validation (benchmarks/finetune_sweep.py; README): the head on the probes' chosen layer and
    pooling, the blocks above it dropped, no augmentation, Muon at one rate for both arms
    (`plans.FINETUNE_RECIPE`). With N labels per class the K subsets share the
    minutes and train longer in epochs, with more patience (an epoch of N x classes images is a few
    steps)."""
    for init, n, k in _finetunings(job):
        name = finetune_name(init, n)
        if _finetuned(job, name):
            print(f"{name}: already done; skipped")
            continue
        t = time.perf_counter()
        ft_dir = job.out / name
        if ft_dir.is_symlink() or (ft_dir.exists() and not ft_dir.is_dir()):
            raise IgptError(f"{ft_dir} is not a fine-tuning igpt wrote; move it away and retry")
        if ft_dir.exists():  # an interrupted fine-tuning (inside the quickstart's own directory) starts again
            shutil.rmtree(ft_dir)
        # a subset's few hundred steps would not repay compiling its model
        low = {"labels_per_class": n, "seeds": k, "epochs": 1000, "patience": 10, "compile": False}
        ft = finetune(
            job.run_dir,
            ft_dir,
            init=init,
            minutes=job.plan.finetune_minutes / k,
            augment=False,
            **FINETUNE_RECIPE,
            **_finetune_head(job, n),
            **(low if n else {"epochs": 20, "compile": job.plan.compile}),
            progress=job.progress,
        )
        r = FinetuneResult.from_json(ft)
        spread = f" ± {r.std_accuracy:.4f} over {k} subsets" if n else f" (epoch {r.best_epoch})"
        who = f", {n} labels per class" if n else ""
        print(f"{init} init{who}: test accuracy {r.test_accuracy:.4f}{spread}")
        job.st.finish(name, time.perf_counter() - t)


def _report(job: Job) -> None:
    run = Run.open(job.run_dir)  # probe.json and probe.png stay the full probe's, the run's headline result
    for suffix in (".json", ".png"):
        shutil.copyfile(run.probe_file(FULL_PROBE, suffix), run.probe_file(LATEST_PROBE, suffix))
    job.st.save()
    write_report(job.out)


def _low_data_title(job: Job) -> str:
    return "low-data probes: " + ", ".join(
        f"{n} labels per class x {k} subsets" for n, k in job.plan.low_data
    )


STAGES = (
    Stage(
        "prepare",
        lambda j: (
            f"prepare {j.plan.dataset}: {j.plan.resolution}x{j.plan.resolution}, {j.plan.clusters} grey "
            "levels"
        ),
        lambda j: False,  # always run: an equal earlier prepare is reused in a moment
        _prepare,
    ),
    Stage(
        "pretrain",
        lambda j: f"AR pretraining, preset {j.plan.preset}, {j.pre_minutes:g} minutes",
        _pretrain_done,
        _pretrain,
    ),
    Stage(
        "probe",
        lambda j: (
            f"linear probe of every layer ({j.plan.pool} pooling{_fine_note(j.plan)}) beside raw pixels"
        ),
        lambda j: j.st.done("probe") and Run.open(j.run_dir).probe_file(FULL_PROBE).is_file(),
        _probe,
    ),
    Stage(
        "low_data",
        _low_data_title,
        lambda j: (
            j.st.done("low_data")
            and all(Run.open(j.run_dir).probe_file(low_data_stem(n)).is_file() for n, _ in j.plan.low_data)
        ),
        _low_data,
    ),
    Stage(
        "completions",
        lambda j: "completions: the top half of test images kept, the rest sampled",
        lambda j: j.st.done("completions") and (j.out / "completions.png").is_file(),
        _completions,
    ),
    Stage(
        "finetune",
        lambda j: (
            f"fine-tuning: joint loss, {j.plan.finetune_minutes:g} minutes, the head on the probe's chosen "
            "layer and pooling, early-stopped on validation; then the same architecture from scratch "
            "(the control: same recipe, labels and budget, at its own best rate)"
            + (", for all labels and each low-data setting" if j.plan.finetune_low_data else "")
        ),
        lambda j: all(_finetuned(j, finetune_name(init, n)) for init, n, _ in _finetunings(j)),
        _finetune,
        wanted=lambda j: bool(j.plan.finetune_minutes),
    ),
    Stage("report", lambda j: "report", lambda j: False, _report),
)
"""The quickstart's stages in order; quickstart.json records each one's seconds and whether it is done."""


def run_stages(job: Job, only: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> None:
    """Run every wanted stage that is not done yet (of `only` when given, but not those in `skip`), printing
    its number and title, timing it."""
    for n, s in enumerate(STAGES, start=1):
        if not s.wanted(job) or (only and s.name not in only) or s.name in skip:
            continue
        print(f"\n[{n}/{len(STAGES)}] {s.title(job)}", flush=True)
        if s.is_done(job):
            print(
                f"already done ({job.run_dir}); skipped" if s.name == "pretrain" else "already done; skipped"
            )
            continue
        t = time.perf_counter()
        s.run(job)
        if s.name != "finetune":  # the fine-tunings record their own two stages
            job.st.finish(s.name, time.perf_counter() - t)


def quickstart(out: str | Path | QuickstartOptions = "runs/quickstart", **settings: Any) -> dict[str, Any]:
    """The whole pipeline into `out` within `minutes`: prepare, AR pretraining for what the later stages leave
    of the budget (or for `pretrain_minutes`, given outright), a probe of every layer beside raw pixels,
    low-data probes, completions and report.html (`STAGES`). Takes `QuickstartOptions`, or `out` and their
    fields by name. A second call with the same `out` skips finished stages and resumes an interrupted
    pretraining. Returns quickstart.json's content."""
    if isinstance(out, QuickstartOptions):
        opts = out
    else:
        opts = build_config(QuickstartOptions, "quickstart", out=str(out), **settings)
    plan, notice = make_plan(opts)
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise IgptError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / RECORD).is_file():
        raise IgptError(f"{out} exists and was not made by igpt quickstart; choose another --out")
    fresh = not out.exists() or not any(out.iterdir())
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _run_job(plan, opts, out, notice)
    except IgptError:
        if fresh and not (out / "run").exists():  # refused before pretraining began: leave nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run_job(plan: QuickstartPlan, opts: QuickstartOptions, out: Path, notice: str | None) -> dict[str, Any]:
    """`quickstart` once its plan is made and `out` is ready: prepare, share out the budget, run the rest."""
    st = Stages(out, plan)
    if notice:
        print(f"igpt: notice: {notice}", file=sys.stderr)
        st.state["notice"] = notice
    job = Job(plan, opts, st)
    run_stages(job, only=("prepare",))  # a second or two; the budget reads the prepared set's sizes
    job.pre_minutes = plan_budget(plan, out, st)
    run_stages(job, skip=("prepare",))
    path = write_report(out)  # again, so that the page shows the report stage's own seconds
    total = sum(st.state["seconds"].values())
    print(
        f"\nwrote {path}\ntotal {total / 60:.1f} min of stages"
        + (f" (budget {plan.minutes:g})" if "budget" in st.state else "")
        + f"; peak memory {st.state['peak_rss_mib']:.0f} MiB"
    )
    for line in budget_lines(st.state):
        print(line)
    return st.state


def _fine_note(plan: QuickstartPlan) -> str:
    """What the probe stage's line says of the finer grid fitted at the chosen layer, if one is."""
    fine = fine_pool(plan)
    return f"; {fine} at the layer chosen" if fine else ""


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
    return share_out(plan.minutes, spent, predicted, speeds, plan.min_pretrain_minutes), predicted


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


def pick_one_per_class(data_dir: Path, n: int) -> list[int]:
    """The first test image of each class in turn (then the next ones), so the grid shows varied classes."""
    y = PreparedData(data_dir).labels("test")
    picked: list[int] = []
    classes = [c for c in np.unique(y) if c >= 0]
    rank = 0
    while len(picked) < min(n, len(y)):
        for c in classes:
            rows = np.flatnonzero(y == c)
            if rank < len(rows) and len(picked) < n:
                picked.append(int(rows[rank]))
        rank += 1
        if not classes or rank > len(y):
            break
    return picked or list(range(min(n, len(y))))
