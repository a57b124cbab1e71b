"""An SL's own copy of the ledger state, kept current by following the SN's entry stream.

The state machine is pure, so folding the same entries gives every SL the state the SN has. Round
logic waits on this copy ("until round 7 is closed") instead of polling the SN.

Every entry the SN streams goes through the ChainVerifier the SN itself uses (hash, link, signature,
state machine), and the follower pins the swarm (ledger/pin.py): the genesis hash of its first
contact and the highest entry it verified. An SN whose ledger has another genesis, is shorter than
that entry, or holds another entry there is refused, and so is the ledger from then on.

Start-up from a snapshot (the default; --full-replay folds from entry 0 instead). The follower asks
the SN for the snapshot of its latest checkpoint (the state folded through entry k, and checkpoint
entry k+1 naming its SHA-256) and uses it only if (snapshot.accept_snapshot): the checkpoint entry is
intact and canonical, its state_hash is the SHA-256 of the bytes received, it is signed by an SN
certificate that a CA of this node's own --capath issued, and the state ends at entry k with the hash
the checkpoint links to; the checkpoint is then folded like any entry, and every entry after it is
verified as from genesis. With a pin, the snapshot must hold the pinned swarm's genesis, and a pinned
entry at or before k must be an ancestor of the snapshot: the entries from it to k are read and their
hashes and links checked (not their signatures nor their meaning).

What that trusts, compared with folding from genesis: from genesis, every entry's signature and
every transaction's legality is checked here, so no SN can make this node believe a state the
entries' signers did not produce. From a snapshot, entries 0..k are not checked here at all: the
state at k is believed because one SN certificate of the swarm's CAs signed its hash. A holder of
any SN key (a compromised or buggy SN) could thus hand this node a fabricated state at k (a node
registered that never was, a round merged with another hash); it cannot forge anything after k, nor
rewrite history this node pinned. SNs check every checkpoint against their own fold, so a bad one
appears only if an SN key signs it. --full-replay removes that trust: it folds from genesis and
checks every checkpoint's hash against its own state, refusing the ledger at the first mismatch.
Any failure to get or accept a snapshot (an SN without one yet, an older SN, a bad one) makes the
follower fold from genesis, with one log line.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import grpc

from swarmlearn.background import Background
from swarmlearn.errors import LedgerError, SwarmError
from swarmlearn.ledger.chain import ChainBroken, ChainVerifier
from swarmlearn.ledger.entry import sha256_hex
from swarmlearn.ledger.pin import Pin, PinFile, sn_refused
from swarmlearn.ledger.snapshot import MAX_SNAPSHOT_BYTES, Snapshot, SnapshotError, accept_snapshot
from swarmlearn.ledger.state import LedgerState
from swarmlearn.ledger.store import StoredEntry
from swarmlearn.sn.client import SNClient

log = logging.getLogger("swarmlearn.sl")
T = TypeVar("T")

# Whether followers made without saying otherwise fold from genesis: set once per process by the
# --full-replay of `swarm sl`, `swarm swop`, `swarm swci` and `swarm ui` (replay_from_genesis).
_FULL_REPLAY = False


def replay_from_genesis(enabled: bool = True) -> None:
    """Makes this process's followers fold the ledger from entry 0 and check every checkpoint on the way,
    instead of starting from the SN's snapshot (the --full-replay flag)."""
    global _FULL_REPLAY
    _FULL_REPLAY = enabled


def full_replay_default() -> bool:
    return _FULL_REPLAY


class LedgerFollower:
    """pin_file: where the swarm's genesis and the highest verified entry are kept across restarts
    (SL: DATA_DIR/ledger-pin.json, SWOP: WORKSPACE/ledger-pin.json); without one the pin lives only
    as long as this object. A lost ledger (the SN stayed away past its patience) or a refused one
    (any LedgerError: a broken chain, a bad signature, a rollback) is kept in `error`, raised to every
    waiter and returned by failure(), which the component's command watches to stop and exit non-zero.
    Its threads (following the stream; writing the pin) belong to `background`, the component's owner
    of threads (without one, the follower owns its own); stop() ends the follower and writes the pin.
    full_replay: fold from entry 0 checking every checkpoint (default: the process's --full-replay)
    rather than start from the SN's snapshot (see the module's notes for what each trusts)."""

    def __init__(self, sn: SNClient, pin_file: Path | None = None, background: Background | None = None,
                 full_replay: bool | None = None):
        self.sn = sn
        self.full_replay = _FULL_REPLAY if full_replay is None else full_replay
        self.verifier = ChainVerifier(check_checkpoints=self.full_replay)
        self.started_from: int | None = None  # the snapshot's index, once started from one
        self.changed = threading.Condition()
        self.error: Exception | None = None
        self.pin = PinFile(pin_file) if pin_file is not None else None
        self._pinned: Pin | None = None
        self._stop = threading.Event()
        self._owns_background = background is None
        self._background = background or Background("follower")
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> LedgerState:
        return self.verifier.state

    def start(self) -> None:
        if self.pin is not None:
            self.pin.start(self._background)
        self._thread = self._background.start("ledger-follower", self._follow)

    def stop(self) -> None:
        self._stop.set()
        with self.changed:
            self.changed.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self._owns_background:
            self._background.close()
        if self.pin is not None:
            self.pin.flush()

    def _follow(self) -> None:
        try:
            if self.pin is not None:
                self._pinned = self.pin.load()
            if self._pinned is not None:
                self.sn.expect_ledger(self._pinned.genesis_hash)
            start = 0 if self.full_replay else self._start_from_snapshot()
            for rows in self._batches(start):
                self._fold(rows)
        except SwarmError as exc:
            if isinstance(exc, LedgerError):
                log.error("refusing the ledger of SN %s: %s", self.sn.address, exc)
            else:
                log.error("lost the ledger: %s", exc)
            with self.changed:
                self.error = exc
                self.changed.notify_all()

    def _batches(self, start: int) -> Iterator[list[StoredEntry]]:
        """The SN's entries from `start` on, in the lists its Watch sends (a stand-in for the SN client,
        a test's, that only has watch(): one entry per list)."""
        if isinstance(self.sn, SNClient):
            return self.sn.watch_batches(start, self._stop, raw=True, on_connect=self._check_length,
                                         background=self._background)
        return ([row] for row in self.sn.watch(start, self._stop, raw=True, on_connect=self._check_length,
                                               background=self._background))

    def _fold(self, rows: list[StoredEntry]) -> None:
        """Verifies and folds a batch the SN sent, under one hold of the lock, and wakes the waiters
        once for all of it (every waiter re-reads the state when woken: once per entry of a burst
        of 32 check-ins was most of a follower's work). Entries folded before a refused one stay
        folded, and their waiters are woken, before the refusal is raised."""
        for row in rows:
            self._check_pin(row)
        folded = None
        try:
            with self.changed:
                try:
                    for row in rows:
                        self.verifier.verify_next(row)
                        folded = row
                finally:
                    self.changed.notify_all()
        finally:
            if folded is not None:
                self._advance_pin(folded)

    # ------------------------------------------------------------------------------ the snapshot

    def _start_from_snapshot(self) -> int:
        """Folds the SN's snapshot and its checkpoint if they hold up; returns the index to follow the
        ledger from (0 when there is none to use, or it did not hold up). A stand-in for the SN client
        (a test's) serves no snapshot."""
        if not isinstance(self.sn, SNClient):
            return 0
        try:
            snap = fetch_snapshot(self.sn)
        except SnapshotError as exc:
            log.warning("folding the ledger from entry 0: the snapshot of SN %s is refused: %s", self.sn.address, exc)
            return 0
        if snap is None:
            return 0
        try:
            state, certs = accept_snapshot(snap, self.sn.identity.cas, LedgerState)
            self._check_snapshot_pin(state, snap)
        except SnapshotError as exc:
            log.warning("folding the ledger from entry 0: the snapshot of SN %s is refused: %s", self.sn.address, exc)
            return 0
        with self.changed:
            self.verifier.start_from(state, certs)
            try:
                self.verifier.verify_next(snap.checkpoint)
            except ChainBroken as exc:
                log.warning("folding the ledger from entry 0: the checkpoint of SN %s does not fold onto its "
                            "snapshot: %s", self.sn.address, exc)
                self.verifier = ChainVerifier()
                return 0
            self.started_from = snap.index
            self.changed.notify_all()
        self._check_pin(snap.checkpoint)
        self._advance_pin(snap.checkpoint)
        log.info("started from the snapshot of entry %d (checkpoint %s by %s)", snap.index,
                 snap.state_hash[:12], snap.checkpoint.entry().tx.signer.node)
        return snap.checkpoint.index + 1

    def _check_snapshot_pin(self, state: LedgerState, snap: Snapshot) -> None:
        """A snapshot of another swarm, or of a history that does not hold the pinned entry, is refused
        as the SN serving it would be (sn_refused); an entry pinned after the checkpoint is checked
        in the tail, as it arrives."""
        pinned = self._pinned
        if pinned is None:
            return
        if state.genesis_hash != pinned.genesis_hash:
            raise sn_refused("genesis", self.sn.address, pinned, self._pin_path, served=state.genesis_hash or "")
        if pinned.head_index <= snap.index:
            last = self._walk_links(pinned.head_index, snap.index)
            if last != state.head_hash:
                raise sn_refused("differs", self.sn.address, pinned, self._pin_path, served=last or "")

    def _walk_links(self, first: int, last: int) -> str | None:
        """Reads entries `first`..`last` and checks each one's hash and its link to the one before, and
        the first against the pin; returns the hash of `last` (hashes only: cheap, and enough to show
        that the pinned entry is an ancestor of the snapshot's head)."""
        previous = None
        stop = threading.Event()
        for row in self.sn.watch(first, stop, raw=True, background=self._background):
            if sha256_hex(row.body) != row.hash:
                raise SnapshotError(f"entry {row.index}: its bytes do not match its hash")
            if row.index == first and row.hash != self._pinned.head_hash:
                raise sn_refused("differs", self.sn.address, self._pinned, self._pin_path, served=row.hash)
            if previous is not None and _prev_hash(row) != previous:
                raise SnapshotError(f"entry {row.index} does not link to entry {row.index - 1}")
            previous = row.hash
            if row.index >= last:
                stop.set()
                break
        return previous

    def failure(self, timeout: float) -> Exception | None:
        """Waits up to `timeout` seconds for the ledger to be lost or refused; returns why, or None while
        all is well (at once once stopped)."""
        with self.changed:
            if self.error is None and not self._stop.is_set():
                self.changed.wait(timeout)
            return self.error

    # ------------------------------------------------------------------------------ the pin
    # The pin is advanced on every entry but written at most once a second (PinFile) and at stop():
    # one small file replaced off the round's path, never an fsync per entry.

    def _check_length(self, sn_head: int) -> None:
        """On every (re)connection: the SN's ledger must reach the highest entry this node verified,
        in this run or, per its pin, before (the pin never falls behind this run's head)."""
        if self._pinned is not None and sn_head < self._pinned.head_index:
            raise sn_refused("shorter", self.sn.address, self._pinned, self._pin_path, sn_head=sn_head)

    def _check_pin(self, row: StoredEntry) -> None:
        pinned = self._pinned
        if pinned is not None and row.index == 0 and row.hash != pinned.genesis_hash:
            raise sn_refused("genesis", self.sn.address, pinned, self._pin_path, served=row.hash)
        if pinned is not None and row.index == pinned.head_index and row.hash != pinned.head_hash:
            raise sn_refused("differs", self.sn.address, pinned, self._pin_path, served=row.hash)

    @property
    def _pin_path(self) -> Path | None:
        return self.pin.path if self.pin is not None else None

    def _advance_pin(self, row: StoredEntry) -> None:
        if self._pinned is None:  # first contact: the swarm is the one whose genesis this is
            self._pinned = Pin(self.state.genesis_hash, row.index, row.hash,
                               str((self.state.genesis or {}).get("swarm_id", "")))
        elif row.index > self._pinned.head_index:
            self._pinned = replace(self._pinned, head_index=row.index, head_hash=row.hash)
        else:
            return
        if self.pin is not None:
            self.pin.advance(self._pinned)

    def wait_until(self, predicate: Callable[[LedgerState], T], timeout: float) -> T | None:
        """Returns the first truthy value of predicate(state), re-evaluated after every ledger
        entry, or None after `timeout` seconds. Raises the follower's error if the ledger is lost."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                if self.error is not None:
                    raise self.error
                if self._stop.is_set():
                    # Waiters must end with the SL: returning "not yet" would have them poll forever.
                    raise SwarmError("this SL is stopping")
                value = predicate(self.state)
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.changed.wait(remaining)

    def wait_index(self, index: int, timeout: float = 30.0) -> None:
        """Waits until our copy includes entry `index` (e.g. one we just submitted)."""
        if not self.wait_until(lambda s: s.head_index >= index, timeout):
            raise SwarmError(f"ledger entry {index} did not reach this SL within {timeout:.0f} s")

    def read(self, fn: Callable[[LedgerState], T]) -> T:
        with self.changed:
            return fn(self.state)



def _prev_hash(row: StoredEntry) -> str | None:
    try:
        found = json.loads(row.body).get("prev_hash")
    except (ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None


def fetch_snapshot(sn: SNClient) -> Snapshot | None:
    """The snapshot of the SN's latest checkpoint, or None when it has none (NOT_FOUND), serves none (an
    SN from before snapshots) or cannot send it (then the follower folds from entry 0 anyway). Raises
    SnapshotError for a reply that is not a snapshot (chunks out of shape, or over MAX_SNAPSHOT_BYTES)."""
    try:
        chunks = iter(sn.snapshot())
        first = next(chunks, None)
        if first is None or not first.HasField("checkpoint"):
            raise SnapshotError("the first chunk carries no checkpoint")
        if first.size > MAX_SNAPSHOT_BYTES:
            raise SnapshotError(f"it is {first.size} bytes, more than the {MAX_SNAPSHOT_BYTES} a follower takes")
        parts, received = [first.data], len(first.data)
        for chunk in chunks:
            received += len(chunk.data)
            if received > first.size:
                raise SnapshotError(f"it sends more than the {first.size} bytes it announced")
            parts.append(chunk.data)
    except grpc.RpcError as exc:
        level = logging.DEBUG if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED) else logging.INFO
        log.log(level, "folding the ledger from entry 0: no snapshot from SN %s (%s: %s)", sn.address,
                exc.code().name, (exc.details() or "").splitlines()[0] if exc.details() else "")
        return None
    except SwarmError as exc:
        log.info("folding the ledger from entry 0: no snapshot from SN %s (%s)", sn.address, exc)
        return None
    if received != first.size:
        raise SnapshotError(f"it sent {received} of the {first.size} bytes it announced")
    row = first.checkpoint
    data = b"".join(parts)
    return Snapshot(first.index, data, sha256_hex(data), StoredEntry(row.index, row.hash, bytes(row.body)))
