"""A SWOP runs only what its operator allows: tasks signed by the identities its profile names, the
programs it lists, and paths inside its folders. Everything else is refused before any process
starts, and the task ends FAILED with the reason for SWCI to show."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import SWARM, start_sn
from swarmlearn.errors import ConfigError
from swarmlearn.pki import CertLayout, SwarmId, generate_host_certs
from swarmlearn.swop.policy import TaskPolicy, author_allowed, pip_refusal
from swarmlearn.swop.profile import load_profile
from test_swop_swci import make_project, start_swop

OURS = "spiffe://test/swci/swci-1"
FOREIGN = "spiffe://other/swci/swci-2"


def profile_file(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "swop_profile.yaml"
    path.write_text(f"groupname: local\n{extra}nodes:\n  - slnodedef:\n      idx: 0\n")
    return path


def policy_for(tmp_path: Path, extra: str = "") -> TaskPolicy:
    usr = tmp_path / "usr"
    (usr / "model").mkdir(parents=True, exist_ok=True)
    (usr / "data").mkdir(exist_ok=True)
    return TaskPolicy.for_swop(load_profile(profile_file(tmp_path, extra)), SwarmId("test", "swop", "swop-1"),
                               usr, usr / "runs")


def run_body(usr: Path, **changes) -> dict:
    body = {"Command": "model/model.py", "Entrypoint": "python3", "WorkingDir": "/platform/swarm/usr",
            "Envvars": {"MIN_PEERS": "2"}, "PrivateContent": "/platform/swarm/usr/data",
            "SharedContent": [{"Src": str(usr), "Tgt": "/platform/swarm/usr", "MType": "BIND"}]}
    body.update(changes)
    return body


def build_body(*requirements: str, steps: tuple[str, ...] = ("FROM python:3.11",)) -> dict:
    return {"BuildContext": None, "BuildType": "INLINE", "BuildSteps": list(steps), "Requirements": list(requirements)}


# --------------------------------------------------------------------------------------------------
# Who may give a SWOP work


def test_by_default_only_the_swops_own_organization_may_create_and_assign_tasks(tmp_path):
    policy = policy_for(tmp_path)
    usr = tmp_path / "usr"

    assert policy.refusal("RUN_SWARM", run_body(usr), OURS, OURS) is None
    assert policy.refusal("RUN_SWARM", run_body(usr), "spiffe://test/admin/admin-1", OURS) is None
    why = policy.refusal("RUN_SWARM", run_body(usr), FOREIGN, FOREIGN)
    assert "created by spiffe://other/swci/swci-2" in why and "taskauthors" in why
    # A task of ours assigned by a foreign SWCI is not ours to run either.
    assert "assigned by spiffe://other/swci/swci-2" in policy.refusal("RUN_SWARM", run_body(usr), OURS, FOREIGN)
    assert "does not know" in policy.refusal("RUN_SWARM", run_body(usr), None, OURS)
    # A SWOP or SL identity of our own organization is no task author.
    assert policy.refusal("PULL_IMAGE", {}, "spiffe://test/swop/swop-1", OURS) is not None


def test_a_wildcard_author_cannot_match_a_look_alike_organization_or_role():
    patterns = ["spiffe://test/swci/*"]

    assert author_allowed("spiffe://test/swci/anyone", patterns)
    assert not author_allowed("spiffe://test.evil/swci/x", patterns)
    assert not author_allowed("spiffe://testx/swci/x", patterns)
    assert not author_allowed("spiffe://test/swcix/x", patterns)
    assert not author_allowed("spiffe://test/swci/", patterns)
    assert not author_allowed("spiffe://test/swci/a/b", patterns)
    assert not author_allowed("spiffe://other/swci/test", patterns)
    assert author_allowed("spiffe://other/swci/swci-2", ["spiffe://other/swci/swci-2"])
    assert not author_allowed("spiffe://other/swci/swci-22", ["spiffe://other/swci/swci-2"])


def test_a_profile_can_name_foreign_authors_and_the_taskdefs_author_text_counts_for_nothing(tmp_path):
    policy = policy_for(tmp_path, "taskauthors: [spiffe://other/swci/swci-2]\n")
    usr = tmp_path / "usr"

    assert policy.refusal("RUN_SWARM", run_body(usr), FOREIGN, FOREIGN) is None
    assert policy.refusal("RUN_SWARM", run_body(usr), OURS, OURS) is not None  # the list replaces the default


def test_bad_policy_keys_name_their_line(tmp_path):
    path = profile_file(tmp_path, "taskauthors:\n  - spiffe://test/swci/*\n  - spiffe://test/*/x\n"
                                  "entrypoints: [sh]\n")
    with pytest.raises(ConfigError) as caught:
        load_profile(path)

    lines = str(caught.value).splitlines()
    assert lines[0].startswith(f"{path}:4: taskauthors[1]: 'spiffe://test/*/x' is not a task author")
    assert lines[1].startswith(f"{path}:5: entrypoints[0]: 'sh': name a program by its absolute path")


# --------------------------------------------------------------------------------------------------
# What a task may run, and where


def test_a_shell_entrypoint_is_refused_unless_the_profile_lists_it(tmp_path):
    usr = tmp_path / "usr"
    shell = run_body(usr, Entrypoint="/bin/sh", Command="model/evil.sh")

    assert "Entrypoint /bin/sh is not a program this SWOP runs" in policy_for(tmp_path).refusal(
        "RUN_SWARM", shell, OURS, OURS)
    assert policy_for(tmp_path, "entrypoints: [/bin/sh]\n").refusal("RUN_SWARM", shell, OURS, OURS) is None
    # A program found on PATH by name would be whatever PATH holds: only absolute paths are listed.
    assert policy_for(tmp_path, "entrypoints: [/bin/sh]\n").refusal(
        "RUN_SWARM", run_body(usr, Entrypoint="sh"), OURS, OURS) is not None


def test_python_runs_a_script_of_the_project_not_code_given_inline(tmp_path):
    policy = policy_for(tmp_path)
    usr = tmp_path / "usr"

    assert "options such as -c" in policy.refusal(
        "RUN_SWARM", run_body(usr, Command="-c exec(bytes.fromhex('6f73'))"), OURS, OURS)
    assert "options such as -c" in policy.refusal("RUN_SWARM", run_body(usr, Command="-m pip install x"), OURS, OURS)
    assert "the script /tmp" in policy.refusal("RUN_SWARM", run_body(usr, Command="/tmp/x.py"), OURS, OURS)


def test_task_environment_cannot_change_what_python_loads(tmp_path):
    policy = policy_for(tmp_path)
    usr = tmp_path / "usr"

    for name in ("PYTHONPATH", "PYTHONWARNINGS", "LD_PRELOAD", "BROWSER", "PATH"):
        why = policy.refusal("RUN_SWARM", run_body(usr, Envvars={name: "x"}), OURS, OURS)
        assert f"Envvars may not set {name}" in why


def test_paths_that_climb_out_of_the_project_are_refused(tmp_path):
    policy = policy_for(tmp_path)
    usr = tmp_path / "usr"

    cases = {
        "WorkingDir": run_body(usr, WorkingDir="/platform/swarm/usr/../../../etc"),
        "PrivateContent": run_body(usr, PrivateContent="/platform/swarm/usr/data/../../.."),
        "SharedContent Src": run_body(usr, SharedContent=[{"Src": "/etc", "Tgt": "/platform/swarm/usr",
                                                           "MType": "BIND"}]),
        "Envvars DATA_DIR": run_body(usr, Envvars={"DATA_DIR": "/home"}),
        "the script": run_body(usr, Command="../../outside.py"),
    }
    for what, body in cases.items():
        why = policy.refusal("RUN_SWARM", body, OURS, OURS)
        assert why is not None and why.startswith(what) and "outside the folders" in why, (what, why)
    assert policy.refusal("RUN_SWARM", run_body(usr, WorkingDir=str(usr / "model" / "..")), OURS, OURS) is None


def test_a_symlink_out_of_the_project_is_refused(tmp_path):
    policy = policy_for(tmp_path)
    usr = tmp_path / "usr"
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (usr / "data" / "link").symlink_to(secrets)

    why = policy.refusal("RUN_SWARM", run_body(usr, PrivateContent="/platform/swarm/usr/data/link"), OURS, OURS)
    assert why.startswith("PrivateContent") and "outside the folders" in why
    assert not policy.confined(usr / "data" / "link" / "x")
    allowed = policy_for(tmp_path, f"allowedpaths: [{secrets}]\n")
    assert allowed.refusal("RUN_SWARM", run_body(usr, PrivateContent="/platform/swarm/usr/data/link"),
                           OURS, OURS) is None


# --------------------------------------------------------------------------------------------------
# Builds: pip runs code, so only plain requirements


def test_builds_install_plain_requirements_only(tmp_path):
    policy = policy_for(tmp_path)

    assert policy.refusal("MAKE_USER_CONTAINER", build_body("transformers", "peft>=0.12", "torch==2.3.0",
                                                            "accelerate[torch]>=0.3,<1; python_version>'3.8'"),
                          OURS, OURS) is None
    for bad in ("git+https://evil/x", "x @ https://evil/x.whl", "./local", "/tmp/pkg", "evil.whl", "pkg.tar.gz"):
        assert "not a plain requirement" in policy.refusal("MAKE_USER_CONTAINER", build_body(bad), OURS, OURS), bad
    steps = ("RUN pip install --index-url https://evil/simple torch",)
    assert "pip option --index-url is refused" in policy.refusal(
        "MAKE_USER_CONTAINER", build_body(steps=steps), OURS, OURS)
    assert "pip option -e" in pip_refusal(["-e", "."])
    assert pip_refusal(["--index-url", "https://download.pytorch.org/whl/cpu", "torch"], ["--index-url"]) is None
    assert pip_refusal(["--extra-index-url=https://x", "torch"], ["--extra-index-url"]) is None


def test_a_profile_can_refuse_every_build(tmp_path):
    policy = policy_for(tmp_path, "allowbuild: false\n")

    assert "allowbuild: false" in policy.refusal("MAKE_USER_CONTAINER", build_body("numpy"), OURS, OURS)
    assert policy.refusal("MAKE_USER_CONTAINER", build_body(), OURS, OURS) is None  # nothing to install


def test_the_flagship_example_is_allowed_with_the_default_policy(tmp_path):
    from swarmlearn.yamlfile import load_yaml

    example = Path(__file__).parents[1] / "examples" / "huggingface-peft"
    project = tmp_path / "usr"
    policy = policy_for(tmp_path)
    for name in ("build_hf_user_env", "run_hf_task"):
        text = (example / "swci" / "taskdefs" / f"{name}.yaml").read_text().replace("<PROJECT>", str(project))
        written = tmp_path / f"{name}.yaml"
        written.write_text(text)
        task = load_yaml(written)[0]
        body = dict(task["Body"])
        if "Envvars" in body:
            body["Envvars"] = {k: str(v) for e in body["Envvars"] for k, v in e.items()}
        assert policy.refusal(task["TaskType"], body, OURS, OURS) is None, name


# --------------------------------------------------------------------------------------------------
# End to end: an SN, a SWOP and a SWCI script, as a user runs them

RUN_TASK = """\
Name: run_task
TaskType: RUN_SWARM
Author: {author}
Prereq: ROOTTASK
Outcome: user-env
Body:
    Command: {command}
    Entrypoint: {entrypoint}
    WorkingDir: /platform/swarm/usr
    Envvars: ["MIN_PEERS": 1]
    PrivateContent: /platform/swarm/usr/data
    SharedContent:
    -   Src: {usr}
        Tgt: /platform/swarm/usr
        MType: BIND
"""

INIT = """\
EXIT ON FAILURE
WAIT FOR IP 127.0.0.1
CREATE CONTEXT test WITH IP 127.0.0.1
SWITCH CONTEXT test
CREATE TASK FROM taskdefs/run_task.yaml
FINALIZE TASK run_task
ASSIGN TASK run_task TO defaulttaskbb.taskdb.sml.hpe WITH 1 PEERS
WAIT FOR TASKRUNNER defaulttaskbb.taskdb.sml.hpe
EXIT
"""


@pytest.fixture(scope="module")
def other_org(tmp_path_factory) -> CertLayout:
    """A second organization, "other", with its own CA: admitted to the swarm, not trusted by the SWOP's profile."""
    root = tmp_path_factory.mktemp("other")
    generate_host_certs(root, 2, org="other", components=("swci",))
    return CertLayout(root, 2)


def swarm_of_two_orgs(procs, certs, other_org, tmp_path, **task):
    """A sentinel SN whose capath holds both CAs at genesis (so "other" may hold every role but admin),
    and a SWOP of organization "test" with the default policy, ready for `run_task`."""
    both = tmp_path / "capath-both"
    both.mkdir()
    for ca in (certs.ca_cert, other_org.ca_cert):
        shutil.copy(ca, both)
    sn = start_sn(procs, certs, tmp_path / "sn", "--capath", str(both))
    usr = make_project(tmp_path, certs)
    (usr / "swci" / "taskdefs").joinpath("run_task.yaml").write_text(RUN_TASK.format(usr=usr, **task))
    (usr / "swci" / "swci-init").write_text(INIT)
    swop = start_swop(procs, certs, sn, usr)
    return sn, usr, swop, both


def run_swci_as(layout: CertLayout, capath: Path, sn, usr: Path) -> subprocess.CompletedProcess:
    port = sn.address.rsplit(":", 1)[1]
    return subprocess.run([*SWARM, "swci", "--usr-dir", str(usr / "swci"), "--init-script-name", "swci-init",
                           "--key", str(layout.key("swci")), "--cert", str(layout.cert("swci")),
                           "--capath", str(capath), "--sn-api-port", port],
                          capture_output=True, text=True, timeout=60)


def assert_nothing_started(usr: Path, swop) -> None:
    runs = usr / "runs"
    assert not (runs / "run_task").exists() or not list((runs / "run_task").rglob("*.log")), swop.output
    assert not list((runs / "pids").glob("run_task-*")), swop.output
    assert "running 1 peers" not in swop.output


def test_swop_refuses_a_task_from_a_foreign_signer_without_starting_any_process(procs, certs, other_org, tmp_path):
    # The taskdef claims to be ours; only the certificate that signed it counts.
    sn, usr, swop, both = swarm_of_two_orgs(procs, certs, other_org, tmp_path, author="swci-1",
                                            command="model/model.py", entrypoint="python3")

    result = run_swci_as(other_org, both, sn, usr)

    assert result.returncode != 0, result.stdout + result.stderr + swop.output
    assert "run_task on defaulttaskbb.taskdb.sml.hpe FAILED" in result.stdout, result.stdout
    assert "swop-1 refuses task run_task: it was created by spiffe://other/swci/swci-2" in result.stdout
    swop.wait_for_line("refuses task run_task")
    assert_nothing_started(usr, swop)


def test_swop_refuses_a_shell_entrypoint_from_its_own_swci_without_starting_any_process(procs, certs, other_org,
                                                                                       tmp_path):
    marker = tmp_path / "owned"
    sn, usr, swop, both = swarm_of_two_orgs(procs, certs, other_org, tmp_path, author="demo",
                                            command="model/evil.sh", entrypoint="/bin/sh")
    (usr / "model" / "evil.sh").write_text(f"touch {marker}\n")

    result = run_swci_as(certs, certs.capath, sn, usr)

    assert result.returncode != 0, result.stdout + result.stderr + swop.output
    assert "swop-1 refuses task run_task: Entrypoint /bin/sh is not a program this SWOP runs" in result.stdout
    swop.wait_for_line("refuses task run_task")
    assert_nothing_started(usr, swop)
    assert not marker.exists()


def test_a_node_keeps_its_private_data_whatever_the_swops_shell_exports():
    from swarmlearn.swop.operator import ml_environment

    env = ml_environment({"DATA_DIR": "/swop/shell/data", "HOME": "/root", "SWARM_SL_TOKEN": "another-sls"},
                         defaults={"DATA_DIR": "/node1/private", "MODEL_DIR": "/runs/models"},
                         layers=[{"A": "profile"}, {"A": "task", "MODEL_DIR": "/task/models"},
                                 {"A": "node", "SWARM_SL_TOKEN": "forged"}],
                         fixed={"NODE_ID": "node1", "SWARM_SL_ADDR": "unix:/x"})
    assert env["DATA_DIR"] == "/node1/private" and env["MODEL_DIR"] == "/task/models" and env["A"] == "node"
    assert env["HOME"] == "/root" and env["NODE_ID"] == "node1" and "SWARM_SL_TOKEN" not in env


def test_a_command_with_quoted_arguments_is_split_as_a_shell_would(tmp_path):
    from swarmlearn.swop.policy import TaskPolicy

    (tmp_path / "model.py").write_text("")
    policy = TaskPolicy(("spiffe://test/swci/*",), ("python3",), (tmp_path,), True, (), tmp_path)
    body = {"Command": 'model.py --note "two words"', "Entrypoint": "python3", "WorkingDir": str(tmp_path),
            "Envvars": None, "PrivateContent": None, "SharedContent": None}
    assert policy.refusal("RUN_SWARM", body, "spiffe://test/swci/swci-1", "spiffe://test/swci/swci-1") is None
    unbalanced = {**body, "Command": 'model.py --note "two words'}
    assert "cannot be split into arguments" in policy.refusal("RUN_SWARM", unbalanced, "spiffe://test/swci/swci-1",
                                                              "spiffe://test/swci/swci-1")


def test_a_container_working_dir_is_allowed_and_what_it_leads_to_is_still_checked(tmp_path):
    policy = policy_for(tmp_path)
    usr = tmp_path / "usr"
    root = f"/tmp/swarmlearn-absent-{tmp_path.name}"  # the original's /tmp/test: no folder of this host
    body = run_body(usr, WorkingDir=f"{root}/test", PrivateContent=f"{root}/test/app-data",
                    Envvars={"DATA_DIR": "app-data", "MODEL_DIR": "model"},
                    SharedContent=[{"Src": str(usr / "model"), "Tgt": f"{root}/test/model", "MType": "BIND"}])
    assert policy.refusal("RUN_SWARM", body, OURS, OURS) is None
    why = policy.refusal("RUN_SWARM", {**body, "Command": "../../../etc/model.py"}, OURS, OURS)
    assert why.startswith("the script /etc/model.py lies outside the folders")
    why = policy.refusal("RUN_SWARM", {**body, "Envvars": {"DATA_DIR": "model/../../../../home"}}, OURS, OURS)
    assert why.startswith("Envvars DATA_DIR /home lies outside the folders")
