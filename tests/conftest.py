"""Fixtures that write small datasets in every source format, so the tests never need downloads."""

from __future__ import annotations

import gzip
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    """Write a uint8 array as an IDX file (magic 0x0000 08 ndim, big-endian dims)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def smooth_images(n: int, size: int, channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose content depends on their label (a bright bar at a label-dependent row) plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 60, (n, size, size, channels))
    for i, label in enumerate(y):
        r = (label * size) // 3
        x[i, r : r + max(1, size // 3)] += 180
    return np.clip(x, 0, 255).astype(np.uint8), y


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    d = tmp_path / "idx"
    d.mkdir()
    for prefix, n, seed in (("train", 40, 0), ("t10k", 12, 1)):
        x, y = smooth_images(n, 12, 1, seed)
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", x[..., 0])
        write_idx(d / f"{prefix}-labels-idx1-ubyte", y, gz=False)  # mix gzipped and plain
    return d


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        x, y = smooth_images(6, 32, 3, i)
        batch = {b"data": x.transpose(0, 3, 1, 2).reshape(6, -1), b"labels": [int(v) for v in y]}
        (d / name).write_bytes(pickle.dumps(batch))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b", b"c"]}))
    return d


@pytest.fixture
def folder_dir(tmp_path: Path) -> Path:
    from PIL import Image

    d = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for ci, cls in enumerate(["cats", "dogs"]):
        (d / cls).mkdir(parents=True)
        for i in range(6):
            size = (20 + 4 * i, 16 + 2 * i)  # mixed, non-square sizes
            arr = (rng.integers(0, 80, (size[1], size[0], 3)) + 120 * ci).astype(np.uint8)
            img = Image.fromarray(arr)
            if i % 3 == 0:
                img = img.convert("L")  # grey among colour
            img.save(d / cls / f"{i}.{'png' if i % 2 else 'jpg'}")
    return d


@pytest.fixture
def npz_path(tmp_path: Path) -> Path:
    xtr, ytr = smooth_images(30, 10, 3, 0)
    xte, yte = smooth_images(10, 10, 3, 1)
    p = tmp_path / "data.npz"
    np.savez(p, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    return p


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m igpt ARGS` in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "igpt", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory) -> Path:
    """A 20-step `micro` AR run on the 8x8 digits (DIR/data, DIR/run), shared by the tests that only need some
    trained run to sample from or serve."""
    from igpt.cli import main
    from igpt.data.preparation import PrepareConfig
    from igpt.data.preparation import prepare_config as prepare

    d = tmp_path_factory.mktemp("micro")
    prepare(PrepareConfig("digits", resolution=8, clusters=8), d / "data")
    main(
        [
            *"pretrain --data".split(),
            str(d / "data"),
            "--out",
            str(d / "run"),
            *"--preset micro --steps 20 --batch-size 16 --eval-images 32 --no-progress".split(),
        ]
    )
    return d / "run"


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """scikit-learn's digits prepared at 8x8 with 8 grey levels, once per test module."""
    from igpt.data.preparation import PrepareConfig
    from igpt.data.preparation import prepare_config as prepare

    out = tmp_path_factory.mktemp("data") / "digits"
    prepare(PrepareConfig("digits", resolution=8, clusters=8), out)
    return out


def permuted_test_copy(data: Path, dest: Path, name: str = "test_labels.npy", seed: int = 0) -> Path:
    """A copy of the prepared set `data` at `dest` with one test-split array (`name`) permuted: what the
    leakage tests probe to show that no choice reads the test split."""
    shutil.copytree(data, dest)
    a = np.load(dest / name)
    np.save(dest / name, a[np.random.default_rng(seed).permutation(len(a))])
    return dest


@pytest.fixture
def cli_error(capsys):
    """Run the CLI in-process and expect a refusal: a non-zero exit with exactly one `igpt: error:` line on
    stderr and no traceback. Returns that line."""
    from igpt.cli import main

    def run(*argv: object) -> str:
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
        assert e.value.code != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith("igpt: error:"), err
        assert sum(ln.startswith("igpt: error:") for ln in err) == 1
        assert not any("Traceback" in ln for ln in err)
        return err[-1]

    return run


# ---------------------------------------------------------------------------------------------- pretraining
PRETRAIN_BASE = "--preset micro --batch-size 16 --eval-interval 10 --log-interval 5 --eval-images 64".split()
PRETRAIN_BASE += ["--no-progress"]


def pretrain(data, out, *extra) -> None:
    """`igpt pretrain` in this process with a micro model and frequent logging, plus `extra` flags."""
    from igpt.cli import main

    main(["pretrain", "--data", str(data), "--out", str(out), *PRETRAIN_BASE, *map(str, extra)])


def weights(run: Path, step: int) -> dict:
    """The tensors of a run's checkpoint at `step`."""
    from safetensors.torch import load_file

    return load_file(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


def losses(run: Path) -> list[tuple[int, float]]:
    """(step, training loss) rows of a run's metrics.jsonl."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    """Equal tensors, bit for bit unless `atol`."""
    import torch

    assert a.keys() == b.keys()
    for k in a:
        if atol == 0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0)


def benchmark_module(name: str):
    """benchmarks/<name>.py as a module, loaded from its path (the benchmarks are not a package; their own
    imports of each other, such as sweep_table, resolve as they do when run as scripts)."""
    import importlib.util

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def sweep():
    """benchmarks/sweep.py as a module."""
    return benchmark_module("sweep")


@pytest.fixture
def finetune_sweep():
    """benchmarks/finetune_sweep.py as a module."""
    return benchmark_module("finetune_sweep")
