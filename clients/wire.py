"""Conversion between client values and `clipserve.v1` messages, both ways.

Only what is needed to build a well-typed message is checked here (input types, tensor shape and
dtype); limits and semantics (empty lists, duplicate labels, ``top_k`` range, image size) are the
server's to judge, so the client never disagrees with it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image as PILImage

from clipserve.v1 import clip_service_pb2 as pb

from .errors import InvalidResponseError
from .types import (
    EMBEDDING_FORMATS,
    BatchingInfo,
    EmbeddingFormat,
    ImageInput,
    ImageRef,
    LabelScore,
    ModelInfo,
    RankedCandidate,
    RankInput,
)

_FORMAT_TO_PB: dict[str, pb.EmbeddingFormat] = {
    "float": pb.EMBEDDING_FORMAT_FLOAT,
    "fp32_bytes": pb.EMBEDDING_FORMAT_FP32_BYTES,
    "fp16_bytes": pb.EMBEDDING_FORMAT_FP16_BYTES,
}
_TENSOR_DTYPES: dict[np.dtype[np.floating], pb.DataType] = {
    np.dtype("<f4"): pb.DATA_TYPE_FLOAT32,
    np.dtype("<f2"): pb.DATA_TYPE_FLOAT16,
}
# Modes PNG stores losslessly; anything else (CMYK, YCbCr, F, ...) is converted to RGB first.
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"})
_UINT32_MAX = 2**32 - 1


def format_to_pb(fmt: EmbeddingFormat) -> pb.EmbeddingFormat:
    """The wire enum of an embedding format name."""
    try:
        return _FORMAT_TO_PB[fmt]
    except KeyError:
        raise ValueError(
            f"embedding_format must be one of {', '.join(EMBEDDING_FORMATS)}, got {fmt!r}"
        ) from None


def _read_file(path: str | os.PathLike[str]) -> bytes:
    return Path(path).read_bytes()


def _pil_to_png(image: PILImage.Image) -> bytes:
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    buf = io.BytesIO()
    # Lossless at any level; level 1 is the fastest.
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def tensor_to_pb(array: npt.NDArray[np.floating]) -> pb.Tensor:
    """A preprocessed image ``[3, S, S]`` (float32 or float16) as a little-endian `Tensor`."""
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(
            f"an image array must be a preprocessed tensor of shape [3, S, S], got "
            f"{list(array.shape)}; pass PIL.Image.fromarray(...) for raw pixels"
        )
    little = array.dtype.newbyteorder("<")
    dtype = _TENSOR_DTYPES.get(little)
    if dtype is None:
        raise TypeError(f"an image tensor must be float32 or float16, got {array.dtype}")
    data = np.ascontiguousarray(array, dtype=little)
    return pb.Tensor(shape=list(data.shape), dtype=dtype, data=data.tobytes())


def image_to_pb(image: ImageInput) -> pb.Image:
    """One image input as an `Image` message; reads files and encodes PIL images (may block)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return pb.Image(data=bytes(image))
    if isinstance(image, ImageRef):
        if image.url is not None:
            return pb.Image(url=image.url)
        assert image.path is not None
        return pb.Image(data=_read_file(image.path))
    if isinstance(image, (str, os.PathLike)):
        return pb.Image(data=_read_file(image))
    if isinstance(image, PILImage.Image):
        return pb.Image(data=_pil_to_png(image))
    if isinstance(image, np.ndarray):
        return pb.Image(tensor=tensor_to_pb(image))
    raise TypeError(
        "an image must be bytes, a path (str or Path), an ImageRef, a PIL.Image or a float "
        f"array [3, S, S], got {type(image).__name__}"
    )


def rank_item_to_pb(item: RankInput) -> pb.RankItem:
    """A rank query or candidate: a plain ``str`` is text, anything else an image."""
    if isinstance(item, str):
        return pb.RankItem(text=item)
    return pb.RankItem(image=image_to_pb(item))


def needs_io(items: Iterable[object], *, str_is_path: bool) -> bool:
    """Whether converting ``items`` reads files or encodes images (worth a worker thread in the
    async client). ``str_is_path``: a ``str`` is a file path (encode/classify), not text (rank)."""
    return any(
        isinstance(item, (PILImage.Image, os.PathLike, ImageRef))
        or (str_is_path and isinstance(item, str))
        for item in items
    )


def image_list(images: Sequence[ImageInput] | npt.NDArray[np.floating]) -> list[ImageInput]:
    """The images of a call as a list; a 4-D array ``[N, 3, S, S]`` is N tensors.

    A lone image (a ``str``, ``bytes``, ``Path``, PIL image or 3-D array) is refused: iterating it
    would silently send its characters, bytes or rows.
    """
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return list(images)
        raise TypeError(f"pass a list of images or an [N, 3, S, S] array, got {images.shape}")
    single = (str, bytes, bytearray, memoryview, os.PathLike, ImageRef, PILImage.Image)
    if isinstance(images, single):
        raise TypeError(f"pass a list of images, not a single {type(images).__name__}")
    return list(images)


def text_list(texts: Sequence[str], what: str = "texts") -> list[str]:
    """``texts`` as a list of ``str``; a lone ``str`` is refused (it would become characters)."""
    if isinstance(texts, str):
        raise TypeError(f"{what} must be a list of str, not a single str; wrap it in a list")
    out = list(texts)
    for i, text in enumerate(out):
        if not isinstance(text, str):
            raise TypeError(f"{what}[{i}] must be str, got {type(text).__name__}")
    return out


def optional_top_k(top_k: int | None) -> int | None:
    """``top_k`` checked to fit the wire's uint32 (its range is the server's to check)."""
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__}")
    if not 0 <= top_k <= _UINT32_MAX:
        raise ValueError(f"top_k must be a positive int that fits uint32, got {top_k}")
    return top_k


# ---- requests ------------------------------------------------------------------------------


def encode_image_request(
    images: Sequence[ImageInput] | npt.NDArray[np.floating], fmt: EmbeddingFormat
) -> pb.EncodeImageRequest:
    return pb.EncodeImageRequest(
        images=[image_to_pb(image) for image in image_list(images)], format=format_to_pb(fmt)
    )


def encode_text_request(
    texts: Sequence[str], fmt: EmbeddingFormat, *, truncate: bool = True
) -> pb.EncodeTextRequest:
    return pb.EncodeTextRequest(
        texts=text_list(texts),
        format=format_to_pb(fmt),
        truncation=pb.TRUNCATION_END if truncate else pb.TRUNCATION_NONE,
    )


def classify_request(
    images: Sequence[ImageInput] | npt.NDArray[np.floating],
    labels: Sequence[str],
    *,
    templates: Sequence[str] | None = None,
    top_k: int | None = None,
) -> pb.ClassifyRequest:
    """A `ClassifyRequest`; ``templates=None`` (or empty) asks for the model's default set."""
    request = pb.ClassifyRequest(
        images=[image_to_pb(image) for image in image_list(images)],
        labels=text_list(labels, "labels"),
        templates=text_list(templates, "templates") if templates is not None else [],
    )
    k = optional_top_k(top_k)
    if k is not None:
        request.top_k = k
    return request


def rank_request(
    query: RankInput, candidates: Sequence[RankInput], *, top_k: int | None = None
) -> pb.RankRequest:
    if isinstance(candidates, str):
        raise TypeError("candidates must be a list, not a single str; wrap it in a list")
    request = pb.RankRequest(
        query=rank_item_to_pb(query),
        candidates=[rank_item_to_pb(candidate) for candidate in candidates],
    )
    k = optional_top_k(top_k)
    if k is not None:
        request.top_k = k
    return request


# ---- responses -----------------------------------------------------------------------------


def decode_embeddings(
    embeddings: Sequence[pb.Embedding], dim: int, fmt: int
) -> npt.NDArray[np.float32]:
    """Embeddings of a response as float32 ``[N, dim]``, whatever their wire format.

    ``fmt`` is the format the response says it used (UNSPECIFIED means FLOAT).
    """
    n = len(embeddings)
    if fmt in (pb.EMBEDDING_FORMAT_FLOAT, pb.EMBEDDING_FORMAT_UNSPECIFIED):
        out = np.empty((n, dim), dtype=np.float32)  # [N, D]
        for i, embedding in enumerate(embeddings):
            if len(embedding.values) != dim:
                raise InvalidResponseError(
                    f"embeddings[{i}] has {len(embedding.values)} values, expected dim={dim}"
                )
            out[i] = embedding.values
        return out
    dtype: np.dtype[np.floating]
    if fmt == pb.EMBEDDING_FORMAT_FP32_BYTES:
        dtype = np.dtype("<f4")
    elif fmt == pb.EMBEDDING_FORMAT_FP16_BYTES:
        dtype = np.dtype("<f2")
    else:
        raise InvalidResponseError(f"unknown embedding format {fmt}")
    for i, embedding in enumerate(embeddings):
        if len(embedding.raw) != dtype.itemsize * dim:
            raise InvalidResponseError(
                f"embeddings[{i}] has {len(embedding.raw)} raw bytes, expected "
                f"{dtype.itemsize} x dim={dim}"
            )
    raw = b"".join(embedding.raw for embedding in embeddings)
    # frombuffer is read-only and may be fp16: astype copies into a writable native float32.
    return np.frombuffer(raw, dtype=dtype).reshape(n, dim).astype(np.float32)


def _check_count(what: str, got: int, expected: int) -> None:
    if got != expected:
        raise InvalidResponseError(f"response has {got} {what} for {expected} inputs")


def decode_encode_response(
    response: pb.EncodeImageResponse | pb.EncodeTextResponse, expected: int
) -> npt.NDArray[np.float32]:
    _check_count("embeddings", len(response.embeddings), expected)
    return decode_embeddings(response.embeddings, response.dim, response.format)


def decode_classify_response(
    response: pb.ClassifyResponse, expected: int
) -> list[list[LabelScore]]:
    _check_count("classifications", len(response.classifications), expected)
    return [
        [
            LabelScore(label=s.label, index=s.index, probability=s.probability, score=s.score)
            for s in classification.labels
        ]
        for classification in response.classifications
    ]


def decode_rank_response(response: pb.RankResponse) -> list[RankedCandidate]:
    return [
        RankedCandidate(index=c.index, score=c.score, probability=c.probability)
        for c in response.candidates
    ]


def _batching(info: pb.BatchingInfo) -> BatchingInfo:
    return BatchingInfo(
        max_batch_size=info.max_batch_size,
        max_queue_delay_us=info.max_queue_delay_us,
        max_queue_size=info.max_queue_size,
        batch_buckets=tuple(info.batch_buckets),
        length_buckets=tuple(info.length_buckets),
        instances=info.instances or 1,  # 0: a server from before the field had one
    )


def decode_model_info(response: pb.GetModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        model_name=response.model_name,
        pretrained=response.pretrained,
        embedding_dim=response.embedding_dim,
        image_size=response.image_size,
        context_length=response.context_length,
        precision=response.precision,
        execution_provider=response.execution_provider,
        vision_batching=_batching(response.vision_batching),
        text_batching=_batching(response.text_batching),
        logit_scale=response.logit_scale,
        logit_bias=response.logit_bias,
        default_templates=tuple(response.default_templates),
        server_version=response.server_version,
        image_mean=tuple(response.image_mean),
        image_std=tuple(response.image_std),
        interpolation=response.interpolation,
        resize_mode=response.resize_mode,
        max_items_per_request=response.max_items_per_request,
        max_labels=response.max_labels,
    )
