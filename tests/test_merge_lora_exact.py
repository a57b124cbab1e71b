"""`lora_exact`: the merged adapter does what the nodes' adapters do on average, B @ A, not
mean(B) @ mean(A); the residual of its rank-r re-factoring is reported and is the smallest possible.

Checked against the nodes' updates written out in numpy: a merged module's update equals the weighted
mean of the nodes' updates up to the residual the merge reports, exactly (float32) when the nodes'
updates together fit in rank r. A swarm of PEFT nodes trains with it and ends with one adapter.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from swarmlearn.lora import lora_pairs, refactored_modules, reset_moments
from swarmlearn.merge import get_merger
from swarmlearn.merge.base import normalized_weights
from swarmlearn.tensors import tensor
from test_merge import contribution

A, B = "base_model.model.layer.0.query.lora_A.weight", "base_model.model.layer.0.query.lora_B.weight"
OUT, IN, RANK = 24, 16, 4


def adapter(rng: np.random.Generator, a: np.ndarray | None = None, b_scale: float = 1.0) -> dict:
    a = rng.uniform(-0.25, 0.25, (RANK, IN)) if a is None else a
    return {A: tensor(a.astype(np.float32)), B: tensor((rng.standard_normal((OUT, RANK)) * b_scale).astype(np.float32))}


def update(tensors: dict, a: str = A, b: str = B) -> np.ndarray:
    """What the adapter adds to its weight, without LoRA's scaling (the same on every node)."""
    return tensors[b].array.astype(np.float64).reshape(OUT, -1) @ tensors[a].array.astype(np.float64).reshape(RANK, -1)


def mean_update(adapters: list[dict], weights: list[float]) -> np.ndarray:
    return sum(w * update(t) for w, t in zip(normalized_weights(weights), adapters))


def relative(x: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(x - reference) / np.linalg.norm(reference))


def test_averaging_a_and_b_separately_is_not_the_average_of_the_updates():
    """The motivating case: two nodes' adapters averaged factor by factor give an update neither
    learned, nor their average; lora_exact gives the average, up to the residual it reports."""
    rng = np.random.default_rng(1)
    nodes = [adapter(rng), adapter(rng)]
    peers = [contribution("node-1", 1.0, **nodes[0]), contribution("node-2", 1.0, **nodes[1])]
    want = mean_update(nodes, [1.0, 1.0])

    factor_by_factor = get_merger("mean").merge(peers)
    assert relative(update(factor_by_factor), want) > 0.5

    merger = get_merger("lora_exact")
    merged = merger.merge(peers)
    assert relative(update(merged), want) == pytest.approx(merger.residuals["base_model.model.layer.0.query"],
                                                           abs=1e-6)
    assert merger.residuals["base_model.model.layer.0.query"] < relative(update(factor_by_factor), want)


@pytest.mark.parametrize("weights", [[1.0, 1.0], [3.0, 1.0, 0.5], [0.0, 0.0, 0.0]])
def test_updates_that_fit_in_rank_r_merge_exactly(weights):
    """Nodes whose A differ but span the same r directions (A_i = R_i A_0): the mean of their
    updates has rank r, so the re-factored adapter carries it exactly and reports residual 0."""
    rng = np.random.default_rng(2)
    a0 = rng.uniform(-0.25, 0.25, (RANK, IN))
    nodes = [adapter(rng, a=rng.standard_normal((RANK, RANK)) @ a0) for _ in weights]
    merger = get_merger("lora_exact")
    merged = merger.merge([contribution(f"node-{i}", w, **t) for i, (w, t) in enumerate(zip(weights, nodes))])
    assert merger.residuals["base_model.model.layer.0.query"] < 1e-7
    assert relative(update(merged), mean_update(nodes, weights)) < 1e-6  # float32 factors
    assert merged[A].dtype == merged[B].dtype == "F32"
    assert merged[A].array.shape == (RANK, IN) and merged[B].array.shape == (OUT, RANK)


def test_beyond_rank_r_the_reported_residual_is_the_true_one_and_the_least_possible(caplog):
    """Three nodes of rank 4 together span 12 directions: at rank 4 something is lost, and the merge
    says how much. What it keeps is the best rank-4 approximation (Eckart-Young): no rank-4 adapter
    comes closer to the nodes' mean update. A heavier node pulls the merged update towards its own."""
    rng = np.random.default_rng(3)
    nodes = [adapter(rng) for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    merger = get_merger("lora_exact")
    with caplog.at_level(logging.DEBUG, logger="swarmlearn.merge"):
        merged = merger.merge([contribution(f"node-{i}", w, **t) for i, (w, t) in enumerate(zip(weights, nodes))])
    want = mean_update(nodes, weights)
    residual = merger.residuals["base_model.model.layer.0.query"]
    singular = np.linalg.svd(want, compute_uv=False)
    best = float(np.sqrt(np.sum(singular[RANK:] ** 2) / np.sum(singular ** 2)))
    assert 0.05 < residual == pytest.approx(best, rel=1e-9)
    assert relative(update(merged), want) == pytest.approx(residual, rel=1e-5)
    heaviest = update(nodes[2])
    assert np.linalg.norm(update(merged) - heaviest) < np.linalg.norm(mean_update(nodes, [1, 1, 1]) - heaviest)
    lines = [r.getMessage() for r in caplog.records if r.name == "swarmlearn.merge"]
    assert any("1 of 1 LoRA modules re-factored from 3 peers" in line and f"max {residual:.3g}" in line
               for line in lines), lines
    assert any("base_model.model.layer.0.query re-factored to rank 4" in line for line in lines), lines


def test_the_merged_a_keeps_the_scale_of_the_nodes_a_and_b_takes_the_update():
    """The split of the merged update: A's rows orthogonal at the nodes' (weighted RMS) row norm,
    the size LoRA trains A at, rather than shrunk to the size of the update."""
    rng = np.random.default_rng(4)
    nodes = [adapter(rng, b_scale=1e-3) for _ in range(3)]  # early in training: B small
    merged = get_merger("lora_exact").merge([contribution(f"node-{i}", 1.0, **t) for i, t in enumerate(nodes)])
    a = merged[A].array.astype(np.float64)
    row_norm = np.sqrt(np.mean([np.sum(t[A].array.astype(np.float64) ** 2) / RANK for t in nodes]))
    np.testing.assert_allclose(a @ a.T, row_norm ** 2 * np.eye(RANK), atol=1e-6)


def test_modules_whose_a_is_the_same_everywhere_merge_as_mean_bit_for_bit(caplog):
    """The first merge (B = 0, the nodes' common initial A), or A frozen: no SVD, A unchanged, B the
    weighted mean, and the merged update is the mean update exactly."""
    rng = np.random.default_rng(5)
    a = rng.uniform(-0.25, 0.25, (RANK, IN))
    nodes = [adapter(rng, a=a) for _ in range(3)]
    peers = [contribution(f"node-{i}", w, **t) for i, (w, t) in enumerate(zip([1.0, 2.0, 3.0], nodes))]
    merger = get_merger("lora_exact")
    with caplog.at_level(logging.INFO, logger="swarmlearn.merge"):
        merged = merger.merge(peers)
    mean = get_merger("mean").merge(peers)
    assert merger.residuals == {}
    assert np.array_equal(merged[A].array, nodes[0][A].array)
    assert np.array_equal(merged[B].array, mean[B].array)
    assert "have the same A on every peer: merged exactly as mean" in caplog.text
    # B = 0 everywhere (PEFT's initialisation): the adapter comes back as it went, not as A = B = 0.
    zero = {A: nodes[0][A], B: tensor(np.zeros((OUT, RANK), dtype=np.float32))}
    fresh = merger.merge([contribution("node-1", 0.0, **zero), contribution("node-2", 0.0, **zero)])
    assert np.array_equal(fresh[A].array, zero[A].array) and not fresh[B].array.any()


def test_peft_adapter_names_other_tensors_and_lone_factors():
    """PEFT names factors with or without the adapter's name; every tensor that is not a LoRA pair
    (classifier head, a factor without its partner, counters) is merged as `mean` merges it."""
    rng = np.random.default_rng(6)
    named_a, named_b = "enc.value.lora_A.default.weight", "enc.value.lora_B.default.weight"

    def node() -> dict:
        return {named_a: tensor(rng.standard_normal((2, 6)).astype(np.float32)),
                named_b: tensor(rng.standard_normal((5, 2)).astype(np.float32)),
                "enc.key.lora_A.weight": tensor(rng.standard_normal((2, 6)).astype(np.float32)),  # no B
                "classifier.weight": tensor(rng.standard_normal((2, 5)).astype(np.float32)),
                "step": tensor(np.array(int(rng.integers(0, 100)), dtype=np.int64))}

    nodes = [node() for _ in range(3)]
    peers = [contribution(f"node-{i}", w, **t) for i, (w, t) in enumerate(zip([1.0, 4.0, 2.0], nodes))]
    assert [p.module for p in lora_pairs(nodes[0])] == ["enc.value"]
    merger = get_merger("lora_exact")
    merged = merger.merge(peers)
    mean = get_merger("mean").merge(peers)
    assert list(merged) == list(nodes[0])
    assert set(merger.residuals) == {"enc.value"}
    for name in ("enc.key.lora_A.weight", "classifier.weight", "step"):
        assert np.array_equal(merged[name].array, mean[name].array), name
    want = sum(w * nodes[i][named_b].array.astype(np.float64) @ nodes[i][named_a].array.astype(np.float64)
               for i, w in enumerate(normalized_weights([1.0, 4.0, 2.0])))
    got = merged[named_b].array.astype(np.float64) @ merged[named_a].array.astype(np.float64)
    assert relative(got, want) == pytest.approx(merger.residuals["enc.value"], abs=1e-6)


def test_a_conv_adapter_is_merged_by_its_product_too():
    """PEFT's LoRA on a conv layer: A is r x in x k x k, B is out x r x 1 x 1."""
    rng = np.random.default_rng(7)
    a0 = rng.standard_normal((3, 2 * 3 * 3))
    nodes = [{"conv.lora_A.weight": tensor((rng.standard_normal((3, 3)) @ a0).reshape(3, 2, 3, 3).astype(np.float32)),
              "conv.lora_B.weight": tensor(rng.standard_normal((4, 3, 1, 1)).astype(np.float32))} for _ in range(2)]
    merged = get_merger("lora_exact").merge([contribution(f"node-{i}", 1.0, **t) for i, t in enumerate(nodes)])
    assert merged["conv.lora_A.weight"].array.shape == (3, 2, 3, 3)

    def conv_update(t: dict) -> np.ndarray:
        return t["conv.lora_B.weight"].array.reshape(4, 3).astype(np.float64) @ \
            t["conv.lora_A.weight"].array.reshape(3, -1).astype(np.float64)

    assert relative(conv_update(merged), (conv_update(nodes[0]) + conv_update(nodes[1])) / 2) < 1e-6


def test_a_node_resets_its_optimizers_moments_of_re_factored_factors_only():
    """After a lora_exact merge, the Adam moments of the factors that came back in a new basis are
    cleared (they describe coordinates that no longer exist); those of the others are kept."""
    import torch

    from swarmlearn.lora import lora_parameters

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"q": torch.nn.ModuleDict({"lora_A": torch.nn.Linear(6, 2, bias=False),
                                                           "lora_B": torch.nn.Linear(2, 5, bias=False)}),
                                 "v": torch.nn.ModuleDict({"lora_A": torch.nn.Linear(6, 2, bias=False),
                                                           "lora_B": torch.nn.Linear(2, 5, bias=False)}),
                                 "head": torch.nn.Linear(5, 2)})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sum(p.sum() for p in model.parameters()).backward()
    optimizer.step()
    sent = {n: tensor(p.detach().numpy().copy()) for n, p in model.named_parameters()}
    merged = dict(sent)
    merged["q.lora_A.weight"] = tensor(sent["q.lora_A.weight"].array * 2)  # q re-factored, v not

    modules = refactored_modules(sent, merged)
    assert modules == {"q"}
    assert reset_moments(optimizer, lora_parameters(model, modules)) == 2
    assert model.q.lora_A.weight not in optimizer.state and model.q.lora_B.weight not in optimizer.state
    assert "exp_avg" in optimizer.state[model.v.lora_A.weight] and "exp_avg" in optimizer.state[model.head.weight]
    optimizer.step()  # starts the cleared ones afresh, like a first step
    assert int(optimizer.state[model.q.lora_A.weight]["step"]) == 1
    assert int(optimizer.state[model.v.lora_A.weight]["step"]) == 2


def test_the_callback_resets_the_moments_of_what_came_back_re_factored(caplog):
    """SwarmCore's hook after loading a merged model (merge_method lora_exact): the factors of the
    PEFT modules whose A came back different lose their Adam moments; with no optimizer given, it
    says once that they are kept."""
    import torch

    from swarmlearn.callback.core import SwarmCore, model_tensors, torch_to_blob
    from test_swarm_peft import user_model

    model = user_model().build_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(input_ids=torch.ones(2, 4, dtype=torch.long), labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    sent = model_tensors(model, None)
    (query_a,) = [n for n in sent if ".layer.0.attention.self.query.lora_A." in n]
    merged = {**sent, query_a: sent[query_a] * 2}
    core = SwarmCore(model, merge_method="lora_exact")
    with caplog.at_level(logging.INFO, logger="swarmlearn.ml"):
        core._reset_refactored(torch_to_blob(sent), torch_to_blob(merged))
        core._reset_refactored(torch_to_blob(sent), torch_to_blob(merged))
    assert caplog.text.count("moments for them are kept") == 1
    assert len(optimizer.state) == len([p for p in model.parameters() if p.requires_grad])

    core.optimizer = optimizer
    core._reset_refactored(torch_to_blob(sent), torch_to_blob(sent))  # nothing re-factored
    assert len(optimizer.state) == len([p for p in model.parameters() if p.requires_grad])
    core._reset_refactored(torch_to_blob(sent), torch_to_blob(merged))
    cleared = [n for n, p in model.named_parameters() if p.requires_grad and p not in optimizer.state]
    assert sorted(cleared) == sorted(n for n, _ in model.named_parameters()
                                     if ".layer.0.attention.self.query.lora_" in n)


@pytest.mark.slow
def test_two_peft_nodes_train_with_lora_exact_and_end_with_the_same_adapter(procs, certs, tmp_path):
    from safetensors.torch import load_file

    from swarm_harness import everything, start_swarm, wait_ml

    nodes = ["node1", "node2"]
    swarm = start_swarm(procs, certs, tmp_path, nodes, "tiny_peft_model.py",
                        env={"STEPS": "8", "SYNC_FREQUENCY": "4", "MIN_PEERS": "2", "MERGE_METHOD": "lora_exact"})
    wait_ml(swarm, timeout=120)
    finals = {n: load_file(swarm.out_dir / n / "final-adapters.safetensors") for n in nodes}
    assert any(".lora_A." in k for k in finals["node1"])
    for name, value in finals["node1"].items():
        assert finals["node2"][name].numpy().tobytes() == value.numpy().tobytes(), name
    logs = everything(swarm)
    # The first merge finds the common initial A; once the nodes' A have trained apart, the leader
    # re-factors and says how much the rank cut, and the nodes reset their moments for the new basis.
    assert "LoRA modules have the same A on every peer" in logs, logs
    assert "LoRA modules re-factored from 2 peers; relative residual median" in logs, logs
