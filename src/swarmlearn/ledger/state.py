"""The ledger's state machine: entries in, state out. No I/O, no clocks, no randomness.

Every SN and every follower folds the same log into the same state. A transaction goes through the
same steps for every kind, driven by the policy table (ledger/policy.py): not a replay, a known kind,
a payload of the kind's shape, a signer whose certificate role may submit it, the kind's own check;
only then its change. A refused transaction raises `Rejected` with the reason and leaves no trace.
Signatures are checked by whoever accepts bytes from the network (ledger/chain.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable

from swarmlearn import pki
from swarmlearn.errors import AlreadyRecorded, Rejected
from swarmlearn.ledger import payloads, snapshot
from swarmlearn.ledger.entry import Entry, Tx
from swarmlearn.ledger.identities import signer_role
from swarmlearn.ledger.policy import POLICY, Rule
from swarmlearn.ledger.model import (DEFAULT_ALIAS, PROTOCOL_VERSION, Contract, Kind, Node, Task, TaskRunner,
                                     TrustedCA)

# Deeper payloads are refused: every entry is kept in the state, and the state is served as JSON
# through recursive encoders that a payload nested hundreds of levels deep would break for good.
MAX_PAYLOAD_DEPTH = 16
# The longest validity window a transaction may ask for, in ledger entries past the next index. The ids
# of windowed transactions are kept (replay protection) only until their window closes, so seen_tx
# holds at most this many of them however long the ledger grows. Clients ask for half (sn/client.py),
# which leaves room for an SN of a shared ledger that is behind the head they saw.
MAX_VALIDITY_WINDOW = 20_000


def _depth(value, limit: int = MAX_PAYLOAD_DEPTH + 1) -> int:
    """How deeply `value` nests lists and dicts (counting stops past `limit`)."""
    if limit <= 0 or not isinstance(value, (dict, list)):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(c, limit - 1) for c in children), default=0)


@dataclass(frozen=True)
class Checked:
    """A transaction the state accepted as its next step, with its parsed payload and rule."""

    tx: Tx
    head_index: int
    rule: Rule
    payload: payloads.Payload


@dataclass
class LedgerState:
    head_index: int = -1
    head_hash: str | None = None
    genesis_hash: str | None = None  # the hash of entry 0: which swarm's ledger this is
    genesis: dict | None = None
    cas: dict[str, TrustedCA] = field(default_factory=dict)  # CA fingerprint -> what it may issue
    revoked: dict[str, int] = field(default_factory=dict)  # certificate fingerprint -> entry index
    cert_map: dict[str, pki.SwarmId] = field(default_factory=dict)  # role-less certificate -> identity
    nodes: dict[str, Node] = field(default_factory=dict)
    contracts: dict[str, Contract] = field(default_factory=dict)
    tasks: dict[str, Task] = field(default_factory=dict)
    taskrunners: dict[str, TaskRunner] = field(default_factory=dict)
    seen_tx: dict[str, int] = field(default_factory=dict)  # transaction id -> entry index
    # valid_until -> ids of the recorded transactions whose window closes there: forgotten from seen_tx
    # once the head reaches it (a replay is then refused as expired instead).
    expiring: dict[int, list[str]] = field(default_factory=dict)

    # ---------------------------------------------------------------------------------- entry point

    def apply(self, entry: Entry, checked: Checked | None = None) -> LedgerState:
        """Applies one entry in place and returns self; raises Rejected and changes nothing if the
        entry is not a legal next step. `checked` is what check_tx said of its transaction on this very
        state (the SN checks before it appends): then the checks are not run twice."""
        expected = self.head_index + 1
        if entry.index != expected:
            raise Rejected(f"entry index {entry.index} is not the next index {expected}")
        if self.head_hash is not None and entry.prev_hash != self.head_hash:
            raise Rejected(f"entry {entry.index} does not follow the head {self.head_hash[:12]}")
        if checked is None or checked.tx is not entry.tx or checked.head_index != self.head_index:
            checked = self.check_tx(entry.tx)
        checked.rule.apply(self, entry.tx, checked.payload, entry.index)
        self._recorded(entry.tx, entry.index)
        if entry.index == 0:
            self.genesis_hash = entry.hash
        self.head_index = entry.index
        self.head_hash = entry.hash
        return self

    def check_tx(self, tx: Tx) -> Checked:
        """Raises Rejected if `tx` would not be accepted as the next entry; changes nothing."""
        rule, payload = self._validate(tx)
        return Checked(tx, self.head_index, rule, payload)

    def apply_tx(self, tx: Tx, index: int) -> None:
        checked = self.check_tx(tx)
        checked.rule.apply(self, tx, checked.payload, index)
        self._recorded(tx, index)

    def _recorded(self, tx: Tx, index: int) -> None:
        """Remembers `tx` as recorded at `index` until its window closes, and forgets the transactions
        whose window closes at `index`: none of them can be recorded from the next index on."""
        self.seen_tx[tx.id] = index
        if tx.valid_until is not None:
            self.expiring.setdefault(tx.valid_until, []).append(tx.id)
        for expired in self.expiring.pop(index, ()):
            del self.seen_tx[expired]

    def _within_window(self, tx: Tx) -> None:
        if tx.valid_until is None:
            return  # a transaction of a node from before windows: its id is kept for good
        next_index = self.head_index + 1
        if next_index > tx.valid_until:
            raise Rejected(f"{tx.kind} of {tx.signer.node} expired: it was valid until ledger entry "
                           f"{tx.valid_until} and the next entry is {next_index}; sign it again")
        if tx.valid_until > next_index + MAX_VALIDITY_WINDOW:
            raise Rejected(f"{tx.kind} of {tx.signer.node} asks to stay valid until ledger entry {tx.valid_until}, "
                           f"more than {MAX_VALIDITY_WINDOW} entries past the next one ({next_index})")

    def _validate(self, tx: Tx):
        if tx.id in self.seen_tx:
            raise AlreadyRecorded(tx.id, self.seen_tx[tx.id])
        self._within_window(tx)
        try:
            kind = Kind(tx.kind)
        except ValueError:
            raise Rejected(f"unknown transaction kind {tx.kind!r}") from None
        if kind is not Kind.GENESIS and self.genesis is None:
            raise Rejected(f"{kind} before genesis: the first entry must be the sentinel's genesis")
        if _depth(tx.payload) > MAX_PAYLOAD_DEPTH:
            raise Rejected(f"{kind} payload is nested deeper than {MAX_PAYLOAD_DEPTH} levels")
        rule = POLICY[kind]
        payload = payloads.parse(rule.payload, kind.value, tx.payload)
        role = signer_role(self, tx, payload)
        if role not in rule.roles:
            allowed = ", ".join(sorted(r.lower() for r in rule.roles))
            raise Rejected(f"{kind} may be submitted by {allowed} only; {tx.signer.node} is {role.lower()}")
        rule.validate(self, tx, payload)
        return rule, payload

    # ------------------------------------------------------------------------------------ lookups

    @property
    def protocol(self) -> int:
        """The protocol whose rules fold this ledger: the one its genesis records (model.PROTOCOL_VERSION
        before genesis, for the genesis this node would write)."""
        return self.genesis["protocol"] if self.genesis is not None else PROTOCOL_VERSION

    @property
    def ca_fingerprints(self) -> list[str]:
        return sorted(self.cas)

    def contract(self, name: str) -> Contract:
        return self._named(self.contracts, name, "default_contract", "contract", "CREATE CONTRACT")

    def taskrunner(self, name: str) -> TaskRunner:
        return self._named(self.taskrunners, name, "default_taskrunner", "task runner", "CREATE TASKRUNNER")

    def _named(self, table: dict, name: str, default_key: str, what: str, create: str):
        """`table[name]`, where `default` names the one genesis created; refused when there is none."""
        if name == DEFAULT_ALIAS and self.genesis:
            name = self.genesis[default_key]
        found = table.get(name)
        if found is None:
            raise Rejected(f"no {what} named {name!r}; create it first ({create} {name})")
        return found

    def task(self, name: str) -> Task:
        task = self.tasks.get(name)
        if task is None:
            raise Rejected(f"no task named {name!r}; create it first (CREATE TASK FROM <taskdef.yaml>)")
        return task

    # ------------------------------------------------------------------------------------ queries

    def to_obj(self, section: str = "all") -> dict[str, Any]:
        sections = {
            "info": lambda: {"head_index": self.head_index, "head_hash": self.head_hash, "genesis": self.genesis,
                             "genesis_hash": self.genesis_hash,
                             "ca_fingerprints": self.ca_fingerprints,
                             "cas": {fp: {"org": c.org, "roles": c.roles, "added_at": c.added_at}
                                     for fp, c in self.cas.items()},
                             "revoked": dict(self.revoked)},  # a copy: the SN writes JSON outside its lock
            "nodes": lambda: {k: {**asdict(v), "spiffe_id": v.spiffe_id} for k, v in self.nodes.items()},
            "contracts": lambda: {k: _contract_obj(v) for k, v in self.contracts.items()},
            "tasks": lambda: {k: asdict(v) for k, v in self.tasks.items()},
            "taskrunners": lambda: {k: asdict(v) for k, v in self.taskrunners.items()},
        }
        if section == "all":
            return {k: f() for k, f in sections.items()}
        if section not in sections:
            raise KeyError(f"unknown state section {section!r}; one of all, {', '.join(sections)}")
        return {section: sections[section]()}


    # ------------------------------------------------------------------------------------ snapshots

    def to_snapshot(self) -> dict[str, Any]:
        """Every field, as JSON data in one deterministic form (ledger/snapshot.py); from_snapshot reads
        it back into an equal state, which folds the entries that follow as this one would."""
        return snapshot.state_to_obj(self)

    @classmethod
    def from_snapshot(cls, obj: Any) -> LedgerState:
        """The state to_snapshot made `obj` from; snapshot.SnapshotError naming the field otherwise."""
        return snapshot.state_from_obj(cls, obj)


def _contract_obj(c: Contract) -> dict:
    # Metrics grow with every round: they are read page by page with the SN's metrics query (and each
    # round's summaries, kept in the state, would double a long run's reply).
    obj = asdict(replace(c, metrics=[]))
    del obj["metrics"]
    obj["metrics_count"] = c.metrics_recorded
    obj["rounds"] = {str(k): v for k, v in obj["rounds"].items()}
    for r in obj["rounds"].values():
        del r["metrics"]
        if r.get("secure"):
            # Sealed shares and reveals concern the round's unmasking alone: n^2 texts a round, not news.
            r["secure"] = {k: v for k, v in r["secure"].items() if k not in ("shares", "revealed", "keys")}
    obj["min_peers"] = c.min_peers
    obj["merge_method"] = c.merge_method
    return obj


def fold(entries: Iterable[Entry], state: LedgerState | None = None) -> LedgerState:
    """Replays a log. Entries in a verified chain were all accepted once, so a refusal here means the
    log is not one this state machine wrote; it propagates."""
    state = state or LedgerState()
    for entry in entries:
        state.apply(entry)
    return state
