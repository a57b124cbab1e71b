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
from swarmlearn.ledger.model import AssignmentStatus, PeerState, RoundStatus
from swarmlearn.ledger.pin import PIN_FILE, HistoryRefused, Pin, PinFile, sn_refused
from swarmlearn.sn.client import SNClient, default_patience, parse_sn_addresses
from swarmlearn.swci.script import USAGE, Command

# The original waits this long for a task runner; we say what is going on all along.
DEFAULT_TASK_TIMEOUT = 120 * 60
WAIT_FOR_IP_TIMEOUT = 300.0
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
        --sn-api-port, for entries without one."""
        return ",".join(parse_sn_addresses(ip, int(port) if port else self.default_sn_port, "IP"))

    def _state(self, section: str) -> dict:
        return self._sn().query(section)[section]

    def _latest_metrics(self, contract: str) -> dict[str, dict]:
        """Each node's latest metrics entry of `contract`, of any kind."""
        return {node: kinds["latest"] for node, kinds in self._latest_by_kind(contract).items()}

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
        target = (self.cwd / path).resolve()
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

    def cmd_wait_for_ip(self, ip: str, port: str | None = None) -> None:
        address = self._address(ip, port)
        client = SNClient(address, self.identity)
        try:
            client.wait_ready(WAIT_FOR_IP_TIMEOUT)
            self.out(f"SN at {client.address} is up")
        finally:
            client.close()

    def cmd_wait_for_service(self, service: str | None = None) -> None:
        self._sn().wait_ready(WAIT_FOR_IP_TIMEOUT)

    def cmd_create_context(self, name: str, ip: str, port: str | None = None) -> None:
        address = self._address(ip, port)
        self._client(address)
        self.contexts[name] = address
        self.out(f"context {name}: SN at {address}")

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

    def cmd_create_contract(self, name: str, nodes: str | None = None) -> None:
        """With `nodes` (comma separated), only those nodes may join the contract and check in to its rounds."""
        payload: dict = {"name": name}
        if nodes is not None:
            payload["peers"] = [n for n in nodes.split(",") if n]
        self._sn().submit("contract_create", payload)

    def cmd_list_contracts(self) -> None:
        for name, c in self._state("contracts").items():
            self.out(f"{name}  members {len(c['members'])}  rounds merged "
                     f"{sum(1 for r in c['rounds'].values() if r['status'] == 'merged')}")

    def cmd_get_contract_info(self, name: str) -> None:
        contracts = self._state("contracts")
        if name not in contracts:
            raise SwarmError(f"no contract {name}; LIST CONTRACTS shows them")
        c = contracts[name]
        self._show({k: c[k] for k in ("name", "generation", "members", "current_round", "latest_merged_round",
                                      "min_peers")})

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
        self._sn().submit("task_finalize", {"name": name})

    def cmd_delete_task(self, name: str) -> None:
        self._sn().submit("task_delete", {"name": name})

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

    def cmd_list_nodes(self) -> None:
        state = self._sn().query("nodes")
        seen = state.get("last_seen", {})
        for node, n in sorted(state["nodes"].items()):
            heard = f"heard {seen[node]:.0f} s ago" if node in seen else "not heard since the SN started"
            self.out(f"{node}  {n['role']}  {n['address'] or '-'}  {n['subject']}  {heard}")

    def cmd_wait_for_taskrunner(self, runner: str, timeout: str | None = None) -> None:
        """Waits until the runner's task ends, saying what happens: peers starting, running, rounds
        merged; on FAILED shows the failing peers' exit codes and last log lines."""
        limit = _number(timeout, "timeout") if timeout else DEFAULT_TASK_TIMEOUT
        started = time.monotonic()
        last_line, last_progress = "", started
        while True:
            r, last_seen = self._runner_and_liveness(runner)
            a = r["assignment"]
            if a is None:
                raise SwarmError(f"task runner {runner} has no task assigned; ASSIGN TASK <task> TO {runner} first")
            line = _progress(a, self._rounds_line())
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

    def _rounds_line(self) -> str:
        """The training so far, per contract: the last merged round (participants, leader, how long
        its merge took) and each node's latest step and epoch."""
        parts = []
        for c in self._state("contracts").values():
            merged = [r for r in c["rounds"].values() if r["status"] == RoundStatus.MERGED]
            if not merged:
                continue
            last = max(merged, key=lambda r: r["number"])
            took = max(0.0, last["merged_time"] - last["closed_time"])
            line = (f"round {last['number']} merged ({','.join(last['participants'])}, leader {last['leader']}, "
                    f"{took:.2f} s)")
            latest = self._latest_metrics(c["name"])
            steps = ", ".join(f"{n} step {m.get('step')} epoch {float(m.get('epoch') or 0):.2f}"
                              for n, m in sorted(latest.items()))
            parts.append(line + (f"; {steps}" if steps else ""))
        return "; ".join(parts)


def _value(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "unknown"


def _train_text(m: dict | None) -> str:
    if m is None:
        return "no training loss yet"
    when = [f"round {m.get('round')}", *(f"{k} {m[k]:g}" for k in ("step", "epoch")
                                         if isinstance(m.get(k), (int, float)))]
    return f"training loss {_value(m.get('loss'))} ({', '.join(when)})"


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
