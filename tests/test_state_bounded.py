"""A consensus state that stays small however long the run (protocol 3): a contract keeps its newest
finished rounds and counts the rest, rounds carry no metrics summaries, and the snapshot a follower
starts from stays the same size from round 100 to round 300. A ledger written by the last release
(protocol 2) still folds by its own rules: to the state hashes its checkpoints carry, every round
kept, and the counters right, for a follower that starts from its snapshot too. The dashboard still
lists the newest TIMELINE_ROUNDS rounds though the state keeps fewer."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from ledger_ids import CONTRACT, genesis_payload
from swarmlearn import pki
from swarmlearn.errors import Rejected
from swarmlearn.ledger.chain import ChainVerifier
from swarmlearn.ledger.entry import Signer, Tx, canonical_json
from swarmlearn.ledger.model import KEEP_FINISHED_ROUNDS, PROTOCOL_VERSION, RoundStatus, leader_order
from swarmlearn.ledger.snapshot import SnapshotError, accept_snapshot
from swarmlearn.ledger.state import LedgerState
from swarmlearn.ledger.store import StoredEntry
from swarmlearn.ui.pages import TIMELINE_ROUNDS, training_main
from swarmlearn.ui.view import SwarmView
from test_ledger_state import FP, Log, base_log

NODES = ["node1", "node2", "node3"]
FINISHED = (RoundStatus.MERGED, RoundStatus.ABORTED)


def finished(contract) -> list[int]:
    return [n for n, r in contract.rounds.items() if r.status in FINISHED]


def train(log: Log, rounds: int, abort_every: int = 0, nodes: list[str] = NODES) -> None:
    """`rounds` more rounds of `nodes` (each round: check-ins, which close it, then the leader's merge or,
    every `abort_every`th round, its abort; then a training report per node)."""
    contract = log.state.contracts[CONTRACT]
    for _ in range(rounds):
        number = contract.current_round
        for node in nodes:
            log.add("checkin", {"contract": CONTRACT, "round": number, "node": node, "hash": f"h{number}-{node}",
                                "weight": 10, "size": 100}, node)
        if contract.rounds[number].status == RoundStatus.OPEN:  # not every active member took part
            order = leader_order(CONTRACT, 0, number, nodes)
            log.add("close_round", {"contract": CONTRACT, "round": number, "participants": nodes,
                                    "leader": order[0]}, nodes[0])
        leader = contract.rounds[number].leader
        if abort_every and number % abort_every == 0:
            log.add("round_abort", {"contract": CONTRACT, "round": number, "failed": leader}, leader)
        else:
            log.add("merged", {"contract": CONTRACT, "round": number, "hash": f"m{number}"}, leader)
        for node in nodes:
            log.add("metrics", {"contract": CONTRACT, "node": node, "kind": "train", "round": number,
                                "loss": 1.0 / number}, node)


# ------------------------------------------------------------------------------ protocol 3

def test_after_100_merged_rounds_a_contract_keeps_33_finished_rounds_and_counts_every_one():
    log = base_log()
    train(log, 110, abort_every=11)
    contract = log.state.contracts[CONTRACT]
    assert log.state.protocol == PROTOCOL_VERSION >= 3
    assert (contract.rounds_merged, contract.rounds_aborted) == (100, 10)
    assert len(finished(contract)) == KEEP_FINISHED_ROUNDS + 1 == 33
    assert sorted(contract.rounds) == list(range(78, 111))  # the newest ones
    assert contract.latest_merged.number == 109 and contract.latest_merged.merged_hash == "m109"
    # Metrics stay ledger entries and the nodes' latest reports: no round carries a summary.
    assert all(r.metrics == {} for r in contract.rounds.values())
    assert contract.latest_metrics["node1"]["train"]["round"] == 110 and contract.metrics_recorded == 330
    counted = log.state.to_obj("contracts")["contracts"][CONTRACT]
    assert (counted["rounds_merged"], counted["rounds_aborted"], len(counted["rounds"])) == (100, 10, 33)


def test_the_latest_merged_round_is_kept_however_many_aborted_rounds_follow_it():
    log = base_log()
    train(log, 5)
    train(log, 2 * KEEP_FINISHED_ROUNDS, abort_every=1)
    contract = log.state.contracts[CONTRACT]
    assert contract.latest_merged.number == 5 and contract.latest_merged.merged_hash == "m5"
    assert len(finished(contract)) == KEEP_FINISHED_ROUNDS + 1
    assert (contract.rounds_merged, contract.rounds_aborted) == (5, 2 * KEEP_FINISHED_ROUNDS)


def test_a_node_absent_from_the_last_two_rounds_is_still_evicted_and_a_reset_zeroes_the_counters():
    log = base_log()
    train(log, 40)
    with pytest.raises(Rejected, match="took part in one of the last 2 rounds"):
        log.add("session_evict", {"contract": CONTRACT, "node": "node3"}, "node1")
    train(log, 2, nodes=["node1", "node2"])
    log.add("session_evict", {"contract": CONTRACT, "node": "node3"}, "node1")
    contract = log.state.contracts[CONTRACT]
    assert not contract.members["node3"].active and contract.rounds_merged == 42
    log.add("contract_reset", {"name": CONTRACT}, "admin-1")
    assert (contract.rounds, contract.rounds_merged, contract.rounds_aborted) == ({}, 0, 0)


def windowed_log(protocol: int) -> Log:
    """base_log, founded by `protocol`, whose transactions (after genesis) stay valid for 50 entries, as
    a client's do for 10,000: the ids kept against replays then stop growing within these tests."""
    log = WindowedLog()
    log.add("genesis", {**genesis_payload(), "protocol": protocol})
    reference = base_log()
    for entry in reference.entries[1:]:
        log.add(entry.tx.kind, entry.tx.payload, entry.tx.signer.node)
    return log


class WindowedLog(Log):
    def tx(self, kind: str, payload: dict, signer: str, cert_fp: str | None = None) -> Tx:
        until = self.state.head_index + 50 if self.state.genesis else None
        return Tx(kind, payload, Signer(signer, cert_fp or FP[signer]), valid_until=until)


def snapshot_bytes(state: LedgerState) -> int:
    return len(canonical_json(state.to_snapshot()))


def test_the_snapshot_does_not_grow_from_round_100_to_round_300_where_protocol_2s_tripled():
    sizes = {}
    for protocol in (2, 3):
        log = windowed_log(protocol)
        train(log, 100)
        at_100 = snapshot_bytes(log.state)
        train(log, 200)
        sizes[protocol] = (at_100, snapshot_bytes(log.state))
        copy = LedgerState.from_snapshot(json.loads(canonical_json(log.state.to_snapshot())))
        assert copy == log.state and copy.contracts[CONTRACT].rounds_merged == 300
    at_100, at_300 = sizes[3]
    assert at_300 <= at_100 * 1.05, sizes
    old_100, old_300 = sizes[2]
    assert old_300 > 2.5 * old_100 and at_300 < old_300 / 5, sizes


def test_a_follower_started_from_a_snapshot_mid_run_ends_as_one_folded_from_genesis():
    log = base_log()
    train(log, 60, abort_every=7)
    cut = len(log.entries) // 2
    resumed = LedgerState()
    for entry in log.entries[:cut]:
        resumed.apply(entry)
    resumed = LedgerState.from_snapshot(json.loads(canonical_json(resumed.to_snapshot())))
    for entry in log.entries[cut:]:
        resumed.apply(entry)
    assert resumed == log.state and resumed.to_snapshot() == log.state.to_snapshot()


# ------------------------------------------------------------------------------ protocol 2, as released

# A ledger of the last protocol-2 release (448 entries: four nodes, 60 rounds, every 7th aborted, two
# training reports a round, a checkpoint every 50 entries), written by bench/startup.py's LedgerBuilder
# at commit 1c4ff33, and the SHA-256 of its state's snapshot at the head, from that same code.
PROTOCOL_2_LEDGER = Path(__file__).parent / "ledgers" / "protocol2.jsonl.gz"
PROTOCOL_2_HEAD_STATE = "7df61b2fa9f79a82174aaa3f2d9c4e2c49f740363198ed9d53c712e54f56c3ae"
PROTOCOL_2_CONTRACT = "default-contract"


@pytest.fixture(scope="module")
def protocol_2_rows() -> list[StoredEntry]:
    lines = gzip.decompress(PROTOCOL_2_LEDGER.read_bytes()).splitlines()
    return [StoredEntry(o["index"], o["hash"], o["body"].encode()) for o in map(json.loads, lines)]


def fold(rows, verifier: ChainVerifier | None = None) -> ChainVerifier:
    verifier = verifier or ChainVerifier(check_checkpoints=True)
    for row in rows:
        verifier.verify_next(row)
    return verifier


def test_a_protocol_2_ledger_folds_to_the_checkpoints_it_was_written_with_and_keeps_every_round(protocol_2_rows):
    verifier = fold(protocol_2_rows)  # refuses the first checkpoint whose state hash differs
    assert verifier.last_checkpoint == 400 and verifier.snapshot_document()[1] == PROTOCOL_2_HEAD_STATE
    state = verifier.state
    contract = state.contracts[PROTOCOL_2_CONTRACT]
    assert state.protocol == 2
    assert sorted(contract.rounds) == list(range(1, 61)) and all(r.metrics for r in contract.rounds.values())
    assert (contract.rounds_merged, contract.rounds_aborted) == (52, 8)
    assert b"rounds_merged" not in verifier.snapshot_document()[0]


def test_a_follower_started_from_a_protocol_2_snapshot_counts_the_rounds_before_it(protocol_2_rows):
    served = fold(protocol_2_rows).latest_snapshot
    assert served.index == 399
    genesis = protocol_2_rows[0].entry().tx.payload
    ca = pki.cached_cert(genesis["cas"][0]["cert"])  # the swarm's CA: the follower's own --capath
    state, certs = accept_snapshot(served, [ca], LedgerState)
    contract = state.contracts[PROTOCOL_2_CONTRACT]
    counted = fold(protocol_2_rows[:served.index + 1]).state.contracts[PROTOCOL_2_CONTRACT]  # entry by entry
    assert (contract.rounds_merged, contract.rounds_aborted) == (counted.rounds_merged, counted.rounds_aborted) == (46, 7)
    follower = ChainVerifier()
    follower.start_from(state, certs)
    fold(protocol_2_rows[served.index + 1:], follower)
    whole = fold(protocol_2_rows)
    assert follower.state == whole.state
    assert follower.snapshot_document()[1] == PROTOCOL_2_HEAD_STATE


def test_a_snapshot_of_a_protocol_this_node_does_not_fold_is_refused(protocol_2_rows):
    obj = fold(protocol_2_rows[:100]).state.to_snapshot()
    obj["genesis"]["protocol"] = 1
    with pytest.raises(SnapshotError, match="protocol 1; this node folds protocols 2 to 4"):
        LedgerState.from_snapshot(obj)


# ------------------------------------------------------------------------------ the dashboard

def test_the_dashboard_lists_the_newest_100_rounds_and_counts_every_merge_though_the_state_keeps_33():
    log = base_log()
    train(log, 150, abort_every=10)
    view = SwarmView()
    for entry in log.entries:
        view.receive(StoredEntry(entry.index, entry.hash, entry.body_bytes()), entry)
    assert len(view.state.contracts[CONTRACT].rounds) == 33
    html = training_main(view)
    listed = [int(n) for n in re.findall(r"<tr><td>(\d+)</td>", html)]
    assert listed == list(range(150, 150 - TIMELINE_ROUNDS, -1))
    assert '<span class="merged-count">135</span> merged' in html
    log.add("contract_reset", {"name": CONTRACT}, "admin-1")
    view.receive(StoredEntry(log.entries[-1].index, log.entries[-1].hash, log.entries[-1].body_bytes()),
                 log.entries[-1])
    assert view.timeline(CONTRACT) == []
