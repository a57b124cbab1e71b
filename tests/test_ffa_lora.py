"""`ffa_lora`: every node freezes LoRA's A at values drawn from the contract's seed and trains only B,
so the mean of B merges the nodes' updates exactly; a node whose A is another is refused by name.

The frozen A is computed by the SL (numpy only, to check contributions) and by the ML (to freeze its
model) alike, from a generator fixed by its algorithm (checked here against PCG64 written in Python).
A swarm of PEFT nodes trains with it and ends with the contract's A and one B.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from swarmlearn.errors import SwarmError
from swarmlearn.lora import contract_seed, freeze_lora_a, frozen_a
from swarmlearn.merge import get_merger
from swarmlearn.merge.base import BadContribution
from swarmlearn.sl.round import _Contributions
from swarmlearn.tensors import Tensor, tensor
from test_merge import contribution

SEED = contract_seed("0f" * 32, "default", 0)
MODULE = "base_model.model.bert.encoder.layer.0.attention.self.query"
A, B = f"{MODULE}.lora_A.weight", f"{MODULE}.lora_B.weight"


def pcg64_raw(state: int, inc: int, count: int) -> list[int]:
    """PCG64 (XSL-RR 128/64) as its authors define it: advance the 128-bit LCG, then output."""
    outputs = []
    for _ in range(count):
        state = (state * 0x2360ED051FC65DA44385DF649FCCF645 + inc) % (1 << 128)
        x = ((state >> 64) ^ state) & ((1 << 64) - 1)
        rot = state >> 122
        outputs.append(((x >> rot) | (x << ((64 - rot) & 63))) & ((1 << 64) - 1))
    return outputs


def test_the_frozen_a_is_fixed_by_the_seed_and_module_and_sized_like_peft_s():
    import hashlib

    a = frozen_a(SEED, MODULE, (8, 32))
    assert a.dtype == np.float32 and a.shape == (8, 32)
    assert np.array_equal(a, frozen_a(SEED, MODULE, (8, 32)))
    assert not np.array_equal(a, frozen_a(SEED, MODULE.replace("query", "value"), (8, 32)))
    assert not np.array_equal(a, frozen_a(contract_seed("0f" * 32, "default", 1), MODULE, (8, 32)))
    bound = 1 / math.sqrt(32)  # PEFT's kaiming_uniform_(a=sqrt(5)) bound
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound and abs(a.mean()) < 0.1 * bound
    # The stream is PCG64's from the state and increment sha256(seed | module) gives, whatever numpy does.
    digest = hashlib.sha256(SEED + b"|" + MODULE.encode()).digest()
    raw = pcg64_raw(int.from_bytes(digest[:16], "little"), int.from_bytes(digest[16:], "little") | 1, 5)
    want = [np.float32((2 * ((x >> 11) * 2.0 ** -53) - 1) * bound) for x in raw]
    assert a.ravel()[:5].tolist() == want


def test_the_seed_is_the_ledger_s_and_the_contract_s():
    seeds = {contract_seed(g, c, n) for g in ("a" * 64, "b" * 64) for c in ("default", "other") for n in (0, 1)}
    assert len(seeds) == 8 and all(len(s) == 32 for s in seeds)


def test_an_sl_computes_the_frozen_a_with_numpy_alone():
    code = ("import sys; from swarmlearn.lora import frozen_a; from swarmlearn.merge import get_merger; "
            "get_merger('ffa_lora'); frozen_a(b'x', 'm', (4, 8)); "
            "assert not {'torch', 'peft', 'transformers'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def node_adapter(rng: np.random.Generator, a: np.ndarray | None = None) -> dict[str, Tensor]:
    return {A: tensor(frozen_a(SEED, MODULE, (4, 16)) if a is None else a),
            B: tensor(rng.standard_normal((12, 4)).astype(np.float32)),
            "classifier.weight": tensor(rng.standard_normal((2, 12)).astype(np.float32))}


def test_the_merged_update_is_the_mean_update_exactly():
    rng = np.random.default_rng(1)
    nodes = [node_adapter(rng) for _ in range(3)]
    weights = [1.0, 3.0, 0.5]
    merger = get_merger("ffa_lora", contract_seed=SEED)
    peers = [contribution(f"node-{i}", w, **t) for i, (w, t) in enumerate(zip(weights, nodes))]
    for p in peers:
        merger.check(p)
    merged = merger.merge(peers)
    assert np.array_equal(merged[A].array, frozen_a(SEED, MODULE, (4, 16)))
    a = merged[A].array.astype(np.float64)
    want = sum(w * t[B].array.astype(np.float64) @ a for w, t in zip(np.array(weights) / sum(weights), nodes))
    got = merged[B].array.astype(np.float64) @ a
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())  # float32 B, nothing more


def test_a_node_whose_a_is_not_the_contract_s_is_refused_by_name():
    rng = np.random.default_rng(2)
    merger = get_merger("ffa_lora", contract_seed=SEED)
    merger.check(contribution("node-1", 1.0, **node_adapter(rng)))
    trained = frozen_a(SEED, MODULE, (4, 16)).copy()
    trained[0, 0] += 1e-3
    with pytest.raises(BadContribution) as caught:
        merger.check(contribution("node-2", 1.0, **node_adapter(rng, a=trained)))
    assert caught.value.node == "node-2" and A in caught.value.reason
    # Another contract's A (another seed) is refused too; a leader given no seed cannot check and says so.
    with pytest.raises(BadContribution):
        merger.check(contribution("node-3", 1.0, **node_adapter(rng, a=frozen_a(b"other", MODULE, (4, 16)))))
    with pytest.raises(SwarmError, match="seed"):
        get_merger("ffa_lora").check(contribution("node-1", 1.0, **node_adapter(rng)))


def test_the_leader_drops_the_refused_node_and_merges_the_rest():
    """The round's check of each contribution calls the method's own: the bad node is dropped with
    its reason, the others go on to the merge."""
    rng = np.random.default_rng(3)
    peers = {"node-1": node_adapter(rng), "node-2": node_adapter(rng, a=frozen_a(b"other", MODULE, (4, 16))),
             "node-3": node_adapter(rng)}
    dropped: dict[str, str] = {}
    contributions = _Contributions(sorted(peers), lambda n: contribution(n, 1.0, **peers[n]),
                                   lambda n, why: dropped.setdefault(n, why), pool=None, window=0)
    contributions.check = get_merger("ffa_lora", contract_seed=SEED).check
    assert [c.node for c, _ in contributions.valid()] == ["node-1", "node-3"]
    assert list(dropped) == ["node-2"] and "frozen A" in dropped["node-2"]


def test_a_frozen_a_does_not_train_even_with_weight_decay():
    """The callback freezes A after the Trainer made its optimizer: A gets no gradient, and AdamW skips
    a parameter without one, its weight decay included; B trains."""
    import torch

    from test_swarm_peft import user_model

    model = user_model().build_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    assert freeze_lora_a(model, SEED) == 4  # query and value of 2 layers
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        model(input_ids=torch.randint(0, 64, (4, 8)), labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            module = name.split(".lora_A.")[0]
            assert not p.requires_grad
            assert np.array_equal(p.detach().numpy(), frozen_a(SEED, module, tuple(p.shape))), name
        elif ".lora_B." in name:
            assert not torch.equal(p, before[name]), name


@pytest.mark.slow
def test_two_peft_nodes_train_with_ffa_lora_and_end_with_the_contract_s_a(procs, certs, tmp_path):
    from safetensors.torch import load_file

    from conftest import identity
    from swarm_harness import everything, start_swarm, wait_ml
    from swarmlearn.sn.client import SNClient

    nodes = ["node1", "node2"]
    swarm = start_swarm(procs, certs, tmp_path, nodes, "tiny_peft_model.py",
                        env={"STEPS": "8", "SYNC_FREQUENCY": "4", "MIN_PEERS": "2", "MERGE_METHOD": "ffa_lora"})
    wait_ml(swarm, timeout=120)
    with SNClient(swarm.sn.address, identity(certs, "swci")) as c:
        genesis = c.query("info")["info"]["genesis_hash"]
        contracts = c.query("contracts")["contracts"]
    (name, contract), = [(k, v) for k, v in contracts.items() if v["rounds"]]
    seed = contract_seed(genesis, name, contract["generation"])
    finals = {n: load_file(swarm.out_dir / n / "final-adapters.safetensors") for n in nodes}
    factors_a = [k for k in finals["node1"] if ".lora_A." in k]
    assert len(factors_a) == 4
    for key in factors_a:
        want = frozen_a(seed, key.split(".lora_A.")[0], tuple(finals["node1"][key].shape))
        assert np.array_equal(finals["node1"][key].numpy(), want), key
    for key, value in finals["node1"].items():
        assert finals["node2"][key].numpy().tobytes() == value.numpy().tobytes(), key
    assert any(v.abs().sum() > 0 for k, v in finals["node1"].items() if ".lora_B." in k)  # B trained
    assert "dropped" not in everything(swarm)
