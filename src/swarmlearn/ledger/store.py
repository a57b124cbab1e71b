"""The narrow interface every ledger store implements, and the watch loop built on it.

A store only stores: it knows indexes, hashes and bytes, never what an entry means. A new store
(etcd, ...) implements the five abstract methods and passes tests/test_store_conformance.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from swarmlearn.ledger.entry import Entry


@dataclass(frozen=True)
class StoredEntry:
    index: int
    hash: str
    body: bytes

    def entry(self) -> Entry:
        return Entry.from_body_bytes(self.body)


class LedgerStore(ABC):
    @abstractmethod
    def head(self) -> tuple[int, str] | None:
        """(index, hash) of the last entry, or None when the store is empty."""

    @abstractmethod
    def append_if_head_is(self, expected_hash: str | None, entry: Entry) -> None:
        """Appends `entry` only if the head's hash is `expected_hash` (None: the store is empty).
        Of two racing appends on the same head exactly one succeeds; the other raises HeadMoved.
        Raises LedgerError if the store cannot write."""

    @abstractmethod
    def read_raw(self, start: int = 0, limit: int | None = None) -> list[StoredEntry]:
        """Entries from index `start` on, in order, as stored."""

    @abstractmethod
    def wait_for(self, index: int, timeout: float) -> bool:
        """Blocks until an entry with `index` exists or `timeout` seconds pass; True if it exists."""

    @abstractmethod
    def close(self) -> None:
        ...

    def read(self, start: int = 0, limit: int | None = None) -> list[Entry]:
        return [row.entry() for row in self.read_raw(start, limit)]

    def watch(self, start: int, should_stop: Callable[[], bool], batch: int = 256,
              poll: float = 0.5) -> Iterator[StoredEntry]:
        """Yields stored entries from `start` on as they arrive, until `should_stop()` is true."""
        next_index = start
        while not should_stop():
            if not self.wait_for(next_index, poll):
                continue
            for row in self.read_raw(next_index, batch):
                yield row
                next_index = row.index + 1
