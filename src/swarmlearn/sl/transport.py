"""Peer-to-peer blob transfer between SLs: a store of blobs by hash, the gRPC service that serves
them in 1 MiB chunks over mutual TLS, and the fetch that pulls one from a peer. A round's merged
model is also forwarded cut-through: an SL receiving it streams each chunk on to the peers waiting
on it as the chunk arrives (Arriving)."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from swarmlearn import pki
from swarmlearn.background import Background
from swarmlearn.defaults import BLOB_STORE_BYTES, CHUNK, MAX_MESSAGE
from swarmlearn.errors import SwarmError
from swarmlearn.proto import sl_pb2, sl_pb2_grpc
from swarmlearn.sn.server import StreamSlots, caller_name
from swarmlearn.tensors import blob_hash

log = logging.getLogger("swarmlearn.sl")

# Blob streams one peer (one certificate) may have open on an SL at once. An honest peer has one or
# two per contract (the leader pulling its contribution, it pulling a merged model); the cap leaves
# room for several contracts, while one peer reading slowly, or not at all, holds at most a quarter
# of the SL's 32 peer-RPC workers and cannot starve the others' fetches.
PEER_STREAMS_PER_CALLER = 8
# The longest an SL holds a peer's request for a merged model it does not have yet (whatever the
# peer asks for): a round's leader timeout at the default, with 20 MB/s, for about 1 GB of blobs.
MERGED_WAIT_MAX = 60.0


class FetchError(SwarmError):
    pass


class Arriving:
    """A labelled blob on its way here (a round's merged model coming down the tree): the fetch copies
    each chunk into `buffer` and calls `advanced`; peers waiting for the label follow it chunk by chunk
    (`chunks`), cut-through, instead of waiting for the whole blob. Its bytes are forwarded before
    anyone checked them: every peer checks the whole blob's hash against the ledger itself before
    use, so forwarding unverified bytes lets no bad blob in; a failed transfer (`fail`) ends the
    followers' streams with an error and they pull the blob another way."""

    def __init__(self, size: int, settled: Callable[[Arriving], None]):
        self.size = size
        self.buffer = bytearray(size)
        self.received = 0
        self.failed: str | None = None
        self._settled = settled
        self._changed = threading.Condition()

    def advanced(self, received: int) -> None:
        with self._changed:
            self.received = received
            self._changed.notify_all()

    def fail(self, why: str) -> None:
        with self._changed:
            self.failed = why
            self._changed.notify_all()
        self._settled(self)

    def chunks(self, stopping: threading.Event | None = None) -> Iterator[bytes]:
        """The blob's bytes in pieces of at most CHUNK, each as soon as it is here; raises FetchError
        once the transfer failed (or the SL stops). A stalled upstream is cut off by its fetch's own
        watchdog, which fails this too."""
        sent = 0
        while sent < self.size:
            with self._changed:
                while self.received == sent and self.failed is None:
                    if stopping is not None and stopping.is_set():
                        raise FetchError("this SL is stopping")
                    self._changed.wait(0.5)
                if self.failed is not None:
                    raise FetchError(f"its own transfer of this blob failed: {self.failed}")
                end = min(self.received, sent + CHUNK)
            # Bytes below `received` are written once and never again: read outside the lock.
            yield bytes(self.buffer[sent:end])
            sent = end


class BlobStore:
    """Blobs by SHA-256, newest kept: the oldest are dropped once they hold more than `budget` bytes
    in all or number more than `max_blobs` (the newest blob is kept even alone over the budget: a
    round's blob is bounded by its contract's max_blob_bytes, and the SL cannot serve what it dropped).
    A blob may be labelled, e.g. (contract, round) for a round's merged model, so that a peer can ask
    for it before its hash is known and be answered as soon as it is here (`wait_labelled`), or, while
    it arrives (`arriving`), chunk by chunk as it comes. A blob arriving counts against the budget for
    its announced size (within the caller's bound for that blob) from its first chunk on."""

    def __init__(self, budget: int = BLOB_STORE_BYTES, max_blobs: int = 64):
        self.budget = budget
        self.max_blobs = max_blobs
        self.held = 0  # bytes of all blobs held, and of those arriving
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self._labels: OrderedDict[tuple, str] = OrderedDict()
        self._arriving: dict[tuple, Arriving] = {}
        self._changed = threading.Condition()

    def arriving(self, label: tuple, size: int) -> Arriving:
        """Room for the blob labelled `label`, `size` bytes (bounded by the caller), about to arrive:
        peers waiting for the label follow it from now on. It ends when the blob is put with that label,
        or when it fails."""
        def settled(incoming: Arriving) -> None:
            with self._changed:
                if self._arriving.get(label) is incoming:
                    del self._arriving[label]
                    self.held -= incoming.size
                self._changed.notify_all()

        incoming = Arriving(size, settled)
        with self._changed:
            old = self._arriving.pop(label, None)
            if old is not None:
                self.held -= old.size
            self._arriving[label] = incoming
            self.held += size
            self._drop_oldest()
            self._changed.notify_all()
        return incoming

    def _drop_oldest(self) -> None:
        while len(self._blobs) > 1 and (self.held > self.budget or len(self._blobs) > self.max_blobs):
            self.held -= len(self._blobs.popitem(last=False)[1])

    def put(self, blob: bytes, label: tuple | None = None) -> str:
        digest = blob_hash(blob)
        with self._changed:
            if label is not None and label in self._arriving:  # it has arrived (or came another way)
                self.held -= self._arriving.pop(label).size
            if digest not in self._blobs:
                self.held += len(blob)
            self._blobs[digest] = blob
            self._blobs.move_to_end(digest)
            self._drop_oldest()
            if label is not None:
                self._labels[label] = digest
                self._labels.move_to_end(label)
                while len(self._labels) > self.max_blobs:
                    self._labels.popitem(last=False)
                self._changed.notify_all()
        return digest

    def get(self, digest: str) -> bytes | None:
        with self._changed:
            return self._blobs.get(digest)

    def wait_labelled(self, label: tuple, timeout: float,
                      stopping: threading.Event | None = None) -> bytes | Arriving | None:
        """The blob labelled `label`, or its Arriving while it comes, waiting up to `timeout` seconds
        for either (or until `stopping`); None if it does not come (or was dropped since)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                digest = self._labels.get(label)
                if digest is not None:
                    return self._blobs.get(digest)
                if label in self._arriving:
                    return self._arriving[label]
                left = deadline - time.monotonic()
                if left <= 0 or (stopping is not None and stopping.is_set()):
                    return None
                self._changed.wait(min(left, 0.5))


class PeerService(sl_pb2_grpc.SwarmPeerServicer):
    """Serves blobs by hash, and a round's merged model by (contract, round) as soon as this SL holds
    it. Each caller is known by the fingerprint of its verified certificate: it may have `per_caller`
    streams open at once (more are refused RESOURCE_EXHAUSTED; a wait for a merged model holds one), and
    gets only what it is entitled to: `refusal(fingerprint, digest)` and `merged_refusal(fingerprint,
    contract, round)` return why not, or None (the SL gives both). `workers` is the server's number of
    RPC threads; `stopping` ends the waits when the SL stops."""

    def __init__(self, blobs: BlobStore, refusal: Callable[[str, str], str | None] | None = None,
                 per_caller: int = PEER_STREAMS_PER_CALLER, workers: int = 32,
                 merged_refusal: Callable[[str, str, int], str | None] | None = None,
                 stopping: threading.Event | None = None):
        self.blobs = blobs
        self.refusal = refusal
        self.merged_refusal = merged_refusal
        self.stopping = stopping
        self.streams = StreamSlots(total=workers, per_identity=per_caller, kind="blob", server="SL",
                                   elsewhere="fetch the blob from another peer that holds it")

    def Fetch(self, request, context):
        yield from self._streamed(context, lambda caller: self._by_hash(request, context, caller))

    def FetchMerged(self, request, context):
        yield from self._streamed(context, lambda caller: self._merged(request, context, caller))

    def _streamed(self, context, find: Callable[[str], bytes | Arriving]):
        peer = pki.peer_certificate(context)
        caller = peer[1] if peer else ""
        ticket = self.streams.acquire(caller)
        if isinstance(ticket, str):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"blob stream of {caller_name(context, caller)} refused: {ticket}")
        try:
            found = find(caller)
            if not isinstance(found, Arriving):
                yield from _chunks(found)
                return
            try:
                for i, data in enumerate(found.chunks(self.stopping) if found.size else [b""]):
                    yield sl_pb2.Chunk(data=data, total_size=found.size if i == 0 else 0)
            except FetchError as exc:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"forwarding stopped: {exc}; pull it another way")
        finally:
            self.streams.release(ticket)

    def _by_hash(self, request, context, caller: str) -> bytes:
        if self.refusal is not None:
            why = self.refusal(caller, request.hash)
            if why:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        blob = self.blobs.get(request.hash)
        if blob is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no blob {request.hash[:12]} here")
        return blob

    def _merged(self, request, context, caller: str) -> bytes | Arriving:
        if self.merged_refusal is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this SL serves merged models by hash only")
        why = self.merged_refusal(caller, request.contract, request.round)
        if why:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        wait = min(max(request.wait_seconds, 0.0), MERGED_WAIT_MAX)
        blob = self.blobs.wait_labelled((request.contract, request.round), wait, self.stopping)
        if blob is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no merged model of round {request.round} here within "
                                                     f"{wait:g} s; fetch it by hash once the ledger has it")
        return blob


def _chunks(blob: bytes):
    view = memoryview(blob)
    yield sl_pb2.Chunk(data=bytes(view[:CHUNK]), total_size=len(blob))
    for start in range(CHUNK, len(blob), CHUNK):
        yield sl_pb2.Chunk(data=bytes(view[start:start + CHUNK]))


@dataclass(eq=False)
class _Transfer:
    """A fetch under way, as the watchdog sees it: the fetching thread updates `last` and `received`
    on every chunk; the watchdog sets `cut` (why) before it cancels the stream."""

    stream: grpc.Future
    stall: float
    min_rate: float
    started: float
    last: float
    received: int = 0
    cut: str | None = None

    def too_slow(self, now: float) -> str | None:
        """Why this transfer must be cut off now, or None while it makes enough progress."""
        if now - self.last > self.stall:
            return f"sent nothing for {self.stall:g} s ({self.received} bytes in all); transfer cut off"
        if now - self.started > self.stall and self.received < self.min_rate * (now - self.started):
            return (f"sent {self.received} bytes in {now - self.started:.1f} s, below the floor of "
                    f"{self.min_rate / 1e6:g} MB/s; transfer cut off")
        return None


class PeerFetcher:
    """Pulls blobs from other SLs; one channel per peer address, reused across rounds. One watchdog
    thread, of `background` (the SL's; without one the fetcher owns its own), cuts off every stalled or
    trickling transfer of this fetcher."""

    def __init__(self, identity: pki.Identity, background: Background | None = None):
        self.identity = identity
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()
        self._owns_background = background is None
        self._background = background or Background("peer-fetcher")
        self._transfers: set[_Transfer] = set()
        self._watched = threading.Condition()
        self._watchdog: threading.Thread | None = None

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = grpc.secure_channel(address, self.identity.channel_credentials(), options=[
                    ("grpc.max_receive_message_length", MAX_MESSAGE),
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000),
                ])
                self._channels[address] = channel
            return channel

    def _stub(self, address: str) -> sl_pb2_grpc.SwarmPeerStub:
        return sl_pb2_grpc.SwarmPeerStub(self._channel(address))

    def connect(self, addresses: list[str]) -> None:
        """Starts connecting to each of `addresses` not yet connected, without waiting, so that a later
        fetch finds its connection made. (gRPC's public ways to start a connection, channel_ready_future
        and subscribe, poll it from a thread of gRPC's own that outlives a closed channel; the channel's
        own connectivity check with try_to_connect starts it and returns at once.)"""
        for address in addresses:
            if address:
                try:
                    self._channel(address)._channel.check_connectivity_state(True)
                except (AttributeError, ValueError):  # another gRPC's internals, or closed meanwhile
                    pass

    def fetch(self, address: str, digest: str, timeout: float, size: int | None = None,
              stall: float | None = None, min_rate: float = 0.0, in_place: bool = False) -> bytes | bytearray:
        """The blob with SHA-256 `digest` from the SL at `address`; raises FetchError if the peer
        does not answer, does not have it, or sends bytes that do not hash to `digest`. A peer
        announcing or sending more than `size` (as the ledger declares it, within its contract's
        limit; the round engine always gives one) is cut off at once rather than read into memory.
        With `stall`, so is a peer that sends nothing for `stall` seconds (a frozen or silent peer: its
        TCP handshake may well succeed) or, after its first `stall` seconds, averages below `min_rate`
        bytes per second (a peer trickling bytes must not hold a leader for its whole budget).
        `in_place`: a bytearray, each chunk copied into it as it arrives, so that the blob is never
        held twice (for a leader's contributions, only decoded: gRPC messages need bytes)."""
        if not address:
            raise FetchError("peer has no registered address")
        blob, expected = self._receive(lambda stub: stub.Fetch(sl_pb2.FetchRequest(hash=digest), timeout=timeout),
                                       address, digest[:12], timeout, size, stall, min_rate, watch_at_once=True,
                                       into=bytearray if in_place else None)
        return _checked(blob, expected, digest)

    def fetch_merged(self, address: str, contract: str, number: int, timeout: float, size: int,
                     stall: float | None = None, min_rate: float = 0.0,
                     forward: Callable[[int], Arriving] | None = None) -> bytes | bytearray:
        """Round `number`'s merged model from the SL at `address`, which answers as soon as it holds
        it (waiting at most `timeout`). The bytes are NOT checked: the caller compares their hash with
        the ledger's. Bounded like `fetch`, except that the stall and rate limits count from the
        first byte (the wait before it is the point). `forward(announced size)`, called at the first
        chunk (the size within `size`), gives the Arriving the bytes go into as they come, for the
        peers that wait on us; a failure fails it too."""
        if not address:
            raise FetchError("peer has no registered address")
        request = sl_pb2.MergedRequest(contract=contract, round=number, wait_seconds=timeout)
        arriving: Arriving | None = None

        def into(total: int) -> bytearray:
            nonlocal arriving
            arriving = forward(total)
            return arriving.buffer

        try:
            blob, expected = self._receive(lambda stub: stub.FetchMerged(request, timeout=timeout), address,
                                           f"round {number}'s merged model", timeout, size, stall, min_rate,
                                           watch_at_once=False, into=into if forward else None,
                                           progress=lambda received: arriving.advanced(received))
            if expected is not None and len(blob) != expected:
                raise FetchError(f"got {len(blob)} of {expected} bytes")
        except BaseException as exc:
            if arriving is not None:
                arriving.fail(str(exc) or type(exc).__name__)
            raise
        return blob

    def _receive(self, call: Callable, address: str, what: str, timeout: float, size: int | None,
                 stall: float | None, min_rate: float, watch_at_once: bool,
                 into: Callable[[int], bytearray] | None = None,
                 progress: Callable[[int], None] | None = None) -> tuple[bytes | bytearray, int | None]:
        """Reads one blob stream: (its bytes, the size its first chunk announced). `into(announced
        size)`, once that size is checked against `size`, gives the buffer each chunk is copied into as
        it arrives (so that the blob is never held twice); `progress` is told the bytes in it so far."""
        parts: list[bytes] = []
        buffer: bytearray | None = None
        expected = None
        transfer = None
        try:
            stream = call(self._stub(address))
            now = time.monotonic()
            transfer = _Transfer(stream, stall or 0.0, min_rate, now, now)
            if stall and watch_at_once:
                self._watch(transfer)
            for chunk in stream:
                if expected is None:
                    expected = chunk.total_size
                    if stall and not watch_at_once:
                        transfer.started = transfer.last = time.monotonic()
                        self._watch(transfer)
                transfer.received += len(chunk.data)
                if size and max(expected, transfer.received) > size:
                    stream.cancel()
                    raise FetchError(f"peer sends more than the {size} bytes the ledger declares for {what}")
                if into is not None and buffer is None and size:  # announced size checked against `size` above
                    buffer = into(expected)
                if buffer is not None:
                    if transfer.received > len(buffer):
                        stream.cancel()
                        raise FetchError(f"peer sends more than the {len(buffer)} bytes it announced for {what}")
                    buffer[transfer.received - len(chunk.data):transfer.received] = chunk.data
                    if progress is not None:
                        progress(transfer.received)
                else:
                    parts.append(chunk.data)
                transfer.last = time.monotonic()
        except grpc.RpcError as exc:
            if transfer is not None and transfer.cut:
                raise FetchError(transfer.cut) from None
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                received = transfer.received if transfer is not None else 0
                raise FetchError(f"sent {received} bytes in {timeout:.1f} s and was cut off "
                                 f"(DEADLINE_EXCEEDED)") from None
            raise FetchError(f"{exc.code().name}: {(exc.details() or '').splitlines()[0] if exc.details() else ''}") \
                from None
        finally:
            if transfer is not None:
                with self._watched:
                    self._transfers.discard(transfer)
        if buffer is not None:
            return (buffer if transfer.received == len(buffer) else buffer[:transfer.received]), expected
        return b"".join(parts), expected

    def _watch(self, transfer: _Transfer) -> None:
        """Puts `transfer` under the watchdog, started with the first transfer that asks for one and
        again whenever it is not running (it ended once its owner stopped and no transfer was left)."""
        with self._watched:
            if self._watchdog is None or not self._watchdog.is_alive():
                try:
                    self._watchdog = self._background.start("fetch-watchdog", self._cut_off_stalled)
                except RuntimeError:
                    transfer.stream.cancel()
                    raise FetchError("this SL is stopping; transfer not started") from None
            self._transfers.add(transfer)
            self._watched.notify_all()

    def _cut_off_stalled(self) -> None:
        """The watchdog: every fifth of a second (or quarter of the shortest `stall`), cancels each
        transfer that makes too little progress, its reason kept for the fetch to report. It polices
        the transfers still under way once its owner stopped too, and ends when none is left then."""
        stopping = self._background.stopping
        while True:
            with self._watched:
                if not self._transfers and stopping.is_set():
                    self._watchdog = None  # decided under the lock: the next transfer starts a new one
                    return
                if not self._transfers:
                    self._watched.wait(1.0)
                    continue
                transfers = list(self._transfers)
            try:
                _cut_off(transfers, time.monotonic())
                pause = min(0.2, min(t.stall for t in transfers) / 4)
            except Exception:  # noqa: BLE001  (a watchdog that ended would leave every later transfer unpoliced)
                log.exception("fetch watchdog: checking %d transfers failed; checking again", len(transfers))
                pause = 0.2
            with self._watched:
                self._watched.wait(pause)

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
        with self._watched:
            self._watched.notify_all()
        if self._owns_background:
            self._background.close()


def _cut_off(transfers: list[_Transfer], now: float) -> None:
    for transfer in transfers:
        why = transfer.too_slow(now)
        if why and transfer.cut is None:
            transfer.cut = why
            transfer.stream.cancel()


def _checked(blob: bytes | bytearray, expected: int | None, digest: str) -> bytes | bytearray:
    if expected is not None and len(blob) != expected:
        raise FetchError(f"got {len(blob)} of {expected} bytes")
    if blob_hash(blob) != digest:
        raise FetchError(f"bytes hash to {blob_hash(blob)[:12]}, not to the {digest[:12]} on the ledger")
    return blob
