"""Three nodes fine-tune a tiny BERT classifier with LoRA through the Hugging Face Trainer and end with
the same adapters, loadable with `PeftModel.from_pretrained`. Only the adapters and the classifier
head travel each round, never the frozen base model."""

from __future__ import annotations

import functools
import importlib.util

import pytest

from conftest import identity
from swarm_harness import ML_DIR, start_swarm, wait_ml
from swarmlearn.callback.core import FINAL_MESSAGE, load_tensors, model_tensors
from swarmlearn.errors import SwarmError
from swarmlearn.sn.client import SNClient
from swarmlearn.tensors import blob_hash, encode, tensor

NODES = ["node1", "node2", "node3"]


@functools.cache
def user_model():
    """The tests' model.py, loaded as a module, so the test builds exactly the nodes' architecture.
    torch, transformers and peft are imported here, not at collection, which they would slow by seconds.
    They are part of the test environment (extras dev and hf): missing, the tests fail, never skip."""
    missing = [name for name in ("torch", "safetensors", "transformers", "peft")
               if importlib.util.find_spec(name) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed; these tests need the dev and hf extras: run `make venv`")
    spec = importlib.util.spec_from_file_location("tiny_peft_model", ML_DIR / "tiny_peft_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def ml():
    return user_model()


def travels(name: str) -> bool:
    """Only LoRA factors and the classifier head (PEFT's modules_to_save for SEQ_CLS) may travel."""
    return ".lora_A." in name or ".lora_B." in name or name.startswith("base_model.model.classifier.")


def merged_rounds(swarm, certs) -> dict:
    with SNClient(swarm.sn.address, identity(certs, "swci")) as c:
        contracts = c.query("contracts")["contracts"]
    (contract,) = [v for v in contracts.values() if v["rounds"]]
    return {int(k): v for k, v in contract["rounds"].items() if v["status"] == "merged"}


@pytest.mark.slow
def test_three_nodes_fine_tune_lora_and_only_adapters_and_head_travel(procs, certs, tmp_path):
    swarm = start_swarm(procs, certs, tmp_path, NODES, "tiny_peft_model.py",
                        env={"STEPS": "12", "SYNC_FREQUENCY": "4", "MIN_PEERS": "3"})
    wait_ml(swarm, timeout=120)
    ml = user_model()  # imported only now: the nodes have the CPUs to themselves while they train
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file, save

    for node in NODES:
        output = swarm.nodes[node].ml.output
        assert FINAL_MESSAGE in output
        assert f"{node}: done after" in output

    # Every node ends with bit-identical adapters, in both the file it saved and save_pretrained's.
    finals = {n: load_file(swarm.out_dir / n / "final-adapters.safetensors") for n in NODES}
    saved = {n: load_file(swarm.out_dir / n / "final" / "adapter_model.safetensors") for n in NODES}
    reference = finals["node1"]
    assert reference and all(travels(k) for k in reference)
    assert any(".lora_B." in k for k in reference) and any(".classifier." in k for k in reference)
    for node in NODES:
        assert sorted(finals[node]) == sorted(reference) == sorted(saved[node])
        for name, value in reference.items():
            assert finals[node][name].numpy().tobytes() == value.numpy().tobytes(), f"{node} {name}"
            assert saved[node][name].numpy().tobytes() == value.numpy().tobytes(), f"{node} {name}"
    # LoRA B starts at zero: the swarm really trained the adapters.
    assert any(v.abs().sum() > 0 for k, v in reference.items() if ".lora_B." in k)

    # A user reloads them onto the same base with the public PEFT API.
    loaded = PeftModel.from_pretrained(ml.build_base(), swarm.out_dir / "node1" / "final")
    reloaded = get_peft_model_state_dict(loaded)
    assert sorted(reloaded) == sorted(reference)
    for name, value in reference.items():
        assert torch.equal(reloaded[name], value), name

    # What moved each round: one check-in per node the size of adapters + head, far below the model.
    fresh = ml.build_model()
    adapter_blob = save({k: v.detach().contiguous() for k, v in get_peft_model_state_dict(fresh).items()})
    full_blob = save({k: v.detach().contiguous() for k, v in ml.build_base().state_dict().items()})
    assert len(adapter_blob) < len(full_blob) / 8  # 9.7 KB of 90 KB here
    rounds = merged_rounds(swarm, certs)
    assert len(rounds) >= 4  # train begin, steps 4, 8, 12, train end
    for number, r in rounds.items():
        assert sorted(r["participants"]) == NODES
        for node in NODES:
            assert r["checkins"][node]["size"] == len(adapter_blob), f"round {number} {node}"
    # The last merged blob, by its ledger hash, is exactly the adapters + head every node saved.
    final_blob = encode({k: tensor(v.numpy()) for k, v in reference.items()})
    assert rounds[max(rounds)]["merged_hash"] == blob_hash(final_blob)
    assert all(r["merged_size"] == len(final_blob) for r in rounds.values())


def test_a_peft_model_moves_only_its_adapters_and_head_and_loads_them_in_place(ml):
    import torch
    from peft import get_peft_model_state_dict

    model = ml.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p.data_ptr() for n, p in model.named_parameters()}

    sent = model_tensors(model, None)
    assert sorted(sent) == sorted(get_peft_model_state_dict(model))
    assert sent and all(travels(k) for k in sent)
    assert {k.split(".")[-2] for k in sent if ".lora_" in k} == {"lora_A", "lora_B"}
    assert "base_model.model.classifier.weight" in sent and "base_model.model.classifier.bias" in sent

    g = torch.Generator().manual_seed(7)
    perturbed = {k: v + torch.randn(v.shape, generator=g) for k, v in sent.items()}
    load_tensors(model, perturbed, None)
    back = model_tensors(model, None)
    assert sorted(back) == sorted(perturbed)
    for name in perturbed:
        assert torch.equal(back[name], perturbed[name]), name

    # Loaded in place (the optimizer keeps its parameters), and nothing frozen moved.
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k or ".modules_to_save." in k for k in changed)
    assert len(changed) == len(perturbed)

    # A tensor this model lacks is refused rather than silently dropped.
    with pytest.raises(SwarmError):
        load_tensors(model, {**perturbed, "base_model.model.classifier.extra.weight": torch.zeros(2)}, None)


def test_a_plain_torch_module_moves_its_whole_state_dict():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    sent = model_tensors(model, None)
    assert sorted(sent) == sorted(model.state_dict())  # buffers (running stats) travel too
    perturbed = {k: (v + 1 if v.is_floating_point() else v + 3) for k, v in sent.items()}
    load_tensors(model, perturbed, None)
    back = model_tensors(model, None)
    for name in perturbed:
        assert torch.equal(back[name], perturbed[name]), name
