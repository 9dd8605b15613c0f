"""igpt as a library: every stage as one `igpt.*` call (the notebook path), the run-directory object for
every kind of run and for records written before it, one-line errors as exceptions, and the package's
layout (imports run one way: command line -> stages -> model and data)."""

import ast
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
def _module_imports(path: Path) -> set[str]:
    """igpt modules that `path` imports, at module level or inside functions (a lazy import still makes the
    modules depend on each other)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("igpt."):
            found.add(node.module.split(".")[1])
    return found


def test_imports_run_one_way_without_cycles():
    modules = {p.stem: p for p in SRC.glob("*.py") if p.stem not in ("__init__", "__main__")}
    graph = {m: _module_imports(p) & set(modules) for m, p in modules.items()}
    importers_of_cli = [m for m, deps in graph.items() if "cli" in deps]
    assert importers_of_cli == [], f"library modules import the command line: {importers_of_cli}"
    for m, p in modules.items():
        if m != "cli":
            assert "argparse" not in p.read_text(), f"{m}.py uses argparse; only cli.py parses flags"
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, f"import cycle: {' -> '.join([*path, m, d])}"
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


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
