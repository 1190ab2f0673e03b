"""`ClipClient`: the blocking Python client of `clipserve.v1.ClipService`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import TracebackType
from typing import TypeVar

import grpc
import numpy as np
import numpy.typing as npt

from clipserve.v1 import clip_service_pb2_grpc as pb_grpc

from . import calls, wire
from .base import ClientBase
from .channel import channel_credentials, channel_options
from .errors import ClipServiceError
from .types import (
    EmbeddingFormat,
    ImageInput,
    LabelScore,
    ModelInfo,
    RankedCandidate,
    RankInput,
)

T = TypeVar("T")


class ClipClient(ClientBase):
    """Blocking client; thread-safe, one channel per client. Use as a context manager::

        with ClipClient("localhost:8001") as client:
            vectors = client.encode_text(["a photo of a cat"])   # float32 [1, D]

    Constructor arguments are described on `ClientBase`. Failed calls raise a
    `ClipServiceError` subclass; UNAVAILABLE is retried per the `RetryPolicy` within the
    call's deadline.
    """

    def _connect(self) -> None:
        settings = self._settings
        options = channel_options(settings)
        credentials = channel_credentials(settings)
        if credentials is None:
            self._channel = grpc.insecure_channel(settings.target, options=options)
        else:
            self._channel = grpc.secure_channel(settings.target, credentials, options=options)
        self._stub = pb_grpc.ClipServiceStub(self._channel)

    @property
    def channel(self) -> grpc.Channel:
        """The underlying channel, e.g. for a ``grpc.health.v1`` health check."""
        return self._channel

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> ClipClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _invoke(self, call: calls.PreparedCall[T], timeout: float | None) -> T:
        deadline = self._deadline(timeout)
        rpc = getattr(self._stub, call.method)
        failures = 0
        while True:
            try:
                response = rpc(
                    call.request, timeout=self._remaining(deadline), metadata=self._metadata
                )
            except grpc.RpcError as exc:
                failures += 1
                time.sleep(self._retry_delay(call.method, exc, failures, deadline))
                continue
            try:
                return call.decode(response)
            except ClipServiceError as exc:
                raise self._attribute(exc, call.method, failures + 1) from None

    def encode_image(
        self,
        images: Sequence[ImageInput] | npt.NDArray[np.floating],
        *,
        embedding_format: EmbeddingFormat | None = None,
        timeout: float | None = None,
    ) -> npt.NDArray[np.float32]:
        """L2-normalised image embeddings, float32 ``[N, D]`` in input order.

        Each image is encoded bytes, a file path (``str`` or ``Path``, read here), an
        `ImageRef`, a PIL image (sent as PNG) or a preprocessed float array ``[3, S, S]``; a
        4-D array ``[N, 3, S, S]`` is N preprocessed images.
        """
        items = wire.image_list(images)
        return self._invoke(
            calls.encode_image(items, self._embedding_format(embedding_format)), timeout
        )

    def encode_text(
        self,
        texts: Sequence[str],
        *,
        truncate: bool = True,
        embedding_format: EmbeddingFormat | None = None,
        timeout: float | None = None,
    ) -> npt.NDArray[np.float32]:
        """L2-normalised text embeddings, float32 ``[N, D]`` in input order.

        ``truncate=False`` makes the server refuse (INVALID_ARGUMENT) a text longer than the
        model's context instead of cutting it.
        """
        return self._invoke(
            calls.encode_text(texts, self._embedding_format(embedding_format), truncate=truncate),
            timeout,
        )

    def classify(
        self,
        images: Sequence[ImageInput] | npt.NDArray[np.floating],
        labels: Sequence[str],
        *,
        templates: Sequence[str] | None = None,
        top_k: int | None = None,
        timeout: float | None = None,
    ) -> list[list[LabelScore]]:
        """Zero-shot classification: per image, labels best first.

        ``templates`` are prompts with one ``{}`` for the label (None: the model's default set;
        ``["{}"]``: bare labels). ``top_k=None`` returns every label, with probabilities summing
        to 1.
        """
        items = wire.image_list(images)
        return self._invoke(
            calls.classify(items, labels, templates=templates, top_k=top_k), timeout
        )

    def rank(
        self,
        query: RankInput,
        candidates: Sequence[RankInput],
        *,
        top_k: int | None = None,
        timeout: float | None = None,
    ) -> list[RankedCandidate]:
        """Candidates ordered by similarity to the query, best first.

        A plain ``str`` is text; an image is bytes, a ``Path``, an `ImageRef`, a PIL image or a
        preprocessed array (a path given as ``str`` would be read as text: wrap it in
        ``ImageRef``).
        """
        return self._invoke(calls.rank(query, candidates, top_k=top_k), timeout)

    def info(self, *, timeout: float | None = None) -> ModelInfo:
        """What model the server serves, its preprocessing, batching and limits."""
        return self._invoke(calls.model_info(), timeout)
