"""SWOP profiles as users bring them from HPE Swarm Learning, and the errors a wrong one gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarmlearn.errors import ConfigError
from swarmlearn.defaults import DEFAULT_TASKRUNNER, SL_FS_PORT as DEFAULT_SLPORT
from swarmlearn.swop.profile import load_profile

# In the original's style: a banner, spaces before colons, DOCKER, apls, `slport : ~`, identity
# attributes, `~` env values, flow-style usrenvvars, and container-only keys.
ORIGINAL = """\
######################################################################
# (C)Copyright 2022 Hewlett Packard Enterprise Development LP
######################################################################
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
        host : 172.1.1.1
        port : ~
apisrv :
    locator :
        host : 172.1.1.1
        port : ~
        service: api-service
envvars :
    - SL_LOG_LEVEL : INFO
    - http_proxy : ~
    - https_proxy : ~
nodes :
    - slnodedef :
        idx : 0
        identity :
            - attribute :
                aType : KEY
                mType : BIND
                src : "<PROJECT-CERTS>/sl-1-key.pem"
                tgt : "/swarm-cert/sl-1-key.pem"
                subPath : null
            - attribute :
                aType : CERT
                mType : BIND
                src : "<PROJECT-CERTS>"
                tgt : "/swarm-cert/sl-1-cert.pem"
                subPath : sl-1-cert.pem
            - attribute :
                aType : CAPATH
                mType : BIND
                src : "<PROJECT-CACERTS>"
                tgt : "/swarm-cert/capath"
                subPath : null
        slhostname : sl1
        slhostip   : sl1
        slport : ~
        slfsservice : ~
        sllabels : {app: swarm}
        slnetworkopts : ~
        usrhostname : user1
        usrlabels : ~
        usrnetworkopts : {ipv4: 172.1.1.9}
        privatedata :
            src: "<PROJECT>/app-data"
            mType : BIND
        slenvvars : null
        usrcontaineropts :
            - gpus : "device=0"
            - shm_size : 2g
        usrenvvars : [SCRATCH_DIR : "user1", NODE_ID: "n1"]
    - slnodedef :
        idx : 1
        slhostname : sl2
        slport : 0
        usrhostname : user2
        usrenvvars :
            - SCRATCH_DIR : user2
            - MAX_EPOCHS : 3
"""

MINIMAL = """\
groupname: local
nodes:
  - slnodedef:
      idx: 0
"""


def write(tmp_path: Path, text: str, name: str = "swop_profile.yaml") -> Path:
    path = tmp_path / "swop" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def problems(path: Path) -> list[str]:
    """The lines of the ConfigError that loading `path` raises; each must name the file first."""
    with pytest.raises(ConfigError) as caught:
        load_profile(path)
    lines = str(caught.value).splitlines()
    assert lines
    for line in lines:
        assert line.startswith(f"{path}:"), line
    return lines


# --------------------------------------------------------------------------------------------------
# Profiles that load


def test_a_profile_in_the_originals_style_loads(tmp_path):
    profile = load_profile(write(tmp_path, ORIGINAL))

    assert profile.groupname == "demo"
    assert profile.taskrunner == DEFAULT_TASKRUNNER
    assert profile.resourcemgr.mgrtype == "DOCKER"
    assert profile.envvars == {"SL_LOG_LEVEL": "INFO"}  # `http_proxy : ~`: inherited, not set to ""
    assert profile.apisrv.locator.host == "172.1.1.1"
    assert profile.sn_addresses(["127.0.0.1:30304"]) == ["172.1.1.1:30304"]

    first, second = profile.slnodedefs
    assert first.node_id == "user1"
    assert first.slport == DEFAULT_SLPORT
    assert first.slenvvars == {}
    assert first.usrenvvars == {"SCRATCH_DIR": "user1", "NODE_ID": "n1"}
    assert first.privatedata.src == "<PROJECT>/app-data"  # placeholders stay for `swarm run`
    assert first.identity_file("KEY") == Path("<PROJECT-CERTS>/sl-1-key.pem")
    assert first.identity_file("CERT") == Path("<PROJECT-CERTS>/sl-1-cert.pem")
    assert first.identity_file("CAPATH") == Path("<PROJECT-CACERTS>")
    assert first.identity_file("CACERT") is None
    assert first.gpu_devices() == "0"

    assert second.slport == 0  # the OS picks
    assert second.usrenvvars == {"SCRATCH_DIR": "user2", "MAX_EPOCHS": "3"}
    assert second.identity == []
    assert second.gpu_devices() is None


def test_notes_say_what_is_accepted_but_not_done(tmp_path):
    profile = load_profile(write(tmp_path, ORIGINAL))

    assert profile.notes() == [
        "resourcemgr DOCKER: no Docker engine is used; nodes run as local processes",
        "apls: there is no licence server; ignored",
        "network host-1-net: nodes share this host's network; ignored",
        "apisrv.locator.service api-service: a container service name; ignored, the SLs reach the SN at apisrv's "
        "host and port (~: the SWOP's own SN)",
        "container settings ignored (nodes are processes): sllabels, usrcontaineropts.shm_size, usrnetworkopts",
    ]


def test_a_minimal_profile_takes_the_defaults(tmp_path):
    profile = load_profile(write(tmp_path, MINIMAL))

    assert profile.resourcemgr.mgrtype == "PROCESS"
    assert profile.taskrunner == DEFAULT_TASKRUNNER
    assert profile.apisrv is None
    assert profile.sn_addresses(["127.0.0.1:30304", "127.0.0.2:30305"]) == ["127.0.0.1:30304", "127.0.0.2:30305"]
    assert profile.notes() == []
    [node] = profile.slnodedefs
    assert (node.node_id, node.slport, node.usrenvvars) == ("node0", DEFAULT_SLPORT, {})


@pytest.mark.parametrize("written, allowed", [("no", False), ("off", False), ("yes", True), ("false", False)])
def test_yes_no_on_off_are_text_in_yaml_1_2_but_still_answer_a_yes_no_key(tmp_path, written, allowed):
    text = f"allowbuild: {written}\nenvvars:\n  - VERBOSE: {written}\n" + MINIMAL
    profile = load_profile(write(tmp_path, text))

    assert profile.allowbuild is allowed
    assert profile.envvars == {"VERBOSE": "False" if written == "false" else written}  # as written, not "True"


@pytest.mark.parametrize("value, devices", [
    ('"device=0,1"', "0,1"),
    ("device=1", "1"),
    ("all", None),
    ("2", "0,1"),
    ("'\"device=0,2\"'", "0,2"),  # as typed for the docker CLI, inner quotes and all
])
def test_gpus_become_cuda_visible_devices(tmp_path, value, devices):
    text = MINIMAL + f"      usrcontaineropts:\n        gpus: {value}\n"
    [node] = load_profile(write(tmp_path, text)).slnodedefs

    assert node.gpu_devices() == devices


def test_node_names_fall_back_to_slhostname_then_idx(tmp_path):
    text = MINIMAL + "  - slnodedef:\n      idx: 1\n      slhostname: sl2\n"
    names = [n.node_id for n in load_profile(write(tmp_path, text)).slnodedefs]

    assert names == ["node0", "sl2"]


# --------------------------------------------------------------------------------------------------
# Profiles that don't


def test_duplicate_idx_names_both_lines(tmp_path):
    text = MINIMAL + "  - slnodedef:\n      idx: 0\n      usrhostname: other\n"
    path = write(tmp_path, text)

    assert problems(path) == [
        f"{path}:6: nodes[1].slnodedef.idx: idx 0 is also used by nodes[0] (line 4); give each node its own idx"]


def test_duplicate_node_names_name_both_lines(tmp_path):
    path = write(tmp_path, ORIGINAL.replace("usrhostname : user2", "usrhostname : user1"))

    assert problems(path) == [
        f"{path}:68: nodes[1].slnodedef.usrhostname: node name 'user1' is also used by nodes[0] (line 53); "
        "give each node its own usrhostname"]


def test_unknown_node_key_lists_the_allowed_ones(tmp_path):
    path = write(tmp_path, MINIMAL + "      slnetwork: x\n")

    [line] = problems(path)
    assert line.startswith(f'{path}:5: nodes[0].slnodedef.slnetwork: unknown key; did you mean "slnetworkopts"? '
                           "allowed keys here: idx, identity, ")
    assert line.endswith("usrcontaineropts, usrenvvars")


def test_missing_groupname_and_idx(tmp_path):
    path = write(tmp_path, MINIMAL.replace("groupname: local\n", "").replace("      idx: 0\n", "      slport: 1\n"))

    assert problems(path) == [
        f'{path}:1: groupname: required key is missing; add "groupname: ..." at the top level',
        f'{path}:2: nodes[0].slnodedef.idx: required key is missing; add "idx: ..." under nodes[0].slnodedef',
    ]


def test_wrong_types(tmp_path):
    path = write(tmp_path, MINIMAL.replace("idx: 0", "idx: first") + "      usrenvvars: SCRATCH_DIR=user1\n")

    assert problems(path) == [
        f"{path}:4: nodes[0].slnodedef.idx: expected a whole number, got the text 'first'",
        f'{path}:5: nodes[0].slnodedef.usrenvvars: expected environment variables as a list of "- NAME: value" '
        "lines or a mapping, got the text 'SCRATCH_DIR=user1'",
    ]


def test_bad_identity_attribute_type(tmp_path):
    path = write(tmp_path, ORIGINAL.replace("aType : CAPATH", "aType : CA"))

    assert problems(path) == [
        f"{path}:42: nodes[0].slnodedef.identity[2].attribute.aType: must be 'KEY', 'CERT', 'CAPATH', 'CACERT' "
        "or 'SPIFFE_SOCKETPATH', got the text 'CA'"]


def test_bad_resource_manager(tmp_path):
    path = write(tmp_path, ORIGINAL.replace("mgrtype    : DOCKER", "mgrtype    : K8S"))

    assert problems(path) == [f"{path}:8: resourcemgr.mgrtype: must be 'PROCESS' or 'DOCKER', got the text 'K8S'"]


def test_bad_gpus(tmp_path):
    path = write(tmp_path, MINIMAL + "      usrcontaineropts: {gpus: first}\n")

    [line] = problems(path)
    assert line.startswith(f'{path}:5: nodes[0].slnodedef.usrcontaineropts: gpus must be all, a count, or "device=0,1"')


def test_no_nodes(tmp_path):
    path = write(tmp_path, "groupname: local\nnodes: []\n")

    assert problems(path) == [f'{path}:2: nodes: the profile lists no nodes; add "- slnodedef:" entries']


def test_bad_yaml(tmp_path):
    path = write(tmp_path, MINIMAL + "  - slnodedef:\n    idx: 1\n   usrhostname: x\n")

    [line] = problems(path)
    assert line.startswith(f"{path}:7:4: invalid YAML:")


def test_missing_file(tmp_path):
    path = tmp_path / "swop" / "missing.yaml"

    [line] = problems(path)
    assert line.startswith(f"{path}: no such file")


def test_entries_without_their_one_key_get_one_line_each(tmp_path):
    text = """\
groupname: local
nodes:
  - idx: 0
  - slnodedef:
      idx: 1
      identity:
        - aType : KEY
          mType : BIND
          src : /certs/sl-1-key.pem
"""
    path = write(tmp_path, text)

    assert problems(path) == [
        f'{path}:3: nodes[0]: write this entry as "- slnodedef:" with its keys indented under it',
        f'{path}:7: nodes[1].slnodedef.identity[0]: write this entry as "- attribute:" with its keys indented under it',
    ]


SPIRE = """\
groupname: demo
apisrv: {locator: {host: ~, port: ~, service: ~}}
nodes:
    - slnodedef:
        idx: 0
        identity:
            - attribute: {aType: SPIFFE_SOCKETPATH, mType: BIND, src: /tmp/spire-agent/agent.sock,
                          tgt: /tmp/spire-agent/agent.sock}
        slhostname: sl-1
        usrhostname: ml-1
"""


def test_a_spire_socket_is_said_to_be_replaced_by_gen_cert_files(tmp_path):
    notes = load_profile(write(tmp_path, SPIRE)).notes()

    assert notes == ["node ml-1: identity SPIFFE_SOCKETPATH /tmp/spire-agent/agent.sock is not read; its SL uses "
                     "KEY/CERT/CAPATH files, else gen-cert's sl-ml-1-{key,cert}.pem beside the SWOP's certificate "
                     "and the SWOP's CA folder"]  # and `service: ~` says nothing


def test_how_paths_and_builds_are_handled_is_the_operators_choice(tmp_path):
    profile = load_profile(write(tmp_path, SPIRE + "pathmapping: rewrite\nbuildfromsource: true\n"))
    assert profile.pathmapping == "rewrite" and profile.buildfromsource is True
    assert load_profile(write(tmp_path, SPIRE)).pathmapping == "auto"
    (line,) = [e for e in problems(write(tmp_path, SPIRE + "pathmapping: docker\n")) if "pathmapping" in e]
    assert "'auto', 'mounts' or 'rewrite'" in line
