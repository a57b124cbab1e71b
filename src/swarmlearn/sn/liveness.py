"""Who the swarm last heard from, and when: what Query's `last_seen` reports (SWCI's silent-SWOP
check, the leader's eviction of silent peers, the dashboard).

An SN hears from a node when the node heartbeats or submits through it. With one SN that is all
there is (MemoryLiveness). Several SNs in front of one replicated ledger must agree, or a node that
heartbeats to SN 2 looks dead to SN 1: EtcdLiveness keeps, in the etcd cluster, one key per node per
SN, <prefix>/alive/<node>/<sn> = the wall-clock time that SN last heard the node, and every SN reads
them all and takes the newest time of each node.

The keys carry no lease: a node whose host dies together with the SN it talked to must go on looking
silent for longer and longer (and be evicted, or flagged by SWCI), not vanish from the record as if
never heard of. They are bounded without one: an SN writes only for nodes registered on the ledger
with the caller's certificate, so there are at most (registered nodes) x (SNs) keys; a cleanly
stopped SN removes its own. An SN writes only times newer than it wrote before, and a restarted SN
starts with nothing to write, so a retry never sets a node's time back.

Reading, an SN keeps only registered node names and SN names, ignores times more than CLOCK_SKEW
ahead of its own clock (a time in the future would make a node look alive forever), and reads at
most a bounded number of keys. Writes happen at most once every FLUSH_EVERY seconds, in one
transaction, so an SN's writes do not grow with its callers' call rate (the SN calls `seen` only
after the call passed its rate limits). Times are wall-clock seconds compared across SNs: the
hosts' clocks must agree to within a second or so (NTP).
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

from swarmlearn.background import Background
from swarmlearn.errors import LedgerError

log = logging.getLogger("swarmlearn.sn")

ALIVE_FOLDER = "alive"
# How often an SN writes what it heard since the last write.
FLUSH_EVERY = 0.25
# How long one read of every node's keys (or one failed read) serves Query before the next read.
CACHE_FOR = 0.5
# How long a read may wait for the cluster: Query answers with the last read rather than hang.
READ_PATIENCE = 1.0
# How far ahead of this SN's clock a time may be and still count (hosts' clocks differ a little).
CLOCK_SKEW = 5.0
# A read takes at most this many keys per (registered node x SN): room for keys of names no longer
# registered, which readers skip but still read.
READ_SLACK = 2
READ_MIN_KEYS = 64
# How long a clean stop may wait for the cluster to take this SN's keys off.
FORGET_PATIENCE = 1.0
SN_ROLE = "SN"


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
    EtcdStore, `sn` this SN's node id, `registered()` the ledger's registered nodes (name -> Node);
    its writer thread starts with `start`."""

    def __init__(self, store, sn: str, registered: Callable[[], Mapping], flush_every: float = FLUSH_EVERY,
                 cache_for: float = CACHE_FOR):
        self.store = store
        self.sn = sn
        self.registered = registered
        self.flush_every = flush_every
        self.cache_for = cache_for
        self._lock = threading.Lock()
        self._heard: dict[str, float] = {}  # node -> when this SN last heard it (wall clock)
        self._written: dict[str, float] = {}  # node -> the time this SN last wrote for it
        self._reading = threading.Lock()
        self._cache: tuple[float, dict[str, float]] = (float("-inf"), {})  # (monotonic read time, node -> time)
        self._read_failing = False
        self._read_cut = False

    def seen(self, node: str) -> None:
        now = time.time()
        with self._lock:
            # Never earlier than what was heard before, even if the wall clock steps back.
            self._heard[node] = max(now, self._heard.get(node, now))

    def seen_ago(self) -> dict[str, float]:
        times = dict(self._read_cached())
        with self._lock:
            for node, heard in self._heard.items():  # what this SN heard and may not have written yet
                times[node] = max(heard, times.get(node, heard))
        now = time.time()
        return {n: round(max(0.0, now - t), 3) for n, t in times.items()}

    def _read_cached(self) -> dict[str, float]:
        with self._reading:  # concurrent Queries share one read
            read_at, times = self._cache
            if time.monotonic() - read_at < self.cache_for:
                return times
            nodes = dict(self.registered())  # a copy: the ledger's follower adds to it meanwhile
            try:
                raw, cut = self.store.read_folder(ALIVE_FOLDER, patience=READ_PATIENCE, limit=self._read_limit(nodes))
            except LedgerError as exc:
                if not self._read_failing:
                    log.warning("liveness: cannot read the etcd cluster (%s); serving the last read", exc)
                self._read_failing = True
                self._cache = (time.monotonic(), times)  # a failure serves too: queued Queries do not each wait
                return times
            if self._read_failing:
                log.info("liveness: reading the etcd cluster again")
            self._read_failing = False
            self._note_cut(cut, len(raw))
            times = self._newest_times(raw, nodes)
            self._cache = (time.monotonic(), times)
            return times

    @staticmethod
    def _read_limit(nodes: Mapping) -> int:
        sns = sum(1 for node in nodes.values() if getattr(node, "role", None) == SN_ROLE)
        return max(READ_MIN_KEYS, READ_SLACK * len(nodes) * max(1, sns))

    def _note_cut(self, cut: bool, read: int) -> None:
        if cut and not self._read_cut:
            log.warning("liveness: %s/%s holds more than the %d keys read (registered nodes x SNs x %d); the rest "
                        "are ignored: something other than this swarm's SNs writes there", self.store.prefix,
                        ALIVE_FOLDER, read, READ_SLACK)
        self._read_cut = cut

    def _newest_times(self, raw: dict[str, bytes], nodes: Mapping) -> dict[str, float]:
        """Each registered node's newest time over the registered SNs' keys, times from the future ignored."""
        latest = time.time() + CLOCK_SKEW
        times: dict[str, float] = {}
        for name, value in raw.items():
            node, _, sn = name.partition("/")
            if node not in nodes or getattr(nodes.get(sn), "role", None) != SN_ROLE:
                continue
            try:
                heard = float(value)
            except ValueError:
                log.warning("liveness: key %s/%s/%s holds %r, not a time; ignored", self.store.prefix,
                            ALIVE_FOLDER, name, value[:40])
                continue
            if heard <= latest and heard > times.get(node, float("-inf")):
                times[node] = heard
        return times

    def start(self, background: Background) -> None:
        background.start("liveness", self._keep, background.stopping)

    def _keep(self, stopping: threading.Event) -> None:
        """Writes what this SN heard every flush_every seconds until stop; then takes its keys off."""
        failing = False
        while not stopping.wait(self.flush_every):
            try:
                self._flush()
                if failing:
                    log.info("liveness: the etcd cluster takes this SN's heartbeats again")
                failing = False
            except LedgerError as exc:
                if not failing:
                    log.warning("liveness: cannot write heartbeats to the etcd cluster: %s; trying again", exc)
                failing = True
        self._forget_own_keys()

    def _flush(self) -> None:
        """Writes, for each node heard since the last write, the newest time heard (never an older one)."""
        with self._lock:
            batch = {node: heard for node, heard in self._heard.items() if heard > self._written.get(node, 0.0)}
        if not batch:
            return
        self.store.put_values(ALIVE_FOLDER, {f"{node}/{self.sn}": f"{heard:.3f}".encode()
                                             for node, heard in batch.items()})
        with self._lock:
            for node, heard in batch.items():
                self._written[node] = max(heard, self._written.get(node, 0.0))

    def _forget_own_keys(self) -> None:
        """On a clean stop: the keys this SN wrote (in this run or an earlier one) leave the cluster,
        so that keys do not pile up with SNs that come and go."""
        try:
            raw, _ = self.store.read_folder(ALIVE_FOLDER, patience=FORGET_PATIENCE,
                                            limit=self._read_limit(dict(self.registered())))
            own = {name: value for name, value in raw.items() if name.partition("/")[2] == self.sn}
            if own:
                self.store.expire_values(ALIVE_FOLDER, own, patience=FORGET_PATIENCE)
        except LedgerError as exc:
            log.warning("liveness: could not take this SN's heartbeat keys off the etcd cluster (%s); they stay "
                        "until this SN stops cleanly again", exc)
