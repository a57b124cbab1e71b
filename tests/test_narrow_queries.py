"""Queries that do not grow with the ledger, and a state that keeps metrics small: a SWCI waiting for a
task runner asks the SN one narrow question per poll, the folded state keeps each node's latest summary
and the newest reports (every report stays on the ledger, and the SN's metrics query reads them from
there; a protocol-2 ledger also keeps a summary per node per round), and what is computed per
transaction or per call (canonical JSON, a caller's certificate) is computed once."""

from __future__ import annotations

import json

import pytest

from conftest import identity
from ledger_ids import CONTRACT, genesis_payload, reg, signed, tx
from swarmlearn import pki
from swarmlearn.errors import Rejected
from swarmlearn.ledger import LedgerState, entry as entry_module
from swarmlearn.ledger.chain import Chain
from swarmlearn.ledger.entry import Tx
from swarmlearn.ledger.metrics import RECENT_REPORTS
from swarmlearn.ledger.model import PROTOCOL_VERSION
from swarmlearn.ledger.sqlite_store import SQLiteStore
from swarmlearn.sn.client import SNClient
from swarmlearn.sn.server import taskrunner_progress


def record(state: LedgerState, transaction: Tx) -> int:
    index = state.head_index + 1
    state.apply_tx(transaction, index)
    state.head_index = index
    return index


def training(nodes: list[str], protocol: int = PROTOCOL_VERSION) -> LedgerState:
    """A ledger of `protocol` with `nodes` in the default contract's session (min_peers: all of them)."""
    state = LedgerState()
    record(state, tx("sn-1", "genesis", {**genesis_payload(), "protocol": protocol}))
    for node in nodes:
        record(state, tx(node, "register_node", reg(node)))
        record(state, tx(node, "session_join", {"contract": CONTRACT, "node": node, "min_peers": len(nodes)}))
    return state


def run_round(state: LedgerState, nodes: list[str], number: int) -> None:
    for node in nodes:
        record(state, tx(node, "checkin", {"contract": CONTRACT, "round": number, "node": node, "hash": "ab" * 32,
                                           "weight": 1.0}))
    leader = state.contract(CONTRACT).rounds[number].leader
    record(state, tx(leader, "merged", {"contract": CONTRACT, "round": number, "hash": "cd" * 32}))
    for node in nodes:
        for step in range(3):  # three reports per round: only the last of each kind is summarised
            record(state, tx(node, "metrics", {"contract": CONTRACT, "node": node, "kind": "train", "round": number,
                                               "step": number * 10 + step, "epoch": 0.5, "loss": 1.0 / (step + 1),
                                               "extra": "x" * 100}))
        record(state, tx(node, "metrics", {"contract": CONTRACT, "node": node, "kind": "validation", "round": number,
                                           "step": number * 10 + 2, "metric": 0.9, "metric_name": "accuracy",
                                           "loss": 0.2}))


@pytest.mark.parametrize("protocol", [2, 3])
def test_the_state_keeps_each_nodes_latest_summary_and_only_the_newest_reports(protocol):
    nodes = ["node1", "node2"]
    state = training(nodes, protocol)
    for number in range(1, 41):
        run_round(state, nodes, number)
    contract = state.contract(CONTRACT)
    assert contract.metrics_recorded == 40 * 2 * 4
    assert len(contract.metrics) == RECENT_REPORTS and contract.metrics[-1]["kind"] == "validation"
    assert contract.latest_metrics["node2"]["train"]["step"] == 402
    if protocol >= 3:  # no summary per round: the SN's metrics query reads every report from the ledger
        assert all(r.metrics == {} for r in contract.rounds.values()) and 1 not in contract.rounds
        return
    for number in (1, 40):  # a ledger of protocol 2 keeps its rules: a summary per node per round
        summary = contract.rounds[number].metrics["node2"]
        assert {k: v for k, v in summary["train"].items() if k not in ("index", "time")} == {
            "kind": "train", "round": number, "step": number * 10 + 2, "epoch": 0.5, "loss": 1.0 / 3}
        assert summary["validation"]["metric"] == 0.9 and summary["validation"]["metric_name"] == "accuracy"
        assert "extra" not in summary["train"]
    assert contract.latest_metrics["node1"]["latest"]["kind"] == "validation"
    assert contract.latest_metrics["node1"]["train"]["step"] == 402
    # The contracts section says how many reports there were, not what each round's summaries hold.
    section = state.to_obj("contracts")["contracts"][CONTRACT]
    assert section["metrics_count"] == 320 and "metrics" not in section["rounds"]["40"]


def test_an_older_report_without_a_kind_is_summarised_as_training_and_as_validation_when_it_has_a_metric():
    state = training(["node1"])
    run_round(state, ["node1"], 1)
    record(state, tx("node1", "metrics", {"contract": CONTRACT, "node": "node1", "round": 1, "loss": 0.7,
                                          "metric": 0.8}))
    latest = state.contract(CONTRACT).latest_metrics["node1"]
    assert latest["train"] is latest["validation"] is latest["latest"] and latest["train"]["loss"] == 0.7
    state = training(["node1"], protocol=2)
    run_round(state, ["node1"], 1)
    record(state, tx("node1", "metrics", {"contract": CONTRACT, "node": "node1", "round": 1, "loss": 0.7,
                                          "metric": 0.8}))
    summary = state.contract(CONTRACT).rounds[1].metrics["node1"]
    assert summary["train"] is summary["validation"] and summary["train"]["loss"] == 0.7
    record(state, tx("node1", "metrics", {"contract": CONTRACT, "node": "node1", "round": 99, "loss": 0.1}))
    assert 99 not in state.contract(CONTRACT).rounds  # a round that never was gets no summary


def test_the_wait_answer_does_not_grow_with_the_rounds():
    nodes = ["node1", "node2", "node3"]
    state = training(nodes)
    sizes = []
    for number in range(1, 61):
        run_round(state, nodes, number)
        if number in (20, 60):
            sizes.append(len(json.dumps(taskrunner_progress(state, "default"))))
    assert sizes[0] == sizes[1] < 2000  # only numbers change (of the same width from round 20 to 60)
    answer = taskrunner_progress(state, "default")
    assert answer["training"][CONTRACT]["round"]["number"] == 60
    assert set(answer["training"][CONTRACT]["latest"]) == set(nodes)
    assert answer["taskrunner"]["assignment"] is None and "history" not in answer["taskrunner"]
    with pytest.raises(Rejected, match="no task runner named 'nope'"):
        taskrunner_progress(state, "nope")


def test_an_sn_answers_narrow_questions_and_reads_metrics_from_the_ledger(sn, certs):
    with SNClient(sn.address, identity(certs, "sl", "node1")) as sl, \
            SNClient(sn.address, identity(certs, "swci")) as swci:
        sl.register("SL", "127.0.0.1:1")
        swci.register("SWCI")
        node = sl.node_id
        sl.submit("session_join", {"contract": "default", "node": node, "min_peers": 1})
        for step in range(RECENT_REPORTS + 8):  # more than the state keeps as recorded
            sl.submit("metrics", {"contract": "default", "node": node, "kind": "train", "step": step, "loss": 0.5})
        sl.submit("checkin", {"contract": "default", "round": 1, "node": node, "hash": "ab" * 32, "weight": 1.0})
        sl.submit("merged", {"contract": "default", "round": 1, "hash": "cd" * 32})
        head = sl.submit("metrics", {"contract": "default", "node": node, "kind": "validation", "round": 1,
                                     "step": 99, "metric": 0.75, "metric_name": "accuracy"})

        entries, read_to = swci.metrics("default")
        assert [m.get("step") for m in entries] == [*range(RECENT_REPORTS + 8), 99]
        assert read_to == head + 1 and swci.metrics("default", read_to) == ([], read_to)
        assert swci.query("head")["head"]["head_index"] == head

        view = swci.taskrunner("default")
        name = swci.query("info")["info"]["genesis"]["default_contract"]
        assert view["training"][name]["round"]["participants"] == [node]
        assert view["training"][name]["latest"][node]["metric"] == 0.75
        assert view["taskrunner"]["assignment"] is None and "last_seen" in view
        with pytest.raises(Rejected, match="no task runner named 'nope'"):
            swci.taskrunner("nope")


def test_canonical_json_is_made_once_per_transaction_and_once_per_entry(tmp_path, monkeypatch):
    calls = []
    real = entry_module.canonical_json
    monkeypatch.setattr(entry_module, "canonical_json", lambda obj: calls.append(1) or real(obj))
    chain = Chain(SQLiteStore(tmp_path / "ledger.db"))
    try:
        for name, kind, payload in [("sn-1", "genesis", genesis_payload()), ("swci-1", "register_node", reg("swci-1"))]:
            chain.submit(signed(name, kind, payload))
        made = signed("swci-1", "contract_create", {"name": "counted"})
        received = Tx.from_bytes(made.tx.signing_bytes())  # as the SN receives it: parsed, checked canonical
        calls.clear()
        chain.submit(type(made)(received, made.signature))
        # Signature check, replay check, id, entry hash, stored bytes, watch tail: the transaction's
        # bytes were made once (by from_bytes), and the entry adds its own small head once.
        assert len(calls) == 1
        calls.clear()
        follower = Chain(SQLiteStore(tmp_path / "ledger.db", read_only=True))
        assert follower.state.head_index == 2
        assert len(calls) == 3 * 2  # each entry read: its transaction once, its head once
        follower.store.close()
    finally:
        chain.store.close()


def test_a_callers_certificate_is_read_once_however_many_calls_it_makes(certs, monkeypatch):
    pem = identity(certs, "swci").cert_pem

    class Caller:
        """What gRPC hands a servicer about the caller: the certificate of its TLS handshake."""

        def auth_context(self):
            return {"x509_pem_cert": [pem]}

    fingerprinted = []
    real = pki.cert_fingerprint
    monkeypatch.setattr(pki, "cert_fingerprint", lambda cert: fingerprinted.append(1) or real(cert))
    pki._presented.cache_clear()
    found = [pki.peer_identity(Caller()) for _ in range(5)]
    assert len(fingerprinted) == 1 and found[0][1] == identity(certs, "swci").fingerprint
    assert found[0][2].role == "swci" and pki.peer_certificate(Caller()) == found[0][:2]
