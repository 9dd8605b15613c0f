"""`igpt quickstart`: the whole pipeline on Fashion-MNIST as one resumable command.

Stages: prepare -> AR pretraining within `--minutes` -> a linear probe of every layer -> low-data probes ->
a completion grid -> `report.html`. Each finished stage leaves its output in `--out`, and a second run with
the same `--out` skips what is done (an interrupted pretraining resumes from its last checkpoint). The
defaults were chosen by a measured sweep on a 2-core CPU (see README): the best-layer probe as high as it
gets when the whole job takes about half an hour.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .cli import build_parser
from .data import PreparedData, write_json_atomic
from .errors import IgptError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
# Published scikit-learn results on Fashion-MNIST (28x28 pixels; the dataset's benchmark table), drawn as
# reference lines beside our probes.
CLASSICAL_BASELINES = {"LogisticRegression": 0.842, "MLPClassifier": 0.871, "SVC (RBF)": 0.897}


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
    """Pretraining wall-clock budget."""
    batch_size: int
    lr: float
    pool: str
    """Probe pooling: 'grid3' (means over a 3x3 grid) beat the paper's 'mean' by about 5 points at this scale."""
    low_data: tuple[tuple[int, int], ...]
    """(labels per class, seeds) pairs for the low-data probes."""
    completions: tuple[int, int]
    """(test images, samples per image) in the completion grid."""
    keep_every: int
    """Checkpoints kept every N steps (about 10 MB each for tiny), so `igpt probe RUN --checkpoints all` can
    plot probe accuracy against validation loss over the run."""
    compile: bool
    """torch.compile pretraining and the probes' feature pass (1.04-1.16x and 1.26-1.45x faster on a 2-core
    CPU, for about 25 s of compiling); each falls back to eager PyTorch, with a notice, where compiling fails."""


DEFAULT = QuickstartPlan(dataset="fashion-mnist", resolution=14, clusters=16, limit=None, preset="tiny",
                         minutes=19.5, batch_size=32, lr=2e-3, pool="grid3", low_data=((10, 5), (100, 3)),
                         completions=(8, 5), keep_every=500, compile=True)  # fmt: skip
SMOKE = QuickstartPlan(dataset="fashion-mnist", resolution=8, clusters=8, limit=2000, preset="micro",
                       minutes=0.3, batch_size=32, lr=3e-3, pool="grid", low_data=((10, 2),),
                       completions=(3, 3), keep_every=1000, compile=False)  # fmt: skip


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="the whole pipeline on Fashion-MNIST, ending in report.html")
    p.add_argument(
        "--out", default="runs/quickstart", help="directory for everything (default runs/quickstart)"
    )
    p.add_argument("--minutes", type=float, help=f"pretraining budget (default {DEFAULT.minutes:g})")
    p.add_argument("--smoke", action="store_true", help="a tiny model on a subset: the pipeline in ~1 minute")
    p.add_argument("--dataset", choices=["fashion-mnist", "digits"], help="default fashion-mnist")
    p.add_argument("--data-dir", help=f"where the Fashion-MNIST IDX files are (default {FASHION_DIR})")
    p.add_argument("--preset", help=f"model shape (default {DEFAULT.preset})")
    p.add_argument("--resolution", type=int, help=f"image side (default {DEFAULT.resolution})")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile pretraining and the feature pass (default on; off with --smoke)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def make_plan(args: argparse.Namespace) -> tuple[QuickstartPlan, str | None]:
    """The plan from the defaults (or the smoke plan) and the options; with a notice when Fashion-MNIST is
    missing and the digits stand in."""
    base = SMOKE if args.smoke else DEFAULT
    over: dict[str, Any] = {}
    if args.minutes is not None:
        if not args.minutes > 0:
            raise IgptError(f"--minutes must be positive, got {args.minutes}")
        over["minutes"] = args.minutes
    if args.preset:
        over["preset"] = args.preset
    if args.compile is not None:
        over["compile"] = args.compile
    if args.resolution is not None:
        if not 2 <= args.resolution <= 28:
            raise IgptError(f"--resolution must be in [2, 28] for Fashion-MNIST, got {args.resolution}")
        over["resolution"] = args.resolution
    notice = None
    dataset = args.dataset or base.dataset
    if dataset == "fashion-mnist":
        d = Path(args.data_dir) if args.data_dir else FASHION_DIR
        if not any(d.glob("train-images*")):
            if args.data_dir:
                raise IgptError(f"no Fashion-MNIST IDX files in {d}")
            dataset = "digits"
            notice = (f"Fashion-MNIST is not in {FASHION_DIR} (install it with `apt-get install "
                      "dataset-fashion-mnist`); using scikit-learn's 8x8 digits instead")  # fmt: skip
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
        order = ["prepare", "pretrain", "probe", "low_data", "completions"]
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
    print(f"\n[{n}/6] {title}", flush=True)


def run(args: argparse.Namespace) -> None:
    plan, notice = make_plan(args)
    out = Path(args.out)
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
    data_dir, run_dir = out / "data", out / "run"
    parser = build_parser()
    quiet = ["--no-progress"] if args.no_progress else []

    stage(1, f"prepare {plan.dataset}: {plan.resolution}x{plan.resolution}, {plan.clusters} grey levels")
    t = time.perf_counter()
    from .prepare import PrepareConfig, prepare, summary_lines

    meta = prepare(PrepareConfig(dataset=plan.dataset, data_dir=args.data_dir if plan.dataset != "digits" else None,
                                 resolution=plan.resolution, clusters=plan.clusters, limit=plan.limit), data_dir)  # fmt: skip
    print("\n".join(summary_lines(meta, data_dir)))
    st.finish("prepare", time.perf_counter() - t)

    stage(2, f"AR pretraining, preset {plan.preset}, {plan.minutes:g} minutes")
    summary = run_dir / "summary.json"
    finished = summary.is_file() and json.loads(summary.read_text()).get("finished", False)
    same_budget = (
        finished and json.loads((run_dir / "run.json").read_text())["train"]["minutes"] == plan.minutes
    )
    if finished and same_budget:
        print(f"already done ({run_dir}); skipped")
    else:
        t = time.perf_counter()
        argv = ["pretrain", "--data", str(data_dir), "--out", str(run_dir), "--preset", plan.preset,
                "--minutes", str(plan.minutes), "--batch-size", str(plan.batch_size), "--lr", str(plan.lr),
                "--eval-images", "1000", "--keep-every", str(plan.keep_every), *quiet,
                "--compile" if plan.compile else "--no-compile"]  # fmt: skip
        if (run_dir / "run.json").is_file():
            argv.append("--resume")
        a = parser.parse_args(argv)
        a.func(a)
        if not json.loads(summary.read_text()).get("finished", False):
            raise IgptError("pretraining stopped before its budget; run the same command again to resume it")
        st.finish("pretrain", time.perf_counter() - t)
        st.reset_after("pretrain")

    stage(3, f"linear probe of every layer ({plan.pool} pooling) beside raw pixels")
    from .main_probe import FeatureCache, open_labelled_run, probe_and_save

    baselines = CLASSICAL_BASELINES if plan.dataset == "fashion-mnist" else {}

    @functools.cache
    def evaluation() -> tuple:
        """(model, data, every layer, feature cache), opened once and shared by both probe stages, so the
        low-data probes index the full probe's features instead of running the model again."""
        _, model, data = open_labelled_run(str(run_dir), None)
        layers = list(range(model.config.n_layer + 1))
        cache = FeatureCache(model, data, layers, batch_size=128, pool=plan.pool, resolution=data.resolution,
                             device="cpu", quiet=args.no_progress, compile=plan.compile)  # fmt: skip
        return model, data, layers, cache

    if st.done("probe") and (run_dir / "probe_full.json").is_file():
        print("already done; skipped")
    else:
        t = time.perf_counter()
        a = parser.parse_args(["probe", str(run_dir), "--pool", plan.pool])
        model, data, layers, cache = evaluation()
        probe_and_save(a, model, data, layers, "cpu", cache, baselines)
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
            a = parser.parse_args(["probe", str(run_dir), "--pool", plan.pool, "--labels-per-class", str(n),
                                   "--seeds", str(k)])  # fmt: skip
            probe_and_save(a, model, data, layers, "cpu", cache, baselines)
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
        a = parser.parse_args(["sample", str(run_dir), "--out", str(out / "completions.png"),
                               "--images", ",".join(str(i) for i in pick_one_per_class(data_dir, n_img)),
                               "--num", str(n_samp)])  # fmt: skip
        a.func(a)
        st.finish("completions", time.perf_counter() - t)

    stage(6, "report")
    from .report import write_report

    st.save()
    path = write_report(out)
    total = sum(st.state["seconds"].values())
    print(
        f"\nwrote {path}\ntotal {total / 60:.1f} min of stages; peak memory {st.state['peak_rss_mib']:.0f} MiB"
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
