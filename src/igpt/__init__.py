"""igpt: Image GPT (Chen et al., ICML 2020) in plain PyTorch: prepare token sets, pretrain AR or BERT
transformers on pixels, probe and fine-tune their features, and complete images.

Every stage is one call, with keyword arguments named as the command's flags, returning what the command
writes as JSON:

    meta = igpt.prepare("digits", out="runs/d", resolution=8, clusters=8)
    summary = igpt.pretrain(data="runs/d", out="runs/r", preset="micro", steps=40)
    result = igpt.probe("runs/r")
    ft = igpt.finetune("runs/r", out="runs/ft", epochs=1)
    igpt.sample("runs/r", out="grid.png", num=2)
    model = igpt.load_run("runs/ft")

The pipeline in module names: preparation -> data (tokens on disk) -> training -> runs (the run directory)
-> probing / finetuning / sampling / serve. Names resolve on first use, so `import igpt` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "prepare": "preparation",
    "pretrain": "training",
    "probe": "probing",
    "finetune": "finetuning",
    "sample": "sampling",
    "convert_from_hf": "convert",
    "convert_to_hf": "convert",
    "quickstart": "pipeline",
    "load_run": "runs",
    "Run": "runs",
    "complete": "generation",
    "generate": "decoding",
    "load_classifier": "finetuning",
    "IGPT": "model",
    "IGPTConfig": "model",
    "IgptError": "errors",
    "PrepareConfig": "preparation",
    "TrainConfig": "config",
    "ModelChoice": "config",
    "ProbeConfig": "probe_setup",
    "FinetuneConfig": "finetuning",
    "SampleConfig": "sampling",
    "QuickstartOptions": "plans",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'igpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
