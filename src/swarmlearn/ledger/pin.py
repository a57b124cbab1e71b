"""What a node remembers of the swarm's history, so that nobody can silently roll it back or replace it.

A *pin* is a small JSON file: the swarm's genesis hash and the highest entry (index, hash) the node has
verified (a follower: SL, SWOP, SWCI) or acknowledged (an SN: its `swarm.json` beside ledger.db).
A ledger that begins with another genesis, ends before the pinned entry, or holds another entry at
the pinned index is not the history the node saw, and is refused.

The file is replaced atomically (temp file + os.replace), at most once per `every` seconds (default
1 s): one small fsync a second, never one per entry. A component with a Background (SL, SWOP, SN)
starts the pin's writer thread in it (`start`), so that `advance`, on the append path, only records
the new head; without one (the SWCI, which pins once per check) `advance` writes in the caller's
thread once the last write is `every` seconds old. Either way the owner calls `flush` at stop, which
writes the last head at once, so a process that stops right after an append still pins it. A crash
loses at most the last second of pinned head (the SWCI: at most the heads of its checks within that
second), never the pin itself; a rollback within that second is not detected by this node.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from swarmlearn.background import Background
from swarmlearn.errors import LedgerError
from swarmlearn.files import write_atomically

log = logging.getLogger("swarmlearn.ledger")

# The pin file of a follower (SL: in its --data-dir; SWOP: in its workspace; SWCI: USR_DIR/.swarm/).
PIN_FILE = "ledger-pin.json"


class HistoryRefused(LedgerError):
    """A ledger holds less or other history than this node verified or acknowledged before."""


@dataclass(frozen=True)
class Pin:
    genesis_hash: str
    head_index: int
    head_hash: str
    swarm_id: str = ""

    def divergence(self, head_index: int, hash_at) -> str | None:
        """How a ledger whose last index is `head_index` and whose entry hashes `hash_at(index)` gives
        departs from this pin: "genesis", "shorter", "differs", or None when it holds the pinned
        history."""
        if head_index < 0:
            return "shorter"
        if hash_at(0) != self.genesis_hash:
            return "genesis"
        if head_index < self.head_index:
            return "shorter"
        if hash_at(self.head_index) != self.head_hash:
            return "differs"
        return None


class PinFile:
    """One pin on disk, advanced cheaply and written atomically (see the module's notes)."""

    def __init__(self, path: Path, every: float = 1.0):
        self.path = Path(path)
        self.every = every
        self._lock = threading.Lock()
        self._writing = threading.Lock()
        self._pin: Pin | None = None
        self._written: Pin | None = None
        self._writer: threading.Thread | None = None
        self._last_write = float("-inf")  # time.monotonic() of the last write

    def start(self, background: Background) -> None:
        """From now on the file is written by one thread of `background` (`ledger-pin`), at most once
        every `every` seconds, until its owner stops; the owner then calls flush()."""
        with self._lock:
            if self._writer is None:
                self._writer = background.start("ledger-pin", self._write_every, background.stopping)

    def _write_every(self, stopping: threading.Event) -> None:
        while not stopping.wait(self.every):
            self._write_pending()

    @property
    def pin(self) -> Pin | None:
        return self._pin

    def load(self) -> Pin | None:
        """Reads the pin; None when there is none yet. Raises LedgerError naming the file if unreadable."""
        try:
            obj = json.loads(self.path.read_text())
            pin = Pin(genesis_hash=str(obj["genesis_hash"]), head_index=int(obj["head_index"]),
                      head_hash=str(obj["head_hash"]), swarm_id=str(obj.get("swarm_id", "")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LedgerError(f"{self.path}: unreadable record of the swarm's history ({exc}); restore it, or "
                              f"delete it to trust the ledger the SN serves now") from None
        with self._lock:
            self._pin = self._written = pin
        return pin

    def advance(self, pin: Pin) -> None:
        """Records a new verified head (never lowers it); the file follows within `every` seconds
        (without a writer thread: at the next advance that is due, or at flush())."""
        with self._lock:
            if self._pin is not None and pin.head_index <= self._pin.head_index:
                return
            self._pin = pin
            due = self._writer is None and time.monotonic() - self._last_write >= self.every
        if due:
            self._write_pending()

    def replace(self, pin: Pin) -> None:
        """Writes `pin` at once, even if lower (a new swarm was founded here)."""
        with self._lock:
            self._pin = pin
        self.flush()

    def flush(self) -> None:
        """Writes the head recorded last, if the file does not hold it yet (at stop)."""
        self._write_pending()

    def _write_pending(self) -> None:
        # Two locks: `advance` (called on the append path) never waits for this file's fsync.
        with self._writing:
            with self._lock:
                pin = self._pin
                if pin is None or pin == self._written:
                    return
                self._last_write = time.monotonic()
            try:
                write_atomically(self.path, json.dumps(asdict(pin), indent=1, sort_keys=True) + "\n")
            except OSError as exc:
                log.warning("%s: cannot record the verified ledger head (%s)", self.path, exc.strerror or exc)
                return
            with self._lock:
                self._written = pin


def check_marker(marker: Pin, head_index: int, hash_at, ledger_path: Path, marker_path: Path) -> None:
    """Raises HistoryRefused, naming both files, unless the ledger (last index `head_index`, entry
    hashes from `hash_at`) holds the history an SN recorded in its marker."""
    problem = marker.divergence(head_index, hash_at)
    if problem is None:
        return
    if head_index < 0:
        raise HistoryRefused(f"{ledger_path} holds no entries but {marker_path} records swarm "
                             f"{marker.swarm_id or '?'} acknowledged up to entry {marker.head_index}: its history was "
                             f"erased; restore {ledger_path} from a backup, or found a new swarm here with "
                             f"`swarm sn --new-swarm`")
    remedy = (f"restore that swarm's ledger into {ledger_path}, or found a new swarm with an empty --data-dir"
              if problem == "genesis" else f"restore {ledger_path} from a backup")
    compared = {"genesis": 0, "differs": marker.head_index}.get(problem)  # a shorter ledger holds no such entry
    raise history_refusal(problem, marker, holder=str(ledger_path), witness=f"this SN (per {marker_path})",
                          found_head=head_index, found_hash=hash_at(compared) if compared is not None else "",
                          remedy=remedy)


def sn_refused(problem: str, address: str, pin: Pin, pin_path: Path | None, sn_head: int = -1,
               served: str = "") -> HistoryRefused:
    """The one-line refusal of an SN by a node that pinned `pin` (SL, SWOP, SWCI). `problem` is what
    Pin.divergence says; `sn_head` the SN's last index; `served` the hash it serves at the index compared."""
    unpin = f" (delete {pin_path} only if this node is meant to join the swarm that SN serves now)" if pin_path else ""
    remedy = ("point this node at an SN of its swarm" if problem == "genesis"
              else "restore the SN's ledger from a backup, or use another SN of this swarm")
    return history_refusal(problem, pin, holder=f"the ledger SN {address} serves", witness="this node",
                           found_head=sn_head, found_hash=served, remedy=remedy + unpin)


def history_refusal(problem: str, pin: Pin, *, holder: str, witness: str, found_head: int, found_hash: str,
                    remedy: str) -> HistoryRefused:
    """One line for a ledger (`holder`) that lacks the history `witness` recorded in `pin`: `problem` is
    what Pin.divergence says, `found_head` the ledger's last index, `found_hash` the hash it holds at
    the index compared, `remedy` what to do."""
    if problem == "shorter":
        what = (f"{holder} ends at entry {found_head}, short of entry {pin.head_index} that {witness} verified: "
                f"history was rolled back")
    elif problem == "genesis":
        what = (f"{holder} begins with another genesis ({found_hash[:12]}) than swarm {pin.swarm_id or '?'} "
                f"(genesis {pin.genesis_hash[:12]}) that {witness} joined: the swarm was replaced")
    else:
        what = (f"{holder} holds another entry {pin.head_index} ({found_hash[:12]}) than the one {witness} "
                f"verified ({pin.head_hash[:12]}): history was replaced")
    return HistoryRefused(f"{what}; {remedy}")
