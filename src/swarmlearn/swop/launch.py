"""Starts a node's process so that it dies with the SWOP that started it: `python -m
swarmlearn.swop.launch <swop pid> <program> <args...>` asks the kernel for SIGTERM when its parent dies
(Linux PR_SET_PDEATHSIG), then becomes the program (exec: same pid, same process group).

Done here, in a fresh single-threaded process, rather than in a `preexec_fn` between fork and exec of
the threaded SWOP, where loading or calling into a library can deadlock or abort the child (CPython's
subprocess documentation warns of it).
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    parent, command = int(argv[0]), argv[1:]
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the node outlives a killed SWOP, and `swarm stop` ends it
    if os.getppid() != parent:
        sys.exit(f"the SWOP (pid {parent}) ended before {command[0]} could start")
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        sys.exit(f"cannot run {command[0]}: {exc.strerror}")


if __name__ == "__main__":
    main(sys.argv[1:])
