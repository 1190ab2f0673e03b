"""One prepared call per RPC: the request message plus how to decode its response.

The sync and async clients differ only in how they send a `PreparedCall`; everything about what
is sent and what comes back lives here and in `wire`, once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt
from google.protobuf.message import Message

from clipserve.v1 import clip_service_pb2 as pb

from . import wire
from .types import (
    EmbeddingFormat,
    ImageInput,
    LabelScore,
    ModelInfo,
    RankedCandidate,
    RankInput,
)

T = TypeVar("T")


@dataclass(frozen=True)
class PreparedCall(Generic[T]):
    """An RPC ready to send: ``method`` names the `ClipServiceStub` attribute."""

    method: str
    request: Message
    decode: Callable[[Any], T]


def encode_image(
    images: list[ImageInput], fmt: EmbeddingFormat
) -> PreparedCall[npt.NDArray[np.float32]]:
    request = wire.encode_image_request(images, fmt)
    n = len(images)
    return PreparedCall(
        "EncodeImage", request, lambda response: wire.decode_encode_response(response, n)
    )


def encode_text(
    texts: Sequence[str], fmt: EmbeddingFormat, *, truncate: bool
) -> PreparedCall[npt.NDArray[np.float32]]:
    request = wire.encode_text_request(texts, fmt, truncate=truncate)
    n = len(request.texts)
    return PreparedCall(
        "EncodeText", request, lambda response: wire.decode_encode_response(response, n)
    )


def classify(
    images: list[ImageInput],
    labels: Sequence[str],
    *,
    templates: Sequence[str] | None,
    top_k: int | None,
) -> PreparedCall[list[list[LabelScore]]]:
    request = wire.classify_request(images, labels, templates=templates, top_k=top_k)
    n = len(images)
    return PreparedCall(
        "Classify", request, lambda response: wire.decode_classify_response(response, n)
    )


def rank(
    query: RankInput, candidates: Sequence[RankInput], *, top_k: int | None
) -> PreparedCall[list[RankedCandidate]]:
    request = wire.rank_request(query, candidates, top_k=top_k)
    return PreparedCall("Rank", request, wire.decode_rank_response)


def model_info() -> PreparedCall[ModelInfo]:
    return PreparedCall("GetModelInfo", pb.GetModelInfoRequest(), wire.decode_model_info)
