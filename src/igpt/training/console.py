"""What pretraining prints: the start-up lines (model, batch arithmetic, optimizer and schedule, device and
precision), the progress bar, and TensorBoard where it is installed. Rank 0 only; nothing here changes
training."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from igpt.data.prepared import PreparedData
from igpt.hardware import muon_ns_dtype
from igpt.model.gpt import IGPT

from .config import TrainConfig
from .distributed import Dist

SCHEDULE_WORDS = {
    "cosine": "cosine to 0",
    "linear": "linear to 0",
    "wsd": "stable, then linear to 0 over the last {:.0%}",
}
"""How the start-up line describes each learning-rate schedule after warm-up."""


def open_tensorboard(run: Path) -> Any:
    """A TensorBoard writer in RUN/tb where tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run / "tb"))


def start_up_lines(c: TrainConfig, env: Dist, model: IGPT, data: PreparedData, preset: str, run: Path) -> str:
    """The start-up lines: the model, the derived batch and token numbers, the optimizer and schedule, the
    device and precision."""
    T = data.seq_len
    why = f" ({c.precision_reason})" if c.precision_reason else ""
    augment = "".join(
        [
            ", random flips" if c.flip else "",
            f", random shifts up to {c.shift} px" if c.shift else "",
            ", prefix-causal attention" if model.config.prefix_causal else "",
        ]
    )
    micro = c.batch_size // (env.world * c.grad_accum)
    ns = f" (Newton-Schulz in {muon_ns_dtype(env.device)})" if c.optimizer == "muon" else ""
    ratio = f" (embeddings, head, gains x{c.adamw_lr_ratio:g})" if c.adamw_lr_ratio != 1 else ""
    parts = (f"{c.steps} steps" if c.steps else "", f"{c.minutes} min" if c.minutes else "")
    budget = " and ".join(s for s in parts if s)
    return (
        f"igpt pretrain: {model.config.objective.upper()} {preset} ({model.num_params():,} "
        f"parameters), {T} tokens/image, {data.meta['n_train']:,} training images\n"
        f"  global batch {c.batch_size} = {env.world} process(es) x {c.grad_accum} accumulation x "
        f"{micro} micro-batch; {c.batch_size * T:,} tokens/step\n"
        f"  {c.optimizer}{ns}, peak lr {c.lr:g}{ratio}, "
        f"warm-up {c.warmup:.0%} of {budget}, {SCHEDULE_WORDS[c.schedule].format(c.cooldown)}"
        f"{augment}\n  device {env.device} {c.precision}{why}"
        f"{' torch.compile' if c.compile else ''}; run {run}"
    )


def progress_bar(steps: int | None, initial: int) -> Any:
    """A tqdm bar over the steps (open-ended for a minutes budget), on stderr."""
    from tqdm import tqdm

    return tqdm(
        total=steps, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr, mininterval=1.0
    )
