"""What the dashboard knows: the ledger's state folded from the entries received, plus what the pages
need that the state does not keep (metric curves, each node's last sync, abort reasons, entry
summaries), all bounded. No I/O and no clocks of its own: the follower feeds it entries, liveness
readings and verification results, and every change bumps `version`, which the pages' event
streams wait on.

Bounds (the view's memory does not grow with the run past these):
- MAX_ROUNDS finished rounds per contract for the timeline, recorded as they finish (from protocol 3
  on the state keeps only the newest few, model.KEEP_FINISHED_ROUNDS), and as many in the state of a
  protocol-2 ledger, which would keep every round (the state machine only ever looks at the open
  round and the two before it);
- MAX_POINTS metric points per node, contract and kind (train, validation); the state's own copy of
  each metrics entry is dropped once it is in a curve;
- MAX_LEDGER_ROWS entry summaries (index, kind, signer, time, hash) for the Ledger page;
- the raw entries awaiting the next chain verification (at most a minute's worth, see follow.py)."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from swarmlearn.errors import Rejected
from swarmlearn.ledger.entry import Entry
from swarmlearn.ledger.model import Kind, Round, RoundStatus
from swarmlearn.ledger.state import LedgerState
from swarmlearn.ledger.store import StoredEntry

MAX_ROUNDS = 500
MAX_POINTS = 2000
MAX_LEDGER_ROWS = 20_000
MAX_PAST_ASSIGNMENTS = 5  # ended assignments kept per task runner, with their peers' status
# Seconds without a heartbeat after which a node shows as gone (nodes beat every second).
GONE_AFTER = 3.0


@dataclass(frozen=True)
class LedgerRow:
    index: int
    kind: str
    signer: str
    time: float
    hash: str


@dataclass(frozen=True)
class TrainPoint:
    round: int
    step: float | None
    epoch: float | None
    loss: float
    time: float


@dataclass(frozen=True)
class ValidationPoint:
    round: int
    metric: float
    metric_name: str
    time: float


@dataclass
class NodeCurves:
    """One node's metric points in one contract, oldest first, each kind bounded."""

    train: deque = field(default_factory=lambda: deque(maxlen=MAX_POINTS))
    validation: deque = field(default_factory=lambda: deque(maxlen=MAX_POINTS))
    last: dict | None = None  # the last metrics entry, as recorded


@dataclass
class Verification:
    """The last chain verification of the entries received: None until the first one ran."""

    ok: bool | None = None
    entries: int = 0
    head_hash: str | None = None
    checked_at: float | None = None  # wall clock
    error: str = ""


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def metric_points(entry: dict) -> tuple[TrainPoint | None, ValidationPoint | None]:
    """The curve points of one metrics entry. `kind` "train" carries a loss, "validation" the metric
    of the merged model of `round`; an entry without `kind` (older callbacks) gives both, from its
    `loss` and `metric` fields."""
    kind = entry.get("kind")
    round_no = entry.get("round")
    if not isinstance(round_no, int) or isinstance(round_no, bool):
        return None, None
    when = _number(entry.get("time")) or 0.0
    loss, metric = _number(entry.get("loss")), _number(entry.get("metric"))
    train = validation = None
    if kind in (None, "train") and loss is not None:
        train = TrainPoint(round_no, _number(entry.get("step")), _number(entry.get("epoch")), loss, when)
    if kind in (None, "validation") and metric is not None:
        name = entry.get("metric_name")
        validation = ValidationPoint(round_no, metric, name if isinstance(name, str) else "metric", when)
    return train, validation


class SwarmView:
    """The folded view; every method takes its lock, so the follower's threads and the web server's
    readers may call it at once. Readers use `read()` and must not keep what it returns past the
    `with` block."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.version = 0
        self.state = LedgerState()
        self.curves: dict[str, dict[str, NodeCurves]] = {}  # contract -> node -> curves
        self.last_sync: dict[str, tuple[str, int, float]] = {}  # node -> (contract, round, signer time)
        self.abort_reasons: dict[tuple[str, int], str] = {}
        # contract -> round number -> the round, as it finished (merged or aborted), the newest MAX_ROUNDS.
        self.finished_rounds: dict[str, dict[int, Round]] = {}
        # The state keeps only a summary of a task runner's ended assignments; the pages show their peers.
        self.past_assignments: dict[str, deque] = {}
        self.rows: deque[LedgerRow] = deque(maxlen=MAX_LEDGER_ROWS)
        self.unverified: list[StoredEntry] = []
        self.verification = Verification()
        self.last_seen: dict[str, float] = {}  # node -> seconds since the SN(s) last heard it
        self.sn_in_use = ""
        self.problem = ""  # why the view stopped following or cannot reach an SN, for the pages

    def _changed(self) -> None:
        self.version += 1

    # ------------------------------------------------------------------------------ writers

    def receive(self, row: StoredEntry, entry: Entry) -> None:
        """Folds the next ledger entry (`entry` parsed from `row`); raises Rejected, changing nothing,
        when the state machine refuses it."""
        with self.lock:
            ending = self._assignment_ending(entry)
            self.state.apply(entry)
            if ending is not None:
                self.past_assignments.setdefault(ending[0], deque(maxlen=MAX_PAST_ASSIGNMENTS)).append(ending[1])
            self.rows.append(LedgerRow(entry.index, entry.tx.kind, entry.tx.signer.node, entry.tx.time, row.hash))
            self.unverified.append(row)
            self._note(entry)
            trim_state(self.state)
            self._trim_reasons()
            self._changed()

    def _assignment_ending(self, entry: Entry):
        """(runner, assignment) when `entry` ends a task runner's assignment (a reset or a new one)."""
        if entry.tx.kind not in (Kind.TASKRUNNER_RESET, Kind.TASKRUNNER_ASSIGN):
            return None
        try:
            runner = self.state.taskrunner(str(entry.tx.payload.get("runner", "")))
        except Rejected:
            return None  # the state machine refuses the entry too, next
        if runner.assignment is None:
            return None
        return runner.name, runner.assignment

    def _note(self, entry: Entry) -> None:
        tx, payload = entry.tx, entry.tx.payload
        if tx.kind == Kind.METRICS:
            contract = self.state.contract(payload["contract"])
            recorded = contract.metrics[-1]
            curves = self.curves.setdefault(contract.name, {}).setdefault(recorded["node"], NodeCurves())
            train, validation = metric_points(recorded)
            if train is not None:
                curves.train.append(train)
            if validation is not None:
                curves.validation.append(validation)
            curves.last = recorded
        elif tx.kind == Kind.CHECKIN:
            self.last_sync[payload["node"]] = (self.state.contract(payload["contract"]).name, payload["round"],
                                               tx.time)
        elif tx.kind == Kind.ROUND_ABORT:
            name = self.state.contract(payload["contract"]).name
            self.abort_reasons[(name, payload["round"])] = str(payload.get("reason") or "")
            self._finished(name, payload["round"])
        elif tx.kind == Kind.MERGED:
            self._finished(self.state.contract(payload["contract"]).name, payload["round"])
        elif tx.kind == Kind.CONTRACT_RESET:
            name = self.state.contract(payload["name"]).name
            self.curves.pop(name, None)
            self.finished_rounds.pop(name, None)

    def _finished(self, contract: str, number: int) -> None:
        """Records round `number` of `contract`, which just finished, for the timeline: the state drops
        it once newer rounds finish, and nothing changes a finished round."""
        r = self.state.contracts[contract].rounds.get(number)
        if r is None:
            return
        history = self.finished_rounds.setdefault(contract, {})
        history[number] = r
        while len(history) > MAX_ROUNDS:
            del history[next(iter(history))]  # the one that finished first

    def timeline(self, contract: str) -> list[Round]:
        """The rounds of `contract` the view knows, newest first: the state's (open, closed and its newest
        finished ones) and the finished ones recorded before the state dropped them."""
        rounds = {**self.finished_rounds.get(contract, {}), **self.state.contracts[contract].rounds}
        return sorted(rounds.values(), key=lambda r: r.number, reverse=True)

    def _trim_reasons(self) -> None:
        if len(self.abort_reasons) > MAX_ROUNDS * max(1, len(self.state.contracts)):
            for key in sorted(self.abort_reasons, key=lambda k: k[1])[:len(self.abort_reasons) // 2]:
                del self.abort_reasons[key]

    def take_unverified(self) -> list[StoredEntry]:
        with self.lock:
            rows, self.unverified = self.unverified, []
            return rows

    def verified(self, result: Verification) -> None:
        with self.lock:
            self.verification = result
            self._changed()

    def heard(self, last_seen: dict[str, float], sn: str) -> None:
        """The SN's liveness reading (seconds since each node was heard); changes the view only when a
        node crosses GONE_AFTER or is heard of for the first time, so that a quiet swarm sends nothing."""
        with self.lock:
            before = {n: t <= GONE_AFTER for n, t in self.last_seen.items()}
            self.last_seen = dict(last_seen)
            after = {n: t <= GONE_AFTER for n, t in self.last_seen.items()}
            if before != after or sn != self.sn_in_use or self.problem:
                self.sn_in_use, self.problem = sn, ""
                self._changed()

    def trouble(self, problem: str) -> None:
        with self.lock:
            if problem != self.problem:
                self.problem = problem
                self._changed()

    def read(self) -> threading.Lock:
        """`with view.read():` the view holds still while a page is rendered."""
        return self.lock


def trim_state(state: LedgerState) -> None:
    """Keeps a folded state bounded: each contract's metrics list is emptied (the curves hold what
    the pages need) and only its newest MAX_ROUNDS rounds are kept (a protocol-2 ledger's state would
    keep every round; from protocol 3 on the state machine keeps fewer itself). The state machine
    never reads either (metrics are never validated against, rounds only near the open one), so a
    state trimmed this way accepts and refuses what the untrimmed one would."""
    for contract in state.contracts.values():
        contract.metrics.clear()
        if len(contract.rounds) > MAX_ROUNDS:
            for number in sorted(contract.rounds)[:len(contract.rounds) - MAX_ROUNDS]:
                if number < contract.current_round - 2 and contract.rounds[number].status != RoundStatus.OPEN:
                    del contract.rounds[number]
