"""The SL process: registers with the SN, follows the ledger, serves blobs to peers over mutual TLS,
and serves its own ML process on a local channel (SWARM_SL_ADDR): a Unix socket in a folder only this
user may enter, or a TCP port that serves only callers presenting this SL's secret (SWARM_SL_TOKEN)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from swarmlearn import pki
from swarmlearn.background import Background
from swarmlearn.defaults import HEARTBEAT_EVERY, KEPT_MODELS_DIR, MAX_MESSAGE, SL_FS_PORT, SN_CONNECT_TIMEOUT
from swarmlearn.errors import ConfigError, SwarmError
from swarmlearn.files import write_atomically
from swarmlearn.ledger.model import KEEP_FINISHED_ROUNDS, RoundStatus
from swarmlearn.ledger.pin import PIN_FILE
from swarmlearn.lora import contract_seed
from swarmlearn.proto import sl_pb2_grpc
from swarmlearn.sl.local_channel import LocalChannel
from swarmlearn.sl.round import RoundEngine, Timeouts
from swarmlearn.sl.transport import BlobStore, PeerFetcher, PeerService
from swarmlearn.sn.client import SNClient
from swarmlearn.sn.follower import LedgerFollower
from swarmlearn.sn.server import StreamSlots
from swarmlearn.tensors import blob_hash

log = logging.getLogger("swarmlearn.sl")

# How long a blob request from a registered SL may wait for our ledger copy to show its entitlement
# (our copy may trail the SN's: the asker just checked in or joined, or our watch stream is moving to
# another SN after a partition). Each caller may have LEDGER_LAG_WAITS_PER_CALLER such waits under way,
# and all callers together LEDGER_LAG_WAITS; beyond them a request is decided on our copy as it is, so
# that one SL asking for what it may not have cannot hold our peer workers.
LEDGER_LAG_GRACE = 2.0
LEDGER_LAG_WAITS_PER_CALLER = 2
LEDGER_LAG_WAITS = 8
# On stop, how long the SL waits for its background threads (each notices the stop at once, or at
# its next poll) before it names the ones still running in its log and exits anyway.
STOP_THREADS_TIMEOUT = 5.0
# Worker threads for calls from peers (blob downloads); our own ML's channel is sl/local_channel.py.
# One peer may hold at most PEER_STREAMS_PER_CALLER of the peer workers (sl/transport.py). The peer
# server admits PEER_RPC_QUEUED calls beyond its workers to wait for one and refuses any more with
# RESOURCE_EXHAUSTED: their fetcher asks another peer, or again, rather than wait in a queue that
# its stall limit would cut off anyway.
PEER_RPC_WORKERS = 32
PEER_RPC_QUEUED = 32


@dataclass
class SLConfig:
    node_id: str
    identity: pki.Identity
    sn_address: str | list[str]  # one SN, or several ("IP:PORT,IP:PORT" or a list): it moves between them
    host: str = "127.0.0.1"
    fs_port: int = SL_FS_PORT
    ml_addr: str | None = None
    data_dir: Path | None = None
    timeouts: Timeouts | None = None
    connect_timeout: float = SN_CONNECT_TIMEOUT


class SLNode:
    def __init__(self, config: SLConfig):
        self.config = config
        self.node_id = config.node_id
        self.data_dir = Path(config.data_dir or tempfile.mkdtemp(prefix=f"swarm-sl-{config.node_id}-"))
        # Set at start: the default is a socket in the data dir, which start() creates.
        self.ml_addr = config.ml_addr or ""
        # A TCP (or abstract-socket) ML channel is open to anyone who reaches it, so its callers must
        # present this secret; a socket in a private folder needs none.
        self.token = secrets.token_urlsafe(32) if self.ml_addr and not self.ml_addr.startswith("unix:") else None
        # Every thread and pool of this SL (ledger follower, heartbeat, fetch watchdog, round and RPC
        # pools) is started through it and stopped and joined by stop().
        self.background = Background(f"sl-{config.node_id}")
        self.blobs = BlobStore()
        self.fetcher = PeerFetcher(config.identity, self.background)
        self.sn = SNClient(config.sn_address, config.identity, config.node_id)
        # The swarm this SL verified is pinned in its data dir: an SN that rolled back or replaced that
        # history is refused (follower.error; the `sl` command then exits non-zero with that line).
        self.follower = LedgerFollower(self.sn, self.data_dir / PIN_FILE, self.background)
        self.kept = KeptModels(self.data_dir / KEPT_MODELS_DIR, self.background)
        # By contract name; joined from the ML's RPC threads and read by them and by stop().
        self.engines: dict[str, RoundEngine] = {}
        self._engines_lock = threading.Lock()
        self._last_seen: tuple[float, dict[str, float]] = (0.0, {})
        self._lag_waits = StreamSlots(total=LEDGER_LAG_WAITS, per_identity=LEDGER_LAG_WAITS_PER_CALLER,
                                      kind="ledger-lag wait", server="SL", elsewhere="fetch from another peer")
        self.peer_server: grpc.Server | None = None
        self.local_channel: LocalChannel | None = None
        self.address = ""

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{self.data_dir}: cannot create the SL data dir ({exc.strerror}); "
                              f"choose another --data-dir") from None
        self.sn.wait_ready(self.config.connect_timeout)
        options = [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", MAX_MESSAGE),
                   ("grpc.max_send_message_length", MAX_MESSAGE)]
        self.peer_server = grpc.server(self.background.executor("peer-rpc", PEER_RPC_WORKERS), options=options,
                                       maximum_concurrent_rpcs=PEER_RPC_WORKERS + PEER_RPC_QUEUED)
        sl_pb2_grpc.add_SwarmPeerServicer_to_server(
            PeerService(self.blobs, self.fetch_refusal, workers=PEER_RPC_WORKERS, merged_refusal=self.merged_refusal,
                        stopping=self.background.stopping), self.peer_server)
        port = _bind(self.peer_server, f"{self.config.host}:{self.config.fs_port}",
                     self.config.identity.server_credentials(), "--sl-fs-port")
        self.address = f"{self.config.host}:{port}"
        self.sn.register("SL", self.address)
        self.follower.start()
        # Our ledger copy must reach the SN's head before the kept models are checked against it.
        self.follower.wait_index(self.sn.heartbeat(self.background.stopping))
        self.kept.restore(self.blobs, self.follower)
        self.kept.start()
        if not self.ml_addr:
            self.ml_addr = f"unix:{_private_socket(self.data_dir, self.node_id)}"
        self.local_channel = LocalChannel(self, self.ml_addr, self.token)
        self.ml_addr = self.local_channel.start()
        self.peer_server.start()
        self.sn.keep_alive(self.background, HEARTBEAT_EVERY)
        log.info("SL %s serving peers on %s, its ML on %s", self.node_id, self.address, self.ml_addr)

    def failure(self, timeout: float) -> Exception | None:
        """Waits up to `timeout` seconds for this SL to lose its ledger (its SN stayed away past the
        patience, or sent what the follower refuses); returns that error, or None while all is well."""
        return self.follower.failure(timeout)

    def stop(self) -> None:
        """Leaves every joined session (so peers need not wait for us), then stops serving and joins
        every thread this SL started."""
        self.background.stopping.set()
        with self._engines_lock:
            engines = list(self.engines.values())
        for engine in engines:
            try:
                engine.leave(patience=2.0)
                log.info("%s left contract %s", self.node_id, engine.contract_name)
            except SwarmError as exc:
                log.warning("could not leave contract %s: %s", engine.contract_name, exc)
        if self.local_channel is not None:
            self.local_channel.stop()
        if self.peer_server is not None:
            self.peer_server.stop(0.5).wait()
        for engine in engines:
            engine.close()
        self.follower.stop()
        self.fetcher.close()
        self.background.close(STOP_THREADS_TIMEOUT)
        self.sn.close()

    def fetch_refusal(self, caller_fp: str, digest: str) -> str | None:
        """Why the caller may not have blob `digest`, or None: a contribution goes only to the SLs that
        checked in to its round (a secure round's masked input only to its leader), a merged model only to
        its contract's active members. Our ledger copy may
        trail the caller's (it just checked in; our SN connection moved after a partition), so a
        registered SL gets up to LEDGER_LAG_GRACE for our copy to show its right (see _lag_grace)."""
        def caller(state):
            node = next((n for n in state.nodes.values() if n.cert_fp == caller_fp), None)
            return node if node is not None and node.role == "SL" and caller_fp not in state.revoked else None

        def entitled(state) -> bool:
            node = caller(state)
            if node is None:
                return False
            for contract in state.contracts.values():
                member = node.node_id in contract.members and contract.members[node.node_id].active
                for r in reversed(list(contract.rounds.values())):
                    if member and r.merged_hash == digest:
                        return True
                    if r.secure is not None and digest in r.secure.masked.values():
                        return node.node_id == r.leader  # a masked input: for the round's leader alone
                    if node.node_id in r.checkins and any(c.hash == digest for c in r.checkins.values()):
                        return True
            return False

        try:
            if self.follower.read(entitled) or (self.follower.read(caller) and self._lag_grace(caller_fp, entitled)):
                return None
        except SwarmError:
            return "this SL is stopping"
        return (f"blob {digest[:12]} is served only to the SLs that checked in to its round (a merged model: to its "
                f"contract's active members); the caller is not one of them")

    def merged_refusal(self, caller_fp: str, contract: str, number: int) -> str | None:
        """Why the caller may not wait here for round `number`'s merged model, or None: only an active
        member of the contract that checked in to that round may (our ledger copy gets the same grace
        as in fetch_refusal)."""
        def caller(state):
            node = next((n for n in state.nodes.values() if n.cert_fp == caller_fp), None)
            return node if node is not None and node.role == "SL" and caller_fp not in state.revoked else None

        def entitled(state) -> bool:
            node, found = caller(state), state.contracts.get(contract)
            r = found.rounds.get(number) if found is not None else None
            return (node is not None and r is not None and node.node_id in r.checkins
                    and node.node_id in found.members and found.members[node.node_id].active)

        try:
            if self.follower.read(entitled) or (self.follower.read(caller) and self._lag_grace(caller_fp, entitled)):
                return None
        except SwarmError:
            return "this SL is stopping"
        return (f"the merged model of round {number} of {contract[:64]!r} is served here only to that round's "
                f"participants; the caller is not one of them")

    def _lag_grace(self, caller_fp: str, entitled) -> bool:
        """Waits, on the follower's condition (no lock held meanwhile), up to LEDGER_LAG_GRACE for our
        ledger copy to show `entitled`; False at once when the caller has its share of such waits under
        way already, or all callers together have theirs."""
        ticket = self._lag_waits.acquire(caller_fp)
        if isinstance(ticket, str):
            return False
        try:
            return bool(self.follower.wait_until(entitled, LEDGER_LAG_GRACE))
        finally:
            self._lag_waits.release(ticket)

    def only_engine(self) -> RoundEngine | None:
        """The engine of the one contract our ML joined; None before it joined (or if it joined several)."""
        with self._engines_lock:
            return next(iter(self.engines.values())) if len(self.engines) == 1 else None

    def liveness(self) -> dict[str, float]:
        """Seconds since the SN last heard from each node (asked at most once a second)."""
        asked, seen = self._last_seen
        if time.monotonic() - asked > 1.0:
            try:
                seen = self.sn.query("info").get("last_seen", {})
            except SwarmError:
                seen = {}
            self._last_seen = (time.monotonic(), seen)
        return seen

    # ------------------------------------------------------------------------------ for the ML

    def join(self, contract: str, min_peers: int, weightage: float, merge_method: str,
             client_dp: dict | None = None) -> dict:
        """Joins the training session of `contract`; returns what the ML hears: the contract's name, its
        latest merged round, the merge method it merges with, and its seed (hex; `ffa_lora`'s frozen A)."""
        name = self.follower.read(lambda s: s.contract(contract).name)
        merge_method = merge_method or self.follower.read(lambda s: s.contract(name).merge_method)
        session = {"contract": name, "node": self.node_id, "min_peers": min_peers, "weightage": weightage,
                   "merge_method": merge_method, **({"client_dp": client_dp} if client_dp else {})}
        self.sn.submit("session_join", session)
        engine = RoundEngine(self.node_id, name, self.sn, self.follower, self.blobs, self.fetcher,
                             self.config.timeouts, self.liveness, background=self.background, keep=self.kept.keep,
                             session=session)
        with self._engines_lock:
            replaced = self.engines.get(name)
            self.engines[name] = engine
        if replaced is not None:
            replaced.close()  # the ML joined again (restarted): the old engine's prefetching ends
        latest = self.follower.read(lambda s: s.contract(name).latest_merged_round) or 0
        log.info("%s joined contract %s (min_peers %d, weightage %g, %s); latest merged round %d", self.node_id,
                 name, min_peers, weightage, merge_method, latest)
        seed = self.follower.read(lambda s: contract_seed(s.genesis_hash or "", name, s.contract(name).generation))
        return {"contract": name, "latest_merged_round": latest, "merge_method": merge_method,
                "contract_seed": seed.hex()}


class KeptModels:
    """The latest merged model of each contract this SL trains, kept in `folder` (the data dir's
    `merged/`) as `<contract>.safetensors` with a `<contract>.json` beside it (contract, round, hash,
    size, time), so that a swarm stopped as a whole resumes from its last merged round: at start the
    SL serves them again, to its own ML's catch-up and to its peers'. Written by one thread of the SL's
    Background, which finishes the pending writes when the SL stops; only the newest model of each
    contract waits to be written."""

    def __init__(self, folder: Path, background: Background):
        self.folder = folder
        self._background = background
        self._pending: dict[str, tuple[int, str, bytes]] = {}
        self._on_disk: dict[str, str] = {}  # contract -> hash of the model in its file
        self._wake = threading.Condition()

    def start(self) -> None:
        self._background.start("keep-merged", self._write_pending)

    def keep(self, contract: str, number: int, digest: str, blob: bytes) -> None:
        """Called from the round threads with a merged model whose bytes hash to the ledger's `digest`."""
        with self._wake:
            if self._on_disk.get(contract) != digest:
                self._pending[contract] = (number, digest, blob)
                self._wake.notify()

    def _write_pending(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._background.stopping.is_set():
                    self._wake.wait(0.5)
                if not self._pending:
                    return
                contract, (number, digest, blob) = self._pending.popitem()
            if self._write(contract, number, digest, blob):
                with self._wake:
                    self._on_disk[contract] = digest

    def _write(self, contract: str, number: int, digest: str, blob: bytes) -> bool:
        blob_path, meta_path = kept_model_paths(self.folder, contract)
        meta = {"contract": contract, "round": number, "hash": digest, "size": len(blob),
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomically(blob_path, blob)
            write_atomically(meta_path, json.dumps(meta, indent=1).encode())
        except OSError as exc:
            log.error("round %d: could not keep the merged model of contract %s in %s (%s); training goes on, "
                      "but a swarm stopped as a whole would restart without it: free disk space or make %s "
                      "writable", number, contract, blob_path, exc.strerror or exc, self.folder)
            return False
        log.debug("round %d: merged model %s of contract %s kept in %s", number, digest[:12], contract, blob_path)
        return True

    def restore(self, blobs: BlobStore, follower: LedgerFollower) -> None:
        """Puts in `blobs` each kept model whose bytes match its .json and whose hash the ledger has
        as a merged round of its contract; any other is left unused, with a warning naming it."""
        if not self.folder.is_dir():
            return
        for meta_path in sorted(self.folder.glob("*.json")):
            kept = self._read(meta_path)
            if kept is None:
                continue
            meta, blob = kept
            rounds = follower.read(lambda s: _merged_rounds(s, meta["contract"], meta["hash"]))
            if rounds is None:
                log.warning("%s: merged model %s is not a merged round of contract %s that the ledger keeps (the "
                            "contract was reset, the swarm merged more than %d rounds since, or this data dir served "
                            "another swarm); not used", meta_path, meta["hash"][:12], meta["contract"],
                            KEEP_FINISHED_ROUNDS)
                continue
            number, latest = rounds
            blobs.put(blob)
            with self._wake:
                self._on_disk[meta["contract"]] = meta["hash"]
            log.info("kept merged model of round %d of contract %s (latest merged round %d) loaded from %s", number,
                     meta["contract"], latest, meta_path.with_suffix(".safetensors"))

    def _read(self, meta_path: Path) -> tuple[dict, bytes] | None:
        """The .json's fields and its model's bytes, or None (said in a warning) when they do not agree."""
        blob_path = meta_path.with_suffix(".safetensors")
        try:
            meta = json.loads(meta_path.read_text())
            contract, digest = meta["contract"], meta["hash"]
            if not isinstance(contract, str) or not isinstance(digest, str):
                raise TypeError("contract and hash must be strings")
            blob = blob_path.read_bytes()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: cannot use this kept merged model (%s); not used: the model comes from a peer, or "
                        "the node starts from its own weights; delete it if it stays", meta_path, exc)
            return None
        if blob_hash(blob) != digest:
            log.warning("%s: its bytes hash to %s, not to the %s its .json records (changed or damaged); not used: "
                        "the model comes from a peer, or the node starts from its own weights", blob_path,
                        blob_hash(blob)[:12], digest[:12])
            return None
        return meta, blob


def kept_model_paths(folder: Path, contract: str) -> tuple[Path, Path]:
    """The kept model of `contract` in `folder`, and its .json."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", contract)
    if name != contract or name.startswith("."):  # two names must not share a file once made safe
        name = f"{name.lstrip('.')}-{hashlib.sha256(contract.encode()).hexdigest()[:8]}"
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def _merged_rounds(state, contract: str, digest: str) -> tuple[int, int] | None:
    """(the round of `contract` merged as `digest`, its latest merged round), or None if none was."""
    found = state.contracts.get(contract)
    if found is None:
        return None
    number = next((r.number for r in found.rounds.values()
                   if r.status == RoundStatus.MERGED and r.merged_hash == digest), None)
    return None if number is None else (number, found.latest_merged_round or 0)




def _private_socket(data_dir: Path, node_id: str) -> Path:
    """The ML channel's Unix socket, in a folder of mode 0700 whatever the umask (whoever can reach the
    socket talks to this SL as its ML, and a socket's own mode follows the umask): the data dir's
    `ml-channel/`, or a new temp folder when that path would be longer than a socket address may be
    (108 bytes on Linux)."""
    folder = data_dir.resolve() / "ml-channel"
    try:
        if len(str(folder / "ml.sock")) < 100:
            folder.mkdir(mode=0o700, exist_ok=True)
        else:
            folder = Path(tempfile.mkdtemp(prefix=f"swarm-{node_id[:20]}-"))
        info = folder.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise ConfigError(f"{folder}: not a folder of this user's; remove it or choose another --data-dir")
        folder.chmod(0o700)  # mkdir's mode is masked by the umask, and an existing folder keeps its own
    except OSError as exc:
        raise ConfigError(f"{folder}: cannot make the ML channel's private folder ({exc.strerror}); "
                          f"choose another --data-dir") from None
    return folder / "ml.sock"


def _bind(server: grpc.Server, address: str, credentials, flag: str) -> int:
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise ConfigError(f"cannot listen on {address}: the port is in use, the address is not this host's or the "
                          f"socket path is not writable; pick another {flag}")
    return port
