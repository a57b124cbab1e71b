"""The original's container paths and host names work on a host without containers: a task written for
/tmp/test runs there, its private data appears at its PrivateContent path, `slhostip: sl1` and an SN
called `sn1` resolve, and the profile's settings the original passed on (envvars, usrenvvars NODE_ID)
reach the processes they reached there."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import start_sn
from swarmlearn import hostnames
from swarmlearn.swop import paths
from test_swop_swci import run_swci, start_swop

# ----------------------------------------------------------------------------------------- hostnames


def test_a_container_name_resolves_from_the_hosts_file_first_then_this_hosts_nodes_then_the_registry(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# the workspace's own names\n10.0.0.7  sn1 sn-one   # the first SN\n")
    registry = {"sn-1": {"address": "10.0.0.9:30304"}, "sn-2": {"address": "10.0.0.8:30304"},
                "swop-1": {"address": ""}, "sn-3": {"address": "0.0.0.0:30304"}}

    assert hostnames.resolve("sn1", hosts_file=hosts, registry=registry) == "10.0.0.7"
    assert hostnames.resolve("SN-ONE", hosts_file=hosts) == "10.0.0.7"
    assert hostnames.resolve("sn2", hosts_file=hosts, registry=registry, use_dns=False) == "10.0.0.8"
    assert hostnames.resolve("sl1", hosts_file=hosts, local=["sl1", "user1"], registry=registry) == "127.0.0.1"
    assert hostnames.resolve("10.1.1.1") == "10.1.1.1" and hostnames.resolve("[::1]") == "::1"
    # what the registry cannot tell: a SWOP has no address, a wildcard is not a host
    assert hostnames.resolve("swop1", registry=registry, use_dns=False) is None
    assert hostnames.resolve("sn3", registry=registry, use_dns=False) is None
    assert hostnames.resolve("sn9", hosts_file=tmp_path / "absent", registry=registry, use_dns=False) is None


def test_a_loose_name_that_matches_two_nodes_matches_neither():
    registry = {"sn-1": {"address": "10.0.0.1:1"}, "sn_1": {"address": "10.0.0.2:1"}}
    assert hostnames.resolve("sn1", registry=registry, use_dns=False) is None
    assert hostnames.resolve("sn-1", registry=registry, use_dns=False) == "10.0.0.1"


def test_a_bad_hosts_file_line_is_named(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\nsn1 10.0.0.1\n")
    with pytest.raises(ValueError, match=r"hosts:2: 'sn1 10.0.0.1' is not `IP name"):
        hostnames.resolve("sn1", hosts_file=hosts)


# ----------------------------------------------------------------------------------------- the table


MNIST_BODY = {"Command": "model/mnist.py --data /tmp/test/app-data", "Entrypoint": "python3", "WorkingDir": "/tmp/test",
              "Envvars": {"DATA_DIR": "app-data", "MODEL_DIR": "model", "MAX_EPOCHS": "2"},
              "PrivateContent": "/tmp/test/app-data",
              "SharedContent": [{"Src": "/proj/model", "Tgt": "/tmp/test/model", "MType": "BIND"}]}


def test_the_mnist_examples_paths_map_to_the_nodes_folders(tmp_path):
    table = paths.mount_table(MNIST_BODY, usr_dir=Path("/proj"), private_src="/proj/node1-data",
                              scratch=tmp_path / "scratch", confined=lambda p: False)

    assert dict(table.mounts) == {"/platform/swarm/usr": "/proj", "/tmp/test/model": "/proj/model",
                                  "/tmp/test/app-data": "/proj/node1-data", "/tmp/test": str(tmp_path / "scratch")}
    assert table.host_workdir() == str(tmp_path / "scratch")
    assert table.rewrite("app-data") == "/proj/node1-data"  # DATA_DIR relative to WorkingDir
    assert table.rewrite("model/mnist.py") == "/proj/model/mnist.py"
    assert table.rewrite("/tmp/test/app-data/x.csv") == "/proj/node1-data/x.csv"
    assert table.rewrite("--data=/tmp/test/model") == "--data=/proj/model"
    assert table.rewrite("2") == "2" and table.rewrite("out.txt") == "out.txt"  # WorkingDir's own: cwd holds it
    assert table.rewrite("/tmp/test/../../etc/passwd") == "/tmp/test/../../etc/passwd"  # not under a mount
    assert table.links() == [("app-data", "/proj/node1-data"), ("model", "/proj/model")]


def test_a_working_dir_on_this_host_is_used_as_it_is_and_an_existing_foreign_one_is_not_hidden(tmp_path):
    usr = tmp_path / "usr"
    usr.mkdir()
    inside = paths.mount_table({"WorkingDir": str(usr)}, usr_dir=usr, private_src=None, scratch=tmp_path / "s",
                               confined=lambda p: p.is_relative_to(usr))
    assert inside.host_workdir() == str(usr)
    etc = paths.mount_table({"WorkingDir": "/etc"}, usr_dir=usr, private_src=None, scratch=tmp_path / "s",
                            confined=lambda p: False)
    assert etc.host_workdir() == "/etc"  # a real host folder: the policy refuses it, nothing maps it away
    default = paths.mount_table({}, usr_dir=usr, private_src=None, scratch=tmp_path / "s", confined=lambda p: False)
    assert default.host_workdir() == str(usr)  # no WorkingDir: /platform/swarm/usr, the usr-dir


def test_a_target_of_root_is_refused():
    with pytest.raises(ValueError, match="SharedContent Tgt '/' must be an absolute folder"):
        paths.mount_table({"SharedContent": [{"Src": "/x", "Tgt": "/"}]}, usr_dir=Path("/u"), private_src=None,
                          scratch=Path("/s"), confined=lambda p: False)


@pytest.mark.skipif(paths.namespace_refusal() is not None, reason=f"no mount namespace: {paths.namespace_refusal()}")
def test_in_a_private_mount_namespace_the_program_sees_the_container_paths_and_the_host_does_not(tmp_path):
    private = tmp_path / "private"
    private.mkdir()
    (private / "a.csv").write_text("1,2\n")
    root = f"/tmp/swarmlearn-test-{uuid.uuid4().hex[:8]}"
    body = {"WorkingDir": f"{root}/test", "PrivateContent": f"{root}/test/app-data"}
    table = paths.mount_table(body, usr_dir=tmp_path, private_src=str(private), scratch=tmp_path / "scratch",
                              confined=lambda p: False)
    (tmp_path / "scratch").mkdir()
    try:
        seen = subprocess.run(table.mount_argv([sys.executable, "-c", "import os; print(os.getcwd(), "
                                                "sorted(os.listdir('app-data')))"]),
                              capture_output=True, text=True, timeout=30, cwd=tmp_path / "scratch")
        assert seen.returncode == 0, seen.stderr
        assert seen.stdout.split() == [f"{root}/test", "['a.csv']"]
        assert not any(Path(root).rglob("*.csv"))  # on the host: empty mount points only
    finally:
        subprocess.run(["rm", "-rf", root], check=False)


# ----------------------------------------------------------------------------------------- end to end

PROBE = '''\
import json, os, sys
import google.protobuf
import psutil

task_dir = os.path.dirname(os.environ["MODEL_DIR"])  # this node's SL keeps its data under it
sl = next(p for p in psutil.process_iter(["cmdline"])
          if "swarmlearn.cli" in (p.info["cmdline"] or []) and "sl" in p.info["cmdline"]
          and any(arg.startswith(task_dir + "/") for arg in p.info["cmdline"]))
seen = {"cwd": os.getcwd(), "argv": sys.argv[1:], "protobuf": google.protobuf.__version__, "python": sys.prefix,
        "listing": sorted(os.listdir(sys.argv[1])), "relative": sorted(os.listdir("app-data")),
        "env": {k: os.environ.get(k) for k in ("NODE_ID", "SWARM_NODE_ID", "PROFILE_MARK", "DATA_DIR")},
        "sl_env": {k: sl.environ().get(k) for k in ("PROFILE_MARK", "SL_MARK")}}
open(os.environ["OUT_FILE"], "w").write(json.dumps(seen))
'''

PROFILE = """\
groupname  : demo
taskrunner : defaulttaskbb.taskdb.sml.hpe
resourcemgr : {{mgrtype : DOCKER, accessinfo : {{accesstype : FROMENV}}}}
pathmapping : {mapping}
apisrv :
    locator :
        host : sn1
        port : ~
        service : api-service
envvars : [PROFILE_MARK : from-profile]
nodes :
    - slnodedef :
        idx : 0
        identity :
            - attribute : {{aType : KEY, mType : BIND, src : "{certs}", subPath : sl-node1-key.pem}}
            - attribute : {{aType : CERT, mType : BIND, src : "{certs}", subPath : sl-node1-cert.pem}}
            - attribute : {{aType : CAPATH, mType : BIND, src : "{capath}"}}
        slhostname : sl1
        slhostip   : sl1
        slport : 0
        usrhostname : node1
        privatedata : {{src : "{private}", mType : BIND}}
        slenvvars : [SL_MARK : sl-only]
        usrenvvars : [OUT_FILE : "{out}", NODE_ID : n1]
"""

BUILD = """\
Name: user_env_build_task
TaskType: MAKE_USER_CONTAINER
Author: HPESwarm
Prereq: ROOTTASK
Outcome: user-env-pyt-swop
Body:
    BuildContext: sl-cli-lib
    BuildType: INLINE
    BuildSteps:
    - FROM pytorch/pytorch:1.11.0-cuda11.3-cudnn8-runtime
    - RUN pip3 install --upgrade pip && pip3 install \\
    - '   six==1.16.0 protobuf==3.15.6'
"""

RUN = """\
Name: swarm_probe_task
TaskType: RUN_SWARM
Author: HPESwarm
Prereq: user_env_build_task
Outcome: swarm_probe_task
Body:
    Command: model/probe.py {root}/test/app-data
    Entrypoint: python3
    WorkingDir: {root}/test
    Envvars: ["DATA_DIR": app-data, "MAX_EPOCHS": 2]
    PrivateContent: {root}/test/app-data
    SharedContent:
    -   Src: {usr}/model
        Tgt: {root}/test/model
        MType: BIND
"""

INIT = """\
EXIT ON FAILURE
CREATE CONTEXT test WITH IP 127.0.0.1
SWITCH CONTEXT test
CREATE TASK FROM taskdefs/user_env_build_task.yaml
FINALIZE TASK user_env_build_task
RESET TASKRUNNER defaulttaskbb.taskdb.sml.hpe
ASSIGN TASK user_env_build_task TO defaulttaskbb.taskdb.sml.hpe WITH 1 PEERS
WAIT FOR TASKRUNNER defaulttaskbb.taskdb.sml.hpe
CREATE TASK FROM taskdefs/swarm_probe_task.yaml
FINALIZE TASK swarm_probe_task
RESET TASKRUNNER defaulttaskbb.taskdb.sml.hpe
ASSIGN TASK swarm_probe_task TO defaulttaskbb.taskdb.sml.hpe WITH 1 PEERS
WAIT FOR TASKRUNNER defaulttaskbb.taskdb.sml.hpe
EXIT
"""


def mnist_style_project(tmp_path: Path, certs, mapping: str, root: str) -> Path:
    usr = tmp_path / "usr"
    (usr / "model").mkdir(parents=True)
    (usr / "model" / "probe.py").write_text(PROBE)
    private = tmp_path / "node1-data"
    private.mkdir()
    (private / "a.csv").write_text("1,2\n")
    (usr / "swop").mkdir()
    (usr / "swop" / "swop_profile.yaml").write_text(PROFILE.format(
        mapping=mapping, certs=certs.root, capath=certs.capath, private=private, out=tmp_path / "seen.json"))
    (usr / "swci" / "taskdefs").mkdir(parents=True)
    (usr / "swci" / "taskdefs" / "user_env_build_task.yaml").write_text(BUILD)
    (usr / "swci" / "taskdefs" / "swarm_probe_task.yaml").write_text(RUN.format(root=root, usr=usr))
    (usr / "swci" / "swci-init").write_text(INIT)
    (usr / "runs").mkdir()
    (usr / "runs" / "hosts").write_text("127.0.0.1 sn1\n")  # the SN's container name, in the workspace
    return usr


def run_probe(procs, certs, tmp_path, mapping: str) -> tuple[dict, str, Path, str]:
    root = f"/tmp/swarmlearn-test-{uuid.uuid4().hex[:8]}"
    try:
        sn = start_sn(procs, certs, tmp_path / "sn")
        usr = mnist_style_project(tmp_path, certs, mapping, root)
        swop = start_swop(procs, certs, sn, usr)
        result = run_swci(certs, sn, usr)
        assert result.returncode == 0, result.stdout + result.stderr + swop.output
        return json.loads((tmp_path / "seen.json").read_text()), swop.output, usr, root
    finally:
        subprocess.run(["rm", "-rf", root], check=False)  # mount points left on the host


@pytest.mark.slow
@pytest.mark.skipif(paths.namespace_refusal() is not None, reason=f"no mount namespace: {paths.namespace_refusal()}")
def test_an_mnist_style_task_sees_its_container_paths_through_bind_mounts(procs, certs, tmp_path):
    seen, log, usr, root = run_probe(procs, certs, tmp_path, "auto")

    assert "through bind mounts in a private mount namespace" in log
    assert seen["cwd"] == f"{root}/test" and seen["argv"] == [f"{root}/test/app-data"]
    assert seen["listing"] == ["a.csv"] and seen["relative"] == ["a.csv"]
    assert seen["env"]["DATA_DIR"] == "app-data"  # as the task wrote it: the mount makes it true
    assert_the_original_settings_arrived(seen, log, usr)


@pytest.mark.slow
def test_an_mnist_style_task_sees_its_container_paths_rewritten_without_a_namespace(procs, certs, tmp_path):
    seen, log, usr, _ = run_probe(procs, certs, tmp_path, "rewrite")

    private = str(tmp_path / "node1-data")
    assert "rewritten to this host's in their arguments and environment" in log
    assert seen["cwd"] == str(usr / "runs" / "swarm_probe_task" / "node1" / "workdir")
    assert seen["argv"] == [private] and seen["env"]["DATA_DIR"] == private
    assert seen["listing"] == ["a.csv"] and seen["relative"] == ["a.csv"]  # a link in the scratch WorkingDir
    assert_the_original_settings_arrived(seen, log, usr)


def assert_the_original_settings_arrived(seen: dict, log: str, usr: Path) -> None:
    # the build's environment: its pins shadow ours, in the ML only
    assert seen["protobuf"] == "3.15.6" and seen["python"] == str(usr / "runs" / "envs" / "user-env-pyt-swop")
    import google.protobuf
    assert google.protobuf.__version__ != "3.15.6"
    # profile envvars reach SL and ML; slenvvars the SL only; usrenvvars NODE_ID is the ML's own
    assert seen["sl_env"] == {"PROFILE_MARK": "from-profile", "SL_MARK": "sl-only"}
    assert seen["env"]["PROFILE_MARK"] == "from-profile"
    assert seen["env"]["NODE_ID"] == "n1" and seen["env"]["SWARM_NODE_ID"] == "node1"
    # names resolved and fields not used are said, once each
    assert "slhostip sl1 is 127.0.0.1" in log and "SN sn1 is 127.0.0.1" in log
    assert "apisrv.locator.service api-service" in log and "BuildContext sl-cli-lib not used" in log
    assert "usrenvvars NODE_ID=n1 is what its ML reads" in log
