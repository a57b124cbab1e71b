"""`mean` (FedAvg): peers that trained on more data pull the merged model harder, in proportion to weight.

Checked against a plain weighted average written out below, to float32 exactness; a model larger than
EXACT_SUMS_MAX_BYTES (float32 running means, so that its leader holds two models) to within the float32
rounding of one step per contribution, and bit for bit where peers agree.
"""

from __future__ import annotations

import numpy as np
import pytest

from swarmlearn.merge import get_merger
from swarmlearn.tensors import tensor
from test_merge import bf16, contribution, float_tensor, narrowed_like_torch, small_model


def reference_mean(points: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """sum(w_i * x_i) / sum(w_i) in float64, one peer at a time; equal weights when all are zero."""
    if sum(weights) == 0:
        weights = [1.0] * len(points)
    total = 0.0
    for w in weights:
        total += w
    acc = np.zeros_like(points[0], dtype=np.float64)
    for w, x in zip(weights, points):
        acc = acc + w * x.astype(np.float64)
    return acc / total


@pytest.mark.parametrize("weights", [
    [1.0, 2.0, 3.0, 4.0, 5.0],
    [120.0, 3.0, 0.0, 77.0],
    [0.1, 0.7, 0.2],
    [1e-3, 5e4, 17.25, 3.5, 0.5, 9.0, 2.0],
])
def test_peers_with_more_data_pull_harder_exactly_as_a_weighted_average(weights):
    rng = np.random.default_rng(21)
    models = [small_model(rng, scale=10.0 ** rng.integers(-3, 3)) for _ in weights]
    peers = [contribution(f"node-{i}", w, **m) for i, (w, m) in enumerate(zip(weights, models))]
    merged = get_merger("mean").merge(peers)
    for name in ("layer.weight", "layer.bias"):
        want = reference_mean([m[name].array for m in models], weights).astype(np.float32)
        assert merged[name].dtype == "F32"
        assert np.array_equal(merged[name].array, want), name


def test_first_sync_with_all_zero_weights_averages_everyone_equally():
    rng = np.random.default_rng(22)
    models = [small_model(rng) for _ in range(4)]
    merged = get_merger("mean").merge([contribution(f"node-{i}", 0.0, **m) for i, m in enumerate(models)])
    for name in ("layer.weight", "layer.bias"):
        want = reference_mean([m[name].array for m in models], [1.0] * 4).astype(np.float32)
        assert np.array_equal(merged[name].array, want), name


def test_a_peer_with_zero_weight_does_not_move_the_model():
    rng = np.random.default_rng(23)
    a, b, outsider = small_model(rng), small_model(rng), small_model(rng, scale=1e6)
    with_outsider = get_merger("mean").merge([contribution("a", 2.0, **a), contribution("z", 0.0, **outsider),
                                              contribution("b", 1.0, **b)])
    without = get_merger("mean").merge([contribution("a", 2.0, **a), contribution("b", 1.0, **b)])
    for name in ("layer.weight", "layer.bias"):
        assert np.array_equal(with_outsider[name].array, without[name].array), name


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F64", "F32"])
def test_half_precision_models_are_averaged_in_float64_and_stored_back_in_their_dtype(dtype):
    rng = np.random.default_rng(24)
    weights = [3.0, 1.0, 0.5, 6.0]
    tensors = [float_tensor(dtype, rng.standard_normal((8, 5))) for _ in weights]
    merged = get_merger("mean").merge([contribution(f"n{i}", w, adapter=t)
                                       for i, (w, t) in enumerate(zip(weights, tensors))])["adapter"]
    assert merged.dtype == dtype
    want = narrowed_like_torch(dtype, reference_mean([t.as_float64() for t in tensors], weights))
    assert merged.array.dtype == want.dtype
    assert np.array_equal(merged.array, want)


def test_bf16_means_round_to_nearest_even():
    # 1.0 and 1.0078125 are neighbours in bf16; their mean is the tie 1.00390625, which rounds to the even 1.0.
    # 1.0078125 and 1.015625: the tie 1.01171875 rounds up to the even 1.015625.
    a, b = bf16(np.array([1.0, 1.0078125])), bf16(np.array([1.0078125, 1.015625]))
    merged = get_merger("mean").merge([contribution("a", 1.0, w=a), contribution("b", 1.0, w=b)])["w"]
    np.testing.assert_array_equal(merged.as_float64(), [1.0, 1.015625])


def test_memory_stays_at_about_two_models_so_peers_can_stream_in():
    rng = np.random.default_rng(25)
    models = [small_model(rng) for _ in range(6)]
    weights = [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]
    streamed = (contribution(f"node-{i}", w, **m) for i, (w, m) in enumerate(zip(weights, models)))
    merged = get_merger("mean").merge(streamed)  # a generator: seen once, one peer at a time
    want = reference_mean([m["layer.bias"].array for m in models], weights).astype(np.float32)
    assert np.array_equal(merged["layer.bias"].array, want)


def test_integer_tensors_are_not_averaged():
    peers = [contribution("a", 1.0, step=tensor(np.array(10)), w=tensor(np.zeros(1, np.float32))),
             contribution("b", 3.0, step=tensor(np.array(11)), w=tensor(np.ones(1, np.float32)))]
    merged = get_merger("mean").merge(peers)
    assert merged["step"].array == 11
    assert merged["w"].array[0] == np.float32(0.75)


def test_a_norm_outlier_taken_back_out_of_the_running_sums_leaves_the_mean_of_the_others():
    from swarmlearn.merge.base import contribution_norm
    rng = np.random.default_rng(31)
    models = [small_model(rng) for _ in range(4)]
    outlier = small_model(rng, scale=50.0)  # an outlier by the norm rule, yet small enough to subtract
    peers = [contribution(f"node-{i}", float(i + 1), **m) for i, m in enumerate(models)]
    bad = contribution("mallory", 2.5, **outlier)
    acc = get_merger("mean").accumulator()
    for c in [*peers[:2], bad, *peers[2:]]:
        acc.add(c, contribution_norm(c.tensors))
    assert acc.subtract(bad)
    merged = acc.result()
    want = get_merger("mean").merge(peers)
    for name in ("layer.weight", "layer.bias"):
        assert np.allclose(merged[name].array, want[name].array, rtol=1e-6, atol=0), name


def test_a_boosted_contribution_is_not_subtracted_so_that_the_merge_is_built_again_without_it():
    from swarmlearn.merge.base import contribution_norm
    rng = np.random.default_rng(32)
    peers = [contribution(f"node-{i}", 1.0, **small_model(rng)) for i in range(3)]
    boosted = contribution("mallory", 1.0, **small_model(rng, scale=1e9))
    acc = get_merger("mean").accumulator()
    for c in [*peers, boosted]:
        acc.add(c, contribution_norm(c.tensors))
    assert not acc.subtract(boosted)  # its rounding error would swamp the others' values


def test_the_mean_accumulator_holds_one_float64_sum_per_tensor_whatever_the_number_of_peers():
    from swarmlearn.merge.base import contribution_norm
    rng = np.random.default_rng(33)
    acc = get_merger("mean").accumulator()
    for i in range(20):
        c = contribution(f"node-{i}", 1.0, **small_model(rng))
        acc.add(c, contribution_norm(c.tensors))
    held = sum(a.nbytes for a in acc.sums.values())
    assert held == sum(np.zeros(s, dtype=np.float64).nbytes for s in [(3, 4), (4,)])
    assert all(not h.tensors for h in [acc.heaviest])  # no contribution's tensors are kept alive


# --- a large model: float32 running means ------------------------------------------------------------

def running_mean_merge(contributions) -> dict:
    """`mean` as a model over EXACT_SUMS_MAX_BYTES is merged (the tests' models are small)."""
    from swarmlearn.merge.base import contribution_norm
    from swarmlearn.merge.mean import MeanAccumulator
    acc = MeanAccumulator(exact_max_bytes=0)
    for c in contributions:
        acc.add(c, contribution_norm(c.tensors))
    return acc.result()


def assert_within_float32_resolution(got: np.ndarray, points: list[np.ndarray], weights: list[float]) -> None:
    """|got - exact mean| is at most half a float32 unit of the weighted magnitudes per rounding: one
    per contribution (the running float32 mean) and one more."""
    if sum(weights) == 0:
        weights = [1.0] * len(points)
    exact = reference_mean(points, weights)
    magnitude = sum(w * np.abs(x.astype(np.float64)) for w, x in zip(weights, points)) / sum(weights)
    bound = (len(points) + 1) / 2 * 2.0 ** -24 * magnitude
    assert got.dtype == np.float32
    assert (np.abs(got.astype(np.float64) - exact) <= bound).all(), np.max(np.abs(got - exact) / magnitude)


@pytest.mark.parametrize("weights", [
    [1.0, 2.0, 3.0, 4.0, 5.0],
    [120.0, 3.0, 0.0, 77.0],
    [0.1, 0.7, 0.2],
    [1e-3, 5e4, 17.25, 3.5, 0.5, 9.0, 2.0],
    [0.0, 0.0, 0.0],
])
def test_a_large_models_running_mean_is_the_weighted_average_to_float32_resolution(weights):
    rng = np.random.default_rng(21)
    models = [small_model(rng, scale=10.0 ** rng.integers(-3, 3)) for _ in weights]
    merged = running_mean_merge(contribution(f"node-{i}", w, **m) for i, (w, m) in enumerate(zip(weights, models)))
    for name in ("layer.weight", "layer.bias"):
        assert merged[name].dtype == "F32"
        assert_within_float32_resolution(merged[name].array, [m[name].array for m in models], weights)


def test_a_large_model_sent_alone_or_agreed_on_comes_back_bit_for_bit():
    model = small_model(np.random.default_rng(26))
    alone = running_mean_merge([contribution("node-1", 2.5, **model)])
    agreed = running_mean_merge([contribution(f"node-{i}", w, **model) for i, w in enumerate([0.3, 7.0, 1.0, 2.5])])
    for merged in (alone, agreed):
        for name in model:
            np.testing.assert_array_equal(merged[name].array, model[name].array, err_msg=name)


def test_a_zero_weight_peer_does_not_move_a_large_models_running_mean():
    rng = np.random.default_rng(23)
    a, b, outsider = small_model(rng), small_model(rng), small_model(rng, scale=1e6)
    with_outsider = running_mean_merge([contribution("a", 2.0, **a), contribution("z", 0.0, **outsider),
                                        contribution("b", 1.0, **b)])
    without = running_mean_merge([contribution("a", 2.0, **a), contribution("b", 1.0, **b)])
    for name in ("layer.weight", "layer.bias"):
        assert np.array_equal(with_outsider[name].array, without[name].array), name


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F64"])
def test_a_large_half_precision_or_f64_model_still_matches_the_float64_mean_in_its_dtype(dtype):
    rng = np.random.default_rng(24)
    weights = [3.0, 1.0, 0.5, 6.0]
    tensors = [float_tensor(dtype, rng.standard_normal((8, 5))) for _ in weights]
    merged = running_mean_merge([contribution(f"n{i}", w, adapter=t)
                                 for i, (w, t) in enumerate(zip(weights, tensors))])["adapter"]
    want = narrowed_like_torch(dtype, reference_mean([t.as_float64() for t in tensors], weights))
    assert merged.dtype == dtype
    assert np.array_equal(merged.array, want)  # float32 rounding is far below F16's and BF16's; F64 sums


def test_a_norm_outlier_is_not_taken_back_out_of_float32_running_means_but_a_peer_like_the_others_is():
    # 50 x the others would leave an error of some 50 float32 units in the rest.
    from swarmlearn.merge.base import contribution_norm
    from swarmlearn.merge.mean import MeanAccumulator
    rng = np.random.default_rng(31)
    peers = [contribution(f"node-{i}", float(i + 1), **small_model(rng)) for i in range(4)]
    bad = contribution("mallory", 2.5, **small_model(rng, scale=50.0))
    like_peers = contribution("carol", 1.0, **small_model(rng))
    acc = MeanAccumulator(exact_max_bytes=0)
    for c in [*peers, bad, like_peers]:
        acc.add(c, contribution_norm(c.tensors))
    assert not acc.subtract(bad)
    assert acc.subtract(like_peers)
    assert not acc.subtract(bad)  # still refused once the sums hold the others only
    merged = acc.result()
    with_bad = running_mean_merge([*peers, bad])
    for name in ("layer.weight", "layer.bias"):
        assert np.array_equal(merged[name].array, with_bad[name].array) or \
            np.allclose(merged[name].array, with_bad[name].array, rtol=1e-5, atol=0), name


def test_a_large_models_running_means_are_the_size_of_the_model_and_a_small_ones_sums_float64():
    from swarmlearn.merge.base import contribution_norm
    from swarmlearn.merge.mean import MeanAccumulator
    rng = np.random.default_rng(33)
    large, small = MeanAccumulator(exact_max_bytes=0), MeanAccumulator()
    for i in range(5):
        c = contribution(f"node-{i}", 1.0, **small_model(rng))
        large.add(c, contribution_norm(c.tensors))
        small.add(c, contribution_norm(c.tensors))
    assert sum(a.nbytes for a in large.sums.values()) == (12 + 4) * 4  # float32: the F32 model's own size
    assert sum(a.nbytes for a in small.sums.values()) == (12 + 4) * 8
