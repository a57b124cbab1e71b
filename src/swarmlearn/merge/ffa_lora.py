"""`ffa_lora`: LoRA with A frozen at the same values on every node, only B trained and merged."""

from __future__ import annotations

import numpy as np

from swarmlearn.errors import SwarmError
from swarmlearn.lora import frozen_a, lora_factor
from swarmlearn.merge.base import BadContribution, Contribution
from swarmlearn.merge.mean import Mean
from swarmlearn.tensors import Tensor


class FfaLora(Mean):
    """Federated Freeze-A LoRA: Sun, Qin, Li, Ding, "Improving LoRA in Privacy-preserving Federated
    Learning", ICLR 2024.

    Every node freezes each LoRA module's A at the values `swarmlearn.lora.frozen_a` draws from the
    contract's seed (the SL derives it from the ledger and hands it to its ML at join; the callback
    freezes A with merge_method="ffa_lora"), and trains only B and the other trainable tensors. With
    one A everywhere, the weighted mean of the updates is the update of the mean B:
    sum_i w_i B_i @ A = (sum_i w_i B_i) @ A, so `mean`'s merge is exact by construction, with no SVD
    and no reset of the optimizer's moments. The price is an adapter of half the trainable factors
    (FFA-LoRA reports it matching LoRA, and keeping up better under differential privacy's noise).

    A contribution whose A is not the one the seed gives is refused by name (`check`): its node did
    not freeze A (another merge_method in its callback, a model.py that re-initialises the adapter) and
    its B was trained against another A, so averaging it in would be wrong. A contribution whose A
    does not travel (a non-PEFT model sends its trainable tensors only) is merged as it is.
    """

    name = "ffa_lora"

    def __init__(self) -> None:
        self._expected: dict[tuple[str, tuple[int, ...], str], Tensor] = {}

    def check(self, c: Contribution) -> None:
        for name in sorted(c.tensors):
            part = lora_factor(name)
            t = c.tensors[name]
            if part is None or part[1] != "A" or not t.is_float:
                continue
            if not np.array_equal(t.array, self._frozen(part[0], t).array):
                raise BadContribution(c.node, f"tensor {name} is not the frozen A that the contract's seed gives "
                                              f"(ffa_lora): was its SwarmCallback given merge_method='ffa_lora'?")

    def _frozen(self, module: str, t: Tensor) -> Tensor:
        """The contract's A for `module`, narrowed to the contribution's dtype as its model holds it."""
        key = (module, t.array.shape, t.dtype)
        if key not in self._expected:
            if self.contract_seed is None:
                raise SwarmError("ffa_lora checks each node's A against the contract's seed, and this leader "
                                 "was given none")
            self._expected[key] = Tensor.from_float(t.dtype, frozen_a(self.contract_seed, module, t.array.shape),
                                                    t.array.shape)
        return self._expected[key]
