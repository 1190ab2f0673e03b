"""The Triton models clipserve serves, and their metadata and configuration messages.

Two towers, as exported into the repository, and two front models that take what clients have
(encoded images, strings) and run the server's own preprocessing and tokenizer first:

  clip_vision        pixel_values  FP32 (or FP16) [-1, 3, S, S]  -> image_embeds FP32 [-1, D]
  clip_text          input_ids     INT64 (or INT32) [-1, -1]     -> text_embeds  FP32 [-1, D]
  clip_image_bytes   images        BYTES [-1, 1] (JPEG, PNG, ...) -> image_embeds FP32 [-1, D]
  clip_text_strings  texts         BYTES [-1, 1] (UTF-8)          -> text_embeds  FP32 [-1, D]

Each front model runs on the batcher of its tower, like a Triton ensemble on a composing model,
so requests of every model and of clipserve.v1 share batches.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from clipserve.server.batcher import BatcherConfig
from clipserve.server.errors import InvalidInput
from clipserve.server.model import ClipModel
from clipserve.server.triton.codec import Tensor
from clipserve.triton import grpc_service_pb2 as pb
from clipserve.triton import model_config_pb2 as mc

VERSION = "1"  # the repository's version folder of each tower
VISION_MODEL = "clip_vision"
TEXT_MODEL = "clip_text"
IMAGE_BYTES_MODEL = "clip_image_bytes"
TEXT_STRINGS_MODEL = "clip_text_strings"

#: Protocol datatype -> ModelConfig data type.
CONFIG_TYPES = {
    "BOOL": mc.TYPE_BOOL, "UINT8": mc.TYPE_UINT8, "UINT16": mc.TYPE_UINT16,
    "UINT32": mc.TYPE_UINT32, "UINT64": mc.TYPE_UINT64, "INT8": mc.TYPE_INT8,
    "INT16": mc.TYPE_INT16, "INT32": mc.TYPE_INT32, "INT64": mc.TYPE_INT64,
    "FP16": mc.TYPE_FP16, "FP32": mc.TYPE_FP32, "FP64": mc.TYPE_FP64,
    "BYTES": mc.TYPE_STRING, "BF16": mc.TYPE_BF16,
}


class Kind(enum.Enum):
    """What a model's input holds, i.e. which `ClipModel` entry point serves it."""

    PIXELS = "pixels"
    TOKEN_IDS = "token_ids"
    IMAGE_BYTES = "image_bytes"
    TEXT_STRINGS = "text_strings"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatypes: tuple[str, ...]  # accepted protocol datatypes; the first is the declared one
    dims: tuple[int, ...]  # without the batch dimension; -1: any size
    format: int = mc.ModelInput.FORMAT_NONE

    @property
    def datatype(self) -> str:
        return self.datatypes[0]

    @property
    def shape(self) -> list[int]:
        return [-1, *self.dims]


@dataclass(frozen=True)
class TritonModel:
    """One model of the Triton API."""

    name: str
    kind: Kind
    tower: str  # the batcher that computes it: "vision" or "text"
    platform: str
    backend: str
    input: TensorSpec
    output: TensorSpec
    max_batch_size: int  # items one request may carry
    batching: BatcherConfig  # the tower batcher's policy
    parameters: Mapping[str, str] = field(default_factory=dict)
    instances: int = 1  # the tower's model instances (instance_group count)

    @property
    def is_tower(self) -> bool:
        return self.kind in (Kind.PIXELS, Kind.TOKEN_IDS)

    def check_inputs(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """The request's one input, checked against the model; errors name the tensor."""
        spec = self.input
        for name in tensors:
            if name != spec.name:
                raise InvalidInput(f"{self.name} has no input {name!r}; its input is {spec.name!r}")
        tensor = tensors.get(spec.name)
        if tensor is None:
            raise InvalidInput(f"input {spec.name!r} is missing")
        if tensor.datatype not in spec.datatypes:
            raise InvalidInput(
                f"input {spec.name!r} has datatype {tensor.datatype}; {self.name} accepts "
                + " or ".join(spec.datatypes)
            )
        shape, expected = list(tensor.shape), spec.shape
        if len(shape) != len(expected) or any(
            e != -1 and s != e for s, e in zip(shape, expected, strict=True)
        ):
            raise InvalidInput(
                f"input {spec.name!r} has shape {shape}; {self.name} expects {expected} "
                "(-1: any size)"
            )
        return tensor

    def check_outputs(self, names: list[str]) -> None:
        for name in names:
            if name != self.output.name:
                raise InvalidInput(
                    f"{self.name} has no output {name!r}; its output is {self.output.name!r}"
                )


def build_models(model: ClipModel) -> dict[str, TritonModel]:
    """The four models, in RepositoryIndex order."""
    m = model.manifest
    size, dim = m.preprocess.size, m.embedding_dim
    items = model.limits.max_items_per_request
    vision, text = model.vision.config, model.text.config
    image_embeds = TensorSpec(m.vision.output, ("FP32",), (dim,))
    text_embeds = TensorSpec(m.text.output, ("FP32",), (dim,))
    common = {"embedding_dim": str(dim), "source_model": m.source.model_name,
              "pretrained": m.source.pretrained, "precision": m.precision}
    text_params = {**common, "context_length": str(m.tokenizer.context_length)}
    models = [
        TritonModel(
            VISION_MODEL, Kind.PIXELS, "vision", "onnxruntime_onnx", "onnxruntime",
            TensorSpec(
                m.vision.input, ("FP32", "FP16"), (3, size, size), mc.ModelInput.FORMAT_NCHW
            ),
            image_embeds, items, vision, common, model.vision.instances,
        ),
        TritonModel(
            TEXT_MODEL, Kind.TOKEN_IDS, "text", "onnxruntime_onnx", "onnxruntime",
            TensorSpec(m.text.input, ("INT64", "INT32"), (-1,)),
            text_embeds, items, text, text_params, model.text.instances,
        ),
        TritonModel(
            IMAGE_BYTES_MODEL, Kind.IMAGE_BYTES, "vision", "clipserve", "clipserve",
            TensorSpec("images", ("BYTES",), (1,)),
            image_embeds, items, vision, {**common, "composing_model": VISION_MODEL},
            model.vision.instances,
        ),
        TritonModel(
            TEXT_STRINGS_MODEL, Kind.TEXT_STRINGS, "text", "clipserve", "clipserve",
            TensorSpec("texts", ("BYTES",), (1,)),
            text_embeds, items, text, {**text_params, "composing_model": TEXT_MODEL},
            model.text.instances,
        ),
    ]
    return {t.name: t for t in models}


def metadata(model: TritonModel) -> pb.ModelMetadataResponse:
    def tensor(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
        return pb.ModelMetadataResponse.TensorMetadata(
            name=spec.name, datatype=spec.datatype, shape=spec.shape
        )

    return pb.ModelMetadataResponse(
        name=model.name, versions=[VERSION], platform=model.platform,
        inputs=[tensor(model.input)], outputs=[tensor(model.output)],
    )


def config(model: TritonModel, provider: str) -> mc.ModelConfig:
    """The model's Triton ModelConfig; `provider` is the towers' ONNX Runtime provider."""
    b = model.batching
    spec, out = model.input, model.output
    gpu = provider.startswith(("CUDA", "Tensorrt"))
    return mc.ModelConfig(
        name=model.name,
        platform=model.platform,
        backend=model.backend,
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1)),
        max_batch_size=model.max_batch_size,
        input=[
            mc.ModelInput(
                name=spec.name, data_type=CONFIG_TYPES[spec.datatype], format=spec.format,
                dims=spec.dims,
            )
        ],
        output=[
            mc.ModelOutput(name=out.name, data_type=CONFIG_TYPES[out.datatype], dims=out.dims)
        ],
        instance_group=[
            mc.ModelInstanceGroup(
                name=f"{model.name}_0", count=model.instances,
                kind=mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU,
            )
        ],
        default_model_filename="model.onnx" if model.is_tower else "",
        dynamic_batching=mc.ModelDynamicBatching(
            preferred_batch_size=[b.max_batch_size],
            max_queue_delay_microseconds=round(b.max_queue_delay_s * 1e6),
            default_queue_policy=mc.ModelQueuePolicy(
                timeout_action=mc.ModelQueuePolicy.REJECT,
                default_timeout_microseconds=round(b.queue_timeout_s * 1e6),
                max_queue_size=b.max_queue_size,
            ),
        ),
        parameters={
            k: mc.ModelParameter(string_value=v)
            for k, v in {**model.parameters, "execution_provider": provider}.items()
        },
    )
