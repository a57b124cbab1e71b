"""The taskdef YAML that SWCI's `CREATE TASK FROM <file>` reads, in HPE Swarm Learning's shape.

    Name: run_hf_task              # top level: all six keys required
    TaskType: RUN_SWARM            # MAKE_USER_CONTAINER | RUN_SWARM | PULL_IMAGE | MAKE_SWARM_USER_CONTENT
    Author: demo
    Prereq: build_hf_user_image    # ROOTTASK or the name of an existing task
    Outcome: hf-user-env
    Body: {...}                    # keys depend on TaskType; see the *Body models

The original caps strings at 160 characters because it stores them on its chain; we need no cap.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, ValidatorFunctionWrapHandler, field_validator

from swarmlearn.yamlfile import EnvVars, YamlModel, validate

TaskType = Literal["MAKE_USER_CONTAINER", "RUN_SWARM", "PULL_IMAGE", "MAKE_SWARM_USER_CONTENT"]
MountType = Literal["BIND", "VOLUME"]


class SharedContent(YamlModel):
    """A folder every node's ML process sees: `Src` on this host, `Tgt` where the task's paths name it."""

    src: str = Field(alias="Src")
    tgt: str = Field(alias="Tgt")
    m_type: MountType = Field(alias="MType")


class RunSwarmBody(YamlModel):
    """RUN_SWARM: run `Entrypoint Command` in `WorkingDir` on every node. All six keys must be present,
    as in the original; those that may be `~` are typed `| None`."""

    command: str = Field(alias="Command")
    entrypoint: str | None = Field(alias="Entrypoint")
    working_dir: str | None = Field(alias="WorkingDir")
    envvars: EnvVars = Field(alias="Envvars")
    private_content: str | None = Field(alias="PrivateContent")
    shared_content: list[SharedContent] | None = Field(alias="SharedContent")


class MakeUserContainerBody(YamlModel):
    """MAKE_USER_CONTAINER: in the original, build the ML image. Here: check the Python environment and
    pip-install what the Dockerfile lines (and our `Requirements`) ask for."""

    build_context: str | None = Field(alias="BuildContext")
    build_type: Literal["INLINE"] = Field(alias="BuildType")
    build_steps: list[str] = Field(alias="BuildSteps")
    requirements: list[str] | None = Field(default=None, alias="Requirements")  # ours: pip requirement strings

    def pip_requirements(self) -> list[str]:
        """Everything to hand to `pip install`: the pip parts of BuildSteps, then Requirements."""
        return parse_build_steps(self.build_steps)[0] + list(self.requirements or [])


class PullImageBody(YamlModel):
    """PULL_IMAGE: processes need no image on this host; accepted so existing scripts run unchanged."""

    tag: str | None = Field(default=None, alias="Tag")
    repo_name: str | None = Field(default=None, alias="RepoName")
    org_and_reg: str | None = Field(default=None, alias="OrgAndReg")
    auth: Any = Field(default=None, alias="Auth")


class MakeSwarmUserContentBody(YamlModel):
    """MAKE_SWARM_USER_CONTENT: download/extract operations that prepare a node's user content."""

    content_type: str | None = Field(alias="ContentType")
    ops_list: list[dict[str, Any]] | None = Field(alias="OpsList")


BODIES: dict[str, type[YamlModel]] = {
    "RUN_SWARM": RunSwarmBody,
    "MAKE_USER_CONTAINER": MakeUserContainerBody,
    "PULL_IMAGE": PullImageBody,
    "MAKE_SWARM_USER_CONTENT": MakeSwarmUserContentBody,
}

_NOTES = {
    "PULL_IMAGE": "accepted as a no-op: processes need no image on this host",
    "MAKE_USER_CONTAINER": "runs as a Python environment check/pip install, not a container build",
}

Body = RunSwarmBody | MakeUserContainerBody | PullImageBody | MakeSwarmUserContentBody


class TaskDef(YamlModel):
    """One task as written in a taskdef file. `body` is the model for `task_type` (see BODIES)."""

    name: str = Field(alias="Name")
    task_type: TaskType = Field(alias="TaskType")
    author: str = Field(alias="Author")
    prereq: str = Field(alias="Prereq")
    outcome: str = Field(alias="Outcome")
    body: Body = Field(alias="Body")

    @field_validator("name", "prereq")
    @classmethod
    def _one_word(cls, value: str) -> str:
        # SWCI commands name tasks as one word: `FINALIZE TASK <name>`.
        if not value or re.search(r"\s", value):
            raise ValueError(f"must be one word (SWCI commands name tasks by it), got {value!r}")
        return value

    @field_validator("body", mode="wrap")
    @classmethod
    def _body_for_task_type(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        # The Body's keys depend on TaskType, which a plain union cannot see: pick the model here so the
        # errors are those of the body the user meant, at Body.<key>.
        task_type = info.data.get("task_type")
        if task_type is None:  # TaskType itself is wrong and has its own error; don't guess the body
            return value
        model = BODIES[task_type]
        return value if isinstance(value, model) else model.model_validate(value, context=info.context)

    def note(self) -> str | None:
        """One line for a task type we accept but only partly honour; None when we do all it asks."""
        return _NOTES.get(self.task_type)

    def to_ledger_payload(self) -> dict[str, Any]:
        """What `task_create` records: JSON-able, body keys as in the file, Envvars as {NAME: "text"}."""
        return {"name": self.name, "type": self.task_type, "author": self.author, "prereq": self.prereq,
                "outcome": self.outcome, "body": self.body.model_dump(mode="json", by_alias=True)}

    @classmethod
    def from_ledger_payload(cls, payload: dict[str, Any]) -> TaskDef:
        """The inverse of to_ledger_payload, for readers of the ledger that want the typed body."""
        return cls.model_validate({"Name": payload["name"], "TaskType": payload["type"],
                                   "Author": payload["author"], "Prereq": payload["prereq"],
                                   "Outcome": payload["outcome"], "Body": payload["body"]})


def load_taskdef(path: Path) -> TaskDef:
    """Read and validate a taskdef file; ConfigError (file:line: Key.Path: what; fix) when it is wrong."""
    return validate(TaskDef, path)


# --------------------------------------------------------------------------------------------------
# BuildSteps: Dockerfile lines -> pip arguments

# pip options worth keeping because they change what gets installed; each takes a value.
_PIP_KEEP_WITH_VALUE = {"-r", "--requirement", "-c", "--constraint", "-e", "--editable", "-i", "--index-url",
                        "--extra-index-url", "-f", "--find-links", "--trusted-host"}
_PIP_KEEP_FLAGS = {"--pre"}
# pip options that take a value but only matter inside an image being built (where files go, caches).
_PIP_DROP_WITH_VALUE = {"-t", "--target", "--prefix", "--root", "--cache-dir", "--src", "--progress-bar",
                        "--timeout", "--retries", "--proxy", "--platform", "--python-version",
                        "--implementation", "--abi", "--only-binary", "--no-binary", "--upgrade-strategy",
                        "--log"}
_PIP = re.compile(r"^(?:pip3?(?:\.\d+)?|python3?(?:\.\d+)?\s+-m\s+pip)\s+install\b\s*(.*)$", re.S)
_SEPARATORS = {"&&", ";", "||"}


def parse_build_steps(lines: list[str]) -> tuple[list[str], list[str]]:
    """Split a MAKE_USER_CONTAINER's Dockerfile lines into (pip install arguments, lines we ignore).

    Lines ending in a backslash continue on the next list item, as in a Dockerfile. Every `pip install`
    / `pip3 install` / `python -m pip install` inside a RUN contributes its requirements (and the options
    that choose what is installed: -r, -c, -e, index URLs, --pre); the other commands of that RUN, and
    FROM, COPY, ENV... come back as ignored lines. Requirements naming the original's client wheel
    (swarmlearning-client*.whl) are ignored too: swarmlearn is the client here.
    """
    pip_args: list[str] = []
    ignored: list[str] = []
    for line in _join_continuations(lines):
        instruction, _, rest = line.partition(" ")
        if instruction.upper() != "RUN":
            ignored.append(line)
            continue
        for command in _shell_commands(rest):
            match = _PIP.match(command)
            if match is None:
                ignored.append(f"RUN {command}")
                continue
            args, dropped = _pip_install_args(match.group(1))
            pip_args += args
            if dropped:
                ignored.append(f"RUN pip install {shlex.join(dropped)}")
    return pip_args, ignored


def _join_continuations(lines: list[str]) -> list[str]:
    joined: list[str] = []
    pending = ""
    for raw in lines:
        text = str(raw).strip()
        if text.endswith("\\"):
            pending += text[:-1].strip() + " "
            continue
        text = (pending + text).strip()
        pending = ""
        if text and not text.startswith("#"):
            joined.append(text)
    if pending.strip():
        joined.append(pending.strip())
    return joined


def _shell_commands(script: str) -> list[str]:
    """`a && b; c` -> ["a", "b", "c"], respecting quotes (a requirement may be 'torch>=2')."""
    try:
        tokens = shlex.split(script)
    except ValueError:  # unbalanced quotes: keep the whole thing as one command, unparsed
        return [script.strip()]
    commands: list[list[str]] = [[]]
    for token in tokens:
        ends = token.endswith(";") and token != ";"
        token = token[:-1] if ends else token
        if token in _SEPARATORS:
            commands.append([])
            continue
        commands[-1].append(token)
        if ends:
            commands.append([])
    return [shlex.join(c) for c in commands if c]


def _pip_install_args(text: str) -> tuple[list[str], list[str]]:
    """Arguments of one `pip install` -> (kept, dropped)."""
    tokens = shlex.split(text)
    kept: list[str] = []
    dropped: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        option, eq, _ = token.partition("=")
        if token.startswith("-") and option in _PIP_KEEP_WITH_VALUE | _PIP_DROP_WITH_VALUE:
            group = [token] if eq else tokens[i:i + 2]
            (kept if option in _PIP_KEEP_WITH_VALUE else dropped).extend(group)
            i += len(group)
            continue
        if token.startswith("-"):
            (kept if token in _PIP_KEEP_FLAGS else dropped).append(token)
        elif Path(token).name.lower().startswith("swarmlearning"):
            dropped.append(token)
        else:
            kept.append(token)
        i += 1
    return kept, dropped
