"""A store together with the state folded from it: what an SN holds, and what `ledger verify` walks.

Every entry read from a store is checked before it is folded: its bytes hash to the stored hash, it
links to the previous entry, its signature verifies against a certificate the ledger carries, and
the state machine accepts it (ChainVerifier, which followers use too). A store that was edited fails
here, at the first edited entry; one that was cut short is caught by comparing it with a pin
(ledger/pin.py).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from swarmlearn.errors import HeadMoved, LedgerError, Rejected
from swarmlearn.ledger.entry import GENESIS_PREV_HASH, Entry, SignedTx, sha256_hex
from swarmlearn.ledger.signatures import SignatureChecker
from swarmlearn.ledger.snapshot import CHECKPOINT_EVERY, Snapshot, checkpoint_claim, document_bytes
from swarmlearn.ledger.state import LedgerState
from swarmlearn.ledger.store import LedgerStore, StoredEntry

log = logging.getLogger("swarmlearn.ledger")


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

    check_checkpoints: a checkpoint entry is accepted only if the snapshot of the state folded here
    hashes to what it states (ledger/snapshot.py); the snapshot of the latest one is then kept in
    `latest_snapshot`. An SN checks every checkpoint, and so does a follower with --full-replay; a
    follower that started from a snapshot cannot (it lacks the states before its start).
    """

    def __init__(self, check_checkpoints: bool = False) -> None:
        self.state = LedgerState()
        self.signatures = SignatureChecker()
        self.check_checkpoints = check_checkpoints
        self.latest_snapshot: Snapshot | None = None
        self.last_checkpoint = -1  # the index of the last checkpoint entry folded
        self._checked = None  # what check_new found of the transaction it was given last
        self._document: tuple[int, bytes, str] | None = None  # (head index, snapshot bytes, their SHA-256)

    def start_from(self, state: LedgerState, certs: dict) -> None:
        """Goes on from a snapshot's state and certificates (accepted by snapshot.accept_snapshot)
        instead of from entry 0: the next entry to verify is the one after its head."""
        self.state = state
        self.signatures.certs = dict(certs)
        self._document = None

    def snapshot_document(self) -> tuple[bytes, str]:
        """The snapshot of the state as folded now and its SHA-256, made once per head."""
        made = self._document
        if made is None or made[0] != self.state.head_index:
            data = document_bytes(self.state, self.signatures.certs)
            made = self._document = (self.state.head_index, data, sha256_hex(data))
        return made[1], made[2]

    def _checkpoint_before_apply(self, entry: Entry) -> Snapshot | None:
        """For a checkpoint entry about to be folded: with check_checkpoints, the snapshot it names,
        refused (Rejected) unless the state folded here hashes to what it states."""
        claim = checkpoint_claim(entry)
        if claim is None or not self.check_checkpoints:
            return None
        index, claimed = claim
        data, digest = self.snapshot_document()
        if index != self.state.head_index or claimed != digest:
            raise Rejected(f"checkpoint by {entry.tx.signer.node} says the state at entry {index} hashes to "
                           f"{claimed[:12]}, but the state folded here at entry {self.state.head_index} hashes to "
                           f"{digest[:12]}: the SNs disagree on the ledger's state; stop and compare their "
                           f"ledgers (`swarm ledger verify`)")
        return Snapshot(index, data, digest, StoredEntry(entry.index, entry.hash, entry.body_bytes()))

    def _folded(self, entry: Entry, made: Snapshot | None) -> None:
        if entry.tx.kind == "checkpoint":
            self.last_checkpoint = entry.index
        if made is not None:
            self.latest_snapshot = made

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
            made = self._checkpoint_before_apply(entry)
            self.state.apply(entry)
        except Rejected as exc:
            raise ChainBroken(row.index, str(exc)) from None
        self.signatures.learn(entry.tx)
        self._folded(entry, made)
        return entry

    def check_new(self, signed: SignedTx) -> Entry:
        """The entry `signed` would become next; raises Rejected if it would not be accepted."""
        self.signatures.check(signed.tx, signed.signature)
        self._checked = self.state.check_tx(signed.tx)
        entry = Entry(self.state.head_index + 1, self.state.head_hash or GENESIS_PREV_HASH, signed.tx,
                      signed.signature)
        self._checkpoint_before_apply(entry)  # a checkpoint another SN submits here is checked too
        return entry

    def accept(self, entry: Entry) -> None:
        """Folds an entry made by check_new and stored by this writer (checked once, not twice)."""
        made = self._checkpoint_before_apply(entry)
        self.state.apply(entry, self._checked)
        self.signatures.learn(entry.tx)
        self._folded(entry, made)


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
        self.extend([row])

    def extend(self, rows: list[StoredEntry]) -> None:
        """Adds entries folded together (a group commit), waking the readers once for all of them."""
        with self.changed:
            for row in rows:
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


@dataclass
class _Queued:
    """A submit waiting for group commit, and once `done`, its entry or the error to raise."""

    signed: SignedTx
    entry: Entry | None = None
    error: BaseException | None = None
    done: bool = False


class Chain:
    # A compare-and-set append that loses to another writer (another SN on a shared store) re-reads
    # the head and tries again this many times.
    APPEND_ATTEMPTS = 20
    READ_BATCH = 1000
    # The folded entries kept for Watch streams; a stream further behind reads the store.
    TAIL_ENTRIES = 4096
    TAIL_BYTES = 16 << 20

    def __init__(self, store: LedgerStore, checkpoint_every: int = CHECKPOINT_EVERY):
        self.store = store
        self.verifier = ChainVerifier(check_checkpoints=True)
        self.lock = threading.RLock()
        self.tail = FoldedTail(self.TAIL_ENTRIES, self.TAIL_BYTES)
        # Called with (index, hash) of the new head after entries were folded (the SN's marker).
        self.on_head: Callable[[int, str], None] | None = None
        # With a signer (the SN's identity), this chain writes a checkpoint once `checkpoint_every`
        # entries followed the last one (ledger/snapshot.py); without one it writes none.
        self.checkpoint_every = checkpoint_every
        self.sign_checkpoint: Callable[[dict], SignedTx] | None = None
        self._checkpoint_tried = -1  # the head at which this SN last tried to write one
        # Group commit (see submit): the store's write of several entries at once, if it has one; the
        # submits waiting to be written; whether a failed write turned it off for now.
        self._append_all: Callable[[str | None, list[Entry]], None] | None = getattr(
            store, "append_all_if_head_is", None)
        self._queue: list[_Queued] = []
        self._queue_lock = threading.Lock()
        self._one_by_one = False
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

        On a store that appends several entries in one write (SQLite: one fsync), submits that arrive
        while another is being written are committed together (group commit): each waits for the
        lock, and the first to get it checks, folds and writes every submit queued by then, in one
        transaction. Every submit is answered only once its entry is on disk, and Watch streams (and
        Query, which takes the lock) see entries only then, as before; only reads made without the
        lock (Heartbeat's head) can see an entry of the write under way, for the length of that write.
        A failed write folds the state again from the store and appends the submits one by one
        (_submit_one), which reports the failure."""
        if self._append_all is None or self._one_by_one:
            return self._submit_one(signed)
        waiting = _Queued(signed)
        with self._queue_lock:
            self._queue.append(waiting)
        with self.lock:
            if not waiting.done:
                self._commit_queued()
        if waiting.error is not None:
            raise waiting.error
        return waiting.entry

    def _commit_queued(self) -> None:
        """Checks, folds and appends in one write every submit queued now. Called holding the lock."""
        with self._queue_lock:
            batch, self._queue = self._queue, []
        head_hash = self.state.head_hash
        folded: list[Entry] = []
        try:
            for queued in batch:
                try:
                    queued.entry = self.verifier.check_new(queued.signed)
                except Rejected as exc:
                    queued.error = exc
                    continue
                self.verifier.accept(queued.entry)
                folded.append(queued.entry)
            if folded:
                self._append_all(head_hash, folded)
        except BaseException as exc:  # noqa: BLE001 - the state is refolded; each submit then gets its own answer
            log.warning("appending %d entries together failed (%s); folding the ledger again and appending "
                        "them one by one", len(folded), exc)
            self._after_failed_write(batch)
            return
        try:
            self.tail.extend([StoredEntry(entry.index, entry.hash, entry.body_bytes()) for entry in folded])
            if folded:
                self._moved()
            self._recheck_refused([queued for queued in batch if queued.error is not None])
        finally:
            for queued in batch:
                queued.done = True  # each entry is on disk: its submit is answered whatever happens next
        if folded:
            self._checkpoint_if_due()

    def _recheck_refused(self, refused: list[_Queued]) -> None:
        """A refusal is final only once the store holds nothing this state lacks (as in _submit_one):
        when another writer of the store appended meanwhile, the refused submits are tried again."""
        if not refused or not self.catch_up():
            return
        for queued in refused:
            try:
                queued.entry, queued.error = self._submit_one(queued.signed), None
            except BaseException as exc:  # noqa: BLE001 - raised in that submit's own thread
                queued.error = exc

    def _after_failed_write(self, batch: list[_Queued]) -> None:
        """The state folded entries the store does not hold: fold it again from the store, then append
        each submit of `batch` alone; group commit stays off until one of those appends succeeds."""
        self._one_by_one = True
        try:
            self._refold()
            for queued in batch:
                queued.entry, queued.error = None, None
                try:
                    queued.entry = self._submit_one(queued.signed)
                    self._one_by_one = False
                except BaseException as exc:  # noqa: BLE001 - raised in that submit's own thread
                    queued.error = exc
        except BaseException as exc:  # noqa: BLE001 - the store cannot be read either
            for queued in batch:
                queued.error = queued.error or exc
        finally:
            for queued in batch:
                queued.done = True

    def _refold(self) -> None:
        """Folds the state again from the store's first entry (the tail keeps what it had: it only ever
        held entries the store holds). Called holding the lock."""
        self.verifier = ChainVerifier(check_checkpoints=True)
        while rows := self.store.read_raw(self.state.head_index + 1, self.READ_BATCH):
            for row in rows:
                self.verifier.verify_next(row)
                if row.index > self.tail.head_index:
                    self.tail.add(row)

    def _submit_one(self, signed: SignedTx) -> Entry:
        """Submit on its own: the first try checks it against the state folded so far, without reading
        the store: the compare-and-set append holds only on the head that state ends with, so an entry
        other writers appended meanwhile fails it (HeadMoved), and the next try reads them first. A
        refusal, too, is only final once the store holds nothing this state lacks."""
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
                self._checkpoint_if_due()
                return entry
        raise LedgerError(f"could not append after {self.APPEND_ATTEMPTS} attempts: the ledger head keeps moving")

    def _checkpoint_if_due(self) -> None:
        """Appends a checkpoint of the state at the head when `checkpoint_every` entries followed the last
        one (or this SN's last try). Called holding the lock, right after this SN appended an entry. On a
        shared store another SN may win the head first: its entry moves the head, ours is then refused as
        not naming the head, and is dropped; a checkpoint some SN wrote there is as good as ours."""
        head = self.state.head_index
        if self.sign_checkpoint is None or head - max(self.verifier.last_checkpoint,
                                                      self._checkpoint_tried) < self.checkpoint_every:
            return
        self._checkpoint_tried = head
        _, digest = self.verifier.snapshot_document()
        try:
            self.submit(self.sign_checkpoint({"index": head, "state_hash": digest}))
        except (Rejected, LedgerError) as exc:
            log.info("no checkpoint of entry %d written: %s", head, exc)

    def watch(self, start: int, should_stop: Callable[[], bool], batch: int = 256,
              poll: float = 0.5) -> Iterator[StoredEntry]:
        """Yields the entries this chain folded, from `start` on, in order and without gaps, as they are
        folded, until `should_stop()` (looked at least every `poll` seconds): recent ones from its tail,
        older ones read from the store (up to the folded head). An entry past the head is yielded once
        folded, never before: what a Watch serves is what this SN's state holds."""
        for rows in self.watch_batches(start, should_stop, batch, poll):
            yield from rows

    def watch_batches(self, start: int, should_stop: Callable[[], bool], batch: int = 256,
                      poll: float = 0.5, max_bytes: int | None = None) -> Iterator[list[StoredEntry]]:
        """As watch(), but each time the entries folded since the last yield, up to `batch` of them and
        `max_bytes` of bodies (always at least one): a reader that keeps up gets one entry at a time,
        one that fell behind (a burst of submits) gets what it missed in one go."""
        next_index = max(0, start)
        while not should_stop():
            rows = self.tail.rows_from(next_index, batch)
            if rows is None:
                rows = self.store.read_raw(next_index, min(batch, self.tail.head_index - next_index + 1))
            if not rows:
                self.tail.wait_for(next_index, poll)
                continue
            if max_bytes is not None:
                rows = _within_bytes(rows, max_bytes)
            yield rows
            next_index = rows[-1].index + 1


def _within_bytes(rows: list[StoredEntry], max_bytes: int) -> list[StoredEntry]:
    """The first of `rows`, and those after it while their bodies together stay within `max_bytes`."""
    used = len(rows[0].body)
    for count, row in enumerate(rows[1:], start=1):
        used += len(row.body)
        if used > max_bytes:
            return rows[:count]
    return rows


def verify_store(store: LedgerStore) -> VerifyReport:
    """Walks the whole chain; raises ChainBroken at the first bad entry."""
    chain = Chain(store)
    return VerifyReport(chain.state.head_index + 1, chain.state.head_hash)
