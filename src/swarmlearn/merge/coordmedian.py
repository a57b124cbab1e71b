"""Weighted coordinate-wise median: for every coordinate, the smallest value at which the
cumulative weight of the sorted values reaches half of the total. Robust to a minority of outliers."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from swarmlearn.merge import Contribution, Merger, merge_each_tensor
from swarmlearn.tensors import Tensor


def weighted_median_columns(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """values: (peers, coords); weights: (peers,) summing to 1."""
    order = np.argsort(values, axis=0, kind="stable")
    sorted_values = np.take_along_axis(values, order, axis=0)
    cumulative = np.cumsum(weights[order], axis=0)
    first = np.argmax(cumulative >= 0.5 - 1e-12, axis=0)
    return sorted_values[first, np.arange(values.shape[1])]


class CoordMedian(Merger):
    name = "coordmedian"

    def merge(self, contributions: Iterable[Contribution]) -> dict[str, Tensor]:
        return merge_each_tensor(contributions, weighted_median_columns)
