"""LoRA adapters as the swarm merges them, for both sides of the local channel: the SL's merge methods
(`lora_exact`, `ffa_lora`: numpy only) and the ML's callback (torch, imported only by the functions
that take a model or an optimizer).

PEFT names a LoRA module's factors `<module>.lora_A[.<adapter>].weight` (r x in; a conv layer's
r x in x k x k) and `<module>.lora_B[.<adapter>].weight` (out x r [x 1 x 1]); the module adds
scaling x B @ A to its frozen weight, scaling = lora_alpha / r. Its state dict
(`get_peft_model_state_dict`, what a PEFT model contributes) drops the adapter name; its parameters
keep it. Modules are named here by what comes before `.lora_A`/`.lora_B`, the same on both sides.

`ffa_lora` freezes every A at values both sides compute from the contract's seed (`frozen_a`), which
the SL derives from its ledger (`contract_seed`) and tells its ML when it joins.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import numpy as np

from swarmlearn.tensors import Tensor

_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?P<adapter>\.[^.]+)?\.weight$")


def lora_factor(name: str) -> tuple[str, str] | None:
    """(module, "A" or "B") when `name` is a LoRA factor's weight, else None."""
    m = _FACTOR.match(name)
    return (m["module"], m["factor"]) if m else None


@dataclass(frozen=True)
class LoraPair:
    module: str
    a: str  # the names of its factors in the tensor set
    b: str


def lora_pairs(tensors: dict[str, Tensor]) -> list[LoraPair]:
    """The LoRA modules of a tensor set whose float factors fit together (B's columns = A's rows = r):
    A reshapes to r x in, B to out x r. A factor without its partner, or that does not fit, is not a
    pair (a merge method then treats it as any other tensor)."""
    pairs = []
    for name, a in tensors.items():
        m = _FACTOR.match(name)
        if not m or m["factor"] != "A":
            continue
        b_name = f"{m['module']}.lora_B{m['adapter'] or ''}.weight"
        b = tensors.get(b_name)
        if b is None or not (a.is_float and b.is_float) or a.array.ndim < 2 or b.array.ndim < 2:
            continue
        if b.array.shape[1] == a.array.shape[0] and math.prod(b.array.shape[2:]) == 1:
            pairs.append(LoraPair(m["module"], name, b_name))
    return pairs


# ---------------------------------------------------------------------------------------- ffa_lora


def contract_seed(genesis_hash: str, contract: str, generation: int) -> bytes:
    """The seed of a contract's frozen LoRA A: the same for every member that reads the same ledger,
    different for another swarm (genesis), contract, or the same contract started over (generation).
    Not a secret (any member computes it), nor does it need to be: it only makes A agree."""
    return hashlib.sha256(f"{genesis_hash}|{contract}|{generation}".encode()).digest()


def frozen_a(seed: bytes, module: str, shape: tuple[int, ...]) -> np.ndarray:
    """The frozen A of `module` (float32, `shape` = r x in [x k x k]): uniform in +-1/sqrt(fan_in), the
    bound PEFT's own initialization (kaiming_uniform_ with a=sqrt(5)) gives, so that B trains at the
    scale it would with PEFT's A.

    Drawn from a PCG64 generator whose 128-bit state and increment are sha256(seed | module), read
    with `random_raw` and mapped to floats here: the stream is fixed by the PCG64 algorithm, not by
    numpy's seeding or distribution code, so any numpy (and the tests' plain-Python PCG64) gives the
    same A."""
    digest = hashlib.sha256(seed + b"|" + module.encode()).digest()
    bits = np.random.PCG64(0)
    bits.state = {"bit_generator": "PCG64", "has_uint32": 0, "uinteger": 0,
                  "state": {"state": int.from_bytes(digest[:16], "little"),
                            "inc": int.from_bytes(digest[16:], "little") | 1}}
    count = math.prod(shape)
    unit = (bits.random_raw(count) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # [0, 1), 53 bits
    bound = 1.0 / math.sqrt(max(1, math.prod(shape[1:])))
    return ((2.0 * unit - 1.0) * bound).astype(np.float32).reshape(shape)


def freeze_lora_a(model, seed: bytes) -> int:
    """Sets every LoRA A of a torch model to `frozen_a` and stops training it; returns how many.

    The optimizer may already hold these parameters (the Trainer makes it before on_train_begin):
    that is harmless, as a parameter with requires_grad=False gets no .grad, and torch's optimizers
    skip a parameter whose .grad is None, decoupled weight decay (AdamW) included."""
    import torch

    frozen = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            part = lora_factor(name)
            if part is None or part[1] != "A":
                continue
            values = torch.from_numpy(frozen_a(seed, part[0], tuple(param.shape)))
            param.copy_(values.to(device=param.device, dtype=param.dtype))
            param.requires_grad_(False)
            param.grad = None
            frozen += 1
    return frozen


# -------------------------------------------------------------------------------------- lora_exact


def refactored_modules(sent: dict[str, Tensor], merged: dict[str, Tensor]) -> set[str]:
    """The LoRA modules whose A came back different from the A this node sent: `lora_exact`
    re-factored them (or this node caught up with the swarm's), so A and B are in a new basis."""
    changed = set()
    for name, mine in sent.items():
        part = lora_factor(name)
        if part is None or part[1] != "A" or name not in merged:
            continue
        if not np.array_equal(mine.array, merged[name].array):
            changed.add(part[0])
    return changed


def lora_parameters(model, modules: set[str]) -> list:
    """The A and B parameters of `modules` in a torch model (every adapter of each)."""
    found = []
    for name, param in model.named_parameters():
        part = lora_factor(name)
        if part is not None and part[0] in modules:
            found.append(param)
    return found


def reset_moments(optimizer, params: list) -> int:
    """Clears the optimizer's state (Adam's exp_avg, exp_avg_sq and step; momentum buffers) of
    `params`: a torch optimizer starts a parameter without state afresh at its next step, as on its
    first. Returns how many held state. Works through wrappers that expose `.state` (accelerate's)."""
    state = optimizer.state
    cleared = 0
    for p in params:
        if state.pop(p, None):
            cleared += 1
    return cleared
