"""`lora_exact`: merges what the nodes' LoRA adapters do, not their factors separately."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

from swarmlearn.lora import LoraPair, lora_pairs
from swarmlearn.merge.base import Contribution, Merger, MergeError, normalized_weights
from swarmlearn.merge.mean import Mean
from swarmlearn.tensors import Tensor

log = logging.getLogger("swarmlearn.merge")


class LoraExact(Merger):
    """A LoRA module adds scaling x B @ A to its frozen weight. Averaging A and B separately (`mean`)
    gives mean(B) @ mean(A), which is not mean(B @ A): the cross terms B_i @ A_j of different nodes
    enter it, and the merged adapter is neither what any node learned nor their average. The problem
    and its fixes: Sun, Qin, Li, Ding, "Improving LoRA in Privacy-preserving Federated Learning"
    (FFA-LoRA, ICLR 2024; `ffa_lora` here); Wang et al., "FLoRA: Federated Fine-Tuning Large Language
    Models with Heterogeneous Low-Rank Adaptations" (2024); Singhal, Ponkshe, Vepakomma, "FedEx-LoRA:
    Exact Aggregation for Federated and Efficient Fine-Tuning of Foundation Models" (2024).

    Per module, this merges M = sum_i w_i B_i @ A_i (w: the weights of `mean`, normalized) and factors
    it back to the module's rank r by truncated SVD, M's best rank-r approximation (Eckart-Young).
    M (out x in) is never formed: M = [w_1 B_1 ... w_n B_n] @ [A_1; ...; A_n], so a QR of each stack
    and an SVD of their (nr x nr) core give M's singular values and vectors, and the leader holds no
    more than the contributions' factors. The relative residual ||M - B @ A||_F / ||M||_F, that is
    sqrt(sum_{j>r} s_j^2 / sum_j s_j^2), is logged per module (debug) and summarised per merge: 0 where
    the nodes' updates together span at most r directions. The scaling (lora_alpha / r) is the same
    on every node (one LoraConfig) and cancels: merging scaling x B_i @ A_i and dividing by it is
    merging B_i @ A_i.

    How M is split between the factors: A = c V_r^T, B = U_r S_r / c, with c the root-mean-square row
    norm of the nodes' A (weighted). A keeps the scale LoRA initialised it at, B takes the singular
    values. The balanced split (sqrt(S_r) on each side) would shrink A to the size of the update,
    early in training far below A's initial size, and with it the gradient that reaches B: the
    adapter would train more slowly after every merge.

    A module whose A is the same on every node (the first merge, where B is 0 and A the shared
    initialisation, or an A the nodes froze) needs no SVD: sum_i w_i B_i @ A = (sum_i w_i B_i) @ A,
    so it is merged as `mean` merges it, exactly, and its A is left as it was. So are the tensors
    that are not LoRA pairs (classifier head, biases, a model without LoRA).

    A re-factored module's A and B are in a new basis: the optimizer's moments for them describe
    coordinates that no longer exist, so the callback clears them (`swarmlearn.lora.reset_moments`;
    README: what that costs).
    """

    name = "lora_exact"
    holds = "every contribution (its LoRA factors, rank x (in + out) per module, and the other tensors)"

    def __init__(self) -> None:
        # module -> relative residual of the last merge, for the re-factored modules.
        self.residuals: dict[str, float] = {}

    def merge(self, contributions: Iterable[Contribution]) -> dict[str, Tensor]:
        cs = list(contributions)
        if not cs:
            raise MergeError("no contribution to merge")
        pairs = lora_pairs(cs[0].tensors)
        refactor = [p for p in pairs if not _same_everywhere(cs, p.a)]
        factored = {name for p in refactor for name in (p.a, p.b)}
        rest = Mean().merge(Contribution(c.node, c.weight, {n: t for n, t in c.tensors.items() if n not in factored})
                            for c in cs)
        weights = normalized_weights([c.weight for c in cs])
        self.residuals = {}
        merged = dict(rest)
        for pair in refactor:
            merged[pair.b], merged[pair.a], self.residuals[pair.module] = _refactored(cs, weights, pair)
            log.debug("lora_exact: %s re-factored to rank %d, relative residual %.3g", pair.module,
                      cs[0].tensors[pair.a].array.shape[0], self.residuals[pair.module])
        if self.residuals:
            worst = max(self.residuals, key=self.residuals.get)
            log.info("lora_exact: %d of %d LoRA modules re-factored from %d peers; relative residual median %.3g, "
                     "max %.3g (%s)", len(refactor), len(pairs), len(cs),
                     float(np.median(list(self.residuals.values()))), self.residuals[worst], worst)
        elif pairs:
            log.info("lora_exact: the %d LoRA modules have the same A on every peer: merged exactly as mean",
                     len(pairs))
        return {name: merged[name] for name in cs[0].tensors}


def _same_everywhere(cs: list[Contribution], name: str) -> bool:
    first = cs[0].tensors[name].array
    return all(np.array_equal(c.tensors[name].array, first) for c in cs[1:])


def _refactored(cs: list[Contribution], weights: np.ndarray, pair: LoraPair) -> tuple[Tensor, Tensor, float]:
    """(B, A, relative residual) of the module's weighted mean update at its rank."""
    a_ref, b_ref = cs[0].tensors[pair.a], cs[0].tensors[pair.b]
    rank = a_ref.array.shape[0]
    a_stack = np.concatenate([c.tensors[pair.a].as_float64().reshape(rank, -1) for c in cs])  # (n r) x in
    b_stack = np.concatenate([w * c.tensors[pair.b].as_float64().reshape(-1, rank)
                              for w, c in zip(weights, cs)], axis=1)  # out x (n r)
    q_b, r_b = np.linalg.qr(b_stack)
    q_a, r_a = np.linalg.qr(a_stack.T)
    u, s, vt = np.linalg.svd(r_b @ r_a.T, full_matrices=False)  # M = (q_b u) diag(s) (q_a vt^T)^T
    energy = float(np.dot(s, s))
    residual = float(np.sqrt(np.dot(s[rank:], s[rank:]) / energy)) if energy > 0 else 0.0
    keep = min(rank, len(s))
    # The RMS row norm of the nodes' A, weighted: A = c x orthonormal rows keeps that scale.
    row_norm = np.sqrt(sum(w * float(np.sum(c.tensors[pair.a].as_float64() ** 2)) for w, c in zip(weights, cs)) / rank)
    scale = row_norm if row_norm > 0 else 1.0
    b = np.zeros((b_stack.shape[0], rank))
    a = np.zeros((rank, a_stack.shape[1]))
    b[:, :keep] = (q_b @ u[:, :keep]) * (s[:keep] / scale)
    a[:keep] = scale * (vt[:keep] @ q_a.T)
    return (Tensor.from_float(b_ref.dtype, b, b_ref.array.shape), Tensor.from_float(a_ref.dtype, a, a_ref.array.shape),
            residual)
