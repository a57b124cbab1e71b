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
from functools import cached_property
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
    # The last ledger index at which it may be recorded (its validity window; ledger/state.py). Once the
    # ledger is past it the transaction can never be recorded, so the ledger forgets its id. None: a
    # transaction of a node from before windows (it never expires, and its id is kept for good).
    valid_until: int | None = None

    def to_obj(self) -> dict:
        obj = {
            "kind": self.kind,
            "payload": self.payload,
            "signer": self.signer.to_obj(),
            "nonce": self.nonce,
            "time": self.time,
        }
        if self.valid_until is not None:  # absent rather than null: older transactions keep their bytes
            obj["valid_until"] = self.valid_until
        return obj

    def signing_bytes(self) -> bytes:
        return self._signing_bytes

    # Made once per object: signing, the id, replay checks and the entry hash all ask for them, again
    # and again per append (the fields are frozen; the payload is never changed once signed).
    @cached_property
    def _signing_bytes(self) -> bytes:
        return canonical_json(self.to_obj())

    @cached_property
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
                valid_until=obj.get("valid_until"),
            )
        except (KeyError, TypeError) as exc:
            raise LedgerError(f"transaction lacks field {exc}") from None
        if not (isinstance(tx.kind, str) and isinstance(tx.payload, dict) and isinstance(tx.nonce, str)):
            raise LedgerError("transaction fields kind/payload/nonce have the wrong type")
        if not (isinstance(tx.signer.node, str) and isinstance(tx.signer.cert_fp, str)):
            raise LedgerError("transaction signer must have string node and cert_fp")
        if not isinstance(tx.time, (int, float)):
            raise LedgerError("transaction time must be a number")
        if "valid_until" in obj and not _is_index(tx.valid_until):
            raise LedgerError("transaction valid_until must be a ledger index (a whole number from 0 to 2**63-1)")
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


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


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
        return self._body_bytes

    @cached_property
    def _body_bytes(self) -> bytes:
        # canonical_json(self.to_obj()), with the transaction's canonical bytes (made already, for its
        # signature) put in place rather than made again: "tx" is the last of the sorted keys.
        head = canonical_json({"index": self.index, "prev_hash": self.prev_hash,
                               "signature": base64.b64encode(self.signature).decode()})
        return head[:-1] + b',"tx":' + self.tx.signing_bytes() + b"}"

    @cached_property
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
