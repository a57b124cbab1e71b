"""Backing up a ledger and restoring it: one format whatever the store, checked on the way out and in.

A backup is an SQLite file laid out as an SN's ledger.db (the `entries` table, each body as stored), in
rollback-journal mode so that it is one self-contained file to copy elsewhere. Every entry is verified
as `swarm ledger verify` does it (hash, link, signature, the state machine) when the backup is written,
and again, on the very bytes that are installed, before a restore writes anything.

- SQLite: SQLite's backup API copies ledger.db inside one read transaction: a consistent snapshot even
  while the SN appends. A restore copies the backup into a temp file in the data dir, verifies it and
  renames it over ledger.db; a ledger already there is replaced only when asked, and kept aside.
- etcd: the entries up to the head read at the start are copied. Entries are written once and never
  change, so reading them in batches still gives one consistent chain. A restore writes into an empty
  prefix only, the entries first and the head last, each transaction guarded by "no head yet", so an
  SN that wrote there meanwhile makes the restore fail rather than mix two histories.

A restored ledger holds the history it holds, no more. A backup older than what an SN acknowledged
(swarm.json) or a follower verified (its pin) is refused by them (ledger/pin.py); taking the shorter
history is the operator's visible act, never done here (README, "The ledger is lost and restored from
a backup").
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from swarmlearn.errors import ConfigError, LedgerError
from swarmlearn.files import sync_folder
from swarmlearn.ledger.chain import ChainBroken, ChainVerifier
from swarmlearn.ledger.pin import HistoryRefused, PinFile, check_marker
from swarmlearn.ledger.sqlite_store import SQLiteStore
from swarmlearn.ledger.store import LedgerStore, StoredEntry

if TYPE_CHECKING:
    from swarmlearn.ledger.etcd_store import EtcdStore

# Entries read, verified and written per batch: bounded memory whatever the ledger's length.
BATCH = 256
# SQLite's files of one database: the file itself, its write-ahead log, its shared-memory index.
SQLITE_SIDE_FILES = ("", "-wal", "-shm")


@dataclass(frozen=True)
class LedgerCopy:
    """What a backup or a restore copied: every entry, verified."""

    entries: int
    head_hash: str
    swarm_id: str
    # restore --force: the ledger that was replaced, kept under this name (with its -wal beside it).
    kept_as: Path | None = None
    # The SN's swarm.json records more (or other) history than was restored: why it will refuse it.
    refused_by_marker: str | None = None


# ------------------------------------------------------------------------------------------------ backup


def backup_sqlite(ledger_path: Path, out: Path, overwrite: bool = False) -> LedgerCopy:
    """Copies the ledger file `ledger_path` (an SN may be running on it) into the backup `out`."""
    if not ledger_path.is_file():
        raise LedgerError(f"{ledger_path}: no ledger there; give the --data-dir of an SN that keeps its ledger in "
                          f"SQLite (for an SN on etcd, back up with --etcd-endpoints and --etcd-prefix)")
    staged = _staging_for(out, overwrite)
    try:
        _sqlite_copy(ledger_path, staged)
        copy = _verified_file(staged, str(ledger_path))
        _install(staged, out)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return copy


def backup_etcd(store: EtcdStore, out: Path, overwrite: bool = False) -> LedgerCopy:
    """Copies the ledger under `store`'s prefix, up to the head it has now, into the backup `out`."""
    name = f"etcd ledger {store.prefix}"
    head = store.head()
    if head is None:
        raise LedgerError(f"{name} has no head: there is no ledger under that prefix to back up; check "
                          f"--etcd-prefix (the SNs' own)")
    staged = _staging_for(out, overwrite)
    try:
        verifier = ChainVerifier()
        written = SQLiteStore(staged)
        try:
            for rows in _verified_batches(store, head[0], name, verifier):
                written.append_rows(rows)
        finally:
            written.close()
        if verifier.state.head_hash != head[1]:
            raise LedgerError(f"{name}: its head key names entry {head[0]} {head[1][:12]}, but that entry hashes to "
                              f"{verifier.state.head_hash[:12]}: something other than an SN wrote there; no backup "
                              f"was written")
        _to_one_file(staged)
        _install(staged, out)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return _copy_of(verifier)


# ------------------------------------------------------------------------------------------------ restore


def restore_sqlite(backup: Path, ledger_path: Path, marker_path: Path | None = None,
                   force: bool = False) -> LedgerCopy:
    """Installs the verified backup as the ledger file `ledger_path` (its SN stopped). A ledger already
    there is replaced only with `force`, and kept aside. With `marker_path` (the SN's swarm.json), says
    in the result whether the SN will refuse the restored history."""
    present = [Path(f"{ledger_path}{side}") for side in SQLITE_SIDE_FILES if Path(f"{ledger_path}{side}").exists()]
    if present and not _holds_entries(ledger_path):
        # What an SN refusing a lost ledger leaves behind: an empty ledger.db, nothing to keep.
        for path in present:
            path.unlink()
        present = []
    if present and not force:
        raise LedgerError(f"{present[0]} exists: a ledger is there already and restoring would replace it; check it "
                          f"with `swarm ledger verify {ledger_path.parent}`, and if it is to go, add --force (it is "
                          f"kept as {ledger_path.name}.replaced-<time>)")
    try:
        ledger_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{ledger_path.parent}: cannot create the SN data dir ({exc.strerror}); choose another "
                          f"one") from None
    staged = ledger_path.with_name(f".{ledger_path.name}.restore-{os.getpid()}.tmp")
    try:
        _sqlite_copy(backup, staged)
        copy = _verified_file(staged, str(backup))
        kept = _set_aside(ledger_path) if present else None
        _install(staged, ledger_path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    refusal = _marker_refusal(ledger_path, marker_path) if marker_path is not None else None
    return replace(copy, kept_as=kept, refused_by_marker=refusal)


def restore_etcd(backup: Path, store: EtcdStore) -> LedgerCopy:
    """Writes the verified backup under `store`'s prefix, which must hold no key at all: entries first,
    then the head."""
    name = f"etcd ledger {store.prefix}"
    if store.holds_keys():
        raise LedgerError(f"{name} holds keys already: a backup is restored into an empty prefix only, never over or "
                          f"beside another ledger; choose a new --etcd-prefix (and start the SNs with it)")
    with tempfile.TemporaryDirectory(prefix="swarm-restore-") as folder:
        staged = Path(folder) / "ledger.db"
        _sqlite_copy(backup, staged)
        copy = _verified_file(staged, str(backup))
        source = SQLiteStore(staged, read_only=True)
        try:
            for rows in _batches_that_fit(source, store.max_entry_bytes):
                store.put_restored(rows)
        finally:
            source.close()
    store.put_restored_head(copy.entries - 1, copy.head_hash)
    return copy


# ------------------------------------------------------------------------------------------------ helpers


def _verified_batches(source: LedgerStore, last_index: int, name: str,
                      verifier: ChainVerifier) -> Iterator[list[StoredEntry]]:
    """The entries 0..last_index of `source` in batches, each entry verified by `verifier` before its
    batch is given out."""
    start = 0
    while start <= last_index:
        rows = source.read_raw(start, min(BATCH, last_index + 1 - start))
        if not rows:
            raise LedgerError(f"{name} ends at entry {start - 1}, short of its head {last_index}: entries went away "
                              f"while it was read; find out what removes them before backing it up")
        for row in rows:
            try:
                verifier.verify_next(row)
            except ChainBroken as exc:
                raise LedgerError(f"{name}: entry {exc.index}: {exc.reason}; nothing was copied: that ledger was "
                                  f"edited or damaged (`swarm ledger verify` shows the same); use another copy of "
                                  f"it") from None
        yield rows
        start = rows[-1].index + 1


def _verified_file(path: Path, name: str) -> LedgerCopy:
    """Verifies the whole ledger file `path` (`name`: what the user gave, for messages)."""
    store = SQLiteStore(path, read_only=True)
    try:
        head = store.head()
        if head is None:
            raise LedgerError(f"{name} holds no entries, not even a genesis: it is no SN's ledger; give another file")
        verifier = ChainVerifier()
        for _ in _verified_batches(store, head[0], name, verifier):
            pass
    finally:
        store.close()
    return _copy_of(verifier)


def _copy_of(verifier: ChainVerifier) -> LedgerCopy:
    state = verifier.state
    return LedgerCopy(state.head_index + 1, state.head_hash, (state.genesis or {}).get("swarm_id", ""))


def _batches_that_fit(source: LedgerStore, max_request_body: int) -> Iterator[list[StoredEntry]]:
    """The entries of `source` in groups that one etcd transaction takes (its puts, its request size)."""
    from swarmlearn.ledger.etcd_store import MAX_TXN_OPS

    group: list[StoredEntry] = []
    size = 0
    start = 0
    while rows := source.read_raw(start, BATCH):
        for row in rows:
            if group and (len(group) == MAX_TXN_OPS or size + len(row.body) > max_request_body):
                yield group
                group, size = [], 0
            group.append(row)
            size += len(row.body)
        start = rows[-1].index + 1
    if group:
        yield group


def _sqlite_copy(source: Path, dest: Path) -> None:
    """A consistent copy of the SQLite database `source` (read-only; a writer may be at work) as the one
    file `dest`."""
    if not source.is_file():
        raise ConfigError(f"{source}: no such file; give a backup made by `swarm ledger backup`")
    try:
        reader = sqlite3.connect(source.resolve().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise LedgerError(f"{source}: cannot open it ({exc}); check its permissions") from None
    try:
        writer = sqlite3.connect(dest)
        try:
            reader.backup(writer)
        finally:
            writer.close()
        _to_one_file(dest)
    except sqlite3.Error as exc:
        raise LedgerError(f"{source}: cannot copy it ({exc}); is it a ledger (`swarm ledger verify {source}`), and is "
                          f"there room beside {dest.name}?") from None
    finally:
        reader.close()


def _to_one_file(path: Path) -> None:
    """Rollback-journal mode: the database is this one file, with no -wal or -shm beside it."""
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA journal_mode=DELETE")
    finally:
        db.close()


def _staging_for(out: Path, overwrite: bool) -> Path:
    """The temp file beside `out` that a backup is written to before it takes `out`'s name."""
    if out.is_dir():
        raise ConfigError(f"{out} is a folder; name the backup file, e.g. {out / 'ledger-backup.db'}")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; choose another name for the backup, or add --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{out.parent}: cannot create the backup's folder ({exc.strerror}); choose another") from None
    staged = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    staged.unlink(missing_ok=True)
    return staged


def _install(staged: Path, dest: Path) -> None:
    """Gives the complete, synced file `staged` the name `dest` in one step: a crash leaves the old
    file or the new one, never a torn one."""
    with open(staged, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(staged, dest)
    sync_folder(dest.parent)


def _holds_entries(ledger_path: Path) -> bool:
    """Whether the ledger file holds an entry, or anything else worth keeping (unreadable, a lone -wal)."""
    if not ledger_path.exists():
        return True
    try:
        store = SQLiteStore(ledger_path, read_only=True)
    except LedgerError:
        return True
    try:
        return store.head() is not None
    finally:
        store.close()


def _set_aside(ledger_path: Path) -> Path:
    """Moves the ledger file (and its -wal, which holds committed entries) to ledger.db.replaced-<time>,
    where `swarm ledger verify` and `show` still read it; refuses while a process (its SN) has it open."""
    if ledger_path.exists():
        _refuse_if_open(ledger_path)
    kept = ledger_path.with_name(f"{ledger_path.name}.replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    for side in ("", "-wal"):
        old = Path(f"{ledger_path}{side}")
        if old.exists():
            os.replace(old, Path(f"{kept}{side}"))
    Path(f"{ledger_path}-shm").unlink(missing_ok=True)  # an index SQLite rebuilds from the -wal
    return kept


def _refuse_if_open(ledger_path: Path) -> None:
    # An exclusive lock cannot be had while another connection (a running SN) holds the WAL database open.
    db = sqlite3.connect(ledger_path, timeout=0, isolation_level=None)
    try:
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        db.execute("BEGIN EXCLUSIVE")
        db.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise LedgerError(f"{ledger_path} is open in another process (its SN still running?); stop the SN, "
                              f"then restore") from None
    except sqlite3.DatabaseError:
        pass  # not a database at all: nothing can be using it as one, and it is kept aside as it is
    finally:
        db.close()


def _marker_refusal(ledger_path: Path, marker_path: Path) -> str | None:
    """Why the SN will refuse the restored ledger given its swarm.json, or None when it accepts it."""
    try:
        marker = PinFile(marker_path).load()
    except LedgerError as exc:
        return str(exc)
    if marker is None:
        return None
    store = SQLiteStore(ledger_path, read_only=True)
    try:
        head = store.head()
        check_marker(marker, head[0] if head else -1, lambda index: store.read_raw(index, 1)[0].hash, ledger_path,
                     marker_path)
    except HistoryRefused as exc:
        return str(exc)
    finally:
        store.close()
    return None
