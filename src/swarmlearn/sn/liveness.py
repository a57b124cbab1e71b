"""Who the swarm last heard from, and when: what Query's `last_seen` reports (SWCI's silent-SWOP
check, the leader's eviction of silent peers, the dashboard).

An SN hears from a node when the node heartbeats or submits through it. With one SN that is all
there is (MemoryLiveness). Several SNs in front of one replicated ledger must agree, or a node that
heartbeats to SN 2 looks dead to SN 1: EtcdLiveness keeps one key per node in the etcd cluster,
<prefix>/alive/<node> = the wall-clock time it was last heard, and every SN reads them all.

Bounds on what a caller influences: the SN calls `seen` only for a node registered on the ledger
with the caller's certificate (so one key per registered node, never a name the caller makes up),
after the call passed the SN's rate limits; EtcdLiveness writes what it heard at most once every
FLUSH_EVERY seconds in one transaction, so an SN's writes do not grow with its callers' call rate.

The keys are attached to a lease of the SN that wrote them, renewed while that SN runs: a node heard
last through an SN that is gone disappears a few seconds (LEASE_TTL) later, which readers treat as
"not heard from since the SN started", as they do after an SN restart today. Times are wall-clock
seconds, compared across SNs: the hosts' clocks must agree to within a second or so (NTP).
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod

from swarmlearn.background import Background
from swarmlearn.errors import LedgerError

log = logging.getLogger("swarmlearn.sn")

ALIVE_FOLDER = "alive"
# How long the cluster keeps an SN's keys after it last renewed their lease: an SN renews every
# LEASE_TTL / 3 seconds, so it rides out a leader election without its keys vanishing.
LEASE_TTL = 6
# How often an SN writes what it heard since the last write.
FLUSH_EVERY = 0.25
# How long one read of every node's key serves Query before the next read.
CACHE_FOR = 0.5
# How long a read may wait for the cluster: Query answers with the last read rather than hang.
READ_PATIENCE = 1.0


class Liveness(ABC):
    """When each node was last heard from, as one SN's callers see it."""

    @abstractmethod
    def seen(self, node: str) -> None:
        """Records that `node` (a registered node, authenticated by its certificate) was heard now."""

    @abstractmethod
    def seen_ago(self) -> dict[str, float]:
        """Seconds since each node was last heard from, rounded to milliseconds."""

    def start(self, background: Background) -> None:
        """Starts what keeps the record (if anything) in a thread of `background`."""


class MemoryLiveness(Liveness):
    """This SN's own memory: what it heard itself, since it started."""

    def __init__(self) -> None:
        # Written by every handler thread that hears from a node, read by Query: only under the lock.
        self._last_seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def seen(self, node: str) -> None:
        with self._lock:
            self._last_seen[node] = time.monotonic()

    def seen_ago(self) -> dict[str, float]:
        with self._lock:
            seen = dict(self._last_seen)
        now = time.monotonic()
        return {n: round(now - t, 3) for n, t in seen.items()}


class EtcdLiveness(Liveness):
    """Liveness shared by every SN of one etcd ledger (see the module's notes). `store` is the SN's
    EtcdStore; its writer thread starts with `start`."""

    def __init__(self, store, lease_ttl: int = LEASE_TTL, flush_every: float = FLUSH_EVERY,
                 cache_for: float = CACHE_FOR):
        self.store = store
        self.lease_ttl = lease_ttl
        self.flush_every = flush_every
        self.cache_for = cache_for
        self._lock = threading.Lock()
        self._heard: dict[str, float] = {}  # node -> when this SN last heard it (wall clock)
        self._unwritten: dict[str, float] = {}  # the part of _heard not yet in the cluster
        self._reading = threading.Lock()
        self._cache: tuple[float, dict[str, float]] = (float("-inf"), {})  # (monotonic read time, node -> time)

    def seen(self, node: str) -> None:
        now = time.time()
        with self._lock:
            self._heard[node] = now
            self._unwritten[node] = now

    def seen_ago(self) -> dict[str, float]:
        times = dict(self._read_cached())
        with self._lock:
            for node, heard in self._heard.items():  # what this SN heard and has not written yet
                times[node] = max(heard, times.get(node, heard))
        now = time.time()
        return {n: round(max(0.0, now - t), 3) for n, t in times.items()}

    def _read_cached(self) -> dict[str, float]:
        with self._reading:  # concurrent Queries share one read
            read_at, times = self._cache
            if time.monotonic() - read_at < self.cache_for:
                return times
            try:
                raw = self.store.read_folder(ALIVE_FOLDER, patience=READ_PATIENCE)
            except LedgerError as exc:
                log.debug("liveness: cannot read the cluster (%s); serving the last read", exc)
                return times
            times = {}
            for node, value in raw.items():
                try:
                    times[node] = float(value)
                except ValueError:
                    log.warning("liveness: key %s/%s/%s holds %r, not a time; ignored", self.store.prefix,
                                ALIVE_FOLDER, node, value[:40])
            self._cache = (time.monotonic(), times)
            return times

    def start(self, background: Background) -> None:
        background.start("liveness", self._keep, background.stopping)

    def _keep(self, stopping: threading.Event) -> None:
        """Writes what this SN heard every flush_every seconds and renews the keys' lease, until stop."""
        lease: int | None = None
        renew_at = 0.0
        failing = False
        while not stopping.wait(self.flush_every):
            try:
                now = time.monotonic()
                if lease is None or now >= renew_at:
                    if lease is None or not self.store.keep_lease_alive(lease):
                        lease = self._new_lease()
                    renew_at = now + self.lease_ttl / 3
                self._flush(lease)
                if failing:
                    log.info("liveness: the etcd cluster takes this SN's heartbeats again")
                failing = False
            except LedgerError as exc:
                if not failing:
                    log.warning("liveness: cannot write heartbeats to the etcd cluster: %s; trying again", exc)
                failing = True
                lease = None  # the cluster may have let it expire meanwhile: start afresh when it answers

    def _new_lease(self) -> int:
        """A fresh lease; every node this SN heard is written again under it (an expired lease took
        their keys with it)."""
        lease = self.store.grant_lease(self.lease_ttl)
        with self._lock:
            self._unwritten.update(self._heard)
        return lease

    def _flush(self, lease: int) -> None:
        with self._lock:
            batch, self._unwritten = self._unwritten, {}
        if not batch:
            return
        try:
            self.store.put_leased(ALIVE_FOLDER, {n: f"{t:.3f}".encode() for n, t in batch.items()}, lease)
        except BaseException:
            with self._lock:  # written next time, unless heard again meanwhile (newer then)
                for node, heard in batch.items():
                    self._unwritten.setdefault(node, heard)
            raise
