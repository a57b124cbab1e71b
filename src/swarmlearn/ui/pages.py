"""The dashboard's pages as HTML, rendered on the server from a SwarmView: a page is its frame and a
main section; the event stream sends the main section (and the chart figures) again when the view
changes. Everything from the ledger is escaped: entries are written by many parties."""

from __future__ import annotations

import json
import time
from html import escape

from swarmlearn.ledger.model import RoundStatus
from swarmlearn.ui.view import GONE_AFTER, SwarmView

PAGES = {"swarm": "Swarm", "tasks": "Tasks", "training": "Training", "ledger": "Ledger"}
ROWS_PER_PAGE = 100
TIMELINE_ROUNDS = 100  # rounds listed per contract (the curves show every round kept)
LOG_LINES = 20  # last lines shown of a failed peer's report


def _e(value) -> str:
    return escape("" if value is None else str(value))


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.1f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def _clock(when: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when)) if when else "—"


def _table(headers: list[str], rows: list[list[str]], empty: str) -> str:
    """`rows` hold HTML already escaped."""
    if not rows:
        return f'<p class="empty">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _badge(text: str, tone: str) -> str:
    return f'<span class="badge {tone}">{_e(text)}</span>'


# ------------------------------------------------------------------------------ swarm

def _node_state(view: SwarmView, node) -> str:
    seen = view.last_seen.get(node.node_id)
    if node.role == "SN" and node.address and node.address == view.sn_in_use and not view.problem:
        return _badge("serving this dashboard", "ok")
    if seen is None:
        return _badge("not heard", "idle")
    return _badge("up", "ok") if seen <= GONE_AFTER else _badge("gone", "bad")


def _last_metric(view: SwarmView, node_id: str) -> str:
    """The node's latest training loss and latest validation metric, each with its round: the two
    kinds of entry alternate, so the last entry alone would hide one of them."""
    for contract, nodes in sorted(view.curves.items()):
        curves = nodes.get(node_id)
        if curves is None or not (curves.train or curves.validation):
            continue
        parts = []
        if curves.train:
            t = curves.train[-1]
            parts.append(f"loss {t.loss:.4g} (round {t.round})")
        if curves.validation:
            v = curves.validation[-1]
            parts.append(f"{v.metric_name} {v.metric:.4g} (round {v.round})")
        return _e(" · ".join(parts))
    return "—"


def swarm_main(view: SwarmView) -> str:
    rows = []
    now = time.time()
    order = {"SN": 0, "SWOP": 1, "SL": 2}
    for node in sorted(view.state.nodes.values(), key=lambda n: (order.get(n.role, 3), n.node_id)):
        sync = view.last_sync.get(node.node_id)
        sync_text = f"round {sync[1]} ({_ago(max(0.0, now - sync[2]))})" if sync else "—"
        rows.append([f"<b>{_e(node.node_id)}</b>", _e(node.role), _e(node.org), _e(node.address or "—"),
                     _e(_ago(view.last_seen.get(node.node_id))), _node_state(view, node),
                     _e(sync_text) if node.role == "SL" else "", _last_metric(view, node.node_id)
                     if node.role == "SL" else ""])
    table = _table(["node", "role", "org", "host", "last heartbeat", "state", "last sync", "last metric"], rows,
                   "no node has registered yet")
    return f"<h2>Nodes</h2>{table}"


# ------------------------------------------------------------------------------ tasks

def _tone(status: str) -> str:
    return {"COMPLETE": "ok", "RUNNING": "run", "STARTING": "run", "FAILED": "bad"}.get(status, "idle")


def tasks_main(view: SwarmView) -> str:
    tasks = [[f"<b>{_e(t.name)}</b>", _e(t.type), _e(t.author), _e(t.created_by), _e(t.prereq),
              _badge("finalized", "ok") if t.finalized else _badge("draft", "idle")]
             for t in sorted(view.state.tasks.values(), key=lambda t: t.name)]
    parts = ["<h2>Tasks</h2>", _table(["task", "type", "author", "created by", "prereq", "state"], tasks,
                                      "no task yet")]
    parts.append("<h2>Task runners</h2>")
    runners = sorted(view.state.taskrunners.values(), key=lambda r: r.name)
    if not runners:
        parts.append('<p class="empty">no task runner yet</p>')
    for runner in runners:
        parts.append(_runner(view, runner))
    return "".join(parts)


def _runner(view: SwarmView, runner) -> str:
    swops = ", ".join(f"{s} ({n} peers)" for s, n in sorted(runner.swops.items())) or "no SWOP joined"
    parts = [f'<div class="card"><h3>{_e(runner.name)}</h3><p>{_e(swops)} · {runner.assignments_made} '
             f'assignments made</p>']
    if runner.assignment is None:
        parts.append('<p class="empty">nothing assigned now</p>')
    else:
        parts.append(_assignment(runner.assignment, "now"))
    for ended in reversed(view.past_assignments.get(runner.name, ())):
        parts.append(_assignment(ended, "earlier"))
    return "".join(parts) + "</div>"


def _assignment(a, when: str) -> str:
    peers = []
    logs = []
    for peer, status in sorted(a.peer_status.items()):
        peers.append([_e(peer), _e(status.swop), _badge(status.status, _tone(status.status)),
                      _e("—" if status.exit_code is None else status.exit_code)])
        if status.status == "FAILED" and status.detail:
            lines = status.detail.splitlines()[-LOG_LINES:]
            logs.append(f"<h4>{_e(peer)} on {_e(status.swop)}: last lines</h4><pre>{_e(chr(10).join(lines))}</pre>")
    summary = (f'<p class="assignment">{when}: task <b>{_e(a.task)}</b> with {a.peers} peers '
               f"{_badge(a.status, _tone(a.status))} (assigned by {_e(a.assigned_by or '—')})</p>")
    return summary + _table(["peer", "SWOP", "status", "exit code"], peers, "no peer claimed") + "".join(logs)


# ------------------------------------------------------------------------------ training

def _round_row(view: SwarmView, contract: str, r) -> list[str]:
    duration = r.merged_time - r.closed_time if r.merged_time and r.closed_time else None
    sent = sum(c.size for c in r.checkins.values())
    reason = view.abort_reasons.get((contract, r.number), "") if r.status == RoundStatus.ABORTED else ""
    tone = {"merged": "ok", "aborted": "bad", "closed": "run", "open": "idle"}.get(r.status, "idle")
    leader = (r.leader or "—") + (f" (re-elected {r.reelections}×)" if r.reelections else "")
    return [str(r.number), _badge(r.status, tone), _e(", ".join(r.participants or sorted(r.checkins))),
            _e(leader), "—" if duration is None else f"{duration:.2f} s", f"{(sent + r.merged_size) / 1024:.1f} KiB",
            f"<code>{_e((r.merged_hash or '')[:12]) or '—'}</code>", _e(reason)]


def training_main(view: SwarmView) -> str:
    parts = []
    for name, contract in sorted(view.state.contracts.items()):
        rounds = view.timeline(name)[:TIMELINE_ROUNDS]
        if not rounds and not contract.members:
            continue
        members = ", ".join(contract.active_members) or "none"
        merged = contract.rounds_merged
        parts.append(f'<div class="card contract" data-contract="{_e(name)}"><h3>{_e(name)}</h3>'
                     f'<p>members {_e(members)} · round {contract.current_round} open · '
                     f'<span class="merged-count">{merged}</span> merged · merge {_e(contract.merge_method)}</p>')
        parts.append(_table(["round", "status", "participants", "leader", "duration", "bytes", "merged hash",
                             "reason"], [_round_row(view, name, r) for r in rounds], "no round yet"))
        parts.append("</div>")
    return "<h2>Rounds</h2>" + ("".join(parts) or '<p class="empty">no training yet</p>')


def training_charts(view: SwarmView) -> list[dict]:
    """Two Plotly figures per contract with metrics, both by merged round: each node's training loss
    (the mean of the steps it contributed to that round; hover: epoch and step) and the validation
    metric of that round's merged model as measured on the node. Neither has a point for the round
    of a node's first sync: that sync only loads the swarm's model, after no training step."""
    charts = []
    for i, (name, nodes) in enumerate(sorted(view.curves.items())):
        loss, metric = [], []
        metric_name = "metric"
        last_round = 1
        for node, curves in sorted(nodes.items()):
            loss.append({"type": "scatter", "mode": "lines+markers", "name": node,
                         "x": [p.round for p in curves.train], "y": [p.loss for p in curves.train],
                         "text": [f"epoch {p.epoch if p.epoch is not None else '—'}, step "
                                  f"{p.step if p.step is not None else '—'}" for p in curves.train]})
            metric.append({"type": "scatter", "mode": "lines+markers", "name": node,
                           "x": [p.round for p in curves.validation], "y": [p.metric for p in curves.validation]})
            if curves.validation:
                metric_name = curves.validation[-1].metric_name
            last_round = max([last_round, *(p.round for p in curves.train), *(p.round for p in curves.validation)])
        charts.append(_figure(f"loss-{i}", "loss", name, f"{name}: training loss", "loss", loss, last_round))
        charts.append(_figure(f"metric-{i}", "metric", name, f"{name}: validation {metric_name}", metric_name, metric,
                              last_round))
    return charts


def _round_step(last_round: int) -> int:
    """Tick spacing for a round axis up to `last_round`: whole rounds (Plotly would label 2.5), about
    ten ticks at most."""
    magnitude = 1
    while True:
        for step in (magnitude, 2 * magnitude, 5 * magnitude):
            if last_round <= 10 * step:
                return step
        magnitude *= 10


def _figure(chart_id: str, kind: str, contract: str, title: str, y_title: str, data: list[dict],
            last_round: int) -> dict:
    layout = {"title": {"text": title, "font": {"size": 13}, "x": 0.02, "xanchor": "left"}, "autosize": True,
              "margin": {"l": 50, "r": 10, "t": 40, "b": 70},
              "xaxis": {"title": {"text": "merged round", "standoff": 4}, "dtick": _round_step(last_round),
                        "tickformat": "d"},
              "yaxis": {"title": {"text": y_title}}, "height": 330,
              # At the figure's foot, below the axis title (at Plotly's default place it sits on it).
              "legend": {"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom"},
              "uirevision": chart_id}
    return {"id": chart_id, "kind": kind, "contract": contract, "data": data, "layout": layout}


# ------------------------------------------------------------------------------ ledger

def ledger_main(view: SwarmView, page: int) -> str:
    v = view.verification
    if v.ok is None:
        verdict = _badge("not verified yet", "idle") + " the first verification runs a few seconds after start"
    elif v.ok:
        verdict = (_badge("OK", "ok") + f' <span class="verify">OK {v.entries} entries, head '
                   f'<code>{_e((v.head_hash or "")[:16])}</code>, verified at {_clock(v.checked_at)}</span>')
    else:
        verdict = _badge("BAD", "bad") + f' <span class="verify">BAD {_e(v.error)} (at {_clock(v.checked_at)})</span>'
    rows = list(view.rows)
    pages = max(1, -(-len(rows) // ROWS_PER_PAGE))
    page = min(max(0, page), pages - 1)
    newest_first = rows[::-1][page * ROWS_PER_PAGE:(page + 1) * ROWS_PER_PAGE]
    table = _table(["index", "kind", "signer", "time", "hash"],
                   [[str(r.index), _e(r.kind), _e(r.signer), _clock(r.time), f"<code>{_e(r.hash[:16])}</code>"]
                    for r in newest_first], "no entry received yet")
    pager = " ".join(f'<a href="/ledger?p={p}"{" class=current" if p == page else ""}>{p + 1}</a>'
                     for p in _pager(page, pages))
    kept = f" (the newest {len(rows)} are kept here; `swarm ledger show` lists all)" if rows and rows[0].index else ""
    return (f'<h2>Chain verification</h2><p>{verdict}<br><small>checked on the entries this dashboard received, at '
            f'most once a minute</small></p><h2>Entries</h2><p>{view.state.head_index + 1} entries{_e(kept)}</p>'
            f'{table}<p class="pager">page {pager}</p>')


def _pager(page: int, pages: int) -> list[int]:
    shown = {0, pages - 1, *range(max(0, page - 2), min(pages, page + 3))}
    return sorted(shown)


# ------------------------------------------------------------------------------ frame

def status_line(view: SwarmView) -> str:
    if view.problem:
        return view.problem
    sn = f"SN {view.sn_in_use}" if view.sn_in_use else "connecting to the SN"
    return f"{sn} · ledger head {view.state.head_index}"


def update(view: SwarmView, page: str, number: int = 0) -> dict:
    """What the event stream sends for `page`: its main section, its charts and the status line."""
    with view.read():
        main = {"swarm": lambda: swarm_main(view), "tasks": lambda: tasks_main(view),
                "training": lambda: training_main(view), "ledger": lambda: ledger_main(view, number)}[page]()
        charts = training_charts(view) if page == "training" else []
        return {"version": view.version, "html": main, "charts": charts, "status": status_line(view),
                "problem": bool(view.problem)}


def full_page(view: SwarmView, page: str, number: int = 0) -> str:
    first = update(view, page, number)
    nav = "".join(f'<a href="/{"" if key == "swarm" else key}"{" class=current" if key == page else ""}>{title}</a>'
                  for key, title in PAGES.items())
    plotly = '<script src="/static/plotly.min.js"></script>' if page == "training" else ""
    charts = '<div id="charts" class="charts"></div>' if page == "training" else ""
    initial = json.dumps({**first, "html": ""}).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{PAGES[page]} · swarmlearn</title><link rel="stylesheet" href="/static/ui.css">{plotly}</head>
<body data-page="{page}" data-p="{number}" data-version="{first['version']}">
<header><h1>swarmlearn</h1><nav>{nav}</nav></header>
<p id="status" class="status{' problem' if first['problem'] else ''}">{_e(first['status'])}</p>
{charts}<main id="main">{first['html']}</main>
<script id="initial" type="application/json">{initial}</script><script src="/static/ui.js"></script>
</body></html>"""
