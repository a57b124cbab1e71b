"""Three hosts, each an emulated machine (its own network namespace on one bridge, tests/netns.py), run
what a user runs on three machines: an SN with its own etcd member (the SN starts it), a SWOP with one
training node, all reaching the three SNs; an SWCI on host 1 assigns each training run. They train to
the end with one model (the tests' tiny torch model, and once the flagship, examples/huggingface-peft,
on one shard of `swarm example-data` per host), survive the loss of any SN (the sentinel too), a host
cut off for 20 s, and refuse entries without quorum; an SN with a ledger certificate of another CA
cannot join.

One cluster for the module (started once, stopped by pid, its namespaces removed at the end). Tests
run in file order; each one that kills something restarts it, and minority loss, which leaves host
3's SN down, comes last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from safetensors.numpy import load_file

from conftest import SWARM, Proc, Procs, run_swarm
from netns import Host, Hosts, emulated_hosts
from swarmlearn.defaults import DEFAULT_CONTRACT
from swarmlearn.ledger.etcd_member import SETUP_HINT
from swarmlearn.pki import CertLayout

pytestmark = pytest.mark.slow

SN_API_PORT = 30304
SN_P2P_PORT = 30303
ETCD_CLIENT_PORT = 2379
PREFIX = "/swarmlearn"
TASKRUNNER = "defaulttaskbb.taskdb.sml.hpe"
ML_SCRIPT = Path(__file__).parent / "ml" / "multihost_model.py"
# The flagship's model.py as users get it; it trains on the default contract (it names none).
FLAGSHIP = Path(__file__).resolve().parent.parent / "examples" / "huggingface-peft" / "model" / "model.py"
FINISHED = "All peers and Swarm training rounds finished. Final Swarm model was loaded."
PARTITION_SECONDS = 20.0
# The ledger is read this long before the heal: the read takes a second or two (a Python in host 1).
LEDGER_READ_AHEAD = 4.0
# How long the majority trains on after the heal (counted from about when the cut starts): node3 needs
# some seconds (5 on an idle machine) to reach an SN and join again, then takes part in rounds with them.
TRAINING_AFTER_HEAL = 14.0
RESUMED = re.compile(r"round (\d+): node3 resumes from the latest merged model ([0-9a-f]+)")

PROFILE = """\
groupname  : multihost
taskrunner : {taskrunner}
apisrv : [{apisrv}]
nodes :
    - slnodedef :
        idx : {n}
        identity :
            - attribute : {{aType: KEY, mType: BIND, src: "{certdir}", tgt: "/c/k.pem", subPath: "sl-node{n}-key.pem"}}
            - attribute : {{aType: CERT, mType: BIND, src: "{certdir}", tgt: "/c/c.pem", subPath: "sl-node{n}-cert.pem"}}
            - attribute : {{aType: CAPATH, mType: BIND, src: "{capath}", tgt: "/c/capath", subPath: null}}
        slhostname : sl{n}
        slhostip   : {ip}
        slport : 0
        usrhostname : node{n}
        privatedata : {{src: "{usr}/data/node{n}", mType: BIND}}
        usrenvvars : [TRAIN_FILE : "N{n}.csv"]
"""

TASK = """\
Name: {name}
TaskType: RUN_SWARM
Author: multihost
Prereq: ROOTTASK
Outcome: multihost
Body:
    Command: {command}
    Entrypoint: python3
    WorkingDir: /platform/swarm/usr
    Envvars: [{envvars}]
    PrivateContent: /platform/swarm/usr/data
    SharedContent:
    -   Src: {usr}
        Tgt: /platform/swarm/usr
        MType: BIND
"""

SCRIPT = """\
EXIT ON FAILURE
CREATE CONTRACT {contract}
CREATE TASK FROM taskdefs/{name}.yaml
FINALIZE TASK {name}
RESET TASKRUNNER {taskrunner}
ASSIGN TASK {name} TO {taskrunner} WITH 3 PEERS
WAIT FOR TASKRUNNER {taskrunner}
EXIT
"""

# The flagship trains on the default contract, which genesis made: there is none to create.
FLAGSHIP_SCRIPT = SCRIPT.replace("CREATE CONTRACT {contract}\n", "")
# The README's walk-through in miniature: 3 steps of 16 rows per node, a merge every 2 steps (3 merged
# rounds: the initial weights, step 2, the last step); the model and data come from packages, offline.
FLAGSHIP_ENV = {"MAX_EPOCHS": 1, "SYNC_FREQUENCY": 2, "MIN_PEERS": 3, "BATCH_SIZE": 16, "MAX_LENGTH": 64,
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": 1, "TRANSFORMERS_OFFLINE": 1}
FLAGSHIP_DATA = ["--nodes", "3", "--train-per-node", "48", "--test-size", "32"]

# Run inside a host: the ledger's entries as that host's member serves them, one JSON line each.
READ_LEDGER = """
import json, sys
from pathlib import Path
from swarmlearn.ledger.etcd_store import EtcdStore, TLSFiles
store = EtcdStore([sys.argv[1]], sys.argv[2], TLSFiles(*map(Path, sys.argv[3:6])))
try:
    for entry in store.read():
        print(json.dumps({"index": entry.index, "hash": entry.hash, "kind": str(entry.tx.kind),
                          "payload": entry.tx.payload}))
finally:
    store.close()
"""


@dataclass
class Machine:
    """One emulated host and what runs on it."""

    host: Host
    swarm_certs: CertLayout  # its swarm identities, from host 1's swarm CA
    ledger_certs: CertLayout  # its SN's etcd identity, from host 1's ledger CA
    data_dir: Path
    workspace: Path
    sn: Proc | None = None
    swop: Proc | None = None

    @property
    def n(self) -> int:
        return self.host.index

    @property
    def member(self) -> str:
        return f"{self.host.ip}:{ETCD_CLIENT_PORT}"

    def sl_log(self, task: str) -> Path:
        return self.workspace / task / f"node{self.n}" / "sl.log"


@dataclass
class Cluster:
    hosts: Hosts
    machines: list[Machine]
    ledger_ca: Path
    usr: Path
    base: Path
    procs: Procs
    runs: int = 0
    sn_commands: dict[int, list[str]] = field(default_factory=dict)

    def sn_list(self, first: int) -> str:
        """Every SN, host `first`'s own first: what each SL, SWOP and SWCI of that host is given."""
        order = self.machines[first:] + self.machines[:first]
        return ",".join(f"{m.host.ip}:{SN_API_PORT}" for m in order)

    def etcd_identity(self, machine: Machine) -> list[str]:
        return ["--etcd-cert", str(machine.ledger_certs.cert("sn")), "--etcd-key", str(machine.ledger_certs.key("sn")),
                "--etcd-cacert", str(self.ledger_ca)]

    def start_sn(self, index: int) -> Proc:
        """Host `index`'s SN (0: the sentinel), on its data dir: started, or restarted the same way."""
        machine = self.machines[index]
        machine.sn = self.procs.start(machine.host.command([*SWARM, *self.sn_commands[index]]))
        machine.sn.wait_for_line("SN ready on", timeout=60)
        return machine.sn

    def in_host(self, index: int, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.machines[index].host.command(args), capture_output=True, text=True,
                              timeout=timeout)

    def verify(self, index: int) -> tuple[int, str]:
        """`swarm ledger verify` inside host `index`, against its own etcd member only: (entries, head hash)."""
        machine = self.machines[index]
        result = self.in_host(index, [*SWARM, "ledger", "verify", "--etcd-endpoints", f"https://{machine.member}",
                                      "--etcd-prefix", PREFIX, *self.etcd_identity(machine)])
        assert result.returncode == 0 and result.stdout.startswith("OK "), \
            f"ledger verify against host {machine.n}'s etcd member failed: {result.stdout}{result.stderr}"
        _, count, _, head = result.stdout.split()[:4]  # OK <n> entries <head hash>
        return int(count), head

    def verify_everywhere(self, hosts: tuple[int, ...] = (0, 1, 2)) -> None:
        """Every given host's member verifies, and each one's head is on one chain: the ledger moves on
        while we ask (nodes leave, SWOPs report), so each head must be the entry at its index of the
        chain the last member serves."""
        with ThreadPoolExecutor(len(hosts)) as pool:  # each a process in its host: side by side
            heads = dict(zip(hosts, pool.map(self.verify, hosts)))
        chain = self.entries(hosts[-1])
        for index, (count, head) in heads.items():
            assert count <= len(chain) and chain[count - 1]["hash"] == head, \
                f"host {index + 1}'s etcd member verifies head {head[:12]} at entry {count - 1}, not on the chain " \
                f"host {hosts[-1] + 1}'s member serves"

    def entries(self, index: int) -> list[dict]:
        machine = self.machines[index]
        result = self.in_host(index, [sys.executable, "-c", READ_LEDGER, machine.member, PREFIX, str(self.ledger_ca),
                                      str(machine.ledger_certs.cert("sn")), str(machine.ledger_certs.key("sn"))])
        assert result.returncode == 0, f"reading the ledger on host {machine.n}: {result.stderr}"
        return [json.loads(line) for line in result.stdout.splitlines()]

    def swci(self, script: str, sn_list: str | None = None, env: dict[str, str] | None = None) -> Proc:
        """SWCI on host 1 running `script` (written to the usr dir's swci/), in the background."""
        self.runs += 1
        name = f"script{self.runs}"
        (self.usr / "swci" / name).write_text(script)
        certs = self.machines[0].swarm_certs
        return self.procs.start(self.machines[0].host.command([
            *SWARM, "swci", "--usr-dir", str(self.usr / "swci"), "--init-script-name", name,
            "--key", str(certs.key("swci")), "--cert", str(certs.cert("swci")), "--capath", str(certs.capath),
            "--sn-ip", sn_list or self.sn_list(0)]), env=env or {})


def gen_cert(out: Path, index: int, org: str, ip: str, issuer: CertLayout | None) -> CertLayout:
    """`swarm gen-cert` for host `index`, its certificates valid for its own address."""
    ca = ["--ca-cert", str(issuer.ca_cert), "--ca-key", str(issuer.ca_key)] if issuer else []
    result = run_swarm("gen-cert", "--out", str(out), "-i", str(index), "--org", org, "--nodes", f"node{index}",
                       "--san", ip, *ca)
    assert result.returncode == 0, f"gen-cert for host {index} ({org}): {result.stdout}{result.stderr}"
    return CertLayout(out, index)


def sn_command(machine: Machine, sentinel: Machine, ledger_ca: Path, etcd_identity: list[str]) -> list[str]:
    join = ["--sentinel"] if machine is sentinel else \
        ["--sentinel-ip", sentinel.host.ip, "--sentinel-api-port", str(SN_API_PORT)]
    certs = machine.swarm_certs
    return ["sn", *join, "--ledger", "etcd", "--host-ip", machine.host.ip, "--sn-api-port", str(SN_API_PORT),
            "--sn-p2p-port", str(SN_P2P_PORT), "--etcd-client-port", str(ETCD_CLIENT_PORT), *etcd_identity,
            "--key", str(certs.key("sn")), "--cert", str(certs.cert("sn")), "--capath", str(certs.capath),
            "--data-dir", str(machine.data_dir)]


def make_machines(hosts: Hosts, base: Path) -> tuple[list[Machine], Path]:
    """Certificates of the three hosts: a swarm CA and a ledger CA, both host 1's, issuing hosts 2 and 3."""
    machines: list[Machine] = []
    for host in hosts:
        first = machines[0] if machines else None
        swarm = gen_cert(base / f"swarm-cert{host.index}", host.index, "multihost", host.ip,
                         first.swarm_certs if first else None)
        ledger = gen_cert(base / f"ledger-cert{host.index}", host.index, "multihost-ledger", host.ip,
                          first.ledger_certs if first else None)
        machines.append(Machine(host, swarm, ledger, base / f"sn{host.index}", base / f"ws{host.index}"))
    return machines, machines[0].ledger_certs.ca_cert


def make_usr(cluster: Cluster) -> None:
    """The project every SWOP runs from: the model, each node's data folder, one profile per host."""
    usr = cluster.usr
    (usr / "model").mkdir(parents=True)
    shutil.copy(ML_SCRIPT, usr / "model" / "model.py")
    (usr / "flagship").mkdir()
    shutil.copy(FLAGSHIP, usr / "flagship" / "model.py")
    (usr / "swop").mkdir()
    (usr / "swci" / "taskdefs").mkdir(parents=True)
    for index, machine in enumerate(cluster.machines):
        (usr / "data" / f"node{machine.n}").mkdir(parents=True)
        sns = [sn.split(":")[0] for sn in cluster.sn_list(index).split(",")]
        apisrv = ", ".join(f"{{ip: {ip}, port: {SN_API_PORT}}}" for ip in sns)
        (usr / "swop" / f"host{machine.n}.yaml").write_text(PROFILE.format(
            taskrunner=TASKRUNNER, apisrv=apisrv, n=machine.n, certdir=machine.swarm_certs.root,
            capath=machine.swarm_certs.capath, ip=machine.host.ip, usr=usr))


def launch_swop(cluster: Cluster, index: int) -> Proc:
    """Host `index`'s SWOP, started; wait for its ready line before assigning it a task."""
    machine = cluster.machines[index]
    certs = machine.swarm_certs
    cluster.procs.workspaces.append(machine.workspace)
    machine.swop = cluster.procs.start(machine.host.command([
        *SWARM, "swop", "--sn-ip", cluster.sn_list(index), "--usr-dir", str(cluster.usr),
        "--profile-file-name", f"host{machine.n}.yaml", "--workspace", str(machine.workspace),
        "--key", str(certs.key("swop")), "--cert", str(certs.cert("swop")), "--capath", str(certs.capath),
        "--sl-arg=--checkin-wait", "--sl-arg=1"]))
    return machine.swop


def stop_side_by_side(procs: list[Proc | None]) -> None:
    """SIGTERM to each running one (by pid), then waits for them all: hosts stop side by side rather
    than one after another. What does not stop here is killed by Procs.stop_all after."""
    running = [proc for proc in procs if proc is not None and proc.popen.poll() is None]
    for proc in running:
        os.kill(proc.popen.pid, signal.SIGTERM)
    for proc in running:
        try:
            proc.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which("etcd") is None:
        pytest.fail(f"etcd is not installed (no `etcd` on PATH): {SETUP_HINT}")
    base = tmp_path_factory.mktemp("multihost")
    with emulated_hosts(3) as hosts:
        procs = Procs()
        machines: list[Machine] = []
        try:
            machines, ledger_ca = make_machines(hosts, base)
            made = Cluster(hosts, machines, ledger_ca, base / "usr", base, procs)
            for index, machine in enumerate(machines):
                made.sn_commands[index] = sn_command(machine, machines[0], ledger_ca, made.etcd_identity(machine))
                made.start_sn(index)  # one at a time: each joins as a learner, then is promoted
            make_usr(made)
            for index in range(3):
                launch_swop(made, index)
            for machine in machines:
                machine.swop.wait_for_line(f"SWOP swop-{machine.n} ready", timeout=60)
            yield made
        finally:
            # The SWOPs (their nodes are done) go before the SNs they talk to, as a user would stop them.
            stop_side_by_side([machine.swop for machine in machines])
            stop_side_by_side([machine.sn for machine in machines])
            procs.stop_all()


# -------------------------------------------------------------------------------- a training run


@dataclass
class Training:
    """One RUN_SWARM task on the three hosts, on a contract of its own."""

    cluster: Cluster
    name: str
    swci: Proc
    contract: str = ""  # the contract its nodes train on: the task's name unless set

    @property
    def out(self) -> Path:
        return self.cluster.base / "out" / self.name

    def sl_log(self, index: int) -> str:
        path = self.cluster.machines[index].sl_log(self.name)
        return path.read_text() if path.exists() else ""

    def wait_for_sl_line(self, index: int, needle: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.sl_log(index):
            assert time.monotonic() < deadline, f"host {index + 1}'s SL logged no {needle!r} in {timeout} s:\n" \
                                                f"{self.sl_log(index)}\n--- SWCI\n{self.swci.output}"
            time.sleep(0.2)

    def finish(self, timeout: float = 120) -> None:
        try:
            code = self.swci.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"task {self.name} still running after {timeout} s\n{self.logs()}") from None
        self.swci._thread.join(timeout=5)
        assert code == 0 and f"{self.name} COMPLETE" in self.swci.output, \
            f"task {self.name} did not complete\n{self.logs()}"

    def logs(self) -> str:
        parts = [f"--- SWCI\n{self.swci.output}"]
        for index, machine in enumerate(self.cluster.machines):
            parts.append(f"--- host {machine.n} SL\n{self.sl_log(index)}")
            ml = machine.sl_log(self.name).with_name("ml.log")
            parts.append(f"--- host {machine.n} ML\n{ml.read_text() if ml.exists() else ''}")
        return "\n".join(parts)

    def assert_one_final_model(self) -> None:
        """Every node ends with the same weights, and says it loaded the final swarm model."""
        finals = {n: load_file(self.out / f"node{n}" / "final.safetensors") for n in (1, 2, 3)}
        for name, tensor in finals[1].items():
            for n in (2, 3):
                assert finals[n][name].tobytes() == tensor.tobytes(), \
                    f"node{n} ended with another {name} than node1: the hosts did not end with the same model"
        for machine in self.cluster.machines:
            ml_log = machine.sl_log(self.name).with_name("ml.log").read_text()
            assert FINISHED in ml_log, f"node{machine.n} did not load the final swarm model:\n{ml_log}"

    def entries(self, index: int = 0) -> list[dict]:
        """This run's ledger entries (of its contract) as host `index`'s etcd member serves them."""
        contract = self.contract or self.name
        return [e for e in self.cluster.entries(index) if e["payload"].get("contract") == contract]

    def rounds(self, index: int = 0) -> LedgerRounds:
        """This run's rounds as host `index`'s etcd member serves them."""
        return LedgerRounds.of(self.entries(index))

    def assert_no_round_lost_or_doubled(self, index: int = 0) -> LedgerRounds:
        """One merged entry per round, rounds contiguous, none aborted."""
        rounds = self.rounds(index)
        merged = rounds.merged
        assert merged, f"no merged round of contract {self.name} on the ledger"
        assert sorted(merged) == list(range(min(merged), min(merged) + len(merged))), \
            f"merged rounds on the ledger are not one per round, contiguous (a round lost or doubled): {merged}"
        assert not rounds.aborted, f"rounds aborted (lost) on the ledger: {rounds.aborted}"
        return rounds


@dataclass
class LedgerRounds:
    """One run's rounds as its ledger entries tell them."""

    merged: list[int] = field(default_factory=list)  # the round of each merged entry, in ledger order
    aborted: list[int] = field(default_factory=list)  # the round of each round_abort entry
    participants: dict[int, set[str]] = field(default_factory=dict)  # of each closed round
    merged_with: dict[int, set[str]] = field(default_factory=dict)  # the nodes whose models a merge took
    hashes: dict[int, str] = field(default_factory=dict)  # each merged round's model

    @classmethod
    def of(cls, entries: list[dict]) -> LedgerRounds:
        """A round closes with a close_round entry naming its participants, or on the check-in that
        completes it (every active member in; no close_round entry then): its participants are then
        every node that checked in. A merged entry names the participants its leader dropped."""
        rounds = cls()
        checked_in: dict[int, set[str]] = {}
        for entry in entries:
            payload, kind = entry["payload"], entry["kind"]
            if kind == "checkin":
                checked_in.setdefault(payload["round"], set()).add(payload["node"])
            elif kind == "close_round":
                rounds.participants[payload["round"]] = set(payload["participants"])
            elif kind == "merged":
                number = payload["round"]
                participants = rounds.participants.setdefault(number, checked_in.get(number, set()))
                rounds.merged.append(number)
                rounds.merged_with[number] = participants - set(payload.get("dropped", []))
                rounds.hashes[number] = payload["hash"]
            elif kind == "round_abort":
                rounds.aborted.append(payload["round"])
        return rounds


def train(cluster: Cluster, name: str, *, steps: int = 8, step_sleep: float = 0.0, min_peers: int = 3,
          sync_frequency: int = 2, train_seconds: float = 0.0) -> Training:
    """Assigns a RUN_SWARM task `name` (on contract `name`) to the three hosts; returns while it runs.
    With `train_seconds`, each node also stops training that long after it began (ml/multihost_model.py)."""
    envvars = {"CONTRACT": name, "OUT_DIR": str(cluster.base / "out" / name), "STEPS": steps,
               "STEP_SLEEP": step_sleep, "MIN_PEERS": min_peers, "SYNC_FREQUENCY": sync_frequency,
               "TRAIN_SECONDS": train_seconds}
    return assign(cluster, name, "model/model.py", envvars, SCRIPT.format(contract=name, name=name,
                                                                         taskrunner=TASKRUNNER))


def assign(cluster: Cluster, name: str, command: str, envvars: dict, script: str, contract: str = "") -> Training:
    """Writes task `name` (running `command` with `envvars`) and has the SWCI run `script` on it."""
    (cluster.usr / "swci" / "taskdefs" / f"{name}.yaml").write_text(TASK.format(
        name=name, usr=cluster.usr, command=command, envvars=", ".join(f'"{k}": "{v}"' for k, v in envvars.items())))
    return Training(cluster, name, cluster.swci(script), contract)


def etcd_member_of(sn: Proc) -> psutil.Process | None:
    """The etcd member an SN started (its child), if running."""
    try:
        children = psutil.Process(sn.popen.pid).children()
    except psutil.NoSuchProcess:
        return None
    return next((child for child in children if "etcd" in child.name()), None)


def kill_sn_and_member(machine: Machine) -> None:
    """SIGKILL, by pid, the host's SN and its etcd member (should the member outlive its SN)."""
    member = etcd_member_of(machine.sn)
    machine.sn.kill(signal.SIGKILL)
    if member is not None:
        try:
            member.send_signal(signal.SIGKILL)
            member.wait(timeout=10)
        except psutil.NoSuchProcess:
            pass


# -------------------------------------------------------------------------------- the stories


def test_three_hosts_train_to_the_end_with_one_model_that_every_member_verifies(cluster):
    run = train(cluster, "everyone")
    run.finish()
    run.assert_one_final_model()
    rounds = run.assert_no_round_lost_or_doubled()
    short = {number: sorted(nodes) for number, nodes in rounds.participants.items()
             if nodes != {"node1", "node2", "node3"}}
    assert not short, f"rounds closed without all three hosts: {short}"
    cluster.verify_everywhere()


def give_each_host_its_shard(cluster: Cluster) -> None:
    """`swarm example-data` for three nodes; each host's private data folder keeps only its own shard
    N<i>.csv (its profile's TRAIN_FILE) and the test rows, as on three real machines."""
    made = cluster.base / "example-data"
    result = run_swarm("example-data", "--out", str(made), *FLAGSHIP_DATA)
    assert result.returncode == 0, f"swarm example-data failed: {result.stdout}{result.stderr}"
    for machine in cluster.machines:
        for name in (f"N{machine.n}.csv", "test_data.csv"):
            shutil.copy(made / name, cluster.usr / "data" / f"node{machine.n}" / name)


def final_adapters(run: Training) -> dict[int, dict]:
    """Each node's saved final adapters and head: MODEL_DIR (its SWOP's workspace/<task>/models by
    default) /node<i>/final, as model.py's save_pretrained wrote them."""
    return {m.n: load_file(m.workspace / run.name / "models" / f"node{m.n}" / "final" / "adapter_model.safetensors")
            for m in run.cluster.machines}


def test_the_flagship_trains_across_three_hosts_and_ends_with_one_adapter_and_head(cluster):
    give_each_host_its_shard(cluster)
    name = "flagship"
    run = assign(cluster, name, "flagship/model.py", FLAGSHIP_ENV,
                 FLAGSHIP_SCRIPT.format(name=name, taskrunner=TASKRUNNER), contract=DEFAULT_CONTRACT)
    run.finish(timeout=180)
    finals = final_adapters(run)
    names = sorted(finals[1])
    assert any("lora_B" in n for n in names) and any("classifier" in n for n in names), \
        f"node1's final adapter file holds no LoRA or no classifier head tensors: {names}"
    for n in (2, 3):
        assert sorted(finals[n]) == names, f"node{n} saved other tensors than node1: {sorted(finals[n])}"
        differ = [t for t in names if finals[n][t].tobytes() != finals[1][t].tobytes()]
        assert not differ, f"node{n} ended with other adapters/head than node1 ({differ[:3]}...):\n{run.logs()}"
    for machine in cluster.machines:
        ml_log = machine.sl_log(name).with_name("ml.log").read_text()
        assert FINISHED in ml_log, f"node{machine.n} did not load the final swarm model:\n{ml_log}"
    rounds = run.assert_no_round_lost_or_doubled()
    assert len(rounds.merged) >= 2, f"the flagship merged only rounds {rounds.merged}: no merge during training"
    last = max(rounds.merged)
    validations = {e["payload"]["node"]: e["payload"] for e in run.entries()
                   if e["kind"] == "metrics" and e["payload"].get("kind") == "validation"
                   and e["payload"]["round"] == last}
    assert set(validations) == {"node1", "node2", "node3"}, \
        f"validation entries of the final merged round {last} on the ledger are from {sorted(validations)}, " \
        f"not from all three nodes:\n{run.logs()}"
    for node, report in validations.items():
        assert report["metric_name"] == "accuracy" and 0.0 <= report["metric"] <= 1.0, \
            f"{node}'s validation of round {last} is not an accuracy: {report}"


@pytest.mark.parametrize("victim", [2, 0], ids=["host3-sn", "sentinel"])
def test_killing_a_hosts_sn_mid_training_loses_no_round_and_its_node_fails_over(cluster, victim):
    run = train(cluster, f"kill-sn{victim + 1}", steps=12, step_sleep=0.2)
    machine = cluster.machines[victim]
    run.wait_for_sl_line(victim, f"round 2: node{machine.n} checked in")
    kill_sn_and_member(machine)
    try:
        run.finish()
        run.assert_one_final_model()
        switches = [line for line in run.sl_log(victim).splitlines() if "switching to SN" in line]
        assert len(switches) == 1, f"node{machine.n}'s SL should switch to another SN once when its own is " \
                                   f"killed, switched {len(switches)} times:\n" + "\n".join(switches)
        survivor = (victim + 1) % 3
        run.assert_no_round_lost_or_doubled(survivor)
    finally:
        cluster.start_sn(victim)  # the next test finds the cluster whole
    cluster.verify_everywhere()  # the restarted member serves the chain the others appended to


@dataclass
class Cut:
    """Host 3 cut off for PARTITION_SECONDS: its SL's lines meanwhile, and this run's ledger as host 1's
    member served it shortly before the heal, when node3 cannot have come back yet."""

    lines: list[str]
    heal_line: int  # the first line the SL logged after the heal
    rounds: LedgerRounds
    evicted: bool  # node3 was taken out of the session


def cut_off_host3(run: Training) -> Cut:
    """Sets host 3's veth down for PARTITION_SECONDS, then up again; its processes run on meanwhile."""
    host3 = run.cluster.hosts[2]
    before = len(run.sl_log(2).splitlines())
    host3.partition()
    heal_at = time.monotonic() + PARTITION_SECONDS
    try:
        time.sleep(PARTITION_SECONDS - LEDGER_READ_AHEAD)
        entries = run.entries(0)
    finally:
        time.sleep(max(0.0, heal_at - time.monotonic()))
        host3.heal()
    lines = run.sl_log(2).splitlines()
    evicted = any(e["kind"] == "session_evict" and e["payload"]["node"] == "node3" for e in entries)
    return Cut(lines[before:], len(lines), LedgerRounds.of(entries), evicted)


def node3_back(run: Training, cut: Cut) -> tuple[int, str]:
    """The merged round node3 resumed from after the heal, and the hash prefix it logged. Cut off for
    many rounds, it was evicted (absent from 2 rounds and silent) and must say it joined again first."""
    assert cut.evicted, f"node3, cut off for {PARTITION_SECONDS:g} s, was not evicted from the session, so it " \
                        f"cannot have joined again:\n{run.logs()}"
    after = run.sl_log(2).splitlines()[cut.heal_line:]
    rejoined = [i for i, line in enumerate(after)
                if f"node3 was evicted from contract {run.name} at round" in line and "it joined again" in line]
    assert rejoined, "node3, evicted while cut off, logged no line saying it joined again after the heal:\n" + \
                     "\n".join(after)
    taken = next(filter(None, map(RESUMED.search, after[rejoined[0]:])), None)
    assert taken, "node3 joined again but did not resume from the latest merged model:\n" + "\n".join(after)
    return int(taken.group(1)), taken.group(2)


def test_a_partitioned_host_waits_and_catches_up_from_the_latest_merged_model(cluster):
    # Training ends by the clock after the heal: the majority still trains when node3 is back, and
    # node3, which then trains for what is left of that time, keeps no one waiting for the steps it missed.
    run = train(cluster, "partition", steps=1000, step_sleep=0.3, min_peers=2, sync_frequency=3,
                train_seconds=PARTITION_SECONDS + TRAINING_AFTER_HEAL)
    run.wait_for_sl_line(2, "round 2: node3 checked in")
    cut = cut_off_host3(run)
    waiting = [line for line in cut.lines if "no SN answers" in line or "waiting" in line]
    assert waiting, f"node3, cut off for {PARTITION_SECONDS:g} s, logged no line saying it waits:\n" + \
                    "\n".join(cut.lines)
    without_node3 = [number for number, nodes in cut.rounds.merged_with.items() if "node3" not in nodes]
    assert without_node3, f"no round merged without node3 while it was cut off: the two-host majority did not " \
                          f"go on:\n{run.logs()}"
    run.finish()
    resumed, resumed_hash = node3_back(run, cut)
    latest = max(cut.rounds.merged)
    assert resumed >= latest, f"node3 resumed from round {resumed}, older than round {latest}, merged while it " \
                              f"was cut off: not the latest merged model"
    rounds = run.rounds()
    assert rounds.hashes.get(resumed, "").startswith(resumed_hash), \
        f"node3 resumed from {resumed_hash}, not round {resumed}'s merged model {rounds.hashes.get(resumed)}"
    rejoined_rounds = [number for number, nodes in rounds.merged_with.items() if number > resumed and "node3" in nodes]
    assert rejoined_rounds, f"node3 took part in no merged round after the heal:\n{run.logs()}"
    run.assert_one_final_model()
    cluster.verify_everywhere()


def test_an_sn_whose_ledger_certificate_comes_from_another_ca_cannot_join(cluster):
    host3 = cluster.machines[2]
    stranger = gen_cert(cluster.base / "foreign-ledger", 4, "foreign-ledger", host3.host.ip, None)
    swarm_id = gen_cert(cluster.base / "swarm-cert4", 4, "multihost", host3.host.ip, cluster.machines[0].swarm_certs)
    data_dir = cluster.base / "sn-stranger"
    command = ["sn", "--sentinel-ip", cluster.machines[0].host.ip, "--sentinel-api-port", str(SN_API_PORT),
               "--ledger", "etcd", "--host-ip", host3.host.ip, "--sn-api-port", str(SN_API_PORT + 10),
               "--sn-p2p-port", str(SN_P2P_PORT + 10), "--etcd-client-port", str(ETCD_CLIENT_PORT + 10),
               "--etcd-cert", str(stranger.cert("sn")), "--etcd-key", str(stranger.key("sn")),
               "--etcd-cacert", str(stranger.ca_cert), "--key", str(swarm_id.key("sn")),
               "--cert", str(swarm_id.cert("sn")), "--capath", str(swarm_id.capath), "--data-dir", str(data_dir)]
    result = cluster.in_host(2, [*SWARM, *command], timeout=90)
    assert result.returncode != 0, f"an SN with a foreign ledger certificate joined:\n{result.stdout}{result.stderr}"
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    assert last.startswith("error: "), f"the refused SN did not end with one clear error line:\n{result.stderr}"
    assert not (data_dir / "swarm.json").exists(), "the refused SN wrote the ledger's head: it read the cluster"
    members = cluster.in_host(0, ["etcdctl", "--endpoints", f"https://{cluster.machines[0].member}",
                                  "--cacert", str(cluster.ledger_ca),
                                  "--cert", str(cluster.machines[0].ledger_certs.cert("sn")),
                                  "--key", str(cluster.machines[0].ledger_certs.key("sn")), "member", "list"],
                              timeout=30)
    assert members.returncode == 0, members.stderr
    assert len(members.stdout.strip().splitlines()) == 3, \
        f"the refused SN left a member added to the cluster:\n{members.stdout}"


def test_with_two_of_three_members_gone_no_entry_is_taken_and_service_resumes_when_one_returns(cluster):
    for index in (1, 2):
        kill_sn_and_member(cluster.machines[index])
    only_sn1 = f"{cluster.machines[0].host.ip}:{SN_API_PORT}"
    # SN 1 answers "no quorum" once its member has tried the cluster for etcd_store.QUORUM_TIMEOUT (5 s);
    # a patience below that has the SWCI take that first answer rather than ask again.
    refused = cluster.swci("EXIT ON FAILURE\nCREATE CONTRACT without-quorum\nEXIT\n", only_sn1,
                           env={"SWARM_SN_PATIENCE": "4"})
    code = refused.popen.wait(timeout=90)
    assert code != 0, f"an entry was taken with one etcd member of three:\n{refused.output}"
    assert "no quorum" in refused.output, f"the refusal does not say 'no quorum':\n{refused.output}"
    cluster.start_sn(1)  # a second member returns: quorum again
    resumed = cluster.swci("EXIT ON FAILURE\nCREATE CONTRACT with-quorum\nLIST CONTRACTS\nEXIT\n", only_sn1)
    assert resumed.popen.wait(timeout=90) == 0 and "with-quorum" in resumed.output, \
        f"with two members of three back, SN 1 still takes no entry:\n{resumed.output}"
    cluster.verify_everywhere((0, 1))
    names = [e["payload"].get("name") for e in cluster.entries(0) if e["kind"] == "contract_create"]
    assert "without-quorum" not in names, "the contract refused without quorum is on the ledger"
