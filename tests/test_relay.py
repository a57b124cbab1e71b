"""The WAN of the benchmarks (bench/_relay.py) between two emulated hosts: a round trip takes the RTT
the relay claims to add, bytes cross it intact both ways, and the link is capped at its rate."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import Procs
from netns import emulated_hosts

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._relay import wide_area  # noqa: E402

RTT_S = 0.08
RATE_MBIT = 50
PORT = 40300
# What a connect may take beyond the RTT: the relay's own time and a busy shared machine's wake-ups.
SLACK_S = 0.03
# Echoes every connection's bytes back until the client stops sending.
ECHO_SERVER = f"""
import socket, sys, threading
def echo(c):
    while True:
        data = c.recv(1 << 16)
        if not data:
            break
        c.sendall(data)
    c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], {PORT})); s.listen(8); print("listening", flush=True)
while True:
    threading.Thread(target=echo, args=(s.accept()[0],), daemon=True).start()
"""
# Prints the fastest of 5 TCP handshakes (one round trip each), then sends SIZE random bytes through
# the echo and says whether what came back is the same, and how long the whole echo took.
CLIENT = f"""
import os, socket, sys, threading, time
ip, size = sys.argv[1], int(sys.argv[2])
handshakes = []
for _ in range(5):
    started = time.monotonic()
    socket.create_connection((ip, {PORT}), timeout=10).close()
    handshakes.append(time.monotonic() - started)
print("handshake", min(handshakes))
sent, back = os.urandom(size), bytearray()
c = socket.create_connection((ip, {PORT}), timeout=30)
def receive():
    while len(back) < size:
        chunk = c.recv(1 << 16)
        if not chunk:
            break
        back.extend(chunk)
reader = threading.Thread(target=receive); reader.start()
started = time.monotonic(); c.sendall(sent)
reader.join(); echo = time.monotonic() - started; c.close()
print("intact", bytes(back) == sent, "echo", echo)
"""


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    with emulated_hosts(2) as hosts:
        with wide_area(hosts, RTT_S, RATE_MBIT, tmp_path_factory.mktemp("wan")) as shaped:
            procs = Procs()
            try:
                procs.start(hosts[0].command([sys.executable, "-c", ECHO_SERVER, hosts[0].ip])).wait_for_line(
                    "listening", timeout=10)
                yield shaped
            finally:
                procs.stop_all()


def run_client(wan, size: int) -> dict[str, str]:
    import subprocess

    result = subprocess.run(wan.hosts[1].command([sys.executable, "-c", CLIENT, wan.hosts[0].ip, str(size)]),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"client on host 2 failed: {result.stdout}{result.stderr}"
    words = result.stdout.split()
    return dict(zip(words[::2], words[1::2]))


def test_a_round_trip_between_hosts_takes_the_rtt_the_relay_adds(wan):
    handshake = float(run_client(wan, 1000)["handshake"])
    assert RTT_S <= handshake <= RTT_S + SLACK_S, \
        f"a TCP handshake took {handshake * 1000:.1f} ms; the relay claims to add {RTT_S * 1000:.0f} ms per round trip"


def test_bytes_cross_the_relay_intact_both_ways_at_the_link_rate(wan):
    size = 6_000_000
    sent_before = wan.link_bytes(wan.hosts[1])[0]
    outcome = run_client(wan, size)
    assert outcome["intact"] == "True", "the bytes echoed back through the relay differ from those sent"
    # The last byte cannot be back before all of them crossed one capped link, plus a round trip.
    least = size * 8 / (RATE_MBIT * 1e6) + RTT_S
    assert float(outcome["echo"]) >= least, \
        f"{size / 1e6:.0f} MB went and came back in {float(outcome['echo']):.2f} s, faster than {RATE_MBIT} Mbit/s " \
        "allows"
    assert wan.link_bytes(wan.hosts[1])[0] - sent_before >= size, "host 2's uplink qdisc did not carry the upload"
