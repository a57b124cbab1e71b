"""Feeds a SwarmView from the SN(s): one Watch stream of the whole ledger (the client moves to the
next SN when one stops answering), one small liveness query a second, and a chain verification of
the entries received, at most once every VERIFY_EVERY seconds and cached in the view, so that no
reader of the dashboard can make it (or an SN) walk the chain on demand.

The liveness query answers for every node that heartbeats or submits, as heard by any SN of a shared
ledger. SNs do neither (they share the ledger through its store), so the dashboard asks each SN
registered on the ledger for its small "info" itself, once a second, and shows how long ago each
last answered as that SN's heartbeat: with several SNs, every one of them shows as up or gone."""

from __future__ import annotations

import logging
import threading
import time

from swarmlearn.background import Background
from swarmlearn.errors import Rejected, SwarmError
from swarmlearn.ledger.chain import ChainBroken, ChainVerifier
from swarmlearn.sn.client import SNClient
from swarmlearn.sn.follower import full_replay_default
from swarmlearn.ui.view import SwarmView, Verification, trim_state

log = logging.getLogger("swarmlearn.ui")

VERIFY_EVERY = 60.0
# The first verification waits this long after start, so that it covers the catch-up of a long ledger.
FIRST_VERIFY_AFTER = 2.0
LIVENESS_EVERY = 1.0
# How long one SN's probe retries an SN that does not answer before it counts as a missed answer.
SN_PROBE_PATIENCE = 1.0
# SNs probed at most (one thread each): a swarm has a handful.
MAX_SN_PROBES = 16


class LedgerFollower:
    """Starts its threads in `background`; they end when the background closes."""

    def __init__(self, client: SNClient, view: SwarmView, background: Background,
                 verify_every: float = VERIFY_EVERY):
        self.client = client
        self.view = view
        self.background = background
        self.verify_every = verify_every
        # --full-replay: the dashboard's verification checks every checkpoint's state hash too (and keeps
        # the whole state for that, as an SL does).
        self._verifier = ChainVerifier(check_checkpoints=full_replay_default())
        # SN -> monotonic time it last answered the dashboard; written by its probe, read by _liveness.
        self._sn_answered: dict[str, float] = {}
        self._probed: set[str] = set()

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
            self._probe_new_sns()
            try:
                reply = self.client.query("info")
            except SwarmError as exc:
                self.view.trouble(f"no SN answers: {exc}")
                continue
            last_seen = dict(reply.get("last_seen") or {})
            now = time.monotonic()
            for sn, answered in list(self._sn_answered.items()):
                last_seen[sn] = min(round(now - answered, 3), last_seen.get(sn, float("inf")))
            self.view.heard(last_seen, self.client.address)

    def _probe_new_sns(self) -> None:
        with self.view.read():
            sns = {n.node_id: n.address for n in self.view.state.nodes.values() if n.role == "SN" and n.address}
        for sn, address in sorted(sns.items()):
            if sn not in self._probed and len(self._probed) < MAX_SN_PROBES:
                self._probed.add(sn)
                self.background.start(f"probe-{sn}", self._probe, sn, address)

    def _probe(self, sn: str, address: str) -> None:
        """Asks SN `sn` at `address` (as registered on the ledger) for its info every LIVENESS_EVERY
        seconds, noting each answer, until the background stops."""
        stop = self.background.stopping
        try:
            client = SNClient(address, self.client.identity, unreachable_timeout=SN_PROBE_PATIENCE)
        except SwarmError as exc:
            log.warning("cannot ask SN %s at %s whether it is up: %s", sn, address, exc)
            return
        try:
            while True:
                try:
                    client.query("info")
                    self._sn_answered[sn] = time.monotonic()
                except SwarmError as exc:
                    log.debug("SN %s at %s did not answer: %s", sn, address, exc)
                if stop.wait(LIVENESS_EVERY):
                    return
        finally:
            client.close()

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
                if not self._verifier.check_checkpoints:  # a trimmed state would fail the checkpoints' hashes
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
