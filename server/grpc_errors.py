"""The one table from domain errors to gRPC status codes, applied by a server interceptor.

Unknown exceptions never leak internals: the caller gets INTERNAL with a generic message and the
traceback goes to the log. Requests protobuf cannot parse (e.g. a string field that is not UTF-8)
get INVALID_ARGUMENT naming the field instead of gRPC's INTERNAL (`wire_check`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
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

STATUS_OF: dict[type[ClipServeError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    ModelFailure: grpc.StatusCode.INTERNAL,
}

INTERNAL_MESSAGE = "internal error; the server logged the details"

#: Method prefixes of the services served through the table: clipserve.v1 and the KServe v2 /
#: Triton protocol (`inference.GRPCInferenceService`); health and reflection are left alone.
SERVICE_PREFIXES = ("/clipserve.", "/inference.")


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, message) a caller sees for `exc`."""
    for kind in type(exc).__mro__:
        code = STATUS_OF.get(kind)  # type: ignore[arg-type]
        if code is not None:
            message = INTERNAL_MESSAGE if code is grpc.StatusCode.INTERNAL else str(exc)
            return code, message
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


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
    """Applies `STATUS_OF` to the unary methods of the services whose names start with prefixes."""

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
