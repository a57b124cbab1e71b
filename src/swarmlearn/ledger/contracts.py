"""Contracts and their training rounds: who may join, what members may declare (the contract's
limits), check-ins, closing a round, leaders and re-elections, merged models, aborts and metrics.

Every member speaks only for itself; only a contract's creator or an admin changes or resets it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from swarmlearn.errors import Rejected
from swarmlearn.ledger import payloads as P
from swarmlearn.ledger.entry import Tx, canonical_json
from swarmlearn.ledger.identities import is_admin
from swarmlearn.ledger.model import (DEFAULT_ALIAS, KEEP_FINISHED_ROUNDS, Checkin, Contract, ContractLimits, Member,
                                     Round, RoundStatus, SecureRound, leader_order)
from swarmlearn.merge import METHODS, SECURE_MEAN, SECURE_MIN_PEERS, needs_each_update

if TYPE_CHECKING:
    from swarmlearn.ledger.state import LedgerState


def speaks_for_itself(tx: Tx, node: str) -> None:
    if tx.signer.node != node:
        raise Rejected(f"{tx.signer.node} cannot act for node {node}: a node may only speak for itself")


def _admitted(contract: Contract, node: str) -> None:
    """A contract created with a peer list trains with those nodes only: any other node, even one
    holding a valid certificate of this swarm, can neither join its session nor check in."""
    if contract.peers is not None and node not in contract.peers:
        raise Rejected(f"{node} is not among the peers of contract {contract.name} "
                       f"({', '.join(contract.peers)}); it cannot join or check in to its rounds")


def _member(contract: Contract, node: str) -> Member:
    member = contract.members.get(node)
    if member is None or not member.active:
        raise Rejected(f"{node} has not joined the training session of contract {contract.name}")
    return member


def _owner_or_admin(state: LedgerState, contract: Contract, tx: Tx, what: str) -> None:
    signer = tx.signer.node
    if is_admin(state, signer):
        return
    if contract.name == state.genesis["default_contract"]:
        raise Rejected(f"only an admin may {what} the default contract {contract.name}")
    if signer != contract.created_by:
        raise Rejected(f"only {contract.created_by}, who created it, or an admin may {what} contract {contract.name}")


def _limits(p: P.LimitsChange | None, peers: list[str] | None) -> ContractLimits:
    # A contract for named peers needs no more than all of them to merge.
    base = ContractLimits(max_min_peers=len(set(peers))) if peers else ContractLimits()
    return replace(base, **p.given()) if p is not None else base


# ------------------------------------------------------------------------------ contracts

def _chosen_method(state: LedgerState, p: P.ContractChange) -> None:
    if p.merge_method is None:
        return
    if state.protocol < 4:
        raise Rejected(f"contract {p.name}: a merge method chosen per contract needs a ledger of protocol 4 "
                       f"(this one is of protocol {state.protocol}); set merge_method on every node instead")
    if p.merge_method not in METHODS:
        raise Rejected(f"contract {p.name}: unknown merge method {p.merge_method!r}; one of {', '.join(METHODS)}")


def validate_contract_create(state: LedgerState, tx: Tx, p: P.ContractChange) -> None:
    if p.name in state.contracts or p.name == DEFAULT_ALIAS:
        raise Rejected(f"contract {p.name!r} already exists")
    _chosen_method(state, p)


def apply_contract_create(state: LedgerState, tx: Tx, p: P.ContractChange, index: int) -> None:
    peers = sorted(set(p.peers)) if p.peers is not None else None
    state.contracts[p.name] = Contract(p.name, created_by=tx.signer.node, peers=peers, limits=_limits(p.limits, peers),
                                       chosen_merge_method=p.merge_method)


def validate_contract_update(state: LedgerState, tx: Tx, p: P.ContractChange) -> None:
    contract = state.contract(p.name)
    _owner_or_admin(state, contract, tx, "change")
    if p.peers is None and p.limits is None and p.merge_method is None:
        raise Rejected(f"contract_update of {contract.name} changes nothing; give peers, limits or a merge method")
    _chosen_method(state, p)
    if p.merge_method is not None and p.merge_method != contract.merge_method and contract.active_members:
        raise Rejected(f"contract {contract.name} merges with {contract.merge_method} while "
                       f"{', '.join(contract.active_members)} train; change its merge method between runs "
                       f"(when no session is active) or reset it first")


def apply_contract_update(state: LedgerState, tx: Tx, p: P.ContractChange, index: int) -> None:
    contract = state.contract(p.name)
    if p.peers is not None:
        contract.peers = sorted(set(p.peers))
    if p.limits is not None:
        contract.limits = replace(contract.limits, **p.limits.given())
    if p.merge_method is not None:
        contract.chosen_merge_method = p.merge_method


def validate_contract_reset(state: LedgerState, tx: Tx, p: P.Named) -> None:
    _owner_or_admin(state, state.contract(p.name), tx, "reset")


def apply_contract_reset(state: LedgerState, tx: Tx, p: P.Named, index: int) -> None:
    contract = state.contract(p.name)
    contract.generation += 1
    contract.members.clear()
    contract.rounds.clear()
    contract.current_round = 1
    contract.latest_merged_round = None
    contract.rounds_merged = contract.rounds_aborted = 0


# ------------------------------------------------------------------------------ sessions

def validate_session_join(state: LedgerState, tx: Tx, p: P.SessionJoin) -> None:
    contract = state.contract(p.contract)
    speaks_for_itself(tx, p.node)
    _admitted(contract, p.node)
    if p.min_peers > contract.limits.max_min_peers:
        raise Rejected(f"{p.node} asks for min_peers {p.min_peers}; contract {contract.name} allows at most "
                       f"{contract.limits.max_min_peers}")
    others = {m.merge_method for n, m in contract.members.items() if m.active and n != p.node}
    agreed = contract.chosen_merge_method or (others.pop() if others else None)
    if agreed is not None and p.merge_method != agreed:
        why = ""
        other = p.merge_method if agreed == SECURE_MEAN else agreed
        if SECURE_MEAN in (agreed, p.merge_method) and needs_each_update(other):
            why = (f" ({other} reads each peer's update in the clear, which secure_mean hides from the leader: "
                   f"the two cannot be combined)")
        chosen = " (chosen by its creator)" if contract.chosen_merge_method else ""
        raise Rejected(f"contract {contract.name} merges with {agreed}{chosen}; {p.node} asks for {p.merge_method}"
                       f"{why}: every node of a contract must use the same merge_method")
    if p.client_dp is not None and p.merge_method != SECURE_MEAN:
        raise Rejected(f"{p.node} asks for client-level DP with {p.merge_method}: the noise of one node is a "
                       f"fraction of what the sum needs, so only secure_mean (which hides each update from the "
                       f"leader) may carry it; choose merge_method secure_mean")
    given = p.client_dp.model_dump() if p.client_dp is not None else None
    active = [m for n, m in contract.members.items() if m.active and n != p.node]
    if active and any(m.client_dp != given for m in active):
        raise Rejected(f"contract {contract.name} trains with client-level DP {active[0].client_dp}; {p.node} asks "
                       f"for {given}: every node of a contract must use the same client_dp settings")
    if p.merge_method == SECURE_MEAN:
        if state.protocol < 4:
            raise Rejected(f"secure_mean needs a ledger of protocol 4; this one is of protocol {state.protocol}")
        if p.min_peers < SECURE_MIN_PEERS:
            raise Rejected(f"{p.node} asks for secure_mean with min_peers {p.min_peers}: secure aggregation needs "
                           f"at least {SECURE_MIN_PEERS} peers per round (with 2, each learns the other's update "
                           f"from the sum); set min_peers to {SECURE_MIN_PEERS} or more")


def apply_session_join(state: LedgerState, tx: Tx, p: P.SessionJoin, index: int) -> None:
    contract = state.contract(p.contract)
    contract.members[p.node] = Member(p.min_peers, float(p.weightage), True, index, p.merge_method,
                                      client_dp=p.client_dp.model_dump() if p.client_dp is not None else None)


def validate_session_leave(state: LedgerState, tx: Tx, p: P.SessionLeave) -> None:
    speaks_for_itself(tx, p.node)
    _member(state.contract(p.contract), p.node)


def apply_session_leave(state: LedgerState, tx: Tx, p: P.SessionLeave, index: int) -> None:
    contract = state.contract(p.contract)
    contract.members[p.node].active = False
    open_round = contract.rounds.get(contract.current_round)
    if open_round is not None:
        open_round.checkins.pop(p.node, None)


def validate_session_evict(state: LedgerState, tx: Tx, p: P.SessionEvict) -> None:
    contract = state.contract(p.contract)
    _member(contract, tx.signer.node)
    _member(contract, p.node)
    if p.node == tx.signer.node:
        raise Rejected(f"{p.node} cannot evict itself; it leaves with session_leave")
    if not contract.absent_from_last_rounds(p.node):
        raise Rejected(f"{p.node} took part in one of the last 2 rounds of {contract.name}; only a node absent "
                       f"from both can be evicted")


def apply_session_evict(state: LedgerState, tx: Tx, p: P.SessionEvict, index: int) -> None:
    state.contract(p.contract).members[p.node].active = False


# ------------------------------------------------------------------------------ rounds

def validate_checkin(state: LedgerState, tx: Tx, p: P.Checkin) -> None:
    contract = state.contract(p.contract)
    speaks_for_itself(tx, p.node)
    _admitted(contract, p.node)
    _member(contract, p.node)
    if p.round != contract.current_round:
        when = "closed" if p.round < contract.current_round else "not open yet"
        raise Rejected(f"check-in of {p.node} for round {p.round} of {contract.name}: that round is {when}; "
                       f"the open round is {contract.current_round}")
    if p.size > contract.limits.max_blob_bytes:
        raise Rejected(f"check-in of {p.node} declares {p.size} bytes; contract {contract.name} allows at most "
                       f"{contract.limits.max_blob_bytes} bytes per contribution")
    existing = contract.rounds.get(p.round)
    if existing and p.node in existing.checkins:
        raise Rejected(f"{p.node} already checked in to round {p.round}")
    secure = contract.merge_method == SECURE_MEAN
    if secure and p.keys is None:
        raise Rejected(f"check-in of {p.node}: contract {contract.name} merges with secure_mean; a check-in carries "
                       f"the node's fresh keys for the round (an SL of this version sends them)")
    if not secure and p.keys is not None:
        raise Rejected(f"check-in of {p.node}: keys are for secure_mean rounds; contract {contract.name} merges with "
                       f"{contract.merge_method}")


def apply_checkin(state: LedgerState, tx: Tx, p: P.Checkin, index: int) -> None:
    contract = state.contract(p.contract)
    r = contract.rounds.setdefault(p.round, Round(p.round))
    r.checkins[p.node] = Checkin(p.hash, float(p.weight), p.size, p.final)
    if p.keys is not None:
        if r.secure is None:
            r.secure = SecureRound()
        r.secure.keys[p.node] = p.keys.model_dump()
    if p.final:
        contract.members[p.node].finished = True
    # The check-in that completes the round closes it: with every active member in, the participants
    # and leader are already decided, and a separate close_round entry would cost every round one
    # more signed append and watch hop.
    # Every follower folds this once per check-in (32 times a round with 32 peers): the first active
    # member not yet in ends the test, and nothing is sorted before everyone is.
    everyone_in = all(n in r.checkins for n, m in contract.members.items() if m.active)
    if everyone_in and len(r.checkins) >= contract.min_peers:
        _close(contract, r, sorted(r.checkins), index, tx.time)


def _round(state: LedgerState, contract_name: str, number: int, status: str) -> tuple[Contract, Round]:
    contract = state.contract(contract_name)
    r = contract.rounds.get(number)
    if r is None or r.status != status:
        raise Rejected(f"round {number} of {contract.name} is not {status}")
    return contract, r


def validate_close_round(state: LedgerState, tx: Tx, p: P.CloseRound) -> None:
    contract = state.contract(p.contract)
    _member(contract, tx.signer.node)
    r = contract.rounds.get(p.round)
    if r is None or r.status != RoundStatus.OPEN or p.round != contract.current_round:
        raise Rejected(f"round {p.round} of {contract.name} is not open (another node may have closed it)")
    missing = [n for n in p.participants if n not in r.checkins]
    if missing:
        raise Rejected(f"{missing[0]} did not check in to round {p.round}")
    if len(set(p.participants)) < contract.min_peers:
        raise Rejected(f"round {p.round} needs {contract.min_peers} peers, only {len(set(p.participants))} given")
    if r.secure is not None and len(set(p.participants)) < SECURE_MIN_PEERS:
        raise Rejected(f"round {p.round} merges with secure_mean: it needs at least {SECURE_MIN_PEERS} participants")
    order = leader_order(contract.name, contract.generation, p.round, p.participants)
    if p.leader != order[0]:
        raise Rejected(f"leader of round {p.round} must be {order[0]}, not {p.leader}")


def apply_close_round(state: LedgerState, tx: Tx, p: P.CloseRound, index: int) -> None:
    contract = state.contract(p.contract)
    _close(contract, contract.rounds[p.round], list(p.participants), index, tx.time)


def _close(contract: Contract, r: Round, participants: list[str], index: int, when: float) -> None:
    order = leader_order(contract.name, contract.generation, r.number, participants)
    r.status, r.participants, r.order, r.leader, r.closed_at = RoundStatus.CLOSED, order, order, order[0], index
    r.closed_time, r.need = when, contract.min_peers
    contract.current_round += 1


def validate_reelect(state: LedgerState, tx: Tx, p: P.Reelect) -> None:
    contract, r = _round(state, p.contract, p.round, RoundStatus.CLOSED)
    _member(contract, tx.signer.node)
    if r.secure is not None and r.secure.survivors is not None:
        raise Rejected(f"round {r.number}: its survivors are named and their shares revealed; a new leader would "
                       f"have them revealed again for another set (which could unmask a participant), so a "
                       f"participant aborts the round instead")
    if p.failed != r.leader:
        raise Rejected(f"round {r.number}: {p.failed} is not its leader ({r.leader})")
    remaining = [n for n in r.participants if n != r.leader]
    if len(remaining) < r.need:
        raise Rejected(f"round {r.number}: without {r.leader} only {len(remaining)} peers remain, "
                       f"fewer than min_peers {r.need}")
    if p.leader != remaining[0]:  # participants stay in leader order
        raise Rejected(f"round {r.number}: the next leader must be {remaining[0]}, not {p.leader}")


def apply_reelect(state: LedgerState, tx: Tx, p: P.Reelect, index: int) -> None:
    _, r = _round(state, p.contract, p.round, RoundStatus.CLOSED)
    r.participants = [n for n in r.participants if n != r.leader]
    r.leader = r.participants[0]
    r.reelections += 1


def validate_merged(state: LedgerState, tx: Tx, p: P.Merged) -> None:
    contract, r = _round(state, p.contract, p.round, RoundStatus.CLOSED)
    if tx.signer.node != r.leader:
        raise Rejected(f"round {r.number}: only its leader {r.leader} may post the merged model")
    if any(n not in r.participants for n in p.dropped):
        raise Rejected(f"round {r.number}: dropped nodes must be participants")
    kept = len(r.participants) - len(set(p.dropped))
    if kept < r.need:
        raise Rejected(f"round {r.number}: merging {kept} peers is fewer than min_peers {r.need}")
    if r.secure is not None and (r.secure.survivors is None
                                 or set(r.participants) - set(p.dropped) != set(r.secure.survivors)):
        raise Rejected(f"round {r.number} merges with secure_mean: the merged model is the sum of the survivors "
                       f"it named ({', '.join(r.secure.survivors or []) or 'none yet'}), and only those")
    if p.size > contract.limits.max_blob_bytes:
        raise Rejected(f"round {r.number}: a merged model of {p.size} bytes exceeds the contract's "
                       f"{contract.limits.max_blob_bytes}")


def apply_merged(state: LedgerState, tx: Tx, p: P.Merged, index: int) -> None:
    contract, r = _round(state, p.contract, p.round, RoundStatus.CLOSED)
    r.participants = [n for n in r.participants if n not in p.dropped]
    r.status, r.merged_hash, r.merged_size, r.merged_at = RoundStatus.MERGED, p.hash, p.size, index
    r.merged_time = tx.time
    r.final = contract.is_final(r)
    contract.latest_merged_round = r.number
    contract.rounds_merged += 1
    _finished(state, contract, r)


def validate_round_abort(state: LedgerState, tx: Tx, p: P.RoundAbort) -> None:
    _, r = _round(state, p.contract, p.round, RoundStatus.CLOSED)
    if tx.signer.node == r.leader:
        return
    # A participant may abort in place of a leader it holds failed only when no re-election could
    # replace that leader (too few peers would remain): else the round waits forever.
    remaining = [n for n in r.participants if n != r.leader]
    cannot_reelect = len(remaining) < r.need or (r.secure is not None and r.secure.survivors is not None)
    if tx.signer.node not in remaining or p.failed != r.leader or not cannot_reelect:
        raise Rejected(f"round {r.number}: only its leader {r.leader} may abort it (or a participant, "
                       f"naming it as failed, when too few peers remain to re-elect, or its survivors are named)")


def apply_round_abort(state: LedgerState, tx: Tx, p: P.RoundAbort, index: int) -> None:
    contract, r = _round(state, p.contract, p.round, RoundStatus.CLOSED)
    r.status = RoundStatus.ABORTED
    r.merged_at = index
    contract.rounds_aborted += 1
    _finished(state, contract, r)


def _finished(state: LedgerState, contract: Contract, r: Round) -> None:
    """After round `r` of `contract` finished: drops what its secure aggregation exchanged (keys,
    shares, reveals: of use only to unmask it), and from protocol 3 on, the finished rounds older than
    the newest KEEP_FINISHED_ROUNDS (the latest merged round, and open and closed ones, always stay).
    No rule reads them: check-ins, closes, re-elections and merges concern open and closed rounds,
    evictions the two rounds before the open one."""
    if r.secure is not None:
        r.secure.keys, r.secure.shares, r.secure.revealed = {}, {}, {}
    if state.protocol < 3:
        return
    finished = [n for n, r in contract.rounds.items()
                if r.status in (RoundStatus.MERGED, RoundStatus.ABORTED) and n != contract.latest_merged_round]
    if len(finished) > KEEP_FINISHED_ROUNDS:
        for number in sorted(finished)[:-KEEP_FINISHED_ROUNDS]:
            del contract.rounds[number]


# ------------------------------------------------------------------------------ metrics

def validate_metrics(state: LedgerState, tx: Tx, p: P.Metrics) -> None:
    contract = state.contract(p.contract)
    speaks_for_itself(tx, p.node)
    _admitted(contract, p.node)
    _member(contract, p.node)
    values = metric_values(p)
    if not all(isinstance(v, (int, float, str)) or v is None for v in values.values()):
        raise Rejected("metric values must be numbers or strings")
    size = len(canonical_json(values))
    if size > contract.limits.max_metrics_bytes:
        raise Rejected(f"metrics of {p.node} take {size} bytes; contract {contract.name} allows at most "
                       f"{contract.limits.max_metrics_bytes} per report")


def metric_values(p: P.Metrics) -> dict:
    """What a report records: its kind where it names one (older reports, without, read as "train")
    and its values."""
    return {**({"kind": p.kind} if p.kind else {}), **(p.model_extra or {})}
