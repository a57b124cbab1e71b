"""What every ledger store promises, whatever keeps the bytes.

Each test runs once per store in STORES. A store factory takes a location (a folder that belongs to
the test) and opens the ledger kept there; opening the same location twice gives two handles on one
ledger, the way two SNs share one replicated store. A new store adds one line to STORES naming the
fixture that gives its factory.
Stores only store, so the entries here carry made-up signatures.

The etcd store runs against one real etcd member per test module (mutual TLS with gen-cert's
certificates of a "ledger" CA of its own, apart from the swarm's CA, as in production); each test's
ledger lives under its own key prefix, named after the test's folder.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import wait_until
from swarmlearn.errors import HeadMoved
from swarmlearn.ledger.entry import GENESIS_PREV_HASH, Entry, Signer, Tx
from swarmlearn.ledger.etcd_member import SETUP_HINT, EtcdCluster, start_cluster
from swarmlearn.ledger.etcd_store import EtcdStore, TLSFiles
from swarmlearn.ledger.sqlite_store import SQLiteStore
from swarmlearn.ledger.store import LedgerStore
from swarmlearn.pki import CertLayout, generate_host_certs

StoreFactory = Callable[[Path], LedgerStore]

# Store name -> the fixture that gives its factory.
STORES: dict[str, str] = {
    "sqlite": "sqlite_factory",
    "etcd": "etcd_factory",
}


@pytest.fixture
def sqlite_factory() -> StoreFactory:
    return lambda location: SQLiteStore(location / "ledger.db")


def ledger_certs(certs: CertLayout) -> CertLayout:
    """The swarm's ledger CA (its own organization, apart from the swarm's CA `certs`), made once beside
    `certs`, as `swarm gen-cert -e <swarm>-ledger --org <swarm>-ledger` makes it: it issues the SNs' etcd
    client certificates and the members' own."""
    layout = CertLayout(certs.root.parent / f"{certs.root.name}-ledger", 1)
    if not layout.cert("sn").exists():
        generate_host_certs(layout.root, 1, org="test-ledger", components=("sn",))
    return layout


def sn_tls(certs: CertLayout) -> TLSFiles:
    """The ledger identity of the swarm `certs`: what etcd members serve with and trust (this CA only),
    and what its SNs reach them with (--etcd-cacert/--etcd-cert/--etcd-key)."""
    ledger = ledger_certs(certs)
    return TLSFiles(ledger.ca_cert, ledger.cert("sn"), ledger.key("sn"))


@pytest.fixture(scope="module")
def etcd_cluster(certs, tmp_path_factory) -> EtcdCluster:
    """One etcd member for the whole test module, stopped by pid at its end."""
    if shutil.which("etcd") is None:
        pytest.fail(f"etcd is not installed (no `etcd` on PATH): {SETUP_HINT}")
    cluster = start_cluster(tmp_path_factory.mktemp("etcd"), sn_tls(certs))
    yield cluster
    cluster.stop()


@pytest.fixture
def etcd_factory(etcd_cluster) -> StoreFactory:
    return lambda location: EtcdStore(etcd_cluster.endpoints, f"/swarmlearn-test{location}", etcd_cluster.tls)

# Generous bounds for "at once" and "promptly": CI machines are slow and busy, a store is not.
PROMPT = 2.0
SIGNER = Signer("sl-1", "ab" * 32)


@pytest.fixture(params=sorted(STORES), ids=sorted(STORES))
def store_factory(request, tmp_path) -> StoreFactory:
    """Opens stores of one kind; every handle opened is closed when the test ends."""
    opened: list[LedgerStore] = []
    factory = request.getfixturevalue(STORES[request.param])

    def open_store(location: Path = tmp_path) -> LedgerStore:
        store = factory(location)
        opened.append(store)
        return store

    yield open_store
    for store in reversed(opened):
        store.close()


@pytest.fixture
def store(store_factory) -> LedgerStore:
    return store_factory()


def make_entry(index: int, prev_hash: str | None, **payload) -> Entry:
    tx = Tx(kind="metrics", payload={"contract": "default", "node": SIGNER.node, "step": index, **payload},
            signer=SIGNER, time=1700000000.0 + index)
    return Entry(index, prev_hash or GENESIS_PREV_HASH, tx, signature=f"sig-{index}".encode())


def append_chain(store: LedgerStore, count: int) -> list[Entry]:
    """Appends `count` entries after the current head and returns them."""
    head = store.head()
    index, prev = (head[0] + 1, head[1]) if head else (0, None)
    entries = []
    for i in range(index, index + count):
        entry = make_entry(i, prev)
        store.append_if_head_is(prev, entry)
        entries.append(entry)
        prev = entry.hash
    return entries


def in_thread(target: Callable[[], None], delay: float = 0.0) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        target()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# ------------------------------------------------------------------------------------ head and append


def test_an_empty_store_has_no_head(store):
    assert store.head() is None
    assert store.read_raw() == []


def test_the_first_entry_becomes_the_head(store):
    first = make_entry(0, None)
    store.append_if_head_is(None, first)
    assert store.head() == (0, first.hash)


def test_each_append_moves_the_head_to_the_new_entry(store):
    entries = append_chain(store, 5)
    assert store.head() == (4, entries[-1].hash)
    assert [row.hash for row in store.read_raw()] == [e.hash for e in entries]


def test_an_append_on_a_stale_head_is_refused_and_writes_nothing(store):
    first, second = append_chain(store, 2)
    before = store.read_raw()

    # Another writer got there first: expecting the old head, or an empty store, loses.
    for expected in (first.hash, None, "f" * 64):
        with pytest.raises(HeadMoved):
            store.append_if_head_is(expected, make_entry(2, expected, attempt=str(expected)))

    assert store.head() == (1, second.hash)
    assert store.read_raw() == before


def test_expecting_a_head_on_an_empty_store_is_refused(store):
    with pytest.raises(HeadMoved):
        store.append_if_head_is("0" * 64, make_entry(0, None))
    assert store.head() is None
    assert store.read_raw() == []


def test_an_append_made_through_one_handle_is_seen_through_another(store_factory):
    sn_a, sn_b = store_factory(), store_factory()
    entries = append_chain(sn_a, 3)
    assert sn_b.head() == (2, entries[-1].hash)
    with pytest.raises(HeadMoved):
        sn_b.append_if_head_is(entries[1].hash, make_entry(2, entries[1].hash, late=True))
    assert [row.hash for row in sn_b.read_raw()] == [e.hash for e in entries]


# ---------------------------------------------------------------------------------------- reading


def test_read_raw_returns_entries_in_order_from_start_up_to_limit(store):
    entries = append_chain(store, 10)

    def indexes(start=0, limit=None):
        return [row.index for row in store.read_raw(start, limit)]

    assert indexes() == list(range(10))
    assert indexes(3) == list(range(3, 10))
    assert indexes(3, 4) == [3, 4, 5, 6]
    assert indexes(0, 1) == [0]
    assert indexes(8, 100) == [8, 9]
    assert indexes(9) == [9]
    assert indexes(10) == []
    assert indexes(50, 5) == []
    assert [row.hash for row in store.read_raw(2, 3)] == [e.hash for e in entries[2:5]]


def test_read_gives_back_the_entries_that_were_appended(store):
    entries = append_chain(store, 4)
    assert store.read() == entries
    assert store.read(1, 2) == entries[1:3]


def test_stored_bytes_are_the_entry_body_exactly_and_hash_to_the_stored_hash(store):
    # Non-ASCII text, nesting and floats: whatever canonical JSON makes of them must come back intact.
    first = make_entry(0, None, note="Grüße, 学习 ✓", nested={"b": [1, 2.5, None], "a": True}, loss=0.1 + 0.2)
    store.append_if_head_is(None, first)
    second = make_entry(1, first.hash, note="x" * 10_000)
    store.append_if_head_is(first.hash, second)

    for row, entry in zip(store.read_raw(), (first, second), strict=True):
        assert isinstance(row.body, bytes)
        assert row.body == entry.body_bytes()
        assert row.hash == entry.hash == hashlib.sha256(row.body).hexdigest()
        assert row.entry() == entry


# ------------------------------------------------------------------------------------------ waiting


def test_wait_for_an_entry_that_exists_returns_at_once(store):
    append_chain(store, 3)
    started = time.monotonic()
    assert store.wait_for(0, timeout=30)
    assert store.wait_for(2, timeout=30)
    assert time.monotonic() - started < PROMPT


def test_wait_for_a_missing_entry_gives_up_after_its_timeout(store):
    append_chain(store, 3)
    started = time.monotonic()
    assert store.wait_for(3, timeout=0.4) is False
    elapsed = time.monotonic() - started
    assert 0.4 * 0.95 <= elapsed < 0.4 + PROMPT


def test_wait_for_with_no_time_left_only_looks(store):
    started = time.monotonic()
    assert store.wait_for(0, timeout=0) is False
    append_chain(store, 1)
    assert store.wait_for(0, timeout=0) is True
    assert time.monotonic() - started < PROMPT


def test_wait_for_wakes_promptly_when_another_thread_appends(store):
    append_chain(store, 1)
    writer = in_thread(lambda: append_chain(store, 1), delay=0.3)
    started = time.monotonic()
    assert store.wait_for(1, timeout=30)
    assert time.monotonic() - started < PROMPT
    writer.join(PROMPT)


def test_wait_for_wakes_when_another_handle_appends(store_factory):
    # One SN waits on its handle while another SN appends to the shared ledger through its own.
    waiter, writer = store_factory(), store_factory()
    append_chain(writer, 1)
    thread = in_thread(lambda: append_chain(writer, 1), delay=0.3)
    started = time.monotonic()
    assert waiter.wait_for(1, timeout=30)
    assert time.monotonic() - started < PROMPT
    thread.join(PROMPT)


def test_wait_for_keeps_waiting_its_full_timeout_while_earlier_entries_arrive(store):
    # A watcher far ahead of the head must not give up early because the swarm is busy appending.
    done = threading.Event()

    def keep_appending() -> None:
        while not done.is_set():
            append_chain(store, 1)

    writer = in_thread(keep_appending)
    started = time.monotonic()
    found = store.wait_for(10**9, timeout=2.0)
    elapsed = time.monotonic() - started
    done.set()
    writer.join(PROMPT)
    assert found is False
    assert elapsed >= 2.0 * 0.95


# ------------------------------------------------------------------------------------------ watching


def collect(store: LedgerStore, start: int, stop: threading.Event, seen: list) -> threading.Thread:
    def run() -> None:
        for row in store.watch(start, stop.is_set, poll=0.05):
            seen.append(row)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_watch_yields_past_and_later_entries_in_order_then_stops(store):
    entries = append_chain(store, 3)
    stop, seen = threading.Event(), []
    watcher = collect(store, 0, stop, seen)

    assert wait_until(lambda: len(seen) == 3)
    entries += append_chain(store, 2)
    time.sleep(0.2)
    entries += append_chain(store, 300)  # more than one read batch
    assert wait_until(lambda: len(seen) == len(entries))

    stop.set()
    watcher.join(PROMPT)
    assert not watcher.is_alive()
    assert [row.index for row in seen] == list(range(len(entries)))
    assert [row.hash for row in seen] == [e.hash for e in entries]
    assert [row.body for row in seen] == [e.body_bytes() for e in entries]


def test_watch_from_an_index_skips_what_came_before(store):
    entries = append_chain(store, 5)
    stop, seen = threading.Event(), []
    watcher = collect(store, 3, stop, seen)
    assert wait_until(lambda: len(seen) == 2)
    entries += append_chain(store, 1)
    assert wait_until(lambda: len(seen) == 3)
    stop.set()
    watcher.join(PROMPT)
    assert not watcher.is_alive()
    assert [row.hash for row in seen] == [e.hash for e in entries[3:]]


def test_watch_of_a_quiet_ledger_stops_when_asked(store):
    append_chain(store, 1)
    stop, seen = threading.Event(), []
    watcher = collect(store, 1, stop, seen)
    time.sleep(0.3)
    stop.set()
    watcher.join(PROMPT)
    assert not watcher.is_alive()
    assert seen == []


def test_watch_sees_entries_appended_through_another_handle(store_factory):
    watched, writer = store_factory(), store_factory()
    stop, seen = threading.Event(), []
    watcher = collect(watched, 0, stop, seen)
    entries = append_chain(writer, 4)
    assert wait_until(lambda: len(seen) == 4)
    stop.set()
    watcher.join(PROMPT)
    assert not watcher.is_alive()
    assert [row.hash for row in seen] == [e.hash for e in entries]
