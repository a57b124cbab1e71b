"""`trimmedmean`: every coordinate drops the highest and the lowest peers' values and averages the rest."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from swarmlearn.merge.base import CHUNK_VALUES, Contribution, Merger, MergeError, merge_each_tensor
from swarmlearn.tensors import Tensor

# The share of the contributions trimmed at each end of every coordinate: with 5 peers, 1 each side.
DEFAULT_BETA = 0.2


def trimmed_per_side(peers: int, beta: float) -> int:
    """floor(beta x n) values trimmed at each end, at least 1 once there are 3 peers and beta > 0 (so a
    lone bad peer is cut off wherever it can be), and never so many that nothing is left."""
    if peers < 3 or beta == 0:
        return 0  # of two values neither can be told to be the bad one: both are kept
    return min(max(1, math.floor(beta * peers)), (peers - 1) // 2)


def trimmed_weighted_mean_columns(values: np.ndarray, weights: np.ndarray, trim: int) -> np.ndarray:
    """values: (peers, coords); weights: (peers,) summing to 1. Per coordinate, the weighted mean of the
    values left once the `trim` smallest and `trim` largest are dropped; where the values kept all have
    weight 0, their plain mean. A chunk of coordinates at a time: the sort's temporaries stay small."""
    peers, coords = values.shape
    out = np.empty(coords)
    width = max(1, CHUNK_VALUES // max(1, peers))
    for start in range(0, coords, width):
        part = values[:, start:start + width]
        order = np.argsort(part, axis=0, kind="stable")
        kept = np.take_along_axis(part, order, axis=0)[trim:peers - trim]
        kept_weights = weights[order][trim:peers - trim]
        total = kept_weights.sum(axis=0)
        weighted = (kept_weights * kept).sum(axis=0) / np.where(total > 0, total, 1.0)
        out[start:start + width] = np.where(total > 0, weighted, kept.mean(axis=0))
    return out


class TrimmedMean(Merger):
    """Coordinate-wise trimmed mean: Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed
    Learning: Towards Optimal Statistical Rates", ICML 2018.

    Every coordinate of every float tensor sorts the n peers' values, drops the k smallest and the k
    largest, and takes the weighted mean of the n - 2k left, with those peers' weights (renormalized
    over the values kept; their plain mean where all of them weigh 0). k = floor(beta x n), at least 1
    from n = 3 peers on (when beta > 0) and at most (n - 1) // 2: with the default beta = 0.2, 3 to 9 peers trim 1 at
    each end, 10 to 14 trim 2. Fewer than 3 peers trim nothing (the plain weighted mean).
    Every peer of a round started from the same merged model, so the order and trimming of its
    parameters at a coordinate are those of its updates (parameters minus that common base).

    Assumption: at most k of the n contributions are Byzantine. Then at every coordinate each value
    kept lies within the range of the honest peers' values, whatever the others send and whatever
    weight they claim: trimming is by count, not by weight, so a large claimed weight only counts
    among values already inside that range (the weights must lie in [0, inf), checked before).

    Memory: as for any median, the leader holds every contribution until it merges, plus peers x one
    tensor in float64 while it merges that tensor.
    """

    name = "trimmedmean"
    holds = "every contribution (decoded) until it merges, and one tensor of all of them in float64"

    def __init__(self, beta: float = DEFAULT_BETA) -> None:
        if not 0 <= beta < 0.5:
            raise MergeError(f"trimmedmean trims a share beta of the contributions at each end: beta must be in "
                             f"[0, 0.5) so that some are left, got {beta}")
        self.beta = beta

    def merge(self, contributions: Iterable[Contribution]) -> dict[str, Tensor]:
        cs = list(contributions)
        trim = trimmed_per_side(len(cs), self.beta)
        return merge_each_tensor(cs, lambda values, weights: trimmed_weighted_mean_columns(values, weights, trim))
