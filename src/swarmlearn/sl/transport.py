"""Peer-to-peer blob transfer between SLs: a store of blobs by hash, the gRPC service that serves
them in 1 MiB chunks over mutual TLS, and the fetch that pulls one from a peer."""

from __future__ import annotations

import threading
from collections import OrderedDict

import grpc

from swarmlearn import pki
from swarmlearn.errors import SwarmError
from swarmlearn.proto import sl_pb2, sl_pb2_grpc
from swarmlearn.tensors import blob_hash

CHUNK = 1 << 20
# The biggest single message we accept: a chunk plus room for framing.
MAX_MESSAGE = CHUNK + (64 << 10)


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
    def __init__(self, blobs: BlobStore):
        self.blobs = blobs

    def Fetch(self, request, context):
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

    def fetch(self, address: str, digest: str, timeout: float, size: int | None = None) -> bytes:
        """The blob with SHA-256 `digest` from the SL at `address`; raises FetchError if the peer
        does not answer, does not have it, or sends bytes that do not hash to `digest`. With `size`
        (as the ledger declares it), a peer announcing or sending more is cut off at once rather
        than read into memory."""
        if not address:
            raise FetchError("peer has no registered address")
        parts: list[bytes] = []
        expected = None
        received = 0
        try:
            stream = self._stub(address).Fetch(sl_pb2.FetchRequest(hash=digest), timeout=timeout)
            for chunk in stream:
                if expected is None:
                    expected = chunk.total_size
                received += len(chunk.data)
                if size is not None and max(expected, received) > size:
                    stream.cancel()
                    raise FetchError(f"peer sends more than the {size} bytes the ledger declares for "
                                     f"{digest[:12]}")
                parts.append(chunk.data)
        except grpc.RpcError as exc:
            raise FetchError(f"{exc.code().name}: {(exc.details() or '').splitlines()[0] if exc.details() else ''}") \
                from None
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
