"""What a SWOP agrees to run on its host: its operator's rules from the profile (`taskauthors`,
`entrypoints`, `allowedpaths`, `allowbuild`, `pipoptions`; see swop/profile.py), checked against a task
before any of its processes starts. Pure: no process, no network; paths are resolved on this host
(symlinks followed) so that `../` and links cannot lead out of the allowed folders.

A task is refused unless
- the identities in the certificates that created and assigned it (read from the ledger, never the
  taskdef's free-text `Author`) match `taskauthors`;
- for RUN_SWARM: its Entrypoint is an allowed program; with Python, Command starts with a script (no
  `-c`/`-m` options) inside the allowed folders; WorkingDir, PrivateContent, each SharedContent Src and
  the DATA_DIR/MODEL_DIR it sets lie inside them, once each node's mount table (swop/paths.py: the
  usr-dir, SharedContent, privatedata, a scratch WorkingDir for a container-only one) has mapped the
  task's container paths to this host; and its
  Envvars set nothing that changes what a program loads or runs (LD_*, PYTHON*, PATH, BROWSER...);
- for MAKE_USER_CONTAINER: `allowbuild` is on and every pip argument is a plain requirement
  (`name[extra]>=1.0; marker`): no URL, path or archive, and no option unless `pipoptions` lists it.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from swarmlearn import pki
from swarmlearn.swop.profile import PYTHON_NAME

# Entrypoints the operator runs as its own interpreter (sys.executable).
PYTHON_NAMES = {"python", "python3", f"python3.{sys.version_info.minor}"}

# Task Envvars that would change what a program loads or runs, whatever its Entrypoint.
_ENV_DENIED = re.compile(r"LD_.*|DYLD_.*|PYTHON.*|PATH|BROWSER|BASH_ENV|ENV|SHELLOPTS|PERL5.*|NODE_OPTIONS|"
                         r"SWARM_SL_.*", re.IGNORECASE)
# Task Envvars that name folders the examples read or write.
_PATH_VARS = ("DATA_DIR", "MODEL_DIR")

_SPEC = r"(?:===|==|~=|!=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+"
_REQUIREMENT = re.compile(rf"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?(?:\[[A-Za-z0-9._,\s-]*\])?"
                          rf"\s*(?:{_SPEC}(?:\s*,\s*{_SPEC})*)?\s*(?:;[A-Za-z0-9_.<>=!~'\" ()]*)?")
# pip installs a requirement that ends so from a local file.
_ARCHIVES = (".whl", ".zip", ".tar", ".tgz", ".tbz", ".tbz2", ".txz", ".tlz", ".tar.gz", ".tar.bz2", ".tar.xz",
             ".tar.lz", ".tar.lzma")


def default_authors(own: pki.SwarmId | None) -> list[str]:
    """Without `taskauthors`: the SWCI and admin identities of the SWOP's own organization."""
    return [f"spiffe://{own.org}/swci/*", f"spiffe://{own.org}/admin/*"] if own else []


def author_allowed(spiffe_id: str, patterns: Iterable[str]) -> bool:
    """Whether `spiffe_id` is one of `patterns`; `spiffe://org/role/*` stands for any name of that org and
    role, and for nothing else (the `/` before `*` keeps an org or role from matching a longer one)."""
    for pattern in patterns:
        if pattern.endswith("/*"):
            prefix = pattern[:-1]
            name = spiffe_id[len(prefix):]
            if spiffe_id.startswith(prefix) and name and "/" not in name:
                return True
        elif spiffe_id == pattern:
            return True
    return False


@dataclass(frozen=True)
class TaskPolicy:
    authors: tuple[str, ...]
    entrypoints: tuple[str, ...]  # python names (the SWOP's own Python) and absolute paths
    folders: tuple[Path, ...]  # resolved
    allow_build: bool = True
    pip_options: tuple[str, ...] = ()
    usr_dir: Path | None = None  # a RUN_SWARM task without WorkingDir runs here
    workspace: Path | None = None  # where a node's scratch WorkingDir is made
    private_sources: tuple[str | None, ...] = (None,)  # each node's privatedata src (None: it has none)

    @classmethod
    def for_swop(cls, profile, own: pki.SwarmId | None, usr_dir: Path, workspace: Path) -> TaskPolicy:
        """The policy a profile states for a SWOP of identity `own`, serving --usr-dir `usr_dir`."""
        usr_dir = Path(usr_dir)
        folders = [usr_dir, Path(workspace), *(usr_dir / Path(f).expanduser() for f in profile.allowedpaths),
                   *(Path(n.privatedata.src) for n in profile.slnodedefs if n.privatedata and n.privatedata.src)]
        authors = profile.taskauthors if profile.taskauthors is not None else default_authors(own)
        entrypoints = profile.entrypoints if profile.entrypoints is not None else ["python3"]
        real = list(dict.fromkeys(f.resolve() for f in folders))
        outermost = [f for f in real if not any(f != g and f.is_relative_to(g) for g in real)]
        private = tuple(dict.fromkeys(n.privatedata.src if n.privatedata else None for n in profile.slnodedefs))
        return cls(tuple(authors), tuple(entrypoints), tuple(outermost),
                   profile.allowbuild, tuple(profile.pipoptions), usr_dir, Path(workspace), private or (None,))

    def describe(self) -> str:
        """One line for the SWOP's log."""
        build = f"builds {'allowed' if self.allow_build else 'refused'}" + (
            f" (pip options {', '.join(self.pip_options)})" if self.pip_options else "")
        return (f"tasks accepted from {', '.join(self.authors) or 'nobody'}; entrypoints "
                f"{', '.join(self.entrypoints) or 'none'}; paths inside {', '.join(map(str, self.folders))}; {build}")

    # ------------------------------------------------------------------------------ the decision

    def refusal(self, task_type: str, body: Any, created_by: str | None, assigned_by: str | None) -> str | None:
        """Why this SWOP refuses the task, or None when it may run it. `created_by`/`assigned_by` are the
        SPIFFE ids of the certificates that signed its creation and assignment (None: not a known node)."""
        for what, who in (("created", created_by), ("assigned", assigned_by)):
            if who is None:
                return f"it was {what} by a node this swarm does not know"
            if not author_allowed(who, self.authors):
                return (f"it was {what} by {who}, who is not among this SWOP's task authors "
                        f"({', '.join(self.authors) or 'none'}); its operator can add it to `taskauthors`")
        if task_type == "RUN_SWARM":
            return self._run_refusal(body)
        if task_type == "MAKE_USER_CONTAINER":
            return self._build_refusal(body)
        return None

    def _run_refusal(self, raw: Any) -> str | None:
        from swarmlearn.swci.taskdef import RunSwarmBody

        body = _parsed_body(RunSwarmBody, raw)
        if isinstance(body, str):
            return f"its Body is not a RUN_SWARM body ({body})"
        entry = body.entrypoint or "python3"
        python = entry in PYTHON_NAMES
        allowed = any(PYTHON_NAME.fullmatch(e) for e in self.entrypoints) if python else entry in self.entrypoints
        if not allowed:
            return (f"Entrypoint {entry} is not a program this SWOP runs ({', '.join(self.entrypoints) or 'none'}); "
                    f"its operator can list it in `entrypoints`")
        denied = sorted(name for name in body.envvars if _ENV_DENIED.fullmatch(name))
        if denied:
            return f"Envvars may not set {', '.join(denied)}: they change what a program loads or runs"
        for private in self.private_sources:  # each node maps PrivateContent to its own privatedata
            why = self._paths_refusal(raw, body, python, private)
            if why is not None:
                return why
        return None

    def _paths_refusal(self, raw: dict, body, python: bool, private: str | None) -> str | None:
        from swarmlearn.swop.paths import mount_table

        try:
            table = mount_table(raw, usr_dir=self.usr_dir or Path.cwd(), private_src=private,
                                scratch=(self.workspace or self.usr_dir or Path.cwd()) / "workdir",
                                confined=self.confined)
        except ValueError as exc:
            return str(exc)

        def on_host(path: str) -> Path:
            return Path(table.host_path(table.container_path(path)))

        paths = [(f"SharedContent Src {s.src}", Path(s.src)) for s in body.shared_content or []]
        paths.append(("WorkingDir", Path(table.host_workdir())))
        if body.private_content:
            paths.append(("PrivateContent", on_host(body.private_content)))
        paths += [(f"Envvars {name}", on_host(body.envvars[name])) for name in _PATH_VARS if body.envvars.get(name)]
        if python:
            try:
                words = shlex.split(body.command)  # as the operator will split it
            except ValueError as exc:
                return f"Command {body.command!r} cannot be split into arguments ({exc})"
            if not words or words[0].startswith("-"):
                return ("Command must start with the script Python runs (options such as -c or -m are refused), "
                        f"got {body.command!r}")
            paths.append(("the script", on_host(words[0])))
        for what, path in paths:
            if not self.confined(path):
                return (f"{what} {path} lies outside the folders this SWOP allows "
                        f"({', '.join(map(str, self.folders))}); its operator can add one to `allowedpaths`")
        return None

    def _build_refusal(self, raw: Any) -> str | None:
        from swarmlearn.swci.taskdef import MakeUserContainerBody

        body = _parsed_body(MakeUserContainerBody, raw)
        if isinstance(body, str):
            return f"its Body is not a MAKE_USER_CONTAINER body ({body})"
        args = body.pip_requirements()
        if args and not self.allow_build:
            return "this SWOP installs nothing (`allowbuild: false` in its profile); its environment is as it is"
        return pip_refusal(args, self.pip_options)

    def confined(self, path: Path) -> bool:
        """Whether `path`, with `..` and symlinks resolved, lies inside one of the allowed folders."""
        real = Path(path).resolve()
        return any(real.is_relative_to(folder) for folder in self.folders)



def pip_refusal(args: list[str], allowed_options: Iterable[str] = ()) -> str | None:
    """Why these `pip install` arguments are refused: anything but a plain requirement specifier, unless
    it is an option (and its value) the profile's `pipoptions` allows."""
    from swarmlearn.swci.taskdef import _PIP_DROP_WITH_VALUE, _PIP_KEEP_WITH_VALUE

    allowed_options = set(allowed_options)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            option, eq, _ = arg.partition("=")
            if option not in allowed_options:
                return (f"pip option {option} is refused: a build installs plain requirements only; its "
                        f"operator can allow the option in `pipoptions`")
            takes_value = option in _PIP_KEEP_WITH_VALUE | _PIP_DROP_WITH_VALUE
            i += 2 if takes_value and not eq else 1
            continue
        name = arg.split(";", 1)[0].strip().lower()
        if not _REQUIREMENT.fullmatch(arg.strip()) or name.endswith(_ARCHIVES):
            return (f"{arg!r} is not a plain requirement (name, extras, version): URLs, paths and archives "
                    f"are refused")
        i += 1
    return None


def _parsed_body(model: type[BaseModel], raw: Any) -> BaseModel | str:
    """`raw` as a `model`, or what is wrong with it: how many problems and the first one."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err, count = exc.errors()[0], exc.error_count()
        return f"{count} problem{'s' * (count > 1)}, first {'.'.join(map(str, err['loc']))}: {err['msg']}"
