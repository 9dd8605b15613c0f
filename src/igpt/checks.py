"""Checks shared by every stage's settings, each in one place: the seed range and the device name."""

from __future__ import annotations

from .errors import IgptError

MAX_SEED = 2**32 - 1
"""Seeds are in [0, 2^32): what numpy's and torch's generators and every stage accept alike."""


def is_whole(value: object, least: int = 0, most: int | None = None) -> bool:
    """True for an integer (not a bool, which Python counts as one) in [least, most]: what a count, a size or
    an index read from a flag, a record or a config file must be."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= least
    return ok and (most is None or value <= most)


def check_seed(seed: object, flag: str = "--seed") -> None:
    """Refuse a seed outside [0, 2^32) (or not an integer) with one line, before anything is written."""
    if not is_whole(seed, 0, MAX_SEED):
        raise IgptError(f"{flag} must be an integer in [0, 2^32), got {seed!r}")


def check_device(device: object, flag: str = "--device") -> None:
    """Refuse a device that is not cpu, cuda or cuda:N, and cuda on a machine without a CUDA GPU."""
    ok = isinstance(device, str) and (
        device in ("cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
    )
    if not ok:
        raise IgptError(f"{flag} must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise IgptError(f"{flag} {device}, but no CUDA GPU is available")
