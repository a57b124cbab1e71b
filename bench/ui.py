"""How fast the dashboard is on a long run: a ledger of ROUNDS rounds of NODES nodes (each round: a
check-in per node, the leader's merged entry, a metrics entry per node), written through the SN's own
Chain (so every entry is signed and accepted by the state machine), folded into the dashboard's view
and served by its web app on 127.0.0.1.

    .venv/bin/python -m bench ui [--rounds 200] [--nodes 8] [--loads 10]

Prints: the time to fold the ledger, each page's load time (median of --loads; the Training page
with its figures, and Plotly's JS once), the latency from an entry folded to the Training page's
event stream delivering the update, and the server's RSS before and after; writes
bench/results/ui.json."""

from __future__ import annotations

import argparse
import http.client
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import write_figures  # noqa: E402
from swarmlearn import pki  # noqa: E402
from swarmlearn.ledger.chain import Chain  # noqa: E402
from swarmlearn.ledger.signatures import registration, sign_tx  # noqa: E402
from swarmlearn.ledger.sqlite_store import SQLiteStore  # noqa: E402
from swarmlearn.sn.server import genesis_tx  # noqa: E402
from swarmlearn.ui.app import Access, make_app  # noqa: E402
from swarmlearn.ui.serve import bind  # noqa: E402
from swarmlearn.ui.view import SwarmView  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "ui.json"


def write_ledger(work: Path, rounds: int, nodes: int) -> tuple[Chain, dict[str, pki.Identity]]:
    names = [f"node{i}" for i in range(1, nodes + 1)]
    pki.generate_host_certs(work / "cert", 1, components=("sn",), nodes=names)
    layout = pki.CertLayout(work / "cert", 1)
    sn = pki.Identity.load(layout.key("sn"), layout.cert("sn"), layout.capath)
    ids = {n: pki.Identity.load(layout.node_key(n), layout.node_cert(n), layout.capath) for n in names}
    chain = Chain(SQLiteStore(work / "ledger.db"))
    chain.submit(genesis_tx(sn, "127.0.0.1:30304"))
    for n in names:
        chain.submit(sign_tx(ids[n], n, "register_node", registration(ids[n], "127.0.0.1:1")))
        chain.submit(sign_tx(ids[n], n, "session_join", {"contract": "default", "node": n, "min_peers": nodes}))
    for r in range(1, rounds + 1):
        append_round(chain, ids, r)
    return chain, ids


def append_round(chain: Chain, ids: dict[str, pki.Identity], r: int) -> None:
    for n, identity in ids.items():
        chain.submit(sign_tx(identity, n, "checkin", {"contract": "default", "round": r, "node": n,
                                                      "hash": f"{r:064x}", "weight": 1.0, "size": 4096}))
    contract = chain.state.contract("default")
    leader = contract.rounds[r].leader
    chain.submit(sign_tx(ids[leader], leader, "merged", {"contract": "default", "round": r, "hash": f"{r + 1:064x}",
                                                         "size": 4096}))
    for n, identity in ids.items():
        chain.submit(sign_tx(identity, n, "metrics", {"contract": "default", "node": n, "kind": "train", "round": r,
                                                      "step": r * 10, "epoch": r / 50, "loss": 1 / r}))


class Feed:
    """Folds the store's entries the dashboard has not seen yet into its view (what the Watch does)."""

    def __init__(self, chain: Chain, view: SwarmView):
        self.chain, self.view, self.next = chain, view, 0

    def catch_up(self) -> int:
        rows = self.chain.store.read_raw(self.next, 100_000)
        for row in rows:
            self.view.receive(row, row.entry())
        self.next += len(rows)
        return len(rows)


def serve(view: SwarmView) -> tuple[int, object]:
    import uvicorn

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(make_app(view, Access()), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return sock.getsockname()[1], server


def load(port: int, path: str, gzip: bool = False) -> tuple[float, int]:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers={"accept-encoding": "gzip"} if gzip else {})
    body = conn.getresponse().read()
    conn.close()
    return time.perf_counter() - started, len(body)


def update_latency(port: int, chain: Chain, ids: dict[str, pki.Identity], feed: Feed, round_no: int) -> float:
    """Seconds from a new round folded into the view to the Training page's stream delivering it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /events?page=training HTTP/1.1\r\nHost: x\r\n\r\n")
    reader = sock.makefile("rb")
    wait_for_event(reader)  # the page's first update, sent at once
    append_round(chain, ids, round_no)
    started = time.perf_counter()
    feed.catch_up()
    wait_for_event(reader)
    took = time.perf_counter() - started
    sock.close()
    return took


def wait_for_event(reader) -> None:
    for line in reader:
        if line.startswith(b"event: update"):
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--loads", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    me = psutil.Process()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        chain, ids = write_ledger(Path(tmp), args.rounds, args.nodes)
        print(f"ledger: {chain.state.head_index + 1} entries written in {time.perf_counter() - started:.1f} s")
        rss_before = me.memory_info().rss
        view = SwarmView()
        feed = Feed(chain, view)
        started = time.perf_counter()
        entries = feed.catch_up()
        fold_s = time.perf_counter() - started
        port, server = serve(view)
        loads = {path: [load(port, path)[0] for _ in range(args.loads)] for path in ("/", "/tasks", "/training",
                                                                                   "/ledger")}
        plotly_s, plotly_bytes = load(port, "/static/plotly.min.js", gzip=True)
        sizes = {path: load(port, path)[1] for path in loads}
        latencies = [update_latency(port, chain, ids, feed, args.rounds + i) for i in range(1, 6)]
        rss_after = me.memory_info().rss
        server.should_exit = True
        chain.store.close()
    report = {"rounds": args.rounds, "nodes": args.nodes, "entries": entries, "fold_s": fold_s,
              "page_load_s": {p: statistics.median(v) for p, v in loads.items()}, "page_bytes": sizes,
              "plotly_js_gzip_s": plotly_s, "plotly_js_gzip_bytes": plotly_bytes,
              "update_latency_s": latencies, "rss_before_mb": rss_before / 2**20, "rss_after_mb": rss_after / 2**20}
    print(f"fold of {entries} entries: {fold_s:.2f} s")
    for path, seconds in report["page_load_s"].items():
        print(f"page {path:<10} {seconds * 1000:7.1f} ms  ({sizes[path] / 1024:.0f} KiB)")
    print(f"plotly.min.js (gzip) {plotly_s * 1000:.1f} ms ({plotly_bytes / 2**20:.1f} MiB), cached by the browser after")
    print(f"update after a merge: median {statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")
    print(f"RSS: {report['rss_before_mb']:.0f} MiB before the fold, {report['rss_after_mb']:.0f} MiB after serving")
    write_figures(args.out, report)


if __name__ == "__main__":
    main()
