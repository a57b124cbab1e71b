"""`mean`: the weighted average of FedAvg, one contribution at a time."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from swarmlearn.merge.base import Contribution, Merger, MergeError, heaviness
from swarmlearn.tensors import Tensor


class Mean(Merger):
    """Federated Averaging (FedAvg): McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-
    Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017.

    The merged tensor is sum(weight x tensor) / sum(weights), where a peer's weight is its weightage
    x the samples it trained on since the last sync (FedAvg's n_k / n). It is accumulated one
    contribution at a time, so memory stays at about two models whatever the number of peers. When
    every weight is 0 (the very first sync), peers count equally. Not robust: one peer can move the
    result anywhere, which is why contributions are checked first and `coordmedian` and `geomedian` exist.
    """

    name = "mean"

    def merge(self, contributions: Iterable[Contribution]) -> dict[str, Tensor]:
        sums: dict[str, np.ndarray] = {}
        kept: dict[str, Tensor] = {}  # non-float tensors: from the heaviest contribution
        heaviest: Contribution | None = None
        weights: list[float] = []
        template: dict[str, Tensor] = {}
        # For the all-zero-weight case (equal weights); kept only while every weight so far is 0, so
        # that a normal round accumulates once, not twice.
        unweighted: dict[str, np.ndarray] | None = {}
        for c in contributions:
            weights.append(c.weight)
            if c.weight != 0:
                unweighted = None
            for name, t in c.tensors.items():
                if not t.is_float:
                    continue
                values = np.asarray(t.as_float64())  # a fresh array: scaled in place, no second temporary
                if name not in sums:
                    sums[name] = np.zeros_like(values)
                    template[name] = t
                if unweighted is not None:
                    unweighted[name] = unweighted[name] + values if name in unweighted else values.copy()
                sums[name] += np.multiply(values, c.weight, out=values)
            if heaviest is None or heaviness(c) < heaviness(heaviest):
                heaviest = c
                kept = {n: t for n, t in c.tensors.items() if not t.is_float}
        if not weights:
            raise MergeError("no contribution to merge")
        total = float(np.sum(weights))
        merged = {name: kept[name] for name in kept}
        for name, acc in sums.items():
            values = acc / total if total > 0 else unweighted[name] / len(weights)
            merged[name] = Tensor.from_float(template[name].dtype, values, template[name].array.shape)
        return merged
