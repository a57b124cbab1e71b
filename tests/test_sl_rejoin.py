"""A node cut off long enough to be evicted joins again once it is back, resuming from the latest
merged model; and an SL whose ledger copy lags still serves a blob to the peer entitled to it."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import identity
from swarm_harness import everything, start_swarm, wait_ml
from swarmlearn.defaults import DEFAULT_CONTRACT
from swarmlearn.errors import SwarmError
from swarmlearn.ledger.model import leader_order
from swarmlearn.sl.node import LEDGER_LAG_GRACE, LEDGER_LAG_WAITS_PER_CALLER, SLConfig, SLNode
from swarmlearn.sl.round import Timeouts
from swarmlearn.sl.transport import FetchError, PeerFetcher
from swarmlearn.sn.client import SNClient
from swarmlearn.tensors import Tensor, encode
from test_swarm_failures import FAST_FAILOVER, NODES, LedgerWatch, assert_same, final_models, is_kind, rounds

PAUSED = "node3"
REJOIN_LINE = re.compile(rf"{PAUSED} was evicted from contract {DEFAULT_CONTRACT} at round (\d+) .*"
                         r"it joined again and resumes from merged round (\d+)")


def _signal(swarm, node_id: str, sig: int) -> None:
    node = swarm.nodes[node_id]
    for proc in (node.sl, node.ml):
        if proc.popen.poll() is None:
            os.kill(proc.popen.pid, sig)


@pytest.mark.slow
def test_a_node_evicted_while_paused_joins_again_and_trains_to_the_end(procs, certs, tmp_path):
    """node3's SL and ML are frozen (SIGSTOP: a host cut off) once it checked in to round 2; the
    others merge without it and evict it. Thawed, it says so in one line, takes the latest merged
    model, contributes to later rounds, and all three end with the same final model."""
    others = [n for n in NODES if n != PAUSED]
    swarm = start_swarm(procs, certs, tmp_path, NODES, "tiny_torch_model.py",
                        env={"SYNC_FREQUENCY": "4", "MIN_PEERS": "2", "STEP_SLEEP": "0.25"},
                        node_env={**{n: {"STEPS": "72"} for n in others}, PAUSED: {"STEPS": "32"}},
                        sl_args=FAST_FAILOVER)
    watch = LedgerWatch(swarm.sn.address, certs)
    try:
        watch.wait(is_kind("checkin", round=2, node=PAUSED), timeout=60)
        _signal(swarm, PAUSED, signal.SIGSTOP)
        watch.wait(is_kind("session_evict", node=PAUSED), timeout=60)
    finally:
        _signal(swarm, PAUSED, signal.SIGCONT)  # also when the wait failed: a stopped process ignores SIGTERM
        watch.close()
    wait_ml(swarm, timeout=90)

    sl_log = swarm.nodes[PAUSED].sl.output
    rejoins = REJOIN_LINE.findall(sl_log)
    assert len(rejoins) == 1, everything(swarm)
    merged_round = int(rejoins[0][1])
    ledger = rounds(swarm, certs)
    assert ledger[merged_round]["status"] == "merged" and PAUSED not in ledger[merged_round]["participants"]
    # The model its ML loaded on joining again is that round's merged model, as its peers loaded it.
    contributor = ledger[merged_round]["participants"][0]
    assert_same([load_file(swarm.out_dir / n / f"round{merged_round}-merged.safetensors")
                 for n in (PAUSED, contributor)])
    assert any(PAUSED in r["participants"] for number, r in ledger.items() if number > merged_round)
    assert_same(final_models(swarm, NODES))


def test_a_node_that_left_does_not_join_again_and_one_no_longer_admitted_stops_with_the_reason(certs, sn,
                                                                                                tmp_path):
    """Out of the session, an SL joins again only if it was evicted and the ledger takes it back: one
    that left on purpose stops, and so does an evicted one the contract no longer names as a peer
    (the refusal's reason is what its ML hears)."""
    contract = "partitioned"
    node = SLNode(SLConfig(node_id="node1", identity=identity(certs, "sl", "node1"), sn_address=sn.address,
                           fs_port=0, data_dir=tmp_path / "sl-node1", timeouts=Timeouts(checkin_wait=1)))
    swci = SNClient(sn.address, identity(certs, "swci"))
    peers = {n: SNClient(sn.address, identity(certs, "sl", n), n) for n in ("node2", "node3")}
    try:
        swci.register("SWCI")
        swci.submit("contract_create", {"name": contract, "peers": ["node1", "node2", "node3"]})
        for name, peer in peers.items():
            peer.register("SL", "127.0.0.1:1")
            peer.submit("session_join", {"contract": contract, "node": name, "min_peers": 2})
        node.start()
        blob = encode({"w": Tensor("F32", np.ones(4, dtype=np.float32))})

        node.join(contract, 2, 1.0, "mean")
        left = node.only_engine()
        left.leave(patience=5.0)
        with pytest.raises(SwarmError, match="no longer in the training session of partitioned \\(it left it\\)"):
            left.sync(blob, 1.0)
        assert not node.follower.read(lambda s: s.contract(contract).members["node1"].active)

        node.join(contract, 2, 1.0, "mean")  # its ML started again: a new session
        evicted = node.only_engine()
        others = list(peers)
        for number in (1, 2):  # node1 (cut off) misses two rounds: the others evict it
            for name, peer in peers.items():
                peer.submit("checkin", {"contract": contract, "round": number, "node": name, "hash": "ab" * 32,
                                        "weight": 1, "size": 8})
            peers["node2"].submit("close_round", {"contract": contract, "round": number, "participants": others,
                                                  "leader": leader_order(contract, 0, number, others)[0]})
        peers["node2"].submit("session_evict", {"contract": contract, "node": "node1", "reason": "silent"})
        node.follower.wait_index(swci.submit("contract_update", {"name": contract, "peers": others}))
        with pytest.raises(SwarmError, match="node1 was evicted from contract partitioned at round 3 and may not join "
                                             "again: session_join: node1 is not among the peers of contract"):
            evicted.sync(blob, 1.0)
    finally:
        for client in (swci, *peers.values()):
            client.close()
        node.stop()


# ------------------------------------------------------------------ a lagging ledger copy


class LaggingLedger:
    """Holds back the entries an SL's follower folds while `held`: its ledger copy trails the SN's
    (as after a partition, while its watch moves to another SN)."""

    def __init__(self, node: SLNode):
        self.open = threading.Event()
        self.open.set()
        check = node.follower._check_pin  # called for every entry, before it is folded (no lock held)

        def held_back(row):
            self.open.wait(30)
            check(row)

        node.follower._check_pin = held_back

    def hold(self) -> None:
        self.open.clear()

    def release_after(self, seconds: float) -> threading.Timer:
        timer = threading.Timer(seconds, self.open.set)
        timer.start()
        return timer


def _fetch_seconds(fetcher: PeerFetcher, address: str, digest: str) -> tuple[bytes | FetchError, float]:
    started = time.monotonic()
    try:
        outcome = fetcher.fetch(address, digest, timeout=10)
    except FetchError as exc:
        outcome = exc
    return outcome, time.monotonic() - started


@pytest.mark.slow
def test_a_blob_is_served_to_an_entitled_peer_though_the_serving_ledger_copy_lags(certs, sn, tmp_path):
    """node2 checks in to a round with a blob node1 holds while node1's ledger copy is held back for
    longer than a second: node1 waits for its copy (within LEDGER_LAG_GRACE) and serves it. A peer
    with no right is refused after at most that wait, and one asking for more waits at once than its
    share is refused without one."""
    node = SLNode(SLConfig(node_id="node1", identity=identity(certs, "sl", "node1"), sn_address=sn.address,
                           fs_port=0, data_dir=tmp_path / "sl-node1", timeouts=Timeouts(checkin_wait=1)))
    lag = LaggingLedger(node)
    node.start()
    asker = SNClient(sn.address, identity(certs, "sl", "node2"), "node2")
    fetcher = PeerFetcher(identity(certs, "sl", "node2"))
    try:
        digest = node.blobs.put(b"node1's contribution to round 1")
        asker.register("SL", "127.0.0.1:1")
        asker.submit("session_join", {"contract": DEFAULT_CONTRACT, "node": "node2", "min_peers": 2})
        node.follower.wait_index(asker.heartbeat())

        # No right yet (node2 checked in nothing): refused once the grace is over.
        refused, waited = _fetch_seconds(fetcher, node.address, digest)
        assert isinstance(refused, FetchError) and "PERMISSION_DENIED" in str(refused)
        assert LEDGER_LAG_GRACE - 0.2 <= waited < LEDGER_LAG_GRACE + 2

        # Its right comes in an entry node1's copy folds only 1.4 s later: served.
        lag.hold()
        asker.submit("checkin", {"contract": DEFAULT_CONTRACT, "round": 1, "node": "node2", "hash": digest,
                                 "weight": 1, "size": 31})
        lag.release_after(1.4)
        served, waited = _fetch_seconds(fetcher, node.address, digest)
        assert served == b"node1's contribution to round 1", served
        assert waited >= 1.2

        # A caller with no right holding its share of waits gets no more: the next is refused at once.
        other = node.blobs.put(b"a blob of no round node2 took part in")
        lag.hold()
        results: list[tuple[object, float]] = []
        waiting = [threading.Thread(target=lambda: results.append(_fetch_seconds(fetcher, node.address, other)))
                   for _ in range(LEDGER_LAG_WAITS_PER_CALLER)]
        for thread in waiting:
            thread.start()
        deadline = time.monotonic() + 5
        while node._lag_waits.count() < LEDGER_LAG_WAITS_PER_CALLER and time.monotonic() < deadline:
            time.sleep(0.02)
        extra, waited = _fetch_seconds(fetcher, node.address, other)
        assert isinstance(extra, FetchError) and "PERMISSION_DENIED" in str(extra) and waited < 1.0
        for thread in waiting:
            thread.join(10)
        assert [isinstance(outcome, FetchError) for outcome, _ in results] == [True] * LEDGER_LAG_WAITS_PER_CALLER
    finally:
        lag.open.set()
        fetcher.close()
        asker.close()
        node.stop()
