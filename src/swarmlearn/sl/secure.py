"""A secure_mean round as one SL lives it: the phases that sit between a round's close and its merged
model, so that the leader learns the sum of the participants' weighted parameters and nothing else.

1. Check-in (round.py) carries fresh per-round public keys instead of the hash of our tensors: our
   plain tensors never enter the blob store, so no peer can fetch them.
2. Once closed, each participant posts its Shamir shares of its round secrets, one sealed for every
   participant (`secagg_shares`). The share that completes the set fixes the masking set; else the
   leader fixes it, after SECURE_PHASE_WAIT, with those that shared (`secagg_masking`).
3. Each member of the masking set checks its own contribution first (what the leader can no longer
   check: finite values, a norm in line with the last merged model's, the fixed-point range), encodes
   its weighted float tensors in fixed point, masks them and posts the masked input's hash
   (`secagg_masked`). The masked blob is served to the round's leader only.
4. The leader sums the masked inputs as they arrive (the sum and one input held), names the survivors
   once (`secagg_survivors`), each survivor reveals one share per member of the masking set
   (`secagg_reveal`), and the leader removes the masks (the self-masks of survivors, the pairwise masks
   of the dropped), divides by the survivors' weight and posts the mean as an ordinary merged model.
   Too few survivors or shares for the recovery threshold: the round is aborted with that reason.

What this protects against and what not: see secagg.py. Checks that need a contribution in the clear
move to its own node (step 3): a participant that skips them can still add any values within the
fixed-point range (secagg.RANGE per weighted value), so robust methods, which read each contribution,
are refused together with secure_mean (ledger/contracts.py).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from swarmlearn import secagg
from swarmlearn.errors import Rejected, SwarmError
from swarmlearn.ledger.entry import canonical_json
from swarmlearn.ledger.model import Round
from swarmlearn.ledger.secure_rounds import recovery_threshold
from swarmlearn.merge import SECURE_MEAN
from swarmlearn.merge.base import (NORM_OUTLIER_FACTOR, BadContribution, Contribution, check_contribution,
                                   contribution_norm, normalized_weights)
from swarmlearn.sl.transport import FetchError
from swarmlearn.tensors import BlobError, Tensor, decode, encode

log = logging.getLogger("swarmlearn.sl")

# The name of the one tensor a masked input holds: the weighted float values of a contribution, in
# fixed point, masked (uint64 carried as I64).
MASKED_TENSOR = "secagg.masked"
# How long the leader waits for the participants' shares, then for their masked inputs, then for the
# survivors' reveals, before it goes on with those in (each phase is one ledger hop for a live node).
SECURE_PHASE_WAIT = 5.0
# Phases a secure round adds to the leader's time: shares, masked inputs, reveals.
SECURE_PHASES = 3


@dataclass
class Participation:
    """Our part in one secure round: secrets that never leave this SL, our plain tensors, what we posted."""

    secrets: secagg.RoundSecrets
    blob: bytes
    posted: set[str] = field(default_factory=set)  # "shares", "masked", "reveal"
    refused: str | None = None  # why our own contribution failed its checks (we then stay out of the masking)
    base: bytes | None = None  # the latest merged model when we checked in: client-level DP clips our update to it


def private_values(tensors: dict[str, Tensor], base: dict[str, Tensor], weight: float, dp: dict, max_weight: float,
                   contributors: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Client-level DP (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent
    Language Models", ICLR 2018, in shares as in Kairouz, Liu, Steinke, "The Distributed Discrete
    Gaussian Mechanism for Federated Learning with Secure Aggregation", ICML 2021): our update since
    the `base` model, clipped to L2 norm dp["clip"], weighted, plus our share of the Gaussian noise:
    `contributors` shares sum to noise_multiplier x clip x max_weight per value, the sensitivity of
    the weighted sum. Returns the values and the update's norm before clipping."""
    from swarmlearn.dp import clip_update, client_noise_std

    own = weighted_values(tensors, 1.0)
    start = weighted_values(base, 1.0)
    update = own - start
    norm = float(np.linalg.norm(update))
    clipped = clip_update(update, dp["clip"])
    std = client_noise_std(dp["clip"], dp["noise_multiplier"], max_weight, contributors)
    values = weight * (start + clipped) + rng.normal(0.0, std, size=own.size)
    return values, norm


def keys_digest(keys: dict[str, str]) -> str:
    """What a secure check-in posts as its hash: a digest of its public keys (no blob has it)."""
    return hashlib.sha256(canonical_json(keys)).hexdigest()


def float_names(tensors: dict[str, Tensor]) -> list[str]:
    return sorted(n for n, t in tensors.items() if t.is_float)


def weighted_values(tensors: dict[str, Tensor], weight: float) -> np.ndarray:
    """The float tensors, in name order, as one float64 vector times `weight`."""
    names = float_names(tensors)
    if not names:
        return np.zeros(0)
    return np.concatenate([tensors[n].as_float64().ravel() for n in names]) * weight


def tensors_from(reference: dict[str, Tensor], values: np.ndarray) -> dict[str, Tensor]:
    """`values` (float64, in float_names order) as tensors of `reference`'s shapes and dtypes; the
    non-float tensors are the reference's own (the leader's: nobody else's are seen in the clear)."""
    out: dict[str, Tensor] = {}
    start = 0
    for name in float_names(reference):
        t = reference[name]
        size = t.array.size
        out[name] = Tensor.from_float(t.dtype, values[start:start + size], t.array.shape)
        start += size
    for name, t in reference.items():
        if not t.is_float:
            out[name] = t
    return out


def round_weights(r: Round) -> dict[str, float]:
    """Each participant's weight normalized over the round's participants (equal when all are 0):
    normalized weights keep every weighted value within the fixed-point range."""
    nodes = list(r.order)
    return dict(zip(nodes, normalized_weights([r.checkins[n].weight for n in nodes]).tolist()))


def own_check(node: str, tensors: dict[str, Tensor], weight: float, reference_norm: float | None) -> str | None:
    """Why our own contribution must not be masked, or None: what the leader checks in the clear
    otherwise (finite values, a norm within NORM_OUTLIER_FACTOR of the last merged model's) and the
    fixed-point range."""
    try:
        check_contribution(Contribution(node, weight, tensors), None)
    except BadContribution as exc:
        return exc.reason
    if reference_norm:
        norm = contribution_norm(tensors)
        if norm > NORM_OUTLIER_FACTOR * reference_norm:
            return (f"norm {norm:.4g} is more than {NORM_OUTLIER_FACTOR:g}x the last merged model's "
                    f"({reference_norm:.4g})")
    return None


def masked_blob(values: np.ndarray) -> bytes:
    return encode({MASKED_TENSOR: Tensor("I64", values.view(np.int64))})


def masked_values(blob: bytes | bytearray, length: int) -> np.ndarray:
    """The uint64 vector of a masked input; BlobError unless it is exactly one I64 vector of `length`."""
    tensors = decode(blob)
    t = tensors.get(MASKED_TENSOR)
    if len(tensors) != 1 or t is None or t.dtype != "I64" or t.array.ndim != 1 or t.array.size != length:
        raise BlobError(f"a masked input is one I64 vector {MASKED_TENSOR!r} of {length} values; this one is not")
    return t.array.view(np.uint64)


class SecureRounds:
    """The secure_mean phases of RoundEngine (mixed into it: they use its ledger follower, SN client,
    blob store and fetcher)."""

    def client_privacy(self) -> dict:
        """What the ML needs to account for our contributions under client-level DP: {"client_rounds",
        "client_noise_multiplier", "client_delta"}, or {} when the contract trains without it. The ML
        computes ε with the accountant (swarmlearn.dp.client_epsilon: Opacus, which needs torch, which an
        SL does without)."""
        dp = self._read(lambda c: c.client_dp)
        if dp is None:
            return {}
        return {"client_rounds": self._private_rounds, "client_noise_multiplier": dp["noise_multiplier"],
                "client_delta": dp["delta"]}

    def _secure_contract(self) -> bool:
        return self._read(lambda c: c.merge_method) == SECURE_MEAN

    def _secure_context(self, number: int) -> bytes:
        return secagg.context(self.contract_name, self._generation, number)

    def _secure_duties(self, r: Round) -> None:
        """Does our part of secure round `r` that is due now (each once): shares, masked input, reveal."""
        part: Participation | None = self._secure.get(r.number)
        s = r.secure
        if part is None or s is None or self.node_id not in r.order:
            return
        ctx = self._secure_context(r.number)
        try:
            if "shares" not in part.posted and s.masking is None and part.refused is None:
                part.posted.add("shares")
                sealed = secagg.seal_shares(part.secrets, self.node_id, list(r.order), s.keys, ctx)
                self.sn.submit("secagg_shares", {"contract": self.contract_name, "round": r.number,
                                                 "node": self.node_id, "shares": sealed})
            if "masked" not in part.posted and s.masking is not None and self.node_id in s.masking \
                    and s.survivors is None:
                part.posted.add("masked")
                self._post_masked(r, part, ctx)
            if "reveal" not in part.posted and s.survivors is not None and self.node_id in s.survivors:
                part.posted.add("reveal")
                held = secagg.open_shares(part.secrets, self.node_id, list(r.order), s.keys,
                                          {sender: s.shares[sender][self.node_id] for sender in s.masking},
                                          ctx)
                dropped = [n for n in s.masking if n not in s.survivors]
                shares = secagg.reveal(held, self.node_id, list(s.survivors), dropped)
                self.sn.submit("secagg_reveal", {"contract": self.contract_name, "round": r.number,
                                                 "node": self.node_id, "shares": shares})
        except Rejected as exc:
            log.warning("round %d: secure aggregation step not accepted: %s", r.number, exc)
        except secagg.SecAggError as exc:
            log.warning("round %d: %s cannot take its part in the secure aggregation: %s", r.number, self.node_id,
                        exc)

    def _post_masked(self, r: Round, part: Participation, ctx: bytes) -> None:
        s = r.secure
        weights = round_weights(r)
        weight = weights[self.node_id]
        dp = self._read(lambda c: c.client_dp)
        if dp is not None and part.base is not None:
            # The noise must survive dropouts: the ledger names at least the recovery threshold of survivors.
            values, norm = private_values(decode(part.blob), decode(part.base), weight, dp, max(weights.values()),
                                          recovery_threshold(len(r.order)), np.random.default_rng())
            self._private_rounds += 1
            log.info("round %d: %s clipped its update (norm %.4g) to %g and added its share of the noise "
                     "(multiplier %g); %d noised contributions so far", r.number, self.node_id, norm, dp["clip"],
                     dp["noise_multiplier"], self._private_rounds)
            values = secagg.encode_fixed(values)
        else:
            values = secagg.encode_fixed(weighted_values(decode(part.blob), weight))
        masked = secagg.masked_input(values, part.secrets, self.node_id, list(s.masking), s.keys, ctx)
        blob = masked_blob(masked)
        del values, masked
        digest = self.blobs.put(blob)
        self.sn.submit("secagg_masked", {"contract": self.contract_name, "round": r.number, "node": self.node_id,
                                         "hash": digest, "size": len(blob)})
        log.info("round %d: %s posted its masked input %s (%d bytes)", r.number, self.node_id, digest[:12], len(blob))

    def _secure_checked_in(self, number: int, secrets: secagg.RoundSecrets, blob: bytes) -> None:
        """Keeps our part of round `number` and checks our contribution as the leader would have."""
        for old in [n for n in self._secure if n < number - 1]:
            del self._secure[old]
        part = Participation(secrets, blob)
        latest = self._read(lambda c: c.latest_merged.merged_hash if c.latest_merged else None)
        merged = self.blobs.get(latest) if latest else None
        part.base = merged
        if latest and merged is None and self._read(lambda c: c.client_dp) is not None:
            part.refused = (f"client-level DP clips our update to the latest merged model {latest[:12]}, which this "
                            f"SL no longer holds")
        tensors = decode(blob)
        weight = self._read(lambda c: c.rounds[number].checkins[self.node_id].weight)
        part.refused = own_check(self.node_id, tensors, weight,
                                 contribution_norm(decode(merged)) if merged is not None else None)
        if part.refused is None:
            try:
                secagg.encode_fixed(weighted_values(tensors, 1.0))
            except secagg.SecAggError as exc:
                part.refused = f"beyond the fixed-point range: {exc}"
        if part.refused:
            log.warning("round %d: %s keeps its contribution out of the secure aggregation: %s", number,
                        self.node_id, part.refused)
        self._secure[number] = part

    # ---------------------------------------------------------------------------- the leader

    def _lead_secure(self, r: Round, since: float) -> None:
        """Leads secure round `r`: fixes the masking set, sums the masked inputs, names the survivors,
        unmasks with their reveals, posts the mean (or aborts, saying why)."""
        started = time.monotonic()
        number = r.number
        part: Participation | None = self._secure.get(number)
        if part is None:
            self._secure_abort(r, f"its leader {self.node_id} holds no contribution of its own to this round "
                                  f"(restarted?)")
            return
        reference = decode(part.blob)
        length = sum(t.array.size for t in reference.values() if t.is_float)
        own_masked = len(masked_blob(np.zeros(length, dtype=np.uint64)))

        r = self._secure_phase(number, lambda rr: rr.secure.masking is not None or self._ended(rr))
        if self._ended(r):
            return
        if r.secure.masking is None:
            shared = sorted(r.secure.shares)
            try:
                self.sn.submit("secagg_masking", {"contract": self.contract_name, "round": number, "nodes": shared})
            except Rejected as exc:
                self._secure_abort(r, f"the participants' shares did not come in time: {exc}")
                return
            r = self._secure_phase(number, lambda rr: rr.secure.masking is not None or self._ended(rr))
            if self._ended(r):
                return

        masking = list(r.secure.masking)
        total = np.zeros(length, dtype=np.uint64)
        summed: list[str] = []
        tried: set[str] = set()
        deadline = time.monotonic() + SECURE_PHASE_WAIT + self.t.transfer_budget(own_masked * len(masking))
        addresses = self.follower.read(lambda st: {n: st.nodes[n].address for n in masking if n in st.nodes})
        while True:
            # Read before the round: an entry that lands while we fetch must wake the wait below.
            seen = self.follower.read(lambda st: st.head_index)
            r = self._round_now(number)
            if self._ended(r):
                return
            self._secure_duties(r)
            for node in [n for n in masking if n in r.secure.masked and n not in tried]:
                tried.add(node)
                try:
                    blob = self.blobs.get(r.secure.masked[node]) if node == self.node_id else None
                    if blob is None:
                        blob = self.fetcher.fetch(addresses.get(node, ""), r.secure.masked[node],
                                                  max(0.1, deadline - time.monotonic()), own_masked + (64 << 10),
                                                  self.t.stall, self.t.min_rate, in_place=True)
                    np.add(total, masked_values(blob, length), out=total)  # wraps mod 2^64, as masks do
                    summed.append(node)
                except (FetchError, BlobError, SwarmError) as exc:
                    log.warning("round %d: masked input of %s not taken: %s", number, node, exc)
            if len(tried) == len(masking) or time.monotonic() >= deadline:
                break
            self.follower.wait_until(lambda st: st.head_index > seen, 0.2)

        t = recovery_threshold(len(r.order))
        survivors = sorted(n for n in summed if n in r.participants)
        try:
            self.sn.submit("secagg_survivors", {"contract": self.contract_name, "round": number, "nodes": survivors})
        except Rejected as exc:
            self._secure_abort(r, f"only {len(survivors)} of the {len(masking)} masked inputs came in "
                                  f"({', '.join(survivors) or 'none'}), below what the round needs: {exc}")
            return
        r = self._secure_phase(number, lambda rr: self._ended(rr) or len(rr.secure.revealed) == len(survivors))
        if self._ended(r):
            return
        dropped = [n for n in masking if n not in survivors]
        ctx = self._secure_context(number)
        try:
            total = secagg.unmask(total, dict(r.secure.revealed), list(r.order), survivors, dropped,
                                  dict(r.secure.keys), ctx)
        except secagg.SecAggError as exc:
            self._secure_abort(r, f"the survivors' masks cannot be removed: {exc} (recovery threshold {t} of "
                                  f"{len(r.order)})")
            return
        weights = round_weights(r)
        kept_weight = sum(weights[n] for n in survivors)
        mean = secagg.decode_fixed(total) / kept_weight
        merged = tensors_from(reference, mean)
        del total, mean
        blob = encode(merged)
        digest = self.blobs.put(blob, label=(self.contract_name, number))
        not_merged = [n for n in r.participants if n not in survivors]
        try:
            self.sn.submit("merged", {"contract": self.contract_name, "round": number, "hash": digest,
                                      "size": len(blob), "dropped": not_merged})
        except Rejected as exc:
            log.warning("round %d: our secure merge was not accepted: %s", number, exc)
            return
        log.info("round %d: %s merged %d peers with secure_mean in %.3f s (%s recovered as dropped) -> %s",
                 number, self.node_id, len(survivors), time.monotonic() - started,
                 ", ".join(dropped) or "none", digest[:12])

    def _round_now(self, number: int) -> Round:
        return self._read(lambda c: c.rounds[number])

    @staticmethod
    def _ended(r: Round) -> bool:
        return r.status != "closed"

    def _secure_phase(self, number: int, done) -> Round:
        """Round `number` once `done(round)` holds, or SECURE_PHASE_WAIT has passed; does our own part
        meanwhile."""
        deadline = time.monotonic() + SECURE_PHASE_WAIT
        while True:
            seen = self.follower.read(lambda st: st.head_index)
            r = self._round_now(number)
            if not self._ended(r):
                self._secure_duties(r)
                r = self._round_now(number)
            if done(r) or time.monotonic() >= deadline:
                return r
            self.follower.wait_until(lambda st: st.head_index > seen, 0.2)

    def _secure_abort(self, r: Round, reason: str) -> None:
        log.error("round %d: %s; round aborted, every participant keeps its own weights", r.number, reason)
        try:
            self.sn.submit("round_abort", {"contract": self.contract_name, "round": r.number, "reason": reason[:8000],
                                           "dropped": []})
        except Rejected as exc:
            log.warning("round %d: abort not accepted: %s", r.number, exc)
