"""The original's launch scripts, `run-sn`, `run-sl`, `run-swop`, `run-swci` and `stop-swarm`, taking
its flags and running our `swarm sn/sl/swop/swci` as processes of this host.

Each flag of the original is translated (`--sn-api-port`), applied where a container's setting has a
meaning for a process (`-e NAME=VALUE` sets the variable, `--name` names the record `stop-swarm`
uses, `-d` runs it in the background), or accepted and named as ignored in one line with why
(`--network`, `-v`, `--apls-ip`...). A flag of our own `swarm` subcommand passes through as it is.

Every process started is recorded as RUN_DIR/<component>/pids/<name>.pid (swop/runtime.py's pid
files, which hold the process's start time so that a pid reused by another process is never
signalled); `stop-swarm` stops those, never anything found by name.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Where the records of processes started by run-* live (pid files, background logs, SN data).
HOME_ENV = "SWARMLEARN_HOME"
DETACHED_START = 15.0  # seconds a background start may take to record itself

DOCKER = "a container setting; here it runs as a process of this host"
LICENCE = "swarmlearn needs no licence server"
# Docker run options of every run-* script that take a value (-e and --name have a use here).
_DOCKER_VALUES = {"--hostname": DOCKER, "--network": "a Docker network; processes use the host's own",
                  "-l": DOCKER, "--label": DOCKER, "-p": "no container ports to publish; ports are the host's",
                  "--publish": "no container ports to publish; ports are the host's", "-u": DOCKER, "--user": DOCKER,
                  "-v": "no container to mount into; give host paths", "--volume": "no container to mount into; give host paths",
                  "-w": DOCKER, "--workdir": DOCKER, "--dns": DOCKER,
                  "--apls-ip": LICENCE, "--apls-port": LICENCE, "--primary-apls-ip": LICENCE,
                  "--secondary-apls-ip": LICENCE, "--primary-apls-port": LICENCE, "--secondary-apls-port": LICENCE,
                  "--apls-pdf": LICENCE}
_DOCKER_SWITCHES = {"--pull": "no image to pull", "--sudo": "no Docker to run as root",
                    "-i": DOCKER, "--interactive": DOCKER, "-t": DOCKER, "--tty": DOCKER, "-it": DOCKER, "-ti": DOCKER,
                    "--rm": "there is no container to remove", "--privileged": DOCKER}
_REFUSED = {"--socket-path": "SPIFFE's Workload API is not supported; give --key/--cert/--capath from `swarm gen-cert`",
            "-serverAddress": "SPIRE agents are not supported; give --key/--cert/--capath from `swarm gen-cert`",
            "-config": "SPIRE agents are not supported; give --key/--cert/--capath from `swarm gen-cert`",
            "-genJoinToken": "SPIRE agents are not supported; give --key/--cert/--capath from `swarm gen-cert`"}
_IDENTITY = {"--key": "--key", "--cert": "--cert", "--capath": "--capath", "--cacert": "--capath"}
_ML = "the ML program is not a container here: run it with the SWARM_SL_ADDR this SL prints (or let a SWOP start it)"


@dataclass(frozen=True)
class Component:
    """How one run-* script maps onto `swarm <command>`."""

    script: str
    command: str
    renamed: dict[str, str]                        # original flag with a value -> ours
    ignored: dict[str, str] = field(default_factory=dict)  # original flag with a value -> why ignored
    switches: dict[str, str] = field(default_factory=dict)  # original flag without a value -> ours
    ignored_switches: dict[str, str] = field(default_factory=dict)


COMPONENTS = {c.script: c for c in [
    Component("run-sn", "sn", {**_IDENTITY, "--host-ip": "--host-ip", "--sn-api-port": "--sn-api-port",
                               "--sentinel-ip": "--sentinel-ip", "--sn-p2p-port": "--sn-p2p-port"},
              ignored={"--sn-fs-port": "an SN serves no files (SLs serve their tensors on --sl-fs-port)"},
              switches={"--sentinel": "--sentinel"}),
    Component("run-sl", "sl", {**_IDENTITY, "--host-ip": "--host-ip", "--sn-ip": "--sn-ip",
                               "--sn-api-port": "--sn-api-port", "--sl-fs-port": "--sl-fs-port",
                               "--sn-api-service": "--sn-ip"},
              ignored={"--sn-docker-name": "names the SN's container; --sn-ip names the SN",
                       "--sl-fs-service": "no reverse proxy: other SLs reach this one at --host-ip:--sl-fs-port",
                       **{f: DOCKER for f in ("--device", "--ipc", "--shm-size", "--group-add", "--cap-add",
                                              "--security-opt")},
                       **{f: _ML for f in ("--ml-image", "--ml-entrypoint", "--ml-cmd", "--ml-w", "--ml-name",
                                           "--ml-v", "--ml-e", "--ml-user", "--ml-device", "--ml-ipc", "--ml-shm-size",
                                           "--ml-group-add", "--ml-cap-add", "--ml-security-opt")}},
              ignored_switches={"--ml-privileged": _ML, "--ml-it": _ML}),
    # --sn-api-service (the reverse-proxy example's host[:port] of the SN): no proxy here, the SN itself.
    Component("run-swop", "swop", {**_IDENTITY, "--usr-dir": "--usr-dir", "--profile-file-name": "--profile-file-name",
                                   "--sn-ip": "--sn-ip", "--sn-api-port": "--sn-api-port",
                                   "--sn-api-service": "--sn-ip"}),
    Component("run-swci", "swci", {**_IDENTITY, "--usr-dir": "--usr-dir", "--init-script-name": "--init-script-name",
                                   "--sn-ip": "--sn-ip", "--sn-api-port": "--sn-api-port",
                                   "--sn-api-service": "--sn-ip"}),
]}


class CompatError(Exception):
    """A flag we cannot honour or do not know: the message says which and what to do."""


@dataclass
class Launch:
    """What a run-* command line asks for, in our terms."""

    component: Component
    args: list[str]                       # for `swarm <command>`
    env: dict[str, str]                   # -e NAME=VALUE
    name: str                             # --name, else the component's command
    detach: bool
    ignored: list[str]                    # "--network host-1-net (why)"


def run_dir() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".swarmlearn") / "run"


def translate(script: str, argv: list[str]) -> Launch:
    """The original's flags of `script` as a Launch; CompatError for a refused or unknown flag."""
    component = COMPONENTS[script]
    ours = _our_options(component.command)
    launch = Launch(component, [], {}, component.command, False, [])
    rest = list(argv)
    while rest:
        flag, value, rest = _next_flag(rest, component, ours)
        _apply(launch, flag, value, ours)
    _finish(launch)
    return launch


def _our_options(command: str) -> dict[str, bool]:
    """Our subcommand's options: option -> whether it takes a value."""
    from swarmlearn.cli import cli

    return {opt: not getattr(p, "is_flag", False) for p in cli.commands[command].params for opt in p.opts}


def _takes_value(flag: str, component: Component, ours: dict[str, bool]) -> bool:
    if flag in _REFUSED:
        return False  # refused before its value matters
    if flag in component.renamed or flag in component.ignored or flag in _DOCKER_VALUES:
        return True
    return flag in ("-e", "--env", "--name") or ours.get(flag, False)


def _next_flag(rest: list[str], component: Component, ours: dict[str, bool]) -> tuple[str, str | None, list[str]]:
    token, rest = rest[0], rest[1:]
    if not token.startswith("-"):
        raise CompatError(f"{component.script}: {token!r} is not a flag; {component.script} takes flags only")
    flag, eq, value = token.partition("=")
    if token[:2] in ("-e", "-v") and len(token) > 2 and token[2] != "=":
        flag, value, eq = token[:2], token[2:], "="  # -eNAME=VALUE, -vSRC:DST, as docker takes them
    if eq or not _takes_value(flag, component, ours):
        return flag, value if eq else None, rest
    if not rest:
        raise CompatError(f"{component.script}: {flag} needs a value")
    return flag, rest[0], rest[1:]


def _apply(launch: Launch, flag: str, value: str | None, ours: dict[str, bool]) -> None:
    component, script = launch.component, launch.component.script
    if flag in _REFUSED:
        raise CompatError(f"{script}: {flag} is not supported: {_REFUSED[flag]}")
    if flag in ("-d", "--detach"):
        launch.detach = True
    elif flag in ("-e", "--env"):
        name, eq, env_value = (value or "").partition("=")
        if not name:
            raise CompatError(f"{script}: {flag} {value!r}: write NAME=VALUE")
        launch.env[name] = env_value if eq else os.environ.get(name, "")
    elif flag == "--name":
        launch.name = value or launch.name  # names the record stop-swarm finds it by
    elif flag in component.renamed:
        launch.args += [component.renamed[flag], value or ""]
    elif flag in component.switches:
        launch.args.append(component.switches[flag])
    elif flag in component.ignored or flag in _DOCKER_VALUES:
        launch.ignored.append(f"{flag} {value} ({component.ignored.get(flag) or _DOCKER_VALUES[flag]})")
    elif flag in component.ignored_switches or flag in _DOCKER_SWITCHES:
        launch.ignored.append(f"{flag} ({component.ignored_switches.get(flag) or _DOCKER_SWITCHES[flag]})")
    elif flag in ours:
        launch.args += [flag] if value is None else [flag, value]
    else:
        raise CompatError(f"{script}: unknown flag {flag}; `swarm {component.command} --help` lists ours, and the "
                          f"original's are translated or named as ignored")


def _finish(launch: Launch) -> None:
    """What a process needs that a container had: an SN's data dir and sentinel role, and which of
    the original's SN flags apply to a lone SN's own ledger."""
    if launch.component.command != "sn":
        return
    args = launch.args
    joins = "--sentinel-ip" in args
    if not joins and "--sentinel" not in args:
        args.append("--sentinel")  # the original: an SN given no sentinel is the sentinel
    if "--sn-p2p-port" in args and not joins and "--ledger" not in args:
        at = args.index("--sn-p2p-port")
        launch.ignored.append(f"--sn-p2p-port {args[at + 1]} (a lone sentinel keeps its ledger in one file; SNs that "
                              f"join with --sentinel-ip share it in etcd on that port)")
        del args[at:at + 2]
    if joins and "--ledger" not in args:
        args += ["--ledger", "etcd"]
    if "--data-dir" not in args:
        args += ["--data-dir", str(run_dir() / "sn" / launch.name / "data")]


def launch_main(script: str, argv: list[str] | None = None) -> int:
    """run-<component>: in the foreground, this process becomes `swarm <command>` (recorded for
    stop-swarm while it runs); with -d, the same in the background, and this returns once it is
    recorded."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        launch = translate(script, argv)
    except CompatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if launch.ignored:
        print(f"{script}: accepted and ignored: {'; '.join(launch.ignored)}", file=sys.stderr)
    if launch.detach:
        return _start_detached(launch, [a for a in argv if a not in ("-d", "--detach")])
    return _run_here(launch)


def _records(component: str) -> Path:
    return run_dir() / component


def _run_here(launch: Launch) -> int:
    from swarmlearn.cli import cli
    from swarmlearn.swop.runtime import record_self, unrecord

    os.environ.update(launch.env)
    pid_file = record_self(_records(launch.component.command), launch.name)
    if launch.component.command == "swop":
        _note_workspace(launch)
    try:
        cli.main(args=[launch.component.command, *launch.args], prog_name="swarm")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        unrecord(pid_file, os.getpid())
    return 0


def _note_workspace(launch: Launch) -> None:
    """Where this SWOP records the nodes it starts, so that stop-swarm --swop also stops any left."""
    args = launch.args
    workspace = args[args.index("--workspace") + 1] if "--workspace" in args else (
        str(Path(args[args.index("--usr-dir") + 1]) / "runs") if "--usr-dir" in args else None)
    if workspace is not None:
        notes = _records("swop") / "workspaces"
        notes.mkdir(parents=True, exist_ok=True)
        (notes / launch.name).write_text(str(Path(workspace).resolve()))


def _start_detached(launch: Launch, argv: list[str]) -> int:
    """Starts this script again without -d in a session of its own, output to a log file, and
    returns once it has recorded itself (or says why it ended)."""
    logs = _records(launch.component.command) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{launch.name}.log"
    pid_file = _records(launch.component.command) / "pids" / f"{launch.name}.pid"
    pid_file.unlink(missing_ok=True)
    with open(log, "ab") as out:
        child = subprocess.Popen([sys.executable, "-m", "swarmlearn.compat_cli", launch.component.script, *argv],
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + DETACHED_START
    while time.monotonic() < deadline:
        if child.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-10:]
            print(f"{launch.component.script}: {launch.name} ended at start (exit {child.returncode}); its log {log}:",
                  *tail, sep="\n", file=sys.stderr)
            return 1
        if pid_file.exists():
            print(f"started {launch.name} ({launch.component.command}, pid {child.pid}); log: {log}")
            return 0
        time.sleep(0.1)
    print(f"{launch.component.script}: {launch.name} (pid {child.pid}) did not record itself within "
          f"{DETACHED_START:.0f} s; see {log}", file=sys.stderr)
    return 1


STOP_FLAGS = {"--sn": "sn", "--sl": "sl", "--swop": "swop", "--swci": "swci"}


def stop_main(argv: list[str] | None = None) -> int:
    """stop-swarm [--all|--sn|--sl|--swop|--swci] [--keep] [--sudo]: stops what run-* started on this
    host (with --swop or --all, also the nodes those SWOPs started), by their pid records."""
    from swarmlearn.swop.runtime import stop_recorded

    argv = sys.argv[1:] if argv is None else argv
    unknown = [a for a in argv if a not in (*STOP_FLAGS, "--all", "--keep", "--sudo")]
    if unknown:
        print(f"error: stop-swarm: unknown flag {unknown[0]}; give --all, --sn, --sl, --swop or --swci", file=sys.stderr)
        return 2
    ignored = [f"{f} ({why})" for f, why in (("--keep", "there are no containers to keep; logs stay in "
                                               f"{run_dir()}/<component>/logs"), ("--sudo", "no Docker to run as root"))
               if f in argv]
    if ignored:
        print(f"stop-swarm: accepted and ignored: {'; '.join(ignored)}", file=sys.stderr)
    chosen = [c for f, c in STOP_FLAGS.items() if f in argv] or list(STOP_FLAGS.values())
    # Clients before the servers they talk to, as a user stops them: SWCI, SWOP (and its nodes), SL, SN.
    stopped = []
    for component in [c for c in ("swci", "swop", "sl", "sn") if c in chosen]:
        stopped += [(component, name, pid) for name, pid in stop_recorded(_records(component))]
        if component == "swop":
            for note in sorted((_records("swop") / "workspaces").glob("*")):
                stopped += [("node", name, pid) for name, pid in stop_recorded(Path(note.read_text().strip()))]
                note.unlink(missing_ok=True)
    for component, name, pid in stopped:
        print(f"stopped {component} {name} (pid {pid})")
    print(f"{len(stopped)} processes stopped" if stopped else "nothing was running")
    return 0


def run_sn() -> None:
    sys.exit(launch_main("run-sn"))


def run_sl() -> None:
    sys.exit(launch_main("run-sl"))


def run_swop() -> None:
    sys.exit(launch_main("run-swop"))


def run_swci() -> None:
    sys.exit(launch_main("run-swci"))


def stop_swarm() -> None:
    sys.exit(stop_main())


if __name__ == "__main__":  # `python -m swarmlearn.compat_cli run-sn ...`: how -d starts the process
    if len(sys.argv) < 2 or sys.argv[1] not in (*COMPONENTS, "stop-swarm"):
        sys.exit(f"usage: python -m swarmlearn.compat_cli {{{','.join(COMPONENTS)},stop-swarm}} [flags]")
    sys.exit(stop_main(sys.argv[2:]) if sys.argv[1] == "stop-swarm" else launch_main(sys.argv[1], sys.argv[2:]))
