"""Three nodes train a tiny torch model on different data, each with its own SL process, and end
every round holding the same merged weights: the merge the test recomputes on its own."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import identity
from swarm_harness import start_swarm, wait_ml
from swarmlearn.merge import METHODS
from swarmlearn.sn.client import SNClient

NODES = ["node1", "node2", "node3"]


def ledger_rounds(swarm, certs) -> dict:
    with SNClient(swarm.sn.address, identity(certs, "swci")) as c:
        contracts = c.query("contracts")["contracts"]
    (contract,) = [v for v in contracts.values() if v["rounds"]]
    return {int(k): v for k, v in contract["rounds"].items() if v["status"] == "merged"}


def reference_mean(sent: list[dict], weights: list[float]) -> dict:
    w = np.asarray(weights, dtype=np.float64)
    w = np.full(len(w), 1 / len(w)) if w.sum() == 0 else w / w.sum()
    return {k: sum(wi * s[k].astype(np.float64) for wi, s in zip(w, sent)).astype(sent[0][k].dtype) for k in sent[0]}


def reference_coordmedian(sent: list[dict], weights: list[float]) -> dict:
    w = np.asarray(weights, dtype=np.float64)
    w = np.full(len(w), 1 / len(w)) if w.sum() == 0 else w / w.sum()
    out = {}
    for k in sent[0]:
        flat = np.stack([s[k].astype(np.float64).ravel() for s in sent])
        col = np.empty(flat.shape[1])
        for j in range(flat.shape[1]):
            pairs = sorted(zip(flat[:, j], w), key=lambda p: p[0])
            acc = 0.0
            for value, weight in pairs:
                acc += weight
                if acc >= 0.5 - 1e-12:
                    col[j] = value
                    break
        out[k] = col.reshape(sent[0][k].shape).astype(sent[0][k].dtype)
    return out


def reference_geomedian(sent: list[dict], weights: list[float]) -> dict:
    w = np.asarray(weights, dtype=np.float64)
    w = np.full(len(w), 1 / len(w)) if w.sum() == 0 else w / w.sum()
    out = {}
    for k in sent[0]:
        pts = np.stack([s[k].astype(np.float64).ravel() for s in sent])
        z = w @ pts
        for _ in range(1000):
            d = np.maximum(np.sqrt(((pts - z) ** 2).sum(axis=1)), 1e-12)
            z_new = (w / d) @ pts / (w / d).sum()
            if np.abs(z_new - z).max() < 1e-12:
                break
            z = z_new
        out[k] = z.reshape(sent[0][k].shape).astype(sent[0][k].dtype)
    return out


REFERENCES = {"mean": reference_mean, "coordmedian": reference_coordmedian, "geomedian": reference_geomedian}
# Methods whose real-swarm runs live in their own modules (each swarm costs CI time once).
SWARM_TESTED_ELSEWHERE = {"trimmedmean": "test_byzantine.py", "multikrum": "test_byzantine.py",
                          "secure_mean": "test_secure_mean.py", "lora_exact": "test_merge_lora_exact.py",
                          "ffa_lora": "test_ffa_lora.py"}
assert REFERENCES.keys() | SWARM_TESTED_ELSEWHERE.keys() == METHODS.keys(), \
    "a merge method that no test runs in a real swarm"


@pytest.mark.slow
@pytest.mark.parametrize("method", REFERENCES)
def test_three_nodes_end_every_round_with_the_same_merged_model(procs, certs, tmp_path, method):
    swarm = start_swarm(procs, certs, tmp_path, NODES, "tiny_torch_model.py",
                        env={"MERGE_METHOD": method, "STEPS": "12", "SYNC_FREQUENCY": "4"},
                        node_env={"node2": {"WEIGHTAGE": "3"}})
    wait_ml(swarm)
    rounds = ledger_rounds(swarm, certs)
    assert len(rounds) >= 4  # train begin, steps 4, 8, 12, train end
    checked = 0
    for number, r in sorted(rounds.items()):
        assert sorted(r["participants"]) == NODES
        files = [swarm.out_dir / n / f"round{number}-sent.safetensors" for n in r["participants"]]
        if not all(f.exists() for f in files):
            continue
        sent = [load_file(f) for f in files]
        weights = [r["checkins"][n]["weight"] for n in r["participants"]]
        expected = REFERENCES[method](sent, weights)
        merged = [load_file(swarm.out_dir / n / f"round{number}-merged.safetensors") for n in NODES]
        for name in expected:
            for node_result in merged:
                assert node_result[name].tobytes() == merged[0][name].tobytes()  # bit-identical on every node
            if method == "geomedian":
                np.testing.assert_allclose(merged[0][name], expected[name], rtol=1e-5, atol=1e-6)
            else:
                assert np.array_equal(merged[0][name], expected[name]), f"round {number} {name}"
        checked += 1
    assert checked >= 4
    finals = [load_file(swarm.out_dir / n / "final.safetensors") for n in NODES]
    for name in finals[0]:
        assert all(f[name].tobytes() == finals[0][name].tobytes() for f in finals)
    for node in NODES:
        assert "All peers and Swarm training rounds finished. Final Swarm model was loaded." in \
               swarm.nodes[node].ml.output
