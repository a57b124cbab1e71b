"""Several SNs in front of one ledger that a three-member etcd cluster replicates, on one host: what
goes in through one SN comes out of every other, races between SNs make one chain, liveness is the
same on every SN, and the swarm goes on when one SN and its etcd member are killed.

Real processes only: three etcd members (mutual TLS trusting the swarm's "ledger" CA only, never the
swarm's CA) and three `swarm sn --ledger etcd` processes, one per host identity (host 1's CA issues
hosts 2 and 3 too), each reaching etcd with a certificate of the ledger CA; started once for the module
and stopped by pid at its end. The tests run in file order; the last two kill a host's SN and member.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import Procs, RunningSN, identity, identity_args, run_swarm
from swarmlearn.ledger.etcd_member import SETUP_HINT, EtcdCluster, start_cluster
from swarmlearn.errors import LedgerError
from swarmlearn.ledger.etcd_store import EtcdStore, TLSFiles, open_channel
from swarmlearn.pki import CertLayout, generate_host_certs
from swarmlearn.proto import etcd_pb2 as pb
from swarmlearn.proto import etcd_pb2_grpc as rpc
from swarmlearn.sn import server as sn_server
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
        urls = self.cluster.client_urls
        return ",".join(urls[first:] + urls[:first])

    def client(self, host: int, sn: int, component: str = "swci", node: str | None = None) -> SNClient:
        c = SNClient(self.sns[sn].address, identity(self.hosts[host], component, node))
        c.wait_ready(10)
        return c

    def verify(self, *data_dir: Path) -> str:
        """`swarm ledger verify` of the etcd ledger (and of an SN's swarm.json against it, given its
        data dir); returns the head hash it reports."""
        result = run_swarm("ledger", "verify", *map(str, data_dir), "--etcd-endpoints", self.endpoints(),
                           "--etcd-prefix", PREFIX, *etcd_identity_args(self.cluster.tls))
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.startswith("OK "), result.stdout
        return result.stdout.split()[3]  # OK <n> entries <head hash>


def etcd_identity_args(tls: TLSFiles) -> list[str]:
    return ["--etcd-cert", str(tls.cert), "--etcd-key", str(tls.key), "--etcd-cacert", str(tls.ca)]


def sn_args(ledger_endpoints: str, host: CertLayout, data_dir: Path, prefix: str = PREFIX, *,
            etcd_identity: TLSFiles) -> list[str]:
    """`swarm sn --ledger etcd` as `host`'s SN, reaching etcd with `etcd_identity` (normally the cluster's
    ledger identity, `cluster.tls`)."""
    return ["sn", "--ledger", "etcd", "--etcd-endpoints", ledger_endpoints, "--etcd-prefix", prefix,
            *etcd_identity_args(etcd_identity), "--host-ip", "127.0.0.1",
            "--sn-api-port", "0", *identity_args(host, "sn"), "--data-dir", str(data_dir)]


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
        sentinel = module_procs.swarm(*sn_args(shared.endpoints(0), hosts[0], base / "sn1", etcd_identity=cluster.tls), "--sentinel")
        shared.sns.append(ready(sentinel, base / "sn1"))
        # SN 3 is started as a sentinel too: it finds the ledger and joins it (no second genesis).
        second = module_procs.swarm(*sn_args(shared.endpoints(1), hosts[1], base / "sn2", etcd_identity=cluster.tls))
        third = module_procs.swarm(*sn_args(shared.endpoints(2), hosts[2], base / "sn3", etcd_identity=cluster.tls), "--sentinel")
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

    files = (Path("etcd-cert.pem"), Path("etcd-key.pem"), Path("etcd-ca.pem"))
    assert EtcdLedger.parse("https://10.0.0.1:2379, 10.0.0.2:2379", "/s", *files).endpoints == (
        "https://10.0.0.1:2379", "10.0.0.2:2379")
    for endpoints, prefix, named in (("http://10.0.0.1:2379", "/s", "--etcd-endpoints"),
                                     ("10.0.0.1", "/s", "--etcd-endpoints"), (" , ", "/s", "--etcd-endpoints"),
                                     ("10.0.0.1:2379", "swarm", "--etcd-prefix"),
                                     ("10.0.0.1:2379", "/swarm/", "--etcd-prefix")):
        with pytest.raises(ConfigError, match=named):
            EtcdLedger.parse(endpoints, prefix, *files)
    with pytest.raises(ConfigError, match="--etcd-key missing"):
        EtcdLedger.parse("10.0.0.1:2379", "/s", files[0], None, files[2])


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
    result = run_swarm(*sn_args(ledger.endpoints(), ledger.hosts[1], ledger.base / "lonely", prefix="/nothing-here",
                               etcd_identity=ledger.cluster.tls))
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


def test_an_sn_whose_etcd_certificate_comes_from_another_ca_cannot_read_the_cluster(ledger, foreign_certs,
                                                                                  tmp_path):
    # The foreign CA is not the swarm's (so the SN's own check lets it pass): only the members refuse it.
    stranger = TLSFiles(ledger.cluster.tls.ca, foreign_certs.cert("sn"), foreign_certs.key("sn"))
    result = run_swarm(*sn_args(ledger.endpoints(), ledger.hosts[0], tmp_path / "stranger", etcd_identity=stranger))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "TLS handshake failed" in result.stderr, result.stderr
    assert not (tmp_path / "stranger" / "swarm.json").exists()


@pytest.mark.parametrize("component", ["sl", "sn"])
def test_a_certificate_of_the_swarms_ca_cannot_connect_to_the_cluster(ledger, component):
    # A training node (or a revoked one: etcd does not read the ledger), or an SN's swarm identity: the
    # members trust the ledger CA only, so none of them can read, rewrite or erase the ledger in etcd.
    swarm_key, swarm_cert = (ledger.hosts[0].node_key("node1"), ledger.hosts[0].node_cert("node1")) \
        if component == "sl" else (ledger.hosts[0].key("sn"), ledger.hosts[0].cert("sn"))
    started = time.monotonic()
    with pytest.raises(LedgerError, match="TLS handshake failed"):
        EtcdStore(ledger.cluster.endpoints, PREFIX, TLSFiles(ledger.cluster.tls.ca, swarm_cert, swarm_key),
                  quorum_timeout=1.0)
    assert time.monotonic() - started < 10


def test_an_sn_refuses_in_one_line_an_etcd_identity_issued_by_the_swarms_ca(ledger, tmp_path):
    swarm_identity = TLSFiles(ledger.cluster.tls.ca, ledger.hosts[0].cert("swop"), ledger.hosts[0].key("swop"))
    result = run_swarm(*sn_args(ledger.endpoints(), ledger.hosts[0], tmp_path / "sn", etcd_identity=swarm_identity))
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--etcd-cert" in result.stderr and "a CA of this swarm" in result.stderr, result.stderr
    # The members' CA may not be the swarm's either: a node certificate could pose as a member.
    swarm_ca = ledger.cluster.tls._replace(ca=ledger.hosts[0].ca_cert)
    result = run_swarm(*sn_args(ledger.endpoints(), ledger.hosts[0], tmp_path / "sn", etcd_identity=swarm_ca))
    assert result.returncode == 1 and "--etcd-cacert" in result.stderr, result.stderr
    assert not (tmp_path / "sn" / "swarm.json").exists()


def test_an_sn_on_etcd_without_an_etcd_identity_is_told_which_options_to_give(ledger, tmp_path):
    args = sn_args(ledger.endpoints(), ledger.hosts[0], tmp_path / "sn", etcd_identity=ledger.cluster.tls)
    for flag in ("--etcd-cert", "--etcd-key", "--etcd-cacert"):
        del args[args.index(flag):args.index(flag) + 2]
    result = run_swarm(*args)
    assert result.returncode != 0
    assert "--etcd-cert, --etcd-key, --etcd-cacert missing" in result.stderr, result.stderr
    assert "--org <swarm>-ledger" in result.stderr, result.stderr


# -------------------------------------------------------------------------------- what is under the prefix


def put_raw(tls: TLSFiles, endpoint: str, key: str, value: bytes, ttl: int | None = None) -> None:
    """Writes one key as anything holding the ledger identity could (with a lease of `ttl` s: it vanishes then)."""
    channel = open_channel(endpoint, tls)
    try:
        lease = rpc.LeaseStub(channel).LeaseGrant(pb.LeaseGrantRequest(TTL=ttl), timeout=10).ID if ttl else 0
        put = pb.RequestOp(request_put=pb.PutRequest(key=key.encode(), value=value, lease=lease))
        rpc.KVStub(channel).Txn(pb.TxnRequest(success=[put]), timeout=10)
    finally:
        channel.close()


def test_liveness_keys_of_unregistered_names_or_from_the_future_are_ignored(ledger):
    now = time.time()
    with ledger.client(0, 0, "sl", "node5") as node:
        node.register("SL", "127.0.0.1:5005")
    time.sleep(1.5)
    for key, when in ((f"{PREFIX}/alive/ghost/sn-1", now), (f"{PREFIX}/alive/node5/sn-2", now + 3600),
                      (f"{PREFIX}/alive/node5/not-an-sn", now + 1), (f"{PREFIX}/alive/node5", now + 1)):
        put_raw(ledger.cluster.tls, ledger.cluster.endpoints[0], key, f"{when:.3f}".encode())
    time.sleep(1.0)  # past the SNs' cached reads
    for sn in (0, 1, 2):
        with ledger.client(0, sn) as swci:
            last_seen = swci.query("nodes")["last_seen"]
            assert not [name for name in last_seen if "ghost" in name or "/" in name], last_seen
            assert last_seen["node5"] >= 1.5, (sn, last_seen)  # not heard since it registered


def test_a_key_under_entries_that_is_no_entry_is_named_and_the_sn_follower_outlives_it(ledger, tmp_path,
                                                                                       monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="swarmlearn.sn")
    monkeypatch.setattr(sn_server, "FOLLOW_RETRY", 0.2)
    monkeypatch.setattr(sn_server, "FOLLOW_RETRY_MAX", 0.4)
    etcd = sn_server.EtcdLedger(tuple(ledger.endpoints().split(",")), ledger.cluster.tls.cert,
                                ledger.cluster.tls.key, ledger.cluster.tls.ca, f"{PREFIX}-malformed")
    chain, _ = sn_server.open_chain(tmp_path / "a", identity(ledger.hosts[0], "sn"), "sn-1", "127.0.0.1:1",
                                    sentinel=True, etcd=etcd)
    stopping = threading.Event()
    follower = threading.Thread(target=sn_server.follow_ledger, args=(chain, stopping), daemon=True)
    follower.start()
    try:
        time.sleep(0.5)  # the follower watches from the head
        put_raw(ledger.cluster.tls, ledger.cluster.endpoints[0], f"{PREFIX}-malformed/entries/abc", b"x", ttl=2)
        with pytest.raises(LedgerError, match="entries/abc"):
            chain.store.read_raw(0)
        wait_until(lambda: _readable(chain.store), timeout=10)  # the key's lease ran out
        other, _ = sn_server.open_chain(tmp_path / "b", identity(ledger.hosts[1], "sn"), "sn-2", "127.0.0.1:2",
                                        sentinel=False, etcd=etcd)  # registers: one more entry
        try:
            wait_until(lambda: chain.state.head_index == other.state.head_index > 0, timeout=PROMPT)
        finally:
            other.store.close()
        assert follower.is_alive()
    finally:
        stopping.set()
        follower.join(PROMPT)
        chain.store.close()
    failures = [r.getMessage() for r in caplog.records if "cannot follow the ledger" in r.getMessage()]
    assert len(failures) == 1 and "entries/abc" in failures[0], failures
    assert "following the ledger again" in caplog.text


def _readable(store) -> bool:
    try:
        store.read_raw(0)
        return True
    except LedgerError:
        return False


# -------------------------------------------------------------------------------- losing a host


def kill_host_3(ledger: SharedLedger) -> None:
    ledger.sns[2].proc.kill()
    ledger.cluster.members[2].kill()


def test_a_node_that_dies_with_the_sn_it_talked_to_goes_stale_on_the_others_rather_than_vanish(ledger):
    with ledger.client(2, 2, "sl", "node3") as node:  # host 3's node, heartbeating to host 3's SN only
        node.register("SL", "127.0.0.1:5003")
        node.heartbeat()
        with ledger.client(0, 0) as swci:
            wait_until(lambda: swci.query("info")["last_seen"].get("node3", 99) < 1.0)
    kill_host_3(ledger)  # the host dies: its SN, its etcd member and its node together
    samples = []
    with ledger.client(0, 0) as swci:
        # Past the 6 s after which keys on the dead SN's lease were gone.
        for _ in range(9):
            samples.append(swci.query("nodes")["last_seen"].get("node3"))
            time.sleep(1.0)
    assert None not in samples, samples
    assert samples == sorted(samples) and samples[-1] >= 8.0, samples


def test_killing_one_sn_and_its_etcd_member_leaves_the_others_taking_entries(ledger):
    kill_host_3(ledger)
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
