"""What the machine offers for training precision: bf16 pays on CUDA and on CPUs with AMX tiles (Intel
Xeon, Sapphire Rapids and later), and costs about 10x on CPUs without them (AVX2, AVX-512 alone)."""

from __future__ import annotations

from pathlib import Path


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (an empty set where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles with bf16 (Intel Xeon, Sapphire Rapids and later)."""
    return {"amx_bf16", "amx_tile"} <= cpu_flags()


# On a 2-core Xeon with AMX, a compiled training step of the `tiny` model (width 128) at 14x14 ran no
# faster in bf16 than in fp32 (20.5k against 21.1k tokens/s; benchmarks/sweep.py), while an earlier
# measurement had 8 x 256 run 1.45x faster: below this width the tiles do not pay for the casts.
AMX_MIN_WIDTH = 256


def auto_precision(device: str, n_embd: int | None = None) -> tuple[str, str]:
    """(precision, why) for `--precision auto`: bf16 on a CUDA card that supports it, and on a CPU with AMX's
    bf16 tiles for models at least AMX_MIN_WIDTH wide; else fp32, the safe default."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16", "a CUDA card with bf16 support"
        return "fp32", "a CUDA card without bf16 support"
    if cpu_has_amx():
        if n_embd is not None and n_embd < AMX_MIN_WIDTH:
            return "fp32", f"this CPU has AMX bf16 tiles, but at width {n_embd} bf16 measured no faster"
        return "bf16", "this CPU has AMX bf16 tiles"
    return "fp32", "this CPU has no AMX bf16 tiles (bf16 would run about 10x slower than fp32)"
