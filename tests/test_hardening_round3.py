"""Hostile and broken input, round three (#49): igpt replaces only what it wrote, and the outside sweep's
other causes. One test per cause; each checks the line a user sees and that nothing of theirs is lost."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PREP = ["--resolution", "8", "--clusters", "4", "--limit", "60"]


# outside 1: --force replaces only a directory igpt wrote
def test_force_never_deletes_a_users_directory(tmp_path, cli_error):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    msg = cli_error("prepare", "digits", "--out", out, *PREP, "--force")
    assert "not a set igpt prepared" in msg and "--force" not in msg.split("igpt replaces")[0]
    assert (out / "thesis.tex").read_text() == "precious"
    # without --force the refusal does not suggest it either
    msg = cli_error("prepare", "digits", "--out", out, *PREP)
    assert "pass --force" not in msg


def test_force_never_deletes_the_source_images(folder_dir, cli_error):
    before = sorted(p.relative_to(folder_dir) for p in folder_dir.rglob("*"))
    msg = cli_error("prepare", "folder", "--data-dir", folder_dir, "--out", folder_dir, *PREP, "--force")
    assert "--data-dir" in msg
    msg = cli_error(
        "prepare", "folder", "--data-dir", folder_dir, "--out", folder_dir.parent, *PREP, "--force"
    )
    assert "--data-dir" in msg
    assert sorted(p.relative_to(folder_dir) for p in folder_dir.rglob("*")) == before


@pytest.mark.parametrize("out", ["/", ".", ".."])
def test_force_refuses_root_and_working_directory(out, tmp_path, cli_error, monkeypatch):
    (tmp_path / "keep").mkdir()
    monkeypatch.chdir(tmp_path / "keep")
    (tmp_path / "keep" / "file").write_text("x")
    msg = cli_error("prepare", "digits", "--out", out, *PREP, "--force")
    assert "choose" in msg and "pass --force" not in msg
    assert (tmp_path / "keep" / "file").read_text() == "x"


def test_force_replaces_a_prepared_set_but_not_one_holding_a_users_file(tmp_path, cli_error):
    import igpt

    out = tmp_path / "set"
    igpt.prepare("digits", out=out, resolution=8, clusters=4, limit=60)
    msg = cli_error(
        "prepare", "digits", "--out", out, "--resolution", "8", "--clusters", "5", "--limit", "60"
    )
    assert "pass --force" in msg
    meta = igpt.prepare("digits", out=out, resolution=8, clusters=5, limit=60, force=True)
    assert meta["clusters"] == 5
    (out / "notes.txt").write_text("mine")
    msg = cli_error("prepare", "digits", "--out", out, "--resolution", "8", "--clusters", "4", "--force")
    assert "not a set igpt prepared" in msg
    assert (out / "notes.txt").read_text() == "mine"


def test_force_never_deletes_a_users_partial_lookalike(folder_dir, tmp_path, cli_error):
    out = tmp_path / "set"
    work = tmp_path / ".set.partial"
    work.mkdir()
    (work / "mine.txt").write_text("x")
    msg = cli_error("prepare", "folder", "--data-dir", folder_dir, "--out", out, *PREP, "--force")
    assert "not an interrupted prepare" in msg
    assert (work / "mine.txt").read_text() == "x"
    assert not out.exists()


def test_out_as_a_file_is_refused(tmp_path, cli_error):
    f = tmp_path / "f"
    f.write_text("x")
    msg = cli_error("prepare", "digits", "--out", f, *PREP, "--force")
    assert "not a directory" in msg and f.read_text() == "x"
    assert os.path.isfile(Path(f))
