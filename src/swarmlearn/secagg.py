"""The cryptography of secure aggregation: each participant masks its input so that the leader of a round
learns only the sum of the inputs, and dropouts after masking are recovered.

Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", CCS 2017: double masking. Pure functions over
bytes and numpy arrays; sl/secure.py runs the phases over the ledger and calls them. Per round, with
U1 the participants (sorted by name; participant i of that order holds Shamir x-coordinate i + 1), U2
the masking set (those that posted shares), U3 the survivors (those whose masked inputs the leader holds):

1. Each u makes fresh X25519 keys c_u (sealing shares) and s_u (pairwise masks) and a 32-byte self-mask
   seed b_u, and publishes both public keys and SHA-256(b_u) (`RoundSecrets.public`).
2. u splits b_u and s_u's private key t-of-|U1| (Shamir over GF(2^521 - 1)) and seals share x_v for
   every v in U1, itself too, with AES-256-GCM under a key both derive from c_u and c_v; the round's
   context, the sender and the recipient are associated data (`seal_shares`, `open_shares`).
3. u posts y_u = x_u + PRG(b_u) + sum_{v in U2, v > u} PRG(s_uv) - sum_{v in U2, v < u} PRG(s_uv)
   (mod 2^64), where s_uv is agreed from s_u and s_v (`masked_input`). Pairwise masks cancel in a sum
   over all of U2.
4. Each survivor reveals, for each v in U3 (itself too), its share of b_v and, for each d in U2 \\ U3,
   its share of s_d: one secret per node, never both (`reveal`).
5. The leader adds the y of U3, removes each survivor's self-mask and, for each dropped d, the pairwise
   masks the survivors carry for d, rebuilt from s_d (`unmask`). Every rebuilt secret is checked
   against what its owner published.

What it protects against: an honest-but-curious leader, together with any coalition of fewer than
t = threshold(|U1|) participants, learns only the sum of the survivors' inputs. A node that drops after
masking is recovered without revealing any survivor's input: a survivor's b and s are never both
revealed, because each participant reveals one secret per node, and `Held` remembers which across
calls.

What it does not protect against: a malicious participant can still add any values within +-RANGE per
coordinate (checks of a node's update happen on the node, before masking; the range bounds the rest).
A malicious leader may lie about who dropped; the one-reveal rule limits what that buys: calling a node
dropped reveals its mask key but never its self-mask seed, which still hides its masked input, and since
t is a majority of U1, telling some participants that v survived and others that it dropped cannot
gather t shares of both of v's secrets (the ledger also fixes the survivors once, for everyone). The
sum itself leaks what it leaks (of three nodes, two that collude learn the third's input from it).
Nothing verifies the result (a wrong `dropped` list or a bad masked input gives a wrong sum, unnoticed):
this protects privacy, not integrity.

Everything a peer sends is text checked here before use: strict base64 of the exact length, field
elements below the prime, names of the round, kinds of share; nothing is unpickled. Masks are streamed
CHUNK_VALUES at a time, so a model of 10^8 values needs about one chunk beyond its input and output.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from secrets import randbelow

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from swarmlearn.errors import SwarmError
from swarmlearn.ledger.secure_rounds import recovery_threshold
from swarmlearn.merge.base import CHUNK_VALUES

# Fixed point: value v travels as round(v * 2^SCALE_BITS) in two's complement. One node's |v| stays below
# RANGE (2^53 once scaled), so the sum of up to MAX_PARTICIPANTS of them stays inside int64.
SCALE_BITS = 32
RANGE = 2.0 ** 21
MIN_PARTICIPANTS = 3
MAX_PARTICIPANTS = 1024
MAX_NAME_CHARS = 128  # as the ledger's names

PRIME = 2 ** 521 - 1  # a Mersenne prime: a 32-byte secret is one field element
_FIELD_BYTES = 66
_SECRET_BYTES = 32
_NONCE_BYTES = 12
_TAG_BYTES = 16
_SEALED_VERSION = 1
_PLAIN = struct.Struct(f">BH{_FIELD_BYTES}s{_FIELD_BYTES}s")  # version, recipient's x, share of b, share of s
_SEALED_BYTES = _NONCE_BYTES + _PLAIN.size + _TAG_BYTES
_KINDS = {"b": "self-mask seed", "s": "mask key"}
# Wrong-share hunting rebuilds a secret up to t + 1 times at O(t^2) each: only for rounds this small.
_IDENTIFY_MAX_THRESHOLD = 64


class SecAggError(SwarmError):
    """Secure aggregation cannot go on: a peer's text is malformed or does not open, too few shares were
    revealed, or a rebuilt secret fails its check. `nodes` names those at fault or short of shares."""

    def __init__(self, message: str, nodes: tuple[str, ...] | list[str] | set[str] = ()):
        super().__init__(message)
        self.nodes = tuple(sorted(nodes))


# Shares needed to rebuild one node's secret: the ledger's rule (a majority of the participants, at least
# 2), which also bounds how few survivors a round may merge with.
threshold = recovery_threshold


def context(contract: str, generation: int, round_no: int) -> bytes:
    """The bytes every key, seal and mask of one round is bound to: nothing opens in another round,
    generation or contract."""
    if not isinstance(contract, str) or not contract:
        raise SecAggError("secure aggregation needs the contract's name")
    for what, number in (("generation", generation), ("round", round_no)):
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < 2 ** 63:
            raise SecAggError(f"secure aggregation needs a {what} number from 0 up, not {number!r}")
    return _frame(b"swarmlearn/secagg/1", contract.encode(), generation.to_bytes(8, "big"),
                  round_no.to_bytes(8, "big"))


@dataclass
class RoundSecrets:
    """One node's secrets for one round. They never leave the node."""

    c_private: X25519PrivateKey = field(repr=False)
    s_private: X25519PrivateKey = field(repr=False)
    self_seed: bytes = field(repr=False)

    @classmethod
    def fresh(cls) -> RoundSecrets:
        return cls(X25519PrivateKey.generate(), X25519PrivateKey.generate(), os.urandom(_SECRET_BYTES))

    def public(self) -> dict[str, str]:
        """What goes on the ledger: both public keys and the commitment to the self-mask seed."""
        return {"c": _b64(self.c_private.public_key().public_bytes_raw()),
                "s": _b64(self.s_private.public_key().public_bytes_raw()),
                "b": hashlib.sha256(self.self_seed).hexdigest()}


@dataclass
class Held:
    """The shares a sender sealed for this node. `revealed` remembers which of the sender's secrets this
    node revealed ("b" or "s"), so that no second call reveals the other."""

    b_share: int = field(repr=False)
    s_share: int = field(repr=False)
    revealed: str | None = None


def seal_shares(secrets: RoundSecrets, me: str, participants: list[str], publics: dict[str, dict[str, str]],
                ctx: bytes) -> dict[str, str]:
    """recipient -> sealed text, for every participant of U1, `me` too (it reveals its own share of b as a
    survivor). Each text carries the recipient's shares of b and of s's private key."""
    positions = _positions(participants, "participants", MIN_PARTICIPANTS)
    _own(secrets, me, positions, publics)
    xs = list(positions.values())
    t = threshold(len(xs))
    b_shares = _split(secrets.self_seed, xs, t)
    s_shares = _split(secrets.s_private.private_bytes_raw(), xs, t)
    sealed = {}
    for v, x in positions.items():
        key = _share_key(secrets.c_private, _public(publics, v).c, v, ctx)
        plain = _PLAIN.pack(_SEALED_VERSION, x, b_shares[x].to_bytes(_FIELD_BYTES, "big"),
                            s_shares[x].to_bytes(_FIELD_BYTES, "big"))
        nonce = os.urandom(_NONCE_BYTES)
        sealed[v] = _b64(nonce + AESGCM(key).encrypt(nonce, plain, _share_aad(ctx, me, v)))
    return sealed


def open_shares(secrets: RoundSecrets, me: str, participants: list[str], publics: dict[str, dict[str, str]],
                sealed: dict[str, str], ctx: bytes) -> dict[str, Held]:
    """sender -> Held, from `sealed`: sender -> the text that sender sealed for `me`. Every text that is
    malformed, does not open (tampered, or sealed for another recipient, round or contract) or carries
    another x-coordinate is refused, naming all such senders at once."""
    positions = _positions(participants, "participants", MIN_PARTICIPANTS)
    _member(me, positions, "participants")
    if not isinstance(sealed, dict):
        raise SecAggError(f"sealed shares for {me} must be a mapping of sender to text")
    held: dict[str, Held] = {}
    faults: dict[str, str] = {}
    for sender, text in sealed.items():
        if sender not in positions:
            raise SecAggError(f"a sealed share for {me} from {_shown(sender)}, who is not a participant of the "
                              f"round", [sender] if isinstance(sender, str) else [])
        try:
            held[sender] = _open_one(secrets, me, positions[me], sender, publics, text, ctx)
        except SecAggError as error:
            faults[sender] = str(error)
    if faults:
        raise SecAggError("; ".join(faults[s] for s in sorted(faults)), faults)
    return held


def reveal(held: dict[str, Held], me: str, survivors: list[str], dropped: list[str]) -> dict[str, str]:
    """node -> share text: this survivor's share of b for every survivor (itself too) and of s for every
    dropped node. Refuses a node in both lists, a list that calls `me` dropped, and any node whose other
    secret an earlier call revealed: b and s of one node together would unmask it."""
    survivor_set = _names(survivors, "survivors")
    dropped_set = _names(dropped, "dropped")
    both = survivor_set & dropped_set
    if both:
        raise SecAggError(f"asked to reveal both secrets of {', '.join(sorted(both))} (named survivor and dropped): "
                          f"that would unmask its input; refused", both)
    if me not in survivor_set:
        raise SecAggError(f"{me} is asked to reveal shares but is not named a survivor; refused")
    wanted = {v: "b" for v in survivor_set} | {d: "s" for d in dropped_set}
    missing = sorted(n for n in wanted if n not in held)
    if missing:
        raise SecAggError(f"{me} holds no share of {', '.join(missing)} (it sealed none for {me}): cannot reveal "
                          f"one", missing)
    flipped = sorted(n for n, kind in wanted.items() if held[n].revealed not in (None, kind))
    if flipped:
        raise SecAggError(f"{me} already revealed the other secret of {', '.join(flipped)} this round: revealing "
                          f"both would unmask it; refused", flipped)
    shares = {}
    for node, kind in sorted(wanted.items()):
        held[node].revealed = kind
        value = held[node].b_share if kind == "b" else held[node].s_share
        shares[node] = f"{kind}:{_b64(value.to_bytes(_FIELD_BYTES, 'big'))}"
    return shares


def masked_input(x: np.ndarray, secrets: RoundSecrets, me: str, masking_set: list[str],
                 publics: dict[str, dict[str, str]], ctx: bytes) -> np.ndarray:
    """y = x + PRG(b) + the pairwise masks with every other member of the masking set (mod 2^64)."""
    positions = _positions(masking_set, "masking set", 1)
    _own(secrets, me, positions, publics)
    y = np.array(_uint64(x, "input"), dtype=np.uint64, order="C", copy=True)
    streams = [(secrets.self_seed, 1)]
    for v in positions:
        if v != me:
            seed = _pair_seed(secrets.s_private, me, v, _public(publics, v).s, ctx)
            streams.append((seed, 1 if v > me else -1))
    _add_streams(y.reshape(-1), streams)
    return y


def unmask(total: np.ndarray, revealed: dict[str, dict[str, str]], participants: list[str], survivors: list[str],
           dropped: list[str], publics: dict[str, dict[str, str]], ctx: bytes) -> np.ndarray:
    """The sum of the survivors' inputs, from `total` (the sum of their masked inputs, mod 2^64) and what
    the survivors revealed (revealer -> node -> share text). Raises SecAggError naming the nodes that lack
    t shares, and the revealer of a share that breaks a rebuilt secret's check where it can be told."""
    positions = _positions(participants, "participants", MIN_PARTICIPANTS)
    survivor_set = _names(survivors, "survivors")
    dropped_set = _names(dropped, "dropped")
    for node in sorted(survivor_set | dropped_set):
        _member(node, positions, "participants")
    if survivor_set & dropped_set:
        raise SecAggError(f"{', '.join(sorted(survivor_set & dropped_set))} named both survivor and dropped",
                          survivor_set & dropped_set)
    total = _uint64(total, "sum of masked inputs")
    t = threshold(len(positions))
    points = _revealed_points(revealed, positions, survivor_set, dropped_set)
    short = {node: len(p) for node, p in points.items() if len(p) < t}
    if short:
        raise SecAggError("cannot unmask the round: too few shares revealed for "
                          + ", ".join(f"{node} ({count} of {t} needed)" for node, count in sorted(short.items())),
                          short)
    streams = []
    for v in sorted(survivor_set):
        commitment = _public(publics, v).commitment
        seed = _rebuild(points[v], t, f"self-mask seed of {v}", "commitment",
                        lambda secret, c=commitment: hashlib.sha256(secret).hexdigest() == c)
        streams.append((seed, -1))
    for d in sorted(dropped_set):
        published = _public(publics, d).s_raw
        raw = _rebuild(points[d], t, f"mask key of {d}", "published key",
                       lambda secret, p=published: _x25519_public(secret) == p)
        s_private = X25519PrivateKey.from_private_bytes(raw)
        for u in sorted(survivor_set):
            # u added PRG(s_ud) when d sorts after u and subtracted it otherwise; undo that.
            seed = _pair_seed(s_private, d, u, _public(publics, u).s, ctx)
            streams.append((seed, -1 if d > u else 1))
    result = np.array(total, dtype=np.uint64, order="C", copy=True)
    _add_streams(result.reshape(-1), streams)
    return result


def encode_fixed(values: np.ndarray) -> np.ndarray:
    """Floats as uint64 fixed point (two's complement of round(v * 2^SCALE_BITS)). Every value must be
    finite with |v| < RANGE; the first that is not is named by its (flat) index."""
    values = np.asarray(values)
    if values.dtype.kind != "f":
        raise SecAggError(f"fixed-point encoding takes floating-point values, not {values.dtype}")
    flat = values.reshape(-1)
    out = np.empty(flat.shape, dtype=np.uint64)
    for start in range(0, flat.size, CHUNK_VALUES):
        part = flat[start:start + CHUNK_VALUES].astype(np.float64, copy=False)
        bad = ~np.isfinite(part)
        if bad.any():
            i = int(np.argmax(bad))
            raise SecAggError(f"value {start + i} is {float(part[i])}: secure aggregation encodes finite values only")
        over = np.abs(part) >= RANGE
        if over.any():
            i = int(np.argmax(over))
            value = float(part[i])
            raise SecAggError(f"value {start + i} is {value!r}: under secure aggregation one node adds |value| < "
                              f"{RANGE:.0f} (this one is {abs(value) / RANGE:.3g} times that)")
        out[start:start + part.size] = np.rint(part * 2.0 ** SCALE_BITS).astype(np.int64).view(np.uint64)
    return out.reshape(values.shape)


def decode_fixed(total: np.ndarray) -> np.ndarray:
    """uint64 fixed point (a value or a sum of them) back to float64."""
    out = _uint64(total, "fixed-point values").view(np.int64).astype(np.float64)
    out *= 2.0 ** -SCALE_BITS
    return out


# --- peers' text -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Public:
    c: X25519PublicKey
    s: X25519PublicKey
    s_raw: bytes
    commitment: str


def _public(publics: dict[str, dict[str, str]], node: str) -> _Public:
    entry = publics.get(node) if isinstance(publics, dict) else None
    if not isinstance(entry, dict):
        raise SecAggError(f"no public keys of {node} for this round", [node])
    c_raw = _unb64(entry.get("c"), _SECRET_BYTES, f"{node}'s public key c", node)
    s_raw = _unb64(entry.get("s"), _SECRET_BYTES, f"{node}'s public key s", node)
    commitment = entry.get("b")
    if not (isinstance(commitment, str) and len(commitment) == 64 and set(commitment) <= set("0123456789abcdef")):
        raise SecAggError(f"{node}'s commitment b is not 64 lower-case hex digits", [node])
    return _Public(X25519PublicKey.from_public_bytes(c_raw), X25519PublicKey.from_public_bytes(s_raw), s_raw,
                   commitment)


def _open_one(secrets: RoundSecrets, me: str, my_x: int, sender: str, publics: dict[str, dict[str, str]],
              text: str, ctx: bytes) -> Held:
    data = _unb64(text, _SEALED_BYTES, f"the share {sender} sealed for {me}", sender)
    key = _share_key(secrets.c_private, _public(publics, sender).c, sender, ctx)
    try:
        plain = AESGCM(key).decrypt(data[:_NONCE_BYTES], data[_NONCE_BYTES:], _share_aad(ctx, sender, me))
    except InvalidTag:
        raise SecAggError(f"the share {sender} sealed for {me} does not open: tampered with, or sealed for another "
                          f"recipient, round or contract", [sender]) from None
    version, x, b_bytes, s_bytes = _PLAIN.unpack(plain)
    b_share, s_share = int.from_bytes(b_bytes, "big"), int.from_bytes(s_bytes, "big")
    if version != _SEALED_VERSION or x != my_x or b_share >= PRIME or s_share >= PRIME:
        raise SecAggError(f"the share {sender} sealed for {me} is malformed (version {version}, x {x} where {me} "
                          f"is {my_x}, or a share beyond the field)", [sender])
    return Held(b_share, s_share)


def _revealed_points(revealed: dict[str, dict[str, str]], positions: dict[str, int], survivors: set[str],
                     dropped: set[str]) -> dict[str, list[tuple[int, int, str]]]:
    """node -> [(revealer's x, share, revealer)], each share of the kind the node's fate asks for."""
    if not isinstance(revealed, dict):
        raise SecAggError("revealed shares must be a mapping of revealer to (node -> share)")
    points: dict[str, list[tuple[int, int, str]]] = {n: [] for n in survivors | dropped}
    for revealer, shares in revealed.items():
        if revealer not in survivors:
            raise SecAggError(f"{_shown(revealer)} revealed shares but is not a survivor of the round",
                              [revealer] if isinstance(revealer, str) else [])
        if not isinstance(shares, dict):
            raise SecAggError(f"the reveal of {revealer} is not a mapping of node to share", [revealer])
        for node, text in shares.items():
            if node not in points:
                raise SecAggError(f"{revealer} revealed a share of {_shown(node)}, which is neither a survivor nor "
                                  f"dropped", [revealer])
            expected = "b" if node in survivors else "s"
            if not isinstance(text, str) or text[:2] not in ("b:", "s:"):
                raise SecAggError(f"the share {revealer} revealed of {node} is not 'b:' or 's:' and base64",
                                  [revealer])
            if text[0] != expected:
                raise SecAggError(f"{revealer} revealed the {_KINDS[text[0]]} of {node}, which is "
                                  f"{'a survivor' if expected == 'b' else 'dropped'}: only its {_KINDS[expected]} "
                                  f"may be revealed", [revealer])
            value = int.from_bytes(_unb64(text[2:], _FIELD_BYTES, f"the share {revealer} revealed of {node}",
                                          revealer), "big")
            if value >= PRIME:
                raise SecAggError(f"the share {revealer} revealed of {node} lies beyond the field", [revealer])
            points[node].append((positions[revealer], value, revealer))
    return points


def _rebuild(points: list[tuple[int, int, str]], t: int, what: str, check_name: str, check) -> bytes:
    """The secret from the first t shares (by x); when it fails `check`, the revealer whose share
    breaks it, found by leaving each of the first t + 1 out in turn (one wrong share among them)."""
    points = sorted(points)
    secret = _combine(points[:t])
    if check(secret):
        return secret
    revealers = sorted(p[2] for p in points[:t])
    if len(points) > t and t <= _IDENTIFY_MAX_THRESHOLD:
        candidates = points[:t + 1]
        for i, (_, _, suspect) in enumerate(candidates):
            if check(_combine(candidates[:i] + candidates[i + 1:])):
                raise SecAggError(f"the share {suspect} revealed of the {what} is wrong: the {what} rebuilt with it "
                                  f"fails its {check_name} check, rebuilt without it passes", [suspect])
    raise SecAggError(f"the {what} rebuilt from the shares of {', '.join(revealers)} fails its {check_name} check: "
                      f"one of them revealed a wrong share", revealers)


# --- Shamir over GF(PRIME) -------------------------------------------------------------------------


def _split(secret: bytes, xs: list[int], t: int) -> dict[int, int]:
    """x -> f(x) for a random polynomial f of degree t - 1 with f(0) = the secret."""
    coefficients = [int.from_bytes(secret, "big")] + [randbelow(PRIME) for _ in range(t - 1)]
    shares = {}
    for x in xs:
        y = 0
        for a in reversed(coefficients):
            y = (y * x + a) % PRIME
        shares[x] = y
    return shares


@lru_cache(maxsize=16)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """The weights that take f(x_i) to f(0); the same for every node rebuilt from the same revealers."""
    weights = []
    for i, xi in enumerate(xs):
        numerator = denominator = 1
        for j, xj in enumerate(xs):
            if j != i:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        weights.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return tuple(weights)


def _combine(points: list[tuple[int, int, str]]) -> bytes:
    """f(0) as 32 bytes; a value too large for that (wrong shares) as b"", which fails every check."""
    weights = _lagrange_at_zero(tuple(p[0] for p in points))
    value = sum(w * p[1] for w, p in zip(weights, points)) % PRIME
    return value.to_bytes(_SECRET_BYTES, "big") if value < 2 ** (8 * _SECRET_BYTES) else b""


def _x25519_public(raw_private: bytes) -> bytes:
    if len(raw_private) != _SECRET_BYTES:
        return b""
    return X25519PrivateKey.from_private_bytes(raw_private).public_key().public_bytes_raw()


# --- keys and masks --------------------------------------------------------------------------------


def _agree(private: X25519PrivateKey, public: X25519PublicKey, peer: str) -> bytes:
    try:
        return private.exchange(public)
    except ValueError:  # a low-order point: the shared secret would be all zeros, known to anyone
        raise SecAggError(f"{peer}'s public key agrees no secret (a low-order point)", [peer]) from None


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=_SECRET_BYTES, salt=None, info=info).derive(secret)


def _share_key(private: X25519PrivateKey, peer_public: X25519PublicKey, peer: str, ctx: bytes) -> bytes:
    return _hkdf(_agree(private, peer_public, peer), _frame(ctx, b"share"))


def _share_aad(ctx: bytes, sender: str, recipient: str) -> bytes:
    # Both directions share a key; naming sender and recipient keeps a share from being replayed the other
    # way or to someone else.
    return _frame(ctx, b"share", sender.encode(), recipient.encode())


def _pair_seed(private: X25519PrivateKey, me: str, peer: str, peer_public: X25519PublicKey, ctx: bytes) -> bytes:
    low, high = sorted((me, peer))
    return _hkdf(_agree(private, peer_public, peer), _frame(ctx, b"mask", low.encode(), high.encode()))


def _add_streams(flat: np.ndarray, streams: list[tuple[bytes, int]]) -> None:
    """flat += sign * PRG(seed) for each (seed, sign), mod 2^64, one chunk of keystream at a time. PRG is
    the AES-256-CTR keystream (key = seed, counter from zero) read as little-endian uint64."""
    chunk = CHUNK_VALUES
    ciphers = [(Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor(), sign) for seed, sign in streams]
    zeros = memoryview(bytes(chunk * 8))
    keystream = bytearray(chunk * 8 + 15)  # update_into wants room for a block beyond the data
    for start in range(0, flat.size, chunk):
        part = flat[start:start + chunk]
        for cipher, sign in ciphers:
            cipher.update_into(zeros[:part.size * 8], keystream)
            values = np.frombuffer(keystream, dtype="<u8", count=part.size)
            if sign > 0:
                part += values
            else:
                part -= values


# --- small checks ----------------------------------------------------------------------------------


def _frame(*parts: bytes) -> bytes:
    """Length-prefixed concatenation, so that no two different part lists give the same bytes."""
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, size: int, what: str, node: str) -> bytes:
    """Exactly `size` bytes from canonical base64, or SecAggError naming `node`."""
    if isinstance(text, str) and len(text) == 4 * ((size + 2) // 3):
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            data = b""
        if len(data) == size and _b64(data) == text:
            return data
    raise SecAggError(f"{what} is not base64 of {size} bytes", [node])


def _shown(name: object) -> str:
    return name if isinstance(name, str) and 0 < len(name) <= MAX_NAME_CHARS else repr(name)[:40]


def _names(names: list[str], what: str) -> set[str]:
    if not isinstance(names, (list, tuple)) or len(names) > MAX_PARTICIPANTS:
        raise SecAggError(f"the {what} must be a list of at most {MAX_PARTICIPANTS} names")
    for name in names:
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
            raise SecAggError(f"the {what} hold {_shown(name)}, which is no node name")
    if len(set(names)) != len(names):
        raise SecAggError(f"the {what} name a node twice")
    return set(names)


def _positions(names: list[str], what: str, least: int) -> dict[str, int]:
    """name -> Shamir x-coordinate: 1 + its place in the sorted list."""
    unique = _names(names, what)
    if len(unique) < least:
        raise SecAggError(f"the {what} of a secure round must be at least {least}, not {len(unique)}")
    return {name: i + 1 for i, name in enumerate(sorted(unique))}


def _member(me: str, positions: dict[str, int], what: str) -> None:
    if me not in positions:
        raise SecAggError(f"{_shown(me)} is not one of the round's {what}")


def _own(secrets: RoundSecrets, me: str, positions: dict[str, int], publics: dict[str, dict[str, str]]) -> None:
    _member(me, positions, "participants")
    recorded = publics.get(me) if isinstance(publics, dict) else None
    if not isinstance(recorded, dict) or {k: recorded.get(k) for k in "csb"} != secrets.public():
        raise SecAggError(f"the public keys recorded for {me} are not those of its round secrets", [me])


def _uint64(array: np.ndarray, what: str) -> np.ndarray:
    if not isinstance(array, np.ndarray) or array.dtype != np.uint64:
        raise SecAggError(f"the {what} must be a uint64 array (encode_fixed's), not "
                          f"{getattr(array, 'dtype', type(array).__name__)}")
    return array
