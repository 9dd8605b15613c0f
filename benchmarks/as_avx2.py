"""Run an `igpt` command as on an AVX2-only CPU (figures, not a test).

The quickstart must keep its budget on every CPU kind the project meets, and AVX2-only machines (no
AVX-512, no AVX512_BF16, no AMX) are the slowest: there bf16 runs about 10x slower than fp32, so pretraining,
the feature pass and the fits all run in fp32. Such a machine is not always at hand. On an AVX-512 CPU this
script limits every library igpt computes through to AVX2 before torch is imported (ATen's kernels and
inductor's generated code by ATEN_CPU_CAPABILITY, oneDNN's by ONEDNN_MAX_CPU_ISA, MKL's by
MKL_ENABLE_INSTRUCTIONS; child processes inherit them), gives torch.compile a cache of its own, and hides
the AVX-512 and AMX flags from `igpt.hardware.cpu_flags`, so the precision choices are an AVX2 CPU's. Clock
speed and caches stay this CPU's, so the figures are those of a fast AVX2 machine: a check of the budget's
predictions and the fp32 paths, not of a given machine's speed.

    python benchmarks/as_avx2.py quickstart --out runs/avx2
    python benchmarks/as_avx2.py pretrain --data runs/quickstart/data --out runs/r --steps 50
"""

from __future__ import annotations

import getpass
import os
import sys
import tempfile
from pathlib import Path

LIMITS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "DNNL_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}


def main() -> None:
    os.environ.update(LIMITS)  # before torch loads: these are read once, at start-up
    # inductor's own cache, apart from the unlimited runs': a kernel compiled there for AVX-512 was found and
    # loaded under these limits (a 5-step `pretrain --preset tiny --compile` stopped with "index out of
    # bounds: 0 <= tmp2 < 17L" from a reused kernel; with a cache of its own the same run trained)
    cache = Path(tempfile.gettempdir()) / f"torchinductor_avx2_{getpass.getuser()}"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
    import torch

    from igpt import cli, hardware

    flags = hardware.cpu_flags

    def avx2_flags() -> set[str]:
        return {f for f in flags() if not f.startswith(("avx512", "amx"))}

    hardware.cpu_flags = avx2_flags
    print(f"as_avx2: torch CPU capability {torch.backends.cpu.get_cpu_capability()}", file=sys.stderr)
    cli.main(sys.argv[1:])


if __name__ == "__main__":
    main()
