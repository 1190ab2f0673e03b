"""Optional bearer-token authentication, in front of every service.

clipserve's own services (clipserve.v1, the Triton protocol) check the token in their call
layer (`call_layer`), so that refusals reach the access log and the metrics; the others (health,
reflection) through `BearerAuthInterceptor`. The HTTP API uses `BearerTokens.authorized` too.
A call must carry the metadata ``authorization: Bearer <token>`` with one of the configured
tokens, or it is refused with UNAUTHENTICATED before its request is even parsed. Health checks
(and, if configured, reflection) may stay public so that probes need no secret.

Tokens come from a file (one per line, ``#`` comments) or from an environment variable named by
a setting, never from the command line. Only their SHA-256 digests are kept, and a presented
token is compared with every one of them using `hmac.compare_digest`, so neither the time taken
nor the error message says anything about how close a guess was. Tokens are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from clipserve.server.errors import Unauthenticated
from clipserve.server.grpc_errors import status_for
from clipserve.server.settings import ConfigError, ServerSettings

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
MISSING = "missing bearer token: send the metadata `authorization: Bearer <token>`"
INVALID = "invalid bearer token"
_SCHEME = "bearer "


def load_tokens(token_file: str, token_env: str, environ: Mapping[str, str]) -> list[str]:
    """Tokens from `token_file` and the variable named `token_env`; [] when neither is set."""
    tokens: list[str] = []
    if token_file:
        try:
            lines = Path(token_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"auth_token_file: cannot read it ({type(exc).__name__})") from None
        tokens += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if token_env:
        value = environ.get(token_env)
        if value is None:
            raise ConfigError(f"auth_token_env names {token_env}, which is not set")
        tokens += [part.strip() for part in value.split(",") if part.strip()]
    if (token_file or token_env) and not tokens:
        raise ConfigError("authentication is configured but no token was found")
    for token in tokens:
        if not token.isascii() or not token.isprintable() or " " in token:
            raise ConfigError("a bearer token must be printable ASCII without spaces")
    return tokens


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class BearerTokens:
    """The configured tokens, kept as SHA-256 digests; `authorized` checks a call's metadata."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens:
            raise ValueError("BearerTokens needs at least one token")
        self._digests = tuple(_digest(t) for t in tokens)

    def authorized(self, metadata: Iterable[Any] | None) -> str | None:
        """None when `metadata` carries a valid token, else the reason to give the caller."""
        values = [
            value for key, value in (tuple(m) for m in metadata or ()) if key == "authorization"
        ]
        if not values:
            return MISSING
        if len(values) > 1:
            return INVALID
        value = values[0]
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if value[: len(_SCHEME)].lower() != _SCHEME:
            return MISSING
        presented = _digest(value[len(_SCHEME) :].strip())
        matched = False
        for digest in self._digests:  # no early exit: every token costs the same time
            matched |= hmac.compare_digest(presented, digest)
        return None if matched else INVALID


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid bearer token, except to the `public` method prefixes and
    to the (method, handler) pairs `checked_elsewhere` accepts (those of
    `call_layer.CallLayer`, which checks the token itself, inside its access log)."""

    def __init__(
        self,
        tokens: BearerTokens,
        public: Iterable[str] = (HEALTH_PREFIX,),
        checked_elsewhere: Callable[[str, grpc.RpcMethodHandler], bool] = (
            lambda _method, _handler: False
        ),
    ) -> None:
        self._tokens = tokens
        self._public = tuple(public)
        self._checked_elsewhere = checked_elsewhere

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if method.startswith(self._public) or (
            handler is not None and self._checked_elsewhere(method, handler)
        ):
            return handler
        reason = self._tokens.authorized(handler_call_details.invocation_metadata)
        if reason is None:
            return handler
        log.debug("refused an unauthenticated call to %s: %s", method, reason)
        return _refusal(handler, reason)


def _refusal(handler: grpc.RpcMethodHandler | None, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED without parsing."""
    code, message = status_for(Unauthenticated(reason))

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    def ignore(_data: bytes) -> None:  # an unauthenticated request is never parsed
        return None

    streaming_in = handler is not None and handler.request_streaming
    streaming_out = handler is not None and handler.response_streaming
    if streaming_in and streaming_out:
        factory = grpc.stream_stream_rpc_method_handler
    elif streaming_in:
        factory = grpc.stream_unary_rpc_method_handler
    elif streaming_out:
        factory = grpc.unary_stream_rpc_method_handler
    else:
        factory = grpc.unary_unary_rpc_method_handler
    return factory(refuse, request_deserializer=ignore, response_serializer=None)


def tokens_for(settings: ServerSettings, environ: Mapping[str, str]) -> BearerTokens | None:
    """The settings' tokens, or None when they name none (authentication off)."""
    tokens = load_tokens(settings.auth_token_file, settings.auth_token_env, environ)
    if not tokens:
        return None
    log.info(
        "bearer-token authentication on (%d token(s)); public: %s",
        len(tokens), ", ".join(p.strip("/") for p in public_prefixes(settings)) or "nothing",
    )
    return BearerTokens(tokens)


def public_prefixes(settings: ServerSettings) -> tuple[str, ...]:
    """The method prefixes that need no token under `settings` (health, reflection)."""
    public: list[str] = []
    if settings.auth_public_health:
        public.append(HEALTH_PREFIX)
    if settings.auth_public_reflection:
        public += REFLECTION_PREFIXES
    return tuple(public)
