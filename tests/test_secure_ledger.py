"""The ledger's rules for secure_mean rounds and per-contract merge methods (protocol 4): each phase is
fixed by one entry, members speak only for themselves, the leader only for its round, and nothing a
participant posts can make another reveal both secrets of one node."""

from __future__ import annotations

import base64

import pytest

from swarmlearn.errors import Rejected
from swarmlearn.ledger.model import leader_order
from swarmlearn.ledger.secure_rounds import recovery_threshold

from ledger_ids import CONTRACT
from test_ledger_state import Log, base_log

NODES = ["node1", "node2", "node3", "node4"]


def keys(node: str) -> dict:
    raw = node.encode().ljust(32, b"k")
    return {"c": base64.b64encode(raw).decode(), "s": base64.b64encode(raw[::-1]).decode(), "b": "ab" * 32}


def secure_log(nodes=NODES, min_peers: int = 3) -> Log:
    log = base_log()
    log.add("contract_create", {"name": "sec", "merge_method": "secure_mean"}, "swci-1")
    for node in nodes:
        log.add("session_join", {"contract": "sec", "node": node, "min_peers": min_peers, "weightage": 1,
                                 "merge_method": "secure_mean"}, node)
    for node in nodes:
        log.add("checkin", {"contract": "sec", "round": 1, "node": node, "hash": f"k-{node}", "weight": 2.0,
                            "size": 100, "keys": keys(node)}, node)
    return log


def _reg(node):
    from ledger_ids import reg
    return reg(node)


def rnd(log: Log, number: int = 1):
    return log.state.contract("sec").rounds[number]


def share_all(log: Log, nodes=NODES, number: int = 1) -> None:
    for node in nodes:
        log.add("secagg_shares", {"contract": "sec", "round": number, "node": node,
                                  "shares": {n: f"sealed-{node}-{n}" for n in rnd(log).order}}, node)


def test_a_secure_round_closes_with_every_members_keys_and_the_last_share_fixes_the_masking_set():
    log = secure_log()
    r = rnd(log)
    assert r.status == "closed" and sorted(r.secure.keys) == NODES
    share_all(log, NODES[:3])
    assert r.secure.masking is None
    share_all(log, NODES[3:])
    assert r.secure.masking == NODES


def test_check_in_keys_are_required_in_a_secure_contract_and_refused_elsewhere():
    log = base_log()
    log.add("contract_create", {"name": "sec", "merge_method": "secure_mean"}, "swci-1")
    for node in ("node1", "node2", "node3"):
        log.add("session_join", {"contract": "sec", "node": node, "min_peers": 3, "merge_method": "secure_mean"}, node)
    with pytest.raises(Rejected, match="carries the node's fresh keys"):
        log.add("checkin", {"contract": "sec", "round": 1, "node": "node1", "hash": "h", "weight": 1.0}, "node1")
    with pytest.raises(Rejected, match="keys are for secure_mean rounds"):
        log.add("checkin", {"contract": CONTRACT, "round": 1, "node": "node1", "hash": "h", "weight": 1.0,
                            "keys": keys("node1")}, "node1")
    with pytest.raises(Rejected, match="field 'keys.c'"):
        log.add("checkin", {"contract": "sec", "round": 1, "node": "node1", "hash": "h", "weight": 1.0,
                            "keys": {**keys("node1"), "c": "not base64 of 32 bytes"}}, "node1")


def test_secure_mean_needs_three_peers_and_cannot_be_combined_with_a_method_that_reads_each_update():
    log = base_log()
    log.add("contract_create", {"name": "sec", "merge_method": "secure_mean"}, "swci-1")
    with pytest.raises(Rejected, match="at least 3 peers per round"):
        log.add("session_join", {"contract": "sec", "node": "node1", "min_peers": 2, "merge_method": "secure_mean"},
                "node1")
    with pytest.raises(Rejected, match="coordmedian reads each peer's update in the clear"):
        log.add("session_join", {"contract": "sec", "node": "node1", "min_peers": 3, "merge_method": "coordmedian"},
                "node1")


def test_a_contract_creator_chooses_the_merge_method_and_members_must_follow_it():
    log = base_log()
    log.add("contract_create", {"name": "robust", "merge_method": "coordmedian"}, "swci-1")
    assert log.state.contract("robust").merge_method == "coordmedian"
    with pytest.raises(Rejected, match="merges with coordmedian \\(chosen by its creator\\); node1 asks for mean"):
        log.add("session_join", {"contract": "robust", "node": "node1", "merge_method": "mean"}, "node1")
    with pytest.raises(Rejected, match="unknown merge method 'median'"):
        log.add("contract_create", {"name": "x", "merge_method": "median"}, "swci-1")
    log.add("session_join", {"contract": "robust", "node": "node1", "merge_method": "coordmedian"}, "node1")
    with pytest.raises(Rejected, match="while node1 train"):
        log.add("contract_update", {"name": "robust", "merge_method": "mean"}, "swci-1")
    with pytest.raises(Rejected, match="may be submitted by admin, swci only; node1 is sl"):
        log.add("contract_update", {"name": "robust", "merge_method": "mean"}, "node1")


def test_members_speak_only_for_themselves_and_the_leader_alone_fixes_sets():
    log = secure_log()
    r = rnd(log)
    other = next(n for n in NODES if n != r.leader)
    with pytest.raises(Rejected, match="may only speak for itself"):
        log.add("secagg_shares", {"contract": "sec", "round": 1, "node": "node1",
                                  "shares": {n: "x" for n in NODES}}, "node2")
    with pytest.raises(Rejected, match="one share for each of"):
        log.add("secagg_shares", {"contract": "sec", "round": 1, "node": "node1",
                                  "shares": {n: "x" for n in NODES[:3]}}, "node1")
    share_all(log, NODES[:3])
    with pytest.raises(Rejected, match="only its leader"):
        log.add("secagg_masking", {"contract": "sec", "round": 1, "nodes": NODES[:3]}, other)
    with pytest.raises(Rejected, match="node4 posted no shares"):
        log.add("secagg_masking", {"contract": "sec", "round": 1, "nodes": NODES}, r.leader)
    log.add("secagg_masking", {"contract": "sec", "round": 1, "nodes": NODES[:3]}, r.leader)
    assert r.secure.masking == NODES[:3]
    with pytest.raises(Rejected, match="masking set is fixed; shares come too late"):
        share_all(log, NODES[3:])
    with pytest.raises(Rejected, match="node4 is not in the masking set"):
        log.add("secagg_masked", {"contract": "sec", "round": 1, "node": "node4", "hash": "m", "size": 10}, "node4")


def test_survivors_are_named_once_at_the_recovery_threshold_and_each_reveals_once():
    log = secure_log()
    r = rnd(log)
    share_all(log)
    for node in NODES:
        log.add("secagg_masked", {"contract": "sec", "round": 1, "node": node, "hash": f"m-{node}", "size": 10}, node)
    assert recovery_threshold(4) == 3
    with pytest.raises(Rejected, match="below what the round needs \\(3"):
        log.add("secagg_survivors", {"contract": "sec", "round": 1, "nodes": NODES[:2]}, r.leader)
    survivors = [n for n in NODES if n != NODES[3]]
    log.add("secagg_survivors", {"contract": "sec", "round": 1, "nodes": survivors}, r.leader)
    # A second, different set would have survivors reveal the other secret of someone: refused.
    with pytest.raises(Rejected, match="already named"):
        log.add("secagg_survivors", {"contract": "sec", "round": 1, "nodes": NODES}, r.leader)
    with pytest.raises(Rejected, match="node4 is not a named survivor"):
        log.add("secagg_reveal", {"contract": "sec", "round": 1, "node": "node4",
                                  "shares": {n: "s" for n in NODES}}, "node4")
    log.add("secagg_reveal", {"contract": "sec", "round": 1, "node": "node1", "shares": {n: "s" for n in NODES}},
            "node1")
    with pytest.raises(Rejected, match="already revealed"):
        log.add("secagg_reveal", {"contract": "sec", "round": 1, "node": "node1", "shares": {n: "s" for n in NODES}},
                "node1")
    # Once survivors are named no new leader may take over (they would reveal again): abort instead.
    waiting = [n for n in r.participants if n != r.leader]
    with pytest.raises(Rejected, match="aborts the round instead"):
        log.add("reelect", {"contract": "sec", "round": 1, "failed": r.leader, "leader": waiting[0]}, waiting[0])
    log.add("round_abort", {"contract": "sec", "round": 1, "failed": r.leader, "reason": "leader silent"}, waiting[0])
    assert r.status == "aborted" and r.secure.shares == {} and r.secure.revealed == {}


def test_the_merged_model_of_a_secure_round_is_the_survivors_and_only_theirs():
    log = secure_log()
    r = rnd(log)
    share_all(log)
    for node in NODES:
        log.add("secagg_masked", {"contract": "sec", "round": 1, "node": node, "hash": f"m-{node}", "size": 10}, node)
    survivors = NODES[:3]
    if r.leader not in survivors:
        survivors = sorted({r.leader, *NODES[:2]})
    log.add("secagg_survivors", {"contract": "sec", "round": 1, "nodes": survivors}, r.leader)
    with pytest.raises(Rejected, match="only those"):
        log.add("merged", {"contract": "sec", "round": 1, "hash": "x", "size": 1, "dropped": []}, r.leader)
    dropped = [n for n in r.participants if n not in survivors]
    log.add("merged", {"contract": "sec", "round": 1, "hash": "x", "size": 1, "dropped": dropped}, r.leader)
    assert r.status == "merged" and r.participants == leader_order("sec", 0, 1, survivors)


def test_a_protocol_3_ledger_keeps_its_rules():
    log = Log()
    from ledger_ids import genesis_payload
    log.add("genesis", {**genesis_payload(), "protocol": 3})
    log.add("register_node", _reg("swci-1"), "swci-1")
    with pytest.raises(Rejected, match="needs a ledger of protocol 4"):
        log.add("contract_create", {"name": "x", "merge_method": "trimmedmean"}, "swci-1")


def test_client_level_dp_needs_secure_mean_and_the_same_settings_on_every_node():
    log = base_log()
    dp = {"clip": 1.0, "noise_multiplier": 2.0, "delta": 1e-5}
    with pytest.raises(Rejected, match="only secure_mean .* may carry it"):
        log.add("session_join", {"contract": CONTRACT, "node": "node4", "merge_method": "mean", "client_dp": dp},
                "node4")
    log.add("contract_create", {"name": "sec"}, "swci-1")
    log.add("session_join", {"contract": "sec", "node": "node1", "min_peers": 3, "merge_method": "secure_mean",
                             "client_dp": dp}, "node1")
    assert log.state.contract("sec").client_dp == dp
    with pytest.raises(Rejected, match="must use the same client_dp settings"):
        log.add("session_join", {"contract": "sec", "node": "node2", "min_peers": 3, "merge_method": "secure_mean",
                                 "client_dp": {**dp, "clip": 5.0}}, "node2")
    with pytest.raises(Rejected, match="must use the same client_dp settings"):
        log.add("session_join", {"contract": "sec", "node": "node2", "min_peers": 3, "merge_method": "secure_mean"},
                "node2")
    with pytest.raises(Rejected, match="field 'client_dp.noise_multiplier'"):
        log.add("session_join", {"contract": "sec", "node": "node2", "min_peers": 3, "merge_method": "secure_mean",
                                 "client_dp": {**dp, "noise_multiplier": -1.0}}, "node2")


@pytest.mark.parametrize("value,message", [
    ({"clip": 1.0}, "must be a dict with clip and noise_multiplier"),
    ({"clip": 0, "noise_multiplier": 1.0}, "clip must be a number in"),
    ({"clip": 1.0, "noise_multiplier": 1.0, "delta": 0.5}, "delta must be a number in"),
    ({"clip": 1.0, "noise_multiplier": 1.0, "sigma": 2}, "must be a dict with clip and noise_multiplier"),
])
def test_the_callback_names_a_bad_client_dp_setting(value, message):
    from swarmlearn.callback.settings import settings_from
    from swarmlearn.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        settings_from({"client_dp": value})
    assert settings_from({"client_dp": {"clip": 2, "noise_multiplier": 1}}).client_dp == \
        {"clip": 2.0, "noise_multiplier": 1.0, "delta": 1e-5}


def test_each_phase_refuses_a_repeat_a_stranger_and_a_size_beyond_the_contract():
    log = secure_log()
    r = rnd(log)
    share_all(log, NODES[:1])
    with pytest.raises(Rejected, match="already posted its shares"):
        share_all(log, NODES[:1])
    share_all(log, NODES[1:])
    limit = log.state.contract("sec").limits.max_blob_bytes
    with pytest.raises(Rejected, match=f"allows at most {limit}"):
        log.add("secagg_masked", {"contract": "sec", "round": 1, "node": "node1", "hash": "m", "size": limit + 1},
                "node1")
    for node in NODES[:3]:
        log.add("secagg_masked", {"contract": "sec", "round": 1, "node": node, "hash": f"m-{node}", "size": 10}, node)
    with pytest.raises(Rejected, match="already posted its masked input"):
        log.add("secagg_masked", {"contract": "sec", "round": 1, "node": "node1", "hash": "x", "size": 10}, "node1")
    other = next(n for n in NODES if n != r.leader)
    with pytest.raises(Rejected, match="only its leader"):
        log.add("secagg_survivors", {"contract": "sec", "round": 1, "nodes": NODES[:3]}, other)
    with pytest.raises(Rejected, match="node4 posted no masked input"):
        log.add("secagg_survivors", {"contract": "sec", "round": 1, "nodes": NODES}, r.leader)
    # A plain contract's closed round takes no secure-aggregation entries.
    for node in ("node1", "node2", "node3"):
        log.add("checkin", {"contract": CONTRACT, "round": 1, "node": node, "hash": f"h-{node}", "weight": 1.0},
                node)
    with pytest.raises(Rejected, match="does not merge with secure_mean"):
        log.add("secagg_shares", {"contract": CONTRACT, "round": 1, "node": "node1", "shares": {"node1": "x"}},
                "node1")
