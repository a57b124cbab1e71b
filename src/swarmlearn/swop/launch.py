"""The small supervisor every node process runs under, so that a SWOP that dies leaves no node behind:
`python -m swarmlearn.swop.launch <lifeline fd> <program> <args...>`.

The runtime starts it in a session and process group of its own and hands it the read end of a
*lifeline*: a pipe whose write end only the starting process holds and never writes to. It starts the
program as its child (same process group), then waits for either to end:

- the program exits: the wrapper exits with its code (128 + signal when a signal killed it);
- the lifeline reads end-of-file: every copy of its write end is closed, so the process that started
  us is gone (whichever way it died). The wrapper sends SIGTERM to its group, and SIGKILL after
  ORPHAN_GRACE seconds to what is left (itself included).

SIGTERM and SIGINT that the wrapper receives are passed on to the program.

Why not the kernel's parent-death signal (PR_SET_PDEATHSIG) on the node itself: it fires when the
*thread* that forked the child exits, not its process, so a node started from a short-lived thread of
the SWOP would be killed with that thread. Here it is set only on the program, whose parent is this
wrapper's one and only thread: an extra for a wrapper killed with SIGKILL.

Written with fork/exec in this fresh single-threaded process rather than a `preexec_fn` in the threaded
SWOP, where calling into a library between fork and exec can deadlock the child.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

ORPHAN_GRACE = 5.0
PR_SET_PDEATHSIG = 1
FORWARDED = (signal.SIGTERM, signal.SIGINT)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or not argv[0].isdigit():
        sys.exit("usage: python -m swarmlearn.swop.launch <lifeline fd> <program> [args...]")
    lifeline, command = int(argv[0]), argv[1:]
    if _closed(lifeline, wait=0):
        sys.exit(f"the process that started {command[0]} ended before it could start")
    prctl = _prctl()
    # Signals that arrive between fork and the handlers being set wait, blocked, instead of killing
    # this wrapper with its child left unsupervised.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    pid = os.fork()
    if pid == 0:
        _become_program(command, lifeline, prctl)
    child = _Child(pid)
    for sig in FORWARDED:
        signal.signal(sig, child.forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    code = child.supervise(lifeline)
    sys.exit(code)


def _become_program(command: list[str], lifeline: int, prctl) -> None:
    """In the forked child: drop what the program must not hold, then exec it (never returns)."""
    try:
        os.close(lifeline)
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)  # a signal mask survives exec
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        os.execvp(command[0], command)
    except OSError as exc:
        os.write(2, f"cannot run {command[0]}: {exc.strerror}\n".encode())
    finally:
        os._exit(127)


class _Child:
    def __init__(self, pid: int):
        self.pid = pid
        self.status: int | None = None
        # A pidfd names this very process: signals sent through it cannot reach a process that
        # reused the pid once ours is reaped, and select() wakes when it exits.
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self.pidfd = None

    def forward(self, sig: int, _frame=None) -> None:
        if self.status is not None:
            return
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def supervise(self, lifeline: int) -> int:
        """Waits for the program to exit (returns its exit code) or for the lifeline to close."""
        watched = [lifeline] if self.pidfd is None else [lifeline, self.pidfd]
        while not self._reaped():
            readable, _, _ = select.select(watched, [], [], None if self.pidfd is not None else 0.2)
            if lifeline in readable and _closed(lifeline, wait=0):
                self._end_orphaned_group()
        return _exit_code(self.status)

    def _end_orphaned_group(self) -> None:
        for sig in FORWARDED:  # this wrapper's own share of the group's SIGTERM
            signal.signal(sig, signal.SIG_IGN)
        os.killpg(0, signal.SIGTERM)
        deadline = time.monotonic() + ORPHAN_GRACE
        while not self._reaped() and time.monotonic() < deadline:
            time.sleep(0.05)
        # The program's own children may outlive it; nobody is left to stop them but us.
        os.killpg(0, signal.SIGKILL)

    def _reaped(self) -> bool:
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.status = status
        return self.status is not None


def _closed(fd: int, wait: float) -> bool:
    """Whether the lifeline reads end-of-file: nobody writes to it, so readable means closed."""
    readable, _, _ = select.select([fd], [], [], wait)
    return bool(readable) and os.read(fd, 1) == b""


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _prctl():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not Linux: a killed wrapper leaves its program to `swarm stop`


if __name__ == "__main__":
    main(sys.argv[1:])
