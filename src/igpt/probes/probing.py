"""The probe stage: linear probes of every layer beside raw pixels, read top to bottom as features, a fit per
layer, choices on validation, one score on test (`full_probe`); low-data probes over seeded class-balanced
subsets (`igpt.probes.low_data`), BERT mask ensembles and probe accuracy across checkpoints. The settings and
the opened run are `igpt.probes.setup`, the feature pass `igpt.probes.features`, the classifier
`igpt.probes.logistic`, the plots `igpt.probes.plots`."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from igpt.data.prepared import PreparedData
from igpt.errors import IgptError
from igpt.files import atomic_file
from igpt.model.gpt import IGPT
from igpt.runs import CHECKPOINTS_PROBE, FULL_PROBE, LATEST_PROBE, Run, low_data_stem
from igpt.settings import build_config
from igpt.training.checkpoint import read_state
from igpt.training.distributed import Dist, check_same_settings

from .chunks import RowChunks
from .features import FeatureCache, check_pool, raw_pixels
from .logistic import (
    FINE_CANDIDATES,
    FINE_LAMBDAS,
    FINE_REFIT_ITERS,
    LAMBDAS,
    Sweep,
    probe_with_validation,
    refit,
    sweep_lambda,
    sweep_rows,
)
from .low_data import further_pool, low_data_probe
from .memory import check_features_fit
from .plots import plot_checkpoints, plot_layers
from .scale import PixelRows, open_cache
from .setup import Labelled, ProbeConfig, feature_settings, open_labelled_run, parse_layers
from .store import TIMEOUT, StoreCache
from .variants import VARIANTS, ProbeContext


def probe(run: str | Path | ProbeConfig, **settings: Any) -> dict[str, Any]:
    """Probe a run's features and return what is written to RUN/probe.json (or, with `checkpoints="all"`,
    to probe_checkpoints.json). Takes a `ProbeConfig`, or the run and `ProbeConfig`'s fields by name, as the
    command's flags name them: `igpt.probe("runs/r", pool="grid3", labels_per_class=10, seeds=3)`.

    Under torchrun (`torchrun --nproc_per_node N -m igpt probe RUN`, or this call in each process) the
    processes split the rows of every feature pass through the run's feature store; rank 0 fits, writes and
    returns the result, the others return {}. Training features too large for memory are fitted from that
    store on disk (`igpt.probes.scale`)."""
    cfg = (
        run if isinstance(run, ProbeConfig) else build_config(ProbeConfig, "probe", run=str(run), **settings)
    )
    env = Dist(cfg.device, timeout=TIMEOUT)  # under torchrun: the processes that share the feature pass
    try:
        if env.world > 1:
            check_same_settings(env, asdict(cfg))
            if cfg.checkpoints == "all":
                raise IgptError("--checkpoints all probes in one process; run it without torchrun")
        info, model, data = open_labelled_run(cfg.run, cfg.data, cfg.checkpoint)
        check_pool(cfg.pool, data.resolution)
        layers = parse_layers(cfg.layers, model.config.n_layer, info)
        if cfg.checkpoints == "all":
            res = checkpoints_probe(cfg, data, layers)
            info.write_probe(CHECKPOINTS_PROBE, res, latest=False)
            plot_checkpoints(info.probe_file(CHECKPOINTS_PROBE, ".png"), res["checkpoints"])
            return res
        cache = open_cache(cfg, info, model, data, layers, env)
        if cache is None:
            return probe_and_save(cfg, model, data, layers, checkpoint_used=info.loaded_checkpoint)
        if not env.main:  # the other ranks compute their shares of rank 0's passes; rank 0 writes
            cache.serve()
            return {}
        try:
            res = probe_and_save(cfg, model, data, layers, cache, None, info.loaded_checkpoint, env.world)
        except BaseException as e:
            cache.finish(str(e) if isinstance(e, IgptError) else f"rank 0 failed ({type(e).__name__})")
            raise
        cache.finish()
        return res
    finally:
        env.close()


def probe_and_save(
    cfg: ProbeConfig,
    model: IGPT,
    data: PreparedData,
    layers: list[int],
    cache: FeatureCache | None = None,
    baselines: dict[str, float] | None = None,
    checkpoint_used: str | None = None,
    world: int = 1,
) -> dict[str, Any]:
    """One full or low-data probe of `cfg.run`: probe_full.json or probe_N_per_class.json, probe.json (the
    latest probe) and the matching plots; `baselines` are extra named lines for the plot, `world` the
    processes that shared the feature passes."""
    run = Run.open(cfg.run)
    t0 = time.perf_counter()
    if cfg.labels_per_class:
        res = low_data_probe(cfg, model, data, layers, cache)
        name = low_data_stem(cfg.labels_per_class)
        title = f"{cfg.labels_per_class} labels per class, mean of {cfg.seeds} subsets"
    else:
        res = full_probe(cfg, model, data, layers, cache)
        name = FULL_PROBE
        title = f"linear probe, {res['n_train']:,} training images"
    res.update(
        world_size=world,  # the processes that shared the work
        objective=model.config.objective,
        checkpoint=checkpoint_used or cfg.checkpoint or "latest",
        precision=cfg.precision,  # of the feature pass (and the full probe's fits; see ProbeConfig)
        seconds_total=round(time.perf_counter() - t0, 2),
    )
    run.write_probe(name, res)
    paper = (res.get("paper_probe") or {}).get("layers")
    plot_layers(
        run.probe_file(LATEST_PROBE, ".png"),
        res["layers"],
        res["raw_pixel_accuracy"],
        title,
        baselines or {},
        cfg.pool,
        paper,
    )
    with atomic_file(run.probe_file(name, ".png")) as tmp:
        tmp.write_bytes(run.probe_file(LATEST_PROBE, ".png").read_bytes())
    return res


def full_probe(
    cfg: ProbeConfig,
    model: IGPT,
    data: PreparedData,
    layers: list[int],
    cache: FeatureCache | StoreCache | None = None,
    raw_cache: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The standard protocol: features of every layer, a fit per layer with lambda chosen on validation,
    the best layer chosen on validation, one score on test; beside the paper's mean pooling and raw pixels,
    and (when asked) concatenated layers, BERT mask ensembles and the attentive head."""
    C, L = data.num_classes, Labelled.of(cfg, data)
    _check_variants(cfg, model, layers)
    t0 = time.perf_counter()
    kw = feature_settings(cfg, data)
    fine = further_pool(cfg.pool, cfg.fine_pool, data.resolution)
    if not isinstance(cache, StoreCache):  # the store's probe was checked when it was opened
        cache = _in_memory(cfg, model, data, layers, (L, fine, kw), cache)
    on_disk = isinstance(cache, StoreCache) and cache.on_disk
    # first the rows that choose: validation and the training rows the lambda sweeps fit on, with the fine
    # grid of every layer, since the layer it is fitted on is chosen from these rows' sweeps
    sw = sweep_rows(L.ytr.numpy(), cfg.seed)
    also = {fine: layers} if fine else None
    fva = cache("val", L.va, "validation features", also=also)
    fsw = cache("train", L.tr[sw], "train features (the sweep's rows)", also=also)
    t_feat = time.perf_counter() - t0
    sweeps = {
        i: sweep_lambda(fsw[i], L.ytr[sw], fva[i], L.yva, C, device=cfg.device, precision=cfg.precision)
        for i in layers
    }
    best = max(layers, key=lambda i: (sweeps[i].best, -i))  # chosen on validation, not test
    fine_sweeps = _fine_sweeps(cfg, cache.sibling(fine), sweeps, L, sw, C) if fine else {}
    fine_layer = max(fine_sweeps, key=lambda i: (fine_sweeps[i].best, -i)) if fine else best
    if fine:  # swept: of the fine grid, only the chosen layer's training rows are wanted again
        cache.drop("train", fine, keep=[fine_layer])
        cache.drop("val", fine)
    del fsw  # the sweep rows' features: the merge below holds every training row anew
    # then every training row and the test rows (the fine grid: the chosen layer, and every layer of the
    # test rows, which a low-data probe sharing this cache reads next)
    t1 = time.perf_counter()
    ftr = cache("train", L.tr, "train features", also={fine: [fine_layer]} if fine else None)
    fte = cache("test", L.te, "test features", also=also)
    t_feat += time.perf_counter() - t1
    res = _refit_layers(cfg, sweeps, (ftr, fte), L, C)
    res["paper_probe"] = _paper_probe(
        cfg, cache, layers, (L.tr, L.va, L.te), (L.ytr, L.yva, L.yte), C, res, best
    )
    res.update(
        _headline(cfg, data, L, C, res, best, raw_cache, on_disk), feature_dim=int(ftr[layers[0]].shape[1])
    )
    _run_variants(ProbeContext(cfg, model, data, layers, L, C, (ftr, fva, fte), best, kw), res)
    if fine:  # last, once the coarser grid's training rows are let go: the fine fit's float32 copy is large
        del ftr, fva, fte
        if cfg.pool != "mean":
            cache.drop("train", cfg.pool)
        res["fine_probe"] = _fine_probe(cfg, cache.sibling(fine), fine_layer, fine_sweeps, L, C)
        cache.drop("train", fine)
    res["seconds"] = {"features": round(t_feat, 2), "probes": round(time.perf_counter() - t0 - t_feat, 2)}
    res["chosen"] = _chosen(res)
    return res


def _in_memory(
    cfg: ProbeConfig,
    model: IGPT,
    data: PreparedData,
    layers: list[int],
    rows: tuple[Labelled, str | None, dict[str, Any]],
    cache: FeatureCache | None,
) -> FeatureCache:
    """The in-memory feature cache of one process (the one given, or a new one), once the features are
    checked to fit (one line otherwise); `igpt.probe` sends probes that would not to the feature store first
    (`igpt.probes.scale`). `rows`: the labelled rows, the further pooling, the pass's settings."""
    L, fine, kw = rows
    check_features_fit(len(L.tr), len(L.va) + len(L.te), len(layers), model.config.n_embd, cfg.pool, fine)
    return cache or FeatureCache(model, data, layers, quiet=not cfg.progress, **kw)


CLASSIFIER = (
    "multinomial logistic regression, torch L-BFGS, L2 chosen on the validation split from "
    f"{list(LAMBDAS)} (the sweep fitted on at most 20,000 training rows), then refitted on all"
)
"""How probe.json describes the full probe's classifier."""


def _check_variants(cfg: ProbeConfig, model: IGPT, layers: list[int]) -> None:
    """Refuse a variant's impossible settings before the feature pass, not after it."""
    for variant in VARIANTS:
        if variant.wanted(cfg) and variant.check is not None:
            variant.check(cfg, model, layers)


def _run_variants(ctx: ProbeContext, res: dict[str, Any]) -> None:
    """The extra probes the settings ask for (`igpt.probes.variants`), each stored under its key."""
    for variant in VARIANTS:
        if variant.wanted(ctx.cfg):
            res[variant.key] = variant.run(ctx, res)
            if variant.finish is not None:
                variant.finish(res)


def _fine_sweeps(
    cfg: ProbeConfig, ffine: FeatureCache, sweeps: dict[int, Sweep], L: Labelled, sw: np.ndarray, C: int
) -> dict[int, Sweep]:
    """The finer grid's lambda sweeps at the FINE_CANDIDATES layers the coarse sweeps rank highest (the
    full probe then fits it at the best of these)."""
    out = {}
    for i in sorted(sweeps, key=lambda i: (-sweeps[i].best, i))[:FINE_CANDIDATES]:
        x = (ffine("train", L.tr[sw], "", layers=[i])[i], ffine("val", L.va, "", layers=[i])[i])
        out[i] = sweep_lambda(x[0], L.ytr[sw], x[1], L.yva, C, FINE_LAMBDAS, cfg.device, cfg.precision)
        del x
    return out


def _refit_layers(
    cfg: ProbeConfig, sweeps: dict[int, Sweep], feats: tuple, L: Labelled, C: int
) -> dict[str, Any]:
    """Each layer's probe refitted on all training rows at the strength its sweep chose on validation, and
    scored on test: test and validation accuracy and the lambda, by layer."""
    ftr, fte = feats
    res: dict[str, Any] = {"layers": {}, "val_accuracy": {}, "lambda": {}}
    for i, sweep in sweeps.items():
        test = refit(ftr[i], L.ytr, C, sweep, cfg.device, precision=cfg.precision).accuracy(fte[i], L.yte)
        k = str(i)
        res["layers"][k], res["val_accuracy"][k], res["lambda"][k] = test, sweep.best, sweep.probe.lam
        if cfg.progress:
            print(
                f"  layer {i}: test {test:.4f} (val {sweep.best:.4f}, lambda {sweep.probe.lam:g})",
                file=sys.stderr,
            )
    return res


def _fine_probe(
    cfg: ProbeConfig, cache: FeatureCache, layer: int, sweeps: dict[int, Sweep], L: Labelled, C: int
) -> dict[str, Any]:
    """The finer pooling's probe at the chosen layer: its own lambda sweep (given, with the other candidate
    layers'; `FINE_LAMBDAS`), refitted on all training rows (`FINE_REFIT_ITERS`), scored on test."""
    sweep = sweeps[layer]
    x = cache("train", L.tr, "", layers=[layer])[layer]
    probe = refit(x, L.ytr, C, sweep, cfg.device, FINE_REFIT_ITERS, cfg.precision)
    test = probe.accuracy(cache("test", L.te, "", layers=[layer])[layer], L.yte)
    if cfg.progress:
        print(
            f"  layer {layer}, {cache.pool} pooling: test {test:.4f} (val {sweep.best:.4f}, "
            f"lambda {sweep.probe.lam:g})",
            file=sys.stderr,
        )
    return {
        "pool": cache.pool,
        "layer": layer,
        "test_accuracy": test,
        "val_accuracy": sweep.best,
        "lambda": sweep.probe.lam,
        "feature_dim": int(probe.weight.shape[0]),
        "val_by_layer": {str(i): s.best for i, s in sweeps.items()},
    }


def _headline(
    cfg: ProbeConfig,
    data: PreparedData,
    L: Labelled,
    C: int,
    res: dict[str, Any],
    best: int,
    raw_cache: dict[str, Any] | None,
    on_disk: bool = False,
) -> dict[str, Any]:
    """The full probe's headline fields: the layer chosen on validation and its test score beside raw
    pixels' (fitted once per `raw_cache`), the split sizes and how the probe was made."""
    raw = (raw_cache or {}).get("raw") or _raw_probe(cfg, data, L, C, on_disk)
    if raw_cache is not None:
        raw_cache["raw"] = raw
    return dict(
        best_layer=best,
        best_accuracy=res["layers"][str(best)],
        raw_pixel_accuracy=raw["test_accuracy"],
        raw_pixel_val_accuracy=raw["val_accuracy"],
        n_train=len(L.tr),
        n_val=len(L.va),
        n_test=len(L.te),
        pool=cfg.pool,
        head="linear",
        classifier=CLASSIFIER,
    )


def _raw_probe(cfg: ProbeConfig, data: PreparedData, L: Labelled, C: int, on_disk: bool) -> dict[str, Any]:
    """The same probe on the decoded pixels: the baseline every layer is judged against (with `on_disk`,
    its training pixels decoded a chunk of rows at a time on each pass of the fit)."""
    pixels: dict[str, Any] = {k: raw_pixels(data, k, r) for k, r in (("val", L.va), ("test", L.te))}
    pixels["train"] = (
        RowChunks(PixelRows(data, "train", L.tr)) if on_disk else raw_pixels(data, "train", L.tr)
    )
    return probe_with_validation(
        pixels["train"],
        L.ytr,
        pixels["val"],
        L.yva,
        pixels["test"],
        L.yte,
        C,
        cfg.seed,
        device=cfg.device,
        precision=cfg.precision,
    )


def _paper_probe(
    cfg: ProbeConfig,
    cache: FeatureCache,
    layers: list[int],
    rows: tuple[np.ndarray, np.ndarray, np.ndarray],
    labels: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    C: int,
    main: dict[str, Any],
    best: int,
) -> dict[str, Any]:
    """The paper's protocol beside whatever pooling was asked for: a linear probe of each layer's normed
    states averaged over positions, its L2 strength and best layer chosen on validation. Under mean pooling
    it is the main probe itself; otherwise its features come from the same forward pass."""
    out: dict[str, Any] = {"pool": "mean", "head": "linear"}
    if cfg.pool == "mean":
        out.update(layers=main["layers"], val_accuracy=main["val_accuracy"], **{"lambda": main["lambda"]})
        out.update(best_layer=best, best_accuracy=main["layers"][str(best)])
        return out
    tr, va, te = rows
    ytr, yva, yte = labels
    ftr, fva, fte = (
        cache("train", tr, "", mean=True),
        cache("val", va, "", mean=True),
        cache("test", te, "", mean=True),
    )
    acc, val, lam = {}, {}, {}
    for i in layers:
        r = probe_with_validation(
            ftr[i], ytr, fva[i], yva, fte[i], yte, C, cfg.seed, device=cfg.device, precision=cfg.precision
        )
        acc[str(i)], val[str(i)], lam[str(i)] = r["test_accuracy"], r["val_accuracy"], r["lambda"]
    pb = max(layers, key=lambda i: (val[str(i)], -i))
    out.update(layers=acc, val_accuracy=val, **{"lambda": lam}, best_layer=pb, best_accuracy=acc[str(pb)])
    return out


def _chosen(res: dict[str, Any]) -> dict[str, Any]:
    """Of the probes run (the linear probe of each layer and pooling, and every variant that names a
    candidate: concatenated layers, the attentive head), the one with the best validation accuracy, and its
    test accuracy: the honest answer to "which probe is best"."""
    pp = res.get("paper_probe") or {}
    cands = [
        (f"linear, {res['pool']} pooling, layer {k}", v, res["layers"][k])
        for k, v in res["val_accuracy"].items()
    ]
    cands += [
        (f"linear, mean pooling, layer {k}", v, pp["layers"][k])
        for k, v in (pp.get("val_accuracy") or {}).items()
    ]
    if "fine_probe" in res:
        f = res["fine_probe"]
        cands.append(
            (f"linear, {f['pool']} pooling, layer {f['layer']}", f["val_accuracy"], f["test_accuracy"])
        )
    for variant in VARIANTS:
        if variant.candidate is not None and res.get(variant.key):
            cands.append(variant.candidate(res[variant.key], res))
    probe, val, test = max(cands, key=lambda c: c[1])
    return {"probe": probe, "val_accuracy": val, "test_accuracy": test}


def checkpoints_probe(cfg: ProbeConfig, data: PreparedData, layers: list[int]) -> dict[str, Any]:
    """Figure 3: every kept checkpoint probed (all chosen layers, its best on validation) against val_nll."""
    run = Run.open(cfg.run)
    ckpts = run.checkpoints()
    if not ckpts:
        raise IgptError(f"{cfg.run} has no checkpoint")
    rows: list[dict[str, Any]] = []
    raw_cache: dict[str, Any] = {}  # the raw-pixel baseline does not depend on the checkpoint: fitted once
    for path in ckpts:
        try:
            state = read_state(path)
        except IgptError as e:
            print(f"igpt: warning: {e}; skipped", file=sys.stderr)
            continue
        if not isinstance(state.get("val_nll"), int | float):
            continue
        try:
            model = run.load_model(path.name)
        except IgptError as e:
            print(f"igpt: warning: {e}; skipped", file=sys.stderr)
            continue
        print(f"checkpoint {path.name} (val_nll {state['val_nll']:.4f})", file=sys.stderr)
        # the best layer's accuracy at --pool is the figure; no further pooling per checkpoint
        r = full_probe(replace(cfg, fine_pool="none"), model, data, layers, raw_cache=raw_cache)
        rows.append(
            {
                "checkpoint": path.name,
                "step": state["step"],
                "val_nll": state["val_nll"],
                "best_layer": r["best_layer"],
                "best_accuracy": r["best_accuracy"],
                "layers": r["layers"],
            }
        )
    if len(rows) < 2:
        raise IgptError(
            "loss against probe needs at least two kept checkpoints with val_nll; pretrain with "
            "--keep-every N"
        )
    return {"checkpoints": rows, "raw_pixel_accuracy": r["raw_pixel_accuracy"]}
