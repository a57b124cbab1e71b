"""The wire of the local channel between an ML process and its SL: length-prefixed frames over a
Unix or TCP socket, standard library only, so that the ML side runs in any environment the model
code runs in (an old protobuf, no gRPC).

A frame is a fixed prefix (magic, header length, data length), a JSON object, and raw bytes:

    b"SWL1" | u32 header length (<= MAX_HEADER_BYTES) | u32 data length (<= MAX_DATA_BYTES) | JSON | data

Every length is checked against its bound before anything is read into memory, and nothing is ever
unpickled: headers are JSON, tensors are safetensors bytes. A blob bigger than one frame travels as
the data of consecutive frames, its total size declared up front and bounded by MAX_BLOB_BYTES.
"""

from __future__ import annotations

import json
import socket
import struct

from swarmlearn.defaults import CHUNK
from swarmlearn.errors import SwarmError

MAGIC = b"SWL1"
PREFIX = struct.Struct(">4sII")
MAX_HEADER_BYTES = 64 << 10
MAX_DATA_BYTES = CHUNK
# Far beyond any model trained on one host; the contract's own max_blob_bytes (4 GiB by default)
# is enforced by the SL's round engine after this.
MAX_BLOB_BYTES = 64 << 30
PROTOCOL = 1


class FrameError(SwarmError):
    """The other end sent something that is not a well-formed frame, or closed the connection."""


def connect(address: str, timeout: float | None) -> socket.socket:
    """A connected socket to `address`: "unix:/path", "unix-abstract:name" or "host:port"."""
    family, target = parse_address(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


def parse_address(address: str) -> tuple[int, object]:
    if address.startswith("unix:"):
        return socket.AF_UNIX, address[len("unix:"):]
    if address.startswith("unix-abstract:"):
        return socket.AF_UNIX, "\0" + address[len("unix-abstract:"):]
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise SwarmError(f"SWARM_SL_ADDR={address!r} is neither unix:/path nor host:port; use what `swarm sl` "
                         f"printed in its ready line")
    host = host.strip("[]") or "127.0.0.1"
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))


def send(sock: socket.socket, header: dict, data: bytes | memoryview = b"") -> None:
    raw = json.dumps(header, separators=(",", ":")).encode()
    if len(raw) > MAX_HEADER_BYTES or len(data) > MAX_DATA_BYTES:
        raise FrameError(f"frame too big to send ({len(raw)} header bytes, {len(data)} data bytes)")
    sock.sendall(PREFIX.pack(MAGIC, len(raw), len(data)) + raw)
    if len(data):
        sock.sendall(data)


def receive(sock: socket.socket) -> tuple[dict, bytes]:
    """The next frame's header and data; FrameError on anything malformed or a closed connection."""
    header, data_len = _receive_header(sock)
    return header, bytes(_read(sock, data_len))


def _receive_header(sock: socket.socket) -> tuple[dict, int]:
    """The next frame's header, and the length of the data that follows it (checked, not yet read)."""
    magic, header_len, data_len = PREFIX.unpack(_read(sock, PREFIX.size))
    if magic != MAGIC:
        raise FrameError("not a swarm local-channel frame (bad magic)")
    if header_len > MAX_HEADER_BYTES or data_len > MAX_DATA_BYTES:
        raise FrameError(f"frame declares {header_len} header and {data_len} data bytes, beyond the "
                         f"{MAX_HEADER_BYTES} and {MAX_DATA_BYTES} allowed")
    try:
        header = json.loads(_read(sock, header_len))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise FrameError("frame header is not JSON") from None
    if not isinstance(header, dict):
        raise FrameError("frame header is not a JSON object")
    return header, data_len


def send_blob(sock: socket.socket, header: dict, blob: bytes) -> None:
    """`header` (which declares the blob's size) with the blob's first chunk, then the rest."""
    view = memoryview(blob)
    send(sock, {**header, "size": len(blob)}, view[:MAX_DATA_BYTES])
    for start in range(MAX_DATA_BYTES, len(blob), MAX_DATA_BYTES):
        send(sock, {"op": "data"}, view[start:start + MAX_DATA_BYTES])


def receive_blob(sock: socket.socket, header: dict, first: bytes) -> bytearray:
    """The blob whose first frame (`header`, `first`) was just received. Each frame's data is appended
    to one buffer as it arrives, so that a large model is held once, not as chunks and then their join;
    the buffer grows with what is sent, never with what is declared (glibc grows a large one in place)."""
    size = header.get("size")
    if type(size) is not int or not 0 <= size <= MAX_BLOB_BYTES:
        raise FrameError(f"blob size {size!r} is not a whole number of bytes up to {MAX_BLOB_BYTES}")
    blob = bytearray(first)
    while len(blob) < size:
        more, data_len = _receive_header(sock)
        if more.get("op") != "data" or not data_len:
            raise FrameError(f"blob truncated: {len(blob)} of {size} bytes, then a {more.get('op')!r} frame")
        blob += _read(sock, data_len)
    if len(blob) != size:
        raise FrameError(f"blob is {len(blob)} bytes, its header declared {size}")
    return blob


def _read(sock: socket.socket, count: int) -> bytearray:
    buffer = bytearray(count)
    _read_into(sock, memoryview(buffer))
    return buffer


def _read_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], len(view) - got)
        if n == 0:
            raise FrameError("the other end closed the connection")
        got += n
