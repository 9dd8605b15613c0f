"""The paper's protocol at scale, planned before it runs (`igpt plan`): for a set of N images at a resolution
and a model shape, what each stage needs in memory and disk, as igpt's own estimates compute them (the
probe's `probe_bytes`, `out_of_core_bytes` and `store_bytes`, the model's `training_bytes`), and how long
the feature passes take at a given rate. Nothing is read or run: every figure is an estimate, and says so."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from igpt.errors import IgptError
from igpt.model.gpt import PRESETS, IGPTConfig
from igpt.probes.features import POOLS
from igpt.probes.memory import FEATURES_SHARE, out_of_core_bytes, probe_bytes, store_bytes
from igpt.settings import check_choices, choice

GPU_FORWARD_TOKENS_PER_SECOND = 2_000_000
"""A feature pass's tokens per second on one GPU, for iGPT-S at 32x32 in bf16: three times the compiled
training step measured on an NVIDIA H200 (666,545 tokens/s, BENCHMARKS.md), a forward being about a third of
a step's products. Other shapes are reckoned at the same FLOP rate (`forward_flops`). An assumption for the
plan's times, not a measurement; pass --tokens-per-second."""


def forward_flops(cfg: IGPTConfig) -> float:
    """Products of one token's forward pass: the blocks' matrices, attention over the sequence (in full),
    the output head."""
    d, L, T, K = cfg.n_embd, cfg.n_layer, cfg.n_positions, cfg.vocab_size
    return 2 * 12 * L * d * d + 4 * L * T * d + 2 * d * K


@dataclass
class PlanConfig:
    """The set and the model a plan is for; `plan()` builds it from its keyword arguments."""

    images: int = 1_281_167
    """Training images (ImageNet's by default)."""
    val_images: int = 10_000
    """Validation images held out of them (the choices are made on these)."""
    test_images: int = 50_000
    """Test images (ImageNet's validation set)."""
    resolution: int = 32
    """Image side after downsampling."""
    clusters: int = 512
    """Palette size (the vocabulary)."""
    preset: str = choice("igpt-s", PRESETS)
    """The model's shape."""
    gpus: int = 1
    """Processes (GPUs) sharing the passes (torchrun's --nproc_per_node)."""
    pool: str = choice("mean", POOLS)
    """The probe's pooling."""
    fine_pool: str = choice("none", ("none", *POOLS))
    """The probe's further pooling (none: the paper's protocol)."""
    batch_size: int = 64
    """Pretraining's micro-batch per GPU (its activations)."""
    tokens_per_second: float | None = None
    """Forward tokens per second per GPU that the times are reckoned at (default: the H200's measured rate
    for iGPT-S at 32x32, scaled by this shape's products per token; see GPU_FORWARD_TOKENS_PER_SECOND)."""
    memory_gib: float = 64.0
    """Host memory per node, GiB: whether the probe's features fit in it or are fitted from disk."""

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("images", "val_images", "test_images", "resolution", "clusters", "gpus", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise IgptError(f"--{name.replace('_', '-')} must be a positive integer")
        if not ((self.tokens_per_second is None or self.tokens_per_second > 0) and self.memory_gib > 0):
            raise IgptError("--tokens-per-second and --memory-gib must be positive")


def plan(**settings: Any) -> dict[str, Any]:
    """Per stage, what the paper's protocol needs for `PlanConfig(**settings)`: bytes of memory and disk,
    and the feature pass's hours; every figure an estimate."""
    cfg = PlanConfig(**settings)
    model = IGPTConfig.from_preset(cfg.preset, vocab_size=cfg.clusters, n_positions=cfg.resolution**2)
    T, d, L = model.n_positions, model.n_embd, model.n_layer
    n_train = cfg.images - cfg.val_images
    token_bytes = 1 if cfg.clusters <= 256 else 2
    tokens = (cfg.images + cfg.test_images) * T * token_bytes
    fine = None if cfg.fine_pool == "none" else cfg.fine_pool
    sizes = (n_train, cfg.val_images + cfg.test_images, L + 1, d, cfg.pool, fine)
    in_memory = probe_bytes(*sizes)
    budget = FEATURES_SHARE * cfg.memory_gib * 2**30
    reference = IGPTConfig.from_preset("igpt-s", vocab_size=512, n_positions=1024)
    rate = cfg.tokens_per_second or GPU_FORWARD_TOKENS_PER_SECOND * forward_flops(reference) / forward_flops(
        model
    )
    pass_seconds = (cfg.images + cfg.test_images) * T / (rate * cfg.gpus)
    weights = 4 * model.num_params()
    return {
        "estimate": True,
        "settings": dict(vars(cfg)) | {"tokens_per_second": rate},
        "model": {"preset": cfg.preset, "parameters": model.num_params(), "layers": L, "width": d},
        "prepare": {
            "disk_tokens": tokens,
            "disk_work": (cfg.images + cfg.test_images)
            * cfg.resolution**2
            * 3,  # decoded chunks, then removed
        },
        "pretrain": {
            "memory_per_gpu": model.training_bytes(cfg.batch_size),
            "disk_per_checkpoint": 3 * weights,  # weights and AdamW's two moments, fp32
        },
        "probe": {
            "memory_in_memory": in_memory,
            "fits_in_memory": in_memory <= budget,
            "memory_from_disk": out_of_core_bytes(*sizes),
            "disk_store": store_bytes(*sizes),
            "feature_pass_hours": pass_seconds / 3600,
        },
        "finetune": {
            "memory_per_gpu": model.training_bytes(cfg.batch_size) + weights,  # and the best epoch's copy
            "epoch_hours": 3 * n_train * T / (rate * cfg.gpus) / 3600,  # forward + backward
        },
    }


def plan_lines(p: dict[str, Any]) -> list[str]:
    """The plan as the lines `igpt plan` prints."""
    s, m = p["settings"], p["model"]
    gib = 2**30
    pr, pre = p["probe"], p["pretrain"]
    shape = f"{m['preset']} ({m['parameters'] / 1e6:.1f}M parameters, {m['layers']} x {m['width']})"
    where = "in memory" if pr["fits_in_memory"] else "from the run's feature store on disk"
    return [
        f"plan (estimates) for {s['images']:,} training and {s['test_images']:,} test images at "
        f"{s['resolution']}x{s['resolution']}, K={s['clusters']}, {shape}, {s['gpus']} GPU(s):",
        f"  prepare:  tokens {p['prepare']['disk_tokens'] / gib:.1f} GiB on disk, decoded chunks "
        f"{p['prepare']['disk_work'] / gib:.1f} GiB while it runs",
        f"  pretrain: about {pre['memory_per_gpu'] / gib:.1f} GiB per GPU at micro-batch {s['batch_size']} "
        f"(fp32 count); {pre['disk_per_checkpoint'] / gib:.2f} GiB per checkpoint",
        f"  probe:    features {pr['memory_in_memory'] / gib:.1f} GiB in memory ({where}, with "
        f"{s['memory_gib']:g} GiB per node); from disk {pr['memory_from_disk'] / gib:.1f} GiB of memory "
        f"and a {pr['disk_store'] / gib:.1f} GiB store; the feature pass about "
        f"{pr['feature_pass_hours']:.2f} h at {s['tokens_per_second']:,.0f} tokens/s per GPU",
        f"  finetune: about {p['finetune']['memory_per_gpu'] / gib:.1f} GiB per GPU; an epoch about "
        f"{p['finetune']['epoch_hours']:.2f} h",
    ]
