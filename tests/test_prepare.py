"""`igpt prepare` on every source format, reuse, and clear refusals of bad input."""

import json
import pickle

import numpy as np
import pytest
from conftest import FASHION_DIR, run_cli, write_idx

from igpt.cli import main
from igpt.data.palette import fit_palette
from igpt.data.preparation import PrepareConfig
from igpt.data.preparation import prepare_config as prepare
from igpt.data.prepared import PreparedData
from igpt.data.sources import load_source
from igpt.errors import IgptError

META_KEYS = "dataset resolution channels clusters order n_train n_val n_test num_classes class_names".split()
META_KEYS += ["quantization_rmse"]


def cli_error(capsys, *args: str) -> str:
    """Run the CLI in-process; assert a non-zero exit with exactly one line on stderr and return it."""
    with pytest.raises(SystemExit) as e:
        main([*args])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("igpt: error:"), err
    return err[0]


def test_idx_source(idx_dir):
    s = load_source("mnist", str(idx_dir))
    assert s.train.images.shape == (40, 12, 12, 1) and s.test.images.shape == (12, 12, 12, 1)
    assert s.train.images.dtype == np.uint8 and s.train.labels.dtype == np.int64


def test_cifar_source(cifar_dir):
    s = load_source("cifar10", str(cifar_dir))
    assert s.train.images.shape == (30, 32, 32, 3) and s.test.images.shape == (6, 32, 32, 3)
    assert s.class_names == ["a", "b", "c"]


def test_cifar_refuses_code_in_pickle(cifar_dir):
    (cifar_dir / "test_batch").write_bytes(pickle.dumps({b"data": __import__("os").getcwd}))
    with pytest.raises(IgptError, match="not a CIFAR python batch"):
        load_source("cifar10", str(cifar_dir))


def test_folder_source_mixed_sizes_grey_and_colour(folder_dir, tmp_path):
    cfg = PrepareConfig("folder", data_dir=str(folder_dir), resolution=8, clusters=8, test_fraction=0.25)
    meta = prepare(cfg, tmp_path / "p")
    assert (meta["resolution"], meta["channels"]) == (8, 3)
    assert meta["n_train"] + meta["n_val"] + meta["n_test"] == 12 and meta["n_test"] == 3
    assert meta["class_names"] == ["cats", "dogs"]
    assert set(PreparedData(tmp_path / "p").labels("train")) <= {0, 1}


def test_folder_skips_bad_files_and_strict_fails(folder_dir, tmp_path):
    (folder_dir / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder_dir / "cats" / "notes.txt").write_text("not an image")
    kw = dict(data_dir=str(folder_dir), resolution=8, clusters=8)
    meta = prepare(PrepareConfig("folder", **kw), tmp_path / "p")
    assert meta["skipped_files"] == 2
    with pytest.raises(IgptError, match="cannot read image"):
        prepare(PrepareConfig("folder", **kw, strict=True), tmp_path / "s")


def test_flat_folder_is_unlabeled(folder_dir, tmp_path):
    out = tmp_path / "prep"
    flat = folder_dir / "cats"
    meta = prepare(PrepareConfig("folder", data_dir=str(flat), resolution=6, clusters=4), out)
    assert meta["num_classes"] == 0 and meta["class_names"] == []
    assert (PreparedData(out).labels("train") == -1).all()


def test_npz_source_and_prepare(npz_path, tmp_path):
    out = tmp_path / "prep"
    meta = prepare(PrepareConfig("npz", data_dir=str(npz_path), clusters=8, order="snake"), out)
    assert all(k in meta for k in META_KEYS)
    assert meta["channels"] == 3 and meta["resolution"] == 10 and meta["order"] == "snake"
    d = PreparedData(out)
    tok = d.tokens("train")
    assert isinstance(tok, np.memmap) and tok.shape == (meta["n_train"], 100) and tok.dtype == np.uint8
    assert meta["n_train"] + meta["n_val"] == 30 and len(d.tokens("val")) == meta["n_val"] >= 1
    assert d.images("test", [0, 1]).shape == (2, 10, 10, 3)


def test_prepare_cli_writes_meta_and_reuses(idx_dir, tmp_path, capsys):
    out = tmp_path / "p"
    main(
        [
            *"prepare mnist --data-dir".split(),
            str(idx_dir),
            "--out",
            str(out),
            *"--resolution 6 --clusters 4".split(),
        ]
    )
    meta = json.loads((out / "meta.json").read_text())
    assert [k for k in META_KEYS if k not in meta] == []
    assert meta["n_train"] + meta["n_val"] == 40 and meta["n_val"] >= 1
    assert meta["n_test"] == 12 and meta["num_classes"] == 10
    assert meta["quantization_rmse"] > 0
    mtime = (out / "train_tokens.npy").stat().st_mtime_ns
    capsys.readouterr()
    main(
        [
            *"prepare mnist --data-dir".split(),
            str(idx_dir),
            "--out",
            str(out),
            *"--resolution 6 --clusters 4".split(),
        ]
    )
    assert "reusing" in capsys.readouterr().err
    assert (out / "train_tokens.npy").stat().st_mtime_ns == mtime
    # other settings into the same directory: refused without --force
    msg = cli_error(
        capsys, "prepare", "mnist", "--data-dir", str(idx_dir), "--out", str(out), "--clusters", "5"
    )
    assert "--force" in msg


def test_palette_reuse_including_openai_format(npz_path, tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (40, 4, 4, 3)).astype(np.uint8)
    pal = fit_palette(x, 9)
    np.save(tmp_path / "centers.npy", pal / 127.5 - 1.0)  # OpenAI's [-1, 1] layout
    meta = prepare(
        PrepareConfig("npz", data_dir=str(npz_path), palette=str(tmp_path / "centers.npy")), tmp_path / "o"
    )
    assert meta["clusters"] == 9
    np.testing.assert_allclose(np.load(tmp_path / "o" / "palette.npy"), pal, atol=1e-3)


@pytest.mark.parametrize(
    "args, expect",
    [
        (["mnist", "--data-dir", "/nonexistent/dir"], "does not exist"),
        (["digits", "--clusters", "1"], "at least 2"),
        (["digits", "--clusters", "100000"], "distinct colours"),
        (["digits", "--resolution", "0"], "positive"),
        (["digits", "--order", "spiral"], "unknown --order 'spiral'; choose one of raster, snake"),
        (["imagenet"], "unknown dataset"),
    ],
)
def test_bad_options_one_line(capsys, tmp_path, args, expect):
    out = tmp_path / "out"
    assert expect in cli_error(capsys, "prepare", *args, "--out", str(out))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_bad_files(capsys, idx_dir, cifar_dir, tmp_path):
    write_idx(idx_dir / "t10k-images-idx3-ubyte.gz", np.zeros((3, 4), np.uint8))  # 2 dims, not 3
    assert "dimension" in cli_error(
        capsys, "prepare", "mnist", "--data-dir", str(idx_dir), "--out", str(tmp_path / "a")
    )
    raw = (idx_dir / "train-labels-idx1-ubyte").read_bytes()
    (idx_dir / "train-labels-idx1-ubyte").write_bytes(raw[:-5])
    assert "truncated" in cli_error(
        capsys, "prepare", "mnist", "--data-dir", str(idx_dir), "--out", str(tmp_path / "a")
    )
    (idx_dir / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x09\x01" + raw[4:])
    assert "magic" in cli_error(
        capsys, "prepare", "mnist", "--data-dir", str(idx_dir), "--out", str(tmp_path / "a")
    )
    (cifar_dir / "data_batch_3").write_bytes(b"definitely not a pickle")
    assert "not a CIFAR" in cli_error(
        capsys, "prepare", "cifar10", "--data-dir", str(cifar_dir), "--out", str(tmp_path / "b")
    )
    np.savez(tmp_path / "x.npz", images=np.zeros((3, 4, 4), np.uint8))
    assert "x_train" in cli_error(
        capsys, "prepare", "npz", "--data-dir", str(tmp_path / "x.npz"), "--out", str(tmp_path / "c")
    )
    assert not any((tmp_path / n).exists() for n in "abc")


def test_python_m_igpt_subprocess(tmp_path):
    r = run_cli("prepare", "digits", "--out", tmp_path / "d", "--resolution", "8", "--clusters", "8")
    assert r.returncode == 0, r.stderr
    assert "quantization RMSE" in r.stdout
    bad = run_cli("prepare", "digits", "--out", tmp_path / "e", "--clusters", "1")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_prepare_real_fashion_mnist(tmp_path):
    meta = prepare(PrepareConfig("fashion-mnist", resolution=28, clusters=16), tmp_path / "fm")
    assert meta["n_train"] == 55000 and meta["n_val"] == 5000 and meta["n_test"] == 10000
    assert meta["num_classes"] == 10
    assert 2.0 < meta["quantization_rmse"] < 4.5
    tok = PreparedData(tmp_path / "fm").tokens("train")
    assert tok.shape == (55000, 784) and tok.dtype == np.uint8 and tok.max() == 15
