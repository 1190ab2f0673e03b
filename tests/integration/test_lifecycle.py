"""Start-up, overload and graceful shutdown of real servers (each test starts its own)."""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from PIL import Image
from skimage import data as skdata

from clipserve.v1 import clip_service_pb2 as pb
from clipserve.v1 import clip_service_pb2_grpc as pb_grpc
from tests.integration.harness import (
    HeldImages,
    health_status,
    running_server,
    start_subprocess,
    wait_until,
)

TEXTS = [f"a photo of thing number {i}" for i in range(8)]


def encode_texts(address: str, texts: list[str], timeout: float = 60) -> pb.EncodeTextResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.ClipServiceStub(channel).EncodeText(
            pb.EncodeTextRequest(texts=texts), timeout=timeout
        )


@pytest.mark.parametrize("instances", [1, 2])
def test_shutdown_finishes_requests_in_flight_and_refuses_new_ones(
    tiny_repository, instances: int
) -> None:
    with running_server(
        tiny_repository, text_max_batch_size=2, max_queue_delay_us=0, text_instances=instances
    ) as server:
        channel = grpc.insecure_channel(server.address)
        stub = pb_grpc.ClipServiceStub(channel)
        calls = [stub.EncodeText.future(pb.EncodeTextRequest(texts=TEXTS), timeout=60)
                 for _ in range(12)]
        deadline = time.monotonic() + 10
        while server.server.model.text.queued == 0 and time.monotonic() < deadline:
            time.sleep(0.005)  # wait until work is really queued before stopping
        server.loop.call_soon_threadsafe(server.server.stop_soon)
        codes = []
        for call in calls:
            try:
                assert len(call.result().embeddings) == len(TEXTS)
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
        # every admitted request completed; the others were refused retryably, none cut off
        assert server.server.drain_report["in_flight"] >= 1
        assert codes.count("OK") >= server.server.drain_report["in_flight"]
        assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
        # the stop task writes the report a few loop turns after the last answer left: wait for it
        server.call(server.server.stop())
        assert server.server.drain_report["drained"] is True
        with pytest.raises(grpc.RpcError) as info:
            stub.EncodeText(pb.EncodeTextRequest(texts=["late"]), timeout=10)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        channel.close()


def test_overload_is_refused_at_once_with_resource_exhausted(tiny_repository) -> None:
    with running_server(
        tiny_repository, max_queue_size=16, max_items_per_request=16, text_max_batch_size=1,
        max_queue_delay_us=0,
    ) as server:
        with ThreadPoolExecutor(24) as pool:
            outcomes = list(pool.map(lambda _: _try_encode(server.address), range(48)))
        codes = {code for code in outcomes}
        assert "OK" in codes
        assert "RESOURCE_EXHAUSTED" in codes
        assert codes <= {"OK", "RESOURCE_EXHAUSTED"}  # nothing lost, nothing else
        assert health_status(server.address) == "SERVING"


def _try_encode(address: str) -> str:
    try:
        encode_texts(address, [f"text {i}" for i in range(12)])
        return "OK"
    except grpc.RpcError as exc:
        refused = exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        if refused and "queue is full" not in exc.details() and "in flight" not in exc.details():
            return f"unexpected message: {exc.details()}"
        return exc.code().name


def test_sigterm_drains_and_exits_cleanly(tiny_repository) -> None:
    """SIGTERM with a call held in flight (its image is a URL that answers when the test says):
    the server drains, that call is answered OK after the signal, and the process exits 0."""
    held = HeldImages(_jpeg())
    server = start_subprocess(
        tiny_repository, "--drain-grace-s", "20", "--allow-url-inputs",
        "--url-allowlist", "127.0.0.1", "--url-allow-private", "--url-timeout-s", "60",
    )
    try:
        with ThreadPoolExecutor(9) as pool:
            in_flight = pool.submit(_try_encode_url, server.address, held.url("held"))
            held.wait_for(1)  # the server is fetching it: admitted, not answered
            calls = [pool.submit(_try_encode_texts, server.address) for _ in range(8)]
            time.sleep(0.2)
            server.terminate()
            wait_until(lambda: re.search(r"draining: \d+ request", "".join(server.log)),
                       what="the drain's log line")
            held.release()
            assert in_flight.result(timeout=60) == "OK"
            codes = [c.result() for c in calls]
        assert server.process.wait(30) == 0
    finally:
        held.close()
        if server.process.poll() is None:
            server.process.kill()
    log = "".join(server.log)
    draining = int(re.search(r"draining: (\d+) request", log).group(1))
    assert draining >= 1  # the held call at least
    # calls admitted before the signal were answered; the rest were refused retryably
    assert codes.count("OK") >= draining - 1
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert "stopped" in log


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(skdata.chelsea()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _try_encode_url(address: str, url: str) -> str:
    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.ClipServiceStub(channel).EncodeImage(
            pb.EncodeImageRequest(images=[pb.Image(url=url)]), timeout=60
        )
    return "OK" if len(response.embeddings) == 1 else f"{len(response.embeddings)} embeddings"


def _try_encode_texts(address: str) -> str:
    try:
        assert len(encode_texts(address, TEXTS).embeddings) == len(TEXTS)
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def _serve_exit(repository: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """`clipserve serve` on port 0 until it exits; later `flags` win (argparse keeps the last)."""
    return subprocess.run(
        [sys.executable, "-m", "clipserve", "serve", "--model-repository", str(repository),
         "--host", "127.0.0.1", "--port", "0", *flags],
        capture_output=True, text=True, timeout=120,
    )


def _copy(tiny_repository: Path, tmp_path: Path) -> Path:
    target = tmp_path / "repo"
    shutil.copytree(tiny_repository, target)
    return target


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_a_port_in_use_exits_4_naming_it(tiny_repository, flag: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        result = _serve_exit(tiny_repository, "--metrics-port", "0", flag, busy)
    assert result.returncode == 4, result.stderr
    assert busy in result.stderr.splitlines()[-1]
    assert result.stderr.splitlines()[-1].startswith("error: ")
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(
    "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
    reason="this onnxruntime has a CUDA provider: --device cuda starts here",
)
def test_device_cuda_without_a_cuda_provider_exits_3_saying_what_to_install(
    tiny_repository,
) -> None:
    result = _serve_exit(tiny_repository, "--metrics-port", "0", "--device", "cuda")
    assert result.returncode == 3, result.stderr
    assert ("error: --device cuda was asked for but this onnxruntime has no "
            "CUDAExecutionProvider") in result.stderr
    assert "install the `gpu` extra (onnxruntime-gpu)" in result.stderr
    assert "on port" not in result.stderr


def test_a_missing_repository_exits_non_zero_before_the_port_opens(tmp_path) -> None:
    result = _serve_exit(tmp_path / "nowhere")
    assert result.returncode != 0
    assert "does not exist" in result.stderr
    assert "on port" not in result.stderr


def test_a_missing_model_file_is_named(tiny_repository, tmp_path) -> None:
    repo = _copy(tiny_repository, tmp_path)
    (repo / "clip_text" / "1" / "model.onnx").unlink()
    result = _serve_exit(repo)
    assert result.returncode != 0
    assert "lacks clip_text/1/model.onnx" in result.stderr


def test_a_corrupt_onnx_file_is_refused(tiny_repository, tmp_path) -> None:
    repo = _copy(tiny_repository, tmp_path)
    (repo / "clip_vision" / "1" / "model.onnx").write_bytes(b"this is not onnx")
    result = _serve_exit(repo)
    assert result.returncode != 0
    assert "cannot load vision model" in result.stderr
    assert "on port" not in result.stderr


def test_a_manifest_of_another_version_is_refused(tiny_repository, tmp_path) -> None:
    repo = _copy(tiny_repository, tmp_path)
    manifest = json.loads((repo / "clipserve.json").read_text())
    manifest["format_version"] = 99
    (repo / "clipserve.json").write_text(json.dumps(manifest))
    result = _serve_exit(repo)
    assert result.returncode != 0
    assert "format_version is 99" in result.stderr


def test_tensor_names_that_disagree_with_the_manifest_exit_3_naming_both(
    tiny_repository, tmp_path
) -> None:
    repo = _copy(tiny_repository, tmp_path)
    manifest = json.loads((repo / "clipserve.json").read_text())
    manifest["vision"]["input"] = "pixels"
    (repo / "clipserve.json").write_text(json.dumps(manifest))
    result = _serve_exit(repo)
    assert result.returncode == 3, result.stderr
    assert ("error: vision model has inputs ['pixel_values'] and outputs ['image_embeds']; the "
            "manifest expects 'pixels' -> 'image_embeds'") in result.stderr
    assert "on port" not in result.stderr


def test_shapes_that_disagree_with_the_manifest_are_refused(tiny_repository, tmp_path) -> None:
    repo = _copy(tiny_repository, tmp_path)
    manifest = json.loads((repo / "clipserve.json").read_text())
    manifest["embedding_dim"] += 1
    (repo / "clipserve.json").write_text(json.dumps(manifest))
    result = _serve_exit(repo)
    assert result.returncode != 0
    assert "disagrees with the manifest" in result.stderr


def test_a_corrupt_tokenizer_is_refused(tiny_repository, tmp_path) -> None:
    repo = _copy(tiny_repository, tmp_path)
    (repo / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    result = _serve_exit(repo)
    assert result.returncode == 3
    assert "cannot load tokenizer tokenizer.json" in result.stderr
    assert "on port" not in result.stderr


def test_a_manifest_that_is_not_json_is_refused(tiny_repository, tmp_path) -> None:
    repo = _copy(tiny_repository, tmp_path)
    (repo / "clipserve.json").write_text("{ not json")
    result = _serve_exit(repo)
    assert result.returncode == 3
    assert "clipserve.json: Expecting property name" in result.stderr


def lone_latencies(repository: Path, adaptive: bool, requests: int = 20) -> list[float]:
    """Seconds per EncodeText of one client calling in a loop, queue delay 100 ms."""
    with running_server(repository, max_queue_delay_us=100_000,
                        adaptive_queue_delay=adaptive) as server:
        latencies = []
        for _ in range(requests):
            started = time.monotonic()
            encode_texts(server.address, ["a photo of a cat"])
            latencies.append(time.monotonic() - started)
    return latencies


def test_a_lone_client_stops_paying_the_queue_delay_only_with_the_adaptive_delay(
    tiny_repository,
) -> None:
    fixed = lone_latencies(tiny_repository, adaptive=False)
    assert min(fixed) >= 0.099  # every request waited for company that never came
    adaptive = lone_latencies(tiny_repository, adaptive=True)
    assert min(adaptive[:5]) >= 0.099  # it expects company at first, as a fixed delay does
    assert max(adaptive[-4:]) < 0.05  # then sees requests arrive alone and stops waiting
