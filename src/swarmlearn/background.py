"""One owner for a process's background work: the threads and thread pools a component starts are
started through its Background, which stops and joins them all in close(). Nothing is started that
nobody stops, and a thread that does not end in time is named in the log, not forgotten.

Targets watch `stopping` (one Event for the whole owner) and return soon after it is set; pools are
shut down (queued work cancelled) and their workers joined like any other thread."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("swarmlearn.background")


class Background:
    """The threads and pools of one component (an SL node, a SWOP, a follower used on its own).
    `name` prefixes every thread's name, so a stack dump says whose thread it is."""

    def __init__(self, name: str):
        self.name = name
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        # Every thread ever started here, ended ones too (so owns() can say whose a thread was): what
        # an owner starts is bounded (long-lived threads, pools of fixed size), so is this list.
        self._threads: list[threading.Thread] = []
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self._closed = False

    def start(self, name: str, target: Callable[..., object], *args, **kwargs) -> threading.Thread:
        """Runs target(*args, **kwargs) in a new thread this owner joins at close(); the target
        should return once `stopping` is set (or once its own work is done)."""
        thread = threading.Thread(target=target, args=args, kwargs=kwargs, name=f"{self.name}-{name}", daemon=True)
        with self._lock:
            self._refuse_if_closed(f"thread {name}")
            self._threads.append(thread)
            thread.start()
        return thread

    def executor(self, name: str, workers: int) -> ThreadPoolExecutor:
        """The pool `name` of at most `workers` threads, made on first use and the same object on
        every later call (so that a pool is reused across rounds, never made per round)."""
        with self._lock:
            self._refuse_if_closed(f"pool {name}")
            pool = self._executors.get(name)
            if pool is None:
                pool = self._executors[name] = ThreadPoolExecutor(
                    max_workers=workers, thread_name_prefix=f"{self.name}-{name}", initializer=self._adopt)
            return pool

    def _adopt(self) -> None:
        """Runs first in every pool worker: the worker is joined at close() like our own threads."""
        with self._lock:
            self._threads.append(threading.current_thread())

    def _refuse_if_closed(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name} is closed: {what} cannot start")

    def threads(self) -> list[threading.Thread]:
        """The threads this owner started (pool workers included) that are still alive."""
        with self._lock:
            return [t for t in self._threads if t.is_alive()]

    def owns(self, thread: threading.Thread) -> bool:
        with self._lock:
            return any(t is thread for t in self._threads)

    def close(self, timeout: float = 5.0) -> list[str]:
        """Sets `stopping`, cancels queued pool work, and joins every thread for up to `timeout`
        seconds in all. Returns the names of the threads still running then, each also logged: they
        are daemon threads, so they cannot keep the process alive, but they should not exist."""
        self.stopping.set()
        with self._lock:
            self._closed = True
            pools = list(self._executors.values())
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        current = threading.current_thread()
        joined: set[threading.Thread] = {current}
        # Again until none is new: a pool worker taking its last task may have been adopted meanwhile.
        while pending := [t for t in self.threads() if t not in joined]:
            for thread in pending:
                thread.join(max(0.0, deadline - time.monotonic()))
                joined.add(thread)
        stuck = [t.name for t in self.threads() if t is not current]
        for name in stuck:
            log.warning("%s: background thread %s did not end within %.1f s of stop", self.name, name, timeout)
        return stuck
