"""igpt as a library: every stage as one `igpt.*` call (the notebook path), the run-directory object for
every kind of run and for records written before it, one-line errors as exceptions, and the package's
layout (imports run one way: command line -> stages -> model and data)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import igpt
from igpt.errors import IgptError
from igpt.runs import Run

SRC = Path(igpt.__file__).parent


def test_notebook_pipeline_through_library_calls(tmp_path):
    meta = igpt.prepare("digits", tmp_path / "d", resolution=8, clusters=8)
    assert meta["n_train"] > 0 and meta["clusters"] == 8
    summary = igpt.pretrain(
        data=tmp_path / "d",
        out=tmp_path / "r",
        preset="micro",
        steps=20,
        batch_size=16,
        eval_images=32,
        progress=False,
    )
    assert summary["steps"] == 20 and summary["val_nll"] < 2.0794 and summary["finished"]
    assert summary == json.loads((tmp_path / "r" / "summary.json").read_text())
    result = igpt.probe(tmp_path / "r", progress=False)
    assert result == json.loads((tmp_path / "r" / "probe.json").read_text())
    assert set(result["layers"]) == {"0", "1", "2"} and result["best_accuracy"] > 0.3
    ft = igpt.finetune(tmp_path / "r", out=tmp_path / "ft", epochs=1, progress=False)
    assert ft == json.loads((tmp_path / "ft" / "finetune.json").read_text()) and ft["best_epoch"] in (0, 1)
    s = igpt.sample(tmp_path / "r", out=tmp_path / "grid.png", num=2, count=2)
    assert Path(s["png"]).is_file() and s["rows"] == 2 and s["new_tokens"] == 2 * 2 * 32
    # a fine-tuned run opens as a run: its backbone is the fine-tuned one, and its head comes with it
    run = Run.open(tmp_path / "ft")
    assert run.kind == "finetuned" and run.info["finetune"]["num_classes"] == 10
    backbone = igpt.load_run(tmp_path / "ft")
    stored = load_file(tmp_path / "ft" / "model.safetensors")
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, stored[f"backbone.{k}"]), k
    clf = igpt.load_classifier(tmp_path / "ft")
    logits, _ = clf(torch.randint(0, 8, (3, 64)))
    assert logits.shape == (3, 10)


def test_library_errors_are_one_line_exceptions(micro_run, tmp_path):
    data = micro_run.parent / "data"
    with pytest.raises(IgptError, match="n_embd 33 is not divisible by n_head"):
        igpt.pretrain(data=data, out=tmp_path / "bad", n_embd=33, n_head=4, steps=2)
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    with pytest.raises(IgptError, match="unknown --pool"):
        igpt.probe(micro_run, pool="bogus")
    with pytest.raises(IgptError, match="--top-k must be 0"):
        igpt.sample(micro_run, out=tmp_path / "x.png", top_k=-1)
    with pytest.raises(TypeError, match="unknown settings"):
        igpt.finetune(micro_run, out=tmp_path / "ft", bogus=1)
    with pytest.raises(IgptError, match="not an igpt run directory"):
        igpt.load_run(tmp_path)
    assert isinstance(IgptError("x"), ValueError)


def test_resume_keeps_the_model_config(micro_run, tmp_path):
    data = micro_run.parent / "data"
    igpt.pretrain(
        data=data, out=tmp_path / "r", preset="micro", steps=4, batch_size=16, eval_images=16, progress=False
    )
    with pytest.raises(IgptError, match="must keep the run's model .*preset 'micro' -> 'tiny'"):
        igpt.pretrain(out=tmp_path / "r", preset="tiny", steps=8, resume=True)
    s = igpt.pretrain(out=tmp_path / "r", preset="micro", steps=8, resume=True, progress=False)
    assert s["steps"] == 8
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["schema"] == 2 and info["preset"] == "micro" and "n_layer" not in info["train"]
    assert info["model"]["n_layer"] == 2 and info["train"]["steps"] == 8


def test_a_run_from_before_the_run_object_opens_and_resumes(micro_run, tmp_path):
    data = micro_run.parent / "data"
    igpt.pretrain(
        data=data, out=tmp_path / "r", preset="micro", steps=4, batch_size=16, eval_images=16, progress=False
    )
    p = tmp_path / "r" / "run.json"
    info = json.loads(p.read_text())
    old = {k: v for k, v in info.items() if k not in ("schema", "kind", "preset")}  # schema 1 had neither
    old["train"] = {
        **info["train"],
        "preset": "micro",
        "objective": "ar",
        "n_layer": None,
        "n_embd": None,
        "n_head": None,
        "bias": False,
    }
    p.write_text(json.dumps(old))
    run = Run.open(tmp_path / "r")
    assert run.kind == "pretrained" and run.preset == "micro" and run.train_config.steps == 4
    assert igpt.load_run(tmp_path / "r").config.n_layer == 2
    s = igpt.pretrain(out=tmp_path / "r", steps=6, resume=True, progress=False)
    assert s["steps"] == 6 and json.loads(p.read_text())["schema"] == 2


# ---------------------------------------------------------------------------------------------- layout
def _code_metrics():
    import importlib.util

    path = Path(__file__).parents[1] / "scripts" / "code_metrics.py"
    spec = importlib.util.spec_from_file_location("code_metrics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_imports_run_one_way_without_cycles():
    """Subpackages import only those below them (data < model < training < probes < finetuning <
    generation < serving < pipeline), base modules import no subpackage, nothing but __main__ imports the
    CLI, only the CLI parses flags, and no import cycle exists (lazy imports counted)."""
    cm = _code_metrics()
    known = cm.modules(SRC)
    assert len(known) > 40
    assert cm.upward_imports(known) == []
    assert cm.cycles(known) == []
    for name, path in known.items():
        if name != "igpt.cli":
            assert "import argparse" not in path.read_text(), (
                f"{name} uses argparse; only cli.py parses flags"
            )


def test_the_layering_check_catches_an_upward_import(tmp_path):
    """The check above can fail: a data module importing the quickstart, and a cycle, are both found."""
    cm = _code_metrics()
    pkg = tmp_path / "igpt"
    for rel, text in {
        "__init__.py": "",
        "errors.py": "",
        "data/__init__.py": "",
        "data/sources.py": "from igpt.pipeline.quickstart import x\n",
        "pipeline/__init__.py": "",
        "pipeline/quickstart.py": "from igpt.data.sources import y\n",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    known = cm.modules(pkg)
    assert cm.upward_imports(known) == ["igpt.data.sources -> igpt.pipeline.quickstart"]
    assert cm.cycles(known)


def test_every_stage_is_a_top_level_call():
    for name in (
        "prepare",
        "pretrain",
        "probe",
        "finetune",
        "sample",
        "convert_from_hf",
        "convert_to_hf",
        "quickstart",
        "load_run",
        "complete",
    ):
        assert callable(getattr(igpt, name)), name


def test_every_stage_takes_its_config_or_its_fields_by_name(tmp_path):
    """The keyword form builds the same config as the object form, and refuses what the config refuses."""
    for call in (
        lambda: igpt.quickstart(tmp_path / "q", minutes=-1),
        lambda: igpt.quickstart(igpt.QuickstartOptions(out=str(tmp_path / "q"), minutes=-1)),
    ):
        with pytest.raises(igpt.IgptError, match="--minutes must be positive"):
            call()
    with pytest.raises(igpt.IgptError, match="unknown --pool"):
        igpt.probe(tmp_path / "r", pool="max")
    with pytest.raises(TypeError, match="unknown settings"):
        igpt.finetune(tmp_path / "r", out=tmp_path / "ft", learning_rate=1.0)
    with pytest.raises(TypeError, match="unknown settings"):
        igpt.pretrain(tmp_path / "d", tmp_path / "r", step=3)
    assert not (tmp_path / "q").exists() and not (tmp_path / "ft").exists()
