"""`mean`: the weighted average of FedAvg, one contribution at a time."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from swarmlearn.merge.base import Accumulator, Contribution, Merger, MergeError, contribution_norm, heaviness
from swarmlearn.tensors import Tensor

# A contribution is taken back out of the float64 sums only while its weighted norm is at most this
# many times the largest weighted norm of the others: subtracting x from (rest + x) leaves an error
# of about |x| x 2^-52, which at 10^4 stays some 10^4 times below float32's resolution of the rest.
# A contribution larger still (a boosted one, 10^9 x) would leave the rest in its rounding noise, so
# the merge is built again from the others instead.
SUBTRACT_MAX_RATIO = 1e4


class Mean(Merger):
    """Federated Averaging (FedAvg): McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-
    Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017.

    The merged tensor is sum(weight x tensor) / sum(weights), where a peer's weight is its weightage
    x the samples it trained on since the last sync (FedAvg's n_k / n). It is accumulated one
    contribution at a time (`MeanAccumulator`), so the leader holds about two models whatever the
    number of peers: the float64 sums and the contribution being added. When every weight is 0 (the
    very first sync), peers count equally. Not robust: one peer can move the result anywhere, which is
    why contributions are checked first and `coordmedian` and `geomedian` exist.
    """

    name = "mean"
    holds = "two models (float64 sums and the contribution being added)"

    def merge(self, contributions: Iterable[Contribution]) -> dict[str, Tensor]:
        acc = MeanAccumulator()
        for c in contributions:
            acc.add(c, contribution_norm(c.tensors))
        return acc.result()

    def accumulator(self) -> MeanAccumulator:
        return MeanAccumulator()


class MeanAccumulator(Accumulator):
    """sum(weight x tensor) per float tensor in float64, the weights, and the non-float tensors of
    the heaviest contribution so far."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.template: dict[str, Tensor] = {}
        self.weights: dict[str, float] = {}
        self.scales: dict[str, float] = {}  # weight x norm of each contribution in the sums
        # For the all-zero-weight case (equal weights); kept only while every weight so far is 0, so
        # that a normal round accumulates once, not twice.
        self.unweighted: dict[str, np.ndarray] | None = {}
        self.heaviest: Contribution | None = None
        self.kept: dict[str, Tensor] = {}  # non-float tensors: from the heaviest contribution

    def add(self, c: Contribution, norm: float) -> None:
        self.weights[c.node] = c.weight
        self.scales[c.node] = (c.weight or 1.0) * norm
        if c.weight != 0:
            self.unweighted = None
        for name, t in c.tensors.items():
            if not t.is_float:
                continue
            values = np.asarray(t.as_float64())  # a fresh array: scaled in place, no second temporary
            if name not in self.sums:
                self.sums[name] = np.zeros_like(values)
                self.template[name] = t
            if self.unweighted is not None:
                self.unweighted[name] = self.unweighted[name] + values if name in self.unweighted else values.copy()
            self.sums[name] += np.multiply(values, c.weight, out=values)
        if self.heaviest is None or heaviness(c) < heaviness(self.heaviest):
            self.heaviest = _weight_only(c)
            self.kept = {n: t for n, t in c.tensors.items() if not t.is_float}

    def subtract(self, c: Contribution) -> bool:
        others = [s for n, s in self.scales.items() if n != c.node]
        if c.node not in self.weights or not others or self.scales[c.node] > SUBTRACT_MAX_RATIO * max(others):
            return False
        if self.kept and self.heaviest is not None and self.heaviest.node == c.node:
            return False  # its non-float tensors were the ones kept; the next heaviest's are not here
        if self.unweighted is None and c.weight != 0 and all(w == 0 for n, w in self.weights.items() if n != c.node):
            return False  # the rest count equally, and their unweighted sums were not kept
        for name, t in c.tensors.items():
            if not t.is_float or name not in self.sums:
                continue
            values = np.asarray(t.as_float64())
            if self.unweighted is not None:
                self.unweighted[name] -= values
            self.sums[name] -= np.multiply(values, c.weight, out=values)
        del self.weights[c.node], self.scales[c.node]
        if self.heaviest is not None and self.heaviest.node == c.node:
            self.heaviest = None
        return True

    def result(self) -> dict[str, Tensor]:
        """The weighted mean; the sums are spent making it (call once)."""
        if not self.weights:
            raise MergeError("no contribution to merge")
        total = float(np.sum(list(self.weights.values())))
        merged = dict(self.kept)
        # Each sum is narrowed and released in turn, so the result never needs the sums and a
        # float64 copy of them at once.
        for name in list(self.sums):
            acc = self.sums.pop(name)
            if total > 0:
                values = np.divide(acc, total, out=acc)
            else:
                values = self.unweighted[name] / len(self.weights)
            merged[name] = Tensor.from_float(self.template[name].dtype, values, self.template[name].array.shape)
            del acc, values
        return merged


def _weight_only(c: Contribution) -> Contribution:
    """The heaviest contribution as far as its non-float tensors go: holding it must not keep its
    float tensors (a whole model) alive."""
    return Contribution(c.node, c.weight, {})
