"""Clients fail over between several SNs (issue 13, part 4): an SL, SWOP, SWCI or admin given several
SN addresses talks to one and, when it stops answering, moves on to the next at once; refusals are
answers and never move it.

Most tests use real SQLite `swarm sn` processes, "another SN of the same ledger" being the same SN
restarted on another port; one runs two `swarm sn --ledger etcd` on a three-member etcd cluster.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import threading
import time

import pytest

from conftest import identity, identity_args, module_sn, run_swarm, start_sn, wait_until
from swarmlearn.errors import ConfigError, LedgerError, Rejected, SNUnavailable
from swarmlearn.ledger.etcd_member import SETUP_HINT, start_cluster
from swarmlearn.ledger.signatures import sign_tx
from swarmlearn.pki import CertLayout, generate_host_certs
from swarmlearn.sn.client import SNClient, parse_sn_addresses
from swarmlearn.sn.follower import LedgerFollower
from swarmlearn.swci.script import parse_line
from swarmlearn.swop.profile import load_profile
from test_sn_etcd import ready, sn_args
from test_store_conformance import sn_tls

SWITCH = "switching to SN"


def free_port() -> int:
    """A port the OS gave and took back: nothing listens there."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_sn(certs, tmp_path_factory):
    """One SN shared by the tests that only need something to answer."""
    yield from module_sn(certs, tmp_path_factory.mktemp("failover") / "sn")


@pytest.fixture
def dead_address() -> str:
    return f"127.0.0.1:{free_port()}"


def switch_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if SWITCH in r.getMessage()]


# --------------------------------------------------------------------------------------------------
# One SN down among several


@pytest.mark.parametrize("wait_ready_first", [True, False], ids=["wait_ready", "first-call"])
def test_a_client_given_a_dead_address_first_works_on_the_next_with_one_switch_line(
        live_sn, certs, dead_address, caplog, wait_ready_first):
    caplog.set_level(logging.INFO, "swarmlearn.sn.client")
    with SNClient([dead_address, live_sn.address], identity(certs, "swci"), unreachable_timeout=10) as swci:
        if wait_ready_first:
            swci.wait_ready(10)
        swci.register("SWCI")
        name = f"skip-dead-{wait_ready_first}"
        index = swci.submit("contract_create", {"name": name})
        assert name in swci.query("contracts")["contracts"]
        assert swci.address == live_sn.address
    assert index > 0
    [line] = switch_lines(caplog)
    assert line.startswith(f"SN {dead_address} unreachable (") and line.endswith(f"{SWITCH} {live_sn.address}")


def test_a_refused_transaction_does_not_move_the_client(live_sn, certs, dead_address, caplog):
    caplog.set_level(logging.INFO, "swarmlearn.sn.client")
    with SNClient(f"{live_sn.address},{dead_address}", identity(certs, "swci"), unreachable_timeout=10) as swci, \
            SNClient([live_sn.address, dead_address], identity(certs, "sl", "node1"), "node1") as sl:
        swci.register("SWCI")
        with pytest.raises(Rejected, match="not finalized|no task named"):  # the ledger's FAILED_PRECONDITION
            swci.submit("taskrunner_assign", {"runner": "default", "task": "ghost", "peers": 1})
        forged = sign_tx(identity(certs, "swci"), swci.node_id, "contract_create", {"name": "forged"})
        with pytest.raises(Rejected, match="certificate other than the caller"):  # PERMISSION_DENIED
            sl.submit_signed(forged)
        assert (swci.address, sl.address) == (live_sn.address, live_sn.address)
        assert swci.heartbeat() > 0  # still talking to the SN that refused
    assert switch_lines(caplog) == []


def test_a_submit_replayed_on_the_next_sn_counts_as_done(live_sn, certs, dead_address):
    """A submit whose reply was lost is sent again to the next SN; the ledger knows the transaction
    (AlreadyRecorded) and the client answers with the entry it made, adding nothing."""
    ident = identity(certs, "swci")
    signed = sign_tx(ident, ident.node_name(None), "contract_create", {"name": "replayed"})
    with SNClient(live_sn.address, ident) as first:
        first.register("SWCI")
        index = first.submit_signed(signed)
        head = first.heartbeat()
    with SNClient([dead_address, live_sn.address], ident, unreachable_timeout=10) as again:
        assert again.submit_signed(signed) == index
        assert again.heartbeat() == head


def test_with_every_sn_gone_a_call_gives_up_after_its_patience(certs):
    addresses = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    started = time.monotonic()
    with SNClient(addresses, identity(certs, "swci"), unreachable_timeout=1.5) as swci:
        with pytest.raises(SNUnavailable, match="unreachable"):
            swci.query()
    assert 0.5 < time.monotonic() - started < 6


@pytest.mark.slow
def test_killing_the_sn_moves_submits_and_the_ledger_watch_to_the_next_address(procs, certs, tmp_path, caplog):
    """The SN is killed (-9) and comes back on another port, the second address the clients were given:
    the next submit goes there, and the followers carry on from the next index, nothing repeated or lost."""
    caplog.set_level(logging.INFO, "swarmlearn.sn.client")
    first = start_sn(procs, certs, tmp_path / "sn")
    second_address = f"127.0.0.1:{free_port()}"
    addresses = [first.address, second_address]
    submitter = SNClient(addresses, identity(certs, "swci"), unreachable_timeout=20)
    follower = LedgerFollower(SNClient(addresses, identity(certs, "swop"), unreachable_timeout=20))
    watched: list[tuple[int, str]] = []
    stop = threading.Event()
    watcher = threading.Thread(target=lambda: watched.extend((e.index, e.hash) for e in submitter.watch(0, stop)),
                               daemon=True)
    try:
        submitter.register("SWCI")
        follower.start()
        watcher.start()
        before = [submitter.submit("contract_create", {"name": f"before-{i}"}) for i in range(3)]
        follower.wait_index(before[-1], 10)

        first.proc.kill()
        start_sn(procs, certs, first.data_dir, "--sn-api-port", second_address.rsplit(":", 1)[1])
        after = submitter.submit("contract_create", {"name": "after"})
        assert submitter.address == second_address
        follower.wait_index(after, 20)
        head = submitter.query("info")["info"]["head_index"]
        assert wait_until(lambda: len(watched) > head, 20.0), f"watched {len(watched)} entries of {head + 1}"
    finally:
        stop.set()
        follower.stop()
        follower.sn.close()
        watcher.join(5)
        submitter.close()
    assert follower.error is None
    assert follower.sn.address == second_address
    assert [index for index, _ in watched] == list(range(len(watched)))
    assert follower.state.head_index >= after > before[-1]
    assert watched == ledger_rows(second_address, certs, len(watched))
    lines = switch_lines(caplog)
    assert lines and all(line.startswith(f"SN {first.address} unreachable") for line in lines), lines
    assert any("following the ledger from entry" in r.getMessage() and second_address in r.getMessage()
               for r in caplog.records)


@pytest.mark.slow
def test_on_an_etcd_ledger_a_follower_and_a_submitter_move_to_the_other_sn_when_one_is_killed(
        procs, certs, tmp_path, caplog):
    if shutil.which("etcd") is None:
        pytest.fail(f"etcd is not installed (no `etcd` on PATH): {SETUP_HINT}")
    caplog.set_level(logging.INFO, "swarmlearn.sn.client")
    generate_host_certs(tmp_path / "cert2", 2, nodes=["node2"], ca_cert_path=certs.ca_cert, ca_key_path=certs.ca_key)
    cluster = start_cluster(tmp_path / "etcd", sn_tls(certs), size=3)
    try:
        endpoints = ",".join(cluster.client_urls)
        prefix = "/swarmlearn-test-failover"
        sn1 = ready(procs.swarm(*sn_args(endpoints, certs, tmp_path / "sn1", prefix, etcd_identity=cluster.tls), "--sentinel"), tmp_path / "sn1")
        sn2 = ready(procs.swarm(*sn_args(endpoints, CertLayout(tmp_path / "cert2", 2), tmp_path / "sn2", prefix,
                                         etcd_identity=cluster.tls)),
                    tmp_path / "sn2")
        addresses = [sn1.address, sn2.address]
        with SNClient(addresses, identity(certs, "swci"), unreachable_timeout=20) as submitter, \
                SNClient(addresses, identity(certs, "swop"), unreachable_timeout=20) as follower_sn:
            follower = LedgerFollower(follower_sn)
            submitter.register("SWCI")
            follower.start()
            try:
                before = [submitter.submit("contract_create", {"name": f"etcd-before-{i}"}) for i in range(3)]
                follower.wait_index(before[-1], 10)
                sn1.proc.kill()
                after = submitter.submit("contract_create", {"name": "etcd-after"})
                follower.wait_index(after, 20)
                assert after > before[-1]
                assert (submitter.address, follower_sn.address) == (sn2.address, sn2.address)
                assert "etcd-after" in follower.read(lambda state: state.contracts)
            finally:
                follower.stop()
            assert follower.error is None
    finally:
        procs.stop_all()
        cluster.stop()
    lines = switch_lines(caplog)
    assert len(lines) == 2 and all(line.startswith(f"SN {sn1.address} unreachable") for line in lines), lines


@pytest.mark.slow
def test_an_sn_cut_off_from_etcd_sends_its_clients_to_another_sn_and_a_stuck_sn_costs_seconds(
        procs, certs, tmp_path, caplog):
    """SN 1 reaches etcd through its own member only; that member is killed: SN 1 runs on, cut off,
    while SN 2 and SN 3 keep quorum (2 of 3). Its clients move on (a submit lands once, a follower
    with a pin carries on) and SN 1 itself answers "cannot reach its ledger" instead of stale state.
    Then SN 2 is stopped (SIGSTOP) mid-swarm: a client given SN 2 and SN 3 submits within seconds."""
    if shutil.which("etcd") is None:
        pytest.fail(f"etcd is not installed (no `etcd` on PATH): {SETUP_HINT}")
    caplog.set_level(logging.INFO, "swarmlearn.sn.client")
    for host in (2, 3):
        generate_host_certs(tmp_path / f"cert{host}", host, nodes=[f"node{host}"], ca_cert_path=certs.ca_cert,
                            ca_key_path=certs.ca_key)
    cluster = start_cluster(tmp_path / "etcd", sn_tls(certs), size=3)
    urls = cluster.client_urls
    prefix = "/swarmlearn-test-cut-off"
    try:
        sn1 = ready(procs.swarm(*sn_args(urls[0], certs, tmp_path / "sn1", prefix, etcd_identity=cluster.tls), "--sentinel"), tmp_path / "sn1")
        sn2, sn3 = (ready(procs.swarm(*sn_args(",".join(urls[h - 1:] + urls[:h - 1]), CertLayout(tmp_path / f"cert{h}", h),
                                              tmp_path / f"sn{h}", prefix, etcd_identity=cluster.tls)),
                            tmp_path / f"sn{h}") for h in (2, 3))
        addresses = [sn1.address, sn2.address]
        with SNClient(addresses, identity(certs, "swci"), unreachable_timeout=20) as submitter, \
                SNClient(addresses, identity(certs, "swop"), unreachable_timeout=20) as follower_sn:
            follower = LedgerFollower(follower_sn, tmp_path / "pin.json")
            submitter.register("SWCI")
            follower.start()
            try:
                before = submitter.submit("contract_create", {"name": "before-cut"})
                follower.wait_index(before, 10)
                cluster.members[0].kill()
                started = time.monotonic()
                after = submitter.submit("contract_create", {"name": "after-cut"})
                assert time.monotonic() - started < 8.0
                follower.wait_index(after, 20)
                assert follower.read(lambda state: list(state.contracts).count("after-cut")) == 1
                assert (submitter.address, follower_sn.address) == (sn2.address, sn2.address)
            finally:
                follower.stop()
            assert follower.error is None, follower.error
        with SNClient(sn1.address, identity(certs, "swci"), unreachable_timeout=2) as only_sn1:
            for call in (lambda: only_sn1.query("info"), only_sn1.heartbeat):
                with pytest.raises(SNUnavailable, match="SN sn-1 cannot reach its ledger: no quorum"):
                    call()

        os.kill(sn2.proc.popen.pid, signal.SIGSTOP)
        try:
            with SNClient([sn2.address, sn3.address], identity(certs, "swci"), unreachable_timeout=20) as swci:
                started = time.monotonic()
                swci.submit("contract_create", {"name": "past-a-stuck-sn"})
                assert time.monotonic() - started < 4.5
                assert swci.address == sn3.address
        finally:
            os.kill(sn2.proc.popen.pid, signal.SIGCONT)
    finally:
        procs.stop_all()
        cluster.stop()
    assert any(line.startswith(f"SN {sn1.address} unreachable (UNAVAILABLE: SN sn-1 cannot reach its ledger")
               or line.startswith(f"SN {sn1.address} unreachable (DEADLINE_EXCEEDED") for line in switch_lines(caplog))


@pytest.mark.slow
def test_a_follower_moves_past_an_sn_shorter_than_its_pin_and_stops_only_when_every_sn_is(procs, certs, tmp_path,
                                                                                         caplog):
    """An SN restored from an older copy of the ledger (same swarm, fewer entries) is refused by a
    follower that verified more: given another SN too, the follower says so in one line and goes on
    there; given only that SN, it stops as before."""
    caplog.set_level(logging.INFO, "swarmlearn.sn.client")
    original = start_sn(procs, certs, tmp_path / "sn")
    with SNClient(original.address, identity(certs, "swci")) as swci:
        swci.register("SWCI")
        original.proc.kill(signal.SIGTERM)  # a clean stop: the copy is a consistent backup
        shutil.copytree(tmp_path / "sn", tmp_path / "older-copy")
        original = start_sn(procs, certs, tmp_path / "sn", "--sn-api-port", original.address.rsplit(":", 1)[1])
        head = max(swci.submit("contract_create", {"name": f"later-{i}"}) for i in range(3))
    pin = tmp_path / "pin.json"
    first = LedgerFollower(SNClient(original.address, identity(certs, "swop")), pin)
    _follow_to(first, head)
    restored = start_sn(procs, certs, tmp_path / "older-copy")

    moved = LedgerFollower(SNClient([restored.address, original.address], identity(certs, "swop")), pin)
    _follow_to(moved, head)
    assert moved.error is None and moved.sn.address == original.address
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"SN {restored.address} refused")]
    assert "short of entry" in line and line.endswith(f"switching to SN {original.address}")

    alone = LedgerFollower(SNClient(restored.address, identity(certs, "swop")), pin)
    alone.start()
    try:
        assert isinstance(alone.failure(10), LedgerError)
    finally:
        alone.stop()
        alone.sn.close()


def _follow_to(follower: LedgerFollower, index: int) -> None:
    follower.start()
    try:
        follower.wait_index(index, 10)
    finally:
        follower.stop()
        follower.sn.close()


@pytest.mark.slow
def test_a_client_does_not_switch_to_an_sn_of_another_ledger(procs, live_sn, certs, tmp_path, caplog):
    """Given [SN A, an SN of another swarm, A again on another port], a client that loses A skips the
    stranger with one line (it would take our transactions into another ledger) and carries on at A."""
    caplog.set_level(logging.INFO, "swarmlearn.sn.client")
    ours = start_sn(procs, certs, tmp_path / "sn")
    again = f"127.0.0.1:{free_port()}"
    with SNClient([ours.address, live_sn.address, again], identity(certs, "swci"), unreachable_timeout=20) as swci:
        swci.register("SWCI")
        stranger_head = _head(live_sn.address, certs)
        ours.proc.kill()
        start_sn(procs, certs, ours.data_dir, "--sn-api-port", again.rsplit(":", 1)[1])
        index = swci.submit("contract_create", {"name": "stays-home"})
        assert swci.address == again and index == _head(again, certs)
    assert _head(live_sn.address, certs) == stranger_head
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"SN {live_sn.address} refused")]
    assert "serves another ledger" in line and line.endswith(f"switching to SN {again}")


def _head(address: str, certs) -> int:
    with SNClient(address, identity(certs, "swci")) as reader:
        return reader.query("info")["info"]["head_index"]


def ledger_rows(address: str, certs, count: int) -> list[tuple[int, str]]:
    """The first `count` entries of the SN at `address`, as (index, hash)."""
    rows: list[tuple[int, str]] = []
    stop = threading.Event()
    with SNClient(address, identity(certs, "swci")) as reader:
        for entry in reader.watch(0, stop):
            rows.append((entry.index, entry.hash))
            if len(rows) == count:
                stop.set()
    return rows


# --------------------------------------------------------------------------------------------------
# Giving several SNs: the library, the CLI, SWOP profiles, SWCI scripts


def test_sn_addresses_are_read_from_repeated_and_comma_separated_entries():
    assert parse_sn_addresses(["10.0.0.1", "10.0.0.2:30305,10.0.0.3"], 30304, "--sn-ip") == [
        "10.0.0.1:30304", "10.0.0.2:30305", "10.0.0.3:30304"]
    assert parse_sn_addresses("[::1]:5000,[::1]", 30304, "--sn-ip") == ["[::1]:5000", "[::1]:30304"]
    assert parse_sn_addresses("a:1,a:1", None, "x") == ["a:1"]


@pytest.mark.parametrize("given, problem", [
    ("10.0.0.1,,10.0.0.2", "has an empty entry"),
    ("10.0.0.1,", "has an empty entry"),
    ("10.0.0.1:70000", "port must be a number from 1 to 65535"),
    ("10.0.0.1:0", "port must be a number from 1 to 65535"),
    ("10.0.0.1:http", "port must be a number from 1 to 65535"),
    (":30304", "is not IP or IP:PORT"),
    ("fe80::1", "IPv6 address in brackets"),
])
def test_a_bad_sn_address_is_named_with_what_to_do(given, problem):
    with pytest.raises(ConfigError, match=f"^--sn-ip: '{given}'.*{problem}"):
        parse_sn_addresses(given, 30304, "--sn-ip")


@pytest.mark.parametrize("command", [
    ["sl", "--node-id", "node1", "--sl-fs-port", "0"],
    ["swop", "--usr-dir", ".", "--profile-file-name", "p.yaml"],
    ["admin", "revoke", "x.pem"],
])
def test_the_commands_name_a_bad_sn_ip(certs, command):
    component = {"sl": "sl", "swop": "swop", "admin": "admin"}[command[0]]
    result = run_swarm(command[0], "--sn-ip", "127.0.0.1:30304,,127.0.0.2", *identity_args(certs, component),
                       *command[1:], timeout=30)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "error: --sn-ip: '127.0.0.1:30304,,127.0.0.2' has an empty entry" in result.stderr


def test_sn_api_port_out_of_range_is_refused_by_name(certs):
    result = run_swarm("sl", "--sn-api-port", "70000", *identity_args(certs, "sl"), timeout=30)
    assert result.returncode == 2 and "--sn-api-port" in result.stderr


@pytest.mark.slow
def test_an_sl_and_an_admin_given_a_dead_sn_first_use_the_live_one(procs, live_sn, certs, dead_address, tmp_path):
    sl = procs.swarm("sl", "--sn-ip", dead_address, "--sn-ip", live_sn.address, "--sl-fs-port", "0",
                     *identity_args(certs, "sl", "node2"), "--data-dir", str(tmp_path / "sl"))
    sl.wait_for_line("SL node2 ready")
    assert f"SN {dead_address} unreachable" in sl.output and f"{SWITCH} {live_sn.address}" in sl.output
    admin = run_swarm("admin", "--sn-ip", f"{dead_address},{live_sn.address}", *identity_args(certs, "admin"),
                      "contract-limits", "--max-min-peers", "7", timeout=60)
    assert admin.returncode == 0, admin.stdout + admin.stderr
    assert "limits of default set at ledger entry" in admin.stdout


PROFILE = """groupname : demo
apisrv : {apisrv}
nodes :
    - slnodedef :
        idx : 0
"""


@pytest.mark.parametrize("apisrv, sl_sns", [
    ("[{ip: 10.0.0.1, port: 30305}, {ip: 10.0.0.2, port: ~}]", ["10.0.0.1:30305", "10.0.0.2:30304"]),
    ("\n    - ip : 10.0.0.1\n    - ip : '[fd00::2]'\n      port : 30306", ["10.0.0.1:30304", "[fd00::2]:30306"]),
    ("{locator: {host: ~, port: 30400}}", ["127.0.0.1:30400", "127.0.0.2:30400"]),
    ("{locator: {host: ~, port: ~, service: api-service}}", ["127.0.0.1:30304", "127.0.0.2:30310"]),
    ("{locator: {host: 10.0.0.9, port: ~}}", ["10.0.0.9:30304"]),
])
def test_a_swop_passes_its_sls_every_sn_of_its_profile(tmp_path, apisrv, sl_sns):
    path = tmp_path / "profile.yaml"
    path.write_text(PROFILE.format(apisrv=apisrv))
    assert load_profile(path).sn_addresses(["127.0.0.1:30304", "127.0.0.2:30310"]) == sl_sns


@pytest.mark.parametrize("apisrv, problem", [
    ("[]", "profile.yaml:2: apisrv: the list names no SN"),
    ("[{ip: 10.0.0.1, port: 70000}]", "profile.yaml:2: apisrv[0].port: input should be less than or equal to 65535"),
    ("\n    - ip : '10.0.0.1,10.0.0.2'", "profile.yaml:3: apisrv[0].ip: '10.0.0.1,10.0.0.2' is not one IP"),
    ("\n    - ip : 10.0.0.1\n    - host : 10.0.0.2", "profile.yaml:4: apisrv[1].host: unknown key"),
])
def test_a_bad_sn_list_in_a_profile_names_its_line(tmp_path, apisrv, problem):
    path = tmp_path / "profile.yaml"
    path.write_text(PROFILE.format(apisrv=apisrv))
    with pytest.raises(ConfigError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        load_profile(path)


def test_swci_scripts_take_several_sns_and_name_a_bad_one():
    command = parse_line("CREATE CONTEXT c WITH IP 10.0.0.1,10.0.0.2:30305", 1)
    assert command.args == {"name": "c", "ip": "10.0.0.1,10.0.0.2:30305"}
    with pytest.raises(ConfigError, match=r"^init.swci:4: IP: '10.0.0.1,,10.0.0.2' has an empty entry"):
        parse_line("CREATE CONTEXT c WITH IP 10.0.0.1,,10.0.0.2", 4, "init.swci")
    with pytest.raises(ConfigError, match=r"^init.swci:5: IP: '10.0.0.1:99999': the port must be"):
        parse_line("WAIT FOR IP 10.0.0.1:99999", 5, "init.swci")
    with pytest.raises(ConfigError, match=r"^init.swci:6: port '0': give a number from 1 to 65535"):
        parse_line("CREATE CONTEXT c WITH IP 10.0.0.1 0", 6, "init.swci")


def test_swci_contexts_with_several_sns_work_when_the_first_is_dead(live_sn, certs, dead_address, tmp_path):
    (tmp_path / "init.swci").write_text(f"CREATE CONTEXT two WITH IP {dead_address},{live_sn.address}\n"
                                        "SWITCH CONTEXT two\nLIST CONTEXTS\nLIST CONTRACTS\n")
    result = run_swarm("swci", "--usr-dir", str(tmp_path), "--init-script-name", "init.swci",
                       "--sn-ip", f"{dead_address},{live_sn.address}", *identity_args(certs, "swci"), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"context default: SN at {dead_address},{live_sn.address}" in result.stdout
    assert f"context two: SN at {dead_address},{live_sn.address}" in result.stdout
