"""SNs that run their own etcd members: the sentinel founds the cluster with its member, each further SN
joins it through any running SN (a learner first, promoted once in sync), every SN serves the same
ledger, only an SN the ledger admits may add a member, and a member never outlives its SN.

Real processes on 127.0.0.1: three `swarm sn --ledger etcd` (no --etcd-endpoints), each starting its
own etcd member, with the swarm's certificates for the SN API and a ledger CA's (made by `swarm gen-cert
--ledger`) for etcd. One cluster for the module; the tests run in file order, the last ones kill and
restart SNs.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from conftest import Procs, RunningSN, identity, identity_args, run_swarm
from swarmlearn.errors import Rejected
from swarmlearn.ledger.etcd_member import SETUP_HINT
from swarmlearn.ledger.etcd_store import EtcdStore, TLSFiles
from swarmlearn.pki import CertLayout, generate_host_certs
from swarmlearn.sn.client import SNClient
from test_store_conformance import ledger_certs

pytestmark = pytest.mark.slow

PREFIX = "/swarmlearn-test-sn-cluster"
# The launch wrapper stops an orphaned member at once and kills it after ORPHAN_GRACE (5 s).
MEMBER_GONE_WITHIN = 10.0


@dataclass
class Cluster:
    base: Path
    hosts: list[CertLayout]
    ledger: list[TLSFiles]
    procs: Procs
    sns: list[RunningSN] = field(default_factory=list)

    def sn_args(self, host: int, *extra: str, ledger: TLSFiles | None = None) -> list[str]:
        """`swarm sn --ledger etcd` of host `host` (0-based) with its own member, on free ports."""
        tls = ledger or self.ledger[host]
        return ["sn", "--ledger", "etcd", "--etcd-prefix", PREFIX, "--etcd-cert", str(tls.cert),
                "--etcd-key", str(tls.key), "--etcd-cacert", str(tls.ca), "--host-ip", "127.0.0.1",
                "--sn-api-port", "0", "--sn-p2p-port", "0", "--etcd-client-port", "0",
                *identity_args(self.hosts[host], "sn"), "--data-dir", str(self.base / f"sn{host + 1}"), *extra]

    def start(self, host: int, *extra: str) -> RunningSN:
        proc = self.procs.swarm(*self.sn_args(host, *extra))
        line = proc.wait_for_line("SN ready on ", timeout=60)
        return RunningSN(proc, line.split("SN ready on ")[1].split()[0], self.base / f"sn{host + 1}")

    def members(self, via: int) -> list:
        """The etcd members as SN `via`'s own member lists them."""
        member = read_member_record(self.sns[via].data_dir)
        store = EtcdStore([f"127.0.0.1:{member['client_port']}"], PREFIX, self.ledger[via])
        try:
            return store.members()
        finally:
            store.close()

    def client(self, host: int, sn: int, component: str = "swci") -> SNClient:
        c = SNClient(self.sns[sn].address, identity(self.hosts[host], component))
        c.wait_ready(10)
        return c


def read_member_record(data_dir: Path) -> dict:
    import json

    return json.loads((data_dir / "etcd-member.json").read_text())


def member_pids(running: RunningSN) -> list[int]:
    """The etcd processes under an SN process (its member, under its launch wrapper)."""
    return [p.pid for p in psutil.Process(running.proc.popen.pid).children(recursive=True) if p.name() == "etcd"]


def ledger_identity(base: Path, ledger_ca: CertLayout, index: int) -> TLSFiles:
    """An sn certificate of the ledger CA for host `index`, made as a user would: gen-cert --ledger."""
    out = base / f"ledger{index}"
    result = run_swarm("gen-cert", "--ledger", "-i", str(index), "--out", str(out), "--ca-cert", str(ledger_ca.ca_cert),
                       "--ca-key", str(ledger_ca.ca_key))
    assert result.returncode == 0, result.stderr
    layout = CertLayout(out, index)
    assert sorted(p.name for p in out.glob("*.pem")) == [f"sn-{index}-cert.pem", f"sn-{index}-key.pem"]
    return TLSFiles(ledger_ca.ca_cert, layout.cert("sn"), layout.key("sn"))


@pytest.fixture(scope="module")
def cluster(certs, tmp_path_factory) -> Cluster:
    if shutil.which("etcd") is None:
        pytest.fail(f"etcd is not installed (no `etcd` on PATH): {SETUP_HINT}")
    base = tmp_path_factory.mktemp("sn-cluster")
    hosts = [certs]
    for index in (2, 3, 4):
        generate_host_certs(base / f"cert{index}", index, nodes=[f"node{index}"], ca_cert_path=certs.ca_cert,
                            ca_key_path=certs.ca_key)
        hosts.append(CertLayout(base / f"cert{index}", index))
    ledger_ca = ledger_certs(certs)
    ledger = [TLSFiles(ledger_ca.ca_cert, ledger_ca.cert("sn"), ledger_ca.key("sn"))]
    ledger += [ledger_identity(base, ledger_ca, index) for index in (2, 3, 4)]
    shared = Cluster(base, hosts, ledger, Procs())
    try:
        shared.sns.append(shared.start(0, "--sentinel"))
        # SN 2 joins through the sentinel, SN 3 through SN 2.
        shared.sns.append(shared.start(1, "--sentinel-ip", shared.sns[0].address))
        shared.sns.append(shared.start(2, "--sentinel-ip", shared.sns[1].address))
        yield shared
    finally:
        shared.procs.stop_all()


def test_each_sn_runs_a_voting_member_of_one_cluster(cluster):
    for sn in range(3):
        members = cluster.members(sn)
        assert sorted(m.name for m in members) == ["sn-1", "sn-2", "sn-3"]
        assert not [m.name for m in members if m.isLearner]
        assert len(member_pids(cluster.sns[sn])) == 1
    assert "(sentinel)" in cluster.sns[0].proc.output


def test_an_entry_submitted_through_one_sn_is_seen_on_another(cluster):
    with cluster.client(2, 2) as swci3:
        index = swci3.register("swci")
    with cluster.client(0, 0) as swci1:
        deadline = time.monotonic() + 5
        while "swci-3" not in swci1.query("nodes")["nodes"]:
            assert time.monotonic() < deadline, "SN 1 never saw the registration made through SN 3"
            time.sleep(0.1)
        assert swci1.query("nodes")["nodes"]["swci-3"]["registered_at"] == index


def test_only_a_registered_sn_may_add_a_member(cluster):
    peer_url = "https://127.0.0.1:1"
    ledger_pem = cluster.ledger[3].cert.read_bytes()
    with SNClient(cluster.sns[0].address, identity(cluster.hosts[0], "sl")) as sl:
        with pytest.raises(Rejected, match="only an SN runs an etcd member|no node is registered"):
            sl.join_cluster(peer_url, ledger_pem)
    # SN 4's certificate comes from the swarm's CA, but no SN 4 registered on the ledger.
    with SNClient(cluster.sns[1].address, identity(cluster.hosts[3], "sn")) as sn4:
        with pytest.raises(Rejected, match="no node is registered"):
            sn4.join_cluster(peer_url, ledger_pem)
    assert len(cluster.members(0)) == 3


def test_a_join_request_is_bounded(cluster):
    ledger_pem = cluster.ledger[2].cert.read_bytes()
    with SNClient(cluster.sns[0].address, identity(cluster.hosts[2], "sn")) as sn3:
        for bad in ("http://127.0.0.1:2380", "https://127.0.0.1:2380/x", "https://127.0.0.1", "x" * 300,
                    "https://127.0.0.1:2380,https://127.0.0.2:2380"):
            with pytest.raises(Rejected, match="peer_url"):
                sn3.join_cluster(bad, ledger_pem)
        with pytest.raises(Rejected, match="not issued by the ledger CA"):
            sn3.join_cluster("https://127.0.0.1:2", cluster.hosts[2].cert("sn").read_bytes())
    assert len(cluster.members(0)) == 3


def test_an_sn_whose_ledger_identity_comes_from_another_ca_cannot_join(cluster):
    other_root = cluster.base / "other-ledger-ca"
    generate_host_certs(other_root, 1, org="other-ledger", nodes=[], components=("sn",))
    other = CertLayout(other_root, 1)
    foreign = TLSFiles(other.ca_cert, other.cert("sn"), other.key("sn"))
    result = run_swarm(*cluster.sn_args(3, "--sentinel-ip", cluster.sns[2].address, ledger=foreign), timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "not issued by the ledger CA" in error_lines[0], result.stderr
    assert sorted(m.name for m in cluster.members(1)) == ["sn-1", "sn-2", "sn-3"]
    assert not (cluster.base / "sn4" / "etcd").exists()


def test_killing_the_sentinel_sn_kills_its_member_and_the_others_go_on(cluster):
    sentinel = cluster.sns[0]
    (member,) = member_pids(sentinel)
    sentinel.proc.kill(signal.SIGKILL)
    deadline = time.monotonic() + MEMBER_GONE_WITHIN
    while psutil.pid_exists(member) and psutil.Process(member).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"etcd member {member} outlived its SN"
        time.sleep(0.1)
    with cluster.client(1, 1) as swci2:
        index = swci2.register("swci")
    with cluster.client(0, 2) as swci1:
        assert swci1.query("nodes")["nodes"]["swci-2"]["registered_at"] == index


def test_a_joined_sn_restarted_on_its_data_dir_serves_again(cluster):
    joined = cluster.sns[2]
    (member,) = member_pids(joined)
    os.kill(joined.proc.popen.pid, signal.SIGTERM)
    joined.proc.popen.wait(timeout=30)
    assert not psutil.pid_exists(member) or psutil.Process(member).status() == psutil.STATUS_ZOMBIE
    cluster.sns[2] = cluster.start(2, "--sentinel-ip", cluster.sns[1].address)
    assert "restarting etcd member sn-3" in cluster.sns[2].proc.output
    assert sorted(m.name for m in cluster.members(2)) == ["sn-1", "sn-2", "sn-3"]
    with cluster.client(2, 2, "admin") as admin3:
        index = admin3.register("admin")
    with cluster.client(1, 1) as swci2:
        assert swci2.query("nodes")["nodes"]["admin-3"]["registered_at"] == index


def test_a_member_listens_on_the_host_address_its_ledger_certificate_names(cluster):
    """127.0.0.2 is no address gen-cert puts in a certificate by itself: --san adds it."""
    out = cluster.base / "ledger-far"
    ledger_ca = ledger_certs(cluster.hosts[0])
    result = run_swarm("gen-cert", "--ledger", "-i", "5", "--san", "127.0.0.2", "--out", str(out),
                       "--ca-cert", str(ledger_ca.ca_cert), "--ca-key", str(ledger_ca.ca_key))
    assert result.returncode == 0, result.stderr
    far = TLSFiles(ledger_ca.ca_cert, CertLayout(out, 5).cert("sn"), CertLayout(out, 5).key("sn"))
    args = cluster.sn_args(3, "--sentinel", ledger=far)
    args[args.index("127.0.0.1")] = "127.0.0.2"
    args[args.index(str(cluster.base / "sn4"))] = str(cluster.base / "sn-far")
    proc = cluster.procs.swarm(*args)
    assert proc.wait_for_line("SN ready on 127.0.0.2:", timeout=60)
    assert read_member_record(cluster.base / "sn-far")["host"] == "127.0.0.2"
    os.kill(proc.popen.pid, signal.SIGTERM)
    proc.popen.wait(timeout=30)
