"""A round's merged model goes down a tree rooted at its leader, each inner node passing every chunk
on to its children as it arrives (cut-through); a node that fails mid-transfer leaves its children to
pull the model another way within the round."""

from __future__ import annotations

import sys
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from conftest import identity, identity_args, start_sn, wait_until
from swarmlearn.callback.core import SLChannel
from swarmlearn.defaults import CHUNK
from swarmlearn.ledger.sqlite_store import SQLiteStore
from swarmlearn.ledger.state import fold
from swarmlearn.proto import sl_pb2, sl_pb2_grpc
from swarmlearn.sl.transport import BlobStore, FetchError, PeerFetcher, PeerService
from swarmlearn.tensors import Tensor, blob_hash, encode

LABEL = ("default", 1)
MODEL = bytes(range(256)) * (3 * CHUNK // 256) + b"tail"  # three full chunks and a piece


class Upstream(sl_pb2_grpc.SwarmPeerServicer):
    """A parent that sends the first chunk of MODEL, then the rest once `go` is set (or, with
    `fail`, ends the stream with an error instead)."""

    def __init__(self, fail: bool = False):
        self.go = threading.Event()
        self.fail = fail

    def FetchMerged(self, request, context):
        yield sl_pb2.Chunk(data=MODEL[:CHUNK], total_size=len(MODEL))
        self.go.wait(20)
        if self.fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the parent died")
        for start in range(CHUNK, len(MODEL), CHUNK):
            yield sl_pb2.Chunk(data=MODEL[start:start + CHUNK])


def serve(servicer, ident) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(8))
    sl_pb2_grpc.add_SwarmPeerServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", ident.server_credentials())
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def tree(certs):
    """A parent (the Upstream), a middle SL (its BlobStore served by a real PeerService) and a
    fetcher for the middle and one for its child."""
    parent = Upstream()
    servers = []

    def build(fail: bool = False, budget: int = 1 << 30):
        parent.fail = fail
        parent_server, parent_addr = serve(parent, identity(certs, "sl", "node1"))
        middle_store = BlobStore(budget=budget)
        middle_server, middle_addr = serve(PeerService(middle_store, merged_refusal=lambda *a: None),
                                           identity(certs, "sl", "node2"))
        servers.extend([parent_server, middle_server])
        return (parent, parent_addr, middle_store, middle_addr, PeerFetcher(identity(certs, "sl", "node2")),
                PeerFetcher(identity(certs, "sl", "node3")))

    yield build
    parent.go.set()
    for server in servers:
        server.stop(0)


def start(fn) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run():
        try:
            outcome.append(fn())
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_a_middle_node_passes_each_chunk_on_before_its_own_copy_is_complete(tree):
    parent, parent_addr, middle_store, middle_addr, middle_fetch, child_fetch = tree()
    child_store = BlobStore()
    child_copy: list = []

    def child_forward(size):
        child_copy.append(child_store.arriving(LABEL, size))
        return child_copy[0]

    child, child_got = start(lambda: child_fetch.fetch_merged(middle_addr, *LABEL, 20, len(MODEL), 5.0,
                                                              forward=child_forward))
    middle, middle_got = start(lambda: middle_fetch.fetch_merged(
        parent_addr, *LABEL, 20, len(MODEL), 5.0, forward=lambda size: middle_store.arriving(LABEL, size)))
    # The parent holds back all but its first chunk: the child has that chunk all the same.
    assert wait_until(lambda: child_copy and child_copy[0].received >= CHUNK, 10)
    assert not middle_got and not child_got
    assert middle_store.held == len(MODEL)  # what is arriving counts against the store's budget
    parent.go.set()
    middle.join(10)
    child.join(10)
    assert bytes(middle_got[0]) == MODEL and bytes(child_got[0]) == MODEL


def test_a_failed_upstream_ends_the_childrens_streams_and_frees_its_room(tree):
    parent, parent_addr, middle_store, middle_addr, middle_fetch, child_fetch = tree(fail=True)
    child, child_got = start(lambda: child_fetch.fetch_merged(middle_addr, *LABEL, 20, len(MODEL), 5.0))
    middle, middle_got = start(lambda: middle_fetch.fetch_merged(
        parent_addr, *LABEL, 20, len(MODEL), 5.0, forward=lambda size: middle_store.arriving(LABEL, size)))
    assert wait_until(lambda: middle_store.held == len(MODEL), 10)
    parent.go.set()
    middle.join(10)
    child.join(10)
    assert isinstance(middle_got[0], FetchError) and "the parent died" in str(middle_got[0])
    assert isinstance(child_got[0], FetchError) and "pull it another way" in str(child_got[0])
    assert middle_store.held == 0 and middle_store.wait_labelled(LABEL, 0.0) is None


def test_a_parent_announcing_more_than_the_bound_is_cut_off_before_any_room_is_taken(tree):
    parent, parent_addr, middle_store, middle_addr, middle_fetch, child_fetch = tree()
    with pytest.raises(FetchError, match="more than the"):
        middle_fetch.fetch_merged(parent_addr, *LABEL, 20, CHUNK, 5.0,
                                  forward=lambda size: middle_store.arriving(LABEL, size))
    assert middle_store.held == 0 and middle_store.wait_labelled(LABEL, 0.0) is None


def test_a_blob_arriving_pushes_older_blobs_out_of_the_budget_like_a_finished_one():
    store = BlobStore(budget=3000)
    old = [store.put(bytes([i]) * 1000) for i in range(3)]
    incoming = store.arriving(LABEL, 1500)
    assert store.held <= 3000 and store.get(old[0]) is None and store.get(old[2]) is not None
    incoming.buffer[:] = b"m" * 1500
    incoming.advanced(1500)
    store.put(incoming.buffer, label=LABEL)
    assert store.held == 1000 + 1500 and store.wait_labelled(LABEL, 0.0) == b"m" * 1500


# ----------------------------------------------------------------------------- real SL processes

# Each SL in a narrow tree (fanout 2: 5 peers make 3 levels) serving merged chunks slowly (0.3 s
# apart), so that a middle node can be killed while its model is still arriving.
NARROW_SLOW_SL = """
import sys, time
import swarmlearn.sl.round as r, swarmlearn.sl.transport as t
r.MERGED_FANOUT = r.MERGED_FANOUT_LARGE = 2
served = t.PeerService.FetchMerged
def slow(self, request, context):
    for chunk in served(self, request, context):
        yield chunk
        time.sleep(0.3)
t.PeerService.FetchMerged = slow
from swarmlearn.cli import main
sys.argv[0] = "swarm"
main()
"""
NODES = [f"node{i}" for i in range(1, 6)]


def tensors(seed: int) -> dict[str, Tensor]:
    """A model of three chunks and a piece (float32)."""
    return {"w": Tensor("F32", np.random.default_rng(seed).standard_normal(3 * CHUNK // 4 + 1000, dtype=np.float32))}


def ledger_round(sn, number: int):
    store = SQLiteStore(sn.data_dir / "ledger.db", read_only=True)
    try:
        return fold(store.read()).contract("default").rounds.get(number)
    finally:
        store.close()


def test_a_middle_node_dying_mid_transfer_leaves_its_children_to_pull_the_model_within_the_round(
        procs, certs, tmp_path):
    sn = start_sn(procs, certs, tmp_path / "sn")
    host, port = sn.address.rsplit(":", 1)
    sls, channels = {}, {}
    for node in NODES:
        sls[node] = procs.start([sys.executable, "-c", NARROW_SLOW_SL, "sl", "--sn-ip", host, "--sn-api-port", port,
                                 "--sl-fs-port", "0", *identity_args(certs, "sl", node), "--node-id", node,
                                 "--data-dir", str(tmp_path / f"sl-{node}"), "--checkin-wait", "30"])
    for node in NODES:
        line = sls[node].wait_for_line(f"SL {node} ready: SWARM_SL_ADDR=")
        channels[node] = SLChannel(line.split("SWARM_SL_ADDR=")[1].strip())
        channels[node].join("default", 3, 1.0, "mean")
    results: dict[str, object] = {}

    def sync(node: str, seed: int) -> None:
        try:
            header, blob = channels[node].sync(encode(tensors(seed)), weight=1.0)
            results[node] = (header.round, header.hash, blob_hash(blob), header.contributed)
        except Exception as exc:  # noqa: BLE001 - the killed node's own sync fails; the test looks
            results[node] = exc

    threads = [threading.Thread(target=sync, args=(n, i), daemon=True) for i, n in enumerate(NODES)]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: (r := ledger_round(sn, 1)) is not None and r.status != "open", 30, every=0.05)
    r = ledger_round(sn, 1)
    order = [r.leader, *[n for n in r.participants if n != r.leader]]
    middle, its_children = order[1], order[3:5]  # fanout 2: order[1] serves order[3] and order[4]
    # The leader labels the merged model, starting to stream it, just before it posts it: the middle
    # node has a chunk or so of four, each 0.3 s apart, when it dies.
    assert wait_until(lambda: ledger_round(sn, 1).status == "merged", 60, every=0.02)
    sls[middle].popen.kill()
    started = time.monotonic()
    for thread in threads:
        thread.join(60)
    merged = ledger_round(sn, 1)
    assert isinstance(results[middle], Exception)
    survivors = [n for n in NODES if n != middle]
    for node in survivors:
        assert results[node] == (1, merged.merged_hash, merged.merged_hash, True), (node, results[node])
    assert time.monotonic() - started < 30
