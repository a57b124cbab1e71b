"""`coordmedian`: the weighted median of every coordinate on its own."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from swarmlearn.merge.base import Contribution, Merger, merge_each_tensor
from swarmlearn.tensors import Tensor


def weighted_median_columns(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """values: (peers, coords); weights: (peers,) summing to 1."""
    order = np.argsort(values, axis=0, kind="stable")
    sorted_values = np.take_along_axis(values, order, axis=0)
    cumulative = np.cumsum(weights[order], axis=0)
    first = np.argmax(cumulative >= 0.5 - 1e-12, axis=0)
    return sorted_values[first, np.arange(values.shape[1])]


class CoordMedian(Merger):
    """Coordinate-wise median: Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates", ICML 2018.

    Every coordinate of every float tensor takes the weighted median of the peers' values: the smallest
    value at which the cumulative normalized weight of the sorted values reaches 1/2. Peers holding
    less than half of the weight cannot drag any coordinate outside the range of the others' values.
    Unlike the paper's (unweighted) median, peers count by weight, and with an even split the lower
    middle value is taken rather than the average of the two, so each coordinate is one peer's own value.

    Memory: a median needs every contribution at once, so the leader holds all of them (peers x the
    model, decoded in place from their bytes) until it merges, plus peers x one tensor in float64
    while it merges that tensor; its log says so each round.
    """

    name = "coordmedian"
    holds = "every contribution (decoded) until it merges, and one tensor of all of them in float64"

    def merge(self, contributions: Iterable[Contribution]) -> dict[str, Tensor]:
        return merge_each_tensor(contributions, weighted_median_columns)
