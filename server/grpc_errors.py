"""The one table from domain errors to wire statuses, applied to gRPC by a server interceptor.

Each domain error has a gRPC status code and, for the OpenAI-compatible HTTP API
(`http_api`), an HTTP status and error type, in the same row: both transports answer one
failure alike. Unknown exceptions never leak internals: the caller gets INTERNAL (HTTP 500) with
a generic message and the traceback goes to the log. Requests protobuf cannot parse (e.g. a
string field that is not UTF-8) get INVALID_ARGUMENT naming the field instead of gRPC's INTERNAL
(`wire_check`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from clipserve.server.errors import (
    ClipServeError,
    DeadlineExpired,
    Forbidden,
    InvalidInput,
    ModelFailure,
    NotFound,
    NotReady,
    Overloaded,
    Unauthenticated,
)
from clipserve.server.wire_check import Malformed, lenient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WireStatus:
    """How one kind of failure reaches the caller of each transport."""

    grpc: grpc.StatusCode
    http: int
    #: the HTTP API's error ``type`` (OpenAI's error shape); its ``code`` is ``grpc.name.lower()``
    http_type: str


_S = grpc.StatusCode
#: The one table: domain error -> gRPC status, HTTP status, HTTP error type. (Failures of the
#: transports themselves, such as an HTTP body above the size limit, are mapped where they occur.)
STATUSES: dict[type[ClipServeError], WireStatus] = {
    InvalidInput: WireStatus(_S.INVALID_ARGUMENT, 400, "invalid_request_error"),
    Overloaded: WireStatus(_S.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    DeadlineExpired: WireStatus(_S.DEADLINE_EXCEEDED, 504, "timeout_error"),
    NotReady: WireStatus(_S.UNAVAILABLE, 503, "service_unavailable_error"),
    NotFound: WireStatus(_S.NOT_FOUND, 404, "not_found_error"),
    Forbidden: WireStatus(_S.PERMISSION_DENIED, 403, "permission_error"),
    Unauthenticated: WireStatus(_S.UNAUTHENTICATED, 401, "authentication_error"),
    ModelFailure: WireStatus(_S.INTERNAL, 500, "server_error"),
}
#: Anything the table does not name (never with its message: see `INTERNAL_MESSAGE`).
INTERNAL_STATUS = WireStatus(_S.INTERNAL, 500, "server_error")
STATUS_OF: dict[type[ClipServeError], grpc.StatusCode] = {
    kind: status.grpc for kind, status in STATUSES.items()
}

INTERNAL_MESSAGE = "internal error; the server logged the details"

#: Method prefixes of the services served through the table: clipserve.v1 and the KServe v2 /
#: Triton protocol (`inference.GRPCInferenceService`); health and reflection are left alone.
SERVICE_PREFIXES = ("/clipserve.", "/inference.")


def wire_status_for(exc: BaseException) -> tuple[WireStatus, str]:
    """(statuses, message) a caller of either transport sees for `exc`."""
    for kind in type(exc).__mro__:
        status = STATUSES.get(kind)  # type: ignore[arg-type]
        if status is not None:
            internal = status.grpc is grpc.StatusCode.INTERNAL
            return status, INTERNAL_MESSAGE if internal else str(exc)
    return INTERNAL_STATUS, INTERNAL_MESSAGE


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, message) a gRPC caller sees for `exc`."""
    status, message = wire_status_for(exc)
    return status.grpc, message


Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _wrap(method: str, behavior: Behavior) -> Behavior:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, Malformed):  # protobuf could not parse it (wire_check)
                raise request.error
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except ClipServeError as exc:
            code, message = status_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.error("%s failed: %s", method, exc)
            await context.abort(code, message)
        except Exception:
            log.exception("%s failed with an unexpected error", method)
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)

    return handle


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Applies `STATUSES` to the unary methods of the services whose names start with prefixes."""

    def __init__(self, prefixes: tuple[str, ...] = SERVICE_PREFIXES) -> None:
        self._prefixes = prefixes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is None or not method.startswith(self._prefixes):
            return handler
        return grpc.unary_unary_rpc_method_handler(
            _wrap(method, handler.unary_unary),
            request_deserializer=lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
