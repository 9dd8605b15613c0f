"""Typed views of what the stages write as JSON: a pretraining's summary, a full probe, a low-data probe, a
fine-tuning. The report, the quickstart and the command line read these attributes instead of string keys.

Each view keeps the keys it does not name in `extra`, so `to_json(from_json(d)) == d`, and a file written by
an older igpt (lacking a newer key) still opens, the missing attribute at its default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

R = TypeVar("R", bound="Result")


@dataclass(kw_only=True)
class Result:
    """The shared part: the unnamed keys, and which named keys the JSON held."""

    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    """Keys of the JSON object that this view does not name, as they were."""
    present: frozenset[str] = field(default_factory=frozenset, repr=False)
    """The named keys the JSON object held (the others are at their defaults)."""

    @classmethod
    def _named(cls) -> dict[str, str]:
        """attribute -> JSON key of every named field (a field's metadata `key` renames it)."""
        return {
            f.name: f.metadata.get("key", f.name)
            for f in dataclasses.fields(cls)
            if f.name not in ("extra", "present")
        }

    @classmethod
    def from_json(cls: type[R], obj: dict[str, Any]) -> R:
        """The view of a JSON object as written by the stage (or an older igpt)."""
        named = cls._named()
        keys = set(named.values())
        values = {attr: obj[key] for attr, key in named.items() if key in obj}
        extra = {k: v for k, v in obj.items() if k not in keys}
        return cls(**values, extra=extra, present=frozenset(k for k in keys if k in obj))

    def to_json(self) -> dict[str, Any]:
        """The JSON object again: the named keys it held (or that were set to other than their default),
        then the rest."""
        defaults = {
            f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            for f in dataclasses.fields(self)
        }
        out = {}
        for attr, key in self._named().items():
            if key in self.present or getattr(self, attr) != defaults[attr]:
                out[key] = getattr(self, attr)
        return {**out, **self.extra}


@dataclass(kw_only=True)
class PretrainSummary(Result):
    """summary.json of a pretraining."""

    steps: int = 0
    tokens_seen: int = 0
    params: int = 0
    train_loss: float | None = None
    val_nll: float | None = None
    val_bits_per_token: float | None = None
    test_nll: float | None = None
    tokens_per_second: float = 0.0
    epochs: float = 0.0
    finished: bool = False
    device: str = "cpu"
    precision: str = "fp32"
    compiled: bool = False


@dataclass(kw_only=True)
class ProbeResult(Result):
    """probe_full.json: the linear probe of every layer (and what was asked for beside it)."""

    layers: dict[str, float] = field(default_factory=dict)
    """Test accuracy by layer."""
    val_accuracy: dict[str, float] = field(default_factory=dict)
    """Validation accuracy by layer (what the best layer is chosen on)."""
    lambdas: dict[str, float] = field(default_factory=dict, metadata={"key": "lambda"})
    """L2 strength chosen on validation, by layer."""
    best_layer: int | None = None
    best_accuracy: float | None = None
    """Test accuracy of the best head (the attentive one when it ran)."""
    linear_best_accuracy: float | None = None
    """With the attentive head: the best linear layer's test accuracy."""
    raw_pixel_accuracy: float | None = None
    pool: str = "mean"
    head: str = "linear"
    n_train: int = 0
    n_test: int = 0
    feature_dim: int | None = None
    classifier: str = ""
    paper_probe: dict[str, Any] | None = None
    """The paper's mean-pooled probe beside the asked-for pooling: best_layer, best_accuracy, layers."""
    attentive: dict[str, Any] | None = None
    fine_probe: dict[str, Any] | None = None
    """The further pooling (`--fine-pool`) at the chosen layer: pool, layer, test_accuracy, val_accuracy,
    lambda, feature_dim."""
    chosen: dict[str, Any] | None = None
    """The best of every probe run, chosen on validation: probe, val_accuracy, test_accuracy."""
    precision: str | None = None
    """The feature pass's and the fits' precision (fp32 or bf16; None: written before it was recorded)."""

    def variant(self, key: str) -> dict[str, Any] | None:
        """The result of the probe variant stored under `key` (`igpt.probes.variants`), None when it did not
        run."""
        value = getattr(self, key, None) if key in self._named() else self.extra.get(key)
        return value if isinstance(value, dict) else None

    @property
    def linear_best(self) -> float | None:
        """The best linear layer's test accuracy, whichever head led."""
        return self.linear_best_accuracy if self.linear_best_accuracy is not None else self.best_accuracy


@dataclass(kw_only=True)
class LowDataResult(Result):
    """probe_N_per_class.json: the low-data probe over K subsets of N labels per class."""

    labels_per_class: int = 0
    seeds: int = 0
    mean_accuracy: float = 0.0
    """Mean test accuracy with each subset's own choice of layer (what one user gets), by its own
    cross-validation."""
    std_accuracy: float = 0.0
    best_accuracy: float = 0.0
    """Mean test accuracy at the choice shared by all subsets (CV over them all)."""
    best_std: float | None = None
    best_layer: int | None = None
    best_pool: str | None = None
    pool: str = "mean"
    raw_pixel_accuracy: float = 0.0
    raw_pixel_std: float = 0.0


@dataclass(kw_only=True)
class FinetuneResult(Result):
    """finetune.json: one fine-tuning, or the mean over several subsets."""

    init: str = "pretrained"
    test_accuracy: float = 0.0
    best_epoch: int | None = None
    mean_accuracy: float | None = None
    std_accuracy: float | None = None
    accuracies: list[float] | None = None
    best_epochs: list[int] | None = None
    settings: dict[str, Any] | None = None
    """The FinetuneConfig it ran with (optimizer, lr, head, minutes, ...)."""

    def recipe(self) -> str:
        """Its optimizer and peak rate in words, e.g. " (muon, lr 0.0005)"; empty when not recorded."""
        s = self.settings or {}
        if not isinstance(s.get("lr"), int | float):
            return ""
        return f" ({s.get('optimizer', 'adamw')}, lr {s['lr']:g})"


def probe_line(res: dict[str, Any]) -> str:
    """One line that sums up a probe result: the best layer's accuracy beside raw pixels."""
    if "mean_accuracy" in res:  # low data: a user holds one subset, so each subset's own choice leads
        low = LowDataResult.from_json(res)
        return (
            f"{low.labels_per_class} labels per class: accuracy {low.mean_accuracy:.4f} (std "
            f"{low.std_accuracy:.4f}) with each subset's own choice; raw pixels "
            f"{low.raw_pixel_accuracy:.4f}; the choice shared by all subsets (layer {low.best_layer}, "
            f"{low.best_pool or low.pool} pooling) {low.best_accuracy:.4f}"
        )
    full = ProbeResult.from_json(res)
    head = f", {full.head} head" if full.head != "linear" else ""
    line = (
        f"best layer {full.best_layer}{head}: accuracy {full.best_accuracy:.4f}; "
        f"raw pixels {full.raw_pixel_accuracy:.4f}"
    )
    if full.chosen:
        c = full.chosen
        line += f"; the best on validation of every probe run ({c['probe']}) {c['test_accuracy']:.4f}"
    return line
