"""The process runtime's supervision, with real processes: a node lives as long as the process that
started it (not the thread), dies with it, says it is ready over a pipe, and `swarm stop` finds it
by its pid file without stopping a stranger that took its pid."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import identity, start_sn
from swarmlearn.errors import SwarmError
from swarmlearn.readiness import read_ready_line
from swarmlearn.swop.runtime import ProcessRuntime, Spec, stop_recorded
from test_swop_swci import make_project

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


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


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
    assert alive(pids_in(line)["pid"])
    # What the node starts from now on does not announce in its name.
    assert "after announcing: SWARM_READY_FD=None" in handles[0].last_lines()


# A SWOP or `swarm run` stand-in: starts node1 (supervised or not), says so with the pids, waits.
STARTER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from swarmlearn.swop.runtime import ProcessRuntime, Spec
    workspace, node, supervised = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "supervised"
    handle = ProcessRuntime(workspace, supervised=supervised).start(
        Spec("node1", [sys.executable, "-c", node], Path.cwd(), dict(os.environ), workspace / "node1.log"))
    print(handle.wait_ready(20), f"wrapper={handle.pid}", flush=True)
    time.sleep(300)
""")


def test_a_killed_starter_takes_its_nodes_and_their_children_with_it(procs, tmp_path):
    stubborn = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + NODE  # ends only by SIGKILL
    starter = procs.start([sys.executable, "-c", STARTER, str(tmp_path / "ws"), stubborn, "supervised"])
    pids = pids_in(starter.wait_for_line("node ready:"))
    try:
        assert all(alive(p) for p in pids.values()), pids

        starter.kill(signal.SIGKILL)

        assert wait_until_gone(list(pids.values()), timeout=15) == [], (tmp_path / "ws" / "node1.log").read_text()
    finally:
        kill_left(pids.values())


def test_an_unsupervised_node_outlives_its_starter_and_swarm_stop_still_stops_it(procs, tmp_path):
    starter = procs.start([sys.executable, "-c", STARTER, str(tmp_path / "ws"), NODE, "unsupervised"])
    pids = pids_in(starter.wait_for_line("node ready:"))
    try:
        starter.kill(signal.SIGKILL)
        time.sleep(2.0)  # a wrapper watching a lifeline would have started stopping it by now

        assert all(alive(p) for p in pids.values()), (tmp_path / "ws" / "node1.log").read_text()
        assert stop_recorded(tmp_path / "ws", grace=5) == [("node1", pids["wrapper"])]
        assert wait_until_gone(list(pids.values()), timeout=5) == []
    finally:
        kill_left(pids.values())


def kill_left(pids) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_readiness_comes_over_the_pipe_even_when_the_log_holds_an_old_ready_line(runtime, tmp_path):
    log = tmp_path / "ws" / "node1.log"
    log.parent.mkdir(parents=True)
    log.write_text("node ready: pid=1 grandchild=1 (an earlier run's line, naming processes that are gone)\n")

    handle = runtime.start(spec(tmp_path, "node1", NODE, "1.0"))
    line = handle.wait_ready(20)

    assert pids_in(line)["pid"] != 1 and alive(pids_in(line)["pid"]), line
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
    # Recorded the old way, the pid alone: one of ours (a wrapper without a lifeline) and a stranger
    # that leads a group of its own.
    legacy = subprocess.Popen([sys.executable, "-m", "swarmlearn.swop.launch", "-", "sleep", "300"],
                              start_new_session=True)
    (pid_dir / "legacy.pid").write_text(f"{legacy.pid}\n")
    legacy_stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    (pid_dir / "legacy-stranger.pid").write_text(f"{legacy_stranger.pid}\n")
    try:
        stopped = stop_recorded(tmp_path / "ws", grace=5)

        assert sorted(stopped) == [("legacy", legacy.pid), ("node1", node.pid)]
        assert wait_until_gone([node.pid, *pids.values()], timeout=5) == []
        assert wait_until_gone([legacy.pid], timeout=5) == []
        assert stranger.poll() is None and legacy_stranger.poll() is None
        assert not list(pid_dir.glob("*.pid"))
    finally:
        for proc in (stranger, legacy, legacy_stranger):
            proc.kill()
            proc.wait()


def test_an_ended_handle_leaves_the_pid_file_of_a_newer_run_alone(runtime, tmp_path):
    old = runtime.start(spec(tmp_path, "node1", "pass"))
    old.popen.wait(timeout=20)  # ended, not yet polled: its pid file is still there
    new = runtime.start(spec(tmp_path, "node1", NODE))

    assert old.poll() == 0

    assert (tmp_path / "ws" / "pids" / "node1.pid").read_text().split()[0] == str(new.pid)


def test_a_node_whose_pid_cannot_be_recorded_is_not_left_running(runtime, tmp_path):
    (tmp_path / "ws" / "pids" / "node1.pid").mkdir(parents=True)  # not a file one can write
    pipes_before = open_pipes()

    with pytest.raises(SwarmError, match=r"cannot record node1's pid in .*node1\.pid"):
        runtime.start(spec(tmp_path, "node1", NODE))

    assert open_pipes() == pipes_before
    assert [p for p in psutil.Process().children(recursive=True) if "swarmlearn.swop.launch" in p.cmdline()] == []


def open_pipes() -> set[str]:
    return {link for fd in os.listdir("/proc/self/fd") if (link := fd_link("self", fd)).startswith("pipe:")}


def fd_link(pid: int | str, fd: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return ""


def holds(pid: int, pipe: str) -> bool:
    return any(fd_link(pid, fd) == pipe for fd in os.listdir(f"/proc/{pid}/fd"))


# ------------------------------------------------------------------------------ what a node leaves

LEAVES_CHILDREN = textwrap.dedent("""
    import subprocess, sys
    polite = subprocess.Popen(["sleep", "300"])
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time\\n"
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
                                 "print('ignoring SIGTERM', flush=True)\\ntime.sleep(300)"], stdout=subprocess.PIPE)
    stubborn.stdout.readline()
    print(f"leaving polite={polite.pid} stubborn={stubborn.pid}", flush=True)
""")


def test_what_a_node_leaves_in_its_group_is_stopped_when_it_exits(runtime, tmp_path):
    handle = runtime.start(spec(tmp_path, "node1", LEAVES_CHILDREN))
    try:
        assert exit_code(handle) == 0
        left = pids_in(handle.last_lines())
        assert set(left) == {"polite", "stubborn"}, handle.last_lines()

        assert wait_until_gone(list(left.values()), timeout=2) == []
    finally:
        kill_left(pids_in(handle.last_lines()).values())


def test_a_stopped_node_gets_one_sigterm(runtime, tmp_path):
    counts = textwrap.dedent("""
        import signal, sys, time
        from swarmlearn.readiness import announce_ready
        terms = []
        signal.signal(signal.SIGTERM, lambda *_: (terms.append(1), print("SIGTERM", flush=True)))
        announce_ready("up")
        while not terms:
            time.sleep(0.05)
        time.sleep(1.0)  # a second SIGTERM, if any, arrives meanwhile
        sys.exit(0)
    """)
    handle = runtime.start(spec(tmp_path, "node1", counts))
    handle.wait_ready(20)

    assert handle.stop(grace=10) == 0

    assert handle.last_lines().count("SIGTERM") == 1, handle.last_lines()


def test_a_shell_entrypoint_gets_the_default_sigpipe_and_sigxfsz(runtime, tmp_path):
    script = 'yes | head -1 >/dev/null; echo "yes: ${PIPESTATUS[0]}"; bash -c \'kill -XFSZ $$\'; echo "xfsz: $?"'
    handle = runtime.start(Spec("node1", ["bash", "-c", script], tmp_path, dict(os.environ), tmp_path / "ws" / "n.log"))

    assert exit_code(handle) == 0
    # Killed by the signal, as in a terminal; with it ignored, `yes` would write into a closed pipe forever
    # or stop on an error of its own.
    assert f"yes: {128 + signal.SIGPIPE}" in handle.last_lines()
    assert f"xfsz: {128 + signal.SIGXFSZ}" in handle.last_lines()


# ------------------------------------------------------------------------------ the readiness pipe

def test_the_readiness_pipe_is_held_by_the_program_alone(runtime, tmp_path):
    shares_every_fd = textwrap.dedent("""
        import subprocess, time
        import swarmlearn.readiness
        child = subprocess.Popen(["sleep", "300"], close_fds=False)  # as a shell or os.system would
        print(f"started child={child.pid}", flush=True)
        time.sleep(300)
    """)
    handle = runtime.start(spec(tmp_path, "node1", shares_every_fd))
    pipe = fd_link("self", str(handle.ready_fd))
    deadline = time.monotonic() + 20
    while "started child=" not in handle.last_lines() and time.monotonic() < deadline:
        time.sleep(0.1)
    child = pids_in(handle.last_lines())["child"]
    program = psutil.Process(handle.pid).children()[0].pid

    assert holds(program, pipe)
    assert not holds(handle.pid, pipe), "the wrapper keeps a copy"
    assert not holds(child, pipe), "the program's child inherited it"
    handle.stop(grace=5)


def test_readiness_and_the_lifeline_work_on_fds_numbered_past_1024(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048 and hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"needs 2048 open files; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    ready, lifeline, wrapper = os.pipe(), os.pipe(), None
    try:
        high_ready, high_lifeline = os.dup2(ready[0], 1500), os.dup2(lifeline[0], 1501, inheritable=True)
        os.write(ready[1], b"node ready: on fd 1500\n")
        assert read_ready_line(high_ready, 5) == "node ready: on fd 1500"

        wrapper = subprocess.Popen([sys.executable, "-m", "swarmlearn.swop.launch", str(high_lifeline), "sleep", "300"],
                                   pass_fds=(high_lifeline,), start_new_session=True, stderr=subprocess.PIPE)
        time.sleep(1.0)
        assert wrapper.poll() is None, wrapper.stderr.read()
        os.close(lifeline[1])  # as if its starter died
        assert wrapper.wait(timeout=15) == 128 + signal.SIGTERM
    finally:
        if wrapper is not None and wrapper.poll() is None:
            os.killpg(wrapper.pid, signal.SIGKILL)
            wrapper.wait()
        for fd in (*ready, *lifeline, 1500, 1501):
            try:
                os.close(fd)
            except OSError:
                pass
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_ready_line_that_arrives_in_two_parts_survives_a_timeout_between_them(runtime, tmp_path):
    slow = textwrap.dedent("""
        import os, time
        fd = int(os.environ["SWARM_READY_FD"])
        os.write(fd, b"node ready: first half")
        time.sleep(1.5)
        os.write(fd, b", second half\\n")
        time.sleep(300)
    """)
    handle = runtime.start(spec(tmp_path, "node1", slow))
    time.sleep(0.5)

    with pytest.raises(SwarmError, match="not ready within"):
        handle.wait_ready(0.3)

    assert handle.wait_ready(20) == "node ready: first half, second half"


def test_two_threads_waiting_for_one_node_get_the_same_line(runtime, tmp_path):
    handle = runtime.start(spec(tmp_path, "node1", NODE, "1.0"))
    lines, errors = [], []

    def wait() -> None:
        try:
            lines.append(handle.wait_ready(20))
        except SwarmError as exc:
            errors.append(exc)

    waiters = [threading.Thread(target=wait) for _ in range(2)]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join()

    assert errors == [] and len(lines) == 2 and lines[0] == lines[1] and lines[0].startswith("node ready:"), lines


# ------------------------------------------------------------------------------ the operator

def test_a_stopping_swop_starts_no_node(procs, certs, tmp_path):
    from swarmlearn.swop.operator import Operator, OperatorConfig

    sn = start_sn(procs, certs, tmp_path / "sn")
    usr = make_project(tmp_path, certs)
    operator = Operator(OperatorConfig(identity=identity(certs, "swop"), sn_address=sn.address, usr_dir=usr,
                                       profile_path=usr / "swop" / "swop_profile.yaml", workspace=usr / "runs"))
    operator.stop()  # as the worker thread is about to start a node

    with pytest.raises(SwarmError, match="swop-1 is stopping; node1 not started"):
        operator._start(spec(tmp_path, "node1", NODE))

    assert not (usr / "runs" / "pids" / "node1.pid").exists() and operator.handles == []
