"""The security policy of the ledger, in one table: for each transaction kind, the shape of its
payload, the roles whose certificates may submit it, a pure check and the change it makes.

Roles come from the signer's verified certificate (through its registration), never from a payload.
Object rules (only a contract's creator or an admin changes it, members speak only for themselves,
only a task's creator changes it, only the SWOP that claimed a peer reports on it) live in the
checks. The README's "Security model" prints this table (`swarm policy` prints it too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from swarmlearn.ledger import contracts as C
from swarmlearn.ledger import identities as I
from swarmlearn.ledger import metrics as M
from swarmlearn.ledger import payloads as P
from swarmlearn.ledger import secure_rounds as SR
from swarmlearn.ledger import snapshot as S
from swarmlearn.ledger import tasks as T
from swarmlearn.ledger.model import Kind, Role


@dataclass(frozen=True)
class Rule:
    payload: type[P.Payload]
    roles: frozenset[Role]
    validate: Callable
    apply: Callable
    says: str  # one line for the README's table


def _rule(payload, roles, module, kind: Kind, says: str) -> Rule:
    return Rule(payload, frozenset(roles), getattr(module, f"validate_{kind.value}"),
                getattr(module, f"apply_{kind.value}"), says)


SN, SL, SWOP, SWCI, ADMIN = Role.SN, Role.SL, Role.SWOP, Role.SWCI, Role.ADMIN
WRITERS = {SN, SL, SWOP, SWCI, ADMIN}  # every role but the read-only UI

POLICY: dict[Kind, Rule] = {
    Kind.GENESIS: _rule(P.Genesis, {SN}, I, Kind.GENESIS,
                        "the sentinel founds the swarm: trusted CAs, their organizations and roles"),
    Kind.REGISTER_NODE: _rule(P.Registration, WRITERS, I, Kind.REGISTER_NODE,
                              "a node enters as its certificate's name and role; same org+role may rotate"),
    Kind.TRUST_CA: _rule(P.TrustCA, {ADMIN}, I, Kind.TRUST_CA,
                         "trust another organization's CA for named roles (never admin, never an existing org)"),
    Kind.MAP_CERT: _rule(P.MapCert, {ADMIN}, I, Kind.MAP_CERT,
                         "give a role-less (older) certificate a role and name"),
    Kind.REVOKE_CERT: _rule(P.RevokeCert, {ADMIN}, I, Kind.REVOKE_CERT,
                            "refuse a certificate from now on, everywhere"),
    Kind.CONTRACT_CREATE: _rule(P.ContractChange, {SWCI, ADMIN}, C, Kind.CONTRACT_CREATE,
                                "a training contract, optionally for named peers, with limits and a merge method"),
    Kind.CONTRACT_UPDATE: _rule(P.ContractChange, {SWCI, ADMIN}, C, Kind.CONTRACT_UPDATE,
                                "change peers, limits or merge method: its creator; the default contract: an admin"),
    Kind.CONTRACT_RESET: _rule(P.Named, {SWCI, ADMIN}, C, Kind.CONTRACT_RESET,
                               "start a contract over: its creator; the default contract: an admin"),
    Kind.TASK_CREATE: _rule(P.TaskCreate, {SWCI, ADMIN}, T, Kind.TASK_CREATE, "a task from a taskdef"),
    Kind.TASK_APPEND: _rule(P.TaskAppend, {SWCI, ADMIN}, T, Kind.TASK_APPEND, "add to a task: its creator"),
    Kind.TASK_FINALIZE: _rule(P.Named, {SWCI, ADMIN}, T, Kind.TASK_FINALIZE, "freeze a task: its creator"),
    Kind.TASK_DELETE: _rule(P.Named, {SWCI, ADMIN}, T, Kind.TASK_DELETE, "delete a task: its creator"),
    Kind.TASKRUNNER_CREATE: _rule(P.Named, {SWCI, ADMIN}, T, Kind.TASKRUNNER_CREATE, "a task runner"),
    Kind.TASKRUNNER_JOIN: _rule(P.RunnerJoin, {SWOP}, T, Kind.TASKRUNNER_JOIN,
                                "a SWOP offers its nodes to a task runner"),
    Kind.TASKRUNNER_ASSIGN: _rule(P.RunnerAssign, {SWCI, ADMIN}, T, Kind.TASKRUNNER_ASSIGN,
                                  "run a finalized task on a task runner's SWOPs"),
    Kind.TASKRUNNER_CLAIM: _rule(P.RunnerClaim, {SWOP}, T, Kind.TASKRUNNER_CLAIM,
                                 "a SWOP of that task runner claims peers to start"),
    Kind.TASKRUNNER_PEER_STATUS: _rule(P.RunnerPeerStatus, {SWOP}, T, Kind.TASKRUNNER_PEER_STATUS,
                                       "the SWOP that claimed a peer reports on it"),
    Kind.TASKRUNNER_RESET: _rule(P.RunnerOnly, {SWCI, ADMIN}, T, Kind.TASKRUNNER_RESET,
                                 "end a task runner's assignment"),
    Kind.SESSION_JOIN: _rule(P.SessionJoin, {SL}, C, Kind.SESSION_JOIN,
                             "an admitted SL joins, min_peers within the contract's limit"),
    Kind.SESSION_LEAVE: _rule(P.SessionLeave, {SL}, C, Kind.SESSION_LEAVE, "a member leaves"),
    Kind.SESSION_EVICT: _rule(P.SessionEvict, {SL}, C, Kind.SESSION_EVICT,
                              "a member ends one absent from the last 2 rounds"),
    Kind.CHECKIN: _rule(P.Checkin, {SL}, C, Kind.CHECKIN,
                        "a member checks in its own hash, size within the contract's limit"),
    Kind.CLOSE_ROUND: _rule(P.CloseRound, {SL}, C, Kind.CLOSE_ROUND,
                            "a member fixes participants and the ledger-chosen leader"),
    Kind.REELECT: _rule(P.Reelect, {SL}, C, Kind.REELECT, "a member replaces a silent leader by the next"),
    Kind.MERGED: _rule(P.Merged, {SL}, C, Kind.MERGED, "the round's leader posts the merged hash"),
    Kind.ROUND_ABORT: _rule(P.RoundAbort, {SL}, C, Kind.ROUND_ABORT,
                            "the leader (or a participant, when none can replace it) aborts"),
    # Checked as a contract's other member reports; kept in the state as summaries (ledger/metrics.py).
    Kind.METRICS: Rule(P.Metrics, frozenset({SL}), C.validate_metrics, M.apply_metrics,
                       "a member reports its own metrics, within the contract's size limit"),
    Kind.SECAGG_SHARES: _rule(P.SecAggShares, {SL}, SR, Kind.SECAGG_SHARES,
                              "a secure_mean participant posts its own shares, one sealed for each participant"),
    Kind.SECAGG_MASKING: _rule(P.SecAggMasking, {SL}, SR, Kind.SECAGG_MASKING,
                               "the round's leader fixes the masking set: participants that shared"),
    Kind.SECAGG_MASKED: _rule(P.SecAggMasked, {SL}, SR, Kind.SECAGG_MASKED,
                              "a member of the masking set posts the hash of its own masked input"),
    Kind.SECAGG_SURVIVORS: _rule(P.SecAggSurvivors, {SL}, SR, Kind.SECAGG_SURVIVORS,
                                 "the round's leader names the survivors once, at least the recovery threshold"),
    Kind.SECAGG_REVEAL: _rule(P.SecAggReveal, {SL}, SR, Kind.SECAGG_REVEAL,
                              "a named survivor reveals one share per member of the masking set"),
    Kind.CHECKPOINT: _rule(P.Checkpoint, {SN}, S, Kind.CHECKPOINT,
                           "the appending SN states the hash of the state at the entry before (snapshots)"),
}


def policy_table() -> list[str]:
    """The table as Markdown rows: kind, who may submit it, what it does."""
    rows = ["| transaction | submitted by | what it does (and the object rule) |", "|---|---|---|"]
    for kind, rule in POLICY.items():
        roles = ", ".join(r.value.lower() for r in Role if r in rule.roles)
        rows.append(f"| `{kind.value}` | {roles} | {rule.says} |")
    return rows


# One rule beyond the transactions: who may have an SN add an etcd member to the cluster that holds a
# shared ledger (the SN API's JoinCluster, not a ledger entry). Whoever runs a member holds a copy of
# the ledger and a vote on it, so only an SN the ledger already knows may add one, and only its own.
JOIN_CLUSTER_ROLES = frozenset({SN})
JOIN_CLUSTER_SAYS = ("an SN registered on the ledger with the caller's certificate, not revoked, adds its own etcd "
                     "member (a learner, promoted once in sync)")


def may_join_cluster(state, cert_fp: str) -> str | None:
    """Why the caller holding certificate `cert_fp` may not add an etcd member; None if it may."""
    if cert_fp in state.revoked:
        return f"certificate {cert_fp[:12]} was revoked at ledger entry {state.revoked[cert_fp]}"
    node = next((n for n in state.nodes.values() if n.cert_fp == cert_fp), None)
    if node is None:
        return (f"no node is registered on the ledger with certificate {cert_fp[:12]}; an SN registers itself "
                f"(`swarm sn` does) before it joins")
    if node.role not in JOIN_CLUSTER_ROLES:
        return f"{node.node_id} is registered as {node.role}; only an SN runs an etcd member of the ledger"
    return None


def join_cluster_row() -> str:
    """The rule as a row of the policy table's shape (the README shows it below the table)."""
    roles = ", ".join(r.value.lower() for r in Role if r in JOIN_CLUSTER_ROLES)
    return f"| `JoinCluster` (SN API call) | {roles} | {JOIN_CLUSTER_SAYS} |"
