"""How a process started by a SWOP or by `swarm run` says that it is ready, and how its starter hears it.

The starter makes a pipe per process and passes the write end's number in SWARM_READY_FD. When ready,
the process writes one line to it and closes it (announce_ready); the starter waits on the read end
(read_ready_line). End-of-file before a line means the process ended (or gave up the pipe) without
being ready. Unlike a search of the log file, a line from an earlier run of the same node cannot be
mistaken for this one's.

The line is also printed on stdout as before, where users and tests read it.
"""

from __future__ import annotations

import os
import select
import stat
import sys
import time

READY_ENV = "SWARM_READY_FD"
MAX_LINE = 64 * 1024


def announce_ready(line: str) -> None:
    """Prints `line` and, when started with SWARM_READY_FD, writes it to that pipe and closes it. The
    variable is removed, so that processes this one starts do not announce in its name."""
    print(line, flush=True)
    value = os.environ.pop(READY_ENV, None)
    if value is None:
        return
    try:
        fd = int(value)
        # Only a pipe: a number inherited by mistake must not make us write into some other file.
        is_pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
    except (ValueError, OSError):
        is_pipe = False
    if not is_pipe:
        print(f"{READY_ENV}={value!r} is not an open pipe; readiness told on stdout only", file=sys.stderr)
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


def read_ready_line(fd: int, timeout: float) -> str | None:
    """The line written to the pipe `fd`, waiting up to `timeout` seconds. None when the pipe closed
    first; raises TimeoutError when the time passed."""
    deadline = time.monotonic() + timeout
    received = b""
    while b"\n" not in received and len(received) < MAX_LINE:
        # select() resumes after a signal with the time left (PEP 475): nothing readable means time is up.
        readable, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            raise TimeoutError
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        received += chunk
    line = received.split(b"\n", 1)[0].decode(errors="replace").strip()
    return line or None
