"""What every unary call of clipserve's services goes through, wrapped once at registration.

Each call of a unary method under `SERVICE_PREFIXES` (clipserve.v1 and the Triton protocol)
runs one coroutine around the servicer's method, which

1. checks the bearer token when tokens are set (`auth`), before the request is parsed;
2. parses the request: bytes protobuf cannot parse (e.g. a string field that is not UTF-8) get
   INVALID_ARGUMENT naming the field instead of gRPC's INTERNAL (`wire_check`);
3. binds a fresh `RequestTrace` for the core and the batchers to fill in;
4. turns domain errors into statuses by the one table (`grpc_errors.STATUSES`); an unexpected
   exception becomes INTERNAL with a generic message, its traceback goes to the log;
5. hands the finished call, with the status the caller got, to the access log (`access_log`).

Why not server interceptors: grpc.aio runs every interceptor's coroutine on every call to find
its handler, and an interceptor that wraps builds a new handler each time. Wrapping the handlers
once, when the services are registered, leaves one coroutine per call (docs/performance.md has
the figures). Other services (health, reflection) are registered unchanged; with tokens set,
`auth.BearerAuthInterceptor` guards them and lets the handlers wrapped here through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from clipserve.server import trace as trace_mod
from clipserve.server.access_log import AccessLog, CallRecord
from clipserve.server.auth import BearerTokens
from clipserve.server.errors import ClipServeError, Unauthenticated
from clipserve.server.grpc_errors import INTERNAL_MESSAGE, SERVICE_PREFIXES, status_for
from clipserve.server.trace import RequestTrace
from clipserve.server.wire_check import Malformed, lenient

log = logging.getLogger(__name__)

Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]

_OK = grpc.StatusCode.OK
_CANCELLED = grpc.StatusCode.CANCELLED
_INTERNAL = grpc.StatusCode.INTERNAL
_UNKNOWN = grpc.StatusCode.UNKNOWN


class CallLayer:
    """Wraps the unary handlers of the services under `prefixes` (see the module docstring)."""

    def __init__(
        self,
        access: AccessLog,
        tokens: BearerTokens | None = None,
        prefixes: tuple[str, ...] = SERVICE_PREFIXES,
    ) -> None:
        self._access = access
        self._tokens = tokens
        self._prefixes = prefixes
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # method -> its handler, made once

    def registrar(self, server: grpc.aio.Server) -> Registrar:
        """A stand-in for `server` to pass to the generated ``add_*Servicer_to_server``."""
        return Registrar(server, self)

    def made(self, method: str, handler: grpc.RpcMethodHandler) -> bool:
        """Whether `handler` is this layer's for `method` (it checks the token itself)."""
        return self._wrapped.get(method) is handler

    def wrapped(self, method: str) -> grpc.RpcMethodHandler | None:
        """The handler made for `method`, if one was."""
        return self._wrapped.get(method)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` wrapped (once per method) if `method` is a unary method under the
        prefixes, else `handler` itself. Services' handlers depend on the method name only."""
        if handler.unary_unary is None or not method.startswith(self._prefixes):
            return handler
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            wrapped = self._wrapped[method] = grpc.unary_unary_rpc_method_handler(
                self._behavior(method, handler.unary_unary, lenient(handler.request_deserializer)),
                request_deserializer=None,  # bytes in: the token is checked before parsing
                response_serializer=handler.response_serializer,
            )
        return wrapped

    def _behavior(
        self, method: str, behavior: Behavior, parse: Callable[[bytes], Any] | None
    ) -> Behavior:
        tokens, finish = self._tokens, self._access.finish
        bind, unbind = trace_mod.bind, trace_mod.unbind

        async def handle(data: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            trace = RequestTrace()
            token = bind(trace)
            code = _UNKNOWN
            try:
                if tokens is not None:
                    reason = tokens.authorized(context.invocation_metadata())
                    if reason is not None:
                        log.debug("refused an unauthenticated call to %s: %s", method, reason)
                        raise Unauthenticated(reason)
                request = parse(data) if parse is not None else data
                if isinstance(request, Malformed):
                    raise request.error
                response = await behavior(request, context)
                code = context.code() or _OK
                return response
            except grpc.aio.AbortError:  # the method aborted the call itself
                code = context.code() or _UNKNOWN
                raise
            except asyncio.CancelledError:
                code = _CANCELLED
                raise
            except ClipServeError as exc:
                code, message = status_for(exc)
                if code is _INTERNAL:
                    log.error("%s failed: %s", method, exc)
                await context.abort(code, message)
            except Exception:
                log.exception("%s failed with an unexpected error", method)
                code = _INTERNAL
                await context.abort(_INTERNAL, INTERNAL_MESSAGE)
            finally:
                unbind(token)
                finish(CallRecord(method, code, time.perf_counter() - started, trace,
                                  context.peer()))

        return handle


class Registrar:
    """Stands in for the server in the generated ``add_*Servicer_to_server`` functions: what
    they register reaches the server through `CallLayer.wrap`. It offers nothing else on
    purpose: generated code that registered another way would fail at start, not serve
    unwrapped (and, with tokens set, unauthenticated) handlers."""

    def __init__(self, server: grpc.aio.Server, layer: CallLayer) -> None:
        self._server = server
        self._layer = layer

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_WrappedHandlers(handler, self._layer) for handler in handlers)
        )

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(
            service,
            {name: self._layer.wrap(f"/{service}/{name}", h) for name, h in handlers.items()},
        )


class _WrappedHandlers(grpc.GenericRpcHandler):
    """A generic handler whose answers pass through `CallLayer.wrap`.

    Only the methods the service has get a wrapped handler (kept by the layer); unknown
    names, which any caller can send, leave nothing behind.
    """

    def __init__(self, inner: grpc.GenericRpcHandler, layer: CallLayer) -> None:
        self._inner = inner
        self._layer = layer

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        handler = self._layer.wrapped(method)
        if handler is None:
            found = self._inner.service(handler_call_details)
            if found is None:
                return None
            handler = self._layer.wrap(method, found)
        return handler
