"""Tensors travel between peers as safetensors bytes that our numpy-only codec writes and reads.

A peer's model survives the trip bit for bit, whatever its dtype (bfloat16 included); bytes written by
the real `safetensors` package are read the same as ours and ours load in it; and no bytes a peer might
send, however broken, make the reader do anything but refuse them with a BlobError.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmlearn.tensors import BlobError, Tensor, decode, encode, tensor

RNG_SEED = 20240611


def sample_model() -> dict[str, Tensor]:
    """One of each dtype a model checkpoint carries, plus the shapes that trip codecs up."""
    rng = np.random.default_rng(RNG_SEED)
    bf16_bits = (rng.standard_normal(12).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return {
        "layer.weight": tensor(rng.standard_normal((3, 4)).astype(np.float32)),
        "layer.bias": tensor(rng.standard_normal(4).astype(np.float16)),
        "norm.scale": tensor(rng.standard_normal((2, 2, 2)).astype(np.float64)),
        "lora.A": Tensor("BF16", bf16_bits.reshape(3, 4)),
        "step": tensor(np.array(123456789012, dtype=np.int64)),
        "positions": tensor(np.arange(-5, 5, dtype=np.int32)),
        "mask": tensor(np.array([True, False, True])),
        "temperature": tensor(np.array(0.5, dtype=np.float32)),
        "empty": tensor(np.zeros((0, 7), dtype=np.float32)),
        "empty_bf16": Tensor("BF16", np.zeros((4, 0), dtype=np.uint16)),
    }


def assert_same_tensors(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].array.shape == want[name].array.shape, name
        assert got[name].array.dtype == want[name].array.dtype, name
        assert got[name].array.tobytes() == want[name].array.tobytes(), name


def bf16_bits_of(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def torch_bf16_from_bits(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16).copy()).view(torch.bfloat16)


def raw_blob(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


# --- a model survives the trip ------------------------------------------------------------------------


def test_a_model_of_every_dtype_survives_encode_and_decode_bit_for_bit():
    model = sample_model()
    assert_same_tensors(decode(encode(model)), model)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int64, np.int32, np.bool_])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (1, 0, 4)])
def test_each_numpy_dtype_and_shape_round_trips(dtype, shape):
    rng = np.random.default_rng(1)
    array = (rng.standard_normal(shape) * 1000).astype(dtype)
    back = decode(encode({"t": tensor(array)}))["t"]
    assert back.array.shape == shape
    assert back.array.dtype == np.dtype(dtype).newbyteorder("<")
    np.testing.assert_array_equal(back.array, array)


@pytest.mark.parametrize("shape", [(), (0,), (7,), (2, 3)])
def test_bf16_round_trips_as_its_raw_bit_patterns(shape):
    bits = np.random.default_rng(2).integers(0, 2**16, size=shape, dtype=np.uint16)
    back = decode(encode({"t": Tensor("BF16", bits)}))["t"]
    assert back.dtype == "BF16"
    assert back.array.shape == shape
    np.testing.assert_array_equal(back.array, bits)


def test_a_big_endian_array_is_written_little_endian():
    array = np.arange(6, dtype=">f4").reshape(2, 3)
    back = decode(encode({"t": tensor(array)}))["t"]
    assert back.dtype == "F32"
    np.testing.assert_array_equal(back.array, array)


def test_an_empty_tensor_set_round_trips():
    assert decode(encode({})) == {}


def test_data_starts_on_an_eight_byte_boundary():
    blob = encode(sample_model())
    (header_len,) = struct.unpack("<Q", blob[:8])
    assert (8 + header_len) % 8 == 0


# --- the real safetensors package agrees ---------------------------------------------------------------


def test_bytes_written_by_safetensors_numpy_decode_to_the_same_values():
    rng = np.random.default_rng(3)
    arrays = {
        "w": rng.standard_normal((4, 3)).astype(np.float32),
        "h": rng.standard_normal(5).astype(np.float16),
        "d": rng.standard_normal((2, 2)),
        "i": rng.integers(-(2**40), 2**40, size=3, dtype=np.int64),
        "j": rng.integers(-100, 100, size=(2, 2), dtype=np.int32),
        "b": np.array([True, False]),
        "scalar": np.array(3.25, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    got = decode(safetensors.numpy.save(arrays, metadata={"format": "np"}))
    assert sorted(got) == sorted(arrays)
    for name, array in arrays.items():
        assert got[name].array.dtype == array.dtype, name
        np.testing.assert_array_equal(got[name].array, array, err_msg=name)


def test_bytes_written_by_safetensors_torch_decode_to_the_same_values_bf16_included():
    torch.manual_seed(4)
    tensors = {
        "w": torch.randn(4, 3),
        "bf": torch.randn(5, 2).to(torch.bfloat16),
        "h": torch.randn(3).half(),
        "step": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }
    got = decode(safetensors.torch.save(tensors))
    assert got["bf"].dtype == "BF16"
    np.testing.assert_array_equal(got["bf"].array, bf16_bits_of(tensors["bf"]))
    np.testing.assert_array_equal(got["bf"].as_float64(), tensors["bf"].to(torch.float64).numpy())
    for name in ("w", "h", "step", "mask"):
        np.testing.assert_array_equal(got[name].array, tensors[name].numpy(), err_msg=name)
    assert got["step"].array.shape == ()


def test_our_bytes_load_in_safetensors_torch_as_equal_tensors():
    model = sample_model()
    loaded = safetensors.torch.load(encode(model))
    assert sorted(loaded) == sorted(model)
    for name, t in model.items():
        if t.dtype == "BF16":
            assert loaded[name].dtype == torch.bfloat16
            assert torch.equal(loaded[name], torch_bf16_from_bits(t.array)), name
        else:
            assert torch.equal(loaded[name], torch.from_numpy(np.array(t.array))), name
        assert tuple(loaded[name].shape) == t.array.shape, name


def test_our_bytes_load_in_safetensors_numpy():
    model = {k: t for k, t in sample_model().items() if t.dtype != "BF16"}
    loaded = safetensors.numpy.load(encode(model))
    for name, t in model.items():
        np.testing.assert_array_equal(loaded[name], t.array, err_msg=name)


# --- bfloat16 arithmetic agrees with torch ---------------------------------------------------------------


def float32_samples() -> np.ndarray:
    """A few thousand float32 values: ordinary, tiny, huge, subnormal, and exact ties at the bf16 midpoint."""
    rng = np.random.default_rng(5)
    ordinary = rng.standard_normal(2000).astype(np.float32) * np.float32(10.0) ** rng.integers(-30, 30, 2000)
    random_bits = rng.integers(0, 2**32, size=2000, dtype=np.uint32).view(np.float32)
    random_bits = random_bits[np.isfinite(random_bits)]
    # Ties: the 16 bits dropped are exactly 0x8000, kept part both even and odd.
    upper = rng.integers(0, 0x7F7F, size=1000, dtype=np.uint32) | (rng.integers(0, 2, 1000, dtype=np.uint32) << 15)
    ties = ((upper << 16) | 0x8000).view(np.float32)
    near_ties = ((upper << 16) | rng.choice(np.array([0x7FFF, 0x8001, 0xFFFF, 0x0001], dtype=np.uint32), 1000))
    specials = np.array([0.0, -0.0, 1.0, -1.0, np.finfo(np.float32).max, -np.finfo(np.float32).max,
                         np.finfo(np.float32).tiny, 1e-45, -1e-45, np.inf, -np.inf], dtype=np.float32)
    values = np.concatenate([ordinary, random_bits, ties, near_ties.view(np.float32), specials])
    assert len(values) > 5000
    return values


def test_narrowing_to_bf16_rounds_to_nearest_even_like_torch():
    values = float32_samples()
    ours = Tensor.from_float("BF16", values.astype(np.float64), values.shape).array
    theirs = bf16_bits_of(torch.from_numpy(values).to(torch.bfloat16))
    mismatched = np.flatnonzero(ours != theirs)
    assert mismatched.size == 0, [(float(values[i]), hex(ours[i]), hex(theirs[i])) for i in mismatched[:5]]


def test_narrowing_a_zero_d_value_to_bf16():
    t = Tensor.from_float("BF16", np.array(1.00390625), ())  # exactly between 1.0 and 1.0078125: ties to even
    assert t.array.shape == ()
    assert t.as_float64() == 1.0


def test_narrowing_keeps_a_nan_a_nan():
    nans = np.array([0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFC00001], dtype=np.uint32).view(np.float32)
    narrowed = Tensor.from_float("BF16", nans.astype(np.float64), nans.shape)
    assert np.isnan(narrowed.as_float64()).all(), [hex(b) for b in narrowed.array]


def test_widening_bf16_is_exact_like_torch_for_every_bit_pattern():
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    with np.errstate(invalid="ignore"):  # signalling NaN patterns warn when widened
        ours = Tensor("BF16", bits).as_float64()
    theirs = torch_bf16_from_bits(bits).to(torch.float64).numpy()
    np.testing.assert_array_equal(ours, theirs)  # NaNs compare equal to NaNs here


def test_widening_then_narrowing_bf16_is_the_identity_on_finite_values():
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    with np.errstate(invalid="ignore"):  # signalling NaN patterns warn when widened
        finite = bits[np.isfinite(Tensor("BF16", bits).as_float64())]
    back = Tensor.from_float("BF16", Tensor("BF16", finite).as_float64(), finite.shape).array
    np.testing.assert_array_equal(back, finite)


# --- strictness: broken bytes are refused with a BlobError that says what is wrong ---------------------------


def one_tensor_blob() -> bytes:
    return encode({"weights": tensor(np.arange(6, dtype=np.float32))})


@pytest.mark.parametrize("length", [0, 1, 7])
def test_a_blob_shorter_than_the_length_prefix_is_refused(length):
    with pytest.raises(BlobError, match="shorter"):
        decode(one_tensor_blob()[:length])


def test_a_truncated_blob_is_refused():
    blob = one_tensor_blob()
    for cut in range(8, len(blob)):
        with pytest.raises(BlobError):
            decode(blob[:cut])


def test_a_truncated_data_section_names_the_tensor():
    with pytest.raises(BlobError, match="'weights'"):
        decode(one_tensor_blob()[:-4])


def test_a_header_length_beyond_the_blob_is_refused():
    blob = one_tensor_blob()
    with pytest.raises(BlobError, match="does not fit"):
        decode(struct.pack("<Q", len(blob)) + blob[8:])
    with pytest.raises(BlobError, match="does not fit"):
        decode(struct.pack("<Q", 2**64 - 1) + blob[8:])


def test_a_header_that_is_not_json_is_refused():
    with pytest.raises(BlobError, match="not JSON"):
        decode(struct.pack("<Q", 5) + b"{oops")
    with pytest.raises(BlobError, match="not JSON"):
        decode(struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc")


def test_a_header_that_is_json_but_not_an_object_is_refused():
    with pytest.raises(BlobError, match="not a JSON object"):
        decode(struct.pack("<Q", 2) + b"[]")


def test_an_unknown_dtype_is_refused_naming_the_tensor():
    with pytest.raises(BlobError, match=r"'weights'.*'F8_E4M3'"):
        decode(raw_blob({"weights": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, bytes(4)))


def test_a_header_entry_without_its_fields_names_the_tensor():
    with pytest.raises(BlobError, match="'weights'"):
        decode(raw_blob({"weights": {"dtype": "F32", "shape": [1]}}, bytes(4)))
    with pytest.raises(BlobError, match="'weights'"):
        decode(raw_blob({"weights": "F32"}, bytes(4)))


@pytest.mark.parametrize("shape", [[-1], [1.5], "4", None, [[2]]])
def test_a_malformed_shape_names_the_tensor(shape):
    with pytest.raises(BlobError, match="'weights'.*shape"):
        decode(raw_blob({"weights": {"dtype": "F32", "shape": shape, "data_offsets": [0, 16]}}, bytes(16)))


def test_a_shape_that_does_not_match_the_offsets_names_the_tensor():
    with pytest.raises(BlobError, match=r"'weights'.*needs 12 bytes.*gives 16"):
        decode(raw_blob({"weights": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, bytes(16)))


@pytest.mark.parametrize("offsets", [[0, 20], [-4, 12], [8, 4], [0.0, 16], ["0", "16"]])
def test_offsets_outside_the_data_name_the_tensor(offsets):
    with pytest.raises(BlobError, match="'weights'"):
        decode(raw_blob({"weights": {"dtype": "F32", "shape": [4], "data_offsets": offsets}}, bytes(16)))


def test_overlapping_tensors_are_refused():
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    with pytest.raises(BlobError, match="overlapping"):
        decode(raw_blob(header, bytes(12)))


def test_two_tensors_sharing_the_same_bytes_are_refused():
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    with pytest.raises(BlobError, match="overlapping"):
        decode(raw_blob(header, bytes(8)))


def test_a_gap_between_tensors_is_refused():
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}
    with pytest.raises(BlobError, match="gaps"):
        decode(raw_blob(header, bytes(12)))


def test_trailing_bytes_are_refused():
    with pytest.raises(BlobError, match="trailing"):
        decode(one_tensor_blob() + b"\0")


def test_tensors_in_any_order_that_tile_the_data_are_accepted():
    header = {"b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
              "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
              "__metadata__": {"format": "pt"}}
    got = decode(raw_blob(header, bytes([1, 2, 3, 4]) + np.float32(2.5).tobytes()))
    assert sorted(got) == ["a", "b"]
    assert got["b"].array[0] == 2.5


def test_a_dtype_numpy_cannot_send_is_refused_on_the_way_out():
    with pytest.raises(BlobError, match="uint16"):
        tensor(np.zeros(3, dtype=np.uint16))


# Header entries a buggy or hostile peer could send that the reader must still refuse with a BlobError.
HOSTILE_HEADERS = [
    pytest.param(raw_blob({"w": {"dtype": [], "shape": [], "data_offsets": [0, 0]}}),
                 id="list-as-dtype"),
    pytest.param(raw_blob({"w": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}),
                 id="shape-wraps-int64"),
    pytest.param(raw_blob({"w": {"dtype": "F32", "shape": [2**64], "data_offsets": [0, 0]}}),
                 id="dimension-beyond-int64"),
    pytest.param(raw_blob({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4)),
                 id="true-as-dimension"),
    pytest.param(raw_blob({"w": {"dtype": "F32", "shape": [1] * 70, "data_offsets": [0, 4]}}, bytes(4)),
                 id="more-dimensions-than-numpy-allows"),
    pytest.param(raw_blob({"w": {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}}),
                 id="empty-with-a-huge-dimension"),
    pytest.param(struct.pack("<Q", 100_000) + b"[" * 100_000,
                 id="deeply-nested-json"),
]


@pytest.mark.parametrize("blob", HOSTILE_HEADERS)
def test_hostile_header_entries_are_refused_with_a_blob_error(blob):
    with pytest.raises(BlobError), np.errstate(all="ignore"):
        decode(blob)


# --- no bytes at all make the reader do anything but refuse them ------------------------------------------


def decode_or_refuse(blob: bytes) -> None:
    try:
        decode(blob)
    except BlobError:
        pass


FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_raise_nothing_but_blob_error(blob):
    decode_or_refuse(blob)


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes_behind_a_plausible_length_prefix_raise_nothing_but_blob_error(rest):
    decode_or_refuse(struct.pack("<Q", len(rest)) + rest)
    decode_or_refuse(struct.pack("<Q", len(rest) // 2) + rest)


@st.composite
def mutated_blobs(draw) -> bytes:
    blob = bytearray(encode(sample_model()))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "delete", "insert", "truncate"]))
        at = draw(st.integers(0, max(len(blob) - 1, 0)))
        if kind == "flip" and blob:
            blob[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and blob:
            blob[at] = draw(st.integers(0, 255))
        elif kind == "delete":
            del blob[at:at + draw(st.integers(1, 8))]
        elif kind == "insert":
            blob[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "truncate":
            del blob[at:]
    return bytes(blob)


@FUZZ
@given(mutated_blobs())
def test_mutations_of_a_valid_blob_raise_nothing_but_blob_error(blob):
    decode_or_refuse(blob)


@st.composite
def mutated_headers(draw) -> bytes:
    """The header of a valid blob with one ASCII byte changed: reaches past JSON parsing into the checks."""
    blob = bytearray(encode(sample_model()))
    (header_len,) = struct.unpack("<Q", blob[:8])
    at = draw(st.integers(8, 8 + header_len - 1))
    blob[at] = draw(st.sampled_from(b'0123456789[]{}",:-.eE tfnrulsa'))
    return bytes(blob)


@FUZZ
@given(mutated_headers())
def test_one_character_changes_in_the_header_raise_nothing_but_blob_error(blob):
    decode_or_refuse(blob)
