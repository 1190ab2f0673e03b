"""Public value types of the Python client: inputs (`ImageRef`) and results (frozen dataclasses).

Results are plain dataclasses rather than protobuf messages so callers do not depend on the
generated code, and so they compare, hash and print like values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

import numpy as np
import numpy.typing as npt
from PIL import Image as PILImage

EmbeddingFormat = Literal["float", "fp32_bytes", "fp16_bytes"]
"""How embeddings travel on the wire; every format is returned as a float32 numpy array.

- ``"float"``: packed repeated float (the protobuf default).
- ``"fp32_bytes"``: raw little-endian float32 bytes; bit-identical to ``"float"`` and decoded
  without a per-element loop (the client default).
- ``"fp16_bytes"``: raw little-endian float16 bytes, half the size on the wire; decoded and
  widened to float32, so values carry float16 precision (about 3 significant digits).
"""

EMBEDDING_FORMATS: tuple[EmbeddingFormat, ...] = ("float", "fp32_bytes", "fp16_bytes")


@dataclass(frozen=True, init=False)
class ImageRef:
    """An image named by reference: a local file (read by the client) or an http(s) URL
    (fetched by the server, which refuses it with PERMISSION_DENIED unless URL inputs are on).

    ``rank`` treats a plain ``str`` as *text*; wrap a path in ``ImageRef`` (or pass a
    ``pathlib.Path``) to mean an image file there::

        client.rank("a photo of a cat", [ImageRef("cat.jpg"), Path("dog.jpg")])
        client.rank(ImageRef(url="https://example.com/cat.jpg"), ["cat", "dog"])
    """

    path: Path | None = None
    url: str | None = None

    def __init__(self, path: str | os.PathLike[str] | None = None, *, url: str | None = None):
        if (path is None) == (url is None):
            raise ValueError("ImageRef needs exactly one of path or url")
        object.__setattr__(self, "path", None if path is None else Path(path))
        object.__setattr__(self, "url", url)


ImageInput: TypeAlias = (
    bytes
    | bytearray
    | memoryview
    | str
    | os.PathLike[str]
    | ImageRef
    | PILImage.Image
    | npt.NDArray[np.floating]
)
"""One image: encoded bytes, a file path (``str`` or ``Path``), an `ImageRef`, a PIL image
(sent as PNG) or a preprocessed float32/float16 array ``[3, S, S]`` (sent as a tensor)."""

RankInput: TypeAlias = (
    str
    | bytes
    | bytearray
    | memoryview
    | os.PathLike[str]
    | ImageRef
    | PILImage.Image
    | npt.NDArray[np.floating]
)
"""A rank query or candidate: a plain ``str`` is text, anything else is an image."""


@dataclass(frozen=True, slots=True)
class LabelScore:
    """One label of a classification, best first."""

    label: str
    index: int
    """Position of the label in the request's ``labels``."""
    probability: float
    """Softmax over all labels of ``logit_scale * score (+ logit_bias)``."""
    score: float
    """Cosine similarity between the image and the label embedding."""


@dataclass(frozen=True, slots=True)
class RankedCandidate:
    """One rank candidate, best first."""

    index: int
    """Position of the candidate in the request's ``candidates``."""
    score: float
    """Cosine similarity to the query."""
    probability: float
    """Softmax over all candidates of ``logit_scale * score (+ logit_bias)``."""


@dataclass(frozen=True, slots=True)
class BatchingInfo:
    """Settings of one tower's dynamic batcher on the server."""

    max_batch_size: int
    max_queue_delay_us: int
    max_queue_size: int
    batch_buckets: tuple[int, ...]
    length_buckets: tuple[int, ...]
    instances: int = 1  # model instances running batches side by side


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the server serves (``GetModelInfo``)."""

    model_name: str
    pretrained: str
    embedding_dim: int
    image_size: int
    context_length: int
    precision: str
    execution_provider: str
    vision_batching: BatchingInfo
    text_batching: BatchingInfo
    logit_scale: float
    logit_bias: float
    default_templates: tuple[str, ...]
    server_version: str
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    interpolation: str
    resize_mode: str
    max_items_per_request: int
    max_labels: int
