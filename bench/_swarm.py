"""Shared by benchmarks: a throw-away swarm on 127.0.0.1 — certificates, a sentinel SN and SL
processes — started as a user would, and stopped by pid. Its ledger is the SN's SQLite file (the
default) or, with ledger="etcd", a three-member etcd cluster with mutual TLS from a ledger CA of its own,
which further SNs (start_sn(host=2), ...) can share: its members on 127.0.0.1, or each in a network
namespace of its own (etcd_hosts: emulated hosts of tests/netns.py, which this process must reach).
The SN and SLs, too, can each run on an emulated host (`on=`: they serve on its address; give the
hosts' addresses as `sans` so that the certificates name them)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from swarmlearn.ledger.etcd_member import EtcdCluster, EtcdMember, etcd_binary, launch_new_cluster, start_cluster
from swarmlearn.ledger.etcd_store import EtcdStore, TLSFiles
from swarmlearn.ledger.sqlite_store import SQLiteStore
from swarmlearn.ledger.store import LedgerStore
from swarmlearn.callback.core import SLChannel
from swarmlearn.ledger.model import Round
from swarmlearn.ledger.state import LedgerState, fold
from swarmlearn.pki import CertLayout, Identity, generate_host_certs
from swarmlearn.defaults import DEFAULT_CONTRACT

SWARM = [sys.executable, "-m", "swarmlearn.cli"]
LEDGERS = ("sqlite", "etcd")
ETCD_PREFIX = "/swarmlearn-bench"
ETCD_MEMBERS = 3
# A member in a namespace of its own has the host's ports to itself: etcd's usual ones.
ETCD_CLIENT_PORT, ETCD_PEER_PORT = 2379, 2380


@dataclass
class NamespacedMember(EtcdMember):
    """An etcd member run inside network namespace `namespace` (`ip netns exec` execs etcd in place,
    so the pid recorded is etcd's own and stopping it by pid stays exact)."""

    namespace: str = ""

    def launch(self) -> None:
        with open(self.log_path, "ab") as log_file:
            self.popen = subprocess.Popen(["ip", "netns", "exec", self.namespace, etcd_binary(), *self.args],
                                          stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)


def start_cluster_on_hosts(base_dir: Path, tls: TLSFiles, hosts: list[tuple[str, str]]) -> EtcdCluster:
    """One new etcd cluster with a member on each (namespace, address) of `hosts`; returns once every
    member serves with a leader."""
    members = [NamespacedMember(f"etcd{i}", base_dir / f"etcd{i}.data", ETCD_CLIENT_PORT, ETCD_PEER_PORT, host=ip,
                                namespace=ns) for i, (ns, ip) in enumerate(hosts)]
    return launch_new_cluster(members, base_dir, tls)


@dataclass
class Process:
    popen: subprocess.Popen
    lines: list[str] = field(default_factory=list)

    def wait_line(self, needle: str, timeout: float = 60) -> str:
        done = threading.Event()
        found: list[str] = []

        def pump():
            for line in self.popen.stdout:
                self.lines.append(line.rstrip())
                if needle in line and not found:
                    found.append(line.strip())
                    done.set()
            done.set()

        threading.Thread(target=pump, daemon=True).start()
        done.wait(timeout)
        if not found:
            raise RuntimeError(f"no {needle!r} from {self.popen.args}:\n" + "\n".join(self.lines[-20:]))
        return found[0]


class LocalSwarm:
    def __init__(self, workdir: Path | None = None, ledger: str = "sqlite",
                 etcd_hosts: list[tuple[str, str]] | None = None, sans: list[str] | None = None):
        if ledger not in LEDGERS:
            raise ValueError(f"ledger {ledger!r}: give one of {', '.join(LEDGERS)}")
        self.ledger = ledger
        self.etcd_hosts = etcd_hosts  # (namespace, address) per etcd member; None: all on 127.0.0.1
        self.own_dir = workdir is None  # a temporary folder of ours is removed at stop
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="swarm-bench-"))
        self.certs = CertLayout(self.dir / "cert", 1)
        self.sans = sans or []  # further addresses the processes serve on, which peers dial and check
        generate_host_certs(self.certs.root, 1, sans=self.sans)
        self.processes: list[Process] = []
        self.etcd: EtcdCluster | None = None
        self.sns: dict[str, Process] = {}  # SN address -> its process
        self.sn_address = ""
        self.sl_addresses: dict[str, str] = {}
        self.sls: dict[str, Process] = {}

    def _files(self, component: str, node: str | None) -> tuple[Path, Path]:
        if component != "sl":
            return self.certs.key(component), self.certs.cert(component)
        node = node or "node1"
        if not self.certs.node_cert(node).exists():  # each training node has a certificate of its own
            generate_host_certs(self.certs.root, 1, nodes=[node], components=(), sans=self.sans)
        return self.certs.node_key(node), self.certs.node_cert(node)

    def identity(self, component: str, node: str | None = None) -> Identity:
        key, cert = self._files(component, node)
        return Identity.load(key, cert, self.certs.capath)

    def _ids(self, component: str, node: str | None = None) -> list[str]:
        key, cert = self._files(component, node)
        return ["--key", str(key), "--cert", str(cert), "--capath", str(self.certs.capath)]

    def _start(self, *args: str, on=None) -> Process:
        """`swarm *args`, here or on emulated host `on` (a tests/netns.py Host), serving on its address;
        `ip netns exec` execs in place, so the pid is still the process's own."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        command = [*SWARM, *args] if on is None else on.command([*SWARM, *args, "--host-ip", on.ip])
        p = Process(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
        self.processes.append(p)
        return p

    def host_certs(self, host: int) -> CertLayout:
        """Host `host`'s certificates (host 1: the swarm's CA; others issued by it), made on first use."""
        if host == 1:
            return self.certs
        layout = CertLayout(self.dir / f"cert{host}", host)
        if not layout.cert("sn").exists():
            generate_host_certs(layout.root, host, components=("sn",), ca_cert_path=self.certs.ca_cert,
                                ca_key_path=self.certs.ca_key)
        return layout

    @property
    def etcd_tls(self) -> TLSFiles:
        """The ledger CA's identity (its own organization, apart from the swarm's CA), made on first
        use: the etcd members serve and trust it, and the SNs reach them with it."""
        layout = CertLayout(self.dir / "cert-ledger", 1)
        if not layout.cert("sn").exists():
            generate_host_certs(layout.root, 1, org="bench-ledger", components=("sn",),
                                sans=[ip for _, ip in self.etcd_hosts or []])
        return TLSFiles(layout.ca_cert, layout.cert("sn"), layout.key("sn"))

    def _ledger_args(self, host: int) -> list[str]:
        if self.ledger == "sqlite":
            return []
        if self.etcd is None and self.etcd_hosts:
            self.etcd = start_cluster_on_hosts(self.dir / "etcd", self.etcd_tls, self.etcd_hosts)
        elif self.etcd is None:
            self.etcd = start_cluster(self.dir / "etcd", self.etcd_tls, size=ETCD_MEMBERS)
        urls = self.etcd.client_urls
        first = (host - 1) % len(urls)  # each host's SN talks to its own member first
        tls = self.etcd.tls
        return ["--ledger", "etcd", "--etcd-endpoints", ",".join(urls[first:] + urls[:first]), "--etcd-prefix",
                ETCD_PREFIX, "--etcd-cert", str(tls.cert), "--etcd-key", str(tls.key), "--etcd-cacert", str(tls.ca),
                "--host-ip", "127.0.0.1"]

    def start_sn(self, host: int = 1, on=None) -> str:
        """Host 1's SN is the sentinel; with ledger="etcd", hosts 2, 3, ... start SNs on the same ledger.
        `on`: the emulated host to run it on (SQLite ledger only). Returns its address; the first SN's is
        also `sn_address`, the one SLs are given."""
        if on is not None and self.ledger != "sqlite":
            raise ValueError("an SN on an emulated host (on=) needs the SQLite ledger; etcd_hosts places etcd members")
        certs = self.host_certs(host)
        ids = ["--key", str(certs.key("sn")), "--cert", str(certs.cert("sn")), "--capath", str(certs.capath)]
        data_dir = self.dir / ("sn" if host == 1 else f"sn{host}")
        sn = self._start("sn", *(["--sentinel"] if host == 1 else []), "--sn-api-port", "0", *ids,
                         "--data-dir", str(data_dir), *self._ledger_args(host), on=on)
        address = sn.wait_line("SN ready on ").split("SN ready on ")[1].split()[0]
        self.sns[address] = sn
        self.sn_address = self.sn_address or address
        return address

    def start_sl(self, node_id: str, *extra: str, on=None) -> str:
        """An SL process for `node_id`, here or on emulated host `on`; returns its ML channel's address."""
        return self._ready_sl(node_id, self._sl_process(node_id, *extra, on=on))

    def start_sls(self, node_ids: list[str]) -> dict[str, str]:
        """An SL process per node, all started before any is waited for (as the SWOP starts a task's
        SLs); returns each one's ML channel address."""
        started = {n: self._sl_process(n) for n in node_ids}
        return {n: self._ready_sl(n, sl) for n, sl in started.items()}

    def _sl_process(self, node_id: str, *extra: str, on=None) -> Process:
        host, port = self.sn_address.rsplit(":", 1)
        return self._start("sl", "--sn-ip", host, "--sn-api-port", port, "--sl-fs-port", "0", *self._ids("sl", node_id),
                           "--node-id", node_id, "--data-dir", str(self.dir / f"sl-{node_id}"), *extra, on=on)

    def _ready_sl(self, node_id: str, sl: Process) -> str:
        self.sl_addresses[node_id] = sl.wait_line("SWARM_SL_ADDR=").split("SWARM_SL_ADDR=")[1]
        self.sls[node_id] = sl
        return self.sl_addresses[node_id]

    @property
    def ledger_path(self) -> Path:
        return self.dir / "sn" / "ledger.db"

    def open_ledger(self) -> LedgerStore:
        """The ledger the SNs write, opened to read (the SNs may keep appending); close it after use."""
        if self.ledger == "sqlite":
            return SQLiteStore(self.ledger_path, read_only=True)
        return EtcdStore(self.etcd.endpoints, ETCD_PREFIX, self.etcd.tls)

    def ledger_state(self) -> LedgerState:
        """The state folded from the SNs' ledger."""
        store = self.open_ledger()
        try:
            return fold(store.read())
        finally:
            store.close()

    def start_peers(self, nodes: list[str], min_peers: int) -> dict[str, SLChannel]:
        """An SN, one SL process per node, and for each an ML-side channel joined to the default
        contract (the ML stand-ins of the latency benchmarks)."""
        self.start_sn()
        self.start_sls(nodes)
        channels = {n: SLChannel(self.sl_addresses[n]) for n in nodes}
        for n in nodes:
            channels[n].join("default", min_peers, 1.0, "mean")
        return channels

    def round_record(self, number: int, contract: str = DEFAULT_CONTRACT) -> Round:
        return self.ledger_state().contract(contract).rounds[number]

    def tails(self, lines: int = 15) -> str:
        """The last lines each SL printed (a failed benchmark prints them: its swarm's folder goes)."""
        return "\n".join(f"--- {node}'s SL, last {lines} lines:\n" + "\n".join(sl.lines[-lines:])
                         for node, sl in self.sls.items())

    def stop(self) -> None:
        """Stops the SLs all at once, then the SNs (an SL leaves its sessions through them)."""
        sns = [p for p in self.processes if _command(p) == "sn"]
        _stop_together([p for p in reversed(self.processes) if p not in sns])
        _stop_together(sns)
        if self.etcd is not None:
            self.etcd.stop()
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def _command(p: Process) -> str:
    """The swarm command a process runs ("sn", "sl", ...), here or inside `ip netns exec`."""
    args = list(p.popen.args)
    at = args.index(SWARM[-1]) if SWARM[-1] in args else -1
    return args[at + 1] if 0 <= at < len(args) - 1 else ""


def _stop_together(processes: list[Process], grace: float = 10.0) -> None:
    """SIGTERM to every one, then each waited for (killed once `grace` seconds have passed)."""
    running = [p for p in processes if p.popen.poll() is None]
    for p in running:
        p.popen.send_signal(signal.SIGCONT)  # a test may have paused it
        p.popen.terminate()
    deadline = time.monotonic() + grace
    for p in running:
        try:
            p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait()
