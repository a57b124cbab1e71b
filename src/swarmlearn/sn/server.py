"""The Swarm Network node: holds the ledger and serves the SN API over mutual TLS."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from swarmlearn import pki
from swarmlearn.errors import AlreadyRecorded, ConfigError, LedgerError, Rejected
from swarmlearn.ledger.chain import Chain
from swarmlearn.ledger.entry import SignedTx, Tx
from swarmlearn.ledger.signatures import registration, sign_tx
from swarmlearn.ledger.sqlite_store import SQLiteStore
from swarmlearn.proto import sn_pb2, sn_pb2_grpc

log = logging.getLogger("swarmlearn.sn")

DEFAULT_API_PORT = 30304
DEFAULT_CONTRACT = "defaultbb.cqdb.sml.hpe"
DEFAULT_TASKRUNNER = "defaulttaskbb.taskdb.sml.hpe"
LEDGER_FILE = "ledger.db"
# One thread per open watch stream plus the unary calls; a swarm of dozens of peers fits.
MAX_WORKERS = 256


def caller_fingerprint(context: grpc.ServicerContext) -> str | None:
    """The SHA-256 of the certificate the caller presented at the TLS handshake."""
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        return None
    return pki.cert_fingerprint(pki.cert_from_pem(pems[0]))


class SNService(sn_pb2_grpc.SwarmNetworkServicer):
    def __init__(self, chain: Chain, node_id: str, stopping: threading.Event):
        self.chain = chain
        self.node_id = node_id
        self.stopping = stopping
        self.last_seen: dict[str, float] = {}

    def _seen(self, node: str) -> None:
        self.last_seen[node] = time.monotonic()

    def Submit(self, request, context):
        try:
            tx = Tx.from_bytes(request.tx)
        except LedgerError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if tx.signer.cert_fp != caller_fingerprint(context):
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"{tx.kind} is signed as {tx.signer.node} with a certificate other than the caller's; "
                          f"a node may only submit its own transactions")
        try:
            entry = self.chain.submit(SignedTx(tx, bytes(request.signature)))
        except AlreadyRecorded as exc:
            context.set_trailing_metadata((("swarm-tx-id", exc.tx_id), ("swarm-entry-index", str(exc.index))))
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except Rejected as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except LedgerError as exc:
            log.error("refused %s of %s: the ledger cannot be written: %s", tx.kind, tx.signer.node, exc)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"SN {self.node_id} refuses new entries: {exc}")
        self._seen(tx.signer.node)
        return sn_pb2.SubmitReply(index=entry.index, hash=entry.hash)

    def Heartbeat(self, request, context):
        node = self.chain.state.nodes.get(request.node_id)
        if node is None or node.cert_fp != caller_fingerprint(context):
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"{request.node_id} is not registered with the caller's certificate; register first")
        self._seen(request.node_id)
        state = self.chain.state
        return sn_pb2.HeartbeatReply(head_index=state.head_index, head_hash=state.head_hash or "",
                                     sn_node_id=self.node_id)

    def Query(self, request, context):
        with self.chain.lock:
            self.chain.catch_up()
            try:
                obj = self.chain.state.to_obj(request.section or "all")
            except KeyError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc.args[0]))
            head = self.chain.state.head_index
            now = time.monotonic()
            obj["last_seen"] = {n: round(now - t, 3) for n, t in self.last_seen.items()}
            body = json.dumps(obj, sort_keys=True).encode()
        return sn_pb2.QueryReply(head_index=head, state_json=body)

    def Watch(self, request, context):
        ended = threading.Event()
        context.add_callback(ended.set)
        rows = self.chain.store.watch(request.from_index, lambda: ended.is_set() or self.stopping.is_set())
        for row in rows:
            yield sn_pb2.LedgerEntry(index=row.index, hash=row.hash, body=row.body)


@dataclass
class SNServer:
    server: grpc.Server
    chain: Chain
    node_id: str
    host: str
    port: int
    sentinel: bool
    stopping: threading.Event

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, grace: float = 1.0) -> None:
        self.stopping.set()
        self.server.stop(grace).wait()
        self.chain.store.close()

    def wait(self) -> None:
        self.server.wait_for_termination()


def open_chain(data_dir: Path, identity: pki.Identity, node_id: str, address: str, sentinel: bool) -> Chain:
    """Opens (or, for the sentinel, founds) this SN's ledger and makes sure it is recorded in it."""
    data_dir = Path(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{data_dir}: cannot create the SN data dir ({exc.strerror}); choose another --data-dir")
    chain = Chain(SQLiteStore(data_dir / LEDGER_FILE))
    try:
        _join_chain(chain, identity, node_id, address, sentinel, data_dir)
    except BaseException:
        chain.store.close()
        raise
    return chain


def genesis_tx(identity: pki.Identity, node_id: str, address: str) -> SignedTx:
    """The sentinel's first entry: the CAs this swarm trusts, the default contract and task runner,
    and the sentinel itself."""
    cas = {pki.cert_fingerprint(ca): ca for ca in identity.cas}
    genesis = {
        "swarm_id": secrets.token_hex(8),
        "ca_fingerprints": sorted(cas),
        "ca_certs": [pki.cert_to_pem(cas[fp]).decode() for fp in sorted(cas)],
        "default_contract": DEFAULT_CONTRACT,
        "default_taskrunner": DEFAULT_TASKRUNNER,
        "created": time.time(),
        "sn": registration(identity, node_id, "SN", address),
    }
    return sign_tx(identity, node_id, "genesis", genesis)


def _join_chain(chain: Chain, identity: pki.Identity, node_id: str, address: str, sentinel: bool,
                data_dir: Path) -> None:
    state = chain.state
    ours = {pki.cert_fingerprint(ca): ca for ca in identity.cas}
    if state.genesis is None:
        if not sentinel:
            raise ConfigError(f"{data_dir}: holds no ledger and this SN is not the sentinel; start the first SN "
                              f"with --sentinel (several SNs share a ledger through the replicated store)")
        chain.submit(genesis_tx(identity, node_id, address))
        return
    if not set(ours) & set(state.ca_fingerprints):
        raise ConfigError(f"{data_dir / LEDGER_FILE}: holds the ledger of another swarm (swarm id "
                          f"{state.genesis['swarm_id']}, none of its CAs is in --capath); use an empty --data-dir "
                          f"for a new swarm or the --capath of that swarm")
    known = state.nodes.get(node_id)
    if known is None or known.address != address or known.cert_fp != identity.fingerprint:
        try:
            chain.submit(sign_tx(identity, node_id, "register_node", registration(identity, node_id, "SN", address)))
        except Rejected as exc:
            raise ConfigError(f"{data_dir / LEDGER_FILE}: this SN cannot join its ledger: {exc}") from None
    for fp in sorted(set(ours) - set(state.ca_fingerprints)):
        pem = pki.cert_to_pem(ours[fp]).decode()
        chain.submit(sign_tx(identity, node_id, "trust_ca", {"ca_fp": fp, "ca_cert": pem}))


def start_sn(*, host: str, port: int, identity: pki.Identity, data_dir: Path, sentinel: bool,
             node_id: str | None = None) -> SNServer:
    """Starts an SN; returns once it is serving. Raises ConfigError/LedgerError on bad set-up."""
    node_id = node_id or identity.common_name
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=MAX_WORKERS),
                         options=[("grpc.so_reuseport", 0)])
    try:
        bound = server.add_secure_port(f"{host}:{port}", identity.server_credentials())
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise ConfigError(f"cannot listen on {host}:{port}: the port is in use or the address is not this "
                          f"host's; pick another --sn-api-port (0 lets the OS choose) or --host-ip")
    chain = open_chain(data_dir, identity, node_id, f"{host}:{bound}", sentinel)
    stopping = threading.Event()
    sn_pb2_grpc.add_SwarmNetworkServicer_to_server(SNService(chain, node_id, stopping), server)
    server.start()
    return SNServer(server, chain, node_id, host, bound, sentinel, stopping)
