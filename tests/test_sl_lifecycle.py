"""An SL stopped while its ML waits in a round ends at once, and tells its ML why; an SL that runs
round after round does so on the threads it owns, and leaves none behind when it stops."""

from __future__ import annotations

import signal
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from conftest import identity
from swarm_harness import start_sl, stuck_sync
from swarmlearn.background import Background
from swarmlearn.callback.core import SLChannel
from swarmlearn.errors import SwarmError
from swarmlearn.proto import sl_pb2, sl_pb2_grpc
from swarmlearn.sl.node import PEER_RPC_WORKERS, SLConfig, SLNode
from swarmlearn.sl.round import RoundEngine, Timeouts
from swarmlearn.sl.transport import PEER_STREAMS_PER_CALLER, BlobStore, FetchError, PeerFetcher, PeerService
from swarmlearn.sn.client import SNClient
from swarmlearn.sn.follower import LedgerFollower
from swarmlearn.tensors import Tensor, encode


def test_an_sl_stopped_mid_round_exits_promptly_and_the_ml_gets_an_error(procs, certs, sn, tmp_path):
    node = start_sl(procs, certs, sn, "node1", tmp_path)
    waiter, outcome = stuck_sync(node)
    started = time.monotonic()
    node.sl.popen.send_signal(signal.SIGTERM)
    assert node.sl.popen.wait(timeout=15) == 0
    assert time.monotonic() - started < 10
    waiter.join(15)
    assert outcome and isinstance(outcome[0], SwarmError)


def test_an_ml_joining_as_its_sl_stops_hears_that_the_sl_is_stopping(certs):
    """A Join that reaches an SL whose threads are already closed is refused in the swarm's words
    (LocalService answers FAILED_PRECONDITION with it), not with an internal error."""
    owner = Background("sl-node1")
    sn = SNClient("127.0.0.1:1", identity(certs, "sl", "node1"), "node1")
    fetcher = PeerFetcher(identity(certs, "sl", "node1"), owner)
    owner.close()
    try:
        with pytest.raises(SwarmError, match="this SL is stopping"):
            RoundEngine("node1", "default", sn, LedgerFollower(sn, background=owner), BlobStore(), fetcher,
                        background=owner)
    finally:
        fetcher.close()
        sn.close()


# ------------------------------------------------------------------ threads: bounded, owned, gone at stop

ROUNDS = 8
WARM_UP_ROUNDS = 2


class ThreadStarts:
    """Records every thread started through `threading` while in use, with its target's module
    (taken at start: a thread drops its target once it has run)."""

    def __init__(self) -> None:
        self.started: list[tuple[threading.Thread, str]] = []

    def _hook(self, frame, event, arg) -> None:
        sys.setprofile(None)  # one call per new thread is all we need
        thread = threading.current_thread()
        self.started.append((thread, getattr(getattr(thread, "_target", None), "__module__", "") or ""))

    def __enter__(self) -> ThreadStarts:
        threading.setprofile(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        threading.setprofile(None)


def _not_grpcs(started: list[tuple[threading.Thread, str]]) -> list[threading.Thread]:
    # gRPC's Python layer runs its own helper threads (one per channel with calls under way, one
    # per server).
    return [t for t, module in started if not module.startswith("grpc")]


def _run_rounds(node: SLNode, peer, starts: ThreadStarts) -> tuple[list[list[int]], list[threading.Thread]]:
    """Two MLs, ours and `peer`'s, sync ROUNDS times; returns the rounds each saw and the threads
    started (not by gRPC) once the first WARM_UP_ROUNDS were over."""
    blob = encode({"w": Tensor("F32", np.ones(4, dtype=np.float32))})
    channels = [SLChannel(node.ml_addr, ready_timeout=5), SLChannel(peer.ml_addr, ready_timeout=5)]
    results: list[list[int]] = [[], []]

    def ml(channel: SLChannel, rounds: list[int]) -> None:
        for _ in range(ROUNDS):
            rounds.append(channel.sync(blob, 1.0)[0].round)

    try:
        for channel in channels:
            channel.join("default", 2, 1.0, "mean")
        mls = [threading.Thread(target=ml, args=pair, daemon=True) for pair in zip(channels, results)]
        for thread in mls:
            thread.start()
        deadline = time.monotonic() + 60
        while len(results[0]) < WARM_UP_ROUNDS and time.monotonic() < deadline:
            time.sleep(0.05)
        warm = len(starts.started)
        for thread in mls:
            thread.join(60)
        return results, _not_grpcs(starts.started[warm:])
    finally:
        for channel in channels:
            channel.close()


def test_an_sl_runs_round_after_round_on_threads_it_owns_and_leaves_none_behind(procs, certs, sn, tmp_path):
    """The SL's prefetch, merge, transfer and heartbeat work runs on threads its Background started
    and bounded: rounds reuse them (thread-per-round code fails here) and stop() joins every one."""
    peer = start_sl(procs, certs, sn, "node2", tmp_path)
    node = SLNode(SLConfig(node_id="node1", identity=identity(certs, "sl", "node1"), sn_address=sn.address,
                           fs_port=0, data_dir=tmp_path / "sl-node1", timeouts=Timeouts(checkin_wait=1)))
    with ThreadStarts() as starts:
        node.start()
        try:
            results, during_rounds = _run_rounds(node, peer, starts)
        finally:
            node.stop()
    assert results[0] == results[1] and len(results[0]) == ROUNDS, f"rounds {results}\n--- node2 SL\n{peer.sl.output}"
    assert [t.name for t in during_rounds if not node.background.owns(t)] == []
    assert node.background.threads() == []
    assert [t.name for t in _not_grpcs(starts.started) if t.is_alive()] == []


# ------------------------------------------------------------------ peer transfers: bounded, policed to the end


class SlowStore(BlobStore):
    """A peer's blobs, of which the ones in `slow` are served only once `release` is set: a stream
    for one of them holds its worker thread (a stalled disk, or a peer that serves nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.slow: set[str] = set()
        self.release = threading.Event()

    def get(self, digest: str) -> bytes | None:
        if digest in self.slow:
            self.release.wait(30)
        return super().get(digest)


def serve_blobs(store: BlobStore, certs, owner: Background) -> tuple[grpc.Server, PeerService, str]:
    """An SL's peer service as SLNode serves it (mutual TLS, its owner's pool of peer-RPC workers)."""
    server = grpc.server(owner.executor("peer-rpc", PEER_RPC_WORKERS))
    service = PeerService(store, workers=PEER_RPC_WORKERS)
    sl_pb2_grpc.add_SwarmPeerServicer_to_server(service, server)
    port = server.add_secure_port("127.0.0.1:0", identity(certs, "sl", "node2").server_credentials())
    server.start()
    return server, service, f"127.0.0.1:{port}"


def test_one_peer_cannot_take_every_blob_worker_of_an_sl(certs):
    """A peer (any SL entitled to a blob) opening more slow Fetch streams than its share is refused
    the extra ones, with the bound named, while another peer is still served."""
    owner = Background("sl-node2")
    store = SlowStore()
    held = store.put(b"a contribution served slowly")
    store.slow.add(held)
    wanted = store.put(b"the merged model")
    server, service, address = serve_blobs(store, certs, owner)
    greedy = grpc.secure_channel(address, identity(certs, "sl", "mallory").channel_credentials())
    honest = PeerFetcher(identity(certs, "sl", "alice"))
    streams = []
    try:
        stub = sl_pb2_grpc.SwarmPeerStub(greedy)
        streams += [stub.Fetch(sl_pb2.FetchRequest(hash=held), timeout=20) for _ in range(PEER_STREAMS_PER_CALLER)]
        deadline = time.monotonic() + 10
        while service.streams.count() < PEER_STREAMS_PER_CALLER and time.monotonic() < deadline:
            time.sleep(0.02)
        assert service.streams.count() == PEER_STREAMS_PER_CALLER

        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Fetch(sl_pb2.FetchRequest(hash=held), timeout=5))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
        assert f"cap of {PEER_STREAMS_PER_CALLER} blob streams per certificate" in refused.value.details()
        assert "mallory" in refused.value.details()

        assert honest.fetch(address, wanted, timeout=5) == b"the merged model"
    finally:
        store.release.set()
        for stream in streams:
            stream.cancel()
        greedy.close()
        honest.close()
        server.stop(0).wait()
        owner.close()


def test_a_fetch_under_way_while_its_sl_stops_is_still_cut_off_when_the_peer_stalls(certs):
    """SLNode.stop() sets its owner's `stopping` first, then leaves its sessions while fetches may
    still run: the watchdog goes on policing them until none is left."""
    peer = Background("sl-node2")
    store = SlowStore()
    stalled = store.put(b"never sent")
    store.slow.add(stalled)
    server, _, address = serve_blobs(store, certs, peer)
    owner = Background("sl-node1")
    fetcher = PeerFetcher(identity(certs, "sl", "node1"), owner)
    try:
        owner.stopping.set()
        started = time.monotonic()
        with pytest.raises(FetchError, match="sent nothing for 0.5 s"):
            fetcher.fetch(address, stalled, timeout=10, stall=0.5)
        assert time.monotonic() - started < 5
    finally:
        store.release.set()
        fetcher.close()
        assert owner.close() == []
        server.stop(0).wait()
        peer.close()
