"""An SL's own copy of the ledger state, kept current by following the SN's entry stream.

The state machine is pure, so folding the same entries gives every SL the state the SN has. Round
logic waits on this copy ("until round 7 is closed") instead of polling the SN.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from swarmlearn.errors import SwarmError
from swarmlearn.ledger.state import LedgerState
from swarmlearn.sn.client import SNClient

log = logging.getLogger("swarmlearn.sl")
T = TypeVar("T")


class LedgerFollower:
    def __init__(self, sn: SNClient):
        self.sn = sn
        self.state = LedgerState()
        self.changed = threading.Condition()
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="ledger-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self.changed:
            self.changed.notify_all()
        self._thread.join(timeout=5)

    def _follow(self) -> None:
        try:
            for entry in self.sn.watch(0, self._stop):
                with self.changed:
                    self.state.apply(entry)
                    self.changed.notify_all()
        except SwarmError as exc:
            log.error("lost the ledger: %s", exc)
            with self.changed:
                self.error = exc
                self.changed.notify_all()

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
