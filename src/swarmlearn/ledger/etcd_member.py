"""etcd members run as child processes: clusters on 127.0.0.1 for tests (start_cluster), and the member
beside each `swarm sn --ledger etcd` that runs its own (own_member, start_member; sn/cluster.py joins it).

Every member listens with mutual TLS on its client and peer URLs trusting the CA of `tls` alone: the
ledger's CA, which issues to SNs and members only, never the swarm's (etcd_store.py says why). It compacts
its history as it goes (COMPACTION_RETENTION), and takes requests as large as the ledger store's entries
need (--max-request-bytes). etcd cannot listen on port 0, so ports are chosen by binding a socket to port 0
and closing it; if another process takes one in between, the test members are started again on new ports.

An SN's own member runs under swop/launch.py with this process's lifeline (swop/runtime.py): it stops when
the SN stops, and when the SN is killed (SIGKILL, a crash) the wrapper stops it, so a member never
outlives its SN. Its data dir is <SN data dir>/etcd and where it listens is kept beside it
(OWN_MEMBER_FILE), so an SN restarted on that data dir restarts the same member of the same cluster.
"""

from __future__ import annotations

import json
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

from swarmlearn.defaults import ETCD_CLIENT_PORT, SN_P2P_PORT
from swarmlearn.errors import ConfigError, LedgerError
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


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def url(host: str, port: int) -> str:
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


@dataclass
class EtcdMember:
    """One member: its name, data dir, ports and, while it runs, its process."""

    name: str
    data_dir: Path
    client_port: int
    peer_port: int
    args: list[str] = field(default_factory=list)
    popen: subprocess.Popen | None = None
    host: str = "127.0.0.1"
    log_file: Path | None = None
    # Under swop/launch.py with this process's lifeline: the member dies with this process.
    supervised: bool = False
    _handle: object | None = None

    @property
    def endpoint(self) -> str:
        return url(self.host, self.client_port).removeprefix("https://")

    @property
    def client_url(self) -> str:
        return url(self.host, self.client_port)

    @property
    def peer_url(self) -> str:
        return url(self.host, self.peer_port)

    @property
    def log_path(self) -> Path:
        return self.log_file or self.data_dir.with_name(f"{self.name}.log")

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int | None:
        """The pid of the process started: etcd, or its launch wrapper when supervised."""
        return self.popen.pid if self.popen is not None else None

    def launch(self) -> None:
        """Starts the process; again after a stop, it rejoins its cluster from its data dir."""
        if self.supervised:
            from swarmlearn.swop.runtime import ProcessRuntime, Spec

            # Its pid file goes to <SN data dir>/pids, where `swarm stop` finds it too.
            self._handle = ProcessRuntime(self.data_dir.parent).start(Spec(
                f"etcd-{self.name}", [etcd_binary(), *self.args], self.data_dir.parent, dict(os.environ),
                self.log_path))
            self.popen = self._handle.popen
            return
        with open(self.log_path, "ab") as log_file:
            self.popen = subprocess.Popen([etcd_binary(), *self.args], stdin=subprocess.DEVNULL, stdout=log_file,
                                          stderr=subprocess.STDOUT)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `grace` seconds."""
        if self._handle is not None:
            self._handle.stop(grace)  # the wrapper passes SIGTERM on; SIGKILL goes to its whole group
            return
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
            if self.supervised:
                os.killpg(self.popen.pid, signal.SIGKILL)  # the wrapper leads a process group of its own
            else:
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

    @property
    def client_urls(self) -> list[str]:
        """The members' client URLs, as `swarm sn --etcd-endpoints` takes them."""
        return [member.client_url for member in self.members]

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
        try_dir = base_dir / f"try{attempt}"
        ports = set()
        while len(ports) < 2 * size:
            ports.add(free_port())
        ports = sorted(ports)
        members = [EtcdMember(f"etcd{i}", try_dir / f"etcd{i}.data", ports[2 * i], ports[2 * i + 1])
                   for i in range(size)]
        try:
            return launch_new_cluster(members, try_dir, TLSFiles(*tls), max_entry_bytes)
        except LedgerError:
            clash = any("address already in use" in m.log_tail(50) for m in members)
            if not clash or attempt == START_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def launch_new_cluster(members: list[EtcdMember], base_dir: Path, tls: TLSFiles,
                       max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES) -> EtcdCluster:
    """Starts `members` (none started before, wherever each launches) as the founders of one new
    cluster, and returns once each serves with a leader; on failure every one is stopped."""
    initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
    # A token of its own keeps this cluster's members from ever joining another test's.
    bootstrap = Bootstrap(initial, "new", f"swarmlearn-{secrets.token_hex(6)}")
    base_dir.mkdir(parents=True, exist_ok=True)
    cluster = EtcdCluster(members, tls, max_entry_bytes)
    try:
        for member in members:
            member.args = member_args(member, tls, base_dir / "trusted-ca.pem", max_entry_bytes, bootstrap)
            member.launch()
        cluster.wait_ready()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@dataclass(frozen=True)
class Bootstrap:
    """How a member with no data yet enters its cluster: the members (name=peer URL, ...), "new" (they
    found it together) or "existing" (it joins one that runs), and a new cluster's token."""

    initial_cluster: str
    state: str
    token: str | None = None


def member_args(member: EtcdMember, tls: TLSFiles, ca_bundle: Path, max_entry_bytes: int,
                bootstrap: Bootstrap | None) -> list[str]:
    """etcd's command line for `member`; without `bootstrap`, it restarts from its data dir."""
    entering = []
    if bootstrap is not None:
        entering = ["--initial-cluster", bootstrap.initial_cluster, "--initial-cluster-state", bootstrap.state]
        if bootstrap.token:
            entering += ["--initial-cluster-token", bootstrap.token]
    return [
        "--name", member.name, "--data-dir", str(member.data_dir),
        "--listen-client-urls", member.client_url, "--advertise-client-urls", member.client_url,
        "--listen-peer-urls", member.peer_url, "--initial-advertise-peer-urls", member.peer_url,
        *entering, *_tls_flags(tls, ca_bundle),
        "--max-request-bytes", str(request_bytes_for(max_entry_bytes)),
        # etcd keeps every revision of every key until compacted: the head is rewritten with each
        # entry and heartbeats are put several times a second, so without this its history (and
        # database, up to --quota-backend-bytes, after which it refuses every write) grows forever.
        "--auto-compaction-mode", "revision", "--auto-compaction-retention", str(COMPACTION_RETENTION),
        "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
    ]


def _tls_flags(tls: TLSFiles, bundle: Path) -> list[str]:
    from swarmlearn.pki import cert_to_pem, load_ca_certs

    # etcd takes one CA file; a capath folder may hold several CAs (the swarm trusts their union).
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


# ------------------------------------------------------------------------------------ an SN's own member

OWN_MEMBER_DIR = "etcd"
OWN_MEMBER_FILE = "etcd-member.json"
OWN_MEMBER_LOG = "etcd.log"
OWN_CA_BUNDLE = "etcd-trusted-ca.pem"


def own_member(sn_data_dir: Path, name: str, host: str, client_port: int | None,
               peer_port: int | None) -> tuple[EtcdMember, bool]:
    """The member of the SN whose data dir is `sn_data_dir`, named after the SN, and whether it holds data
    already (it then restarts where it listened before, where its peers know it). A port not given (None)
    is the default for a new member and the one recorded for a restart; port 0 chooses a free port."""
    sn_data_dir = Path(sn_data_dir)
    data, record = sn_data_dir / OWN_MEMBER_DIR, sn_data_dir / OWN_MEMBER_FILE
    if (data / "member").is_dir():
        saved = _saved_member(record)
        for flag, given, before in (("--host-ip", host, saved["host"]),
                                    ("--etcd-client-port", client_port or saved["client_port"], saved["client_port"]),
                                    ("--sn-p2p-port", peer_port or saved["peer_port"], saved["peer_port"])):
            if given != before:
                raise ConfigError(f"{flag} {given}: this SN's etcd member ({data}) belongs to its cluster at {before}, "
                                  f"where its peers reach it; give {flag} {before}, or a new --data-dir to join "
                                  f"the cluster anew")
        if saved["name"] != name:
            raise ConfigError(f"{record}: the etcd member here is {saved['name']!r}, not this SN ({name!r}); use the "
                              f"--data-dir of {name}")
        return _supervised(name, sn_data_dir, host, saved["client_port"], saved["peer_port"]), True
    client_port = free_port(host) if client_port == 0 else client_port or ETCD_CLIENT_PORT
    peer_port = SN_P2P_PORT if peer_port is None else peer_port
    while not peer_port or peer_port == client_port:
        peer_port = free_port(host)
    return _supervised(name, sn_data_dir, host, client_port, peer_port), False


def _supervised(name: str, sn_data_dir: Path, host: str, client_port: int, peer_port: int) -> EtcdMember:
    return EtcdMember(name, sn_data_dir / OWN_MEMBER_DIR, client_port, peer_port, host=host,
                      log_file=sn_data_dir / OWN_MEMBER_LOG, supervised=True)


def _saved_member(record: Path) -> dict:
    try:
        saved = json.loads(record.read_text())
        if not all(isinstance(saved.get(k), t) for k, t in
                   (("name", str), ("host", str), ("client_port", int), ("peer_port", int))):
            raise ValueError("a field is missing")
        return saved
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{record}: cannot read where this SN's etcd member listens ({exc}); the member's data "
                          f"is in {record.with_name(OWN_MEMBER_DIR)}: restore the file, or remove both and join "
                          f"the cluster anew") from None


def start_member(member: EtcdMember, tls: TLSFiles, bootstrap: Bootstrap | None,
                 max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES, timeout: float = READY_TIMEOUT) -> None:
    """Starts the SN's own `member` (recording where it listens first) and returns once it serves with a
    leader; stops it and raises LedgerError if it does not within `timeout`."""
    sn_data_dir = member.data_dir.parent
    sn_data_dir.mkdir(parents=True, exist_ok=True)
    record = {"name": member.name, "host": member.host, "client_port": member.client_port,
              "peer_port": member.peer_port}
    from swarmlearn.files import write_atomically

    write_atomically(sn_data_dir / OWN_MEMBER_FILE, json.dumps(record, indent=1).encode())
    member.args = member_args(member, tls, sn_data_dir / OWN_CA_BUNDLE, max_entry_bytes, bootstrap)
    member.launch()
    try:
        _wait_member_ready(member, tls, time.monotonic() + timeout)
    except BaseException:
        member.stop()
        raise


def forget_member(member: EtcdMember) -> None:
    """Removes the data and record of a member that never became one of its cluster (a failed join), so
    that the SN can try again from scratch."""
    shutil.rmtree(member.data_dir, ignore_errors=True)
    (member.data_dir.parent / OWN_MEMBER_FILE).unlink(missing_ok=True)
