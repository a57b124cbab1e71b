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
from swarmlearn.swop.launch import NO_LIFELINE

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
        # One reader of the pipe at a time (it alone may close it); what it read of a line that is
        # not complete yet stays here for the next one.
        self._ready_reader = threading.Lock()
        self._ready_received = bytearray()

    @abstractmethod
    def poll(self) -> int | None:
        """Exit code, or None while running."""

    @abstractmethod
    def stop(self, grace: float = 10.0) -> int | None:
        """Asks the process to end, kills it after `grace` seconds; returns its exit code."""

    def wait_ready(self, timeout: float) -> str:
        """The line the process announced when it became ready, waiting up to `timeout` seconds;
        raises SwarmError with the last log lines if it ends first or is too slow. Callers in several
        threads take turns and get the same answer."""
        deadline = time.monotonic() + timeout
        if not self._ready_reader.acquire(timeout=max(0.0, timeout)):
            raise self._not_ready_within(timeout)
        try:
            if self._ready_line is None and self.ready_fd is not None:
                try:
                    line = read_ready_line(self.ready_fd, deadline - time.monotonic(), self._ready_received)
                except TimeoutError:
                    raise self._not_ready_within(timeout) from None
                self._close_ready_pipe(line)
        finally:
            self._ready_reader.release()
        if self._ready_line is None:
            raise SwarmError(f"{self.spec.name} {self._ended_how()} before it was ready:\n{self.last_lines()}")
        return self._ready_line

    def _not_ready_within(self, timeout: float) -> SwarmError:
        return SwarmError(f"{self.spec.name} not ready within {timeout:.0f} s:\n{self.last_lines()}")

    def _release_ready(self) -> None:
        """Closes the readiness pipe of an ended or stopped process, keeping a line it left there. A
        thread inside wait_ready sees the end itself (an fd closed under its selector could be reused)."""
        if self.ready_fd is None or not self._ready_reader.acquire(blocking=False):
            return
        try:
            if self.ready_fd is not None:
                try:
                    line = read_ready_line(self.ready_fd, 0, self._ready_received)
                except (TimeoutError, OSError):  # still held open, by something the process left behind
                    line = None
                self._close_ready_pipe(line)
        finally:
            self._ready_reader.release()

    def _close_ready_pipe(self, line: str | None) -> None:
        """Called by the reader that holds the lock: the answer is final."""
        fd, self.ready_fd = self.ready_fd, None
        self._ready_line = line
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
            unrecord(self.pid_file, self.popen.pid)
            self._release_ready()
        return code

    def stop(self, grace: float = 10.0) -> int | None:
        # Our own child, not yet reaped: its pid (the group's id) cannot have been reused. SIGTERM goes
        # to the wrapper alone: it passes it on to the program, then stops what the program left.
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
            except ProcessLookupError:
                pass
        return self.poll()


class ProcessRuntime(Runtime):
    """Local processes, each under swop/launch.py in a process group of its own (so its children go
    with it). Supervised (the default), that wrapper ends them when this process's lifeline closes,
    that is when this process dies; unsupervised, they outlive this process, and `swarm stop` (their
    pid files) ends them. Safe to call from any thread, however short-lived."""

    def __init__(self, workspace: Path, supervised: bool = True):
        self.pids = Path(workspace) / "pids"
        self.supervised = supervised

    def start(self, spec: Spec) -> ProcessHandle:
        spec.log.parent.mkdir(parents=True, exist_ok=True)
        self.pids.mkdir(parents=True, exist_ok=True)
        lifeline = _lifeline() if self.supervised else None
        ready_read, ready_write = ready_pipe()
        try:
            argv = [sys.executable, "-m", "swarmlearn.swop.launch", NO_LIFELINE if lifeline is None else str(lifeline),
                    *spec.argv]
            with open(spec.log, "ab") as log:
                popen = subprocess.Popen(argv, cwd=spec.cwd, env={**spec.env, READY_ENV: str(ready_write)},
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True,
                                         pass_fds=(ready_write,) if lifeline is None else (lifeline, ready_write))
        except BaseException:
            os.close(ready_read)
            raise
        finally:
            os.close(ready_write)  # the process holds it now: its exit reads as end-of-file
        handle = ProcessHandle(spec, popen, self.pids / f"{spec.name}.pid", ready_read)
        try:
            _write_pid_file(handle.pid_file, popen.pid)
        except BaseException as exc:  # unrecorded, `swarm stop` could not find it: it must not run
            handle.stop(grace=5.0)  # and closes its readiness pipe
            if isinstance(exc, OSError):
                raise SwarmError(f"cannot record {spec.name}'s pid in {handle.pid_file}: {exc.strerror}; "
                                 f"make {self.pids} a writable folder") from None
            raise
        return handle


# ---------------------------------------------------------------------------------- the lifeline
# One pipe per process: the read end goes to every supervised wrapper this process starts, the write
# end stays open here, never written to, until this process dies. It is not inherited across exec
# (os.pipe makes it close-on-exec); a plain fork (multiprocessing) drops it in the child, which must
# not keep our nodes alive after we are gone.

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
    """Stops every process recorded under `workspace` (any depth of `pids/` folders): SIGTERM (to a
    launch wrapper alone, which passes it on and stops what its program leaves; to the process group
    of any other), SIGKILL to its group after `grace`. Returns (name, pid) of those that were still
    running; a pid file whose pid now names another process (its start time differs) is skipped."""
    files = sorted(f for f in Path(workspace).rglob("pids/*.pid") if f.is_file())
    running: list[tuple[str, psutil.Process]] = []
    for pid_file in files:
        proc = _recorded_process(pid_file)
        if proc is not None and _signal_group(proc, signal.SIGTERM, leader_alone=_is_wrapper(proc)):
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


def unrecord(pid_file: Path, pid: int) -> None:
    """Removes the pid file of process `pid`, unless a newer process of the same name has written it
    since (it is that one's record now)."""
    try:
        fields = pid_file.read_text().split()
        if fields and fields[0] == str(pid):
            pid_file.unlink(missing_ok=True)
    except OSError:
        pass


def _write_pid_file(pid_file: Path, pid: int) -> None:
    try:
        pid_file.write_text(f"{pid} {psutil.Process(pid).create_time()!r}\n")
    except psutil.Error:  # it ended already; the pid alone is enough to find nothing later
        pid_file.write_text(f"{pid}\n")


def _recorded_process(pid_file: Path) -> psutil.Process | None:
    """The running process a pid file names; None if it ended, or if its pid now belongs to a process
    started at another time. An older file holds the pid alone: it is trusted only for a process of
    ours (`swarmlearn` on its command line), never to signal the group of a stranger."""
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
        if created is None and not any("swarmlearn" in arg for arg in proc.cmdline()):
            return None
        return proc if _running(proc) else None
    except psutil.Error:
        return None


def _is_wrapper(proc: psutil.Process) -> bool:
    try:
        return "swarmlearn.swop.launch" in proc.cmdline()
    except psutil.Error:
        return False


def _running(proc: psutil.Process) -> bool:
    """Running, and not a zombie waiting for its parent to reap it."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Waits up to `timeout` seconds for `procs` to end (reaping those that are our children);
    returns those still running. A zombie of another parent counts as ended."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if _running(p)]
    while alive and (remaining := deadline - time.monotonic()) > 0:
        _, alive = psutil.wait_procs(alive, timeout=min(remaining, 0.2))
        alive = [p for p in alive if _running(p)]
    return alive


def _signal_group(proc: psutil.Process, sig: int, leader_alone: bool = False) -> bool:
    """Sends `sig` to the process group `proc` leads (what a process it started) unless
    `leader_alone`, else to `proc` alone; False if it is gone."""
    try:
        if not proc.is_running():
            return False
        if not leader_alone and os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        return True
    except (ProcessLookupError, psutil.NoSuchProcess):
        return False
    except (PermissionError, psutil.AccessDenied):  # another user's process: not ours to stop
        return False
