"""The etcd store's own promises, beyond the interface: watches that survive etcd compacting its
history, a bound on entry size that names itself, one winner per head, and an SN's view of a cluster
that loses members: it moves to a member that answers, and says "no quorum" when none can.

Every etcd member is a real process on 127.0.0.1 with mutual TLS from gen-cert's certificates, and
is stopped by pid at the end of its test or module.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time

from types import SimpleNamespace

import pytest

from conftest import wait_until
from swarmlearn.background import Background
from swarmlearn.errors import HeadMoved, LedgerError
from swarmlearn.ledger.entry import Entry, Tx
from swarmlearn.ledger.etcd_member import COMPACTION_RETENTION, SETUP_HINT, EtcdCluster, start_cluster
from swarmlearn.ledger.etcd_store import DEFAULT_MAX_ENTRY_BYTES, EtcdStore, open_channel
from swarmlearn.proto import etcd_pb2 as pb
from swarmlearn.proto import etcd_pb2_grpc as rpc
from swarmlearn.sn.liveness import ALIVE_FOLDER, CLOCK_SKEW, READ_MIN_KEYS, EtcdLiveness
from test_store_conformance import (PROMPT, append_chain, collect, etcd_cluster, make_entry,  # noqa: F401
                                    sn_tls)

# A generous bound for "within a few seconds" on a slow, busy machine.
FEW_SECONDS = 12.0


@pytest.fixture
def open_store(etcd_cluster, request):
    """Opens handles on this test's ledger (its own prefix); all are closed when the test ends."""
    opened: list[EtcdStore] = []

    def open_one(cluster: EtcdCluster = etcd_cluster, **options) -> EtcdStore:
        store = EtcdStore(cluster.endpoints, f"/swarmlearn-test/{request.node.name}", cluster.tls, **options)
        opened.append(store)
        return store

    yield open_one
    for store in reversed(opened):
        store.close()


def compact_history(cluster: EtcdCluster) -> int:
    """What an operator (or etcd's auto-compaction) does: drop every revision before the current one."""
    channel = open_channel(cluster.endpoints[0], cluster.tls)
    try:
        kv = rpc.KVStub(channel)
        revision = kv.Range(pb.RangeRequest(key=b"/", count_only=True), timeout=10).header.revision
        kv.Compact(pb.CompactionRequest(revision=revision, physical=True), timeout=10)
        return revision
    finally:
        channel.close()


def entry_of_size(index: int, prev_hash: str | None, size: int) -> Entry:
    probe = make_entry(index, prev_hash, note="")
    padding = size - len(probe.body_bytes())
    tx = probe.tx
    padded = Tx(tx.kind, {**tx.payload, "note": "x" * padding}, tx.signer, nonce=tx.nonce, time=tx.time)
    entry = Entry(index, probe.prev_hash, padded, probe.signature)
    assert len(entry.body_bytes()) == size
    return entry


def test_the_etcd_binary_is_installed():
    assert shutil.which("etcd") is not None, f"etcd is not installed (no `etcd` on PATH): {SETUP_HINT}"


# ------------------------------------------------------------------------------------ watch and compaction


def test_a_watch_whose_next_revision_was_compacted_away_resumes_from_the_ledger(open_store, etcd_cluster,
                                                                               caplog):
    caplog.set_level(logging.INFO, logger="swarmlearn.ledger")
    writer, watched = open_store(), open_store()
    entries = append_chain(writer, 3)
    stop = threading.Event()
    rows = watched.watch(0, stop.is_set, poll=0.05)
    seen = [next(rows)]  # the watch has read entries 0-2 and paused before watching from that revision

    # The swarm moves on and etcd compacts the revisions the watch would start from.
    entries += append_chain(writer, 5)
    compact_history(etcd_cluster)

    def drain() -> None:
        seen.extend(rows)

    watcher = threading.Thread(target=drain, daemon=True)
    watcher.start()
    assert wait_until(lambda: len(seen) == 8), [row.index for row in seen]
    entries += append_chain(writer, 2)
    assert wait_until(lambda: len(seen) == 10), [row.index for row in seen]
    stop.set()
    watcher.join(PROMPT)
    assert not watcher.is_alive()
    assert [row.hash for row in seen] == [e.hash for e in entries]
    assert "compacted its history" in caplog.text


def test_compacting_under_a_running_watch_loses_and_repeats_no_entry(open_store, etcd_cluster):
    writer, watched = open_store(), open_store()
    stop, seen = threading.Event(), []
    watcher = collect(watched, 0, stop, seen)
    entries = []
    for _ in range(3):
        entries += append_chain(writer, 4)
        compact_history(etcd_cluster)
    entries += append_chain(writer, 2)
    assert wait_until(lambda: len(seen) == len(entries)), [row.index for row in seen]
    time.sleep(0.2)
    stop.set()
    watcher.join(PROMPT)
    assert not watcher.is_alive()
    assert [row.hash for row in seen] == [e.hash for e in entries]


def test_wait_for_sees_an_entry_appended_after_a_compaction(open_store, etcd_cluster):
    writer, waiter = open_store(), open_store()
    append_chain(writer, 2)
    compact_history(etcd_cluster)
    appender = threading.Timer(0.3, lambda: append_chain(writer, 1))
    appender.start()
    started = time.monotonic()
    assert waiter.wait_for(2, timeout=30)
    assert time.monotonic() - started < PROMPT
    appender.join(PROMPT)


# ------------------------------------------------------------------------------------------ bounds


def test_an_entry_at_the_size_bound_is_stored_and_one_byte_more_is_refused_naming_the_bound(open_store):
    store = open_store()
    assert store.max_entry_bytes == DEFAULT_MAX_ENTRY_BYTES
    largest = entry_of_size(0, None, DEFAULT_MAX_ENTRY_BYTES)
    store.append_if_head_is(None, largest)
    assert store.read_raw() == store.read_raw(0, 1)
    assert store.read()[0] == largest

    too_big = entry_of_size(1, largest.hash, DEFAULT_MAX_ENTRY_BYTES + 1)
    with pytest.raises(LedgerError, match=f"max_entry_bytes={DEFAULT_MAX_ENTRY_BYTES}"):
        store.append_if_head_is(largest.hash, too_big)
    assert store.head() == (0, largest.hash)


def test_a_store_allowing_more_than_its_members_take_is_told_which_etcd_flag_to_raise(open_store):
    store = open_store(max_entry_bytes=4 * DEFAULT_MAX_ENTRY_BYTES)
    # Just over the members' bound (etcd refuses it), and far over it (gRPC refuses it first).
    for size in (DEFAULT_MAX_ENTRY_BYTES + (200 << 10), 2 * DEFAULT_MAX_ENTRY_BYTES):
        with pytest.raises(LedgerError, match=f"--max-request-bytes {4 * DEFAULT_MAX_ENTRY_BYTES + (64 << 10)}"):
            store.append_if_head_is(None, entry_of_size(0, None, size))
    assert store.head() is None


def test_an_entry_that_does_not_link_to_the_expected_head_is_refused_before_it_is_sent(open_store):
    store = open_store()
    first = append_chain(store, 1)[0]
    with pytest.raises(LedgerError, match="links to"):
        store.append_if_head_is(first.hash, make_entry(1, "e" * 64))
    assert store.read_raw(1) == []


def test_a_handle_with_a_certificate_the_members_do_not_trust_is_refused_at_once(etcd_cluster, foreign_certs):
    stranger = sn_tls(foreign_certs)._replace(ca=etcd_cluster.tls.ca)
    started = time.monotonic()
    with pytest.raises(LedgerError, match="TLS handshake failed"):
        EtcdStore(etcd_cluster.endpoints, "/swarmlearn-test/stranger", stranger, quorum_timeout=1.0)
    assert time.monotonic() - started < FEW_SECONDS


# ------------------------------------------------------------------------------------------ races


def test_two_handles_racing_on_one_head_one_wins_and_the_other_is_told_the_head_moved(open_store):
    sn_a, sn_b = open_store(), open_store()
    head = append_chain(sn_a, 1)[0]
    for round_no in range(15):
        head_index, head_hash = sn_a.head()
        start = threading.Barrier(2)
        outcomes: dict[str, object] = {}

        def race(name: str, store: EtcdStore) -> None:
            entry = make_entry(head_index + 1, head_hash, racer=name)
            start.wait()
            try:
                store.append_if_head_is(head_hash, entry)
                outcomes[name] = entry
            except HeadMoved as exc:
                outcomes[name] = exc

        racers = [threading.Thread(target=race, args=(n, s)) for n, s in (("a", sn_a), ("b", sn_b))]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(PROMPT * 5)
        winners = [v for v in outcomes.values() if isinstance(v, Entry)]
        losers = [v for v in outcomes.values() if isinstance(v, HeadMoved)]
        assert len(winners) == 1 and len(losers) == 1, (round_no, outcomes)
        assert sn_b.head() == (head_index + 1, winners[0].hash)
    assert [row.index for row in sn_b.read_raw()] == list(range(16))
    assert sn_a.head()[0] == head.index + 15


# ------------------------------------------------------------------------------------------ clusters


@pytest.fixture
def three_members(certs, tmp_path):
    cluster = start_cluster(tmp_path / "etcd", sn_tls(certs), size=3)
    yield cluster
    cluster.stop()


def assert_whole(store: EtcdStore) -> None:
    """Every entry is there up to the head, and nothing past it: no append was half-written."""
    head_index, head_hash = store.head()
    rows = store.read_raw()
    assert [row.index for row in rows] == list(range(head_index + 1))
    assert rows[-1].hash == head_hash
    assert all(row.entry().prev_hash == prev.hash for prev, row in zip(rows, rows[1:]))


@pytest.mark.slow
def test_a_cluster_that_lost_its_quorum_refuses_appends_then_takes_them_when_a_member_returns(three_members,
                                                                                               open_store):
    store = open_store(three_members)
    append_chain(store, 3)
    three_members.members[0].kill()
    three_members.members[1].kill()

    started = time.monotonic()
    with pytest.raises(LedgerError, match="no quorum") as refused:
        append_chain(store, 1)
    assert time.monotonic() - started < FEW_SECONDS
    assert "bring a majority of its members back" in str(refused.value)

    three_members.members[1].launch()
    three_members.wait_ready(members=[three_members.members[1]])
    assert_whole(store)  # the refused append is either whole (its head moved) or absent
    before = store.head()[0]
    append_chain(store, 2)
    assert store.head()[0] == before + 2
    assert_whole(store)


@pytest.mark.slow
def test_a_handle_with_three_endpoints_keeps_appending_and_watching_when_its_member_is_killed(three_members,
                                                                                                open_store,
                                                                                                caplog):
    caplog.set_level(logging.INFO, logger="swarmlearn.ledger")
    writer, watched = open_store(three_members), open_store(three_members)
    stop, seen = threading.Event(), []
    watcher = collect(watched, 0, stop, seen)
    entries = append_chain(writer, 3)
    assert wait_until(lambda: len(seen) == 3)

    three_members.members[0].kill()  # both handles talk to the first member that answered
    for _ in range(5):
        entries += append_chain(writer, 1)
    assert wait_until(lambda: len(seen) == len(entries), timeout=FEW_SECONDS), [row.index for row in seen]
    stop.set()
    watcher.join(PROMPT)
    assert not watcher.is_alive()
    assert [row.hash for row in seen] == [e.hash for e in entries]
    assert f"etcd member {three_members.endpoints[0]} did not answer" in caplog.text
    assert_whole(writer)


# ------------------------------------------------------------------------------------------ beside the ledger


def test_a_key_under_entries_that_is_no_entry_is_refused_naming_it(open_store, etcd_cluster):
    store = open_store()
    append_chain(store, 2)
    channel = open_channel(etcd_cluster.endpoints[0], etcd_cluster.tls)
    try:
        put = pb.RequestOp(request_put=pb.PutRequest(key=f"{store.prefix}/entries/abc".encode(), value=b"x"))
        rpc.KVStub(channel).Txn(pb.TxnRequest(success=[put]), timeout=10)
    finally:
        channel.close()
    with pytest.raises(LedgerError, match=f"{store.prefix}/entries/abc"):
        store.read_raw(0)


def test_members_compact_their_history_as_they_go(etcd_cluster):
    args = etcd_cluster.members[0].args
    assert args[args.index("--auto-compaction-mode") + 1] == "revision"
    assert int(args[args.index("--auto-compaction-retention") + 1]) == COMPACTION_RETENTION <= 10_000


class Registered(dict):
    """The ledger's registered nodes as liveness reads them: name -> a node with a role."""

    def __init__(self, sns: list[str], nodes: list[str]):
        super().__init__({name: SimpleNamespace(role="SN") for name in sns})
        self.update({name: SimpleNamespace(role="SL") for name in nodes})


def liveness_of(store: EtcdStore, sn: str, registered: Registered, background: Background) -> EtcdLiveness:
    liveness = EtcdLiveness(store, sn, lambda: registered, flush_every=0.05, cache_for=0.0)
    liveness.start(background)
    return liveness


@pytest.fixture
def background():
    owner = Background("test-liveness")
    yield owner
    owner.close()


def test_every_sn_sees_each_node_at_the_newest_time_any_sn_heard_it(open_store, background):
    registered = Registered(["sn-1", "sn-2"], ["node1", "node2"])
    sn1 = liveness_of(open_store(), "sn-1", registered, background)
    sn2 = liveness_of(open_store(), "sn-2", registered, background)
    sn1.seen("node1")
    time.sleep(1.0)
    sn2.seen("node1")  # newer, through the other SN
    sn2.seen("node2")
    assert wait_until(lambda: sn1.seen_ago().get("node2") is not None)
    assert sn1.seen_ago()["node1"] < 0.5
    assert set(sn1.seen_ago()) == {"node1", "node2"}
    assert [name for name, _ in sorted(sn1.store.read_folder(ALIVE_FOLDER)[0].items())] == [
        "node1/sn-1", "node1/sn-2", "node2/sn-2"]


def test_liveness_ignores_unregistered_names_and_times_from_the_future(open_store, background):
    registered = Registered(["sn-1", "sn-2"], ["node1"])
    writer = open_store()
    reader = liveness_of(writer, "sn-1", registered, background)
    now = time.time()
    writer.put_values(ALIVE_FOLDER, {"node1/sn-2": f"{now - 30:.3f}".encode(),
                                     "node1/sn-9": f"{now:.3f}".encode(),  # no SN of the ledger
                                     "ghost/sn-2": f"{now:.3f}".encode(),  # no node of the ledger
                                     "node1/sn-1": f"{now + CLOCK_SKEW + 60:.3f}".encode()})  # the future
    assert 29.0 <= reader.seen_ago()["node1"] <= 32.0
    assert set(reader.seen_ago()) == {"node1"}


def test_a_liveness_read_is_bounded_by_the_registered_nodes_and_says_so_when_cut(open_store, background, caplog):
    caplog.set_level(logging.WARNING, logger="swarmlearn.sn")
    registered = Registered(["sn-1"], ["node1"])
    writer = open_store()
    reader = liveness_of(writer, "sn-1", registered, background)
    writer.put_values(ALIVE_FOLDER, {f"junk{i:04d}/sn-1": b"1" for i in range(3 * READ_MIN_KEYS)})
    reader.seen_ago()
    reader.seen_ago()
    cut = [r.getMessage() for r in caplog.records if "keys read" in r.getMessage()]
    assert len(cut) == 1 and f"more than the {READ_MIN_KEYS} keys" in cut[0], cut


def test_an_sn_never_writes_an_older_time_and_a_restarted_one_rewrites_nothing(open_store, background):
    registered = Registered(["sn-1"], ["node1"])
    store = open_store()
    first = liveness_of(store, "sn-1", registered, background)
    first.seen("node1")
    assert wait_until(lambda: "node1/sn-1" in store.read_folder(ALIVE_FOLDER)[0])
    written = store.read_folder(ALIVE_FOLDER)[0]["node1/sn-1"]
    restarted = liveness_of(open_store(), "sn-1", registered, background)
    time.sleep(0.5)  # several flushes of both
    assert store.read_folder(ALIVE_FOLDER)[0]["node1/sn-1"] == written
    later = EtcdLiveness(store, "sn-1", lambda: registered)
    later.seen("node1")
    later._heard["node1"] = float(written) - 10  # heard long ago (a retry of an old batch)
    later._written["node1"] = float(written)
    later._flush()
    assert store.read_folder(ALIVE_FOLDER)[0]["node1/sn-1"] == written
    assert restarted.seen_ago()["node1"] < 5.0


def test_an_sn_stopped_cleanly_takes_its_keys_off_and_no_one_elses(open_store):
    registered = Registered(["sn-1", "sn-2"], ["node1"])
    store = open_store()
    stays, goes = Background("stays"), Background("goes")
    try:
        liveness_of(store, "sn-2", registered, stays).seen("node1")
        liveness_of(open_store(), "sn-1", registered, goes).seen("node1")
        assert wait_until(lambda: len(store.read_folder(ALIVE_FOLDER)[0]) == 2)
        goes.close()
        assert wait_until(lambda: list(store.read_folder(ALIVE_FOLDER)[0]) == ["node1/sn-2"], timeout=FEW_SECONDS)
    finally:
        stays.close()
        goes.close()


def test_a_liveness_read_that_fails_is_served_from_the_last_read_without_waiting_again(certs, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="swarmlearn.sn")
    cluster = start_cluster(tmp_path / "etcd", sn_tls(certs))
    store = EtcdStore(cluster.endpoints, "/swarmlearn-test/failing-read", cluster.tls)
    try:
        liveness = EtcdLiveness(store, "sn-1", lambda: Registered(["sn-1"], ["node1"]))
        cluster.stop()
        started = time.monotonic()
        assert liveness.seen_ago() == {}
        assert time.monotonic() - started >= 0.5  # the first read tried the cluster
        started = time.monotonic()
        for _ in range(3):
            assert liveness.seen_ago() == {}
        assert time.monotonic() - started < 0.5  # the next ones, within CACHE_FOR, did not
    finally:
        store.close()
        cluster.stop()
    warnings = [r.getMessage() for r in caplog.records if "cannot read the etcd cluster" in r.getMessage()]
    assert len(warnings) == 1, warnings


# ------------------------------------------------------------------------------------ members joining


def test_a_change_of_members_leaves_the_calls_in_flight_on_members_that_stay(open_store, etcd_cluster):
    """An SN refreshes its store's member list as SNs join; a wait already running on a member that is
    still one must not be cancelled by that (once, a join failed with "CANCELLED: Channel closed")."""
    store = open_store()
    append_chain(store, 2)
    outcome: list[object] = []

    def wait_past_head() -> None:
        try:
            outcome.append(store.wait_for(50, timeout=3.0))
        except Exception as exc:  # noqa: BLE001 - the test reports whatever ended the wait
            outcome.append(exc)

    waiter = threading.Thread(target=wait_past_head)
    waiter.start()
    time.sleep(0.5)  # the wait is on its watch stream now
    store.use_endpoints([*etcd_cluster.endpoints, "127.0.0.1:9"])  # a member joined (port 9: discard)
    waiter.join(timeout=10)
    assert outcome == [False], f"the wait ended with {outcome!r}, not by its own timeout"
    assert store.head()[0] == 1  # and calls after the change go on through the same member
