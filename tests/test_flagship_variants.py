"""The flagship (MiniLM + LoRA, model.py unchanged but for its settings) end to end, small, with the
merging issue 16 added: secure aggregation together with record-level DP-SGD (ε ≈ 8), and lora_exact.
Real processes: an SN, three SLs over mTLS, three model.py. Accuracy at this size means nothing; what is
checked is that every node ends with the same adapters and each variant did what it says (the ledger's
secure phases, the privacy spent, the re-factored merge). `python -m bench merging` measures them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench._flagship import NODES, run_nodes
from bench.merging import round_costs
from swarmlearn.datasets import prepare
from swarmlearn.ledger.sqlite_store import SQLiteStore
from swarmlearn.ledger.state import fold

pytestmark = pytest.mark.slow

SMALL = {"LEARNING_RATE": "3e-3", "SYNC_FREQUENCY": "2", "MAX_STEPS": "4", "BATCH_SIZE": "8", "MAX_LENGTH": "32",
         "EVAL_EVERY": "100"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("flagship-data")
    prepare(folder, nodes=len(NODES), train_per_node=32, test_size=32, seed=42)
    return folder


def same_adapters(out: Path) -> None:
    from safetensors.numpy import load_file

    tensors = [load_file(out / n / "final" / "adapter_model.safetensors") for n in NODES]
    assert set(tensors[0]) and all(set(t) == set(tensors[0]) for t in tensors)
    for name in tensors[0]:
        assert all(t[name].tobytes() == tensors[0][name].tobytes() for t in tensors), name


def ledger(out: Path):
    store = SQLiteStore(out / "swarm" / "sn" / "ledger.db", read_only=True)
    try:
        return fold(store.read())
    finally:
        store.close()


@pytest.mark.timeout(400)
def test_the_flagship_trains_with_secure_aggregation_and_record_level_dp(data, tmp_path):
    out = tmp_path / "secure-dp"
    metrics = run_nodes(out, data, {**SMALL, "MERGE_METHOD": "secure_mean", "DP_EPSILON": "8"}, swarm=True)
    same_adapters(out)
    for m in metrics:
        privacy = m["privacy"]
        assert 0 < privacy["epsilon"] <= 8.0 * 1.01 and privacy["delta"] == pytest.approx(1e-5), privacy
    contract = ledger(out).contract("default")
    merged = [r for r in contract.rounds.values() if r.status == "merged"]
    assert len(merged) >= 3 and all(r.secure is not None and r.secure.survivors == sorted(NODES) for r in merged)
    assert round_costs(out / "swarm" / "sn" / "ledger.db")["rounds"] == len(merged)
    log = (out / "node1.log").read_text()
    assert "ε=" in log and "Final Swarm model was loaded" in log


@pytest.mark.timeout(400)
def test_the_flagship_trains_with_lora_exact(data, tmp_path):
    out = tmp_path / "lora-exact"
    run_nodes(out, data, {**SMALL, "MERGE_METHOD": "lora_exact"}, swarm=True)
    same_adapters(out)
    members = ledger(out).contract("default").members  # they left at the end; each joined with its method
    assert {members[n].merge_method for n in NODES} == {"lora_exact"}
    assert json.loads((out / "node1" / "metrics.json").read_text())["rounds"] >= 3
    # The last merge re-factored every module from the mean of B·A: its A has orthogonal rows of one
    # length (A = c V_r^T), which no node's trained A has by itself.
    import numpy as np
    from safetensors.numpy import load_file

    adapters = load_file(out / "node1" / "final" / "adapter_model.safetensors")
    factors = [name for name in adapters if "lora_A" in name]
    assert factors
    for name in factors:
        a = adapters[name].astype(np.float64)
        gram = a @ a.T
        assert np.allclose(gram, gram[0, 0] * np.eye(len(a)), atol=1e-4 * gram[0, 0]), name
