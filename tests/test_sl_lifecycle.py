"""An SL stopped while its ML waits in a round ends at once, and tells its ML why; an SL that runs
round after round does so on the threads it owns, and leaves none behind when it stops."""

from __future__ import annotations

import signal
import sys
import threading
import time

import numpy as np

from conftest import identity
from swarm_harness import start_sl, stuck_sync
from swarmlearn.callback.core import SLChannel
from swarmlearn.errors import SwarmError
from swarmlearn.sl.node import SLConfig, SLNode
from swarmlearn.sl.round import Timeouts
from swarmlearn.tensors import Tensor, encode


def test_an_sl_stopped_mid_round_exits_promptly_and_the_ml_gets_an_error(procs, certs, sn, tmp_path):
    node = start_sl(procs, certs, sn, "node1", tmp_path)
    waiter, outcome = stuck_sync(node)
    started = time.monotonic()
    node.sl.popen.send_signal(signal.SIGTERM)
    assert node.sl.popen.wait(timeout=15) == 0
    assert time.monotonic() - started < 10
    waiter.join(15)
    assert outcome and isinstance(outcome[0], SwarmError)


# ------------------------------------------------------------------ threads: bounded, owned, gone at stop

ROUNDS = 8
WARM_UP_ROUNDS = 2


class ThreadStarts:
    """Records every thread started through `threading` while in use, with its target's module
    (taken at start: a thread drops its target once it has run)."""

    def __init__(self) -> None:
        self.started: list[tuple[threading.Thread, str]] = []

    def _hook(self, frame, event, arg) -> None:
        sys.setprofile(None)  # one call per new thread is all we need
        thread = threading.current_thread()
        self.started.append((thread, getattr(getattr(thread, "_target", None), "__module__", "") or ""))

    def __enter__(self) -> ThreadStarts:
        threading.setprofile(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        threading.setprofile(None)


def _not_grpcs(started: list[tuple[threading.Thread, str]]) -> list[threading.Thread]:
    # gRPC's Python layer runs its own helper threads (one per channel with calls under way, one
    # per server); ledger-pin is PinFile's write timer (ledger/pin.py), not a thread of this change.
    return [t for t, module in started if not module.startswith("grpc") and t.name != "ledger-pin"]


def _run_rounds(node: SLNode, peer, starts: ThreadStarts) -> tuple[list[list[int]], list[threading.Thread]]:
    """Two MLs, ours and `peer`'s, sync ROUNDS times; returns the rounds each saw and the threads
    started (not by gRPC) once the first WARM_UP_ROUNDS were over."""
    blob = encode({"w": Tensor("F32", np.ones(4, dtype=np.float32))})
    channels = [SLChannel(node.ml_addr, ready_timeout=5), SLChannel(peer.ml_addr, ready_timeout=5)]
    results: list[list[int]] = [[], []]

    def ml(channel: SLChannel, rounds: list[int]) -> None:
        for _ in range(ROUNDS):
            rounds.append(channel.sync(blob, 1.0)[0].round)

    try:
        for channel in channels:
            channel.join("default", 2, 1.0, "mean")
        mls = [threading.Thread(target=ml, args=pair, daemon=True) for pair in zip(channels, results)]
        for thread in mls:
            thread.start()
        deadline = time.monotonic() + 60
        while len(results[0]) < WARM_UP_ROUNDS and time.monotonic() < deadline:
            time.sleep(0.05)
        warm = len(starts.started)
        for thread in mls:
            thread.join(60)
        return results, _not_grpcs(starts.started[warm:])
    finally:
        for channel in channels:
            channel.close()


def test_an_sl_runs_round_after_round_on_threads_it_owns_and_leaves_none_behind(procs, certs, sn, tmp_path):
    """The SL's prefetch, merge, transfer and heartbeat work runs on threads its Background started
    and bounded: rounds reuse them (thread-per-round code fails here) and stop() joins every one."""
    peer = start_sl(procs, certs, sn, "node2", tmp_path)
    node = SLNode(SLConfig(node_id="node1", identity=identity(certs, "sl", "node1"), sn_address=sn.address,
                           fs_port=0, data_dir=tmp_path / "sl-node1", timeouts=Timeouts(checkin_wait=1)))
    with ThreadStarts() as starts:
        node.start()
        try:
            results, during_rounds = _run_rounds(node, peer, starts)
        finally:
            node.stop()
    assert results[0] == results[1] and len(results[0]) == ROUNDS, f"rounds {results}\n--- node2 SL\n{peer.sl.output}"
    assert [t.name for t in during_rounds if not node.background.owns(t)] == []
    assert node.background.threads() == []
    assert [t.name for t in _not_grpcs(starts.started) if t.is_alive()] == []
