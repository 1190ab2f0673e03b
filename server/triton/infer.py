"""One Triton model's input tensor -> the `ClipModel` entry point that serves it -> embeddings.

Errors name the tensor and the element, e.g. ``images[2]: image is truncated or corrupt``.
"""

from __future__ import annotations

import numpy as np

from clipserve.server.errors import InvalidInput
from clipserve.server.model import ClipModel, EncodedImage, TensorImage
from clipserve.server.triton.codec import Tensor
from clipserve.server.triton.models import Kind, TritonModel

_TENSOR_DTYPES = {"FP32": "float32", "FP16": "float16"}


async def embed(
    model: ClipModel,
    spec: TritonModel,
    tensor: Tensor,
    deadline: float | None,
    *,
    truncate: bool = True,
) -> np.ndarray:
    """Normalised embeddings [N, D] of the N elements of `tensor` (already checked by `spec`)."""
    field = tensor.name
    if spec.kind is Kind.PIXELS:
        pixels = tensor.data  # [N, 3, S, S] float32 or float16
        assert isinstance(pixels, np.ndarray)
        dtype = _TENSOR_DTYPES[tensor.datatype]
        images = [  # views of the request's tensor (C-contiguous rows), not copies
            TensorImage(tuple(pixels.shape[1:]), dtype, memoryview(pixels[i]).cast("B"))
            for i in range(pixels.shape[0])
        ]
        return await model.encode_images(images, deadline, field=field)
    if spec.kind is Kind.TOKEN_IDS:
        ids = tensor.data  # [N, L] int64 or int32
        assert isinstance(ids, np.ndarray)
        return await model.encode_token_ids(ids, deadline, field=field)
    elements = tensor.data  # N elements of a [N, 1] BYTES tensor
    assert isinstance(elements, list)
    if spec.kind is Kind.IMAGE_BYTES:
        return await model.encode_images(
            [EncodedImage(e) for e in elements], deadline, field=field
        )
    texts = [_utf8(e, f"{field}[{i}]") for i, e in enumerate(elements)]
    embeddings, _ = await model.encode_texts(texts, deadline, truncate=truncate, field=field)
    return embeddings


def _utf8(element: bytes, item: str) -> str:
    try:
        return element.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"text is not valid UTF-8 ({exc.reason} at byte {exc.start})",
                           item=item) from None
