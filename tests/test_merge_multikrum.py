"""`multikrum`: the n - f contributions closest to their nearest neighbours are kept and averaged by weight,
so up to f peers far from the rest are left out of the merge entirely, whatever weight they claim.

Checked against small cases worked out by hand, against a reference that scores every peer with plain
numpy (`reference_multikrum`, also usable on a swarm's snapshots), and against its stated assumption
n >= 2f + 3.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from swarmlearn.merge import get_merger
from swarmlearn.merge.base import MergeError
from swarmlearn.merge.multikrum import MultiKrum, most_byzantine_tolerated, pairwise_squared_distances
from swarmlearn.tensors import tensor
from test_merge import contribution, small_model, with_step


def reference_multikrum(sent: list[dict], weights: list[float]) -> dict:
    """f = (n - 3) // 2; each peer's score sums its squared distances (over all tensors) to its n - f - 2
    nearest others; the n - f lowest (ties: peer order) are averaged by weight; sent: {name: array}."""
    n = len(sent)
    f = max(0, (n - 3) // 2)
    keep = list(range(n))
    if f:
        flat = [np.concatenate([s[k].astype(np.float64).ravel() for k in sent[0]]) for s in sent]
        scores = [sorted(float(((flat[i] - flat[j]) ** 2).sum()) for j in range(n) if j != i)[:n - f - 2]
                  for i in range(n)]
        keep = sorted(sorted(range(n), key=lambda i: sum(scores[i]))[:n - f])
    w = np.asarray([weights[i] for i in keep], dtype=np.float64)
    w = np.full(len(w), 1 / len(w)) if w.sum() == 0 else w / w.sum()
    return {k: sum(wi * sent[i][k].astype(np.float64) for wi, i in zip(w, keep)).astype(sent[0][k].dtype)
            for k in sent[0]}


def merged_values(values: list[list[float]], weights: list[float], **options) -> np.ndarray:
    peers = [contribution(f"node-{i}", w, w=tensor(np.asarray(v, dtype=np.float64)))
             for i, (v, w) in enumerate(zip(values, weights))]
    return MultiKrum(**options).merge(peers)["w"].array


def test_five_peers_leave_out_the_one_far_from_its_neighbours():
    # f = 1, each score sums the 2 nearest squared distances: 0 -> 1 + 4 = 5, 1 -> 1 + 1 = 2, 2 -> 2,
    # 3 -> 1 + 4 = 5, 100 -> 97^2 + 98^2. The 4 lowest are kept: the mean of 0, 1, 2, 3.
    values = [[0.0], [1.0], [2.0], [3.0], [100.0]]
    np.testing.assert_allclose(merged_values(values, [1.0] * 5), [1.5], rtol=1e-15)


def test_the_peers_kept_are_averaged_by_weight_and_the_one_left_out_weighs_nothing():
    values = [[0.0], [1.0], [2.0], [3.0], [100.0]]
    # (0 x 1 + 1 x 2 + 2 x 3 + 3 x 4) / 10, whatever weight the far peer claims.
    np.testing.assert_allclose(merged_values(values, [1.0, 2.0, 3.0, 4.0, 1e6]), [2.0], rtol=1e-15)


def test_distances_are_taken_over_the_whole_model():
    # Node 4 agrees with the others on `a` and is far off on `b` only: it is the one left out.
    peers = [contribution(f"node-{i}", 1.0, a=tensor(np.array([float(i)])), b=tensor(np.array([0.1 * i])))
             for i in range(4)]
    peers.append(contribution("node-4", 1.0, a=tensor(np.array([1.5])), b=tensor(np.array([50.0]))))
    merged = get_merger("multikrum").merge(peers)
    np.testing.assert_allclose(merged["a"].array, [1.5], rtol=1e-15)
    np.testing.assert_allclose(merged["b"].array, [0.15], rtol=1e-14)


def test_the_leader_log_names_the_contributions_left_out(caplog):
    values = [[0.0], [1.0], [2.0], [3.0], [100.0]]
    peers = [contribution(name, 1.0, w=tensor(np.asarray(v))) for name, v in
             zip(["node1", "node2", "node3", "node4", "mallory"], values)]
    with caplog.at_level(logging.INFO, logger="swarmlearn.merge"):
        get_merger("multikrum").merge(peers)
    assert "multikrum (f=1) kept 4 of 5 contributions, left out mallory" in caplog.text


@pytest.mark.parametrize("peers, tolerated", [(1, 0), (3, 0), (4, 0), (5, 1), (6, 1), (7, 2), (8, 2), (13, 5)])
def test_f_defaults_to_the_most_that_n_allows(peers, tolerated):
    assert most_byzantine_tolerated(peers) == tolerated


def test_below_five_peers_every_contribution_is_kept_the_weighted_mean():
    values = [[0.0, 1.0], [1.0, -3.0], [100.0, 7.0], [2.0, 2.0]]
    weights = [1.0, 2.0, 3.0, 4.0]
    want = np.average(np.array(values), axis=0, weights=weights)
    np.testing.assert_allclose(merged_values(values, weights), want, rtol=1e-15)


def test_tolerating_more_than_n_allows_is_refused_naming_n_and_f():
    values = [[float(i)] for i in range(6)]
    with pytest.raises(MergeError) as caught:
        merged_values(values, [1.0] * 6, byzantine=2)
    message = str(caught.value)
    assert "f=2" in message and "n=6" in message and "n >= 2f + 3 = 7" in message
    np.testing.assert_allclose(merged_values(values + [[6.0]], [1.0] * 7, byzantine=2), [3.0], rtol=1e-15)


def test_a_negative_f_is_refused():
    with pytest.raises(MergeError, match="f=-1"):
        MultiKrum(byzantine=-1)


def test_two_hostile_peers_of_seven_are_left_out():
    rng = np.random.default_rng(51)
    honest = [small_model(rng) for _ in range(5)]
    hostile = [small_model(rng, scale=1e3) for _ in range(2)]
    weights = [1.0, 2.0, 1.0, 3.0, 1.0, 50.0, 50.0]
    merged = get_merger("multikrum").merge([contribution(f"node-{i}", w, **m)
                                            for i, (w, m) in enumerate(zip(weights, honest + hostile))])
    for name in ("layer.weight", "layer.bias"):
        want = np.average(np.stack([m[name].array.astype(np.float64) for m in honest]), axis=0, weights=weights[:5])
        np.testing.assert_allclose(merged[name].array, want.astype(np.float32), rtol=1e-6, err_msg=name)


def test_integer_tensors_come_from_the_heaviest_peer_kept():
    peers = [with_step(f"node-{i}", float(i + 1), 10 * (i + 1)) for i in range(4)]
    far = contribution("mallory", 99.0, w=tensor(np.full(2, 1e6, np.float32)), step=tensor(np.array(990)),
                       mask=tensor(np.array([True, True])), ids=tensor(np.array([990, -990], dtype=np.int32)))
    merged = get_merger("multikrum").merge(peers + [far])
    assert merged["step"].array == 40


@pytest.mark.parametrize("weights", [[1.0] * 5, [3.0, 9.0, 1.0, 4.0, 4.0, 2.0, 7.0], [0.0, 2.0, 0.0, 1.0, 1.0, 3.0],
                                     [0.0] * 5, [1.0, 1.0, 2.0]])
def test_random_models_match_the_reference(weights):
    rng = np.random.default_rng(52)
    models = [small_model(rng, scale=1.0 + i) for i in range(len(weights))]
    merged = get_merger("multikrum").merge([contribution(f"node-{i}", w, **m)
                                            for i, (w, m) in enumerate(zip(weights, models))])
    want = reference_multikrum([{k: t.array for k, t in m.items() if k != "step"} for m in models], weights)
    for name in want:
        np.testing.assert_array_equal(merged[name].array, want[name], err_msg=name)


def test_distances_of_peers_close_together_far_from_the_origin_are_exact_across_chunks():
    # 5 peers 1e4 from the origin, 1e-3 apart: the distances are what the differences say, and a tensor
    # longer than a chunk (CHUNK_VALUES // 5 values) is summed chunk by chunk to the same answer.
    rng = np.random.default_rng(53)
    base = 1e4 + rng.standard_normal(30_000)
    points = [base + 1e-3 * rng.standard_normal(30_000) for _ in range(5)]
    peers = [contribution(f"node-{i}", 1.0, w=tensor(p[:20_000]), v=tensor(p[20_000:]),
                          step=tensor(np.array(i))) for i, p in enumerate(points)]
    got = pairwise_squared_distances(peers)
    want = np.array([[((p - q) ** 2).sum() for q in points] for p in points])
    np.testing.assert_allclose(got, want, rtol=1e-9)
    assert (np.diag(got) == 0).all() and (got == got.T).all()
