"""torch.compile with a way out. Compiling fuses iGPT's elementwise work (the norm, quick-gelu, residual adds)
into generated kernels, which makes the feature pass and the training step faster (BENCHMARKS.md has the
figures). It needs a working C++ compiler on CPU (Triton on CUDA), which a
user's machine may lack, so every compiled call here falls back to eager PyTorch, with one notice, when
compiling fails.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

COMPILER_MODULES = ("torch._dynamo", "torch._inductor")
"""Where torch.compile's own exceptions are defined (its tracer and its code generator)."""


def is_compile_error(err: BaseException) -> bool:
    """Whether `err` means "compiling failed" (an exception class of torch.compile's own, found by the module
    that defines it or one of its bases), as opposed to an error in the computation itself. Read by name so
    that igpt imports nothing from torch's private modules."""
    return any(
        cls.__module__ == m or cls.__module__.startswith(m + ".")
        for cls in type(err).__mro__
        for m in COMPILER_MODULES
    )


def fallback_notice(what: str, err: BaseException) -> None:
    """One line on stderr: what could not be compiled, and why (the first line of the error)."""
    first = str(err).strip().splitlines()
    reason = next((ln for ln in first if ln.strip()), type(err).__name__)
    print(f"igpt: torch.compile of {what} failed ({reason[:160]}); running it eagerly", file=sys.stderr)


class CompiledOrEager:
    """A callable that runs `torch.compile(fn)`, or `fn` itself once compiling has failed.

    The first call compiles; if that raises a compile error, the notice is printed and the same call is
    answered eagerly, as is every later one. Errors of the computation itself propagate unchanged."""

    def __init__(self, fn: Callable[..., Any], what: str, enabled: bool = True, **compile_kw: Any):
        self.fn, self.what = fn, what
        self.compiled: Callable[..., Any] | None = torch.compile(fn, **compile_kw) if enabled else None

    @property
    def active(self) -> bool:
        """True while calls go through the compiled function."""
        return self.compiled is not None

    def __call__(self, *args: Any, **kw: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kw)
            except Exception as e:
                if not is_compile_error(e):
                    raise
                fallback_notice(self.what, e)
                self.compiled = None
        return self.fn(*args, **kw)
