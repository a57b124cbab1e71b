"""Tensor sets as safetensors bytes, read and written with numpy only.

This is the one format tensors travel in between processes. Parsing is strict (bounded header, known
dtypes, offsets that tile the data exactly), and nothing is ever unpickled. bfloat16, which numpy
lacks, is carried as its raw 16-bit patterns and widened to float32 where arithmetic is needed.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass

import numpy as np

from swarmlearn.errors import SwarmError

MAX_HEADER_BYTES = 100 * 1024 * 1024

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items() if k != "BF16"}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class BlobError(SwarmError):
    """Bytes that are not a well-formed tensor set."""


@dataclass(frozen=True)
class Tensor:
    """A tensor as numpy data plus its safetensors dtype name (needed to tell BF16 from U16)."""

    dtype: str
    array: np.ndarray

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    def as_float64(self) -> np.ndarray:
        if self.dtype == "BF16":
            return (self.array.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return self.array.astype(np.float64)

    @classmethod
    def from_float(cls, dtype: str, values: np.ndarray, shape: tuple[int, ...]) -> Tensor:
        """Narrows float64 or float32 results back to `dtype` (round to nearest even for BF16)."""
        if dtype == "BF16":
            narrow = values.astype(np.float32, copy=False).reshape(shape)
            bits = narrow.view(np.uint32).astype(np.uint64)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            quiet_nan = (bits >> 16) | 0x0040  # rounding must not turn a NaN into an infinity or zero
            return cls(dtype, np.where(np.isnan(narrow), quiet_nan, rounded).astype(np.uint16))
        # Not copied when already of `dtype` (a float32 merge's sums become its result as they are).
        return cls(dtype, values.astype(_DTYPES[dtype], copy=False).reshape(shape))


def tensor(array: np.ndarray) -> Tensor:
    name = _NAMES.get(array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype)
    if name is None:
        raise BlobError(f"dtype {array.dtype} cannot travel as safetensors")
    return Tensor(name, array)


def blob_hash(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def encode(tensors: dict[str, Tensor]) -> bytes:
    """The tensor set as safetensors bytes, made in one allocation: the tensors' data is copied once,
    straight into the result (no per-tensor copy, no joined copy), so that a leader encoding a large
    merged model holds it and its bytes, not three times its size."""
    header: dict[str, dict] = {}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        size = t.array.nbytes
        header[name] = {"dtype": t.dtype, "shape": list(t.array.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns data to 8 bytes
    # bytes.join reads each array through the buffer protocol: a contiguous little-endian array is
    # not copied before the join (ascontiguousarray copies only one that is not).
    parts = [np.ascontiguousarray(tensors[n].array, dtype=_DTYPES[tensors[n].dtype]).reshape(-1).view(np.uint8)
             for n in sorted(tensors)]
    return b"".join([struct.pack("<Q", len(raw)), raw, *parts])


def decode(blob: bytes) -> dict[str, Tensor]:
    """Parses safetensors bytes; raises BlobError naming what is wrong."""
    if len(blob) < 8:
        raise BlobError("blob is shorter than a safetensors header")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(blob):
        raise BlobError(f"safetensors header length {header_len} does not fit the {len(blob)}-byte blob")
    try:
        header = json.loads(blob[8:8 + header_len])
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BlobError("safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise BlobError("safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data = memoryview(blob)[8 + header_len:]
    spans: list[tuple[int, int]] = []
    out: dict[str, Tensor] = {}
    for name, info in header.items():
        try:
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise BlobError(f"tensor {name!r}: header entry lacks dtype/shape/data_offsets") from None
        dtype = _DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise BlobError(f"tensor {name!r}: unsupported dtype {dtype_name!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise BlobError(f"tensor {name!r}: shape must be a list of non-negative integers")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= len(data)):
            raise BlobError(f"tensor {name!r}: data offsets [{begin}, {end}] fall outside the data")
        count = math.prod(shape)
        if count * dtype.itemsize != end - begin:
            raise BlobError(f"tensor {name!r}: shape {shape} of {dtype_name} needs {count * dtype.itemsize} bytes, "
                            f"header gives {end - begin}")
        spans.append((begin, end))
        try:
            out[name] = Tensor(dtype_name, np.frombuffer(data[begin:end], dtype=dtype).reshape(shape))
        except (ValueError, OverflowError):
            raise BlobError(f"tensor {name!r}: shape {shape} cannot be represented") from None
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise BlobError("safetensors data has gaps or overlapping tensors")
        position = end
    if position != len(data):
        raise BlobError("safetensors data has trailing bytes")
    return out
