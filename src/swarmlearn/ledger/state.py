"""The ledger's state machine: entries in, state out. No I/O, no clocks, no randomness.

Every SN folds the same log into the same state. `LedgerState.apply` checks a transaction against
the state first and raises `Rejected` with a reason before it changes anything, so a refused
transaction leaves no trace. Signatures are checked by whoever accepts bytes from the network (the
SN, `swarm ledger verify`); here we check that the signer speaks only for itself.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Iterable

from swarmlearn.errors import AlreadyRecorded, Rejected
from swarmlearn.ledger.entry import Entry, Tx


class Kind(StrEnum):
    GENESIS = "genesis"
    REGISTER_NODE = "register_node"
    TRUST_CA = "trust_ca"
    CONTRACT_CREATE = "contract_create"
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


ROLES = ("SN", "SL", "SWOP", "SWCI", "ML", "UI")
TASK_TYPES = ("MAKE_USER_CONTAINER", "RUN_SWARM", "PULL_IMAGE", "MAKE_SWARM_USER_CONTENT")
PEER_STATUSES = ("STARTING", "RUNNING", "COMPLETE", "FAILED")
DEFAULT_ALIAS = "default"


# Deeper payloads are refused: every entry is kept in the state, and the state is served as JSON
# through recursive encoders that a payload nested hundreds of levels deep would break for good.
MAX_PAYLOAD_DEPTH = 16


def _depth(value, limit: int = MAX_PAYLOAD_DEPTH + 1) -> int:
    """How deeply `value` nests lists and dicts (counting stops past `limit`)."""
    if limit <= 0 or not isinstance(value, (dict, list)):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(c, limit - 1) for c in children), default=0)


def leader_order(contract: str, generation: int, round_no: int, participants: Iterable[str]) -> list[str]:
    """The deterministic order in which participants lead a round: the first leads, and each
    re-election passes to the next. Seeded by contract and round, so leadership rotates."""
    def rank(node: str) -> str:
        return hashlib.sha256(f"{contract}|{generation}|{round_no}|{node}".encode()).hexdigest()

    return sorted(set(participants), key=lambda n: (rank(n), n))


@dataclass
class Node:
    node_id: str
    role: str
    address: str
    cert_fp: str
    subject: str
    registered_at: int  # entry index
    info: dict = field(default_factory=dict)


@dataclass
class Member:
    min_peers: int
    weightage: float
    active: bool = True
    joined_at: int = 0
    merge_method: str = "mean"
    finished: bool = False  # its training ended; it still contributes its final weights (snapshot)


@dataclass
class Checkin:
    hash: str
    weight: float
    size: int
    final: bool = False


@dataclass
class Round:
    number: int
    checkins: dict[str, Checkin] = field(default_factory=dict)
    status: str = "open"  # open -> closed -> merged | aborted
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


@dataclass
class Contract:
    name: str
    created_by: str
    generation: int = 0
    members: dict[str, Member] = field(default_factory=dict)
    rounds: dict[int, Round] = field(default_factory=dict)
    current_round: int = 1
    latest_merged_round: int | None = None
    metrics: list[dict] = field(default_factory=list)
    # The node ids admitted to this contract's training, fixed when it is created; None admits every
    # registered node (the default contract, and contracts created without a list).
    peers: list[str] | None = None

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
    def merge_method(self) -> str:
        methods = {m.merge_method for m in self.members.values() if m.active}
        return methods.pop() if len(methods) == 1 else "mean"

    def is_final(self, r: Round) -> bool:
        active = self.active_members
        return (bool(active) and set(active) <= set(r.participants)
                and all(r.checkins[n].final for n in r.participants))

    def absent_from_last_rounds(self, node: str, rounds: int = 2) -> bool:
        """Whether `node` took part in none of the last `rounds` closed rounds (and there were that many)."""
        closed = [self.rounds.get(n) for n in range(self.current_round - rounds, self.current_round)]
        return all(r is not None and r.status != "open" and node not in r.participants for r in closed)


@dataclass
class Task:
    name: str
    type: str
    author: str
    prereq: str
    outcome: str
    body: dict
    created_by: str
    finalized: bool = False


@dataclass
class PeerStatus:
    swop: str
    status: str = "STARTING"
    exit_code: int | None = None
    detail: str = ""


@dataclass
class Assignment:
    task: str
    peers: int
    generation: int
    status: str = "RUNNING"  # RUNNING -> COMPLETE | FAILED | RESET
    peer_status: dict[str, PeerStatus] = field(default_factory=dict)


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


@dataclass
class LedgerState:
    head_index: int = -1
    head_hash: str | None = None
    genesis: dict | None = None
    ca_fingerprints: list[str] = field(default_factory=list)
    nodes: dict[str, Node] = field(default_factory=dict)
    contracts: dict[str, Contract] = field(default_factory=dict)
    tasks: dict[str, Task] = field(default_factory=dict)
    taskrunners: dict[str, TaskRunner] = field(default_factory=dict)
    seen_tx: dict[str, int] = field(default_factory=dict)  # transaction id -> entry index

    # ---------------------------------------------------------------------------------- entry point

    def apply(self, entry: Entry) -> LedgerState:
        """Applies one entry in place and returns self; raises Rejected and changes nothing if the
        entry is not a legal next step."""
        expected = self.head_index + 1
        if entry.index != expected:
            raise Rejected(f"entry index {entry.index} is not the next index {expected}")
        if self.head_hash is not None and entry.prev_hash != self.head_hash:
            raise Rejected(f"entry {entry.index} does not follow the head {self.head_hash[:12]}")
        self.apply_tx(entry.tx, entry.index)
        self.head_index = entry.index
        self.head_hash = entry.hash
        return self

    def check_tx(self, tx: Tx) -> None:
        """Raises Rejected if `tx` would not be accepted as the next entry; changes nothing."""
        self._dispatch(tx, self.head_index + 1, dry_run=True)

    def apply_tx(self, tx: Tx, index: int) -> None:
        self._dispatch(tx, index, dry_run=False)
        self.seen_tx[tx.id] = index

    def _dispatch(self, tx: Tx, index: int, dry_run: bool) -> None:
        if tx.id in self.seen_tx:
            raise AlreadyRecorded(tx.id, self.seen_tx[tx.id])
        try:
            kind = Kind(tx.kind)
        except ValueError:
            raise Rejected(f"unknown transaction kind {tx.kind!r}") from None
        if kind is Kind.GENESIS:
            if index != 0 or self.genesis is not None:
                raise Rejected("genesis may only be the first entry")
        elif self.genesis is None:
            raise Rejected(f"{kind} before genesis: the first entry must be the sentinel's genesis")
        elif kind is not Kind.REGISTER_NODE:
            self._require_registered_signer(tx)
        if _depth(tx.payload) > MAX_PAYLOAD_DEPTH:
            raise Rejected(f"{kind} payload is nested deeper than {MAX_PAYLOAD_DEPTH} levels")
        handler = getattr(self, f"_{kind.value}")
        handler(tx.payload, tx, index, dry_run)

    # -------------------------------------------------------------------------------- helpers

    def _require_registered_signer(self, tx: Tx) -> Node:
        node = self.nodes.get(tx.signer.node)
        if node is None:
            raise Rejected(f"signer {tx.signer.node} is not a registered node; register it first")
        if node.cert_fp != tx.signer.cert_fp:
            raise Rejected(f"signer {tx.signer.node} signed with a certificate other than the one it registered")
        return node

    @staticmethod
    def _speaks_for_itself(tx: Tx, node: str) -> None:
        if tx.signer.node != node:
            raise Rejected(f"{tx.signer.node} cannot act for node {node}: a node may only speak for itself")

    def contract(self, name: str) -> Contract:
        if name == DEFAULT_ALIAS and self.genesis:
            name = self.genesis["default_contract"]
        contract = self.contracts.get(name)
        if contract is None:
            raise Rejected(f"no contract named {name!r}; create it first (CREATE CONTRACT {name})")
        return contract

    def taskrunner(self, name: str) -> TaskRunner:
        if name == DEFAULT_ALIAS and self.genesis:
            name = self.genesis["default_taskrunner"]
        runner = self.taskrunners.get(name)
        if runner is None:
            raise Rejected(f"no task runner named {name!r}; create it first (CREATE TASKRUNNER {name})")
        return runner

    def task(self, name: str) -> Task:
        task = self.tasks.get(name)
        if task is None:
            raise Rejected(f"no task named {name!r}; create it first (CREATE TASK FROM <taskdef.yaml>)")
        return task

    # ------------------------------------------------------------------------- nodes and genesis

    def _genesis(self, p: dict, tx: Tx, index: int, dry_run: bool) -> None:
        for key in ("swarm_id", "ca_fingerprints", "default_contract", "default_taskrunner", "sn"):
            if key not in p:
                raise Rejected(f"genesis lacks {key!r}")
        sn = p["sn"]
        self._check_registration(sn, tx)
        if dry_run:
            return
        self.genesis = dict(p)
        self.ca_fingerprints = list(p["ca_fingerprints"])
        self._put_node(sn, tx, index)
        self.contracts[p["default_contract"]] = Contract(p["default_contract"], created_by=tx.signer.node)
        self.taskrunners[p["default_taskrunner"]] = TaskRunner(p["default_taskrunner"], created_by=tx.signer.node)

    def _register_node(self, p: dict, tx: Tx, index: int, dry_run: bool) -> None:
        self._check_registration(p, tx)
        known = self.nodes.get(p["node_id"])
        if known is not None and known.cert_fp != tx.signer.cert_fp:
            raise Rejected(f"node id {p['node_id']} is already registered with another certificate "
                           f"({known.subject}); pick another node id")
        if not dry_run:
            self._put_node(p, tx, index)

    def _trust_ca(self, p: dict, tx: Tx, index: int, dry_run: bool) -> None:
        if self.nodes[tx.signer.node].role != "SN":
            raise Rejected(f"{tx.signer.node} is not an SN; only SNs add trusted CAs")
        fp = _str(p, "ca_fp")
        if fp in self.ca_fingerprints:
            raise Rejected(f"CA {fp[:12]} is already trusted")
        if not dry_run:
            self.ca_fingerprints.append(fp)

    @staticmethod
    def _check_registration(p: dict, tx: Tx) -> None:
        for key in ("node_id", "role", "address", "cert_fp", "subject"):
            if not isinstance(p.get(key), str):
                raise Rejected(f"registration lacks string field {key!r}")
        if p["role"] not in ROLES:
            raise Rejected(f"unknown role {p['role']!r}; one of {', '.join(ROLES)}")
        if not p["node_id"]:
            raise Rejected("node id must not be empty")
        LedgerState._speaks_for_itself(tx, p["node_id"])
        if p["cert_fp"] != tx.signer.cert_fp:
            raise Rejected(f"node {p['node_id']} registers a certificate other than the one it signed with")

    def _put_node(self, p: dict, tx: Tx, index: int) -> None:
        info = {k: v for k, v in p.items() if k not in ("node_id", "role", "address", "cert_fp", "subject")}
        self.nodes[p["node_id"]] = Node(p["node_id"], p["role"], p["address"], p["cert_fp"], p["subject"], index, info)

    # ----------------------------------------------------------------------------------- contracts

    def _contract_create(self, p: dict, tx: Tx, index: int, dry_run: bool) -> None:
        name = _str(p, "name")
        if name in self.contracts or name == DEFAULT_ALIAS:
            raise Rejected(f"contract {name!r} already exists")
        peers = p.get("peers")
        if peers is not None and (not isinstance(peers, list) or not peers
                                  or not all(isinstance(n, str) and n for n in peers)):
            raise Rejected(f"contract {name}: peers must be a non-empty list of node ids")
        if not dry_run:
            self.contracts[name] = Contract(name, created_by=tx.signer.node,
                                            peers=sorted(set(peers)) if peers is not None else None)

    def _contract_reset(self, p: dict, tx: Tx, index: int, dry_run: bool) -> None:
        contract = self.contract(_str(p, "name"))
        signer = tx.signer.node
        if signer != contract.created_by and self.nodes[signer].role != "SWCI":
            raise Rejected(f"only a SWCI or {contract.created_by}, who created it, may reset contract {contract.name}")
        if not dry_run:
            contract.generation += 1
            contract.members.clear()
            contract.rounds.clear()
            contract.current_round = 1
            contract.latest_merged_round = None

    # --------------------------------------------------------------------------------------- tasks

    def _task_create(self, p: dict, tx: Tx, index: int, dry_run: bool) -> None:
        name = _str(p, "name")
        if name in self.tasks:
            raise Rejected(f"task {name!r} already exists; delete it or use another Name")
        if p.get("type") not in TASK_TYPES:
            raise Rejected(f"task {name}: unknown TaskType {p.get('type')!r}; one of {', '.join(TASK_TYPES)}")
        prereq = _str(p, "prereq")
        if prereq != "ROOTTASK" and prereq not in self.tasks:
            raise Rejected(f"task {name}: Prereq {prereq!r} is neither ROOTTASK nor an existing task")
        if not isinstance(p.get("body"), dict):
            raise Rejected(f"task {name}: Body must be a mapping")
        if not dry_run:
            self.tasks[name] = Task(name, p["type"], str(p.get("author", "")), prereq, str(p.get("outcome", "")),
                                    p["body"], created_by=tx.signer.node)

    def _task_append(self, p: dict, tx: Tx, index: int, dry_run: bool) -> None:
        task = self.task(_str(p, "name"))
        if task.finalized:
            raise Rejected(f"task {task.name} is finalized; its body can no longer change")
        extra = p.get("body")
        if not isinstance(extra, dict):
            raise Rejected("task_append body must be a mapping")
        if dry_run:
            return
        for key, value in extra.items():
            old = task.body.get(key)
            task.body[key] = old + value if isinstance(old, list) and isinstance(value, list) else value

    def _task_finalize(self, p: dict, tx: Tx, index: int, dry_run: bool) -> None:
        task = self.task(_str(p, "name"))
        if task.finalized:
            raise Rejected(f"task {task.name} is already finalized")
        if not dry_run:
            task.finalized = True

    def _task_delete(self, p: dict, tx: Tx, index: int, dry_run: bool) -> None:
        task = self.task(_str(p, "name"))
        for runner in self.taskrunners.values():
            if runner.assignment and runner.assignment.task == task.name and runner.assignment.status == "RUNNING":
                raise Rejected(f"task {task.name} is running on {runner.name}; reset the task runner first")
        if any(t.prereq == task.name for t in self.tasks.values()):
            raise Rejected(f"task {task.name} is the Prereq of another task; delete that one first")
        if not dry_run:
            del self.tasks[task.name]

    # -------------------------------------------------------------------------------- task runners

    def _taskrunner_create(self, p: dict, tx: Tx, index: int, dry_run: bool) -> None:
        name = _str(p, "name")
        if name in self.taskrunners or name == DEFAULT_ALIAS:
            raise Rejected(f"task runner {name!r} already exists")
        if not dry_run:
            self.taskrunners[name] = TaskRunner(name, created_by=tx.signer.node)

    def _taskrunner_join(self, p: dict, tx: Tx, index: int, dry_run: bool) -> None:
        runner = self.taskrunner(_str(p, "runner"))
        if self.nodes[tx.signer.node].role != "SWOP":
            raise Rejected(f"{tx.signer.node} is not a SWOP; only operators join task runners")
        capacity = p.get("capacity")
        if not isinstance(capacity, int) or capacity < 1:
            raise Rejected("taskrunner_join capacity must be a whole number of peers, at least 1")
        if not dry_run:
            runner.swops[tx.signer.node] = capacity

    def _taskrunner_assign(self, p: dict, tx: Tx, index: int, dry_run: bool) -> None:
        runner = self.taskrunner(_str(p, "runner"))
        task = self.task(_str(p, "task"))
        if not task.finalized:
            raise Rejected(f"task {task.name} is not finalized; FINALIZE TASK {task.name} before assigning it")
        if runner.assignment and runner.assignment.status == "RUNNING":
            raise Rejected(f"task runner {runner.name} is still running {runner.assignment.task}; "
                           f"wait for it or RESET TASKRUNNER {runner.name}")
        if runner.capacity == 0:
            raise Rejected(f"task runner {runner.name} has no SWOP yet; start `swarm swop` for it first")
        peers = p.get("peers")
        if peers == "ALL":
            peers = runner.capacity
        if not isinstance(peers, int) or peers < 1:
            raise Rejected("peers must be a whole number of at least 1, or ALL")
        if peers > runner.capacity:
            raise Rejected(f"task {task.name} asks for {peers} peers but the SWOPs of {runner.name} "
                           f"can start {runner.capacity}; assign WITH {runner.capacity} PEERS or add nodes")
        if dry_run:
            return
        if runner.assignment:
            runner.history.append(_summary(runner.assignment))
        runner.assignments_made += 1
        runner.assignment = Assignment(task.name, peers, runner.assignments_made)

    def _running_assignment(self, p: dict) -> tuple[TaskRunner, Assignment]:
        runner = self.taskrunner(_str(p, "runner"))
        a = runner.assignment
        if a is None or a.status != "RUNNING" or p.get("generation") != a.generation:
            raise Rejected(f"task runner {runner.name} has no running assignment {p.get('generation')}")
        return runner, a

    def _taskrunner_claim(self, p: dict, tx: Tx, index: int, dry_run: bool) -> None:
        runner, a = self._running_assignment(p)
        if tx.signer.node not in runner.swops:
            raise Rejected(f"{tx.signer.node} has not joined task runner {runner.name}")
        peers = p.get("peers")
        if not isinstance(peers, list) or not peers or not all(isinstance(x, str) and x for x in peers):
            raise Rejected("taskrunner_claim peers must be a non-empty list of peer names")
        if len(a.peer_status) + len(peers) > a.peers:
            raise Rejected(f"task {a.task} needs {a.peers} peers and {len(a.peer_status)} are already claimed")
        taken = [x for x in peers if x in a.peer_status]
        if taken or len(set(peers)) != len(peers):
            raise Rejected(f"peer {taken[0] if taken else peers[0]} is claimed twice")
        if not dry_run:
            for peer in peers:
                a.peer_status[peer] = PeerStatus(swop=tx.signer.node)

    def _taskrunner_peer_status(self, p: dict, tx: Tx, index: int, dry_run: bool) -> None:
        runner, a = self._running_assignment(p)
        peer = _str(p, "peer")
        current = a.peer_status.get(peer)
        if current is None:
            raise Rejected(f"peer {peer} is not part of {a.task} on {runner.name}")
        if current.swop != tx.signer.node:
            raise Rejected(f"{tx.signer.node} cannot report for peer {peer}, which {current.swop} started")
        status = p.get("status")
        if status not in PEER_STATUSES:
            raise Rejected(f"unknown peer status {status!r}; one of {', '.join(PEER_STATUSES)}")
        if current.status in ("COMPLETE", "FAILED"):
            raise Rejected(f"peer {peer} already ended {current.status}")
        if dry_run:
            return
        current.status = status
        current.exit_code = p.get("exit_code")
        current.detail = str(p.get("detail", ""))
        if status == "FAILED":
            a.status = "FAILED"
        elif len(a.peer_status) == a.peers and all(s.status == "COMPLETE" for s in a.peer_status.values()):
            a.status = "COMPLETE"

    def _taskrunner_reset(self, p: dict, tx: Tx, index: int, dry_run: bool) -> None:
        runner = self.taskrunner(_str(p, "runner"))
        if dry_run or runner.assignment is None:
            return
        if runner.assignment.status == "RUNNING":
            runner.assignment.status = "RESET"
        runner.history.append(_summary(runner.assignment))
        runner.assignment = None

    # ---------------------------------------------------------------------------- training rounds

    @staticmethod
    def _admitted(contract: Contract, node: str) -> None:
        """A contract created with a peer list trains with those nodes only: any other node, even one
        holding a valid certificate of this swarm, can neither join its session nor check in."""
        if contract.peers is not None and node not in contract.peers:
            raise Rejected(f"{node} is not among the peers of contract {contract.name} "
                           f"({', '.join(contract.peers)}); it cannot join or check in to its rounds")

    def _member(self, contract: Contract, node: str) -> Member:
        member = contract.members.get(node)
        if member is None or not member.active:
            raise Rejected(f"{node} has not joined the training session of contract {contract.name}")
        return member

    def _session_join(self, p: dict, tx: Tx, index: int, dry_run: bool) -> None:
        contract = self.contract(_str(p, "contract"))
        node = _str(p, "node")
        self._speaks_for_itself(tx, node)
        self._admitted(contract, node)
        min_peers, weightage = p.get("min_peers", 1), p.get("weightage", 1)
        method = p.get("merge_method", "mean")
        if not isinstance(min_peers, int) or min_peers < 1:
            raise Rejected("min_peers must be a whole number of at least 1")
        if not isinstance(weightage, (int, float)) or not 0 < weightage <= 100:
            raise Rejected("node weightage must be in (0, 100]")
        if not isinstance(method, str) or not method:
            raise Rejected("merge_method must be the name of a merge method")
        others = {m.merge_method for n, m in contract.members.items() if m.active and n != node}
        if others and method not in others:
            raise Rejected(f"contract {contract.name} merges with {others.pop()}; {node} asks for {method}: "
                           f"every node of a contract must use the same merge_method")
        if not dry_run:
            contract.members[node] = Member(min_peers, float(weightage), True, index, str(method))

    def _session_leave(self, p: dict, tx: Tx, index: int, dry_run: bool) -> None:
        contract = self.contract(_str(p, "contract"))
        node = _str(p, "node")
        self._speaks_for_itself(tx, node)
        self._member(contract, node)
        if dry_run:
            return
        contract.members[node].active = False
        open_round = contract.rounds.get(contract.current_round)
        if open_round is not None:
            open_round.checkins.pop(node, None)

    def _session_evict(self, p: dict, tx: Tx, index: int, dry_run: bool) -> None:
        contract = self.contract(_str(p, "contract"))
        node = _str(p, "node")
        self._member(contract, tx.signer.node)
        self._member(contract, node)
        if node == tx.signer.node:
            raise Rejected(f"{node} cannot evict itself; it leaves with session_leave")
        if not contract.absent_from_last_rounds(node):
            raise Rejected(f"{node} took part in one of the last 2 rounds of {contract.name}; only a node absent "
                           f"from both can be evicted")
        if not dry_run:
            contract.members[node].active = False

    def _checkin(self, p: dict, tx: Tx, index: int, dry_run: bool) -> None:
        contract = self.contract(_str(p, "contract"))
        node = _str(p, "node")
        self._speaks_for_itself(tx, node)
        self._admitted(contract, node)
        self._member(contract, node)
        number = p.get("round")
        if number != contract.current_round:
            state = "closed" if isinstance(number, int) and number < contract.current_round else "not open yet"
            raise Rejected(f"check-in of {node} for round {number} of {contract.name}: that round is {state}; "
                           f"the open round is {contract.current_round}")
        digest, weight, size = _str(p, "hash"), p.get("weight"), _size(p)
        if not isinstance(weight, (int, float)) or weight < 0:
            raise Rejected("check-in weight must be a number of at least 0")
        existing = contract.rounds.get(number)
        if existing and node in existing.checkins:
            raise Rejected(f"{node} already checked in to round {number}")
        final = bool(p.get("final", False))
        if not dry_run:
            r = contract.rounds.setdefault(number, Round(number))
            r.checkins[node] = Checkin(digest, float(weight), size, final)
            if final:
                contract.members[node].finished = True
            # The check-in that completes the round closes it: with every active member in, the
            # participants and leader are already decided, and a separate close_round entry would
            # cost every round one more signed append and watch hop.
            everyone = contract.active_members
            if len(r.checkins) >= contract.min_peers and all(n in r.checkins for n in everyone):
                self._close(contract, r, sorted(r.checkins), index, tx.time)

    def _closed_round(self, p: dict, status: str = "closed") -> tuple[Contract, Round]:
        contract = self.contract(_str(p, "contract"))
        number = p.get("round")
        r = contract.rounds.get(number) if isinstance(number, int) else None
        if r is None or r.status != status:
            raise Rejected(f"round {number} of {contract.name} is not {status}")
        return contract, r

    def _close_round(self, p: dict, tx: Tx, index: int, dry_run: bool) -> None:
        contract = self.contract(_str(p, "contract"))
        self._member(contract, tx.signer.node)
        number = p.get("round")
        r = contract.rounds.get(number) if isinstance(number, int) else None
        if r is None or r.status != "open" or number != contract.current_round:
            raise Rejected(f"round {number} of {contract.name} is not open (another node may have closed it)")
        participants = p.get("participants")
        if not isinstance(participants, list) or not participants or not all(isinstance(n, str) for n in participants):
            raise Rejected("close_round needs a non-empty list of participant names")
        missing = [n for n in participants if n not in r.checkins]
        if missing:
            raise Rejected(f"{missing[0]} did not check in to round {number}")
        if len(set(participants)) < contract.min_peers:
            raise Rejected(f"round {number} needs {contract.min_peers} peers, only {len(set(participants))} given")
        order = leader_order(contract.name, contract.generation, number, participants)
        if p.get("leader") != order[0]:
            raise Rejected(f"leader of round {number} must be {order[0]}, not {p.get('leader')}")
        if not dry_run:
            self._close(contract, r, participants, index, tx.time)

    @staticmethod
    def _close(contract: Contract, r: Round, participants: list[str], index: int, when: float) -> None:
        order = leader_order(contract.name, contract.generation, r.number, participants)
        r.status, r.participants, r.order, r.leader, r.closed_at = "closed", order, order, order[0], index
        r.closed_time, r.need = when, contract.min_peers
        contract.current_round += 1

    def _reelect(self, p: dict, tx: Tx, index: int, dry_run: bool) -> None:
        contract, r = self._closed_round(p)
        self._member(contract, tx.signer.node)
        if p.get("failed") != r.leader:
            raise Rejected(f"round {r.number}: {p.get('failed')} is not its leader ({r.leader})")
        remaining = [n for n in r.participants if n != r.leader]
        if len(remaining) < r.need:
            raise Rejected(f"round {r.number}: without {r.leader} only {len(remaining)} peers remain, "
                           f"fewer than min_peers {r.need}")
        successor = remaining[0]  # participants stay in leader order
        if p.get("leader") != successor:
            raise Rejected(f"round {r.number}: the next leader must be {successor}, not {p.get('leader')}")
        if not dry_run:
            r.participants, r.leader = remaining, successor
            r.reelections += 1

    def _merged(self, p: dict, tx: Tx, index: int, dry_run: bool) -> None:
        contract, r = self._closed_round(p)
        if tx.signer.node != r.leader:
            raise Rejected(f"round {r.number}: only its leader {r.leader} may post the merged model")
        digest, size = _str(p, "hash"), _size(p)
        dropped = p.get("dropped", [])
        if not isinstance(dropped, list) or any(n not in r.participants for n in dropped):
            raise Rejected(f"round {r.number}: dropped nodes must be participants")
        if len(r.participants) - len(dropped) < r.need:
            raise Rejected(f"round {r.number}: merging {len(r.participants) - len(dropped)} peers is fewer "
                           f"than min_peers {r.need}")
        if dry_run:
            return
        r.participants = [n for n in r.participants if n not in dropped]
        r.status, r.merged_hash, r.merged_size, r.merged_at = "merged", digest, size, index
        r.merged_time = tx.time
        r.final = contract.is_final(r)
        contract.latest_merged_round = r.number

    def _round_abort(self, p: dict, tx: Tx, index: int, dry_run: bool) -> None:
        contract, r = self._closed_round(p)
        if tx.signer.node != r.leader:
            # A participant may abort in place of a leader it holds failed only when no re-election
            # could replace that leader (too few peers would remain): else the round waits forever.
            remaining = [n for n in r.participants if n != r.leader]
            if tx.signer.node not in remaining or p.get("failed") != r.leader \
                    or len(remaining) >= r.need:
                raise Rejected(f"round {r.number}: only its leader {r.leader} may abort it (or a participant, "
                               f"naming it as failed, when too few peers remain to re-elect)")
        if not dry_run:
            r.status = "aborted"
            r.merged_at = index

    def _metrics(self, p: dict, tx: Tx, index: int, dry_run: bool) -> None:
        contract = self.contract(_str(p, "contract"))
        node = _str(p, "node")
        self._speaks_for_itself(tx, node)
        self._admitted(contract, node)
        values = {k: v for k, v in p.items() if k not in ("contract", "node")}
        if not all(isinstance(v, (int, float, str)) or v is None for v in values.values()):
            raise Rejected("metric values must be numbers or strings")
        if not dry_run:
            contract.metrics.append({"node": node, "index": index, "time": tx.time, **values})

    # ------------------------------------------------------------------------------------ queries

    def to_obj(self, section: str = "all") -> dict[str, Any]:
        sections = {
            "info": lambda: {"head_index": self.head_index, "head_hash": self.head_hash, "genesis": self.genesis,
                             "ca_fingerprints": self.ca_fingerprints},
            "nodes": lambda: {k: asdict(v) for k, v in self.nodes.items()},
            "contracts": lambda: {k: _contract_obj(v) for k, v in self.contracts.items()},
            "tasks": lambda: {k: asdict(v) for k, v in self.tasks.items()},
            "taskrunners": lambda: {k: asdict(v) for k, v in self.taskrunners.items()},
        }
        if section == "all":
            return {k: f() for k, f in sections.items()}
        if section not in sections:
            raise KeyError(f"unknown state section {section!r}; one of all, {', '.join(sections)}")
        return {section: sections[section]()}


def _contract_obj(c: Contract) -> dict:
    obj = asdict(c)
    obj["rounds"] = {str(k): v for k, v in obj["rounds"].items()}
    obj["min_peers"] = c.min_peers
    return obj


def _summary(a: Assignment) -> dict:
    return {"task": a.task, "peers": a.peers, "generation": a.generation, "status": a.status}


def _str(p: dict, key: str) -> str:
    value = p.get(key)
    if not isinstance(value, str) or not value:
        raise Rejected(f"field {key!r} must be a non-empty string")
    return value


def _size(p: dict) -> int:
    # Checked before anything is stored: a value that only failed when applied would leave an entry
    # on the ledger that no SN could fold again.
    value = p.get("size", 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise Rejected(f"field 'size' must be a whole number of bytes, got {value!r}")
    return value


def fold(entries: Iterable[Entry], state: LedgerState | None = None) -> LedgerState:
    """Replays a log. Entries in a verified chain were all accepted once, so a refusal here means the
    log is not one this state machine wrote; it propagates."""
    state = state or LedgerState()
    for entry in entries:
        state.apply(entry)
    return state
