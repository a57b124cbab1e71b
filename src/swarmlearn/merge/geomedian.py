"""`geomedian`: the weighted geometric median of each tensor, by smoothed Weiszfeld iterations."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from swarmlearn.merge.base import Contribution, Merger, merge_each_tensor
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
    """Geometric median as in RFA: Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated
    Learning", IEEE Transactions on Signal Processing 70, 2022.

    The merged tensor is the point z minimising sum(weight_i x ||x_i - z||), found by the smoothed
    Weiszfeld iteration of RFA (distances floored at EPSILON, RFA's nu), started at the weighted mean
    and run to TOLERANCE (at most MAX_ITERATIONS) rather than RFA's fixed few iterations, so that the
    result is the minimiser itself, not an approximation that depends on an iteration count. Peers
    holding less than half of the weight cannot move the result arbitrarily far.

    Per tensor, not over the whole parameter vector as RFA defines it: each float tensor gets its own
    geometric median. Tensors of one model differ in scale by orders of magnitude (an embedding matrix
    next to a LayerNorm bias); over the whole vector the distances are decided by the largest tensors
    and a small one's merged value follows their weights, while per tensor every block gets its own
    robust centre, and the half-the-weight breakdown point holds for each tensor and so for the model.
    It also keeps memory at peers x one tensor in float64, not peers x the whole model, for each of up
    to MAX_ITERATIONS passes. The contributions themselves are all held (peers x the model, decoded in
    place from their bytes) until the merge, as for any median; the leader's log says so each round.
    """

    name = "geomedian"
    holds = "every contribution (decoded) until it merges, and one tensor of all of them in float64"

    def merge(self, contributions: Iterable[Contribution]) -> dict[str, Tensor]:
        return merge_each_tensor(contributions, weiszfeld)
