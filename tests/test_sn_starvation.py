"""An SN that a few clients cannot starve: one valid certificate of the swarm cannot take every
worker thread with idle watch streams, flood the ledger with submits, or grow a state query past
gRPC's message limit. A real `swarm sn` process over mutual TLS on 127.0.0.1, shared by the module."""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest

from conftest import identity, module_sn
from swarmlearn.errors import Rejected
from swarmlearn.ledger.signatures import sign_tx
from swarmlearn.pki import CertLayout, Identity, generate_host_certs
from swarmlearn.proto import sn_pb2, sn_pb2_grpc
from swarmlearn.sn.client import WATCH_LIMIT_PATIENCE, SNClient, SNLimitReached
from swarmlearn.sn.server import (MAX_REPLY_BYTES, MAX_WORKERS, METRICS_PAGE_BYTES, READ_BURST, READ_RATE,
                                  SUBMIT_BURST, SUBMIT_RATE, WATCH_STREAMS_PER_IDENTITY, WATCH_STREAMS_TOTAL,
                                  StreamSlots)
from swarmlearn.swci.script import parse_line
from swarmlearn.swci.session import SwciSession

GRPC_MESSAGE_LIMIT = 4 * 1024 * 1024
# The most one metrics report may hold by default (a contract's max_metrics_bytes).
METRICS_ENTRY_BYTES = 16 * 1024
QUICK = 3.0  # seconds a heartbeat or submit may take while the SN is under attack
SLOT_FREED = 1.0  # a cancelled stream's handler ends, freeing its slot, within the store's 0.5 s poll


@pytest.fixture(scope="module")
def sn(certs, tmp_path_factory):
    yield from module_sn(certs, tmp_path_factory.mktemp("starvation") / "sn")


def client(sn, certs, component: str, node: str | None = None, **kwargs) -> SNClient:
    c = SNClient(sn.address, identity(certs, component, node), **kwargs)
    c.wait_ready(10)
    return c


def raw_stub(sn, certs, component: str, node: str | None = None) -> tuple[grpc.Channel, sn_pb2_grpc.SwarmNetworkStub]:
    """The generated stub on a channel of its own: what an attacker holding that certificate has."""
    channel = grpc.secure_channel(sn.address, identity(certs, component, node).channel_credentials())
    grpc.channel_ready_future(channel).result(timeout=10)
    return channel, sn_pb2_grpc.SwarmNetworkStub(channel)


def is_admitted(stream) -> bool:
    """Whether the SN admitted a watch stream (which then delivers the genesis entry at once)."""
    try:
        return next(stream).index == 0
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
        return False


def test_stream_caps_leave_unary_calls_their_threads():
    assert WATCH_STREAMS_PER_IDENTITY < WATCH_STREAMS_TOTAL <= MAX_WORKERS - 64
    slots = StreamSlots(total=3, per_identity=2)
    a1, a2, b1 = slots.acquire("a"), slots.acquire("a"), slots.acquire("b")
    assert "per certificate" in slots.acquire("a")
    assert "per SN" in slots.acquire("c")
    slots.release(a1)
    slots.release(a1)  # released twice, counted once
    assert slots.count("a") == 1 and slots.count() == 2
    assert not isinstance(slots.acquire("c"), str)
    for ticket in (a2, b1):
        slots.release(ticket)
    assert slots.count() == 1


def test_idle_watch_streams_cannot_block_heartbeats_and_submits(sn, certs):
    channel, stub = raw_stub(sn, certs, "sl", "mallory")
    with client(sn, certs, "swci") as swci:
        swci.register("SWCI")
        # The attack: as many idle streams as the SN has worker threads, all with one certificate.
        streams = [stub.Watch(sn_pb2.WatchRequest(from_index=0)) for _ in range(MAX_WORKERS)]
        try:
            refused = [stream for stream in streams if not is_admitted(stream)]
            assert len(refused) == MAX_WORKERS - WATCH_STREAMS_PER_IDENTITY
            assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
            assert f"cap of {WATCH_STREAMS_PER_IDENTITY} watch streams per certificate" in refused[0].details()

            started = time.monotonic()
            swci.heartbeat()
            swci.submit("contract_create", {"name": "while-watched"})
            assert time.monotonic() - started < QUICK

            # The client of a certificate at its cap says so instead of reconnecting forever.
            with client(sn, certs, "sl", "mallory") as mallory:
                started = time.monotonic()
                with pytest.raises(SNLimitReached, match="watch stream"):
                    next(iter(mallory.watch(0)))
                assert time.monotonic() - started < WATCH_LIMIT_PATIENCE + QUICK
        finally:
            for stream in streams:
                stream.cancel()
            channel.close()

        # Cancelled streams give their slots back, each once its handler has noticed.
        channel, stub = raw_stub(sn, certs, "sl", "mallory")
        deadline = time.monotonic() + 10
        while True:
            again = [stub.Watch(sn_pb2.WatchRequest(from_index=0)) for _ in range(WATCH_STREAMS_PER_IDENTITY)]
            admitted = sum(map(is_admitted, again))
            for stream in again:
                stream.cancel()
            if admitted == WATCH_STREAMS_PER_IDENTITY:
                break
            assert time.monotonic() < deadline, "the slots of cancelled watch streams were not freed"
            time.sleep(SLOT_FREED)
        channel.close()
        time.sleep(SLOT_FREED)


def test_streams_of_many_certificates_leave_threads_for_unary_calls(sn, certs, tmp_path):
    """The same attack with as many certificates as it takes to reach the SN's stream cap."""
    crowd = [f"crowd{i}" for i in range(WATCH_STREAMS_TOTAL // WATCH_STREAMS_PER_IDENTITY + 1)]
    generate_host_certs(tmp_path, 1, nodes=crowd, components=(), ca_cert_path=certs.ca_cert,
                        ca_key_path=certs.ca_key)
    extra = CertLayout(tmp_path, 1)
    channels, streams, refused = [], [], []
    try:
        for name in crowd:
            ident = Identity.load(extra.node_key(name), extra.node_cert(name), certs.capath)
            channel = grpc.secure_channel(sn.address, ident.channel_credentials())
            channels.append(channel)
            stub = sn_pb2_grpc.SwarmNetworkStub(channel)
            for _ in range(WATCH_STREAMS_PER_IDENTITY):
                stream = stub.Watch(sn_pb2.WatchRequest(from_index=0))
                streams.append(stream)
                if not is_admitted(stream):
                    refused.append(stream)
        assert len(streams) - len(refused) == WATCH_STREAMS_TOTAL
        assert refused and all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
        assert f"cap of {WATCH_STREAMS_TOTAL} watch streams per SN" in refused[0].details()

        with client(sn, certs, "swci") as swci:
            started = time.monotonic()
            swci.register("SWCI")
            swci.heartbeat()
            swci.submit("contract_create", {"name": "while-crowded"})
            assert swci.query("contracts")["contracts"]["while-crowded"]
            assert time.monotonic() - started < QUICK
    finally:
        for stream in streams:
            stream.cancel()
        for channel in channels:
            channel.close()
        time.sleep(SLOT_FREED)


def outcomes(calls, codes: list, limited: list) -> None:
    """Waits for each call; appends its status code to `codes` and each RESOURCE_EXHAUSTED to `limited`."""
    for call in calls:
        try:
            call.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                limited.append(exc)


def test_submit_flood_is_rate_limited(sn, certs):
    flooder = identity(certs, "sl", "attacker")  # a certificate of the swarm whose node never registered
    flood = SUBMIT_BURST + 4 * int(SUBMIT_RATE)
    signed = [sign_tx(flooder, "attacker", "contract_create", {"name": f"flood-{i}"}) for i in range(flood)]
    channel, stub = raw_stub(sn, certs, "sl", "attacker")
    started = time.monotonic()
    codes, refusals = [], []
    outcomes([stub.Submit.future(sn_pb2.SignedTx(tx=s.tx.signing_bytes(), signature=s.signature), timeout=30)
              for s in signed], codes, refusals)
    limited = refusals[0] if refusals else None
    elapsed = time.monotonic() - started
    channel.close()

    processed = sum(code != grpc.StatusCode.RESOURCE_EXHAUSTED for code in codes)
    assert limited is not None, f"{flood} submits in {elapsed:.1f} s and none was rate limited"
    assert processed <= SUBMIT_BURST + SUBMIT_RATE * elapsed + 10
    assert f"rate limit of {SUBMIT_RATE:g} submits/s" in limited.details()
    assert grpc.StatusCode.OK not in codes  # a non-member's transactions are refused besides

    # Other identities are untouched, and the flooder's own client waits out a brief limit.
    with client(sn, certs, "swci") as swci:
        started = time.monotonic()
        swci.register("SWCI")
        swci.submit("contract_create", {"name": "after-the-flood"})
        assert time.monotonic() - started < QUICK
    with client(sn, certs, "sl", "attacker") as attacker:
        attacker.register("SL", "127.0.0.1:1")


def test_query_flood_is_rate_limited(sn, certs):
    """One certificate looping Query("all") on as many calls as the SN has threads is cut to its read
    rate, and the ledger stays free for everyone else's submits meanwhile."""
    channel, stub = raw_stub(sn, certs, "sl", "mallory")
    codes: list[grpc.StatusCode] = []
    limited: list[grpc.RpcError] = []
    flooding = threading.Event()
    flooding.set()

    def flood() -> None:
        while flooding.is_set():
            outcomes([stub.Query.future(sn_pb2.QueryRequest(section="all"), timeout=30) for _ in range(MAX_WORKERS)],
                     codes, limited)

    started = time.monotonic()
    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        time.sleep(0.5)
        with client(sn, certs, "swci") as swci:
            submitted = time.monotonic()
            swci.register("SWCI")
            swci.submit("contract_create", {"name": "during-the-query-flood"})
            assert time.monotonic() - submitted < QUICK
        time.sleep(0.5)
    finally:
        flooding.clear()
        flooder.join(timeout=30)
        channel.close()
    elapsed = time.monotonic() - started

    answered = codes.count(grpc.StatusCode.OK)
    assert limited, f"{len(codes)} queries in {elapsed:.1f} s and none was rate limited"
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert answered <= READ_BURST + READ_RATE * elapsed + 10
    assert f"rate limit of {READ_RATE:g} queries and heartbeats/s" in limited[0].details()


def test_large_metrics_cannot_break_state_queries(sn, certs, tmp_path):
    limit = METRICS_ENTRY_BYTES
    with client(sn, certs, "sl") as sl, client(sn, certs, "swci") as swci:
        sl.register("SL", "127.0.0.1:1")
        node = sl.node_id
        sl.submit("session_join", {"contract": "default", "node": node, "min_peers": 1})

        # The attack's entries, a little under gRPC's message limit each, are refused outright.
        with pytest.raises(Rejected, match="bytes"):
            sl.submit("metrics", {"contract": "default", "node": node, "pad": "x" * (GRPC_MESSAGE_LIMIT - 300_000)})
        with pytest.raises(Rejected, match="bytes"):
            sl.submit("metrics", {"contract": "default", "node": node, "pad": "x" * limit})

        # Enough entries of nearly the largest size to take the old contracts reply past gRPC's limit.
        count = GRPC_MESSAGE_LIMIT // limit + 20
        for step in range(count):
            sl.submit("metrics", {"contract": "default", "node": node, "step": step, "pad": "x" * (limit - 64)})
        sl.submit("metrics", {"contract": "default", "node": node, "round": 7, "loss": 0.25})
        count += 1

        contracts = swci.query("contracts")["contracts"]
        default = next(c for c in contracts.values() if c["metrics_count"])
        assert default["metrics_count"] == count and "metrics" not in default
        assert swci.query("all")["contracts"] == contracts

        entries, read_to = swci.metrics("default")
        assert [m.get("step") for m in entries] == [*range(count - 1), None]
        assert all(m["node"] == node for m in entries)
        assert swci.metrics("default", read_to) == ([], read_to)  # nothing new since

        pages, next_index = 0, 0
        while next_index is not None:
            reply = swci._stub()[1].Query(sn_pb2.QueryRequest(section="metrics", contract="default",
                                                              from_index=next_index), timeout=10)
            assert len(reply.state_json) < METRICS_PAGE_BYTES + 64 * 1024 < MAX_REPLY_BYTES
            next_index = json.loads(reply.state_json)["metrics"]["next"]
            pages += 1
        assert pages >= count * limit // METRICS_PAGE_BYTES

        # What SWCI shows of them: each node's latest training loss and latest validation metric, side by
        # side (an entry without a kind, of an older callback, is a training loss), read incrementally.
        lines: list[str] = []
        host, port = sn.address.rsplit(":", 1)
        session = SwciSession(identity(certs, "swci"), tmp_path, out=lines.append, default_sn_port=int(port))
        try:
            for n, text in enumerate([f"CREATE CONTEXT t WITH IP {host}", "SWITCH CONTEXT t", "PERFDATA default"]):
                session.execute(parse_line(text, n + 1))
            assert lines[-1] == (f"{node}: training loss 0.25 (round 7) · no validation metric (no validation data "
                                 f"given, or none measured yet)"), "\n".join(lines)
            sl.submit("metrics", {"contract": "default", "node": node, "kind": "validation", "round": 8, "step": 40,
                                  "epoch": 1.0, "metric": 0.875, "metric_name": "accuracy", "loss": 0.31})
            session.execute(parse_line("PERFDATA default", 4))
        finally:
            session.close()
        assert lines[-1] == (f"{node}: training loss 0.25 (round 7) · validation accuracy 0.875 (round 8, "
                             f"validation loss 0.31)"), "\n".join(lines)
