"""What the ledger's state is made of: nodes, trusted CAs, contracts and their rounds, tasks and task
runners. Plain data; the reducers in identities.py, contracts.py and tasks.py change it, and
policy.py says which transaction kind may change what, and who may submit it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from swarmlearn import pki


class Kind(StrEnum):
    GENESIS = "genesis"
    REGISTER_NODE = "register_node"
    TRUST_CA = "trust_ca"
    MAP_CERT = "map_cert"
    REVOKE_CERT = "revoke_cert"
    CONTRACT_CREATE = "contract_create"
    CONTRACT_UPDATE = "contract_update"
    CONTRACT_RESET = "contract_reset"
    TASK_CREATE = "task_create"
    TASK_APPEND = "task_append"
    TASK_FINALIZE = "task_finalize"
    TASK_DELETE = "task_delete"
    TASKRUNNER_CREATE = "taskrunner_create"
    TASKRUNNER_JOIN = "taskrunner_join"
    TASKRUNNER_ASSIGN = "taskrunner_assign"
    TASKRUNNER_CLAIM = "taskrunner_claim"
    TASKRUNNER_PEER_STATUS = "taskrunner_peer_status"
    TASKRUNNER_RESET = "taskrunner_reset"
    SESSION_JOIN = "session_join"
    SESSION_LEAVE = "session_leave"
    SESSION_EVICT = "session_evict"
    CHECKIN = "checkin"
    CLOSE_ROUND = "close_round"
    REELECT = "reelect"
    MERGED = "merged"
    ROUND_ABORT = "round_abort"
    METRICS = "metrics"
    CHECKPOINT = "checkpoint"
    SECAGG_SHARES = "secagg_shares"
    SECAGG_MASKING = "secagg_masking"
    SECAGG_MASKED = "secagg_masked"
    SECAGG_SURVIVORS = "secagg_survivors"
    SECAGG_REVEAL = "secagg_reveal"


class Role(StrEnum):
    """A node's role on the ledger: its certificate's role (pki.ROLES), upper-cased."""

    SN = "SN"
    SL = "SL"
    SWOP = "SWOP"
    SWCI = "SWCI"
    UI = "UI"
    ADMIN = "ADMIN"


class RoundStatus(StrEnum):
    OPEN = "open"
    CLOSED = "closed"
    MERGED = "merged"
    ABORTED = "aborted"


class PeerState(StrEnum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    COMPLETE = "COMPLETE"
    FAILED = "FAILED"


class AssignmentStatus(StrEnum):
    RUNNING = "RUNNING"
    COMPLETE = "COMPLETE"
    FAILED = "FAILED"
    RESET = "RESET"


# The rules this code founds a ledger with, recorded in its genesis (LedgerState.protocol reads it).
# Raise it with any change to what a transaction means, to payload shapes, to leader order or to
# hashes (tests/test_golden.py pins them). A ledger founded by an older protocol, down to
# OLDEST_PROTOCOL, is folded by that protocol's rules, so its checkpoints keep verifying; a node refuses
# a ledger of any other protocol rather than fold the same log into another state.
# 3: a contract keeps only its newest finished rounds (KEEP_FINISHED_ROUNDS) and counts the rest;
#    rounds no longer carry metrics summaries (they stay ledger entries, served by the SN's metrics query).
# 4: secure aggregation (the secagg_* kinds, a round's `secure` phases, check-in keys) and a merge method
#    chosen per contract by its creator.
PROTOCOL_VERSION = 4
OLDEST_PROTOCOL = 2
# Finished (merged or aborted) rounds a contract keeps from protocol 3 on, besides its open and closed
# ones and its latest merged one: the state every node folds stays the same size however long the run.
KEEP_FINISHED_ROUNDS = 32

TASK_TYPES = ("MAKE_USER_CONTAINER", "RUN_SWARM", "PULL_IMAGE", "MAKE_SWARM_USER_CONTENT")
DEFAULT_ALIAS = "default"


def leader_order(contract: str, generation: int, round_no: int, participants: Iterable[str]) -> list[str]:
    """The deterministic order in which participants lead a round: the first leads, and each
    re-election passes to the next. Seeded by contract and round, so leadership rotates."""
    def rank(node: str) -> str:
        return hashlib.sha256(f"{contract}|{generation}|{round_no}|{node}".encode()).hexdigest()

    return sorted(set(participants), key=lambda n: (rank(n), n))


@dataclass
class TrustedCA:
    """A CA the swarm trusts, bound to the one organization it issues for and the roles it may issue."""

    fingerprint: str
    org: str
    roles: list[str]
    cert: str  # PEM
    added_at: int  # entry index


@dataclass
class Node:
    node_id: str
    role: str
    address: str
    cert_fp: str
    subject: str
    registered_at: int  # entry index
    info: dict = field(default_factory=dict)
    # The organization that issued its certificate (the `<org>` of spiffe://<org>/<role>/<name>).
    org: str = ""
    # The fingerprint of the CA that issued it: only that CA's certificates may take the name over.
    issuer: str = ""

    @property
    def spiffe_id(self) -> str:
        return pki.spiffe_id(self.org, self.role.lower(), self.node_id)


@dataclass
class ContractLimits:
    """Bounds on what a member of a contract may declare, set by the contract's creator (for the
    default contract: at genesis, changed only by an admin)."""

    max_min_peers: int = 16
    max_blob_bytes: int = 4 << 30
    max_metrics_bytes: int = 16 << 10


@dataclass
class Member:
    min_peers: int
    weightage: float
    active: bool = True
    joined_at: int = 0
    merge_method: str = "mean"
    finished: bool = False  # its training ended; it still contributes its final weights (snapshot)
    # Client-level DP it trains under ({"clip", "noise_multiplier", "delta"}), the same for every member.
    client_dp: dict | None = field(default=None, metadata={"since": 4})


@dataclass
class Checkin:
    hash: str
    weight: float
    size: int
    final: bool = False


@dataclass
class SecureRound:
    """A `secure_mean` round's secure aggregation as the ledger records it (sl/secure.py says the
    protocol): each participant's fresh public keys (from its check-in), the encrypted shares each sealed
    for every participant, the masking set (who shared), the masked inputs posted, the survivors the
    leader holds masked inputs of, and the shares each survivor revealed. Shares and reveals are dropped
    once the round is over: they matter only to its unmasking."""

    keys: dict[str, dict[str, str]] = field(default_factory=dict)  # node -> {"c", "s", "b"}
    shares: dict[str, dict[str, str]] = field(default_factory=dict)  # sender -> recipient -> sealed share
    masking: list[str] | None = None
    masked: dict[str, str] = field(default_factory=dict)  # node -> hash of its masked input
    masked_sizes: dict[str, int] = field(default_factory=dict)
    survivors: list[str] | None = None
    revealed: dict[str, dict[str, str]] = field(default_factory=dict)  # survivor -> node -> share


@dataclass
class Round:
    number: int
    checkins: dict[str, Checkin] = field(default_factory=dict)
    status: str = RoundStatus.OPEN  # open -> closed -> merged | aborted
    participants: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # leader order over the original participants
    leader: str | None = None
    reelections: int = 0
    merged_hash: str | None = None
    merged_size: int = 0
    # Decided when merged: every active member took part with its final weights, so this is the
    # swarm's last round. Fixed by the ledger's order, so every node reads the same answer.
    final: bool = False
    closed_at: int | None = None
    merged_at: int | None = None
    # min_peers when the round closed: later joins cannot change a closed round's rules.
    need: int = 0
    # The signers' clocks at close and merge, kept as data for people (round durations).
    closed_time: float = 0.0
    merged_time: float = 0.0
    # Protocol 2 only: node -> {"train": ..., "validation": ...}, the last report of each kind about
    # this round, in summary (ledger/metrics.py). From protocol 3 on it stays empty: every report stays
    # a ledger entry, read with the SN's "metrics" query.
    metrics: dict[str, dict] = field(default_factory=dict)
    # From protocol 4, for a round of a contract that merges with secure_mean.
    secure: SecureRound | None = field(default=None, metadata={"since": 4})


def _counting(status: str):
    """How a snapshot of a protocol-2 state, which keeps every round, gives a contract's count of rounds
    of `status` (snapshot.py: fields `since` a protocol)."""
    return lambda contract: sum(1 for r in contract.rounds.values() if r.status == status)


@dataclass
class Contract:
    name: str
    created_by: str
    generation: int = 0
    members: dict[str, Member] = field(default_factory=dict)
    # From protocol 3 on: the open and closed rounds, the latest merged one and the newest
    # KEEP_FINISHED_ROUNDS other finished ones (contracts.py drops older ones as rounds finish).
    # Protocol 2 keeps every round.
    rounds: dict[int, Round] = field(default_factory=dict)
    current_round: int = 1
    latest_merged_round: int | None = None
    # Rounds merged and aborted since the contract was created or last reset, kept or not.
    rounds_merged: int = field(default=0, metadata={"since": 3, "derive": _counting(RoundStatus.MERGED)})
    rounds_aborted: int = field(default=0, metadata={"since": 3, "derive": _counting(RoundStatus.ABORTED)})
    # The newest metrics reports as recorded, at most metrics.RECENT_REPORTS (for followers that draw
    # curves as entries arrive); older ones are read from the ledger (the SN's "metrics" query).
    metrics: list[dict] = field(default_factory=list)
    metrics_recorded: int = 0  # reports recorded in all
    # node -> {"latest": ..., "train": ..., "validation": ...}: its last report of any kind and of each.
    latest_metrics: dict[str, dict] = field(default_factory=dict)
    # The node ids admitted to this contract's training; None admits every registered SL (the
    # default contract, and contracts created without a list).
    peers: list[str] | None = None
    limits: ContractLimits = field(default_factory=ContractLimits)
    # The merge method its creator chose (protocol 4); None leaves it to the members, who must agree.
    chosen_merge_method: str | None = field(default=None, metadata={"since": 4})

    @property
    def min_peers(self) -> int:
        declared = [m.min_peers for m in self.members.values() if m.active]
        return max(declared, default=1)

    @property
    def latest_merged(self) -> Round | None:
        return self.rounds.get(self.latest_merged_round) if self.latest_merged_round else None

    @property
    def active_members(self) -> list[str]:
        return sorted(n for n, m in self.members.items() if m.active)

    @property
    def client_dp(self) -> dict | None:
        """The client-level DP settings its active members train under (they agree: session_join)."""
        return next((m.client_dp for m in self.members.values() if m.active), None)

    @property
    def merge_method(self) -> str:
        if self.chosen_merge_method:
            return self.chosen_merge_method
        methods = {m.merge_method for m in self.members.values() if m.active}
        return methods.pop() if len(methods) == 1 else "mean"

    def is_final(self, r: Round) -> bool:
        active = self.active_members
        return (bool(active) and set(active) <= set(r.participants)
                and all(r.checkins[n].final for n in r.participants))

    def absent_from_last_rounds(self, node: str, rounds: int = 2) -> bool:
        """Whether `node` took part in none of the last `rounds` closed rounds (and there were that many)."""
        closed = [self.rounds.get(n) for n in range(self.current_round - rounds, self.current_round)]
        return all(r is not None and r.status != RoundStatus.OPEN and node not in r.participants for r in closed)


@dataclass
class Task:
    name: str
    type: str
    author: str  # the taskdef's free text; who really wrote it is `created_by`
    prereq: str
    outcome: str
    body: dict
    created_by: str
    finalized: bool = False


@dataclass
class PeerStatus:
    swop: str
    status: str = PeerState.STARTING
    exit_code: int | None = None
    detail: str = ""


@dataclass
class Assignment:
    task: str
    peers: int
    generation: int
    status: str = AssignmentStatus.RUNNING  # RUNNING -> COMPLETE | FAILED | RESET
    peer_status: dict[str, PeerStatus] = field(default_factory=dict)
    assigned_by: str = ""
    target: str = ""  # the one SWOP that may claim its peers; "" for any SWOP of the runner


@dataclass
class TaskRunner:
    name: str
    created_by: str
    swops: dict[str, int] = field(default_factory=dict)  # SWOP node id -> how many peers it can start
    assignment: Assignment | None = None
    assignments_made: int = 0
    history: list[dict] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        return sum(self.swops.values())
