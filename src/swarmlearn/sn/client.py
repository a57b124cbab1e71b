"""The client every SL, SWOP and SWCI uses to talk to an SN: connect with certificates, submit signed
transactions, query the folded state, and follow the ledger (reconnecting on its own).

A client may be given several SNs (front ends of one replicated ledger). It talks to one at a time
and, when that one stops answering, moves to the next at once (round robin); it gives up only when
none has answered for its patience. Refusals (a rejected transaction, a limit) are answers, not
outages: they never move it."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import grpc

from swarmlearn import pki
from swarmlearn.background import Background
from swarmlearn.errors import (AlreadyRecorded, ConfigError, LedgerError, Rejected, SNLimitReached, SNUnavailable,
                               SwarmError)
from swarmlearn.ledger.entry import Entry, SignedTx, Signer, Tx
from swarmlearn.ledger.signatures import is_registered, registration
from swarmlearn.ledger.state import MAX_VALIDITY_WINDOW
from swarmlearn.ledger.store import StoredEntry
from swarmlearn.proto import sn_pb2, sn_pb2_grpc

log = logging.getLogger("swarmlearn.sn.client")

# How long a call keeps retrying while the SN is unreachable before giving up with SNUnavailable;
# SWARM_SN_PATIENCE (seconds) changes it for every component, e.g. to ride out longer SN restarts.
UNREACHABLE_TIMEOUT = 30.0


def default_patience() -> float:
    value = os.environ.get("SWARM_SN_PATIENCE", "")
    try:
        return float(value) if value else UNREACHABLE_TIMEOUT
    except ValueError:
        raise ConfigError(f"SWARM_SN_PATIENCE={value!r} is not a number of seconds") from None


def parse_sn_addresses(entries: str | Iterable[str], default_port: int | None, what: str) -> list[str]:
    """SN addresses as users give them: IP[:PORT] entries, each of which may itself be a comma
    separated list ("10.0.0.1:30304,10.0.0.2"); an entry without a port gets `default_port`. Returns
    "HOST:PORT" strings in the order given, each once. ConfigError naming `what` (the option, field
    or script line) for an empty entry, a missing or bad port."""
    addresses: list[str] = []
    for host, port in sn_address_parts(entries, what):
        if port is None:
            if default_port is None:
                raise ConfigError(f"{what}: {host!r} has no port; write IP:PORT")
            port = default_port
        if f"{host}:{port}" not in addresses:
            addresses.append(f"{host}:{port}")
    return addresses


def sn_address_parts(entries: str | Iterable[str], what: str) -> list[tuple[str, int | None]]:
    """The one reader of SN addresses: (host, port or None) of each IP[:PORT] entry, checked, for
    callers that learn the default port only later (a SWCI script, a SWOP profile's list)."""
    given = [entries] if isinstance(entries, str) else list(entries)
    parts = [_sn_address(entry.strip(), what, str(text)) for text in given for entry in str(text).split(",")]
    if not parts:
        raise ConfigError(f"{what}: no SN address given; name at least one SN as IP or IP:PORT")
    return parts


def _sn_address(entry: str, what: str, given: str) -> tuple[str, int | None]:
    if not entry:
        raise ConfigError(f"{what}: {given!r} has an empty entry; write IP[:PORT] entries separated by single "
                          f"commas, without spaces")
    if entry.startswith("[") and "]" in entry:  # [IPv6] or [IPv6]:PORT
        host, rest = entry[:entry.index("]") + 1], entry[entry.index("]") + 1:]
        port = rest[1:] if rest.startswith(":") else rest or None
    elif entry.count(":") > 1:
        raise ConfigError(f"{what}: {entry!r}: write an IPv6 address in brackets, [ADDRESS]:PORT")
    else:
        host, colon, port = entry.partition(":")
        port = port if colon else None
    if host in ("", "[]") or any(c.isspace() for c in host):
        raise ConfigError(f"{what}: {entry!r} is not IP or IP:PORT")
    if port is None:
        return host, None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{what}: {entry!r}: the port must be a number from 1 to 65535")
    return host, int(port)


# Longest single call (the SN answers in milliseconds; this only bounds a stuck connection). A client
# given several SNs gives one FAILOVER_CALL_TIMEOUT and then asks the next, so that a stuck SN costs
# seconds, not ten; its keepalive pings (as often as the SN accepts them: CLIENT_PING_MIN_MS in
# sn/server.py) find a stuck SN under an open watch stream within FAILOVER_KEEPALIVE_MS + 2 s.
CALL_TIMEOUT = 10.0
FAILOVER_CALL_TIMEOUT = 2.5
KEEPALIVE_MS = (10_000, 5_000)  # (ping after this much quiet, give up on an unanswered ping after)
FAILOVER_KEEPALIVE_MS = (5_000, 2_000)
# The SN's per-certificate bounds (submit rate, watch streams) are not outages: a call past one
# waits them out this long (a brief burst, our own old streams still closing) and then raises
# SNLimitReached instead of retrying on.
LIMIT_PATIENCE = 10.0
WATCH_LIMIT_PATIENCE = 5.0
# What the SN's UNAVAILABLE answers say (sn/server.py): it refuses the entry, or it cannot reach
# the store its ledger is in (other SNs of the swarm may).
REFUSAL_MARK = "refuses new entries"
LEDGER_OUT_OF_REACH = "cannot reach its ledger"
# How often a watch's canceller looks whether its caller asked it to stop.
CANCEL_POLL = 0.25
# The most entries a watch asks the SN to put in one message (sn/server.py bounds it too).
WATCH_BATCH = 256
# A transaction this client signs stays valid for this many ledger entries past the head it saw last
# (from any reply), then is refused as expired and forgotten by the ledger (ledger/state.py). A swarm of
# dozens of peers appends a few hundred entries a second, so a submit retried for the whole SN
# patience stays inside it; half the most the ledger allows leaves room for an SN that lags behind.
VALIDITY_WINDOW = MAX_VALIDITY_WINDOW // 2
# Never set: waiting on it is a sleep, for calls made without a stop event.
_NEVER = threading.Event()


class SNClient:
    """addresses: one SN ("IP:PORT"), several ("IP:PORT,IP:PORT"), or a list of them."""

    def __init__(self, addresses: str | Iterable[str], identity: pki.Identity, node_id: str | None = None,
                 unreachable_timeout: float | None = None):
        self.addresses = parse_sn_addresses(addresses, None, "SN address")
        self.identity = identity
        # The certificate's name; a role-less certificate needs the name an admin mapped it to.
        self.node_id = node_id or identity.node_name(None)
        self.unreachable_timeout = default_patience() if unreachable_timeout is None else unreachable_timeout
        several = len(self.addresses) > 1
        self._call_timeout = FAILOVER_CALL_TIMEOUT if several else CALL_TIMEOUT
        self._keepalive_ms = FAILOVER_KEEPALIVE_MS if several else KEEPALIVE_MS
        # Guards the SN in use, the lazily opened channels (one per SN) and the outage bookkeeping:
        # heartbeats, the ledger follower and round threads share one client.
        self._lock = threading.Lock()
        self._current = 0
        self._channels: dict[int, tuple[grpc.Channel, sn_pb2_grpc.SwarmNetworkStub]] = {}
        self._unreachable: set[int] = set()  # SNs found unreachable since one last answered
        self._all_down_said = False
        # With several SNs: the genesis hash of the ledger the first SN that answered serves, the SNs
        # found serving it, and the SNs refused for good (another ledger, or shorter than our pin).
        self._genesis: str | None = None
        self._vouched: set[int] = set()
        self._refused: dict[int, str] = {}
        self._closed = False
        self._head_seen: int | None = None  # the highest ledger index an SN's reply showed us
        self._last_submitted = float("-inf")  # time.monotonic() of our last accepted submit

    @property
    def address(self) -> str:
        """The SN this client talks to now."""
        return self.addresses[self._current]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channels, self._channels = list(self._channels.values()), {}
        for channel, _ in channels:
            channel.close()

    def __enter__(self) -> SNClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ plumbing

    def wait_ready(self, timeout: float | None = None) -> None:
        """Waits until the SN in use accepts our TLS handshake. When it fails one (or `timeout` passes)
        while another SN accepted, that one is used from then on; an SN merely slower than another
        keeps its turn. Raises SNUnavailable with the reason when none did."""
        timeout = self.unreachable_timeout if timeout is None else timeout
        with self._lock:
            current = self._current
            channels = {i: self._connection_at(i)[0] for i in range(len(self.addresses)) if i not in self._refused}
        handshakes = _Handshakes(channels)
        try:
            handshakes.wait(current, timeout)
        finally:
            handshakes.close()
        if current in handshakes.ready:
            return
        if not handshakes.ready:
            raise SNUnavailable(f"no SN answered at {', '.join(self.addresses)} within {timeout:.0f} s: check "
                                f"--sn-ip/--sn-api-port, that `swarm sn` runs, and that its certificates come from a "
                                f"CA in {self.identity.capath} (and ours from a CA it trusts)")
        reason = "TLS handshake failed" if current in handshakes.failed else f"no TLS handshake in {timeout:.0f} s"
        self._switch(current, reason, to=min(handshakes.ready))

    def _connection_at(self, index: int) -> tuple[grpc.Channel, sn_pb2_grpc.SwarmNetworkStub]:
        """The channel and stub of SN `index`, opened on first use. Call with the lock held."""
        if self._closed:
            raise SNUnavailable(f"the client of SN {self.addresses[index]} is closed")
        if index not in self._channels:
            ping_after, ping_timeout = self._keepalive_ms
            channel = grpc.secure_channel(self.addresses[index], self.identity.channel_credentials(), options=[
                ("grpc.keepalive_time_ms", ping_after),
                ("grpc.keepalive_timeout_ms", ping_timeout),
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2_000),
            ])
            self._channels[index] = (channel, sn_pb2_grpc.SwarmNetworkStub(channel))
        return self._channels[index]

    def _stub(self) -> tuple[int, sn_pb2_grpc.SwarmNetworkStub]:
        """The SN in use now (its index) and its stub."""
        with self._lock:
            return self._current, self._connection_at(self._current)[1]

    def _next_usable(self, index: int) -> int:
        """The SN after `index`, round robin, skipping refused ones (`index` itself if none other is
        left). Call with the lock held."""
        for step in range(1, len(self.addresses)):
            candidate = (index + step) % len(self.addresses)
            if candidate not in self._refused:
                return candidate
        return index

    def _switch(self, index: int, reason: str, to: int | None = None) -> None:
        """SN `index` did not answer: calls go to `to`, by default the next SN (round robin). One line
        per switch; once every SN failed, one line for that, and silence until one answers again."""
        with self._lock:
            if len(self.addresses) == 1 or self._current != index:
                return  # nowhere else to go, or another thread moved on already
            self._unreachable.add(index)
            self._current = self._next_usable(index) if to is None else to
            usable = len(self.addresses) - len(self._refused)
            if len(self._unreachable) < usable:
                log.warning("SN %s unreachable (%s); switching to SN %s", self.addresses[index], reason,
                            self.addresses[self._current])
            elif not self._all_down_said:
                self._all_down_said = True
                log.warning("no SN answers (%s); trying each in turn for up to %.0f s", ", ".join(self.addresses),
                            self.unreachable_timeout)

    def _after_outage(self, index: int, exc: grpc.RpcError, retries: _Retries, stop: threading.Event | None) -> bool:
        """SN `index` did not answer: the next call goes to the next SN at once, and only once every SN
        was tried does the caller pause (`retries`, growing). False when `stop` was set meanwhile."""
        self._switch(index, _reason(exc))
        retries.failures += 1
        if retries.failures % max(1, len(self.addresses) - len(self._refused)):
            return True
        if (stop or _NEVER).wait(retries.pause):
            return False
        retries.pause = min(retries.pause * 2, retries.longest)
        return True

    def _refuse(self, index: int, why: LedgerError) -> None:
        """SN `index` serves a ledger this client cannot use (another swarm's, or shorter than what it
        verified): with several SNs, it is left for good and the next one used, with one line; when no
        SN is left, or it is the only one, `why` is raised."""
        with self._lock:
            if len(self.addresses) == 1:
                raise why
            self._refused[index] = str(why)
            if len(self._refused) == len(self.addresses):
                raise LedgerError(f"{why}; every SN given ({', '.join(self.addresses)}) was refused") from None
            if self._current == index:
                self._current = self._next_usable(index)
            to = self.addresses[self._current]
        log.warning("SN %s refused: %s; switching to SN %s", self.addresses[index], why, to)

    def _check_same_ledger(self, index: int, stub: sn_pb2_grpc.SwarmNetworkStub) -> None:
        """With several SNs, each is asked once for the genesis hash of its ledger: the first to answer
        names the ledger, and another SN that serves a different one is refused (_refuse). gRPC errors
        are the caller's to handle, as those of the call it is about to make."""
        if len(self.addresses) == 1 or index in self._vouched:
            return
        reply = stub.Query(sn_pb2.QueryRequest(section="info"), timeout=self._call_timeout)
        genesis = json.loads(reply.state_json)["info"].get("genesis_hash")
        with self._lock:
            if self._genesis is None:
                self._genesis = genesis
            if genesis == self._genesis:
                self._vouched.add(index)
                return
            first = self._genesis
        self._refuse(index, LedgerError(f"it serves another ledger (genesis {str(genesis)[:12]}) than the SNs "
                                        f"before it (genesis {first[:12]}); give this node the SNs of one swarm"))

    def expect_ledger(self, genesis_hash: str) -> None:
        """The ledger this client's SNs must serve, when its caller knows it already (a follower's pin):
        then even the first SN to answer is refused if it serves another."""
        with self._lock:
            self._genesis = genesis_hash

    def _answered(self) -> None:
        """The SN in use answered: an outage, if there was one, is over."""
        if self._unreachable:  # unlocked peek: the common case costs nothing
            with self._lock:
                self._unreachable.clear()
                self._all_down_said = False

    def _call(self, method: str, request, what: str, patience: float | None = None,
              stop: threading.Event | None = None):
        """Calls `method` of the SN in use, moving on to the next SN when it is unreachable and
        retrying them all for `patience` seconds (a stop set ends the wait between rounds of retries:
        a component shutting down does not sit out an SN outage)."""
        deadline = time.monotonic() + (self.unreachable_timeout if patience is None else patience)
        limited_until = min(deadline, time.monotonic() + LIMIT_PATIENCE)
        retries = _Retries(pause=0.1, longest=2.0)
        while True:
            index, stub = self._stub()
            address = self.addresses[index]
            try:
                self._check_same_ledger(index, stub)
                if index in self._refused:
                    continue
                reply = getattr(stub, method)(request, timeout=self._call_timeout, wait_for_ready=False)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    # Over the SN's submit rate: wait as long as it says, within LIMIT_PATIENCE.
                    wait = _retry_after(exc)
                    if wait is None or time.monotonic() + wait > limited_until:
                        raise _translate(exc, address, what) from None
                    if (stop or _NEVER).wait(min(max(wait, 0.02), 1.0)):
                        raise _translate(exc, address, what) from None
                    continue
                if not _is_outage(exc) or time.monotonic() + retries.pause > deadline:
                    raise _translate(exc, address, what) from None
                if not self._after_outage(index, exc, retries, stop):
                    raise _translate(exc, address, what) from None
                continue
            self._answered()
            return reply

    # ---------------------------------------------------------------------------------------- API

    def submit(self, kind: str, payload: dict, patience: float | None = None) -> int:
        """Signs and submits a transaction; returns its entry index. A retry after a lost reply is
        recognised by the SN as the same transaction and answers with the entry already made.
        `patience` bounds how long an unreachable SN is retried (default: unreachable_timeout)."""
        return self.submit_signed(self.sign(kind, payload), patience)

    def sign(self, kind: str, payload: dict) -> SignedTx:
        """A transaction of this client's node, signed, valid for VALIDITY_WINDOW entries past the head
        seen last (asked of the SN first when this client has seen none)."""
        if self._head_seen is None:
            self.query("head")
        tx = Tx(kind=kind, payload=payload, signer=Signer(self.node_id, self.identity.fingerprint), time=time.time(),
                valid_until=self._head_seen + 1 + VALIDITY_WINDOW)
        return SignedTx(tx, self.identity.sign(tx.signing_bytes()))

    def _saw_head(self, index: int) -> None:
        if self._head_seen is None or index > self._head_seen:
            self._head_seen = index

    def submit_signed(self, signed: SignedTx, patience: float | None = None) -> int:
        request = sn_pb2.SignedTx(tx=signed.tx.signing_bytes(), signature=signed.signature)
        try:
            index = self._call("Submit", request, signed.tx.kind, patience).index
        except AlreadyRecorded as exc:
            index = exc.index
        self._saw_head(index)
        self._last_submitted = time.monotonic()
        return index

    def register(self, role: str, address: str = "", **info) -> int:
        """Enters the ledger as this client's node (its certificate's name, or the name an admin mapped
        it to). `role` is what the caller runs as: a certificate of another role is refused here, before
        the SN refuses it. A node the ledger holds already, with this certificate, address and info,
        is not entered again: returns the index of its registration, as if it had just been made."""
        self.identity.require_role(role.lower())
        known = self.query("nodes")["nodes"].get(self.node_id)
        if is_registered(known, self.identity, address, **info):
            return known["registered_at"]
        return self.submit("register_node", registration(self.identity, address, self.node_id, **info))

    def join_cluster(self, peer_url: str, ledger_cert: bytes) -> sn_pb2.JoinClusterReply:
        """Asks the SN to add this SN's etcd member (listening for its peers at `peer_url`, presenting
        `ledger_cert`) to the ledger's cluster as a learner; returns the members after the addition."""
        return self._call("JoinCluster", sn_pb2.JoinClusterRequest(peer_url=peer_url, ledger_cert=ledger_cert),
                          "join the etcd cluster")

    def heartbeat(self, stop: threading.Event | None = None) -> int:
        """Tells the SN we are alive; returns the ledger head index. An unreachable SN is retried
        until our patience runs out or `stop` is set."""
        head = self._call("Heartbeat", sn_pb2.HeartbeatRequest(node_id=self.node_id), "heartbeat",
                          stop=stop).head_index
        self._saw_head(head)
        return head

    def keep_alive(self, background: Background, every: float) -> threading.Thread:
        """Heartbeats every `every` seconds, in a thread of `background`, until it closes, so that
        peers see this node as alive (the SN keeps last-seen times, not ledger entries)."""
        stop = background.stopping

        def beat() -> None:
            while not stop.wait(every):
                if time.monotonic() - self._last_submitted < every:
                    continue  # the SN counts a submit as a sign of life: 32 busy peers spare it 32 calls a second
                try:
                    self.heartbeat(stop)
                except SwarmError as exc:
                    if not stop.is_set():
                        log.warning("heartbeat to SN failed: %s", exc)

        return background.start("heartbeat", beat)

    def query(self, section: str = "all", name: str = "") -> dict:
        """The folded state of one section (all, info, nodes, contracts, tasks, taskrunners, head);
        contracts carry "metrics_count", and `metrics` reads the metrics themselves. `name`: what a
        narrow section is about (see `taskrunner`)."""
        reply = self._call("Query", sn_pb2.QueryRequest(section=section, contract=name), f"query {section}")
        self._saw_head(reply.head_index)
        return json.loads(reply.state_json)

    def taskrunner(self, name: str = "default") -> dict:
        """What a wait for task runner `name` shows, in a reply that does not grow with the ledger:
        "taskrunner" (the runner and its assignment, without its history), "training" (per contract
        with a merged round: that round, and each node's latest metrics summary) and "last_seen"."""
        return self.query("taskrunner", name)

    def metrics(self, contract: str = "default", from_index: int = 0) -> tuple[list[dict], int]:
        """The metrics entries of `contract` recorded at ledger index `from_index` or later, read page by
        page, and the index to pass next time to read only newer ones."""
        entries: list[dict] = []
        while True:
            request = sn_pb2.QueryRequest(section="metrics", contract=contract, from_index=from_index)
            reply = self._call("Query", request, f"metrics of contract {contract}")
            self._saw_head(reply.head_index)
            page = json.loads(reply.state_json)["metrics"]
            entries += page["entries"]
            if page["next"] is None:  # read up to the head the page was made at: next time, only newer ones
                return entries, max(from_index, reply.head_index + 1)
            from_index = page["next"]

    def watch(self, from_index: int = 0, stop: threading.Event | None = None, *, raw: bool = False,
              on_connect: Callable[[int], None] | None = None,
              background: Background | None = None) -> Iterator[Entry] | Iterator[StoredEntry]:
        """Yields ledger entries from `from_index` on, forever or until `stop` is set. Reconnects
        after an SN restart and resumes at the next index, so nothing is seen twice or skipped.

        raw: yield each entry as the SN stores it (index, hash, body bytes), for a ChainVerifier.
        on_connect: called with the SN's head index each time a stream is (re)opened, so that a
        follower can refuse an SN whose ledger is shorter than what it verified.
        On a reconnection the last entry seen is asked for again, and an SN that now holds another
        entry there (its history was replaced) is refused with LedgerError.
        background: the component's owner of threads; one thread of it per call, however often the
        watch reconnects, cancels the open stream once `stop` is set (without one, the watch owns
        that thread itself), and the watch joins it when it ends."""
        for batch in self.watch_batches(from_index, stop, raw=raw, on_connect=on_connect, background=background):
            yield from batch

    def watch_batches(self, from_index: int = 0, stop: threading.Event | None = None, *, raw: bool = False,
                      on_connect: Callable[[int], None] | None = None,
                      background: Background | None = None) -> Iterator[list[Entry]] | Iterator[list[StoredEntry]]:
        """As watch(), but entries come in lists, as the SN sends them: one entry while this client keeps
        up, several after a burst (a follower folds them under one lock, and wakes its waiters once)."""
        stop = stop or threading.Event()
        owner = background or Background("sn-watch")
        canceller = _StreamCanceller(stop, owner)
        batches = self._follow(from_index, stop, raw, on_connect, canceller)
        try:
            for batch in batches:
                self._saw_head(batch[-1].index)
                yield batch
        finally:
            batches.close()  # its stream is cancelled now, not when the generator is collected
            canceller.close()
            if background is None:
                owner.close(CANCEL_POLL * 4)

    def snapshot(self) -> Iterator[sn_pb2.SnapshotChunk]:
        """The chunks of the SN's latest snapshot (ledger/snapshot.py), in order, as it sends them.
        gRPC's NOT_FOUND (the SN holds no checkpoint yet) and UNIMPLEMENTED (an SN from before
        snapshots) come through as grpc.RpcError, raised while iterating; an SN that stays
        unreachable, as SNUnavailable."""
        return self._call("Snapshot", sn_pb2.SnapshotRequest(), "snapshot")

    def _follow(self, from_index: int, stop: threading.Event, raw: bool, on_connect: Callable[[int], None] | None,
                canceller: _StreamCanceller) -> Iterator[list[Entry]] | Iterator[list[StoredEntry]]:
        cursor = _Cursor(from_index)
        outage: _Outage | None = None
        refusals = _StreamRefusals()
        while not stop.is_set():
            attempt = time.monotonic()
            index, stub = self._stub()
            address = self.addresses[index]
            stream = None

            def answered() -> None:
                nonlocal outage
                self._answered()
                if outage is not None:
                    outage.resumed(address, cursor.next_index)
                    outage = None

            try:
                if not self._admits(index, stub, on_connect):
                    continue
                overlap = cursor.last_hash is not None
                stream = stub.Watch(sn_pb2.WatchRequest(from_index=cursor.next_index - (1 if overlap else 0),
                                                        batch=WATCH_BATCH))
                canceller.follow(stream)
                yield from _batches(stream, cursor, overlap, address, raw, answered)
            except grpc.RpcError as exc:
                if stop.is_set() or exc.code() == grpc.StatusCode.CANCELLED:
                    return
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    refusals.wait_or_raise(exc, address, stop)
                    continue
                if not _is_outage(exc):
                    raise _translate(exc, address, "watch") from None
                if outage is not None and time.monotonic() - attempt > 2.0:
                    # The stream stood for a while on a quiet ledger before it broke: that was a
                    # reconnection, and this is a new outage, not the old one going on.
                    outage = None
                if outage is None:
                    outage = _Outage(address)
                    if len(self.addresses) == 1:
                        log.warning("SN %s unreachable; reconnecting to follow the ledger from entry %d (for up "
                                    "to %.0f s)", address, cursor.next_index, self.unreachable_timeout)
                elif time.monotonic() - outage.since > self.unreachable_timeout:
                    raise _translate(exc, address, "watch") from None
                if not self._after_outage(index, exc, outage.retries, stop):
                    return
            finally:
                canceller.follow(None)
                if stream is not None:
                    stream.cancel()

    def _admits(self, index: int, stub: sn_pb2_grpc.SwarmNetworkStub,
                on_connect: Callable[[int], None] | None) -> bool:
        """Before a watch stream is opened on SN `index`: it serves the ledger of the other SNs, and
        `on_connect` (the follower's pin) accepts its head. False when it was refused and another SN
        is next (_refuse raises when none is left)."""
        try:
            self._check_same_ledger(index, stub)
            if index not in self._refused and on_connect is not None:
                on_connect(stub.Query(sn_pb2.QueryRequest(section="info"), timeout=self._call_timeout).head_index)
        except LedgerError as exc:
            self._refuse(index, exc)
        return index not in self._refused


@dataclass
class _Retries:
    """How a caller retries SNs that do not answer: attempts failed so far, and the pause taken each
    time every SN was tried, growing up to `longest`."""

    pause: float
    longest: float
    failures: int = 0


class _Handshakes:
    """The TLS handshakes of several SNs' channels, followed through gRPC's connectivity states: which
    succeeded (READY) and which failed at least once (TRANSIENT_FAILURE)."""

    def __init__(self, channels: dict[int, grpc.Channel]):
        self.ready: set[int] = set()
        self.failed: set[int] = set()
        self._changed = threading.Condition()
        self._subscriptions = []
        for index, channel in channels.items():
            callback = self._callback(index)
            channel.subscribe(callback, try_to_connect=True)
            self._subscriptions.append((channel, callback))

    def _callback(self, index: int) -> Callable[[grpc.ChannelConnectivity], None]:
        def seen(state: grpc.ChannelConnectivity) -> None:
            with self._changed:
                if state == grpc.ChannelConnectivity.READY:
                    self.ready.add(index)
                elif state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN):
                    self.failed.add(index)
                self._changed.notify_all()
        return seen

    def wait(self, current: int, timeout: float) -> None:
        """Until SN `current` is ready, or it failed while another is ready, or `timeout`."""
        with self._changed:
            self._changed.wait_for(lambda: current in self.ready or (current in self.failed and self.ready),
                                   timeout)

    def close(self) -> None:
        for channel, callback in self._subscriptions:
            channel.unsubscribe(callback)


@dataclass
class _StreamRefusals:
    """A stream cap of the SN is not an outage, and moves the watch to no other SN. Our own old streams
    may still be closing after a reconnection, so a run of refusals is retried for WATCH_LIMIT_PATIENCE,
    then given up clearly."""

    since: float = 0.0
    last: float = 0.0

    def wait_or_raise(self, exc: grpc.RpcError, address: str, stop: threading.Event) -> None:
        now = time.monotonic()
        if now - self.last > 2.0:
            self.since = now  # a new run of refusals: streams were accepted in between
        self.last = now
        if now - self.since > WATCH_LIMIT_PATIENCE:
            raise _translate(exc, address, "watch") from None
        stop.wait(0.5)


@dataclass
class _Cursor:
    """Where a watch stands: the next index it yields and the hash of the last entry it yielded."""

    next_index: int
    last_hash: str | None = None


@dataclass
class _Outage:
    """A watch that lost its SN: since when, which SN, and how many attempts failed since."""

    lost: str
    since: float = field(default_factory=time.monotonic)
    retries: _Retries = field(default_factory=lambda: _Retries(pause=0.5, longest=0.5))

    def resumed(self, address: str, next_index: int) -> None:
        if address == self.lost:
            log.info("SN %s reachable again after %.1f s; following the ledger from entry %d", address,
                     time.monotonic() - self.since, next_index)
        else:
            log.info("following the ledger from entry %d on SN %s, %.1f s after losing SN %s", next_index, address,
                     time.monotonic() - self.since, self.lost)


def _batches(stream, cursor: _Cursor, overlap: bool, address: str, raw: bool,
             answered: Callable[[], None]) -> Iterator[list[Entry]] | Iterator[list[StoredEntry]]:
    """The entries of one Watch stream, a list per message, checked against `cursor` and advancing it.
    With `overlap`, the stream starts with the last entry already yielded, which must be the one this
    watch saw: an SN now holding another entry there serves another history (replaced, or another
    swarm's)."""
    for msg in stream:
        answered()
        batch = []
        for part in (msg, *msg.following):
            if overlap:
                overlap = False
                _check_overlap(part, cursor, address)
                continue
            batch.append(_next_entry(part, cursor, address, raw))
        if batch:
            yield batch


def _check_overlap(msg, cursor: _Cursor, address: str) -> None:
    if msg.index != cursor.next_index - 1 or msg.hash != cursor.last_hash:
        raise LedgerError(f"SN {address} now serves another entry {cursor.next_index - 1} "
                          f"({msg.hash[:12]}) than the one this node received "
                          f"({cursor.last_hash[:12]}): its history was replaced; stop this node and "
                          f"restore the SN's ledger, or use another SN of the swarm")


def _next_entry(msg, cursor: _Cursor, address: str, raw: bool) -> Entry | StoredEntry:
    """The entry `msg` carries, which must be the one `cursor` expects next; advances the cursor."""
    row = StoredEntry(msg.index, msg.hash, bytes(msg.body))
    if row.index != cursor.next_index:
        raise LedgerError(f"SN {address} sent entry {row.index} when {cursor.next_index} was next")
    if raw:
        item = row
    else:
        item = row.entry()
        if item.index != cursor.next_index or item.hash != msg.hash:
            raise LedgerError(f"SN {address} sent entry {item.index} out of order or altered")
    cursor.next_index += 1
    cursor.last_hash = row.hash
    return item


class _StreamCanceller:
    """Cancels a watch's current stream once `stop` is set, from one thread of `owner` started with
    the first stream and ended (and joined) with the watch: reconnections change the stream, not the
    thread."""

    def __init__(self, stop: threading.Event, owner: Background):
        self._stop = stop
        self._owner = owner
        self._lock = threading.Lock()
        self._stream = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def follow(self, stream) -> None:
        """`stream` is the one to cancel from now on (None: between attempts, nothing is open)."""
        with self._lock:
            self._stream = stream
        if stream is None:
            return
        if self._thread is None:
            try:
                self._thread = self._owner.start("sn-watch-canceller", self._run)
            except RuntimeError:  # the owner closed: its component is gone, so is this watch
                stream.cancel()
                return
        if self._stop.is_set():
            stream.cancel()  # set before the canceller could see this stream

    def _run(self) -> None:
        while not self._done.is_set():
            if self._stop.wait(CANCEL_POLL):
                with self._lock:
                    if self._stream is not None:
                        self._stream.cancel()
                return

    def close(self) -> None:
        self._done.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(CANCEL_POLL * 4)


def _is_outage(exc: grpc.RpcError) -> bool:
    """The SN did not answer (down, unreachable, stuck): another SN may. Everything else is an answer."""
    return exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and not _is_refusal(exc)


def _reason(exc: grpc.RpcError) -> str:
    details = (exc.details() or "").splitlines()
    return f"{exc.code().name}: {details[0][:120]}" if details else exc.code().name


def _is_refusal(exc: grpc.RpcError) -> bool:
    # The SN answers UNAVAILABLE on purpose when its ledger refuses the append (the head keeps
    # moving, a full disk): another SN would not do better. An SN cut off from a shared store
    # answers UNAVAILABLE without this mark (LEDGER_OUT_OF_REACH): that is an outage.
    return REFUSAL_MARK in (exc.details() or "")


def _retry_after(exc: grpc.RpcError) -> float | None:
    """The seconds the SN asks us to wait before retrying a rate-limited call; None if it did not."""
    value = dict(exc.trailing_metadata() or ()).get("swarm-retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _translate(exc: grpc.RpcError, address: str, what: str) -> Exception:
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return SNLimitReached(f"{what}: SN at {address}: {details.splitlines()[0] if details else 'limit reached'}")
    if code == grpc.StatusCode.ALREADY_EXISTS:
        meta = dict(exc.trailing_metadata() or ())
        return AlreadyRecorded(meta.get("swarm-tx-id", ""), int(meta.get("swarm-entry-index", -1)))
    if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.INVALID_ARGUMENT):
        return Rejected(f"{what}: {details}")
    if code == grpc.StatusCode.DATA_LOSS or (code == grpc.StatusCode.UNAVAILABLE and _is_refusal(exc)):
        return LedgerError(f"SN at {address}: {details}")
    if code == grpc.StatusCode.UNAVAILABLE and LEDGER_OUT_OF_REACH in details:
        return SNUnavailable(f"{what}: {details}")
    return SNUnavailable(f"{what}: SN at {address} unreachable ({code.name}: {details.splitlines()[0] if details else ''}); "
                         f"check the SN address and that its CA and ours trust each other")
