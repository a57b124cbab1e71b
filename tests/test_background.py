"""A component's Background owns its threads and pools: close() stops and joins them all, names the
one that will not end, and leaves no pool able to take work."""

from __future__ import annotations

import logging
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
    gate = threading.Event()
    running = pool.submit(gate.wait, 10)
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
