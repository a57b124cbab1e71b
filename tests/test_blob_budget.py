"""An SL's blob store is bounded in bytes, not only in count, and answers a wait for a round's merged
model as soon as it is put there."""

from __future__ import annotations

import threading
import time

from swarmlearn.sl.transport import BlobStore


def test_the_oldest_blobs_go_once_the_store_holds_more_bytes_than_its_budget():
    store = BlobStore(budget=3000, max_blobs=64)
    digests = [store.put(bytes([i]) * 1000) for i in range(5)]
    assert store.held <= 3000
    assert [store.get(d) is not None for d in digests] == [False, False, True, True, True]


def test_the_newest_blob_is_kept_even_when_it_alone_is_over_the_budget():
    store = BlobStore(budget=100)
    small = store.put(b"a" * 50)
    big = store.put(b"b" * 500)
    assert store.get(big) == b"b" * 500
    assert store.get(small) is None
    assert store.held == 500


def test_a_blob_put_twice_is_counted_once():
    store = BlobStore(budget=10_000)
    store.put(b"x" * 1000)
    store.put(b"x" * 1000)
    assert store.held == 1000


def test_a_waiting_peer_gets_the_merged_model_as_soon_as_it_is_put_and_not_before():
    store = BlobStore()
    got: list[bytes | None] = []
    waiter = threading.Thread(target=lambda: got.append(store.wait_labelled(("c", 7), 10.0)))
    waiter.start()
    time.sleep(0.2)
    assert not got
    put_at = time.monotonic()
    store.put(b"merged", label=("c", 7))
    waiter.join(5)
    assert got == [b"merged"] and time.monotonic() - put_at < 1.0


def test_a_wait_for_a_round_never_merged_here_ends_at_its_timeout_with_nothing():
    store = BlobStore()
    store.put(b"other", label=("c", 6))
    started = time.monotonic()
    assert store.wait_labelled(("c", 7), 0.3) is None
    assert 0.25 < time.monotonic() - started < 2.0
