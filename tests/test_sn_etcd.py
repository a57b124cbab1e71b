"""Several SNs in front of one ledger that a three-member etcd cluster replicates, on one host: what
goes in through one SN comes out of every other, races between SNs make one chain, liveness is the
same on every SN, and the swarm goes on when one SN and its etcd member are killed.

Real processes only: three etcd members (mutual TLS, our CA only) and three `swarm sn --ledger etcd`
processes, one per host identity (host 1's CA issues hosts 2 and 3 too), started once for the module
and stopped by pid at its end. The tests run in file order; the last one kills a host's SN and member.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import Procs, RunningSN, identity, identity_args, run_swarm
from swarmlearn.ledger.etcd_member import SETUP_HINT, EtcdCluster, start_cluster
from swarmlearn.ledger.etcd_store import EtcdStore
from swarmlearn.pki import CertLayout, generate_host_certs
from swarmlearn.sn.client import SNClient
from test_store_conformance import sn_tls

pytestmark = pytest.mark.slow

PREFIX = "/swarmlearn-test-sn-etcd"
# "Within a second" on an idle host; CI's two shared cores get some room.
PROMPT = 3.0


@dataclass
class SharedLedger:
    cluster: EtcdCluster
    hosts: list[CertLayout]
    sns: list[RunningSN]
    base: Path

    def endpoints(self, first: int = 0) -> str:
        """The cluster's client URLs, host `first`'s own member first (the one its SN talks to)."""
        urls = [f"https://{e}" for e in self.cluster.endpoints]
        return ",".join(urls[first:] + urls[:first])

    def client(self, host: int, sn: int, component: str = "swci", node: str | None = None) -> SNClient:
        c = SNClient(self.sns[sn].address, identity(self.hosts[host], component, node))
        c.wait_ready(10)
        return c

    def verify(self, *data_dir: Path) -> str:
        """`swarm ledger verify` of the etcd ledger (and of an SN's swarm.json against it, given its
        data dir); returns the head hash it reports."""
        result = run_swarm("ledger", "verify", *map(str, data_dir), "--etcd-endpoints", self.endpoints(),
                           "--etcd-prefix", PREFIX, *identity_args(self.hosts[0], "sn"))
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.startswith("OK "), result.stdout
        return result.stdout.split()[3]  # OK <n> entries <head hash>


def sn_args(ledger_endpoints: str, host: CertLayout, data_dir: Path, prefix: str = PREFIX) -> list[str]:
    return ["sn", "--ledger", "etcd", "--etcd-endpoints", ledger_endpoints, "--etcd-prefix", prefix,
            "--host-ip", "127.0.0.1", "--sn-api-port", "0", *identity_args(host, "sn"), "--data-dir", str(data_dir)]


def ready(proc, data_dir: Path) -> RunningSN:
    line = proc.wait_for_line("SN ready on ", timeout=30)
    return RunningSN(proc, line.split("SN ready on ")[1].split()[0], data_dir)


@pytest.fixture(scope="module")
def module_procs():
    procs = Procs()
    yield procs
    procs.stop_all()


@pytest.fixture(scope="module")
def ledger(certs, tmp_path_factory, module_procs) -> SharedLedger:
    if shutil.which("etcd") is None:
        pytest.fail(f"etcd is not installed (no `etcd` on PATH): {SETUP_HINT}")
    base = tmp_path_factory.mktemp("sn-etcd")
    hosts = [certs]
    for index in (2, 3):
        generate_host_certs(base / f"cert{index}", index, nodes=[f"node{index}"], ca_cert_path=certs.ca_cert,
                            ca_key_path=certs.ca_key)
        hosts.append(CertLayout(base / f"cert{index}", index))
    cluster = start_cluster(base / "etcd", sn_tls(certs), size=3)
    shared = SharedLedger(cluster, hosts, [], base)
    try:
        sentinel = module_procs.swarm(*sn_args(shared.endpoints(0), hosts[0], base / "sn1"), "--sentinel")
        shared.sns.append(ready(sentinel, base / "sn1"))
        # SN 3 is started as a sentinel too: it finds the ledger and joins it (no second genesis).
        second = module_procs.swarm(*sn_args(shared.endpoints(1), hosts[1], base / "sn2"))
        third = module_procs.swarm(*sn_args(shared.endpoints(2), hosts[2], base / "sn3"), "--sentinel")
        shared.sns += [ready(second, base / "sn2"), ready(third, base / "sn3")]
        yield shared
    finally:
        module_procs.stop_all()
        cluster.stop()


def wait_until(predicate, timeout: float = PROMPT, every: float = 0.05) -> float:
    """Seconds until predicate() held; fails the test if it does not within `timeout`."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "condition not met in time"
        time.sleep(every)
    return time.monotonic() - started


def watched_up_to(client: SNClient, index: int) -> list:
    """The entries a Watch from 0 delivers up to `index` (fails after a few seconds without them)."""
    stop = threading.Event()
    timer = threading.Timer(10, stop.set)
    timer.start()
    seen = []
    try:
        for entry in client.watch(0, stop):
            seen.append(entry)
            if entry.index >= index:
                break
    finally:
        timer.cancel()
        stop.set()
    assert seen and seen[-1].index == index, [e.index for e in seen]
    return seen


def test_etcd_endpoints_and_prefix_that_are_not_mutual_tls_urls_are_refused_naming_the_option():
    from swarmlearn.errors import ConfigError
    from swarmlearn.sn.server import EtcdLedger

    assert EtcdLedger.parse("https://10.0.0.1:2379, 10.0.0.2:2379").endpoints == ("https://10.0.0.1:2379",
                                                                                 "10.0.0.2:2379")
    for endpoints, prefix, named in (("http://10.0.0.1:2379", "/s", "--etcd-endpoints"),
                                     ("10.0.0.1", "/s", "--etcd-endpoints"), (" , ", "/s", "--etcd-endpoints"),
                                     ("10.0.0.1:2379", "swarm", "--etcd-prefix"),
                                     ("10.0.0.1:2379", "/swarm/", "--etcd-prefix")):
        with pytest.raises(ConfigError, match=named):
            EtcdLedger.parse(endpoints, prefix)


# -------------------------------------------------------------------------------- one ledger, three doors


def test_a_transaction_submitted_through_one_sn_shows_in_the_others_query_heartbeat_and_watch(ledger):
    with ledger.client(0, 0) as through_sn1, ledger.client(0, 1) as at_sn2, ledger.client(0, 2) as at_sn3:
        through_sn1.register("SWCI")
        index = through_sn1.submit("contract_create", {"name": "seen-everywhere"})
        # Heartbeat answers from the folded state without reading the store: the SN's follower folded it.
        for other in (at_sn2, at_sn3):
            wait_until(lambda: other.heartbeat() >= index)
            assert "seen-everywhere" in other.query("contracts")["contracts"]
            assert watched_up_to(other, index)[-1].tx.payload["name"] == "seen-everywhere"


def test_a_sentinel_on_a_prefix_that_holds_a_ledger_joins_it_without_a_second_genesis(ledger):
    assert "ledger at entry 0" not in ledger.sns[2].proc.output  # it found the sentinel's entries
    store = EtcdStore(ledger.cluster.endpoints, PREFIX, sn_tls(ledger.hosts[0]))
    try:
        kinds = [entry.tx.kind for entry in store.read()]
    finally:
        store.close()
    assert kinds.count("genesis") == 1 and kinds[0] == "genesis"
    with ledger.client(0, 0) as swci:
        assert {"sn-1", "sn-2", "sn-3"} <= set(swci.query("nodes")["nodes"])


def test_an_sn_that_is_not_the_sentinel_refuses_an_empty_prefix(ledger):
    result = run_swarm(*sn_args(ledger.endpoints(), ledger.hosts[1], ledger.base / "lonely", prefix="/nothing-here"))
    assert result.returncode == 1
    assert "/nothing-here" in result.stderr and "not the sentinel" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_node_heartbeating_to_one_sn_is_alive_on_every_sn_and_goes_stale_on_all_when_it_stops(ledger):
    with ledger.client(0, 1, "sl", "node4") as node:
        node.register("SL", "127.0.0.1:5004")
        time.sleep(2.0)  # what registering told the SNs grows old
        node.heartbeat()  # to SN 2 only
        for sn in (0, 1, 2):
            with ledger.client(0, sn) as swci:
                wait_until(lambda: swci.query("info")["last_seen"].get("node4", 99) < 1.5)
    time.sleep(3.0)  # the node has stopped
    for sn in (0, 1, 2):
        with ledger.client(0, sn) as swci:
            silent = swci.query("nodes")["last_seen"]["node4"]
            assert 3.0 <= silent < 10.0, (sn, silent)


def test_two_sns_racing_submits_make_one_chain_every_sn_serves(ledger):
    per_client = 12
    errors: list[BaseException] = []
    indexes: list[int] = []

    def submit_through(host: int, sn: int) -> None:
        try:
            with ledger.client(host, sn) as swci:
                swci.register("SWCI")
                for i in range(per_client):
                    indexes.append(swci.submit("contract_create", {"name": f"race-{host}-{i}"}))
        except BaseException as exc:  # noqa: BLE001  (reported by the test below)
            errors.append(exc)

    racers = [threading.Thread(target=submit_through, args=(host, host)) for host in (0, 1)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(60)
    assert not errors, errors
    assert len(set(indexes)) == 2 * per_client  # every submit landed, each at its own index

    head_hash = ledger.verify()
    for sn in (0, 1, 2):
        with ledger.client(0, sn) as swci:
            info = swci.query("info")["info"]
            assert info["head_hash"] == head_hash, sn
            names = set(swci.query("contracts")["contracts"])
            assert {f"race-{h}-{i}" for h in (0, 1) for i in range(per_client)} <= names


def test_an_sn_whose_certificate_comes_from_another_ca_cannot_read_the_cluster(ledger, certs, foreign_certs, tmp_path):
    both = tmp_path / "both-cas"  # it trusts our CA (so only the members refuse it)
    both.mkdir()
    shutil.copy(certs.ca_cert, both)
    shutil.copy(foreign_certs.ca_cert, both)
    args = sn_args(ledger.endpoints(), foreign_certs, tmp_path / "stranger")
    args[args.index("--capath") + 1] = str(both)
    result = run_swarm(*args)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "TLS handshake failed" in result.stderr, result.stderr
    assert not (tmp_path / "stranger" / "swarm.json").exists()


# -------------------------------------------------------------------------------- losing a host


def test_killing_one_sn_and_its_etcd_member_leaves_the_others_taking_entries(ledger):
    ledger.sns[2].proc.kill()
    ledger.cluster.members[2].kill()
    for sn in (0, 1):
        with ledger.client(sn, sn) as swci:
            swci.register("SWCI")
            index = swci.submit("contract_create", {"name": f"after-loss-{sn}"})
            assert index > 0
    with ledger.client(0, 0) as at_sn1, ledger.client(1, 1) as at_sn2:
        head = at_sn1.query("info")["info"]["head_index"]
        wait_until(lambda: at_sn2.heartbeat() >= head)
        assert {"after-loss-0", "after-loss-1"} <= set(at_sn2.query("contracts")["contracts"])
    head_hash = ledger.verify(ledger.sns[1].data_dir)
    with ledger.client(0, 1) as swci:
        assert swci.query("info")["info"]["head_hash"] == head_hash
