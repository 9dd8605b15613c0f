"""Checkpoints: safetensors for tensors, JSON for everything else, never pickle (the run directory around
them is `runs.Run`).

A run keeps `checkpoints/step_NNNNNNNN/` with `model.safetensors`, `optimizer.safetensors` (AdamW
moments and the RNG state) and `state.json`. Each checkpoint is written into a hidden temporary directory and
renamed into place, so a crash while writing leaves the previous checkpoints intact; `state.json` is written
last and marks a checkpoint complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from igpt.errors import IgptError
from igpt.files import disk_errors, fsync_dir, save_tensors

CKPT_DIR = "checkpoints"


STEP_NAME = re.compile(r"step_[0-9]{1,12}")
"""A checkpoint directory's name: step_ and the step (other names in checkpoints/ are ignored)."""


STATE = "state.json"
"""A checkpoint's step, losses and elapsed time; written last, so its presence marks a complete checkpoint."""


def is_checkpoint(path: Path) -> bool:
    """True when `path` is a complete checkpoint directory."""
    return path.is_dir() and (path / STATE).is_file()


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json, checked (a JSON object with a step of 0 or more); IgptError otherwise."""
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, ValueError) as e:
        raise IgptError(f"checkpoint {path} is damaged ({e.__class__.__name__}: {e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0:
        raise IgptError(f"checkpoint {path} is damaged (state.json is not a checkpoint state)")
    return state


def list_checkpoints(run: str | Path) -> list[Path]:
    """Complete checkpoints of a run (those with a state.json), oldest first."""
    d = Path(run) / CKPT_DIR
    try:
        if not d.is_dir():
            return []
        entries = list(d.iterdir())
    except OSError:  # a symlink loop or an unreadable directory: no checkpoints to read
        return []
    found = [p for p in entries if STEP_NAME.fullmatch(p.name) and not p.is_symlink() and is_checkpoint(p)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def check_writable(run: str | Path) -> None:
    """Make sure RUN/checkpoints is a directory that a checkpoint can be written into, before any step is
    trained (a symlink loop or a file in its place would otherwise fail the first save after the work)."""
    d = Path(run) / CKPT_DIR
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".tmp-check-{os.getpid()}"
        probe.mkdir(exist_ok=True)
        probe.rmdir()
    except OSError as e:
        raise IgptError(f"cannot write checkpoints into {d} ({e.strerror or e})") from None


def clean_partial(run: str | Path) -> None:
    """Remove temporary checkpoint directories left by a process that died while writing one."""
    d = Path(run) / CKPT_DIR
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str = "opt") -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter state flattened to `{prefix}.{index}.{name}` tensors for safetensors
    (AdamW's under `opt`, Muon's under `muon`)."""
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            out[f"{prefix}.{i}.{k}"] = t.detach().cpu().contiguous()
    return out


def load_optimizer_tensors(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str = "opt"
) -> None:
    """Load what `optimizer_tensors(opt, prefix)` wrote into `opt` (same parameters, same order)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith(prefix + "."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = t
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)


def save_checkpoint(
    run: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    extra_tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: set[int],
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step` atomically, then prune: the newest `keep_last` (so a damaged latest still
    leaves one that loads) and the steps in `keep` stay."""
    d = Path(run) / CKPT_DIR
    final = d / f"step_{step:08d}"
    tmp = d / f".tmp-step_{step:08d}-{os.getpid()}"
    needed = sum(t.numel() * t.element_size() for t in [*model_state.values(), *extra_tensors.values()])
    try:
        with disk_errors(final / "model.safetensors", needed):
            d.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_tensors(
                {k: v.detach().cpu().contiguous() for k, v in model_state.items()}, tmp / "model.safetensors"
            )
            save_tensors(extra_tensors, tmp / "optimizer.safetensors")
            with open(tmp / STATE, "w") as f:
                json.dump(state, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            for name in ("model.safetensors", "optimizer.safetensors"):
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            fsync_dir(d)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint must not keep the disk full
        raise
    ckpts = list_checkpoints(run)
    for p in ckpts[:-keep_last]:
        if int(p.name[5:]) not in keep:
            shutil.rmtree(p, ignore_errors=True)
    return final


def read_checkpoint(
    path: Path, expected: dict[str, torch.Size] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Model tensors, optimizer/RNG tensors and state of one checkpoint; IgptError if any file is damaged, or
    (with `expected`, the model's tensor shapes) if its tensors do not fit the model."""
    state = read_state(path)
    if expected is not None:  # the header's shapes first: a run.json that disagrees allocates nothing
        check_shapes(path / "model.safetensors", expected)
    try:
        model = load_file(path / "model.safetensors")
        extra = (
            load_file(path / "optimizer.safetensors") if (path / "optimizer.safetensors").is_file() else {}
        )
    except (OSError, json.JSONDecodeError, SafetensorError, ValueError) as e:
        raise IgptError(f"checkpoint {path} is damaged ({e.__class__.__name__}: {e})") from None
    if expected is not None:
        missing = sorted(set(expected) - set(model))
        wrong = [k for k in expected if k in model and model[k].shape != expected[k]]
        if missing or wrong:
            what = f"missing {missing[:2]}" if missing else f"{wrong[0]} is {tuple(model[wrong[0]].shape)}"
            raise IgptError(f"checkpoint {path} does not fit the run's model ({what})")
    return model, extra, state


RECORD_FIELD = {"wte.weight": "vocab_size", "lm_head.weight": "vocab_size", "wpe.weight": "n_positions"}
"""The field of run.json's model that sets each tensor's first dimension (the rest: n_embd, n_layer)."""


def header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a safetensors file, read from its header alone (no tensor is loaded)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    except (OSError, SafetensorError, ValueError) as e:
        raise IgptError(f"{path} is damaged ({e.__class__.__name__}: {e})") from None


class ShapeMismatch(IgptError):
    """Weights whose shapes are not the ones a run's record describes (as opposed to a damaged file)."""


def fits(path: Path, expected: dict[str, torch.Size]) -> bool:
    """Whether the checkpoint at `path` has the shapes `expected` (a damaged one counts as fitting: reading
    it will say what is wrong)."""
    try:
        check_shapes(path / "model.safetensors", expected)
    except ShapeMismatch:
        return False
    except IgptError:
        return True
    return True


def check_shapes(path: Path, expected: dict[str, torch.Size]) -> None:
    """Refuse, naming the first tensor and the record's field, weights whose shapes (from the header) do not
    fit the model that `expected` describes."""
    found = header_shapes(path)
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ShapeMismatch(f"checkpoint {path.parent} does not fit the run's model (missing {missing[:2]})")
    for k, shape in expected.items():
        if tuple(shape) != found[k]:
            field = RECORD_FIELD.get(k, "n_embd")
            raise ShapeMismatch(
                f"checkpoint {path.parent} does not fit the run's model: {k} is {found[k]} there, "
                f"{tuple(shape)} by the run's record (run.json's {field} disagrees with the weights)"
            )


def latest_readable(run: str | Path, quiet: bool = False, expected: dict[str, torch.Size] | None = None):
    """The newest checkpoint that reads cleanly (and fits `expected` shapes, when given), falling back past
    damaged ones with a warning. Returns (path, model tensors, extra tensors, state) or None when the run has
    no checkpoint that reads."""
    for path in reversed(list_checkpoints(run)):
        try:
            return (path, *read_checkpoint(path, expected))
        except IgptError as e:
            if not quiet:
                print(f"igpt: warning: {e}; using the previous checkpoint", file=sys.stderr)
    return None
