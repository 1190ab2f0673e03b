"""Batch observers and request traces, Triton statistics, the metrics text and JSON logs.

No sockets: the batcher runs a recording function, statistics and metrics are fed events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Hashable

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clipserve.server import trace as trace_mod
from clipserve.server.access_log import CallRecord, JsonFormatter
from clipserve.server.batcher import BatcherConfig, BatchEvent, DynamicBatcher
from clipserve.server.metrics import TRITON_FAMILIES, Metrics, listening_socket
from clipserve.server.trace import RequestTrace
from clipserve.server.triton.models import Kind, TensorSpec, TritonModel
from clipserve.server.triton.statistics import TritonStatistics


def double(values: list[int], _group: Hashable) -> list[int]:
    return [2 * v for v in values]


async def test_observers_hear_each_batch_and_traces_get_their_items_times() -> None:
    events: list[BatchEvent] = []
    batcher = DynamicBatcher("vision", double, BatcherConfig(4, 0.05, 64))
    batcher.add_observer(events.append)
    batcher.add_observer(lambda _event: 1 / 0)  # a failing observer fails nothing
    async with batcher:
        submitted = time.monotonic()
        first, second = RequestTrace(model="clip_vision"), RequestTrace()
        with trace_mod.bound(first):
            a = batcher.submit([1, 2, 3])
        with trace_mod.bound(second):
            b = batcher.submit([4, 5])
        untraced = batcher.submit([6])
        assert await asyncio.gather(*a, *b, *untraced) == [2, 4, 6, 8, 10, 12]
        answered = time.monotonic()
    assert [e.size for e in events] == [4, 2]
    for event in events:  # handed to the engine after the items came, done before the answer
        assert submitted <= event.started
        assert event.started + event.compute_ns / 1e9 <= answered
    assert events[0].started + events[0].compute_ns / 1e9 <= events[1].started
    assert events[0].models == ("clip_vision",) * 3 + (None,)
    assert len(events[0].queue_ns) == 4
    assert (first.items, first.batches, second.items, second.batches) == (3, 1, 2, 2)
    assert second.compute_ns == events[0].compute_ns + events[1].compute_ns
    assert second.queue_ns == max(events[0].queue_ns[3], events[1].queue_ns[0])


def test_bound_reuses_the_current_trace_and_restores_the_previous_one() -> None:
    assert trace_mod.current() is None
    with trace_mod.bound() as outer:
        with trace_mod.bound() as inner:
            assert inner is outer
        assert trace_mod.current() is outer
    assert trace_mod.current() is None


def model(name: str, kind: Kind, tower: str) -> TritonModel:
    spec = TensorSpec("x", ("FP32",), (1,))
    return TritonModel(name, kind, tower, "p", "b", spec, spec, 8, BatcherConfig(8, 0.001, 64))


MODELS = {
    "clip_vision": model("clip_vision", Kind.PIXELS, "vision"),
    "clip_image_bytes": model("clip_image_bytes", Kind.IMAGE_BYTES, "vision"),
}


def statistics(queued: int = 0) -> TritonStatistics:
    return TritonStatistics(MODELS, {"vision": lambda: queued})


def test_a_tower_counts_every_item_and_a_front_model_its_own() -> None:
    stats = statistics()
    stats.observe_batch(BatchEvent("vision", 4, 1000, (1, 2, 3, 4),
                                   ("clip_image_bytes", "clip_image_bytes", None, "clip_vision")))
    stats.observe_batch(BatchEvent("vision", 1, 500, (1,), (None,)))
    stats.observe_batch(BatchEvent("text", 3, 500, (1, 1, 1), (None,) * 3))  # not a tower here
    tower, front = stats.tally("clip_vision"), stats.tally("clip_image_bytes")
    assert (tower.inference_count, tower.execution_count) == (5, 2)
    assert (front.inference_count, front.execution_count) == (2, 1)
    message = stats.message("clip_vision")
    batches = [(b.batch_size, b.compute_infer.count, b.compute_infer.ns)
               for b in message.batch_stats]
    assert batches == [(1, 1, 500), (4, 1, 1000)]
    assert message.last_inference > 0


def test_requests_record_success_with_their_times_and_failures_with_their_duration() -> None:
    stats = statistics()
    trace = RequestTrace(queue_ns=10, input_ns=20, compute_ns=30)
    stats.record("clip_vision", ok=True, duration_ns=100, trace=trace, output_ns=5)
    stats.record("clip_vision", ok=False, duration_ns=7, trace=RequestTrace(), output_ns=0)
    s = stats.message("clip_vision").inference_stats
    assert (s.success.count, s.success.ns, s.fail.count, s.fail.ns) == (1, 100, 1, 7)
    assert (s.queue.ns, s.compute_input.ns, s.compute_infer.ns, s.compute_output.ns) == (
        10, 20, 30, 5
    )


def test_pending_is_the_tower_queue_or_the_front_models_requests_in_flight() -> None:
    stats = statistics(queued=3)
    with stats.handling("clip_image_bytes"):
        assert stats.pending("clip_image_bytes") == 1
        assert stats.pending("clip_vision") == 3
    assert stats.pending("clip_image_bytes") == 0


def test_metrics_text_keeps_tritons_counter_names_and_parses() -> None:
    stats = statistics(queued=2)
    stats.observe_batch(BatchEvent("vision", 4, 2_000_000, (1_000,) * 4, (None,) * 4))
    stats.record("clip_vision", ok=True, duration_ns=5_000_000,
                 trace=RequestTrace(queue_ns=1_000_000), output_ns=0)
    metrics = Metrics(stats)
    metrics.observe_batch(BatchEvent("vision", 4, 2_000_000, (1_000,) * 4, (None,) * 4))
    method = "/inference.GRPCInferenceService/ModelInfer"
    metrics.observe_call(CallRecord(method, grpc.StatusCode.OK, 0.01, RequestTrace(), "peer"))
    metrics.observe_call(
        CallRecord(method, grpc.StatusCode.INVALID_ARGUMENT, 0.001, RequestTrace(), "peer")
    )
    text = metrics.render().decode()
    assert "# TYPE nv_inference_count counter\n" in text
    assert 'nv_inference_count{model="clip_vision",version="1"} 4.0\n' in text
    assert "nv_inference_count_total" not in text
    samples = {  # the parser names counter samples *_total; key them by family name
        (s.name.removesuffix("_total"), tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    vision = (("model", "clip_vision"), ("version", "1"))
    assert samples[("nv_inference_exec_count", vision)] == 1
    assert samples[("nv_inference_request_duration_us", vision)] == 5000
    assert samples[("nv_inference_queue_duration_us", vision)] == 1000
    assert samples[("nv_inference_pending_request_count", vision)] == 2
    assert samples[("clipserve_requests", (("code", "INVALID_ARGUMENT"), ("method", method)))] == 1
    assert samples[("clipserve_batch_size_sum", (("tower", "vision"),))] == 4
    for family in TRITON_FAMILIES:
        assert (family, vision) in samples


def test_two_servers_have_separate_registries() -> None:
    a, b = Metrics(), Metrics()
    a.observe_batch(BatchEvent("text", 2, 1, (1, 1), (None, None)))
    assert a.registry.get_sample_value("clipserve_batch_size_count", {"tower": "text"}) == 1
    assert b.registry.get_sample_value("clipserve_batch_size_count", {"tower": "text"}) is None


def test_json_lines_carry_the_access_fields_as_keys() -> None:
    trace = RequestTrace(model="clip_text", items=3, queue_ns=2_500_000)
    record = CallRecord("/inference.GRPCInferenceService/ModelInfer", grpc.StatusCode.OK, 0.0125,
                        trace, "ipv4:127.0.0.1:5000")
    log_record = logging.LogRecord("clipserve.server.access_log", logging.INFO, __file__, 1,
                                   "%s done", ("call",), None)
    log_record.rpc = record.fields()
    line = json.loads(JsonFormatter().format(log_record))
    assert line["message"] == "call done"
    assert line["level"] == "INFO"
    assert (line["method"], line["status"], line["items"], line["model"]) == (
        "/inference.GRPCInferenceService/ModelInfer", "OK", 3, "clip_text"
    )
    assert (line["latency_ms"], line["queue_ms"]) == (12.5, 2.5)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_the_default_host_listens_on_ipv4_and_ipv6_and_a_busy_port_is_named() -> None:
    """"[::]" (the default --host) gives one socket that IPv4 clients reach too (and IPv6 ones
    where the machine has IPv6); a port in use fails naming what and where."""
    sock = listening_socket("[::]", 0, "metrics port")
    try:
        port = sock.getsockname()[1]
        families = [(socket.AF_INET, "127.0.0.1")]
        if sock.family == socket.AF_INET6 and _has_ipv6_loopback():
            families.append((socket.AF_INET6, "::1"))
        sock.setblocking(True)
        for family, address in families:
            with socket.socket(family, socket.SOCK_STREAM) as client:
                client.settimeout(5)
                client.connect((address, port))
                accepted, _ = sock.accept()
                accepted.close()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = taken.getsockname()[1]
            with pytest.raises(OSError, match=rf"cannot bind the HTTP port 127\.0\.0\.1:{busy}: "):
                listening_socket("127.0.0.1", busy, "HTTP port").close()
    finally:
        sock.close()
