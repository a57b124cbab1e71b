"""Our swarm and Flower 1.42 side by side on the same workload (shared/DATA.md, "The comparison
workload"): packaged MiniLM + LoRA, three nodes with 1,000 review snippets each, 16 optimizer steps
a round, sample-weighted mean of the adapters + head, 4 rounds, accuracy on 2,000 test snippets.

Both run as real processes on 127.0.0.1, the workload code is one module (bench/flower/workload.py):
- swarm: `swarm sn` (sentinel) + 3 `swarm sl` (mTLS) + 3 ML processes (bench/flower/swarm_node.py,
  swarmlearn.torch.SwarmCallback);
- Flower: deployment mode, `flower-superlink` + 3 `flower-supernode` (--insecure: no TLS) and
  `flwr run` of the Flower App in bench/flower/app (FedAvg), in Flower's own venv made by
  `bash bench/flower/setup.sh` (flwr needs protobuf<7, we need >=7.35).

    python -m bench flower [--quick] [--exchange-only] [--rounds N] [--only swarm|flower]

--quick: a smoke run, 2 nodes x 32 rows, 1 round of 2 steps, 32 test rows.
--prepare: only build Flower's venv if it is missing (what `python -m bench all` does before timing).
--exchange-only: no local steps, 20 rounds (6 with --quick): what each framework adds per round.
Figures go to bench/results/flower.json under the variant's name.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE / "flower"))
import workload as wl  # noqa: E402
from bench import write_figures  # noqa: E402
from bench._swarm import LocalSwarm  # noqa: E402

FLOWER_DIR = HERE / "flower"
FLOWER_VENV = FLOWER_DIR / ".venv"
RESULTS = HERE / "results"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def node_names(w: wl.Workload) -> list[str]:
    return [f"node{i + 1}" for i in range(w.nodes)]


class Stop(Exception):
    pass


def _on_term(signum, frame):
    raise Stop(f"signal {signum}")


# ------------------------------------------------------------------------------ processes by pid

class Procs:
    """Processes this benchmark started, each in its own session; stopped with all their
    descendants, by pid, whatever happens."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, cmd: list[str], env: dict, cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        log.close()
        self.started.append(p)
        return p

    def tail(self, name: str, lines: int = 25) -> str:
        path = self.logdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        import psutil

        victims: dict[int, psutil.Process] = {}
        for p in self.started:
            try:
                root = psutil.Process(p.pid)
                for q in [root, *root.children(recursive=True)]:
                    victims[q.pid] = q
            except psutil.NoSuchProcess:
                pass
        for q in victims.values():
            try:
                q.send_signal(signal.SIGCONT)
                q.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(victims.values()), timeout=10)
        for q in alive:
            try:
                q.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        for p in self.started:
            p.poll()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not open port {port} in {timeout} s")


def spread(values: list[float]) -> dict:
    return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values), "all_s": values}


# ------------------------------------------------------------------------------------------ swarm

def run_swarm(w: wl.Workload, work: Path) -> dict:
    t0 = time.time()
    work.mkdir(parents=True, exist_ok=True)
    swarm = LocalSwarm(work / "swarm")
    procs = Procs(work)
    names = node_names(w)
    try:
        swarm.start_sn()
        for n in names:
            swarm.start_sl(n)
        env = {**os.environ, **OFFLINE, "VARIANT": w.name, "ROUNDS": str(w.rounds)}
        mls = {}
        for i, n in enumerate(names):
            mls[n] = procs.start(f"swarm-{n}-ml", [sys.executable, str(FLOWER_DIR / "swarm_node.py")], cwd=FLOWER_DIR,
                                 env={**env, "NODE_ID": n, "NODE_INDEX": str(i), "SWARM_SL_ADDR": swarm.sl_addresses[n],
                                      "OUT_FILE": str(work / f"swarm-{n}.json"), "EVALUATE": "1" if i == 0 else "0"})
        for n, p in mls.items():
            code = p.wait(timeout=3600)
            if code != 0:
                raise RuntimeError(f"swarm {n} ML exited {code}:\n{procs.tail(f'swarm-{n}-ml')}\n--- its SL:\n"
                                   + "\n".join(swarm.sls[n].lines[-15:]))
        t_end = time.time()
    finally:
        procs.stop()
        swarm.stop()
    nodes = {n: json.loads((work / f"swarm-{n}.json").read_text()) for n in names}
    ends = [max(nodes[n]["synced"][r] for n in names) for r in range(w.rounds + 1)]
    per_round = [b - a for a, b in zip(ends, ends[1:])]
    payload = statistics.median(b for n in names for b in nodes[n]["blob_bytes"])
    fingerprints = {nodes[n]["fingerprint"] for n in names}
    return {
        "framework": "swarmlearn", "transport": "gRPC, mutual TLS between SLs; ML<->SL on a local channel",
        "per_round": spread(per_round),
        "rounds_total_s": ends[-1] - ends[0],
        "initial_sync_s": ends[0] - max(nodes[n]["ready"] for n in names),
        "startup_s": max(nodes[n]["ready"] for n in names) - t0,
        "end_to_end_s": t_end - t0,
        "payload_bytes_per_node": payload,
        # The leader pulls the n-1 other contributions and the n-1 others pull the merged model;
        # the leader's own blob and the ML<->SL hand-over stay on each node.
        "bytes_per_round_between_nodes": 2 * (w.nodes - 1) * payload,
        "bytes_per_round_local": 2 * w.nodes * payload,
        "accuracy": nodes["node1"]["accuracy"],
        "same_model_on_all_nodes": len(fingerprints) == 1,
        "fingerprint": sorted(fingerprints)[0][:16],
        "losses": {n: nodes[n]["losses"] for n in names},
    }


# ----------------------------------------------------------------------------------------- flower

def flower_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(OFFLINE)
    env.update({"PATH": f"{FLOWER_VENV / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}", "VIRTUAL_ENV": str(FLOWER_VENV),
                "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})
    return env


def run_flower(w: wl.Workload, work: Path, echo: bool = False) -> dict:
    t0 = time.time()
    tag = "flower-echo" if echo else "flower"
    work = work / tag
    home = work / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    env = flower_env(home)
    link_port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')
    out = work / "flower-server.json"
    procs = Procs(work)
    bin_ = FLOWER_VENV / "bin"
    try:
        link = procs.start("flower-superlink", [str(bin_ / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                                "--port", str(link_port), "--isolation", "subprocess",
                                                "--disable-runtime-dependency-installation"], env=env, cwd=work)
        wait_port(link_port, link, "flower-superlink")
        for i, n in enumerate(node_names(w)):
            procs.start(f"flower-{n}-supernode",
                        [str(bin_ / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                         "--host", "127.0.0.1", "--port", str(free_port()), "--isolation", "subprocess",
                         "--node-config", f"partition-id={i} num-partitions={w.nodes}"], env=env, cwd=work)
        run = procs.start("flwr-run", [str(bin_ / "flwr"), "run", str(FLOWER_DIR / "app"), "bench", "--stream",
                                       "--run-config", f'variant="{w.name}" rounds={w.rounds} out="{out}" '
                                                       f'echo={"true" if echo else "false"}'],
                          env=env, cwd=work)
        deadline = time.time() + 3600
        while not out.exists():
            if time.time() > deadline:
                raise RuntimeError("Flower run did not finish in an hour")
            if run.poll() is not None and not out.exists():
                time.sleep(2)
                if not out.exists():
                    raise RuntimeError(f"flwr run exited {run.returncode} without a result:\n"
                                       f"{procs.tail('flwr-run', 40)}\n--- superlink:\n"
                                       f"{procs.tail('flower-superlink', 40)}")
            time.sleep(0.5)
        t_end = time.time()
    finally:
        procs.stop()
    server = json.loads(out.read_text())
    rounds = server["rounds"]
    per_round = [r["end"] - r["start"] for r in rounds]
    payload = statistics.median(r["sent_bytes_each"] for r in rounds)
    back = statistics.median(rep["payload-bytes"] for r in rounds for rep in r["replies"])
    startup = [rep["startup-s"] for r in rounds for rep in r["replies"]]
    data = [rep["data-s"] for r in rounds for rep in r["replies"]]
    build = [rep["build-s"] for r in rounds for rep in r["replies"]]
    train = [rep["train-s"] for r in rounds for rep in r["replies"]]
    return {
        "framework": "flwr 1.42.0" + (", ClientApp without a model (echo)" if echo else ""),
        "transport": "deployment mode, HTTP without TLS (--insecure)",
        "per_round": spread(per_round),
        "rounds_total_s": rounds[-1]["end"] - rounds[0]["start"],
        "startup_s": server["strategy_started"] - t0,
        "end_to_end_s": t_end - t0,
        "payload_bytes_per_node": payload,
        # The ServerApp sends the global arrays to each of the n SuperNodes and each sends its
        # arrays back (SuperLink <-> SuperNode); ServerApp <-> SuperLink and SuperNode <->
        # ClientApp hops stay on their hosts.
        "bytes_per_round_between_nodes": w.nodes * payload + w.nodes * back,
        "accuracy": server["accuracy"],
        "fingerprint": server["fingerprint"][:16],
        "clientapp_per_round": {"process_start_to_app_s": statistics.median(startup),
                                "data_load_s": statistics.median(data), "model_build_s": statistics.median(build),
                                "train_s": statistics.median(train)},
        "losses": [[rep["train-loss"] for rep in sorted(r["replies"], key=lambda x: x["node"])] for r in rounds],
    }


# ------------------------------------------------------------------------------------------ report

ROWS = [("per round, median (s)", lambda r: r["per_round"]["median_s"], "{:.2f}"),
        ("per round, min (s)", lambda r: r["per_round"]["min_s"], "{:.2f}"),
        ("per round, max (s)", lambda r: r["per_round"]["max_s"], "{:.2f}"),
        ("all rounds (s)", lambda r: r["rounds_total_s"], "{:.1f}"),
        ("start-up (s)", lambda r: r["startup_s"], "{:.1f}"),
        ("end to end (s)", lambda r: r["end_to_end_s"], "{:.1f}"),
        ("payload per node (KB)", lambda r: r["payload_bytes_per_node"] / 1e3, "{:.1f}"),
        ("bytes/round between nodes (KB)", lambda r: r["bytes_per_round_between_nodes"] / 1e3, "{:.1f}"),
        ("final accuracy", lambda r: r["accuracy"], "{:.3f}")]


def table(results: dict[str, dict]) -> str:
    names = list(results)
    others = [n for n in names if n != "swarm"] if "swarm" in names else []
    head = f"{'':32}" + "".join(f"{n:>12}" for n in names) + "".join(f"{n + '/swarm':>18}" for n in others)
    lines = [head]
    for label, get, fmt in ROWS:
        values = {n: get(results[n]) for n in names}
        cells = "".join(f"{fmt.format(v) if v is not None else '-':>12}" for v in values.values())
        if label != "final accuracy":
            cells += "".join(f"{values[n] / values['swarm']:>17.1f}x" if values["swarm"] else f"{'':>18}"
                             for n in others)
        lines.append(f"{label:32}{cells}")
    return "\n".join(lines)


def ratios(results: dict[str, dict]) -> dict:
    s = results.get("swarm")
    out = {}
    for name, r in results.items():
        if name == "swarm" or not s:
            continue
        out[f"{name}/swarm"] = {"per_round_median": r["per_round"]["median_s"] / s["per_round"]["median_s"],
                                "rounds_total": r["rounds_total_s"] / s["rounds_total_s"],
                                "end_to_end": r["end_to_end_s"] / s["end_to_end_s"],
                                "bytes_per_round_between_nodes": r["bytes_per_round_between_nodes"]
                                / s["bytes_per_round_between_nodes"]}
    return out


def ensure_flower_venv() -> None:
    """Builds Flower's venv on first use only; later runs (and `all --quick`) reuse it."""
    if (FLOWER_VENV / ".installed").exists():
        return
    print(f"Flower's own venv is missing: building it in {FLOWER_VENV} with bench/flower/setup.sh, first use only "
          f"(about 1.5 min; later runs reuse it) ...", flush=True)
    started = time.monotonic()
    if subprocess.call(["bash", str(FLOWER_DIR / "setup.sh")]) != 0:
        sys.exit("bench/flower/setup.sh failed; see its output above (or run with --only swarm)")
    print(f"Flower's venv built in {time.monotonic() - started:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 nodes x 32 rows, 1 round of 2 steps")
    parser.add_argument("--prepare", action="store_true", help="only build Flower's venv if it is missing")
    parser.add_argument("--exchange-only", action="store_true", help="0 local steps, 20 rounds (6 with --quick)")
    parser.add_argument("--rounds", type=int, help="override the variant's number of rounds")
    parser.add_argument("--only", choices=["swarm", "flower"], help="run one side only (development)")
    parser.add_argument("--no-echo", action="store_true", help="exchange-only: skip Flower's model-free ClientApp")
    parser.add_argument("--out", type=Path, default=RESULTS / "flower.json")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (logs) for inspection")
    args = parser.parse_args()

    name = "exchange-only" if args.exchange_only else "quick" if args.quick else "full"
    rounds = args.rounds or (6 if args.exchange_only and args.quick else None)
    w = wl.variant(name, rounds)
    key = name + ("-quick" if args.exchange_only and args.quick else "")
    if args.prepare or args.only != "swarm":
        ensure_flower_venv()
    if args.prepare:
        return
    signal.signal(signal.SIGTERM, _on_term)
    work = Path(tempfile.mkdtemp(prefix="bench-flower-"))
    print(f"workload {key}: {w.nodes} nodes x {w.shard_rows} rows, {w.rounds} rounds x {w.steps_per_round} steps "
          f"(batch {wl.BATCH}), test {w.test_size}; logs in {work}", flush=True)
    results: dict[str, dict] = {}
    load_before = os.getloadavg()
    try:
        if args.only != "flower":
            print(f"swarm: SN + {w.nodes} SL (mTLS) + {w.nodes} ML processes ...", flush=True)
            results["swarm"] = run_swarm(w, work)
        if args.only != "swarm":
            print(f"flower: superlink + {w.nodes} supernodes (--insecure, no TLS) + flwr run ...", flush=True)
            results["flower"] = run_flower(w, work)
            if not w.steps_per_round and not args.no_echo:
                print("flower-echo: the same, with a ClientApp that builds no model ...", flush=True)
                results["flower-echo"] = run_flower(w, work, echo=True)
        for n, r in results.items():
            print(f"{n}: {w.rounds} rounds in {r['rounds_total_s']:.1f} s, accuracy {r['accuracy']}", flush=True)
    except (KeyboardInterrupt, Stop):
        print(f"interrupted; every process started was stopped. Logs: {work}", file=sys.stderr)
        sys.exit(130)
    print()
    print(table(results))
    print()
    if "swarm" in results:
        print(f"swarm: SN + {w.nodes} SL processes (gRPC, mutual TLS) + {w.nodes} ML processes (SwarmCallback); "
              "a round is timed from the previous merged model loaded on every node to this one's (ML side).")
    if "flower" in results:
        c = results["flower"]["clientapp_per_round"]
        print(f"flower: deployment mode (flower-superlink + {w.nodes} flower-supernode, --insecure: no TLS), FedAvg; "
              f"a round is timed in the ServerApp from configure_train to aggregate_train done. Flower starts a fresh "
              f"ClientApp process per node per round: medians {c['process_start_to_app_s']:.1f} s from process "
              f"start to the app, "
              f"{c['data_load_s']:.1f} s loading data, {c['model_build_s']:.1f} s building the model, "
              f"{c['train_s']:.1f} s training. Its SuperNode polls the SuperLink every 3 s when idle and the ServerApp "
              f"polls for replies every 3 s (Flower 1.42 defaults).")
    if "flower-echo" in results:
        print("flower-echo: a ClientApp that loads no model and returns the arrays it got: Flower's own floor.")
    print("bytes between nodes: swarm 2(n-1) x payload (the leader pulls n-1 contributions, n-1 peers pull the "
          "merged model); Flower 2n x payload (ServerApp -> each SuperNode, each -> back). Hops inside a node "
          "(ML<->SL, ClientApp<->SuperNode, ServerApp<->SuperLink) not counted.")
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    report[key] = {"workload": w.to_dict(), "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]],
                   **results, "ratios": ratios(results)}
    write_figures(args.out, report)
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
