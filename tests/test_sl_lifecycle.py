"""An SL stopped while its ML waits in a round ends at once, and tells its ML why."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np

from swarm_harness import start_sl
from swarmlearn.callback.core import SLChannel
from swarmlearn.errors import SwarmError
from swarmlearn.tensors import Tensor, encode


def test_an_sl_stopped_mid_round_exits_promptly_and_the_ml_gets_an_error(procs, certs, sn, tmp_path):
    node = start_sl(procs, certs, sn, "node1", tmp_path)
    channel = SLChannel(node.ml_addr)
    channel.join("default", 2, 1.0, "mean")  # needs a second peer that never comes
    outcome: list[BaseException | None] = []

    def sync():
        try:
            channel.sync(encode({"w": Tensor("F32", np.ones(4, dtype=np.float32))}), 1.0)
            outcome.append(None)
        except SwarmError as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=sync)
    waiter.start()
    node.sl.wait_for_line("checked in")
    started = time.monotonic()
    node.sl.popen.send_signal(signal.SIGTERM)
    assert node.sl.popen.wait(timeout=15) == 0
    assert time.monotonic() - started < 10
    waiter.join(15)
    assert outcome and isinstance(outcome[0], SwarmError)
    channel.close()
