"""An SL stopped while its ML waits in a round ends at once, and tells its ML why."""

from __future__ import annotations

import signal
import time

from swarm_harness import start_sl, stuck_sync
from swarmlearn.errors import SwarmError


def test_an_sl_stopped_mid_round_exits_promptly_and_the_ml_gets_an_error(procs, certs, sn, tmp_path):
    node = start_sl(procs, certs, sn, "node1", tmp_path)
    waiter, outcome = stuck_sync(node)
    started = time.monotonic()
    node.sl.popen.send_signal(signal.SIGTERM)
    assert node.sl.popen.wait(timeout=15) == 0
    assert time.monotonic() - started < 10
    waiter.join(15)
    assert outcome and isinstance(outcome[0], SwarmError)
