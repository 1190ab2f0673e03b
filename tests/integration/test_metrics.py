"""/metrics of a real server: Triton's nv_* counts match the requests sent and ModelStatistics.

Each test module here starts its own server (metrics on a port it picks itself, read back from
the server), so the counts are exact.
"""

from __future__ import annotations

import json
import logging
import math
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clipserve.server.access_log import JsonFormatter
from clipserve.v1 import clip_service_pb2 as pb
from clipserve.v1 import clip_service_pb2_grpc as pb_grpc
from tests.integration.harness import running_server

tc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

INFER = "/inference.GRPCInferenceService/ModelInfer"
ENCODE_IMAGE = "/clipserve.v1.ClipService/EncodeImage"
VISION = {"model": "clip_vision", "version": "1"}


@pytest.fixture(scope="module")
def server(tiny_repository):
    with running_server(tiny_repository) as thread:
        yield thread


def scrape(server) -> dict[tuple[str, tuple], float]:
    """Samples by (name, sorted labels); counters keyed by their family name (no _total)."""
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (s.name.removesuffix("_total"), tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def send_pixels(address: str, items: int) -> None:
    client = tc.InferenceServerClient(address)
    try:
        pixels = np.random.default_rng(items).random((items, 3, 224, 224), np.float32)
        tensor = tc.InferInput("pixel_values", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels)
        client.infer("clip_vision", [tensor])
    finally:
        client.close()


def test_nv_counts_match_the_requests_sent_and_model_statistics(server) -> None:
    requests, items = 6, 3
    with ThreadPoolExecutor(requests) as pool:  # concurrent: they share batches
        list(pool.map(send_pixels, [server.address] * requests, [items] * requests))
    client = tc.InferenceServerClient(server.address)
    bad = tc.InferInput("pixel_values", [1, 3, 2, 2], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 2, 2), np.float32))
    for _ in range(2):
        with pytest.raises(InferenceServerException):
            client.infer("clip_vision", [bad])

    samples = scrape(server)
    count = value(samples, "nv_inference_count", **VISION)
    executions = value(samples, "nv_inference_exec_count", **VISION)
    assert count == requests * items
    assert math.ceil(count / server.settings.vision_max_batch_size) <= executions <= count
    assert value(samples, "nv_inference_request_success", **VISION) == requests
    assert value(samples, "nv_inference_request_failure", **VISION) == 2
    # average batch size = count / exec_count, as clipserve's batch-size histogram says
    batches = value(samples, "clipserve_batch_size_count", tower="vision")
    assert batches == executions
    items_in_batches = value(samples, "clipserve_batch_size_sum", tower="vision")
    assert items_in_batches / batches == count / executions
    assert value(samples, "clipserve_requests", method=INFER, code="OK") == requests
    assert value(samples, "clipserve_requests", method=INFER, code="INVALID_ARGUMENT") == 2
    assert value(samples, "clipserve_request_duration_seconds_count", method=INFER) == requests + 2
    assert value(samples, "clipserve_preprocess_duration_seconds_count", method=INFER) >= requests
    assert value(samples, "clipserve_queue_duration_seconds_count", tower="vision") == count
    assert value(samples, "nv_inference_pending_request_count", **VISION) == 0

    stats = client.get_inference_statistics("clip_vision").model_stats[0]
    client.close()
    i = stats.inference_stats
    assert (stats.inference_count, stats.execution_count) == (count, executions)
    assert (i.success.count, i.fail.count) == (requests, 2)
    for name, duration in [
        ("nv_inference_request_duration_us", i.success),
        ("nv_inference_queue_duration_us", i.queue),
        ("nv_inference_compute_input_duration_us", i.compute_input),
        ("nv_inference_compute_infer_duration_us", i.compute_infer),
        ("nv_inference_compute_output_duration_us", i.compute_output),
    ]:
        assert value(samples, name, **VISION) == duration.ns // 1000, name
    assert value(samples, "nv_inference_compute_infer_duration_us", **VISION) > 0


def test_clipservice_traffic_counts_on_the_tower_and_by_status_code(server) -> None:
    before = scrape(server)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClipServiceStub(channel)
        tensor = pb.Tensor(shape=[3, 224, 224], dtype=pb.DATA_TYPE_FLOAT32,
                           data=np.zeros((3, 224, 224), np.float32).tobytes())
        stub.EncodeImage(pb.EncodeImageRequest(images=[pb.Image(tensor=tensor)] * 2), timeout=30)
        with pytest.raises(grpc.RpcError) as raised:
            stub.EncodeImage(pb.EncodeImageRequest(images=[pb.Image(data=b"nope")]), timeout=30)
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("nv_inference_count", **VISION) == 2
    assert delta("nv_inference_request_success", **VISION) == 0  # not a Triton request
    assert delta("clipserve_requests", method=ENCODE_IMAGE, code="OK") == 1
    assert delta("clipserve_requests", method=ENCODE_IMAGE, code="INVALID_ARGUMENT") == 1


def test_only_metrics_is_served(server) -> None:
    url = f"http://127.0.0.1:{server.server.metrics_port}/"
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(url, timeout=10)
    assert raised.value.code == 404


def test_each_rpc_writes_one_access_line_with_its_fields(server, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="clipserve.server.access_log"):
        send_pixels(server.address, 2)
    lines = [r for r in caplog.records if getattr(r, "rpc", {}).get("method") == INFER]
    assert len(lines) == 1
    record = lines[0]
    assert record.rpc["status"] == "OK"
    assert record.rpc["model"] == "clip_vision"
    assert record.rpc["items"] == 2
    assert record.rpc["latency_ms"] >= record.rpc["queue_ms"] >= 0
    assert "ModelInfer OK items=2" in record.getMessage()
    line = json.loads(JsonFormatter().format(record))
    assert (line["method"], line["status"], line["items"]) == (INFER, "OK", 2)


def test_metrics_and_access_lines_can_be_turned_off(tiny_repository, caplog) -> None:
    with running_server(tiny_repository, metrics=False, access_log=False, warmup=False) as thread:
        assert thread.server.metrics_port == 0
        with caplog.at_level(logging.INFO, logger="clipserve.server.access_log"):
            send_pixels(thread.address, 1)
        assert not [r for r in caplog.records if hasattr(r, "rpc")]
        registry = thread.server.metrics.registry  # still counted, just not served
        assert registry.get_sample_value(
            "clipserve_requests_total", {"method": INFER, "code": "OK"}
        ) == 1
