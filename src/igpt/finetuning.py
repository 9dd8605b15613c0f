"""The finetune stage: the pretrained backbone plus a linear head on the average-pooled final normed states,
trained on L_CLF + gen_weight x L_GEN (the run's own objective), with early stopping on a validation split
taken from the training split, and augmentation (shifts, and flips where they suit the data)."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from .compiling import CompiledOrEager
from .data import PreparedData
from .engine import NO_FLIP, bert_mask, lr_at, mirror_index, random_flips
from .errors import IgptError
from .files import atomic_directory, write_json_atomic
from .model import IGPT
from .palette import order_index
from .probing import (
    balanced_subset,
    extract_features,
    fit_logistic,
    labelled_rows,
    open_labelled_run,
)
from .runs import Run


class Classifier(nn.Module):
    """Backbone + linear head on mean-pooled final normed states; `forward` returns (class logits, L_GEN).

    The pooled features are standardised with fixed statistics of the training set (buffers set by
    `standardise_head`) before the head: averaged over positions they vary little between images, and a head
    on the raw pool needs weights so large that it learns slowly and amplifies every change of the
    backbone."""

    def __init__(self, backbone: IGPT, num_classes: int):
        super().__init__()
        self.backbone = backbone
        d = backbone.config.n_embd
        self.head = nn.Linear(d, num_classes)
        self.register_buffer("feat_mean", torch.zeros(d))
        self.register_buffer("feat_std", torch.ones(d))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone.final_states(tokens, mask)  # (B, T, d)
        logits = self.head((h.mean(1) - self.feat_mean) / self.feat_std)  # (B, C)
        gen = self.backbone.lm_head(h)  # (B, T, K)
        if self.backbone.causal:
            l_gen = F.cross_entropy(gen.flatten(0, 1), tokens.flatten())
        elif mask is not None and mask.any():
            l_gen = F.cross_entropy(gen[mask], tokens[mask])
        else:
            l_gen = gen.sum() * 0.0
        return logits, l_gen


class Augment:
    """Random flips (`engine.random_flips`, where `flip` is set) and translations up to `shift` pixels (edges
    replicated: a crop of a padded image), applied in token space for either sequence order."""

    def __init__(self, resolution: int, order: str, shift: int, flip: bool):
        self.R, self.shift = resolution, shift
        self.mirror = mirror_index(resolution, order) if flip else None
        self.seq_to_raster = torch.from_numpy(np.argsort(order_index(resolution, order)))
        self.raster_to_seq = torch.from_numpy(order_index(resolution, order))

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        B, R = x.shape[0], self.R
        if self.mirror is not None:
            x = random_flips(x, torch.rand(B, generator=gen) < 0.5, self.mirror)
        g = x[:, self.seq_to_raster]  # (B, R*R) in raster order
        ii = torch.arange(R)
        dy = torch.randint(-self.shift, self.shift + 1, (B, 1, 1), generator=gen)
        dx = torch.randint(-self.shift, self.shift + 1, (B, 1, 1), generator=gen)
        rows = (ii.view(1, R, 1) - dy).clamp(0, R - 1)
        cols = (ii.view(1, 1, R) - dx).clamp(0, R - 1)
        idx = (rows * R + cols).view(B, R * R)
        return g.gather(1, idx)[:, self.raster_to_seq]


def tokens_rows(data: PreparedData, rows: np.ndarray) -> np.ndarray:
    return np.asarray(data.tokens("train")[np.sort(rows)], dtype=np.int64)


def standardise_head(
    model: Classifier, tokens: np.ndarray, labels: np.ndarray, C: int, device: str, probe: bool
) -> None:
    """Set the head's feature statistics from up to 10,000 training rows and, with `probe`, start the head
    at a linear probe of those standardised features (linear probe, then fine-tune) instead of at zero."""
    n = model.backbone.config.n_layer
    x = extract_features(model.backbone, tokens, [n], device=device)[n]
    model.feat_mean.copy_(x.mean(0))
    model.feat_std.copy_(x.std(0).clamp(min=1e-6))
    if probe:
        p = fit_logistic(
            x,
            torch.from_numpy(labels),
            C,
            1e-2,
            stats=(model.feat_mean.cpu(), model.feat_std.cpu()),
            device=device,
        )
        with torch.no_grad():
            model.head.weight.copy_(p.weight.T)
            model.head.bias.copy_(p.bias)
    model.train()


@torch.no_grad()
def accuracy(
    model: Classifier, tokens: np.ndarray, labels: np.ndarray, device: str, batch: int = 128
) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(tokens), batch):
        x = torch.from_numpy(np.asarray(tokens[s : s + batch], dtype=np.int64)).to(device)
        pred = model(x)[0].argmax(-1).cpu().numpy()
        correct += int((pred == labels[s : s + batch]).sum())
    model.train()
    return correct / max(1, len(tokens))


@dataclass
class FinetuneConfig:
    """Every setting of one fine-tuning; `finetune()` builds it from its keyword arguments."""

    run: str
    """The pretrained (or converted) run directory."""
    out: str
    """The directory to write the fine-tuned run to (must not exist, or be empty)."""
    epochs: int = 5
    """Most epochs to train (early stopping may end sooner)."""
    minutes: float | None = None
    """Stop after this many minutes, keeping the best epoch (an epoch may be cut short)."""
    lr: float | None = None
    """Peak learning rate; default the pretraining's lr / 10."""
    gen_weight: float = 1.0
    """Weight of L_GEN (the run's own generative loss) beside L_CLF."""
    labels_per_class: int | None = None
    """Fine-tune on N labelled images per class (the low-data regime)."""
    augment: bool = True
    """Random shifts, and flips where the data suits them (see `engine.mirror_index`)."""
    head_init: str = "probe"
    """probe (start the head at a linear probe of the features) or zero."""
    batch_size: int = 32
    """Images per step."""
    patience: int = 2
    """Epochs without validation gain before stopping."""
    train_limit: int | None = None
    """Use only the first N labelled training images."""
    test_limit: int | None = None
    """Use only the first N labelled test images."""
    data: str | None = None
    """Prepared directory (default: the run's own)."""
    device: str = "cpu"
    """cpu or cuda."""
    seed: int = 0
    """Seed of the split, the order, augmentation and masks."""
    compile: bool = False
    """torch.compile the training forward (eagerly if compiling fails)."""
    progress: bool = True
    """Progress bars and per-epoch lines on stderr."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise IgptError("--epochs, --batch-size and --patience must be at least 1")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise IgptError("--lr must be positive")
        if self.minutes is not None and not (math.isfinite(self.minutes) and self.minutes > 0):
            raise IgptError(f"--minutes must be a positive number, got {self.minutes}")
        if not (math.isfinite(self.gen_weight) and self.gen_weight >= 0):
            raise IgptError("--gen-weight must be 0 or more")
        if self.labels_per_class is not None and self.labels_per_class < 1:
            raise IgptError(f"--labels-per-class must be at least 1, got {self.labels_per_class}")
        if not 0 <= self.seed < 2**32:
            raise IgptError(f"--seed must be in [0, 2^32), got {self.seed}")
        if self.head_init not in ("probe", "zero"):
            raise IgptError(f"--head-init must be probe or zero, got '{self.head_init}'")
        for name in ("train_limit", "test_limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise IgptError(f"--{name.replace('_', '-')} must be positive")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise IgptError(f"--device must be cpu or cuda, got '{self.device}'")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise IgptError("--device cuda, but no CUDA GPU is available")
        out = Path(self.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise IgptError(f"{out} exists and is not empty; choose another --out")


def finetune(run: str | Path, out: str | Path, **settings: Any) -> dict[str, Any]:
    """Fine-tune a run's backbone with a classification head into the run directory `out`, and return what
    is written to OUT/finetune.json. Keyword arguments are `FinetuneConfig`'s fields, named as the command's
    flags: `igpt.finetune("runs/r", out="runs/ft", epochs=1)`. `igpt.load_run(out)` opens the result (the
    fine-tuned backbone); `load_classifier(out)` gives backbone and head."""
    known = set(FinetuneConfig.__dataclass_fields__) - {"run", "out"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"finetune() got unknown settings {unknown}; it takes {sorted(known)}")
    return _finetune(FinetuneConfig(run=str(run), out=str(out), **settings))


def _finetune(args: FinetuneConfig) -> dict[str, Any]:
    info, backbone, data = open_labelled_run(args.run, args.data)
    device = args.device
    C = data.num_classes
    y_all = data.labels("train")
    rows = labelled_rows(y_all, args.train_limit)
    if args.labels_per_class:
        counts = np.bincount(y_all[rows], minlength=C)
        if args.labels_per_class > counts.min():
            raise IgptError(
                f"--labels-per-class {args.labels_per_class} exceeds the {counts.min()} images of the "
                "rarest class"
            )
        rows = rows[balanced_subset(y_all[rows], args.labels_per_class, args.seed)]
    tr = rows
    va = labelled_rows(data.labels("val"), None)  # the prepared validation split: early stopping, best epoch
    y_va, tok_va = data.labels("val"), data.tokens("val")
    te = labelled_rows(data.labels("test"), args.test_limit)
    if len(tr) < 1:
        raise IgptError("no labelled training images")
    torch.manual_seed(args.seed)
    model = Classifier(backbone, C).to(device).train()
    standardise_head(
        model,
        tokens_rows(data, tr[:10_000]),
        y_all[np.sort(tr[:10_000])],
        C,
        device,
        probe=args.head_init == "probe",
    )
    train = info.train_config
    pre_lr = train.lr if train else 1e-3
    mask_ratio = train.mask_ratio if train else 0.15  # BERT: mask as the backbone was pretrained
    lr = args.lr or pre_lr / 10
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    flip = data.meta.get("dataset") not in NO_FLIP
    aug = (
        Augment(data.resolution, data.meta["order"], max(1, data.resolution // 8), flip)
        if args.augment
        else None
    )
    steps_per_epoch = math.ceil(len(tr) / args.batch_size)
    total = steps_per_epoch * args.epochs
    gen = torch.Generator().manual_seed(args.seed)
    tokens = data.tokens("train")
    print(
        f"igpt finetune: {len(tr):,} training / {len(va):,} validation / {len(te):,} test images, "
        f"{C} classes; "
        f"lr {lr:g}, gen weight {args.gen_weight:g}, batch {args.batch_size}, up to {args.epochs} epochs x "
        f"{steps_per_epoch} steps; augment {'shifts' + (' + flips' if flip else '') if aug else 'off'}",
        file=sys.stderr,
    )
    initial_val = accuracy(model, tok_va[va], y_va[va], device) if len(va) else None
    history, best, best_state, bad_epochs, step = [], (-1.0, -1), None, 0, 0
    t0 = time.perf_counter()
    from tqdm import tqdm

    train_forward = CompiledOrEager(model, "the fine-tuning forward", enabled=args.compile)
    for epoch in range(1, args.epochs + 1):
        perm = tr[torch.randperm(len(tr), generator=gen).numpy()]
        losses = []
        bar = tqdm(
            range(0, len(perm), args.batch_size),
            desc=f"epoch {epoch}",
            unit="step",
            leave=False,
            disable=not args.progress,
            mininterval=1.0,
            file=sys.stderr,
        )
        for s in bar:
            idx = np.sort(perm[s : s + args.batch_size])
            x = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
            if aug is not None:
                x = aug(x, gen)
            y = torch.from_numpy(y_all[idx]).to(device)
            mask = None if backbone.causal else bert_mask(tuple(x.shape), mask_ratio, gen).to(device)
            x = x.to(device)
            for g in opt.param_groups:
                g["lr"] = lr_at((step + 1) / total, lr, 0.05)
            logits, l_gen = train_forward(x, mask if args.gen_weight > 0 else None)
            loss = F.cross_entropy(logits, y) + args.gen_weight * l_gen
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", refresh=False)
            if args.minutes and time.perf_counter() - t0 > 60 * args.minutes:
                break  # the epoch is cut short; it is still validated and may be the best
        bar.close()
        val = accuracy(model, tok_va[va], y_va[va], device) if len(va) else float("nan")
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_accuracy": val})
        print(f"epoch {epoch}: train loss {np.mean(losses):.4f}, val accuracy {val:.4f}", file=sys.stderr)
        if not len(va) or val > best[0]:
            best, bad_epochs = (val, epoch), 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
            if bad_epochs >= args.patience:
                print(f"early stop: no validation gain for {args.patience} epochs", file=sys.stderr)
                break
        if args.minutes and time.perf_counter() - t0 > 60 * args.minutes:
            print("stopping: --minutes budget reached", file=sys.stderr)
            break
    model.load_state_dict(best_state)
    test_acc = accuracy(model, data.tokens("test")[te], data.labels("test")[te], device)
    result = {
        "test_accuracy": test_acc,
        "best_epoch": best[1],
        "best_val_accuracy": best[0] if len(va) else None,
        "initial_val_accuracy": initial_val,
        "history": history,
        "n_train": len(tr),
        "n_val": len(va),
        "n_test": len(te),
        "objective": backbone.config.objective,
        "settings": asdict(args) | {"lr": lr, "flip": flip},
        "seconds": round(time.perf_counter() - t0, 2),
        "pretrained_run": str(Path(args.run).resolve()),
    }
    _save(Path(args.out), best_state, info, C, data, result)
    return result


def _save(
    out: Path, state: dict, pretrained: Run, num_classes: int, data: PreparedData, result: dict
) -> None:
    """FTRUN: model.safetensors (backbone.*, head.* and the feature statistics), run.json (a "finetuned"
    run: the backbone's shape, the classes, the head) and finetune.json; written in a temporary directory and
    renamed into place."""
    with atomic_directory(out) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors")
        finetune = {
            "pretrained_run": str(pretrained.path.resolve()),
            "num_classes": num_classes,
            "class_names": data.meta.get("class_names", []),
            "head": "linear, on the standardised mean of the final normed states",
        }
        Run.create(
            tmp,
            "finetuned",
            pretrained.model_config,
            preset=pretrained.preset,
            data_dir=str(data.dir),
            data_meta=data.meta,
            palette=data.palette,
            finetune=finetune,
        )
        write_json_atomic(tmp / "finetune.json", result)


def load_classifier(run: str | Path, device: str = "cpu") -> Classifier:
    """A fine-tuned run's backbone and head, in eval mode: `model(tokens)` gives (class logits, L_GEN)."""
    r = Run.open(run)
    if r.kind != "finetuned":
        raise IgptError(f"{run} is a {r.kind} run, not a fine-tuned one (igpt finetune makes those)")
    model = Classifier(r.load_model(), int(r.info["finetune"]["num_classes"]))
    model.load_state_dict(r.finetuned_state())
    return model.to(device).eval()
