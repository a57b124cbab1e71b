"""How SWOP starts the processes of a node. One small interface, so that a container or Kubernetes
runtime is one more file; the process runtime is the default and the only one on a host without a
Docker engine.

Every process started is recorded as a pid file under the workspace's `pids/` folder, so that
`swarm stop` finds and stops it even if the operator that started it is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Spec:
    name: str  # unique in the workspace, e.g. run_hf_task-node1-ml
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    log: Path


class Handle(ABC):
    spec: Spec
    log_start: int = 0  # where this run's output begins in spec.log

    @abstractmethod
    def poll(self) -> int | None:
        """Exit code, or None while running."""

    @abstractmethod
    def stop(self, grace: float = 10.0) -> int | None:
        """Asks the process to end, kills it after `grace` seconds; returns its exit code."""

    def wait_for_line(self, needle: str, timeout: float) -> str:
        """The first log line containing `needle` (a readiness line), waiting up to `timeout`
        seconds; raises SwarmError with the last log lines if the process ends or is too slow."""
        from swarmlearn.errors import SwarmError

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(self.spec.log, "rb") as fh:
                    # Only this run's lines: a restarted node appends to the log of its earlier run,
                    # whose readiness line names an address that is gone.
                    fh.seek(self.log_start)
                    for line in fh.read().decode(errors="replace").splitlines():
                        if needle in line:
                            return line.strip()
            except OSError:
                pass
            if self.poll() is not None:
                raise SwarmError(f"{self.spec.name} exited before it was ready:\n{self.last_lines()}")
            time.sleep(0.1)
        raise SwarmError(f"{self.spec.name} not ready within {timeout:.0f} s:\n{self.last_lines()}")

    def last_lines(self, n: int = 20) -> str:
        try:
            with open(self.spec.log, errors="replace") as fh:
                return "".join(deque(fh, maxlen=n)).rstrip()
        except OSError:
            return ""


class Runtime(ABC):
    @abstractmethod
    def start(self, spec: Spec) -> Handle:
        ...


class ProcessHandle(Handle):
    def __init__(self, spec: Spec, popen: subprocess.Popen, pid_file: Path):
        self.spec = spec
        self.popen = popen
        self.pid_file = pid_file

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        code = self.popen.poll()
        if code is not None:
            self.pid_file.unlink(missing_ok=True)
        return code

    def stop(self, grace: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
            except ProcessLookupError:
                pass
        return self.poll()


class ProcessRuntime(Runtime):
    """Local processes, each in its own process group (so its children go with it)."""

    def __init__(self, workspace: Path):
        self.pids = Path(workspace) / "pids"

    def start(self, spec: Spec) -> ProcessHandle:
        spec.log.parent.mkdir(parents=True, exist_ok=True)
        self.pids.mkdir(parents=True, exist_ok=True)
        with open(spec.log, "ab") as log:
            log_start = log.tell()
            # Through swop/launch.py, so that a killed SWOP leaves no node behind (a restarted SWOP
            # starts the task's nodes afresh).
            argv = [sys.executable, "-m", "swarmlearn.swop.launch", str(os.getpid()), *spec.argv]
            popen = subprocess.Popen(argv, cwd=spec.cwd, env=spec.env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        pid_file = self.pids / f"{spec.name}.pid"
        pid_file.write_text(f"{popen.pid}\n")
        handle = ProcessHandle(spec, popen, pid_file)
        handle.log_start = log_start
        return handle


def stop_recorded(workspace: Path, grace: float = 10.0) -> list[tuple[str, int]]:
    """Stops every process recorded under `workspace` (any depth of `pids/` folders): SIGTERM to its
    process group, SIGKILL after `grace`. Returns (name, pid) of those that were still running."""
    stopped: list[tuple[str, int]] = []
    files = sorted(Path(workspace).rglob("pids/*.pid"))
    for pid_file in files:
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid_file.unlink(missing_ok=True)
            continue
        if _alive(pid):
            _signal_group(pid, signal.SIGTERM)
            stopped.append((pid_file.stem, pid))
    deadline = time.monotonic() + grace
    for _, pid in stopped:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            _signal_group(pid, signal.SIGKILL)
    for pid_file in files:
        pid_file.unlink(missing_ok=True)
    return stopped


def record_self(workspace: Path, name: str) -> Path:
    """Records this process (an SN or SWOP started by hand or by `swarm run`) for `swarm stop`."""
    pids = Path(workspace) / "pids"
    pids.mkdir(parents=True, exist_ok=True)
    pid_file = pids / f"{name}.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    return pid_file


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        pass
    try:  # so does someone else's zombie, waiting for its parent to reap it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _signal_group(pid: int, sig: int) -> None:
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass
