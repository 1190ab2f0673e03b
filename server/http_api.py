"""The OpenAI-compatible HTTP API: a thin aiohttp adapter over `ClipModel`, like `grpc_service`.

It runs on the gRPC server's event loop (an `aiohttp.web.AppRunner` with a site on a socket
bound like the metrics port's) and calls the same `ClipModel` methods inside `model.admit()`,
so HTTP and gRPC requests share the batchers, the concurrency limit, the bounded queues and the
drain: a request counts as in flight from the moment it is admitted, before its body is read.
JSON is converted at the edge (`http_wire`); errors map through the one table
(`grpc_errors.STATUSES`) into OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

Routes (docs/http.md): POST /v1/embeddings (OpenAI's), POST /v1/classify and POST /v1/rank (the
`clipserve.v1` messages in protobuf's JSON mapping), GET /v1/models and /v1/models/{id} (OpenAI's
list, plus the GetModelInfo fields), GET /health/live and GET /health/ready (200 only while the
server is SERVING, 503 during start-up, session recovery and drain).

aiohttp is imported here only: the composition root imports this module when ``http_port`` is
set, so the server runs without the `http` extra otherwise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from aiohttp import web

from clipserve.server import http_wire, wire
from clipserve.server import trace as trace_mod
from clipserve.server.access_log import CallRecord
from clipserve.server.errors import ClipServeError, Unauthenticated
from clipserve.server.grpc_errors import wire_status_for
from clipserve.server.metrics import listening_socket
from clipserve.server.model import ClipModel, ImageInput, RankInput
from clipserve.server.trace import RequestTrace
from clipserve.v1 import clip_service_pb2 as pb

log = logging.getLogger(__name__)

#: Bodies (and embedding responses) larger than this are parsed (encoded) on a worker thread,
#: so that a request of many images does not stall the event loop that serves everyone.
OFF_LOOP_BYTES = 256 << 10
OFF_LOOP_FLOATS = 1 << 16
#: Seconds clients are told to wait before retrying a 429 or 503 (``Retry-After``).
RETRY_AFTER_S = 1

Authorize = Callable[[Iterable[tuple[str, str]]], "str | None"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


@dataclass(frozen=True)
class HttpOptions:
    """What the HTTP API is allowed and told (from `ServerSettings`)."""

    max_body_bytes: int  # larger bodies get 413 (the gRPC max_message_bytes)
    urls: bool  # whether URL inputs are fetched (allow_url_inputs)
    authorize: Authorize | None = None  # BearerTokens.authorized when tokens are set
    public_health: bool = True  # /health/* answer without a token
    ssl_context: ssl.SSLContext | None = None  # the gRPC port's TLS, mTLS included


class HttpApi:
    """The HTTP API of one server; `start` binds it, `close` stops it after the drain."""

    def __init__(
        self,
        model: ClipModel,
        info: pb.GetModelInfoResponse,
        options: HttpOptions,
        *,
        ready: Callable[[], bool],
        record: Callable[[CallRecord], None] | None = None,
    ) -> None:
        self._model = model
        self._options = options
        self._ready = ready
        self._record = record
        self._served = http_wire.ServedModel.of(model.manifest)
        self._info = http_wire.message_json(info)
        self._created = int(time.time())
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, host: str, port: int) -> int:
        """Bind (port 0 picks a free port) and serve; return the bound port."""
        app = web.Application(
            middlewares=[self._edge], client_max_size=self._options.max_body_bytes
        )
        app.add_routes([
            web.post("/v1/embeddings", self._embeddings),
            web.post("/v1/classify", self._classify),
            web.post("/v1/rank", self._rank),
            web.get("/v1/models", self._models),
            web.get("/v1/models/{model:.+}", self._model_entry),
            web.get("/health/live", self._live),
            web.get("/health/ready", self._readiness),
        ])
        runner = web.AppRunner(
            app, handle_signals=False, access_log=None, handler_cancellation=True
        )
        await runner.setup()
        sock = listening_socket(host, port, "HTTP port")
        try:
            await web.SockSite(runner, sock, ssl_context=self._options.ssl_context).start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = sock.getsockname()[1]
        return self.port

    async def close(self, timeout_s: float) -> None:
        """Stop accepting, close idle connections, let running handlers finish within
        `timeout_s` and cancel those that do not, then close (idempotent).

        The composition root calls it after the drain, so admitted requests are done by then.
        """
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for site in runner.sites:
            await site.stop()
        if runner.server is not None:
            await asyncio.sleep(0)  # requests that arrived before the stop start being handled
            runner.server.pre_shutdown()
            await runner.server.shutdown(max(timeout_s, 0.05))  # aiohttp: 0 means no limit
        await runner.cleanup()

    # -- edge: authentication, errors, access log ------------------------------------------------
    @web.middleware
    async def _edge(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        probe = request.path.startswith("/health/")
        started = time.perf_counter()
        with trace_mod.bound(RequestTrace()) as trace:
            try:
                if not (probe and self._options.public_health):
                    self._authenticate(request)
                response = await handler(request)
                code = grpc.StatusCode.OK
            except asyncio.CancelledError:  # the client left (handler cancellation)
                if not probe:
                    self._finish(request, grpc.StatusCode.CANCELLED, 499, started, trace)
                raise
            except Exception as exc:
                response, code = self._error(exc, request)
        if not probe:
            self._finish(request, code, response.status, started, trace)
        return response

    def _authenticate(self, request: web.Request) -> None:
        if self._options.authorize is None:
            return
        headers = [("authorization", v) for v in request.headers.getall("Authorization", ())]
        reason = self._options.authorize(headers)
        if reason is not None:
            raise Unauthenticated(reason)

    def _error(
        self, exc: Exception, request: web.Request
    ) -> tuple[web.Response, grpc.StatusCode]:
        """The OpenAI-shaped error response for `exc` and the gRPC status of the same outcome."""
        if isinstance(exc, web.HTTPRequestEntityTooLarge):
            limit = self._options.max_body_bytes
            body = http_wire.error_body(
                f"the request body is larger than {limit} bytes (max_message_bytes)",
                "invalid_request_error", "request_too_large", None,
            )
            response = web.json_response(body, status=413)
            response.force_close()  # the rest of the body is not read
            return response, grpc.StatusCode.RESOURCE_EXHAUSTED
        if isinstance(exc, web.HTTPException):  # no route (404) or method (405)
            code = "not_found" if exc.status == 404 else "method_not_allowed"
            body = http_wire.error_body(
                f"{exc.reason}: {request.method} {request.path[:200]} (routes: docs/http.md)",
                "invalid_request_error", code, None,
            )
            grpc_code = grpc.StatusCode.NOT_FOUND if exc.status == 404 else (
                grpc.StatusCode.UNIMPLEMENTED
            )
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return web.json_response(body, status=exc.status, headers=allow), grpc_code
        status, message = wire_status_for(exc)
        if status.grpc is grpc.StatusCode.INTERNAL:
            if isinstance(exc, ClipServeError):
                log.error("HTTP request failed: %s", exc)
            else:
                log.error("HTTP request failed with an unexpected error", exc_info=exc)
        param = exc.item if isinstance(exc, ClipServeError) else None
        # machine-readable: the gRPC status of the same failure, e.g. "resource_exhausted"
        code = status.grpc.name.lower()
        if isinstance(exc, http_wire.ModelNotFound):
            code, param = exc.code, exc.param
        response = web.json_response(
            http_wire.error_body(message, status.http_type, code, param), status=status.http
        )
        if status.http in (429, 503):
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
        if status.http == 503:  # the client's next connection may reach a replica that serves
            response.force_close()
        if status.http == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response, status.grpc

    def _finish(
        self, request: web.Request, code: grpc.StatusCode, http_status: int, started: float,
        trace: RequestTrace,
    ) -> None:
        if self._record is None:
            return
        resource = request.match_info.route.resource
        path = resource.canonical if resource is not None else "(no route)"
        self._record(CallRecord(
            f"{request.method} {path}", code, time.perf_counter() - started, trace,
            request.remote or "", http_status,
        ))

    # -- endpoints ---------------------------------------------------------------------------
    async def _embeddings(self, request: web.Request) -> web.Response:
        served, dim, urls = self._served, self._model.manifest.embedding_dim, self._options.urls
        with self._model.admit():
            raw = await self._body(request)
            parsed = await _off_loop_if(
                len(raw) > OFF_LOOP_BYTES,
                lambda: http_wire.embeddings_request(
                    http_wire.parse_json(raw), served, dim, urls=urls
                ),
            )
            matrix, counts = await self._model.encode_mixed(parsed.items, None, "input")
        return await _json_response(
            lambda: http_wire.embeddings_response(matrix, counts, served.id, parsed.encoding),
            large=matrix.size > OFF_LOOP_FLOATS,
        )

    async def _classify(self, request: web.Request) -> web.Response:
        with self._model.admit():
            raw = await self._body(request)

            def parse() -> tuple[pb.ClassifyRequest, list[ImageInput]]:
                message = pb.ClassifyRequest()
                http_wire.parse_message(http_wire.parse_json(raw), message)
                return message, http_wire.image_inputs(message.images)

            message, images = await _off_loop_if(len(raw) > OFF_LOOP_BYTES, parse)
            labels = list(message.labels)
            results = await self._model.classify(
                images, labels, list(message.templates),
                message.top_k if message.HasField("top_k") else None, None,
            )
        response = pb.ClassifyResponse(
            classifications=[wire.label_scores(scored, labels) for scored in results]
        )
        return await _json_response(lambda: http_wire.message_json(response), large=False)

    async def _rank(self, request: web.Request) -> web.Response:
        with self._model.admit():
            raw = await self._body(request)

            def parse() -> tuple[pb.RankRequest, RankInput | None, list[RankInput]]:
                message = pb.RankRequest()
                http_wire.parse_message(http_wire.parse_json(raw), message)
                return message, *http_wire.rank_inputs(message)

            message, query, candidates = await _off_loop_if(len(raw) > OFF_LOOP_BYTES, parse)
            scored = await self._model.rank(
                query, candidates, message.top_k if message.HasField("top_k") else None, None
            )
        response = wire.ranked(scored)
        return await _json_response(lambda: http_wire.message_json(response), large=False)

    async def _body(self, request: web.Request) -> bytes:
        """The request body; 413 before reading it when its declared length is too large."""
        limit = self._options.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise web.HTTPRequestEntityTooLarge(
                max_size=limit, actual_size=request.content_length
            )
        return await request.read()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._entry()]})

    async def _model_entry(self, request: web.Request) -> web.Response:
        self._served.check(request.match_info["model"])
        return web.json_response(self._entry())

    def _entry(self) -> dict[str, Any]:
        """OpenAI's model object, plus the other names it answers to and GetModelInfo."""
        return {
            "id": self._served.id, "object": "model", "created": self._created,
            "owned_by": "clipserve", "aliases": list(self._served.aliases), "info": self._info,
        }

    async def _live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ALIVE"})

    async def _readiness(self, request: web.Request) -> web.Response:
        """200 while SERVING (as grpc.health.v1 says), else 503."""
        if self._ready():
            return web.json_response({"status": "SERVING"})
        return web.json_response({"status": "NOT_SERVING"}, status=503)


async def _off_loop_if(large: bool, work: Callable[[], T]) -> T:
    """`work()` on the loop's default executor when `large`, else inline (cheaper)."""
    if not large:
        return work()
    return await asyncio.get_running_loop().run_in_executor(None, work)


async def _json_response(payload: Callable[[], Any], *, large: bool) -> web.Response:
    def encode() -> bytes:
        return json.dumps(payload(), separators=(",", ":")).encode()

    body = await _off_loop_if(large, encode)
    return web.Response(body=body, content_type="application/json")
