"""Tasks and task runners: a SWCI (or an admin) writes tasks and assigns them; SWOPs join task
runners, claim peers of an assignment and report on the peers they started. A task's body can be
changed, finalized or deleted only by whoever created it (or an admin), so the identity that signed
it is the one a SWOP's profile can trust or refuse."""

from __future__ import annotations

from typing import TYPE_CHECKING

from swarmlearn.errors import Rejected
from swarmlearn.ledger import payloads as P
from swarmlearn.ledger.entry import Tx
from swarmlearn.ledger.identities import is_admin
from swarmlearn.ledger.model import (DEFAULT_ALIAS, TASK_TYPES, Assignment, AssignmentStatus, PeerState, PeerStatus,
                                     Task, TaskRunner)

if TYPE_CHECKING:
    from swarmlearn.ledger.state import LedgerState


def _creator_or_admin(state: LedgerState, task: Task, tx: Tx, what: str) -> None:
    if tx.signer.node != task.created_by and not is_admin(state, tx.signer.node):
        raise Rejected(f"only {task.created_by}, who created task {task.name}, or an admin may {what} it")


# ------------------------------------------------------------------------------ tasks

def validate_task_create(state: LedgerState, tx: Tx, p: P.TaskCreate) -> None:
    if p.name in state.tasks:
        raise Rejected(f"task {p.name!r} already exists; delete it or use another Name")
    if p.type not in TASK_TYPES:
        raise Rejected(f"task {p.name}: unknown TaskType {p.type!r}; one of {', '.join(TASK_TYPES)}")
    if p.prereq != "ROOTTASK" and p.prereq not in state.tasks:
        raise Rejected(f"task {p.name}: Prereq {p.prereq!r} is neither ROOTTASK nor an existing task")


def apply_task_create(state: LedgerState, tx: Tx, p: P.TaskCreate, index: int) -> None:
    state.tasks[p.name] = Task(p.name, p.type, p.author, p.prereq, p.outcome, dict(p.body), created_by=tx.signer.node)


def _unfinalized_task(state: LedgerState, tx: Tx, name: str, what: str, finalized: str) -> Task:
    """The task `name`, which the signer may `what` (its creator or an admin) and which is not finalized."""
    task = state.task(name)
    _creator_or_admin(state, task, tx, what)
    if task.finalized:
        raise Rejected(f"task {task.name} is {finalized}")
    return task


def validate_task_append(state: LedgerState, tx: Tx, p: P.TaskAppend) -> None:
    _unfinalized_task(state, tx, p.name, "change", "finalized; its body can no longer change")


def apply_task_append(state: LedgerState, tx: Tx, p: P.TaskAppend, index: int) -> None:
    task = state.task(p.name)
    for key, value in p.body.items():
        old = task.body.get(key)
        task.body[key] = old + value if isinstance(old, list) and isinstance(value, list) else value


def validate_task_finalize(state: LedgerState, tx: Tx, p: P.Named) -> None:
    _unfinalized_task(state, tx, p.name, "finalize", "already finalized")


def apply_task_finalize(state: LedgerState, tx: Tx, p: P.Named, index: int) -> None:
    state.task(p.name).finalized = True


def validate_task_delete(state: LedgerState, tx: Tx, p: P.Named) -> None:
    task = state.task(p.name)
    _creator_or_admin(state, task, tx, "delete")
    for runner in state.taskrunners.values():
        a = runner.assignment
        if a and a.task == task.name and a.status == AssignmentStatus.RUNNING:
            raise Rejected(f"task {task.name} is running on {runner.name}; reset the task runner first")
    if any(t.prereq == task.name for t in state.tasks.values()):
        raise Rejected(f"task {task.name} is the Prereq of another task; delete that one first")


def apply_task_delete(state: LedgerState, tx: Tx, p: P.Named, index: int) -> None:
    del state.tasks[p.name]


# ------------------------------------------------------------------------------ task runners

def validate_taskrunner_create(state: LedgerState, tx: Tx, p: P.Named) -> None:
    if p.name in state.taskrunners or p.name == DEFAULT_ALIAS:
        raise Rejected(f"task runner {p.name!r} already exists")


def apply_taskrunner_create(state: LedgerState, tx: Tx, p: P.Named, index: int) -> None:
    state.taskrunners[p.name] = TaskRunner(p.name, created_by=tx.signer.node)


def validate_taskrunner_join(state: LedgerState, tx: Tx, p: P.RunnerJoin) -> None:
    state.taskrunner(p.runner)


def apply_taskrunner_join(state: LedgerState, tx: Tx, p: P.RunnerJoin, index: int) -> None:
    state.taskrunner(p.runner).swops[tx.signer.node] = p.capacity


def validate_taskrunner_assign(state: LedgerState, tx: Tx, p: P.RunnerAssign) -> None:
    runner = state.taskrunner(p.runner)
    task = state.task(p.task)
    if not task.finalized:
        raise Rejected(f"task {task.name} is not finalized; FINALIZE TASK {task.name} before assigning it")
    if runner.assignment and runner.assignment.status == AssignmentStatus.RUNNING:
        raise Rejected(f"task runner {runner.name} is still running {runner.assignment.task}; "
                       f"wait for it or RESET TASKRUNNER {runner.name}")
    if runner.capacity == 0:
        raise Rejected(f"task runner {runner.name} has no SWOP yet; start `swarm swop` for it first")
    if p.target is not None and p.target not in runner.swops:
        raise Rejected(f"{p.target} is not a SWOP of task runner {runner.name}; its SWOPs: "
                       f"{', '.join(sorted(runner.swops))}")
    capacity = _capacity(runner, p.target)
    peers = capacity if p.peers == "ALL" else p.peers
    if peers > capacity:
        who = p.target or f"the SWOPs of {runner.name}"
        raise Rejected(f"task {task.name} asks for {peers} peers but {who} can start {capacity}; "
                       f"assign WITH {capacity} PEERS or add nodes")


def _capacity(runner: TaskRunner, target: str | None) -> int:
    return runner.capacity if target is None else runner.swops[target]


def apply_taskrunner_assign(state: LedgerState, tx: Tx, p: P.RunnerAssign, index: int) -> None:
    runner = state.taskrunner(p.runner)
    task = state.task(p.task)
    if runner.assignment:
        runner.history.append(_summary(runner.assignment))
    runner.assignments_made += 1
    peers = _capacity(runner, p.target) if p.peers == "ALL" else p.peers
    runner.assignment = Assignment(task.name, peers, runner.assignments_made, assigned_by=tx.signer.node,
                                   target=p.target or "")


def _running_assignment(state: LedgerState, runner_name: str, generation: int) -> tuple[TaskRunner, Assignment]:
    runner = state.taskrunner(runner_name)
    a = runner.assignment
    if a is None or a.status != AssignmentStatus.RUNNING or generation != a.generation:
        raise Rejected(f"task runner {runner.name} has no running assignment {generation}")
    return runner, a


def validate_taskrunner_claim(state: LedgerState, tx: Tx, p: P.RunnerClaim) -> None:
    runner, a = _running_assignment(state, p.runner, p.generation)
    if tx.signer.node not in runner.swops:
        raise Rejected(f"{tx.signer.node} has not joined task runner {runner.name}")
    if a.target and tx.signer.node != a.target:
        raise Rejected(f"task {a.task} is assigned to {a.target} alone, not to {tx.signer.node}")
    if len(a.peer_status) + len(p.peers) > a.peers:
        raise Rejected(f"task {a.task} needs {a.peers} peers and {len(a.peer_status)} are already claimed")
    taken = [x for x in p.peers if x in a.peer_status]
    if taken or len(set(p.peers)) != len(p.peers):
        raise Rejected(f"peer {taken[0] if taken else p.peers[0]} is claimed twice")


def apply_taskrunner_claim(state: LedgerState, tx: Tx, p: P.RunnerClaim, index: int) -> None:
    _, a = _running_assignment(state, p.runner, p.generation)
    for peer in p.peers:
        a.peer_status[peer] = PeerStatus(swop=tx.signer.node)


def validate_taskrunner_peer_status(state: LedgerState, tx: Tx, p: P.RunnerPeerStatus) -> None:
    runner, a = _running_assignment(state, p.runner, p.generation)
    current = a.peer_status.get(p.peer)
    if current is None:
        raise Rejected(f"peer {p.peer} is not part of {a.task} on {runner.name}")
    if current.swop != tx.signer.node:
        raise Rejected(f"{tx.signer.node} cannot report for peer {p.peer}, which {current.swop} started")
    if p.status not in PeerState.__members__:
        raise Rejected(f"unknown peer status {p.status!r}; one of {', '.join(PeerState)}")
    if current.status in (PeerState.COMPLETE, PeerState.FAILED):
        raise Rejected(f"peer {p.peer} already ended {current.status}")


def apply_taskrunner_peer_status(state: LedgerState, tx: Tx, p: P.RunnerPeerStatus, index: int) -> None:
    _, a = _running_assignment(state, p.runner, p.generation)
    current = a.peer_status[p.peer]
    current.status, current.exit_code, current.detail = PeerState(p.status), p.exit_code, p.detail
    if current.status == PeerState.FAILED:
        a.status = AssignmentStatus.FAILED
    elif len(a.peer_status) == a.peers and all(s.status == PeerState.COMPLETE for s in a.peer_status.values()):
        a.status = AssignmentStatus.COMPLETE


def validate_taskrunner_reset(state: LedgerState, tx: Tx, p: P.RunnerOnly) -> None:
    runner = state.taskrunner(p.runner)
    a = runner.assignment
    # Ending a running task is for whoever started it, the runner's creator, or an admin: another
    # SWCI (of another organization, say) cannot stop others' training.
    if a is not None and a.status == AssignmentStatus.RUNNING and not is_admin(state, tx.signer.node) \
            and tx.signer.node not in (a.assigned_by, runner.created_by):
        raise Rejected(f"task {a.task} on {runner.name} runs as assigned by {a.assigned_by}; only they, "
                       f"{runner.created_by} (who created the runner) or an admin may reset it")


def apply_taskrunner_reset(state: LedgerState, tx: Tx, p: P.RunnerOnly, index: int) -> None:
    runner = state.taskrunner(p.runner)
    if runner.assignment is None:
        return
    if runner.assignment.status == AssignmentStatus.RUNNING:
        runner.assignment.status = AssignmentStatus.RESET
    runner.history.append(_summary(runner.assignment))
    runner.assignment = None


def _summary(a: Assignment) -> dict:
    return {"task": a.task, "peers": a.peers, "generation": a.generation, "status": a.status}
