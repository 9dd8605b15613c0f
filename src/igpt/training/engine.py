"""The shared training engine: deterministic batches from memory-mapped tokens, BERT masks and flips, the
learning-rate schedule, one optimizer step, and validation.

Everything random is a pure function of (seed, step), and batches are cut from a global batch that every
process derives the same way. That is what makes a resumed run follow the uninterrupted one step for step,
and a 2-process run equal a 1-process run with the same global batch.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from igpt.data.palette import from_sequence, to_sequence
from igpt.model.objectives import objective as objective_of


class Batcher:
    """Global batch of step s = images [s*G, (s+1)*G) of an endless stream of seeded epoch permutations."""

    def __init__(self, tokens: np.ndarray, global_batch: int, seed: int):
        self.tokens, self.global_batch, self.seed = tokens, global_batch, seed
        self.n = len(tokens)
        self._perm_epoch, self._perm = -1, None

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int) -> np.ndarray:
        """Dataset rows of the global batch of `step`."""
        start = step * self.global_batch
        out, pos = [], start
        while pos < start + self.global_batch:
            epoch, off = divmod(pos, self.n)
            take = min(self.n - off, start + self.global_batch - pos)
            out.append(self._epoch_perm(epoch)[off : off + take])
            pos += take
        return np.concatenate(out)

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n

    def batch(self, step: int, rows: slice) -> torch.Tensor:
        """Tokens (b, T) int64 of a slice of the global batch, read from the memory map (sorted reads)."""
        idx = self.indices(step)[rows]
        order = np.argsort(idx, kind="stable")
        block = np.empty((len(idx), self.tokens.shape[1]), dtype=self.tokens.dtype)
        block[order] = self.tokens[idx[order]]
        return torch.from_numpy(block.astype(np.int64))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The RNG of one global step (masks, flips): the same on every process and after a resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


def bert_mask(shape: tuple[int, int], ratio: float, gen: torch.Generator) -> torch.Tensor:
    """(B, T) bool: exactly round(ratio * T) masked positions per image (at least one)."""
    B, T = shape
    n = max(1, round(ratio * T))
    scores = torch.rand(B, T, generator=gen)
    idx = scores.topk(n, dim=1).indices
    return torch.zeros(B, T, dtype=torch.bool).scatter_(1, idx, True)


# Datasets whose classes do not survive mirroring (a mirrored 2 is no 2): fine-tuning does not flip them.
NO_FLIP = frozenset({"mnist", "digits"})


def mirror_index(resolution: int, order: str) -> torch.Tensor:
    """The sequence permutation that mirrors an image left to right, for either order: `x[:, idx]`.

    The one rule for flips: they suit data whose classes survive mirroring (clothes, photographs, most
    objects) and not glyphs (`NO_FLIP`). Pretraining flips only when asked (`flip=True`); fine-tuning's
    augmentation flips unless the dataset is in `NO_FLIP`. Both go through `random_flips`."""
    seq = np.arange(resolution * resolution)
    grid = from_sequence(seq, resolution, order)
    return torch.from_numpy(to_sequence(grid[:, ::-1].copy(), order).astype(np.int64))


def random_flips(x: torch.Tensor, flips: torch.Tensor, mirror: torch.Tensor) -> torch.Tensor:
    """Tokens (B, T) with the rows where `flips` (B,) is True mirrored by `mirror_index`'s permutation."""
    return torch.where(flips[:, None], x[:, mirror], x)


def shift_table(resolution: int, order: str, max_shift: int) -> torch.Tensor:
    """(S, T) gather indices, one row per translation (dy, dx) with |dy|, |dx| <= max_shift (row 0 is no
    shift): row s of `x[:, table[s]]` is the image moved by that offset, its uncovered edge filled by
    replicating the nearest edge pixel (the background, for centred objects such as Fashion-MNIST's)."""
    r = resolution
    seq = np.arange(r * r)
    grid = from_sequence(seq, r, order)  # grid[y, x] = sequence position of pixel (y, x)
    offsets = [(0, 0)] + [
        (dy, dx)
        for dy in range(-max_shift, max_shift + 1)
        for dx in range(-max_shift, max_shift + 1)
        if (dy, dx) != (0, 0)
    ]
    rows = []
    for dy, dx in offsets:
        ys = np.clip(np.arange(r) - dy, 0, r - 1)
        xs = np.clip(np.arange(r) - dx, 0, r - 1)
        rows.append(to_sequence(grid[np.ix_(ys, xs)], order))
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def random_shifts(x: torch.Tensor, choice: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Tokens (B, T) with row b moved by translation `choice[b]` of `shift_table`'s rows."""
    return x.gather(1, table[choice])


def lr_at(
    progress: float, peak: float, warmup: float, schedule: str = "cosine", cooldown: float = 0.2
) -> float:
    """Linear warm-up over the first `warmup` share of the budget, then `schedule`: cosine or linear decay
    to zero, or wsd (the peak held, then a linear decay to zero over the last `cooldown` share)."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return peak * progress / warmup
    if schedule == "wsd":
        return peak * min(1.0, (1.0 - progress) / max(1e-12, cooldown))
    t = (progress - warmup) / max(1e-12, 1.0 - warmup)
    if schedule == "linear":
        return peak * (1.0 - t)
    return peak * 0.5 * (1.0 + math.cos(math.pi * t))


def autocast(device: str, precision: str):
    """bf16 autocast for `precision` bf16 on `device` ("cpu", "cuda" or "cuda:N"); a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokens: np.ndarray,
    n_images: int,
    objective: str,
    mask_ratio: float,
    device: str,
    precision: str,
    batch_size: int = 64,
) -> float:
    """Mean NLL in nats per predicted token on the first `n_images` rows of `tokens` (a validation or test
    split). BERT scores masked positions under fixed seeded masks, so successive evaluations compare."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    gen = step_generator(12345, 0)
    n = min(n_images, len(tokens))
    for s in range(0, n, batch_size):
        x = torch.from_numpy(np.asarray(tokens[s : min(n, s + batch_size)], dtype=np.int64)).to(device)
        masked = objective_of(objective).masks_inputs
        mask = bert_mask(tuple(x.shape), mask_ratio, gen).to(device) if masked else None
        with autocast(device, precision):
            _, loss = model(x, mask, reduction="sum")
        total += float(loss)
        count += int(mask.sum()) if mask is not None else x.numel()
    model.train(was_training)
    return total / max(1, count)


@dataclass(frozen=True)
class StepRecipe:
    """What every pretraining step of a run does the same way: where this process sits in the global batch,
    the objective and its masks, the augmentations, clipping, device and precision."""

    rank: int
    world: int
    grad_accum: int
    objective: str
    mask_ratio: float
    seed: int
    """The run's seed: step `s` draws its masks, flips, shifts and prefix from `step_generator(seed, s)`."""
    grad_clip: float
    device: str
    precision: str
    flip_perm: torch.Tensor | None = None
    shifts: torch.Tensor | None = None
    prefix_causal: bool = False


def train_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batcher: Batcher,
    step: int,
    lr: float,
    recipe: StepRecipe,
) -> tuple[float, float]:
    """One optimizer step over the global batch of `step` at learning rate `lr`; returns (mean loss per
    predicted token over the global batch, gradient norm). The loss of every micro-batch is its summed NLL
    divided by the number of predicted tokens in the whole global batch (times the world size, which DDP's
    gradient averaging divides out), so the gradient is the same however the batch is split across processes
    and micro-steps. Augmentations (`flip_perm`, `shifts`: see `mirror_index`, `shift_table`) and a
    prefix-causal step's prefix length are drawn from the step's generator, so a resumed run repeats them."""
    r = recipe
    rank, world, grad_accum, device, precision = r.rank, r.world, r.grad_accum, r.device, r.precision
    objective, mask_ratio, flip_perm, shifts = r.objective, r.mask_ratio, r.flip_perm, r.shifts
    prefix_causal, grad_clip, seed = r.prefix_causal, r.grad_clip, r.seed
    G = batcher.global_batch
    T = batcher.tokens.shape[1]
    gen = step_generator(seed, step)
    mask = bert_mask((G, T), mask_ratio, gen) if objective_of(objective).masks_inputs else None
    flips = torch.rand(G, generator=gen) < 0.5 if flip_perm is not None else None
    moves = torch.randint(len(shifts), (G,), generator=gen) if shifts is not None else None
    prefix = int(torch.randint(1, T, (), generator=gen)) if prefix_causal else None
    if mask is not None:
        count = int(mask.sum())
    else:
        count = G * (T - prefix + 1) if prefix is not None else G * T
    prefix_t = torch.tensor(prefix, device=device) if prefix is not None else None
    per_rank = G // world
    micro = per_rank // grad_accum
    for g in opt.param_groups:
        g["lr"] = lr * g.get("scale", 1.0)
    total = torch.zeros((), dtype=torch.float64, device=device)  # collectives run on the training device
    for m in range(grad_accum):
        lo = rank * per_rank + m * micro
        rows = slice(lo, lo + micro)
        x = batcher.batch(step, rows)
        if flips is not None:
            x = random_flips(x, flips[rows], flip_perm)
        if moves is not None:
            x = random_shifts(x, moves[rows], shifts)
        mk = mask[rows].to(device) if mask is not None else None
        sync = m == grad_accum - 1 or not hasattr(model, "no_sync")
        with nullcontext() if sync else model.no_sync(), autocast(device, precision):
            _, loss_sum = model(x.to(device), mk, reduction="sum", prefix=prefix_t)
            (loss_sum * (world / count)).backward()
        total += loss_sum.detach().double()
    if world > 1:
        all_reduce(total, device)
    params = [p for p in model.parameters() if p.grad is not None]
    gnorm = grad_norm(params, sharded=world > 1 and _is_sharded(params), device=device)
    if grad_clip > 0 and math.isfinite(gnorm):
        coef = min(1.0, grad_clip / (gnorm + 1e-6))
        for p in params:
            p.grad.mul_(coef)
    loss = float(total) / count
    if math.isfinite(loss) and math.isfinite(gnorm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, gnorm


def all_reduce(t: torch.Tensor, device: str | torch.device, op: dist.ReduceOp = dist.ReduceOp.SUM) -> None:
    """All-reduce `t` in place across the process group. Every collective of training goes through here:
    NCCL takes only CUDA tensors, so a tensor off the training device is refused on any machine (a CPU test
    run catches what would break only on GPUs)."""
    dev = torch.device(device)
    if t.device.type != dev.type:
        raise RuntimeError(f"collective on a {t.device} tensor, but this process trains on {dev}")
    dist.all_reduce(t, op=op)


def _is_sharded(params: list[torch.nn.Parameter]) -> bool:
    return any(hasattr(p.grad, "to_local") for p in params)  # FSDP2 gradients are DTensors


def grad_norm(params: list[torch.nn.Parameter], sharded: bool, device: str | torch.device) -> float:
    """The global L2 norm of the gradients. With `sharded` (FSDP), each process holds a shard of every
    gradient: the squares of the local shards are summed across processes, so every process gets the same
    full norm (and so makes the same decision to step). Replicated (DDP, one process) gradients need no
    collective."""
    local = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]
    sq = torch.stack([g.detach().float().pow(2).sum() for g in local]).sum().to(device)
    if sharded:
        all_reduce(sq, device)
    return float(sq.sqrt())


class EarlyStopping:
    """The best epoch so far by validation score, with a CPU copy of its weights, and whether `patience`
    epochs have passed without beating it: the one early-stopping rule of everything that trains on labels
    (fine-tuning, the attentive probe). Ties keep the earlier epoch."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best_score, self.best_epoch = -math.inf, -1
        self.state: dict[str, torch.Tensor] | None = None
        self.bad_epochs = 0

    def update(self, epoch: int, score: float, module: torch.nn.Module, always: bool = False) -> bool:
        """Record `epoch`'s score; keep the weights when it is the best (or `always`, where there is nothing
        to validate on). Returns True when training should stop."""
        if always or score > self.best_score:
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
            self.state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            return False
        self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def restore(self, module: torch.nn.Module) -> None:
        """Load the best epoch's weights back into `module`."""
        if self.state is not None:
            module.load_state_dict(self.state)
