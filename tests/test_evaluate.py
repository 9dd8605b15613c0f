"""Probes and fine-tuning on tiny runs: output structure, probes that must work, low-data subsets, BERT mask
ensembles, the joint loss, and refusals."""

import json

import numpy as np
import pytest
import torch

from igpt.cli import main
from igpt.data.palette import from_sequence, to_sequence
from igpt.data.preparation import PrepareConfig
from igpt.data.preparation import prepare_config as prepare
from igpt.errors import IgptError
from igpt.finetuning.classifier import Augment, Classifier
from igpt.model.gpt import IGPT, IGPTConfig
from igpt.probes.logistic import (
    CV_LAMBDAS,
    FINE_CANDIDATES,
    FINE_LAMBDAS,
    balanced_subset,
    column_stats,
    cv_lambda,
    feature_std,
    fit_logistic_many,
    probe_with_validation,
)

COMMON = ["--preset", "micro", "--batch-size", "16", "--eval-images", "32", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    prepare(PrepareConfig("digits", resolution=8, clusters=8), d / "data")
    for obj in ("ar", "bert"):
        main(
            [
                *"pretrain --data".split(),
                str(d / "data"),
                "--out",
                str(d / obj),
                "--objective",
                obj,
                *"--steps 30 --eval-interval 10 --keep-every 10".split(),
                *COMMON,
            ]
        )
    return d


def test_probe_output_structure(runs):
    main(["probe", str(runs / "ar")])
    p = json.loads((runs / "ar" / "probe.json").read_text())
    assert sorted(p["layers"], key=int) == ["0", "1", "2"]
    assert all(0 <= v <= 1 for v in p["layers"].values())
    assert p["best_layer"] in (0, 1, 2) and p["best_accuracy"] == p["layers"][str(p["best_layer"])]
    assert p["raw_pixel_accuracy"] > 0.8  # logistic regression on digits' pixels
    assert (runs / "ar" / "probe.png").stat().st_size > 1000


def test_probe_on_label_carrying_features_beats_chance_by_far():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (600,), generator=g)
    x = torch.nn.functional.one_hot(y, 5).float() @ torch.randn(5, 16, generator=g) + 0.3 * torch.randn(
        600, 16, generator=g
    )
    r = probe_with_validation(x[:400], y[:400], x[400:500], y[400:500], x[500:], y[500:], 5)
    assert r["test_accuracy"] > 0.95
    n = torch.randn(600, 16, generator=g)
    noise = probe_with_validation(n[:400], y[:400], n[400:500], y[400:500], n[500:], y[500:], 5)
    assert noise["test_accuracy"] < 0.45


def test_low_data_subsets_are_balanced_and_seeded():
    y = np.repeat(np.arange(4), 50)
    a, b, c = balanced_subset(y, 7, 1), balanced_subset(y, 7, 1), balanced_subset(y, 7, 2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.bincount(y[a]).tolist() == [7, 7, 7, 7] and len(set(a)) == 28


def test_low_data_probe(runs):
    main(["probe", str(runs / "ar"), "--labels-per-class", "5", "--seeds", "2"])
    p = json.loads((runs / "ar" / "probe.json").read_text())
    assert p["labels_per_class"] == 5 and p["seeds"] == 2
    assert 0 <= p["mean_accuracy"] <= 1 and p["std_accuracy"] >= 0 and "raw_pixel_accuracy" in p
    assert (runs / "ar" / "probe_5_per_class.json").is_file()
    # the fine 7x7 grid is weighed beside the probe's pooling by default, and its rows are 49 cells wide
    assert p["pools_compared"] == ["mean", "grid7"] and set(p["layers_by_pool"]) == {"mean", "grid7"}
    assert p["best_pool"] in ("mean", "grid7")
    main(["probe", str(runs / "ar"), "--labels-per-class", "5", "--seeds", "1", "--fine-pool", "none"])
    assert json.loads((runs / "ar" / "probe.json").read_text())["pools_compared"] == ["mean"]


def test_each_subset_chooses_a_layer_of_the_finest_pooling_by_its_cv_log_loss(runs):
    """With one subset its own choice is the shared one: the layer of the finest pooling compared whose
    cross-validated log-loss is lowest; its test accuracy is that layer's."""
    args = ["probe", str(runs / "ar"), "--labels-per-class", "5", "--seeds", "1", "--layers", "1,2"]
    main(args)
    p = json.loads((runs / "ar" / "probe.json").read_text())
    assert p["pools_compared"] == ["mean", "grid7"] and p["choice_pool"] == p["best_pool"] == "grid7"
    losses = p["cv_log_loss_by_pool"]["grid7"]
    assert p["best_layer"] == int(min(losses, key=lambda i: (losses[i], int(i))))
    assert p["mean_accuracy"] == p["best_accuracy"] == p["layers_by_pool"]["grid7"][str(p["best_layer"])]
    assert all(v > 0 for pool in p["cv_log_loss_by_pool"].values() for v in pool.values())


def test_cv_chooses_the_strength_by_held_out_log_loss():
    """Separable classes: a weak strength wins on held-out log-loss (each fold is fitted without its rows),
    and its accuracy is reported beside; on pure noise a strong one wins, near chance's log-loss."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(10)
    x = 3 * torch.nn.functional.one_hot(y, 4).float() @ torch.randn(4, 20, generator=g)
    x += 0.5 * torch.randn(40, 20, generator=g)
    s = cv_lambda(x, y, 4, 5, 0)
    assert s.accuracy == 1.0 and s.log_loss < 0.1 and s.lam < 1e-2
    noise = cv_lambda(torch.randn(40, 20, generator=g), y, 4, 5, 0)
    assert noise.lam >= 1.0 and noise.lam in CV_LAMBDAS and noise.log_loss > 0.95 * np.log(4)


def test_wide_fits_in_the_rows_span_match_the_full_fit():
    """More features than rows: the fit in the span of the rows is the same regression (every problem of a
    cross-validation batch too), and a warm start carries over."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(5).repeat_interleave(8)
    x = torch.randn(40, 300, generator=g) + 0.5 * torch.randn(5, 300, generator=g)[y]
    weights = (torch.rand(3, 40, generator=g) > 0.25).float()
    fast = fit_logistic_many(x, y, 5, [1.0, 1e-1, 1e-2], weights, max_iter=500)
    full = fit_logistic_many(x, y, 5, [1.0, 1e-1, 1e-2], weights, max_iter=500, span=False)
    for a, b in zip(fast, full, strict=True):
        assert a.weight.shape == b.weight.shape == (300, 5)
        assert torch.allclose(a.weight, b.weight, atol=1e-2 * float(b.weight.abs().max()))
        assert torch.allclose(a.bias, b.bias, atol=5e-3)
        assert torch.equal(a.predict(x), b.predict(x))
    every = fit_logistic_many(x, y, 5, [1e-1], max_iter=500, span=False)[0]  # all rows, one problem
    warm = fit_logistic_many(x, y, 5, [1e-1], init=(every.weight, every.bias), max_iter=3)[0]
    assert torch.allclose(warm.weight, every.weight, atol=1e-2 * float(every.weight.abs().max()))


def test_fits_with_bf16_products_reach_the_fp32_solution():
    """bf16 products round the standardised features and each product's outputs, not the optimisation: a
    well-posed regression (tall and wide, the latter in the rows' span) ends at about the fp32 weights."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(150)
    x = torch.randn(600, 64, generator=g) + torch.randn(4, 64, generator=g)[y]
    for rows in (slice(None), slice(0, 600, 20)):  # 600 x 64, and 30 x 64 (fitted in the rows' span)
        ref = fit_logistic_many(x[rows], y[rows], 4, [1e-1, 1e-2], max_iter=300)
        fast = fit_logistic_many(x[rows], y[rows], 4, [1e-1, 1e-2], max_iter=300, precision="bf16")
        for a, b in zip(fast, ref, strict=True):
            assert a.weight.dtype == torch.float32 and a.weight.shape == b.weight.shape
            assert float((a.weight - b.weight).norm() / b.weight.norm()) < 0.06  # 0.5-3% measured
            assert (a.predict(x) == b.predict(x)).float().mean() > 0.99
    with pytest.raises(IgptError, match="unknown fit precision"):
        fit_logistic_many(x, y, 4, [1e-2], precision="fp16")


def test_bert_mask_ensemble(runs):
    main(["probe", str(runs / "bert"), "--mask-ensemble", "3", "--layers", "1,2", "--train-limit", "400"])
    p = json.loads((runs / "bert" / "probe.json").read_text())
    me = p["mask_ensemble"]
    assert me["masks"] == 3 and sorted(me["layers"]) == ["1", "2"]
    assert all(0 <= v <= 1 for v in me["layers"].values())


def test_loss_against_probe_over_checkpoints(runs):
    main(["probe", str(runs / "ar"), "--checkpoints", "all", "--train-limit", "300", "--layers", "1,2"])
    p = json.loads((runs / "ar" / "probe_checkpoints.json").read_text())
    assert [r["step"] for r in p["checkpoints"]] == [10, 20, 30]
    assert all(r["val_nll"] > 0 for r in p["checkpoints"])
    assert (runs / "ar" / "probe_checkpoints.png").is_file()


def test_joint_loss_gradient_reaches_output_head():
    torch.manual_seed(0)
    for objective in ("ar", "bert"):
        m = Classifier(
            IGPT(
                IGPTConfig(vocab_size=8, n_positions=16, n_layer=1, n_embd=16, n_head=2, objective=objective)
            ),
            3,
        )
        x = torch.randint(0, 8, (4, 16))
        mask = torch.rand(4, 16) < 0.3 if objective == "bert" else None
        for w, expect in ((1.0, True), (0.0, False)):
            m.zero_grad()
            logits, l_gen = m(x, mask)
            (torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])) + w * l_gen).backward()
            g = m.backbone.lm_head.weight.grad
            assert (g is not None and g.abs().sum() > 0) == expect, (objective, w)


@pytest.mark.parametrize("compiled", [False, True])
def test_finetune_beats_untrained_head(runs, tmp_path, compiled):
    out = tmp_path / "ft"
    main(
        [
            "finetune",
            str(runs / "ar"),
            "--out",
            str(out),
            *"--epochs 3 --lr 1e-3 --no-progress".split(),
            *(["--compile"] if compiled else []),
        ]
    )
    r = json.loads((out / "finetune.json").read_text())
    assert r["test_accuracy"] > 0.4 and 0 <= r["best_epoch"] <= 3  # chance is 0.1
    assert r["best_val_accuracy"] >= r["initial_val_accuracy"]
    assert (out / "model.safetensors").is_file()


def test_augment_shifts_and_flips_in_token_space():
    R = 6
    grid = np.arange(36).reshape(1, R, R)
    for order in ("raster", "snake"):
        seq = torch.from_numpy(to_sequence(grid, order))
        g = torch.Generator().manual_seed(0)
        flipped = from_sequence(Augment(R, order, 0, True)(seq.repeat(8, 1), g).numpy(), R, order)
        assert all((f == grid[0]).all() or (f == grid[0][:, ::-1]).all() for f in flipped)
        assert any((f == grid[0][:, ::-1]).all() for f in flipped)
        shifted = from_sequence(Augment(R, order, 2, False)(seq.repeat(8, 1), g).numpy(), R, order)
        for f in shifted:  # rows and columns stay contiguous runs of the original (edges replicated)
            assert set(np.diff(f[:, 3])) <= {0, 6} and set(np.diff(f[3])) <= {0, 1}


def test_refusals(runs, tmp_path, capsys):
    prepare(
        PrepareConfig("folder", data_dir=str(_flat_folder(tmp_path)), resolution=8, clusters=4),
        tmp_path / "u",
    )
    cases = [
        (["probe", str(runs / "ar"), "--layers", "7"], "out of range"),
        (["probe", str(runs / "ar"), "--labels-per-class", "100000"], "exceeds"),
        (["probe", str(runs / "ar"), "--data", str(tmp_path / "u")], "no labels"),
        (["probe", str(runs / "ar"), "--mask-ensemble", "2"], "BERT runs only"),
        (
            ["finetune", str(runs / "ar"), "--out", str(tmp_path / "f"), "--labels-per-class", "100000"],
            "exceeds",
        ),
    ]
    for args, expect in cases:
        with pytest.raises(SystemExit):
            main(args)
        err = capsys.readouterr().err
        assert expect in err, (args, err)
    assert not (tmp_path / "f").exists()


def _flat_folder(tmp_path):
    from PIL import Image

    d = tmp_path / "flat"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(d / f"{i}.png")
    return d


def test_unfinished_run_says_so(runs, tmp_path, capsys):
    import shutil

    run = tmp_path / "unfinished"
    shutil.copytree(runs / "ar", run)
    s = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps(s | {"finished": False}))
    main(["probe", str(run), "--layers", "2", "--train-limit", "200"])
    assert "unfinished" in capsys.readouterr().err


def test_grid_pooling_averages_each_cell_in_raster_order():
    from igpt.probes.features import pool_states

    R, d = 5, 2
    h = torch.arange(R * R * d, dtype=torch.float32).view(1, R * R, d)
    g = h.view(R, R, d)
    assert torch.allclose(pool_states(h, "mean", R), h.mean(1))
    two = pool_states(h, "grid", R).view(4, d)  # cells split 5 as 0:2 (round(2.5) = 2) and 2:5
    assert torch.allclose(two[0], g[:2, :2].mean((0, 1))) and torch.allclose(two[3], g[2:, 2:].mean((0, 1)))
    four = pool_states(h, "grid4", R)
    assert four.shape == (1, 16 * d)
    h7 = torch.randn(2, 14 * 14, d)
    seven = pool_states(h7, "grid7", 14).view(2, 49, d)  # 2x2 cells of a 14x14 image
    assert torch.allclose(seven[:, 8], h7.view(2, 14, 14, d)[:, 2:4, 2:4].mean((1, 2)), atol=1e-6)
    with pytest.raises(ValueError):
        pool_states(h, "grid4", 3)


def test_grid_pooling_puts_snake_ordered_states_back_in_place():
    from igpt.data.palette import order_index
    from igpt.probes.features import pool_states

    R, d = 6, 3
    raster = torch.randn(2, R * R, d)
    snake = raster[:, torch.from_numpy(order_index(R, "snake"))]  # the same image read in snake order
    for pool in ("grid", "grid3"):
        torch.testing.assert_close(pool_states(snake, pool, R, "snake"), pool_states(raster, pool, R))
    assert not torch.allclose(pool_states(snake, "grid3", R), pool_states(raster, "grid3", R))


def test_one_label_per_class_chooses_the_layer_on_validation(runs, capsys):
    main(["probe", str(runs / "ar"), "--labels-per-class", "1", "--seeds", "2"])
    p = json.loads((runs / "ar" / "probe.json").read_text())
    assert "lowest log-loss on the validation split" in p["classifier"]
    losses = p["cv_log_loss_by_pool"][p["choice_pool"]]  # here the validation split's log-loss per layer
    assert p["best_layer"] == int(min(losses, key=lambda i: (losses[i], int(i))))
    with pytest.raises(SystemExit):
        main(["probe", str(runs / "ar"), "--labels-per-class", "5", "--concat", "1,2"])
    assert "apply to the full probe" in capsys.readouterr().err


def test_mask_ensemble_averages_probabilities(monkeypatch):
    """Three probes whose votes tie 1-1-1 on the class: averaged probabilities pick the confident one,
    where a vote would break the tie toward class 0."""
    from igpt.probes import variants

    class Probe:
        def __init__(self, p):
            self.p = torch.tensor([p])

        def logits(self, x):
            return self.p.log()

    probes = iter([Probe([0.34, 0.33, 0.33]), Probe([0.0, 0.9, 0.1]), Probe([0.3, 0.3, 0.4])])
    monkeypatch.setattr(variants, "fit_logistic", lambda *a, **k: next(probes))
    monkeypatch.setattr(variants, "extract_features", lambda *a, **k: {1: torch.zeros(1, 2)})

    class Data:
        num_classes = 3

        def tokens(self, split):
            return np.zeros((1, 4), np.int64)

    class Bert:
        causal = False

    cfg = variants.ProbeConfig(run="x", mask_ensemble=3)
    y = torch.tensor([1])
    res = variants.mask_ensemble(
        cfg, Bert(), Data(), np.array([0]), np.array([0]), y, y, {1: 0.01}, {"device": "cpu"}
    )
    assert res["layers"]["1"] == 1.0  # class 1 has the highest mean probability (0.41)


def test_the_papers_probe_is_reported_beside_another_pooling(runs):
    main(["probe", str(runs / "ar"), "--pool", "grid", "--layers", "1,2", "--train-limit", "400"])
    p = json.loads((runs / "ar" / "probe.json").read_text())
    paper = p["paper_probe"]
    assert p["pool"] == "grid" and p["head"] == "linear" and paper["pool"] == "mean"
    assert sorted(paper["layers"]) == ["1", "2"] and paper["best_layer"] in (1, 2)
    assert paper["best_accuracy"] == paper["layers"][str(paper["best_layer"])]
    assert paper["layers"] != p["layers"]  # its own features, not the grid's
    main(["probe", str(runs / "ar"), "--layers", "1,2", "--train-limit", "400"])
    same = json.loads((runs / "ar" / "probe.json").read_text())
    assert same["paper_probe"]["layers"] == same["layers"]  # mean pooling is the paper's probe itself


def test_the_finer_grid_is_fitted_at_the_layer_chosen_on_validation(runs):
    main(["probe", str(runs / "ar"), "--pool", "grid", "--train-limit", "400"])
    p = json.loads((runs / "ar" / "probe.json").read_text())
    f = p["fine_probe"]
    # swept at the FINE_CANDIDATES layers the coarse grid ranks highest on validation, fitted at the best of
    # its own sweeps there
    coarse = sorted(p["val_accuracy"], key=lambda k: (-p["val_accuracy"][k], int(k)))[:FINE_CANDIDATES]
    assert sorted(f["val_by_layer"]) == sorted(coarse) and str(f["layer"]) in coarse
    assert f["val_accuracy"] == max(f["val_by_layer"].values()) == f["val_by_layer"][str(f["layer"])]
    assert f["pool"] == "grid7" and f["feature_dim"] == 49 * 32
    assert 0 <= f["test_accuracy"] <= 1 and f["lambda"] in FINE_LAMBDAS
    # the best on validation of every probe run, the finer grid among them
    vals = [*p["val_accuracy"].values(), *p["paper_probe"]["val_accuracy"].values(), f["val_accuracy"]]
    assert p["chosen"]["val_accuracy"] == max(vals)
    main(["probe", str(runs / "ar"), "--pool", "grid", "--train-limit", "400", "--fine-pool", "none"])
    assert "fine_probe" not in json.loads((runs / "ar" / "probe.json").read_text())


def test_feature_cache_computes_missing_rows_only_and_asked_poolings_in_the_same_pass(runs, monkeypatch):
    from igpt.data.prepared import PreparedData
    from igpt.probes import features
    from igpt.runs import Run

    run = Run.open(runs / "ar")
    model, data = run.load_model(), PreparedData(runs / "data")
    real, calls = features.extract_pooled, []

    def counted(m, tokens, wants, **kw):
        calls.append((len(tokens), sorted(wants)))
        return real(m, tokens, wants, **kw)

    monkeypatch.setattr(features, "extract_pooled", counted)
    monkeypatch.setattr(features, "WIDE_FEATURES", 1000)  # the 7x7 grid (1,568 here) is held in bfloat16
    cache = features.FeatureCache(model, data, [0, 1, 2], quiet=True, pool="grid", resolution=8)
    rows = np.arange(100)
    cache("train", rows[::2], "", also={"grid7": [1]})
    assert calls == [(50, ["grid", "grid7", "mean"])]
    both = cache("train", rows, "")  # only the odd rows are computed, and merged in order
    assert calls[1][0] == 50
    direct = real(model, data.tokens("train")[rows], {"grid": [0, 1, 2], "grid7": [1]}, resolution=8)
    for i in (0, 1, 2):
        torch.testing.assert_close(both[i], direct["grid"][i], atol=1e-5, rtol=1e-4)
    fine = cache.sibling("grid7")("train", rows[::2], "", layers=[1])  # held since the first pass
    assert len(calls) == 2 and fine[1].dtype == torch.bfloat16 and fine[1].shape == (50, 49 * 32)
    torch.testing.assert_close(fine[1].float(), direct["grid7"][1][::2].bfloat16().float())
    cache.drop("train", "grid7")
    mean0 = cache.store[("train", "mean", 0)][1]
    cache.sibling("grid7")("train", rows[::2], "", layers=[1])
    assert len(calls) == 3
    assert cache.store[("train", "mean", 0)][1] is mean0  # held whole already: not copied again


def test_column_stats_match_a_float64_copys_in_chunks():
    x = torch.randn(1000, 40) * 3 + 5
    mean, std = column_stats(x, chunk=77)
    torch.testing.assert_close(mean, x.double().mean(0))
    torch.testing.assert_close(std, feature_std(x.double()))
    assert column_stats(x[:1])[1].eq(1).all()  # one row: no spread, standardising leaves it as is


def test_a_probe_whose_features_would_not_fit_in_memory_is_refused_before_any_pass(runs, monkeypatch, capsys):
    """Past memory the training features are fitted from disk (tests/test_out_of_core.py); where even that
    would not fit, one line before any pass."""
    import igpt.probes.memory as memory
    import igpt.probes.probing as probing

    run = runs / "ar"
    before = sorted(p.name for p in run.iterdir())
    from igpt.data.prepared import PreparedData
    from igpt.runs import Run

    d = Run.open(run).load_model().config.n_embd
    m = PreparedData(runs / "data").meta
    n_train, other = int(m["n_train"]), int(m["n_val"]) + int(m["n_test"])
    from_disk = memory.out_of_core_bytes(n_train, other, 3, d, "grid3", "grid7")
    avail = int(0.9 * from_disk / memory.FEATURES_SHARE)
    monkeypatch.setattr(memory, "available_memory", lambda: avail)
    passes = []
    monkeypatch.setattr(probing.FeatureCache, "__call__", lambda *a, **k: passes.append(1))
    with pytest.raises(SystemExit):
        main(["probe", str(run), "--pool", "grid3"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "GiB" in err, err
    assert "even fitting the training features from disk" in err and "--fine-pool none" in err
    assert not passes
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written
    assert memory.probe_bytes(n_train, other, 3, d, "grid3", "grid7") > memory.FEATURES_SHARE * avail
    # the figure named is the peak estimate: the 7x7 grid's share grows with the images, as the cache does
    assert memory.probe_bytes(n_train, other, 3, d, "grid3", None) < memory.probe_bytes(
        n_train, other, 3, d, "grid3", "grid7"
    )
