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

The package by stage: data (images -> tokens on disk) -> model -> training -> runs (the run directory)
-> probes / finetuning / generation / serving, and pipeline (the quickstart) over all of them; see
docs/architecture.md. Names resolve on first use, so `import igpt` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "prepare": "data.preparation",
    "pretrain": "training.pretrain",
    "probe": "probes.probing",
    "finetune": "finetuning.finetune",
    "sample": "generation.sample",
    "convert_from_hf": "convert",
    "convert_to_hf": "convert",
    "quickstart": "pipeline.quickstart",
    "load_run": "runs",
    "Run": "runs",
    "complete": "generation.complete",
    "generate": "model.decoding",
    "load_classifier": "finetuning.saving",
    "IGPT": "model.gpt",
    "IGPTConfig": "model.gpt",
    "IgptError": "errors",
    "PrepareConfig": "data.preparation",
    "TrainConfig": "training.config",
    "ModelChoice": "training.config",
    "ProbeConfig": "probes.setup",
    "FinetuneConfig": "finetuning.config",
    "SampleConfig": "generation.sample",
    "QuickstartOptions": "pipeline.plans",
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
