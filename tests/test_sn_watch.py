"""What an SN's Watch streams serve: the entries its own chain folded, taken from its tail of recent
entries, or from the store for a reader further behind, in order and without gaps, and never an entry
the SN has not folded. And a submit through an SN whose state is behind the store (another writer
appended meanwhile) lands after those entries, or is refused only on the up-to-date state.

Real stores (a SQLite file, two writers on it) and real signed transactions; no SN process is needed:
the SN's Watch handler is a loop over Chain.watch (its gRPC side is covered by test_sn.py)."""

from __future__ import annotations

import threading
import time

import pytest

from swarmlearn.errors import AlreadyRecorded
from swarmlearn.ledger.chain import Chain, FoldedTail
from swarmlearn.ledger.sqlite_store import SQLiteStore
from swarmlearn.ledger.store import StoredEntry

from ledger_ids import genesis_payload, reg, signed

POLL = 0.05


@pytest.fixture
def ledger_file(tmp_path):
    path = tmp_path / "ledger.db"
    store = SQLiteStore(path)
    chain = Chain(store)
    chain.submit(signed("sn-1", "genesis", genesis_payload()))
    chain.submit(signed("swci-1", "register_node", reg("swci-1")))
    store.close()
    return path


def create_contracts(chain: Chain, names: list[str]) -> None:
    for name in names:
        chain.submit(signed("swci-1", "contract_create", {"name": name}))


def collect(chain: Chain, start: int, until_index: int, timeout: float = 10) -> list[StoredEntry]:
    """The rows chain.watch yields from `start` up to entry `until_index`."""
    rows: list[StoredEntry] = []
    deadline = time.monotonic() + timeout
    for row in chain.watch(start, lambda: time.monotonic() > deadline, poll=POLL):
        rows.append(row)
        if row.index >= until_index:
            break
    return rows


def test_a_reader_behind_the_tail_gets_old_entries_from_the_store_then_new_ones_as_they_are_appended(
        ledger_file, monkeypatch):
    monkeypatch.setattr(Chain, "TAIL_ENTRIES", 3)
    chain = Chain(SQLiteStore(ledger_file))
    try:
        create_contracts(chain, [f"old-{i}" for i in range(6)])
        appender = threading.Timer(0.3, create_contracts, (chain, ["new-0", "new-1", "new-2"]))
        appender.start()
        rows = collect(chain, 0, chain.state.head_index + 3)
        appender.join()
        assert rows == chain.store.read_raw(0)  # index, hash and bytes exactly as stored
        assert [row.index for row in rows] == list(range(len(rows)))
        assert collect(chain, 5, chain.state.head_index) == chain.store.read_raw(5)  # from any index
    finally:
        chain.store.close()


def test_a_watch_serves_another_writers_entry_only_once_this_sn_folded_it(ledger_file):
    ours, theirs = Chain(SQLiteStore(ledger_file)), Chain(SQLiteStore(ledger_file))
    try:
        create_contracts(theirs, ["theirs"])
        start = ours.state.head_index + 1
        seen: list[StoredEntry] = []
        stop = threading.Event()
        reader = threading.Thread(target=lambda: seen.extend(ours.watch(start, stop.is_set, poll=POLL)))
        reader.start()
        time.sleep(0.3)
        assert seen == []  # in the store, but not folded here
        ours.fold(theirs.store.read_raw(start)[0])
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        reader.join(5)
        assert not reader.is_alive()  # ends within its poll once told to stop
        assert seen == ours.store.read_raw(start)
    finally:
        ours.store.close()
        theirs.store.close()


def test_a_submit_through_an_sn_behind_the_store_lands_after_what_it_had_not_folded(ledger_file):
    ours, theirs = Chain(SQLiteStore(ledger_file)), Chain(SQLiteStore(ledger_file))
    try:
        original = signed("swci-1", "contract_create", {"name": "theirs"})
        theirs.submit(original)
        with pytest.raises(AlreadyRecorded):  # a replay, though our state had not seen the original
            ours.submit(original)
        theirs.submit(signed("admin-1", "register_node", reg("admin-1")))
        # Signed by a node registered only through the other writer: refused on our state, accepted
        # on the store's, after its entries.
        entry = ours.submit(signed("admin-1", "contract_create", {"name": "ours"}))
        assert entry.index == theirs.state.head_index + 1
        assert Chain(ours.store).state.head_hash == ours.state.head_hash  # one chain, verified whole
        assert {"theirs", "ours"} <= set(ours.state.contracts)
    finally:
        ours.store.close()
        theirs.store.close()


def test_the_tail_keeps_its_bounds_and_sends_older_readers_to_the_store():
    tail = FoldedTail(max_entries=3, max_bytes=10)
    for index in range(5):
        tail.add(StoredEntry(index, f"h{index}", b"1234"))
    assert tail.rows_from(4, 10) == [StoredEntry(4, "h4", b"1234")]
    assert [row.index for row in tail.rows_from(3, 10)] == [3, 4]  # 8 bytes: the third would be 12
    assert tail.rows_from(2, 10) is None
    assert tail.rows_from(5, 10) == []
    assert not tail.wait_for(5, 0.05)
    with pytest.raises(AssertionError, match="entry 7 folded after entry 4"):
        tail.add(StoredEntry(7, "h7", b""))


def test_a_slow_read_of_the_store_does_not_hold_up_submits(ledger_file):
    """A Query folds the latest entries with a read of the store (a network round trip on etcd); the
    submits of the round in progress do not wait for it."""
    reading = threading.Event()
    release = threading.Event()

    class SlowReads(SQLiteStore):
        def read_raw(self, start: int = 0, limit: int | None = None) -> list[StoredEntry]:
            if threading.current_thread().name == "query":
                reading.set()
                release.wait(10)
            return super().read_raw(start, limit)

    chain = Chain(SlowReads(ledger_file))
    query = threading.Thread(target=chain.catch_up, name="query")
    try:
        query.start()
        assert reading.wait(5)
        started = time.monotonic()
        create_contracts(chain, ["while-a-query-reads"])
        assert time.monotonic() - started < 2
        release.set()
        query.join(5)
        assert Chain(chain.store).state.head_hash == chain.state.head_hash
    finally:
        release.set()
        query.join(5)
        chain.store.close()
