"""What the machine offers for training precision: bf16 pays on CUDA and on CPUs with AMX tiles (Intel
Xeon, Sapphire Rapids and later), and costs about 10x on CPUs with neither AMX nor AVX512_BF16 (AVX2, AVX-512
alone). CPUs with AVX512_BF16 but no AMX (AMD EPYC Zen 4) sit between: there a few milliseconds of
measurement decide."""

from __future__ import annotations

import functools
import os
import platform
import time
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


def cpu_name() -> str:
    """The CPU's model name and the threads torch uses, for the tables benchmarks write ("AMD EPYC, 2
    threads"): every speed figure is named with its machine."""
    import torch

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.partition(':')[2].strip()}, {torch.get_num_threads()} threads"
    except OSError:
        pass
    return f"{platform.processor() or 'unknown CPU'}, {torch.get_num_threads()} threads"


def available_memory() -> int | None:
    """Bytes of memory available now (None where the system does not say): what the probes' caches are
    checked against before they are filled, so that a large dataset gets one line instead of exhausting
    memory. Linux's MemAvailable counts the page cache the kernel would give back (the prepared tokens and
    checkpoints a quickstart has just written fill it); free pages alone (sysconf's, the fallback elsewhere)
    would refuse jobs that fit."""
    try:
        found = meminfo_available(Path("/proc/meminfo").read_text())
    except OSError:
        found = None
    if found is not None:
        return found
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def meminfo_available(text: str) -> int | None:
    """Bytes of the `MemAvailable:` line of /proc/meminfo's `text` (None where it has none)."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * (1024 if parts[2:3] == ["kB"] else 1)
    return None


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles with bf16 (Intel Xeon, Sapphire Rapids and later)."""
    return {"amx_bf16", "amx_tile"} <= cpu_flags()


# On a 2-core Xeon with AMX, a compiled training step of the `tiny` model (width 128) at 14x14 ran no
# faster in bf16 than in fp32 (20.5k against 21.1k tokens/s; benchmarks/sweep.py), while an earlier
# measurement had 8 x 256 run 1.45x faster: below this width the tiles do not pay for the casts.
AMX_MIN_WIDTH = 256
PRECISIONS = ("fp32", "bf16", "auto")
"""What a `--precision` setting may say; auto is resolved by `auto_precision`."""


def cpu_has_avx512_bf16() -> bool:
    """Whether this CPU has the AVX512_BF16 dot-product instructions (AMD Zen 4, Intel Cooper Lake on)."""
    return "avx512_bf16" in cpu_flags()


# bf16 must beat fp32 by this factor in the start-up measurement to be chosen: below it, the casts and
# bf16's rounding are not worth a gain within the measurement's noise
BF16_MIN_SPEEDUP = 1.15


@functools.cache
def bf16_speedup(n_embd: int, repeats: int = 12) -> float:
    """fp32 time over bf16-autocast time of a block-sized matrix product (2,048 rows, n_embd -> 4 n_embd,
    forward and backward) on this CPU: the best of `repeats` of each, the two precisions taking turns so
    that a moment of load elsewhere slows both alike. About 1.5 s, once per width and process, that say
    whether bf16 pays (six processes on an AVX512_BF16 EPYC: 1.54x to 2.41x).
    (With 512 rows and one precision after the other, the same AVX512_BF16 CPU measured 1.73x, 1.48x and
    0.98x in three processes: too noisy for a decision.)"""
    import torch

    lin = torch.nn.Linear(n_embd, 4 * n_embd)
    x = torch.randn(2048, n_embd, requires_grad=True)

    def once(bf16: bool) -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            lin(x).float().sum().backward()
        return time.perf_counter() - t

    once(False), once(True)  # warm-ups: first calls pick and build kernels
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for bf16 in (False, True):
            times[bf16].append(once(bf16))
    return min(times[False]) / min(times[True])


def auto_precision(device: str, n_embd: int | None = None) -> tuple[str, str]:
    """(precision, why) for `--precision auto`: bf16 on a CUDA card that supports it, on a CPU with AMX's
    bf16 tiles for models at least AMX_MIN_WIDTH wide, and on a CPU with AVX512_BF16 (no AMX) where a start-up
    measurement (once per width and process) finds it BF16_MIN_SPEEDUP times faster; else fp32."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16", "a CUDA card with bf16 support"
        return "fp32", "a CUDA card without bf16 support"
    if cpu_has_amx():
        if n_embd is not None and n_embd < AMX_MIN_WIDTH:
            return "fp32", f"this CPU has AMX bf16 tiles, but at width {n_embd} bf16 measured no faster"
        return "bf16", "this CPU has AMX bf16 tiles"
    if cpu_has_avx512_bf16():
        width = n_embd or AMX_MIN_WIDTH
        r = bf16_speedup(width)
        if r >= BF16_MIN_SPEEDUP:
            return "bf16", (
                f"this CPU has AVX512_BF16 (no AMX), and bf16 measured {r:.2f}x fp32 at width {width}"
            )
        return "fp32", (
            f"this CPU has AVX512_BF16 but no AMX, and bf16 measured only {r:.2f}x fp32 at width {width}"
        )
    return "fp32", (
        "this CPU has no AMX bf16 tiles nor AVX512_BF16 (bf16 would run about 10x slower than fp32)"
    )


def muon_ns_dtype(device: str) -> str:
    """The dtype of Muon's Newton-Schulz iterations: bf16 (torch.optim.Muon's own) on CUDA and on CPUs with
    AMX's bf16 tiles, fp32 elsewhere. On a 2-core AMD EPYC with AVX2 only, torch's bf16 iterations made an
    eager Muon step of the `tiny` model 5-9x slower than AdamW's (1,000-1,900 against 8,900 tokens/s),
    because bf16 matrix products there run about 10x slower than fp32."""
    return "bf16" if device.startswith("cuda") or cpu_has_amx() else "fp32"
