"""The Swarm Network node: holds the ledger and serves the SN API over mutual TLS."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from swarmlearn import pki
from swarmlearn.background import Background
from swarmlearn.defaults import DEFAULT_CONTRACT, DEFAULT_TASKRUNNER, ETCD_PREFIX
from swarmlearn.errors import AlreadyRecorded, ConfigError, LedgerError, LedgerOutOfReach, Rejected
from swarmlearn.ledger.chain import Chain, ChainBroken
from swarmlearn.ledger.entry import SignedTx, Tx
from swarmlearn.ledger.identities import issuer
from swarmlearn.ledger.model import PROTOCOL_VERSION
from swarmlearn.ledger.pin import HistoryRefused, Pin, PinFile, check_marker
from swarmlearn.ledger.policy import may_join_cluster
from swarmlearn.ledger.signatures import is_registered, registration, sign_tx
from swarmlearn.ledger.snapshot import CHECKPOINT_EVERY
from swarmlearn.ledger.sqlite_store import SQLiteStore
from swarmlearn.ledger.store import LedgerStore
from swarmlearn.proto import sn_pb2, sn_pb2_grpc
from swarmlearn.sn.liveness import EtcdLiveness, Liveness, MemoryLiveness

if TYPE_CHECKING:
    from swarmlearn.ledger.etcd_member import EtcdMember
    from swarmlearn.sn.cluster import MemberPlan

log = logging.getLogger("swarmlearn.sn")

LEDGER_FILE = "ledger.db"
# How long an SN that cannot follow a shared ledger (no quorum, a key it cannot read) first waits before
# it tries again; the wait doubles with each failure in a row, up to FOLLOW_RETRY_MAX.
FOLLOW_RETRY = 1.0
FOLLOW_RETRY_MAX = 8.0
# Beside the ledger: the swarm this data dir holds and the head this SN acknowledged (ledger/pin.py).
MARKER_FILE = "swarm.json"
# One thread per open watch stream plus the unary calls; a swarm of dozens of peers fits.
MAX_WORKERS = 256

# --- Bounds on what one caller can take from the SN (identity = its certificate's SHA-256). ---
# Watch streams each hold a worker thread for as long as they are open. Streams together never take
# more than WATCH_STREAMS_TOTAL threads, so unary calls (Submit, Heartbeat, Query) always find 64
# left. A certificate is one node, which follows the ledger with one stream; the rest of its
# WATCH_STREAMS_PER_IDENTITY is room for reconnections whose old stream is still being torn down.
WATCH_STREAMS_TOTAL = 192
WATCH_STREAMS_PER_IDENTITY = 8
# Submits per certificate: a token bucket of SUBMIT_BURST that refills at SUBMIT_RATE per second.
# Refused submits cost a token too. An honest node submits a handful of entries per round (the
# 8-peer soak: about 9 per peer per second at 130 ms rounds; a SWCI's script: a few dozen at once),
# so honest swarms stay far inside while a flood from one certificate is cut to this pace.
SUBMIT_RATE = 50.0
SUBMIT_BURST = 200
# Queries and heartbeats per certificate, likewise: an honest SWCI polls a few times a second and an
# SL or SWOP heartbeats once a second, while one certificate looping `Query("all")` on every worker
# thread would hold the ledger's lock from everyone's submits. (A section's JSON is made once per
# ledger head, so polls of an unchanged ledger cost next to nothing within this rate.)
READ_RATE = 20.0
READ_BURST = 100
# Certificates whose issuer this SN has checked against the ledger's CAs (one signature check each).
TRUST_CACHE_SIZE = 4096
# A reply must fit gRPC's default 4 MiB message limit with room for its framing. Metrics, the one
# section that grows with every round, are read from the ledger's entries and served in pages of at
# most METRICS_PAGE_BYTES, each made from at most METRICS_PAGE_ENTRIES entries read.
MAX_REPLY_BYTES = 4 * 1024 * 1024 - 64 * 1024
METRICS_PAGE_BYTES = 1024 * 1024
METRICS_PAGE_ENTRIES = 5000
# The SN pings idle connections, so a client that vanished without closing its connection frees
# its watch stream within KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS.
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
CLIENT_PING_MIN_MS = 5_000
# On stop, how long the SN waits for its watch streams to end (each notices within the chain's
# half-second poll) before it closes the ledger under them.
STOP_STREAMS_TIMEOUT = 2.0
# Then how long it waits for its threads (each ends with its call) before it names the ones left.
STOP_THREADS_TIMEOUT = 5.0
# A Watch asked for batches gets at most this many entries, of at most this many bytes together (one
# larger entry goes alone), per message: within gRPC's 4 MiB message limit. A follower that keeps up
# gets one entry per message anyway; one behind (a burst of check-ins) gets what it missed in one.
WATCH_BATCH_ENTRIES = 256
WATCH_BATCH_BYTES = 1 << 20
# A snapshot is served in chunks of this many bytes (well inside gRPC's 4 MiB message limit).
SNAPSHOT_CHUNK_BYTES = 1 << 20
# An SN running its own etcd member reads the cluster's members this often, so that its store fails
# over to members that joined since it started.
MEMBERS_REFRESH = 5.0


def revocation(fingerprint: str, state) -> str | None:
    """Why the SN answers a certificate nothing, if an admin revoked it (it still passes the TLS
    handshake: the CA signed it); None if it is not revoked."""
    index = state.revoked.get(fingerprint)
    if index is None:
        return None
    return f"certificate {fingerprint[:12]} was revoked at ledger entry {index}; use a newly issued certificate"


def caller_name(context: grpc.ServicerContext, fingerprint: str | None) -> str:
    """The caller as people know it in messages: certificate common name and fingerprint prefix."""
    names = context.auth_context().get("x509_common_name") or [b"?"]
    return f"{names[0].decode(errors='replace')} (certificate {(fingerprint or '?')[:12]})"


class StreamSlots:
    """Open streams, counted per identity and in total, so that streams cannot take the worker
    threads other calls (or other callers) need: the SN's watch streams, an SL's blob streams
    (sl/transport.py). Each admitted stream holds a ticket until its handler ends; releasing a
    ticket twice counts once. `kind` and `elsewhere` (what a caller refused by the total can do
    instead) only word the refusals."""

    def __init__(self, total: int = WATCH_STREAMS_TOTAL, per_identity: int = WATCH_STREAMS_PER_IDENTITY,
                 kind: str = "watch", server: str = "SN", elsewhere: str = "follow the ledger through another SN"):
        self.total = total
        self.per_identity = per_identity
        self.kind = kind
        self.server = server
        self.elsewhere = elsewhere
        self._lock = threading.Condition()
        self._live: dict[object, str] = {}
        self._open: dict[str, int] = {}

    def acquire(self, who: str) -> object | str:
        """A ticket for a new stream of `who`, or (a string) why it is refused."""
        with self._lock:
            if self._open.get(who, 0) >= self.per_identity:
                return (f"cap of {self.per_identity} {self.kind} streams per certificate reached; close the "
                        f"streams it no longer reads before opening another")
            if len(self._live) >= self.total:
                return (f"cap of {self.total} {self.kind} streams per {self.server} reached; retry later or "
                        f"{self.elsewhere}")
            ticket = object()
            self._live[ticket] = who
            self._open[who] = self._open.get(who, 0) + 1
            return ticket

    def release(self, ticket: object) -> None:
        with self._lock:
            who = self._live.pop(ticket, None)
            if who is not None:
                self._open[who] -= 1
                if not self._open[who]:
                    del self._open[who]
                self._lock.notify_all()

    def wait_closed(self, timeout: float) -> bool:
        """Waits until no stream is open; False if some still are after `timeout` seconds."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._live, timeout)

    def count(self, who: str | None = None) -> int:
        with self._lock:
            return len(self._live) if who is None else self._open.get(who, 0)


class CallBudget:
    """A token bucket per identity: `burst` calls at once, refilled at `rate` per second."""

    def __init__(self, rate: float, burst: int):
        self.rate = rate
        self.burst = burst
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # identity -> (tokens, when counted)

    def take(self, who: str) -> float:
        """Takes one token of `who`; returns 0, or the seconds until one is available (none taken)."""
        now = time.monotonic()
        with self._lock:
            tokens, then = self._buckets.get(who, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            if tokens >= 1.0:
                self._buckets[who] = (tokens - 1.0, now)
                return 0.0
            self._buckets[who] = (tokens, now)
            return (1.0 - tokens) / self.rate


def metrics_page(store: LedgerStore, names: set[str], from_index: int, head: int, budget: int = METRICS_PAGE_BYTES,
                 reads: int = METRICS_PAGE_ENTRIES) -> tuple[list[dict], int | None]:
    """The metrics entries about a contract (named in their payload as one of `names`) recorded at
    ledger index `from_index` or later, up to `head`, read from `store`: as many as fit `budget` bytes
    of JSON within `reads` entries read, and the index to ask from for the next page (None: this page
    reaches `head`). Each is as the state once kept it: node, index, the signer's time and its values."""
    page: list[dict] = []
    used, index = 0, max(0, from_index)
    last = min(head, from_index + reads - 1)
    while index <= last:
        rows = store.read_raw(index, min(1000, last - index + 1))
        if not rows:
            break
        for row in rows:
            if b'"kind":"metrics"' in row.body:  # the transaction's kind, or a payload's: parsed to tell
                m = _metrics_entry(row, names)
                size = len(json.dumps(m, sort_keys=True)) if m is not None else 0
                if page and used + size > budget:
                    return page, row.index
                if m is not None:
                    page.append(m)
                    used += size
            index = row.index + 1
    return page, (index if index <= head else None)


def _metrics_entry(row, names: set[str]) -> dict | None:
    tx = row.entry().tx
    if tx.kind != "metrics" or tx.payload.get("contract") not in names:
        return None
    values = {k: v for k, v in tx.payload.items() if k not in ("contract", "node") and not (k == "kind" and v is None)}
    return {"node": tx.payload.get("node"), "index": row.index, "time": tx.time, **values}


def taskrunner_progress(state, name: str) -> dict:
    """What a SWCI waiting for task runner `name` shows, and no more: the runner and its assignment, and
    per contract the last merged round and each node's latest metrics summary. Its size does not grow
    with the ledger."""
    runner = state.taskrunner(name)
    training = {}
    for contract in state.contracts.values():
        merged = contract.latest_merged
        if merged is None:
            continue
        training[contract.name] = {
            "round": {"number": merged.number, "participants": list(merged.participants), "leader": merged.leader,
                      "closed_time": merged.closed_time, "merged_time": merged.merged_time},
            "latest": {node: kinds["latest"] for node, kinds in contract.latest_metrics.items() if "latest" in kinds}}
    runner_obj = {k: v for k, v in dataclasses.asdict(runner).items() if k != "history"}
    return {"taskrunner": runner_obj, "training": training}


# An SN whose shared store (etcd) has not answered for LEDGER_REACH_GRACE seconds answers UNAVAILABLE
# "cannot reach its ledger" rather than stale state, so that clients move to an SN that can; while it
# makes no other call to the store, it looks (reads the head) at most every LEDGER_PROBE_EVERY seconds.
LEDGER_REACH_GRACE = 3.0
LEDGER_PROBE_EVERY = 1.0
# What the SN's refusals and outages say; clients (sn/client.py) tell them apart by these words.
REFUSAL_MARK = "refuses new entries"
LEDGER_OUT_OF_REACH = "cannot reach its ledger"


def store_out_of_reach(exc: LedgerError) -> bool:
    """Whether a store error means this SN cannot reach the store (etcd without quorum, unreachable or
    refusing our TLS), which other SNs of the swarm may reach, rather than a refusal that holds there too."""
    return isinstance(exc, LedgerOutOfReach)


def broken_ledger(exc: ChainBroken) -> str:
    return f"ledger broken at entry {exc.index} ({exc.reason}): restore it from a backup"


class LedgerReach:
    """Whether this SN reached the store of its ledger lately, from what its calls to the store found,
    and from a read of the head when it made none for LEDGER_PROBE_EVERY (one caller reads; the others
    take the last verdict meanwhile). Only a shared store is watched: an SN on its own SQLite file has
    no other SN to send clients to, and reports a failing disk on Submit."""

    def __init__(self, store: LedgerStore, shared: bool):
        self.store = store
        self.shared = shared
        self._lock = threading.Lock()
        self._probing = threading.Lock()
        self._last_ok = self._last_look = time.monotonic()
        self._failure: str | None = None

    def ok(self) -> None:
        with self._lock:
            self._last_ok = self._last_look = time.monotonic()
            self._failure = None

    def failed(self, exc: LedgerError) -> None:
        with self._lock:
            self._last_look = time.monotonic()
            self._failure = str(exc)

    def out_of_reach(self) -> str | None:
        """Why the store has been out of reach for over LEDGER_REACH_GRACE seconds; None if it is not."""
        if not self.shared:
            return None
        if time.monotonic() - self._last_look > LEDGER_PROBE_EVERY and self._probing.acquire(blocking=False):
            try:
                self.store.head()
                self.ok()
            except LedgerError as exc:
                self.failed(exc)
            finally:
                self._probing.release()
        with self._lock:
            if self._failure is not None and time.monotonic() - self._last_ok > LEDGER_REACH_GRACE:
                return self._failure
        return None


class SNService(sn_pb2_grpc.SwarmNetworkServicer):
    def __init__(self, chain: Chain, node_id: str, stopping: threading.Event, liveness: Liveness | None = None,
                 etcd: EtcdLedger | None = None):
        self.chain = chain
        self.etcd = etcd
        self._joining = threading.Lock()  # one etcd member added at a time through this SN
        self.reach = LedgerReach(chain.store, shared=not isinstance(chain.store, SQLiteStore))
        self.node_id = node_id
        self.stopping = stopping
        self.liveness = liveness or MemoryLiveness()
        self.streams = StreamSlots()
        self.submits = CallBudget(SUBMIT_RATE, SUBMIT_BURST)
        self.reads = CallBudget(READ_RATE, READ_BURST)
        # (certificate fingerprint, number of trusted CAs) -> whether a trusted CA issued it. CAs are
        # only ever added, so their number tells whether the answer may have changed.
        self._trusted_issuer: dict[tuple[str, int], bool] = {}
        # section -> (what it was made for: ledger head, and a metrics page's contract and start; its JSON)
        self._bodies: dict[str, tuple[tuple, bytes]] = {}

    def _seen(self, node: str) -> None:
        self.liveness.seen(node)

    def _seen_ago(self) -> dict[str, float]:
        """Seconds since each node was last heard from (by this SN, or by any SN of a shared ledger)."""
        return self.liveness.seen_ago()

    def _caller(self, context) -> str:
        """The fingerprint of the caller's certificate, once the ledger vouches for it; any other
        caller is answered PERMISSION_DENIED. The TLS handshake only proved that a CA in this SN's
        --capath issued it: the swarm also wants that CA trusted on the ledger, the certificate not
        revoked, and a swarm identity in it (its SPIFFE URI, or an admin's map-cert)."""
        peer = pki.peer_identity(context)  # parsed, fingerprinted and read once per certificate
        if peer is None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          "no client certificate was presented; connect with the --cert and --key of a swarm node")
        cert, fp, ident = peer
        refused = revocation(fp, self.chain.state)
        if refused is not None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, refused)
        if not self._known_caller(cert, fp, ident):
            # A CA trusted, or a certificate mapped, through another SN of a shared ledger a moment ago
            # may not be folded here yet.
            self._fold_latest(context)
        state = self.chain.state
        if not self._issued_by_trusted_ca(cert, fp):
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"certificate {fp[:12]} ({pki.pki_subject(cert)}) is not issued by a CA this swarm trusts "
                          f"on its ledger; use a certificate of a trusted CA, or have an admin run `swarm admin "
                          f"trust-ca` for its CA")
        if ident is None and fp not in state.cert_map:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"certificate {fp[:12]} ({pki.pki_subject(cert)}) carries no swarm role and name; "
                          f"{pki.REISSUE_HINT}")
        return fp

    def _known_caller(self, cert, fp: str, ident: pki.SwarmId | None) -> bool:
        return self._issued_by_trusted_ca(cert, fp) and (ident is not None or fp in self.chain.state.cert_map)

    def _fold_latest(self, context) -> None:
        """Folds what other writers appended to the store since this SN last looked. A broken chain is
        answered DATA_LOSS; a store out of reach for a while, UNAVAILABLE (clients try another SN); a
        brief one leaves the state as folded so far. (Without the chain's lock: submits do not wait for
        this read of the store.)"""
        try:
            self.chain.catch_up()
            self.reach.ok()
            return
        except ChainBroken as exc:
            context.abort(grpc.StatusCode.DATA_LOSS, f"SN {self.node_id}: {broken_ledger(exc)}")
        except LedgerError as exc:
            self.reach.failed(exc)
            log.debug("answering from the folded state: the ledger cannot be read: %s", exc)
        self._require_ledger(context)

    def _require_ledger(self, context) -> None:
        """Answers UNAVAILABLE when this SN's shared store has been out of reach for a while: clients
        then move to another SN instead of taking stale state from this one for the swarm's."""
        why = self.reach.out_of_reach()
        if why is not None:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"SN {self.node_id} {LEDGER_OUT_OF_REACH}: {why}")

    def _issued_by_trusted_ca(self, cert, fp: str) -> bool:
        key = (fp, len(self.chain.state.cas))
        trusted = self._trusted_issuer.get(key)
        if trusted is None:
            with self.chain.lock:  # the CAs do not change while they are read
                trusted = issuer(self.chain.state, cert) is not None
            if len(self._trusted_issuer) >= TRUST_CACHE_SIZE:
                self._trusted_issuer.clear()
            self._trusted_issuer[key] = trusted
        return trusted

    def _within_rate(self, context, budget: CallBudget, fp: str, calls: str) -> None:
        wait = budget.take(fp)
        if wait:
            context.set_trailing_metadata((("swarm-retry-after", f"{wait:.3f}"),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"rate limit of {budget.rate:g} {calls}/s (bursts of {budget.burst}) for "
                          f"{caller_name(context, fp)} exceeded; retry in {wait:.2f} s and send fewer {calls}")

    def Submit(self, request, context):
        fp = self._caller(context)
        self._within_rate(context, self.submits, fp, "submits")
        try:
            tx = Tx.from_bytes(request.tx)
        except LedgerError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if tx.signer.cert_fp != fp:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"{tx.kind} is signed as {tx.signer.node} with a certificate other than the caller's; "
                          f"a node may only submit its own transactions")
        self._require_ledger(context)
        try:
            entry = self.chain.submit(SignedTx(tx, bytes(request.signature)))
        except AlreadyRecorded as exc:
            context.set_trailing_metadata((("swarm-tx-id", exc.tx_id), ("swarm-entry-index", str(exc.index))))
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except Rejected as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ChainBroken as exc:
            log.error("refused %s of %s: %s", tx.kind, tx.signer.node, broken_ledger(exc))
            context.abort(grpc.StatusCode.DATA_LOSS, f"SN {self.node_id} {REFUSAL_MARK}: {broken_ledger(exc)}")
        except LedgerError as exc:
            self._refuse_entry(context, tx, exc)
        self.reach.ok()
        self._seen(tx.signer.node)
        return sn_pb2.SubmitReply(index=entry.index, hash=entry.hash)

    def _refuse_entry(self, context, tx: Tx, exc: LedgerError) -> None:
        """A store that is out of reach is an outage (UNAVAILABLE without REFUSAL_MARK): the client
        sends the same signed transaction to another SN, and should it have landed here after all, the
        ledger answers the replay with the entry it made. Anything else is a refusal another SN would
        repeat (the head keeps moving, a full disk, an entry over the store's bound)."""
        if store_out_of_reach(exc):
            self.reach.failed(exc)
            log.warning("%s of %s not appended: %s %s", tx.kind, tx.signer.node, LEDGER_OUT_OF_REACH, exc)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"SN {self.node_id} {LEDGER_OUT_OF_REACH}: {exc}")
        log.error("refused %s of %s: the ledger cannot be written: %s", tx.kind, tx.signer.node, exc)
        context.abort(grpc.StatusCode.UNAVAILABLE, f"SN {self.node_id} {REFUSAL_MARK}: {exc}")

    def Heartbeat(self, request, context):
        fp = self._caller(context)
        self._within_rate(context, self.reads, fp, "queries and heartbeats")
        self._require_ledger(context)
        node = self.chain.state.nodes.get(request.node_id)
        if node is None or node.cert_fp != fp:
            self._fold_latest(context)  # registered through another SN a moment ago?
            node = self.chain.state.nodes.get(request.node_id)
        if node is None or node.cert_fp != fp:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"{request.node_id} is not registered with the caller's certificate; register first")
        self._seen(request.node_id)
        state = self.chain.state
        return sn_pb2.HeartbeatReply(head_index=state.head_index, head_hash=state.head_hash or "",
                                     sn_node_id=self.node_id)

    def Query(self, request, context):
        fp = self._caller(context)
        self._within_rate(context, self.reads, fp, "queries and heartbeats")
        section = request.section or "all"
        self._require_ledger(context)
        self._fold_latest(context)
        try:
            head, body = self._section_json(request, section)
        except KeyError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc.args[0]))
        except Rejected as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        # Liveness changes between polls of one head, so it is added to the section's JSON, not kept in it.
        body = body[:-1] + b', "last_seen": ' + json.dumps(self._seen_ago(), sort_keys=True).encode() + b"}"
        if len(body) > MAX_REPLY_BYTES:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the {section} state is {len(body)} bytes, more than the {MAX_REPLY_BYTES} a reply may "
                          f"carry; query a narrower section (info, nodes, contracts, tasks, taskrunners)")
        return sn_pb2.QueryReply(head_index=head, state_json=body)

    def _section_json(self, request, section: str) -> tuple[int, bytes]:
        """The ledger head and the JSON object of `section` at it, made once per head (and name asked
        about) and kept until the head moves, one per section. Under the chain's lock only the state is
        read, into new objects (the whole section's asdict copy, or the narrow answer); the JSON is
        made outside it, and metrics are read from the store outside it, so submits never wait for a
        reply to be written."""
        with self.chain.lock:
            state = self.chain.state
            head = state.head_index
            made_for = (head, request.contract, request.from_index)
            kept = self._bodies.get(section)
            if kept is not None and kept[0] == made_for:
                return head, kept[1]
            if section == "metrics":
                contract = state.contract(request.contract or "default")
                names = {contract.name} | ({"default"} if state.genesis and contract.name == state.genesis.get(
                    "default_contract") else set())
            elif section == "head":
                obj = {"head": {"head_index": head, "head_hash": state.head_hash}}
            elif section == "taskrunner":
                obj = taskrunner_progress(state, request.contract or "default")
            else:
                obj = state.to_obj(section)
        if section == "metrics":
            entries, following = metrics_page(self.chain.store, names, request.from_index, head)
            obj = {"metrics": {"contract": contract.name, "entries": entries, "next": following}}
        body = json.dumps(obj, sort_keys=True).encode()
        self._bodies[section] = (made_for, body)
        return head, body

    def Watch(self, request, context):
        who = self._caller(context)
        ticket = self.streams.acquire(who)
        if isinstance(ticket, str):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"watch of {caller_name(context, who)} refused: {ticket}")
        ended = threading.Event()

        def revoked() -> str | None:
            return revocation(who, self.chain.state)

        def over() -> bool:
            return (ended.is_set() or self.stopping.is_set() or revoked() is not None
                    or self.reach.out_of_reach() is not None)

        try:
            # Entries come from this SN's own chain as it folds them (its appends, and other SNs' through
            # its one follower of the store), not from a store watch per stream. The RPC's end (client
            # cancel, SN stop, broken connection) ends it within the chain's poll; the slot is freed when
            # this handler (and so its thread) is done. A revocation of the caller's certificate, or a
            # shared store out of reach, ends it too, within the same poll.
            context.add_callback(ended.set)
            self._require_ledger(context)
            batch = min(max(1, request.batch), WATCH_BATCH_ENTRIES)
            batches = self.chain.watch_batches(request.from_index, over, batch, max_bytes=WATCH_BATCH_BYTES)
            try:
                for rows in batches:
                    if revoked() is not None:
                        break
                    yield _entries_message(rows)
            except LedgerError as exc:
                # Clients take UNAVAILABLE for an outage and follow the ledger through another SN.
                self.reach.failed(exc)
                context.abort(grpc.StatusCode.UNAVAILABLE, f"SN {self.node_id} {LEDGER_OUT_OF_REACH}: {exc}")
            refused = revoked()
            if refused is not None:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"watch ended: {refused}")
            if not (ended.is_set() or self.stopping.is_set()):
                self._require_ledger(context)
        finally:
            self.streams.release(ticket)


    def Snapshot(self, request, context):
        """The snapshot of this SN's latest checkpoint (ledger/snapshot.py), made when it folded that
        checkpoint, in chunks. A read: counted against the caller's read rate, and it holds one of the
        caller's stream slots while it is sent."""
        who = self._caller(context)
        self._within_rate(context, self.reads, who, "queries and heartbeats")
        self._require_ledger(context)
        snap = self.chain.verifier.latest_snapshot
        if snap is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"SN {self.node_id} holds no checkpoint yet (one is written every "
                          f"{self.chain.checkpoint_every} entries); follow the ledger from entry 0")
        ticket = self.streams.acquire(who)
        if isinstance(ticket, str):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"snapshot for {caller_name(context, who)} refused: {ticket}")
        try:
            row = snap.checkpoint
            yield sn_pb2.SnapshotChunk(index=snap.index, size=len(snap.data), data=snap.data[:SNAPSHOT_CHUNK_BYTES],
                                       checkpoint=sn_pb2.LedgerEntry(index=row.index, hash=row.hash, body=row.body))
            for offset in range(SNAPSHOT_CHUNK_BYTES, len(snap.data), SNAPSHOT_CHUNK_BYTES):
                if self.stopping.is_set():
                    return
                yield sn_pb2.SnapshotChunk(data=snap.data[offset:offset + SNAPSHOT_CHUNK_BYTES])
        finally:
            self.streams.release(ticket)

    def JoinCluster(self, request, context):
        """Adds the calling SN's etcd member to the ledger's cluster as a learner (sn/cluster.py): only a
        caller the policy admits (ledger/policy.may_join_cluster), with a bounded request."""
        from swarmlearn.sn.cluster import ledger_cert_refusal, peer_url_refusal

        fp = self._caller(context)
        self._within_rate(context, self.submits, fp, "submits")
        if self.etcd is None or self.etcd.member is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"SN {self.node_id} runs no etcd member of its own; join through an SN started with "
                          f"--ledger etcd --sentinel or --sentinel-ip")
        self._fold_latest(context)  # registered through another SN a moment ago?
        refused = may_join_cluster(self.chain.state, fp)
        if refused is not None:
            log.warning("refused to add an etcd member for %s: %s", caller_name(context, fp), refused)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"join refused: {refused}")
        why = peer_url_refusal(request.peer_url)
        if why is not None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"join refused: {why}")
        why = ledger_cert_refusal(bytes(request.ledger_cert), self.etcd.cacert)
        if why is not None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"join refused: {why}")
        try:
            return self._add_learner(request.peer_url, caller_name(context, fp), context)
        except LedgerError as exc:
            code = grpc.StatusCode.UNAVAILABLE if store_out_of_reach(exc) else grpc.StatusCode.FAILED_PRECONDITION
            context.abort(code, f"SN {self.node_id} could not add the etcd member: {exc}")

    def _add_learner(self, peer_url: str, who: str, context) -> sn_pb2.JoinClusterReply:
        from swarmlearn.sn.cluster import MAX_MEMBERS

        store = self.chain.store
        with self._joining:
            members = store.members()
            same = [m for m in members if peer_url in m.peerURLs]
            if same and same[0].isLearner and not same[0].name:
                return _join_reply(same[0].ID, 0, members)  # a retry whose reply was lost: the same learner
            if same:
                context.abort(grpc.StatusCode.ALREADY_EXISTS,
                              f"join refused: member {same[0].name or same[0].ID} already listens at {peer_url}")
            if len(members) >= MAX_MEMBERS:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"join refused: the cluster has {len(members)} members, the most an SN adds "
                              f"({MAX_MEMBERS}); more slow every write and add no availability")
            added = store.add_learner(peer_url)
        log.info("added etcd member %x at %s for %s, as a learner", added.member.ID, peer_url, who)
        return _join_reply(added.member.ID, added.header.cluster_id, added.members)


def _entries_message(rows: list) -> sn_pb2.LedgerEntry:
    """One Watch message: the first of `rows`, carrying the rest (if any) in `following`."""
    first = rows[0]
    return sn_pb2.LedgerEntry(index=first.index, hash=first.hash, body=first.body, following=[
        sn_pb2.LedgerEntry(index=row.index, hash=row.hash, body=row.body) for row in rows[1:]])


def _join_reply(member_id: int, cluster_id: int, members) -> sn_pb2.JoinClusterReply:
    return sn_pb2.JoinClusterReply(member_id=member_id, cluster_id=cluster_id, members=[
        sn_pb2.ClusterMember(id=m.ID, name=m.name, peer_urls=list(m.peerURLs), client_urls=list(m.clientURLs),
                             is_learner=m.isLearner) for m in members])


@dataclass
class SNServer:
    """A serving SN. Its threads (the RPC workers, the marker's writer) belong to `background`;
    stop() ends the calls, joins those threads, writes the marker and closes the ledger."""

    server: grpc.Server
    chain: Chain
    node_id: str
    host: str
    port: int
    sentinel: bool
    background: Background
    marker: PinFile
    streams: StreamSlots | None = None
    # The SN's own etcd member, stopped after the SN (it may hold the only copy the others need).
    member: EtcdMember | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def stopping(self) -> threading.Event:
        return self.background.stopping

    def stop(self, grace: float = 1.0) -> None:
        self.stopping.set()
        self.server.stop(grace).wait()
        if self.streams is not None:
            self.streams.wait_closed(STOP_STREAMS_TIMEOUT)
        self.background.close(STOP_THREADS_TIMEOUT)
        self.marker.flush()  # the head acknowledged last, which the writer may not have reached
        self.chain.store.close()
        if self.member is not None:
            self.member.stop()

    def wait(self) -> None:
        self.server.wait_for_termination()


@dataclass(frozen=True)
class EtcdLedger:
    """A ledger shared by several SNs: the client URLs of an etcd cluster the user runs, the key prefix
    that holds this swarm's ledger, and the identity the SNs reach etcd with (mutual TLS): a certificate
    and key from a CA that issues to SNs only, and the CA(s) of the members. Never the swarm's own CA:
    etcd admits whoever its CA issued, and the swarm's CA issues to every node (ledger/etcd_store.py)."""

    endpoints: tuple[str, ...]
    cert: Path
    key: Path
    cacert: Path
    prefix: str = ETCD_PREFIX
    # With a plan, the SN runs its own member (sn/cluster.py) and `endpoints` start as that member's.
    member: MemberPlan | None = None

    @property
    def tls(self):
        from swarmlearn.ledger.etcd_store import TLSFiles

        return TLSFiles(self.cacert, self.cert, self.key)

    @classmethod
    def parse(cls, endpoints: str | None, prefix: str, cert: Path | None, key: Path | None,
              cacert: Path | None, member: MemberPlan | None = None) -> EtcdLedger:
        """From --etcd-endpoints (https://HOST:PORT or HOST:PORT, comma separated), --etcd-prefix and
        --etcd-cert/--etcd-key/--etcd-cacert; or, with `member` instead of endpoints, for an SN running
        its own member."""
        urls = tuple(url.strip() for url in (endpoints or "").split(",") if url.strip())
        if member is not None and urls:
            raise ConfigError("--etcd-endpoints names a cluster you run; leave it out for the SN to run its own "
                              "member (--sentinel, or --sentinel-ip to join), or leave those out")
        if not urls and member is None:
            raise ConfigError("--etcd-endpoints is empty; list the etcd cluster's client URLs, "
                              "e.g. https://10.0.0.1:2379,https://10.0.0.2:2379")
        for url in urls:
            scheme, _, rest = url.rpartition("://")
            if scheme not in ("", "https") or not rest.rpartition(":")[2].isdigit():
                raise ConfigError(f"--etcd-endpoints: {url!r} is not https://HOST:PORT (the SN speaks to etcd over "
                                  f"mutual TLS only); give each member's client URL")
        if not prefix.startswith("/") or prefix.endswith("/") or len(prefix) < 2:
            raise ConfigError(f"--etcd-prefix {prefix!r} must start with '/' and not end with one, e.g. "
                              f"{ETCD_PREFIX}")
        missing = [flag for flag, value in (("--etcd-cert", cert), ("--etcd-key", key), ("--etcd-cacert", cacert))
                   if value is None]
        if missing:
            raise ConfigError(f"{', '.join(missing)} missing: the etcd cluster is reached with an identity of its own, "
                              f"from a CA that issues to SNs only (e.g. `swarm gen-cert -e <swarm>-ledger --org "
                              f"<swarm>-ledger`), never with a certificate of the swarm's CA")
        return cls(urls, Path(cert), Path(key), Path(cacert), prefix, member)

    def describe(self) -> str:
        return f"etcd ledger {self.prefix} at {','.join(self.endpoints)}"

    def check_apart_from(self, swarm: pki.Identity) -> None:
        """Refuses an etcd identity that a CA of the swarm (its --capath) issued, or members' CAs that
        include one: any node certificate of the swarm could then reach etcd, or pose as a member."""
        etcd_cert = pki.load_cert(self.cert, "--etcd-cert")
        swarm_cas = {pki.cert_fingerprint(ca): ca for ca in swarm.cas}
        for ca in swarm_cas.values():
            if pki.issued_by(etcd_cert, ca):
                raise ConfigError(f"--etcd-cert {self.cert} is issued by {pki.pki_subject(ca)}, a CA of this swarm "
                                  f"(--capath): etcd would then admit any node certificate of the swarm, which could "
                                  f"rewrite the ledger; use a certificate of a CA that issues to SNs only")
        for _, ca in pki.load_ca_certs(self.cacert):
            if pki.cert_fingerprint(ca) in swarm_cas:
                raise ConfigError(f"--etcd-cacert {self.cacert} holds {pki.pki_subject(ca)}, a CA of this swarm "
                                  f"(--capath): any node certificate of the swarm could then pose as an etcd member; "
                                  f"give only the CA that issues to SNs and etcd members")

    def open_store(self, swarm: pki.Identity | None = None):
        """The store on the cluster; with `swarm` (the SN's own identity), after check_apart_from."""
        from swarmlearn.ledger.etcd_store import EtcdStore, TLSFiles

        if swarm is not None:
            self.check_apart_from(swarm)
        return EtcdStore(list(self.endpoints), self.prefix, TLSFiles(self.cacert, self.cert, self.key))


def member_endpoints(members, own: str) -> list[str]:
    """The client URLs the store uses: the SN's own member first, then every other voting member's."""
    others = [url for m in members if not m.isLearner for url in m.clientURLs if url != own]
    return [own, *others]


def follow_members(store, own: str, stopping: threading.Event) -> None:
    """Keeps the store's endpoints to the cluster's members (own first) until `stopping`."""
    while not stopping.wait(MEMBERS_REFRESH):
        try:
            store.use_endpoints(member_endpoints(store.members(), own))
        except LedgerError as exc:
            log.debug("cannot list the etcd cluster's members: %s", exc)


def follow_ledger(chain: Chain, stopping: threading.Event) -> None:
    """Folds the entries other SNs append to a shared ledger as soon as the store's watch brings them,
    so that this SN's Query, Heartbeat and the checks of its Submit see them, until `stopping`. Any
    failure (no quorum, a key that is no entry) is logged once and retried, waiting longer each time:
    this thread is the only one that folds other SNs' entries, so it must not end with a failure."""
    retry = None
    while not stopping.is_set():
        try:
            for row in chain.store.watch(chain.state.head_index + 1, stopping.is_set):
                if row.index > chain.state.head_index:  # else this SN appended it, or folded it already
                    chain.fold(row)
                if retry is not None:
                    log.info("following the ledger again at entry %d", chain.state.head_index)
                    retry = None
        except Exception as exc:  # noqa: BLE001  (logged; the loop is the handling)
            if retry is None:
                retry = FOLLOW_RETRY
                log.error("cannot follow the ledger after entry %d: %s; trying again, every %g s at first",
                          chain.state.head_index, exc if isinstance(exc, LedgerError) else repr(exc), retry,
                          exc_info=not isinstance(exc, LedgerError))
            else:
                retry = min(2 * retry, FOLLOW_RETRY_MAX)
            stopping.wait(retry)


def open_chain(data_dir: Path, identity: pki.Identity, node_id: str, address: str, sentinel: bool,
               new_swarm: bool = False, etcd: EtcdLedger | None = None) -> tuple[Chain, PinFile]:
    """Opens (or, for the sentinel, founds) this SN's ledger and makes sure it is recorded in it;
    returns it with its marker (swarm.json), which follows the ledger's head from then on. The ledger
    is data_dir's ledger.db, or with `etcd` the one under its prefix in that cluster, which other SNs
    share (the data dir then holds the marker only).

    A data dir that shows any trace of an earlier ledger (ledger.db, its -wal/-shm files, the
    swarm.json marker) is never given a new genesis unless `new_swarm`; a ledger that is shorter than,
    or differs from, what the marker says this SN acknowledged is refused (ledger/pin.py). A sentinel
    finding a ledger already under the prefix joins it rather than write a second genesis."""
    data_dir = Path(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{data_dir}: cannot create the SN data dir ({exc.strerror}); choose another --data-dir")
    marker = PinFile(data_dir / MARKER_FILE)
    names = (MARKER_FILE,) if etcd else (LEDGER_FILE, f"{LEDGER_FILE}-wal", f"{LEDGER_FILE}-shm", MARKER_FILE)
    traces = [name for name in names if (data_dir / name).exists()]
    store: LedgerStore = etcd.open_store(identity) if etcd else SQLiteStore(data_dir / LEDGER_FILE)
    where = etcd.describe() if etcd else str(data_dir / LEDGER_FILE)
    try:
        chain = Chain(store, checkpoint_every())
        _check_history(chain, data_dir, marker.load(), traces, new_swarm, where)
        _join_chain(chain, identity, node_id, address, sentinel, where)
        _keep_marker(chain, marker)
        chain.sign_checkpoint = lambda payload: sign_tx(identity, node_id, "checkpoint", payload)
    except BaseException:
        store.close()
        raise
    return chain, marker


def checkpoint_every() -> int:
    """How many entries apart this SN writes checkpoints: CHECKPOINT_EVERY, or SWARM_CHECKPOINT_EVERY
    (tests write them a few dozen entries apart)."""
    value = os.environ.get("SWARM_CHECKPOINT_EVERY", "")
    if not value:
        return CHECKPOINT_EVERY
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"SWARM_CHECKPOINT_EVERY={value!r} is not a whole number of entries (at least 1)")
    return int(value)


def _check_history(chain: Chain, data_dir: Path, marker: Pin | None, traces: list[str], new_swarm: bool,
                   where: str) -> None:
    if chain.state.genesis is None:
        if new_swarm:
            return
        if marker is not None:
            check_marker(marker, -1, lambda i: None, where, data_dir / MARKER_FILE)
        if traces:
            raise HistoryRefused(f"{data_dir}: holds traces of an earlier ledger ({', '.join(traces)}) but "
                                 f"{where} has no entries: its "
                                 f"history was erased or lost; restore it from a backup, or found a new swarm here "
                                 f"with `swarm sn --new-swarm` (nodes of the old one will refuse it)")
        return
    if new_swarm:
        log.warning("--new-swarm ignored: %s holds swarm %s (%d entries); this SN goes on with it", where,
                    chain.state.genesis.get("swarm_id"), chain.state.head_index + 1)
    if marker is not None:
        check_marker(marker, chain.state.head_index, lambda i: chain.store.read_raw(i, 1)[0].hash, where,
                     data_dir / MARKER_FILE)


def _keep_marker(chain: Chain, marker: PinFile) -> None:
    """Records the swarm and the acknowledged head in swarm.json: at once when the swarm is new here,
    then at most once a second as entries are appended (PinFile), off the append path. A crash loses
    at most that last second of marker, which only makes the check on restart less strict."""
    genesis, swarm_id = chain.store.read_raw(0, 1)[0].hash, chain.state.genesis.get("swarm_id", "")
    current = Pin(genesis, chain.state.head_index, chain.state.head_hash, swarm_id)
    if marker.pin is None or marker.pin.genesis_hash != genesis:
        marker.replace(current)  # founded here now, or a data dir from before markers
    else:
        marker.advance(current)
    chain.on_head = lambda index, digest: marker.advance(Pin(genesis, index, digest, swarm_id))


def genesis_tx(identity: pki.Identity, address: str) -> SignedTx:
    """The sentinel's first entry: the CAs this swarm trusts, each bound to its organization and the
    roles it may issue (the sentinel's own CA: every role; other CAs in its capath: every role but
    admin), the default contract and task runner, and the sentinel itself."""
    own_org = identity.swarm_id.org if identity.swarm_id else ""
    # Our own CA first, so that of two CAs naming one organization ours is the one kept.
    cas = sorted(identity.cas, key=lambda ca: (not pki.issued_by(identity.cert, ca), pki.cert_fingerprint(ca)))
    grants = []
    for ca in cas:
        org = pki.ca_organization(ca)
        if any(g["org"] == org for g in grants):
            log.warning("CA %s in --capath also issues for organization %s; only one CA per organization is "
                        "trusted, so its certificates are refused (issue them from the first CA with `swarm gen-cert "
                        "--ca-cert/--ca-key`, or give it another --org)", pki.pki_subject(ca), org)
            continue
        ours = pki.issued_by(identity.cert, ca) and org == own_org
        roles = list(pki.ROLES) if ours else [r for r in pki.ROLES if r != "admin"]
        grants.append({"cert": pki.cert_to_pem(ca).decode(), "org": org, "roles": roles})
    genesis = {
        "swarm_id": secrets.token_hex(8),
        "protocol": PROTOCOL_VERSION,
        "cas": grants,
        "default_contract": DEFAULT_CONTRACT,
        "default_taskrunner": DEFAULT_TASKRUNNER,
        "created": time.time(),
        "sn": registration(identity, address),
    }
    return sign_tx(identity, identity.name, "genesis", genesis)


def _join_chain(chain: Chain, identity: pki.Identity, node_id: str, address: str, sentinel: bool,
                where: str) -> None:
    """Founds the ledger (the sentinel, on an empty one) or registers this SN in the one `where` holds."""
    if chain.state.genesis is None:
        if not sentinel:
            raise ConfigError(f"{where}: holds no ledger and this SN is not the sentinel; start the first SN "
                              f"with --sentinel, then the others on the same ledger (--ledger etcd with the "
                              f"sentinel's --etcd-endpoints and --etcd-prefix)")
        try:
            chain.submit(genesis_tx(identity, address))
            return
        except Rejected:
            if chain.state.genesis is None:
                raise
            # Another sentinel founded this shared ledger first: join it, as any SN would.
            log.info("%s was founded by another SN meanwhile; joining it", where)
    state = chain.state
    ours = {pki.cert_fingerprint(ca): ca for ca in identity.cas}
    if not set(ours) & set(state.ca_fingerprints):
        raise ConfigError(f"{where}: holds the ledger of another swarm (swarm id "
                          f"{state.genesis['swarm_id']}, none of its CAs is in --capath); use an empty --data-dir "
                          f"(or another --etcd-prefix) for a new swarm, or the --capath of that swarm")
    if not is_registered(state.to_obj("nodes")["nodes"].get(node_id), identity, address):
        try:
            chain.submit(sign_tx(identity, node_id, "register_node", registration(identity, address, node_id)))
        except Rejected as exc:
            raise ConfigError(f"{where}: this SN cannot join its ledger: {exc}") from None
    for fp in sorted(set(ours) - set(state.ca_fingerprints)):
        # Trusting another organization is an admin's decision (`swarm admin trust-ca`), recorded on
        # the ledger with the roles granted; a CA file in an SN's capath grants nothing.
        log.warning("CA %s (%s) in --capath is not trusted by this swarm; its certificates are refused until "
                    "an admin runs `swarm admin trust-ca`", fp[:12], pki.pki_subject(ours[fp]))


def start_sn(*, host: str, port: int, identity: pki.Identity, data_dir: Path, sentinel: bool,
             node_id: str | None = None, new_swarm: bool = False, etcd: EtcdLedger | None = None) -> SNServer:
    """Starts an SN; returns once it is serving. Raises ConfigError/LedgerError on bad set-up. With
    `etcd`, the SN is one front end of the ledger that cluster holds, beside any other SNs on it."""
    node_id = identity.node_name("sn", node_id)
    background = Background(f"sn-{node_id}")
    try:
        return _serve(host, port, identity, data_dir, sentinel, node_id, new_swarm, etcd, background)
    except BaseException:
        background.close()
        raise


def _serve(host: str, port: int, identity: pki.Identity, data_dir: Path, sentinel: bool, node_id: str,
           new_swarm: bool, etcd: EtcdLedger | None, background: Background) -> SNServer:
    server = grpc.server(background.executor("rpc", MAX_WORKERS),
                         options=[("grpc.so_reuseport", 0),
                                  ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
                                  ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
                                  # Clients ping every 10 s (5 s when given several SNs) to notice a
                                  # dead SN: accept that, or gRPC's default (one ping per 5 min)
                                  # answers GOAWAY too_many_pings and every follower's stream breaks.
                                  ("grpc.http2.min_recv_ping_interval_without_data_ms", CLIENT_PING_MIN_MS),
                                  ("grpc.http2.max_ping_strikes", 0)])
    try:
        bound = server.add_secure_port(f"{host}:{port}", identity.server_credentials())
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise ConfigError(f"cannot listen on {host}:{port}: the port is in use or the address is not this "
                          f"host's; pick another --sn-api-port (0 lets the OS choose) or --host-ip")
    member = None
    if etcd is not None and etcd.member is not None:
        member, etcd = _start_own_member(etcd, data_dir, node_id, identity, f"{host}:{bound}")
    try:
        return _serve_ledger(server, host, bound, identity, data_dir, sentinel, node_id, new_swarm, etcd, background,
                             member)
    except BaseException:
        if member is not None:
            member.stop()
        raise


def _start_own_member(etcd: EtcdLedger, data_dir: Path, node_id: str, identity: pki.Identity,
                      address: str) -> tuple[EtcdMember, EtcdLedger]:
    """Starts (founds, joins or restarts) the SN's own etcd member; returns it and the ledger on it."""
    from swarmlearn.ledger.etcd_store import DEFAULT_MAX_ENTRY_BYTES
    from swarmlearn.sn.cluster import start_own_member

    etcd.check_apart_from(identity)  # before a member serves with that identity
    member = start_own_member(etcd.member, Path(data_dir), node_id, etcd.tls, identity, address,
                              DEFAULT_MAX_ENTRY_BYTES)
    return member, dataclasses.replace(etcd, endpoints=(member.client_url,))


def _serve_ledger(server: grpc.Server, host: str, bound: int, identity: pki.Identity, data_dir: Path,
                  sentinel: bool, node_id: str, new_swarm: bool, etcd: EtcdLedger | None, background: Background,
                  member: EtcdMember | None) -> SNServer:
    chain, marker = open_chain(data_dir, identity, node_id, f"{host}:{bound}", sentinel, new_swarm, etcd)
    marker.start(background)
    liveness = EtcdLiveness(chain.store, node_id, lambda: chain.state.nodes) if etcd else MemoryLiveness()
    liveness.start(background)
    if etcd:
        background.start("ledger-follower", follow_ledger, chain, background.stopping)
    if member is not None:
        # Fail over to the other members from the start, and to those that join later.
        try:
            chain.store.use_endpoints(member_endpoints(chain.store.members(), member.client_url))
        except LedgerError as exc:
            log.warning("cannot list the etcd cluster's members yet (%s); using this SN's own member", exc)
        background.start("etcd-members", follow_members, chain.store, member.client_url, background.stopping)
    service = SNService(chain, node_id, background.stopping, liveness, etcd)
    sn_pb2_grpc.add_SwarmNetworkServicer_to_server(service, server)
    server.start()
    return SNServer(server, chain, node_id, host, bound, sentinel, background, marker, service.streams, member)
