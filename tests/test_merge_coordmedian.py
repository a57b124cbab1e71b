"""`coordmedian`: every coordinate takes the weighted median of the peers' values, so a minority of broken
or hostile peers cannot drag any single parameter wherever they like.

Checked against a reference that sorts each coordinate's values and walks their weights in exact
rational arithmetic: the first value at which the cumulative normalized weight reaches 1/2.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from swarmlearn.merge import get_merger
from swarmlearn.tensors import tensor
from test_merge import contribution, float_tensor, narrowed_like_torch, small_model


def reference_weighted_median(points: list[np.ndarray], weights: list[float]) -> np.ndarray:
    if sum(weights) == 0:
        weights = [1.0] * len(points)
    total = sum(Fraction(w) for w in weights)
    flat = [p.astype(np.float64).ravel() for p in points]
    out = np.empty_like(flat[0])
    for j in range(out.size):
        pairs = sorted(((f[j], Fraction(w)) for f, w in zip(flat, weights)), key=lambda pair: pair[0])
        cumulative = Fraction(0)
        for value, w in pairs:
            cumulative += w
            if cumulative / total >= Fraction(1, 2):
                out[j] = value
                break
    return out.reshape(points[0].shape)


@pytest.mark.parametrize("weights", [
    [1.0, 1.0, 1.0],
    [1.0, 1.0, 1.0, 1.0],  # even count: the lower median
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # cumulative 3/6 lands exactly on one half
    [5.0, 1.0, 2.0, 2.0],  # 5/10 exactly: the heaviest peer's value wherever it sorts first
    [3.0, 9.0, 1.0, 4.0, 4.0, 2.0, 7.0],
    [0.0, 2.0, 0.0, 1.0, 1.0],
    [0.25, 1.5, 0.75, 3.0],
])
def test_each_coordinate_takes_the_weighted_median_of_the_peers(weights):
    rng = np.random.default_rng(31)
    models = [small_model(rng) for _ in weights]
    merged = get_merger("coordmedian").merge([contribution(f"node-{i}", w, **m)
                                              for i, (w, m) in enumerate(zip(weights, models))])
    for name in ("layer.weight", "layer.bias"):
        want = reference_weighted_median([m[name].array for m in models], weights).astype(np.float32)
        assert np.array_equal(merged[name].array, want), name


def test_random_real_valued_weights_match_the_reference():
    rng = np.random.default_rng(32)
    for _ in range(20):
        n = int(rng.integers(1, 8))
        weights = list(rng.exponential(size=n))
        models = [small_model(rng) for _ in range(n)]
        merged = get_merger("coordmedian").merge([contribution(f"node-{i}", w, **m)
                                                  for i, (w, m) in enumerate(zip(weights, models))])
        want = reference_weighted_median([m["layer.weight"].array for m in models], weights).astype(np.float32)
        assert np.array_equal(merged["layer.weight"].array, want), weights


def test_tied_values_are_handled():
    values = [np.array([1.0, 2.0, 2.0, 0.0]), np.array([2.0, 2.0, 1.0, 0.0]), np.array([2.0, 1.0, 2.0, 0.0]),
              np.array([1.0, 1.0, 1.0, 3.0])]
    weights = [1.0, 2.0, 1.0, 1.0]
    peers = [contribution(f"n{i}", w, bias=tensor(v.astype(np.float32)))
             for i, (w, v) in enumerate(zip(weights, values))]
    merged = get_merger("coordmedian").merge(peers)["bias"]
    np.testing.assert_array_equal(merged.array, reference_weighted_median(values, weights))


def test_first_sync_with_all_zero_weights_takes_the_plain_median():
    rng = np.random.default_rng(33)
    models = [small_model(rng) for _ in range(5)]
    merged = get_merger("coordmedian").merge([contribution(f"node-{i}", 0.0, **m) for i, m in enumerate(models)])
    stacked = np.stack([m["layer.bias"].array for m in models])
    np.testing.assert_array_equal(merged["layer.bias"].array, np.median(stacked, axis=0))


def test_two_hostile_peers_out_of_five_cannot_drag_any_coordinate_out_of_the_honest_range():
    rng = np.random.default_rng(34)
    honest = [small_model(rng) for _ in range(3)]
    hostile = [small_model(rng, scale=1e6) for _ in range(2)]
    merged = get_merger("coordmedian").merge([contribution(f"node-{i}", 1.0, **m)
                                              for i, m in enumerate(honest + hostile)])
    for name in ("layer.weight", "layer.bias"):
        honest_values = np.stack([m[name].array for m in honest])
        assert (merged[name].array >= honest_values.min(axis=0)).all(), name
        assert (merged[name].array <= honest_values.max(axis=0)).all(), name


def test_a_peer_holding_half_the_weight_or_more_decides_wherever_it_sorts_first():
    rng = np.random.default_rng(35)
    models = [small_model(rng) for _ in range(4)]
    merged = get_merger("coordmedian").merge([contribution("big", 6.0, **models[0])] +
                                             [contribution(f"small-{i}", 2.0, **m) for i, m in enumerate(models[1:])])
    big = models[0]["layer.weight"].array
    others = np.stack([m["layer.weight"].array for m in models[1:]])
    # Where the heavy peer's value is the smallest of all, its weight alone reaches one half.
    smallest = big <= others.min(axis=0)
    np.testing.assert_array_equal(merged["layer.weight"].array[smallest], big[smallest])


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F64"])
def test_the_median_of_half_precision_models_is_one_of_their_values(dtype):
    rng = np.random.default_rng(36)
    weights = [1.0, 3.0, 2.0, 2.0, 1.0]
    tensors = [float_tensor(dtype, rng.standard_normal((4, 6))) for _ in weights]
    merged = get_merger("coordmedian").merge([contribution(f"n{i}", w, adapter=t)
                                              for i, (w, t) in enumerate(zip(weights, tensors))])["adapter"]
    want = narrowed_like_torch(dtype, reference_weighted_median([t.as_float64() for t in tensors], weights))
    assert merged.dtype == dtype
    assert np.array_equal(merged.array, want)
