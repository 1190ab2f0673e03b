"""Domain errors of the serving core. No transport types here: `grpc_errors` maps them to
gRPC status codes in one table.

Messages are written for the caller: they name the offending item (``images[3]: ...``) and the
limit that was crossed, and never contain internal paths, tracebacks or secrets.
"""

from __future__ import annotations


class ClipServeError(Exception):
    """Base of the errors that reach a caller with a precise status."""

    def __init__(self, message: str, *, item: str | None = None) -> None:
        self.item = item
        self.detail = message
        super().__init__(f"{item}: {message}" if item else message)

    def at(self, item: str) -> ClipServeError:
        """The same error attributed to a request item, e.g. ``images[2]``."""
        return type(self)(self.detail, item=item)


class InvalidInput(ClipServeError):
    """The request or one of its items is malformed (INVALID_ARGUMENT)."""


class Overloaded(ClipServeError):
    """A bounded queue or the concurrency limit is full (RESOURCE_EXHAUSTED)."""


class DeadlineExpired(ClipServeError):
    """The request's deadline passed before its work was done (DEADLINE_EXCEEDED)."""


class NotReady(ClipServeError):
    """The server is starting, draining or its model is unhealthy (UNAVAILABLE)."""


class NotFound(ClipServeError):
    """The request names a model (or version) this server does not serve (NOT_FOUND)."""


class Forbidden(ClipServeError):
    """The request asks for something this server does not allow (PERMISSION_DENIED)."""


class Unauthenticated(ClipServeError):
    """The call carries no valid credentials (UNAUTHENTICATED); never echoes what it carried."""


class ModelFailure(ClipServeError):
    """Inference failed inside the engine (INTERNAL; the detail is logged, not sent)."""
