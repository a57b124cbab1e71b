"""The process runtime's supervision, with real processes: a node lives as long as the process that
started it (not the thread), dies with it, says it is ready over a pipe, and `swarm stop` finds it
by its pid file without stopping a stranger that took its pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from swarmlearn.errors import SwarmError
from swarmlearn.swop.runtime import ProcessRuntime, Spec, _alive, stop_recorded

# A node stand-in: starts a grandchild in its group, says it is ready with the pids of both, waits.
NODE = textwrap.dedent("""
    import os, subprocess, sys, time
    from swarmlearn.readiness import announce_ready
    grandchild = subprocess.Popen(["sleep", "300"])
    print("loading", flush=True)
    time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0)
    announce_ready(f"node ready: pid={os.getpid()} grandchild={grandchild.pid}")
    print(f"after announcing: SWARM_READY_FD={os.environ.get('SWARM_READY_FD')}", flush=True)
    time.sleep(300)
""")


@pytest.fixture
def runtime(tmp_path):
    """A runtime whose processes are all stopped, by their recorded pids, when the test ends."""
    workspace = tmp_path / "ws"
    yield ProcessRuntime(workspace)
    stop_recorded(workspace, grace=2)


def spec(tmp_path: Path, name: str, code: str, *args: str) -> Spec:
    return Spec(name, [sys.executable, "-c", code, *args], tmp_path, {**os.environ, "PYTHONUNBUFFERED": "1"},
                tmp_path / "ws" / f"{name}.log")


def pids_in(line: str) -> dict[str, int]:
    return {k: int(v) for k, v in (f.split("=") for f in line.split() if "=" in f and f.split("=")[1].isdigit())}


def exit_code(handle, timeout: float = 30) -> int:
    try:
        return handle.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{handle.spec.name} still running after {timeout} s:\n{handle.last_lines()}") from None


def wait_until_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def test_a_node_started_from_a_thread_that_ends_keeps_running(runtime, tmp_path):
    handles, lines = [], []

    def start_and_wait_until_ready():  # as the operator does, in a thread that then ends
        handles.append(runtime.start(spec(tmp_path, "node1", NODE)))
        lines.append(handles[0].wait_ready(20))

    starter = threading.Thread(target=start_and_wait_until_ready)
    starter.start()
    starter.join()
    time.sleep(1.0)  # a parent-death signal tied to the starting thread would have struck by now

    line = lines[0]

    assert handles[0].poll() is None, handles[0].last_lines()
    assert _alive(pids_in(line)["pid"])
    # What the node starts from now on does not announce in its name.
    assert "after announcing: SWARM_READY_FD=None" in handles[0].last_lines()


def test_a_killed_starter_takes_its_nodes_and_their_children_with_it(procs, tmp_path):
    stubborn = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + NODE  # ends only by SIGKILL
    starter = procs.start([sys.executable, "-c", textwrap.dedent("""
        import os, sys, time
        from pathlib import Path
        from swarmlearn.swop.runtime import ProcessRuntime, Spec
        workspace, node = Path(sys.argv[1]), sys.argv[2]
        handle = ProcessRuntime(workspace).start(
            Spec("node1", [sys.executable, "-c", node], Path.cwd(), dict(os.environ), workspace / "node1.log"))
        print(handle.wait_ready(20), f"wrapper={handle.pid}", flush=True)
        time.sleep(300)
    """), str(tmp_path / "ws"), stubborn])
    pids = pids_in(starter.wait_for_line("node ready:"))
    try:
        assert all(_alive(p) for p in pids.values()), pids

        starter.kill(signal.SIGKILL)

        assert wait_until_gone(list(pids.values()), timeout=15) == [], (tmp_path / "ws" / "node1.log").read_text()
    finally:
        for pid in pids.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_readiness_comes_over_the_pipe_even_when_the_log_holds_an_old_ready_line(runtime, tmp_path):
    log = tmp_path / "ws" / "node1.log"
    log.parent.mkdir(parents=True)
    log.write_text("node ready: pid=1 grandchild=1 (an earlier run's line, naming processes that are gone)\n")

    handle = runtime.start(spec(tmp_path, "node1", NODE, "1.0"))
    line = handle.wait_ready(20)

    assert pids_in(line)["pid"] != 1 and _alive(pids_in(line)["pid"]), line
    assert handle.wait_ready(0) == line  # asked again, the same answer


def test_a_ready_line_is_kept_for_a_node_that_ended_before_anyone_asked(runtime, tmp_path):
    handle = runtime.start(spec(tmp_path, "build", "from swarmlearn.readiness import announce_ready\n"
                                                   "announce_ready('build ready: nothing to install')"))
    handle.popen.wait(timeout=20)

    assert handle.poll() == 0  # closes its readiness pipe, keeping what was in it
    assert handle.ready_fd is None
    assert handle.wait_ready(1) == "build ready: nothing to install"


def test_a_node_that_exits_before_it_is_ready_fails_with_its_last_log_lines(runtime, tmp_path):
    code = "import sys; print('reading the profile'); sys.exit('no data in /nowhere: set DATA_DIR')"
    handle = runtime.start(spec(tmp_path, "node1", code))

    with pytest.raises(SwarmError) as failed:
        handle.wait_ready(20)

    assert "node1 exited with code 1 before it was ready" in str(failed.value)
    assert "no data in /nowhere: set DATA_DIR" in str(failed.value)


def test_a_node_that_never_says_it_is_ready_times_out(runtime, tmp_path):
    handle = runtime.start(spec(tmp_path, "node1", "import time; print('thinking', flush=True); time.sleep(300)"))
    started = time.monotonic()

    with pytest.raises(SwarmError, match="node1 not ready within 1 s") as slow:
        handle.wait_ready(1.0)

    assert time.monotonic() - started < 5
    assert "thinking" in str(slow.value)
    assert handle.poll() is None  # the caller decides what to do with it
    assert handle.stop(grace=5) == 128 + signal.SIGTERM


def test_the_wrapper_passes_signals_on_and_returns_the_programs_exit_code(runtime, tmp_path):
    graceful = "import signal, sys, time\n" \
               "signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\n" \
               "from swarmlearn.readiness import announce_ready\nannounce_ready('up')\ntime.sleep(300)"
    handle = runtime.start(spec(tmp_path, "node1", graceful))
    handle.wait_ready(20)

    os.kill(handle.pid, signal.SIGTERM)  # to the wrapper alone, not its group

    assert exit_code(handle) == 7
    killed = runtime.start(spec(tmp_path, "node2", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))
    assert exit_code(killed) == 128 + signal.SIGKILL


def test_swarm_stop_stops_recorded_groups_and_skips_a_pid_that_another_process_took(runtime, tmp_path):
    node = runtime.start(spec(tmp_path, "node1", NODE))
    pids = pids_in(node.wait_ready(20))
    pid_dir = tmp_path / "ws" / "pids"
    stranger = subprocess.Popen(["sleep", "300"])  # holds a pid recorded with another start time
    (pid_dir / "reused.pid").write_text(f"{stranger.pid} {psutil.Process(stranger.pid).create_time() - 3600!r}\n")
    legacy = subprocess.Popen(["sleep", "300"], start_new_session=True)  # recorded the old way: the pid alone
    (pid_dir / "legacy.pid").write_text(f"{legacy.pid}\n")
    try:
        stopped = stop_recorded(tmp_path / "ws", grace=5)

        assert sorted(stopped) == [("legacy", legacy.pid), ("node1", node.pid)]
        assert wait_until_gone([node.pid, *pids.values()], timeout=5) == []
        assert wait_until_gone([legacy.pid], timeout=5) == []
        assert stranger.poll() is None
        assert not list(pid_dir.glob("*.pid"))
    finally:
        for proc in (stranger, legacy):
            proc.kill()
            proc.wait()
