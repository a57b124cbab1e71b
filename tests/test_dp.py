"""Differential privacy with the privacy spent reported: a node trains with DP-SGD and knows the ε it
has spent at δ, every sync records it where the swarm reads metrics (the ledger, PERFDATA), and the
client-level helpers give the noise and ε the textbook Gaussian mechanism gives."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest

from conftest import SWARM, finish_run, identity
from swarm_harness import start_swarm, wait_ml
from swarmlearn.dp import client_epsilon, client_noise_std, clip_update, make_private
from swarmlearn.errors import ConfigError
from swarmlearn.sn.client import SNClient
from swarmlearn.swci.script import parse_line
from swarmlearn.swci.session import SwciSession

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")


def tiny_task(rows: int = 256, batch: int = 32):
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x = torch.randn(rows, 6)
    y = (x[:, 0] - x[:, 1] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.5), DataLoader(TensorDataset(x, y), batch_size=batch)


def test_a_node_training_with_dp_sgd_spends_a_growing_epsilon_that_ends_at_its_target():
    model, optimizer, loader, account = make_private(*tiny_task(), target_epsilon=3.0, delta=1e-4, epochs=3,
                                                     max_grad_norm=1.0)
    assert account.epsilon() == 0.0 and account.steps == 0
    assert account.planned_steps == 3 * 8 and 0.5 < account.noise_multiplier < 5
    spent = []
    for _ in range(3):
        for inputs, targets in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
        spent.append(account.epsilon())
    assert account.steps == 24
    assert spent[0] < spent[1] < spent[2] <= 3.0 + 0.01  # the noise was chosen to spend the target, no more
    assert spent[2] > 2.9
    assert "record-level DP-SGD, ε=3 at δ=0.0001 after 24 steps" in account.describe()
    # The accountant is Opacus's: its own RDP accountant over the same steps says the same.
    from opacus.accountants import RDPAccountant

    reference = RDPAccountant()
    reference.history = [(account.noise_multiplier, 1 / 8, 24)]
    assert account.epsilon() == pytest.approx(reference.get_epsilon(delta=1e-4))


@pytest.mark.parametrize("settings,message", [
    ({"target_epsilon": 0, "epochs": 1}, "target_epsilon must be a number > 0"),
    ({"target_epsilon": -1, "epochs": 1}, "target_epsilon must be a number > 0"),
    ({"target_epsilon": 1, "delta": 1 / 256, "epochs": 1}, r"delta=0.00390625 is not below 1/256"),
    ({"target_epsilon": 1, "delta": 1.5, "epochs": 1}, "delta must be in"),
    ({"target_epsilon": 1}, "give epochs=<passes over the data> or steps"),
    ({"target_epsilon": 1, "epochs": 1, "steps": 8}, "not both"),
    ({"target_epsilon": 1, "epochs": 1, "max_grad_norm": 0}, "max_grad_norm must be a number > 0"),
    ({"target_epsilon": 1, "epochs": 1, "accountant": "moments"}, "accountant 'moments' is not one of rdp, prv"),
], ids=["zero epsilon", "negative epsilon", "delta not below 1/n", "delta over 1", "no length", "two lengths",
        "no clip", "unknown accountant"])
def test_make_private_names_the_setting_that_is_wrong(settings, message):
    with pytest.raises(ConfigError, match=message):
        make_private(*tiny_task(), **settings)


def test_make_private_names_a_layer_opacus_cannot_handle():
    from torch.utils.data import DataLoader, TensorDataset

    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    loader = DataLoader(TensorDataset(torch.randn(64, 6), torch.zeros(64, dtype=torch.long)), batch_size=8)
    with pytest.raises(ConfigError, match=r"BatchNorm cannot support training with differential privacy.*"
                                          r"ModuleValidator.fix"):
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, target_epsilon=1, epochs=1)


# ------------------------------------------------------------------------------------ client level

def test_clip_update_bounds_the_l2_norm_and_leaves_short_updates_alone():
    long = np.array([3.0, 4.0])  # norm 5
    assert np.allclose(clip_update(long, 1.0), [0.6, 0.8])
    short = np.array([0.3, 0.4])
    assert clip_update(short, 1.0) is short
    as_tensor = clip_update(torch.tensor([3.0, 4.0]), 2.5)
    assert torch.allclose(as_tensor, torch.tensor([1.5, 2.0]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        clip_update(np.array([np.nan, 1.0]), 1.0)
    with pytest.raises(ConfigError, match="clip must be"):
        clip_update(long, 0)


def test_client_noise_shares_add_up_to_the_target_noise_of_the_weighted_sum():
    # Three equal nodes: sensitivity of the weighted mean is clip / 3; the sum of the three shares
    # must carry std z * clip / 3.
    std = client_noise_std(clip=2.0, noise_multiplier=1.1, max_weight=1 / 3, contributors=3)
    assert std == pytest.approx(1.1 * 2.0 / 3 / math.sqrt(3))
    rng = np.random.default_rng(0)
    total = rng.normal(0, std, size=(200_000, 3)).sum(axis=1)
    assert np.std(total) == pytest.approx(1.1 * 2.0 / 3, rel=0.01)
    # The largest weight sets the sensitivity: a node holding half the weight needs more noise.
    assert client_noise_std(1.0, 1.0, 0.5, 3) > client_noise_std(1.0, 1.0, 1 / 3, 3)
    # More contributors: each adds less.
    assert client_noise_std(1.0, 1.0, 0.1, 10) < client_noise_std(1.0, 1.0, 0.1, 3)
    for bad in ({"max_weight": 0}, {"max_weight": 1.5}, {"contributors": 0}, {"noise_multiplier": -1}):
        with pytest.raises(ConfigError):
            client_noise_std(**{"clip": 1.0, "noise_multiplier": 1.0, "max_weight": 0.5, "contributors": 3, **bad})


def test_client_epsilon_is_opacus_rdp_of_the_gaussian_mechanism():
    # With every node in every round (sample rate 1), T rounds of noise z have RDP T * a / (2 z^2) at
    # order a; converted to (ε, δ) as Opacus does (Balle et al. 2020), minimized over its orders.
    def by_hand(z: float, rounds: int, delta: float) -> float:
        from opacus.accountants import RDPAccountant

        best = math.inf
        for a in RDPAccountant.DEFAULT_ALPHAS:
            rdp = rounds * a / (2 * z * z)
            eps = rdp + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
            best = min(best, eps)
        return best

    for z, rounds in ((1.0, 10), (2.0, 10), (5.0, 50)):
        assert client_epsilon(z, rounds, 1e-5) == pytest.approx(by_hand(z, rounds, 1e-5), rel=1e-9)
    assert client_epsilon(1.0, 0, 1e-5) == 0.0
    # More noise spends less; more rounds spend more.
    assert client_epsilon(4.0, 10) < client_epsilon(2.0, 10) < client_epsilon(1.0, 10)
    assert client_epsilon(2.0, 5) < client_epsilon(2.0, 10) < client_epsilon(2.0, 20)
    with pytest.raises(ConfigError, match="delta must be in"):
        client_epsilon(1.0, 10, 0)


# ------------------------------------------------------------------------------------ in a swarm

NODES = ["node1", "node2"]


@pytest.mark.slow
def test_each_sync_records_the_epsilon_spent_and_perfdata_shows_it(procs, certs, tmp_path):
    swarm = start_swarm(procs, certs, tmp_path, NODES, "tiny_private_model.py",
                        env={"EPOCHS": "2", "SYNC_FREQUENCY": "5", "TARGET_EPSILON": "4", "DELTA": "1e-4"})
    wait_ml(swarm)
    with SNClient(swarm.sn.address, identity(certs, "swci")) as sn:
        entries, _ = sn.metrics("default")
    for node in NODES:
        train = [e for e in entries if e["node"] == node and e.get("kind") == "train"]
        assert len(train) >= 3, entries
        spent = [e["epsilon"] for e in train]
        assert all(e["delta"] == 1e-4 for e in train)
        assert all(a < b for a, b in zip(spent, spent[1:])), spent  # grows with every round's steps
        final = json.loads((swarm.out_dir / node / "privacy.json").read_text())
        assert spent[-1] == pytest.approx(final["epsilon"]) and 0 < spent[-1] <= 4.0 + 0.01
        output = swarm.nodes[node].ml.output
        assert re.search(rf"round \d+: {node} has spent ε=[\d.]+ at δ=0.0001", output), output
        assert f"{node} trained with record-level DP-SGD, ε=" in output
    lines: list[str] = []
    host, port = swarm.sn.address.rsplit(":", 1)
    session = SwciSession(identity(certs, "swci"), tmp_path, out=lines.append, default_sn_port=int(port))
    try:
        for n, text in enumerate([f"CREATE CONTEXT t WITH IP {host}", "SWITCH CONTEXT t", "PERFDATA default"]):
            session.execute(parse_line(text, n + 1))
    finally:
        session.close()
    for node in NODES:
        line = next(x for x in lines if x.startswith(f"{node}: "))
        final = json.loads((swarm.out_dir / node / "privacy.json").read_text())
        assert f", ε {final['epsilon']:.3g} at δ 0.0001 · validation accuracy" in line, lines


# ------------------------------------------------------------------------------------ the flagship

RUN_WAIT_S = 240


@pytest.mark.slow
@pytest.mark.timeout(RUN_WAIT_S + 80)
def test_swarm_run_trains_the_flagship_with_record_level_dp(procs, tmp_path):
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "huggingface-peft"
    procs.workspaces.append(tmp_path / "ws" / "huggingface-peft" / "runs")
    run = procs.start([*SWARM, "run", str(example), "--workspace", str(tmp_path / "ws"), "--train-per-node", "64",
                       "--test-size", "64", "--sync-frequency", "2", "--no-baselines"],
                      env={"DP_EPSILON": "8"})
    finish_run(run, RUN_WAIT_S)
    assert "run_hf_task COMPLETE: 3 COMPLETE of 3" in run.output
    spent = re.search(r"privacy: record-level DP, (.*)", run.output)
    assert spent, run.output
    nodes = re.findall(r"ε=([\d.]+) at δ=1e-05 \((node\d)\)", spent.group(1))
    assert sorted(n for _, n in nodes) == ["node1", "node2", "node3"], spent.group(0)
    assert all(0 < float(eps) <= 8.01 for eps, _ in nodes), spent.group(0)
    project = tmp_path / "ws" / "huggingface-peft"
    for i in (1, 2, 3):
        metrics = json.loads((project / "saved_models" / f"node{i}" / "metrics.json").read_text())
        assert metrics["privacy"]["level"] == "record" and metrics["privacy"]["target_epsilon"] == 8
        assert 0 < metrics["privacy"]["epsilon"] <= 8.01 and metrics["privacy"]["steps"] == metrics["steps"]
    assert os.path.isdir(project / "saved_models" / "node1" / "final")


def test_the_callback_turns_its_sls_count_of_noised_contributions_into_client_level_epsilon():
    from swarmlearn.callback.core import Merged, SwarmCore
    from swarmlearn.dp import client_epsilon

    core = SwarmCore(None)
    core._client_spent(Merged(round=3, hash="h", client_rounds=2, client_noise_multiplier=1.5, client_delta=1e-5))
    assert core.client_privacy == {"client_epsilon": client_epsilon(1.5, 2, 1e-5), "client_delta": 1e-5}
    assert 0 < core.client_privacy["client_epsilon"] < client_epsilon(1.5, 3, 1e-5)
