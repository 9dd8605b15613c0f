"""What the full probe's features take at their peak (`probe_bytes`, phase by phase) and the check that
refuses, before any feature is computed, a probe whose features would not fit in the memory available
(`check_features_fit`, also asked by the quickstart before it pretrains)."""

from __future__ import annotations

from igpt.errors import IgptError
from igpt.hardware import available_memory

from .chunks import chunk_rows
from .features import grid_side, held_bytes
from .logistic import SWEEP_ROWS

FEATURES_SHARE = 0.9
"""The share of the memory available that the full probe's features may take (`check_features_fit`). Their
estimate is an upper one (3.3 GiB for the default quickstart's probe, whose whole process peaked at 3.6 GiB),
so a laptop with about 4 GB free still runs the quickstart's probe."""


def probe_bytes(n_train: int, n_other: int, layers: int, d: int, pool: str, fine: str | None) -> int:
    """Bytes the full probe's features come to at their peak, an upper estimate over its phases. Held
    throughout: `pool` and the mean at every layer for the `n_other` validation and test images, and the mean
    for the `n_train` training ones. While every layer is refitted: `pool` for every training row too, with a
    fit's float32 standardised copy of one layer. With `fine`: that grid at every layer for the sweep's rows
    while it is swept, at every layer for the test rows (and at one for every training row) from the training
    pass on; its own fit comes last, once `pool`'s training rows are let go, with its float32 copy."""
    width = grid_side(pool) ** 2 * d
    coarse_train = layers * held_bytes(n_train, width)
    mean = layers * held_bytes(n_train + n_other, d) if pool != "mean" else 0
    base = layers * held_bytes(n_other, width) + mean
    refits = base + coarse_train + 4 * n_train * width
    if not fine:
        return refits
    fw = grid_side(fine) ** 2 * d
    sweep = base + layers * (held_bytes(min(SWEEP_ROWS, n_train), width + fw) + held_bytes(n_other, fw))
    held_fine = layers * held_bytes(n_other, fw) + held_bytes(n_train, fw)
    fine_fit = base + held_fine + 4 * n_train * fw
    return max(sweep, refits + held_fine, fine_fit)


def feature_budget(limit_gib: float | None = None, share: float = FEATURES_SHARE) -> float | None:
    """Bytes the probe's features may take in memory: `limit_gib` (`--memory-limit`) where given, else
    `share` of the memory available now (None where the system does not say)."""
    if limit_gib is not None:
        return limit_gib * 2**30
    avail = available_memory()
    return None if avail is None else share * avail


def store_bytes(n_train: int, n_other: int, layers: int, d: int, pool: str, fine: str | None) -> int:
    """Disk the feature store takes for a full probe (an upper estimate): `pool` and the mean at every layer
    for every row; the fine grid at every layer for the validation and test rows and the sweep's training
    rows, and at the chosen layer for all training rows; the sweep's rows twice (their own pass, then all
    training rows')."""
    width, fw = grid_side(pool) ** 2 * d, (grid_side(fine) ** 2 * d if fine else 0)
    coarse = held_bytes(1, width) + (held_bytes(1, d) if pool != "mean" else 0)
    fine_row = held_bytes(1, fw) if fine else 0
    sweep = min(SWEEP_ROWS, n_train)
    per_layer = (n_train + sweep + n_other) * coarse + (sweep + n_other) * fine_row
    return layers * per_layer + n_train * fine_row


def out_of_core_bytes(n_train: int, n_other: int, layers: int, d: int, pool: str, fine: str | None) -> int:
    """Memory a full probe takes when its training features are fitted from disk (an upper estimate): the
    in-memory probe's validation and test features, and the fits' chunks of training rows (a chunk read in
    float32 and its standardised copy, at the widest pooling; the sweep's indexed rows)."""
    widest = grid_side(fine or pool) ** 2 * d
    held = probe_bytes(0, n_other, layers, d, pool, fine)
    return held + 3 * 4 * min(chunk_rows(widest), n_train) * widest


def check_features_fit(
    n_train: int,
    other: int,
    layers: int,
    d: int,
    pool: str,
    fine: str | None,
    share: float = FEATURES_SHARE,
    advice: str | None = None,
) -> None:
    """Refuse a full probe whose features (`probe_bytes`, an upper estimate of their peak) would take more
    than `share` of the memory available now, before any is computed: one line with the size and the
    `--train-limit` that fits (or, where the validation and test images alone are too many, what to drop).
    `other`: the validation and test images; `advice`, where given, replaces the probe's flags in that line
    (the quickstart has other ones)."""
    avail = available_memory()
    need = probe_bytes(n_train, other, layers, d, pool, fine)
    if avail is None or need <= share * avail:
        return
    fits = 0
    for n in (10**k for k in range(7, 1, -1)):  # the largest round --train-limit that fits
        for m in (5, 2, 1):
            if m * n < n_train and probe_bytes(m * n, other, layers, d, pool, fine) <= share * avail:
                fits = max(fits, m * n)
    instead = f"pass --train-limit {fits:,}" if fits else "pass a coarser --pool or --test-limit"
    instead = advice or instead + (" or --fine-pool none" if fine else "")
    raise IgptError(
        f"the probe would hold pooled features of {n_train + other:,} images at {layers} layers "
        f"({pool}{' and ' + fine if fine else ''}), about {need / 2**30:.1f} GiB, more than {share:.0%} of "
        f"the {avail / 2**30:.1f} GiB available; {instead}"
    )
