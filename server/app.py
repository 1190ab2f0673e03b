"""Composition root: the only module that knows every part of the server.

Lifecycle of `ClipServer`:
  start: load the repository (errors exit before the port opens) -> sessions, tokenizer,
         preprocessor, batchers -> bind the port with health NOT_SERVING (clipserve.v1 and the
         Triton protocol on it), the metrics port and, with `http_port`, the HTTP API (its
         /health/ready answers 503) -> warm up every batch shape -> SERVING.
  stop:  NOT_SERVING and refuse new requests with UNAVAILABLE (HTTP 503) -> in-flight requests
         of both transports finish -> `server.stop(grace)` and the HTTP API closes -> batchers
         and pools close -> metrics port closes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from clipserve.repository import Manifest, Preprocess, RepositoryError, load_manifest
from clipserve.server.access_log import AccessLog
from clipserve.server.arrivals import Arrivals
from clipserve.server.auth import BearerAuthInterceptor, BearerTokens, public_prefixes, tokens_for
from clipserve.server.batch_plan import BatchPlanner
from clipserve.server.batcher import BatcherConfig, DynamicBatcher
from clipserve.server.call_layer import CallLayer
from clipserve.server.engine import (
    EngineOptions,
    OnnxTower,
    lower_thread_priority,
    open_instances,
    pads_batches,
    usable_cores,
)
from clipserve.server.grpc_service import ClipServicer, model_info
from clipserve.server.label_cache import LabelCache
from clipserve.server.metrics import Metrics, MetricsServer
from clipserve.server.model import ClipModel, Limits
from clipserve.server.preprocess import ImagePreprocessor
from clipserve.server.settings import (
    ConfigError,
    ServerSettings,
    parse_buckets,
    parse_length_buckets,
)
from clipserve.server.supervisor import EXIT_SESSION_FAILURE, SessionSupervisor
from clipserve.server.tls import server_credentials, server_ssl_context
from clipserve.server.tokenizer import ClipTokenizer
from clipserve.server.towers import TextRunner, VisionRunner, timed_warm_up
from clipserve.server.triton.models import build_models
from clipserve.server.triton.servicer import TritonServicer
from clipserve.server.triton.statistics import TritonStatistics
from clipserve.server.urls import fetcher_for
from clipserve.triton import grpc_service_pb2 as triton_pb
from clipserve.triton import grpc_service_pb2_grpc as triton_pb_grpc
from clipserve.v1 import clip_service_pb2 as pb
from clipserve.v1 import clip_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from clipserve.server.http_api import HttpApi, HttpOptions

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ClipService"].full_name
TRITON_SERVICE_NAME = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
#: On stop, the port closes once no call was refused for this long (or the grace is over).
DRAIN_QUIET_S = 0.2
HEALTH_SERVICES = ("", SERVICE_NAME, TRITON_SERVICE_NAME)


def _check_tower_shapes(manifest: Manifest, vision: OnnxTower, text: OnnxTower) -> None:
    """The ONNX files must agree with the manifest; say which dimension does not."""
    size, dim = manifest.preprocess.size, manifest.embedding_dim
    expected = {
        "vision input": (vision.input_shape[1:], [3, size, size]),
        "vision output": (vision.output_shape[1:], [dim]),
        "text output": (text.output_shape[1:], [dim]),
    }
    for what, (actual, wanted) in expected.items():
        if len(actual) != len(wanted) or any(
            isinstance(a, int) and a != w for a, w in zip(actual, wanted, strict=True)
        ):
            raise RepositoryError(
                f"{what} shape {actual} disagrees with the manifest (expected {wanted}): "
                "the ONNX file and clipserve.json come from different exports"
            )


def engine_options(s: ServerSettings) -> EngineOptions:
    """The ONNX Runtime settings of both towers."""
    return EngineOptions(
        device=s.device,
        intra_op_threads=s.intra_op_threads,
        intra_op_spinning=s.intra_op_spinning,
        prepack_weights=s.prepack_weights,
        cpu_mem_arena=s.cpu_mem_arena,
        gpu_mem_limit_mb=s.gpu_mem_limit_mb,
        cudnn_conv_algo_search=s.cudnn_conv_algo_search.upper(),
        io_binding=s.io_binding,
        cuda_graphs=s.cuda_graphs,
        tensorrt=s.tensorrt,
        tensorrt_cache_dir=s.tensorrt_cache_dir,
        tensorrt_fp16=s.tensorrt_fp16,
    )


class ClipServer:
    """The running server; use `async with ClipServer(settings) as server:`."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.port = 0
        self.metrics_port = 0  # 0 until the metrics port is bound (or when metrics are off)
        self.http_port = 0  # 0 until the HTTP API is bound (or when it is off)
        self._http: HttpApi | None = None
        self._access: AccessLog | None = None
        self.model: ClipModel | None = None
        self.metrics: Metrics | None = None
        self._metrics_server: MetricsServer | None = None
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._stopping: asyncio.Task[None] | None = None
        self.drain_report: dict[str, int | bool] = {}
        self.supervisor: SessionSupervisor | None = None
        self.exit_code = 0  # EXIT_SESSION_FAILURE when the server gave up on a broken session
        self._security: tuple[BearerTokens | None, grpc.ServerCredentials | None]
        self._security = (None, None)  # (bearer tokens, TLS credentials), read at start

    # -- start -------------------------------------------------------------------------------
    async def start(self) -> int:
        """Load, bind, warm up, report SERVING; return the bound port."""
        s = self.settings
        started = time.monotonic()
        # tokens and TLS files first: a bad one fails at once, before the model loads
        self._security = (tokens_for(s, os.environ), server_credentials(s))
        http_class = _http_api_class() if s.http_port is not None else None
        root = Path(s.model_repository)
        manifest = load_manifest(root)
        preprocessor = _preprocessor(manifest.preprocess, s)  # a missing extra fails before loading
        options = engine_options(s)
        size, context = manifest.preprocess.size, manifest.tokenizer.context_length
        vision_towers = open_instances(
            "vision", root / manifest.vision.file, manifest.vision.input, manifest.vision.output,
            replace(options, tensorrt_profile=(
                (1, 3, size, size), (s.vision_max_batch_size, 3, size, size),
                (s.vision_max_batch_size, 3, size, size),
            )),
            s.vision_instances,
        )
        text_towers = open_instances(
            "text", root / manifest.text.file, manifest.text.input, manifest.text.output,
            replace(options, tensorrt_profile=(
                (1, 2), (s.text_max_batch_size, 16), (s.text_max_batch_size, context)
            )),
            s.text_instances,
        )
        vision, text = vision_towers[0], text_towers[0]
        _check_tower_shapes(manifest, vision, text)
        tokenizer = ClipTokenizer.from_repository(root, manifest.tokenizer)
        self._pool = ThreadPoolExecutor(
            max_workers=s.preprocess_workers or usable_cores(), thread_name_prefix="preprocess",
            initializer=lower_thread_priority, initargs=(s.preprocess_nice,),
        )

        vision_buckets = parse_buckets(s.batch_buckets, s.vision_max_batch_size)
        text_buckets = parse_buckets(s.batch_buckets, s.text_max_batch_size)
        length_buckets = parse_length_buckets(
            s.text_length_buckets, manifest.tokenizer.context_length
        )
        pad = pads_batches(s.batch_buckets, vision.provider)
        # planners time the batches only where they are used: trimming replaces padding
        trim = s.batch_trimming and pad
        if s.batch_trimming and not pad:
            log.info("--batch-trimming has nothing to do: batches on the CPU run unpadded "
                     "(--batch-buckets auto)")
        # the instances of a tower share its planner: they run the same shapes on one device
        vision_planner = BatchPlanner(vision_buckets) if trim else None
        text_planner = BatchPlanner(text_buckets) if trim else None
        vision_runners = [
            VisionRunner(tower, manifest.preprocess.size, vision_buckets, vision_planner, pad=pad)
            for tower in vision_towers
        ]
        text_runners = [
            TextRunner(
                tower, text_buckets, length_buckets, manifest.tokenizer.pad_token_id,
                manifest.tokenizer.eot_token_id, text_planner, pad=pad,
            )
            for tower in text_towers
        ]

        def policy(max_batch_size: int) -> BatcherConfig:
            return BatcherConfig(
                max_batch_size=max_batch_size,
                max_queue_delay_s=s.max_queue_delay_s,
                max_queue_size=s.max_queue_size,
                queue_timeout_s=s.queue_timeout_ms / 1000,
            )

        def arrivals() -> Arrivals | None:  # one per batcher: each tower's own traffic
            return Arrivals() if s.adaptive_queue_delay else None

        vision_batcher: DynamicBatcher = DynamicBatcher(
            "vision", vision_runners, policy(s.vision_max_batch_size),
            size_for=vision_planner.size_for if vision_planner else None,
            arrivals=arrivals(),
        )
        text_batcher: DynamicBatcher = DynamicBatcher(
            "text", text_runners, policy(s.text_max_batch_size),
            group_of=text_runners[0].group_of,
            size_for=text_planner.size_for if text_planner else None,
            arrivals=arrivals(),
        )
        self.model = ClipModel(
            manifest,
            vision=vision_batcher,
            text=text_batcher,
            preprocessor=preprocessor,
            tokenizer=tokenizer,
            pool=self._pool,
            label_cache=LabelCache(s.label_cache_size),
            limits=Limits(
                s.max_items_per_request, s.max_labels, s.max_templates, s.max_concurrent_requests
            ),
            fetcher=fetcher_for(s),
        )
        self.supervisor = SessionSupervisor(
            s.session_failure_threshold, s.max_session_rebuilds,
            set_serving=self._set_serving, give_up=self._give_up,
        )
        self.supervisor.watch("vision", vision_batcher, lambda i: vision_runners[i].rebuild())
        self.supervisor.watch("text", text_batcher, lambda i: text_runners[i].rebuild())
        info = model_info(  # unpadded, every size up to the maximum runs as it comes
            self.model, vision.provider,
            vision_buckets if pad else tuple(range(1, s.vision_max_batch_size + 1)),
            text_buckets if pad else tuple(range(1, s.text_max_batch_size + 1)),
            length_buckets,
        )
        triton_models = build_models(self.model)
        statistics = TritonStatistics(
            triton_models,
            {"vision": lambda: vision_batcher.queued, "text": lambda: text_batcher.queued},
        )
        self.metrics = Metrics(statistics)
        for batcher in (vision_batcher, text_batcher):
            batcher.add_observer(statistics.observe_batch)
            batcher.add_observer(self.metrics.observe_batch)
        triton = TritonServicer(self.model, triton_models, statistics, vision.provider)
        await self._bind(ClipServicer(self.model, info), triton, self.metrics)
        if s.metrics:
            self._metrics_server = MetricsServer(self.metrics.render)
            self.metrics_port = await self._metrics_server.start(s.host, s.metrics_port)
            log.info("metrics on port %d at /metrics", self.metrics_port)
        if http_class is not None and s.http_port is not None:
            self._http = http_class(
                self.model, info, self._http_options(), ready=self._serving,
                record=self._access.finish if self._access is not None else None,
            )
            self.http_port = await self._http.start(s.host, s.http_port)
            log.info("HTTP API (OpenAI-compatible) on port %d", self.http_port)
        log.info(
            "serving %s (%s) from %s on port %d; warming up",
            manifest.source.model_name, manifest.source.pretrained, root, self.port,
        )

        if s.warmup:
            loop = asyncio.get_running_loop()
            for name, runners in (("vision", vision_runners), ("text", text_runners)):
                for runner in runners:
                    await loop.run_in_executor(None, timed_warm_up, name, runner)
        await vision_batcher.start()
        await text_batcher.start()
        self.model.ready = True
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("SERVING on port %d (ready in %.1fs)", self.port, time.monotonic() - started)
        return self.port

    async def _bind(self, servicer: ClipServicer, triton: TritonServicer, metrics: Metrics) -> None:
        s = self.settings
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        if s.max_connection_age_s > 0:
            options += [
                ("grpc.max_connection_age_ms", int(s.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(s.drain_grace_s * 1000)),
            ]
        tokens, credentials = self._security
        self._access = AccessLog(observers=[metrics.observe_call], log_calls=s.access_log)
        layer = CallLayer(self._access, tokens)  # clipserve's services: wrapped at registration
        interceptors = None if tokens is None else [  # the other services' authentication
            BearerAuthInterceptor(tokens, public_prefixes(s), checked_elsewhere=layer.made)
        ]
        server = grpc.aio.server(interceptors=interceptors, options=options)
        pb_grpc.add_ClipServiceServicer_to_server(servicer, layer.registrar(server))
        triton_pb_grpc.add_GRPCInferenceServiceServicer_to_server(triton, layer.registrar(server))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if s.reflection:  # the Triton protocol's descriptors live in a private pool: not listed
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
        address = f"{s.host}:{s.port}"
        try:  # the pinned grpcio raises RuntimeError when it cannot bind
            if credentials is not None:
                port = server.add_secure_port(address, credentials)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(
                f"cannot bind the gRPC port {address} (in use, or not an address of this "
                f"host?): {exc}"
            ) from None
        await server.start()
        self._server, self.port = server, port

    def _http_options(self) -> HttpOptions:
        from clipserve.server.http_api import HttpOptions

        s = self.settings
        tokens = self._security[0]
        return HttpOptions(
            max_body_bytes=s.max_message_bytes,
            urls=s.allow_url_inputs,
            authorize=tokens.authorized if tokens is not None else None,
            public_health=s.auth_public_health,
            ssl_context=server_ssl_context(s),
        )

    def _serving(self) -> bool:
        """What grpc.health.v1 reports: SERVING only while the model admits requests."""
        return self.model is not None and self.model.ready and self._stopping is None

    async def _set_serving(self, serving: bool) -> None:
        """Health and admission on or off during session recovery (never once stop began)."""
        if self.model is None or self._stopping is not None:
            return
        self.model.ready = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else (
            health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in HEALTH_SERVICES:
            await self.health.set(name, status)

    def _give_up(self, reason: str) -> None:
        """The session cannot be trusted: drain and exit non-zero for a restart."""
        log.critical("%s; draining and exiting with status %d", reason, EXIT_SESSION_FAILURE)
        self.exit_code = EXIT_SESSION_FAILURE
        self.stop_soon()

    # -- stop --------------------------------------------------------------------------------
    def stop_soon(self, grace_s: float | None = None) -> asyncio.Task[None]:
        """Begin a graceful stop; idempotent and safe to call from a signal handler."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace_s))
        return self._stopping

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING -> refuse new work -> drain in-flight requests -> close (idempotent)."""
        await self.stop_soon(grace_s)

    async def _stop(self, grace_s: float | None) -> None:
        grace = self.settings.drain_grace_s if grace_s is None else grace_s
        end = time.monotonic() + grace
        await self.health.enter_graceful_shutdown()  # NOT_SERVING: balancers stop routing here
        if self.model is not None:
            # Refuse new requests with UNAVAILABLE (retryable) while the transport still
            # dispatches them, and let admitted ones finish; only then close the port, so no
            # call that reached this process is cut off as CANCELLED.
            self.model.ready = False
            self.drain_report["in_flight"] = self.model.in_flight
            log.info("draining: %d request(s) in flight, grace %.1fs", self.model.in_flight, grace)
            self.drain_report["drained"] = await self.model.drained(grace)
            # callers that keep coming get UNAVAILABLE until they go elsewhere (at most the grace)
            quiet = await self.model.refusals_ended(DRAIN_QUIET_S, max(0.0, end - time.monotonic()))
            self.drain_report["quiet"] = quiet
        closing = []
        if self._server is not None:
            closing.append(self._server.stop(max(0.0, end - time.monotonic())))
        if self._http is not None:
            closing.append(self._http.close(max(0.0, end - time.monotonic())))
        await asyncio.gather(*closing)
        if self.supervisor is not None:
            await self.supervisor.close()
        if self.model is not None:
            await self.model.vision.close()
            await self.model.text.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._metrics_server is not None:
            await self._metrics_server.close()
        log.info("stopped")

    async def wait(self) -> None:
        """Return once the server has stopped and drained."""
        if self._server is not None:
            await self._server.wait_for_termination()
        if self._stopping is not None:
            await self._stopping

    async def __aenter__(self) -> ClipServer:
        try:
            await self.start()
        except BaseException:
            await self.stop(0)
            raise
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()


def _preprocessor(cfg: Preprocess, s: ServerSettings) -> ImagePreprocessor:
    """The image preprocessor; `preprocess_simd` without the `simd` extra is a ConfigError."""
    try:
        return ImagePreprocessor(cfg, max_image_pixels=s.max_image_pixels, simd=s.preprocess_simd)
    except RuntimeError as exc:  # the simd extra's libraries did not import
        raise ConfigError(f"preprocess_simd: {exc}") from None


def _http_api_class() -> type[HttpApi]:
    """The HTTP API (imported only when `http_port` is set: aiohttp is the `http` extra)."""
    try:
        from clipserve.server.http_api import HttpApi
    except ImportError as exc:
        raise ConfigError(
            f"http_port needs the `http` extra (pip install 'clipserve[http]'): {exc}"
        ) from None
    return HttpApi


def set_switch_interval(microseconds: int) -> None:
    """Set the interpreter's thread switch interval (`switch_interval_us`; 0 leaves it)."""
    if microseconds > 0:
        sys.setswitchinterval(microseconds / 1e6)
        log.info("thread switch interval %d us", microseconds)


async def serve(settings: ServerSettings) -> int:
    """Run until SIGTERM/SIGINT, then drain gracefully; the process exit status."""
    set_switch_interval(settings.switch_interval_us)  # process-wide, so here, not per server
    server = ClipServer(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop_soon)
    async with server:
        await server.wait()
    return server.exit_code
