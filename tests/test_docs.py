"""Every command the docs show runs as written: each `igpt ...` line in README.md and docs/ parses with the
command line's own parser (flags and choices as documented), and the Python blocks of docs/api.md and the
README run top to bottom in a fresh directory."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from igpt.cli import build_parser

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(path: Path, lang: str) -> list[str]:
    """The fenced code blocks of one language in a Markdown file."""
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S)


def command_lines(path: Path) -> list[str]:
    """The igpt invocations in a file's shell blocks: continuation lines joined, comments dropped, and the
    part from `igpt` on (also after `torchrun ... -m`)."""
    out = []
    for block in blocks(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "igpt" in words:
                out.append(" ".join(words[words.index("igpt") + 1 :]))
            elif words and words[0] == "igpt":
                out.append(" ".join(words[1:]))
    return out


def test_the_docs_show_commands():
    lines = [c for p in DOCS for c in command_lines(p)]
    assert len(lines) > 40
    for cmd in ("prepare", "pretrain", "probe", "finetune", "sample", "convert", "quickstart", "serve"):
        assert any(c.split()[0] == cmd for c in lines), cmd


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_documented_command_parses(path, capsys):
    parser = build_parser()
    for cmd in command_lines(path):
        try:
            parser.parse_args(shlex.split(cmd))
        except SystemExit as e:
            pytest.fail(f"{path.name}: `igpt {cmd}` does not parse: {capsys.readouterr().err.strip()}")
            raise AssertionError from e


def test_the_python_api_page_runs_as_written(tmp_path, monkeypatch):
    """docs/api.md's blocks in order in a fresh directory (the second reads what the first wrote, as a
    notebook would), then the README's block in another."""
    monkeypatch.chdir(tmp_path)
    code = blocks(ROOT / "docs" / "api.md", "python")
    assert len(code) == 2
    scope: dict = {}
    for block in code:
        exec(compile(block, "docs/api.md", "exec"), scope)  # noqa: S102 - the docs' own code
    assert (tmp_path / "runs" / "qs" / "report.html").is_file()
    assert (tmp_path / "hf" / "r" / "config.json").is_file() and scope["done"].shape[1] == 4
    (tmp_path / "readme").mkdir()
    monkeypatch.chdir(tmp_path / "readme")
    (readme,) = blocks(ROOT / "README.md", "python")
    exec(compile(readme, "README.md", "exec"), {})  # noqa: S102
    assert (tmp_path / "readme" / "grid.png").is_file()
