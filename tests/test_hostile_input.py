"""Hostile input: whatever bytes reach a parser or a service, the answer is a clear refusal, never a
crash, a hang or a different exception type.

- SWCI scripts, taskdef YAML and SWOP profiles (random text, random YAML documents, mutations of the
  example files, and the classic hostile shapes: alias bombs, deep nesting, NUL bytes, huge numbers)
  raise ConfigError naming the file (and the line), within a deadline;
- the ledger state machine, fed random payloads for every transaction kind by registered signers,
  refuses with Rejected or applies cleanly: a transaction it let through never fails half-applied;
- the running SN and SL gRPC services, sent random bytes and malformed messages on their real method
  paths, answer each with a gRPC status and a message, and still answer a valid request afterwards;
- a contribution with NaN, Inf, a wrong shape, a missing tensor or a huge norm is refused by the
  leader naming the node, and each round completes with the rest.

The safetensors decoder is fuzzed in tests/test_tensors.py and not again here.
"""

from __future__ import annotations

import copy
import json
import re
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmlearn.errors import ConfigError, Rejected, SwarmError
from swarmlearn.ledger import LedgerState, Signer, Tx
from swarmlearn.ledger.model import leader_order
from swarmlearn.swci.script import parse_script
from swarmlearn.swci.taskdef import load_taskdef
from swarmlearn.swop.profile import load_profile
from swarmlearn.yamlfile import dump_yaml

from ledger_ids import CONTRACT, RUNNER, ca_pem, fingerprints, genesis_payload, reg

EXAMPLE = Path(__file__).parent.parent / "examples" / "huggingface-peft"
TASKDEFS = sorted((EXAMPLE / "swci" / "taskdefs").glob("*.yaml"))
PROFILE = EXAMPLE / "swop" / "swop_profile.yaml"
SCRIPT = EXAMPLE / "swci" / "swci-init"

# A handful of seconds per example is generous: each parse takes milliseconds. The alarm below turns
# a hang into a failure instead of a stuck test run.
FUZZ = settings(max_examples=60, deadline=3000, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])
HANG_LIMIT_S = 10


@contextmanager
def no_hang(seconds: int = HANG_LIMIT_S):
    def expire(*_):
        raise TimeoutError(f"still parsing after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------ the parsers

PARSERS = {"taskdef": load_taskdef, "profile": load_profile, "script": parse_script}


def assert_refused_or_accepted(parser, path: Path, content: bytes) -> None:
    """The parser accepts the file, or raises ConfigError whose message starts with the file's name
    (and, for anything read past the first byte, a line number)."""
    path.write_bytes(content)
    with no_hang():
        try:
            parser(path)
        except ConfigError as exc:
            message = str(exc)
            assert message.startswith(str(path)), message
            first = message.splitlines()[0]
            assert re.match(rf"{re.escape(str(path))}:\d+", first), first
            assert len(first) > len(str(path)) + 10, first  # says what is wrong, not just where


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                         st.text(max_size=20), st.sampled_from(["~", "ROOTTASK", "RUN_SWARM", "BIND", "-1", "0x1F"]))
yaml_keys = st.one_of(st.text(max_size=12), st.sampled_from(
    ["Name", "TaskType", "Author", "Prereq", "Outcome", "Body", "Command", "Envvars", "SharedContent", "groupname",
     "taskrunner", "nodes", "slnodedef", "idx", "identity", "slhostip", "slport", "usrenvvars", "envvars",
     "apisrv", "locator", "host", "port", "privatedata", "src", "mType", "aType"]))
yaml_documents = st.recursive(yaml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(yaml_keys, inner, max_size=6)), max_leaves=25)


@FUZZ
@given(kind=st.sampled_from(["taskdef", "profile"]), doc=yaml_documents)
def test_random_yaml_documents_are_accepted_or_refused_with_file_and_line(tmp_path, kind, doc):
    text = dump_yaml(doc)
    assert_refused_or_accepted(PARSERS[kind], tmp_path / f"{kind}.yaml", text.encode())


def _mutated(original: bytes):
    """The example file with a few bytes or lines deleted, duplicated, swapped or replaced."""
    lines = original.split(b"\n")

    @st.composite
    def mutate(draw):
        data = list(lines)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            op = draw(st.sampled_from(["delete", "dup", "indent", "dedent", "garbage", "bytes"]))
            if op == "delete":
                del data[i]
            elif op == "dup":
                data.insert(i, data[i])
            elif op == "indent":
                data[i] = b"   " + data[i]
            elif op == "dedent":
                data[i] = data[i].lstrip()
            elif op == "garbage":
                data[i] = draw(st.binary(max_size=30))
            else:
                line = bytearray(data[i] or b" ")
                line[draw(st.integers(0, len(line) - 1))] = draw(st.integers(0, 255))
                data[i] = bytes(line)
            if not data:
                data = [b""]
        return b"\n".join(data)

    return mutate()


MUTATION_TARGETS = [("taskdef", p) for p in TASKDEFS] + [("profile", PROFILE), ("script", SCRIPT)]


@pytest.mark.parametrize("kind,original", MUTATION_TARGETS, ids=[p.name for _, p in MUTATION_TARGETS])
def test_mutations_of_the_example_files_are_accepted_or_refused_with_file_and_line(tmp_path, kind, original):
    @FUZZ
    @given(content=_mutated(original.read_bytes()))
    def check(content):
        assert_refused_or_accepted(PARSERS[kind], tmp_path / original.name, content)

    check()


@FUZZ
@given(kind=st.sampled_from(sorted(PARSERS)), content=st.one_of(
    st.binary(max_size=300), st.text(max_size=300).map(str.encode),
    st.lists(st.sampled_from(["CREATE CONTRACT", "ASSIGN TASK a TO b WITH", "PEERS", "WAIT FOR", "\t", " ", "#",
                              "cd", "\n", "x", ":", "- ", "{", "[", "&a", "*a", "!!binary", "<<: *a", "'", '"',
                              "\r", "\x00", "\ufeff"]), max_size=40).map(lambda parts: "".join(parts).encode())))
def test_random_bytes_are_accepted_or_refused_with_file_and_line(tmp_path, kind, content):
    assert_refused_or_accepted(PARSERS[kind], tmp_path / f"{kind}.in", content)


def billion_laughs(levels: int = 9) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\nBody: *l{}\n".format(levels - 1)


HOSTILE_YAML = {
    "alias bomb": billion_laughs(),
    "deep brackets": "Body: " + "[" * 1500 + "]" * 1500 + "\n",
    "deep mappings": "Body: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n",
    "deep indentation": "Body:\n" + "".join(" " * i + "- \n" for i in range(1400)),  # within the 1 MiB size cap
    "NUL byte": "Name: a\x00b\n",
    "integer of 5000 digits": "Name: x\nAuthor: 1" + "9" * 5000 + "\n",
    "impossible date": "Name: 2001-13-45\n",
    "python object tag": "Name: !!python/object/apply:os.system [ls]\n",
    "recursive alias": "Body: &b [*b]\n",
    "two documents": "Name: a\n---\nName: b\n",
}


@pytest.mark.parametrize("kind", ["taskdef", "profile"])
@pytest.mark.parametrize("shape", sorted(HOSTILE_YAML))
def test_hostile_yaml_shapes_are_refused_quickly_with_file_and_line(tmp_path, kind, shape):
    path = tmp_path / "hostile.yaml"
    path.write_text(HOSTILE_YAML[shape])
    with no_hang(5), pytest.raises(ConfigError) as refused:
        PARSERS[kind](path)
    assert re.match(rf"{re.escape(str(path))}:\d+", str(refused.value)), str(refused.value)


# ----------------------------------------------------------------------------- the state machine

FP = fingerprints()


def busy_state() -> LedgerState:
    """A ledger with something of everything: nodes, a task, an assignment, a closed and an open round."""
    state = LedgerState()

    def add(kind, payload, signer="sn-1"):
        state.apply_tx(Tx(kind, payload, Signer(signer, FP[signer])), state.head_index + 1)
        state.head_index += 1

    add("genesis", genesis_payload())
    for node in ("swop-1", "swci-1", "admin-1", "node1", "node2", "node3"):
        add("register_node", reg(node), node)
    add("taskrunner_join", {"runner": RUNNER, "capacity": 3}, "swop-1")
    add("task_create", {"name": "run", "type": "RUN_SWARM", "author": "a", "prereq": "ROOTTASK", "outcome": "o",
                        "body": {"Command": "model.py"}}, "swci-1")
    add("task_finalize", {"name": "run"}, "swci-1")
    add("taskrunner_assign", {"runner": RUNNER, "task": "run", "peers": 3}, "swci-1")
    add("taskrunner_claim", {"runner": RUNNER, "generation": 1, "peers": ["node1", "node2", "node3"]}, "swop-1")
    for node in ("node1", "node2", "node3"):
        add("session_join", {"contract": CONTRACT, "node": node, "min_peers": 2}, node)
    for node in ("node1", "node2", "node3"):
        add("checkin", {"contract": CONTRACT, "round": 1, "node": node, "hash": "h" + node, "weight": 1}, node)
    if state.contracts[CONTRACT].rounds[1].status == "open":  # the last check-in may have closed it
        leader = leader_order(CONTRACT, 0, 1, ["node1", "node2", "node3"])[0]
        add("close_round", {"contract": CONTRACT, "round": 1, "participants": ["node1", "node2", "node3"],
                            "leader": leader}, leader)
    for node in ("node1", "node2"):
        add("checkin", {"contract": CONTRACT, "round": 2, "node": node, "hash": "h2" + node, "weight": 1}, node)
    return state


PAYLOAD_KEYS = ["contract", "node", "round", "hash", "weight", "size", "final", "participants", "leader", "failed",
                "dropped", "name", "type", "prereq", "author", "outcome", "body", "runner", "task", "peers",
                "capacity", "generation", "peer", "status", "exit_code", "detail", "min_peers", "weightage",
                "merge_method", "cert", "org", "roles", "node_id", "role", "address", "cert_fp", "limits", "reason"]
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**30), st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=8),
                         st.sampled_from([CONTRACT, "default", RUNNER, "run", "node1", "node2", "node3", "h",
                                          "RUN_SWARM", "ROOTTASK", "COMPLETE", "FAILED", "SL", "mean", "ALL"]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=8)
payloads = st.dictionaries(st.sampled_from(PAYLOAD_KEYS), json_values, max_size=8)
LEADER1 = leader_order(CONTRACT, 0, 1, ["node1", "node2", "node3"])
LEADER2 = leader_order(CONTRACT, 0, 2, ["node1", "node2"])[0]
# One legal transaction of every kind against busy_state(), as (kind, signer, payload). The fuzzer
# swaps, drops and adds fields of these, so that most of what it sends gets past the first checks.
TEMPLATES = [
    ("register_node", "node3", {**reg("node3"), "address": "127.0.0.1:2"}),
    ("trust_ca", "admin-1", {"cert": ca_pem("other-sl"), "org": "other", "roles": ["sl"]}),
    ("revoke_cert", "admin-1", {"cert_fp": FP["node3"], "reason": "lost"}),
    ("contract_create", "swci-1", {"name": "c2", "limits": {"max_min_peers": 3}}),
    ("contract_update", "admin-1", {"name": CONTRACT, "peers": ["node1"]}),
    ("contract_reset", "admin-1", {"name": CONTRACT}),
    ("task_create", "swci-1", {"name": "t2", "type": "RUN_SWARM", "author": "a", "prereq": "run", "outcome": "o",
                               "body": {"Command": "x"}}),
    ("task_append", "swci-1", {"name": "run", "body": {"Envvars": ["A"]}}),
    ("task_finalize", "swci-1", {"name": "run"}),
    ("task_delete", "swci-1", {"name": "run"}),
    ("taskrunner_create", "swci-1", {"name": "r2"}),
    ("taskrunner_join", "swop-1", {"runner": RUNNER, "capacity": 2}),
    ("taskrunner_assign", "swci-1", {"runner": RUNNER, "task": "run", "peers": 2}),
    ("taskrunner_claim", "swop-1", {"runner": RUNNER, "generation": 1, "peers": ["p4"]}),
    ("taskrunner_peer_status", "swop-1", {"runner": RUNNER, "generation": 1, "peer": "node1", "status": "RUNNING",
                                          "exit_code": None, "detail": ""}),
    ("taskrunner_reset", "swci-1", {"runner": RUNNER}),
    ("session_join", "node3", {"contract": CONTRACT, "node": "node3", "min_peers": 2, "weightage": 1,
                               "merge_method": "mean"}),
    ("session_leave", "node3", {"contract": CONTRACT, "node": "node3"}),
    ("session_evict", "node1", {"contract": CONTRACT, "node": "node3"}),
    ("checkin", "node3", {"contract": CONTRACT, "round": 2, "node": "node3", "hash": "h", "weight": 1, "size": 10,
                          "final": False}),
    ("close_round", LEADER2, {"contract": CONTRACT, "round": 2, "participants": ["node1", "node2"],
                              "leader": LEADER2}),
    ("reelect", LEADER1[1], {"contract": CONTRACT, "round": 1, "failed": LEADER1[0], "leader": LEADER1[1]}),
    ("merged", LEADER1[0], {"contract": CONTRACT, "round": 1, "hash": "m", "size": 10, "dropped": []}),
    ("round_abort", LEADER1[0], {"contract": CONTRACT, "round": 1, "reason": "r", "dropped": []}),
    ("metrics", "node1", {"contract": CONTRACT, "node": "node1", "round": 1, "loss": 0.5}),
]


@st.composite
def transactions(draw):
    kind, signer, payload = draw(st.sampled_from(TEMPLATES))
    payload = dict(payload)
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(sorted(payload) + PAYLOAD_KEYS))
        if draw(st.booleans()) and key in payload:
            del payload[key]
        else:
            payload[key] = draw(json_values)
    if draw(st.integers(0, 9)) == 0:
        signer = draw(st.sampled_from(sorted(FP)))
    return Tx(kind, payload, Signer(signer, FP[signer]))


BASE = busy_state()


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(txs=st.lists(transactions(), min_size=1, max_size=6))
def test_the_state_machine_refuses_hostile_payloads_or_applies_them_whole(txs):
    state = copy.deepcopy(BASE)
    for tx in txs:
        try:
            state.check_tx(tx)
        except Rejected as exc:
            assert str(exc)
            continue
        # It passed the check: applying must not fail, or the SN would have stored an entry that no
        # one can fold (the SN appends before it applies).
        state.apply_tx(tx, state.head_index + 1)
        state.head_index += 1
        json.dumps(state.to_obj())  # and the state is still what Query serves


# ------------------------------------------------------------------------ the running services

SN_METHODS = ["Submit", "Heartbeat", "Query", "Watch"]
SL_PEER_METHODS = ["Fetch", "FetchMerged"]
STREAMING_RESPONSE = {"Watch", "Fetch", "FetchMerged"}


def raw_call(channel: grpc.Channel, service: str, method: str, body: bytes, timeout: float = 5.0):
    """Sends `body` as the request message of `service/method`, bytes in, bytes out; returns the
    grpc.RpcError it ended with, or None if it was answered."""
    path = f"/{service}/{method}"
    try:
        if method == "Sync":  # client-streaming: the body is the one message of the stream
            list(channel.stream_stream(path)(iter([body]), timeout=timeout))
        elif method in STREAMING_RESPONSE:
            for _ in channel.unary_stream(path)(body, timeout=timeout):
                break
        else:
            channel.unary_unary(path)(body, timeout=timeout)
    except grpc.RpcError as exc:
        return exc
    return None


def assert_clear_refusal(exc, what) -> None:
    if exc is None:
        return  # some random bytes are a valid message (e.g. b""), and get an ordinary answer
    assert exc.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED), \
        f"{what}: {exc.code().name} {exc.details()!r}"
    assert exc.details(), f"{what}: {exc.code().name} without a message"


def protobuf_field(number: int, wire: int, payload: bytes) -> bytes:
    """One hand-made protobuf field: tag, then a varint or length-delimited payload."""
    def varint(n):
        out = b""
        while True:
            byte, n = n & 0x7F, n >> 7
            out += bytes([byte | (0x80 if n else 0)])
            if not n:
                return out

    return varint(number << 3 | wire) + (varint(len(payload)) + payload if wire == 2 else payload)


def signed_tx_bytes(tx: bytes, signature: bytes = b"sig") -> bytes:
    return protobuf_field(1, 2, tx) + protobuf_field(2, 2, signature)


# Valid protobuf, hostile content: transaction bytes the SN must parse itself.
HOSTILE_TX = {
    "not JSON": b"\xff\xfe not json",
    "JSON array": b"[1,2,3]",
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "NaN time": b'{"kind":"checkin","nonce":"n","payload":{},"signer":{"cert_fp":"x","node":"a"},"time":NaN}',
    "Infinity in payload": (b'{"kind":"checkin","nonce":"n","payload":{"weight":Infinity},'
                            b'"signer":{"cert_fp":"x","node":"a"},"time":0}'),
    "huge number": b'{"kind":"x","nonce":"n","payload":{},"signer":{"cert_fp":"x","node":"a"},"time":1' +
                   b"0" * 5000 + b"}",
    "signer not an object": b'{"kind":"x","nonce":"n","payload":{},"signer":"me","time":0}',
    "lone surrogate": b'{"kind":"\\ud800","nonce":"n","payload":{},"signer":{"cert_fp":"x","node":"a"},"time":0}',
}


@pytest.fixture(scope="module")
def services(certs, tmp_path_factory):
    """One SN and one SL (with its local ML socket), shared by the hostile-input tests below."""
    from conftest import Procs, identity, start_sn
    from swarm_harness import start_sl

    procs = Procs()
    work = tmp_path_factory.mktemp("hostile")
    try:
        sn = start_sn(procs, certs, work / "sn")
        node = start_sl(procs, certs, sn, "node1", work)
        yield sn, node, identity(certs, "sl")
    finally:
        procs.stop_all()


def _sl_peer_address(sn, ident) -> str:
    from swarmlearn.sn.client import SNClient

    with SNClient(sn.address, ident, "probe") as c:
        return c.query("nodes")["nodes"]["node1"]["address"]


@pytest.mark.slow
def test_the_sn_answers_hostile_requests_with_a_status_and_stays_up(services):
    from swarmlearn.sn.client import SNClient

    sn, _, ident = services
    channel = grpc.secure_channel(sn.address, ident.channel_credentials())
    service = "swarmlearn.sn.SwarmNetwork"
    try:
        for method in SN_METHODS:
            for name, body in {"random bytes": b"\x0a\xff\xff\xff\xff\x0f\x00", "truncated field": b"\x0a\x05ab",
                               "wrong wire type": protobuf_field(1, 0, b"\x01"), "empty": b"",
                               "bad varint": b"\x08" + b"\xff" * 11}.items():
                assert_clear_refusal(raw_call(channel, service, method, body), f"{method} with {name}")
        for name, tx in HOSTILE_TX.items():
            exc = raw_call(channel, service, "Submit", signed_tx_bytes(tx))
            assert exc is not None, name
            assert_clear_refusal(exc, f"Submit of {name}")
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED), \
                f"{name}: {exc.code().name} {exc.details()}"

        @settings(max_examples=40, deadline=5000, suppress_health_check=list(HealthCheck))
        @given(method=st.sampled_from(SN_METHODS), body=st.binary(max_size=200))
        def fuzz(method, body):
            assert_clear_refusal(raw_call(channel, service, method, body), f"{method} with {body!r}")

        fuzz()
    finally:
        channel.close()
    assert sn.proc.popen.poll() is None, sn.proc.output
    with SNClient(sn.address, ident, "node1") as c:
        assert c.query("info")["info"]["head_index"] >= 0


@pytest.mark.slow
def test_an_sl_answers_hostile_requests_from_peers_and_from_its_ml_and_stays_up(services):
    """The peer API over gRPC; the ML's local channel (frames, not gRPC) has its own hostile-frame test
    in test_sl_local_channel.py, and here only its refusal of an unknown contract."""
    from swarmlearn.callback.core import SLChannel
    from swarmlearn.proto import sl_pb2

    sn, node, ident = services
    peer = grpc.secure_channel(_sl_peer_address(sn, ident), ident.channel_credentials())
    hostile_parts = {
        "random bytes": b"\x0a\xff\xff\xff\xff\x0f\x00",
        "truncated field": b"\x0a\x05ab",
        "empty": b"",
        "bad varint": b"\x08" + b"\xff" * 11,
    }
    try:
        for method in SL_PEER_METHODS:
            for name, body in hostile_parts.items():
                assert_clear_refusal(raw_call(peer, "swarmlearn.sl.SwarmPeer", method, body), f"peer {method} {name}")

        @settings(max_examples=30, deadline=5000, suppress_health_check=list(HealthCheck))
        @given(body=st.binary(max_size=200))
        def fuzz(body):
            assert_clear_refusal(raw_call(peer, "swarmlearn.sl.SwarmPeer", "Fetch", body), f"peer Fetch with {body!r}")

        fuzz()
        ml = SLChannel(node.ml_addr, ready_timeout=5)
        try:
            with pytest.raises(SwarmError, match="no-such-contract"):
                ml.join("no-such-contract", 2, 1.0, "mean")
        finally:
            ml.close()
    finally:
        peer.close()
    assert node.sl.popen.poll() is None, node.sl.output
    # Still serving: the ML channel joins, and a fetch of a blob of no round the caller took part in is
    # a clean PERMISSION_DENIED (whether the blob exists is not the caller's to learn).
    ml = SLChannel(node.ml_addr, ready_timeout=5)
    try:
        assert ml.join("default", 1, 1.0, "mean").node_id == "node1"
    finally:
        ml.close()
    exc = raw_call(grpc.secure_channel(_sl_peer_address(sn, ident), ident.channel_credentials()),
                   "swarmlearn.sl.SwarmPeer", "Fetch", sl_pb2.FetchRequest(hash="0" * 64).SerializeToString())
    assert exc is not None and exc.code() == grpc.StatusCode.PERMISSION_DENIED


# ------------------------------------------------------------------- bad contributions in a swarm

HONEST = ["node1", "node2"]
BAD_ROUNDS = {  # round -> (what the bad node sends, what the leader's log must say)
    2: ("nan", "holds NaN or Inf"),
    3: ("inf", "holds NaN or Inf"),
    4: ("shape", "has shape [4, 4], others have [4, 3]"),
    5: ("missing", "tensor b is missing"),
    6: ("huge", "is more than 10x the median"),
}


def _bad_node_name() -> str:
    """A node id that never leads rounds 2..6 with the honest nodes: the leader's own contribution is
    the reference the others are checked against, so the bad node must not be the one checking."""
    from swarmlearn.defaults import DEFAULT_CONTRACT

    candidates = ["mallory", "attacker", "alice", "bob", *(f"node{i}" for i in range(10))]  # conftest's certificates
    return next(name for name in candidates if name not in HONEST
                and all(leader_order(DEFAULT_CONTRACT, 0, k, [*HONEST, name])[0] != name for k in BAD_ROUNDS))


def _stand_in_ml(address: str, node: str, results: dict, errors: list) -> None:
    """A torch-free ML process in a thread: joins, then syncs small tensors every round; the bad
    node sends the broken tensors of BAD_ROUNDS in those rounds and good ones otherwise."""
    from swarmlearn.callback.core import SLChannel
    from swarmlearn.tensors import decode, encode, tensor

    rng = np.random.default_rng(sum(map(ord, node)))
    try:
        ml = SLChannel(address, ready_timeout=10)
        ml.join("default", 2, 1.0, "mean")
        model = {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
        header, merged = ml.sync(encode({k: tensor(v) for k, v in model.items()}), 1.0, catch_up=True)
        results[(node, header.round)] = header
        for _ in range(len(BAD_ROUNDS) + 1):
            model = {k: t.array + 0.01 * rng.standard_normal(t.array.shape).astype(np.float32)  # a training step
                     for k, t in decode(merged).items()}
            final = header.round + 1 > max(BAD_ROUNDS)
            case = BAD_ROUNDS.get(header.round + 1, (None,))[0] if node not in HONEST else None
            if case == "nan":
                model["w"][0, 0] = np.nan
            elif case == "inf":
                model["b"][1] = -np.inf
            elif case == "shape":
                model["w"] = np.ones((4, 4), np.float32)
            elif case == "missing":
                del model["b"]
            elif case == "huge":
                model = {k: v * 1e6 for k, v in model.items()}
            header, merged = ml.sync(encode({k: tensor(v) for k, v in model.items()}), 1.0, final=final)
            results[(node, header.round)] = header
            if header.swarm_finished:
                break
        ml.close()
    except Exception as exc:  # reported by the test, with the swarm's logs
        errors.append(f"{node}: {exc!r}")


@pytest.mark.slow
def test_bad_contributions_are_refused_naming_the_node_and_each_round_completes_with_the_rest(procs, certs,
                                                                                             tmp_path):
    from conftest import start_sn
    from swarm_harness import start_sl
    from swarmlearn.sn.client import SNClient
    from swarmlearn.defaults import DEFAULT_CONTRACT

    from conftest import identity

    bad = _bad_node_name()
    sn = start_sn(procs, certs, tmp_path / "sn")
    nodes = {n: start_sl(procs, certs, sn, n, tmp_path, "--checkin-wait", "5") for n in [*HONEST, bad]}
    results, errors = {}, []
    threads = [threading.Thread(target=_stand_in_ml, args=(node.ml_addr, name, results, errors), daemon=True)
               for name, node in nodes.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    logs = "\n".join(f"--- {n}\n{node.sl.output}" for n, node in nodes.items())
    assert not errors and not any(t.is_alive() for t in threads), f"{errors}\n{logs}"

    with SNClient(sn.address, identity(certs, "swci")) as c:
        rounds = c.query("contracts")["contracts"][DEFAULT_CONTRACT]["rounds"]
    for k, (case, reason) in BAD_ROUNDS.items():
        r = rounds[str(k)]
        assert r["status"] == "merged" and sorted(r["participants"]) == HONEST, (case, r)
        leader_log = nodes[r["leader"]].sl.output
        assert any(f"round {k}: dropped {bad} from the merge:" in line and reason in line
                   for line in leader_log.splitlines()), f"round {k} ({case}):\n{leader_log}"
        assert results[(HONEST[0], k)].hash == results[(HONEST[1], k)].hash == r["merged_hash"]
        assert not results[(bad, k)].contributed  # the bad node was told: it gets the model, not a say in it
    assert sorted(rounds["1"]["participants"]) == sorted([*HONEST, bad])  # its good rounds were merged as any other
