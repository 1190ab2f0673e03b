"""Conversion between `clipserve.v1` messages and the serving core's types, at the edge."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clipserve.server.errors import InvalidInput
from clipserve.server.model import (
    EncodedImage,
    ImageInput,
    RankInput,
    Scored,
    TensorImage,
    UrlImage,
)
from clipserve.v1 import clip_service_pb2 as pb

_DTYPES = {pb.DATA_TYPE_FLOAT32: "float32", pb.DATA_TYPE_FLOAT16: "float16"}


def image_input(image: pb.Image, item: str) -> ImageInput:
    source = image.WhichOneof("source")
    if source == "data":
        return EncodedImage(image.data)
    if source == "tensor":
        tensor = image.tensor
        if tensor.dtype not in _DTYPES:
            known = tensor.dtype in pb.DataType.values()
            name = pb.DataType.Name(tensor.dtype) if known else str(tensor.dtype)
            raise InvalidInput(
                f"tensor dtype {name} is not supported (use DATA_TYPE_FLOAT32 or "
                "DATA_TYPE_FLOAT16)",
                item=item,
            )
        return TensorImage(tuple(tensor.shape), _DTYPES[tensor.dtype], tensor.data)
    if source == "url":
        return UrlImage(image.url)
    raise InvalidInput("no image data (set data, tensor or url)", item=item)


def image_inputs(images: Sequence[pb.Image], field: str = "images") -> list[ImageInput]:
    return [image_input(image, f"{field}[{i}]") for i, image in enumerate(images)]


def rank_input(item: pb.RankItem, name: str) -> RankInput:
    kind = item.WhichOneof("item")
    if kind == "text":
        return item.text
    if kind == "image":
        return image_input(item.image, name)
    raise InvalidInput("empty: set text or image", item=name)


def embeddings(matrix: np.ndarray, fmt: int) -> list[pb.Embedding]:
    """[N, D] float32 -> messages in the requested format."""
    if fmt in (pb.EMBEDDING_FORMAT_UNSPECIFIED, pb.EMBEDDING_FORMAT_FLOAT):
        return [pb.Embedding(values=row) for row in matrix.tolist()]
    if fmt == pb.EMBEDDING_FORMAT_FP32_BYTES:
        raw = matrix.astype("<f4", copy=False)
    elif fmt == pb.EMBEDDING_FORMAT_FP16_BYTES:
        raw = matrix.astype("<f2")
    else:
        raise InvalidInput(f"format {fmt} is not a known EmbeddingFormat")
    return [pb.Embedding(raw=row.tobytes()) for row in raw]


def response_format(fmt: int) -> int:
    return pb.EMBEDDING_FORMAT_FLOAT if fmt == pb.EMBEDDING_FORMAT_UNSPECIFIED else fmt


_FORMATS = frozenset(pb.EmbeddingFormat.values())


def check_format(fmt: int) -> None:
    if fmt not in _FORMATS:
        raise InvalidInput(f"format {fmt} is not a known EmbeddingFormat")


def truncate_flag(truncation: int) -> bool:
    if truncation in (pb.TRUNCATION_UNSPECIFIED, pb.TRUNCATION_END):
        return True
    if truncation == pb.TRUNCATION_NONE:
        return False
    raise InvalidInput(f"truncation {truncation} is not a known Truncation")


def label_scores(scored: Sequence[Scored], labels: Sequence[str]) -> pb.Classification:
    return pb.Classification(
        labels=[
            pb.LabelScore(label=labels[s.index], index=s.index, probability=s.probability,
                          score=s.score)
            for s in scored
        ]
    )


def ranked(scored: Sequence[Scored]) -> pb.RankResponse:
    return pb.RankResponse(
        candidates=[
            pb.RankedCandidate(index=s.index, score=s.score, probability=s.probability)
            for s in scored
        ]
    )
