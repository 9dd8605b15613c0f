"""Fine-tuning's training loop (`train_epoch`) and its moving parts (`Recipe`), in one process or several
(torchrun, DDP). Across processes every rank draws the same seeded order, augmentation and masks for the
whole global batch and trains on its contiguous share of it, the loss weighted so that DDP's averaged
gradient is the gradient of the global batch's mean loss: a 2-process run follows a 1-process run at the
same seed. Rank 0's clock decides the schedule's progress and the end (broadcast each step), and
validation and test counts are summed over the ranks' shares (`Share.accuracy`)."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from igpt.data.prepared import PreparedData
from igpt.errors import IgptError
from igpt.model.compiling import CompiledOrEager
from igpt.training.engine import autocast, bert_mask, grad_norm, lr_at
from igpt.training.optim import Optimizers

from .classifier import Augment, Classifier, accuracy
from .config import FinetuneConfig

BATCH = 128
"""Images per evaluation batch."""


@dataclass
class Share:
    """This process's place among torchrun's (world 1, rank 0: one process, and every method the plain
    thing)."""

    world: int = 1
    rank: int = 0
    device: str = "cpu"
    """The training device: the collectives' tensors live there (NCCL takes CUDA tensors only)."""
    sharded: bool = False
    """FSDP: every rank must run every forward, so shares are padded to the same number of batches."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> tuple[int, int, float]:
        """This rank's contiguous rows [a, b) of a global batch of `n`, and the weight of its mean loss:
        its share of the rows times the world, since DDP averages the ranks' gradients. A rank with no row
        (a last batch smaller than the world) trains on one row at weight 0, so every rank still steps."""
        a, b = n * self.rank // self.world, n * (self.rank + 1) // self.world
        if a == b:
            return 0, 1, 0.0
        return a, b, (b - a) * self.world / n

    def agree(self, values: list[float]) -> list[float]:
        """Rank 0's `values` on every rank (its clock's reading: the schedule and the end)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return t.tolist()

    def total(self, values: list[float]) -> list[float]:
        """`values` summed over the ranks."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def accuracy(
        self, model: Classifier, tokens: np.ndarray, labels: np.ndarray, device: str, precision: str
    ) -> float:
        """`classifier.accuracy` over all of `tokens`, each rank scoring its contiguous share (under FSDP in
        as many batches as the largest share needs: a sharded forward is a collective)."""
        n = len(tokens)
        a, b = n * self.rank // self.world, n * (self.rank + 1) // self.world
        batches = math.ceil(math.ceil(n / self.world) / BATCH) if self.sharded else None
        correct = accuracy(model, tokens[a:b], labels[a:b], device, precision, BATCH, batches) * (b - a)
        right, rows = self.total([correct, b - a])
        return right / max(1.0, rows)


@dataclass
class Recipe:
    """One fine-tuning's moving parts: the classifier, its optimizer and schedule, augmentation, the
    generator that orders batches and draws masks, the (possibly compiled, under torchrun DDP-wrapped)
    forward, and the processes sharing it."""

    model: Classifier
    opt: torch.optim.Optimizer | Optimizers
    lr: float
    aug: Augment | None
    flip: bool
    mask_ratio: float
    gen: torch.Generator
    total_steps: int
    forward: CompiledOrEager
    budget_seconds: float | None
    precision: str
    precision_reason: str
    head_lambda: float | None = None
    started: float = dataclasses.field(default_factory=time.perf_counter)
    step: int = 0
    share: Share = dataclasses.field(default_factory=Share)

    def progress(self) -> float:
        """How far through the schedule the next step is: by steps, or by the clock where a time budget
        would end the run first (as pretraining does), so the rate decays within the budget."""
        p = (self.step + 1) / self.total_steps
        if self.budget_seconds:
            p = max(p, (time.perf_counter() - self.started) / self.budget_seconds)
        return p

    def out_of_time(self) -> bool:
        """Whether the time budget, counted on the schedule's clock, is spent."""
        return bool(self.budget_seconds) and time.perf_counter() - self.started > self.budget_seconds

    def clock(self) -> tuple[float, bool]:
        """(progress, out of time) by rank 0's clock, on every rank."""
        p, late = self.share.agree([self.progress(), float(self.out_of_time())])
        return p, bool(late)


def clip_gradients(model: torch.nn.Module, share: Share, most: float = 1.0) -> None:
    """Scale the gradients down to a global norm of at most `most`: torch's clip in one process or under
    DDP; under FSDP each rank holds shards of the gradients, whose squares are summed over the ranks
    (`engine.grad_norm`), so every rank scales by the same factor."""
    if not share.sharded:
        torch.nn.utils.clip_grad_norm_(model.parameters(), most)
        return
    params = [p for p in model.parameters() if p.grad is not None]
    norm = grad_norm(params, sharded=True, device=share.device)
    coef = min(1.0, most / (norm + 1e-6))
    for p in params:
        p.grad.mul_(coef)


def train_epoch(args: FinetuneConfig, r: Recipe, data: PreparedData, rows: np.ndarray, epoch: int) -> float:
    """One pass over `rows` in a seeded order (cut short when the budget runs out): the joint loss
    L_CLF + gen_weight * L_GEN, clipped optimizer steps on the shared schedule. Returns the mean over steps
    of the global batch's loss."""
    from tqdm import tqdm

    y_all, tokens, device = data.labels("train"), data.tokens("train"), args.device
    causal = r.model.backbone.causal
    perm = rows[torch.randperm(len(rows), generator=r.gen).numpy()]
    losses: list[float] = []  # this rank's part of each step's global mean loss
    bar = tqdm(
        range(0, len(perm), args.batch_size),
        desc=f"epoch {epoch}",
        unit="step",
        leave=False,
        disable=not args.progress or not r.share.main,
        mininterval=1.0,
        file=sys.stderr,
    )
    for s in bar:
        progress, late = r.clock()  # one collective a step: rank 0's clock sets the rate and the end
        if late and losses:
            break  # the epoch is cut short; it is still validated and may be the best
        idx = np.sort(perm[s : s + args.batch_size])
        x = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
        if r.aug is not None:  # drawn for the whole global batch on every rank: the 1-process draws
            x = r.aug(x, r.gen)
        y = torch.from_numpy(y_all[idx]).to(device)
        mask = None if causal else bert_mask(tuple(x.shape), r.mask_ratio, r.gen).to(device)
        a, b, weight = r.share.rows(len(idx))  # this rank's rows of the global batch
        x, y, mask = x[a:b], y[a:b], None if mask is None else mask[a:b]
        for g in r.opt.param_groups:
            g["lr"] = lr_at(progress, r.lr, 0.05) * g["scale"]
        with autocast(device, r.precision):
            logits, l_gen = r.forward(x.to(device), mask if args.gen_weight > 0 else None)
        loss = F.cross_entropy(logits.float(), y) + args.gen_weight * l_gen.float()
        if not torch.isfinite(loss):  # a result from here on would be the untrained start's, or noise
            raise IgptError(
                f"the fine-tuning loss became {float(loss.detach())} at step {r.step + 1}; nothing was "
                "written; try a lower --lr"
            )
        r.opt.zero_grad(set_to_none=True)
        (loss * weight).backward()
        clip_gradients(r.model, r.share)
        r.opt.step()
        r.step += 1
        losses.append(float(loss.detach()) * weight / r.share.world)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]) * r.share.world:.4f}", refresh=False)
    bar.close()
    return float(np.mean(r.share.total(losses))) if losses else float("nan")


def over_processes(model: Classifier, args: FinetuneConfig, share: Share) -> torch.nn.Module:
    """The module the training step runs: the classifier in one process; under torchrun, DDP (every rank
    starts from the same seeded weights and the gradients are averaged) or, with --fsdp, the classifier
    itself sharded in place (each block, then the whole)."""
    if share.world == 1:
        return model
    if share.sharded:
        from torch.distributed.fsdp import fully_shard

        for block in model.backbone.h:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(args.device).index] if "cuda" in args.device else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=not model.backbone.causal)


def full_weights(model: Classifier, share: Share) -> dict[str, torch.Tensor]:
    """The classifier's whole weights on the CPU: gathered from the shards under FSDP (every rank takes part;
    rank 0 keeps them), its own state otherwise."""
    if not share.sharded:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
