"""The quickstart: the whole pipeline on Fashion-MNIST as one resumable call.

Stages: prepare -> AR pretraining -> a linear probe of every layer -> low-data probes -> a completion grid
-> `report.html`, all within `--minutes` (the whole job's budget): before pretraining, the later stages'
time is predicted on this machine (`igpt.budget`), and pretraining gets the rest. Each finished stage
leaves its output in `--out`, and a second run with the same `--out` skips what is done (an interrupted
pretraining resumes from its last checkpoint). The defaults were chosen by measured sweeps on 2-core CPUs
(see README).
"""

from __future__ import annotations

import functools
import json
import math
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .budget import BudgetPlan, Workload, calibrate, predict, prepared_counts, share_out
from .data import PreparedData
from .errors import IgptError
from .files import write_json_atomic
from .finetuning import finetune
from .model import IGPTConfig
from .preparation import VAL_FRACTION, PrepareConfig, prepare_config, summary_lines
from .probing import FeatureCache, ProbeConfig, grid_side, open_labelled_run, probe_and_save
from .report import CLASSICAL_BASELINES, write_report
from .runs import Run
from .sampling import sample
from .training import pretrain

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class QuickstartPlan:
    """The settings of one quickstart: data, model, budget and evaluation."""

    dataset: str
    """fashion-mnist, or digits when the Fashion-MNIST files are missing."""
    resolution: int
    """Square side the images are box-resized to; 14 trades detail for 4x shorter sequences than 28."""
    clusters: int
    """Grey levels of the palette."""
    limit: int | None
    """Images per split kept (None: all)."""
    preset: str
    """Model shape preset."""
    minutes: float
    """The whole job's wall-clock budget: pretraining gets what the other stages are predicted to leave."""
    pretrain_minutes: float | None
    """Pretraining's minutes, given outright (no budget sharing); None: shared out from `minutes`."""
    min_pretrain_minutes: float
    """The least pretraining worth running; a budget that leaves less is refused."""
    batch_size: int
    lr: float
    optimizer: str
    """adamw or muon (see `igpt.optim`)."""
    schedule: str
    """Learning-rate decay after warm-up: cosine, linear or wsd."""
    shift: int
    """Random translations of up to this many pixels during pretraining (0: none)."""
    flip: bool
    """Random horizontal flips during pretraining (Fashion-MNIST's classes survive them)."""
    precision: str
    """fp32, bf16, or auto (bf16 where the CPU has AMX, else fp32)."""
    prefix_causal: bool
    """AR with prefix-causal attention, features read bidirectionally."""
    probe_precision: str
    """The probes' feature pass: fp32, bf16, or auto (bf16 where the CPU has AMX)."""
    pool: str
    """Probe pooling: 'grid3' (means over a 3x3 grid) beat the paper's 'mean' at this scale (see README)."""
    low_data: tuple[tuple[int, int], ...]
    """(labels per class, seeds) pairs for the low-data probes."""
    completions: tuple[int, int]
    """(test images, samples per image) in the completion grid."""
    keep_every: int
    """Checkpoints kept every N steps, so `igpt probe RUN --checkpoints all` can
    plot probe accuracy against validation loss over the run."""
    finetune_minutes: float | None
    """Fine-tune the pretrained model (joint loss, early-stopped on validation) for this many minutes after
    the probes; None skips it."""
    attentive: bool
    """Also train the attentive probe on the best layer's token states (see `igpt.attentive`)."""
    compile: bool
    """torch.compile pretraining and the probes' feature pass (faster on CPU after some seconds of compiling;
    see BENCHMARKS.md); each falls back to eager PyTorch, with a notice, where compiling fails."""

    def pretrain_settings(self) -> dict[str, Any]:
        """The plan's pretraining settings as `igpt.pretrain` keywords (all but the budget)."""
        keys = ("preset", "batch_size", "lr", "optimizer", "schedule", "shift", "flip", "precision")
        return {"prefix_causal": self.prefix_causal or None, **{k: getattr(self, k) for k in keys}}


DEFAULT = QuickstartPlan(
    dataset="fashion-mnist",
    resolution=14,
    clusters=16,
    limit=None,
    preset="tiny",
    minutes=30.0,
    pretrain_minutes=None,
    min_pretrain_minutes=3.0,
    batch_size=32,
    lr=2e-3,
    optimizer="muon",
    schedule="wsd",
    shift=0,
    flip=False,
    precision="auto",
    prefix_causal=False,
    probe_precision="auto",
    pool="grid3",
    low_data=((10, 5), (100, 3)),
    completions=(8, 5),
    keep_every=500,
    finetune_minutes=None,
    attentive=False,
    compile=True,
)
SMOKE = QuickstartPlan(
    dataset="fashion-mnist",
    resolution=8,
    clusters=8,
    limit=2000,
    preset="micro",
    minutes=1.5,
    pretrain_minutes=None,
    min_pretrain_minutes=0.1,
    batch_size=32,
    lr=3e-3,
    optimizer="adamw",
    schedule="cosine",
    shift=0,
    flip=False,
    precision="fp32",
    prefix_causal=False,
    probe_precision="fp32",
    pool="grid",
    low_data=((10, 2),),
    completions=(3, 3),
    keep_every=1000,
    finetune_minutes=None,
    attentive=False,
    compile=False,
)


def make_plan(
    smoke: bool = False,
    minutes: float | None = None,
    preset: str | None = None,
    compile: bool | None = None,
    resolution: int | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    finetune_minutes: float | None = None,
    attentive: bool | None = None,
    pretrain_minutes: float | None = None,
) -> tuple[QuickstartPlan, str | None]:
    """The plan from the defaults (or the smoke plan) and the options; with a notice when Fashion-MNIST is
    missing and the digits stand in."""
    base = SMOKE if smoke else DEFAULT
    over: dict[str, Any] = {}
    budgets = {"minutes": minutes, "pretrain_minutes": pretrain_minutes, "finetune_minutes": finetune_minutes}
    for name, value in budgets.items():
        if value is None:
            continue
        if not (math.isfinite(value) and value > 0):
            raise IgptError(f"--{name.replace('_', '-')} must be positive, got {value}")
        over[name] = value
    if attentive is not None:
        over["attentive"] = attentive
    if preset:
        over["preset"] = preset
    if compile is not None:
        over["compile"] = compile
    if resolution is not None:
        if not 2 <= resolution <= 28:
            raise IgptError(f"--resolution must be in [2, 28] for Fashion-MNIST, got {resolution}")
        over["resolution"] = resolution
    if dataset not in (None, "fashion-mnist", "digits"):
        raise IgptError(f"--dataset must be fashion-mnist or digits, got '{dataset}'")
    notice = None
    dataset = dataset or base.dataset
    if dataset == "fashion-mnist":
        d = Path(data_dir) if data_dir else FASHION_DIR
        if not any(d.glob("train-images*")):
            if data_dir:
                raise IgptError(f"no Fashion-MNIST IDX files in {d}")
            dataset = "digits"
            notice = (
                f"Fashion-MNIST is not in {FASHION_DIR} (install it with `apt-get install "
                "dataset-fashion-mnist`); using scikit-learn's 8x8 digits instead"
            )
    if dataset == "digits":
        over.update(resolution=8, limit=None)
    over["dataset"] = dataset
    return QuickstartPlan(**{**asdict(base), **over}), notice


class Stages:
    """The record of finished stages and their seconds in OUT/quickstart.json, summed over resumed runs."""

    def __init__(self, out: Path, plan: QuickstartPlan):
        self.path = out / "quickstart.json"
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
        order = ["prepare", "pretrain", "probe", "low_data", "completions", "finetune", "finetune_scratch"]
        later = order[order.index(name) + 1 :]
        self.state["done"] = [s for s in self.state["done"] if s not in later]
        self.save()

    def save(self) -> None:
        self.state["peak_rss_mib"] = max(self.state.get("peak_rss_mib", 0), peak_rss_mib())
        write_json_atomic(self.path, self.state)


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def stage(n: int, title: str) -> None:
    print(f"\n[{n}/7] {title}", flush=True)


def quickstart(
    out: str | Path = "runs/quickstart",
    *,
    minutes: float | None = None,
    smoke: bool = False,
    dataset: str | None = None,
    data_dir: str | None = None,
    preset: str | None = None,
    resolution: int | None = None,
    compile: bool | None = None,
    finetune_minutes: float | None = None,
    attentive: bool | None = None,
    pretrain_minutes: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole pipeline into `out` within `minutes`: prepare, AR pretraining for what the later stages leave
    of the budget (or for `pretrain_minutes`, given outright), a probe of every layer beside raw pixels,
    low-data probes, completions and report.html. A second call with the same `out` skips finished stages
    and resumes an interrupted pretraining. Returns quickstart.json's content."""
    plan, notice = make_plan(
        smoke,
        minutes,
        preset,
        compile,
        resolution,
        dataset,
        data_dir,
        finetune_minutes,
        attentive,
        pretrain_minutes,
    )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise IgptError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "quickstart.json").is_file():
        raise IgptError(f"{out} exists and was not made by igpt quickstart; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if notice:
        print(f"igpt: notice: {notice}", file=sys.stderr)
    st = Stages(out, plan)
    if notice:
        st.state["notice"] = notice
    data_dir_out, run_dir = out / "data", out / "run"
    pre_minutes = plan_budget(plan, out, st)

    stage(1, f"prepare {plan.dataset}: {plan.resolution}x{plan.resolution}, {plan.clusters} grey levels")
    t = time.perf_counter()
    source_dir = data_dir if plan.dataset != "digits" else None
    meta = prepare_config(
        PrepareConfig(
            dataset=plan.dataset,
            data_dir=source_dir,
            resolution=plan.resolution,
            clusters=plan.clusters,
            limit=plan.limit,
        ),
        data_dir_out,
    )
    print("\n".join(summary_lines(meta, data_dir_out)))
    st.finish("prepare", time.perf_counter() - t)

    stage(2, f"AR pretraining, preset {plan.preset}, {pre_minutes:g} minutes")
    run = Run.open(run_dir) if (run_dir / "run.json").is_file() else None
    if run is not None and run.finished and run.train_config.minutes == pre_minutes:
        print(f"already done ({run_dir}); skipped")
    else:
        t = time.perf_counter()
        summary = pretrain(
            data_dir_out,
            run_dir,
            minutes=pre_minutes,
            **plan.pretrain_settings(),
            eval_images=1000,
            keep_every=plan.keep_every,
            compile=plan.compile,
            resume=run is not None,
            progress=progress,
        )
        if not summary.get("finished", False):
            raise IgptError("pretraining stopped before its budget; run the same command again to resume it")
        st.finish("pretrain", time.perf_counter() - t)
        st.reset_after("pretrain")

    stage(3, f"linear probe of every layer ({plan.pool} pooling) beside raw pixels")
    baselines = CLASSICAL_BASELINES if plan.dataset == "fashion-mnist" else {}
    probe_precision = ProbeConfig(run=str(run_dir), precision=plan.probe_precision).precision  # auto resolved

    @functools.cache
    def evaluation() -> tuple:
        """(model, data, every layer, feature cache), opened once and shared by both probe stages, so the
        low-data probes index the full probe's features instead of running the model again."""
        _, model, data = open_labelled_run(str(run_dir), None)
        layers = list(range(model.config.n_layer + 1))
        cache = FeatureCache(
            model,
            data,
            layers,
            batch_size=128,
            pool=plan.pool,
            resolution=data.resolution,
            order=data.meta["order"],
            device="cpu",
            quiet=not progress,
            compile=plan.compile,
            precision=probe_precision,
        )
        return model, data, layers, cache

    if st.done("probe") and (run_dir / "probe_full.json").is_file():
        print("already done; skipped")
    else:
        t = time.perf_counter()
        model, data, layers, cache = evaluation()
        head = "attentive" if plan.attentive else "linear"
        cfg = ProbeConfig(
            run=str(run_dir),
            pool=plan.pool,
            head=head,
            compile=plan.compile,
            precision=probe_precision,
            progress=progress,
        )
        res = probe_and_save(cfg, model, data, layers, cache, baselines)
        print(probe_line(res))
        st.finish("probe", time.perf_counter() - t)

    stage(4, "low-data probes: " + ", ".join(f"{n} labels per class x {k} subsets" for n, k in plan.low_data))
    if st.done("low_data") and all(
        (run_dir / f"probe_{n}_per_class.json").is_file() for n, _ in plan.low_data
    ):
        print("already done; skipped")
    else:
        t = time.perf_counter()
        model, data, layers, cache = evaluation()
        for n, k in plan.low_data:
            if n > np.bincount(data.labels("train")[data.labels("train") >= 0]).min():
                continue
            cfg = ProbeConfig(
                run=str(run_dir), pool=plan.pool, labels_per_class=n, seeds=k, progress=progress
            )
            print(probe_line(probe_and_save(cfg, model, data, layers, cache, baselines)))
        st.finish("low_data", time.perf_counter() - t)
    # probe.json and probe.png stay the full probe's, the run's headline result
    shutil.copyfile(run_dir / "probe_full.json", run_dir / "probe.json")
    shutil.copyfile(run_dir / "probe_full.png", run_dir / "probe.png")

    stage(5, "completions: the top half of test images kept, the rest sampled")
    if st.done("completions") and (out / "completions.png").is_file():
        print("already done; skipped")
    else:
        t = time.perf_counter()
        n_img, n_samp = plan.completions
        sample(run_dir, out / "completions.png", images=pick_one_per_class(data_dir_out, n_img), num=n_samp)
        st.finish("completions", time.perf_counter() - t)

    if plan.finetune_minutes:
        stage(
            6,
            f"fine-tuning: joint loss, {plan.finetune_minutes:g} minutes, early-stopped on validation; then "
            "the same architecture and recipe from scratch (the control)",
        )
        for init, name in (("pretrained", "finetune"), ("scratch", "finetune_scratch")):
            ft_dir = out / name
            if st.done(name) and (ft_dir / "finetune.json").is_file():
                print(f"{init}: already done; skipped")
                continue
            t = time.perf_counter()
            if ft_dir.exists():  # an interrupted fine-tuning starts again
                shutil.rmtree(ft_dir)
            ft = finetune(
                run_dir,
                ft_dir,
                init=init,
                minutes=plan.finetune_minutes,
                epochs=20,
                compile=plan.compile,
                progress=progress,
            )
            print(f"{init} init: test accuracy {ft['test_accuracy']:.4f} (epoch {ft['best_epoch']})")
            st.finish(name, time.perf_counter() - t)

    stage(7, "report")
    t = time.perf_counter()
    st.save()
    write_report(out)
    st.finish("report", time.perf_counter() - t)
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


def _workload(plan: QuickstartPlan, out: Path) -> Workload:
    """The sizes of the stages after pretraining: from the prepared meta.json when it exists, else from the
    dataset's known sizes."""
    counts = prepared_counts(out / "data")
    if counts is None:
        if plan.dataset == "fashion-mnist":
            n_tr, n_te = min(plan.limit or 60_000, 60_000), min(plan.limit or 10_000, 10_000)
        else:  # the digits: 1,797 images, a fifth for test
            n_tr, n_te = 1438, 359
        n_va = round(n_tr * VAL_FRACTION)
        counts = (n_tr - n_va, n_va, n_te, 10)
    cfg = IGPTConfig.from_preset(plan.preset)
    return Workload(
        *counts,
        resolution=plan.resolution,
        n_layer=cfg.n_layer,
        n_embd=cfg.n_embd,
        pool_cells=grid_side(plan.pool) ** 2,
        low_data=plan.low_data,
        completions=plan.completions,
        compile=plan.compile,
        finetune_minutes=plan.finetune_minutes,
        attentive=plan.attentive,
    )


def plan_budget(plan: QuickstartPlan, out: Path, st: Stages) -> float:
    """Pretraining's minutes: given outright, kept from an earlier call with the same budget (so a rerun
    resumes instead of replanning), or shared out from the budget after timing this machine (a few seconds).
    A budget too small for the stages here is refused in one line naming the least one that works."""
    if plan.pretrain_minutes is not None:
        st.state.pop("budget", None)
        return plan.pretrain_minutes
    old = st.state.get("budget")
    if old and old.get("minutes") == plan.minutes and old.get("pretrain_minutes"):
        return float(old["pretrain_minutes"])
    t = time.perf_counter()
    w = _workload(plan, out)
    cfg = IGPTConfig.from_preset(plan.preset, vocab_size=plan.clusters, n_positions=plan.resolution**2)
    precision = ProbeConfig(run=str(out), precision=plan.probe_precision).precision
    speeds = calibrate(cfg, precision, w.n_embd * w.pool_cells)
    predicted = predict(w, speeds)
    spent = st.state["seconds"].get("prepare", 2.0) + (time.perf_counter() - t)
    shared = share_out(plan.minutes, spent, predicted, speeds, plan.min_pretrain_minutes)
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
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in shared.predicted.items())
        + f" min (timed here in {speeds.calibration_seconds:.1f} s)",
        flush=True,
    )
    return shared.pretrain_minutes


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


def probe_line(res: dict[str, Any]) -> str:
    """One line that sums up a probe result: the best layer's accuracy beside raw pixels."""
    if "mean_accuracy" in res:  # low data: a user holds one subset, so each subset's own choice leads
        return (
            f"{res['labels_per_class']} labels per class: accuracy {res['mean_accuracy']:.4f} (std "
            f"{res['std_accuracy']:.4f}) with each subset's own choice; raw pixels "
            f"{res['raw_pixel_accuracy']:.4f}; the choice shared by all subsets (layer {res['best_layer']}, "
            f"{res.get('best_pool', res.get('pool'))} pooling) {res['best_accuracy']:.4f}"
        )
    head = f", {res['head']} head" if res.get("head", "linear") != "linear" else ""
    return (
        f"best layer {res['best_layer']}{head}: accuracy {res['best_accuracy']:.4f}; "
        f"raw pixels {res['raw_pixel_accuracy']:.4f}"
    )


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
