"""A SWOP killed while its nodes train takes them with it, and the task does not stay RUNNING
forever: SWCI's wait fails saying the SWOP stopped, the restarted SWOP ends the task FAILED with that
reason on the ledger (it does not re-adopt it), and RESET TASKRUNNER + ASSIGN TASK run it afresh."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from safetensors.numpy import load_file

from conftest import identity, identity_args, start_sn
from swarmlearn.sn.client import SNClient
from test_crash_recovery import NODES, RUNNER, slow_profile
from test_supervisor import alive
from test_swarm_failures import LedgerWatch, assert_same, is_kind
from test_swop_swci import make_project

RERUN = f"""\
EXIT ON FAILURE
CREATE CONTEXT test WITH IP 127.0.0.1
SWITCH CONTEXT test
GET TASKRUNNER STATUS {RUNNER}
RESET TASKRUNNER {RUNNER}
ASSIGN TASK run_task TO {RUNNER} WITH 3 PEERS
WAIT FOR TASKRUNNER {RUNNER}
EXIT
"""


def start_swop(procs, certs, sn, usr):
    """As in test_swop_swci, with a short leader timeout: it also bounds how long a node looks for a
    merged model that nobody holds any more."""
    procs.workspaces.append(usr / "runs")
    host, port = sn.address.rsplit(":", 1)
    swop = procs.swarm("swop", "--sn-ip", host, "--sn-api-port", port, "--usr-dir", str(usr),
                       "--profile-file-name", "swop_profile.yaml", *identity_args(certs, "swop"),
                       "--sl-arg=--checkin-wait", "--sl-arg=1", "--sl-arg=--leader-timeout", "--sl-arg=2")
    swop.wait_for_line("SWOP swop-1 ready")
    return swop


def swci(procs, certs, sn, usr: Path, script: str):
    # The SWCI takes a SWOP silent for its SN patience plus 10 s for stopped: 2 s of patience keeps the
    # wait for a killed SWOP short.
    return procs.swarm("swci", "--usr-dir", str(usr / "swci"), "--init-script-name", script,
                       *identity_args(certs, "swci"), "--sn-api-port", sn.address.rsplit(":", 1)[1],
                       env={"SWARM_SN_PATIENCE": "2"})


def ended(proc, timeout: float) -> int:
    try:
        code = proc.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout} s:\n{proc.output}") from None
    proc._thread.join(5)
    return code


def assignment(sn, certs) -> dict:
    with SNClient(sn.address, identity(certs, "swci")) as c:
        return c.query("taskrunners")["taskrunners"][RUNNER]["assignment"]


@pytest.mark.slow
def test_a_killed_swop_leaves_no_node_and_its_task_ends_failed_then_runs_again(procs, certs, tmp_path):
    sn = start_sn(procs, certs, tmp_path / "sn")
    usr = make_project(tmp_path, certs)
    slow_profile(usr, steps=12, step_sleep=0.25)
    swop = start_swop(procs, certs, sn, usr)
    first = swci(procs, certs, sn, usr, "swci-init")
    watch = LedgerWatch(sn.address, certs)
    try:
        watch.wait(is_kind("merged", round=2), timeout=90)
    finally:
        watch.close()
    pids = {p.stem: int(p.read_text().split()[0]) for p in (usr / "runs" / "pids").glob("run_task-*.pid")}
    assert len(pids) == 6, pids  # an SL and an ML per node
    swop.kill(signal.SIGKILL)

    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    # Their wrappers saw the SWOP's lifeline close and stopped them.
    assert not [name for name, pid in pids.items() if alive(pid)]

    assert ended(first, 30) != 0
    assert "swop-1 stopped while its nodes ran" in first.output, first.output
    assert assignment(sn, certs)["status"] == "RUNNING"  # what SWCI said; nobody has ended it on the ledger yet

    swop = start_swop(procs, certs, sn, usr)
    a = assignment(sn, certs)
    assert a["status"] == "FAILED", a
    failed = [s["detail"] for s in a["peer_status"].values() if s["status"] == "FAILED"]
    assert failed and "swop-1 stopped while its nodes ran (node1, node2, node3)" in failed[0], a

    (usr / "swci" / "rerun").write_text(RERUN)
    again = swci(procs, certs, sn, usr, "rerun")
    assert ended(again, 120) == 0, f"{again.output}\n--- SWOP\n{swop.output}"
    assert "run_task FAILED" in again.output and "swop-1 stopped while its nodes ran" in again.output
    assert "run_task COMPLETE" in again.output
    assert_same([load_file(tmp_path / "out" / n / "final.safetensors") for n in NODES])
