"""A whole swarm is stopped (every ML, every SL, the SN) and started again on the same data dirs: every
node resumes from the last merged round, which each SL kept in its data dir, rather than from scratch;
a kept model whose bytes were changed is not used, said with its path, and that node takes the
model from a peer instead."""

from __future__ import annotations

import json
import signal
import stat
import time

import pytest
from safetensors.numpy import load_file

from swarm_harness import everything, start_ml, start_sl, start_swarm, wait_ml
from swarmlearn.defaults import DEFAULT_CONTRACT
from swarmlearn.defaults import KEPT_MODELS_DIR
from swarmlearn.sl.node import kept_model_paths
from test_crash_recovery import first_round_taken, restart_sn, wait_taken
from test_swarm_failures import LedgerWatch, assert_same, rounds

NODES = ["node1", "node2", "node3"]
ENV = {"SYNC_FREQUENCY": "4", "STEP_SLEEP": "0.05"}


def kept_files(tmp_path, node: str):
    """The kept model of the default contract in the node's SL data dir, and its .json."""
    return kept_model_paths(tmp_path / f"sl-{node}" / KEPT_MODELS_DIR, DEFAULT_CONTRACT)


def stop_everything(swarm) -> None:
    """Every ML killed mid-training, then every SL stopped as a user stops it, then the SN."""
    for node in swarm.nodes.values():
        node.ml.kill(signal.SIGKILL)
    time.sleep(1.5)  # a round every node had checked in to finishes its merge in the SLs
    for node in swarm.nodes.values():
        node.sl.kill(signal.SIGTERM)
    swarm.sn.proc.kill(signal.SIGTERM)


@pytest.mark.slow
def test_a_swarm_stopped_as_a_whole_resumes_from_its_last_merged_round(procs, certs, tmp_path):
    swarm = start_swarm(procs, certs, tmp_path, NODES, "tiny_torch_model.py", env={**ENV, "STEPS": "400"})
    watch = LedgerWatch(swarm.sn.address, certs)
    try:
        wait_taken(watch, 3, NODES)  # every node took round 3's merged model and trains on
    finally:
        watch.close()
    merged = {n: r for n, r in rounds(swarm, certs).items() if r["status"] == "merged"}
    stop_everything(swarm)
    # The ledger as the stop left it (read again below from the restarted SN, which must agree).
    swarm.sn = restart_sn(procs, certs, swarm.sn)
    before = {n: r for n, r in rounds(swarm, certs).items() if r["status"] == "merged"}
    assert before.keys() >= merged.keys()
    latest = max(before)
    digest = before[latest]["merged_hash"]

    for node in NODES:
        blob_path, meta_path = kept_files(tmp_path, node)
        meta = json.loads(meta_path.read_text())
        assert (meta["contract"], meta["round"], meta["hash"]) == (DEFAULT_CONTRACT, latest, digest), meta
        assert meta["size"] == blob_path.stat().st_size
        assert stat.S_IMODE(blob_path.stat().st_mode) == 0o600
    tampered, _ = kept_files(tmp_path, "node3")
    data = bytearray(tampered.read_bytes())
    data[-1] ^= 0xFF
    tampered.write_bytes(bytes(data))

    out = tmp_path / "out-after-restart"
    swarm.out_dir = out
    try:
        for node in NODES:
            swarm.nodes[node] = start_sl(procs, certs, swarm.sn, node, tmp_path, "--checkin-wait", "1")
        for node in NODES:
            start_ml(procs, swarm.nodes[node], "tiny_torch_model.py", out, {**ENV, "STEPS": "8"})
        wait_ml(swarm)
        for node in NODES:  # every node resumed from the last merged round, node3 by a peer's copy
            assert first_round_taken(out, node) == latest
            assert f"round {latest}: {node} resumes from the latest merged model {digest[:12]}" in \
                   swarm.nodes[node].sl.output
        assert_same([load_file(out / n / f"round{latest}-merged.safetensors") for n in NODES])
        for node in ("node1", "node2"):
            assert f"kept merged model of round {latest} of contract {DEFAULT_CONTRACT}" in swarm.nodes[node].sl.output
        node3 = swarm.nodes["node3"].sl.output
        assert f"{tampered}: its bytes hash to" in node3 and "not used" in node3, node3
        after = {n: r for n, r in rounds(swarm, certs).items() if r["status"] == "merged" and n not in before}
        assert after and min(after) > latest  # the new rounds continue the numbering
        assert all(sorted(r["participants"]) == NODES for r in after.values())
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{everything(swarm)}") from None


def test_swop_clean_up_keeps_the_merged_models_of_a_node_and_nothing_else(tmp_path):
    from swarmlearn.swop.operator import _remove_all_but

    sl_dir = tmp_path / "task" / "node1" / "sl"
    (sl_dir / KEPT_MODELS_DIR).mkdir(parents=True)
    (sl_dir / KEPT_MODELS_DIR / "default.safetensors").write_bytes(b"model")
    (sl_dir / "ml-channel").mkdir()
    (sl_dir / "ml-channel" / "ml.sock").write_text("")
    (sl_dir / "ledger-pin.json").write_text("{}")
    _remove_all_but(sl_dir, KEPT_MODELS_DIR)
    assert sorted(p.relative_to(sl_dir).as_posix() for p in sl_dir.rglob("*")) == \
        [KEPT_MODELS_DIR, f"{KEPT_MODELS_DIR}/default.safetensors"]
