"""The small supervisor every node process runs under, so that neither a SWOP that dies nor a program
that exits leaves a process behind: `python -m swarmlearn.swop.launch <lifeline fd | -> <program> <args...>`.

The runtime starts it in a session and process group of its own and, when it supervises, hands it the
read end of a *lifeline*: a pipe whose write end only the starting process holds and never writes to
(`-` instead: no lifeline, the program outlives its starter, as `swarm run --keep` wants). It starts the
program as its child (same process group), then waits for either to end:

- the program exits: the wrapper cleans up the group (below) and exits with the program's code (128 +
  signal when a signal killed it);
- the lifeline reads end-of-file: every copy of its write end is closed, so the process that started
  us is gone (whichever way it died). The wrapper sends SIGTERM to its group, SIGKILL to the program
  after ORPHAN_GRACE seconds, then cleans up the group.

Cleaning up the group: what the program started and left there (DataLoader workers, a pip subprocess)
has nobody else to stop it, so the wrapper, ignoring SIGTERM itself, sends the group SIGTERM, waits up
to CHILDREN_GRACE seconds for it to empty, and sends SIGKILL to whoever is left but itself.

SIGTERM and SIGINT that the wrapper receives are passed on to the program (once: whoever stops a node
signals the wrapper alone).

Why not the kernel's parent-death signal (PR_SET_PDEATHSIG) on the node itself: it fires when the
*thread* that forked the child exits, not its process, so a node started from a short-lived thread of
the SWOP would be killed with that thread. Here it is set only on the program, whose parent is this
wrapper's one and only thread: an extra for a wrapper killed with SIGKILL.

Written with fork/exec in this fresh single-threaded process rather than a `preexec_fn` in the threaded
SWOP, where calling into a library between fork and exec can deadlock the child. It imports nothing of
swarmlearn: importing swarmlearn.readiness would take the readiness pipe meant for the program.
"""

from __future__ import annotations

import os
import selectors
import signal
import sys
import time

import psutil

ORPHAN_GRACE = 5.0
CHILDREN_GRACE = 2.0
PR_SET_PDEATHSIG = 1
FORWARDED = (signal.SIGTERM, signal.SIGINT)
# Python ignores these; an ignored disposition survives exec, and a shell pipeline such as
# `yes | head -1` would then never see its writer end (as subprocess's restore_signals knows).
RESTORED = (signal.SIGPIPE, signal.SIGXFSZ)
NO_LIFELINE = "-"
READY_ENV = "SWARM_READY_FD"  # swarmlearn.readiness.READY_ENV, spelled out for the reason above


def main(argv: list[str]) -> None:
    if len(argv) < 2 or not (argv[0].isdigit() or argv[0] == NO_LIFELINE):
        sys.exit("usage: python -m swarmlearn.swop.launch <lifeline fd | -> <program> [args...]")
    lifeline, command = (None if argv[0] == NO_LIFELINE else int(argv[0])), argv[1:]
    if os.getpgid(0) != os.getpid():  # started by hand: the group we clean up must not be our caller's
        os.setpgid(0, 0)
    if lifeline is not None and _closed(lifeline, wait=0):
        sys.exit(f"the process that started {command[0]} ended before it could start")
    prctl = _prctl()
    wrapper = os.getpid()
    # Signals that arrive between fork and the handlers being set wait, blocked, instead of killing
    # this wrapper with its child left unsupervised.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    pid = os.fork()
    if pid == 0:
        _become_program(command, lifeline, prctl, wrapper)
    _drop_ready_pipe()
    child = _Child(pid)
    for sig in FORWARDED:
        signal.signal(sig, child.forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    code = child.supervise(lifeline)
    _clean_up_group(already_asked=child.orphaned)
    sys.exit(code)


def _become_program(command: list[str], lifeline: int | None, prctl, wrapper: int) -> None:
    """In the forked child: drop what the program must not hold, then exec it (never returns)."""
    try:
        if lifeline is not None:
            os.close(lifeline)
        for sig in (*FORWARDED, *RESTORED):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)  # a signal mask survives exec
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != wrapper:  # it died before prctl: the signal will never come
                os._exit(128 + signal.SIGTERM)
        os.execvp(command[0], command)
    except OSError as exc:
        os.write(2, f"cannot run {command[0]}: {exc.strerror}\n".encode())
    finally:
        os._exit(127)


def _drop_ready_pipe() -> None:
    """The program holds the readiness pipe now; our copy would keep it open after the program ended."""
    value = os.environ.get(READY_ENV, "")
    if value.isdigit():
        try:
            os.close(int(value))
        except OSError:
            pass


class _Child:
    def __init__(self, pid: int):
        self.pid = pid
        self.status: int | None = None
        self.orphaned = False
        # A pidfd names this very process: signals sent through it cannot reach a process that
        # reused the pid once ours is reaped, and the selector wakes when it exits.
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

    def supervise(self, lifeline: int | None) -> int:
        """Waits for the program to exit and returns its exit code; a lifeline that closes meanwhile
        stops the group (SIGTERM, then SIGKILL to the program after ORPHAN_GRACE)."""
        selector = selectors.DefaultSelector()
        for fd in (lifeline, self.pidfd):
            if fd is not None:
                selector.register(fd, selectors.EVENT_READ)
        kill_at = None
        while not self._reaped():
            if kill_at is not None and time.monotonic() >= kill_at:
                self.forward(signal.SIGKILL)
                kill_at = None
            if not selector.get_map():  # neither a lifeline nor a pidfd to wait on
                time.sleep(0.2)
                continue
            events = selector.select(0.2 if self.pidfd is None or kill_at is not None else None)
            if lifeline is not None and any(key.fd == lifeline for key, _ in events) and _closed(lifeline, 0):
                selector.unregister(lifeline)
                lifeline, kill_at = None, time.monotonic() + ORPHAN_GRACE
                self._orphan_group()
        selector.close()
        return _exit_code(self.status)

    def _orphan_group(self) -> None:
        self.orphaned = True
        _ignore_stop_signals()  # this wrapper's own share of the group's SIGTERM
        os.killpg(0, signal.SIGTERM)

    def _reaped(self) -> bool:
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.status = status
        return self.status is not None


def _clean_up_group(already_asked: bool) -> None:
    """Stops what the program left in our process group: SIGTERM (unless the group had it already),
    up to CHILDREN_GRACE seconds to end, then SIGKILL to each one left. This wrapper stays, to exit
    with the program's code."""
    _ignore_stop_signals()
    if not already_asked and _group_members():
        os.killpg(0, signal.SIGTERM)
    deadline = time.monotonic() + CHILDREN_GRACE
    while (left := _group_members()) and time.monotonic() < deadline:
        time.sleep(0.05)
    for _ in range(3):  # one may have started another before it was killed
        for pid in left:
            _kill_member(pid)
        if not (left := _group_members()):
            return
        time.sleep(0.05)


def _group_members() -> list[int]:
    """The processes of our group but this one, zombies left out (their parent reaps them)."""
    group, me = os.getpgid(0), os.getpid()
    members = []
    for pid in psutil.pids():
        try:
            if pid != me and os.getpgid(pid) == group and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                members.append(pid)
        except (OSError, psutil.Error):
            pass  # ended meanwhile
    return members


def _kill_member(pid: int) -> None:
    """SIGKILL to `pid`, making sure through a pidfd that it is still a member of our group, not a
    stranger that took its pid meanwhile."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        if os.getpgid(pid) != os.getpgid(0):
            return
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except OSError:
        pass  # ended meanwhile
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _ignore_stop_signals() -> None:
    for sig in FORWARDED:
        signal.signal(sig, signal.SIG_IGN)


def _closed(fd: int, wait: float) -> bool:
    """Whether the lifeline reads end-of-file: nobody writes to it, so readable means closed."""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        readable = selector.select(wait)
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
