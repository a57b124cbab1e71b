"""`mean`: the weighted average of FedAvg, one contribution at a time."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from swarmlearn.merge.base import (CHUNK_VALUES, Accumulator, Contribution, Merger, MergeError, contribution_norm,
                                   heaviness)
from swarmlearn.tensors import Tensor

# A contribution is taken back out of the sums only while its weighted norm is at most this many times
# the largest weighted norm of the others: subtracting x from (rest + x) leaves an error of about |x| x
# the sums' resolution. In float64 sums (F64 models) that is 2^-52: at 10^4 it stays some 10^4 times
# below float32's resolution of the rest. In float32 sums (every narrower model) it is 2^-24, the
# resolution of the result itself, so only a contribution no larger than the others can be taken back
# (a norm outlier, at least 10x the median, never is). A contribution larger still would leave the rest
# in its rounding noise, so the merge is built again from the others instead.
SUBTRACT_MAX_RATIO = {np.dtype(np.float64): 1e4, np.dtype(np.float32): 1.0}
# A model whose float tensors hold at most this many bytes is summed in float64 whatever its dtype: the
# plain weighted mean bit for bit, at twice an F32 model's size in sums. A larger one (F32, F16, BF16)
# keeps float32 running means, so that its leader holds two models, not three (see MeanAccumulator).
EXACT_SUMS_MAX_BYTES = 32 << 20


class Mean(Merger):
    """Federated Averaging (FedAvg): McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-
    Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017.

    The merged tensor is sum(weight x tensor) / sum(weights), where a peer's weight is its weightage
    x the samples it trained on since the last sync (FedAvg's n_k / n). It is accumulated one
    contribution at a time (`MeanAccumulator`), so the leader holds about two models whatever the
    number of peers: the sums (float64 up to EXACT_SUMS_MAX_BYTES of parameters and for F64 models,
    float32 running means for larger F32, F16 and BF16 ones) and the contribution being added. When
    every weight is 0 (the
    very first sync), peers count equally. Not robust: one peer can move the result anywhere, which is
    why contributions are checked first and `coordmedian` and `geomedian` exist.
    """

    name = "mean"
    holds = "two models (the sums, float32 for a large model, and the contribution being added)"
    needs_individual_updates = False

    def merge(self, contributions: Iterable[Contribution]) -> dict[str, Tensor]:
        acc = MeanAccumulator()
        for c in contributions:
            acc.add(c, contribution_norm(c.tensors))
        return acc.result()

    def accumulator(self) -> MeanAccumulator:
        return MeanAccumulator()


class MeanAccumulator(Accumulator):
    """Per float tensor, the weighted sum or mean so far; the weights; the non-float tensors of the
    heaviest contribution so far.

    A model of at most `exact_max_bytes` of float parameters, and every F64 tensor, keeps float64
    sums (sum(weight x tensor), divided by the total at the end: the plain weighted mean bit for bit).
    The F32, F16 and BF16 tensors of a larger model keep a float32 running mean instead, as float64
    sums would make the leader hold three models with the contribution being added: each
    contribution moves it by weight / (total so far) of the way to its values, computed in float64 and
    rounded to float32 once, so the merge is within about a float32 unit of the exact mean per
    contribution, a lone contribution or peers that agree give back their model bit for bit, and a
    zero-weight one moves nothing."""

    def __init__(self, exact_max_bytes: int = EXACT_SUMS_MAX_BYTES) -> None:
        self.exact_max_bytes = exact_max_bytes
        self.running_means: bool | None = None  # decided by the first contribution's size
        self.sums: dict[str, np.ndarray] = {}
        self.template: dict[str, Tensor] = {}
        self.weights: dict[str, float] = {}
        self.total = 0.0  # of the weights in the sums, in the order they were added
        self.scales: dict[str, float] = {}  # weight x norm of each contribution in the sums
        # For the all-zero-weight case (equal weights); kept only while every weight so far is 0, so
        # that a normal round accumulates once, not twice.
        self.unweighted: dict[str, np.ndarray] | None = {}
        self.heaviest: Contribution | None = None
        self.kept: dict[str, Tensor] = {}  # non-float tensors: from the heaviest contribution

    def add(self, c: Contribution, norm: float) -> None:
        self.weights[c.node] = c.weight
        self.total += c.weight
        self.scales[c.node] = (c.weight or 1.0) * norm
        if c.weight != 0:
            self.unweighted = None
        if self.running_means is None:
            self.running_means = sum(t.array.nbytes for t in c.tensors.values() if t.is_float) > self.exact_max_bytes
        for name, t in c.tensors.items():
            if not t.is_float:
                continue
            if name not in self.sums:
                self.sums[name] = np.zeros(t.array.shape, dtype=self._sum_dtype(t))
                self.template[name] = t
            if self.unweighted is not None:
                if name not in self.unweighted:
                    self.unweighted[name] = np.zeros(t.array.shape, dtype=self._sum_dtype(t))
                _fold(self.unweighted[name], t, 1.0, 1.0 / len(self.weights))
            if c.weight != 0:
                _fold(self.sums[name], t, c.weight, c.weight / self.total)
        if self.heaviest is None or heaviness(c) < heaviness(self.heaviest):
            self.heaviest = _weight_only(c)
            self.kept = {n: t for n, t in c.tensors.items() if not t.is_float}

    def subtract(self, c: Contribution) -> bool:
        others = [s for n, s in self.scales.items() if n != c.node]
        limit = min([SUBTRACT_MAX_RATIO[a.dtype] for a in self.sums.values()] or [0.0])
        if c.node not in self.weights or not others or self.scales[c.node] > limit * max(others):
            return False
        if self.kept and self.heaviest is not None and self.heaviest.node == c.node:
            return False  # its non-float tensors were the ones kept; the next heaviest's are not here
        if self.unweighted is None and c.weight != 0 and all(w == 0 for n, w in self.weights.items() if n != c.node):
            return False  # the rest count equally, and their unweighted sums were not kept
        rest = self.total - c.weight
        for name, t in c.tensors.items():
            if not t.is_float or name not in self.sums:
                continue
            if self.unweighted is not None:
                _fold(self.unweighted[name], t, -1.0, -1.0 / (len(self.weights) - 1))
            if c.weight != 0:
                # m' = m - (w / rest) (x - m): the mean of the others.
                _fold(self.sums[name], t, -c.weight, -c.weight / rest)
        del self.weights[c.node], self.scales[c.node]
        self.total = rest
        if self.heaviest is not None and self.heaviest.node == c.node:
            self.heaviest = None
        return True

    def _sum_dtype(self, t: Tensor) -> np.dtype:
        return np.dtype(np.float32 if self.running_means and t.dtype != "F64" else np.float64)

    def result(self) -> dict[str, Tensor]:
        """The weighted mean; the sums are spent making it (call once): each becomes the merged
        tensor itself when it is of the model's dtype (F32, F64)."""
        if not self.weights:
            raise MergeError("no contribution to merge")
        weighted = self.total > 0
        merged = dict(self.kept)
        for name in list(self.sums):
            acc = self.sums.pop(name) if weighted else self.unweighted.pop(name)
            if acc.dtype == np.float64:  # sums: divided now
                acc /= self.total if weighted else len(self.weights)
            merged[name] = Tensor.from_float(self.template[name].dtype, acc, self.template[name].array.shape)
            del acc
        return merged


def _fold(acc: np.ndarray, t: Tensor, weight: float, fraction: float) -> None:
    """Folds t in (weight > 0) or out (weight < 0): acc += weight x t for float64 sums; acc += fraction
    x (t - acc) for a float32 running mean, a chunk at a time in float64 rounded to float32 once."""
    if acc.dtype == np.float64:
        values = np.asarray(t.as_float64())  # a fresh array: scaled in place, no second temporary
        acc += np.multiply(values, weight, out=values)
        return
    flat_acc, flat = acc.reshape(-1), t.array.reshape(-1)
    for start in range(0, flat.size, CHUNK_VALUES):
        part = Tensor(t.dtype, flat[start:start + CHUNK_VALUES]).as_float64()
        current = flat_acc[start:start + CHUNK_VALUES].astype(np.float64)
        part -= current
        part *= fraction
        part += current
        flat_acc[start:start + CHUNK_VALUES] = part


def _weight_only(c: Contribution) -> Contribution:
    """The heaviest contribution as far as its non-float tensors go: holding it must not keep its
    float tensors (a whole model) alive."""
    return Contribution(c.node, c.weight, {})
