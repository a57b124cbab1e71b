"""A component's Background owns its threads and pools: close() stops and joins them all, names the
one that will not end, and leaves no pool able to take work."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from swarmlearn.background import Background


def test_close_joins_every_thread_that_watches_stop():
    owner = Background("sl-node1")
    beats = [owner.start(f"beat-{i}", owner.stopping.wait) for i in range(3)]
    assert all(t.is_alive() for t in beats)
    assert [t.name for t in beats] == ["sl-node1-beat-0", "sl-node1-beat-1", "sl-node1-beat-2"]

    assert owner.close(timeout=5) == []
    assert not any(t.is_alive() for t in beats)
    assert owner.threads() == []


def test_a_thread_that_ignores_stop_is_named_in_the_log_and_does_not_hold_close(caplog):
    owner = Background("swop-1")
    release = threading.Event()
    stubborn = owner.start("stubborn", release.wait)
    polite = owner.start("polite", owner.stopping.wait)
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="swarmlearn.background"):
            stuck = owner.close(timeout=0.5)
        assert time.monotonic() - started < 3
        assert stuck == ["swop-1-stubborn"]
        assert "background thread swop-1-stubborn did not end within 0.5 s" in caplog.text
        assert not polite.is_alive()
        assert stubborn.is_alive()
    finally:
        release.set()
        stubborn.join(5)


def test_an_owned_pool_is_reused_then_shut_down_with_queued_work_cancelled():
    owner = Background("sl-node2")
    pool = owner.executor("merge", 1)
    assert owner.executor("merge", 1) is pool
    began, gate = threading.Event(), threading.Event()
    running = pool.submit(lambda: began.set() or gate.wait(10))
    assert began.wait(5)  # running, not queued, when the owner closes
    queued = pool.submit(lambda: "never")
    workers = owner.threads()
    assert [t.name for t in workers] == ["sl-node2-merge_0"]

    closer = threading.Thread(target=owner.close, kwargs={"timeout": 5})
    closer.start()
    assert owner.stopping.wait(5)
    gate.set()
    closer.join(5)
    assert running.result(timeout=1) is True
    assert queued.cancelled()
    assert not workers[0].is_alive()
    with pytest.raises(RuntimeError):
        pool.submit(print)


def test_nothing_starts_once_the_owner_is_closed():
    owner = Background("sl-node3")
    owner.close()
    with pytest.raises(RuntimeError, match="sl-node3 is closed"):
        owner.start("late", print)
    with pytest.raises(RuntimeError, match="sl-node3 is closed"):
        owner.executor("late", 1)


def test_a_process_whose_pool_task_never_ends_still_exits_promptly_after_close():
    """A merge that never converges, or an RPC handler stuck in its retries, is named by close() and
    then does not hold the process at exit (ThreadPoolExecutor's workers would: exit joins them)."""
    script = textwrap.dedent("""
        import threading
        from swarmlearn.background import Background

        owner = Background("sl-node4")
        running = threading.Event()
        owner.executor("merge", 1).submit(lambda: (running.set(), threading.Event().wait()))
        assert running.wait(5)
        print("stuck:", owner.close(timeout=0.5), flush=True)
    """)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        output, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert "stuck: ['sl-node4-merge_0']" in output
    assert time.monotonic() - started < 10
