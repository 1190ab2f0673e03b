"""Triton model configurations (``config.pbtxt``) for the two towers.

Written as protobuf text format by hand (no tritonclient dependency at export time); the tests
parse them with ``tritonclient.grpc.model_config_pb2`` to prove they are valid ModelConfigs.
Dims exclude the batch axis (``max_batch_size > 0``): vision ``[3, S, S]``, text ``[-1]``
(variable length), outputs ``[D]``. Inputs and outputs are float32 for the fp16 variant too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from clipserve.repository import (
    TEXT_INPUT,
    TEXT_MODEL,
    TEXT_OUTPUT,
    VISION_INPUT,
    VISION_MODEL,
    VISION_OUTPUT,
)

PLATFORM = "onnxruntime_onnx"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # a Triton DataType name, e.g. TYPE_FP32
    dims: tuple[int, ...]


def model_config(
    name: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_batch_size: int,
    max_queue_delay_us: int,
) -> str:
    """One model's ``config.pbtxt`` text."""
    lines = [
        f'name: "{name}"',
        f'platform: "{PLATFORM}"',
        f"max_batch_size: {max_batch_size}",
        *_tensors("input", inputs),
        *_tensors("output", outputs),
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _tensors(kind: str, specs: Sequence[TensorSpec]) -> list[str]:
    lines = [f"{kind} ["]
    for i, spec in enumerate(specs):
        dims = ", ".join(str(d) for d in spec.dims)
        lines += [
            "  {",
            f'    name: "{spec.name}"',
            f"    data_type: {spec.data_type}",
            f"    dims: [ {dims} ]",
            "  }" + ("," if i < len(specs) - 1 else ""),
        ]
    lines.append("]")
    return lines


def vision_config(
    image_size: int, embedding_dim: int, max_batch_size: int, max_queue_delay_us: int
) -> str:
    return model_config(
        VISION_MODEL,
        [TensorSpec(VISION_INPUT, "TYPE_FP32", (3, image_size, image_size))],
        [TensorSpec(VISION_OUTPUT, "TYPE_FP32", (embedding_dim,))],
        max_batch_size,
        max_queue_delay_us,
    )


def text_config(embedding_dim: int, max_batch_size: int, max_queue_delay_us: int) -> str:
    return model_config(
        TEXT_MODEL,
        [TensorSpec(TEXT_INPUT, "TYPE_INT64", (-1,))],
        [TensorSpec(TEXT_OUTPUT, "TYPE_FP32", (embedding_dim,))],
        max_batch_size,
        max_queue_delay_us,
    )
