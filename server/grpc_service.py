"""`clipserve.v1.ClipService`: a thin adapter from wire messages to `ClipModel` and back.

Errors are raised as domain errors; `call_layer` turns them into statuses.
"""

from __future__ import annotations

import time

import grpc

from clipserve import __version__
from clipserve.server import wire
from clipserve.server.batcher import DynamicBatcher
from clipserve.server.model import ClipModel
from clipserve.v1 import clip_service_pb2 as pb
from clipserve.v1 import clip_service_pb2_grpc as pb_grpc


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class ClipServicer(pb_grpc.ClipServiceServicer):
    def __init__(self, model: ClipModel, info: pb.GetModelInfoResponse) -> None:
        self._model = model
        self._info = info

    async def EncodeImage(  # noqa: N802 - gRPC method name
        self, request: pb.EncodeImageRequest, context: grpc.aio.ServicerContext
    ) -> pb.EncodeImageResponse:
        wire.check_format(request.format)
        with self._model.admit():
            matrix = await self._model.encode_images(
                wire.image_inputs(request.images), _deadline(context)
            )
        return pb.EncodeImageResponse(
            embeddings=wire.embeddings(matrix, request.format),
            dim=matrix.shape[1],
            format=wire.response_format(request.format),
        )

    async def EncodeText(  # noqa: N802
        self, request: pb.EncodeTextRequest, context: grpc.aio.ServicerContext
    ) -> pb.EncodeTextResponse:
        wire.check_format(request.format)
        truncate = wire.truncate_flag(request.truncation)
        with self._model.admit():
            matrix, counts = await self._model.encode_texts(
                list(request.texts), _deadline(context), truncate=truncate
            )
        return pb.EncodeTextResponse(
            embeddings=wire.embeddings(matrix, request.format),
            dim=matrix.shape[1],
            format=wire.response_format(request.format),
            token_counts=counts,
        )

    async def Classify(  # noqa: N802
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        labels = list(request.labels)
        with self._model.admit():
            results = await self._model.classify(
                wire.image_inputs(request.images),
                labels,
                list(request.templates),
                request.top_k if request.HasField("top_k") else None,
                _deadline(context),
            )
        return pb.ClassifyResponse(
            classifications=[wire.label_scores(scored, labels) for scored in results]
        )

    async def Rank(  # noqa: N802
        self, request: pb.RankRequest, context: grpc.aio.ServicerContext
    ) -> pb.RankResponse:
        query = wire.rank_input(request.query, "query") if request.HasField("query") else None
        candidates = [
            wire.rank_input(c, f"candidates[{i}]") for i, c in enumerate(request.candidates)
        ]
        with self._model.admit():
            scored = await self._model.rank(
                query,
                candidates,
                request.top_k if request.HasField("top_k") else None,
                _deadline(context),
            )
        return wire.ranked(scored)

    async def GetModelInfo(  # noqa: N802
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        return self._info


def model_info(
    model: ClipModel,
    provider: str,
    vision_buckets: tuple[int, ...],
    text_buckets: tuple[int, ...],
    length_buckets: tuple[int, ...],
) -> pb.GetModelInfoResponse:
    """The GetModelInfo answer, fixed for the server's lifetime."""
    m = model.manifest

    def batching(
        batcher: DynamicBatcher, buckets: tuple[int, ...], lengths: tuple[int, ...] = ()
    ) -> pb.BatchingInfo:
        config = batcher.config
        return pb.BatchingInfo(
            max_batch_size=config.max_batch_size,
            max_queue_delay_us=round(config.max_queue_delay_s * 1e6),
            max_queue_size=config.max_queue_size,
            batch_buckets=buckets,
            length_buckets=lengths,
            instances=batcher.instances,
        )

    return pb.GetModelInfoResponse(
        model_name=m.source.model_name,
        pretrained=m.source.pretrained,
        embedding_dim=m.embedding_dim,
        image_size=m.preprocess.size,
        context_length=m.tokenizer.context_length,
        precision=m.precision,
        execution_provider=provider,
        vision_batching=batching(model.vision, vision_buckets),
        text_batching=batching(model.text, text_buckets, length_buckets),
        logit_scale=m.logit_scale,
        logit_bias=m.logit_bias or 0.0,
        default_templates=list(m.default_templates),
        server_version=__version__,
        image_mean=list(m.preprocess.mean),
        image_std=list(m.preprocess.std),
        interpolation=m.preprocess.interpolation,
        resize_mode=m.preprocess.resize_mode,
        max_items_per_request=model.limits.max_items_per_request,
        max_labels=model.limits.max_labels,
    )
