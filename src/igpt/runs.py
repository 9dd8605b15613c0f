"""The run directory: one object that owns `run.json`, the checkpoints, the palette and the data's meta, and
rebuilds the model. Pretraining creates runs; conversion from Hugging Face and fine-tuning create them too;
sampling, serving, probing, conversion and fine-tuning open them.

`run.json` (schema 2) holds:
- `schema`, `kind` ("pretrained", "converted" or "finetuned"), `igpt_version`, `created`, `command`;
- `model`: the `IGPTConfig` (the only place the model's shape lives) and `preset`, the name it came from;
- `train`: the `TrainConfig` of a pretrained run (optimisation, budget, system), else null;
- `data`: `dir` (the prepared directory, absolute; null for a converted model) and `meta` (its meta.json);
- `converted_from` (converted runs) or `finetune` (fine-tuned runs: the pretrained run, classes, head).

Weights: pretrained and converted runs keep `checkpoints/step_N/` (see `checkpoint.py`); a fine-tuned run
keeps its best epoch in `model.safetensors` (`backbone.*` plus the head). A run written before schema 2 opens
too: its record is upgraded in memory (the shape keys leave `train`), and a resume writes it back upgraded.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from igpt.model.gpt import IGPT, IGPTConfig
from igpt.training.checkpoint import (
    CKPT_DIR,
    check_shapes,
    fits,
    is_checkpoint,
    latest_readable,
    list_checkpoints,
    read_checkpoint,
)
from igpt.training.config import TrainConfig

from . import __version__
from .checks import is_whole
from .errors import IgptError
from .files import write_json_atomic
from .results import FinetuneResult, LowDataResult, PretrainSummary, ProbeResult

SCHEMA = 2
KINDS = ("pretrained", "converted", "finetuned")

# Every file of a run directory, named here only (checkpoint internals: `igpt.training.checkpoint`).
RECORD = "run.json"
"""The run's record (see the module's docstring)."""
SUMMARY = "summary.json"
"""A pretraining's summary: steps, losses, tokens/s, finished."""
METRICS = "metrics.jsonl"
"""A pretraining's rows: one JSON object per logged step."""
FINETUNE = "finetune.json"
"""A fine-tuned run's result."""
LATEST_PROBE = "probe"
"""probe.json/png: the latest probe (the quickstart keeps its full probe there)."""
FULL_PROBE = "probe_full"
"""probe_full.json/png: the full linear probe of every layer."""
CHECKPOINTS_PROBE = "probe_checkpoints"
"""probe_checkpoints.json/png: the best-layer probe of every kept checkpoint against its val_nll."""


def low_data_stem(labels_per_class: int | str) -> str:
    """probe_N_per_class: the low-data probe with N labels per class."""
    return f"probe_{labels_per_class}_per_class"


def is_run(path: str | Path) -> bool:
    """True when `path` holds a run record."""
    return (Path(path) / RECORD).is_file()


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when it is missing, damaged, not UTF-8 or not an object."""
    try:
        obj = json.loads(path.read_text()) if path.is_file() else None
    except (ValueError, OSError):
        return None
    return obj if isinstance(obj, dict) else None


_SHAPE_KEYS = ("preset", "objective", "n_layer", "n_embd", "n_head", "bias")


def _upgrade(info: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 record (igpt before the run object) in today's form."""
    info = dict(info)
    if "num_classes" in info and "finetune" not in info:  # a fine-tuned run
        info["kind"] = "finetuned"
        info["finetune"] = {
            "num_classes": info.pop("num_classes"),
            "class_names": info.pop("class_names", []),
            "pretrained_run": None,
        }
        info.setdefault("train", None)
    elif info.get("train"):
        train = dict(info["train"])
        info["preset"] = train.get("preset")
        for k in _SHAPE_KEYS:
            train.pop(k, None)
        info["train"] = train
        info["kind"] = "pretrained"
    else:
        info["kind"] = "converted"
    info.setdefault("data", {"dir": None, "meta": {}})
    info["schema"] = SCHEMA
    return info


def _check_recorded_meta(record: Path, meta: Any) -> None:
    """Refuse a run record whose data meta is not an object or holds a resolution, class count or order that
    no prepare writes: they size sampling, probing and the report."""
    if meta is None:
        return
    if not isinstance(meta, dict):
        raise IgptError(f"{record}: data.meta must be an object, got {type(meta).__name__}")
    for key, least in (("resolution", 1), ("num_classes", 0), ("channels", 1)):
        v = meta.get(key)
        if v is not None and not is_whole(v, least):
            raise IgptError(f"{record}: data.meta.{key} must be a whole number >= {least}, got {v!r}")
    if meta.get("order", "raster") not in ("raster", "snake"):
        raise IgptError(f"{record}: data.meta.order must be raster or snake, got {meta.get('order')!r}")


@dataclass
class Run:
    """An opened run directory. `Run.open(path)` reads one; `Run.create(...)` starts one."""

    path: Path
    info: dict[str, Any]
    loaded_checkpoint: str | None = None
    """The checkpoint `load_model` last read (after any fallback past damaged ones)."""
    upgraded: bool = False
    """True when run.json was written by an older schema and upgraded in memory (`save` writes it back)."""

    # ------------------------------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path) -> Run:
        """Open a run directory (any kind, any schema); IgptError when it is not one."""
        path = Path(path)
        p = path / RECORD
        if not p.is_file():
            raise IgptError(f"{path} is not an igpt run directory (no run.json)")
        try:
            info = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise IgptError(f"{p} is not valid JSON ({e.__class__.__name__})") from None
        if not isinstance(info, dict) or not isinstance(info.get("model"), dict):
            raise IgptError(f"{p} is not an igpt run record (no model description)")
        for key in ("train", "data"):
            if info.get(key) is not None and not isinstance(info[key], dict):
                raise IgptError(f"{p} is not an igpt run record ({key} is not an object)")
        schema = info.get("schema", 1)
        if not is_whole(schema, 1):
            raise IgptError(f"{p}: 'schema' must be a whole number of at least 1, got {schema!r}")
        if schema > SCHEMA:
            raise IgptError(f"{path} was written by a newer igpt (run schema {schema}); upgrade igpt")
        if schema < SCHEMA:
            info = _upgrade(info)
        if info.get("kind") not in KINDS:
            raise IgptError(f"{p}: unknown run kind {info.get('kind')!r}")
        _check_recorded_meta(p, (info.get("data") or {}).get("meta"))
        run = cls(path, info, upgraded=schema < SCHEMA)
        run.model_config  # validates the recorded shape  # noqa: B018
        return run

    @classmethod
    def create(
        cls,
        path: str | Path,
        kind: str,
        model: IGPTConfig,
        *,
        preset: str | None = None,
        train: TrainConfig | None = None,
        data_dir: str | None = None,
        data_meta: dict[str, Any] | None = None,
        palette: np.ndarray | None = None,
        **extra: Any,
    ) -> Run:
        """Write a new run's record (and its copies of the palette and data meta) into `path`, which must
        exist. data_meta.json keeps the prepared set's whole meta; run.json records it without the prepare
        settings. `extra` goes into run.json as is (`converted_from`, `finetune`, `seed`)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        path = Path(path)
        info = {
            "schema": SCHEMA,
            "kind": kind,
            "igpt_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv),
            "preset": preset,
            "model": model.to_dict(),
            "train": None if train is None else train.to_dict(),
            "data": {
                "dir": data_dir,
                "meta": {k: v for k, v in (data_meta or {}).items() if k != "settings"},
            },
            **extra,
        }
        if palette is not None:
            np.save(path / "palette.npy", palette)
        if data_meta:
            write_json_atomic(path / "data_meta.json", data_meta)
        run = cls(path, info)
        run.save()
        return run

    def save(self) -> None:
        """Write run.json (atomically)."""
        write_json_atomic(self.path / RECORD, self.info)

    # ------------------------------------------------------------------------------------------ records
    @property
    def kind(self) -> str:
        return self.info["kind"]

    @property
    def model_config(self) -> IGPTConfig:
        known = {f.name for f in fields(IGPTConfig)}
        try:
            return IGPTConfig(**{k: v for k, v in self.info["model"].items() if k in known})
        except (TypeError, ValueError) as e:
            raise IgptError(f"{self.path}/{RECORD} records an impossible model ({e})") from None

    @property
    def train_config(self) -> TrainConfig | None:
        t = self.info.get("train")
        if not t:
            return None
        try:
            return TrainConfig(**t)
        except TypeError as e:
            raise IgptError(f"{self.path}/{RECORD} records unknown training settings ({e})") from None

    @property
    def preset(self) -> str | None:
        return self.info.get("preset")

    @property
    def data_dir(self) -> str | None:
        """The prepared directory the run was trained on (None for a converted model)."""
        return (self.info.get("data") or {}).get("dir")

    @property
    def data_meta(self) -> dict[str, Any]:
        """The prepared set's meta.json as recorded (resolution, order, classes, ...)."""
        return (self.info.get("data") or {}).get("meta") or {}

    @property
    def resolution(self) -> int:
        meta = self.data_meta
        if "resolution" in meta:
            return int(meta["resolution"])
        return int(round(self.model_config.n_positions**0.5))

    @property
    def order(self) -> str:
        return self.data_meta.get("order", "raster")

    def palette(self) -> np.ndarray:
        """(K, C) colours on the 0-255 scale; IgptError when the run has none."""
        p = self.path / "palette.npy"
        if not p.is_file():
            raise IgptError(f"{self.path} has no palette.npy, so its tokens cannot be decoded into images")
        try:
            a = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise IgptError(f"cannot read {p} ({e.__class__.__name__})") from None
        K = self.model_config.vocab_size
        if not (a.ndim == 2 and a.shape[1] in (1, 3) and a.dtype.kind in "fiu"):
            raise IgptError(f"{p} must be a numeric (K, 1) or (K, 3) palette, got {a.dtype} {a.shape}")
        if a.shape[0] != K:
            raise IgptError(f"{p} holds {a.shape[0]} colours but run.json's vocab_size is {K}; they disagree")
        if not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 255.0001):
            raise IgptError(f"{p} must hold finite colours on the 0-255 scale")
        channels = (self.data_meta or {}).get("channels")
        if isinstance(channels, int) and channels != a.shape[1]:
            raise IgptError(f"{p} has {a.shape[1]} channel(s) but the run's data has {channels}")
        return a

    def summary(self) -> dict[str, Any] | None:
        """summary.json of a pretrained run, or None."""
        return read_json(self.path / SUMMARY)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        """Write summary.json (atomically) and return its path."""
        write_json_atomic(self.path / SUMMARY, summary)
        return self.path / SUMMARY

    @property
    def metrics_file(self) -> Path:
        """metrics.jsonl, which pretraining appends a row to every `log_interval` steps."""
        return self.path / METRICS

    # ------------------------------------------------------------------------------------------ results
    def probe_file(self, stem: str, suffix: str = ".json") -> Path:
        """A probe's file: `stem` is LATEST_PROBE, FULL_PROBE, CHECKPOINTS_PROBE or `low_data_stem(N)`."""
        return self.path / f"{stem}{suffix}"

    def write_probe(self, stem: str, result: dict[str, Any], latest: bool = True) -> None:
        """Write a probe's result as `stem`.json, and (with `latest`) as probe.json, the latest probe."""
        write_json_atomic(self.probe_file(stem), result)
        if latest and stem != LATEST_PROBE:
            write_json_atomic(self.probe_file(LATEST_PROBE), result)

    def probe_result(self, stem: str = LATEST_PROBE) -> dict[str, Any] | None:
        """A probe's result (see `probe_file`), or None when it is missing or damaged."""
        return read_json(self.probe_file(stem))

    def pretrain_summary(self) -> PretrainSummary | None:
        """summary.json, typed."""
        s = self.summary()
        return None if s is None else PretrainSummary.from_json(s)

    def full_probe(self) -> ProbeResult | None:
        """probe_full.json, typed."""
        r = self.probe_result(FULL_PROBE)
        return None if r is None else ProbeResult.from_json(r)

    def low_data_probes(self) -> list[LowDataResult]:
        """Every low-data probe, typed, fewest labels first."""
        return [LowDataResult.from_json(r) for _, r in self.low_data_results()]

    def finetuned(self) -> FinetuneResult | None:
        """finetune.json, typed."""
        r = self.finetune_result()
        return None if r is None else FinetuneResult.from_json(r)

    def low_data_results(self) -> list[tuple[int, dict[str, Any]]]:
        """(labels per class, result) of every low-data probe in the run, fewest labels first."""
        out = []
        for p in self.path.glob(low_data_stem("*") + ".json"):
            n = p.name.split("_")[1]
            res = read_json(p)
            if n.isdigit() and res is not None:
                out.append((int(n), res))
        return sorted(out, key=lambda t: t[0])

    def finetune_result(self) -> dict[str, Any] | None:
        """A fine-tuned run's finetune.json, or None."""
        return read_json(self.path / FINETUNE)

    @staticmethod
    def write_finetune_result(directory: Path, result: dict[str, Any]) -> None:
        """Write finetune.json into `directory` (a fine-tuned run being assembled)."""
        write_json_atomic(Path(directory) / FINETUNE, result)

    @property
    def finished(self) -> bool:
        """True unless this is a pretraining that has not reached its budget."""
        if self.kind != "pretrained":
            return True
        s = self.summary()
        return bool(s and s.get("finished"))

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return list_checkpoints(self.path)

    # ------------------------------------------------------------------------------------------ weights
    def _weights(self, checkpoint: str | None) -> dict[str, torch.Tensor]:
        if self.kind == "finetuned":
            if checkpoint is not None:
                raise IgptError("a fine-tuned run keeps one set of weights; drop --checkpoint")
            return {
                k[len("backbone.") :]: v
                for k, v in self.finetuned_state().items()
                if k.startswith("backbone.")
            }
        shapes = self.tensor_shapes()
        if checkpoint is not None:
            path = self.path / CKPT_DIR / checkpoint
            if not path.is_dir():
                path = Path(checkpoint)
            own = (self.path / CKPT_DIR).resolve()
            if not is_checkpoint(path) or path.resolve().parent != own:  # another run's weights are not this
                names = ", ".join(p.name for p in list_checkpoints(self.path)[-3:]) or "none"
                raise IgptError(f"no checkpoint {checkpoint} in {self.path} (its latest: {names})")
            self.loaded_checkpoint = path.name
            return read_checkpoint(path, shapes)[0]
        saved = list_checkpoints(self.path)
        if saved and not any(fits(p, shapes) for p in saved):  # the record, not the weights, is off
            check_shapes(saved[-1] / "model.safetensors", shapes)
        found = latest_readable(self.path, expected=shapes)
        if found is None:
            raise IgptError(f"{self.path} has no readable checkpoint")
        self.loaded_checkpoint = found[0].name
        return found[1]

    def tensor_shapes(self) -> dict[str, torch.Size]:
        """The shape of every tensor of the run's model, computed without allocating it."""
        with torch.device("meta"):
            return {k: v.shape for k, v in IGPT(self.model_config).state_dict().items()}

    def finetuned_state(self) -> dict[str, torch.Tensor]:
        """Every tensor of a fine-tuned run's model.safetensors (backbone.*, head.*, feature statistics)."""
        p = self.path / "model.safetensors"
        try:
            return load_file(p)
        except (OSError, SafetensorError) as e:
            raise IgptError(f"{p} is damaged or missing ({e.__class__.__name__})") from None

    def load_model(self, checkpoint: str | None = None, device: str | torch.device = "cpu") -> IGPT:
        """The model with the latest (or the named) checkpoint's weights, in eval mode, on `device`. A
        fine-tuned run gives its fine-tuned backbone."""
        weights = self._weights(checkpoint)  # checked against the record's shapes before anything is built
        model = IGPT(self.model_config)
        try:
            missing, unexpected = model.load_state_dict(weights, strict=False)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1].strip()
            raise IgptError(f"the weights of {self.path} do not fit its model ({first[:200]})") from None
        if missing or unexpected:
            raise IgptError(
                f"the weights of {self.path} do not fit its model: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
        return model.to(device).eval()


def load_run(run: str | Path, checkpoint: str | None = None) -> IGPT:
    """The model of a run directory (pretrained, converted or fine-tuned) with its latest (or the named)
    checkpoint's weights, in eval mode, on CPU."""
    return Run.open(run).load_model(checkpoint)


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The rows of RUN/metrics.jsonl that read as rows (JSON objects with an integer step), in file order;
    damaged bytes and lines cut by a kill are skipped. Empty when the file is missing."""
    p = Path(run) / METRICS
    if not p.is_file():
        return []
    rows = []
    for line in p.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        step = row.get("step") if isinstance(row, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):
            rows.append(row)
    return rows
