"""What the folded state keeps of metrics reports: each node's latest report (in summary, and of each
kind) and the newest few reports as recorded. Every report stays a signed ledger entry, read back
with the SN's "metrics" query (page by page: one summary per node per round for the whole run is
there, not in the state), so the state every node folds stays small however long the run. A ledger
of protocol 2 also keeps a summary per node in each round (Round.metrics), as it always did.

A summary keeps the fields people read (kind, round, step, epoch, loss, metric, metric_name) and where
the report is on the ledger (index, and the signer's clock). A report without a kind (older callbacks)
is a training report, and a validation one too where it carries a metric, as the dashboard reads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from swarmlearn.ledger import payloads as P
from swarmlearn.ledger.contracts import metric_values
from swarmlearn.ledger.entry import Tx

if TYPE_CHECKING:
    from swarmlearn.ledger.state import LedgerState

RECENT_REPORTS = 32
SUMMARY_FIELDS = ("kind", "round", "step", "epoch", "loss", "metric", "metric_name")


def apply_metrics(state: LedgerState, tx: Tx, p: P.Metrics, index: int) -> None:
    """Validated by contracts.validate_metrics (a member reporting about itself, within its size limit)."""
    contract = state.contract(p.contract)
    values = metric_values(p)
    contract.metrics.append({"node": p.node, "index": index, "time": tx.time, **values})
    del contract.metrics[:-RECENT_REPORTS]
    contract.metrics_recorded += 1
    summary = {**{k: values[k] for k in SUMMARY_FIELDS if k in values}, "index": index, "time": tx.time}
    kinds = report_kinds(values)
    latest = contract.latest_metrics.setdefault(p.node, {})
    latest["latest"] = summary
    for kind in kinds:
        latest[kind] = summary
    number = values.get("round")
    if state.protocol < 3 and isinstance(number, int) and not isinstance(number, bool) and number in contract.rounds:
        per_node = contract.rounds[number].metrics.setdefault(p.node, {})
        for kind in kinds:
            per_node[kind] = summary


def report_kinds(values: dict) -> list[str]:
    """The kinds a report counts as: its own, or for one without (older callbacks) "train", and
    "validation" too when it carries a metric."""
    kind = values.get("kind")
    if kind is not None:
        return [kind]
    return ["train", "validation"] if values.get("metric") is not None else ["train"]
