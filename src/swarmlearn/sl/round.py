"""One sync round as one SL lives it. Read top to bottom:

1. check in: keep our tensors, post their hash and weight on the ledger;
2. wait for the round to close: the check-in that completes the active members closes it; short of
   that, once `min_peers` are in, wait a bounded time for the rest, then one node closes it (one
   `close_round` wins) fixing participants and leader;
3. the leader pulls every participant's blob, checks it against the ledger hash, merges, posts the
   merged hash; a leader that posts nothing in time is replaced by the next in the ledger's order;
4. everyone pulls the merged blob (from the leader or any participant that has it), checks its hash
   and hands it back.

A node that was late for a round (closed without it) takes that round's merged model and contributes
from the next one. A node the others evicted while it was cut off joins again and, like a late
node, resumes from the latest merged model. Transport, storage and merging sit behind BlobStore, PeerFetcher and Merger.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Executor, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from swarmlearn import defaults, secagg
from swarmlearn.background import Background
from swarmlearn.errors import Rejected, SwarmError
from swarmlearn.ledger.model import Checkin, Contract, Round, RoundStatus, leader_order
from swarmlearn.ledger.state import LedgerState
from swarmlearn.lora import contract_seed
from swarmlearn.merge import get_merger
from swarmlearn.merge.base import (Accumulator, BadContribution, Contribution, Merger, check_contribution,
                                   contribution_norm, norm_outliers)
from swarmlearn.sl.secure import SECURE_PHASE_WAIT, SECURE_PHASES, Participation, SecureRounds, keys_digest
from swarmlearn.sl.transport import Arriving, BlobStore, FetchError, PeerFetcher
from swarmlearn.sn.client import SNClient
from swarmlearn.sn.follower import LedgerFollower
from swarmlearn.tensors import BlobError, Tensor, decode, encode

log = logging.getLogger("swarmlearn.sl")

# The node that will lead a round pulls its peers' blobs as their check-ins appear, up to this many
# bytes per round (each held until merged: the bound keeps a large model's leader at about two models);
# beyond it the leader fetches at merge time, a window at a time.
PREFETCH_BYTES = 64 << 20
# Threads per contract, in pools of the SL's Background reused round after round: blobs pulled
# ahead of the merge (PREFETCH_WORKERS), and blobs loaded (read or fetched, then decoded) while the
# merge runs (MERGE_WINDOW), each at most this many at once. One more thread watches the filling round
# for check-ins to prefetch. Prefetches are bounded in bytes (PREFETCH_BYTES), and a small blob across
# a WAN takes a few round trips whatever its size (TCP's slow start), so they all run at once: with 4,
# an 8-peer round's 0.3 MB contributions came in two waves (+100-200 ms at 50 ms RTT).
PREFETCH_WORKERS = 16
MERGE_WINDOW = 4
# ...and no more bytes than this loaded at once, the contribution being added included (one blob at
# least: none loads ahead of a blob over half of it), so that a leader of a large model holds about two
# models (the merge's sums and the contribution being added), not a window of them.
MERGE_WINDOW_BYTES = 64 << 20
# Each participant asks for a round's merged model from its parent in a tree rooted at the leader, in
# which every node serves at most MERGED_FANOUT others (32 peers: the leader serves 8, they the rest).
# An inner node forwards each chunk to its children as it arrives (cut-through), so a level of the tree
# costs about one chunk's transfer and a one-way delay, while a child more on one uplink costs a whole
# model's transfer: from CUT_THROUGH_BYTES on (a few chunks), a narrow tree (MERGED_FANOUT_LARGE) takes
# the merged model off the leader's uplink. Below it, a narrow tree would only add levels: a model of
# one chunk is forwarded whole anyway.
MERGED_FANOUT = 8
MERGED_FANOUT_LARGE = 2
CUT_THROUGH_BYTES = 4 * defaults.CHUNK
# What the ML hears when its call meets an SL that is stopping (its pools take no more work).
STOPPING = "this SL is stopping"

# How long a round may wait for its merged model, and how long its leader may wait for each peer's
# blob, are the swarm's defence against one peer holding everyone up, so nothing a peer declares
# stretches them beyond bounds:
# - Every participant (leader included) counts, for the time a leader may take, the bytes each peer
#   declares, but never more than `blob_limit` of its own blob (nor the contract's max_blob_bytes):
#   contributions must hold the same tensors as ours (the merge refuses other names, shapes or
#   dtypes), so only their safetensors header can differ in size. A peer declaring more (10^12
#   bytes, say) is not waited for at all: the leader drops it unfetched, by name, and one line says
#   so on every node.
# - The leader waits for each contribution once per round, until FETCH_SHARE of that leader timeout
#   has passed since the round closed (a prefetch under way is awaited, not repeated), so it posts
#   `merged`, without the peers it had to drop, before the others' patience runs out and they
#   re-elect it away. The rest of the timeout is left for the merge (about a tenth of the transfer
#   time at the rates assumed) and for posting it.
# - Within that, a transfer that sends nothing for `Timeouts.stall` seconds, or then runs below
#   `Timeouts.min_rate`, is cut off at once: a frozen peer costs the round seconds, not its whole budget.
FETCH_SHARE = 0.75


def merged_fanout(size: int) -> int:
    """How many peers each node of the merged model's tree serves, for a model of `size` bytes (our own
    blob's). Nodes need not agree: a parent serves whoever asks, and is always earlier in the round's
    order than its children, so no choice of fanouts makes a cycle."""
    return MERGED_FANOUT_LARGE if size >= CUT_THROUGH_BYTES else MERGED_FANOUT


def blob_limit(own: int, cap: int) -> int:
    """The most bytes a blob of a round may have when ours has `own`: twice ours plus 1 MiB for a
    header written differently, and never beyond `cap`, the contract's max_blob_bytes (all of it
    without a blob of our own)."""
    return min(cap, 2 * own + (1 << 20)) if own else cap


@dataclass
class Timeouts:
    # Once min_peers have checked in, how long to wait for the rest of the active peers.
    checkin_wait: float = defaults.CHECKIN_WAIT
    # A leader that posts no merged model within base + (bytes to move) / rate is replaced; a
    # peer's blob gets the same budget to arrive.
    leader_base: float = defaults.LEADER_BASE
    leader_bytes_per_second: float = defaults.LEADER_BYTES_PER_SECOND
    # A member whose SL has not been heard from for this long is not waited for.
    stale_after: float = defaults.STALE_AFTER
    # How often a waiting node says what it waits for.
    waiting_log_every: float = defaults.WAITING_LOG_EVERY
    # How long a node waits with fewer than min_peers checked in before it gives up and fails its
    # training with that reason; None waits for as long as it takes (saying so every waiting_log_every).
    min_peers_timeout: float | None = None
    # A node other than the designated one closes a round or re-elects only after this extra grace,
    # so that normally exactly one node writes each decision.
    grace: float = defaults.ELECTION_GRACE

    def transfer_budget(self, size: int) -> float:
        return self.leader_base + size / self.leader_bytes_per_second

    @property
    def min_rate(self) -> float:
        """A transfer that, after its first `stall` seconds, averages less than this many bytes per
        second is cut off (a peer trickling bytes must not hold a leader for its whole budget): a
        twentieth of the rate the budgets assume, 1 MB/s at the default, less on a slower swarm's."""
        return self.leader_bytes_per_second / 20

    @property
    def stall(self) -> float:
        """A transfer that sends nothing for this long is cut off (its peer dropped from the round)."""
        return max(1.0, self.leader_base / 2)


class MinPeersTimeout(SwarmError):
    """Fewer than min_peers checked in within the min-peers timeout."""


class OutOfSession(SwarmError):
    """We are no longer an active member of the session (and did not leave it): evicted."""


class MergedModelGone(SwarmError):
    """No peer serves a round's merged model (within the transfer budget)."""


@dataclass
class RoundResult:
    round: int
    hash: str
    blob: bytes
    participants: list[str]
    leader: str
    seconds: float
    contributed: bool
    swarm_finished: bool


class RoundEngine(SecureRounds):
    """One contract's rounds, as this SL lives them (a secure_mean round's extra phases: sl/secure.py).
    Its background work (prefetching, loading blobs for a merge) runs in pools of `background`, the SL's
    owner of threads, named after the contract so that an engine made again for the same contract (its
    ML restarted) reuses them."""

    def __init__(self, node_id: str, contract: str, sn: SNClient, follower: LedgerFollower, blobs: BlobStore,
                 fetcher: PeerFetcher, timeouts: Timeouts | None = None,
                 liveness: Callable[[], dict[str, float]] | None = None, *, background: Background,
                 keep: Callable[[str, int, str, bytes], None] | None = None, session: dict | None = None):
        self.node_id = node_id
        self.contract_name = contract
        self.sn = sn
        self.follower = follower
        self.blobs = blobs
        self.fetcher = fetcher
        self.t = timeouts or Timeouts()
        self.liveness = liveness or (lambda: {})
        # Told (contract, round, hash, blob) of every merged model this SL takes, whose bytes hash to
        # the ledger's merged hash: the SL keeps the latest on disk for a swarm restarted as a whole.
        self._keep = keep or (lambda *merged: None)
        # The session_join payload this SL joined with: an SL evicted while it was cut off joins again
        # with it (without one it cannot, and stops as before). Once it left on purpose it never does,
        # and it joins again at most once per round (a node evicted again at once stops instead).
        self._session = session
        self._left = threading.Event()
        self._rejoined_in: int | None = None
        self._led: set[tuple[int, int]] = set()
        # Per round, our request for its merged model, made as soon as it closed (see _start_merged_pull).
        self._merged_early: dict[int, Future] = {}
        # Per round, blobs being pulled ahead of the merge, by hash.
        self._early: dict[int, dict[str, Future]] = {}
        # Per secure round, our part in it (secrets, our plain tensors, what we posted); and how many of
        # our contributions carried client-level DP noise (what the accountant composes).
        self._secure: dict[int, Participation] = {}
        self._private_rounds = 0
        try:
            self._early_pool = background.executor(f"prefetch-{contract}", PREFETCH_WORKERS)
            self._round_watch = background.executor(f"round-watch-{contract}", 1)
            self._merge_pool = background.executor(f"merge-{contract}", MERGE_WINDOW)
        except RuntimeError:  # the SL's Background closed: its ML hears why, not an internal error
            raise SwarmError(STOPPING) from None
        self._closed = threading.Event()
        # A contract reset (started over) ends every session too: that is no eviction to join again after.
        self._generation = self._read(lambda c: c.generation)
        # (round, node) whose declared size was found beyond bounds, so that it is said once.
        self._oversize_said: set[tuple[int, str]] = set()

    # ------------------------------------------------------------------------------ entry points

    def sync(self, blob: bytes, weight: float, final: bool = False) -> RoundResult:
        started = time.monotonic()
        # A secure round's check-in posts fresh keys, and our plain tensors stay out of the blob store
        # (which serves what the ledger names): nobody, the leader included, can fetch them.
        secrets = secagg.RoundSecrets.fresh() if self._secure_contract() else None
        keys = secrets.public() if secrets is not None else None
        digest = keys_digest(keys) if keys is not None else self.blobs.put(blob)
        try:
            number = self._check_in(digest, weight, len(blob), final, keys)
            if number < 0:
                return self._take_merged(-number, started, False, blob)
            if secrets is not None:
                self._secure_checked_in(number, secrets, blob)
            else:
                self._start_prefetch(number)
            self._connect_if_leading(number + 1)
            closed = self._wait_until_closed(number)
            contributed = self.node_id in closed.participants
            if not contributed:
                log.info("round %d closed without %s; taking its merged model", number, self.node_id)
            else:
                self._start_merged_pull(closed, len(blob))
                self._wait_until_merged(number, self._leader_timeout(closed))
            # Evicted while we were cut off, its merged model is no longer ours to have (_pull says
            # so too, once our ledger copy shows it).
            self._check_member()
            return self._take_merged(number, started, contributed, blob)
        except OutOfSession:
            return self._join_again(blob, weight, final)

    def sync_final(self, blob: bytes, weight: float) -> RoundResult:
        """Contributes our final weights to every round until all peers have finished (the
        `snapshot` behaviour), then returns the swarm's final merged model."""
        while True:
            result = self.sync(blob, weight, final=True)
            if result.swarm_finished:
                return result
            log.info("round %d: %s has finished training; contributing its final weights until every peer "
                     "has finished", result.round, self.node_id)

    def catch_up(self) -> RoundResult | None:
        """The latest merged model, for a node that joins a swarm already under way; None for a
        fresh swarm, or when no live peer holds that model any more (every node that had it is gone,
        e.g. a task run again after its SWOP died): the node then starts from its own weights."""
        latest = self._read(lambda c: c.latest_merged_round)
        if not latest:
            return None
        try:
            taken = self._take_merged(latest, time.monotonic(), False, b"")
            log.info("round %d: %s resumes from the latest merged model %s", latest, self.node_id, taken.hash[:12])
            return taken
        except MergedModelGone as exc:
            older = self._newest_held()
            if older is not None:
                log.warning("%s; %s resumes from the merged model of round %d, the newest it holds", exc,
                            self.node_id, older.round)
                return older
            log.warning("%s; %s starts from its own weights, merged with its peers' in the next round", exc,
                        self.node_id)
            return None

    def _newest_held(self) -> RoundResult | None:
        """The newest merged round whose model this SL holds (kept on disk by a swarm stopped as a
        whole, whose last round was merged but not taken before the stop); None if it holds none."""
        merged = self._read(lambda c: [r for r in c.rounds.values() if r.status == RoundStatus.MERGED])
        for r in sorted(merged, key=lambda r: r.number, reverse=True):
            blob = self.blobs.get(r.merged_hash)
            if blob is not None:
                return RoundResult(r.number, r.merged_hash, blob, list(r.participants), r.leader or "", 0.0,
                                   False, r.final)
        return None

    # ---------------------------------------------------------------------------- 1. check in

    def _check_in(self, digest: str, weight: float, size: int, final: bool, keys: dict | None = None) -> int:
        """Checks in to the open round (with our fresh keys, for a secure round); returns its number,
        or minus the number of a round that closed before our check-in reached the ledger (we are late)."""
        number = self._read(lambda c: c.current_round)
        payload = {"contract": self.contract_name, "round": number, "node": self.node_id, "hash": digest,
                   "weight": weight, "size": size, "final": final, **({"keys": keys} if keys else {})}
        try:
            index = self.sn.submit("checkin", payload)
        except Rejected:
            if self.node_id not in self._read(lambda c: c.active_members):
                raise OutOfSession(f"{self.node_id} is no longer in the training session of "
                                   f"{self.contract_name}") from None
            if self.follower.wait_until(lambda s: self._contract(s).current_round > number, 5.0):
                return -number
            raise
        self.follower.wait_index(index)
        log.info("round %d: %s checked in %s (weight %g%s)", number, self.node_id, digest[:12], weight,
                 ", final" if final else "")
        return number

    def _check_member(self) -> None:
        """Raises OutOfSession when we are out of the session though we never left it."""
        if not self._left.is_set() and self.node_id not in self._read(lambda c: c.active_members):
            raise OutOfSession(f"{self.node_id} was evicted from the training session of {self.contract_name}")

    def _join_again(self, blob: bytes, weight: float, final: bool) -> RoundResult:
        """We are out of the session though we never left it: the others evicted us (absent from
        their last two rounds while the SN heard nothing from us: a partition, a paused host). We join
        again as we first did and resume, like a late node, from the latest merged model. A refused
        join (no longer among the contract's peers, revoked) fails our training with its reason."""
        if self._left.is_set() or self._session is None:
            why = "it left it" if self._left.is_set() else "evicted, and this engine does not know how it joined"
            raise SwarmError(f"{self.node_id} is no longer in the training session of {self.contract_name} "
                             f"({why}); restart it to join again")
        number, generation = self._read(lambda c: (c.current_round, c.generation))
        if generation != self._generation:
            raise SwarmError(f"contract {self.contract_name} was reset (started over) since {self.node_id} joined "
                             f"it; restart it to join again")
        if self._rejoined_in == number:
            raise SwarmError(f"{self.node_id} was evicted from contract {self.contract_name} again in round {number}, "
                             f"the round it joined again in; it stops rather than join again before a round "
                             f"passes: check that its SL reaches the SN (it is taken for silent)")
        try:
            index = self.sn.submit("session_join", self._session)
        except Rejected as exc:
            raise SwarmError(f"{self.node_id} was evicted from contract {self.contract_name} at round {number} "
                             f"and may not join again: {exc}") from None
        self._rejoined_in = number
        self.follower.wait_index(index)
        latest = self._read(lambda c: c.latest_merged_round)
        log.warning("%s was evicted from contract %s at round %d (absent from its last 2 rounds and silent); "
                    "it joined again and resumes from %s", self.node_id, self.contract_name, number,
                    f"merged round {latest}" if latest else "its own weights (no round merged yet)")
        caught = self.catch_up()
        return caught if caught is not None else self.sync(blob, weight, final)

    def leave(self, patience: float) -> None:
        """Leaves the training session on purpose (the SL stops, or gives up): this engine then never
        joins it again by itself. Raises SwarmError when the ledger does not record it."""
        self._left.set()
        self.sn.submit("session_leave", {"contract": self.contract_name, "node": self.node_id}, patience=patience)

    def _connect_if_leading(self, number: int) -> None:
        """If we lead round `number` (the next one: called as we check in to the one before) should
        every active member take part, opens our channels to them now, a round ahead: a leader's first
        fetch from a peer otherwise waits for TCP's and TLS's handshakes, 2-4 round trips before its
        first byte (measured 75-190 ms at 50 ms RTT)."""
        active, generation = self._read(lambda c: (c.active_members, c.generation))
        if len(active) > 1 and leader_order(self.contract_name, generation, number, active)[0] == self.node_id:
            self.fetcher.connect(self.follower.read(
                lambda s: [s.nodes[n].address for n in active if n != self.node_id and n in s.nodes]))

    def _start_prefetch(self, number: int) -> None:
        """If we lead `number` should every active member take part, pulls the others' blobs while
        the round is still filling, so that at close only the merge is left to do."""
        for old in [n for n in self._early if n < number - 1]:
            del self._early[old]
        active, generation = self._read(lambda c: (c.active_members, c.generation))
        if len(active) > 1 and leader_order(self.contract_name, generation, number, active)[0] == self.node_id:
            self._early[number] = {}
            try:
                self._round_watch.submit(self._prefetch, number, self._early[number])
            except RuntimeError:
                pass  # the SL is stopping: no prefetch, the merge (if any) fetches what it needs

    def _prefetch(self, number: int, futures: dict[str, Future]) -> None:
        budget = PREFETCH_BYTES

        def snapshot(state: LedgerState):
            # Copied under the follower's lock: the live round changes as entries arrive.
            r = self._contract(state).rounds.get(number)
            if r is None:
                return None
            return (state.head_index, r.status, dict(r.checkins),
                    {n: state.nodes[n].address for n in r.checkins if n in state.nodes})

        try:
            # Ends with the engine, or once its round is merged (a prefetch that waited its turn in
            # the pool behind the last round's finds its own round gone and does nothing).
            while not self._closed.is_set() and self._early.get(number) is futures:
                seen = self.follower.read(snapshot)
                if seen is None:
                    return  # the contract was reset
                head, status, checkins, addresses = seen
                sizes = self._declared(number, checkins)
                for node, checkin in checkins.items():
                    if node == self.node_id or checkin.hash in futures or sizes[node] is None \
                            or checkin.size > budget:
                        continue
                    budget -= checkin.size
                    futures[checkin.hash] = self._early_pool.submit(
                        self.fetcher.fetch, addresses.get(node, ""), checkin.hash,
                        self.t.transfer_budget(sizes[node]), sizes[node], self.t.stall, self.t.min_rate, True)
                if status != "open":
                    return
                self.follower.wait_until(lambda s: s.head_index > head, 1.0)
        except (SwarmError, RuntimeError):
            return  # the SL is stopping or lost the ledger; the merge fetches what it needs itself

    def close(self) -> None:
        """Ends prefetching (the pools stay with the SL, for the next engine of this contract); the
        SL calls this when it stops or replaces this engine."""
        self._closed.set()
        for futures in list(self._early.values()):
            for future in list(futures.values()):
                if future is not None:  # None: taken by the merge
                    future.cancel()

    # ---------------------------------------------------------------------------- 2. close

    def _wait_until_closed(self, number: int) -> Round:
        ready_since: float | None = None
        quorum_since: float | None = None
        below_since: float | None = None
        next_log = time.monotonic() + self.t.waiting_log_every
        while True:
            seen = self.follower.read(lambda s: s.head_index)
            r, active, need, generation = self._read(
                lambda c: (c.rounds[number], c.active_members, c.min_peers, c.generation))
            if r.status != "open":
                return r
            now = time.monotonic()
            checked = sorted(r.checkins)
            if len(checked) >= need:
                quorum_since = quorum_since or now
                below_since = None
                missing = [n for n in active if n not in r.checkins]
                if missing and now - quorum_since < self.t.checkin_wait:
                    missing = self._still_alive(missing)
                if not missing or now - quorum_since >= self.t.checkin_wait:
                    ready_since = ready_since or now
                    self._try_close(number, checked, generation, now - ready_since)
            else:
                quorum_since = ready_since = None
                below_since = below_since or now
                limit = self.t.min_peers_timeout
                if limit is not None and now - below_since >= limit:
                    self._give_up(number, f"only {len(checked)} of {need} required peers checked in within "
                                          f"{limit:g} s (waiting for {self._waiting_for(active, r)})")
                if now >= next_log:
                    log.info("round %d: %d of %d required peers, waiting for %s", number, len(checked), need,
                             self._waiting_for(active, r))
                    next_log = now + self.t.waiting_log_every
            self.follower.wait_until(lambda s: s.head_index > seen, 0.2)

    def _waiting_for(self, active: list[str], r: Round) -> str:
        """The active members that have not checked in, each with how long ago the SN heard from its SL."""
        missing = [n for n in active if n not in r.checkins]
        if not missing:
            return "more peers to join"
        last_seen = self.liveness()
        return ", ".join(f"{n} (last seen {last_seen[n]:.0f} s ago)" if n in last_seen
                         else f"{n} (not heard from since the SN started)" for n in missing)

    def _give_up(self, number: int, reason: str) -> None:
        """Leaves the session (taking back our check-in, so no peer waits for us) and fails this
        node's training with `reason`."""
        log.error("round %d: %s; %s gives up (min-peers timeout) and leaves contract %s", number, reason,
                  self.node_id, self.contract_name)
        try:
            self.leave(patience=5.0)
        except SwarmError as exc:
            log.warning("could not leave contract %s: %s", self.contract_name, exc)
        raise MinPeersTimeout(f"round {number}: {reason}; {self.node_id} stopped training (min-peers timeout). "
                              f"Start the missing nodes, or lower min_peers, and run it again")

    def _still_alive(self, nodes: list[str]) -> list[str]:
        last_seen = self.liveness()
        return [n for n in nodes if last_seen.get(n, 0.0) < self.t.stale_after]

    def _try_close(self, number: int, participants: list[str], generation: int, waited: float) -> None:
        order = leader_order(self.contract_name, generation, number, participants)
        if order[0] != self.node_id and waited < self.t.grace:
            return  # the designated closer (the would-be leader) goes first
        try:
            self.sn.submit("close_round", {"contract": self.contract_name, "round": number,
                                           "participants": participants, "leader": order[0]})
            log.info("round %d closed: participants %s, leader %s", number, ",".join(order), order[0])
        except Rejected:
            pass  # another node closed it first; the ledger tells us how

    # ---------------------------------------------------------------------------- 3. lead or wait

    def _declared(self, number: int, checkins: dict[str, Checkin]) -> dict[str, int | None]:
        """The bytes to expect from each check-in: as declared (up to blob_limit of our own; the
        contract's max_blob_bytes for one that declares none), or None for a declaration beyond that,
        which nobody waits for."""
        own = checkins.get(self.node_id)
        limit = blob_limit(own.size if own else 0, self._max_blob_bytes())
        sizes: dict[str, int | None] = {}
        for node, c in checkins.items():
            if c.size <= limit:
                sizes[node] = c.size or limit
                continue
            sizes[node] = None
            if (number, node) not in self._oversize_said:
                self._oversize_said.add((number, node))
                log.warning("round %d: %s declares a %d-byte blob, more than the %d bytes one of this model may "
                            "have; it is not fetched nor waited for", number, node, c.size, limit)
        return sizes

    def _leader_timeout(self, r: Round) -> float:
        """How long a round's leader has to post `merged`: a base plus the time to move the bytes its
        participants declare, each within bounds (see FETCH_SHARE)."""
        sizes = self._declared(r.number, {n: r.checkins[n] for n in r.participants if n in r.checkins})
        declared = sum(size for size in sizes.values() if size is not None)
        if r.secure is not None:
            # Its phases, each a bounded wait, and masked inputs of 8 bytes a value (4x an F16 model's).
            return self.t.transfer_budget(4 * declared) + SECURE_PHASES * SECURE_PHASE_WAIT
        return self.t.transfer_budget(declared)

    def _wait_until_merged(self, number: int, limit: float) -> None:
        watching: tuple[str, int] | None = None
        since = time.monotonic()
        while True:
            seen = self.follower.read(lambda s: s.head_index)
            r, generation = self._read(lambda c: (c.rounds[number], c.generation))
            if r.status in (RoundStatus.MERGED, RoundStatus.ABORTED) or self.node_id not in r.participants:
                return
            term = (r.leader, r.reelections)
            if term != watching:
                watching, since = term, time.monotonic()
            if r.leader == self.node_id and (number, r.reelections) not in self._led:
                self._led.add((number, r.reelections))
                (self._lead_secure if r.secure is not None else self._lead)(r, since)
                continue
            if r.secure is not None:
                self._secure_duties(r)
            waited = time.monotonic() - since
            if waited > limit and len(r.participants) > 1:
                successor = r.participants[1]
                if successor == self.node_id or waited > limit + self.t.grace:
                    # No re-election can help (the ledger's own rules): too few peers would remain, or a
                    # secure round's survivors are named (their shares would be revealed twice).
                    if len(r.participants) - 1 < r.need or (r.secure is not None and r.secure.survivors is not None):
                        self._abort_leaderless(r, waited)
                    else:
                        try:
                            self.sn.submit("reelect", {"contract": self.contract_name, "round": number,
                                                       "failed": r.leader, "leader": successor})
                            log.warning("round %d: leader %s posted no merged model in %.1f s; %s leads now",
                                        number, r.leader, waited, successor)
                        except Rejected:
                            pass  # another participant re-elected first; the ledger tells us who leads
            self.follower.wait_until(lambda s: s.head_index > seen, 0.5)

    def _abort_leaderless(self, r: Round, waited: float) -> None:
        """Without its silent leader too few peers remain to re-elect one: the round is aborted (each
        participant keeps its own weights) rather than waited on forever; the next round then waits
        for min_peers as usual, saying so."""
        left = len(r.participants) - 1
        if left >= r.need:
            reason = (f"leader {r.leader} posted no merged model in {waited:.1f} s after naming the survivors of "
                      f"this secure round, whose shares no other leader may have revealed again")
        else:
            reason = (f"leader {r.leader} posted no merged model in {waited:.1f} s and without it only {left} "
                      f"{'peer remains' if left == 1 else 'peers remain'}, fewer than min_peers")
        try:
            self.sn.submit("round_abort", {"contract": self.contract_name, "round": r.number, "reason": reason,
                                           "failed": r.leader, "dropped": []})
            log.warning("round %d aborted: %s; every participant keeps its own weights", r.number, reason)
        except Rejected:
            pass  # another participant aborted it first

    def _evict_vanished(self) -> None:
        """Takes out of the session the members that missed the last two rounds and whose SL the SN
        has not heard from: a node that died must not hold up the swarm's end."""
        candidates = self._read(lambda c: [n for n in c.active_members
                                           if n != self.node_id and c.absent_from_last_rounds(n)])
        if not candidates:
            return
        for node in candidates:
            if node in self._still_alive([node]):
                continue
            try:
                self.sn.submit("session_evict", {"contract": self.contract_name, "node": node,
                                                 "reason": "absent from the last 2 rounds and silent"})
                log.warning("%s evicted from contract %s: absent from the last 2 rounds and silent",
                            node, self.contract_name)
            except Rejected:
                pass

    def _lead(self, r: Round, since: float) -> None:
        """Merges round `r`, which we lead since `since` (when we saw it closed or were re-elected)."""
        started = time.monotonic()
        deadline = since + FETCH_SHARE * self._leader_timeout(r)
        sizes = self._declared(r.number, r.checkins)
        self._evict_vanished()
        method, need = self._read(lambda c: (c.merge_method, c.min_peers))
        addresses = self.follower.read(lambda s: {n: s.nodes[n].address for n in r.participants if n in s.nodes})
        dropped: list[str] = []
        early = self._early.get(r.number, {})
        # Our own contribution first: it is the reference the others must match. Then those pulled
        # ahead, which are held until added: added first, they are let go first.
        order = sorted(r.participants, key=lambda n: (n != self.node_id, r.checkins[n].hash not in early))
        largest = max([size for size in sizes.values() if size] or [1])

        def load(node: str) -> Contribution:
            checkin = r.checkins[node]
            blob = self.blobs.get(checkin.hash)
            if blob is None:
                # Taken once: a prefetched blob is not held past its merge (a reload fetches it again).
                prefetched, early[checkin.hash] = early.get(checkin.hash), None
                blob = self._fetch_once(addresses.get(node, ""), checkin, sizes[node], prefetched, deadline)
            # decode() makes views over the blob: it lives exactly as long as the contribution.
            return Contribution(node, checkin.weight, decode(blob))

        def drop(node: str, reason: str) -> None:
            log.warning("round %d: dropped %s from the merge: %s", r.number, node, reason)
            dropped.append(node)

        contributions = _Contributions(order, load, drop, self._merge_pool,
                                       max(0, min(MERGE_WINDOW, MERGE_WINDOW_BYTES // largest - 1)))
        try:
            seed = self.follower.read(lambda s: contract_seed(s.genesis_hash or "", self.contract_name,
                                                              self._contract(s).generation))
            merger = get_merger(method, contract_seed=seed)
            contributions.check = merger.check  # the method's own check (ffa_lora: each node's frozen A)
            merged = self._merge(r.number, merger, contributions)
        except SwarmError as exc:
            log.error("round %d: cannot merge: %s", r.number, exc)
            return
        finally:
            self._early.pop(r.number, None)
        kept = len(r.participants) - len(dropped)
        if kept < need:
            reason = f"only {kept} valid contributions, min_peers is {need}"
            log.error("round %d: %s; round aborted, every participant keeps its own weights", r.number, reason)
            try:
                self.sn.submit("round_abort", {"contract": self.contract_name, "round": r.number, "reason": reason,
                                               "dropped": dropped})
            except Rejected as exc:
                log.warning("round %d: abort not accepted: %s", r.number, exc)
            return
        blob = encode(merged)
        del merged
        # Labelled before it is posted: the participants already waiting for it get it while the
        # entry is written (they check its hash against the ledger).
        digest = self.blobs.put(blob, label=(self.contract_name, r.number))
        try:
            self.sn.submit("merged", {"contract": self.contract_name, "round": r.number, "hash": digest,
                                      "size": len(blob), "dropped": dropped})
        except Rejected as exc:
            log.warning("round %d: our merge was not accepted: %s", r.number, exc)
            return
        log.info("round %d: %s merged %d peers with %s in %.3f s -> %s", r.number, self.node_id, kept, method,
                 time.monotonic() - started, digest[:12])

    def _merge(self, number: int, merger: Merger, contributions: _Contributions) -> dict[str, Tensor]:
        """Merges the valid contributions. A method with an accumulator (`mean`) folds each one in as
        it arrives and passes its checks, keeping only its norm, so the leader holds about two models
        whatever the number of peers; a norm outlier, known once all are in, is taken back out (its blob
        loaded again), or the merge is built again from the others. Other methods hold every valid
        contribution until all are in, and say so."""
        acc = merger.accumulator()
        if acc is None:
            log.info("round %d: %s holds %s: %d contributions", number, merger.name, merger.holds,
                     len(contributions.order))
            held = list(contributions.valid())
            outliers = norm_outliers({c.node: norm for c, norm in held})
            for node, reason in outliers.items():
                contributions.drop(node, reason)
            return merger.merge(c for c, _ in held if c.node not in outliers)
        norms: dict[str, float] = {}
        for c, norm in contributions.valid():
            acc.add(c, norm)
            norms[c.node] = norm
            del c
        outliers = norm_outliers(norms)
        for node, reason in outliers.items():
            contributions.drop(node, reason)
        if outliers and not all(self._taken_back(acc, contributions, node) for node in outliers):
            log.info("round %d: merging again without %s", number, ", ".join(outliers))
            acc = merger.accumulator()
            for c, norm in contributions.valid([n for n in contributions.order if n in norms and n not in outliers]):
                acc.add(c, norm)
        return acc.result()

    @staticmethod
    def _taken_back(acc: Accumulator, contributions: _Contributions, node: str) -> bool:
        """Subtracts `node`'s contribution, loaded again, from `acc`; False when that cannot be done."""
        try:
            return acc.subtract(contributions.load(node))
        except (FetchError, BlobError, SwarmError) as exc:
            log.info("%s's contribution could not be loaded again (%s)", node, exc)
            return False

    def _fetch_once(self, address: str, checkin: Checkin, size: int | None, early: Future | None,
                    deadline: float) -> bytes:
        """A contribution, waited for once and never past `deadline`: the prefetch under way is awaited
        (its failure is final, not retried), else it is fetched now; FetchError says why not."""
        if size is None:
            raise FetchError(f"declares a {checkin.size}-byte blob, more than one of this model may have; "
                             f"not fetched")
        if early is not None and not early.cancel():
            try:
                return early.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                raise FetchError(f"its blob was not in by the leader's fetch deadline (the first "
                                 f"{FETCH_SHARE:.0%} of the leader timeout)") from None
        left = deadline - time.monotonic()
        if left <= 0:
            raise FetchError("the leader's fetch deadline passed before its blob was asked for")
        return self.fetcher.fetch(address, checkin.hash, left, size, self.t.stall, self.t.min_rate, in_place=True)

    # ---------------------------------------------------------------------------- 4. take merged

    def _take_merged(self, number: int, started: float, contributed: bool, own: bytes) -> RoundResult:
        next_log = time.monotonic() + self.t.waiting_log_every
        while True:
            r = self.follower.wait_until(lambda s: self._ended_round(s, number), self.t.waiting_log_every)
            if r:
                break
            if time.monotonic() >= next_log:
                log.info("round %d: waiting for its merged model", number)
                next_log = time.monotonic() + self.t.waiting_log_every
        seconds = time.monotonic() - started
        if r.status == RoundStatus.ABORTED:
            return RoundResult(r.number, self.blobs.put(own), own, list(r.participants), r.leader or "", seconds,
                               False, False)
        blob = self.blobs.get(r.merged_hash) or self._early_merged(r, len(own))
        if blob is None:
            try:
                blob = self._pull(r, len(own))
            except MergedModelGone as exc:
                if not own:
                    raise
                # The leader died between posting the merged hash and serving it, before any peer
                # pulled it: like an aborted round, we go on with our own weights rather than stop.
                log.warning("%s; %s keeps its own weights for this round", exc, self.node_id)
                return RoundResult(r.number, self.blobs.put(own), own, list(r.participants), r.leader or "",
                                   seconds, False, r.final)
        self._keep(self.contract_name, r.number, r.merged_hash, blob)
        return RoundResult(r.number, r.merged_hash, blob, list(r.participants), r.leader or "", seconds,
                           contributed and self.node_id in r.participants, r.final)

    def _start_merged_pull(self, r: Round, own: int) -> None:
        """Asks, as soon as round `r` closed, for its merged model, from our parent in a tree of the
        participants rooted at the leader (each node serves at most merged_fanout(own) others), so that
        it comes as soon as it is posted rather than a ledger hop and a request later, and no node serves
        the whole swarm. Each chunk is passed on to our own children as it arrives (cut-through); the
        whole blob is checked against the ledger's merged hash before use (_early_merged), by each node
        for itself. On any failure we, and our children, pull it as before (_pull)."""
        order = [r.leader, *[n for n in r.participants if n != r.leader]]
        if not r.leader or self.node_id not in order[1:]:
            return
        parent = order[(order.index(self.node_id) - 1) // merged_fanout(own)]
        address = self.follower.read(lambda s: s.nodes[parent].address if parent in s.nodes else "")
        limit = blob_limit(own, self._max_blob_bytes())
        timeout = self._leader_timeout(r) + self.t.grace
        label = (self.contract_name, r.number)

        def pull() -> tuple[str, bytes]:
            # The announced size is checked against `limit` before forward() reserves it in the store.
            blob = self.fetcher.fetch_merged(address, self.contract_name, r.number, timeout, limit, self.t.stall,
                                             self.t.min_rate, forward=lambda size: self.blobs.arriving(label, size))
            return self.blobs.put(blob, label=label), blob

        for old in [n for n in self._merged_early if n < r.number]:
            self._merged_early.pop(old).cancel()
        try:
            self._merged_early[r.number] = self._early_pool.submit(pull)
        except RuntimeError:
            pass  # the SL is stopping

    def _early_merged(self, r: Round, own: int) -> bytes | None:
        """Round `r`'s merged model as our early request got it, if its bytes hash to the ledger's
        merged hash. A parent that sent nothing yet is waited for only as long as the bytes take at the
        assumed rate (plus the grace), so that a silent parent costs little before we pull it ourselves;
        once its bytes flow, slower than that rate (a narrow link, a deep tree), for up to the budget a
        pull of our own would get: that pull would share the same links, and the leader's uplink (at
        40 MB over 100 Mbit/s, pulls beside the tree's made rounds half as long again). The fetch's
        watchdog ends a transfer that stalls or trickles."""
        future = self._merged_early.pop(r.number, None)
        if future is None:
            return None
        size = min(r.merged_size or blob_limit(own, self._max_blob_bytes()), blob_limit(own, self._max_blob_bytes()))
        try:
            try:
                digest, blob = future.result(timeout=self.t.grace + size / self.t.leader_bytes_per_second)
            except FutureTimeout:
                if not isinstance(self.blobs.wait_labelled((self.contract_name, r.number), 0.0), Arriving):
                    raise
                log.debug("round %d: merged model still arriving from our parent; waiting for it", r.number)
                digest, blob = future.result(timeout=self.t.transfer_budget(size))
        except FutureTimeout:
            log.debug("round %d: merged model not in yet from our parent; pulling it", r.number)
            return None
        except (SwarmError, CancelledError) as exc:
            log.debug("round %d: merged model not from our parent: %s", r.number, exc)
            return None
        if digest != r.merged_hash:
            log.warning("round %d: the merged model we were sent hashes to %s, not to the %s on the ledger; "
                        "pulling it again", r.number, digest[:12], r.merged_hash[:12])
            return None
        return blob

    def _pull(self, r: Round, own: int) -> bytes:
        """The merged blob from the leader, or from any participant that already holds it; no bigger
        than blob_limit(own) whatever its leader declared."""
        sources = [r.leader, *[n for n in r.participants if n not in (r.leader, self.node_id)]]
        addresses = self.follower.read(lambda s: {n: s.nodes[n].address for n in sources if n in s.nodes})
        limit = blob_limit(own, self._max_blob_bytes())
        size = min(r.merged_size or limit, limit)
        budget = self.t.transfer_budget(size)
        deadline = time.monotonic() + budget
        while True:
            for node in sources:
                try:
                    blob = self.fetcher.fetch(addresses.get(node, ""), r.merged_hash, budget, size, self.t.stall,
                                              self.t.min_rate)
                except FetchError as exc:
                    log.debug("round %d: merged model not from %s: %s", r.number, node, exc)
                    continue
                self.blobs.put(blob, label=(self.contract_name, r.number))  # for the peers waiting on us
                return blob
            self._check_member()  # the peers refuse it to us
            if time.monotonic() > deadline:
                raise MergedModelGone(f"round {r.number}: no peer served the merged model {r.merged_hash[:12]}")
            time.sleep(0.2)

    # ---------------------------------------------------------------------------- helpers

    def _contract(self, state: LedgerState) -> Contract:
        return state.contract(self.contract_name)

    def _read(self, fn: Callable[[Contract], object]):
        return self.follower.read(lambda s: fn(self._contract(s)))

    def _max_blob_bytes(self) -> int:
        """The contract's limit on any blob of its rounds, as our ledger copy has it now."""
        return self._read(lambda c: c.limits.max_blob_bytes)

    def _ended_round(self, state: LedgerState, number: int) -> Round | None:
        r = self._contract(state).rounds.get(number)
        return r if r is not None and r.status in (RoundStatus.MERGED, RoundStatus.ABORTED) else None


class _Contributions:
    """A round's contributions as the leader loads and checks them, our own first (the reference the
    others must match), up to `window` loading ahead."""

    def __init__(self, order: list[str], load: Callable[[str], Contribution], drop: Callable[[str, str], None],
                 pool: Executor, window: int):
        self.order = order
        self.load = load
        self.drop = drop
        self._pool = pool
        self._window = window
        self._reference: dict[str, Tensor] | None = None
        self.check: Callable[[Contribution], None] = lambda c: None  # the merge method's (Merger.check)

    def valid(self, nodes: list[str] | None = None) -> Iterator[tuple[Contribution, float]]:
        """Yields each valid contribution with its norm; a bad one is dropped, by name, with why."""
        for node, outcome in _prefetched(self.order if nodes is None else nodes, self.load, self._pool,
                                         self._window):
            try:
                c = outcome()
                check_contribution(c, self._reference)
                self.check(c)
            except (FetchError, BlobError, BadContribution) as exc:
                self.drop(node, exc.reason if isinstance(exc, BadContribution) else str(exc))
                continue
            if self._reference is None:
                self._reference = c.tensors
            yield c, contribution_norm(c.tensors)
            del c  # not held while the next one loads (the caller has added it by now)


def _prefetched(nodes: list[str], load: Callable[[str], Contribution], pool: Executor, window: int):
    """Yields (node, outcome) in order while up to `window` loads run ahead in `pool`; calling
    outcome() returns the contribution or raises the load's error. Only the window is held in memory;
    loads not yet started when the caller stops early are cancelled. Raises SwarmError once the SL
    stops (its pools take no more work). Window 0: each is loaded when outcome() is called."""
    if window == 0:
        for node in nodes:
            yield node, functools.partial(load, node)
        return
    ahead: deque[Future] = deque()
    try:
        for n in nodes[:window]:
            ahead.append(_submit(pool, load, n))
        for i, node in enumerate(nodes):
            future = ahead.popleft()
            if i + window < len(nodes):
                ahead.append(_submit(pool, load, nodes[i + window]))
            yield node, future.result
    finally:
        for future in ahead:
            future.cancel()


def _submit(pool: Executor, fn: Callable, *args) -> Future:
    try:
        return pool.submit(fn, *args)
    except RuntimeError:  # shut down with the SL's Background
        raise SwarmError(STOPPING) from None
