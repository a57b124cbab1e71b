"""An SL's own copy of the ledger state, kept current by following the SN's entry stream.

The state machine is pure, so folding the same entries gives every SL the state the SN has. Round
logic waits on this copy ("until round 7 is closed") instead of polling the SN.

Nothing the SN sends is trusted: every entry goes through the ChainVerifier the SN itself uses (hash,
link, signature, state machine), and the follower pins the swarm (ledger/pin.py): the genesis hash
of its first contact and the highest entry it verified. An SN whose ledger has another genesis, is
shorter than that entry, or holds another entry there is refused, and so is the ledger from then on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from swarmlearn.background import Background
from swarmlearn.errors import LedgerError, SwarmError
from swarmlearn.ledger.chain import ChainVerifier
from swarmlearn.ledger.pin import Pin, PinFile, sn_refused
from swarmlearn.ledger.state import LedgerState
from swarmlearn.ledger.store import StoredEntry
from swarmlearn.sn.client import SNClient

log = logging.getLogger("swarmlearn.sl")
T = TypeVar("T")


class LedgerFollower:
    """pin_file: where the swarm's genesis and the highest verified entry are kept across restarts
    (SL: DATA_DIR/ledger-pin.json, SWOP: WORKSPACE/ledger-pin.json); without one the pin lives only
    as long as this object. A lost ledger (the SN stayed away past its patience) or a refused one
    (any LedgerError: a broken chain, a bad signature, a rollback) is kept in `error`, raised to every
    waiter and returned by failure(), which the component's command watches to stop and exit non-zero.
    Its threads (following the stream; writing the pin) belong to `background`, the component's owner
    of threads (without one, the follower owns its own); stop() ends the follower and writes the pin."""

    def __init__(self, sn: SNClient, pin_file: Path | None = None, background: Background | None = None):
        self.sn = sn
        self.verifier = ChainVerifier()
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
            for row in self.sn.watch(0, self._stop, raw=True, on_connect=self._check_length,
                                     background=self._background):
                self._check_pin(row)
                with self.changed:
                    self.verifier.verify_next(row)
                    self.changed.notify_all()
                self._advance_pin(row)
        except SwarmError as exc:
            if isinstance(exc, LedgerError):
                log.error("refusing the ledger of SN %s: %s", self.sn.address, exc)
            else:
                log.error("lost the ledger: %s", exc)
            with self.changed:
                self.error = exc
                self.changed.notify_all()

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
            self._pinned = Pin(row.hash, row.index, row.hash, str((self.state.genesis or {}).get("swarm_id", "")))
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

