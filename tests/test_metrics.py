"""Metrics that are true: every sync after training records the mean training loss of the steps since
the last sync, and a node that gives validation data records the metric of each merged model,
measured right after it was loaded, tagged with the merged round. TensorBoard sees the same points."""

from __future__ import annotations

import copy
import importlib.util
import math
import struct
from pathlib import Path

import pytest

from conftest import identity
from ledger_ids import CONTRACT, genesis_payload, reg, tx
from swarm_harness import ML_DIR, start_swarm, wait_ml
from swarmlearn.callback.core import validation_values
from swarmlearn.errors import ConfigError, Rejected
from swarmlearn.ledger import LedgerState
from swarmlearn.sn.client import SNClient

NODES = ["node1", "node2", "node3"]


def user_model():
    spec = importlib.util.spec_from_file_location("tiny_validated_model", ML_DIR / "tiny_validated_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files of `folder`, read back record by record (TFRecord framing:
    length, its CRC, the Event, its CRC) with TensorBoard's own Event message."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no event file in {folder}"
    for path in files:
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


@pytest.mark.slow
def test_each_sync_records_its_training_loss_and_the_merged_models_validation(procs, certs, tmp_path):
    board = tmp_path / "tensorboard"
    swarm = start_swarm(procs, certs, tmp_path, NODES, "tiny_validated_model.py",
                        env={"STEPS": "14", "SYNC_FREQUENCY": "4", "SWARM_TENSORBOARD_DIR": str(board)})
    wait_ml(swarm)
    with SNClient(swarm.sn.address, identity(certs, "swci")) as sn:
        (contract,) = [c for c in sn.query("contracts")["contracts"].values() if c["rounds"]]
        entries, _ = sn.metrics(contract["name"])
    merged = {int(n) for n, r in contract["rounds"].items() if r["status"] == "merged"}
    import torch
    from safetensors.torch import load_file

    ml = user_model()
    for node in NODES:
        mine = [e for e in entries if e["node"] == node]
        train = [e for e in mine if e.get("kind") == "train"]
        validation = [e for e in mine if e.get("kind") == "validation"]
        assert len(train) + len(validation) == len(mine)
        # Syncs after training: steps 4, 8 and 12, then the final one after steps 13 and 14.
        assert [e["step"] for e in train] == [4, 8, 12, 14], mine
        losses = [e["loss"] for e in train]
        assert all(isinstance(v, float) and math.isfinite(v) for v in losses), losses
        assert all(a != b for a, b in zip(losses, losses[1:])), losses
        # One validation per merged round the node trained towards, tagged with that round.
        assert [e["round"] for e in validation] == [e["round"] for e in train]
        assert {e["round"] for e in train} <= merged and train[-1]["round"] == max(merged)
        assert all(e["metric_name"] == "accuracy" and 0 <= e["metric"] <= 1 for e in validation)

        # The last one is the swarm's final model, measured after the last merge: the test measures it too.
        net = ml.build_model()
        net.load_state_dict(load_file(swarm.out_dir / node / "final.safetensors"))
        val = load_file(swarm.out_dir / node / "validation.safetensors")
        with torch.no_grad():
            logits = net(val["x"])
        assert validation[-1]["metric"] == int((logits.argmax(-1) == val["y"]).sum()) / len(val["y"])
        assert validation[-1]["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, val["y"]).item(),
                                                       rel=1e-5)

        scalars = tensorboard_scalars(board / node)
        assert [step for step, _ in scalars["train/loss"]] == [e["step"] for e in train]
        assert [v for _, v in scalars["train/loss"]] == pytest.approx(losses, rel=1e-6)
        assert [v for _, v in scalars["validation/accuracy"]] == pytest.approx([e["metric"] for e in validation])
        assert len(scalars["validation/loss"]) == len(validation)


def founded() -> LedgerState:
    state = LedgerState()
    for name, kind, payload in [("sn-1", "genesis", genesis_payload()), ("node1", "register_node", reg("node1")),
                                ("node1", "session_join", {"contract": CONTRACT, "node": "node1"})]:
        state.apply_tx(tx(name, kind, payload), state.head_index + 1)
        state.head_index += 1
    return state


def test_a_report_is_recorded_with_its_kind_and_one_of_an_older_callback_without():
    state = founded()
    reports = [{"loss": 0.7, "round": 1},
               {"kind": "train", "round": 2, "step": 4, "epoch": 0.5, "loss": 0.6},
               {"kind": "validation", "round": 2, "step": 4, "epoch": 0.5, "metric": 0.8, "metric_name": "accuracy",
                "loss": 0.5}]
    for report in reports:
        state.apply_tx(tx("node1", "metrics", {"contract": CONTRACT, "node": "node1", **report}),
                       state.head_index + 1)
        state.head_index += 1
    recorded = [{k: v for k, v in m.items() if k not in ("node", "index", "time")}
                for m in state.contracts[CONTRACT].metrics]
    assert recorded == reports
    with pytest.raises(Rejected, match="kind"):
        copy.deepcopy(state).check_tx(tx("node1", "metrics", {"contract": CONTRACT, "node": "node1",
                                                               "kind": "test", "loss": 0.1}))


def test_a_validation_names_its_metric_first_and_its_loss_apart():
    assert validation_values({"loss": 0.3, "accuracy": 0.9, "f1": 0.8}) == ("accuracy", 0.9, 0.3)
    assert validation_values({"mse": 2}) == ("mse", 2.0, None)
    assert validation_values({"loss": 0.3}) == ("loss", 0.3, 0.3)
    for bad in ({}, [0.9], {"accuracy": "high"}):
        with pytest.raises(ConfigError, match="validation"):
            validation_values(bad)


def test_the_built_in_validation_measures_classes_and_values_and_leaves_the_mode_as_it_was():
    import torch

    from swarmlearn.torch import SwarmCallback, measure

    classifier = torch.nn.Linear(2, 2)
    with torch.no_grad():
        classifier.weight.copy_(torch.eye(2))
        classifier.bias.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    swarm = SwarmCallback(model=classifier, val_data=(x, torch.tensor([0, 1, 1, 1])), val_batch_size=3)
    values = swarm.core.settings.validate(classifier)
    assert values["accuracy"] == 0.75 and classifier.training
    assert values["loss"] == pytest.approx(torch.nn.functional.cross_entropy(classifier(x), torch.tensor([0, 1, 1, 1]))
                                           .item())
    regressor = torch.nn.Linear(2, 1).eval()
    batches = [(x, torch.zeros(4, 1))]
    expected = (regressor(x) ** 2).mean().item()
    assert measure(regressor, batches) == pytest.approx({"mse": expected, "loss": expected})
    assert not regressor.training
    with pytest.raises(ConfigError, match="val_data"):
        SwarmCallback(model=classifier, val_data=(x, torch.tensor([0, 1])))
    with pytest.raises(ConfigError, match="val_data"):
        SwarmCallback(model=classifier, val_data=42)


def test_the_trainers_evaluation_gives_its_metrics_without_timings_the_chosen_one_first():
    from swarmlearn.hf import evaluation_values

    metrics = {"eval_loss": 0.68, "eval_model_preparation_time": 0.01, "eval_accuracy": 0.58, "eval_f1": 0.37,
               "eval_runtime": 3.9, "eval_samples_per_second": 15.4, "eval_steps_per_second": 0.26, "epoch": 0.5}
    assert evaluation_values(metrics) == {"loss": 0.68, "accuracy": 0.58, "f1": 0.37}
    assert list(evaluation_values(metrics, "eval_f1")) == ["f1", "loss", "accuracy"]
    assert validation_values(evaluation_values(metrics)) == ("accuracy", 0.58, 0.68)
    assert validation_values(evaluation_values(metrics, "loss")) == ("accuracy", 0.58, 0.68)
