"""The interface every merge method implements, and the checks every contribution passes first.

A method sees the participants' tensor sets one at a time and returns the merged set. A method that
can (`mean`) also offers an `Accumulator`: the leader then adds each contribution as it arrives and
holds about two models, whatever the number of peers; the others (medians) need every contribution at
once, and say so (`Merger.holds`). Contributions are validated first
(same keys, shapes and dtypes as the first one, finite values, a parameter norm in line with the
others') and a bad one is refused with the node's name; the round goes on with the rest. Finite but
runaway values are the norm check's and the robust methods' business: no absolute bound fits every model.

Float tensors are merged in float64 (`mean`: in float32 sums for F32, F16 and BF16 models, each
step computed in float64) and narrowed back to their own dtype. Integer and bool tensors
(step counters and the like) are not averaged: they are taken from the contribution with the largest
weight (ties: the first node in name order).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from swarmlearn.errors import SwarmError
from swarmlearn.tensors import Tensor


# Values a merge widens, checks or scales at a time: its float64 temporaries stay at about 0.5 MB
# whatever the tensor's size (a leader of a large model holds its models, not copies of them).
CHUNK_VALUES = 1 << 16

class BadContribution(SwarmError):
    def __init__(self, node: str, reason: str):
        super().__init__(f"contribution of {node} refused: {reason}")
        self.node = node
        self.reason = reason


class MergeError(SwarmError):
    """Nothing could be merged (no valid contribution)."""


@dataclass(frozen=True)
class Contribution:
    node: str
    weight: float
    tensors: dict[str, Tensor]


def check_contribution(c: Contribution, reference: dict[str, Tensor] | None) -> None:
    """Raises BadContribution unless `c` matches `reference` key for key and holds finite values."""
    if reference is not None:
        missing = sorted(set(reference) - set(c.tensors))
        extra = sorted(set(c.tensors) - set(reference))
        if missing:
            raise BadContribution(c.node, f"tensor {missing[0]} is missing (different model architecture?)")
        if extra:
            raise BadContribution(c.node, f"unexpected tensor {extra[0]} (different model architecture?)")
        for name in sorted(reference):
            ref, got = reference[name], c.tensors[name]
            if got.array.shape != ref.array.shape:
                raise BadContribution(c.node, f"tensor {name} has shape {list(got.array.shape)}, "
                                              f"others have {list(ref.array.shape)}")
            if got.dtype != ref.dtype:
                raise BadContribution(c.node, f"tensor {name} is {got.dtype}, others are {ref.dtype}")
    if not np.isfinite(c.weight) or c.weight < 0:
        raise BadContribution(c.node, f"weight {c.weight} is not a finite number >= 0")
    for name in sorted(c.tensors):
        t = c.tensors[name]
        if not t.is_float:
            continue
        # F16/F32/F64 are checked as they are (NaN and Inf survive widening, so the answer is the
        # same without a float64 copy of a large model); BF16 is stored as bits and must be widened.
        # A chunk at a time: the flags (and BF16's widened values) stay small whatever the tensor.
        flat = t.array.reshape(-1)
        for start in range(0, flat.size, CHUNK_VALUES):
            part = flat[start:start + CHUNK_VALUES]
            values = Tensor(t.dtype, part).as_float64() if t.dtype == "BF16" else part
            if not np.isfinite(values).all():
                raise BadContribution(c.node, f"tensor {name} holds NaN or Inf")


# A contribution whose L2 norm (over all its float tensors) is more than this many times the median
# of the other contributions' norms is refused. Peers hold the same model near the same point, so
# their parameter norms stay within a small factor of each other whatever their data, however late
# they joined and whether or not they still train; a scaled-up ("boosted") or exploded contribution
# is orders of magnitude off. The norms of the parameters, not of the updates, are compared: update
# norms legitimately differ by far more than 10x (a finished node's update is about 0, a returning
# node's is large). The median of the *others* keeps one huge contribution from raising its own bar
# and works from two peers on; a relative rule needs no per-model threshold for users to pick.
NORM_OUTLIER_FACTOR = 10.0


def contribution_norm(tensors: dict[str, Tensor], chunk: int | None = None) -> float:
    """L2 norm over all float tensors, summed in float64 a chunk at a time (no full-size copy: the
    float64 chunk is all it adds to a leader holding a large model)."""
    chunk = chunk or CHUNK_VALUES
    total = 0.0
    for t in tensors.values():
        if not t.is_float:
            continue
        flat = t.array.reshape(-1)
        for start in range(0, flat.size, chunk):
            part = Tensor(t.dtype, flat[start:start + chunk]).as_float64()
            total += float(np.dot(part, part))
    return float(np.sqrt(total))


def norm_outliers(norms: dict[str, float], factor: float = NORM_OUTLIER_FACTOR) -> dict[str, str]:
    """The nodes whose norm exceeds `factor` x the median of the others', with the reason."""
    refused = {}
    for node, norm in norms.items():
        others = [v for n, v in norms.items() if n != node]
        if not others:
            continue
        median = float(np.median(others))
        if median > 0 and norm > factor * median:
            refused[node] = (f"norm {norm:.4g} is more than {factor:g}x the median of the other "
                             f"contributions' ({median:.4g})")
    return refused


class Accumulator(ABC):
    """A merge built one contribution at a time, for methods that need not see every contribution
    at once: the leader adds each as it arrives and passes its checks, keeps only its norm, and takes
    back (subtracts) one found to be a norm outlier once every contribution is in."""

    @abstractmethod
    def add(self, c: Contribution) -> None:
        """Folds a validated contribution in."""

    @abstractmethod
    def subtract(self, c: Contribution) -> bool:
        """Takes back a contribution added before; False when that cannot be done exactly enough
        (the caller then builds the merge again from the contributions it keeps)."""

    @abstractmethod
    def result(self) -> dict[str, Tensor]:
        """The merged tensor set; raises MergeError when nothing is left in it."""


class Merger(ABC):
    name: str
    # What the leader holds while this method merges, for its log line and the docs: "two models"
    # (an accumulator and the contribution being added) or "every contribution".
    holds: str = "every contribution"
    # The contract's seed (swarmlearn.lora.contract_seed), given by get_merger: what `ffa_lora`
    # checks each node's frozen LoRA A against.
    contract_seed: bytes | None = None
    # A method that reads each contribution in the clear (medians, Krum); secure aggregation hides them,
    # so such a method is refused with it.
    needs_individual_updates: bool = True

    @abstractmethod
    def merge(self, contributions: Iterable[Contribution]) -> dict[str, Tensor]:
        """Merges already-validated contributions of identical structure."""

    def check(self, c: Contribution) -> None:
        """This method's own check of a contribution, after check_contribution's: raises
        BadContribution to refuse it by name (the round goes on with the rest). Most have none."""

    def accumulator(self) -> Accumulator | None:
        """An incremental form of this merge, or None when the method needs every contribution at
        once (medians): the leader then holds them all until it merges."""
        return None


def normalized_weights(weights: list[float]) -> np.ndarray:
    """Weights summing to 1; equal weights when every weight is 0 (e.g. the very first sync)."""
    w = np.asarray(weights, dtype=np.float64)
    total = w.sum()
    return np.full(len(w), 1.0 / len(w)) if total <= 0 else w / total


def heaviness(c: Contribution) -> tuple[float, str]:
    """Sort key: the heaviest contribution first, ties broken by node name."""
    return (-c.weight, c.node)


def non_float_from_heaviest(contributions: list[Contribution], name: str) -> Tensor:
    return min(contributions, key=heaviness).tensors[name]


def stacked(contributions: list[Contribution], name: str) -> np.ndarray:
    return np.stack([c.tensors[name].as_float64().ravel() for c in contributions])


def merge_each_tensor(contributions: Iterable[Contribution],
                      combine: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> dict[str, Tensor]:
    """For methods that need every contribution at once: stacks each float tensor as (peers, coords),
    calls combine(values, normalized weights) and narrows the result back to the tensor's dtype."""
    cs = list(contributions)
    if not cs:
        raise MergeError("no contribution to merge")
    weights = normalized_weights([c.weight for c in cs])
    merged: dict[str, Tensor] = {}
    for name, t in cs[0].tensors.items():
        if not t.is_float:
            merged[name] = non_float_from_heaviest(cs, name)
            continue
        merged[name] = Tensor.from_float(t.dtype, combine(stacked(cs, name), weights), t.array.shape)
    return merged
