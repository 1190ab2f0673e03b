"""Errors raised by the clients: one `ClipServiceError` subclass per gRPC status code.

Every failed RPC is raised as a `ClipServiceError` carrying the status code and the server's
message, so callers catch one base class or one precise subclass, and never see ``grpc.RpcError``.
Local mistakes (a wrong input type, an unreadable file) are raised before any RPC as the usual
``TypeError`` / ``ValueError`` / ``OSError``.
"""

from __future__ import annotations

import grpc


class ClipServiceError(Exception):
    """A call to the clipserve server failed.

    Attributes:
        code: the gRPC status code.
        message: the server's status message (written for the caller, e.g. ``texts: empty``).
        method: the RPC name, e.g. ``"EncodeText"``.
        attempts: how many attempts were made (more than one after retries on UNAVAILABLE).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        method: str = "",
        attempts: int = 1,
    ) -> None:
        self.code = code
        self.message = message
        self.method = method
        self.attempts = attempts
        super().__init__(f"{code.name}: {message}")


class InvalidArgumentError(ClipServiceError):
    """INVALID_ARGUMENT: the request or one of its items is malformed."""


class NotFoundError(ClipServiceError):
    """NOT_FOUND."""


class PermissionDeniedError(ClipServiceError):
    """PERMISSION_DENIED, e.g. an image URL sent to a server that does not allow URL inputs."""


class UnauthenticatedError(ClipServiceError):
    """UNAUTHENTICATED: missing or wrong credentials."""


class ResourceExhaustedError(ClipServiceError):
    """RESOURCE_EXHAUSTED: the server is full and refused the request (not retried)."""


class DeadlineExceededError(ClipServiceError):
    """DEADLINE_EXCEEDED: the call's deadline passed."""


class UnavailableError(ClipServiceError):
    """UNAVAILABLE: the server could not be reached or is not ready (retried, then raised)."""


class UnimplementedError(ClipServiceError):
    """UNIMPLEMENTED: the server does not know this RPC (older server?)."""


class InternalError(ClipServiceError):
    """INTERNAL: the server failed; its log has the detail."""


class CallCancelledError(ClipServiceError):
    """CANCELLED: the call was cancelled."""


class InvalidResponseError(ClipServiceError):
    """The server answered OK but the response breaks the API contract (e.g. wrong number of
    embeddings or a raw embedding of the wrong size). Its code is DATA_LOSS."""

    def __init__(self, message: str, *, method: str = "", attempts: int = 1) -> None:
        super().__init__(grpc.StatusCode.DATA_LOSS, message, method=method, attempts=attempts)


_BY_CODE: dict[grpc.StatusCode, type[ClipServiceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.CANCELLED: CallCancelledError,
}


def error_for(
    code: grpc.StatusCode, message: str, *, method: str = "", attempts: int = 1
) -> ClipServiceError:
    """The `ClipServiceError` subclass for ``code`` (the base class for codes without one)."""
    cls = _BY_CODE.get(code, ClipServiceError)
    return cls(code, message, method=method, attempts=attempts)


def rpc_status(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """Status code and message of a failed call (sync ``grpc.Call`` or ``grpc.aio.AioRpcError``)."""
    code_fn = getattr(exc, "code", None)
    details_fn = getattr(exc, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return code, details or ""
