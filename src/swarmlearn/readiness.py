"""How a process started by a SWOP or by `swarm run` says that it is ready, and how its starter hears it.

The starter makes a pipe per process and passes the write end's number in SWARM_READY_FD. When ready,
the process writes one line to it and closes it (announce_ready); the starter waits on the read end
(read_ready_line). End-of-file before a line means the process ended (or gave up the pipe) without
being ready. Unlike a search of the log file, a line from an earlier run of the same node cannot be
mistaken for this one's.

The line is also printed on stdout as before, where users and tests read it.

A process takes its pipe (and the variable) when it first imports this module: import it before
starting threads, as the `swarm` command does.
"""

from __future__ import annotations

import os
import selectors
import stat
import sys
import threading
import time

READY_ENV = "SWARM_READY_FD"
MAX_LINE = 64 * 1024


def _take_ready_fd() -> tuple[int | None, str | None]:
    """This process's readiness pipe, taken once on import, while no other thread can be reading the
    environment: the variable is removed (what this process starts does not announce in its name) and
    the pipe made close-on-exec (what it starts does not hold it open). (fd, None), or (None, the
    variable's value when it names no open pipe)."""
    value = os.environ.pop(READY_ENV, None)
    if value is None:
        return None, None
    try:
        fd = int(value)
        # Only a pipe: a number inherited by mistake must not make us write into some other file.
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.set_inheritable(fd, False)
            return fd, None
    except (ValueError, OSError):
        pass
    return None, value


_ready_lock = threading.Lock()
_ready_fd, _not_a_pipe = _take_ready_fd()


def _forget_in_forked_child() -> None:
    """A forked child (a multiprocessing worker) must neither keep the pipe open nor announce for us."""
    global _ready_fd, _ready_lock
    _ready_lock = threading.Lock()
    if _ready_fd is not None:
        os.close(_ready_fd)
        _ready_fd = None


os.register_at_fork(after_in_child=_forget_in_forked_child)


def announce_ready(line: str) -> None:
    """Prints `line` and, when started with SWARM_READY_FD, writes it to that pipe and closes it."""
    global _ready_fd, _not_a_pipe
    print(line, flush=True)
    with _ready_lock:
        fd, _ready_fd = _ready_fd, None
        bad, _not_a_pipe = _not_a_pipe, None
    if bad is not None:
        print(f"{READY_ENV}={bad!r} is not an open pipe; readiness told on stdout only", file=sys.stderr)
    if fd is None:
        return
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode())
    except BrokenPipeError:
        pass  # the starter stopped waiting; it reads our log instead
    finally:
        os.close(fd)


def ready_pipe() -> tuple[int, int]:
    """(read end, write end); neither is inherited unless passed on purpose (pass_fds)."""
    return os.pipe()


def read_ready_line(fd: int, timeout: float, received: bytearray | None = None) -> str | None:
    """The line written to the pipe `fd`, waiting up to `timeout` seconds. None when the pipe closed
    first; raises TimeoutError when the time passed. What arrived of the line is kept in `received`,
    so that a later call with the same buffer goes on where a timed-out one stopped."""
    received = bytearray() if received is None else received
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:  # select() cannot watch an fd numbered 1024 or more
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in received and len(received) < MAX_LINE:
            # The selector resumes after a signal with the time left (PEP 475): nothing readable means time is up.
            if not selector.select(max(0.0, deadline - time.monotonic())):
                raise TimeoutError
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            received += chunk
    line = bytes(received).split(b"\n", 1)[0].decode(errors="replace").strip()
    return line or None
