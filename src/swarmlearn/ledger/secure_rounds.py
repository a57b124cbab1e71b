"""The ledger's rules for the phases of a secure_mean round (sl/secure.py runs them, secagg.py holds
the cryptography). Every phase is fixed by one entry, so that every node reads the same sets:

- check-in: each participant's fresh public keys (contracts.py, `keys`);
- `secagg_shares`: a participant's Shamir shares, one sealed for every participant of the round; the
  share that completes the round's set fixes the masking set, else the leader fixes it
  (`secagg_masking`) with those that shared in time;
- `secagg_masked`: a member of the masking set posts the hash of its masked input;
- `secagg_survivors`: the leader names the members whose masked inputs it holds, at least the recovery
  threshold and min_peers of them: once, so that no participant is asked to reveal both secrets of
  one node (which would unmask it);
- `secagg_reveal`: a survivor reveals one share per member of the masking set.

Members speak only for themselves, the leader only for its round; sizes are bounded by the payloads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from swarmlearn.errors import Rejected
from swarmlearn.ledger import payloads as P
from swarmlearn.ledger.contracts import speaks_for_itself
from swarmlearn.ledger.entry import Tx
from swarmlearn.ledger.model import Contract, Round, RoundStatus, SecureRound

if TYPE_CHECKING:
    from swarmlearn.ledger.state import LedgerState


def recovery_threshold(participants: int) -> int:
    """Shares needed to rebuild one node's secret: a majority of the round's participants (and 2)."""
    return max(2, participants // 2 + 1)


def _secure_round(state: LedgerState, contract_name: str, number: int) -> tuple[Contract, Round, SecureRound]:
    contract = state.contract(contract_name)
    r = contract.rounds.get(number)
    if r is None or r.status != RoundStatus.CLOSED:
        raise Rejected(f"round {number} of {contract.name} is not closed (nothing to aggregate now)")
    if r.secure is None:
        raise Rejected(f"round {number} of {contract.name} does not merge with secure_mean")
    return contract, r, r.secure


def _one_each(who: str, what: str, given: dict, expected: set[str], number: int) -> None:
    missing = sorted(expected - set(given))
    extra = sorted(set(given) - expected)
    if missing or extra:
        raise Rejected(f"{what} of {who} for round {number} must hold one share for each of "
                       f"{', '.join(sorted(expected))}" + (f"; missing {missing[0]}" if missing else "")
                       + (f"; {extra[0]} is not one of them" if extra else ""))


def validate_secagg_shares(state: LedgerState, tx: Tx, p: P.SecAggShares) -> None:
    speaks_for_itself(tx, p.node)
    _, r, secure = _secure_round(state, p.contract, p.round)
    if p.node not in r.order:
        raise Rejected(f"{p.node} is not a participant of round {p.round}")
    if secure.masking is not None:
        raise Rejected(f"round {p.round}: its masking set is fixed; shares come too late")
    if p.node in secure.shares:
        raise Rejected(f"{p.node} already posted its shares for round {p.round}")
    _one_each(p.node, "the shares", p.shares, set(r.order), p.round)


def apply_secagg_shares(state: LedgerState, tx: Tx, p: P.SecAggShares, index: int) -> None:
    _, r, secure = _secure_round(state, p.contract, p.round)
    secure.shares[p.node] = dict(p.shares)
    if all(n in secure.shares for n in r.order):
        secure.masking = sorted(r.order)


def validate_secagg_masking(state: LedgerState, tx: Tx, p: P.SecAggMasking) -> None:
    _, r, secure = _secure_round(state, p.contract, p.round)
    if tx.signer.node != r.leader:
        raise Rejected(f"round {p.round}: only its leader {r.leader} fixes the masking set")
    if secure.masking is not None:
        raise Rejected(f"round {p.round}: its masking set is already fixed")
    absent = [n for n in p.nodes if n not in secure.shares]
    if absent:
        raise Rejected(f"round {p.round}: {absent[0]} posted no shares; the masking set holds only those that did")
    _enough(r, len(set(p.nodes)), "masking set")


def apply_secagg_masking(state: LedgerState, tx: Tx, p: P.SecAggMasking, index: int) -> None:
    _, _, secure = _secure_round(state, p.contract, p.round)
    secure.masking = sorted(set(p.nodes))


def validate_secagg_masked(state: LedgerState, tx: Tx, p: P.SecAggMasked) -> None:
    speaks_for_itself(tx, p.node)
    contract, r, secure = _secure_round(state, p.contract, p.round)
    if secure.masking is None or p.node not in secure.masking:
        raise Rejected(f"{p.node} is not in the masking set of round {p.round}")
    if secure.survivors is not None:
        raise Rejected(f"round {p.round}: its survivors are named; a masked input comes too late")
    if p.node in secure.masked:
        raise Rejected(f"{p.node} already posted its masked input for round {p.round}")
    if p.size > contract.limits.max_blob_bytes:
        raise Rejected(f"masked input of {p.node} declares {p.size} bytes; contract {contract.name} allows at most "
                       f"{contract.limits.max_blob_bytes}")


def apply_secagg_masked(state: LedgerState, tx: Tx, p: P.SecAggMasked, index: int) -> None:
    _, _, secure = _secure_round(state, p.contract, p.round)
    secure.masked[p.node] = p.hash
    secure.masked_sizes[p.node] = p.size


def validate_secagg_survivors(state: LedgerState, tx: Tx, p: P.SecAggSurvivors) -> None:
    _, r, secure = _secure_round(state, p.contract, p.round)
    if tx.signer.node != r.leader:
        raise Rejected(f"round {p.round}: only its leader {r.leader} names the survivors")
    if secure.survivors is not None:
        raise Rejected(f"round {p.round}: its survivors are already named")
    unknown = [n for n in p.nodes if n not in secure.masked or n not in r.participants]
    if unknown:
        raise Rejected(f"round {p.round}: {unknown[0]} posted no masked input (or left the round); survivors are "
                       f"participants whose masked inputs the leader holds")
    _enough(r, len(set(p.nodes)), "survivors")


def apply_secagg_survivors(state: LedgerState, tx: Tx, p: P.SecAggSurvivors, index: int) -> None:
    _, _, secure = _secure_round(state, p.contract, p.round)
    secure.survivors = sorted(set(p.nodes))


def validate_secagg_reveal(state: LedgerState, tx: Tx, p: P.SecAggReveal) -> None:
    speaks_for_itself(tx, p.node)
    _, _, secure = _secure_round(state, p.contract, p.round)
    if secure.survivors is None or p.node not in secure.survivors:
        raise Rejected(f"{p.node} is not a named survivor of round {p.round}; only survivors reveal shares")
    if p.node in secure.revealed:
        raise Rejected(f"{p.node} already revealed its shares for round {p.round}")
    _one_each(p.node, "the reveal", p.shares, set(secure.masking or []), p.round)


def apply_secagg_reveal(state: LedgerState, tx: Tx, p: P.SecAggReveal, index: int) -> None:
    _, _, secure = _secure_round(state, p.contract, p.round)
    secure.revealed[p.node] = dict(p.shares)


def _enough(r: Round, count: int, what: str) -> None:
    need = max(recovery_threshold(len(r.order)), r.need)
    if count < need:
        raise Rejected(f"round {r.number}: a {what} of {count} is below what the round needs ({need}: the recovery "
                       f"threshold {recovery_threshold(len(r.order))} of its {len(r.order)} participants, and "
                       f"min_peers {r.need})")
