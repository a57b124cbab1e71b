"""The swarm keeps training through single failures: a leader that dies mid-round is replaced, a
peer that dies is merged without, a late node catches up, and a blob that does not match its
ledger hash is refused with the sender's name."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent import futures

import grpc
import pytest
from safetensors.numpy import load_file

from conftest import identity
from swarm_harness import start_ml, start_sl, start_swarm, wait_ml
from swarmlearn.ledger.model import leader_order
from swarmlearn.proto import sl_pb2_grpc
from swarmlearn.sl.transport import BlobStore, PeerService
from swarmlearn.sn.client import SNClient
from swarmlearn.defaults import DEFAULT_CONTRACT
from swarmlearn.tensors import blob_hash

NODES = ["node1", "node2", "node3"]
FAST_FAILOVER = ("--checkin-wait", "2", "--leader-timeout", "2")


class LedgerWatch:
    """Follows the ledger in a thread; `wait(pred)` returns the first entry matching `pred`."""

    def __init__(self, address, certs):
        self.client = SNClient(address, identity(certs, "swci"))
        self.entries = []
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        for entry in self.client.watch(0, self.stop):
            with self.cond:
                self.entries.append(entry)
                self.cond.notify_all()

    def wait(self, pred, timeout=120):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for e in self.entries:
                    if pred(e):
                        return e
                remaining = deadline - time.monotonic()
                assert remaining > 0, "ledger never showed the awaited entry"
                self.cond.wait(remaining)

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.client.close()


def is_kind(kind, **payload):
    return lambda e: e.tx.kind == kind and all(e.tx.payload.get(k) == v for k, v in payload.items())


def final_models(swarm, nodes):
    return [load_file(swarm.out_dir / n / "final.safetensors") for n in nodes]


def assert_same(models):
    for name in models[0]:
        assert all(m[name].tobytes() == models[0][name].tobytes() for m in models), name


def rounds(swarm, certs):
    with SNClient(swarm.sn.address, identity(certs, "swci")) as c:
        return {int(k): v for k, v in c.query("contracts")["contracts"][DEFAULT_CONTRACT]["rounds"].items()}


@pytest.mark.slow
def test_leader_killed_mid_round_is_replaced_and_the_round_completes(procs, certs, tmp_path):
    k = 2
    leader = leader_order(DEFAULT_CONTRACT, 0, k, NODES)[0]
    others = [n for n in NODES if n != leader]
    swarm = start_swarm(procs, certs, tmp_path, NODES, "tiny_torch_model.py",
                        env={"STEPS": "16", "SYNC_FREQUENCY": "4", "MIN_PEERS": "2"},
                        node_env={n: {"STEP_SLEEP": "0.25"} for n in others}, sl_args=FAST_FAILOVER)
    watch = LedgerWatch(swarm.sn.address, certs)
    try:
        watch.wait(is_kind("checkin", round=k, node=leader))
        sl = swarm.nodes[leader].sl
        os.kill(sl.popen.pid, signal.SIGSTOP)  # frozen before it can merge round k
        watch.wait(is_kind("merged", round=k))
        sl.kill(signal.SIGKILL)
        swarm.nodes[leader].ml.kill(signal.SIGKILL)
    finally:
        watch.close()
    wait_ml(swarm, others)
    r = rounds(swarm, certs)[k]
    assert r["status"] == "merged" and r["reelections"] == 1
    assert r["order"][0] == leader and r["leader"] != leader and leader not in r["participants"]
    assert_same(final_models(swarm, others))
    recovery = r["merged_time"] - r["closed_time"]
    print(f"leader failover: round {k} merged {recovery:.2f} s after it closed (leader timeout 2 s)")


@pytest.mark.slow
def test_a_peer_killed_mid_round_is_merged_without(procs, certs, tmp_path):
    k = 2
    order = leader_order(DEFAULT_CONTRACT, 0, k, NODES)
    victim = order[1]
    others = [n for n in NODES if n != victim]
    swarm = start_swarm(procs, certs, tmp_path, NODES, "tiny_torch_model.py",
                        env={"STEPS": "16", "SYNC_FREQUENCY": "4", "MIN_PEERS": "2"},
                        node_env={n: {"STEP_SLEEP": "0.25"} for n in others}, sl_args=FAST_FAILOVER)
    watch = LedgerWatch(swarm.sn.address, certs)
    try:
        watch.wait(is_kind("checkin", round=k, node=victim))
        swarm.nodes[victim].sl.kill(signal.SIGKILL)
        swarm.nodes[victim].ml.kill(signal.SIGKILL)
        watch.wait(is_kind("merged", round=k))
    finally:
        watch.close()
    wait_ml(swarm, others)
    r = rounds(swarm, certs)[k]
    assert victim not in r["participants"] and len(r["participants"]) == 2
    assert_same(final_models(swarm, others))
    leader_log = swarm.nodes[r["leader"]].sl.output
    assert f"dropped {victim} from the merge" in leader_log


@pytest.mark.slow
def test_a_late_node_catches_up_and_ends_with_the_same_model(procs, certs, tmp_path):
    swarm = start_swarm(procs, certs, tmp_path, ["node1", "node2"], "tiny_torch_model.py",
                        env={"STEPS": "48", "SYNC_FREQUENCY": "4", "MIN_PEERS": "2", "STEP_SLEEP": "0.3"},
                        sl_args=("--checkin-wait", "1"))
    late = start_sl(procs, certs, swarm.sn, "node3", tmp_path, "--checkin-wait", "1")
    swarm.nodes["node3"] = late
    watch = LedgerWatch(swarm.sn.address, certs)
    try:
        watch.wait(is_kind("merged", round=2))
    finally:
        watch.close()
    start_ml(procs, late, "tiny_torch_model.py", swarm.out_dir,
             {"STEPS": "8", "SYNC_FREQUENCY": "4", "MIN_PEERS": "2"})
    wait_ml(swarm)
    first = min(int(p.name[5:].split("-")[0]) for p in (swarm.out_dir / "node3").glob("round*-merged.safetensors"))
    assert first >= 2
    assert "node3" not in rounds(swarm, certs)[first]["participants"]  # it took that model, did not add to it
    assert any("node3" in r["participants"] for r in rounds(swarm, certs).values())  # then it contributed
    assert_same(final_models(swarm, NODES))


class TamperingStore(BlobStore):
    """A peer that checked in one hash and serves other bytes under it."""

    def get(self, digest):
        return b"other 15 bytes!"  # as long as the genuine blob: the hash, not the size, gives it away


class OversizeStore(BlobStore):
    def get(self, digest):
        return b"x" * (3 << 20)


def test_a_peer_sending_more_than_the_ledger_declares_is_cut_off(certs):
    from swarmlearn.sl.transport import FetchError, PeerFetcher

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    sl_pb2_grpc.add_SwarmPeerServicer_to_server(PeerService(OversizeStore()), server)
    port = server.add_secure_port("127.0.0.1:0", identity(certs, "sl").server_credentials())
    server.start()
    fetcher = PeerFetcher(identity(certs, "sl"))
    try:
        with pytest.raises(FetchError, match="more than the 15 bytes the ledger declares"):
            fetcher.fetch(f"127.0.0.1:{port}", blob_hash(b"genuine tensors"), 10, size=15)
    finally:
        fetcher.close()
        server.stop(0)


@pytest.mark.slow
def test_a_blob_that_does_not_match_its_ledger_hash_is_refused_with_the_senders_name(procs, certs, tmp_path):
    k = 2
    mallory = next(name for name in ("mallory", "attacker", "alice", "bob")  # names with certificates in conftest
                   if leader_order(DEFAULT_CONTRACT, 0, k, [*NODES, name])[0] != name)
    swarm = start_swarm(procs, certs, tmp_path, NODES, "tiny_torch_model.py",
                        env={"STEPS": "12", "SYNC_FREQUENCY": "4", "MIN_PEERS": "2", "STEP_SLEEP": "0.2"})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    sl_pb2_grpc.add_SwarmPeerServicer_to_server(PeerService(TamperingStore()), server)
    port = server.add_secure_port("127.0.0.1:0", identity(certs, "sl").server_credentials())
    server.start()
    watch = LedgerWatch(swarm.sn.address, certs)
    try:
        watch.wait(is_kind("merged", round=k - 1))  # the honest nodes are under way; mallory joins round k
        with SNClient(swarm.sn.address, identity(certs, "sl", mallory)) as c:
            c.register("SL", f"127.0.0.1:{port}")
            c.submit("session_join", {"contract": DEFAULT_CONTRACT, "node": mallory, "min_peers": 2})
            c.submit("checkin", {"contract": DEFAULT_CONTRACT, "round": k, "node": mallory,
                                 "hash": blob_hash(b"genuine tensors"), "weight": 1, "size": 15})
        wait_ml(swarm)
    finally:
        watch.close()
        server.stop(0)
    r = rounds(swarm, certs)[k]
    assert r["status"] == "merged" and mallory not in r["participants"] and sorted(r["participants"]) == NODES
    log = swarm.nodes[r["leader"]].sl.output
    assert f"dropped {mallory} from the merge" in log and "not to the" in log
    assert_same(final_models(swarm, NODES))
