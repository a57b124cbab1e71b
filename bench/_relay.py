"""A wide-area network between the emulated hosts of tests/netns.py: each host's link capped by the
kernel's `tbf` qdisc, and the latency added by a delay-only relay that forwards IP packets.

Why packets, not bytes. This kernel has no `netem`, so the delay has to come from user space. A byte
relay (a TCP proxy that delays each chunk) ends every TCP connection at the relay: the sender's
congestion window then grows against the relay's near-zero RTT and its ACKs come from the relay, so
slow start, the window needed to fill the pipe and the loss recovery all happen at LAN speed and the
WAN shows up as a constant added to each chunk. Forwarding IP packets keeps one TCP connection end to
end: every data segment and every ACK waits RTT/2 each way, so the sender sees the real RTT, slow start
takes its log2(window) round trips, and a window smaller than the bandwidth-delay product caps the rate
as it would across a real WAN.

How. The bridge namespace of the hosts becomes their router: `br0` gets GATEWAY, each host routes its
subnet through it (one `ip route replace ... onlink`), and a policy rule sends every packet that
arrives from the bridge into a TUN device, `delay0`. This relay, a process of its own in the bridge
namespace, reads each packet from `delay0`, holds it RTT/2 and writes it back into `delay0`; the
kernel then routes it out through the bridge to its destination. Every packet between two hosts thus
crosses the relay exactly once, so a round trip is delayed by RTT in all. The delay is the same for
every packet, so a FIFO keeps them in order. Bandwidth: `tbf` on each host's `eth0` (its uplink)
and on its bridge port (its downlink, the egress toward it), both at the link rate with a queue of
one bandwidth-delay product, so a host that receives from seven peers at once shares one downlink,
as it would behind a real access link.

The relay runs at real-time priority (SCHED_FIFO) where it may, so that the swarm's processes,
which share the CPUs with it, do not hold packets up.

Limits. The relay is Python: about 15 us of CPU per packet (measured), so one core moves some 60,000
packets a second, 8 hosts' links at 100 Mbit/s each way at most with 1,500-byte packets; packets that
leave late are counted (`late_ms_p99`, `late_ms_max`), and the benchmark prints that beside its
figures. There is no jitter, reordering or random loss: losses come only from the tbf queues
overflowing, as at a real bottleneck. Traffic between two processes on one host does not cross the
relay (it never leaves the host), as on a real machine. Needs root, `ip`, `tc` and /dev/net/tun.

    python -m bench._relay --device delay0 --delay-ms 25     (run inside the bridge namespace)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(ROOT / "tests"))  # netns.py: the emulated hosts this shapes
from netns import PREFIX_LENGTH, SUBNET, Hosts  # noqa: E402

GATEWAY = f"{SUBNET}.254"  # the bridge namespace's address on br0: every host's next hop
DEVICE = "delay0"
TABLE = "100"  # the routing table of packets arriving from the bridge: all into the relay
# linux/if_tun.h
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
MAX_PACKET = 65535
# Real-time (SCHED_FIFO) priority of the relay: it uses a few % of a core, and a link whose packets
# wait for a busy CPU would add latency the WAN does not have.
REALTIME_PRIORITY = 10
READ_BATCH = 64  # packets read before the due ones are written, so a flood cannot starve the writes
IDLE_WAKE_S = 0.2  # how often an idle relay looks at its stop flag
READY = "relay ready"
STATS = "relay stats "
# A burst a few packets deep: at 100 Mbit/s one 1,500-byte packet is 120 us, well above timer slack.
BURST_BYTES = 15_000


def open_tun(name: str) -> int:
    """Creates TUN device `name` in this process's network namespace (gone when the fd closes)."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    os.set_blocking(fd, False)
    return fd


class Relay:
    """Holds every packet read from `fd` for `delay` seconds, then writes it back, in order."""

    def __init__(self, fd: int, delay: float):
        self.fd, self.delay = fd, delay
        self.queue: deque[tuple[float, bytes]] = deque()
        self.packets = self.bytes = self.write_errors = 0
        self.lateness: list[float] = []  # seconds each packet left after its due time
        self.stopping = False
        self.realtime = False

    def _read_some(self) -> None:
        for _ in range(READ_BATCH):
            try:
                packet = os.read(self.fd, MAX_PACKET)
            except BlockingIOError:
                return
            self.queue.append((time.monotonic() + self.delay, packet))

    def _write_due(self) -> None:
        now = time.monotonic()
        while self.queue and self.queue[0][0] <= now:
            due, packet = self.queue.popleft()
            try:
                os.write(self.fd, packet)
            except OSError:
                self.write_errors += 1
                continue
            self.packets += 1
            self.bytes += len(packet)
            self.lateness.append(now - due)

    def run(self) -> None:
        while not self.stopping:
            wait = IDLE_WAKE_S
            if self.queue:
                wait = min(wait, max(0.0, self.queue[0][0] - time.monotonic()))
            readable, _, _ = select.select([self.fd], [], [], wait)
            if readable:
                self._read_some()
            self._write_due()

    def stats(self) -> dict:
        late = sorted(self.lateness) or [0.0]
        return {"realtime": self.realtime, "packets": self.packets, "bytes": self.bytes,
                "write_errors": self.write_errors,
                "late_ms_p50": late[len(late) // 2] * 1000, "late_ms_p99": late[int(len(late) * 0.99)] * 1000,
                "late_ms_max": late[-1] * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description="Delay-only IP packet relay on a TUN device (run as root).")
    parser.add_argument("--device", default=DEVICE, help=f"TUN device to create (default {DEVICE})")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay added to each packet")
    args = parser.parse_args()
    if args.delay_ms < 0:
        parser.error(f"--delay-ms {args.delay_ms}: give 0 or more milliseconds")
    relay = Relay(open_tun(args.device), args.delay_ms / 1000)
    with contextlib.suppress(OSError):  # the network must not wait for a CPU the swarm keeps busy
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))
        relay.realtime = True

    def stop(*_):
        relay.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(READY, flush=True)
    relay.run()
    print(STATS + json.dumps(relay.stats()), flush=True)


def _run(*args: str) -> None:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed ({result.returncode}): {result.stderr.strip()}")


def _in_ns(ns: str, *args: str) -> None:
    _run("ip", "netns", "exec", ns, *args)


def _ip_n(ns: str, *args: str) -> None:
    _run("ip", "-n", ns, *args)


def tbf(ns: str, device: str, rate_mbit: float, queue_bytes: int) -> None:
    _in_ns(ns, "tc", "qdisc", "replace", "dev", device, "root", "tbf", "rate", f"{rate_mbit}mbit",
           "burst", str(BURST_BYTES), "limit", str(queue_bytes))


def qdisc_sent_bytes(ns: str, device: str) -> int:
    """Bytes the root qdisc of `device` in `ns` has sent so far."""
    shown = subprocess.run(["ip", "netns", "exec", ns, "tc", "-s", "qdisc", "show", "dev", device],
                           capture_output=True, text=True, timeout=30, check=True).stdout
    return int(shown.split(" Sent ", 1)[1].split()[0])


@dataclass
class Wan:
    """The shaped network of `hosts` and its relay process; `stats`, once stopped, the relay's."""

    hosts: Hosts
    rtt_s: float
    rate_mbit: float
    relay: subprocess.Popen
    log: Path
    stats: dict = field(default_factory=dict)

    @property
    def queue_bytes(self) -> int:
        return bandwidth_delay_bytes(self.rate_mbit, self.rtt_s)

    def link_bytes(self, host) -> tuple[int, int]:
        """(sent, received) bytes on `host`'s link so far, counted by its two tbf qdiscs."""
        return qdisc_sent_bytes(host.ns, "eth0"), qdisc_sent_bytes(self.hosts.bridge_ns, host.port)

    def stop(self) -> dict:
        """Stops the relay by pid; returns its statistics."""
        if self.relay.poll() is None:
            self.relay.terminate()
            try:
                self.relay.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.relay.kill()
                self.relay.wait()
        for line in self.log.read_text().splitlines():
            if line.startswith(STATS):
                return json.loads(line[len(STATS):])
        return {}


def bandwidth_delay_bytes(rate_mbit: float, rtt_s: float) -> int:
    return max(2 * BURST_BYTES, int(rate_mbit * 1e6 / 8 * rtt_s))


def _start_relay(bridge_ns: str, delay_s: float, log: Path) -> subprocess.Popen:
    # `ip netns exec` execs Python in place: the pid is the relay's own.
    with open(log, "w") as out:
        relay = subprocess.Popen(["ip", "netns", "exec", bridge_ns, sys.executable, "-m", "bench._relay",
                                  "--device", DEVICE, "--delay-ms", str(delay_s * 1000)],
                                 stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 20
    while READY not in log.read_text():
        if relay.poll() is not None or time.monotonic() > deadline:
            relay.kill()
            relay.wait()
            raise RuntimeError(f"the delay relay did not start in {bridge_ns}:\n{log.read_text()}")
        time.sleep(0.05)
    return relay


def _route_through_relay(hosts: Hosts) -> None:
    bridge = hosts.bridge_ns
    _in_ns(bridge, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
           "net.ipv4.conf.all.send_redirects=0", f"net.ipv4.conf.{DEVICE}.rp_filter=0", "net.ipv4.conf.br0.rp_filter=0")
    _ip_n(bridge, "addr", "add", f"{GATEWAY}/{PREFIX_LENGTH}", "dev", "br0")
    _ip_n(bridge, "link", "set", DEVICE, "up", "txqueuelen", "10000")
    _ip_n(bridge, "rule", "add", "iif", "br0", "lookup", TABLE, "priority", "100")
    _ip_n(bridge, "route", "add", "default", "dev", DEVICE, "table", TABLE)
    for host in hosts:
        _ip_n(host.ns, "route", "replace", f"{SUBNET}.0/{PREFIX_LENGTH}", "via", GATEWAY, "dev", "eth0", "onlink")


@contextlib.contextmanager
def wide_area(hosts: Hosts, rtt_s: float, rate_mbit: float, workdir: Path) -> Iterator[Wan]:
    """Shapes `hosts` into a WAN (every link `rate_mbit`, every round trip `rtt_s` longer) for the
    with-block; the relay is stopped by pid at the end (the namespaces stay: their owner removes them)."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "relay.log"
    relay = _start_relay(hosts.bridge_ns, rtt_s / 2, log)
    wan = Wan(hosts, rtt_s, rate_mbit, relay, log)
    try:
        _route_through_relay(hosts)
        for host in hosts:
            tbf(host.ns, "eth0", rate_mbit, wan.queue_bytes)
            tbf(hosts.bridge_ns, host.port, rate_mbit, wan.queue_bytes)
        yield wan
    finally:
        wan.stats = wan.stop()


if __name__ == "__main__":
    main()
