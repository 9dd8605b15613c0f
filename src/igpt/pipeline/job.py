"""One quickstart in progress: the record of its finished stages and their seconds (`Stages`, kept in
OUT/quickstart.json), the job's shared state (`Job`: the plan, the directories, the model and feature cache
the probe stages share) and what a stage is (`Stage`)."""

from __future__ import annotations

import functools
import json
import resource
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from igpt.data.prepared import PreparedData
from igpt.errors import IgptError
from igpt.files import write_json_atomic
from igpt.probes.features import FeatureCache
from igpt.probes.setup import ProbeConfig, open_labelled_run

from .plans import RECORD, QuickstartOptions, QuickstartPlan
from .report import CLASSICAL_BASELINES

IDENTITY = ("dataset", "resolution", "clusters", "limit", "preset")
"""The plan's settings that make a quickstart's data and model what they are: a second command into the same
directory must ask for the same ones (it resumes or skips), never silently take over the first's stages."""


def check_same_job(out: Path, recorded: Any, plan: QuickstartPlan) -> None:
    """Refuse a quickstart whose data or model settings differ from those `out` was made with, naming the
    first that differs (a finished `--preset micro` run is not a `--preset tiny` one)."""
    if not isinstance(recorded, dict):
        return
    for key in IDENTITY:
        if key in recorded and recorded[key] != getattr(plan, key):
            flag = {"dataset": "--dataset", "resolution": "--resolution", "preset": "--preset"}.get(key)
            how = f"give {flag} {recorded[key]} to resume it" if flag else "run it with the same options"
            raise IgptError(
                f"{out} holds a quickstart with {key} {recorded[key]!r}, not {getattr(plan, key)!r}; "
                f"{how}, or choose another --out"
            )


class Stages:
    """The record of finished stages and their seconds in OUT/quickstart.json, summed over resumed runs."""

    def __init__(self, out: Path, plan: QuickstartPlan):
        self.path = out / RECORD
        self.state: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        check_same_job(out, self.state.get("plan"), plan)
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
