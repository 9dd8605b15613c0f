"""The fine-tuning command's clock: `--minutes` bounds the whole command, set-up and evaluation included, and
the low-data subsets share what is left of it."""

from __future__ import annotations

import time

SAVE_SECONDS = 5.0
"""Kept back from a --minutes budget for writing the fine-tuned run."""


class Clock:
    """The budget of the whole command (`--minutes`), set-up and evaluation included, started with the
    command. The subsets share what is left of it equally (`share`); each one's training stops early enough
    to leave time for its last validation and its test pass (`training_seconds`)."""

    def __init__(self, minutes: float | None):
        self.start = time.perf_counter()
        self.end = self.start + 60 * minutes if minutes else None
        self.share_end = self.end

    def share(self, subsets_left: int) -> None:
        """The next subset's share: an equal part of what is left for the `subsets_left` subsets."""
        if self.end is not None:
            now = time.perf_counter()
            self.share_end = now + max(0.0, self.end - now) / subsets_left

    def training_seconds(self, reserve: float) -> float | None:
        """Seconds of training left in this share after `reserve` (None: no budget; at least one second)."""
        if self.share_end is None:
            return None
        return max(1.0, self.share_end - time.perf_counter() - reserve)
