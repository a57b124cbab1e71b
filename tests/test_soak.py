"""A shortened soak (the full one is `python -m bench soak`: 8 peers x 200 rounds): many rounds in a
row leave the SN and SL processes with the same open file descriptors, the SN with about the same
memory, each SL holding no more old blobs than its store's capacity (every peer sends new tensors
every round, so nothing is deduplicated), the ledger growing by the same amount per round, and the
whole ledger still verifying. Latency drift is printed, not asserted (speed is for benchmarks, not tests)."""

from __future__ import annotations

import pytest

from bench.soak import soak

ROUNDS = 100
PAYLOAD_MB = 1.0
# Besides the stored blobs an SL holds a few in flight (the round's contribution being checked in,
# the leader's fetched and decoded contributions, the merged model being served)...
BLOBS_IN_FLIGHT = 8
# ... and the Python runtime, gRPC's buffers and the allocator's fragmentation grow by some tens of MB
# (about 45 MB measured with 1 MB blobs).
RUNTIME_GROWTH_MB = 80


@pytest.mark.slow
def test_many_rounds_leave_no_growth_but_the_ledger():
    report = soak(peers=3, rounds=ROUNDS, mb=PAYLOAD_MB, sample_every=5)
    print({k: v for k, v in report.items() if k != "samples"})
    for key in ("sn_fds", "sl_fds"):
        assert report[key]["last_quarter"] <= report[key]["first_quarter"] + 2, (key, report[key])
    assert report["sn_rss_mb"]["last_quarter"] < report["sn_rss_mb"]["first_quarter"] + 40, report["sn_rss_mb"]
    blobs = report["blobs"]
    # Two new blobs per SL per round (its contribution and the merged model): an SL keeping them all
    # would grow by two blobs a round over the second half, when its store is long full and only drops.
    kept_all_mb = 2 * blobs["rounds_second_half"] * blobs["blob_mb"]
    assert blobs["sl_rss_growth_second_half_mb"] < kept_all_mb / 4, blobs
    stored_mb = (blobs["store_capacity"] + BLOBS_IN_FLIGHT) * blobs["blob_mb"]
    assert blobs["sl_rss_growth_mb"] < stored_mb + RUNTIME_GROWTH_MB, blobs
    per_round = report["ledger_bytes_per_round"]
    assert 0.8 < per_round["last_quarter"] / per_round["first_quarter"] < 1.25, per_round
    assert report["entries"] >= ROUNDS * 4  # every round is on the ledger: 3 check-ins and a merge at least
