"""clipserve.clients: Python clients and the `clipserve client` command.

    from clipserve.clients import ClipClient

    with ClipClient("localhost:8001") as client:
        images = client.encode_image(["cat.jpg", "dog.jpg"])      # float32 [2, D]
        texts = client.encode_text(["a cat", "a dog"])            # float32 [2, D]
        similarity = images @ texts.T                             # [2, 2]

See docs/client.md. Nothing here imports the server, onnxruntime or torch.
"""

from .aio import AsyncClipClient
from .channel import DEFAULT_TARGET
from .client import ClipClient
from .errors import (
    CallCancelledError,
    ClipServiceError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    InvalidResponseError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from .retry import NO_RETRY, RetryPolicy
from .types import (
    BatchingInfo,
    EmbeddingFormat,
    ImageInput,
    ImageRef,
    LabelScore,
    ModelInfo,
    RankedCandidate,
    RankInput,
)

__all__ = [
    "DEFAULT_TARGET",
    "NO_RETRY",
    "AsyncClipClient",
    "BatchingInfo",
    "CallCancelledError",
    "ClipClient",
    "ClipServiceError",
    "DeadlineExceededError",
    "EmbeddingFormat",
    "ImageInput",
    "ImageRef",
    "InternalError",
    "InvalidArgumentError",
    "InvalidResponseError",
    "LabelScore",
    "ModelInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "RankInput",
    "RankedCandidate",
    "ResourceExhaustedError",
    "RetryPolicy",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
]
