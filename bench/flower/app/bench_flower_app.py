"""The comparison workload (shared/DATA.md) as a Flower App: a ServerApp running FedAvg over the
trainable tensors (LoRA adapters + classifier head, weighted by `num-examples`), and a ClientApp
that trains one node's round with bench/flower/workload.py, the same code our swarm node runs.

Flower's deployment runtime starts a fresh ClientApp process for every message, so each round the
client builds the model and loads the global tensors; its AdamW state is kept between rounds in
`context.state` (Flower's way to carry client state), so both frameworks run the same optimizer.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

_T_PROCESS = time.time()

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

import workload as wl  # noqa: E402  (bench/flower/, on this venv's path via setup.sh's .pth)

client = ClientApp()
server = ServerApp()


def _process_started() -> float:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - only a breakdown figure
        return _T_PROCESS


def _payload_bytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


@client.train()
def train(msg: Message, context: Context) -> Message:
    entered = time.time()
    w = wl.variant(str(context.run_config["variant"]), int(context.run_config["rounds"]) or None)
    node = int(context.node_config["partition-id"])
    round_no = int(msg.content["config"]["server-round"])
    global_arrays = msg.content["arrays"]
    if context.run_config["echo"]:
        # Lower bound of Flower's own cost: a ClientApp that touches no model, it returns what it got.
        metrics = MetricRecord({"num-examples": 1, "train-loss": 0.0, "node": node,
                                "startup-s": entered - _process_started(), "data-s": 0.0, "build-s": 0.0,
                                "train-s": 0.0, "payload-bytes": _payload_bytes(global_arrays),
                                "received-bytes": _payload_bytes(global_arrays)})
        return Message(content=RecordDict({"arrays": global_arrays, "metrics": metrics}), reply_to=msg)
    _, shards = wl.split(w)
    shard = shards[node]
    loaded = time.time()
    model, tokenizer = wl.build_model()
    wl.load_trainable(model, global_arrays.to_torch_state_dict())
    built = time.time()
    loss = 0.0
    if w.steps_per_round:
        optimizer = wl.make_optimizer(model)
        if "optim" in context.state:
            wl.load_optimizer_state(optimizer, context.state["optim"].to_torch_state_dict())
        loss = wl.train_round(model, tokenizer, optimizer, shard, node, round_no, w.steps_per_round)
        context.state["optim"] = ArrayRecord.from_torch_state_dict(wl.optimizer_state(optimizer))
        samples = w.steps_per_round * wl.BATCH
    else:
        samples = len(shard)
    trained = time.time()
    arrays = ArrayRecord.from_torch_state_dict(wl.trainable_tensors(model))
    metrics = MetricRecord({"num-examples": samples, "train-loss": loss, "node": node,
                            "startup-s": entered - _process_started(), "data-s": loaded - entered,
                            "build-s": built - loaded,
                            "train-s": trained - built, "payload-bytes": _payload_bytes(arrays),
                            "received-bytes": _payload_bytes(global_arrays)})
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


class TimedFedAvg(FedAvg):
    """FedAvg that notes when each round starts (configure_train) and when its merged model exists
    (aggregate_train done), and what every reply carried."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rounds: list[dict] = []

    def configure_train(self, server_round, arrays, config, grid):
        started = time.time()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.rounds.append({"round": server_round, "start": started, "sent_to": len(messages),
                            "sent_bytes_each": _payload_bytes(arrays)})
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        entry = self.rounds[-1]
        entry["end"] = time.time()
        entry["replies"] = [{k: float(v) for k, v in r.content["metrics"].items()} for r in replies if r.has_content()]
        return arrays, metrics


@server.main()
def main(grid: Grid, context: Context) -> None:
    started = time.time()
    w = wl.variant(str(context.run_config["variant"]), int(context.run_config["rounds"]) or None)
    out = Path(str(context.run_config["out"]))
    test, _ = wl.split(w)
    model, tokenizer = wl.build_model()
    initial = ArrayRecord.from_torch_state_dict(wl.trainable_tensors(model))
    strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=w.nodes,
                           min_available_nodes=w.nodes)
    ready = time.time()
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=w.rounds, train_config=ConfigRecord({}))
    finished = time.time()
    final = result.arrays.to_torch_state_dict()
    wl.load_trainable(model, final)
    accuracy = wl.evaluate(model, tokenizer, test) if w.steps_per_round else None
    report = {"serverapp_started": started, "strategy_started": ready, "strategy_finished": finished,
              "evaluated": time.time(), "accuracy": accuracy, "rounds": strategy.rounds,
              "fingerprint": wl.fingerprint(final), "pid": os.getpid()}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out)
