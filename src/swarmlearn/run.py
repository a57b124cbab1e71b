"""`swarm run`: on one host, what the multi-terminal walkthrough does — certificates, data, a
sentinel SN, a SWOP and the SWCI init script — with progress on the way and a result table at the
end. Beside the swarm, the same model.py trains without it (each node alone on its shard, and one
model on all shards pooled), so that the table and result.png show what the swarm gained. Every
process started is stopped at the end (and on Ctrl-C) unless asked to keep them.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from swarmlearn.errors import ConfigError, SwarmError
from swarmlearn.ledger.model import RoundStatus
from swarmlearn.pki import CertLayout, Identity, generate_host_certs, load_cert, org_name, swarm_id
from swarmlearn.swop.runtime import Handle, ProcessRuntime, Spec

READY_TIMEOUT = 60.0


@dataclass
class RunOptions:
    example: Path
    workspace: Path = Path("workspace")
    nodes: int = 3
    max_epochs: float = 1.5  # over a full shard: every node trains that many steps (see _steps_per_node)
    train_per_node: int = 960
    test_size: int = 1000
    label_skew: float = 0.8
    last_node_rows: int | None = None  # None: see last_shard_rows()
    sync_frequency: int | None = None
    merge_method: str | None = None
    baselines: bool = True  # each node alone and all shards pooled, trained beside the swarm
    keep: bool = False
    seed: int = 42
    tensorboard: Path | None = None  # each node's metrics as TensorBoard event files, in <tensorboard>/<node>


@dataclass
class RunResult:
    ok: bool
    project: Path
    nodes: list[dict] = field(default_factory=list)
    rounds: int = 0
    bytes_per_round: int = 0
    wall_seconds: float = 0.0
    baselines: list[dict] = field(default_factory=list)
    swarm_curve: list[tuple[float, float]] = field(default_factory=list)  # (step, validation accuracy) per merge
    shards: list[str] = field(default_factory=list)  # each node's share of the data, in words
    plot: Path | None = None
    # level ("record-level", "client-level") -> node -> (ε spent, δ), where it reported any.
    privacy: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)


class SwarmRun:
    def __init__(self, options: RunOptions, out: Callable[[str], None] = print):
        self.o = options
        self.out = out
        example = Path(options.example).resolve()
        for part in ("model", "swci", "swop"):
            if not (example / part).is_dir():
                raise ConfigError(f"{example}: not an example folder (it needs model/, swci/ and swop/)")
        if options.nodes < 1:
            raise ConfigError("--nodes must be at least 1")
        self.example = example
        self.project = (Path(options.workspace) / example.name).resolve()
        self.certs = CertLayout(self.project / "cert", 1)
        self.runs = self.project / "runs"
        # Kept processes must outlive this one: unsupervised, they are left to `swarm stop`.
        self.runtime = ProcessRuntime(self.runs, supervised=not options.keep)
        self.handles: list[Handle] = []
        self.baseline_handles: list[tuple[str, Handle]] = []

    # ------------------------------------------------------------------------------ the run

    def run(self) -> RunResult:
        started = time.monotonic()
        self._prepare_project()
        try:
            sn_port = self._start_sn()
            self._start_dashboard(sn_port)
            self._start_swop(sn_port)
            if self.o.baselines:
                self._start_baselines()
            ok = self._run_swci(sn_port)
            result = self._collect(ok, sn_port)
            if ok and self.o.baselines:
                result.baselines = self._finish_baselines()
        finally:
            if self.o.keep:
                self.out(f"kept running; stop with: swarm stop --workspace {self.runs}")
                self._stop_baselines()
            else:
                self.stop()
        result.wall_seconds = time.monotonic() - started
        result.shards = self._shard_shares()
        if ok and result.nodes:
            result.plot = self._plot(result)
        return result

    def stop(self) -> None:
        self._stop_baselines()
        for handle in reversed(self.handles):
            handle.stop(grace=15.0)
        self.handles.clear()

    def _stop_baselines(self) -> None:
        for _, handle in self.baseline_handles:
            handle.stop(grace=5.0)
        self.baseline_handles.clear()

    # ------------------------------------------------------------------------------ set-up

    def _prepare_project(self) -> None:
        from swarmlearn.datasets import prepare

        self.out(f"workspace: {self.project}")
        for stale in ("runs", "sn", "saved_models", "baselines", "model", "swci", "swop"):
            shutil.rmtree(self.project / stale, ignore_errors=True)
        shutil.copytree(self.example, self.project, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.csv", "__pycache__", "saved_models"))
        for path in [*self.project.joinpath("swci").rglob("*"), *self.project.joinpath("swop").rglob("*")]:
            if path.is_file():
                text = path.read_text()
                path.write_text(text.replace("<PROJECT-CERTS>", str(self.certs.root))
                                .replace("<PROJECT>", str(self.project)))
        self._set_sizes()
        nodes = [f"node{i}" for i in range(1, self.o.nodes + 1)]
        if not self._certs_ready(nodes):
            generate_host_certs(self.certs.root, 1, org=org_name(self.example.name), nodes=nodes, force=True)
            self.out(f"certificates: {self.certs.root} (organization {org_name(self.example.name)}, "
                     f"one per component and per node)")
        prepare(self.project / "data", self.o.nodes, self.o.train_per_node, self.o.test_size, self.o.seed,
                self.o.label_skew, last_shard_rows(self.o))
        self.out(f"data: {self.o.test_size} test reviews and one shard per node in {self.project / 'data'}, "
                 f"label skew {self.o.label_skew:g}: {', '.join(self._shard_shares())} (IID shards of equal "
                 f"size: --label-skew 0)")

    def _set_sizes(self) -> None:
        """Writes --nodes, --max-epochs (and friends) into the copied profile, taskdef and script."""
        from swarmlearn.yamlfile import dump_yaml, load_yaml  # pydantic and ruamel: only when a run starts

        profile_path = next(self.project.joinpath("swop").glob("*.yaml"))
        profile = load_yaml(profile_path)[0]
        template = profile["nodes"][0]["slnodedef"]
        nodes = []
        for i in range(1, self.o.nodes + 1):
            node = json.loads(json.dumps(template).replace('sl1', f'sl{i}').replace('node1', f'node{i}')
                              .replace('N1.csv', f'N{i}.csv'))
            node["idx"] = i
            nodes.append({"slnodedef": node})
        profile["nodes"] = nodes
        profile_path.write_text(dump_yaml(profile))
        for taskdef_path in self.project.joinpath("swci").rglob("*.yaml"):
            task = load_yaml(taskdef_path)[0]
            if task.get("TaskType") != "RUN_SWARM":
                continue
            envvars = task["Body"].get("Envvars") or []
            # Steps rather than epochs: a small shard is gone through more often, and every node merges
            # at the same steps.
            batch = int(next((e["BATCH_SIZE"] for e in envvars if "BATCH_SIZE" in e), 16))
            steps = math.ceil(self.o.train_per_node / batch * self.o.max_epochs)
            settings = {"MAX_EPOCHS": self.o.max_epochs, "MAX_STEPS": steps, "MIN_PEERS": self.o.nodes,
                        "SYNC_FREQUENCY": self.o.sync_frequency, "MERGE_METHOD": self.o.merge_method}
            envvars = [e for e in envvars if not (set(e) & {k for k, v in settings.items() if v is not None})]
            envvars += [{k: v} for k, v in settings.items() if v is not None]
            task["Body"]["Envvars"] = envvars
            taskdef_path.write_text(dump_yaml(task))
        script = self.project / "swci" / "swci-init"
        script.write_text(re.sub(r"(ASSIGN TASK \S+ TO \S+ WITH )(\d+)( PEERS)",
                                 lambda m: m.group(1) + (m.group(2) if m.group(2) == "1" else str(self.o.nodes))
                                 + m.group(3), script.read_text()))

    def _certs_ready(self, nodes: list[str]) -> bool:
        """Whether the workspace holds role-bound certificates for every component and node (older
        workspaces hold certificates without roles: those are made anew)."""
        needed = [self.certs.cert("sn"), self.certs.cert("swop"), self.certs.cert("swci"),
                  *(self.certs.node_cert(n) for n in nodes)]
        try:
            return all(swarm_id(load_cert(path)) is not None for path in needed)
        except SwarmError:
            return False

    def _ids(self, component: str) -> list[str]:
        return ["--key", str(self.certs.key(component)), "--cert", str(self.certs.cert(component)),
                "--capath", str(self.certs.capath)]

    def _spawn(self, name: str, *args: str) -> Handle:
        handle = self.runtime.start(Spec(name, [sys.executable, "-m", "swarmlearn.cli", *args], self.project,
                                         {**_env(), **self._tensorboard_env()}, self.runs / f"{name}.log"))
        self.handles.append(handle)
        return handle

    def _tensorboard_env(self) -> dict[str, str]:
        """Where the nodes' callbacks write TensorBoard events (the SWOP passes its environment on to them)."""
        from swarmlearn.callback.core import TENSORBOARD_ENV

        return {TENSORBOARD_ENV: str(Path(self.o.tensorboard).resolve())} if self.o.tensorboard else {}

    def _start_sn(self) -> int:
        sn = self._spawn("sn", "sn", "--sentinel", "--host-ip", "127.0.0.1", "--sn-api-port", "0",
                         *self._ids("sn"), "--data-dir", str(self.project / "sn"))
        line = sn.wait_ready(READY_TIMEOUT)  # "SN ready on HOST:PORT (sentinel) as ...", over its readiness pipe
        self.out(line)
        try:
            return int(line.split("SN ready on ")[1].split()[0].rsplit(":", 1)[1])
        except (IndexError, ValueError):
            raise SwarmError(f"the SN announced {line!r}, which names no HOST:PORT") from None

    def _start_dashboard(self, sn_port: int) -> None:
        """`swarm ui` on 127.0.0.1 with the run's ui certificate: port 30306 when free, else one the OS
        chooses. It prints its URL; a workspace without a ui certificate (made before there was one)
        runs without it."""
        from swarmlearn.ui.serve import UI_PORT, bind

        if not self.certs.cert("ui").is_file():
            self.out(f"dashboard: not started ({self.certs.cert('ui')} is missing; delete {self.certs.root} to have "
                     f"certificates made anew)")
            return
        try:
            bind("127.0.0.1", UI_PORT).close()
            port = UI_PORT
        except ConfigError:
            port = 0
        ui = self._spawn("ui", "ui", "--sn-ip", f"127.0.0.1:{sn_port}", *self._ids("ui"), "--port", str(port))
        self.out(ui.wait_ready(READY_TIMEOUT))

    def _start_swop(self, sn_port: int) -> None:
        swop = self._spawn("swop", "swop", "--sn-ip", "127.0.0.1", "--sn-api-port", str(sn_port), "--usr-dir",
                           str(self.project), "--profile-file-name", "swop_profile.yaml", *self._ids("swop"),
                           "--workspace", str(self.runs), *(["--keep-nodes"] if self.o.keep else []))
        self.out(swop.wait_ready(READY_TIMEOUT))

    def _run_swci(self, sn_port: int) -> bool:
        from swarmlearn.swci.script import parse_script
        from swarmlearn.swci.session import SwciSession

        identity = Identity.load(self.certs.key("swci"), self.certs.cert("swci"), self.certs.capath)
        session = SwciSession(identity, self.project / "swci", out=self.out, default_sn_port=sn_port)
        try:
            script = self.project / "swci" / "swci-init"
            return session.run(parse_script(script), "swci-init") == 0
        finally:
            session.close()

    # ------------------------------------------------------------------------------ results

    def _collect(self, ok: bool, sn_port: int) -> RunResult:
        from swarmlearn.sn.client import SNClient

        result = RunResult(ok, self.project)
        models = self.project / "saved_models"
        for i in range(1, self.o.nodes + 1):
            path = models / f"node{i}" / "metrics.json"
            if path.is_file():
                result.nodes.append(json.loads(path.read_text()))
        identity = Identity.load(self.certs.key("swci"), self.certs.cert("swci"), self.certs.capath)
        try:
            with SNClient(f"127.0.0.1:{sn_port}", identity, unreachable_timeout=5) as sn:
                contracts = sn.query("contracts")["contracts"]
                result.swarm_curve = swarm_curve(sn, list(contracts))
                result.privacy = privacy_spent(sn, list(contracts))
        except SwarmError:
            return result
        # The counters count every merged round; the rounds listed are the newest ones the state keeps.
        result.rounds = sum(c["rounds_merged"] for c in contracts.values())
        merged = [r for c in contracts.values() for r in c["rounds"].values() if r["status"] == RoundStatus.MERGED]
        sizes = [ch["size"] for r in merged for ch in r["checkins"].values()]
        result.bytes_per_round = max(sizes, default=0)
        return result

    def _start_baselines(self) -> None:
        """The same model.py without the swarm, started now so that it trains while the swarm does:
        each node alone on its shard (evaluated at the steps where the swarm merges), and one model
        on all shards pooled, for as many steps as the whole swarm (so it sees as many reviews)."""
        from swarmlearn.datasets import pool

        data = self.project / "data"
        pool(data / "pooled.csv", [data / f"N{i}.csv" for i in range(1, self.o.nodes + 1)])
        settings = self._run_task_envvars()
        out_dir = self.project / "baselines"
        shutil.rmtree(out_dir, ignore_errors=True)
        runs = [(f"node{i}", f"N{i}.csv", {}) for i in range(1, self.o.nodes + 1)]
        # Pooled, no curve is drawn: it is measured once, at its last step.
        runs.append(("pooled", "pooled.csv", {"SYNC_FREQUENCY": str(10 ** 9),
                                              "MAX_STEPS": str(self.o.nodes * self._steps_per_node())}))
        for node, train_file, extra in runs:
            env = {**_env(), **settings, "NODE_ID": node, "TRAIN_FILE": train_file, "DATA_DIR": str(data),
                   "MODEL_DIR": str(out_dir), "SWARM_LOOPBACK": "1", **extra}
            handle = self.runtime.start(Spec(f"baseline-{node}", [sys.executable, "model/model.py"], self.project,
                                             env, out_dir / f"{node}.log"))
            self.baseline_handles.append((node, handle))
        self.out(f"baselines: {', '.join(n for n, _, _ in runs[:-1])} alone on their own shards and one model on "
                 f"all shards pooled train now, beside the swarm, with its settings ({self._steps_per_node()} steps "
                 f"each; pooled: {self.o.nodes} x as many, the swarm's total); logs in {out_dir}")

    def _finish_baselines(self) -> list[dict]:
        """Waits for the baselines started beside the swarm; their metrics, those that finished."""
        results = []
        if any(h.poll() is None for _, h in self.baseline_handles):
            self.out("waiting for the baselines to finish ...")
        out_dir = self.project / "baselines"
        for node, handle in self.baseline_handles:
            handle.popen.wait()
            code = handle.poll()
            metrics = out_dir / node / "metrics.json"
            if code != 0 or not metrics.is_file():
                self.out(f"baseline {node} failed (exit {code}); see {out_dir / (node + '.log')}")
                continue
            kind = "pooled" if node == "pooled" else "local-only"
            results.append({"kind": kind, **json.loads(metrics.read_text())})
        self.baseline_handles.clear()
        return results

    def _steps_per_node(self) -> int:
        return int(self._run_task_envvars()["MAX_STEPS"])

    def _shard_shares(self) -> list[str]:
        from swarmlearn.datasets import read_csv

        shares = []
        for i in range(1, self.o.nodes + 1):
            path = self.project / "data" / f"N{i}.csv"
            rows = read_csv(path) if path.is_file() else []
            shares.append(f"node{i} {100 * sum(label for _, label in rows) / max(1, len(rows)):.0f} % fresh, "
                          f"{len(rows)} reviews")
        return shares

    def _plot(self, result: RunResult) -> Path | None:
        from swarmlearn.result_plot import ResultFigure, write_result_plot

        alone = {b["node"]: [tuple(p) for p in b.get("curve", [])] for b in result.baselines
                 if b["kind"] == "local-only"}
        finals = [(f"{b['node']} alone", b["after"]["accuracy"]) for b in result.baselines if b["kind"] == "local-only"]
        finals.append(("swarm", result.nodes[0]["after"]["accuracy"]))
        finals += [("pooled (centralized)", b["after"]["accuracy"]) for b in result.baselines if b["kind"] == "pooled"]
        test_rows = result.nodes[0].get("test_rows", self.o.test_size)
        figure = ResultFigure(result.swarm_curve, alone, finals, noise_band(result.nodes[0]["after"]["accuracy"],
                                                                             test_rows),
                              result.nodes[0].get("eval_rows", test_rows), test_rows,
                              title=f"{self.o.nodes} nodes, label skew {self.o.label_skew:g} "
                                    f"({', '.join(result.shards)})")
        try:
            return write_result_plot(self.project / "result.png", figure)
        except (OSError, ValueError) as exc:
            self.out(f"result.png not written: {exc}")
            return None

    def _run_task_envvars(self) -> dict[str, str]:
        """The hyperparameters the swarm ran with (the RUN_SWARM task's Envvars), for the baselines."""
        from swarmlearn.swci.taskdef import load_taskdef

        for path in self.project.joinpath("swci").rglob("*.yaml"):
            payload = load_taskdef(path).to_ledger_payload()
            if payload["type"] == "RUN_SWARM":
                return {k: v for k, v in payload["body"]["Envvars"].items() if k != "MODEL_DIR"}
        return {}


def last_shard_rows(options: RunOptions) -> int | None:
    """The last node's shard size, unless set: label-skewed with an odd number of nodes, the last
    node is the balanced odd one out (see datasets.split), and gets a twelfth of the others' reviews
    so that it too is weak alone, for want of data; otherwise all shards are equal."""
    if options.last_node_rows is not None:
        return options.last_node_rows
    if options.label_skew > 0 and options.nodes > 1 and options.nodes % 2 == 1:
        return max(1, options.train_per_node // 12)
    return None


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def swarm_curve(sn, contracts: list[str]) -> list[tuple[float, float]]:
    """(step, accuracy) of each merged model the nodes measured (every EVAL_EVERY-th), from their
    `validation` entries on the ledger (every node measures the same merged model: their mean, per
    round)."""
    by_round: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for contract in contracts:
        for m in sn.metrics(contract)[0]:
            if m.get("kind") == "validation" and m.get("metric_name") == "accuracy" and m.get("metric") is not None:
                by_round.setdefault((contract, m["round"]), []).append((m["step"], m["metric"]))
    return sorted((sum(s for s, _ in v) / len(v), sum(a for _, a in v) / len(v)) for v in by_round.values())


# What each level of DP records in a node's train entries: (ε, δ) keys.
PRIVACY_LEVELS = {"record-level": ("epsilon", "delta"), "client-level": ("client_epsilon", "client_delta")}


def privacy_spent(sn, contracts: list[str]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per level of DP (swarmlearn.dp: record-level DP-SGD, client-level noise of secure_mean), each
    node's last reported (ε, δ), from its train entries; nodes and levels without any are absent."""
    spent: dict[str, dict[str, tuple[float, float]]] = {}
    for contract in contracts:
        for m in sn.metrics(contract)[0]:
            if m.get("kind") not in (None, "train"):
                continue
            for level, (eps, delta) in PRIVACY_LEVELS.items():
                if isinstance(m.get(eps), (int, float)) and isinstance(m.get(delta), (int, float)):
                    spent.setdefault(level, {})[m["node"]] = (float(m[eps]), float(m[delta]))
    return spent


def noise_band(accuracy: float, test_rows: int) -> float:
    """The 95 % half-width of a binomial proportion: how far an accuracy measured on `test_rows`
    reviews may be from the model's true one by chance alone."""
    return 1.96 * math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(1, test_rows))


def format_table(result: RunResult) -> list[str]:
    """The comparison: each node alone, the swarm, all shards pooled; then the noise band and the
    run's costs."""
    lines = [f"{'model':<58} {'accuracy':>8} {'F1':>6} {'train s':>7}"]
    alone = [b for b in result.baselines if b["kind"] == "local-only"]
    pooled = [b for b in result.baselines if b["kind"] == "pooled"]
    shares = dict(enumerate(result.shards))
    for i, b in enumerate(alone):
        label = f"{b['node']} alone, on its own shard ({shares.get(i, '').split(' ', 1)[-1]})"
        lines.append(_row(label, b))
    if result.nodes:
        same = len({n["after"]["accuracy"] for n in result.nodes}) == 1
        lines.append(_row("swarm (every node ends with this same model)" if same else
                          "swarm, node1 (the nodes' final models differ!)", result.nodes[0]))
    for b in pooled:
        lines.append(_row("all shards pooled: the centralized reference", b))
    if not result.nodes:
        return lines + [f"no node finished; wall time {result.wall_seconds:.0f} s"]
    swarm = result.nodes[0]["after"]["accuracy"]
    test_rows = result.nodes[0].get("test_rows", 0)
    band = noise_band(swarm, test_rows)
    lines.append(f"on {test_rows} test reviews, ±{band:.3f} is noise (95 % binomial half-width at the swarm's "
                 f"accuracy)")
    if alone:
        margin = swarm - max(b["after"]["accuracy"] for b in alone)
        verdict = "more than the noise band" if margin > band else "within the noise band: no clear gain"
        lines.append(f"the swarm {'beats' if margin > 0 else 'trails'} the best node alone by {abs(margin):.3f}, "
                     f"{verdict}")
    if pooled:
        lines.append("pooling every shard in one place is what a swarm replaces; it is a reference, not a ceiling "
                     "(on IID shards the swarm has beaten it)")
        lines.append("the baselines trained beside the swarm, with its settings: each node alone as many steps on "
                     "its shard as each swarm node, the pooled model on all shards as many steps as the swarm's "
                     "nodes together")
    for level, nodes in sorted(result.privacy.items(), reverse=True):
        spent = (f"ε={eps:.3g} at δ={delta:g} ({node})" for node, (eps, delta) in sorted(nodes.items()))
        lines.append(f"privacy: {level} DP, " + ", ".join(spent))
    lines.append(f"{result.rounds} rounds merged; {result.bytes_per_round / 1e6:.2f} MB sent per node per round "
                 f"(adapters + head); wall time {result.wall_seconds:.0f} s")
    if result.plot:
        lines.append(f"result.png: {result.plot}")
    return lines


def _row(label: str, metrics: dict) -> str:
    after = metrics["after"]
    return f"{label:<58} {after['accuracy']:>8.3f} {after['f1']:>6.3f} {metrics['train_seconds']:>7.0f}"
