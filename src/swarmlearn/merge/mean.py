"""Weighted mean (FedAvg): sum of weight x tensor over the sum of weights, accumulated one
contribution at a time so that memory stays at about two models."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from swarmlearn.merge import Contribution, Merger, MergeError, heaviness
from swarmlearn.tensors import Tensor


class Mean(Merger):
    name = "mean"

    def merge(self, contributions: Iterable[Contribution]) -> dict[str, Tensor]:
        sums: dict[str, np.ndarray] = {}
        kept: dict[str, Tensor] = {}  # non-float tensors: from the heaviest contribution
        heaviest: Contribution | None = None
        weights: list[float] = []
        template: dict[str, Tensor] = {}
        unweighted: dict[str, np.ndarray] = {}  # for the all-zero-weight case
        for c in contributions:
            weights.append(c.weight)
            for name, t in c.tensors.items():
                if not t.is_float:
                    continue
                values = t.as_float64()
                if name not in sums:
                    sums[name] = np.zeros_like(values)
                    unweighted[name] = np.zeros_like(values)
                    template[name] = t
                sums[name] += c.weight * values
                unweighted[name] += values
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
