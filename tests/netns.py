"""Hosts emulated with Linux network namespaces, made and removed by the test that uses them.

One namespace holds a bridge; each host is a namespace of its own whose `eth0` is one end of a veth
pair, the other end a port of that bridge. Addresses come from 10.213.0.0/24 and exist only inside
these namespaces (the veth ends are created inside them too), so nothing of the machine's own
network changes and a crashed run leaves at worst a few namespaces, swept by the next run. Names
carry the pid of the test process, so overlapping test runs never touch each other's hosts.

`ip netns exec NS cmd` execs `cmd` in place, so the pid a `Procs` records for
`host.command([...])` is the command's own pid and stopping by pid stays exact.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

SUBNET = "10.213.0"
PREFIX_LENGTH = 24
NAME_PREFIX = "swarmtest"
# Namespace names of an earlier run: <prefix>-<pid>-<n>-...; swept when that pid is gone.
_OUR_NAME = re.compile(rf"^{NAME_PREFIX}-(\d+)-\d+-")
_clusters = itertools.count(1)


class HostsUnavailable(RuntimeError):
    """Namespaces cannot be made here; the message says what is missing."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise HostsUnavailable(f"`ip {' '.join(args)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def missing_prerequisite() -> str | None:
    """Why this machine cannot run the namespace tests, or None when it can."""
    if shutil.which("ip") is None:
        return "no `ip` command on PATH: install iproute2 (apt-get install -y iproute2)"
    if os.geteuid() != 0:
        return (f"creating network namespaces needs root (CAP_SYS_ADMIN); this test runs as uid {os.geteuid()}: "
                "run it as root, as CI does")
    return None


@dataclass
class Host:
    """One emulated host: its namespace, its address on the bridge, and its cable (the bridge port)."""

    index: int
    ns: str
    ip: str
    bridge_ns: str
    port: str  # the veth end on the bridge side; down = the cable is pulled

    def command(self, args: list[str]) -> list[str]:
        """`args` run inside this host."""
        return ["ip", "netns", "exec", self.ns, *args]

    def partition(self) -> None:
        """Cuts this host off the bridge: packets to and from it are lost, its processes keep running."""
        _ip("-n", self.bridge_ns, "link", "set", self.port, "down")

    def heal(self) -> None:
        _ip("-n", self.bridge_ns, "link", "set", self.port, "up")


@dataclass
class Hosts:
    """The bridge namespace and the hosts joined to it."""

    bridge_ns: str
    hosts: list[Host] = field(default_factory=list)

    @classmethod
    def create(cls, count: int) -> Hosts:
        """`count` hosts on one bridge, at 10.213.0.1, .2, ...; raises HostsUnavailable naming what
        is missing. On failure half-way, what was made is removed."""
        reason = missing_prerequisite()
        if reason:
            raise HostsUnavailable(reason)
        sweep_dead_runs()
        name = f"{NAME_PREFIX}-{os.getpid()}-{next(_clusters)}"
        made = cls(f"{name}-br")
        try:
            _ip("netns", "add", made.bridge_ns)
            for command in (["link", "add", "br0", "type", "bridge", "forward_delay", "0"],
                            ["link", "set", "br0", "up"], ["link", "set", "lo", "up"]):
                _ip("-n", made.bridge_ns, *command)
            for index in range(1, count + 1):
                made.hosts.append(made._add_host(f"{name}-h{index}", index))
        except BaseException:
            made.destroy()
            raise
        return made

    def _add_host(self, ns: str, index: int) -> Host:
        host = Host(index, ns, f"{SUBNET}.{index}", self.bridge_ns, f"v{index}")
        _ip("netns", "add", ns)
        # Both ends are born in the bridge namespace and one moves to the host: none ever exists in ours.
        _ip("-n", self.bridge_ns, "link", "add", host.port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", self.bridge_ns, "link", "set", host.port, "master", "br0")
        _ip("-n", self.bridge_ns, "link", "set", host.port, "up")
        _ip("-n", ns, "addr", "add", f"{host.ip}/{PREFIX_LENGTH}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return host

    def __getitem__(self, position: int) -> Host:
        return self.hosts[position]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    def namespaces(self) -> list[str]:
        return [self.bridge_ns, *(host.ns for host in self.hosts)]

    def destroy(self) -> None:
        """Removes every namespace of this cluster (their veth ends go with them); safe to call twice,
        and after a create that failed half-way. Stop the processes inside first: a namespace someone
        still runs in outlives its name."""
        for ns in reversed(self.namespaces()):
            _ip("netns", "del", ns, check=False)


def existing_namespaces() -> set[str]:
    listing = _ip("netns", "list", check=False).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


def sweep_dead_runs() -> None:
    """Removes namespaces left by a test run that was killed before it could clean up."""
    for ns in existing_namespaces():
        match = _OUR_NAME.match(ns)
        if match and not _alive(int(match.group(1))):
            _ip("netns", "del", ns, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def emulated_hosts(count: int) -> Iterator[Hosts]:
    """`count` hosts for the duration of a with-block, removed however it ends. Fails the test (never
    skips it) when namespaces cannot be made here, naming what is missing."""
    import pytest

    try:
        hosts = Hosts.create(count)
    except HostsUnavailable as exc:
        pytest.fail(f"cannot emulate hosts with network namespaces: {exc}", pytrace=False)
    try:
        yield hosts
    finally:
        hosts.destroy()
