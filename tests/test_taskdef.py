"""Taskdef files as users bring them from HPE Swarm Learning, and the errors a wrong one gets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from swarmlearn.errors import ConfigError
from swarmlearn.swci.taskdef import (
    MakeSwarmUserContentBody,
    MakeUserContainerBody,
    PullImageBody,
    RunSwarmBody,
    TaskDef,
    load_taskdef,
    parse_build_steps,
)
from swarmlearn.yamlfile import env_list

# The run task of ../shared/FORMATS.md, verbatim.
RUN_TASK = """\
Name: run_hf_task
TaskType: RUN_SWARM
Author: demo
Prereq: build_hf_user_image
Outcome: hf-user-env
Body:
  Command: model/model.py
  Entrypoint: python3
  WorkingDir: <PROJECT>
  Envvars:
    - MAX_EPOCHS: 1
    - MIN_PEERS: 3
  PrivateContent: <PROJECT>/data
  SharedContent:
    - Src: <PROJECT>/model
      Tgt: <PROJECT>/model
      MType: BIND
"""

# The original's examples: a copyright banner, 4-space indents, flow-style Envvars.
MNIST_TASK = """\
######################################################################
# (C)Copyright 2021,2022 Hewlett Packard Enterprise Development LP
######################################################################
Name: swarm_mnist_task
TaskType: RUN_SWARM
Author: HPE-TEST
Prereq: user_env_tf_build_task
Outcome: swarm_mnist_task
Body:
    Command: model/mnist_tf.py
    Entrypoint: python3
    WorkingDir: /tmp/test
    Envvars: ["MODEL_DIR": model, "MAX_EPOCHS": 5, "MIN_PEERS": 2]
    PrivateContent: /tmp/test/
    SharedContent:
    -   Src: <PROJECT-MODEL>
        Tgt: /tmp/test/model
        MType: BIND
"""

BUILD_TASK = """\
Name: user_env_tf_build_task
TaskType: MAKE_USER_CONTAINER
Author: HPE-TEST
Prereq: ROOTTASK
Outcome: user-env-tf2.7.0-swop
Body:
    BuildContext: sl-cli-lib
    BuildType: INLINE
    BuildSteps:
    - FROM tensorflow/tensorflow:2.7.0
    - ' '
    - RUN pip3 install --upgrade pip && pip3 install \\
    - '   matplotlib opencv-python pandas protobuf==3.15.6 scikit-learn'
    - ' '
    - RUN mkdir -p /tmp/hpe-swarm-learning-lib
    - COPY swarmlearning-client-py3-none-manylinux_2_24_x86_64.whl /tmp/hpe-swarm-learning-lib/
    - RUN pip3 install /tmp/hpe-swarm-learning-lib/swarmlearning-client-py3-none-manylinux_2_24_x86_64.whl
"""


def write(tmp_path: Path, text: str, name: str = "task.yaml") -> Path:
    path = tmp_path / "taskdefs" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def problems(path: Path) -> list[str]:
    """The lines of the ConfigError that loading `path` raises; each must name the file first."""
    with pytest.raises(ConfigError) as caught:
        load_taskdef(path)
    lines = str(caught.value).splitlines()
    assert lines
    for line in lines:
        assert line.startswith(f"{path}:"), line
    return lines


# --------------------------------------------------------------------------------------------------
# Files that load


def test_the_formats_run_task_loads_and_goes_to_the_ledger_as_json(tmp_path):
    task = load_taskdef(write(tmp_path, RUN_TASK))

    assert (task.name, task.task_type, task.prereq, task.outcome) == \
        ("run_hf_task", "RUN_SWARM", "build_hf_user_image", "hf-user-env")
    assert isinstance(task.body, RunSwarmBody)
    assert task.body.envvars == {"MAX_EPOCHS": "1", "MIN_PEERS": "3"}
    assert task.note() is None

    payload = task.to_ledger_payload()
    assert json.loads(json.dumps(payload)) == payload
    assert payload == {
        "name": "run_hf_task", "type": "RUN_SWARM", "author": "demo", "prereq": "build_hf_user_image",
        "outcome": "hf-user-env",
        "body": {"Command": "model/model.py", "Entrypoint": "python3", "WorkingDir": "<PROJECT>",
                 "Envvars": {"MAX_EPOCHS": "1", "MIN_PEERS": "3"}, "PrivateContent": "<PROJECT>/data",
                 "SharedContent": [{"Src": "<PROJECT>/model", "Tgt": "<PROJECT>/model", "MType": "BIND"}]},
    }
    assert TaskDef.from_ledger_payload(payload) == task


def test_flow_style_envvars_as_in_the_originals_examples(tmp_path):
    task = load_taskdef(write(tmp_path, MNIST_TASK))

    assert task.body.envvars == {"MODEL_DIR": "model", "MAX_EPOCHS": "5", "MIN_PEERS": "2"}
    assert task.body.shared_content[0].src == "<PROJECT-MODEL>"


def test_tilde_envvars_and_shared_content(tmp_path):
    text = RUN_TASK.split("  Envvars:")[0] + "  Envvars: ~\n  PrivateContent: ~\n  SharedContent: ~\n"
    task = load_taskdef(write(tmp_path, text))

    assert task.body.envvars == {}
    assert task.body.shared_content is None
    assert task.to_ledger_payload()["body"]["Envvars"] == {}


def test_make_user_container_becomes_a_pip_install(tmp_path):
    task = load_taskdef(write(tmp_path, BUILD_TASK + "    Requirements: [peft>=0.12]\n"))

    assert isinstance(task.body, MakeUserContainerBody)
    assert task.note() == "runs as a Python environment check/pip install, not a container build"
    assert task.body.pip_requirements() == [
        "pip", "matplotlib", "opencv-python", "pandas", "protobuf==3.15.6", "scikit-learn", "peft>=0.12"]
    assert task.to_ledger_payload()["body"]["Requirements"] == ["peft>=0.12"]


def test_build_steps_keep_pip_requirements_and_return_the_rest():
    pip_args, ignored = parse_build_steps([
        "FROM tensorflow/tensorflow:2.7.0",
        " ",
        "RUN pip3 install --upgrade pip && pip3 install \\",
        "   matplotlib 'torch>=2' --extra-index-url https://download.pytorch.org/whl/cpu",
        "RUN apt-get update; python3 -m pip install --no-cache-dir -r requirements.txt",
        "run pip install /tmp/lib/swarmlearning-client-py3-none-manylinux_2_24_x86_64.whl",
        "ENV MODE=1",
    ])

    assert pip_args == ["pip", "matplotlib", "torch>=2", "--extra-index-url",
                        "https://download.pytorch.org/whl/cpu", "-r", "requirements.txt"]
    assert ignored == [
        "FROM tensorflow/tensorflow:2.7.0",
        "RUN pip install --upgrade",
        "RUN apt-get update",
        "RUN pip install --no-cache-dir",
        "RUN pip install /tmp/lib/swarmlearning-client-py3-none-manylinux_2_24_x86_64.whl",
        "ENV MODE=1",
    ]


def test_pull_image_is_accepted_as_a_no_op(tmp_path):
    text = """\
Name: pull_sl
TaskType: PULL_IMAGE
Author: demo
Prereq: ROOTTASK
Outcome: sl
Body:
  Tag: 2.2.0
  RepoName: sl
  OrgAndReg: hub.myenterpriselicense.hpe.com/hpe/swarm-learning
  Auth: ~
"""
    task = load_taskdef(write(tmp_path, text))

    assert isinstance(task.body, PullImageBody)
    assert task.body.tag == "2.2.0"
    assert task.note() == "accepted as a no-op: processes need no image on this host"


def test_make_swarm_user_content(tmp_path):
    text = """\
Name: get_data
TaskType: MAKE_SWARM_USER_CONTENT
Author: demo
Prereq: ROOTTASK
Outcome: data
Body:
  ContentType: USER_DATA
  OpsList:
    - Operation: DOWNLOAD
      Target: https://example.org/data.tgz
"""
    task = load_taskdef(write(tmp_path, text))

    assert isinstance(task.body, MakeSwarmUserContentBody)
    assert task.body.ops_list == [{"Operation": "DOWNLOAD", "Target": "https://example.org/data.tgz"}]
    assert task.note() is None


@pytest.mark.parametrize("value, expected", [
    (None, {}),
    ({"A": 1}, {"A": "1"}),
    ([{"A": True}, {"B": 0.5}, {"C": "x"}], {"A": "True", "B": "0.5", "C": "x"}),
    ([{"http_proxy": None}, {"B": "b"}], {"B": "b"}),  # `NAME: ~`: inherit this host's value
])
def test_env_list_normalizes_what_users_write(value, expected):
    assert env_list(value) == expected


@pytest.mark.parametrize("value, says", [
    ("A=1", 'as a list of "- NAME: value" lines or a mapping'),
    (["A=1"], 'write "- A: 1"'),
    ([{"A": 1}, {"A": 2}], "A is set twice"),
    ([{"A": [1, 2]}], "values must be text or numbers"),
    ([{"BAD NAME": 1}], "not a usable environment variable name"),
])
def test_env_list_rejects_what_it_cannot_read(value, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        env_list(value)


# --------------------------------------------------------------------------------------------------
# Files that don't


def test_unknown_key_names_line_key_path_and_allowed_keys(tmp_path):
    path = write(tmp_path, RUN_TASK.replace("  WorkingDir: <PROJECT>\n", "  WorkingDir: <PROJECT>\n  Volumes: x\n"))

    assert problems(path) == [
        f"{path}:10: Body.Volumes: unknown key; allowed keys here: Command, Entrypoint, WorkingDir, Envvars, "
        "PrivateContent, SharedContent"]


def test_a_misspelt_key_is_one_problem_not_two(tmp_path):
    path = write(tmp_path, RUN_TASK.replace("  Entrypoint:", "  EntryPoint:"))

    [line] = problems(path)
    assert line.startswith(f'{path}:8: Body.EntryPoint: unknown key; did you mean "Entrypoint"?')


def test_missing_required_key_names_it_and_the_mappings_line(tmp_path):
    path = write(tmp_path, RUN_TASK.replace("  PrivateContent: <PROJECT>/data\n", ""))

    assert problems(path) == [
        f'{path}:6: Body.PrivateContent: required key is missing; add "PrivateContent: ..." under Body']


def test_missing_top_level_key(tmp_path):
    path = write(tmp_path, RUN_TASK.replace("Author: demo\n", ""))

    assert problems(path) == [f'{path}:1: Author: required key is missing; add "Author: ..." at the top level']


def test_wrong_types_are_reported_where_they_are(tmp_path):
    text = RUN_TASK.replace("  Command: model/model.py", "  Command: [model/model.py]") \
        .replace("    - MIN_PEERS: 3", "    - MIN_PEERS: {min: 3}")
    path = write(tmp_path, text)

    assert problems(path) == [
        f'{path}:7: Body.Command: expected text, got a list; '
        'quote the value if it contains ": " or starts with [ or {',
        f'{path}:12: Body.Envvars[1].MIN_PEERS: values must be text or numbers, got a mapping; write '
        '"MIN_PEERS: value" (quote the value if it contains ": ")',
    ]


def test_flow_style_envvar_error_points_at_its_entry(tmp_path):
    path = write(tmp_path, MNIST_TASK.replace('"MAX_EPOCHS": 5', '"MAX_EPOCHS"'))

    [line] = problems(path)
    assert line.startswith(f"{path}:13: Body.Envvars[1]: ")


def test_body_must_be_a_mapping(tmp_path):
    path = write(tmp_path, RUN_TASK.split("Body:")[0] + "Body: model/model.py\n")

    [line] = problems(path)
    assert line.startswith(f"{path}:6: Body: expected a mapping with keys Command, Entrypoint,")
    assert line.endswith("got the text 'model/model.py'")


def test_bad_task_type_lists_the_valid_ones(tmp_path):
    path = write(tmp_path, RUN_TASK.replace("TaskType: RUN_SWARM", "TaskType: RUN_TASK"))

    assert problems(path) == [
        f"{path}:2: TaskType: must be 'MAKE_USER_CONTAINER', 'RUN_SWARM', 'PULL_IMAGE' or "
        "'MAKE_SWARM_USER_CONTENT', got the text 'RUN_TASK'"]


def test_bad_mount_type(tmp_path):
    path = write(tmp_path, RUN_TASK.replace("MType: BIND", "MType: bind"))

    assert problems(path) == [
        f"{path}:17: Body.SharedContent[0].MType: must be 'BIND' or 'VOLUME', got the text 'bind'"]


def test_several_problems_one_line_each_in_file_order(tmp_path):
    text = RUN_TASK.replace("Name: run_hf_task", "Name: run hf task").replace("MType: BIND", "MType: NFS") \
        .replace("TaskType: RUN_SWARM\n", "TaskType: RUN_SWARM\nColour: blue\n")
    path = write(tmp_path, text)

    found = problems(path)
    assert [line.split(":")[1] for line in found] == ["1", "3", "18"]
    assert "Name: must be one word" in found[0]
    assert "Colour: unknown key" in found[1]
    assert "Body.SharedContent[0].MType" in found[2]


def test_yaml_syntax_error_gives_line_and_column(tmp_path):
    path = write(tmp_path, RUN_TASK.replace("  Entrypoint: python3", "  Entrypoint: python3: -u"))

    assert problems(path) == [
        f'{path}:8:22: invalid YAML: mapping values are not allowed here; quote a value that contains ": ", '
        "or fix the indentation"]


def test_tabs_are_explained(tmp_path):
    path = write(tmp_path, RUN_TASK.replace("  Command:", "\tCommand:"))

    [line] = problems(path)
    assert line.startswith(f"{path}:7:1: invalid YAML:")
    assert "tabs" in line


def test_a_key_written_twice_is_an_error(tmp_path):
    path = write(tmp_path, RUN_TASK + "Author: someone\n")

    assert problems(path) == [
        f"{path}:18: Author: this key is written twice in one mapping (first on line 3); keep one"]


def test_missing_file(tmp_path):
    path = tmp_path / "taskdefs" / "nope.yaml"

    [line] = problems(path)
    assert line.startswith(f"{path}: no such file")


def test_empty_file(tmp_path):
    path = write(tmp_path, "# nothing yet\n")

    [line] = problems(path)
    assert line.startswith(f"{path}:1: expected a mapping with keys Name, TaskType, Author, Prereq, Outcome, Body")


def test_validate_data_already_read_still_names_lines(tmp_path):
    from swarmlearn.yamlfile import load_yaml, validate

    path = write(tmp_path, RUN_TASK.replace("Prereq: build_hf_user_image", "Prereq: [a, b]"))
    data, _ = load_yaml(path)

    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:4: Prereq: expected text, got a list"):
        validate(TaskDef, path, data)
