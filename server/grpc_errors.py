"""The one table from domain errors to wire statuses (applied to gRPC calls by `call_layer`).

Each domain error has a gRPC status code and, for the OpenAI-compatible HTTP API
(`http_api`), an HTTP status and error type, in the same row: both transports answer one
failure alike. Unknown exceptions never leak internals: the caller gets INTERNAL (HTTP 500) with
a generic message and the traceback goes to the log.
"""

from __future__ import annotations

from dataclasses import dataclass

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
