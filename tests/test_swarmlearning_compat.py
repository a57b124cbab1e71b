"""A model.py written for the original product runs here unchanged: `swarmlearning.pyt`, `.tf` (Keras)
and `.hf_transformers` take the original's arguments in its order and cast them as it does;
lossFunction/metricFunction measure each merged model on adsValData and the ledger records it;
useAdaptiveSync moves the sync interval; the ML side imports no gRPC or protobuf, and trains in an
environment that pins the original's protobuf==3.15.6."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import identity, start_sn
from swarm_harness import ML_DIR, Swarm, everything, start_sl, start_swarm, wait_ml
from swarmlearn.callback.adaptive import AdaptiveSync
from swarmlearn.callback.original_env import describe
from swarmlearn.errors import ConfigError
from swarmlearn.sn.client import SNClient

HEAVY = ("grpc", "google.protobuf", "pydantic", "yaml", "ruamel", "cryptography", "safetensors")
REPO = Path(__file__).resolve().parents[1]


def tiny_model():
    import torch

    return torch.nn.Linear(3, 2)


# ------------------------------------------------------------------ arguments as the original takes them

def test_the_original_arguments_are_taken_in_its_order_and_cast_as_it_casts_them():
    from swarmlearning.pyt import SwarmCallback

    callback = SwarmCallback("128", "3", "mycontract", model=tiny_model(), mergeMethod="GEOMEDIAN",
                             nodeWeightage="50", totalEpochs="5", checkinModelOnTrainEnd="Inactive",
                             useAdaptiveSync="False", adsValBatchSize="8")
    settings = callback.core.settings
    assert (settings.sync_frequency, settings.min_peers, settings.training_contract) == (128, 3, "mycontract")
    assert (settings.merge_method, settings.node_weightage, settings.total_epochs) == ("geomedian", 50.0, 5)
    assert settings.checkin_model_on_train_end == "inactive" and settings.adaptive_sync is False
    assert settings.val_batch_size == 8
    # The original's own logger, which model.py files call.
    assert isinstance(callback.logger, logging.Logger) and callback.logger.name == "SwarmCallback"
    assert SwarmCallback(4, 2, model=tiny_model()).core.settings.training_contract == "defaultbb.cqdb.sml.hpe"
    mine = logging.getLogger("mine")
    assert SwarmCallback(4, 2, model=tiny_model(), logger=mine).logger is mine


@pytest.mark.parametrize("kwargs, named", [
    ({"syncFrequency": "often"}, "syncFrequency"),
    ({"syncFrequency": 0}, "syncFrequency"),
    ({"minPeers": 2.5}, "minPeers"),
    ({"mergeMethod": "median"}, "mergeMethod"),
    ({"nodeWeightage": "heavy"}, "nodeWeightage"),
    ({"useAdaptiveSync": "maybe"}, "useAdaptiveSync"),
    ({"useAdaptiveSync": True}, "adsValData"),  # adaptive sync needs validation data, as in the original
    ({"lossFunction": "NoSuchLoss", "adsValData": ([[0.0, 0.0, 0.0]], [0])}, "NoSuchLoss"),
    ({"metricFunction": "NoSuchMetric", "adsValData": ([[0.0, 0.0, 0.0]], [0])}, "torchmetrics"),
    ({"lossFunction": "NLLLoss"}, "adsValData"),
    ({"mlPlatform": "KERAS"}, "mlPlatform"),
    ({"someFlag": 1}, "someFlag"),
])
def test_a_wrong_argument_is_refused_naming_it(kwargs, named):
    from swarmlearning.pyt import SwarmCallback

    arguments = {"syncFrequency": 4, "minPeers": 2, **kwargs}
    with pytest.raises(ConfigError, match=named):
        SwarmCallback(model=tiny_model(), **arguments)


def test_loss_and_metric_functions_measure_the_model_on_the_validation_data():
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from swarmlearning.pyt import SwarmCallback

    model = torch.nn.Linear(3, 2)
    x = torch.randn(10, 3)
    y = torch.randint(0, 2, (10,))
    callback = SwarmCallback(4, 2, model=model, adsValData=DataLoader(TensorDataset(x, y), batch_size=4),
                             lossFunction="CrossEntropyLoss", lossFunctionArgs={"reduction": "sum"},
                             metricFunction="Accuracy", metricFunctionArgs={"task": "multiclass", "num_classes": 2})
    values = callback.core.settings.validate(model)
    with torch.no_grad():
        logits = model(x)
    assert list(values) == ["Accuracy", "loss"]
    assert values["Accuracy"] == pytest.approx((logits.argmax(-1) == y).float().mean().item())
    assert values["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)


def test_adaptive_sync_lengthens_the_interval_while_merges_help_and_shortens_it_when_they_stop():
    adaptive = AdaptiveSync(8)
    assert adaptive.after_merge(1.0) == 8  # the first loss is the reference
    assert adaptive.after_merge(0.8) == 12
    assert adaptive.after_merge(0.6) == 18
    assert [adaptive.after_merge(v) for v in (0.5, 0.4, 0.3)] == [27, 32, 32]  # at most 4x syncFrequency
    assert adaptive.after_merge(float("nan")) == 32  # unknown: unchanged
    assert adaptive.after_merge(0.7) == 16  # worse than the best: merge more often
    assert [adaptive.after_merge(0.7) for _ in range(4)] == [8, 4, 2, 2]  # at least syncFrequency / 4
    assert AdaptiveSync(1).after_merge(5) == 1 and AdaptiveSync(1).bounds == (1, 4)


def test_the_originals_sl_variables_are_named_with_what_becomes_of_them():
    line = describe({"SL_WAIT_FOR_FULL_QUORUM_SECONDS": "30", "SL_MAKE_ME_ADMIN": "False", "SL_OTHER": "1",
                     "PATH": "/bin"})
    assert "\n" not in line
    assert "SL_WAIT_FOR_FULL_QUORUM_SECONDS the SL's, not the ML's: `swarm sl --checkin-wait" in line
    assert "SL_MAKE_ME_ADMIN unsupported" in line and "SL_OTHER unknown" in line and "PATH" not in line
    assert describe({"PATH": "/bin"}) is None


def test_the_hf_and_keras_callbacks_take_the_same_arguments():
    pytest.importorskip("transformers")
    from swarmlearning.hf import SwarmCallback as HF
    from swarmlearning.hf_transformers import SwarmCallback as HFTransformers

    assert HF is HFTransformers
    callback = HF("16", "2", model=tiny_model(), hfMode="full", mergeMethod="CoordMedian")
    assert callback.core.settings.adapters_only is False and callback.core.settings.merge_method == "coordmedian"
    with pytest.raises(ConfigError, match="hfMode"):
        HF(16, 2, model=tiny_model(), hfMode="lora")


def test_importing_the_ml_side_loads_no_grpc_protobuf_pydantic_or_yaml():
    code = ("import sys, json; import swarmlearning.pyt, swarmlearning.tf, swarmlearn.callback.core, swarmlearn.torch;"
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "KERAS_BACKEND": "torch"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []


# ------------------------------------------------------------------ whole swarms

def ledger_metrics(swarm, certs) -> list[dict]:
    with SNClient(swarm.sn.address, identity(certs, "swci")) as sn:
        (contract,) = [c for c in sn.query("contracts")["contracts"].values() if c["rounds"]]
        entries, _ = sn.metrics(contract["name"])
    return entries


@pytest.mark.slow
def test_an_original_keras_model_trains_in_a_swarm_and_ends_with_one_model(procs, certs, tmp_path):
    if importlib.util.find_spec("keras") is None:
        pytest.skip("keras is not installed (pip install keras; the tests run it on the torch backend)")
    import numpy as np

    swarm = start_swarm(procs, certs, tmp_path, ["node1", "node2"], "original_keras_model.py",
                        env={"SYNC_FREQUENCY": "4", "EPOCHS": "2", "KERAS_BACKEND": "torch"})
    wait_ml(swarm, timeout=180)
    finals = [np.load(swarm.out_dir / n / "final.npz") for n in ("node1", "node2")]
    assert all(np.array_equal(finals[0][k], finals[1][k]) for k in finals[0].files), everything(swarm)
    entries = ledger_metrics(swarm, certs)
    validation = [e for e in entries if e.get("kind") == "validation"]
    assert validation and all(e["metric_name"] == "accuracy" and 0 <= e["metric"] <= 1 for e in validation)
    train = [e for e in entries if e.get("kind") == "train"]
    assert train and all(e.get("total_epochs") == 2 for e in train)
    assert train[-1]["epoch"] == 2


def pinned_environment(where: Path) -> Path:
    """A Python environment as a task of the original builds it: protobuf==3.15.6 pinned, torch and
    numpy from our venv (linked), our source for the callback, and no gRPC. Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                              "--disable-pip-version-check", "protobuf==3.15.6"],
                             capture_output=True, text=True, timeout=300)
    if install.returncode != 0:
        pytest.skip(f"protobuf==3.15.6 could not be installed from the package index: {install.stderr[-300:]}")
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    ours = Path(next(p for p in sys.path if p.endswith("site-packages") and (Path(p) / "torch").is_dir()))
    linked = where / "linked"
    linked.mkdir()
    for name in ("torch", "torchgen", "functorch", "numpy", "numpy.libs", "typing_extensions.py", "sympy", "mpmath",
                 "networkx", "jinja2", "markupsafe", "filelock", "fsspec"):
        if (ours / name).exists():
            (linked / name).symlink_to(ours / name)
    (site / "swarm-task.pth").write_text(f"{linked}\n{REPO / 'src'}\n")
    return python


@pytest.mark.slow
def test_an_original_pytorch_model_trains_in_an_environment_pinning_protobuf_3_15_6(procs, certs, tmp_path):
    python = pinned_environment(tmp_path / "task-env")
    probe = subprocess.run([str(python), "-c", "import google.protobuf, importlib.util as u; "
                            "print(google.protobuf.__version__, u.find_spec('grpc') is None)"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.split() == ["3.15.6", "True"], probe.stderr

    swarm = Swarm(start_sn(procs, certs, tmp_path / "sn"), out_dir=tmp_path / "out")
    env = {"SYNC_FREQUENCY": "4", "EPOCHS": "2", "ADAPTIVE": "1", "PROBE_PROTOBUF": "1", "OUT_DIR": str(swarm.out_dir)}
    for node_id, extra in (("node1", {"SL_WAIT_FOR_FULL_QUORUM_SECONDS": "30"}), ("node2", {})):
        node = swarm.nodes[node_id] = start_sl(procs, certs, swarm.sn, node_id, tmp_path, "--checkin-wait", "1")
        node.ml = procs.start([str(python), str(ML_DIR / "original_pyt_model.py")],
                              env={**env, **extra, "NODE_ID": node_id, "SWARM_SL_ADDR": node.ml_addr})
    wait_ml(swarm, timeout=180)
    import torch

    finals = [torch.load(swarm.out_dir / n / "final.pt") for n in ("node1", "node2")]
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0]), everything(swarm)
    for node in swarm.nodes.values():
        output = node.ml.output
        assert f"{node.node_id}: probe: protobuf 3.15.6" in output and "heavy modules []" in output, output
        assert "SwarmCallback : INFO : " + f"{node.node_id}: starting with 96 samples" in output
    assert "SL_WAIT_FOR_FULL_QUORUM_SECONDS the SL's" in swarm.nodes["node1"].ml.output

    entries = ledger_metrics(swarm, certs)
    for node in ("node1", "node2"):
        validation = [e for e in entries if e["node"] == node and e.get("kind") == "validation"]
        train = [e for e in entries if e["node"] == node and e.get("kind") == "train"]
        assert validation and all(e["metric_name"] == "Accuracy" and 0 <= e["metric"] <= 1 for e in validation)
        assert all(isinstance(e["loss"], float) and math.isfinite(e["loss"]) for e in validation)
        assert train and all(e["total_epochs"] == 2 for e in train) and train[-1]["epoch"] == 2
