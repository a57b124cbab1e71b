"""Runs SWCI commands against an SN: contexts, contracts, tasks, task runners, waits.

Output goes to the `out` callable one line at a time; refusals raise SwarmError with the ledger's
reason. A task that ends FAILED makes `WAIT FOR TASKRUNNER` fail with the failing peers' last log
lines, whatever EXIT ON FAILURE says, so a script never reports success for a failed task.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from swarmlearn import pki
from swarmlearn.defaults import SN_API_PORT
from swarmlearn.errors import SwarmError
from swarmlearn.ledger.model import AssignmentStatus, PeerState
from swarmlearn.ledger.pin import PIN_FILE, HistoryRefused, Pin, PinFile, sn_refused
from swarmlearn.sn.client import SNClient, default_patience, parse_sn_addresses
from swarmlearn.swci.script import USAGE, Command

# The original waits this long for a task runner; we say what is going on all along.
DEFAULT_TASK_TIMEOUT = 120 * 60
WAIT_FOR_IP_TIMEOUT = 300.0
# WAIT FOR IP/SERVICE <host> [port] [retries]: each of the original's retries waits this long.
RETRY_EVERY = 5.0
# SET CONTEXT ENV SWCI_TASK_MAX_WAIT_TIME <minutes>: the original's limit of WAIT FOR TASKRUNNER.
TASK_WAIT_ENV = "SWCI_TASK_MAX_WAIT_TIME"
# The lines an inline task's header takes before its Body: in the file it is checked as.
_INLINE_HEADER_LINES = 6
PROGRESS_EVERY = 30.0
# A SWOP heartbeats every second, and one that reaches no SN for the SN patience (SWARM_SN_PATIENCE,
# default 30 s) stops itself and its nodes. So a SWOP silent for longer than that plus this slack has
# stopped, while one silent for less may only be cut off: a host partitioned for 20 s carries on when
# it is back, and failing its task then would end a healthy training.
SWOP_SILENT_SLACK = 10.0
# The pin (see SwciSession._check_history) lives in USR_DIR/.swarm/ and is checked against the SN on
# connecting and then at most this often, as commands run: one Query, and one entry read with Watch
# when the ledger grew past the pinned head.
PIN_DIR = ".swarm"
PIN_CHECK_EVERY = 10.0
PIN_READ_TIMEOUT = 10.0


class TaskFailed(SwarmError):
    pass


class HostUnknown(SwarmError):
    """No source knows a host name; `can_change` when an SN this SWCI talks to may register it later."""

    def __init__(self, message: str, can_change: bool):
        super().__init__(message)
        self.can_change = can_change


class SwciSession:
    def __init__(self, identity: pki.Identity, usr_dir: Path, out: Callable[[str], None] = print,
                 default_sn_port: int = SN_API_PORT, poll: float = 0.5):
        self.identity = identity
        self.cwd = Path(usr_dir).resolve()
        self.out = out
        self.default_sn_port = default_sn_port
        self.poll = poll
        # A context's SNs, as one "IP:PORT,IP:PORT" text: its client moves between them.
        self.contexts: dict[str, str] = {}
        self.current: str | None = None
        self.exit_on_failure = False
        self.failed_tasks: list[str] = []
        self._clients: dict[str, SNClient] = {}
        # Per (SN, contract): the ledger index metrics were read up to, and each node's latest entries
        # ({"latest": any kind, "train": ..., "validation": ...}).
        self._metrics_read: dict[tuple[str, str], tuple[int, dict[str, dict[str, dict]]]] = {}
        self.exited = False
        # The swarm this SWCI has seen, pinned as SL and SWOP pin it (ledger/pin.py), in USR_DIR/.swarm/.
        self.pin = PinFile(self.cwd / PIN_DIR / PIN_FILE)
        self._pin_checked: dict[str, float] = {}
        # Kept in this SWCI, as in the original: each context's SET CONTEXT ENV variables, and the
        # APPEND TASK BODY lines (by line number) of tasks not yet finalized.
        self.usr_dir = self.cwd
        self.context_env: dict[str, dict[str, str]] = {}
        self.body_lines: dict[str, dict[int, str]] = {}

    # ------------------------------------------------------------------------------ driving

    def run(self, commands: list[Command], source: str) -> int:
        """Runs a parsed script; returns the exit code (0 only if nothing that matters failed)."""
        for command in commands:
            if self.exited:
                break
            if not self.execute(command, source):
                return 1
        return 1 if self.failed_tasks else 0

    def execute(self, command: Command, source: str = "<prompt>") -> bool:
        """Runs one command; False when it failed and EXIT ON FAILURE is on (or the task failed)."""
        self.out(f"{source}:{command.line}: {command.text}")
        try:
            getattr(self, f"cmd_{command.name}")(**command.args)
        except TaskFailed as exc:
            self.out(f"FAILED: {exc}")
            return not self.exit_on_failure
        except HistoryRefused as exc:
            # Whatever EXIT ON FAILURE says: nothing more is said to an SN whose history is refused.
            self.out(f"FAILED: {exc}")
            self.exited = True
            return False
        except SwarmError as exc:
            self.out(f"{'FAILED' if self.exit_on_failure else 'failed (continuing: EXIT ON FAILURE is off)'}: {exc}")
            return not self.exit_on_failure
        return True

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self.pin.flush()

    def _sn(self) -> SNClient:
        if self.current is None:
            raise SwarmError("no context: CREATE CONTEXT <name> WITH IP <sn-ip> and SWITCH CONTEXT <name> first")
        return self._client(self.contexts[self.current])

    def _client(self, address: str) -> SNClient:
        """The client of the SNs in `address` ("IP:PORT,IP:PORT"), connected and checked on first use.
        Clients, pin checks and metrics are all kept under _key(client): the SNs as the client lists them."""
        key = ",".join(parse_sn_addresses(address, None, "SN address"))
        client = self._clients.get(key)
        if client is None:
            client = SNClient(address, self.identity)
            try:
                client.wait_ready()
                self._check_history(client)
            except BaseException:
                client.close()
                raise
            ident = self.identity.swarm_id
            client.register(ident.role if ident is not None and ident.role == "admin" else "SWCI")
            self._clients[key] = client
        elif time.monotonic() - self._pin_checked.get(key, 0.0) > PIN_CHECK_EVERY:
            self._check_history(client)
        return client

    def _check_history(self, client: SNClient) -> None:
        """The SWCI folds no ledger, so it pins from what the SN answers: the genesis hash and the head
        index and hash of a Query, and the hash of the pinned entry read with Watch if the head moved
        on. Refuses (HistoryRefused) an SN with another genesis, a ledger shorter than the pinned head,
        or another entry at it; then pins its head."""
        info = client.query("info")["info"]
        head, head_hash, genesis = info["head_index"], info["head_hash"], info["genesis_hash"]
        pinned = self.pin.pin if self._pin_checked else self.pin.load()

        def hash_at(index: int) -> str | None:
            return genesis if index == 0 else head_hash if index == head else _entry_hash(client, index)

        if pinned is not None:
            problem = pinned.divergence(head, hash_at)
            if problem is not None:
                served = genesis if problem == "genesis" else hash_at(pinned.head_index) if problem == "differs" else ""
                raise sn_refused(problem, client.address, pinned, self.pin.path, sn_head=head, served=served or "")
        self._pin_checked[_key(client)] = time.monotonic()
        if genesis is not None and head_hash:
            self.pin.advance(Pin(genesis, head, head_hash, str((info.get("genesis") or {}).get("swarm_id", ""))))

    def _address(self, ip: str, port: str | None) -> str:
        """`ip` (one SN or several, IP[:PORT] separated by commas) as "IP:PORT,IP:PORT"; `port`, else
        --sn-api-port, for entries without one. A host name (the original's container names: `sn1`)
        becomes the address the hosts file or the SN's node registry gives it (HostUnknown if none)."""
        addresses = parse_sn_addresses(ip, int(port) if port else self.default_sn_port, "IP")
        return ",".join(self._resolved(address) for address in addresses)

    def _resolved(self, address: str) -> str:
        """"sn1:30304" -> "10.0.0.5:30304". A name in a hosts file (HOSTS_FILE in --usr-dir or the folder
        above it: what the user wrote wins) or in the node registry of an SN this SWCI already talks to
        becomes that IP; a name this host's resolver knows stays a name, so that TLS checks the
        certificate against the name the user wrote."""
        from swarmlearn import hostnames

        host, _, port = address.rpartition(":")
        if hostnames.resolve(host, use_dns=False) is not None:  # an IP
            return address
        for hosts in self._hosts_files():
            try:
                found = hostnames.read_hosts(hosts).get(host.lower())
            except ValueError as exc:
                raise SwarmError(str(exc)) from None
            if found is not None:
                return f"{found}:{port}"
        registry = self._known_nodes()
        found = hostnames.resolve(host, registry=registry, use_dns=False) if registry else None
        if found is not None:
            return f"{found}:{port}"
        if hostnames.resolve(host) is not None:
            return address
        raise HostUnknown(f"no host is known as {host}: write `<IP> {host}` in {self._hosts_files()[0]}, start "
                          f"`swarm swci` with --sn-ip <an SN> so that its node registry can name it, or write the "
                          f"SN's IP", can_change=registry is not None)

    def _hosts_files(self) -> list[Path]:
        from swarmlearn.hostnames import HOSTS_FILE

        return [self.usr_dir / HOSTS_FILE, self.usr_dir.parent / HOSTS_FILE]

    def _known_nodes(self) -> dict | None:
        """The node registry of an SN this SWCI already talks to (the current context's first); None
        when it talks to none yet."""
        keys = list(self._clients)
        if self.current is not None:
            current = ",".join(parse_sn_addresses(self.contexts[self.current], None, "SN address"))
            keys.sort(key=lambda key: key != current)
        for key in keys:
            try:
                return self._clients[key].query("nodes")["nodes"]
            except SwarmError:
                continue
        return None

    def _state(self, section: str) -> dict:
        return self._sn().query(section)[section]

    def _latest_by_kind(self, contract: str) -> dict[str, dict[str, dict]]:
        """Each node's latest entries of `contract`: "latest" of any kind, "train" and "validation"
        where it recorded one. An entry without a kind (older callbacks) is a train entry, and a
        validation one too where it carries a metric, as the dashboard reads it. Reads only the
        entries added since last time."""
        sn = self._sn()
        read_to, latest = self._metrics_read.get((_key(sn), contract), (0, {}))
        entries, read_to = sn.metrics(contract, read_to)
        for m in entries:
            kinds = latest.setdefault(m["node"], {})
            kinds["latest"] = m
            kind = m.get("kind")
            if kind in (None, "train"):
                kinds["train"] = m
            if kind == "validation" or (kind is None and m.get("metric") is not None):
                kinds["validation"] = m
        self._metrics_read[(_key(sn), contract)] = (read_to, latest)
        return latest

    def _show(self, obj) -> None:
        for line in json.dumps(obj, indent=2, sort_keys=True, default=str).splitlines():
            self.out(line)

    # ------------------------------------------------------------------------------ commands

    def cmd_help(self) -> None:
        for line in USAGE.splitlines():
            self.out(line)

    def cmd_exit(self) -> None:
        self.exited = True

    def cmd_exit_on_failure(self, mode: str = "on") -> None:
        if mode.lower() not in ("on", "off"):
            raise SwarmError(f"EXIT ON FAILURE takes ON or OFF, not {mode}")
        self.exit_on_failure = mode.lower() == "on"

    def cmd_sleep(self, seconds: str) -> None:
        time.sleep(_number(seconds, "SLEEP"))

    def cmd_cd(self, path: str) -> None:
        from swarmlearn.swop.paths import CONTAINER_USR_DIR

        # The original's SWCI saw its usr dir at /platform/swarm/usr: that is the --usr-dir here, even
        # where a SWOP's bind mounts left an empty folder of that name on this host.
        inside = os.path.relpath(os.path.normpath(path), CONTAINER_USR_DIR) if path.startswith("/") else ".."
        target = (self.usr_dir / inside if not inside.startswith("..") else self.cwd / path).resolve()
        if not target.is_dir():
            # The original's scripts `cd` into the container path where the usr dir is mounted.
            self.out(f"{path} is not a folder here; staying in {self.cwd} (the --usr-dir)")
            return
        self.cwd = target

    def cmd_pwd(self) -> None:
        self.out(str(self.cwd))

    def cmd_ls(self) -> None:
        for entry in sorted(os.listdir(self.cwd)):
            self.out(entry)

    def cmd_wait_for_ip(self, ip: str, port: str | None = None, retries: str | None = None) -> None:
        """Waits for the SN at `ip` (an IP or a host name) to accept our TLS handshake: up to `retries`
        tries of RETRY_EVERY seconds each, as in the original, else WAIT_FOR_IP_TIMEOUT. A name nobody
        knows fails at once, unless an SN this SWCI talks to may yet register it."""
        deadline = time.monotonic() + (int(retries) * RETRY_EVERY if retries else WAIT_FOR_IP_TIMEOUT)
        while True:
            try:
                address = self._address(ip, port)
                break
            except HostUnknown as exc:
                if not exc.can_change or time.monotonic() + RETRY_EVERY > deadline:
                    raise
                time.sleep(RETRY_EVERY)
        client = SNClient(address, self.identity)
        try:
            client.wait_ready(max(1.0, deadline - time.monotonic()))
            self.out(f"SN at {client.address} is up" + ("" if address.startswith(ip) else f" ({ip})"))
        finally:
            client.close()

    def cmd_wait_for_service(self, service: str | None = None, retries: str | None = None) -> None:
        """WAIT FOR SERVICE <host[:port]>: as WAIT FOR IP (there is no reverse proxy: the name is
        resolved as a host). Without a service: the current context's SNs."""
        if service is None:
            self._sn().wait_ready(WAIT_FOR_IP_TIMEOUT)
            return
        self.cmd_wait_for_ip(service, None, retries)

    def cmd_create_context(self, name: str, ip: str, port: str | None = None) -> None:
        address = self._address(ip, port)
        self._client(address)
        self.contexts[name] = address
        self.out(f"context {name}: SN at {address}")

    def cmd_create_context_service(self, name: str, service: str) -> None:
        """The original reaches an SN through a reverse proxy by its service name; here SNs are reached
        directly: the name is resolved as a host (hosts file, the SN's node registry, DNS)."""
        self.cmd_create_context(name, service)
        self.out(f"note: no reverse proxy here: service {service} is the SN at {self.contexts[name]}")

    def cmd_switch_context(self, name: str) -> None:
        if name not in self.contexts:
            raise SwarmError(f"no context {name}; CREATE CONTEXT {name} WITH IP <sn-ip> first")
        self.current = name

    def cmd_list_contexts(self) -> None:
        for name, address in self.contexts.items():
            self.out(f"{'*' if name == self.current else ' '} {name}  {address}")

    def cmd_get_context_info(self, name: str | None = None) -> None:
        name = name or self.current
        if name not in self.contexts:
            raise SwarmError(f"no context {name}")
        self._show({"name": name, "sn": self.contexts[name], "current": name == self.current})

    def cmd_create_contract(self, name: str, nodes: str | None = None, method: str | None = None) -> None:
        """With `nodes` (comma separated), only those nodes may join the contract and check in to its rounds;
        with `method`, every member merges with it (a node asking for another is refused)."""
        payload: dict = {"name": name}
        if nodes is not None:
            payload["peers"] = [n for n in nodes.split(",") if n]
        if method is not None:
            payload["merge_method"] = method.lower()
        self._sn().submit("contract_create", payload)

    def cmd_set_contract_merge(self, name: str, method: str) -> None:
        """Chooses the merge method of contract `name` (its creator or an admin; not while a session is active)."""
        self._sn().submit("contract_update", {"name": name, "merge_method": method.lower()})

    def cmd_list_contracts(self) -> None:
        for name, c in self._state("contracts").items():
            self.out(f"{name}  members {len(c['members'])}  rounds merged {c['rounds_merged']}")

    def cmd_get_contract_info(self, name: str) -> None:
        contracts = self._state("contracts")
        if name not in contracts:
            raise SwarmError(f"no contract {name}; LIST CONTRACTS shows them")
        c = contracts[name]
        self._show({k: c[k] for k in ("name", "generation", "members", "current_round", "latest_merged_round",
                                      "min_peers", "merge_method") if k in c})

    def cmd_reset_contract(self, name: str) -> None:
        self._sn().submit("contract_reset", {"name": name})

    def cmd_perfdata(self, name: str) -> None:
        """Per node, side by side: the latest training loss and the latest validation metric (of the
        merged model of its round), each with its round, since the two kinds of entry alternate."""
        for node, kinds in sorted(self._latest_by_kind(name).items()):
            self.out(f"{node}: {_train_text(kinds.get('train'))} · {_validation_text(kinds.get('validation'))}")

    def cmd_create_task(self, file: str) -> None:
        from swarmlearn.swci.taskdef import load_taskdef

        task = load_taskdef(self.cwd / file)
        self._sn().submit("task_create", task.to_ledger_payload())
        note = task.note()
        if note:
            self.out(f"note: {note}")

    def cmd_finalize_task(self, name: str) -> None:
        if name in self.body_lines:  # written with APPEND TASK BODY: checked whole, then added at once
            self._sn().submit("task_append", {"name": name, "body": self._appended_body(name)})
            del self.body_lines[name]
        self._sn().submit("task_finalize", {"name": name})

    def cmd_delete_task(self, name: str) -> None:
        self._sn().submit("task_delete", {"name": name})
        self.body_lines.pop(name, None)

    def cmd_list_tasks(self) -> None:
        for name, t in self._state("tasks").items():
            self.out(f"{name}  {t['type']}  {'finalized' if t['finalized'] else 'draft'}  prereq {t['prereq']}")

    def _task(self, name: str) -> dict:
        tasks = self._state("tasks")
        if name not in tasks:
            raise SwarmError(f"no task {name}; LIST TASKS shows them")
        return tasks[name]

    def cmd_get_task_info(self, name: str) -> None:
        self._show({k: v for k, v in self._task(name).items() if k != "body"})

    def cmd_get_task_body(self, name: str) -> None:
        self._show(self._task(name)["body"])

    def cmd_create_taskrunner(self, name: str) -> None:
        self._sn().submit("taskrunner_create", {"name": name})

    def cmd_assign_task(self, task: str, runner: str, peers: str) -> None:
        self._sn().submit("taskrunner_assign", {"runner": runner, "task": task, "peers": int(_number(peers, "WITH"))})

    def cmd_assign_task_all(self, task: str, runner: str) -> None:
        self._sn().submit("taskrunner_assign", {"runner": runner, "task": task, "peers": "ALL"})

    def _runner(self, name: str) -> dict:
        return self._runner_and_liveness(name)[0]

    def _runner_and_liveness(self, name: str) -> tuple[dict, dict[str, float]]:
        """The task runner, and how many seconds ago the SN heard from each node."""
        reply = self._sn().query("taskrunners")
        runners = reply["taskrunners"]
        if name == "default":
            name = self._state("info")["genesis"]["default_taskrunner"]
        if name not in runners:
            raise SwarmError(f"no task runner {name}; LIST TASKRUNNERS shows them")
        return runners[name], reply.get("last_seen", {})

    def cmd_list_taskrunners(self) -> None:
        for name, r in self._state("taskrunners").items():
            a = r["assignment"]
            self.out(f"{name}  SWOPs {len(r['swops'])} (capacity {sum(r['swops'].values())})  "
                     + (f"{a['task']} {a['status']}" if a else "idle"))

    def cmd_list_taskrunner_peers(self, runner: str = "default") -> None:
        for swop, capacity in self._runner(runner).get("swops", {}).items():
            self.out(f"{swop}  can start {capacity} peers")

    def cmd_get_taskrunner_status(self, runner: str) -> None:
        r = self._runner(runner)
        a = r["assignment"]
        if a is None:
            self.out(f"{runner}: idle")
            return
        self.out(f"{runner}: {a['task']} {a['status']} ({len(a['peer_status'])} of {a['peers']} peers started)")
        for peer, s in sorted(a["peer_status"].items()):
            code = "" if s["exit_code"] is None else f" exit {s['exit_code']}"
            why = [line for line in s["detail"].splitlines() if line.strip()] if s["status"] == PeerState.FAILED else []
            self.out(f"  {peer} on {s['swop']}: {s['status']}{code}" + (f": {why[-1].strip()}" if why else ""))

    def cmd_reset_taskrunner(self, runner: str) -> None:
        self._sn().submit("taskrunner_reset", {"runner": runner})

    # ---------------------------------------------- the original's context env, inline tasks, targets

    def _context_name(self, name: str | None) -> str:
        name = name or self.current
        if name is None:
            raise SwarmError("no context: CREATE CONTEXT <name> WITH IP <sn-ip> first, or name the context")
        if name not in self.contexts:
            raise SwarmError(f"no context {name}; LIST CONTEXTS shows them")
        return name

    def cmd_list_context_env(self, name: str | None = None) -> None:
        for env, value in sorted(self.context_env.get(self._context_name(name), {}).items()):
            self.out(f"{env}={value}")

    def cmd_get_context_env(self, first: str, second: str | None = None) -> None:
        """GET CONTEXT ENV [<context>] <env>"""
        name, env = (first, second) if second is not None else (None, first)
        name = self._context_name(name)
        if env not in self.context_env.get(name, {}):
            raise SwarmError(f"context {name} has no variable {env}; SET CONTEXT ENV {name} {env} <value> sets it")
        self.out(f"{env}={self.context_env[name][env]}")

    def cmd_set_context_env(self, rest: str) -> None:
        """SET CONTEXT ENV [<context>] <env> <value>: the first word names a context only when one has
        that name and two more words follow; the value is the rest of the line. SWCI_TASK_MAX_WAIT_TIME
        (minutes, as in the original) bounds WAIT FOR TASKRUNNER in that context."""
        words = rest.split(None, 2)
        name = words[0] if len(words) == 3 and words[0] in self.contexts else None
        env_and_value = rest.split(None, 1)[1] if name else rest
        if len(env_and_value.split(None, 1)) != 2:
            raise SwarmError("SET CONTEXT ENV [<context>] <env> <value>: give the variable's name and its value")
        env, value = env_and_value.split(None, 1)
        if env == TASK_WAIT_ENV:
            _number(value, TASK_WAIT_ENV)
        self.context_env.setdefault(self._context_name(name), {})[env] = value

    def _task_wait_limit(self) -> float:
        """Seconds WAIT FOR TASKRUNNER waits without a timeout of its own: the context's (or this
        process's) SWCI_TASK_MAX_WAIT_TIME in minutes, else DEFAULT_TASK_TIMEOUT."""
        minutes = self.context_env.get(self.current or "", {}).get(TASK_WAIT_ENV) or os.environ.get(TASK_WAIT_ENV)
        return _number(minutes, TASK_WAIT_ENV) * 60 if minutes else DEFAULT_TASK_TIMEOUT

    def cmd_get_context_version(self) -> None:
        from swarmlearn import __version__

        genesis = self._state("info").get("genesis") or {}
        self.out(f"context {self.current}: SN ledger protocol {genesis.get('protocol', 'unknown')}, swarm "
                 f"{genesis.get('swarm_id', 'unknown')}; this SWCI: swarmlearn {__version__}")

    def cmd_create_task_inline(self, task_type: str, name: str, author: str, prereq: str, outcome: str) -> None:
        """CREATE TASK <type> <name> <author> <prereq> <outcome>: on the ledger with an empty body, which
        APPEND TASK BODY lines fill and FINALIZE TASK checks and adds whole."""
        from swarmlearn.swci.taskdef import BODIES

        if task_type.upper() not in BODIES:
            raise SwarmError(f"CREATE TASK {task_type} {name}: the task type must be one of {', '.join(BODIES)}")
        self._sn().submit("task_create", {"name": name, "type": task_type.upper(), "author": author,
                                          "prereq": prereq, "outcome": outcome, "body": {}})
        self.body_lines[name] = {}
        self.out(f"task {name} created: APPEND TASK BODY {name} <line> <text> for each line of its Body, then "
                 f"FINALIZE TASK {name}")

    def cmd_append_task_body(self, name: str, idx: str, content: str = "") -> None:
        """Adds or replaces line `idx` of the Body of a task that is not finalized (YAML text, as the
        lines of a taskdef's Body)."""
        task = self._task(name)
        if task["finalized"]:
            raise SwarmError(f"task {name} is finalized; its body can no longer change")
        if task["body"]:
            raise SwarmError(f"task {name} was created with its Body (CREATE TASK FROM a file): change the file, "
                             f"DELETE TASK {name} and CREATE TASK FROM it again")
        self.body_lines.setdefault(name, {})[int(idx)] = content

    def _appended_body(self, name: str) -> dict:
        """The Body that task `name`'s APPEND TASK BODY lines make, checked as a taskdef is: errors name
        the line (`APPEND TASK BODY <name> <line>`) where they are."""
        import re
        import tempfile

        from swarmlearn.swci.taskdef import load_taskdef

        task, lines = self._task(name), self.body_lines[name]
        order = sorted(lines)
        header = {"Name": name, "TaskType": task["type"], "Author": task["author"], "Prereq": task["prereq"],
                  "Outcome": task["outcome"]}
        text = "".join(f"{key}: {json.dumps(value)}\n" for key, value in header.items()) + "Body:\n"
        text += "".join(f"    {lines[i]}\n" for i in order) if order else "    {}\n"
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{name}.yaml"
            path.write_text(text)
            try:
                taskdef = load_taskdef(path)
            except SwarmError as exc:
                def where(m: re.Match) -> str:
                    at = int(m.group(1)) - _INLINE_HEADER_LINES - 1
                    return f"APPEND TASK BODY {name} {order[at]}:" if 0 <= at < len(order) else f"task {name}:"
                raise SwarmError(re.sub(rf"{re.escape(str(path))}:(\d+):", where, str(exc))
                                 .replace(f"{path}:", f"task {name}:")) from None
        note = taskdef.note()
        if note:
            self.out(f"note: {note}")
        return taskdef.to_ledger_payload()["body"]

    def _swop_of(self, runner: str, r: dict, which: str) -> str:
        """A SWOP of the runner by name, or by its index in LIST TASKRUNNER PEERS (from 0)."""
        swops = list(r.get("swops", {}))
        if which in swops:
            return which
        if which.isdigit() and int(which) < len(swops):
            return swops[int(which)]
        raise SwarmError(f"task runner {runner} has no SWOP {which}: give an index from 0 to {len(swops) - 1} or one of "
                         f"{', '.join(swops) or '(none yet)'}; LIST TASKRUNNER PEERS {runner} shows them")

    def cmd_assign_task_target(self, task: str, runner: str, swop: str) -> None:
        """ASSIGN TASK <task> TO <runner> TARGET <swop>: with all the peers of that SWOP, which alone may
        claim them (the ledger refuses any other SWOP's claim)."""
        r = self._runner(runner)
        target = self._swop_of(runner, r, swop)
        self._sn().submit("taskrunner_assign", {"runner": runner, "task": task, "peers": "ALL", "target": target})
        self.out(f"task {task} assigned to {target} of {runner}")

    def cmd_get_taskrunner_peer_status(self, runner: str, peer: str) -> None:
        """One SWOP's part of the runner's task: the peers it started, each with its state."""
        r = self._runner(runner)
        swop = self._swop_of(runner, r, peer)
        a = r["assignment"]
        if a is None:
            self.out(f"{swop} of {runner}: no task assigned")
            return
        mine = {p: s for p, s in a["peer_status"].items() if s["swop"] == swop}
        self.out(f"{swop} of {runner}: task {a['task']} {a['status']}, {len(mine)} peers started by it")
        for name, s in sorted(mine.items()):
            code = "" if s["exit_code"] is None else f" exit {s['exit_code']}"
            detail = [line for line in (s["detail"] or "").splitlines() if line.strip()]
            self.out(f"  {name}: {s['status']}{code}" + (f": {detail[-1].strip()}" if detail else ""))

    def cmd_list_nodes(self) -> None:
        state = self._sn().query("nodes")
        seen = state.get("last_seen", {})
        for node, n in sorted(state["nodes"].items()):
            heard = f"heard {seen[node]:.0f} s ago" if node in seen else "not heard since the SN started"
            self.out(f"{node}  {n['role']}  {n['address'] or '-'}  {n['subject']}  {heard}")

    def cmd_wait_for_taskrunner(self, runner: str, timeout: str | None = None) -> None:
        """Waits until the runner's task ends, saying what happens: peers starting, running, rounds
        merged; on FAILED shows the failing peers' exit codes and last log lines."""
        limit = _number(timeout, "timeout") if timeout else self._task_wait_limit()
        started = time.monotonic()
        last_line, last_progress = "", started
        while True:
            # One narrow query per poll: the runner and the training's last merged rounds, answered by
            # the SN from its folded state in a reply that does not grow with the ledger.
            view = self._sn().taskrunner(runner)
            a, last_seen = view["taskrunner"]["assignment"], view.get("last_seen", {})
            if a is None:
                raise SwarmError(f"task runner {runner} has no task assigned; ASSIGN TASK <task> TO {runner} first")
            line = _progress(a, _rounds_line(view["training"]))
            now = time.monotonic()
            if line != last_line or now - last_progress >= PROGRESS_EVERY:
                self.out(f"[{now - started:5.0f} s] {runner}: {line}")
                last_line, last_progress = line, now
            if a["status"] == AssignmentStatus.COMPLETE:
                return
            if a["status"] in (AssignmentStatus.FAILED, AssignmentStatus.RESET):
                self.failed_tasks.append(a["task"])
                raise TaskFailed(_failure(runner, a))
            gone = _silent_swop(runner, a, last_seen)
            if gone:
                self.failed_tasks.append(a["task"])
                raise TaskFailed(gone)
            if now - started > limit:
                self.failed_tasks.append(a["task"])
                raise TaskFailed(f"task {a['task']} on {runner} did not end within {limit:.0f} s: {line}")
            time.sleep(self.poll)


def _rounds_line(training: dict[str, dict]) -> str:
    """The training so far, per contract (as the SN's "taskrunner" query gives it): the last merged round
    (participants, leader, how long its merge took) and each node's latest step and epoch."""
    parts = []
    for c in training.values():
        last = c["round"]
        took = max(0.0, last["merged_time"] - last["closed_time"])
        line = (f"round {last['number']} merged ({','.join(last['participants'])}, leader {last['leader']}, "
                f"{took:.2f} s)")
        steps = ", ".join(f"{n} step {m.get('step')} epoch {float(m.get('epoch') or 0):.2f}"
                          for n, m in sorted(c["latest"].items()))
        parts.append(line + (f"; {steps}" if steps else ""))
    return "; ".join(parts)


def _value(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "unknown"


def _train_text(m: dict | None) -> str:
    if m is None:
        return "no training loss yet"
    when = [f"round {m.get('round')}", *(f"{k} {m[k]:g}" for k in ("step", "epoch")
                                         if isinstance(m.get(k), (int, float)))]
    spent = f", ε {m['epsilon']:.3g} at δ {m['delta']:g}" \
        if isinstance(m.get("epsilon"), (int, float)) and isinstance(m.get("delta"), (int, float)) else ""
    if isinstance(m.get("client_epsilon"), (int, float)) and isinstance(m.get("client_delta"), (int, float)):
        spent += f", client-level ε {m['client_epsilon']:.3g} at δ {m['client_delta']:g}"
    return f"training loss {_value(m.get('loss'))} ({', '.join(when)}){spent}"


def _validation_text(m: dict | None) -> str:
    if m is None:
        return "no validation metric (no validation data given, or none measured yet)"
    loss = f", validation loss {_value(m['loss'])}" if m.get("loss") is not None and m.get("kind") else ""
    return f"validation {m.get('metric_name') or 'metric'} {_value(m.get('metric'))} (round {m.get('round')}{loss})"


def _progress(a: dict, rounds: str) -> str:
    counts: dict[str, int] = {}
    for s in a["peer_status"].values():
        counts[s["status"]] = counts.get(s["status"], 0) + 1
    peers = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no peer started yet"
    return f"{a['task']} {a['status']}: {peers} of {a['peers']}" + (f"; {rounds}" if rounds else "")


def _failure(runner: str, a: dict) -> str:
    lines = [f"task {a['task']} on {runner} {a['status']}"]
    for peer, s in sorted(a["peer_status"].items()):
        if s["status"] == PeerState.FAILED:
            if s["exit_code"] is None:
                lines.append(f"--- {peer} on {s['swop']} failed:")
            else:
                lines.append(f"--- {peer} on {s['swop']} exited {s['exit_code']}; its last log lines:")
            lines.extend(f"    {line}" for line in (s["detail"] or "(no output)").splitlines())
    return "\n".join(lines)


def _silent_swop(runner: str, a: dict, last_seen: dict[str, float]) -> str | None:
    """Why the task cannot end well, if a SWOP whose peers still run has gone silent. (A SWOP the SN
    has not heard from since it started is given the benefit of the doubt.)"""
    silent_after = default_patience() + SWOP_SILENT_SLACK
    running: dict[str, list[str]] = {}
    for peer, s in sorted(a["peer_status"].items()):
        if s["status"] in (PeerState.STARTING, PeerState.RUNNING):
            running.setdefault(s["swop"], []).append(peer)
    for swop, peers in sorted(running.items()):
        silent = last_seen.get(swop)
        if silent is not None and silent > silent_after:
            return (f"task {a['task']} on {runner}: {swop} stopped while its nodes ran (not heard from for "
                    f"{silent:.0f} s); its peers {', '.join(peers)} stopped with it. Start `swarm swop` again, then "
                    f"RESET TASKRUNNER {runner} and ASSIGN TASK {a['task']} to run it afresh")
    return None


def _key(client: SNClient) -> str:
    """The context address a client was made for, whichever of its SNs it talks to now."""
    return ",".join(client.addresses)


def _entry_hash(client: SNClient, index: int) -> str | None:
    """The hash of ledger entry `index` as the SN serves it (one entry read with Watch)."""
    stop = threading.Event()
    timer = threading.Timer(PIN_READ_TIMEOUT, stop.set)
    timer.start()
    entries = client.watch(index, stop)
    try:
        entry = next(entries, None)
    finally:
        entries.close()
        timer.cancel()
    return entry.hash if entry is not None else None


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SwarmError(f"{what} needs a number, not {text!r}") from None
