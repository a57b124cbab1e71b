"""What every merge method promises a swarm, whichever one the user picks.

A contribution that does not fit the model (wrong tensors, NaN, a nonsense weight) is refused with the
node's and the tensor's name, and one whose norm is far beyond the others' is refused as an outlier.
Every method keeps each tensor's dtype and shape and takes integer tensors (step counters) from the
heaviest peer; a misspelled method name lists the real ones, and the CLI offers exactly those. The
methods' own arithmetic is checked against plain references in test_merge_<method>.py.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from swarmlearn.errors import SwarmError
from swarmlearn.merge import METHODS, get_merger
from swarmlearn.merge.base import BadContribution, Contribution, MergeError, check_contribution
from swarmlearn.tensors import Tensor, tensor

# --- helpers shared with test_merge_<method>.py ------------------------------------------------------------


def contribution(node: str, weight: float, **tensors: Tensor) -> Contribution:
    return Contribution(node=node, weight=weight, tensors=dict(tensors))


def bf16(values: np.ndarray) -> Tensor:
    """A BF16 tensor holding `values` as torch would round them."""
    t = torch.from_numpy(np.asarray(values, dtype=np.float32)).to(torch.bfloat16)
    return Tensor("BF16", t.view(torch.int16).numpy().view(np.uint16).copy())


def narrowed_like_torch(dtype: str, values: np.ndarray) -> np.ndarray:
    """Float64 results narrowed to `dtype` the way a user's framework would, as the raw stored array."""
    if dtype == "BF16":
        return bf16(values.astype(np.float32)).array
    return values.astype({"F64": np.float64, "F32": np.float32, "F16": np.float16}[dtype])


def float_tensor(dtype: str, values: np.ndarray) -> Tensor:
    return bf16(values) if dtype == "BF16" else tensor(narrowed_like_torch(dtype, values))


def small_model(rng: np.random.Generator, scale: float = 1.0) -> dict[str, Tensor]:
    return {
        "layer.weight": tensor((rng.standard_normal((3, 4)) * scale).astype(np.float32)),
        "layer.bias": tensor((rng.standard_normal(4) * scale).astype(np.float32)),
        "step": tensor(np.array(int(rng.integers(0, 1000)), dtype=np.int64)),
    }


# --- check_contribution: refusing what does not fit ----------------------------------------------------------


@pytest.fixture
def swarm():
    """The first peer's model (the reference every other contribution must match) and a fitting one."""
    rng = np.random.default_rng(11)
    return small_model(rng), small_model(rng)


def refusal(c: Contribution, reference) -> BadContribution:
    with pytest.raises(BadContribution) as caught:
        check_contribution(c, reference)
    assert caught.value.node == c.node
    assert c.node in str(caught.value)
    return caught.value


def test_a_fitting_contribution_is_accepted(swarm):
    reference, model = swarm
    check_contribution(contribution("node-2", 3.0, **model), reference)
    check_contribution(contribution("node-2", 0.0, **model), reference)
    check_contribution(contribution("node-1", 1.0, **reference), None)


def test_a_nan_is_refused_naming_the_node_and_the_tensor(swarm):
    reference, model = swarm
    weight = model["layer.weight"].array.copy()
    weight[1, 2] = np.nan
    error = refusal(contribution("node-2", 1.0, **{**model, "layer.weight": tensor(weight)}), reference)
    assert "layer.weight" in str(error) and "NaN" in str(error)


@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_an_infinity_is_refused_naming_the_node_and_the_tensor(swarm, bad):
    reference, model = swarm
    bias = model["layer.bias"].array.copy()
    bias[0] = bad
    error = refusal(contribution("node-3", 1.0, **{**model, "layer.bias": tensor(bias)}), reference)
    assert "layer.bias" in str(error) and "Inf" in str(error)


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F64"])
def test_a_nan_in_any_float_dtype_is_refused(dtype):
    good = float_tensor(dtype, np.array([1.0, 2.0]))
    bad = float_tensor(dtype, np.array([1.0, np.nan]))
    error = refusal(contribution("node-4", 1.0, adapter=bad), {"adapter": good})
    assert "adapter" in str(error)


def test_a_half_precision_overflow_to_inf_is_refused():
    with np.errstate(over="ignore"):
        bad = tensor(np.array([1.0, 70000.0]).astype(np.float16))  # beyond float16's range: inf
    error = refusal(contribution("node-5", 1.0, head=bad), {"head": tensor(np.zeros(2, dtype=np.float16))})
    assert "head" in str(error)


def test_a_wrong_shape_is_refused_naming_the_node_and_the_tensor(swarm):
    reference, model = swarm
    error = refusal(contribution("node-2", 1.0, **{**model, "layer.bias": tensor(np.zeros(5, np.float32))}),
                    reference)
    assert "layer.bias" in str(error) and "[5]" in str(error) and "[4]" in str(error)


def test_a_wrong_dtype_is_refused_naming_the_node_and_the_tensor(swarm):
    reference, model = swarm
    as_half = tensor(model["layer.bias"].array.astype(np.float16))
    error = refusal(contribution("node-2", 1.0, **{**model, "layer.bias": as_half}), reference)
    assert "layer.bias" in str(error) and "F16" in str(error) and "F32" in str(error)


def test_bf16_and_f16_are_told_apart(swarm):
    reference = {"w": tensor(np.zeros(3, np.float16))}
    error = refusal(contribution("node-2", 1.0, w=bf16(np.zeros(3))), reference)
    assert "w is BF16" in str(error)


def test_a_missing_tensor_is_refused_naming_the_node_and_the_tensor(swarm):
    reference, model = swarm
    del model["layer.bias"]
    error = refusal(contribution("node-2", 1.0, **model), reference)
    assert "layer.bias" in str(error) and "missing" in str(error)


def test_an_extra_tensor_is_refused_naming_the_node_and_the_tensor(swarm):
    reference, model = swarm
    error = refusal(contribution("node-2", 1.0, **model, **{"lora.B": tensor(np.zeros(2, np.float32))}), reference)
    assert "lora.B" in str(error) and "unexpected" in str(error)


@pytest.mark.parametrize("weight", [-1.0, -1e-300, np.nan, np.inf, -np.inf])
def test_a_negative_or_non_finite_weight_is_refused_naming_the_node(swarm, weight):
    reference, model = swarm
    error = refusal(contribution("node-7", weight, **model), reference)
    assert "weight" in str(error)


# --- every method keeps the model's structure ------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_every_listed_method_is_found_by_its_name(method):
    assert get_merger(method).name == method


def test_a_misspelled_method_is_refused_listing_the_methods():
    with pytest.raises(SwarmError) as caught:
        get_merger("nope")
    message = str(caught.value)
    assert "'nope'" in message
    for method in METHODS:
        assert method in message


def test_reading_the_list_of_methods_loads_no_numpy():
    # The CLI offers the names at start-up; `swarm --help` must not pay for numpy (or torch).
    probe = "import sys, swarmlearn.cli; print('numpy' in sys.modules, 'torch' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert loaded.stdout.split() == ["False", "False"], loaded.stdout + loaded.stderr


def test_the_cli_offers_exactly_the_listed_methods():
    shown = subprocess.run([sys.executable, "-m", "swarmlearn.cli", "run", "--help"], capture_output=True, text=True,
                           timeout=60, check=True).stdout
    assert f"--merge-method [{'|'.join(METHODS)}]" in shown


@pytest.mark.parametrize("method", METHODS)
def test_merging_nothing_is_an_error(method):
    with pytest.raises(MergeError):
        get_merger(method).merge([])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16", "F64"])
@pytest.mark.parametrize("shape", [(3, 4), (5,), (), (0,), (2, 0)])
def test_every_method_keeps_each_tensors_dtype_and_shape(method, dtype, shape):
    rng = np.random.default_rng(12)
    peers = [contribution(f"node-{i}", float(i + 1), w=float_tensor(dtype, rng.standard_normal(shape)))
             for i in range(4)]
    merged = get_merger(method).merge(peers)["w"]
    assert merged.dtype == dtype
    assert merged.array.shape == shape
    assert merged.array.dtype == peers[0].tensors["w"].array.dtype


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_back_a_lone_contribution_unchanged(method):
    model = small_model(np.random.default_rng(13))
    merged = get_merger(method).merge([contribution("node-1", 2.5, **model)])
    assert sorted(merged) == sorted(model)
    for name in model:
        np.testing.assert_array_equal(merged[name].array, model[name].array, err_msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_peers_that_agree_merge_to_the_model_they_agree_on(method):
    model = small_model(np.random.default_rng(14))
    peers = [contribution(f"node-{i}", w, **model) for i, w in enumerate([0.3, 7.0, 1.0, 2.5])]
    merged = get_merger(method).merge(peers)
    for name in model:
        np.testing.assert_array_equal(merged[name].array, model[name].array, err_msg=name)


def with_step(node: str, weight: float, step: int) -> Contribution:
    return contribution(node, weight, w=tensor(np.ones(2, np.float32) * weight),
                        step=tensor(np.array(step, dtype=np.int64)),
                        mask=tensor(np.array([step % 2 == 0, True])),
                        ids=tensor(np.array([step, -step], dtype=np.int32)))


@pytest.mark.parametrize("method", METHODS)
def test_integer_tensors_come_from_the_heaviest_peer(method):
    peers = [with_step("node-a", 1.0, 10), with_step("node-b", 9.0, 90), with_step("node-c", 4.0, 40)]
    merged = get_merger(method).merge(peers)
    assert merged["step"].array == 90
    assert merged["step"].dtype == "I64"
    np.testing.assert_array_equal(merged["ids"].array, [90, -90])
    np.testing.assert_array_equal(merged["mask"].array, [True, True])


@pytest.mark.parametrize("method", METHODS)
def test_integer_tensors_on_a_weight_tie_come_from_the_first_node_by_name(method):
    peers = [with_step("node-c", 5.0, 3), with_step("node-a", 1.0, 1), with_step("node-b", 5.0, 2)]
    assert get_merger(method).merge(peers)["step"].array == 2
    zero = [with_step("node-c", 0.0, 3), with_step("node-b", 0.0, 2), with_step("node-d", 0.0, 4)]
    assert get_merger(method).merge(zero)["step"].array == 2


def test_a_contribution_far_larger_than_the_others_is_an_outlier_whatever_the_updates():
    from swarmlearn.merge.base import contribution_norm, norm_outliers
    from swarmlearn.tensors import Tensor

    rng = np.random.default_rng(0)
    base = rng.standard_normal(100).astype(np.float32)
    honest = {f"node{i}": {"w": Tensor("F32", base + 0.01 * i)} for i in range(1, 4)}  # node1 barely moved
    boosted = {"w": Tensor("F32", base * 1e3)}
    norms = {n: contribution_norm(t) for n, t in {**honest, "mallory": boosted}.items()}
    refused = norm_outliers(norms)
    assert list(refused) == ["mallory"] and "more than 10x the median" in refused["mallory"]
    assert norm_outliers({"node1": norms["node1"], "mallory": norms["mallory"]}).keys() == {"mallory"}
    assert norm_outliers({"node1": 0.0, "node2": 0.0}) == {}
