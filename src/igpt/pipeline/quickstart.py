"""The quickstart: the whole pipeline on Fashion-MNIST as one resumable call.

Stages: prepare -> AR pretraining -> a linear probe of every layer -> low-data probes -> a completion grid ->
`report.html`, all within `--minutes` (the whole job's budget): before pretraining, the later stages' time is
predicted on this machine (`igpt.pipeline.budget`), and pretraining gets the rest (re-planned once, halfway
through pretraining, with a second timing: `replan_budget`). Each finished stage leaves its output in `--out`,
and a second run with the same `--out` skips what is done (an interrupted pretraining resumes from its last
checkpoint). The defaults were chosen by measured sweeps (docs/decisions/quickstart-defaults.md)."""

from __future__ import annotations

import functools
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from igpt.data.preparation import PrepareConfig, prepare_config, summary_lines
from igpt.data.prepared import PreparedData
from igpt.errors import IgptError
from igpt.finetuning.finetune import finetune
from igpt.generation.sample import sample
from igpt.probes.probing import probe_and_save
from igpt.results import FinetuneResult, PretrainSummary, probe_line
from igpt.runs import FULL_PROBE, LATEST_PROBE, Run, is_run, low_data_stem
from igpt.settings import build_config
from igpt.training.pretrain import pretrain

from .budget import fine_pool
from .job import Job, Stage, Stages
from .plans import RECORD, QuickstartOptions, QuickstartPlan, finetune_name, make_plan
from .report import write_report
from .schedule import budget_lines, plan_budget, replan_budget


def _prepare(job: Job) -> None:
    plan = job.plan
    source = PrepareConfig(
        dataset=plan.dataset,
        data_dir=job.opts.data_dir if plan.dataset != "digits" else None,
        resolution=plan.resolution,
        clusters=plan.clusters,
        limit=plan.limit,
    )
    try:
        meta = prepare_config(source, job.data_dir)
    except IgptError as e:
        if "--force" not in str(e):
            raise
        raise IgptError(  # the quickstart has no --force: another plan's set is in this --out
            f"{job.data_dir} holds a set prepared with other settings (another --resolution or dataset); "
            "choose another --out"
        ) from None
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


def _finetune(job: Job) -> None:
    """The fine-tunings and their from-scratch controls, each recorded as its own stage, with `igpt
    finetune`'s defaults, which are the recipe chosen on validation (docs/decisions/finetune-recipe.md): the
    head on the probes' chosen layer and pooling, the blocks above it dropped, no augmentation, Muon at one
    rate for both arms. With N labels per class the K subsets share the minutes and train longer in
    epochs, with more patience (an epoch of N x classes images is a few steps)."""
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
        low = {"labels_per_class": n, "seeds": k, "epochs": 1000, "patience": 10}
        ft = finetune(
            job.run_dir,
            ft_dir,
            init=init,
            minutes=job.plan.finetune_minutes,
            compile=None if job.plan.compile else False,  # None: compiled where the rows repay it
            **(low if n else {"epochs": 20}),
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
