"""Hostile and broken input, round three (#49): igpt replaces only what it wrote, and the outside sweep's
other causes. One test per cause; each checks the line a user sees and that nothing of theirs is lost."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import igpt

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


# README 2: igpt finetune's defaults are the measured recipe, the head where the probe chose it
def test_finetune_defaults_are_the_recipe_with_the_head_from_the_probe(digits, tmp_path, capsys):
    import json

    from igpt.finetuning.config import MUON_LR

    MICRO = dict(preset="micro", batch_size=16, eval_images=16, progress=False)
    igpt.pretrain(data=digits, out=tmp_path / "r", steps=6, **MICRO)
    capsys.readouterr()
    ft = igpt.finetune(tmp_path / "r", out=tmp_path / "ft0", epochs=1, progress=False)
    assert "the head reads the final layer with mean pooling, the run has no probe" in capsys.readouterr().err
    assert ft["layer"] == 2 and ft["pool"] == "mean"
    s = ft["settings"]
    assert (s["optimizer"], s["lr"], s["augment"], s["compile"]) == ("muon", MUON_LR, False, False)
    probe = igpt.probe(tmp_path / "r", pool="grid", progress=False)
    ft = igpt.finetune(tmp_path / "r", out=tmp_path / "ft1", epochs=1, progress=False)
    want = max(1, probe["best_layer"])
    assert (ft["layer"], ft["pool"]) == (want, "grid")
    assert f"the head reads layer {want} with grid pooling, as its probe chose on validation" in (
        capsys.readouterr().err
    )
    ft = igpt.finetune(tmp_path / "r", out=tmp_path / "ft2", epochs=1, pool="mean", progress=False)
    assert (ft["layer"], ft["pool"]) == (want, "mean")  # a pooling given is kept, the layer still read
    assert json.loads((tmp_path / "ft2" / "finetune.json").read_text())["world_size"] == 1


# README 3: --minutes bounds the whole command, set-up included, and the split is said
def test_finetune_minutes_bound_the_whole_command(digits, tmp_path, capsys):
    from igpt.cli import main

    igpt.pretrain(data=digits, out=tmp_path / "r", steps=4, preset="micro", batch_size=16, progress=False)
    capsys.readouterr()
    main(["finetune", str(tmp_path / "r"), "--out", str(tmp_path / "ft"), "--minutes", "0.2"])
    main(
        [
            "finetune",
            str(tmp_path / "r"),
            "--out",
            str(tmp_path / "low"),
            "--minutes",
            "0.2",
            "--epochs",
            "1000",
            "--labels-per-class",
            "5",
            "--seeds",
            "3",
        ]
    )
    out = capsys.readouterr().out
    assert out.count("of 0.2 min: set-up") == 2
    for name in ("ft", "low"):
        import json

        r = json.loads((tmp_path / name / "finetune.json").read_text())
        assert r["seconds_total"] <= 12 + 3, r["seconds_total"]  # the budget, and the save's few seconds
        parts = [s["seconds_split"] for s in r.get("subsets", [r])]
        assert sum(p["set_up"] + p["training"] + p["test"] for p in parts) <= r["seconds_total"] + 0.5


# README 4: downsampled-ImageNet or CIFAR batches whose labels are numpy scalars
def test_batches_with_numpy_scalar_labels_are_read_and_other_objects_refused(cifar_dir, tmp_path, cli_error):
    import pickle

    import numpy as np

    from igpt.data.decode import unpickle
    from igpt.errors import IgptError

    for i in range(1, 6):  # labels written as list(labels_array): numpy integers, not Python ints
        p = cifar_dir / f"data_batch_{i}"
        d = pickle.loads(p.read_bytes())
        d[b"labels"] = list(np.asarray(d[b"labels"], dtype=np.int64))
        p.write_bytes(pickle.dumps(d))
    meta = igpt.prepare(
        "cifar10", data_dir=cifar_dir, out=tmp_path / "c", resolution=8, clusters=8, progress=False
    )
    assert meta["n_train"] + meta["n_val"] > 0
    bad = tmp_path / "bad"
    bad.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [np.str_("cat")] * 2}))
    with pytest.raises(IgptError, match="refusing to load a numpy scalar"):
        unpickle(bad)


# outside 2: a tampered run record is compared with the weights' header before anything is built
@pytest.mark.parametrize("field, value", [("n_positions", 100_000_000), ("vocab_size", 9), ("n_embd", 4096)])
def test_a_tampered_run_record_is_refused_before_allocating(micro_run, tmp_path, cli_error, field, value):
    import json
    import resource
    import shutil

    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    info = json.loads((run / "run.json").read_text())
    info["model"][field] = value
    if field == "n_embd":
        info["model"]["n_head"] = 2
    (run / "run.json").write_text(json.dumps(info))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    msg = cli_error("sample", run, "--out", tmp_path / "g.png", "--num", "1")
    if field == "vocab_size":  # the palette is read first: it names the same disagreement
        assert "vocab_size is 9" in msg and "disagree" in msg
    else:
        assert "does not fit the run's model" in msg and "disagrees with the weights" in msg
    assert "no readable checkpoint" not in msg
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing was built
    assert not (tmp_path / "g.png").exists()


# outside 6 and 7: flags bounded by what they can mean, one line each, nothing written
@pytest.mark.parametrize(
    "argv, expect",
    [
        (["pretrain", "--data", "D", "--out", "O", "--lr", "1e39"], "--lr must be positive and at most 10"),
        (
            ["pretrain", "--data", "D", "--out", "O", "--optimizer", "muon", "--adamw-lr-ratio", "1e308"],
            "--adamw-lr-ratio must be positive",
        ),
        (
            ["pretrain", "--data", "D", "--out", "O", "--minutes", "1e300"],
            "--minutes must be a positive number",
        ),
        (["finetune", "RUN", "--out", "O", "--lr", "1e39"], "--lr must be positive and at most 10"),
        (
            ["finetune", "RUN", "--out", "O", "--labels-per-class", "1", "--seeds", "100000000000"],
            "--seeds must be in [1, 1000]",
        ),
        (
            ["probe", "RUN", "--labels-per-class", "1", "--seeds", "100000000000"],
            "--seeds must be in [1, 1000]",
        ),
        (["probe", "RUN", "--mask-ensemble", "1000000"], "--mask-ensemble must be at most 100"),
        (["quickstart", "--out", "O", "--minutes", "1e308"], "--minutes must be positive and at most"),
    ],
)
def test_unbounded_flags_are_refused(argv, expect, micro_run, tmp_path, cli_error, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [str(micro_run) if a == "RUN" else str(micro_run.parent / "data") if a == "D" else a for a in argv]
    msg = cli_error(*argv)
    assert expect in msg
    assert not (tmp_path / "O").exists()


def test_a_sample_grid_too_large_is_refused_before_sampling(micro_run, tmp_path, cli_error):
    msg = cli_error(
        "sample", micro_run, "--out", tmp_path / "g.png", "--num", "1024", "--scale", "64", "--keep-rows", "7"
    )
    assert "the grid would be" in msg and "lower --num" in msg
    assert not (tmp_path / "g.png").exists()


def test_a_tiny_minutes_budget_still_trains_a_step_and_saves_it(digits, tmp_path):
    s = igpt.pretrain(
        data=digits,
        out=tmp_path / "r",
        minutes=1e-9,
        preset="micro",
        batch_size=16,
        eval_images=16,
        progress=False,
    )
    assert s["steps"] == 1 and s["finished"]
    assert igpt.load_run(tmp_path / "r") is not None  # a checkpoint exists
    p = igpt.probe(tmp_path / "r", layers="1", progress=False)
    assert p["world_size"] == 1


# outside 3: serve keeps other pages and oversized uploads out
def test_serve_refuses_other_hosts_and_origins_and_nested_json(micro_run):
    from starlette.testclient import TestClient

    from igpt.serving.app import Completer, create_app
    from igpt.serving.requests import LOOPBACK_NAMES

    c = TestClient(
        create_app(Completer(micro_run), 1 << 20, LOOPBACK_NAMES), base_url="http://127.0.0.1:8000"
    )
    assert c.get("/api/info").status_code == 200
    r = c.get("/api/info", headers={"host": "attacker.example:8000"})  # a DNS-rebound name
    assert r.status_code == 403 and "host name" in r.json()["error"]
    r = c.post("/api/complete", json={"source": "test"}, headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.json()["error"]
    r = c.post(
        "/api/complete", json={"source": "test", "num": 1}, headers={"origin": "http://127.0.0.1:8000"}
    )
    assert r.status_code == 200
    r = c.post("/api/complete", content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]


def test_serve_counts_upload_decoding_against_its_cap_and_bounds_declared_pixels(micro_run, tmp_path):
    import io

    from PIL import Image
    from starlette.testclient import TestClient

    from igpt.serving import app as serve_app

    completer = serve_app.Completer(micro_run)
    c = TestClient(serve_app.create_app(completer, 4 << 20))
    big = io.BytesIO()
    Image.new("I;16", (6000, 6000)).save(big, "PNG")  # 36 M pixels declared, a small file
    r = c.post("/api/complete", data={"source": "upload"}, files={"file": ("big.png", big.getvalue())})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    for _ in range(serve_app.MAX_CONCURRENT):  # every slot taken: an upload is refused before decoding
        completer.take_slot()
    try:
        small = io.BytesIO()
        Image.new("RGB", (16, 16)).save(small, "PNG")
        r = c.post("/api/complete", data={"source": "upload"}, files={"file": ("s.png", small.getvalue())})
        assert r.status_code == 503
    finally:
        for _ in range(serve_app.MAX_CONCURRENT):
            completer.release()
    assert c.post("/api/complete", data={"source": "test", "num": "1"}).status_code == 200  # slots given back


# outside 4: a resumed or reused prepare trusts nothing that changed
def _folder(root, n=12):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for ci, c in enumerate("ab"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            arr = (rng.integers(0, 80, (12, 12, 3)) + 100 * ci).astype(np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def test_a_finished_prepare_is_not_reused_after_its_folder_changed(tmp_path, cli_error):
    import os

    src = _folder(tmp_path / "img")
    kw = dict(data_dir=src, resolution=8, clusters=4, workers=1, progress=False)
    first = igpt.prepare("folder", out=tmp_path / "set", **kw)
    assert igpt.prepare("folder", out=tmp_path / "set", **kw)["n_train"] == first["n_train"]  # reused
    (src / "a" / "new.png").write_bytes((src / "a" / "0.png").read_bytes())
    again_cmd = (
        "prepare",
        "folder",
        "--data-dir",
        src,
        "--out",
        tmp_path / "set",
        *"--resolution 8 --clusters 4".split(),
    )
    msg = cli_error(*again_cmd)
    assert "before it changed" in msg and "--force" in msg
    again = igpt.prepare("folder", out=tmp_path / "set", force=True, **kw)
    assert again["n_train"] + again["n_val"] + again["n_test"] == 25
    # an image replaced by another of the same size is a change too (its modification time)
    p = src / "b" / "3.png"
    data = (src / "b" / "4.png").read_bytes()
    p.write_bytes(data)
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    msg = cli_error(*again_cmd)
    assert "before it changed" in msg


def test_a_refused_prepare_resumes_once_corrected_and_skipped_files_are_retried(
    tmp_path, monkeypatch, cli_error
):
    src = _folder(tmp_path / "img")
    out = tmp_path / "set"
    # every image over a tiny decoding limit: skipped, and then too few images; the chunks are kept
    monkeypatch.setenv("IGPT_MAX_IMAGE_PIXELS", "10")
    msg = cli_error(
        "prepare", "folder", "--data-dir", src, "--out", out, "--resolution", "8", "--workers", "1"
    )
    assert "too few readable images" in msg
    assert (tmp_path / ".set.partial").is_dir()
    monkeypatch.delenv("IGPT_MAX_IMAGE_PIXELS")
    # the limit lifted: the chunks that skipped files are decoded again, and a palette setting may change
    meta = igpt.prepare("folder", data_dir=src, out=out, resolution=8, clusters=4, workers=1, progress=False)
    assert meta["skipped_files"] == 0 and meta["n_train"] + meta["n_val"] + meta["n_test"] == 24
    assert not (tmp_path / ".set.partial").exists()


def test_a_prepare_refused_before_its_first_chunk_leaves_nothing(tmp_path, cli_error):
    src = _folder(tmp_path / "img")
    (src / "a" / "0.png").write_bytes(b"not an image")  # --strict: the first chunk fails
    msg = cli_error(
        "prepare",
        "folder",
        "--data-dir",
        src,
        "--out",
        tmp_path / "set",
        "--resolution",
        "8",
        "--strict",
        "--workers",
        "1",
    )
    assert "cannot read image" in msg
    assert not (tmp_path / ".set.partial").exists() and not (tmp_path / "set").exists()


# outside 8: a fine-tuning whose loss stops being finite says so and writes nothing
def test_a_diverging_fine_tuning_is_refused_without_a_result(micro_run, tmp_path, cli_error, monkeypatch):
    import torch.nn.functional as F

    from igpt.finetuning import engine as ft

    monkeypatch.setattr(ft, "F", type("F", (), {"cross_entropy": staticmethod(lambda *a, **k: torch_nan())}))
    msg = cli_error(
        "finetune", micro_run, "--out", tmp_path / "ft", "--epochs", "1", "--layer", "2", "--pool", "mean"
    )
    assert "the fine-tuning loss became nan" in msg and "lower --lr" in msg
    assert not (tmp_path / "ft").exists()
    assert F  # the real module is untouched


def torch_nan():
    import torch

    return torch.tensor(float("nan"), requires_grad=True)


# outside 7: library calls check their arguments' types as the command line does
@pytest.mark.parametrize(
    "call, expect",
    [
        (
            lambda igpt, t: igpt.prepare("digits", out=t / "d", resolution="8"),
            "--resolution must be an integer",
        ),
        (lambda igpt, t: igpt.prepare("digits", out=t / "d", clusters=2.5), "--clusters must be an integer"),
        (lambda igpt, t: igpt.pretrain(data=t, out=t / "r", steps=2.5), "--steps must be an integer"),
        (lambda igpt, t: igpt.pretrain(data=t, out=t / "r", lr="fast"), "--lr must be a number"),
        (lambda igpt, t: igpt.probe(t, train_limit=[1]), "--train-limit must be an integer"),
        (lambda igpt, t: igpt.finetune(t, out=t / "f", augment="yes"), "--augment must be true or false"),
    ],
)
def test_library_calls_refuse_wrong_types_in_one_line(tmp_path, call, expect):
    from igpt.errors import IgptError

    with pytest.raises(IgptError, match=expect):
        call(igpt, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_library_calls_take_paths_and_whole_numbers(digits, tmp_path):
    s = igpt.pretrain(
        data=digits,
        out=tmp_path / "r",
        preset="micro",
        steps=2,
        lr=1,
        batch_size=16,
        eval_images=16,
        progress=False,
    )  # a Path for data, an int for a float
    assert s["steps"] == 2


# outside 7: odd types in a run record are refused in one line
@pytest.mark.parametrize(
    "where, value, expect",
    [
        ("schema", "2", "'schema' must be a whole number"),
        ("schema", None, "'schema' must be a whole number"),
        ("schema", [2], "'schema' must be a whole number"),
        ("schema", True, "'schema' must be a whole number"),
        ("meta", [1], "data.meta must be an object"),
        ("resolution", "x", "data.meta.resolution must be a whole number >="),
        ("order", "spiral", "data.meta.order must be raster or snake"),
    ],
)
def test_odd_types_in_a_run_record_are_refused(micro_run, tmp_path, cli_error, where, value, expect):
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    info = json.loads((run / "run.json").read_text())
    if where == "schema":
        info["schema"] = value
    elif where == "meta":
        info["data"]["meta"] = value
    else:
        info["data"]["meta"][where] = value
    (run / "run.json").write_text(json.dumps(info))
    assert expect in cli_error("sample", run, "--out", tmp_path / "g.png", "--num", "1")
    assert expect in cli_error("probe", run)
    assert not (tmp_path / "g.png").exists()


@pytest.fixture(scope="module")
def hf_dir(micro_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "hf"
    igpt.convert_to_hf(micro_run, out)
    return out


# outside 7: a Hugging Face directory whose config.json disagrees with its weights, or whose
# preprocessor_config.json is damaged, is refused in one line naming what disagrees
@pytest.mark.parametrize(
    "change, expect",
    [
        ({"vocab_size": "+1"}, "wte.weight is (9, 32)"),
        ({"vocab_size": "9"}, "vocab_size must be a positive whole number, got '9'"),
        ({"n_positions": "*4"}, "wpe.weight is (64, 32)"),
        ({"n_embd": "*2"}, "the config's vocab_size or n_embd"),
        ({"n_layer": "+1"}, "weights lack h.2.ln_1.weight"),
        ({"n_layer": "-1"}, "more blocks than config.json's n_layer=1"),
        ({"n_layer": 2.0}, "n_layer must be a positive whole number"),
        ({"n_inner": 129}, "n_inner=129"),
        ("{", "preprocessor_config.json is not valid JSON"),
        ("[1]", "preprocessor_config.json is not a JSON object"),
        ('{"clusters": [[0, 0, 0], [1]]}', "triples of numbers"),
        ('{"clusters": [[0, 0], [1, 1]]}', "triples of numbers"),
        ('{"clusters": [[0, 0, 5], [1, 1, 1]]}', "finite values in [-1, 1]"),
    ],
)
def test_a_hugging_face_directory_that_disagrees_with_itself_is_refused(
    hf_dir, tmp_path, cli_error, change, expect
):
    import json
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(hf_dir, hf)
    if isinstance(change, dict):
        c = json.loads((hf / "config.json").read_text())
        for key, v in change.items():
            if isinstance(v, str) and v[0] in "+-*":
                v = {"+": c[key] + int(v[1:]), "-": c[key] - int(v[1:]), "*": c[key] * int(v[1:])}[v[0]]
            c[key] = v
        (hf / "config.json").write_text(json.dumps(c))
    else:
        (hf / "preprocessor_config.json").write_text(change)
    assert expect in cli_error("convert", "--from-hf", hf, "--out", tmp_path / "o")
    assert not (tmp_path / "o").exists()


# outside 7: Ctrl-C during `prepare --workers 2` reaches every process of the terminal's group; the workers
# leave it to the parent, which says "igpt: interrupted" once, instead of each printing a traceback
def test_decoding_workers_leave_ctrl_c_to_the_parent(tmp_path):
    import multiprocessing as mp
    import signal
    import time

    import numpy as np
    from PIL import Image

    from igpt.data import workers

    files = []
    for i in range(4):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(files[-1])
    todo = [([str(f) for f in files], 8, False, str(tmp_path / f"c{j}.npz"), [0] * 4) for j in range(6)]
    before = set(mp.active_children())
    jobs = workers.run_jobs(workers.decode_and_store, todo, 2)
    first = next(jobs)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the parent's own is back
    procs = [p for p in mp.active_children() if p not in before]
    assert len(procs) == 2
    for w in procs:
        os.kill(w.pid, signal.SIGINT)
    time.sleep(0.5)
    alive = [w.is_alive() for w in procs]
    rest = list(jobs) if all(alive) else jobs.close()
    assert all(alive), "a decoding worker died of SIGINT"
    assert first[0] == 4 and not first[2] and len(rest) == 5 and len(list(tmp_path.glob("c*.npz"))) == 6


# outside 8: a named checkpoint must be one of the run's own
def test_another_runs_checkpoint_is_refused(micro_run, tmp_path, cli_error):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(micro_run, other)
    ckpt = sorted((other / "checkpoints").iterdir())[-1]
    msg = cli_error("sample", micro_run, "--checkpoint", ckpt, "--out", tmp_path / "g.png", "--num", "1")
    assert f"no checkpoint {ckpt} in {micro_run}" in msg and "its latest: step_" in msg
    igpt.sample(micro_run, out=tmp_path / "g.png", num=1, checkpoint=ckpt.name)  # its own, by name
    assert (tmp_path / "g.png").is_file()


# outside 8: a second quickstart into one directory asks for the same data and model, or is refused
def test_a_quickstart_with_another_preset_is_refused_in_a_finished_ones_directory(tmp_path, cli_error):
    import json

    from igpt.pipeline.plans import QuickstartOptions, make_plan

    out = tmp_path / "qs"
    out.mkdir()
    plan, _ = make_plan(QuickstartOptions(smoke=True, dataset="digits"))
    recorded = {"plan": {**plan.__dict__, "preset": "tiny"}, "done": ["prepare", "pretrain"], "seconds": {}}
    (out / "quickstart.json").write_text(json.dumps(recorded))
    msg = cli_error("quickstart", "--smoke", "--dataset", "digits", "--out", out)
    assert "holds a quickstart with preset 'tiny', not 'micro'; give --preset tiny to resume it" in msg
    assert (out / "quickstart.json").read_text() == json.dumps(recorded)  # untouched
    assert sorted(p.name for p in out.iterdir()) == ["quickstart.json"]


# outside 8: the digits are 8x8: a smaller side is used, a larger one refused, never silently replaced
def test_the_digits_quickstart_keeps_a_small_resolution_and_refuses_a_large_one(tmp_path, cli_error):
    from igpt.pipeline.plans import QuickstartOptions, make_plan

    assert make_plan(QuickstartOptions(smoke=True, dataset="digits", resolution=4))[0].resolution == 4
    assert make_plan(QuickstartOptions(dataset="digits"))[0].resolution == 8
    msg = cli_error("quickstart", "--dataset", "digits", "--resolution", "12", "--out", tmp_path / "q")
    assert "--resolution must be at most 8 for the digits (8x8 images), got 12" in msg
    assert not (tmp_path / "q").exists()


# outside 9: two prepares or two fine-tunings into one --out: the second is refused at once, in one line
def test_a_second_prepare_or_fine_tuning_into_the_same_out_is_refused(micro_run, tmp_path, cli_error):
    from igpt.files import exclusive

    with exclusive(tmp_path / "d", "preparing"):
        msg = cli_error("prepare", "digits", *PREP, "--out", tmp_path / "d")
        assert (
            msg == f"igpt: error: another igpt process is preparing {tmp_path / 'd'}; wait for it to finish"
        )
    with exclusive(tmp_path / "ft", "fine-tuning into"):
        msg = cli_error("finetune", micro_run, "--out", tmp_path / "ft", "--epochs", "1")
        assert "another igpt process is fine-tuning into" in msg
    assert not (tmp_path / "d").exists() and not (tmp_path / "ft").exists()
    assert not list(tmp_path.glob(".*.lock"))  # released and removed
    igpt.prepare("digits", out=tmp_path / "d", resolution=8, clusters=4, limit=60, progress=False)
    assert not list(tmp_path.glob(".*"))


# outside 9: weight files follow the umask like every other file of a run (safetensors writes 0600)
def test_weight_files_have_the_same_mode_as_the_rest_of_the_run(micro_run, tmp_path):
    import stat

    def modes(d: Path) -> set[int]:
        return {stat.S_IMODE(p.stat().st_mode) for p in d.rglob("*") if p.is_file() and p.name != ".lock"}

    assert len(modes(micro_run)) == 1
    igpt.convert_to_hf(micro_run, tmp_path / "hf")
    assert modes(tmp_path / "hf") == modes(micro_run)


# outside 9: --concat is checked before the feature pass and named as itself
@pytest.mark.parametrize(
    "value, expect",
    [
        ("a,b", "--concat must be all, best or comma-separated integers"),
        ("0,9", "--concat: layers [9] are out"),
    ],
)
def test_a_bad_concat_is_named_concat(micro_run, cli_error, value, expect, monkeypatch):
    from igpt.probes import features

    def no_pass(*a, **k):
        raise AssertionError("the feature pass ran before --concat was checked")

    monkeypatch.setattr(features.FeatureCache, "__call__", no_pass)
    assert expect in cli_error("probe", micro_run, "--concat", value)


def test_a_run_being_trained_is_locked_against_a_second_trainer(tmp_path):
    from igpt.errors import IgptError
    from igpt.training.distributed import RunLock

    first = RunLock(tmp_path)
    with pytest.raises(IgptError, match=f"another igpt process is training {tmp_path}"):
        RunLock(tmp_path)
    first.release()
    RunLock(tmp_path).release()  # free again once released
