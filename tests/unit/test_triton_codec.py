"""The KServe v2 tensor codec and the Triton models' input checks (no sockets, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from clipserve.server.batcher import BatcherConfig
from clipserve.server.errors import InvalidInput
from clipserve.server.triton import codec
from clipserve.server.triton.codec import Tensor
from clipserve.server.triton.models import Kind, TensorSpec, TritonModel
from clipserve.triton import grpc_service_pb2 as pb


def request(*inputs: tuple[str, str, list[int]], raw: list[bytes] | None = None):
    message = pb.ModelInferRequest(model_name="m", raw_input_contents=raw or [])
    for name, datatype, shape in inputs:
        message.inputs.add(name=name, datatype=datatype, shape=shape)
    return message


# -- numeric tensors -------------------------------------------------------------------------
@pytest.mark.parametrize("datatype", ["FP32", "FP16", "FP64", "INT64", "INT32", "UINT8", "BOOL"])
def test_raw_contents_decode_little_endian_row_major(datatype: str) -> None:
    dtype = codec.NUMPY_DTYPES[datatype]
    array = (np.arange(24).reshape(2, 3, 4) % 2 if datatype == "BOOL" else np.arange(24)).astype(
        dtype
    ).reshape(2, 3, 4)
    tensors = codec.decode_inputs(request(("x", datatype, [2, 3, 4]), raw=[array.tobytes()]))
    np.testing.assert_array_equal(tensors["x"].data, array)
    assert tensors["x"].shape == (2, 3, 4)


@pytest.mark.parametrize(
    ("datatype", "field", "values"),
    [
        ("FP32", "fp32_contents", [0.5, -1.0, 2.0, 3.25]),
        ("INT64", "int64_contents", [1, 49407, 0, -3]),
        ("INT32", "int_contents", [7, 8, 9, 10]),
        ("UINT8", "uint_contents", [0, 1, 254, 255]),
        ("BOOL", "bool_contents", [True, False, True, True]),
    ],
)
def test_typed_contents_decode_into_the_datatype(datatype: str, field: str, values: list) -> None:
    message = request(("x", datatype, [2, 2]))
    getattr(message.inputs[0].contents, field).extend(values)
    tensor = codec.decode_inputs(message)["x"]
    assert tensor.data.dtype == codec.NUMPY_DTYPES[datatype]
    np.testing.assert_array_equal(tensor.data.ravel(), np.asarray(values))


def test_a_raw_size_that_does_not_match_the_shape_names_the_input() -> None:
    with pytest.raises(InvalidInput, match=r"'pixels' has 8 bytes .* FP32 \[1, 3\] needs 12"):
        codec.decode_inputs(request(("pixels", "FP32", [1, 3]), raw=[b"\0" * 8]))


def test_a_typed_value_count_that_does_not_match_the_shape_names_the_input() -> None:
    message = request(("ids", "INT64", [2, 3]))
    message.inputs[0].contents.int64_contents.extend([1, 2, 3])
    with pytest.raises(InvalidInput, match=r"'ids' has 3 values in contents.int64_contents"):
        codec.decode_inputs(message)


def test_typed_values_out_of_range_of_the_datatype_are_refused() -> None:
    message = request(("x", "INT8", [1]))
    message.inputs[0].contents.int_contents.append(300)
    with pytest.raises(InvalidInput, match="does not fit INT8"):
        codec.decode_inputs(message)


def test_fp16_has_no_typed_contents() -> None:
    with pytest.raises(InvalidInput, match="FP16 travels as raw_input_contents only"):
        codec.decode_inputs(request(("x", "FP16", [1])))


@pytest.mark.parametrize("datatype", ["FP8", "BF16", ""])
def test_unknown_or_unsupported_datatypes_are_refused(datatype: str) -> None:
    with pytest.raises(InvalidInput, match=r"'x' has datatype .* not supported"):
        codec.decode_inputs(request(("x", datatype, [1]), raw=[b"\0\0"]))


def test_negative_dimensions_are_refused() -> None:
    with pytest.raises(InvalidInput, match=r"dimensions must be >= 0"):
        codec.decode_inputs(request(("x", "FP32", [-1, 2]), raw=[b""]))


def test_raw_contents_go_for_every_input_or_none() -> None:
    with pytest.raises(InvalidInput, match="2 entries for 1 inputs"):
        codec.decode_inputs(request(("x", "FP32", [1]), raw=[b"\0" * 4, b"\0" * 4]))
    mixed = request(("x", "FP32", [1]), raw=[b"\0" * 4])
    mixed.inputs[0].contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidInput, match="'x' has contents while the request uses raw"):
        codec.decode_inputs(mixed)


def test_an_input_given_twice_is_refused() -> None:
    message = request(("x", "FP32", [1]), ("x", "FP32", [1]), raw=[b"\0" * 4] * 2)
    with pytest.raises(InvalidInput, match="given twice"):
        codec.decode_inputs(message)


# -- BYTES ------------------------------------------------------------------------------------
def test_bytes_round_trip_through_the_raw_encoding() -> None:
    elements = [b"", b"a photo of a cat", bytes(range(256)), "naïve".encode()]
    raw = codec.serialize_bytes(elements)
    assert raw[:4] == b"\0\0\0\0"  # a 4-byte little-endian length, then the bytes
    assert raw[4:8] == (16).to_bytes(4, "little")
    assert codec.deserialize_bytes(raw, "t") == elements
    tensors = codec.decode_inputs(request(("t", "BYTES", [4, 1]), raw=[raw]))
    assert tensors["t"].data == elements


def test_bytes_as_typed_contents() -> None:
    message = request(("t", "BYTES", [2, 1]))
    message.inputs[0].contents.bytes_contents.extend([b"a", b"b"])
    assert codec.decode_inputs(message)["t"].data == [b"a", b"b"]


@pytest.mark.parametrize("raw", [b"\x05\0\0\0abc", b"\x01\0\0\0a\x02\0"])
def test_truncated_raw_bytes_are_refused_naming_the_input(raw: bytes) -> None:
    with pytest.raises(InvalidInput, match=r"input 't' end inside an element"):
        codec.deserialize_bytes(raw, "t")


def test_an_element_count_that_does_not_match_the_shape_is_refused() -> None:
    raw = codec.serialize_bytes([b"a", b"b", b"c"])
    with pytest.raises(InvalidInput, match=r"'t' has 3 BYTES elements, shape \[2, 1\] needs 2"):
        codec.decode_inputs(request(("t", "BYTES", [2, 1]), raw=[raw]))


# -- outputs ----------------------------------------------------------------------------------
def test_outputs_encode_raw_or_typed() -> None:
    embeddings = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    tensor, raw = codec.encode_output("image_embeds", embeddings, raw=True)
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("image_embeds", "FP32", [2, 3])
    assert not tensor.HasField("contents")
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4").reshape(2, 3), embeddings)
    tensor, raw = codec.encode_output("image_embeds", embeddings, raw=False)
    assert raw is None
    np.testing.assert_array_equal(np.asarray(tensor.contents.fp32_contents), embeddings.ravel())


# -- model input checks -----------------------------------------------------------------------
VISION = TritonModel(
    "clip_vision", Kind.PIXELS, "vision", "onnxruntime_onnx", "onnxruntime",
    TensorSpec("pixel_values", ("FP32", "FP16"), (3, 224, 224)),
    TensorSpec("image_embeds", ("FP32",), (32,)), 256, BatcherConfig(8, 0.002, 64),
)


def pixels(shape: tuple[int, ...], datatype: str = "FP32") -> dict[str, Tensor]:
    return {"pixel_values": Tensor("pixel_values", datatype, shape, np.zeros(shape, np.float32))}


def test_a_matching_input_is_returned() -> None:
    assert VISION.check_inputs(pixels((2, 3, 224, 224), "FP16")).shape == (2, 3, 224, 224)


@pytest.mark.parametrize("shape", [(2, 3, 224, 223), (3, 224, 224), (1, 1, 3, 224, 224)])
def test_a_wrong_shape_names_the_tensor_and_the_expected_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidInput, match=r"'pixel_values' has shape .* expects \[-1, 3, 224,"):
        VISION.check_inputs(pixels(shape))


def test_a_wrong_datatype_names_the_tensor_and_the_accepted_ones() -> None:
    with pytest.raises(InvalidInput, match=r"'pixel_values' has datatype FP64; .* FP32 or FP16"):
        VISION.check_inputs(pixels((1, 3, 224, 224), "FP64"))


def test_missing_unknown_inputs_and_outputs_are_named() -> None:
    with pytest.raises(InvalidInput, match="input 'pixel_values' is missing"):
        VISION.check_inputs({})
    with pytest.raises(InvalidInput, match="clip_vision has no input 'images'"):
        VISION.check_inputs({"images": Tensor("images", "BYTES", (1, 1), [b""])})
    with pytest.raises(InvalidInput, match="clip_vision has no output 'text_embeds'"):
        VISION.check_outputs(["text_embeds"])
    VISION.check_outputs(["image_embeds"])
