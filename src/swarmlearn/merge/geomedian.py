"""Weighted geometric median of each tensor by Weiszfeld's algorithm, started at the weighted mean:
the point that minimises the weighted sum of Euclidean distances to the contributions."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from swarmlearn.merge import Contribution, Merger, merge_each_tensor
from swarmlearn.tensors import Tensor

# Stop when an iteration moves the estimate by less than this, relative to its norm (or absolutely,
# near zero), or after MAX_ITERATIONS.
TOLERANCE = 1e-7
MAX_ITERATIONS = 100
# Distances below this count as "at a data point"; keeps the weights 1/d finite.
EPSILON = 1e-12


def weiszfeld(points: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """points: (peers, coords); weights: (peers,) summing to 1."""
    z = weights @ points
    for _ in range(MAX_ITERATIONS):
        distances = np.maximum(np.linalg.norm(points - z, axis=1), EPSILON)
        inverse = weights / distances
        z_next = inverse @ points / inverse.sum()
        step = np.linalg.norm(z_next - z)
        z = z_next
        if step <= TOLERANCE * max(1.0, np.linalg.norm(z)):
            break
    return z


class GeoMedian(Merger):
    name = "geomedian"

    def merge(self, contributions: Iterable[Contribution]) -> dict[str, Tensor]:
        return merge_each_tensor(contributions, weiszfeld)
