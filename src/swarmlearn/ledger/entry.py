"""Transactions and ledger entries, and the one canonical byte form that is hashed and signed.

A node signs a *transaction* (kind, payload, signer, nonce, time) with its certificate key. The SN
that accepts it wraps it in an *entry* that fixes its position: index and the previous entry's hash.
The entry hash covers the transaction and its signature, so editing any byte of any entry breaks the
chain from there on, and editing a transaction also breaks its signature.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from swarmlearn.errors import LedgerError

GENESIS_PREV_HASH = "0" * 64


def canonical_json(obj: Any) -> bytes:
    """The byte form everything is hashed and signed over: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Signer:
    """Who signed: the node id it speaks as, and the SHA-256 of its certificate (DER)."""

    node: str
    cert_fp: str

    def to_obj(self) -> dict:
        return {"node": self.node, "cert_fp": self.cert_fp}


@dataclass(frozen=True)
class Tx:
    kind: str
    payload: dict
    signer: Signer
    # Random per transaction, so that two identical requests are two transactions and a replayed
    # one is recognisable by its id.
    nonce: str = field(default_factory=lambda: secrets.token_hex(16))
    # The signer's wall clock, kept as data for people; the state machine never reads it.
    time: float = 0.0

    def to_obj(self) -> dict:
        return {
            "kind": self.kind,
            "payload": self.payload,
            "signer": self.signer.to_obj(),
            "nonce": self.nonce,
            "time": self.time,
        }

    def signing_bytes(self) -> bytes:
        return canonical_json(self.to_obj())

    @property
    def id(self) -> str:
        return sha256_hex(self.signing_bytes())

    @classmethod
    def from_obj(cls, obj: Any) -> Tx:
        if not isinstance(obj, dict):
            raise LedgerError("transaction is not a JSON object")
        try:
            signer = obj["signer"]
            tx = cls(
                kind=obj["kind"],
                payload=obj["payload"],
                signer=Signer(node=signer["node"], cert_fp=signer["cert_fp"]),
                nonce=obj["nonce"],
                time=obj["time"],
            )
        except (KeyError, TypeError) as exc:
            raise LedgerError(f"transaction lacks field {exc}") from None
        if not (isinstance(tx.kind, str) and isinstance(tx.payload, dict) and isinstance(tx.nonce, str)):
            raise LedgerError("transaction fields kind/payload/nonce have the wrong type")
        if not (isinstance(tx.signer.node, str) and isinstance(tx.signer.cert_fp, str)):
            raise LedgerError("transaction signer must have string node and cert_fp")
        if not isinstance(tx.time, (int, float)):
            raise LedgerError("transaction time must be a number")
        return tx

    @classmethod
    def from_bytes(cls, data: bytes) -> Tx:
        """Parses transaction bytes received from another process; they must already be canonical,
        because the signature was made over exactly these bytes."""
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise LedgerError(f"transaction is not valid JSON: {exc}") from None
        except RecursionError:
            raise LedgerError("transaction is nested too deeply to be read") from None
        tx = cls.from_obj(obj)
        try:
            canonical = tx.signing_bytes()
        except ValueError as exc:  # NaN or Infinity, which json.loads accepts and JSON does not have
            raise LedgerError(f"transaction is not valid JSON: {exc}") from None
        if canonical != data:
            raise LedgerError("transaction bytes are not in canonical form (sorted keys, no spaces)")
        return tx


@dataclass(frozen=True)
class SignedTx:
    tx: Tx
    signature: bytes


@dataclass(frozen=True)
class Entry:
    index: int
    prev_hash: str
    tx: Tx
    signature: bytes

    def to_obj(self) -> dict:
        return {
            "index": self.index,
            "prev_hash": self.prev_hash,
            "tx": self.tx.to_obj(),
            "signature": base64.b64encode(self.signature).decode(),
        }

    def body_bytes(self) -> bytes:
        """What a store keeps for this entry, byte for byte."""
        return canonical_json(self.to_obj())

    @property
    def hash(self) -> str:
        return sha256_hex(self.body_bytes())

    @classmethod
    def from_body_bytes(cls, data: bytes) -> Entry:
        try:
            obj = json.loads(data)
            entry = cls(
                index=obj["index"],
                prev_hash=obj["prev_hash"],
                tx=Tx.from_obj(obj["tx"]),
                signature=base64.b64decode(obj["signature"], validate=True),
            )
        except LedgerError:
            raise
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as exc:
            raise LedgerError(f"entry is not well formed: {exc!s}") from None
        if not isinstance(entry.index, int) or not isinstance(entry.prev_hash, str):
            raise LedgerError("entry index/prev_hash have the wrong type")
        return entry
