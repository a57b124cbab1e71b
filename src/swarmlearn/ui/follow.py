"""Feeds a SwarmView from the SN(s): one Watch stream of the whole ledger (the client moves to the
next SN when one stops answering), one small liveness query a second, and a chain verification of
the entries received, at most once every VERIFY_EVERY seconds and cached in the view, so that no
reader of the dashboard can make it (or an SN) walk the chain on demand."""

from __future__ import annotations

import logging
import threading
import time

from swarmlearn.background import Background
from swarmlearn.errors import Rejected, SwarmError
from swarmlearn.ledger.chain import ChainBroken, ChainVerifier
from swarmlearn.sn.client import SNClient
from swarmlearn.ui.view import SwarmView, Verification, trim_state

log = logging.getLogger("swarmlearn.ui")

VERIFY_EVERY = 60.0
# The first verification waits this long after start, so that it covers the catch-up of a long ledger.
FIRST_VERIFY_AFTER = 2.0
LIVENESS_EVERY = 1.0


class LedgerFollower:
    """Starts its threads in `background`; they end when the background closes."""

    def __init__(self, client: SNClient, view: SwarmView, background: Background,
                 verify_every: float = VERIFY_EVERY):
        self.client = client
        self.view = view
        self.background = background
        self.verify_every = verify_every
        self._verifier = ChainVerifier()

    def start(self) -> None:
        self.background.start("watch", self._watch)
        self.background.start("liveness", self._liveness)
        self.background.start("verify", self._verify_periodically)

    def _watch(self) -> None:
        stop = self.background.stopping
        while not stop.is_set():
            try:
                for row in self.client.watch(0 if self.view.state.head_index < 0 else self.view.state.head_index + 1,
                                             stop, raw=True, background=self.background):
                    self.view.receive(row, row.entry())
                return
            except Rejected as exc:
                self.view.trouble(f"stopped following the ledger: an entry was refused ({exc}); restart swarm ui")
                log.error("stopped following the ledger: %s", exc)
                return
            except SwarmError as exc:
                self.view.trouble(f"cannot follow the ledger: {exc}")
                log.warning("cannot follow the ledger (%s); trying again", exc)
                stop.wait(2.0)

    def _liveness(self) -> None:
        stop = self.background.stopping
        while not stop.wait(LIVENESS_EVERY):
            try:
                reply = self.client.query("info")
            except SwarmError as exc:
                self.view.trouble(f"no SN answers: {exc}")
                continue
            self.view.heard(reply.get("last_seen") or {}, self.client.address)

    def _verify_periodically(self) -> None:
        stop = self.background.stopping
        if stop.wait(FIRST_VERIFY_AFTER):
            return
        while True:
            self.verify_received()
            if stop.wait(self.verify_every):
                return

    def verify_received(self) -> Verification:
        """Verifies the entries received since the last call, after the ones verified before: hashes,
        links, signatures and the state machine, as `swarm ledger verify` does on a store. Once an
        entry failed, the result stays that failure."""
        rows = self.view.take_unverified()
        if self.view.verification.ok is False:
            return self.view.verification
        started = time.monotonic()
        try:
            for row in rows:
                self._verifier.verify_next(row)
                trim_state(self._verifier.state)
        except ChainBroken as exc:
            result = Verification(False, exc.index, None, time.time(), f"entry {exc.index}: {exc.reason}")
            log.error("ledger verification failed at entry %d: %s", exc.index, exc.reason)
        else:
            state = self._verifier.state
            result = Verification(True, state.head_index + 1, state.head_hash, time.time())
            log.debug("verified %d new entries in %.2f s", len(rows), time.monotonic() - started)
        self.view.verified(result)
        return result


def start_following(addresses: list[str], identity, view: SwarmView, background: Background,
                    verify_every: float = VERIFY_EVERY) -> LedgerFollower:
    client = SNClient(addresses, identity)
    follower = LedgerFollower(client, view, background, verify_every)
    follower.start()
    return follower


def wait_for_first_entries(view: SwarmView, timeout: float, stop: threading.Event) -> bool:
    """Whether the view received the genesis within `timeout` (for a start-up line that says so)."""
    deadline = time.monotonic() + timeout
    while view.state.head_index < 0:
        if time.monotonic() > deadline or stop.wait(0.05):
            return False
    return True
