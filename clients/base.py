"""What the sync and async clients share: constructor, defaults, deadline and retry decisions."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence

import grpc

from .channel import (
    DEFAULT_MAX_MESSAGE_LENGTH,
    DEFAULT_TARGET,
    ChannelOption,
    ChannelSettings,
    LoadBalancing,
    call_metadata,
)
from .errors import ClipServiceError, error_for, rpc_status
from .retry import RetryPolicy, next_delay
from .types import EMBEDDING_FORMATS, EmbeddingFormat

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0


class ClientBase:
    """Settings and call policy of a clipserve client (not used directly).

    Args:
        target: gRPC target: ``host:port``, ``dns:///name:port`` (all addresses of a name, e.g. a
            Kubernetes headless service, with ``load_balancing="round_robin"``), ``unix:path``.
        timeout: default deadline of a call in seconds, retries and their waits included; each
            method's ``timeout=`` overrides it; None for no deadline.
        retry: retry policy on UNAVAILABLE; ``RetryPolicy(max_attempts=1)`` disables retries.
        embedding_format: default wire format of embeddings (see `EmbeddingFormat`); embeddings
            are always returned as float32.
        load_balancing: ``"round_robin"`` spreads calls over every address the target resolves
            to (set through ``grpc.service_config``); ``"pick_first"`` or None uses one.
        max_receive_message_length, max_send_message_length: message size limits in bytes.
        keepalive_time_s: send HTTP/2 keepalive pings this often (None: off). The server must
            permit pings this frequent or it closes the connection with ``too_many_pings``.
        keepalive_timeout_s: close the connection if a ping is not answered within this.
        keepalive_permit_without_calls: also ping when no call is in flight.
        tls: use TLS with the system's root certificates; implied by the next three.
        root_certificates: PEM CA bundle that signed the server certificate.
        private_key, certificate_chain: PEM client key and certificate, for mutual TLS.
        server_name: expected server name in its certificate when it differs from the target.
        token: bearer token sent as ``authorization: Bearer <token>`` metadata on every call.
        options: extra gRPC channel arguments; they win over the ones set from the above.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        embedding_format: EmbeddingFormat = "fp32_bytes",
        load_balancing: LoadBalancing | None = None,
        max_receive_message_length: int = DEFAULT_MAX_MESSAGE_LENGTH,
        max_send_message_length: int = DEFAULT_MAX_MESSAGE_LENGTH,
        keepalive_time_s: float | None = None,
        keepalive_timeout_s: float = 20.0,
        keepalive_permit_without_calls: bool = False,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        server_name: str | None = None,
        token: str | None = None,
        options: Sequence[ChannelOption] = (),
    ) -> None:
        if embedding_format not in EMBEDDING_FORMATS:
            raise ValueError(
                f"embedding_format must be one of {', '.join(EMBEDDING_FORMATS)}, "
                f"got {embedding_format!r}"
            )
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 or None, got {timeout}")
        self._settings = ChannelSettings(
            target=target,
            load_balancing=load_balancing,
            max_receive_message_length=max_receive_message_length,
            max_send_message_length=max_send_message_length,
            keepalive_time_s=keepalive_time_s,
            keepalive_timeout_s=keepalive_timeout_s,
            keepalive_permit_without_calls=keepalive_permit_without_calls,
            tls=tls,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            server_name=server_name,
            token=token,
            options=tuple(options),
        )
        self._timeout = timeout
        self._retry = retry if retry is not None else RetryPolicy()
        self._format: EmbeddingFormat = embedding_format
        self._metadata = call_metadata(self._settings)
        self._rng = random.Random()
        self._connect()

    def _connect(self) -> None:
        """Create the channel and stub (each client kind makes its own channel type)."""
        raise NotImplementedError

    @property
    def target(self) -> str:
        return self._settings.target

    def _embedding_format(self, fmt: EmbeddingFormat | None) -> EmbeddingFormat:
        return self._format if fmt is None else fmt

    def _deadline(self, timeout: float | None) -> float | None:
        """Monotonic deadline of a call from its ``timeout=`` (None: the client default)."""
        seconds = self._timeout if timeout is None else timeout
        return None if seconds is None else time.monotonic() + seconds

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        return None if deadline is None else max(deadline - time.monotonic(), 0.0)

    def _retry_delay(
        self, method: str, exc: grpc.RpcError, failures: int, deadline: float | None
    ) -> float:
        """Seconds to wait before retrying a failed attempt; raises the mapped error instead
        when the code is not retryable, attempts are used up or the deadline is too close."""
        code, message = rpc_status(exc)
        remaining = self._remaining(deadline)
        delay = next_delay(self._retry, code, failures, self._rng.random(), remaining)
        if delay is None:
            raise error_for(code, message, method=method, attempts=failures) from exc
        logger.warning(
            "%s to %s failed with %s (attempt %d of %d), retrying in %.3fs: %s",
            method,
            self._settings.target,
            code.name,
            failures,
            self._retry.max_attempts,
            delay,
            message,
        )
        return delay

    @staticmethod
    def _attribute(exc: ClipServiceError, method: str, attempts: int) -> ClipServiceError:
        """Name the RPC on an error raised while decoding its response."""
        exc.method = method
        exc.attempts = attempts
        return exc
