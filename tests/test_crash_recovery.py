"""The swarm survives a crash of any one of its processes, as a user would see it:

- the SN is killed mid-training and started again on its ledger: SLs, SWOP and SWCI reconnect on
  their own, the task completes, every round is merged exactly once and the ledger verifies;
- a node's ML, and then another node's SL, are killed: the others go on while they are min_peers,
  and the node started again by hand takes the latest merged model and ends with the others' model;
- a node left below min_peers says every second whom it waits for and when each was last seen,
  then gives up after --min-peers-timeout with that reason instead of hanging.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections import Counter

import pytest
from safetensors.numpy import load_file

from conftest import RunningSN, identity_args, run_swarm, start_sn
from swarm_harness import everything, start_ml, start_sl, start_swarm, wait_ml
from swarmlearn.ledger.sqlite_store import SQLiteStore
from swarmlearn.defaults import DEFAULT_CONTRACT
from swarmlearn.sn.server import LEDGER_FILE
from test_swarm_failures import LedgerWatch, assert_same, final_models, is_kind, rounds
from test_swop_swci import make_project, start_swop

NODES = ["node1", "node2", "node3"]
RUNNER = "defaulttaskbb.taskdb.sml.hpe"


def restart_sn(procs, certs, sn: RunningSN) -> RunningSN:
    """The SN started again as a user would: same data dir, same port, so nobody needs new flags."""
    port = sn.address.rsplit(":", 1)[1]
    proc = procs.swarm("sn", "--sentinel", "--host-ip", "127.0.0.1", "--sn-api-port", port,
                       *identity_args(certs, "sn"), "--data-dir", str(sn.data_dir))
    line = proc.wait_for_line("SN ready on ")
    assert sn.address in line, line
    return RunningSN(proc, sn.address, sn.data_dir)


def ledger_entries(sn: RunningSN):
    store = SQLiteStore(sn.data_dir / LEDGER_FILE, read_only=True)
    try:
        return store.read(0)
    finally:
        store.close()


def assert_each_round_counted_once(sn: RunningSN) -> None:
    entries = [e for e in ledger_entries(sn) if e.tx.payload.get("contract") == DEFAULT_CONTRACT]
    merged = Counter(e.tx.payload["round"] for e in entries if e.tx.kind == "merged")
    closed = Counter(e.tx.payload["round"] for e in entries if e.tx.kind == "close_round")
    checkins = Counter((e.tx.payload["round"], e.tx.payload["node"]) for e in entries if e.tx.kind == "checkin")
    assert merged and set(merged.values()) == {1}, merged
    assert sorted(merged) == list(range(1, max(merged) + 1)), merged  # no round lost, none merged twice
    assert set(closed.values()) <= {1} and set(checkins.values()) == {1}, (closed, checkins)


def slow_profile(usr, steps: int, step_sleep: float) -> None:
    """Longer training per node than the SWOP test's profile, so that a crash lands mid-run."""
    profile = usr / "swop" / "swop_profile.yaml"
    text = profile.read_text().replace('STEPS: "8"', f'STEPS: "{steps}", STEP_SLEEP: "{step_sleep}"')
    profile.write_text(text)


@pytest.mark.slow
def test_the_sn_killed_mid_training_restarts_on_its_ledger_and_everyone_carries_on(procs, certs, tmp_path):
    sn = start_sn(procs, certs, tmp_path / "sn")
    usr = make_project(tmp_path, certs)
    slow_profile(usr, steps=12, step_sleep=0.25)
    swop = start_swop(procs, certs, sn, usr)
    swci = procs.swarm("swci", "--usr-dir", str(usr / "swci"), "--init-script-name", "swci-init",
                       *identity_args(certs, "swci"), "--sn-api-port", sn.address.rsplit(":", 1)[1])
    watch = LedgerWatch(sn.address, certs)
    try:
        watch.wait(is_kind("merged", round=2), timeout=90)
    finally:
        watch.close()
    sn.proc.kill(signal.SIGKILL)
    time.sleep(2)  # the SN stays down while the nodes train on and try to check in
    sn = restart_sn(procs, certs, sn)
    try:
        code = swci.popen.wait(timeout=90)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"SWCI still waiting:\n{swci.output}\n--- SWOP\n{swop.output}") from None
    swci._thread.join(5)
    assert code == 0, f"{swci.output}\n--- SWOP\n{swop.output}"
    assert "run_task COMPLETE" in swci.output
    finals = [load_file(tmp_path / "out" / n / "final.safetensors") for n in NODES]
    assert_same(finals)
    sl_logs = [(usr / "runs" / "run_task" / n / "sl.log").read_text() for n in NODES]
    for log in [*sl_logs, swop.output]:  # the outage was felt mid-run, and got over without help
        assert "unreachable; reconnecting to follow the ledger" in log and "reachable again after" in log, log
    assert_each_round_counted_once(sn)
    verified = run_swarm("ledger", "verify", str(sn.data_dir))
    assert verified.returncode == 0 and verified.stdout.startswith("OK"), verified.stdout + verified.stderr


def merged_round(watch, swarm, certs, pred) -> int:
    """The number of the first merged round whose ledger record satisfies `pred`."""
    def match(e):
        return e.tx.kind == "merged" and pred(rounds(swarm, certs)[e.tx.payload["round"]])

    return watch.wait(match).tx.payload["round"]


def wait_taken(watch, number: int, nodes: list[str]) -> None:
    """Waits until `nodes` check in to the round after `number`, so they hold its merged model: a
    node killed before its peers pulled the model it merged would take it with it."""
    for node in nodes:
        watch.wait(is_kind("checkin", round=number + 1, node=node))


def first_round_taken(out, node) -> int:
    """The first round whose merged model the node's ML loaded (its catch-up, for a restarted ML)."""
    return min(int(p.name[5:].split("-")[0]) for p in (out / node).glob("round*-merged.safetensors"))


@pytest.mark.slow
def test_a_killed_ml_and_a_killed_sl_come_back_by_hand_and_end_with_the_same_model(procs, certs, tmp_path):
    env = {"SYNC_FREQUENCY": "4", "MIN_PEERS": "2", "STEP_SLEEP": "0.2"}
    sl_args = ("--checkin-wait", "1", "--leader-timeout", "2")
    swarm = start_swarm(procs, certs, tmp_path, NODES, "tiny_torch_model.py", env={**env, "STEPS": "40"},
                        sl_args=sl_args)
    out = swarm.out_dir
    watch = LedgerWatch(swarm.sn.address, certs)
    try:
        # node3's ML dies; its SL lives on. node1 and node2 go on merging without it.
        watch.wait(is_kind("merged", round=2))
        swarm.nodes["node3"].ml.kill(signal.SIGKILL)
        without3 = merged_round(watch, swarm, certs, lambda r: sorted(r["participants"]) == ["node1", "node2"])
        wait_taken(watch, without3, ["node1"])

        # Then node2's SL dies: its ML's next sync fails, saying so. (node1, alone, waits for min_peers.)
        swarm.nodes["node2"].sl.kill(signal.SIGKILL)
        old_ml = swarm.nodes["node2"].ml
        assert old_ml.popen.wait(timeout=30) != 0
        old_ml._thread.join(5)
        assert "sync with SL failed" in old_ml.output, old_ml.output

        # Both nodes are started again by hand, with the same names and folders.
        latest = max(n for n, v in rounds(swarm, certs).items() if v["status"] == "merged")
        for node in ("node2", "node3"):
            for f in (out / node).iterdir():
                f.unlink()
        swarm.nodes["node2"] = start_sl(procs, certs, swarm.sn, "node2", tmp_path, *sl_args)
        for node in ("node2", "node3"):
            start_ml(procs, swarm.nodes[node], "tiny_torch_model.py", out, {**env, "STEPS": "16"})
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{everything(swarm)}") from None
    finally:
        watch.close()
    wait_ml(swarm, timeout=120)
    r = rounds(swarm, certs)
    for node in ("node2", "node3"):
        first = first_round_taken(out, node)
        assert first == latest  # it took the latest merged model...
        assert_same([load_file(out / node / f"round{first}-merged.safetensors"),
                     load_file(out / "node1" / f"round{first}-merged.safetensors")])
        assert any(node in r[n]["participants"] for n in r if n > first)  # ...then contributed again
    assert_same(final_models(swarm, NODES))


@pytest.mark.slow
def test_below_min_peers_a_node_says_whom_it_waits_for_then_gives_up_with_the_reason(procs, certs, tmp_path):
    swarm = start_swarm(procs, certs, tmp_path, ["node1", "node2"], "tiny_torch_model.py",
                        env={"STEPS": "40", "SYNC_FREQUENCY": "4", "MIN_PEERS": "2", "STEP_SLEEP": "0.1"},
                        sl_args=("--checkin-wait", "1", "--leader-timeout", "2", "--min-peers-timeout", "4",
                                 "--waiting-log-every", "1"))
    watch = LedgerWatch(swarm.sn.address, certs)
    try:
        wait_taken(watch, 2, ["node1"])
        swarm.nodes["node2"].sl.kill(signal.SIGKILL)
        swarm.nodes["node2"].ml.kill(signal.SIGKILL)
    finally:
        watch.close()
    ml = swarm.nodes["node1"].ml
    started = time.monotonic()
    try:
        code = ml.popen.wait(timeout=40)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"node1 hangs below min_peers:\n{everything(swarm)}") from None
    ml._thread.join(5)
    assert code != 0
    assert re.search(r"only 1 of 2 required peers checked in within 4 s \(waiting for node2 \(last seen \d+ s ago\)\)",
                     ml.output), ml.output
    sl_log = swarm.nodes["node1"].sl.output
    waiting = re.findall(r"round (\d+): 1 of 2 required peers, waiting for node2 \(last seen (\d+) s ago\)", sl_log)
    assert len(waiting) >= 2, sl_log  # said every second, not once
    assert int(waiting[-1][1]) > int(waiting[0][1])  # and how long node2 has been silent
    assert time.monotonic() - started < 30
    with_leave = [e for e in ledger_entries(swarm.sn) if e.tx.kind == "session_leave"]
    assert [e.tx.payload["node"] for e in with_leave] == ["node1"]  # it left, so nobody waits for it
