"""The channel between an SL and its ML is the SL's own: on TCP it serves only callers with the SL's
secret, and its Unix socket sits in a folder only its user may enter, whatever the umask. An SL
that loses its SN for good says so and exits; a YAML file far too big is refused naming the file."""

from __future__ import annotations

import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path

from contextlib import contextmanager

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import identity_args, run_swarm, start_sn
from swarm_harness import ML_DIR, Node, Swarm, start_sl, stuck_sync, wait_ml
from swarmlearn.callback import frames
from swarmlearn.callback.core import SLChannel
from swarmlearn.errors import ConfigError, SwarmError
from swarmlearn.swci.taskdef import load_taskdef
from swarmlearn.swop.profile import load_profile
from swarmlearn.tensors import Tensor, encode
from swarmlearn.yamlfile import MAX_YAML_BYTES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def raw_connection(address: str):
    """A bare socket to an SL's ML channel, speaking frames by hand."""
    sock = frames.connect(address, timeout=5)
    sock.settimeout(10)
    try:
        yield sock
    finally:
        sock.close()


def start_tcp_sl(procs, certs, sn, node_id: str, work: Path) -> tuple[Node, str]:
    """An SL whose ML channel is a TCP port; returns it and the secret its ready line gives."""
    host, port = sn.address.rsplit(":", 1)
    sl = procs.swarm("sl", "--sn-ip", host, "--sn-api-port", port, "--sl-fs-port", "0",
                     *identity_args(certs, "sl", node_id), "--node-id", node_id, "--data-dir", str(work / node_id),
                     "--checkin-wait", "1", "--ml-addr", f"127.0.0.1:{free_port()}")
    ready = sl.wait_for_line(f"SL {node_id} ready: SWARM_SL_ADDR=").split("SWARM_SL_ADDR=")[1]
    address, _, token = ready.partition(" SWARM_SL_TOKEN=")
    return Node(node_id, sl, address.strip()), token.strip()


def test_ml_channel_over_tcp_needs_the_node_secret(procs, certs, sn, tmp_path, monkeypatch):
    monkeypatch.delenv("SWARM_SL_TOKEN", raising=False)
    node1, token = start_tcp_sl(procs, certs, sn, "node1", tmp_path)
    node2 = start_sl(procs, certs, sn, "node2", tmp_path, "--checkin-wait", "1")
    assert len(token) >= 32

    # Anyone else who reaches the port is refused before any request, and the connection closed.
    for wrong in ("", "x" * len(token), token[:-1]):
        with pytest.raises(SwarmError, match="SWARM_SL_TOKEN"):
            SLChannel(node1.ml_addr, ready_timeout=5, token=wrong)
    with raw_connection(node1.ml_addr) as raw:  # a request without the hello that carries the secret
        frames.send(raw, {"op": "report", "round": 1})
        reply, _ = frames.receive(raw)
        assert reply["ok"] is False and reply["code"] == "invalid"
        with pytest.raises(frames.FrameError, match="closed"):
            frames.receive(raw)
    with raw_connection(node1.ml_addr) as raw:
        frames.send(raw, {"op": "hello", "protocol": frames.PROTOCOL, "token": "guess"})
        reply, _ = frames.receive(raw)
        assert reply["code"] == "unauthenticated" and "SWARM_SL_TOKEN" in reply["error"]

    # Its own ML, given the secret through the environment as the SWOP does, trains with its peer.
    out = tmp_path / "out"
    env = {"STEPS": "8", "SYNC_FREQUENCY": "4", "MIN_PEERS": "2", "OUT_DIR": str(out)}
    for node, extra in ((node1, {"SWARM_SL_TOKEN": token}), (node2, {})):
        node.ml = procs.start([sys.executable, str(ML_DIR / "tiny_torch_model.py")],
                              env={"NODE_ID": node.node_id, "SWARM_SL_ADDR": node.ml_addr, **env, **extra})
    swarm = Swarm(sn, {"node1": node1, "node2": node2}, out)
    wait_ml(swarm, timeout=60)
    a, b = (load_file(out / n / "final.safetensors") for n in ("node1", "node2"))
    assert all(a[name].tobytes() == b[name].tobytes() for name in a)
    # The secret is not given to a Unix-socket SL's ML: that channel's folder keeps others out.
    assert "SWARM_SL_TOKEN" not in node2.sl.output


def test_ml_socket_dir_is_private_whatever_the_umask(procs, certs, sn, tmp_path):
    open_dir = tmp_path / "shared"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    deep = tmp_path / ("d" * 90)  # too long a path for a socket address: the socket goes to a temp folder
    host, port = sn.address.rsplit(":", 1)
    addresses = []
    for node_id, data_dir in (("node1", open_dir / "sl"), ("node2", deep)):
        sl = procs.swarm("sl", "--sn-ip", host, "--sn-api-port", port, "--sl-fs-port", "0",
                         *identity_args(certs, "sl", node_id), "--node-id", node_id, "--data-dir", str(data_dir),
                         umask=0)
        line = sl.wait_for_line(f"SL {node_id} ready: SWARM_SL_ADDR=")
        assert "SWARM_SL_TOKEN" not in line
        addresses.append(line.split("SWARM_SL_ADDR=")[1].strip())
    assert stat.S_IMODE((open_dir / "sl").stat().st_mode) == 0o777  # the SL did run under umask 0
    for address in addresses:
        assert address.startswith("unix:")
        folder = Path(address[5:]).parent
        info = folder.lstat()
        assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700, (folder, oct(info.st_mode))
        assert info.st_uid == os.getuid()
        # and its own ML still reaches it
        channel = SLChannel(address, ready_timeout=5)
        assert channel.join("default", 1, 1.0, "mean").node_id in ("node1", "node2")
        channel.close()


def test_sl_exits_when_sn_stays_away_past_patience(procs, certs, tmp_path):
    sn = start_sn(procs, certs, tmp_path / "sn")
    node = start_sl(procs, certs, sn, "node1", tmp_path, env={"SWARM_SN_PATIENCE": "2"})
    waiter, outcome = stuck_sync(node)
    sl = node.sl
    sn.proc.kill(signal.SIGKILL)
    gone = time.monotonic()
    assert sl.popen.wait(timeout=20) == 1, sl.output
    sl._thread.join(timeout=5)
    # Patience (2 s) plus leaving its contract and stopping: seconds, not the lingering of before.
    assert time.monotonic() - gone < 15
    last = sl.lines[-1]
    assert last.startswith("error: SL node1 stopped: it lost the ledger") and "SN" in last, sl.output
    waiter.join(10)
    assert outcome and isinstance(outcome[0], SwarmError)  # its ML is told, not left waiting


def test_oversized_yaml_is_refused_naming_the_file(sn, certs, tmp_path):
    taskdefs = tmp_path / "taskdefs"
    taskdefs.mkdir()
    good = ("Name: t1\nTaskType: RUN_SWARM\nAuthor: me\nPrereq: ROOTTASK\nOutcome: t1-out\nBody:\n"
            "  Command: model.py\n  Entrypoint: python3\n  WorkingDir: ~\n  Envvars:\n    - STEPS: 8\n"
            "  PrivateContent: ~\n  SharedContent: ~\n")
    (taskdefs / "small.yaml").write_text(good)
    # Valid YAML all through: a 10 MB value, which the SN would refuse later, and less clearly.
    (taskdefs / "huge.yaml").write_text(good.replace("Name: t1", "Name: t2").replace("t1-out", "t2-out")
                                        .replace("- STEPS: 8", "- BLOB: " + "x" * (10 << 20)))
    with pytest.raises(ConfigError) as refused:
        load_taskdef(taskdefs / "huge.yaml")
    message = str(refused.value)
    assert message.startswith(f"{taskdefs / 'huge.yaml'}: ") and "1 MiB" in message
    huge_profile = tmp_path / "profile.yaml"
    huge_profile.write_text("# " + "x" * (MAX_YAML_BYTES + 1) + "\n")
    with pytest.raises(ConfigError, match=f"^{huge_profile}: .*1 MiB"):
        load_profile(huge_profile)

    # Through the SWCI, against a live SN: the refusal names the file; the next task is created.
    script = tmp_path / "init"
    script.write_text("CREATE CONTEXT c WITH IP 127.0.0.1\nSWITCH CONTEXT c\nCREATE TASK FROM taskdefs/huge.yaml\n"
                      "CREATE TASK FROM taskdefs/small.yaml\nLIST TASKS\n")
    port = sn.address.rsplit(":", 1)[1]
    result = run_swarm("swci", "--usr-dir", str(tmp_path), "--init-script-name", str(script),
                       *identity_args(certs, "swci"), "--sn-api-port", port)
    output = result.stdout + result.stderr
    assert "huge.yaml" in output and "1 MiB" in output, output
    listed = [line.split()[0] for line in result.stdout.splitlines() if "RUN_SWARM" in line]
    assert listed == ["t1"], output


def hostile_reply(address: str, prefix: bytes, body: bytes = b"", hello: bool = True) -> dict:
    """Sends raw bytes (after a proper hello, unless told not to); returns the SL's answer."""
    with raw_connection(address) as raw:
        if hello:
            frames.send(raw, {"op": "hello", "protocol": frames.PROTOCOL})
            assert frames.receive(raw)[0]["ok"] is True
        raw.sendall(prefix + body)
        return frames.receive(raw)[0]


def test_the_ml_channel_answers_hostile_frames_clearly_and_stays_up(procs, certs, sn, tmp_path):
    node = start_sl(procs, certs, sn, "node1", tmp_path)
    address = node.ml_addr
    ml = SLChannel(address, ready_timeout=5)
    ml.join("default", 1, 1.0, "mean")

    # Lengths are checked before anything is read: a frame declaring 4 GiB is refused at once.
    for prefix, body, said in (
            (b"HTTP" + bytes(8), b"", "bad magic"),
            (frames.PREFIX.pack(frames.MAGIC, 0xFFFFFFFF, 0), b"", "beyond"),
            (frames.PREFIX.pack(frames.MAGIC, 2, 0xFFFFFFFF), b"{}", "beyond"),
            (frames.PREFIX.pack(frames.MAGIC, 5, 0), b"\xff{}[]", "not JSON"),
            (frames.PREFIX.pack(frames.MAGIC, 2, 0), b"[]", "not a JSON object")):
        reply = hostile_reply(address, prefix, body)
        assert reply["ok"] is False and said in reply["error"], reply
    stranger = b'{"op":"hello","protocol":99}'
    reply = hostile_reply(address, frames.PREFIX.pack(frames.MAGIC, len(stranger), 0), stranger, hello=False)
    assert "protocol 99" in reply["error"]

    with raw_connection(address) as raw:
        frames.send(raw, {"op": "hello", "protocol": frames.PROTOCOL})
        frames.receive(raw)
        # Requests that are wrong but well framed are refused one by one on a connection that goes on.
        for request, said in (({"op": "shutdown"}, "unknown request"),
                              ({"op": "join", "min_peers": "two"}, "'min_peers' is str"),
                              ({"op": "report", "round": 1, "loss": "low"}, "'loss' is str"),
                              ({"op": "report", "round": 1, "secret": 1}, "unknown field 'secret'"),
                              ({"op": "report", "kind": "gossip"}, "neither train nor validation")):
            frames.send(raw, request)
            reply, _ = frames.receive(raw)
            assert reply["ok"] is False and said in reply["error"], (request, reply)
        frames.send(raw, {"op": "report", "round": 1, "loss": float("nan"), "metric": float("inf")})
        assert frames.receive(raw)[0]["ok"] is True  # a diverged model: recorded as null, not an error
        # A sync whose size lies: more than any blob may be, or cut short by another request.
        frames.send(raw, {"op": "sync", "size": 10 ** 12, "weight": 1.0})
        assert "blob size" in frames.receive(raw)[0]["error"]
    with raw_connection(address) as raw:
        frames.send(raw, {"op": "hello", "protocol": frames.PROTOCOL})
        frames.receive(raw)
        frames.send(raw, {"op": "sync", "size": 100, "weight": 1.0}, b"x" * 10)
        frames.send(raw, {"op": "report", "round": 1})
        assert "blob truncated: 10 of 100 bytes" in frames.receive(raw)[0]["error"]
    with raw_connection(address) as raw:
        frames.send(raw, {"op": "hello", "protocol": frames.PROTOCOL})
        frames.receive(raw)
        # A size within the bound but far beyond this machine's memory: the SL holds what is sent (it
        # receives into a buffer that grows with the bytes), never what is declared.
        frames.send(raw, {"op": "sync", "size": 60 << 30, "weight": 1.0}, b"x" * 10)
        frames.send(raw, {"op": "report", "round": 1})
        assert f"blob truncated: 10 of {60 << 30} bytes" in frames.receive(raw)[0]["error"]

    # Callers beyond MAX_CONNECTIONS are turned away at once; once they leave, the channel serves again.
    from swarmlearn.sl.local_channel import MAX_CONNECTIONS

    idle = [frames.connect(address, timeout=5) for _ in range(MAX_CONNECTIONS - 1)]  # ml holds one
    with raw_connection(address) as extra:
        reply, _ = frames.receive(extra)
        assert reply["code"] == "busy" and str(MAX_CONNECTIONS) in reply["error"]
    for sock in idle:
        sock.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            second = SLChannel(address, ready_timeout=5)
            break
        except SwarmError:
            assert time.monotonic() < deadline, "the channel stayed busy after its callers left"
            time.sleep(0.2)
    merged, blob = ml.sync(encode({"w": Tensor("F32", np.ones(4, dtype=np.float32))}), 1.0)
    assert merged.round >= 1 and merged.contributed and len(blob) > 8
    second.close()
    ml.close()
    assert node.sl.popen.poll() is None, node.sl.output
