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


def auto_precision(device: str) -> tuple[str, str]:
    """(precision, why) for `--precision auto`: bf16 on a CUDA card that supports it and on a CPU with AMX's
    bf16 tiles, else fp32, the safe default."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16", "a CUDA card with bf16 support"
        return "fp32", "a CUDA card without bf16 support"
    if {"amx_bf16", "amx_tile"} <= cpu_flags():
        return "bf16", "this CPU has AMX bf16 tiles"
    return "fp32", "this CPU has no AMX bf16 tiles (bf16 would run about 10x slower than fp32)"
