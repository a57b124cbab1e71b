"""Our side of `python -m bench flower`: one node's ML process, a user's plain-PyTorch training
script with swarmlearn.torch.SwarmCallback, running the comparison workload from workload.py.

Environment: NODE_ID (node1..), NODE_INDEX (0..), SWARM_SL_ADDR, OUT_FILE (JSON written at the
end), VARIANT (full | quick | exchange-only), ROUNDS (0: the variant's), EVALUATE (1: this node
evaluates the final model on the test set).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import workload as wl

started = time.time()
node_id = os.environ["NODE_ID"]
node = int(os.environ["NODE_INDEX"])
w = wl.variant(os.environ.get("VARIANT", "quick"), int(os.environ.get("ROUNDS", "0")) or None)
test, shards = wl.split(w)
shard = shards[node]
model, tokenizer = wl.build_model()
optimizer = wl.make_optimizer(model)

from swarmlearn.torch import SwarmCallback  # noqa: E402

# A sync every 16 optimizer steps; exchange-only syncs on every call. The final model is the 4th
# merge: no extra closing contribution ("inactive"), so both frameworks merge exactly `rounds` times.
swarm = SwarmCallback(sync_frequency=max(1, w.steps_per_round), min_peers=w.nodes, model=model,
                      checkin_model_on_train_end="inactive")
ready = time.time()
swarm.on_train_begin()  # everyone starts from one merged initial model
synced = [time.time()]
rounds = [swarm.core.last_round]
blob_sizes = [swarm.core.bytes_sent]
losses = []
for r in range(1, w.rounds + 1):
    if w.steps_per_round:
        losses.append(wl.train_round(model, tokenizer, optimizer, shard, node, r, w.steps_per_round,
                                     on_step=lambda b, loss: swarm.on_batch_end(batch_size=b, loss=loss)))
    else:
        swarm.on_batch_end(batch_size=len(shard))  # one step-equivalent, weight = the shard's rows
    synced.append(time.time())
    rounds.append(swarm.core.last_round)
    blob_sizes.append(swarm.core.bytes_sent)
    if rounds[-1] == rounds[-2]:
        raise SystemExit(f"{node_id}: round {r} did not sync")
swarm.on_train_end()
final = wl.trainable_tensors(model)
report = {"node": node_id, "process_started": started, "ready": ready, "synced": synced, "rounds": rounds,
          "bytes_sent": swarm.core.bytes_sent, "bytes_received": swarm.core.bytes_received,
          "blob_bytes": [b - a for a, b in zip(blob_sizes, blob_sizes[1:])], "losses": losses,
          "fingerprint": wl.fingerprint(final), "accuracy": None}
if os.environ.get("EVALUATE") == "1" and w.steps_per_round:
    report["accuracy"] = wl.evaluate(model, tokenizer, test)
report["evaluated"] = time.time()
Path(os.environ["OUT_FILE"]).write_text(json.dumps(report, indent=1))
print(f"{node_id}: done, {len(rounds) - 1} rounds, accuracy {report['accuracy']}", flush=True)
