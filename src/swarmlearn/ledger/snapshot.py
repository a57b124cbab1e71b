"""Checkpoints and snapshots: how a follower starts from a recent state instead of entry 0.

Every CHECKPOINT_EVERY entries the SN that appends writes a `checkpoint` entry: {index, state_hash},
the SHA-256 of the *snapshot* of the state folded through entry `index`, which is always the entry
right before the checkpoint (the state machine refuses any other index, so of two SNs racing on a
shared store only the one whose compare-and-set wins lands a checkpoint; the other's is refused and
dropped). An SN checks the hash of every checkpoint it folds against its own state (ChainVerifier
with check_checkpoints), so it never serves a snapshot its own fold disagrees with, and keeps the
snapshot of the latest one, made once when it folds that checkpoint, to serve it.

The snapshot is one JSON document: the ledger state (every field of LedgerState and of the plain
dataclasses it holds) and the certificates the signature checker learned (fingerprint -> PEM),
which a follower needs to verify the entries that follow. Its bytes are the canonical JSON entries
are hashed in (sorted keys, no floats rewritten, ints stay ints), so equal states hash alike however
their dicts were filled (an SN folds its own transactions from memory, with the payload's key order,
and everyone else from the stored bytes, sorted); the state read back has its dicts in key order,
which no rule depends on. The hash is part of the protocol: a change to the encoding, or to the
state's fields, is a protocol change (model.PROTOCOL_VERSION), like a change to what a transaction
means.

Fields a protocol added: a field of the state's dataclasses declared with `metadata={"since": N}` (and a
default) is left out of the snapshot of a state whose ledger is of an older protocol
(LedgerState.protocol, read from its genesis), so that state hashes as it always did and the
checkpoints written under that protocol keep verifying. Reading such a snapshot back sets the field
to `metadata["derive"](the object read)` where the field follows from the others (a contract's count
of merged rounds, from the rounds a protocol-2 state keeps in full), else to its default. Nothing
else changes the encoding from one protocol to the next; a snapshot of a protocol this node does not
fold is refused.

What a follower checks before it uses a snapshot (accept_snapshot): see LedgerFollower's docstring
(sn/follower.py) for what this trusts compared with folding from genesis.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from cryptography import x509

from swarmlearn import pki
from swarmlearn.errors import LedgerError, Rejected
from swarmlearn.ledger import payloads as P
from swarmlearn.ledger.entry import Entry, Tx, canonical_json, sha256_hex
from swarmlearn.ledger.model import OLDEST_PROTOCOL, PROTOCOL_VERSION
from swarmlearn.ledger.store import StoredEntry

if TYPE_CHECKING:
    from swarmlearn.ledger.state import LedgerState

# The snapshot document's layout version: a reader refuses (and the follower folds from genesis) a
# format it does not know.
SNAPSHOT_FORMAT = 1
# How often the appending SN writes a checkpoint (entries); SWARM_CHECKPOINT_EVERY overrides it
# (tests use a few dozen).
CHECKPOINT_EVERY = 1000
# The largest snapshot a follower accepts: far above a long run's state, far below a reader's memory.
MAX_SNAPSHOT_BYTES = 512 << 20


# ------------------------------------------------------------------------------ the transaction

def validate_checkpoint(state: LedgerState, tx: Tx, p: P.Checkpoint) -> None:
    if p.index != state.head_index:
        raise Rejected(f"checkpoint of the state at entry {p.index}: only the state at the head "
                       f"({state.head_index}) may be checkpointed, by the entry right after it")


def apply_checkpoint(state: LedgerState, tx: Tx, p: P.Checkpoint, index: int) -> None:
    """Changes nothing but the head: the checkpoint is a claim about the state, checked by whoever
    can (ChainVerifier.check_checkpoints) and used by followers that start from it."""


# ------------------------------------------------------------------------------ the codec

class SnapshotError(LedgerError):
    """A snapshot that cannot be read or is not the one its checkpoint names."""


def _is_plain(tp) -> bool:
    """Whether values of type `tp` are already JSON as they stand (encoded as is, checked on decode)."""
    origin = typing.get_origin(tp)
    if tp in (str, int, float, bool, type(None), Any, dict, list):
        return True
    if origin in (dict, list):
        return all(_is_plain(a) for a in typing.get_args(tp)) and (origin is list or typing.get_args(tp)[0] is str)
    if origin in (typing.Union, types.UnionType):
        return all(_is_plain(a) for a in typing.get_args(tp))
    return False


@functools.cache
def _fields(cls, protocol: int) -> tuple[tuple[tuple[str, Any], ...], tuple[dataclasses.Field, ...]]:
    """Of dataclass `cls`'s fields: (name, type) of those a snapshot of a `protocol` state holds, and
    those later protocols added (left out of it)."""
    hints = typing.get_type_hints(cls)
    held = [f for f in dataclasses.fields(cls) if f.metadata.get("since", 0) <= protocol]
    added = [f for f in dataclasses.fields(cls) if f.metadata.get("since", 0) > protocol]
    return tuple((f.name, hints[f.name]) for f in held), tuple(added)


def _absent_value(f: dataclasses.Field, made) -> Any:
    derive = f.metadata.get("derive")
    if derive is not None:
        return derive(made)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def encode(value, tp, protocol: int = PROTOCOL_VERSION) -> Any:
    """`value` (of type `tp`) as JSON data: dataclasses as objects of their fields (those of `protocol`),
    dict keys as strings (int keys too), everything else as it is."""
    return _encoder(tp, protocol)(value)


def _same(value):
    return value


@functools.cache
def _encoder(tp, protocol: int) -> Callable[[Any], Any]:
    """The encoder of values of type `tp` in a `protocol` state, made once per type (a snapshot encodes
    thousands of rounds)."""
    if _is_plain(tp):
        return _same
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        named = [(name, _encoder(ftp, protocol)) for name, ftp in _fields(tp, protocol)[0]]
        return lambda v: None if v is None else {name: enc(getattr(v, name)) for name, enc in named}
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        enc = _encoder(inner, protocol)
        return lambda v: None if v is None else enc(v)
    if origin is dict:
        enc = _encoder(typing.get_args(tp)[1], protocol)
        return lambda v: {str(k): enc(x) for k, x in v.items()}
    if origin in (list, tuple):
        enc = _encoder(typing.get_args(tp)[0], protocol)
        return lambda v: [enc(x) for x in v]
    raise TypeError(f"the snapshot cannot encode a value of type {tp}; give the state plain data")


class _Misfit(Exception):
    """A value of a snapshot that is not of its field's type: the path to it grows as it unwinds."""

    def __init__(self, found, expected):
        super().__init__()
        self.path = ""
        self.found = type(found).__name__
        self.expected = expected

    def at(self, step: str) -> _Misfit:
        self.path = step + self.path
        return self


def decode(obj, tp, where: str, protocol: int = PROTOCOL_VERSION) -> Any:
    """The value of type `tp` that `encode` made `obj` from (in a `protocol` state); SnapshotError naming
    where it does not fit."""
    try:
        return _decoder(tp, protocol)(obj)
    except _Misfit as exc:
        raise SnapshotError(f"snapshot: {where}{exc.path} is {exc.found}, expected {exc.expected}") from None


_SCALARS = {str: (str,), int: (int,), float: (int, float), bool: (bool,), dict: (dict,), list: (list,)}


def _scalar(tp) -> Callable[[Any], Any]:
    kinds = _SCALARS[tp]

    def check(obj):
        # A str enum is a str (a state read back without JSON in between holds them); a bool is no int.
        if type(obj) in kinds or (isinstance(obj, kinds) and not isinstance(obj, bool)):
            return obj
        raise _Misfit(obj, tp.__name__)
    return check


@functools.cache
def _decoder(tp, protocol: int) -> Callable[[Any], Any]:
    """The decoder of values of type `tp` in a `protocol` state, made once per type: a snapshot holds
    thousands of rounds, and a follower reads one within its start-up second."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return _same
    if tp is type(None):
        return lambda obj: obj if obj is None else _raise(_Misfit(obj, "null"))
    if tp in _SCALARS:
        return _scalar(tp)
    if dataclasses.is_dataclass(tp):
        return _dataclass_decoder(tp, protocol)
    if origin in (typing.Union, types.UnionType):
        options = [_decoder(a, protocol) for a in typing.get_args(tp)]
        return lambda obj: _first_fit(obj, options, tp)
    if origin is dict:
        ktp, vtp = typing.get_args(tp)
        key, value = (int if ktp is int else _same), _decoder(vtp, protocol)
        return lambda obj: _items(_expect_type(obj, dict), key, value)
    if origin in (list, tuple):
        item = _decoder(typing.get_args(tp)[0], protocol)
        made = tuple if origin is tuple else list
        return lambda obj: made(_each(_expect_type(obj, list), item))
    raise TypeError(f"the snapshot cannot decode a value of type {tp}; give the state plain data")


def _scalar_kinds(tp) -> tuple[type, ...] | None:
    """The exact types a scalar field (or an optional one) may hold, None for any other field."""
    if tp in _SCALARS and tp not in (dict, list):
        return _SCALARS[tp]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        parts = [_scalar_kinds(a) if a is not type(None) else (type(None),) for a in typing.get_args(tp)]
        return None if None in parts else tuple(k for part in parts for k in part)
    return None


def _dataclass_decoder(cls, protocol: int) -> Callable[[Any], Any]:
    # Scalar fields are checked inline, the rest decoded: most of a snapshot is scalar fields of rounds.
    held, absent = _fields(cls, protocol)
    plan = [(name, _scalar_kinds(ftp), _decoder(ftp, protocol)) for name, ftp in held]
    names = frozenset(name for name, _, _ in plan)
    expected = f"an object of fields {', '.join(sorted(names))}"

    def decode_one(obj):
        if type(obj) is not dict or obj.keys() != names:
            raise _Misfit(obj, expected)
        values = {}
        for name, kinds, dec in plan:
            value = obj[name]
            if kinds is not None and type(value) in kinds:
                values[name] = value
                continue
            try:
                values[name] = dec(value)
            except _Misfit as exc:
                raise exc.at(f".{name}") from None
        made = cls.__new__(cls)
        made.__dict__.update(values)  # frozen dataclasses too: nothing else is set on them
        for f in absent:  # what a later protocol added, after the fields it may follow from
            made.__dict__[f.name] = _absent_value(f, made)
        return made
    return decode_one


def _items(obj: dict, key, value) -> dict:
    try:
        return {key(k): value(v) for k, v in obj.items()}
    except (_Misfit, ValueError):
        for k, v in obj.items():  # the failure again, now to say where
            try:
                key(k)
            except ValueError:
                raise _Misfit(k, "an integer key").at(f"[{k!r}]") from None
            try:
                value(v)
            except _Misfit as exc:
                raise exc.at(f"[{k!r}]") from None
        raise


def _each(obj: list, item) -> list:
    try:
        return [item(v) for v in obj]
    except _Misfit:
        for i, v in enumerate(obj):
            try:
                item(v)
            except _Misfit as exc:
                raise exc.at(f"[{i}]") from None
        raise


def _first_fit(obj, options, tp):
    for option in options:
        try:
            return option(obj)
        except _Misfit:
            continue
    raise _Misfit(obj, str(tp))


def _expect_type(obj, kind: type):
    if type(obj) is not kind:
        raise _Misfit(obj, kind.__name__)
    return obj


def _raise(exc: Exception):
    raise exc


def _expect(obj, kind: type, where: str) -> None:
    if not isinstance(obj, kind):
        raise SnapshotError(f"snapshot: {where} is {type(obj).__name__}, expected {kind.__name__}")


def state_to_obj(state: LedgerState) -> dict:
    return encode(state, type(state), state.protocol)


def state_from_obj(cls, obj) -> LedgerState:
    return decode(obj, cls, "state", _protocol_of(obj))


def _protocol_of(obj) -> int:
    """The protocol of the ledger a snapshot's state comes from, as its genesis records it (before
    genesis: this node's); SnapshotError for one this node does not fold."""
    genesis = obj.get("genesis") if isinstance(obj, dict) else None
    if not isinstance(genesis, dict):
        return PROTOCOL_VERSION  # the decoder says what does not fit
    protocol = genesis.get("protocol")
    if type(protocol) is not int or not OLDEST_PROTOCOL <= protocol <= PROTOCOL_VERSION:
        raise SnapshotError(f"snapshot of a ledger of protocol {protocol!r}; this node folds protocols "
                            f"{OLDEST_PROTOCOL} to {PROTOCOL_VERSION}")
    return protocol


# ------------------------------------------------------------------------------ the document

def document_bytes(state: LedgerState, certs: dict[str, x509.Certificate]) -> bytes:
    """The snapshot of a verifier: its state and the certificates it checks signatures with, in
    the one byte form whose SHA-256 checkpoints carry."""
    doc = {"format": SNAPSHOT_FORMAT, "state": state.to_snapshot(),
           "certs": {fp: pki.cert_to_pem(cert).decode() for fp, cert in certs.items()}}
    return canonical_json(doc)


def read_document(data: bytes, state_cls) -> tuple[LedgerState, dict[str, x509.Certificate]]:
    """The state and certificates of a snapshot document; SnapshotError if it is not one."""
    # Reading makes hundreds of thousands of objects that all live on: the cycle collector, which would
    # walk them again and again meanwhile, is paused (it halves a follower's start-up on a long ledger).
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _read_document(data, state_cls)
    finally:
        if collecting:
            gc.enable()


def _read_document(data: bytes, state_cls) -> tuple[LedgerState, dict[str, x509.Certificate]]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise SnapshotError(f"snapshot is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != SNAPSHOT_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise SnapshotError(f"snapshot format {found!r} is not {SNAPSHOT_FORMAT}, the one this node reads")
    certs = {}
    for fp, pem in _expected_dict(doc.get("certs"), "certs").items():
        try:
            cert = pki.cached_cert(pem)
        except (ValueError, TypeError):
            raise SnapshotError(f"snapshot: certificate {fp[:12]} is not a PEM certificate") from None
        if pki.cert_fingerprint(cert) != fp:
            raise SnapshotError(f"snapshot: certificate listed as {fp[:12]} has another fingerprint")
        certs[fp] = cert
    return state_cls.from_snapshot(doc.get("state")), certs


def _expected_dict(obj, where: str) -> dict:
    _expect(obj, dict, where)
    return obj


@dataclass(frozen=True)
class Snapshot:
    """A snapshot as an SN serves it: the state folded through entry `index`, serialised (`data`,
    whose SHA-256 is `state_hash`), and the checkpoint entry (index + 1) that names that hash."""

    index: int
    data: bytes
    state_hash: str
    checkpoint: StoredEntry


def checkpoint_claim(entry: Entry) -> tuple[int, str] | None:
    """(index, state_hash) a checkpoint entry states, None for any other entry or a malformed payload
    (which the state machine refuses anyway)."""
    if entry.tx.kind != "checkpoint":
        return None
    index, claimed = entry.tx.payload.get("index"), entry.tx.payload.get("state_hash")
    if not isinstance(index, int) or not isinstance(claimed, str):
        return None
    return index, claimed


def accept_snapshot(snap: Snapshot, trusted_cas: list[x509.Certificate], state_cls,
                    verify: Callable[[x509.Certificate, bytes, bytes], bool] = pki.verify_signature
                    ) -> tuple[LedgerState, dict[str, x509.Certificate]]:
    """The state and certificates of a snapshot a follower received, once it holds up: the checkpoint
    entry is intact and canonical, is entry index + 1, names `snap.index` and the SHA-256 of the bytes
    received, and is signed by an SN certificate that one of `trusted_cas` (the follower's own CAs)
    issued; the state it holds ends at that index, with the hash the checkpoint links to. Raises
    SnapshotError saying which of these fails."""
    row = snap.checkpoint
    if sha256_hex(row.body) != row.hash:
        raise SnapshotError(f"checkpoint entry {row.index}: its bytes do not match its hash")
    try:
        entry = row.entry()
    except LedgerError as exc:
        raise SnapshotError(f"checkpoint entry {row.index}: {exc}") from None
    if entry.body_bytes() != row.body or entry.index != row.index or row.index != snap.index + 1:
        raise SnapshotError(f"checkpoint entry {row.index} is not canonical, or not entry {snap.index + 1}")
    claim = checkpoint_claim(entry)
    digest = sha256_hex(snap.data)
    if claim != (snap.index, digest):
        raise SnapshotError(f"entry {row.index} is no checkpoint of the snapshot received (state at entry "
                            f"{snap.index}, SHA-256 {digest[:12]})")
    state, certs = read_document(snap.data, state_cls)
    _signed_by_sn(entry, certs.get(entry.tx.signer.cert_fp), trusted_cas, verify)
    if state.head_index != snap.index or entry.prev_hash != state.head_hash:
        raise SnapshotError(f"snapshot ends at entry {state.head_index}, not at the entry checkpoint "
                            f"{row.index} follows")
    return state, certs


def _signed_by_sn(entry: Entry, cert: x509.Certificate | None, trusted_cas: list[x509.Certificate],
                  verify) -> None:
    who = entry.tx.signer
    if cert is None:
        raise SnapshotError(f"checkpoint {entry.index} is signed by {who.node} with certificate "
                            f"{who.cert_fp[:12]}, which the snapshot does not hold")
    if not any(pki.issued_by(cert, ca) for ca in trusted_cas):
        raise SnapshotError(f"checkpoint {entry.index} is signed by {who.node}, whose certificate no CA of "
                            f"this node (--capath) issued")
    ident = pki.swarm_id(cert)
    if ident is None or ident.role != "sn" or ident.name != who.node:
        raise SnapshotError(f"checkpoint {entry.index} is signed by {who.node}, whose certificate is not an "
                            f"SN's of that name ({ident})")
    if not verify(cert, entry.tx.signing_bytes(), entry.signature):
        raise SnapshotError(f"the signature of checkpoint {entry.index} by {who.node} does not verify")
