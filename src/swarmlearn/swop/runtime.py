"""How SWOP starts the processes of a node. One small interface, so that a container or Kubernetes
runtime is one more file; the process runtime is the default and the only one on a host without a
Docker engine.

Every process started is recorded as a pid file under the workspace's `pids/` folder ("PID
CREATE_TIME"), so that `swarm stop` finds and stops it even if the operator that started it is gone,
and does not stop another process that took the pid of one that ended.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import psutil

from swarmlearn.errors import SwarmError
from swarmlearn.readiness import READY_ENV, read_ready_line, ready_pipe

# Two readings of one process's start time can differ a little (psutil derives it from the boot
# time, which the kernel may adjust); a process that reused the pid started long after.
SAME_PROCESS_WITHIN = 1.0
# How long an ended process is given to close its readiness pipe, so that the error can say its exit code.
EXIT_NOTICE = 2.0


@dataclass
class Spec:
    name: str  # unique in the workspace, e.g. run_hf_task-node1-ml
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    log: Path


class Handle(ABC):
    """A started process. Its readiness arrives over a pipe (swarmlearn.readiness): `ready_fd` is the
    read end, closed once the line came or the process ended."""

    spec: Spec
    ready_fd: int | None = None

    def __init__(self) -> None:
        self._ready_line: str | None = None
        self._ready_lock = threading.Lock()
        self._waiting = False

    @abstractmethod
    def poll(self) -> int | None:
        """Exit code, or None while running."""

    @abstractmethod
    def stop(self, grace: float = 10.0) -> int | None:
        """Asks the process to end, kills it after `grace` seconds; returns its exit code."""

    def wait_ready(self, timeout: float) -> str:
        """The line the process announced when it became ready, waiting up to `timeout` seconds;
        raises SwarmError with the last log lines if it ends first or is too slow."""
        with self._ready_lock:
            if self._ready_line is not None:
                return self._ready_line
            fd = self.ready_fd
            self._waiting = fd is not None
        if fd is None:
            raise SwarmError(f"{self.spec.name} {self._ended_how()} before it was ready:\n{self.last_lines()}")
        try:
            line = read_ready_line(fd, timeout)
        except TimeoutError:
            with self._ready_lock:
                self._waiting = False
            raise SwarmError(f"{self.spec.name} not ready within {timeout:.0f} s:\n{self.last_lines()}") from None
        with self._ready_lock:
            self._waiting = False
            self._ready_line = line
            self.ready_fd = None
        os.close(fd)
        if line is None:
            raise SwarmError(f"{self.spec.name} {self._ended_how()} before it was ready:\n{self.last_lines()}")
        return line

    def _release_ready(self) -> None:
        """Closes the readiness pipe of an ended or stopped process, keeping a line it left there. A
        thread inside wait_ready closes it itself (an fd closed under its select could be reused)."""
        with self._ready_lock:
            if self._waiting or self.ready_fd is None:
                return
            fd, self.ready_fd = self.ready_fd, None
            try:
                self._ready_line = read_ready_line(fd, 0)
            except (TimeoutError, OSError):
                pass
        os.close(fd)

    def _ended_how(self) -> str:
        deadline = time.monotonic() + EXIT_NOTICE
        while (code := self.poll()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if code is None:
            return f"closed its readiness pipe ({READY_ENV}) without a ready line"
        return f"exited with code {code}"

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
    def __init__(self, spec: Spec, popen: subprocess.Popen, pid_file: Path, ready_fd: int):
        super().__init__()
        self.spec = spec
        self.popen = popen
        self.pid_file = pid_file
        self.ready_fd = ready_fd

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        code = self.popen.poll()
        if code is not None:
            self.pid_file.unlink(missing_ok=True)
            self._release_ready()
        return code

    def stop(self, grace: float = 10.0) -> int | None:
        # Our own child, not yet reaped: its pid (the group's id) cannot have been reused.
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
    """Local processes, each under swop/launch.py in a process group of its own (so its children go
    with it), ended by that wrapper when this process's lifeline closes, that is when this process
    dies. Safe to call from any thread, however short-lived."""

    def __init__(self, workspace: Path):
        self.pids = Path(workspace) / "pids"

    def start(self, spec: Spec) -> ProcessHandle:
        spec.log.parent.mkdir(parents=True, exist_ok=True)
        self.pids.mkdir(parents=True, exist_ok=True)
        lifeline = _lifeline()
        ready_read, ready_write = ready_pipe()
        try:
            argv = [sys.executable, "-m", "swarmlearn.swop.launch", str(lifeline), *spec.argv]
            with open(spec.log, "ab") as log:
                popen = subprocess.Popen(argv, cwd=spec.cwd, env={**spec.env, READY_ENV: str(ready_write)},
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, pass_fds=(lifeline, ready_write))
        except BaseException:
            os.close(ready_read)
            raise
        finally:
            os.close(ready_write)  # the process holds it now: its exit reads as end-of-file
        pid_file = self.pids / f"{spec.name}.pid"
        _write_pid_file(pid_file, popen.pid)
        return ProcessHandle(spec, popen, pid_file, ready_read)


# ---------------------------------------------------------------------------------- the lifeline
# One pipe per process: the read end goes to every wrapper this process starts, the write end stays
# open here, never written to, until this process dies. It is not inherited across exec (os.pipe
# makes it close-on-exec); a plain fork (multiprocessing) drops it in the child, which must not keep
# our nodes alive after we are gone.

_lifeline_lock = threading.Lock()
_lifeline_pipe: tuple[int, int] | None = None


def _lifeline() -> int:
    global _lifeline_pipe
    with _lifeline_lock:
        if _lifeline_pipe is None:
            _lifeline_pipe = os.pipe()
        return _lifeline_pipe[0]


def _drop_lifeline_in_forked_child() -> None:
    global _lifeline_pipe, _lifeline_lock
    _lifeline_lock = threading.Lock()
    if _lifeline_pipe is not None:
        for fd in _lifeline_pipe:
            os.close(fd)
        _lifeline_pipe = None


os.register_at_fork(after_in_child=_drop_lifeline_in_forked_child)


# ---------------------------------------------------------------------------------- pid files

def stop_recorded(workspace: Path, grace: float = 10.0) -> list[tuple[str, int]]:
    """Stops every process recorded under `workspace` (any depth of `pids/` folders): SIGTERM to its
    process group, SIGKILL after `grace`. Returns (name, pid) of those that were still running; a pid
    file whose pid now names another process (its start time differs) is skipped."""
    files = sorted(Path(workspace).rglob("pids/*.pid"))
    running: list[tuple[str, psutil.Process]] = []
    for pid_file in files:
        proc = _recorded_process(pid_file)
        if proc is not None and _signal_group(proc, signal.SIGTERM):
            running.append((pid_file.stem, proc))
    left = _wait_gone([proc for _, proc in running], grace)
    for proc in left:
        _signal_group(proc, signal.SIGKILL)
    _wait_gone(left, 5.0)
    for pid_file in files:
        pid_file.unlink(missing_ok=True)
    return [(name, proc.pid) for name, proc in running]


def record_self(workspace: Path, name: str) -> Path:
    """Records this process (an SN or SWOP started by hand or by `swarm run`) for `swarm stop`."""
    pids = Path(workspace) / "pids"
    pids.mkdir(parents=True, exist_ok=True)
    pid_file = pids / f"{name}.pid"
    _write_pid_file(pid_file, os.getpid())
    return pid_file


def _write_pid_file(pid_file: Path, pid: int) -> None:
    try:
        pid_file.write_text(f"{pid} {psutil.Process(pid).create_time()!r}\n")
    except psutil.Error:  # it ended already; the pid alone is enough to find nothing later
        pid_file.write_text(f"{pid}\n")


def _recorded_process(pid_file: Path) -> psutil.Process | None:
    """The running process a pid file names; None if it ended, or if its pid now belongs to a process
    started at another time. An older file holds the pid alone, and is trusted as before."""
    try:
        fields = pid_file.read_text().split()
        pid = int(fields[0])
        created = float(fields[1]) if len(fields) > 1 else None
    except (OSError, ValueError, IndexError):
        return None
    try:
        proc = psutil.Process(pid)
        if created is not None and abs(proc.create_time() - created) > SAME_PROCESS_WITHIN:
            return None
        return proc if _running(proc) else None
    except psutil.Error:
        return None


def _running(proc: psutil.Process) -> bool:
    """Running, and not a zombie waiting for its parent to reap it."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _alive(pid: int) -> bool:
    try:
        return _running(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Waits up to `timeout` seconds for `procs` to end (reaping those that are our children);
    returns those still running. A zombie of another parent counts as ended."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if _running(p)]
    while alive and (remaining := deadline - time.monotonic()) > 0:
        _, alive = psutil.wait_procs(alive, timeout=min(remaining, 0.2))
        alive = [p for p in alive if _running(p)]
    return alive


def _signal_group(proc: psutil.Process, sig: int) -> bool:
    """Sends `sig` to the process group `proc` leads (what a process it started), else to `proc`
    alone; False if it is gone."""
    try:
        if not proc.is_running():
            return False
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        return True
    except (ProcessLookupError, psutil.NoSuchProcess):
        return False
    except (PermissionError, psutil.AccessDenied):  # another user's process: not ours to stop
        return False
