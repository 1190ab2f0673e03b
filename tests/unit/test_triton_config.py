"""config.pbtxt text is a valid Triton ModelConfig (parsed with Triton's own protobuf)."""

from __future__ import annotations

import pytest
from google.protobuf import text_format

from clipserve.export.triton_config import text_config, vision_config

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def parse(text: str):
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_vision_config() -> None:
    config = parse(vision_config(336, 768, max_batch_size=16, max_queue_delay_us=250))
    assert config.name == "clip_vision"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    (tensor_in,) = config.input
    assert (tensor_in.name, tensor_in.data_type) == ("pixel_values", model_config_pb2.TYPE_FP32)
    assert list(tensor_in.dims) == [3, 336, 336]  # no batch axis: max_batch_size > 0
    (tensor_out,) = config.output
    assert (tensor_out.name, tensor_out.data_type) == ("image_embeds", model_config_pb2.TYPE_FP32)
    assert list(tensor_out.dims) == [768]


def test_text_config_has_variable_length() -> None:
    config = parse(text_config(768, max_batch_size=64, max_queue_delay_us=1000))
    assert config.name == "clip_text"
    (tensor_in,) = config.input
    assert (tensor_in.name, tensor_in.data_type) == ("input_ids", model_config_pb2.TYPE_INT64)
    assert list(tensor_in.dims) == [-1]
    (tensor_out,) = config.output
    assert (tensor_out.name, list(tensor_out.dims)) == ("text_embeds", [768])
