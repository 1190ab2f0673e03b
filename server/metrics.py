"""Prometheus metrics of one server: Triton's nv_* families and clipserve's own.

Each server has its own `CollectorRegistry` (no global state: tests run several servers in one
process). Everything is pushed, never polled: the batchers call `observe_batch` after each batch
(`DynamicBatcher.add_observer`), the access-log interceptor calls `observe_call` after each RPC,
and the nv_* families are read from `TritonStatistics` when scraped, so /metrics and the
ModelStatistics RPC always agree.

Triton's families, labelled ``model`` and ``version`` (see docs/triton.md for what each model
counts): nv_inference_request_success, nv_inference_request_failure, nv_inference_count,
nv_inference_exec_count, nv_inference_pending_request_count, nv_inference_request_duration_us,
nv_inference_queue_duration_us, nv_inference_compute_input_duration_us,
nv_inference_compute_infer_duration_us, nv_inference_compute_output_duration_us. They are
counters written under Triton's names, without the ``_total`` suffix prometheus_client adds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from clipserve.server.access_log import CallRecord
from clipserve.server.batcher import BatchEvent
from clipserve.server.triton.models import VERSION
from clipserve.server.triton.statistics import ModelTally, TritonStatistics

log = logging.getLogger(__name__)

#: (method, code) pairs whose labelled children `Metrics.observe_call` keeps at hand.
MAX_CACHED_CHILDREN = 256
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

#: name -> (type, help, value of a model's tally)
TRITON_FAMILIES: dict[str, tuple[str, str, Callable[[ModelTally], float]]] = {
    "nv_inference_request_success": (
        "counter", "Number of successful inference requests, all batch sizes",
        lambda t: t.success.count,
    ),
    "nv_inference_request_failure": (
        "counter", "Number of failed inference requests, all batch sizes",
        lambda t: t.fail.count,
    ),
    "nv_inference_count": (
        "counter", "Number of inferences performed (a batch of N counts N)",
        lambda t: t.inference_count,
    ),
    "nv_inference_exec_count": (
        "counter", "Number of model executions performed (a batch of N counts 1)",
        lambda t: t.execution_count,
    ),
    "nv_inference_request_duration_us": (
        "counter", "Cumulative inference request duration in microseconds",
        lambda t: t.success.ns // 1000,
    ),
    "nv_inference_queue_duration_us": (
        "counter", "Cumulative inference queuing duration in microseconds",
        lambda t: t.queue.ns // 1000,
    ),
    "nv_inference_compute_input_duration_us": (
        "counter", "Cumulative compute input duration in microseconds",
        lambda t: t.compute_input.ns // 1000,
    ),
    "nv_inference_compute_infer_duration_us": (
        "counter", "Cumulative compute inference duration in microseconds",
        lambda t: t.compute_infer.ns // 1000,
    ),
    "nv_inference_compute_output_duration_us": (
        "counter", "Cumulative inference compute output duration in microseconds",
        lambda t: t.compute_output.ns // 1000,
    ),
}
PENDING = "nv_inference_pending_request_count"


class TritonCollector:
    """The nv_* families, read from `TritonStatistics` at scrape time."""

    def __init__(self, statistics: TritonStatistics) -> None:
        self._stats = statistics

    def collect(self) -> Iterable[Metric]:
        names = list(self._stats.models)
        for family, (kind, help_text, value) in TRITON_FAMILIES.items():
            metric = Metric(family, help_text, kind)
            for name in names:
                labels = {"model": name, "version": VERSION}
                metric.add_sample(family, labels, value(self._stats.tally(name)))
            yield metric
        pending = Metric(
            PENDING, "Instantaneous number of pending requests awaiting execution per-model",
            "gauge",
        )
        for name in names:
            pending.add_sample(PENDING, {"model": name, "version": VERSION},
                               self._stats.pending(name))
        yield pending


class Metrics:
    """The registry of one server and the callbacks that feed it."""

    def __init__(self, statistics: TritonStatistics | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._call_children: dict[tuple[str, grpc.StatusCode], tuple[Any, Any, Any]] = {}
        self.requests = Counter(
            "clipserve_requests", "RPCs by method and status code", ["method", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "clipserve_request_duration_seconds", "End-to-end latency of an RPC in the server",
            ["method"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.preprocess_seconds = Histogram(
            "clipserve_preprocess_duration_seconds",
            "Decoding, preprocessing and tokenisation time of an RPC (RPCs that had any)",
            ["method"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "clipserve_batch_size", "Items per executed batch", ["tower"],
            buckets=BATCH_SIZE_BUCKETS, registry=r,
        )
        self.batch_seconds = Histogram(
            "clipserve_batch_compute_duration_seconds", "Engine time of one batch", ["tower"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_seconds = Histogram(
            "clipserve_queue_duration_seconds",
            "Time an item waited in its tower's queue before its batch ran", ["tower"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        if statistics is not None:
            r.register(TritonCollector(statistics))  # type: ignore[arg-type]

    def observe_batch(self, event: BatchEvent) -> None:
        """Batcher observer."""
        self.batch_size.labels(event.batcher).observe(event.size)
        self.batch_seconds.labels(event.batcher).observe(event.compute_ns / 1e9)
        queue = self.queue_seconds.labels(event.batcher)
        for waited in event.queue_ns:
            queue.observe(waited / 1e9)

    def observe_call(self, record: CallRecord) -> None:
        """Access-log observer."""
        key = (record.method, record.code)
        children = self._call_children.get(key)
        if children is None:  # `labels` costs more than the update itself: look it up once
            children = (
                self.requests.labels(record.method, record.code.name),
                self.request_seconds.labels(record.method),
                self.preprocess_seconds.labels(record.method),
            )
            if len(self._call_children) < MAX_CACHED_CHILDREN:
                self._call_children[key] = children
        requests, seconds, preprocess = children
        requests.inc()
        seconds.observe(record.latency_s)
        if record.trace.input_ns:
            preprocess.observe(record.trace.input_ns / 1e9)

    def render(self) -> bytes:
        """The Prometheus text format; Triton's counters keep their names (no ``_total``)."""
        parts = []
        for family in self.registry.collect():
            if family.name.startswith("nv_") and family.type == "counter":
                parts.append(_counter_text(family))
            else:
                parts.append(generate_latest(_One(family)))  # type: ignore[arg-type]
        return b"".join(parts)


class _One:
    """A collector of one already collected family, for `generate_latest`."""

    def __init__(self, family: Metric) -> None:
        self._family = family

    def collect(self) -> list[Metric]:
        return [self._family]


def _counter_text(family: Metric) -> bytes:
    lines = [f"# HELP {family.name} {family.documentation}", f"# TYPE {family.name} counter"]
    for sample in family.samples:
        labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(sample.labels.items()))
        lines.append(f"{sample.name}{{{labels}}} {floatToGoString(sample.value)}")
    return ("\n".join(lines) + "\n").encode()


def listening_socket(host: str, port: int, what: str = "port") -> socket.socket:
    """One bound socket, like the gRPC port's: "[::]" (or "") listens on IPv6 and IPv4 when the
    machine has IPv6, on IPv4 otherwise (asyncio alone would bind "::" IPv6-only, and give port
    0 one port per address family). A failure names `what` and the address."""
    given = f"{host}:{port}"
    host = host.strip("[]")
    sock: socket.socket | None = None
    try:
        if host in ("", "::"):
            try:
                sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                address: tuple[str, int] = ("::", port)
            except OSError:  # no IPv6 here
                if sock is not None:
                    sock.close()
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                address = ("0.0.0.0", port)
        else:
            family, kind, proto, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
        sock.setblocking(False)
    except OSError as exc:
        if sock is not None:
            sock.close()
        error = OSError(f"cannot bind the {what} {given}: {exc.strerror or exc}")
        error.errno = exc.errno
        raise error from None
    return sock


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class MetricsServer:
    """A minimal HTTP/1.1 server on the event loop answering ``GET /metrics``."""

    def __init__(self, render: Callable[[], bytes]) -> None:
        self._render = render
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Bind (port 0 picks a free port); return the bound port."""
        sock = listening_socket(host, port, "metrics port")
        self._server = await asyncio.start_server(self._handle, sock=sock)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)).strip():
                pass  # headers: nothing here depends on them
            parts = request_line.decode("latin-1").split()
            method, path = (parts[0], parts[1].split("?")[0]) if len(parts) >= 2 else ("", "")
            if path != "/metrics":
                status, body, kind = "404 Not Found", b"not found; try /metrics\n", "text/plain"
            elif method not in ("GET", "HEAD"):
                status, body, kind = "405 Method Not Allowed", b"use GET\n", "text/plain"
            else:
                status, body, kind = "200 OK", self._render(), CONTENT_TYPE_LATEST
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (asyncio.TimeoutError, TimeoutError, ConnectionError, ValueError) as exc:
            log.debug("metrics request dropped: %r", exc)
        except Exception:
            log.exception("metrics request failed")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
