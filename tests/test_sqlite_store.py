"""The SQLite store's own promises, beyond the interface: one file shared by processes, that survives
kill -9, and that says which file is wrong when it cannot be used.

Child processes are plain `python -c` scripts; every one a test starts is killed by pid before the
test ends.
"""

from __future__ import annotations

import hashlib
import os
import queue
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from swarmlearn.errors import LedgerError
from swarmlearn.ledger.entry import GENESIS_PREV_HASH, Entry, Signer, Tx
from swarmlearn.ledger.sqlite_store import SQLiteStore

SIGNER = Signer("sl-1", "ab" * 32)
# How long a child may take to start (imports) or to answer one request on a slow machine.
CHILD_TIMEOUT = 30.0

# Appends, on each "<index> <prev_hash>" line from stdin, an entry signed as argv[2]; answers
# "won <index> <hash>" or "lost <index>".
RACER = """
import sys
from pathlib import Path
from swarmlearn.errors import HeadMoved
from swarmlearn.ledger.entry import Entry, Signer, Tx
from swarmlearn.ledger.sqlite_store import SQLiteStore

store = SQLiteStore(Path(sys.argv[1]))
name = sys.argv[2]
print("ready", flush=True)
for line in sys.stdin:
    index, prev = line.split()
    index = int(index)
    tx = Tx(kind="metrics", payload={"contract": "default", "node": name, "step": index},
            signer=Signer(name, "ab" * 32))
    entry = Entry(index, prev, tx, signature=name.encode())
    try:
        store.append_if_head_is(prev, entry)
    except HeadMoved:
        print("lost", index, flush=True)
    else:
        print("won", index, entry.hash, flush=True)
store.close()
"""

# Appends entries after the head as fast as it can, printing each index once its append returned.
APPENDER = """
import sys
from pathlib import Path
from swarmlearn.ledger.entry import GENESIS_PREV_HASH, Entry, Signer, Tx
from swarmlearn.ledger.sqlite_store import SQLiteStore

store = SQLiteStore(Path(sys.argv[1]))
head = store.head()
index, prev = (head[0] + 1, head[1]) if head else (0, None)
while True:
    tx = Tx(kind="metrics", payload={"contract": "default", "node": "sl-1", "step": index, "pad": "x" * 2000},
            signer=Signer("sl-1", "ab" * 32))
    entry = Entry(index, prev or GENESIS_PREV_HASH, tx, signature=b"sig")
    store.append_if_head_is(prev, entry)
    print(index, flush=True)
    index, prev = index + 1, entry.hash
"""


class Child:
    """A `python -c` child whose stdout lines arrive on a queue, so that no read blocks forever."""

    def __init__(self, script: str, args: list[str], stderr_path: Path):
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1)
        self.pid = self.proc.pid
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def line(self, timeout: float = CHILD_TIMEOUT) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"child {self.pid} said nothing for {timeout}s; stderr: {self.errors()}") from None
        if line is None:
            raise AssertionError(f"child {self.pid} ended; stderr: {self.errors()}")
        return line

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def errors(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")[-2000:]

    def kill(self) -> None:
        """SIGKILL by pid, then reap; what the child printed before dying stays readable."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(CHILD_TIMEOUT)
        self._reader.join(CHILD_TIMEOUT)

    def printed(self) -> list[str]:
        """Every line still queued; call after kill()."""
        out = []
        while (line := self.lines.get_nowait()) is not None:
            out.append(line)
        return out

    def close(self) -> None:
        self.kill()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        self._stderr.close()


@pytest.fixture
def spawn(tmp_path):
    """Starts children; kills every one still running when the test ends."""
    children: list[Child] = []

    def start(script: str, *args: str) -> Child:
        child = Child(script, [str(a) for a in args], tmp_path / f"child-{len(children)}.stderr")
        children.append(child)
        return child

    yield start
    for child in children:
        child.close()


def make_entry(index: int, prev_hash: str | None, **payload) -> Entry:
    tx = Tx(kind="metrics", payload={"contract": "default", "node": SIGNER.node, "step": index, **payload},
            signer=SIGNER)
    return Entry(index, prev_hash or GENESIS_PREV_HASH, tx, signature=b"sig")


def append_chain(store: SQLiteStore, count: int) -> list[Entry]:
    head = store.head()
    index, prev = (head[0] + 1, head[1]) if head else (0, None)
    entries = []
    for i in range(index, index + count):
        entry = make_entry(i, prev)
        store.append_if_head_is(prev, entry)
        entries.append(entry)
        prev = entry.hash
    return entries


def assert_sound_chain(rows) -> None:
    """Contiguous from 0, every body hashing to its stored hash, every entry linking to the one before."""
    assert [row.index for row in rows] == list(range(len(rows)))
    prev = GENESIS_PREV_HASH
    for row in rows:
        assert hashlib.sha256(row.body).hexdigest() == row.hash, f"entry {row.index} is torn"
        entry = row.entry()
        assert entry.index == row.index
        assert entry.prev_hash == prev, f"entry {row.index} does not link to entry {row.index - 1}"
        prev = row.hash


# ---------------------------------------------------------------------------------- two processes


@pytest.mark.slow
def test_of_two_processes_appending_on_the_same_head_exactly_one_wins(tmp_path, spawn):
    path = tmp_path / "ledger.db"
    store = SQLiteStore(path)
    append_chain(store, 1)
    sn_a, sn_b = spawn(RACER, path, "sn-a"), spawn(RACER, path, "sn-b")
    assert sn_a.line() == sn_b.line() == "ready"

    wins = {"sn-a": 0, "sn-b": 0}
    for _ in range(20):
        index, head_hash = store.head()
        go = f"{index + 1} {head_hash}"
        racers = [("sn-a", sn_a), ("sn-b", sn_b)]
        random.shuffle(racers)  # neither always gets the head start of being told first
        for _, child in racers:
            child.send(go)
        answers = {name: child.line().split() for name, child in racers}

        outcomes = sorted(answer[0] for answer in answers.values())
        assert outcomes == ["lost", "won"], answers
        winner = next(name for name, answer in answers.items() if answer[0] == "won")
        wins[winner] += 1
        won_hash = answers[winner][2]
        assert store.head() == (index + 1, won_hash)
        new = store.read_raw(index + 1)
        assert [(row.index, row.hash) for row in new] == [(index + 1, won_hash)]
        assert new[0].entry().tx.signer.node == winner

    rows = store.read_raw()
    assert len(rows) == 21
    assert_sound_chain(rows)
    store.close()


# ------------------------------------------------------------------------------------------ kill -9


@pytest.mark.slow
def test_a_writer_killed_mid_stream_leaves_a_sound_chain_holding_every_acknowledged_entry(tmp_path, spawn):
    path = tmp_path / "ledger.db"
    rng = random.Random(7)
    acknowledged: set[int] = set()
    # Kill the writer three times at different points; each new writer carries on from the head.
    for _ in range(3):
        writer = spawn(APPENDER, path)
        for _ in range(rng.randint(20, 150)):
            acknowledged.add(int(writer.line()))
        writer.kill()
        acknowledged.update(int(line) for line in writer.printed())

        # `swarm ledger verify` opens read-only, right after the crash, before any writer recovers it.
        reader = SQLiteStore(path, read_only=True)
        seen_by_reader = reader.read_raw()
        reader.close()
        store = SQLiteStore(path)
        rows = store.read_raw()
        store.close()

        assert rows == seen_by_reader
        assert_sound_chain(rows)
        stored = {row.index for row in rows}
        assert acknowledged <= stored, f"acknowledged but lost: {sorted(acknowledged - stored)[:10]}"
        # At most the one append that committed just before the kill went unacknowledged.
        assert len(rows) - (max(acknowledged) + 1) in (0, 1)


# --------------------------------------------------------------------------------- unusable files


def _truncated_ledger(path: Path) -> bytes:
    scratch = path.with_name("whole.db")
    store = SQLiteStore(scratch)
    append_chain(store, 300)
    store.close()
    data = scratch.read_bytes()
    return data[: len(data) // 2]


CORRUPTIONS = {
    "random bytes": lambda path: random.Random(1).randbytes(16384),
    "a text file": lambda path: b"round,loss\n1,0.52\n2,0.31\n" * 200,
    "half a ledger": _truncated_ledger,
}


@pytest.mark.parametrize("read_only", [False, True], ids=["read-write", "read-only"])
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_file_that_is_not_a_ledger_is_refused_naming_it(tmp_path, corruption, read_only):
    path = tmp_path / "ledger.db"
    path.write_bytes(CORRUPTIONS[corruption](path))
    before = path.read_bytes()

    with pytest.raises(LedgerError) as refused:
        SQLiteStore(path, read_only=read_only)

    assert str(path) in str(refused.value)
    assert path.read_bytes() == before, "opening a bad ledger must not change it"


def test_read_only_on_a_missing_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "data" / "ledger.db"
    with pytest.raises(LedgerError) as refused:
        SQLiteStore(path, read_only=True)
    assert str(path) in str(refused.value)
    assert not path.exists()


def test_read_only_on_an_empty_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "ledger.db"
    path.write_bytes(b"")
    with pytest.raises(LedgerError) as refused:
        SQLiteStore(path, read_only=True).head()
    assert str(path) in str(refused.value)


# ------------------------------------------------------------------------------------------ read-only


def test_a_read_only_store_refuses_appends_and_writes_nothing(tmp_path):
    path = tmp_path / "ledger.db"
    store = SQLiteStore(path)
    entries = append_chain(store, 2)
    reader = SQLiteStore(path, read_only=True)

    with pytest.raises(LedgerError) as refused:
        reader.append_if_head_is(entries[-1].hash, make_entry(2, entries[-1].hash))

    assert str(path) in str(refused.value)
    assert store.head() == (1, entries[-1].hash)
    reader.close()
    store.close()


def test_a_read_only_store_follows_a_live_writer(tmp_path):
    path = tmp_path / "ledger.db"
    store = SQLiteStore(path)
    append_chain(store, 1)
    reader = SQLiteStore(path, read_only=True)
    writer = threading.Thread(target=lambda: append_chain(store, 3))
    writer.start()
    assert reader.wait_for(3, timeout=CHILD_TIMEOUT)
    writer.join()
    assert reader.read_raw() == store.read_raw()
    reader.close()
    store.close()
