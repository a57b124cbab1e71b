"""A shortened soak (the full one is `python -m bench soak`: 8 peers x 200 rounds): many rounds in a
row leave the SN and SL processes with the same open file descriptors and about the same memory,
the ledger grows by the same amount per round, and the whole ledger still verifies. Latency drift is
printed, not asserted (speed is for benchmarks, not tests)."""

from __future__ import annotations

import pytest

from bench.soak import soak


@pytest.mark.slow
def test_many_rounds_leave_no_growth_but_the_ledger():
    report = soak(peers=3, rounds=40, sample_every=4)
    print({k: v for k, v in report.items() if k != "samples"})
    for key in ("sn_fds", "sl_fds"):
        assert report[key]["last_quarter"] <= report[key]["first_quarter"] + 2, (key, report[key])
    for key in ("sn_rss_mb", "sl_rss_mb"):
        assert report[key]["last_quarter"] < report[key]["first_quarter"] + 40, (key, report[key])
    per_round = report["ledger_bytes_per_round"]
    assert 0.8 < per_round["last_quarter"] / per_round["first_quarter"] < 1.25, per_round
    assert report["entries"] >= 40 * 4  # every round is on the ledger: 3 check-ins and a merge at least
