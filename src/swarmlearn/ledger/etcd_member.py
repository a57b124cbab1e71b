"""etcd members run as child processes: for tests, and for `swarm sn --ledger etcd` to start the member
beside it.

Every member listens on 127.0.0.1 only, with mutual TLS on its client and peer URLs trusting the CA of
`tls` alone: the ledger's CA, which issues to SNs and members only, never the swarm's (etcd_store.py
says why). It compacts its history as it goes (COMPACTION_RETENTION), and takes requests as large as the ledger store's entries need (--max-request-bytes). etcd
cannot listen on port 0, so ports are chosen by binding a socket to port 0 and closing it; if another
process takes one in between, the members are started again on new ports.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from swarmlearn.errors import LedgerError
from swarmlearn.ledger.etcd_store import (DEFAULT_MAX_ENTRY_BYTES, REQUIRE_LEADER, TLSFiles, open_channel,
                                          request_bytes_for)
from swarmlearn.proto import etcd_pb2 as pb
from swarmlearn.proto import etcd_pb2_grpc as rpc

SETUP_HINT = ("run `make test` once (its set-up, scripts/setup-system.sh, installs the Debian package "
              "etcd-server), or `apt-get install etcd-server`")
# A member elects a leader within a few election timeouts (1 s each) of its peers being up.
READY_TIMEOUT = 30.0
STOP_GRACE = 10.0
START_ATTEMPTS = 3
# How many revisions of history a member keeps (auto-compaction); a watch behind that resumes with a read.
COMPACTION_RETENTION = 1000


def etcd_binary() -> str:
    path = shutil.which("etcd")
    if path is None:
        raise LedgerError(f"etcd is not installed (no `etcd` on PATH); {SETUP_HINT}")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class EtcdMember:
    """One member: its name, data dir, ports and, while it runs, its process."""

    name: str
    data_dir: Path
    client_port: int
    peer_port: int
    args: list[str] = field(default_factory=list)
    popen: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.with_name(f"{self.name}.log")

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def launch(self) -> None:
        """Starts the process; again after a stop, it rejoins its cluster from its data dir."""
        with open(self.log_path, "ab") as log_file:
            self.popen = subprocess.Popen([etcd_binary(), *self.args], stdin=subprocess.DEVNULL, stdout=log_file,
                                          stderr=subprocess.STDOUT)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `grace` seconds."""
        if not self.running:
            return
        os.kill(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: the member dies as in a crash or power loss."""
        if self.running:
            os.kill(self.popen.pid, signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(timeout=STOP_GRACE)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class EtcdCluster:
    members: list[EtcdMember]
    tls: TLSFiles
    max_entry_bytes: int

    @property
    def endpoints(self) -> list[str]:
        return [member.endpoint for member in self.members]

    def wait_ready(self, timeout: float = READY_TIMEOUT, members: list[EtcdMember] | None = None) -> None:
        """Returns once each running member (or each of `members`) answers Status with a leader."""
        deadline = time.monotonic() + timeout
        for member in members or [m for m in self.members if m.running]:
            _wait_member_ready(member, self.tls, deadline)

    def stop(self) -> None:
        for member in self.members:
            member.stop()


def start_cluster(base_dir: Path, tls: TLSFiles, size: int = 1,
                  max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES) -> EtcdCluster:
    """Starts `size` members on 127.0.0.1 under `base_dir` (one data dir and log each) as one new
    cluster, and returns once every member serves with a leader."""
    etcd_binary()
    base_dir = Path(base_dir)
    base_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, START_ATTEMPTS + 1):
        cluster = _configure(base_dir / f"try{attempt}", TLSFiles(*tls), size, max_entry_bytes)
        for member in cluster.members:
            member.launch()
        try:
            cluster.wait_ready()
            return cluster
        except BaseException as exc:
            clash = any("address already in use" in m.log_tail(50) for m in cluster.members)
            cluster.stop()
            if not isinstance(exc, LedgerError) or not clash or attempt == START_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _configure(base_dir: Path, tls: TLSFiles, size: int, max_entry_bytes: int) -> EtcdCluster:
    ports = set()
    while len(ports) < 2 * size:
        ports.add(free_port())
    ports = sorted(ports)
    members = [EtcdMember(f"etcd{i}", base_dir / f"etcd{i}.data", ports[2 * i], ports[2 * i + 1])
               for i in range(size)]
    initial = ",".join(f"{m.name}=https://127.0.0.1:{m.peer_port}" for m in members)
    # A token of its own keeps this cluster's members from ever joining another test's.
    token = f"swarmlearn-{secrets.token_hex(6)}"
    base_dir.mkdir(parents=True, exist_ok=True)
    for member in members:
        client_url, peer_url = f"https://127.0.0.1:{member.client_port}", f"https://127.0.0.1:{member.peer_port}"
        member.args = [
            "--name", member.name, "--data-dir", str(member.data_dir),
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", initial, "--initial-cluster-state", "new", "--initial-cluster-token", token,
            *_tls_flags(tls, base_dir),
            "--max-request-bytes", str(request_bytes_for(max_entry_bytes)),
            # etcd keeps every revision of every key until compacted: the head is rewritten with each
            # entry and heartbeats are put several times a second, so without this its history (and
            # database, up to --quota-backend-bytes, after which it refuses every write) grows forever.
            "--auto-compaction-mode", "revision", "--auto-compaction-retention", str(COMPACTION_RETENTION),
            "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
        ]
    return EtcdCluster(members, tls, max_entry_bytes)


def _tls_flags(tls: TLSFiles, base_dir: Path) -> list[str]:
    from swarmlearn.pki import cert_to_pem, load_ca_certs

    # etcd takes one CA file; a capath folder may hold several CAs (the swarm trusts their union).
    bundle = base_dir / "trusted-ca.pem"
    bundle.write_bytes(b"".join(cert_to_pem(cert) for _, cert in load_ca_certs(Path(tls.ca))))
    files = ["--trusted-ca-file", str(bundle), "--cert-file", str(tls.cert), "--key-file", str(tls.key)]
    peer = ["--peer-trusted-ca-file", str(bundle), "--peer-cert-file", str(tls.cert), "--peer-key-file", str(tls.key)]
    return ["--client-cert-auth", *files, "--peer-client-cert-auth", *peer]


def _wait_member_ready(member: EtcdMember, tls: TLSFiles, deadline: float) -> None:
    channel = open_channel(member.endpoint, tls)
    last = "no answer yet"
    try:
        status = rpc.MaintenanceStub(channel)
        while time.monotonic() < deadline:
            if not member.running:
                raise LedgerError(f"etcd member {member.name} exited at start-up; its log "
                                  f"({member.log_path}) ends:\n{member.log_tail()}")
            try:
                if status.Status(pb.StatusRequest(), timeout=1.0, metadata=REQUIRE_LEADER).leader:
                    return
                last = "no leader yet"
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            time.sleep(0.1)
    finally:
        channel.close()
    raise LedgerError(f"etcd member {member.name} at {member.endpoint} did not serve with a leader in time "
                      f"({last}); its log ({member.log_path}) ends:\n{member.log_tail()}")
