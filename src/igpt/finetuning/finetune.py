"""The finetune stage: the pretrained backbone plus a linear head on the pooled final normed states (the
paper's mean pool, or a coarse grid), trained on L_CLF + gen_weight x L_GEN (the run's own objective), with
early stopping on the prepared validation split, and augmentation (shifts, and flips where they suit the
data). `init="scratch"` trains the same architecture from random weights with the same recipe: the control
that shows what pretraining buys. With `labels_per_class` it runs once per seeded class-balanced subset (the
low-data probes' subsets) and reports their mean and std."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from igpt.data.prepared import PreparedData
from igpt.errors import IgptError
from igpt.files import exclusive
from igpt.finetuning.classifier import make_optimizer
from igpt.finetuning.config import COMPILE_MIN_ROWS, MUON_LR, FinetuneConfig, resolve_head
from igpt.hardware import auto_precision
from igpt.model.compiling import CompiledOrEager
from igpt.model.gpt import IGPT
from igpt.probes.features import check_pool
from igpt.probes.logistic import balanced_subset, check_trainable
from igpt.probes.setup import labelled_rows, open_labelled_run
from igpt.runs import Run
from igpt.settings import build_config
from igpt.training.distributed import Dist, check_same_settings
from igpt.training.engine import NO_FLIP, EarlyStopping

from .classifier import Augment, Classifier, check_layer, standardise_head, truncate
from .clock import SAVE_SECONDS, Clock
from .engine import Recipe, Share, full_weights, over_processes, train_epoch
from .saving import save_finetuned


def tokens_rows(data: PreparedData, rows: np.ndarray) -> np.ndarray:
    return np.asarray(data.tokens("train")[np.sort(rows)], dtype=np.int64)


def finetune(
    run: str | Path | FinetuneConfig, out: str | Path | None = None, **settings: Any
) -> dict[str, Any]:
    """Fine-tune a run's backbone with a classification head into the run directory `out`, and return what
    is written to OUT/finetune.json. Takes a `FinetuneConfig`, or the run, `out` and the config's fields by
    name, as the command's flags name them: `igpt.finetune("runs/r", out="runs/ft", epochs=1)`;
    `init="scratch"` is the from-scratch control.
    `igpt.load_run(out)` opens the result (the fine-tuned backbone); `load_classifier(out)` gives backbone
    and head."""
    if isinstance(run, FinetuneConfig):
        return _finetune(run)
    if out is None:
        raise IgptError("finetune needs out, the directory to write the fine-tuned run to")
    return _finetune(build_config(FinetuneConfig, "finetune", run=str(run), out=str(out), **settings))


@dataclass
class _Split:
    """Rows of one fine-tuning: training rows (of the train split), validation rows (of the validation
    split, for early stopping), test rows."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _subsets(args: FinetuneConfig, data: PreparedData, test: bool = True) -> list[_Split]:
    """The training/validation rows of each fine-tuning: all labelled images, or with `labels_per_class` N
    one split per seed: N training images per class (`balanced_subset` with seed + s, the low-data probes'
    subsets) and a seeded class-balanced draw of min(N, rarest validation class) images per class from the
    validation split, so early stopping sees no more labels than the user has."""
    C = data.num_classes
    y_all = data.labels("train")
    rows = labelled_rows(y_all, args.train_limit)
    va_all = labelled_rows(data.labels("val"), None)
    te = labelled_rows(data.labels("test"), args.test_limit) if test else np.zeros(0, dtype=np.int64)
    N = args.labels_per_class
    if not N:
        check_trainable(y_all[rows], f"--train-limit {args.train_limit}")
        return [_Split(rows, va_all, te)]
    counts = np.bincount(y_all[rows], minlength=C)
    if N > counts.min():
        raise IgptError(f"--labels-per-class {N} exceeds the {counts.min()} images of the rarest class")
    y_va = data.labels("val")[va_all]
    va_n = int(min(N, np.bincount(y_va, minlength=C).min())) if len(va_all) else 0
    out = []
    for s in range(args.seeds):
        tr = rows[balanced_subset(y_all[rows], N, args.seed + s)]
        va = va_all[balanced_subset(y_va, va_n, args.seed + 10_000 + s)] if va_n else va_all[:0]
        out.append(_Split(tr, va, te))
    return out


def validation_only(args: FinetuneConfig) -> list[dict[str, Any]]:
    """Fine-tune as `finetune` would but read no test image and save nothing: one result per subset, with
    `best_val_accuracy` and the history. This is how recipes are compared (benchmarks/finetune_sweep.py):
    a choice made on test would leak it."""
    clock = Clock(args.minutes)
    info, backbone, data = _open(args)
    args, note = resolve_head(args, info)
    _check_head(args, backbone, data)
    splits = _subsets(args, data, test=False)
    if note:
        print(note, file=sys.stderr)
    return [res for res, _ in _fit_subsets(args, info, backbone, data, splits, clock)]


def _fit_subsets(
    args: FinetuneConfig,
    info: Run,
    backbone: IGPT,
    data: PreparedData,
    splits: list[_Split],
    clock: Clock,
    share: Share | None = None,
) -> list[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """`_fit_one` on each split in turn, each from the run's weights (scratch makes its own), seeded
    seed + s, the subsets sharing what is left of the clock equally: (result, best weights) per split."""
    out = []
    for s, split in enumerate(splits):
        clock.share(len(splits) - s)
        if len(splits) > 1:
            print(f"igpt finetune: subset {s + 1}/{len(splits)}", file=sys.stderr)
        if s > 0 and args.init == "pretrained":
            backbone = info.load_model()  # every subset starts from the same weights
        out.append(_fit_one(args, info, backbone, data, split, args.seed + s, clock, share or Share()))
    return out


def _open(args: FinetuneConfig) -> tuple[Run, IGPT, PreparedData]:
    """The run to fine-tune, its backbone and data, with the checks that need them."""
    info, backbone, data = open_labelled_run(args.run, args.data)
    if args.init == "scratch" and info.kind == "finetuned":
        raise IgptError(
            f"{args.run} is a fine-tuned run; the from-scratch control (--init scratch) takes the pretrained "
            "run it came from, so both share the architecture and the data"
        )
    if args.pool != "probe":
        _check_head(args, backbone, data)
    return info, backbone, data


def _check_head(args: FinetuneConfig, backbone: IGPT, data: PreparedData) -> None:
    check_pool(args.pool, data.resolution)
    if args.layer is not None:
        check_layer(args.layer, backbone.config.n_layer)


def _finetune(args: FinetuneConfig) -> dict[str, Any]:
    clock = Clock(args.minutes)
    env = Dist(args.device)  # under torchrun: DDP over the processes
    try:
        share = Share(env.world, env.rank, env.device, sharded=args.fsdp and env.world > 1)
        if args.fsdp and env.world == 1:
            raise IgptError(
                "--fsdp shards the model over torchrun processes; launch with torchrun --nproc_per_node N"
            )
        if env.world > 1:
            check_same_settings(env, asdict(args))
            _check_shareable(args, env.world)
            args.device = env.device
        if not env.main:
            _finetune_locked(args, clock, share)
            return {}
        # a second fine-tuning into OUT is refused, not raced (rank 0 holds the lock for every rank)
        with exclusive(args.out, "fine-tuning into"):
            return _finetune_locked(args, clock, share)
    finally:
        env.close()


def _check_shareable(args: FinetuneConfig, world: int) -> None:
    """What a fine-tuning across `world` processes refuses, in one line on every rank."""
    if args.labels_per_class:
        raise IgptError(
            "the low-data fine-tunings (--labels-per-class) run in one process (they are small); run them "
            "without torchrun"
        )
    if args.batch_size % world:
        raise IgptError(
            f"--batch-size {args.batch_size} is the global batch; it must divide by the {world} processes"
        )


def _finetune_locked(args: FinetuneConfig, clock: Clock, share: Share) -> dict[str, Any]:
    info, backbone, data = _open(args)
    args, note = resolve_head(args, info)
    _check_head(args, backbone, data)
    splits = _subsets(args, data)
    if note and share.main:  # said once every setting has been checked
        print(note, file=sys.stderr)
    L = backbone.config.n_layer
    fits = _fit_subsets(args, info, backbone, data, splits, clock, share)
    if not share.main:  # rank 0 writes
        return {}
    results = [res for res, _ in fits]
    result = results[0]
    if len(results) > 1:
        accs = [r["test_accuracy"] for r in results]
        result = {
            **{k: v for k, v in results[0].items() if k != "history"},
            "test_accuracy": float(np.mean(accs)),
            "mean_accuracy": float(np.mean(accs)),
            "std_accuracy": float(np.std(accs)),
            "accuracies": accs,
            "best_epochs": [r["best_epoch"] for r in results],
            "subsets": results,
            "saved_subset": 0,
            "seconds": round(sum(r["seconds"] for r in results), 2),
        }
    shape = dataclasses.replace(backbone.config, n_layer=args.layer or L)  # the blocks the head reads
    result["world_size"] = share.world  # the processes that shared the work
    result["minutes"] = args.minutes
    result["seconds_total"] = round(time.perf_counter() - clock.start, 2)
    save_finetuned(Path(args.out), fits[0][1], info, shape, data.num_classes, data, result, args.pool)
    return result


def _recipe(
    args: FinetuneConfig,
    info: Run,
    backbone: IGPT,
    data: PreparedData,
    split: _Split,
    seed: int,
    share: Share,
) -> Recipe:
    """The classifier (pretrained or, for the control, freshly initialised with `seed`) with its head
    started from a probe of the features, and the recipe around it; prints the start-up line."""
    C = data.num_classes
    torch.manual_seed(seed)
    if args.layer is not None:
        backbone = truncate(backbone, args.layer)
    if args.init == "scratch":
        backbone = IGPT(backbone.config)  # same shape, random weights (seeded above)
    model = Classifier(backbone, C, args.pool, data.resolution, data.meta["order"]).to(args.device).train()
    head_rows = split.train[:10_000]
    labels = data.labels("train")[np.sort(head_rows)]
    probe = args.head_init == "probe"
    va = np.sort(split.val)  # the probe start chooses its L2 strength on the rows early stopping reads
    val = (np.asarray(data.tokens("val")[va], dtype=np.int64), data.labels("val")[va]) if probe else None
    head_lambda = standardise_head(
        model, tokens_rows(data, head_rows), labels, C, args.device, probe=probe, val=val
    )
    train = info.train_config
    lr = args.lr or (MUON_LR if args.optimizer == "muon" else (train.lr if train else 1e-3) / 10)
    net = over_processes(model, args, share)  # before the optimizer: FSDP makes the parameters shards
    opt = make_optimizer(model, args, lr)
    flip = data.meta.get("dataset") not in NO_FLIP
    R, order = data.resolution, data.meta["order"]
    aug = Augment(R, order, max(1, R // 8), flip) if args.augment else None
    steps_per_epoch = math.ceil(len(split.train) / args.batch_size)
    compiled = args.compile if args.compile is not None else len(split.train) >= COMPILE_MIN_ROWS
    precision, why = args.precision, ""
    if precision == "auto":
        precision, why = auto_precision(args.device, model.backbone.config.n_embd)
    if share.main:
        print(
            _startup_line(args, model, split, (lr, flip, aug is not None, precision, why, compiled), share),
            file=sys.stderr,
        )
    return Recipe(
        model=model,
        opt=opt,
        lr=lr,
        aug=aug,
        flip=flip,
        mask_ratio=train.mask_ratio if train else 0.15,  # BERT: mask as the backbone was pretrained
        gen=torch.Generator().manual_seed(seed),
        total_steps=steps_per_epoch * args.epochs,
        forward=CompiledOrEager(net, "the fine-tuning forward", enabled=compiled),
        budget_seconds=None,  # set by `_fit_one` from the clock once set-up is paid for
        precision=precision,
        precision_reason=why,
        head_lambda=head_lambda,
        share=share,
    )


def _startup_line(args: FinetuneConfig, model: Classifier, split: _Split, how: tuple, share: Share) -> str:
    """The line a fine-tuning starts with: the head, the rows, the recipe (`how`: rate, flips, augmentation,
    precision and why, compiled) and the processes."""
    lr, flip, augment, precision, why, compiled = how
    procs = f" ({share.world} processes)" if share.world > 1 else ""
    decay = f" (layer decay {args.layer_decay:g})" if args.layer_decay < 1 else ""
    steps = math.ceil(len(split.train) / args.batch_size)
    layer, augmented = model.backbone.config.n_layer, "shifts" + (" + flips" if flip else "")
    return (
        f"igpt finetune{procs} ({args.init} init, {args.pool} pool of layer {layer}): "
        f"{len(split.train):,} training / {len(split.val):,} validation / {len(split.test):,} test images, "
        f"{model.head.out_features} classes; {args.optimizer}, lr {lr:g}{decay}, gen weight "
        f"{args.gen_weight:g}, batch {args.batch_size}, up to {args.epochs} epochs x {steps} steps; "
        f"augment {augmented if augment else 'off'}; {precision}{f' ({why})' if why else ''}"
        f"{', compiled' if compiled else ''}"
    )


def _fit_one(
    args: FinetuneConfig,
    info: Run,
    backbone: IGPT,
    data: PreparedData,
    split: _Split,
    seed: int,
    clock: Clock | None = None,
    share: Share | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Train one classifier on `split` (early stopping on its validation rows) and score its best epoch on
    the test rows, within this subset's share of the clock: (result, the best epoch's weights)."""
    clock = clock or Clock(args.minutes)
    t_setup = time.perf_counter()
    share = share or Share()
    r = _recipe(args, info, backbone, data, split, seed, share)
    tr, va, te = split.train, split.val, split.test
    y_va, tok_va = data.labels("val"), data.tokens("val")

    def val_accuracy() -> float:
        return (
            share.accuracy(r.model, tok_va[va], y_va[va], args.device, r.precision) if len(va) else math.nan
        )

    stop = EarlyStopping(args.patience)
    t_val = time.perf_counter()
    initial_val = val_accuracy() if len(va) else None
    t_val = time.perf_counter() - t_val
    if initial_val is not None:  # epoch 0, the head's start, is a candidate too: training must beat it
        stop.update(0, initial_val, r.model)
    # the end needs one more validation pass, the test pass (at the validation pass's rate) and the save
    evaluation = t_val * (1 + len(te) / len(va)) if len(va) else 0.0
    budget = clock.training_seconds(evaluation + SAVE_SECONDS)
    r.budget_seconds = share.agree([budget or 0.0])[0] or None  # rank 0's
    r.started = t0 = time.perf_counter()  # the schedule's clock starts with training

    history = _train_epochs(args, r, data, tr, stop, val_accuracy, early=bool(len(va)))
    stop.restore(r.model)
    t_test = time.perf_counter()
    test_acc = (
        share.accuracy(r.model, data.tokens("test")[te], data.labels("test")[te], args.device, r.precision)
        if len(te)
        else None
    )
    times = {"set_up": t0 - t_setup, "training": t_test - t0, "test": time.perf_counter() - t_test}
    record = {"initial_val_accuracy": initial_val, "history": history, "seconds_split": times}
    best = full_weights(r.model, share) if share.sharded else stop.state  # restored above: the best epoch's
    return _result(args, r, split, stop, test_acc, record), best


def _train_epochs(
    args: FinetuneConfig,
    r: Recipe,
    data: PreparedData,
    rows: np.ndarray,
    stop: EarlyStopping,
    val_accuracy: Any,
    early: bool,
) -> list[dict[str, Any]]:
    """Epochs until `args.epochs`, early stopping (with validation rows: `early`) or the clock ends them;
    returns the history, one row per epoch."""
    history = []
    for epoch in range(1, args.epochs + 1):
        loss = train_epoch(args, r, data, rows, epoch)
        val = val_accuracy()
        history.append({"epoch": epoch, "train_loss": loss, "val_accuracy": val})
        say = r.share.main  # every rank reaches the same decisions from the same summed counts
        if args.progress and say:
            print(f"epoch {epoch}: train loss {loss:.4f}, val accuracy {val:.4f}", file=sys.stderr)
        if stop.update(epoch, val, r.model, always=not early):
            if say:
                print(f"early stop: no validation gain for {args.patience} epochs", file=sys.stderr)
            break
        if r.clock()[1]:
            if say:
                print("stopping: --minutes budget reached", file=sys.stderr)
            break
    return history


def _result(
    args: FinetuneConfig,
    r: Recipe,
    split: _Split,
    stop: EarlyStopping,
    test_acc: float | None,
    record: dict[str, Any],
) -> dict[str, Any]:
    """One fine-tuning's result, as finetune.json holds it (`record`: the initial validation accuracy, the
    history and the seconds of set-up, training and test)."""
    tr, va, te = split.train, split.val, split.test
    times = record["seconds_split"]
    return {
        "test_accuracy": test_acc,
        "best_epoch": stop.best_epoch,
        "steps": r.step,
        "best_val_accuracy": stop.best_score if len(va) else None,
        "initial_val_accuracy": record["initial_val_accuracy"],
        "head_lambda": r.head_lambda,
        "history": record["history"],
        "init": args.init,
        "optimizer": args.optimizer,
        "pool": args.pool,
        "layer": r.model.backbone.config.n_layer,
        "labels_per_class": args.labels_per_class,
        "n_train": len(tr),
        "n_val": len(va),
        **({"train_rows": [int(x) for x in np.sort(tr)]} if args.labels_per_class else {}),
        "n_test": len(te),
        "val_rows": (
            "the whole prepared validation split"
            if not args.labels_per_class
            else "a seeded class-balanced draw of at most labels_per_class images per class from the "
            "validation split"
        ),
        "objective": r.model.backbone.config.objective,
        "settings": asdict(args)
        | {
            "lr": r.lr,
            "flip": r.flip,
            "precision": r.precision,
            "precision_reason": r.precision_reason,
            "compile": r.forward.active,
        },
        "seconds": round(times["training"], 2),
        "seconds_split": {k: round(v, 2) for k, v in times.items()},
        "pretrained_run": str(Path(args.run).resolve()),
    }
