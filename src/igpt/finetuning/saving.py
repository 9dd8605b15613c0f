"""A fine-tuned run on disk: written whole in a temporary directory (weights of backbone and head, run.json
of kind finetuned, finetune.json), and opened again as backbone plus head (`load_classifier`)."""

from __future__ import annotations

from pathlib import Path

from igpt.data.prepared import PreparedData
from igpt.errors import IgptError
from igpt.files import atomic_directory, save_tensors
from igpt.model.gpt import IGPTConfig
from igpt.runs import Run

from .classifier import Classifier


def save_finetuned(
    out: Path,
    state: dict,
    pretrained: Run,
    shape: IGPTConfig,
    num_classes: int,
    data: PreparedData,
    result: dict,
    pool: str,
) -> None:
    """FTRUN: model.safetensors (backbone.*, head.* and the feature statistics), run.json (a "finetuned"
    run: the backbone's shape, the classes, the head) and finetune.json; written in a temporary directory and
    renamed into place."""
    with atomic_directory(out) as tmp:
        save_tensors({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors")
        finetune = {
            "pretrained_run": str(pretrained.path.resolve()),
            "num_classes": num_classes,
            "class_names": data.meta.get("class_names", []),
            "head": f"linear, on the standardised {pool} pool of the final normed states",
            "pool": pool,
            "init": result["init"],
            "layer": shape.n_layer,
            "blocks_dropped": pretrained.model_config.n_layer - shape.n_layer,
        }
        Run.create(
            tmp,
            "finetuned",
            shape,
            preset=pretrained.preset,
            data_dir=str(data.dir),
            data_meta=data.meta,
            palette=data.palette,
            finetune=finetune,
        )
        Run.write_finetune_result(tmp, result)


def load_classifier(run: str | Path, device: str = "cpu") -> Classifier:
    """A fine-tuned run's backbone and head, in eval mode: `model(tokens)` gives (class logits, L_GEN)."""
    r = Run.open(run)
    if r.kind != "finetuned":
        raise IgptError(f"{run} is a {r.kind} run, not a fine-tuned one (igpt finetune makes those)")
    ft = r.info["finetune"]
    pool = ft.get("pool", "mean")  # runs written before the pool option had the mean
    model = Classifier(r.load_model(), int(ft["num_classes"]), pool, r.resolution, r.order)
    model.load_state_dict(r.finetuned_state())
    return model.to(device).eval()
