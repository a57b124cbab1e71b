"""Fewer, cheaper hops per entry: a follower that fell behind gets what it missed in one Watch message
(while one that keeps up, and any client from before batches, still gets one entry per message), and
submits that arrive while the SN writes are committed together, in one write, each answered only once
its entry is on disk.

Watch over a real `swarm sn` process (mutual TLS on 127.0.0.1); group commit on a real SQLite file
with real signed transactions, driven through Chain as the SN's Submit handler does."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from conftest import identity
from swarmlearn.errors import AlreadyRecorded, LedgerError
from swarmlearn.ledger.chain import Chain, verify_store
from swarmlearn.ledger.sqlite_store import SQLiteStore
from swarmlearn.proto import sn_pb2, sn_pb2_grpc
from swarmlearn.sn.client import SNClient

from ledger_ids import genesis_payload, reg, signed

CONTRACTS = 12


def swci(sn, certs) -> SNClient:
    client = SNClient(sn.address, identity(certs, "swci"))
    client.wait_ready(10)
    client.register("SWCI")
    for i in range(CONTRACTS):
        client.submit("contract_create", {"name": f"c{i}"})
    return client


def first_message(sn, certs, batch: int) -> sn_pb2.LedgerEntry:
    """The first message of a raw Watch from entry 0 asking for `batch` (0: as clients before batches)."""
    channel = grpc.secure_channel(sn.address, identity(certs, "swci").channel_credentials())
    try:
        stream = sn_pb2_grpc.SwarmNetworkStub(channel).Watch(sn_pb2.WatchRequest(from_index=0, batch=batch))
        message = next(stream)
        stream.cancel()
        return message
    finally:
        channel.close()


def test_a_follower_behind_gets_every_entry_it_missed_in_one_message_in_order(sn, certs):
    with swci(sn, certs) as client:
        head = client.heartbeat()
        message = first_message(sn, certs, batch=256)
    indexes = [message.index] + [entry.index for entry in message.following]
    assert indexes == list(range(head + 1))
    assert all(entry.body and entry.hash for entry in message.following)


def test_a_client_from_before_batches_still_gets_one_entry_per_message(sn, certs):
    with swci(sn, certs):
        message = first_message(sn, certs, batch=0)
    assert message.index == 0 and len(message.following) == 0


def test_watch_batches_yields_the_ledger_in_order_and_watch_the_same_entries_one_by_one(sn, certs):
    with swci(sn, certs) as client:
        head = client.heartbeat()
        stop = threading.Event()
        batches = []
        for batch in client.watch_batches(0, stop, raw=True):
            batches.append(batch)
            if batch[-1].index >= head:
                stop.set()
        assert len(batches) < head + 1  # several entries came together
        rows = [row for batch in batches for row in batch]
        assert [row.index for row in rows] == list(range(head + 1))
        one_by_one = []
        stop = threading.Event()
        for entry in client.watch(0, stop):
            one_by_one.append(entry.hash)
            if entry.index >= head:
                stop.set()
        assert one_by_one == [row.hash for row in rows]


# ------------------------------------------------------------------------------------ group commit

@pytest.fixture
def chain(tmp_path):
    chain = Chain(SQLiteStore(tmp_path / "ledger.db"))
    chain.submit(signed("sn-1", "genesis", genesis_payload()))
    chain.submit(signed("swci-1", "register_node", reg("swci-1")))
    yield chain
    chain.store.close()


class SlowWrites:
    """Wraps the chain's write of several entries: counts writes and their sizes, holds the first one
    for a while (so that the other submits queue up behind it), and can fail the next few."""

    def __init__(self, chain: Chain, hold: float = 0.3, fail: int = 0):
        self._real = chain._append_all
        self.sizes: list[int] = []
        self.hold = hold
        self.fail = fail
        chain._append_all = self

    def __call__(self, head_hash, entries) -> None:
        if self.fail:
            self.fail -= 1
            raise LedgerError("disk full (a test's)")
        if not self.sizes:
            time.sleep(self.hold)
        self.sizes.append(len(entries))
        self._real(head_hash, entries)


def submit_together(chain: Chain, txs: list) -> list:
    """Each of `txs` submitted from a thread of its own, at once; their entries, or what they raised."""
    results: list = [None] * len(txs)
    start = threading.Barrier(len(txs))

    def submit(i: int) -> None:
        start.wait()
        try:
            results[i] = chain.submit(txs[i])
        except Exception as exc:  # noqa: BLE001 - checked by the test
            results[i] = exc

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(txs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def contract_txs(count: int) -> list:
    return [signed("swci-1", "contract_create", {"name": f"c{i}"}) for i in range(count)]


def test_submits_arriving_during_a_write_are_committed_together_and_each_answered_with_its_entry(chain):
    writes = SlowWrites(chain)
    entries = submit_together(chain, contract_txs(10))
    assert all(not isinstance(e, Exception) for e in entries), entries
    assert sum(writes.sizes) == 10 and len(writes.sizes) < 10  # fewer writes (fsyncs) than submits
    stored = {row.index: row.hash for row in chain.store.read_raw(0)}
    assert {e.index: e.hash for e in entries}.items() <= stored.items()
    assert sorted(e.index for e in entries) == list(range(2, 12))
    assert chain.tail.head_index == chain.state.head_index == 11
    assert verify_store(chain.store).entries == 12


def test_a_submit_repeated_in_the_same_write_is_recorded_once(chain):
    SlowWrites(chain)
    tx = signed("swci-1", "contract_create", {"name": "twice"})
    results = submit_together(chain, [tx, tx, *contract_txs(4)])
    made = [r for r in results[:2] if not isinstance(r, Exception)]
    refused = [r for r in results[:2] if isinstance(r, AlreadyRecorded)]
    assert len(made) == 1 and len(refused) == 1 and refused[0].index == made[0].index
    assert chain.state.head_index == 6


def test_a_failed_write_refolds_the_state_and_appends_the_submits_one_by_one(chain):
    writes = SlowWrites(chain, hold=0.0, fail=1)
    entries = submit_together(chain, contract_txs(6))
    assert all(not isinstance(e, Exception) for e in entries), entries
    assert chain.state.head_index == chain.tail.head_index == 7
    assert verify_store(chain.store).head_hash == chain.state.head_hash
    # Group commit is back once a write succeeded.
    submit_together(chain, contract_txs(9)[6:])
    assert writes.sizes


def test_a_write_that_keeps_failing_answers_every_submit_with_the_error_and_folds_nothing_unwritten(chain):
    SlowWrites(chain, hold=0.0, fail=100)
    head = chain.state.head_index

    def broken(expected, entry):
        raise LedgerError("disk full (a test's)")

    chain.store.append_if_head_is = broken
    results = submit_together(chain, contract_txs(4))
    assert all(isinstance(r, LedgerError) for r in results), results
    assert chain.state.head_index == head == chain.store.head()[0]
    assert "c0" not in chain.state.contracts
