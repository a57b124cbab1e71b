"""SWOP: the per-host operator. Joins its task runner on the ledger, waits for tasks assigned to
it, claims as many peers as its profile has nodes, and runs the task: for RUN_SWARM one SL and one
ML process per node, reporting each peer RUNNING, then COMPLETE or FAILED with its exit code and
last log lines. One task at a time. A task its profile does not allow (swop/policy.py: signers,
entrypoints, paths, builds) is refused before anything starts: its peers end FAILED with the reason.

A SWOP that dies takes its nodes with it (their swop/launch.py wrappers stop them when its lifeline
pipe closes) and does not re-adopt a task when it starts again: it reports the peers it had started as
FAILED ("swop-1 stopped while its nodes ran"), so the task ends instead of showing RUNNING forever,
and RESET TASKRUNNER + ASSIGN TASK run it
afresh. While it runs it heartbeats to the SN, so that SWCI sees a SWOP that went silent.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from swarmlearn import hostnames, pki
from swarmlearn.background import Background
from swarmlearn.defaults import HEARTBEAT_EVERY, KEPT_MODELS_DIR, TOKEN_ENV
from swarmlearn.errors import ConfigError, Rejected, SwarmError
from swarmlearn.ledger.model import Assignment, AssignmentStatus, PeerState
from swarmlearn.ledger.pin import PIN_FILE
from swarmlearn.ledger.state import LedgerState
from swarmlearn.sn.client import SNClient
from swarmlearn.sn.follower import LedgerFollower
from swarmlearn.swop import envs, paths
from swarmlearn.swop.policy import PYTHON_NAMES, TaskPolicy
from swarmlearn.swop.runtime import Handle, ProcessRuntime, Runtime, Spec, record_self, unrecord

log = logging.getLogger("swarmlearn.swop")

SL_READY_TIMEOUT = 60.0
# After a node's ML ends, its SL keeps serving the final merged model this long, for peers that
# are still pulling it.
LINGER = 5.0
POLL = 0.5


@dataclass
class NodeRun:
    peer: str
    sl: Handle | None = None
    ml: Handle | None = None
    ended_at: float | None = None
    reported: str = PeerState.STARTING


@dataclass
class OperatorConfig:
    identity: pki.Identity
    sn_address: str | list[str]  # one SN, or several ("IP:PORT,IP:PORT" or a list): it moves between them
    usr_dir: Path
    profile_path: Path
    workspace: Path
    keep_nodes: bool = False
    node_id: str | None = None
    sl_key: Path | None = None
    sl_cert: Path | None = None
    extra_sl_args: list[str] = field(default_factory=list)


class Operator:
    def __init__(self, config: OperatorConfig, runtime: Runtime | None = None):
        from swarmlearn.swop.profile import load_profile

        self.config = config
        self.node_id = config.identity.node_name("swop", config.node_id)
        self.profile = load_profile(config.profile_path)
        self.nodes = self.profile.slnodedefs
        if not self.nodes:
            raise ConfigError(f"{config.profile_path}: the profile lists no nodes; add `- slnodedef:` entries")
        self.workspace = Path(config.workspace)
        # What its operator lets it run: checked before any process of a task starts (swop/policy.py).
        self.policy = TaskPolicy.for_swop(self.profile, config.identity.swarm_id, config.usr_dir, self.workspace)
        self.runtime = runtime or ProcessRuntime(self.workspace)
        self.sn = SNClient(self._sns_named_here(config.sn_address), config.identity, self.node_id)
        # The swarm this operator verified is pinned in its workspace; a refused or lost ledger ends the
        # SWOP (failure(); the `swop` command then stops it and exits non-zero with that line).
        # The operator's background threads (ledger follower, heartbeat) have one owner, closed by stop().
        self.background = Background(f"swop-{self.node_id}")
        self.follower = LedgerFollower(self.sn, self.workspace / PIN_FILE, background=self.background)
        self.runner = self.profile.taskrunner
        self.handled: set[tuple[str, int]] = set()
        self.handles: list[Handle] = []
        # Guards `handles` and `stopped`: once stop() took its list, _start() starts nothing more.
        self._handles_lock = threading.Lock()
        self._stopped = False
        self.pid_file: Path | None = None
        self.stopping = threading.Event()
        self.bind_mounts = False  # how ML processes see container paths: set by start() (swop/paths.py)
        # Mount points this SWOP created on the host, and how many of its running nodes hold each: a
        # folder is removed when the last one ends (swop/paths.py).
        self._mount_points_lock = threading.Lock()
        self._mount_points_made: set[Path] = set()
        self._mount_point_users: Counter[Path] = Counter()
        self._mount_points_held: dict[tuple[str, str], list[Path]] = {}

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        for note in self.profile.notes():
            log.info("profile: %s", note)
        log.info("policy: %s", self.policy.describe())
        log.info("paths: %s", self._choose_path_mapping())
        self.sn.wait_ready()
        index = self.sn.register("SWOP", "", capacity=len(self.nodes))
        self.follower.start()
        self.follower.wait_index(index)
        self.runner = self.follower.read(lambda s: s.taskrunner(self.profile.taskrunner).name)
        joined = self.sn.submit("taskrunner_join", {"runner": self.runner, "capacity": len(self.nodes)})
        # Our join is the newest entry: once our copy holds it, it holds every assignment made before
        # (a registration already on the ledger is not made again, so its index may be old).
        self.follower.wait_index(joined)
        self.pid_file = record_self(self.workspace, self.node_id)
        self._fail_orphans()
        self.sn.keep_alive(self.background, HEARTBEAT_EVERY)
        self.background.start("tasks", self.run)

    def run(self) -> None:
        """Serves tasks until stop() is called or the ledger is lost (failure() then says why); start()
        runs it in a thread of the operator's Background, which stop() joins."""
        while not self.stopping.is_set():
            try:
                a = self.follower.wait_until(self._claimable, 1.0)
            except SwarmError:
                return  # the ledger is lost, or the follower stopped with us
            if a is not None:
                self._serve(a)

    def failure(self, timeout: float) -> Exception | None:
        """Waits up to `timeout` seconds for this operator to lose its ledger (its SN stayed away past
        the patience, or sent what the follower refuses); returns that error, or None while all is well."""
        return self.follower.failure(timeout)

    def stop(self) -> None:
        """Stops serving and every node process this operator started."""
        self.stopping.set()
        with self._handles_lock:
            self._stopped = True
            handles = list(self.handles)
        for handle in handles:
            handle.stop(grace=5.0)
        self.follower.stop()
        self.background.close()
        self.sn.close()
        if self.pid_file is not None:
            unrecord(self.pid_file, os.getpid())

    def _fail_orphans(self) -> None:
        """Peers of a running task that a previous run of this SWOP started are gone with it (or
        about to go: their wrappers saw it die and stopped them). We do not re-adopt them; we end them on the
        ledger, so the task is FAILED with the reason instead of RUNNING forever."""
        a = self.follower.read(lambda s: s.taskrunners[self.runner].assignment)
        if a is None or a.status != AssignmentStatus.RUNNING:
            return
        orphans = [p for p, s in sorted(a.peer_status.items())
                   if s.swop == self.node_id and s.status in (PeerState.STARTING, PeerState.RUNNING)]
        if not orphans:
            return
        self.handled.add((a.task, a.generation))
        reason = (f"{self.node_id} stopped while its nodes ran ({', '.join(orphans)}); its restart does not "
                  f"re-adopt them. RESET TASKRUNNER {self.runner} and ASSIGN TASK {a.task} again to run it afresh")
        log.warning("task %s: %s", a.task, reason)
        for peer in orphans:  # the first FAILED ends the task; the ledger refuses the rest, quietly
            self._report(a.generation, peer, PeerState.FAILED, None, reason, quiet=True)

    def _claimable(self, state: LedgerState) -> Assignment | None:
        a = state.taskrunners[self.runner].assignment
        if a is None or a.status != AssignmentStatus.RUNNING or (a.task, a.generation) in self.handled:
            return None
        if a.target and a.target != self.node_id:
            return None  # ASSIGN TASK ... TARGET another SWOP
        return a if len(a.peer_status) < a.peers else None

    # ------------------------------------------------------------------------------ one task

    def _serve(self, a: Assignment) -> None:
        key = (a.task, a.generation)
        wanted = min(a.peers - len(a.peer_status), len(self.nodes))
        nodes = self.nodes[:wanted]
        peers = [n.node_id for n in nodes]
        try:
            self.sn.submit("taskrunner_claim", {"runner": self.runner, "generation": a.generation, "peers": peers})
        except Rejected as exc:
            log.info("could not claim peers of %s: %s", a.task, exc)
            time.sleep(POLL)  # another SWOP claimed first; look again at what is left
            return
        self.handled.add(key)
        task, created_by, assigned_by = self.follower.read(lambda s: (
            s.tasks[a.task], _spiffe_id(s, s.tasks[a.task].created_by), _spiffe_id(s, a.assigned_by)))
        refused = self.policy.refusal(task.type, task.body, created_by, assigned_by)
        if refused is not None:  # nothing has started; the peers it claimed end FAILED with the reason
            reason = f"{self.node_id} refuses task {task.name}: {refused}"
            log.warning("%s", reason)
            for peer in peers:
                self._report(a.generation, peer, PeerState.FAILED, None, reason, quiet=True)
            return
        log.info("task %s (%s): running %d peers: %s", task.name, task.type, len(peers), ", ".join(peers))
        try:
            if task.type == "RUN_SWARM":
                self._run_swarm(task, nodes, a.generation)
            elif task.type == "MAKE_USER_CONTAINER":
                self._build(task, peers, a.generation)
            else:
                for peer in peers:
                    self._report(a.generation, peer, PeerState.COMPLETE, 0,
                                 f"{task.type} needs nothing on a host without containers; accepted as a no-op")
        except SwarmError as exc:
            log.error("task %s failed: %s", task.name, exc)
            for peer in peers:
                self._report(a.generation, peer, PeerState.FAILED, None, str(exc), quiet=True)

    def _report(self, generation: int, peer: str, status: str, exit_code: int | None, detail: str = "",
                quiet: bool = False) -> None:
        try:
            self.sn.submit("taskrunner_peer_status", {"runner": self.runner, "generation": generation, "peer": peer,
                                                      "status": status, "exit_code": exit_code,
                                                      "detail": detail[-4000:]})
            log.info("peer %s: %s%s", peer, status, "" if exit_code is None else f" (exit {exit_code})")
        except Rejected as exc:
            if not quiet:
                log.warning("status %s of %s not recorded: %s", status, peer, exc)

    def _assignment_over(self, generation: int) -> str | None:
        a = self.follower.read(lambda s: s.taskrunners[self.runner].assignment)
        if a is None:
            return AssignmentStatus.RESET
        if a.generation != generation:
            return "REPLACED"
        return a.status if a.status in (AssignmentStatus.FAILED, AssignmentStatus.RESET) else None

    # ------------------------------------------------------------------------------ RUN_SWARM

    def _run_swarm(self, task, nodes, generation: int) -> None:
        python = self._task_python(task)
        runs: list[NodeRun] = []
        try:
            # Every SL starts at once, then each ML as soon as its SL is ready: an SL's start-up (imports,
            # its ledger copy) no longer waits for the SLs before it, nor their MLs for it.
            for node in nodes:
                run = NodeRun(node.node_id)
                runs.append(run)
                run.sl = self._start_sl(task.name, node)
            for node, run in zip(nodes, runs):
                # "SL node1 ready: SWARM_SL_ADDR=... [SWARM_SL_TOKEN=...]": what its ML's environment needs,
                # announced over the SL's readiness pipe (swarmlearn.readiness).
                line = run.sl.wait_ready(SL_READY_TIMEOUT)
                if "SWARM_SL_ADDR=" not in line:
                    raise SwarmError(f"SL {node.node_id} announced {line!r}, which names no SWARM_SL_ADDR")
                ready = line.split("SWARM_SL_ADDR=", 1)[1]
                address, _, token = ready.partition(f" {TOKEN_ENV}=")  # a socket path may hold spaces
                sl_env = {"SWARM_SL_ADDR": address, **({TOKEN_ENV: token} if token else {})}
                run.ml = self._start_ml(task.name, node, task.body, sl_env, python)
                self._report(generation, run.peer, PeerState.RUNNING, None)
                run.reported = PeerState.RUNNING
            self._watch(task.name, runs, generation)
        finally:
            self._clean_up(task.name, runs)

    def _task_python(self, task) -> str:
        """The Python a RUN_SWARM task's ML runs with: that of the environment its Prereq built (the
        image the build task's Outcome names), else the SWOP's own."""
        prereq = self.follower.read(lambda s: s.tasks.get(task.prereq))
        if prereq is None or prereq.type != "MAKE_USER_CONTAINER":
            return sys.executable
        env = envs.environment_for(self.workspace, prereq.outcome or prereq.name)
        if not env.ready:
            raise SwarmError(f"task {task.name} runs in {env.image}, which task {prereq.name} builds, but it is not "
                             f"built on {self.node_id}: ASSIGN TASK {prereq.name} to {self.runner} with as many "
                             f"peers as there are SWOPs, wait for it, then assign {task.name}")
        log.info("task %s: its ML runs in environment %s (%s)", task.name, env.image, env.python)
        return str(env.python)

    def _watch(self, task: str, runs: list[NodeRun], generation: int) -> None:
        while True:
            for run in runs:
                if run.ended_at is not None:
                    continue
                code = run.ml.poll()
                if code is None:
                    continue
                run.ended_at = time.monotonic()
                if code == 0:
                    self._report(generation, run.peer, PeerState.COMPLETE, 0)
                else:
                    self._report(generation, run.peer, PeerState.FAILED, code, run.ml.last_lines(20))
            over = self._assignment_over(generation)
            if over is not None:
                log.info("task %s is %s; stopping its remaining processes", task, over)
                return
            if all(run.ended_at is not None for run in runs):
                return
            if self.stopping.wait(POLL):
                return

    def _start_sl(self, task: str, node) -> Handle:
        key, cert, capath = self._sl_identity(node)
        # Every address carries its port, so no --sn-api-port: the SL gets all of the SNs, to move between.
        argv = [sys.executable, "-m", "swarmlearn.cli", "sl", "--sn-ip", ",".join(self._sl_sns()),
                "--host-ip", self._sl_host_ip(node), "--sl-fs-port", str(self._sl_port(node)), "--key", str(key),
                "--cert", str(cert), "--capath", str(capath), "--node-id", node.node_id,
                "--data-dir", str(self._node_dir(task, node.node_id) / "sl"), *self.config.extra_sl_args]
        # The profile's envvars reach every SL (and ML), a node's slenvvars its own SL, winning over them.
        env = {**os.environ, **self.profile.envvars, **node.slenvvars, "PYTHONUNBUFFERED": "1"}
        return self._start(Spec(f"{task}-{node.node_id}-sl", argv, self.config.usr_dir, env,
                                self._node_dir(task, node.node_id) / "sl.log"))

    def _sl_host_ip(self, node) -> str:
        """The address the node's SL listens on: its slhostip, a container host name (`sl1`) resolved
        to this host (see swarmlearn.hostnames), or 127.0.0.1 without one."""
        if not node.slhostip:
            return "127.0.0.1"
        address = self._resolve(node.slhostip)
        if address is None:
            raise SwarmError(f"{self.config.profile_path}: node {node.node_id}'s slhostip {node.slhostip} names no "
                             f"host known here; write its IP, or add `IP {node.slhostip}` to "
                             f"{self._hosts_files()[0]}")
        if address != node.slhostip:
            log.info("node %s: slhostip %s is %s", node.node_id, node.slhostip, address)
        return address

    def _resolve(self, name: str, use_dns: bool = True) -> str | None:
        """A container host name (`sn1`, `sl1`, `swop1`) -> an address: the hosts files, the nodes of
        this profile (this host), the ledger's node registry, this host's resolver."""
        local = [self.node_id, *(n for node in self.nodes for n in (node.slhostname, node.usrhostname, node.node_id))]
        registry = self.follower.read(lambda s: dict(s.nodes))
        return hostnames.resolve(name, hosts_file=self._hosts_files(), registry=registry, local=local,
                                 use_dns=use_dns)

    def _sns_named_here(self, addresses: str | list[str]) -> list[str]:
        """--sn-ip as given, a host name that a hosts file names (run-swop's `--sn-api-service
        api.sn-1.swarm`, what the reverse-proxy example's DNS server knew) replaced by its address."""
        named = []
        for entry in (e for a in ([addresses] if isinstance(addresses, str) else addresses) for e in a.split(",")):
            host, colon, port = entry.rpartition(":")
            found = hostnames.resolve(host, hosts_file=self._hosts_files(), use_dns=False) if colon else None
            if found is not None and found != host.strip("[]"):
                log.info("SN %s is %s (hosts file)", host, found)
                entry = f"[{found}]:{port}" if ":" in found else f"{found}:{port}"
            named.append(entry)
        return named

    def _hosts_files(self) -> list[Path]:
        """Where a user names hosts, first file that names one winning: --usr-dir/hosts and the folder
        above it (as the SWCI reads them: the example's folder, whichever of it or swop/ is --usr-dir),
        then the workspace's."""
        usr = Path(self.config.usr_dir)
        return list(dict.fromkeys([usr / hostnames.HOSTS_FILE, usr.parent / hostnames.HOSTS_FILE,
                                   self.workspace / hostnames.HOSTS_FILE]))

    def _sl_port(self, node) -> int:
        """The node's slport; nodes of one host that share a port (the original gave each container
        its own address) get consecutive ports from it instead."""
        same = [n for n in self.nodes if n.slport == node.slport]
        return node.slport if node.slport == 0 or len(same) == 1 else node.slport + same.index(node)

    def _start_ml(self, task: str, node, body: dict, sl_env: dict[str, str], python: str) -> Handle:
        private = node.privatedata.src if node.privatedata and node.privatedata.src else None
        scratch = self._node_dir(task, node.node_id) / "workdir"
        table = self._mount_table(task, node, body, private, scratch)
        # Mounted, the program sees the task's own paths; rewritten, it sees this host's.
        seen = (lambda value: value) if self.bind_mounts else table.rewrite
        entry = str(body.get("Entrypoint") or "python3")
        command = str(body.get("Command") or "")
        try:
            argv = [python if entry in PYTHON_NAMES else entry, *map(seen, shlex.split(command))]
        except ValueError as exc:
            raise SwarmError(f"task {task}: Command {command!r} cannot be split into arguments ({exc})") from None
        workdir = Path(table.host_workdir())
        content = body.get("PrivateContent")
        env = ml_environment(
            os.environ,
            defaults={"DATA_DIR": private or (seen(str(content)) if content else str(workdir / "data")),
                      "MODEL_DIR": str(self.workspace / task / "models")},
            layers=[self.profile.envvars, {k: seen(v) for k, v in (body.get("Envvars") or {}).items()},
                    node.usrenvvars],
            # NODE_ID: the node's own usrenvvars may set it (its model code may read it as it likes); the
            # profile's and task's, which every node shares, may not.
            fixed={"NODE_ID": node.usrenvvars.get("NODE_ID", node.node_id), "SWARM_NODE_ID": node.node_id,
                   **sl_env, "PYTHONUNBUFFERED": "1"})
        if env["NODE_ID"] != node.node_id:
            log.info("node %s: its usrenvvars NODE_ID=%s is what its ML reads; its swarm name stays %s (its "
                     "certificate's), also in SWARM_NODE_ID", node.node_id, env["NODE_ID"], node.node_id)
        gpus = node.gpu_devices()
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus
        if workdir.is_relative_to(scratch):
            scratch.mkdir(parents=True, exist_ok=True)
            if not self.bind_mounts:
                paths.prepare_rewritten_workdir(table)
        if not workdir.is_dir():
            raise SwarmError(f"task {task}: WorkingDir {body.get('WorkingDir')} is {workdir} on this host, which is "
                             f"not a folder")
        if self.bind_mounts:
            argv = table.mount_argv(argv)
            self._hold_mount_points(task, node.node_id, table)
        log.info("node %s: paths %s (%s)", node.node_id, paths.described(table),
                 "bind-mounted" if self.bind_mounts else "rewritten")
        return self._start(Spec(f"{task}-{node.node_id}-ml", argv, workdir, env,
                                self._node_dir(task, node.node_id) / "ml.log"))

    def _mount_table(self, task: str, node, body: dict, private: str | None, scratch: Path) -> paths.MountTable:
        """The node's container paths -> this host's (swop/paths.py); every source must be here."""
        try:
            table = paths.mount_table(body, usr_dir=self.config.usr_dir, private_src=private, scratch=scratch,
                                      confined=self.policy.confined)
        except ValueError as exc:
            raise SwarmError(f"task {task}: {exc}") from None
        missing = paths.missing_sources(table, scratch)
        if missing:
            raise SwarmError(f"task {task}: node {node.node_id} cannot see {', '.join(missing)}: not on this host; "
                             f"fix the profile's privatedata or the task's SharedContent Src")
        return table

    def _choose_path_mapping(self) -> str:
        """Decides, once, how ML processes see the task's container paths (the profile's `pathmapping`);
        returns the log line that says which."""
        wanted = self.profile.pathmapping
        refusal = paths.namespace_refusal() if wanted != "rewrite" else "the profile asks for rewriting"
        if wanted == "mounts" and refusal is not None:
            raise ConfigError(f"{self.config.profile_path}: pathmapping mounts, but {refusal}; write pathmapping: "
                              f"rewrite (or auto)")
        self.bind_mounts = refusal is None
        if self.bind_mounts:
            return ("ML processes see the task's container paths through bind mounts in a private mount "
                    "namespace (unshare --mount)")
        return (f"ML processes see the task's container paths rewritten to this host's in their arguments and "
                f"environment ({refusal})")

    def _start(self, spec: Spec) -> Handle:
        # Called from the worker thread that serves tasks; any thread would do: a node dies with this
        # process (its wrapper watches our lifeline pipe), not with the thread that started it.
        # Started under the lock, so that stop() either sees the process or refuses it a start.
        with self._handles_lock:
            if self._stopped:
                raise SwarmError(f"{self.node_id} is stopping; {spec.name} not started")
            handle = self.runtime.start(spec)
            self.handles.append(handle)
        return handle

    def _clean_up(self, task: str, runs: list[NodeRun]) -> None:
        for run in runs:
            if run.ml is not None and run.ml.poll() is None:
                run.ml.stop()
        for run in runs:
            self._release_mount_points(task, run.peer)
        if self.config.keep_nodes:
            log.info("task %s: keeping its SL processes and data (--keep-nodes)", task)
            return
        if any(run.sl is not None for run in runs):
            self.stopping.wait(LINGER)
        for run in runs:
            if run.sl is not None:
                run.sl.stop()
                _remove_all_but(self._node_dir(task, run.peer) / "sl", KEPT_MODELS_DIR)
        with self._handles_lock:
            self.handles = [h for h in self.handles if h.poll() is None]

    def _hold_mount_points(self, task: str, node: str, table: paths.MountTable) -> None:
        """Creates the node's missing mount points (before its namespace would) and counts it as a
        user of each that this SWOP made."""
        with self._mount_points_lock:
            self._mount_points_made.update(paths.make_mount_points(table))
            held = sorted(paths.mount_point_chain(table) & self._mount_points_made)
            self._mount_point_users.update(held)
            self._mount_points_held[(task, node)] = held

    def _release_mount_points(self, task: str, node: str) -> None:
        """The node's program has ended: mount points no other node of this SWOP holds are removed
        where empty and mounted in no namespace (another SWOP's nodes may use them)."""
        with self._mount_points_lock:
            held = self._mount_points_held.pop((task, node), [])
            self._mount_point_users.subtract(held)
            free = [p for p in held if self._mount_point_users[p] <= 0]
            for folder in free:
                del self._mount_point_users[folder]
            removed = paths.remove_mount_points(free)
            self._mount_points_made.difference_update(removed)
        if removed:
            log.info("node %s: removed the mount points it no longer needs: %s", node,
                     ", ".join(map(str, removed)))

    def _node_dir(self, task: str, node: str) -> Path:
        return self.workspace / task / node

    def _sl_sns(self) -> list[str]:
        """The SNs its SLs talk to: the profile's apisrv, `~` parts filled in from this SWOP's own SNs, a
        container host name (`sn1`) that this host's resolver does not know replaced by its address."""
        return [self._known_host(address) for address in self.profile.sn_addresses(self.sn.addresses)]

    def _known_host(self, address: str) -> str:
        host, _, port = address.rpartition(":")
        if hostnames.resolve(host) is not None:  # an IP, or a name this host resolves: as it is
            return address
        found = self._resolve(host, use_dns=False)
        if found is None:
            return address  # the SL says it cannot reach it, naming it
        log.info("SN %s is %s", host, found)
        return f"[{found}]:{port}" if ":" in found else f"{found}:{port}"

    def _sl_identity(self, node) -> tuple[Path, Path, Path]:
        ident = self.config.identity
        # Each node has its own certificate (its name is the node id): the profile's identity
        # attributes, else gen-cert's sl-<node>-{key,cert}.pem beside this SWOP's own.
        key = node.identity_file("KEY") or self.config.sl_key or _node_file(ident.key_path, node.node_id, "key")
        cert = node.identity_file("CERT") or self.config.sl_cert or _node_file(ident.cert_path, node.node_id, "cert")
        capath = node.identity_file("CAPATH") or ident.capath
        return key, cert, capath

    # ------------------------------------------------------------------------------ build

    def _build(self, task, peers: list[str], generation: int) -> None:
        """The process runtime's image build: a Python environment of its own for the image the task's
        Outcome names (swop/envs.py), with what its `RUN pip install` steps and Requirements ask for."""
        from swarmlearn.swci.taskdef import parse_build_steps

        pip_args, ignored = parse_build_steps(task.body.get("BuildSteps") or [])
        pip_args += list(task.body.get("Requirements") or [])
        env = envs.environment_for(self.workspace, task.outcome or task.name)
        log_path = self.workspace / task.name / "build.log"
        detail = envs.build(env, pip_args, self._tracked(f"{task.name}-build", log_path), log_path,
                            from_source=self.profile.buildfromsource)
        notes = []
        if task.body.get("BuildContext"):
            notes.append(f"BuildContext {task.body['BuildContext']} not used: no image is built, and the "
                         f"swarmlearning package comes with swarmlearn into every environment")
        if ignored:
            notes.append(f"{len(ignored)} container-only build steps not applicable to processes "
                         f"({'; '.join(ignored)[:300]})")
        for note in notes:
            log.info("task %s: %s", task.name, note)
        log.info("task %s: %s", task.name, detail)
        for peer in peers:
            self._report(generation, peer, PeerState.COMPLETE, 0, "; ".join([detail, *notes]))

    def _tracked(self, name: str, log_path: Path) -> envs.Runner:
        """Runs a build's commands as this operator's processes (recorded, stopped with it), one at a
        time, output appended to `log_path`."""
        def run(argv: list[str]) -> int:
            env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
            handle = self._start(Spec(name, argv, self.config.usr_dir, {**env, "UV_NO_PROGRESS": "1"}, log_path))
            while (code := handle.poll()) is None:
                if self.stopping.wait(POLL):
                    handle.stop()
                    raise SwarmError(f"{self.node_id} is stopping; {name} stopped")
            return code
        return run


def _spiffe_id(state: LedgerState, node_id: str) -> str | None:
    """The certificate identity of a registered node (who signed a task or its assignment)."""
    node = state.nodes.get(node_id)
    return node.spiffe_id if node is not None else None


def ml_environment(own: Mapping[str, str], defaults: dict[str, str], layers: list[dict[str, str]],
                   fixed: dict[str, str]) -> dict[str, str]:
    """A node's ML environment, later winning over earlier: this SWOP's own environment, the node's
    defaults (its private DATA_DIR, its MODEL_DIR: a DATA_DIR exported in the SWOP's shell must not
    replace every node's private data), the profile's, task's and node's variables in that order, then
    what the SWOP fixes (NODE_ID, SWARM_NODE_ID, the SL's address and token; a token of another SL is
    never passed)."""
    env = {k: v for k, v in own.items() if k != TOKEN_ENV}
    env.update(defaults)
    for layer in layers:
        env.update({k: v for k, v in layer.items() if k != TOKEN_ENV})
    env.update(fixed)
    return env


def _node_file(swop_file: Path, node: str, kind: str) -> Path:
    return Path(swop_file).with_name(f"sl-{node}-{kind}.pem")


def _remove_all_but(folder: Path, kept: str) -> None:
    """Empties a node's SL data dir but for `kept`: its latest merged models, from which a task run
    again (or a whole swarm restarted) resumes instead of starting over."""
    for item in folder.iterdir() if folder.is_dir() else ():
        if item.name == kept:
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
