"""Task environments: what a MAKE_USER_CONTAINER task builds instead of a container image, and what the
RUN_SWARM tasks that name that image (through their Prereq, the build task whose Outcome is the image
name) run their ML with. The SWOP's own environment is never installed into.

One environment is a virtual environment made by `uv` under the SWOP's workspace, `envs/<image>`:
- it has the SWOP's Python (same version, so the same wheels fit);
- the task's requirements are installed into it from wheels only (`uv pip install --no-build`: fast, and
  no package code runs on this host at build time; the profile's `buildfromsource` allows sdists);
- a `.pth` file appends the SWOP's own site-packages AFTER the environment's, so heavy packages the SWOP
  has (torch, numpy, our `swarmlearning` and `swarmlearn.callback`) are found there without a copy or a
  download, while the task's own pins (`protobuf==3.15.6`) come first and shadow ours in its ML process
  only. A pinned old numpy shadows the SWOP's too: the model code then gets the numpy it asked for.
  (uv's hard-linked cache would instead put a second torch into every environment's site-packages: free
  on disk, but a download the first time and an install every build; the .pth costs nothing.)

A build happens in `envs/<image>.building` and is renamed into place only when complete, with a marker
file written last: a half-built environment is removed, never used. A pin that cannot be installed on
this Python is reported with the closest version that can (`numpy==1.21.6` on 3.11 -> 1.23.2).
"""

from __future__ import annotations

import json
import hashlib
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from swarmlearn.errors import SwarmError

ENVS_DIR = "envs"
READY_MARKER = "swarmlearn-env.json"  # written last: an environment without it is not used
BASE_PTH = "_swarmlearn_swop_base.pth"
DRY_RUN_TIMEOUT = 120.0
# pip options of a taskdef -> uv's spelling (the rest are the same in both).
_UV_OPTIONS = {"--pre": "--prerelease=allow", "--trusted-host": "--allow-insecure-host"}
_INDEX_OPTIONS = {"-i", "--index-url", "--extra-index-url", "-f", "--find-links", "--trusted-host", "--pre"}
_VALUE_OPTIONS = {"-r", "--requirement", "-c", "--constraint", "-e", "--editable", "-i", "--index-url",
                  "--extra-index-url", "-f", "--find-links", "--trusted-host"}
_FILE_OPTIONS = {"-r", "--requirement", "-e", "--editable"}
_PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([A-Za-z0-9.+!_-]+)")

# Runs one command with its output appended to the build log; returns its exit code.
Runner = Callable[[list[str]], int]


class BuildFailed(SwarmError):
    """The environment could not be built; the message says what to change."""


@dataclass(frozen=True)
class TaskEnvironment:
    image: str
    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def ready(self) -> bool:
        return (self.root / READY_MARKER).is_file() and self.python.exists()


def environment_for(workspace: Path, image: str) -> TaskEnvironment:
    """Where the environment of image `image` lives: a folder named after it (characters a file name
    cannot hold replaced, with a short hash then, so that two images never share one)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", image).strip(".") or "image"
    if safe != image:
        safe += "-" + hashlib.sha256(image.encode()).hexdigest()[:8]
    return TaskEnvironment(image, Path(workspace) / ENVS_DIR / safe)


def uv_binary() -> str:
    try:
        from uv import find_uv_bin
        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found is None:
            raise BuildFailed("uv is not installed in the SWOP's environment; install it (pip install uv) to "
                              "build task environments") from None
        return found


def build(env: TaskEnvironment, pip_args: list[str], run: Runner, log: Path, *, from_source: bool = False,
          base_python: str = sys.executable) -> str:
    """Builds `env` with `pip_args` (a taskdef's pip install arguments) and returns one line saying what
    it holds; raises BuildFailed with the reason (for a pin: the closest version that installs) after
    removing what it had made."""
    started = time.monotonic()
    uv = uv_binary()
    building = env.root.with_name(env.root.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    try:
        # relocatable: its scripts find their Python wherever it lies, so that it can be renamed into place
        if run([uv, "venv", "--no-project", "--relocatable", "--quiet", "--python", base_python, str(building)]) != 0:
            raise BuildFailed(f"uv could not make a virtual environment for {env.image}:\n{_tail(log)}")
        site = _site_packages(building)
        (site / BASE_PTH).write_text(base_pth_line() + "\n")
        wanted, taken = without_swop_packages(pip_args)
        if _installs_something(wanted) and run([uv, "pip", "install", "--python", str(building / "bin" / "python"),
                                                *uv_install_args(wanted, from_source)]) != 0:
            raise BuildFailed(_install_failure(uv, building, wanted, from_source, log))
        (building / READY_MARKER).write_text(json.dumps(
            {"image": env.image, "requirements": pip_args, "python": sys.version.split()[0]}) + "\n")
        shutil.rmtree(env.root, ignore_errors=True)
        building.rename(env.root)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    what = f"installed {' '.join(wanted)}" if _installs_something(wanted) else "nothing to install"
    if taken:
        what += f"; from the SWOP's environment: {', '.join(taken)}"
    return (f"environment {env.image} built in {time.monotonic() - started:.1f} s at {env.root} ({what}; the "
            f"SWOP's packages follow its own)")


def without_swop_packages(pip_args: list[str]) -> tuple[list[str], list[str]]:
    """`pip_args` less the requirements that the SWOP's environment satisfies already (torch, numpy...:
    the environment finds them there, after its own), and "name version" of each left out."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import InvalidRequirement, Requirement

    kept: list[str] = []
    taken: list[str] = []
    for arg, is_requirement in _classified(pip_args):
        try:
            requirement = Requirement(arg) if is_requirement else None
            have = version(requirement.name) if requirement else None
        except (InvalidRequirement, PackageNotFoundError):
            have = None
        if have is not None and requirement.url is None and not requirement.extras \
                and requirement.specifier.contains(have, prereleases=True):
            taken.append(f"{requirement.name} {have}")
        else:
            kept.append(arg)
    return kept, taken


def _installs_something(args: list[str]) -> bool:
    """Whether the arguments name a requirement or a file of them (options alone install nothing)."""
    return any(is_requirement or arg.partition("=")[0] in _FILE_OPTIONS for arg, is_requirement in _classified(args))


def _classified(args: list[str]) -> list[tuple[str, bool]]:
    """Each pip argument with whether it is a requirement (not an option, nor an option's value)."""
    out: list[tuple[str, bool]] = []
    value_next = False
    for arg in args:
        out.append((arg, not value_next and not arg.startswith("-")))
        value_next = not value_next and arg in _VALUE_OPTIONS
    return out


def base_pth_line() -> str:
    """The .pth line that appends the SWOP's site-packages (with their own .pth files: an editable
    swarmlearn) and our package's folder after the environment's own."""
    import swarmlearn

    folders = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                             str(Path(swarmlearn.__file__).resolve().parent.parent)])
    return "import site; " + "; ".join(f"site.addsitedir({folder!r})" for folder in folders)


def uv_install_args(pip_args: list[str], from_source: bool) -> list[str]:
    args = [] if from_source else ["--no-build"]
    for arg in pip_args:
        option, eq, value = arg.partition("=")
        if option in _UV_OPTIONS:
            uv_option = _UV_OPTIONS[option]
            args.append(f"{uv_option}={value}" if eq and "=" not in uv_option else uv_option)
        else:
            args.append(arg)
    return args


def _install_failure(uv: str, venv: Path, pip_args: list[str], from_source: bool, log: Path) -> str:
    """Why the install failed: each pin that cannot install here with the closest one that can, else
    uv's own words."""
    python = str(venv / "bin" / "python")
    options, requirements = _index_options(pip_args)
    options = uv_install_args(options, from_source)
    version = ".".join(map(str, sys.version_info[:2]))
    pins = []
    for requirement in requirements:
        match = _PIN.fullmatch(requirement.strip())
        if match is None or _resolve(uv, python, options, requirement) is not None:
            continue
        name, extras, wanted = match.group(1), match.group(2) or "", match.group(3)
        above = _resolve(uv, python, [*options, "--resolution", "lowest-direct"], f"{name}{extras}>{wanted}")
        closest = above or _resolve(uv, python, options, f"{name}{extras}<{wanted}")
        pins.append(f"{requirement} cannot be installed on Python {version} here" + (
            f"; the closest version that can: {name}=={closest}" if closest else "; no version of it can"))
    if pins:
        return "; ".join(pins) + " (change the pin in the taskdef's BuildSteps)"
    reason = _uv_reason(_tail(log, 40))
    if "no usable wheels" in reason and not from_source:
        reason += ("\nthis SWOP installs wheels only; its operator can let it build from source "
                   "(`buildfromsource: true` in the profile)")
    return f"uv pip install {' '.join(pip_args)} failed:\n{reason}"


def _index_options(pip_args: list[str]) -> tuple[list[str], list[str]]:
    """(the options that choose where packages come from, the requirements named on the line); -r, -c
    and -e files are left out: a pin is tried on its own."""
    options: list[str] = []
    requirements: list[str] = []
    for i, (arg, is_requirement) in enumerate(_classified(pip_args)):
        if is_requirement:
            requirements.append(arg)
        elif arg.partition("=")[0] in _INDEX_OPTIONS:
            options += pip_args[i:i + 2] if arg in _VALUE_OPTIONS else [arg]
    return options, requirements


def _resolve(uv: str, python: str, options: list[str], requirement: str) -> str | None:
    """The version uv would install for `requirement` alone in the environment, None when none fits."""
    try:
        done = subprocess.run([uv, "pip", "install", "--dry-run", "--python", python, *options, requirement],
                              capture_output=True, text=True, timeout=DRY_RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        return None
    name = re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~;\s]", requirement, maxsplit=1)[0]).lower()
    for line in (done.stdout + done.stderr).splitlines():
        match = re.match(r"\s*[+~]\s*([A-Za-z0-9._-]+)==(\S+)", line)
        if match and re.sub(r"[-_.]+", "-", match.group(1)).lower() == name:
            return match.group(2)
    return "installed already"


def _uv_reason(text: str) -> str:
    """uv's error, cause and hint lines, without its progress chatter."""
    lines = [line for line in text.splitlines() if line.strip().startswith(("error", "cause", "hint", "×", "╰"))
             or line.startswith("  ")]
    return "\n".join(lines[-12:]) or text


def _site_packages(venv: Path) -> Path:
    found = list(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise BuildFailed(f"{venv} has no lib/python3*/site-packages; uv made something else than a venv")
    return found[0]


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_logged(log: Path, cwd: Path | None = None) -> Runner:
    """A Runner for callers without a process runtime (tests, tools): output appended to `log`."""
    def run(argv: list[str]) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            return subprocess.run(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  check=False).returncode
    return run
