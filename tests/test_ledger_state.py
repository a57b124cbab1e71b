"""The ledger state machine, fed by hand-made logs: legal steps change state, illegal ones are refused
with a reason and change nothing, and replaying a log gives the state that live application gave."""

from __future__ import annotations

import copy

import pytest

from swarmlearn.errors import AlreadyRecorded, Rejected
from swarmlearn.ledger import GENESIS_PREV_HASH, Entry, LedgerState, Signer, Tx, fold
from swarmlearn.ledger.model import leader_order

from ledger_ids import CONTRACT, RUNNER, ca_pem, fingerprints, genesis_payload, reg

FP = fingerprints()


class Log:
    def __init__(self) -> None:
        self.state = LedgerState()
        self.entries: list[Entry] = []

    def tx(self, kind: str, payload: dict, signer: str, cert_fp: str | None = None) -> Tx:
        return Tx(kind, payload, Signer(signer, cert_fp or FP[signer]))

    def add(self, kind: str, payload: dict, signer: str = "sn-1", cert_fp: str | None = None) -> Entry:
        return self.add_tx(self.tx(kind, payload, signer, cert_fp))

    def add_tx(self, tx: Tx) -> Entry:
        entry = Entry(len(self.entries), self.state.head_hash or GENESIS_PREV_HASH, tx, b"signature")
        self.state.apply(entry)
        self.entries.append(entry)
        return entry


def base_log() -> Log:
    log = Log()
    log.add("genesis", genesis_payload())
    for name in ("swop-1", "swci-1", "admin-1"):
        log.add("register_node", reg(name), name)
    for node in ("node1", "node2", "node3", "node4"):
        log.add("register_node", reg(node), node)
    log.add("taskrunner_join", {"runner": RUNNER, "capacity": 3}, "swop-1")
    log.add("task_create", {"name": "build", "type": "MAKE_USER_CONTAINER", "author": "me", "prereq": "ROOTTASK",
                            "outcome": "env", "body": {"BuildSteps": ["RUN pip install x"]}}, "swci-1")
    log.add("task_finalize", {"name": "build"}, "swci-1")
    log.add("task_create", {"name": "run", "type": "RUN_SWARM", "author": "me", "prereq": "build",
                            "outcome": "env", "body": {"Command": "model.py"}}, "swci-1")
    for node in ("node1", "node2", "node3"):
        log.add("session_join", {"contract": "default", "node": node, "min_peers": 2, "weightage": 1}, node)
    return log


def checkin(log: Log, node: str, rnd: int, digest: str = "h") -> Entry:
    return log.add("checkin", {"contract": CONTRACT, "round": rnd, "node": node, "hash": f"{digest}-{node}",
                               "weight": 10, "size": 100}, node)


def submit_close(log: Log, rnd: int, participants: list[str], signer: str = "node1") -> str:
    order = leader_order(CONTRACT, 0, rnd, participants)
    log.add("close_round", {"contract": CONTRACT, "round": rnd, "participants": participants, "leader": order[0]},
            signer)
    return order[0]


def close(log: Log, rnd: int, participants: list[str], signer: str = "node1") -> str:
    """Closes round `rnd`, unless the check-in of the last active member just closed it itself."""
    r = log.state.contracts[CONTRACT].rounds[rnd]
    if r.status == "closed" and r.closed_at == log.state.head_index:
        assert r.participants == leader_order(CONTRACT, 0, rnd, participants)
        return r.leader
    return submit_close(log, rnd, participants, signer)


def round_one_closed(log: Log, nodes: list[str]) -> list[str]:
    """Every node checks in to round 1 and it closes; returns its leader order."""
    for node in nodes:
        checkin(log, node, 1)
    close(log, 1, nodes)
    return leader_order(CONTRACT, 0, 1, nodes)


ILLEGAL = [
    # (story, kind, payload, signer, reason fragment)
    ("a second genesis", "genesis", genesis_payload(), "sn-1", "first entry"),
    ("an unknown kind", "mint_coins", {}, "node1", "unknown transaction kind"),
    ("a payload nested too deep to serve back", "contract_create",
     {"name": "c2", "x": __import__("functools").reduce(lambda inner, _: [inner], range(40), 0)}, "swci-1",
     "nested deeper than 16"),
    ("an SL resetting a contract", "contract_reset", {"name": CONTRACT}, "node1", "may be submitted by admin, swci"),
    ("a SWCI resetting the default contract", "contract_reset", {"name": CONTRACT}, "swci-1",
     "only an admin may reset the default contract"),
    ("a node registering for another", "register_node", reg("node2"), "node1", "the certificate carried is not"),
    ("an unregistered signer", "contract_create", {"name": "c2"}, "stranger", "not a registered node"),
    ("a registered id signing with another certificate", "contract_create", {"name": "c2"}, "node1",
     "other than the one it registered"),
    ("assigning an unfinalized task", "taskrunner_assign", {"runner": RUNNER, "task": "run", "peers": 2},
     "swci-1", "not finalized"),
    ("assigning more peers than SWOPs can start", "taskrunner_assign",
     {"runner": RUNNER, "task": "build", "peers": 4}, "swci-1", "can start 3"),
    ("a task whose prereq does not exist", "task_create",
     {"name": "t2", "type": "RUN_SWARM", "prereq": "nope", "body": {}}, "swci-1", "Prereq"),
    ("a task of unknown type", "task_create",
     {"name": "t2", "type": "BAKE_CAKE", "prereq": "ROOTTASK", "body": {}}, "swci-1", "unknown TaskType"),
    ("a duplicate task", "task_create",
     {"name": "build", "type": "RUN_SWARM", "prereq": "ROOTTASK", "body": {}}, "swci-1", "already exists"),
    ("appending to a finalized task", "task_append", {"name": "build", "body": {"X": 1}}, "swci-1", "finalized"),
    ("a check-in in another node's name", "checkin",
     {"contract": CONTRACT, "round": 1, "node": "node2", "hash": "h", "weight": 1}, "node1", "only speak for itself"),
    ("a check-in by a node outside the session", "checkin",
     {"contract": CONTRACT, "round": 1, "node": "node4", "hash": "h", "weight": 1}, "node4", "has not joined"),
    ("a check-in for a future round", "checkin",
     {"contract": CONTRACT, "round": 3, "node": "node1", "hash": "h", "weight": 1}, "node1", "not open yet"),
    ("a check-in to an unknown contract", "checkin",
     {"contract": "nope", "round": 1, "node": "node1", "hash": "h", "weight": 1}, "node1", "no contract"),
    ("a non-SWOP joining a task runner", "taskrunner_join", {"runner": RUNNER, "capacity": 1}, "node1",
     "may be submitted by swop only"),
    ("a non-admin trusting a CA", "trust_ca", {"cert": "x", "org": "o", "roles": ["sl"]}, "node1",
     "may be submitted by admin only"),
    ("metrics for another node", "metrics", {"contract": CONTRACT, "node": "node2", "loss": 1.0}, "node1",
     "only speak for itself"),
]


@pytest.mark.parametrize("story,kind,payload,signer,reason", ILLEGAL, ids=[row[0] for row in ILLEGAL])
def test_illegal_transition_is_refused_with_reason_and_changes_nothing(story, kind, payload, signer, reason):
    log = base_log()
    before = copy.deepcopy(log.state)
    cert_fp = "f" * 64 if "another certificate" in story else FP.get(signer, "e" * 64)
    with pytest.raises(Rejected, match=reason):
        log.add(kind, payload, signer, cert_fp)
    assert log.state == before


def test_replayed_transaction_is_refused_as_already_recorded():
    log = base_log()
    tx = log.tx("contract_create", {"name": "extra"}, "swci-1")
    first = log.add_tx(tx)
    with pytest.raises(AlreadyRecorded) as info:
        log.add_tx(tx)
    assert info.value.index == first.index


def test_entry_out_of_sequence_is_refused():
    log = base_log()
    tx = log.tx("contract_create", {"name": "c"}, "swci-1")
    with pytest.raises(Rejected, match="not the next index"):
        log.state.apply(Entry(log.state.head_index + 2, log.state.head_hash, tx, b""))
    with pytest.raises(Rejected, match="does not follow"):
        log.state.apply(Entry(log.state.head_index + 1, "0" * 64, tx, b""))


def test_task_lifecycle_assign_claim_and_complete():
    log = base_log()
    log.add("task_finalize", {"name": "run"}, "swci-1")
    log.add("taskrunner_assign", {"runner": "default", "task": "run", "peers": "ALL"}, "swci-1")
    runner = log.state.taskrunners[RUNNER]
    assert runner.assignment.peers == 3 and runner.assignment.status == "RUNNING"
    with pytest.raises(Rejected, match="still running"):
        log.add("taskrunner_assign", {"runner": RUNNER, "task": "build", "peers": 1}, "swci-1")
    log.add("taskrunner_claim", {"runner": RUNNER, "generation": 1, "peers": ["p1", "p2", "p3"]}, "swop-1")
    with pytest.raises(Rejected, match="already claimed"):
        log.add("taskrunner_claim", {"runner": RUNNER, "generation": 1, "peers": ["p4"]}, "swop-1")
    for peer in ("p1", "p2", "p3"):
        log.add("taskrunner_peer_status", {"runner": RUNNER, "generation": 1, "peer": peer, "status": "RUNNING"},
                "swop-1")
    for peer in ("p1", "p2"):
        log.add("taskrunner_peer_status", {"runner": RUNNER, "generation": 1, "peer": peer, "status": "COMPLETE",
                                           "exit_code": 0}, "swop-1")
    assert runner.assignment.status == "RUNNING"
    log.add("taskrunner_peer_status", {"runner": RUNNER, "generation": 1, "peer": "p3", "status": "COMPLETE",
                                       "exit_code": 0}, "swop-1")
    assert runner.assignment.status == "COMPLETE"


def test_a_task_assigned_to_one_target_swop_is_claimed_by_that_swop_alone():
    log = base_log()
    log.add("trust_ca", {"cert": ca_pem("swop-2"), "org": "other", "roles": ["swop"]}, "admin-1")
    log.add("register_node", reg("swop-2"), "swop-2")
    log.add("taskrunner_join", {"runner": RUNNER, "capacity": 2}, "swop-2")
    with pytest.raises(Rejected, match="swop-9 is not a SWOP of task runner .*swop-1, swop-2"):
        log.add("taskrunner_assign", {"runner": RUNNER, "task": "build", "peers": "ALL", "target": "swop-9"}, "swci-1")
    with pytest.raises(Rejected, match="asks for 3 peers but swop-2 can start 2"):
        log.add("taskrunner_assign", {"runner": RUNNER, "task": "build", "peers": 3, "target": "swop-2"}, "swci-1")
    log.add("taskrunner_assign", {"runner": RUNNER, "task": "build", "peers": "ALL", "target": "swop-2"}, "swci-1")
    assignment = log.state.taskrunners[RUNNER].assignment
    assert (assignment.peers, assignment.target) == (2, "swop-2")  # that SWOP's capacity, not the runner's 5
    with pytest.raises(Rejected, match="assigned to swop-2 alone, not to swop-1"):
        log.add("taskrunner_claim", {"runner": RUNNER, "generation": 1, "peers": ["p1"]}, "swop-1")
    log.add("taskrunner_claim", {"runner": RUNNER, "generation": 1, "peers": ["p1", "p2"]}, "swop-2")
    assert {p: s.swop for p, s in assignment.peer_status.items()} == {"p1": "swop-2", "p2": "swop-2"}


def test_one_failed_peer_fails_the_assignment_and_reset_frees_the_runner():
    log = base_log()
    log.add("taskrunner_assign", {"runner": RUNNER, "task": "build", "peers": 1}, "swci-1")
    log.add("taskrunner_claim", {"runner": RUNNER, "generation": 1, "peers": ["p1"]}, "swop-1")
    log.add("taskrunner_peer_status", {"runner": RUNNER, "generation": 1, "peer": "p1", "status": "FAILED",
                                       "exit_code": 2, "detail": "Traceback ..."}, "swop-1")
    assert log.state.taskrunners[RUNNER].assignment.status == "FAILED"
    log.add("taskrunner_reset", {"runner": RUNNER}, "swci-1")
    assert log.state.taskrunners[RUNNER].assignment is None
    assert log.state.taskrunners[RUNNER].history[-1]["status"] == "FAILED"


def test_round_checkin_close_merge_and_late_checkin_refused():
    log = base_log()
    for node in ("node1", "node2"):
        checkin(log, node, 1)
    with pytest.raises(Rejected, match="already checked in"):
        checkin(log, "node1", 1, digest="again")
    with pytest.raises(Rejected, match="leader of round 1 must be"):
        wrong = [n for n in ("node1", "node2") if n != leader_order(CONTRACT, 0, 1, ["node1", "node2"])[0]][0]
        log.add("close_round", {"contract": CONTRACT, "round": 1, "participants": ["node1", "node2"],
                                "leader": wrong}, "node1")
    leader = close(log, 1, ["node1", "node2"])
    with pytest.raises(Rejected, match="not open"):
        submit_close(log, 1, ["node1", "node2"], signer="node2")  # the race's loser
    with pytest.raises(Rejected, match="round 1 .*closed"):
        checkin(log, "node3", 1, digest="late")
    follower = next(n for n in ("node1", "node2") if n != leader)
    with pytest.raises(Rejected, match="only its leader"):
        log.add("merged", {"contract": CONTRACT, "round": 1, "hash": "m1"}, follower)
    log.add("merged", {"contract": CONTRACT, "round": 1, "hash": "m1", "size": 300}, leader)
    contract = log.state.contracts[CONTRACT]
    assert contract.latest_merged.merged_hash == "m1" and contract.current_round == 2


def test_the_check_in_that_completes_the_active_members_closes_the_round():
    log = base_log()
    for node in ("node1", "node2"):
        checkin(log, node, 1)
    assert log.state.contracts[CONTRACT].rounds[1].status == "open"
    last = checkin(log, "node3", 1)
    r = log.state.contracts[CONTRACT].rounds[1]
    everyone = ["node1", "node2", "node3"]
    assert r.status == "closed" and r.closed_at == last.index and r.closed_time == last.tx.time
    assert r.participants == leader_order(CONTRACT, 0, 1, everyone) and r.leader == r.participants[0]
    assert log.state.contracts[CONTRACT].current_round == 2
    with pytest.raises(Rejected, match="not open"):
        submit_close(log, 1, everyone)


def test_round_needs_min_peers():
    log = base_log()
    checkin(log, "node1", 1)
    with pytest.raises(Rejected, match="needs 2 peers"):
        close(log, 1, ["node1"])


def test_reelection_passes_to_the_next_in_order_and_drops_the_dead_leader():
    log = base_log()
    nodes = ["node1", "node2", "node3"]
    order = round_one_closed(log, nodes)
    with pytest.raises(Rejected, match="next leader must be"):
        log.add("reelect", {"contract": CONTRACT, "round": 1, "failed": order[0], "leader": order[2]}, order[1])
    log.add("reelect", {"contract": CONTRACT, "round": 1, "failed": order[0], "leader": order[1]}, order[1])
    r = log.state.contracts[CONTRACT].rounds[1]
    assert r.leader == order[1] and order[0] not in r.participants
    with pytest.raises(Rejected, match="fewer than min_peers"):  # only 2 left, min_peers 2
        log.add("reelect", {"contract": CONTRACT, "round": 1, "failed": order[1], "leader": order[2]}, order[2])
    with pytest.raises(Rejected, match="only its leader"):
        log.add("merged", {"contract": CONTRACT, "round": 1, "hash": "m"}, order[0])
    log.add("merged", {"contract": CONTRACT, "round": 1, "hash": "m"}, order[1])


def test_leader_order_is_deterministic_and_rotates_between_rounds():
    nodes = [f"node{i}" for i in range(8)]
    assert leader_order("c", 0, 5, nodes) == leader_order("c", 0, 5, list(reversed(nodes)))
    leaders = {leader_order("c", 0, r, nodes)[0] for r in range(1, 40)}
    assert len(leaders) > 3


def test_session_leave_removes_an_open_checkin_and_contract_reset_starts_over():
    log = base_log()
    checkin(log, "node1", 1)
    log.add("session_leave", {"contract": CONTRACT, "node": "node1"}, "node1")
    assert "node1" not in log.state.contracts[CONTRACT].rounds[1].checkins
    with pytest.raises(Rejected, match="has not joined"):
        checkin(log, "node1", 1)
    log.add("contract_reset", {"name": CONTRACT}, "admin-1")
    contract = log.state.contracts[CONTRACT]
    assert contract.generation == 1 and contract.members == {} and contract.current_round == 1


def test_replaying_the_log_gives_the_same_state_as_live_application():
    log = base_log()
    log.add("task_finalize", {"name": "run"}, "swci-1")
    nodes = ["node1", "node2", "node3"]
    for rnd in (1, 2, 3):
        for node in nodes:
            checkin(log, node, rnd)
        leader = close(log, rnd, nodes)
        log.add("merged", {"contract": CONTRACT, "round": rnd, "hash": f"m{rnd}"}, leader)
        for node in nodes:
            log.add("metrics", {"contract": CONTRACT, "node": node, "round": rnd, "loss": 1.0 / rnd, "epoch": 0},
                    node)
    replayed = fold(log.entries)
    assert replayed == log.state
    assert replayed.to_obj() == log.state.to_obj()
    assert replayed.contracts[CONTRACT].latest_merged.merged_hash == "m3"


def test_only_the_leader_aborts_a_round_and_then_it_is_over():
    log = base_log()
    nodes = ["node1", "node2", "node3"]
    for node in nodes:
        checkin(log, node, 1)
    leader = close(log, 1, nodes)
    other = next(n for n in nodes if n != leader)
    with pytest.raises(Rejected, match="only its leader"):
        log.add("round_abort", {"contract": CONTRACT, "round": 1, "reason": "x"}, other)
    log.add("round_abort", {"contract": CONTRACT, "round": 1, "reason": "too few valid"}, leader)
    r = log.state.contracts[CONTRACT].rounds[1]
    assert r.status == "aborted"
    with pytest.raises(Rejected, match="not closed"):
        log.add("merged", {"contract": CONTRACT, "round": 1, "hash": "m"}, leader)


def test_a_participant_aborts_a_round_whose_silent_leader_cannot_be_replaced():
    log = base_log()
    nodes = ["node1", "node2", "node3"]
    order = round_one_closed(log, nodes)
    abort = {"contract": CONTRACT, "round": 1, "reason": "leader silent", "failed": order[0]}
    with pytest.raises(Rejected, match="only its leader"):  # 2 would remain: re-elect instead
        log.add("round_abort", abort, order[1])
    log.add("reelect", {"contract": CONTRACT, "round": 1, "failed": order[0], "leader": order[1]}, order[1])
    abort["failed"] = order[1]
    with pytest.raises(Rejected, match="only its leader"):  # it must name the leader it holds failed
        log.add("round_abort", {**abort, "failed": order[2]}, order[2])
    with pytest.raises(Rejected, match="only its leader"):  # and take part in the round
        log.add("round_abort", abort, order[0])
    log.add("round_abort", abort, order[2])  # 1 would remain, fewer than min_peers 2: no re-election can help
    assert log.state.contracts[CONTRACT].rounds[1].status == "aborted"


def test_a_closed_round_keeps_its_min_peers_so_a_rejoin_cannot_license_an_abort():
    log = base_log()
    nodes = ["node1", "node2", "node3"]
    order = round_one_closed(log, nodes)
    # A participant raises the contract's min_peers after the close ...
    log.add("session_leave", {"contract": CONTRACT, "node": order[2]}, order[2])
    log.add("session_join", {"contract": CONTRACT, "node": order[2], "min_peers": 16, "weightage": 1}, order[2])
    # ... but the round still needs the 2 it closed with: 2 remain, so no participant may abort it.
    with pytest.raises(Rejected, match="only its leader"):
        log.add("round_abort", {"contract": CONTRACT, "round": 1, "reason": "x", "failed": order[0]}, order[2])


def test_a_node_absent_from_two_rounds_can_be_evicted_and_the_last_round_is_final():
    log = base_log()
    for rnd in (1, 2):
        for node in ("node1", "node2"):
            checkin(log, node, rnd, digest="f" if rnd == 2 else "h")
        with pytest.raises(Rejected, match="took part in one of the last 2 rounds|absent from both"):
            log.add("session_evict", {"contract": CONTRACT, "node": "node3"}, "node1")
        leader = close(log, rnd, ["node1", "node2"])
        if rnd == 2:
            log.add("session_evict", {"contract": CONTRACT, "node": "node3", "reason": "silent"}, "node1")
        log.add("merged", {"contract": CONTRACT, "round": rnd, "hash": f"m{rnd}"}, leader)
    contract = log.state.contracts[CONTRACT]
    assert contract.active_members == ["node1", "node2"]
    with pytest.raises(Rejected, match="cannot evict itself"):
        log.add("session_evict", {"contract": CONTRACT, "node": "node1"}, "node1")


def test_the_round_where_every_active_member_checks_in_final_is_the_last():
    log = base_log()
    nodes = ["node1", "node2", "node3"]
    for node in nodes:
        log.add("checkin", {"contract": CONTRACT, "round": 1, "node": node, "hash": "h", "weight": 1,
                            "final": node != "node3"}, node)
    leader = close(log, 1, nodes)
    log.add("merged", {"contract": CONTRACT, "round": 1, "hash": "m1"}, leader)
    assert not log.state.contracts[CONTRACT].rounds[1].final  # node3 still trains
    for node in nodes:
        log.add("checkin", {"contract": CONTRACT, "round": 2, "node": node, "hash": "h", "weight": 1,
                            "final": True}, node)
    leader = close(log, 2, nodes)
    log.add("merged", {"contract": CONTRACT, "round": 2, "hash": "m2"}, leader)
    assert log.state.contracts[CONTRACT].rounds[2].final
