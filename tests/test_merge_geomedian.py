"""`geomedian`: each tensor becomes the point closest, in summed weighted Euclidean distance, to all peers'
versions of it, so a minority of peers that send garbage moves the model only a little.

Checked against a plain Weiszfeld iteration run far longer than the production one, against the
objective it minimises, and on a swarm where two of five peers are far-off outliers.
"""

from __future__ import annotations

import numpy as np
import pytest

from swarmlearn.merge import get_merger
from swarmlearn.tensors import tensor
from test_merge import contribution, float_tensor, small_model


def equal_if_all_zero(weights: list[float]) -> list[float]:
    return [1.0] * len(weights) if sum(weights) == 0 else list(weights)


def weighted_distance_sum(points: list[np.ndarray], weights: list[float], z: np.ndarray) -> float:
    weights = equal_if_all_zero(weights)
    total = 0.0
    for x, w in zip(points, weights):
        total += w * float(np.sqrt(np.sum((x.astype(np.float64) - z) ** 2)))
    return total


def reference_mean(points: list[np.ndarray], weights: list[float]) -> np.ndarray:
    weights = equal_if_all_zero(weights)
    return sum(w * x.astype(np.float64) for w, x in zip(weights, points)) / sum(weights)


def reference_geomedian(points: list[np.ndarray], weights: list[float], iterations: int = 20000) -> np.ndarray:
    """Plain Weiszfeld: z <- sum(w_i x_i / d_i) / sum(w_i / d_i), from the weighted mean, until it stops moving."""
    weights = equal_if_all_zero(weights)
    xs = [x.astype(np.float64).ravel() for x in points]
    z = reference_mean(xs, weights)
    for _ in range(iterations):
        numerator = np.zeros_like(z)
        denominator = 0.0
        for x, w in zip(xs, weights):
            d = float(np.sqrt(np.sum((x - z) ** 2)))
            if d == 0.0:
                if w > 0:
                    return z.reshape(points[0].shape)  # sitting on a data point: a fixed point of the iteration
                continue
            numerator += (w / d) * x
            denominator += w / d
        z_next = numerator / denominator
        if np.sqrt(np.sum((z_next - z) ** 2)) <= 1e-14 * max(1.0, float(np.sqrt(np.sum(z ** 2)))):
            return z_next.reshape(points[0].shape)
        z = z_next
    return z.reshape(points[0].shape)


def merge(weights: list[float], models: list[dict]) -> dict:
    return get_merger("geomedian").merge([contribution(f"node-{i}", w, **m)
                                          for i, (w, m) in enumerate(zip(weights, models))])


@pytest.mark.parametrize("weights", [
    [1.0, 1.0, 1.0],
    [1.0, 2.0, 3.0, 4.0, 5.0],
    [0.5, 0.0, 2.0, 1.25],
    [3.0, 1.0, 1.0, 1.0, 1.0, 2.0, 0.1],
    [0.0, 0.0, 0.0, 0.0],
])
def test_each_tensor_becomes_the_weighted_geometric_median_of_the_peers(weights):
    rng = np.random.default_rng(41)
    models = [{name: tensor(t.array.astype(np.float64)) for name, t in small_model(rng).items()} for _ in weights]
    merged = merge(weights, models)
    for name in ("layer.weight", "layer.bias"):
        points = [m[name].array for m in models]
        want = reference_geomedian(points, weights)
        np.testing.assert_allclose(merged[name].array, want, rtol=0, atol=1e-5, err_msg=name)
        # And nearly as good a minimiser: production stops once a step is below 1e-7 of the estimate's norm.
        assert (weighted_distance_sum(points, weights, merged[name].array)
                <= weighted_distance_sum(points, weights, want) * (1 + 1e-6)), name


def test_float32_models_match_the_reference_to_float32_precision():
    rng = np.random.default_rng(42)
    weights = [2.0, 1.0, 1.0, 3.0, 1.5]
    models = [small_model(rng) for _ in weights]
    merged = merge(weights, models)
    for name in ("layer.weight", "layer.bias"):
        want = reference_geomedian([m[name].array for m in models], weights)
        np.testing.assert_allclose(merged[name].array, want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_the_geometric_median_is_never_farther_from_the_peers_than_the_mean():
    rng = np.random.default_rng(43)
    for _ in range(25):
        n = int(rng.integers(2, 8))
        weights = list(rng.exponential(size=n))
        points = [rng.standard_normal(16) * rng.exponential() + rng.standard_normal() for _ in range(n)]
        merged = get_merger("geomedian").merge([contribution(f"node-{i}", w, w16=tensor(p))
                                                for i, (w, p) in enumerate(zip(weights, points))])["w16"]
        assert (weighted_distance_sum(points, weights, merged.array)
                <= weighted_distance_sum(points, weights, reference_mean(points, weights)) * (1 + 1e-12))


def test_two_far_outliers_out_of_five_barely_move_the_model_while_the_mean_follows_them():
    rng = np.random.default_rng(44)
    center = rng.standard_normal(50)
    inliers = [center + 0.01 * rng.standard_normal(50) for _ in range(3)]
    outliers = [center + 1000.0 + rng.standard_normal(50), center - 500.0 * rng.standard_normal(50)]
    points = inliers + outliers
    peers = [contribution(f"node-{i}", 1.0, w=tensor(p.astype(np.float32))) for i, p in enumerate(points)]
    geomedian = get_merger("geomedian").merge(peers)["w"].array.astype(np.float64)
    mean = get_merger("mean").merge(peers)["w"].array.astype(np.float64)
    inlier_center = np.mean(inliers, axis=0)
    assert np.linalg.norm(geomedian - inlier_center) < 0.1
    assert np.linalg.norm(mean - inlier_center) > 100.0
    np.testing.assert_allclose(geomedian, reference_geomedian(points, [1.0] * 5), atol=1e-4)


def test_each_tensor_is_merged_on_its_own():
    rng = np.random.default_rng(45)
    weights = [1.0, 4.0, 2.0]
    models = [small_model(rng) for _ in weights]
    together = merge(weights, models)
    for name in ("layer.weight", "layer.bias"):
        alone = merge(weights, [{name: m[name]} for m in models])
        np.testing.assert_array_equal(together[name].array, alone[name].array, err_msg=name)


def test_a_peer_holding_more_than_half_the_weight_is_the_geometric_median():
    rng = np.random.default_rng(46)
    models = [small_model(rng) for _ in range(4)]
    weights = [5.0, 1.0, 1.5, 2.0]  # 5 > 4.5: the first peer's point is the minimiser
    merged = merge(weights, models)
    for name in ("layer.weight", "layer.bias"):
        np.testing.assert_allclose(merged[name].array, models[0][name].array, rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_half_precision_models_land_near_the_reference(dtype):
    rng = np.random.default_rng(47)
    weights = [1.0, 2.0, 1.0, 1.0]
    tensors = [float_tensor(dtype, rng.standard_normal((6, 3))) for _ in weights]
    merged = get_merger("geomedian").merge([contribution(f"n{i}", w, adapter=t)
                                            for i, (w, t) in enumerate(zip(weights, tensors))])["adapter"]
    assert merged.dtype == dtype
    want = reference_geomedian([t.as_float64() for t in tensors], weights)
    np.testing.assert_allclose(merged.as_float64(), want, rtol=2 ** -7, atol=1e-3)
