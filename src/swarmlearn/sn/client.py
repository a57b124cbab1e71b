"""The client every SL, SWOP and SWCI uses to talk to an SN: connect with certificates, submit signed
transactions, query the folded state, and follow the ledger (reconnecting on its own)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from swarmlearn import pki
from swarmlearn.background import Background
from swarmlearn.errors import (AlreadyRecorded, ConfigError, LedgerError, Rejected, SNLimitReached, SNUnavailable,
                               SwarmError)
from swarmlearn.ledger.entry import Entry, SignedTx
from swarmlearn.ledger.signatures import is_registered, registration, sign_tx
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
# Longest single call (the SN answers in milliseconds; this only bounds a stuck connection).
CALL_TIMEOUT = 10.0
# The SN's per-certificate bounds (submit rate, watch streams) are not outages: a call past one
# waits them out this long (a brief burst, our own old streams still closing) and then raises
# SNLimitReached instead of retrying on.
LIMIT_PATIENCE = 10.0
WATCH_LIMIT_PATIENCE = 5.0
# How often a watch's canceller looks whether its caller asked it to stop.
CANCEL_POLL = 0.25
# Never set: waiting on it is a sleep, for calls made without a stop event.
_NEVER = threading.Event()


class SNClient:
    def __init__(self, address: str, identity: pki.Identity, node_id: str | None = None,
                 unreachable_timeout: float | None = None):
        self.address = address
        self.identity = identity
        # The certificate's name; a role-less certificate needs the name an admin mapped it to.
        self.node_id = node_id or identity.node_name(None)
        self.unreachable_timeout = default_patience() if unreachable_timeout is None else unreachable_timeout
        self._channel = grpc.secure_channel(address, identity.channel_credentials(), options=[
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ])
        self._stub = sn_pb2_grpc.SwarmNetworkStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SNClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ plumbing

    def wait_ready(self, timeout: float | None = None) -> None:
        """Waits until the SN accepts our TLS handshake; raises SNUnavailable with the reason."""
        timeout = self.unreachable_timeout if timeout is None else timeout
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise SNUnavailable(f"no SN answered at {self.address} within {timeout:.0f} s: check --sn-ip/"
                                f"--sn-api-port, that `swarm sn` runs, and that its certificates come from a CA "
                                f"in {self.identity.capath} (and ours from a CA it trusts)") from None

    def _call(self, method: Callable, request, what: str, patience: float | None = None,
              stop: threading.Event | None = None):
        """Calls the SN, retrying an unreachable one for `patience` seconds (a stop set ends the
        wait between retries: a component shutting down does not sit out an SN outage)."""
        deadline = time.monotonic() + (self.unreachable_timeout if patience is None else patience)
        limited_until = min(deadline, time.monotonic() + LIMIT_PATIENCE)
        delay = 0.1
        while True:
            try:
                return method(request, timeout=CALL_TIMEOUT, wait_for_ready=False)
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    # Over the SN's submit rate: wait as long as it says, within LIMIT_PATIENCE.
                    wait = _retry_after(exc)
                    if wait is None or time.monotonic() + wait > limited_until:
                        raise _translate(exc, self.address, what) from None
                    if (stop or _NEVER).wait(min(max(wait, 0.02), 1.0)):
                        raise _translate(exc, self.address, what) from None
                    continue
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                        or time.monotonic() + delay > deadline or _is_refusal(exc):
                    raise _translate(exc, self.address, what) from None
                if (stop or _NEVER).wait(delay):
                    raise _translate(exc, self.address, what) from None
                delay = min(delay * 2, 2.0)

    # ---------------------------------------------------------------------------------------- API

    def submit(self, kind: str, payload: dict, patience: float | None = None) -> int:
        """Signs and submits a transaction; returns its entry index. A retry after a lost reply is
        recognised by the SN as the same transaction and answers with the entry already made.
        `patience` bounds how long an unreachable SN is retried (default: unreachable_timeout)."""
        return self.submit_signed(sign_tx(self.identity, self.node_id, kind, payload), patience)

    def submit_signed(self, signed: SignedTx, patience: float | None = None) -> int:
        request = sn_pb2.SignedTx(tx=signed.tx.signing_bytes(), signature=signed.signature)
        try:
            return self._call(self._stub.Submit, request, signed.tx.kind, patience).index
        except AlreadyRecorded as exc:
            return exc.index

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

    def heartbeat(self, stop: threading.Event | None = None) -> int:
        """Tells the SN we are alive; returns the ledger head index. An unreachable SN is retried
        until our patience runs out or `stop` is set."""
        return self._call(self._stub.Heartbeat, sn_pb2.HeartbeatRequest(node_id=self.node_id), "heartbeat",
                          stop=stop).head_index

    def keep_alive(self, background: Background, every: float) -> threading.Thread:
        """Heartbeats every `every` seconds, in a thread of `background`, until it closes, so that
        peers see this node as alive (the SN keeps last-seen times, not ledger entries)."""
        stop = background.stopping

        def beat() -> None:
            while not stop.wait(every):
                try:
                    self.heartbeat(stop)
                except SwarmError as exc:
                    if not stop.is_set():
                        log.warning("heartbeat to SN failed: %s", exc)

        return background.start("heartbeat", beat)

    def query(self, section: str = "all") -> dict:
        """The folded state of one section (all, info, nodes, contracts, tasks, taskrunners); contracts
        carry "metrics_count", and `metrics` reads the metrics themselves."""
        reply = self._call(self._stub.Query, sn_pb2.QueryRequest(section=section), f"query {section}")
        return json.loads(reply.state_json)

    def metrics(self, contract: str = "default", from_index: int = 0) -> tuple[list[dict], int]:
        """The metrics entries of `contract` recorded at ledger index `from_index` or later, read page by
        page, and the index to pass next time to read only newer ones."""
        entries: list[dict] = []
        while True:
            request = sn_pb2.QueryRequest(section="metrics", contract=contract, from_index=from_index)
            reply = self._call(self._stub.Query, request, f"metrics of contract {contract}")
            page = json.loads(reply.state_json)["metrics"]
            entries += page["entries"]
            if entries:
                from_index = max(from_index, entries[-1]["index"] + 1)
            if page["next"] is None:
                return entries, from_index
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
        stop = stop or threading.Event()
        owner = background or Background("sn-watch")
        canceller = _StreamCanceller(stop, owner)
        try:
            yield from self._follow(from_index, stop, raw, on_connect, canceller)
        finally:
            canceller.close()
            if background is None:
                owner.close(CANCEL_POLL * 4)

    def _follow(self, from_index: int, stop: threading.Event, raw: bool, on_connect: Callable[[int], None] | None,
                canceller: _StreamCanceller) -> Iterator[Entry] | Iterator[StoredEntry]:
        next_index = from_index
        last_hash: str | None = None
        down_since: float | None = None
        refused_since = refused_at = 0.0
        while not stop.is_set():
            attempt = time.monotonic()
            overlap = last_hash is not None
            stream = None
            try:
                if on_connect is not None:
                    on_connect(self._stub.Query(sn_pb2.QueryRequest(section="info"), timeout=CALL_TIMEOUT).head_index)
                stream = self._stub.Watch(sn_pb2.WatchRequest(from_index=next_index - 1 if overlap else next_index))
                canceller.follow(stream)
                for msg in stream:
                    if down_since is not None:
                        log.info("SN %s reachable again after %.1f s; following the ledger from entry %d",
                                 self.address, time.monotonic() - down_since, next_index)
                        down_since = None
                    if overlap:
                        overlap = False
                        if msg.index != next_index - 1 or msg.hash != last_hash:
                            raise LedgerError(f"SN {self.address} now serves another entry {next_index - 1} "
                                              f"({msg.hash[:12]}) than the one this node received "
                                              f"({last_hash[:12]}): its history was replaced; stop this node and "
                                              f"restore the SN's ledger, or use another SN of the swarm")
                        continue
                    row = StoredEntry(msg.index, msg.hash, bytes(msg.body))
                    if row.index != next_index:
                        raise LedgerError(f"SN {self.address} sent entry {row.index} when {next_index} was next")
                    if raw:
                        item = row
                    else:
                        item = row.entry()
                        if item.index != next_index or item.hash != msg.hash:
                            raise LedgerError(f"SN {self.address} sent entry {item.index} out of order or altered")
                    next_index += 1
                    last_hash = row.hash
                    yield item
            except grpc.RpcError as exc:
                if stop.is_set() or exc.code() == grpc.StatusCode.CANCELLED:
                    return
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    # A stream cap of the SN: not an outage. Our own old streams may still be closing
                    # after a reconnection, so retry for WATCH_LIMIT_PATIENCE, then give up clearly.
                    now = time.monotonic()
                    if now - refused_at > 2.0:
                        refused_since = now  # a new run of refusals: streams were accepted in between
                    refused_at = now
                    if now - refused_since > WATCH_LIMIT_PATIENCE:
                        raise _translate(exc, self.address, "watch") from None
                    stop.wait(0.5)
                    continue
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise _translate(exc, self.address, "watch") from None
                if down_since is not None and time.monotonic() - attempt > 2.0:
                    # The stream stood for a while on a quiet ledger before it broke: that was a
                    # reconnection, and this is a new outage, not the old one going on.
                    down_since = None
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("SN %s unreachable; reconnecting to follow the ledger from entry %d (for up "
                                "to %.0f s)", self.address, next_index, self.unreachable_timeout)
                elif time.monotonic() - down_since > self.unreachable_timeout:
                    raise _translate(exc, self.address, "watch") from None
                stop.wait(0.5)
            finally:
                canceller.follow(None)
                if stream is not None:
                    stream.cancel()


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


def _is_refusal(exc: grpc.RpcError) -> bool:
    # The SN answers UNAVAILABLE on purpose when its store cannot write: retrying will not help.
    return "refuses new entries" in (exc.details() or "")


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
    if code == grpc.StatusCode.UNAVAILABLE and _is_refusal(exc):
        return LedgerError(details)
    return SNUnavailable(f"{what}: SN at {address} unreachable ({code.name}: {details.splitlines()[0] if details else ''}); "
                         f"check the SN address and that its CA and ours trust each other")
