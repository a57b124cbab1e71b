"""Adaptive sync (the original's useAdaptiveSync): after each merge the next sync interval follows
the merged model's validation loss on this node's validation data.

While merges keep improving the loss, the peers agree and local training may run longer between
merges: the interval grows by GROW (up to MAX_FACTOR times the given syncFrequency), saving
communication. When the loss stops improving, the local models are drifting apart: the interval
shrinks by SHRINK (down to syncFrequency / MAX_FACTOR, at least 1 step), merging more often. An
unknown (NaN) loss leaves the interval as it is. Pure: numbers in, interval out.
"""

from __future__ import annotations

import math

GROW = 1.5
SHRINK = 0.5
MAX_FACTOR = 4
# A loss counts as improved when it beats the best so far by this fraction.
MIN_IMPROVEMENT = 0.01


class AdaptiveSync:
    def __init__(self, sync_frequency: int):
        self.base = sync_frequency
        self.interval = sync_frequency
        self.best: float | None = None

    @property
    def bounds(self) -> tuple[int, int]:
        return max(1, self.base // MAX_FACTOR), self.base * MAX_FACTOR

    def after_merge(self, loss: float | None) -> int:
        """The interval until the next sync, given the validation loss of the model just merged."""
        if loss is None or not math.isfinite(loss):
            return self.interval
        low, high = self.bounds
        if self.best is None:
            self.best = loss
            return self.interval
        if loss < self.best - MIN_IMPROVEMENT * abs(self.best):
            self.interval = min(high, max(self.interval + 1, round(self.interval * GROW)))
        else:
            self.interval = max(low, min(self.interval - 1, round(self.interval * SHRINK)))
        self.best = min(self.best, loss)
        return self.interval
