"""`multikrum`: the weighted mean of the contributions closest to their neighbours; the others are left out."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

from swarmlearn.merge.base import CHUNK_VALUES, Contribution, Merger, MergeError, merge_each_tensor
from swarmlearn.tensors import Tensor

log = logging.getLogger("swarmlearn.merge")


def most_byzantine_tolerated(peers: int) -> int:
    """The largest f with peers >= 2f + 3 (0 below 5 peers)."""
    return max(0, (peers - 3) // 2)


def pairwise_squared_distances(cs: list[Contribution]) -> np.ndarray:
    """(peers, peers): the squared L2 distance between every two contributions over all their float
    tensors, summed in float64 tensor by tensor and a chunk of values at a time, so that the leader
    holds peers x CHUNK_VALUES / peers float64 values at once whatever the model's size."""
    peers = len(cs)
    distances = np.zeros((peers, peers))
    width = max(1, CHUNK_VALUES // peers)
    for name, t in cs[0].tensors.items():
        if not t.is_float:
            continue
        flats = [c.tensors[name].array.reshape(-1) for c in cs]
        for start in range(0, t.array.size, width):
            block = np.stack([Tensor(t.dtype, flat[start:start + width]).as_float64() for flat in flats])
            for i in range(peers):
                # Differences, not |x|^2 + |y|^2 - 2xy: peers sit close together far from the origin,
                # where that form would cancel away the distances it is meant to measure.
                apart = block - block[i]
                distances[i] += np.einsum("pc,pc->p", apart, apart)
    return distances


def krum_selection(cs: list[Contribution], byzantine: int) -> list[Contribution]:
    """The n - f contributions with the lowest Krum scores (the summed squared distances to each one's
    n - f - 2 nearest others), in their given order; ties go to the first node in name order."""
    peers = len(cs)
    if byzantine == 0:
        return cs
    distances = pairwise_squared_distances(cs)
    neighbours = peers - byzantine - 2
    scores = [float(np.sort(np.delete(distances[i], i))[:neighbours].sum()) for i in range(peers)]
    ranked = sorted(range(peers), key=lambda i: (scores[i], cs[i].node))
    chosen = set(ranked[:peers - byzantine])
    log.info("multikrum (f=%d) kept %d of %d contributions, left out %s", byzantine, len(chosen), peers,
             ", ".join(f"{cs[i].node} (score {scores[i]:.4g})" for i in ranked[peers - byzantine:]))
    return [c for i, c in enumerate(cs) if i in chosen]


def weighted_mean_columns(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return weights @ values


class MultiKrum(Merger):
    """Multi-Krum: Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries:
    Byzantine Tolerant Gradient Descent", NeurIPS 2017; m = n - f selected, as El Mhamdi, Guerraoui,
    Rouault, "The Hidden Vulnerability of Distributed Learning in Byzantium", ICML 2018, run it.

    Each contribution's score is the sum of its squared L2 distances, over all float tensors of the
    model, to its n - f - 2 nearest other contributions; the m = n - f with the lowest scores are kept
    and merged as their weighted mean (the weights renormalized over those kept). Every peer of a
    round started from the same merged model, so distances between parameters are distances between
    updates. Integer tensors come from the heaviest peer kept.

    Assumption: at most f of the n contributions are Byzantine, and n >= 2f + 3; a merge asked to
    tolerate more refuses with both numbers. f defaults to the most n allows, (n - 3) // 2: 1 of 5
    or 6 peers, 2 of 7 or 8. With f = 0 (fewer than 5 peers by default) every contribution is kept:
    the plain weighted mean, which tolerates none.

    Weights: the selection ignores them (a peer declares its own weight, so a Byzantine one could
    claim any); only the mean of the contributions selected uses them.

    Memory: the leader holds every contribution until it merges, plus a chunk of all of them in float64
    for the distances, then peers x one tensor in float64 for the mean.
    """

    name = "multikrum"
    holds = "every contribution (decoded) until it merges, and one tensor of all of them in float64"

    def __init__(self, byzantine: int | None = None) -> None:
        if byzantine is not None and byzantine < 0:
            raise MergeError(f"multikrum tolerates f >= 0 Byzantine contributions, got f={byzantine}")
        self.byzantine = byzantine

    def merge(self, contributions: Iterable[Contribution]) -> dict[str, Tensor]:
        cs = list(contributions)
        if not cs:
            raise MergeError("no contribution to merge")
        byzantine = most_byzantine_tolerated(len(cs)) if self.byzantine is None else self.byzantine
        if byzantine > 0 and len(cs) < 2 * byzantine + 3:
            raise MergeError(f"multikrum tolerating f={byzantine} Byzantine contributions needs n >= 2f + 3 = "
                             f"{2 * byzantine + 3} contributions, got n={len(cs)}")
        return merge_each_tensor(krum_selection(cs, byzantine), weighted_mean_columns)
