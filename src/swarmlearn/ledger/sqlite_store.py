"""The embedded ledger store: one SQLite file in WAL mode, for a swarm with one SN."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from swarmlearn.errors import HeadMoved, LedgerError
from swarmlearn.ledger.entry import Entry
from swarmlearn.ledger.store import LedgerStore, StoredEntry

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    idx  INTEGER PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    body BLOB NOT NULL
)
"""


class SQLiteStore(LedgerStore):
    # Another process holding the write lock (a racing appender) is waited for this long.
    BUSY_TIMEOUT_MS = 5000
    # How often a waiter looks for entries appended by another process.
    CROSS_PROCESS_POLL = 0.05

    def __init__(self, path: Path, read_only: bool = False):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._appended = threading.Condition(self._lock)
        if read_only and not self.path.is_file():
            raise LedgerError(f"{self.path}: no ledger file there; give the SN's ledger.db or its --data-dir")
        self._db: sqlite3.Connection | None = None
        try:
            target = f"file:{self.path}?mode=ro" if read_only else str(self.path)
            self._db = sqlite3.connect(target, uri=read_only, isolation_level=None, check_same_thread=False,
                                       timeout=self.BUSY_TIMEOUT_MS / 1000)
            if not read_only:
                self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before append returns, so kill -9 or power loss loses nothing
            # that was acknowledged, and WAL replay never yields a torn entry.
            self._db.execute("PRAGMA synchronous=FULL")
            check = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(check)
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "entries" not in tables:
                if read_only or tables:
                    raise sqlite3.DatabaseError("it holds no ledger entries table")
                self._db.execute(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            if self._db is not None:
                self._db.close()
            raise LedgerError(f"{self.path}: not a readable ledger database ({exc}); restore it from a backup "
                              f"or start with an empty --data-dir") from None

    def head(self) -> tuple[int, str] | None:
        with self._lock:
            row = self._db.execute("SELECT idx, hash FROM entries ORDER BY idx DESC LIMIT 1").fetchone()
        return (row[0], row[1]) if row else None

    def append_if_head_is(self, expected_hash: str | None, entry: Entry) -> None:
        self.append_all_if_head_is(expected_hash, [entry])

    def append_all_if_head_is(self, expected_hash: str | None, entries: list[Entry]) -> None:
        """Appends `entries` (consecutive, the first following the head) in one transaction, only if the
        head's hash is `expected_hash`: all or none, on disk (one fsync for all) before it returns. An
        SN commits the submits that queued up during the last fsync together this way (ledger/chain.py)."""
        rows = [(entry.index, entry.hash, entry.body_bytes()) for entry in entries]
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise LedgerError(f"{self.path}: cannot write the ledger ({exc})") from None
            try:
                row = self._db.execute("SELECT idx, hash FROM entries ORDER BY idx DESC LIMIT 1").fetchone()
                head_hash = row[1] if row else None
                head_index = row[0] if row else -1
                if head_hash != expected_hash or rows[0][0] != head_index + 1:
                    raise HeadMoved(f"ledger head is {head_index}:{(head_hash or '-')[:12]}, "
                                    f"not {(expected_hash or '-')[:12]}")
                if [index for index, _, _ in rows] != list(range(head_index + 1, head_index + 1 + len(rows))):
                    raise LedgerError(f"{self.path}: entries to append are not consecutive from {head_index + 1}")
                self._db.executemany("INSERT INTO entries (idx, hash, body) VALUES (?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException as exc:
                # A failed write (disk full, I/O error) may already have rolled the transaction back.
                if self._db.in_transaction:
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # the write error below is the one to report
                if isinstance(exc, sqlite3.Error):
                    raise LedgerError(f"{self.path}: cannot write the ledger ({exc}); check free space and "
                                      f"permissions of the data dir") from None
                raise
            self._appended.notify_all()

    def append_rows(self, rows: list[StoredEntry]) -> None:
        """Appends entries as stored elsewhere (a backup being written), in one transaction: one fsync for
        the batch, not one per entry. The caller verified them; this checks only that they continue the
        head, index after index."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                head = self._db.execute("SELECT idx FROM entries ORDER BY idx DESC LIMIT 1").fetchone()
                expected = head[0] + 1 if head else 0
                for offset, row in enumerate(rows):
                    if row.index != expected + offset:
                        raise LedgerError(f"{self.path}: entry {row.index} does not follow entry "
                                          f"{expected + offset - 1}; copy a ledger from its first entry on")
                self._db.executemany("INSERT INTO entries (idx, hash, body) VALUES (?, ?, ?)",
                                     [(row.index, row.hash, row.body) for row in rows])
                self._db.execute("COMMIT")
            except BaseException as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise LedgerError(f"{self.path}: cannot write the ledger ({exc}); check free space and "
                                      f"permissions of its folder") from None
                raise
            self._appended.notify_all()

    def read_raw(self, start: int = 0, limit: int | None = None) -> list[StoredEntry]:
        with self._lock:
            rows = self._db.execute("SELECT idx, hash, body FROM entries WHERE idx >= ? ORDER BY idx LIMIT ?",
                                    (start, -1 if limit is None else limit)).fetchall()
        return [StoredEntry(i, h, bytes(b)) for i, h, b in rows]

    def wait_for(self, index: int, timeout: float) -> bool:
        # Appends made through this object wake the condition at once; appends from another process
        # are found by polling.
        deadline = time.monotonic() + timeout
        with self._appended:
            while True:
                head = self.head()
                if head is not None and head[0] >= index:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._appended.wait(min(self.CROSS_PROCESS_POLL, remaining))

    def close(self) -> None:
        with self._lock:
            self._db.close()
