"""The original's SWCI commands that scripts use, run by a real `swarm swci` against a real SN (and a
SWOP where a task must run): container host names, context variables, tasks written line by line,
targeted assignments and one SWOP's part of a task."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from conftest import SWARM, identity_args, start_sn
from test_swop_swci import make_project, start_swop

RUNNER = "defaulttaskbb.taskdb.sml.hpe"


def swci(certs, usr: Path, script: str, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    usr.mkdir(parents=True, exist_ok=True)
    (usr / "swci-init").write_text(script)
    return subprocess.run([*SWARM, "swci", "--usr-dir", str(usr), "--init-script-name", "swci-init",
                           *identity_args(certs, "swci"), *extra], capture_output=True, text=True, timeout=timeout)


def test_container_names_resolve_through_the_hosts_file_without_waiting(procs, certs, tmp_path):
    sn = start_sn(procs, certs, tmp_path / "sn")
    port = sn.address.rsplit(":", 1)[1]
    project = tmp_path / "project"
    project.mkdir()
    (project / "hosts").write_text("# the original's container names\n127.0.0.1 sn1 api.sn-1.swarm\n")
    started = time.monotonic()
    done = swci(certs, project / "swci", f"""\
EXIT ON FAILURE
wait for ip sn1
create context test with ip sn1
switch context test
WAIT FOR SERVICE api.sn-1.swarm:{port} 2
CREATE CONTEXT proxied WITH SERVICE api.sn-1.swarm
LIST CONTEXTS
EXIT
""", "--sn-api-port", port)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SN at 127.0.0.1:{port} is up (sn1)" in done.stdout
    assert f"context test: SN at 127.0.0.1:{port}" in done.stdout
    assert f"service api.sn-1.swarm is the SN at 127.0.0.1:{port}" in done.stdout
    assert time.monotonic() - started < 30


def test_a_name_only_the_sn_knows_resolves_through_its_node_registry(procs, certs, tmp_path):
    sn = start_sn(procs, certs, tmp_path / "sn")
    host, port = sn.address.rsplit(":", 1)
    # The SN registered as sn-1 on the ledger: the original's `sn1` names it.
    done = swci(certs, tmp_path / "swci", "EXIT ON FAILURE\nWAIT FOR IP sn1\nCREATE CONTEXT c WITH IP sn1\nEXIT\n",
                "--sn-ip", host, "--sn-api-port", port)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"context c: SN at {host}:{port}" in done.stdout


def test_an_unknown_name_fails_at_once_saying_how_to_name_it(procs, certs, tmp_path):
    started = time.monotonic()
    done = swci(certs, tmp_path / "swci", "EXIT ON FAILURE\nWAIT FOR IP nosuchsn1\nEXIT\n")
    assert done.returncode == 1
    assert "no host is known as nosuchsn1: write `<IP> nosuchsn1` in" in done.stdout
    assert time.monotonic() - started < 20


def test_retries_bound_the_wait_for_a_name_the_sn_may_register_later(procs, certs, tmp_path):
    sn = start_sn(procs, certs, tmp_path / "sn")
    host, port = sn.address.rsplit(":", 1)
    started = time.monotonic()
    done = swci(certs, tmp_path / "swci", "EXIT ON FAILURE\nWAIT FOR IP sn7 30304 2\nEXIT\n",
                "--sn-ip", host, "--sn-api-port", port)
    assert done.returncode == 1 and "no host is known as sn7" in done.stdout, done.stdout + done.stderr
    assert 5 <= time.monotonic() - started < 30  # two retries of 5 s, not the 300 s default


def test_context_variables_and_version(procs, certs, sn, tmp_path):
    host, port = sn.address.rsplit(":", 1)
    done = swci(certs, tmp_path / "swci", f"""\
CREATE CONTEXT other WITH IP {host} {port}
SET CONTEXT ENV SWCI_TASK_MAX_WAIT_TIME 30
SET CONTEXT ENV other GREETING hello swarm
SET CONTEXT ENV default SWCI_TASK_MAX_WAIT_TIME soon
GET CONTEXT ENV SWCI_TASK_MAX_WAIT_TIME
GET CONTEXT ENV other GREETING
LIST CONTEXT ENV other
GET CONTEXT ENV NOPE
GET CONTEXT VERSION
EXIT
""", "--sn-ip", host, "--sn-api-port", port)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "SWCI_TASK_MAX_WAIT_TIME=30" in out
    assert out.count("GREETING=hello swarm") == 2  # GET and LIST
    assert "SWCI_TASK_MAX_WAIT_TIME needs a number, not 'soon'" in out
    assert "context default has no variable NOPE" in out
    assert "context default: SN ledger protocol" in out and "this SWCI: swarmlearn" in out


def test_a_contract_s_creator_chooses_its_merge_method(procs, certs, sn, tmp_path):
    host, port = sn.address.rsplit(":", 1)
    done = swci(certs, tmp_path / "swci", """\
EXIT ON FAILURE OFF
CREATE CONTRACT robust WITH PEERS node1,node2,node3 MERGE trimmedmean
CREATE CONTRACT private MERGE secure_mean
CREATE CONTRACT typo MERGE median
SET CONTRACT private MERGE mean
GET CONTRACT INFO robust
GET CONTRACT INFO private
EXIT
""", "--sn-ip", host, "--sn-api-port", port)
    out = done.stdout + done.stderr
    assert "unknown merge method 'median'; one of mean, coordmedian" in out, out
    assert out.count('"merge_method": "trimmedmean"') == 1 and out.count('"merge_method": "mean"') == 1, out


INLINE = """\
EXIT ON FAILURE OFF
CREATE TASK RUN_SWARM inline_run demo ROOTTASK user-env
APPEND TASK BODY inline_run 1 Command: model/model.py
APPEND TASK BODY inline_run 2 Entrypoint: python3
APPEND TASK BODY inline_run 3 WorkingDir: /platform/swarm/usr
APPEND TASK BODY inline_run 4 Envvars: ["MIN_PEERS": 2, "MERGE_METHOD": mean]
APPEND TASK BODY inline_run 6 SharedContent:
APPEND TASK BODY inline_run 7 -   Src: /tmp
APPEND TASK BODY inline_run 8     Tgt: /platform/swarm/usr
APPEND TASK BODY inline_run 9     MType: BIND
FINALIZE TASK inline_run
APPEND TASK BODY inline_run 5 PrivateContent: /platform/swarm/usr/data
APPEND TASK BODY inline_run 9     MType: COPY
FINALIZE TASK inline_run
APPEND TASK BODY inline_run 9     MType: BIND
FINALIZE TASK inline_run
GET TASK BODY inline_run
APPEND TASK BODY inline_run 10 Extra: 1
CREATE TASK FROM taskdefs/from_file.yaml
APPEND TASK BODY from_file 1 Tag: latest
CREATE TASK WRONG_TYPE t demo ROOTTASK x
EXIT
"""

FROM_FILE = """\
Name: from_file
TaskType: PULL_IMAGE
Author: demo
Prereq: ROOTTASK
Outcome: user-env
Body:
    Tag: latest
"""


def test_a_task_written_line_by_line_is_checked_whole_at_finalize(procs, certs, sn, tmp_path):
    host, port = sn.address.rsplit(":", 1)
    usr = tmp_path / "swci"
    (usr / "taskdefs").mkdir(parents=True)
    (usr / "taskdefs" / "from_file.yaml").write_text(FROM_FILE)
    done = swci(certs, usr, INLINE, "--sn-ip", host, "--sn-api-port", port)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "task inline_run created: APPEND TASK BODY inline_run <line> <text>" in out
    # The first FINALIZE lacks line 5; the second has a bad value on line 9: each named where it is.
    assert "task inline_run: Body.PrivateContent: required key is missing" in out
    assert "APPEND TASK BODY inline_run 9: Body.SharedContent[0].MType" in out
    # The third is whole: on the ledger, finalized, its Envvars as the SWOP reads them.
    assert '"Command": "model/model.py"' in out and '"MIN_PEERS": "2"' in out and '"Tgt": "/platform/swarm/usr"' in out
    assert "task inline_run is finalized; its body can no longer change" in out
    assert "task from_file was created with its Body (CREATE TASK FROM a file)" in out
    assert "CREATE TASK WRONG_TYPE t: the task type must be one of" in out


def test_a_task_targeted_at_a_swop_runs_there_and_its_peer_status_shows(procs, certs, tmp_path):
    sn = start_sn(procs, certs, tmp_path / "sn")
    host, port = sn.address.rsplit(":", 1)
    usr = make_project(tmp_path, certs)
    start_swop(procs, certs, sn, usr)
    done = swci(certs, tmp_path / "swci", f"""\
EXIT ON FAILURE
CREATE TASK PULL_IMAGE pull_env demo ROOTTASK user-env
APPEND TASK BODY pull_env 1 Tag: latest
FINALIZE TASK pull_env
GET TASKRUNNER PEER STATUS {RUNNER} 0
EXIT ON FAILURE OFF
ASSIGN TASK pull_env TO {RUNNER} TARGET swop-9
EXIT ON FAILURE
ASSIGN TASK pull_env TO {RUNNER} TARGET swop-1
WAIT FOR TASKRUNNER {RUNNER}
GET TASKRUNNER PEER STATUS {RUNNER} 0
GET TASKRUNNER PEER STATUS {RUNNER} swop-1
EXIT
""", "--sn-ip", host, "--sn-api-port", port)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert f"swop-1 of {RUNNER}: no task assigned" in out
    assert f"task runner {RUNNER} has no SWOP swop-9: give an index from 0 to 0 or one of swop-1" in out
    assert f"task pull_env assigned to swop-1 of {RUNNER}" in out
    assert out.count(f"swop-1 of {RUNNER}: task pull_env COMPLETE, 3 peers started by it") == 2
    assert "  node2: COMPLETE exit 0" in out
