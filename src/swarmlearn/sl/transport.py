"""Peer-to-peer blob transfer between SLs: a store of blobs by hash, the gRPC service that serves
them in 1 MiB chunks over mutual TLS, and the fetch that pulls one from a peer."""

from __future__ import annotations

import threading
from collections.abc import Callable
import time
from collections import OrderedDict

import grpc

from swarmlearn import pki
from swarmlearn.errors import SwarmError
from swarmlearn.proto import sl_pb2, sl_pb2_grpc
from swarmlearn.sl.wire import CHUNK, MAX_MESSAGE
from swarmlearn.tensors import blob_hash


class FetchError(SwarmError):
    pass


class BlobStore:
    """Blobs by SHA-256, newest kept; old ones are dropped beyond `capacity` blobs."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, blob: bytes) -> str:
        digest = blob_hash(blob)
        with self._lock:
            self._blobs[digest] = blob
            self._blobs.move_to_end(digest)
            while len(self._blobs) > self.capacity:
                self._blobs.popitem(last=False)
        return digest

    def get(self, digest: str) -> bytes | None:
        with self._lock:
            return self._blobs.get(digest)


class PeerService(sl_pb2_grpc.SwarmPeerServicer):
    """Serves blobs by hash. With `refusal` (the SL gives one), each caller, known by the fingerprint
    of its verified certificate, gets only what it is entitled to: `refusal(fingerprint, digest)`
    returns why not, or None."""

    def __init__(self, blobs: BlobStore, refusal: Callable[[str, str], str | None] | None = None):
        self.blobs = blobs
        self.refusal = refusal

    def Fetch(self, request, context):
        if self.refusal is not None:
            peer = pki.peer_certificate(context)
            why = self.refusal(peer[1] if peer else "", request.hash)
            if why:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        blob = self.blobs.get(request.hash)
        if blob is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no blob {request.hash[:12]} here")
        view = memoryview(blob)
        yield sl_pb2.Chunk(data=bytes(view[:CHUNK]), total_size=len(blob))
        for start in range(CHUNK, len(blob), CHUNK):
            yield sl_pb2.Chunk(data=bytes(view[start:start + CHUNK]))


class PeerFetcher:
    """Pulls blobs from other SLs; one channel per peer address, reused across rounds."""

    def __init__(self, identity: pki.Identity):
        self.identity = identity
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def _stub(self, address: str) -> sl_pb2_grpc.SwarmPeerStub:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = grpc.secure_channel(address, self.identity.channel_credentials(), options=[
                    ("grpc.max_receive_message_length", MAX_MESSAGE),
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000),
                ])
                self._channels[address] = channel
            return sl_pb2_grpc.SwarmPeerStub(channel)

    def fetch(self, address: str, digest: str, timeout: float, size: int | None = None,
              stall: float | None = None, min_rate: float = 0.0) -> bytes:
        """The blob with SHA-256 `digest` from the SL at `address`; raises FetchError if the peer
        does not answer, does not have it, or sends bytes that do not hash to `digest`. A peer
        announcing or sending more than `size` (as the ledger declares it, within its contract's
        limit; the round engine always gives one) is cut off at once rather than read into memory.
        With `stall`, so is a peer that sends nothing for `stall` seconds (a frozen or silent peer: its
        TCP handshake may well succeed) or, after its first `stall` seconds, averages below `min_rate`
        bytes per second (a peer trickling bytes must not hold a leader for its whole budget)."""
        if not address:
            raise FetchError("peer has no registered address")
        parts: list[bytes] = []
        expected = None
        received = 0
        progress = [time.monotonic(), 0]  # when the last chunk came, bytes so far
        cut: list[str] = []
        done = threading.Event()
        try:
            stream = self._stub(address).Fetch(sl_pb2.FetchRequest(hash=digest), timeout=timeout)
            if stall:
                threading.Thread(target=_watchdog, args=(stream, stall, min_rate, progress, cut, done), daemon=True,
                                 name="fetch-watchdog").start()
            for chunk in stream:
                if expected is None:
                    expected = chunk.total_size
                received += len(chunk.data)
                if size and max(expected, received) > size:
                    stream.cancel()
                    raise FetchError(f"peer sends more than the {size} bytes the ledger declares for "
                                     f"{digest[:12]}")
                parts.append(chunk.data)
                progress[:] = [time.monotonic(), received]
        except grpc.RpcError as exc:
            if cut:
                raise FetchError(cut[0]) from None
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise FetchError(f"sent {received} bytes in {timeout:.1f} s and was cut off "
                                 f"(DEADLINE_EXCEEDED)") from None
            raise FetchError(f"{exc.code().name}: {(exc.details() or '').splitlines()[0] if exc.details() else ''}") \
                from None
        finally:
            done.set()
        blob = b"".join(parts)
        if expected is not None and len(blob) != expected:
            raise FetchError(f"got {len(blob)} of {expected} bytes")
        if blob_hash(blob) != digest:
            raise FetchError(f"bytes hash to {blob_hash(blob)[:12]}, not to the {digest[:12]} on the ledger")
        return blob

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()


def _watchdog(stream, stall: float, min_rate: float, progress: list, cut: list[str], done: threading.Event) -> None:
    """Cancels `stream` when it makes no progress for `stall` seconds or, after that long, runs below
    `min_rate` bytes per second; the reason goes into `cut` for the fetch to report."""
    started = time.monotonic()
    while not done.wait(min(0.2, stall / 4)):
        now = time.monotonic()
        last, received = progress
        if now - last > stall:
            cut.append(f"sent nothing for {stall:g} s ({received} bytes in all); transfer cut off")
        elif now - started > stall and received < min_rate * (now - started):
            cut.append(f"sent {received} bytes in {now - started:.1f} s, below the floor of "
                       f"{min_rate / 1e6:g} MB/s; transfer cut off")
        else:
            continue
        stream.cancel()
        return
