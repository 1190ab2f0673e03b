"""`AsyncClipClient`: the asyncio Python client of `clipserve.v1.ClipService` (``grpc.aio``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
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


class AsyncClipClient(ClientBase):
    """Asyncio client with the same methods as `ClipClient`, as coroutines. Create it inside a
    running event loop and use it from that loop::

        async with AsyncClipClient("localhost:8001") as client:
            vectors = await client.encode_text(["a photo of a cat"])   # float32 [1, D]

    Reading image files and encoding PIL images happen in a worker thread, never on the loop.
    Constructor arguments are described on `ClientBase`.
    """

    def _connect(self) -> None:
        settings = self._settings
        options = channel_options(settings)
        credentials = channel_credentials(settings)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(settings.target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(settings.target, credentials, options=options)
        self._stub = pb_grpc.ClipServiceStub(self._channel)

    @property
    def channel(self) -> grpc.aio.Channel:
        """The underlying channel, e.g. for a ``grpc.health.v1`` health check."""
        return self._channel

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClipClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @staticmethod
    async def _prepare(
        build: Callable[[], calls.PreparedCall[T]], needs_io: bool
    ) -> calls.PreparedCall[T]:
        """Build a call, in a worker thread when that reads files or encodes images."""
        return await asyncio.to_thread(build) if needs_io else build()

    async def _invoke(self, call: calls.PreparedCall[T], timeout: float | None) -> T:
        deadline = self._deadline(timeout)
        rpc = getattr(self._stub, call.method)
        failures = 0
        while True:
            try:
                response = await rpc(
                    call.request, timeout=self._remaining(deadline), metadata=self._metadata
                )
            except grpc.RpcError as exc:
                failures += 1
                await asyncio.sleep(self._retry_delay(call.method, exc, failures, deadline))
                continue
            try:
                return call.decode(response)
            except ClipServiceError as exc:
                raise self._attribute(exc, call.method, failures + 1) from None

    async def encode_image(
        self,
        images: Sequence[ImageInput] | npt.NDArray[np.floating],
        *,
        embedding_format: EmbeddingFormat | None = None,
        timeout: float | None = None,
    ) -> npt.NDArray[np.float32]:
        """L2-normalised image embeddings, float32 ``[N, D]``; see `ClipClient.encode_image`."""
        items = wire.image_list(images)
        fmt = self._embedding_format(embedding_format)
        call = await self._prepare(
            lambda: calls.encode_image(items, fmt), wire.needs_io(items, str_is_path=True)
        )
        return await self._invoke(call, timeout)

    async def encode_text(
        self,
        texts: Sequence[str],
        *,
        truncate: bool = True,
        embedding_format: EmbeddingFormat | None = None,
        timeout: float | None = None,
    ) -> npt.NDArray[np.float32]:
        """L2-normalised text embeddings, float32 ``[N, D]``; see `ClipClient.encode_text`."""
        call = calls.encode_text(texts, self._embedding_format(embedding_format), truncate=truncate)
        return await self._invoke(call, timeout)

    async def classify(
        self,
        images: Sequence[ImageInput] | npt.NDArray[np.floating],
        labels: Sequence[str],
        *,
        templates: Sequence[str] | None = None,
        top_k: int | None = None,
        timeout: float | None = None,
    ) -> list[list[LabelScore]]:
        """Zero-shot classification, labels best first; see `ClipClient.classify`."""
        items = wire.image_list(images)
        call = await self._prepare(
            lambda: calls.classify(items, labels, templates=templates, top_k=top_k),
            wire.needs_io(items, str_is_path=True),
        )
        return await self._invoke(call, timeout)

    async def rank(
        self,
        query: RankInput,
        candidates: Sequence[RankInput],
        *,
        top_k: int | None = None,
        timeout: float | None = None,
    ) -> list[RankedCandidate]:
        """Candidates best first (a plain ``str`` is text); see `ClipClient.rank`."""
        if isinstance(candidates, str):
            raise TypeError("candidates must be a list, not a single str; wrap it in a list")
        items = [query, *candidates]
        call = await self._prepare(
            lambda: calls.rank(items[0], items[1:], top_k=top_k),
            wire.needs_io(items, str_is_path=False),
        )
        return await self._invoke(call, timeout)

    async def info(self, *, timeout: float | None = None) -> ModelInfo:
        """What model the server serves, its preprocessing, batching and limits."""
        return await self._invoke(calls.model_info(), timeout)
