"""SWOP and SWCI as a user runs them: a sentinel SN, one operator with a profile of three nodes, and
an init script in the original's style that builds, assigns and waits for a RUN_SWARM task."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from conftest import SWARM, identity_args, start_sn

ML_SCRIPT = Path(__file__).parent / "ml" / "tiny_torch_model.py"

PROFILE = """\
groupname  : demo
taskrunner : defaulttaskbb.taskdb.sml.hpe
policyuri  : ~
resourcemgr :
    mgrtype    : DOCKER
    accessinfo :
        accesstype : FROMENV
network    : host-1-net
apls :
    locator :
        host : 127.0.0.1
        port : ~
apisrv :
    locator :
        host : ~
        port : ~
        service: api
envvars :
    - SL_LOG_LEVEL : INFO
nodes :
{nodes}"""

NODE = """\
    - slnodedef :
        idx : {idx}
        identity :
            - attribute :
                aType : KEY
                mType : BIND
                src : "{certdir}"
                tgt : "/swarm-cert/sl-node{idx}-key.pem"
                subPath : "sl-node{idx}-key.pem"
            - attribute :
                aType : CERT
                mType : BIND
                src : "{certdir}"
                tgt : "/swarm-cert/sl-node{idx}-cert.pem"
                subPath : "sl-node{idx}-cert.pem"
            - attribute :
                aType : CAPATH
                mType : BIND
                src : "{capath}"
                tgt : "/swarm-cert/capath"
                subPath : null
        slhostname : sl{idx}
        slhostip   : 127.0.0.1
        slport : 0
        usrhostname : node{idx}
        privatedata :
            src: "{usr}/data/node{idx}"
            mType : BIND
        slenvvars : null
        usrenvvars : [OUT_DIR : "{out}", STEPS: "8", SYNC_FREQUENCY : "4"{extra}]
        usrcontaineropts :
            - gpus : "device=0"
"""

BUILD_TASK = """\
Name: build_user_env
TaskType: MAKE_USER_CONTAINER
Author: demo
Prereq: ROOTTASK
Outcome: user-env
Body:
    BuildContext: ~
    BuildType: INLINE
    BuildSteps:
    - FROM python:3.11
    - RUN apt-get update
"""

RUN_TASK = """\
Name: run_task
TaskType: RUN_SWARM
Author: demo
Prereq: build_user_env
Outcome: user-env
Body:
    Command: model/model.py
    Entrypoint: python3
    WorkingDir: /platform/swarm/usr
    Envvars: ["MIN_PEERS": 3, "MERGE_METHOD": mean]
    PrivateContent: /platform/swarm/usr/data
    SharedContent:
    -   Src: {usr}
        Tgt: /platform/swarm/usr
        MType: BIND
"""

INIT = """\
# an init script in the original's words
EXIT ON FAILURE
WAIT FOR IP 127.0.0.1
CREATE CONTEXT test WITH IP 127.0.0.1
SWITCH CONTEXT test
EXIT ON FAILURE OFF
CREATE TASK FROM taskdefs/build_user_env.yaml
FINALIZE TASK build_user_env
LIST TASKS
EXIT ON FAILURE
RESET TASKRUNNER defaulttaskbb.taskdb.sml.hpe
ASSIGN TASK build_user_env TO defaulttaskbb.taskdb.sml.hpe WITH 1 PEERS
WAIT FOR TASKRUNNER defaulttaskbb.taskdb.sml.hpe
CREATE TASK FROM taskdefs/run_task.yaml
FINALIZE TASK run_task
ASSIGN TASK run_task TO defaulttaskbb.taskdb.sml.hpe WITH 3 PEERS
WAIT FOR TASKRUNNER defaulttaskbb.taskdb.sml.hpe
GET TASKRUNNER STATUS defaulttaskbb.taskdb.sml.hpe
LIST NODES
RESET TASKRUNNER defaulttaskbb.taskdb.sml.hpe
EXIT
"""


def make_project(tmp_path: Path, certs, fail_node: int | None = None) -> Path:
    usr = tmp_path / "usr"
    (usr / "model").mkdir(parents=True)
    shutil.copy(ML_SCRIPT, usr / "model" / "model.py")
    out = tmp_path / "out"
    nodes = "".join(NODE.format(idx=i, certdir=certs.root, capath=certs.capath, usr=usr, out=out,
                                extra=', FAIL_AT_STEP: "2"' if i == fail_node else "")
                    for i in (1, 2, 3))
    for i in (1, 2, 3):
        (usr / "data" / f"node{i}").mkdir(parents=True)
    (usr / "swop").mkdir()
    (usr / "swop" / "swop_profile.yaml").write_text(PROFILE.format(nodes=nodes))
    (usr / "swci" / "taskdefs").mkdir(parents=True)
    (usr / "swci" / "taskdefs" / "build_user_env.yaml").write_text(BUILD_TASK)
    (usr / "swci" / "taskdefs" / "run_task.yaml").write_text(RUN_TASK.format(usr=usr))
    (usr / "swci" / "swci-init").write_text(INIT)
    return usr


def start_swop(procs, certs, sn, usr):
    procs.workspaces.append(usr / "runs")
    host, port = sn.address.rsplit(":", 1)
    swop = procs.swarm("swop", "--sn-ip", host, "--sn-api-port", port, "--usr-dir", str(usr),
                       "--profile-file-name", "swop_profile.yaml", *identity_args(certs, "swop"),
                       "--sl-arg=--checkin-wait", "--sl-arg=1")
    swop.wait_for_line("SWOP swop-1 ready")
    return swop


def run_swci(certs, sn, usr, timeout=180) -> subprocess.CompletedProcess:
    port = sn.address.rsplit(":", 1)[1]
    return subprocess.run([*SWARM, "swci", "--usr-dir", str(usr / "swci"), "--init-script-name", "swci-init",
                           *identity_args(certs, "swci"), "--sn-api-port", port],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_init_script_builds_and_runs_a_three_node_task_to_completion(procs, certs, tmp_path):
    sn = start_sn(procs, certs, tmp_path / "sn")
    usr = make_project(tmp_path, certs)
    swop = start_swop(procs, certs, sn, usr)
    result = run_swci(certs, sn, usr)
    assert result.returncode == 0, result.stdout + result.stderr + swop.output
    assert "run_task COMPLETE" in result.stdout
    assert "round" in result.stdout and "merged" in result.stdout  # progress says how training goes
    assert "resourcemgr" in swop.output and "apls" in swop.output  # one line each on what we ignore
    # the build made the image's own environment, and the run task (Prereq: the build) ran its ML there
    assert f"its ML runs in environment user-env ({usr / 'runs' / 'envs' / 'user-env' / 'bin' / 'python'})" \
        in swop.output
    runs = usr / "runs" / "run_task"
    finals = [load_file(tmp_path / "out" / f"node{i}" / "final.safetensors") for i in (1, 2, 3)]
    for name in finals[0]:
        assert all(f[name].tobytes() == finals[0][name].tobytes() for f in finals)
    for i in (1, 2, 3):
        assert "Final Swarm model was loaded" in (runs / f"node{i}" / "ml.log").read_text()
        assert f"SL node{i} ready" in (runs / f"node{i}" / "sl.log").read_text()
    deadline = time.monotonic() + 20  # SLs linger a few seconds to serve the final model, then stop
    while list((usr / "runs" / "pids").glob("run_task-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not list((usr / "runs" / "pids").glob("run_task-*"))


@pytest.mark.slow
def test_a_failing_model_fails_the_task_and_swci_shows_why(procs, certs, tmp_path):
    sn = start_sn(procs, certs, tmp_path / "sn")
    usr = make_project(tmp_path, certs, fail_node=2)
    swop = start_swop(procs, certs, sn, usr)
    started = time.monotonic()
    result = run_swci(certs, sn, usr)
    assert result.returncode != 0
    assert "run_task on defaulttaskbb.taskdb.sml.hpe FAILED" in result.stdout
    assert "node2 on swop-1 exited 3" in result.stdout
    assert "failing on purpose at step 2" in result.stdout
    assert time.monotonic() - started < 90, swop.output


def test_swarm_stop_leaves_no_process_behind(procs, certs, tmp_path):
    sn = start_sn(procs, certs, tmp_path / "sn")
    usr = make_project(tmp_path, certs)
    swop = start_swop(procs, certs, sn, usr)
    pid_files = list((usr / "runs" / "pids").glob("*.pid"))
    assert [p.stem for p in pid_files] == ["swop-1"]
    result = subprocess.run([*SWARM, "stop", "--workspace", str(usr / "runs")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "stopped swop-1" in result.stdout
    swop.popen.wait(timeout=15)
    assert not list((usr / "runs" / "pids").glob("*.pid"))
