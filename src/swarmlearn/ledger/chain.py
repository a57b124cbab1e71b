"""A store together with the state folded from it: what an SN holds, and what `ledger verify` walks.

Every entry read from a store is checked before it is folded: its bytes hash to the stored hash, it
links to the previous entry, its signature verifies against a certificate the ledger carries, and
the state machine accepts it (ChainVerifier, which followers use too). A store that was edited fails
here, at the first edited entry; one that was cut short is caught by comparing it with a pin
(ledger/pin.py).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from swarmlearn.errors import HeadMoved, LedgerError, Rejected
from swarmlearn.ledger.entry import GENESIS_PREV_HASH, Entry, SignedTx, sha256_hex
from swarmlearn.ledger.signatures import SignatureChecker
from swarmlearn.ledger.state import LedgerState
from swarmlearn.ledger.store import LedgerStore, StoredEntry


class ChainBroken(LedgerError):
    def __init__(self, index: int, reason: str):
        super().__init__(f"entry {index}: {reason}")
        self.index = index
        self.reason = reason


@dataclass(frozen=True)
class VerifyReport:
    entries: int
    head_hash: str | None


class ChainVerifier:
    """Checks ledger entries one after another, as a reader receives them: the entry's bytes hash to
    its hash, it is the next index, it links to the previous entry's hash, its signature verifies
    against a certificate the ledger carries, and the state machine accepts it; then folds it.

    The one verifier of the project: the SN's Chain and `swarm ledger verify` use it on the store, and
    every follower (SL, SWOP) on the entries the SN streams (index, hash and body bytes, as stored).
    """

    def __init__(self) -> None:
        self.state = LedgerState()
        self.signatures = SignatureChecker()
        self._checked = None  # what check_new found of the transaction it was given last

    def verify_next(self, row: StoredEntry) -> Entry:
        """Checks `row` as the next entry and folds it; raises ChainBroken (changing nothing) if it is not."""
        expected = self.state.head_index + 1
        if row.index != expected:
            raise ChainBroken(expected, f"missing; the ledger jumps to index {row.index}")
        if sha256_hex(row.body) != row.hash:
            raise ChainBroken(row.index, "its bytes do not match its stored hash (edited)")
        try:
            entry = row.entry()
        except LedgerError as exc:
            raise ChainBroken(row.index, str(exc)) from None
        if entry.body_bytes() != row.body:
            raise ChainBroken(row.index, "stored bytes are not in canonical form (edited)")
        if entry.index != row.index:
            raise ChainBroken(row.index, f"says it is entry {entry.index}")
        prev = self.state.head_hash or GENESIS_PREV_HASH
        if entry.prev_hash != prev:
            raise ChainBroken(row.index, "does not link to the previous entry's hash")
        try:
            self.signatures.check(entry.tx, entry.signature)
            self.state.apply(entry)
        except Rejected as exc:
            raise ChainBroken(row.index, str(exc)) from None
        self.signatures.learn(entry.tx)
        return entry

    def check_new(self, signed: SignedTx) -> Entry:
        """The entry `signed` would become next; raises Rejected if it would not be accepted."""
        self.signatures.check(signed.tx, signed.signature)
        self._checked = self.state.check_tx(signed.tx)
        return Entry(self.state.head_index + 1, self.state.head_hash or GENESIS_PREV_HASH, signed.tx,
                     signed.signature)

    def accept(self, entry: Entry) -> None:
        """Folds an entry made by check_new and stored by this writer (checked once, not twice)."""
        self.state.apply(entry, self._checked)
        self.signatures.learn(entry.tx)


class FoldedTail:
    """The entries a Chain folded last, as the store holds them (index, hash, body bytes), in order and
    without gaps, bounded in number and bytes; every fold wakes the readers waiting for it. An SN serves
    its Watch streams from here: an entry reaches every stream as soon as this SN folded it (appended
    it, or read it from the store), with no further read of the store per stream."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.changed = threading.Condition()
        self._rows: deque[StoredEntry] = deque()
        self._bytes = 0
        self.head_index = -1  # the last entry folded

    def add(self, row: StoredEntry) -> None:
        with self.changed:
            if row.index != self.head_index + 1:
                raise AssertionError(f"entry {row.index} folded after entry {self.head_index}")
            self._rows.append(row)
            self._bytes += len(row.body)
            self.head_index = row.index
            while len(self._rows) > 1 and (len(self._rows) > self.max_entries or self._bytes > self.max_bytes):
                self._bytes -= len(self._rows.popleft().body)
            self.changed.notify_all()

    def rows_from(self, index: int, limit: int) -> list[StoredEntry] | None:
        """Up to `limit` folded entries from `index` on ([] when none is folded there yet), or None when
        entry `index` is older than this tail keeps."""
        with self.changed:
            if index > self.head_index:
                return []
            first = self._rows[0].index
            if index < first:
                return None
            return [self._rows[i] for i in range(index - first, min(len(self._rows), index - first + limit))]

    def wait_for(self, index: int, timeout: float) -> bool:
        """Blocks until entry `index` is folded or `timeout` seconds pass; True if it is."""
        with self.changed:
            return self.changed.wait_for(lambda: self.head_index >= index, timeout)


class Chain:
    # A compare-and-set append that loses to another writer (another SN on a shared store) re-reads
    # the head and tries again this many times.
    APPEND_ATTEMPTS = 20
    READ_BATCH = 1000
    # The folded entries kept for Watch streams; a stream further behind reads the store.
    TAIL_ENTRIES = 4096
    TAIL_BYTES = 16 << 20

    def __init__(self, store: LedgerStore):
        self.store = store
        self.verifier = ChainVerifier()
        self.lock = threading.RLock()
        self.tail = FoldedTail(self.TAIL_ENTRIES, self.TAIL_BYTES)
        # Called with (index, hash) of the new head after entries were folded (the SN's marker).
        self.on_head: Callable[[int, str], None] | None = None
        self.catch_up()

    @property
    def state(self) -> LedgerState:
        return self.verifier.state

    @property
    def signatures(self) -> SignatureChecker:
        return self.verifier.signatures

    def _moved(self) -> None:
        if self.on_head is not None and self.state.head_hash is not None:
            self.on_head(self.state.head_index, self.state.head_hash)

    def catch_up(self) -> int:
        """Folds entries other writers appended since we last looked; returns how many. Called without
        the chain's lock, it reads the store without holding it (on a shared store a read is a network
        round trip, which submits need not wait for) and folds under it what no other thread folded
        meanwhile."""
        count = 0
        while rows := self.store.read_raw(self.state.head_index + 1, self.READ_BATCH):
            with self.lock:
                fresh = [row for row in rows if row.index > self.state.head_index]
                for row in fresh:
                    self.verifier.verify_next(row)
                    self.tail.add(row)
                if fresh:
                    self._moved()
            count += len(fresh)
        return count

    def fold(self, row: StoredEntry) -> None:
        """Folds `row`, an entry the store holds (a store watch brought it), if it is the next one; reads
        the store when entries before it are missing here; one folded already is passed over."""
        with self.lock:
            if row.index > self.state.head_index + 1:
                self.catch_up()
            elif row.index == self.state.head_index + 1:
                self.verifier.verify_next(row)
                self.tail.add(row)
                self._moved()

    def submit(self, signed: SignedTx) -> Entry:
        """Checks a signed transaction and appends it; raises Rejected with the reason if refused.

        The first try checks it against the state folded so far, without reading the store: the
        compare-and-set append holds only on the head that state ends with, so an entry other writers
        appended meanwhile fails it (HeadMoved), and the next try reads them first. A refusal, too, is
        only final once the store holds nothing this state lacks."""
        with self.lock:
            for attempt in range(self.APPEND_ATTEMPTS):
                if attempt:
                    self.catch_up()
                try:
                    entry = self.verifier.check_new(signed)
                except Rejected:
                    if self.catch_up():
                        entry = self.verifier.check_new(signed)
                    else:
                        raise
                try:
                    self.store.append_if_head_is(self.state.head_hash, entry)
                except HeadMoved:
                    continue
                self.verifier.accept(entry)
                self.tail.add(StoredEntry(entry.index, entry.hash, entry.body_bytes()))
                self._moved()
                return entry
        raise LedgerError(f"could not append after {self.APPEND_ATTEMPTS} attempts: the ledger head keeps moving")

    def watch(self, start: int, should_stop: Callable[[], bool], batch: int = 256,
              poll: float = 0.5) -> Iterator[StoredEntry]:
        """Yields the entries this chain folded, from `start` on, in order and without gaps, as they are
        folded, until `should_stop()` (looked at least every `poll` seconds): recent ones from its tail,
        older ones read from the store (up to the folded head). An entry past the head is yielded once
        folded, never before: what a Watch serves is what this SN's state holds."""
        next_index = max(0, start)
        while not should_stop():
            rows = self.tail.rows_from(next_index, batch)
            if rows is None:
                rows = self.store.read_raw(next_index, min(batch, self.tail.head_index - next_index + 1))
            if not rows:
                self.tail.wait_for(next_index, poll)
                continue
            for row in rows:
                yield row
                next_index = row.index + 1


def verify_store(store: LedgerStore) -> VerifyReport:
    """Walks the whole chain; raises ChainBroken at the first bad entry."""
    chain = Chain(store)
    return VerifyReport(chain.state.head_index + 1, chain.state.head_hash)
