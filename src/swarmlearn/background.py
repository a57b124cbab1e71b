"""One owner for a process's background work: the threads and thread pools a component starts are
started through its Background, which stops and joins them all in close(). Nothing is started that
nobody stops, and a thread that does not end in time is named in the log, not forgotten.

Targets watch `stopping` (one Event for the whole owner) and return soon after it is set; pools are
shut down (queued work cancelled) and their workers joined like any other thread.

Every thread here, pool workers included, is a daemon thread: one stuck past close() (a long merge,
an RPC handler in its retries) is named in the log and then cannot hold the process at exit. That is
why the pools are our own: a ThreadPoolExecutor's workers are not daemons (Python 3.9+), and
concurrent.futures joins them at interpreter exit without a timeout."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future

log = logging.getLogger("swarmlearn.background")


class Background:
    """The threads and pools of one component (an SL node, a SWOP, an SN, a follower used on its
    own). `name` prefixes every thread's name, so a stack dump says whose thread it is."""

    def __init__(self, name: str):
        self.name = name
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        # Every thread ever started here, ended ones too (so owns() can say whose a thread was): what
        # an owner starts is bounded (long-lived threads, pools of fixed size), so is this list.
        self._threads: list[threading.Thread] = []
        self._executors: dict[str, DaemonPool] = {}
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

    def executor(self, name: str, workers: int) -> DaemonPool:
        """The pool `name` of at most `workers` threads, made on first use and the same object on
        every later call (so that a pool is reused across rounds, never made per round)."""
        with self._lock:
            self._refuse_if_closed(f"pool {name}")
            pool = self._executors.get(name)
            if pool is None:
                pool = self._executors[name] = DaemonPool(self, name, workers)
            return pool

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
        should not exist, but being daemon threads they do not keep the process from exiting."""
        self.stopping.set()
        with self._lock:
            self._closed = True
            pools = list(self._executors.values())
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        current = threading.current_thread()
        joined: set[threading.Thread] = {current}
        # Again until none is new: a pool may have started a worker for work submitted meanwhile.
        while pending := [t for t in self.threads() if t not in joined]:
            for thread in pending:
                thread.join(max(0.0, deadline - time.monotonic()))
                joined.add(thread)
        stuck = [t.name for t in self.threads() if t is not current]
        for name in stuck:
            log.warning("%s: background thread %s did not end within %.1f s of stop", self.name, name, timeout)
        return stuck


class DaemonPool(Executor):
    """An executor of at most `workers` threads of `owner`, each started when work finds no idle one
    (as ThreadPoolExecutor does) and, unlike its workers, daemon threads (see the module's notes)."""

    def __init__(self, owner: Background, name: str, workers: int):
        self._owner = owner
        self._name = name
        self._max_workers = workers
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._shut = False

    def submit(self, fn: Callable[..., object], /, *args, **kwargs) -> Future:
        with self._lock:
            if self._shut:
                raise RuntimeError(f"{self._owner.name}: pool {self._name} is shut down: no new work")
            if not self._idle.acquire(blocking=False) and len(self._workers) < self._max_workers:
                # Raises RuntimeError, before any work is queued, if the owner closed meanwhile.
                self._workers.append(self._owner.start(f"{self._name}_{len(self._workers)}", self._serve))
            future: Future = Future()
            self._work.put((future, fn, args, kwargs))
        return future

    def _serve(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                self._work.put(None)  # the shutdown mark: passed on, so that every worker ends
                return
            _run(*item)
            del item  # an idle worker holds nothing of its last task
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shut = True
            while cancel_futures:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
            self._work.put(None)
            workers = list(self._workers)
        if wait:
            for worker in workers:
                if worker is not threading.current_thread():
                    worker.join()


def _run(future: Future, fn: Callable[..., object], args: tuple, kwargs: dict) -> None:
    if not future.set_running_or_notify_cancel():
        return  # cancelled while queued
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001  (raised to whoever waits on the future, as any executor does)
        future.set_exception(exc)
    else:
        future.set_result(result)
