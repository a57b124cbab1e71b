"""The emulated hosts of the multi-host tests (tests/netns.py): two hosts talk TCP through the bridge,
a partitioned host is unreachable until it heals, and nothing is left behind afterwards."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import Procs
from netns import Hosts, emulated_hosts, existing_namespaces

PORT = 40100
# A server that answers every connection with its host's address, then closes it.
SERVER = f"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], {PORT})); s.listen(8); print("listening", flush=True)
while True:
    c, _ = s.accept(); c.sendall(sys.argv[1].encode()); c.close()
"""
CLIENT = f"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], {PORT}), timeout=float(sys.argv[2])) as c:
        print("got", c.recv(64).decode())
except OSError as exc:
    print("failed", type(exc).__name__, exc); sys.exit(1)
"""


@pytest.fixture(scope="module")
def hosts():
    with emulated_hosts(3) as made:
        yield made


@pytest.fixture(scope="module")
def servers(hosts):
    """One server per host, stopped by pid at the module's end."""
    procs = Procs()
    try:
        started = [procs.start(host.command([sys.executable, "-c", SERVER, host.ip])) for host in hosts]
        for proc in started:
            proc.wait_for_line("listening", timeout=10)
        yield started
    finally:
        procs.stop_all()


def connect(host, ip: str, timeout: float = 2.0) -> subprocess.CompletedProcess:
    return subprocess.run(host.command([sys.executable, "-c", CLIENT, ip, str(timeout)]), capture_output=True,
                          text=True, timeout=timeout + 10)


def test_two_hosts_reach_each_other_over_tcp_through_the_bridge(hosts, servers):
    server = servers[0]
    result = connect(hosts[1], hosts[0].ip)
    assert result.returncode == 0 and f"got {hosts[0].ip}" in result.stdout, \
        f"host 2 could not reach host 1's server at {hosts[0].ip}: {result.stdout}{result.stderr}"
    # `ip netns exec` execs the command: the pid Procs recorded is the server's own.
    with open(f"/proc/{server.popen.pid}/cmdline", "rb") as cmdline:
        assert cmdline.read().split(b"\0")[0] == sys.executable.encode(), "the pid Procs recorded is not the server's"


def test_each_host_has_its_own_address_and_loopback(hosts):
    for host in hosts:
        shown = subprocess.run(host.command(["ip", "-o", "addr", "show"]), capture_output=True, text=True).stdout
        assert f"inet {host.ip}/24" in shown and "inet 127.0.0.1/8" in shown, f"host {host.index}: {shown}"
    ours = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True).stdout
    assert "10.213.0." not in ours, "a host address leaked into the test's own namespace"


def test_a_partitioned_host_cannot_be_reached_and_can_again_after_heal(hosts, servers):
    hosts[0].partition()
    try:
        cut_off = connect(hosts[1], hosts[0].ip, timeout=1.5)
        assert cut_off.returncode == 1 and "failed" in cut_off.stdout, \
            f"host 1 partitioned, yet host 2 reached it: {cut_off.stdout}{cut_off.stderr}"
        # The other hosts still see each other: only the partitioned host's cable is out.
        others = connect(hosts[2], hosts[1].ip)
        assert others.returncode == 0, f"host 1 partitioned, and hosts 2 and 3 lost each other: {others.stdout}"
    finally:
        hosts[0].heal()
    healed = connect(hosts[1], hosts[0].ip, timeout=5)
    assert healed.returncode == 0 and f"got {hosts[0].ip}" in healed.stdout, \
        f"host 1 healed, yet host 2 cannot reach it: {healed.stdout}{healed.stderr}"


def test_destroy_leaves_no_namespace_or_veth_behind():
    made = Hosts.create(2)
    names = made.namespaces()
    assert set(names) <= existing_namespaces()
    made.destroy()
    assert not set(names) & existing_namespaces(), f"left behind: {set(names) & existing_namespaces()}"
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert not any(f"{host.port}@" in line or "br0" in line for host in made for line in links.splitlines()), links
    made.destroy()  # a second call (a fixture's finally after a test's own) is harmless


def test_a_create_that_fails_half_way_removes_what_it_made(monkeypatch):
    import netns

    before = existing_namespaces()
    real_add = netns.Hosts._add_host

    def fail_on_second(self, ns, index):
        if index == 2:
            raise netns.HostsUnavailable("made to fail")
        return real_add(self, ns, index)

    monkeypatch.setattr(netns.Hosts, "_add_host", fail_on_second)
    with pytest.raises(netns.HostsUnavailable, match="made to fail"):
        Hosts.create(3)
    assert existing_namespaces() == before, existing_namespaces() - before


def test_without_root_the_reason_names_what_is_missing(monkeypatch):
    import netns

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "needs root" in netns.missing_prerequisite()
    monkeypatch.setattr(netns.shutil, "which", lambda name: None)
    assert "no `ip` command" in netns.missing_prerequisite()
    with pytest.raises(netns.HostsUnavailable, match="iproute2"):
        Hosts.create(1)
    # The fixture's way: a failed test saying so, never a skip.
    with pytest.raises(pytest.fail.Exception, match="cannot emulate hosts with network namespaces: no `ip`"):
        with emulated_hosts(1):
            pass
