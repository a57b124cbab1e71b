"""`trimmedmean`: every coordinate drops its k highest and k lowest values and averages the rest by weight,
so a few broken or hostile peers cannot drag any parameter outside the range of the honest peers' values.

Checked against small cases worked out by hand and against a reference that walks each coordinate's
sorted values in plain Python (`reference_trimmedmean`, also usable on a swarm's snapshots).
"""

from __future__ import annotations

import numpy as np
import pytest

from swarmlearn.merge import get_merger
from swarmlearn.merge.base import MergeError
from swarmlearn.merge.trimmedmean import TrimmedMean, trimmed_per_side
from swarmlearn.tensors import tensor
from test_merge import contribution, small_model


def reference_trimmedmean(sent: list[dict], weights: list[float], beta: float = 0.2) -> dict:
    """Each coordinate's values sorted (ties in peer order), k = trimmed_per_side dropped at each end,
    the weighted mean of the rest (their plain mean when they all weigh 0); sent: {name: array} per peer."""
    w = np.asarray(weights, dtype=np.float64)
    w = np.full(len(w), 1 / len(w)) if w.sum() == 0 else w / w.sum()
    trim = trimmed_per_side(len(sent), beta)
    out = {}
    for name in sent[0]:
        flat = [s[name].astype(np.float64).ravel() for s in sent]
        column = np.empty(flat[0].size)
        for j in range(column.size):
            pairs = sorted(((f[j], wi) for f, wi in zip(flat, w)), key=lambda pair: pair[0])
            kept = pairs[trim:len(pairs) - trim]
            total = sum(wi for _, wi in kept)
            column[j] = (sum(wi * v for v, wi in kept) / total if total > 0
                         else sum(v for v, _ in kept) / len(kept))
        out[name] = column.reshape(sent[0][name].shape).astype(sent[0][name].dtype)
    return out


def merged_values(values: list[list[float]], weights: list[float], **options) -> np.ndarray:
    peers = [contribution(f"node-{i}", w, w=tensor(np.asarray(v, dtype=np.float64)))
             for i, (v, w) in enumerate(zip(values, weights))]
    return TrimmedMean(**options).merge(peers)["w"].array


def test_five_peers_drop_the_highest_and_the_lowest_value_of_each_coordinate():
    # Per coordinate: [1, 2, 3, 4, 100] keeps 2, 3, 4; [7, -50, 6, 5, 8] keeps 5, 6, 7.
    values = [[1.0, 7.0], [2.0, -50.0], [3.0, 6.0], [4.0, 5.0], [100.0, 8.0]]
    np.testing.assert_allclose(merged_values(values, [1.0] * 5), [3.0, 6.0], rtol=1e-15)


def test_the_values_kept_are_averaged_by_their_peers_weights():
    values = [[1.0], [2.0], [3.0], [4.0], [100.0]]
    # 2, 3 and 4 kept with weights 1, 1 and 3: (2 + 3 + 12) / 5.
    np.testing.assert_allclose(merged_values(values, [1.0, 1.0, 1.0, 3.0, 1.0]), [17 / 5], rtol=1e-15)


def test_a_trimmed_peer_weighs_nothing_however_much_weight_it_claims():
    values = [[1.0], [2.0], [3.0], [4.0], [1e9]]
    np.testing.assert_allclose(merged_values(values, [1.0, 1.0, 1.0, 1.0, 1e6]), [3.0], rtol=1e-15)


def test_where_the_values_kept_all_weigh_nothing_they_count_equally():
    values = [[1.0], [2.0], [3.0], [4.0], [100.0]]
    np.testing.assert_allclose(merged_values(values, [0.0, 0.0, 0.0, 0.0, 5.0]), [3.0], rtol=1e-15)


@pytest.mark.parametrize("peers, per_side", [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1), (9, 1), (10, 2), (14, 2),
                                             (15, 3), (40, 8)])
def test_a_fifth_of_the_peers_rounded_down_is_trimmed_at_each_end_and_at_least_one_from_three_on(peers, per_side):
    assert trimmed_per_side(peers, 0.2) == per_side


def test_nothing_is_trimmed_with_two_peers_and_a_high_beta_still_leaves_a_middle():
    np.testing.assert_allclose(merged_values([[1.0], [3.0]], [1.0, 1.0]), [2.0], rtol=1e-15)
    assert trimmed_per_side(4, 0.49) == 1 and trimmed_per_side(5, 0.49) == 2
    np.testing.assert_array_equal(merged_values([[1.0], [2.0], [9.0], [-4.0], [3.0]], [1.0] * 5, beta=0.49), [2.0])


def test_beta_zero_is_the_weighted_mean():
    values = [[1.0, 2.0], [3.0, -1.0], [10.0, 0.5]]
    weights = [1.0, 2.0, 5.0]
    want = np.average(np.array(values), axis=0, weights=weights)
    np.testing.assert_allclose(merged_values(values, weights, beta=0.0), want, rtol=1e-15)


@pytest.mark.parametrize("beta", [0.5, 0.7, -0.1])
def test_a_beta_that_would_leave_nothing_is_refused(beta):
    with pytest.raises(MergeError) as caught:
        TrimmedMean(beta=beta)
    assert "beta" in str(caught.value) and str(beta) in str(caught.value)


@pytest.mark.parametrize("weights", [[1.0] * 5, [3.0, 9.0, 1.0, 4.0, 4.0, 2.0, 7.0], [0.0, 2.0, 0.0, 1.0, 1.0],
                                     [0.0] * 4, [0.25, 1.5, 0.75, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 5.0, 0.5]])
def test_random_models_match_the_reference(weights):
    rng = np.random.default_rng(41)
    models = [small_model(rng) for _ in weights]
    merged = get_merger("trimmedmean").merge([contribution(f"node-{i}", w, **m)
                                              for i, (w, m) in enumerate(zip(weights, models))])
    want = reference_trimmedmean([{k: t.array for k, t in m.items() if k != "step"} for m in models], weights)
    for name in want:
        np.testing.assert_array_equal(merged[name].array, want[name], err_msg=name)


def test_a_hostile_peer_far_away_leaves_every_coordinate_within_the_honest_range():
    rng = np.random.default_rng(42)
    honest = [small_model(rng) for _ in range(4)]
    hostile = small_model(rng, scale=1e6)
    peers = [contribution(f"node-{i}", 1.0, **m) for i, m in enumerate(honest)] + \
            [contribution("mallory", 1000.0, **hostile)]
    merged = get_merger("trimmedmean").merge(peers)
    mean = get_merger("mean").merge(peers)
    for name in ("layer.weight", "layer.bias"):
        honest_values = np.stack([m[name].array for m in honest])
        assert (merged[name].array >= honest_values.min(axis=0)).all(), name
        assert (merged[name].array <= honest_values.max(axis=0)).all(), name
        assert np.abs(mean[name].array).max() > 1e4  # what the plain mean lets the hostile peer do


def test_two_hostile_peers_of_ten_stay_trimmed():
    rng = np.random.default_rng(43)
    honest = [small_model(rng) for _ in range(8)]
    hostile = [small_model(rng, scale=1e6) for _ in range(2)]
    merged = get_merger("trimmedmean").merge([contribution(f"node-{i}", 1.0, **m)
                                              for i, m in enumerate(honest + hostile)])
    for name in ("layer.weight", "layer.bias"):
        honest_values = np.stack([m[name].array for m in honest])
        assert (merged[name].array >= honest_values.min(axis=0)).all(), name
        assert (merged[name].array <= honest_values.max(axis=0)).all(), name


def test_a_tensor_larger_than_a_chunk_is_trimmed_coordinate_by_coordinate():
    rng = np.random.default_rng(44)
    points = [rng.standard_normal(70_001) for _ in range(5)]  # more than CHUNK_VALUES // 5 columns per chunk
    weights = [1.0, 2.0, 3.0, 1.0, 1.0]
    merged = merged_values(points, weights)
    stacked = np.stack(points)
    order = np.argsort(stacked, axis=0, kind="stable")
    kept = np.take_along_axis(stacked, order, axis=0)[1:4]
    kept_weights = np.asarray(weights)[order][1:4]
    np.testing.assert_allclose(merged, (kept * kept_weights).sum(axis=0) / kept_weights.sum(axis=0), rtol=1e-14)
