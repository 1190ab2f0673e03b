"""Overload, faults and misbehaving clients against real servers (docs/robustness.md).

* Offered load at 5x the measured capacity: every call is answered (OK, RESOURCE_EXHAUSTED or
  DEADLINE_EXCEEDED), admitted calls stay under the queue timeout, the goodput stays at
  capacity, memory stays bounded; then SIGTERM under that load drains and exits 0.
* A failing inference session: its calls get INTERNAL without internals, the server turns
  NOT_SERVING, rebuilds the session and serves again, or exits 70 when it cannot.
* A client that goes away does not cost a batch slot; stalled connections do not block others.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from clipserve.server.supervisor import EXIT_SESSION_FAILURE
from clipserve.v1 import clip_service_pb2 as pb
from clipserve.v1 import clip_service_pb2_grpc as pb_grpc
from tests.conftest import TINY_MODEL
from tests.integration.harness import (
    ServerProcess,
    ServerThread,
    health_status,
    running_server,
    start_subprocess,
    wait_until,
)

ANSWERS = frozenset({"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"})
#: While draining, calls not yet admitted are refused with UNAVAILABLE (retry elsewhere).
DRAIN_ANSWERS = ANSWERS | {"UNAVAILABLE"}


def jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def gradient_png(width: int, height: int) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


# -- overload ------------------------------------------------------------------------------
QUEUE_TIMEOUT_MS = 2000
CALL_DEADLINE_S = 5.0
OVERLOAD_FLAGS = (
    "--queue-timeout-ms", str(QUEUE_TIMEOUT_MS), "--vision-max-batch-size", "8",
    "--max-queue-size", "4", "--max-items-per-request", "4", "--preprocess-workers", "1",
    "--max-queue-delay-us", "2000", "--drain-grace-s", "15", "--no-reflection",
)
#: One call: a 2000x1500 gradient PNG of 12 kB. Decoding 3 megapixels costs the server far more
#: than sending, receiving or refusing the call, so the server's work is what saturates.
OVERLOAD_REQUEST = pb.EncodeImageRequest(images=[pb.Image(data=gradient_png(2000, 1500))])


@dataclass
class Outcome:
    code: str
    latency_s: float
    details: str = ""


async def _call(stub: pb_grpc.ClipServiceStub) -> Outcome:
    started = time.perf_counter()
    try:
        await stub.EncodeImage(OVERLOAD_REQUEST, timeout=CALL_DEADLINE_S)
    except grpc.aio.AioRpcError as error:
        return Outcome(error.code().name, time.perf_counter() - started, error.details() or "")
    return Outcome("OK", time.perf_counter() - started)


async def closed_loop(stub: pb_grpc.ClipServiceStub, seconds: float, concurrency: int) -> float:
    """Completed calls per second with `concurrency` callers that never wait.

    Callers start calls for `seconds`; the rate counts every completed call over the time until
    the last one finished, so that few, long calls still give a precise figure.
    """
    start = time.monotonic()
    end = start + seconds
    done = 0

    async def caller() -> None:
        nonlocal done
        while time.monotonic() < end:
            if (await _call(stub)).code == "OK":
                done += 1

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return done / (time.monotonic() - start)


async def open_loop(
    stub: pb_grpc.ClipServiceStub, rate: float, seconds: float,
    at: Callable[[float], None] | None = None,
) -> list[Outcome]:
    """Start calls at `rate` per second for `seconds`, whatever the answers; every outcome.

    `at(elapsed)` is called between sends (e.g. to send a signal at some point).
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    calls: list[asyncio.Task[Outcome]] = []
    while (elapsed := loop.time() - start) < seconds:
        due = start + len(calls) / rate
        if loop.time() < due:
            await asyncio.sleep(due - loop.time())
        calls.append(asyncio.ensure_future(_call(stub)))
        if at is not None:
            at(elapsed)
    # none may hang: every call has a deadline, and the whole lot a bound
    return await asyncio.wait_for(asyncio.gather(*calls), CALL_DEADLINE_S + 10)


def peak_rss_mib(pid: int) -> float:
    """VmHWM of the process: the peak of its resident memory so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc")


def summary(
    outcomes: list[Outcome], seconds: float, answers: frozenset[str] = ANSWERS
) -> dict[str, Any]:
    """Counts by status; `lost`: calls without one of the `answers`."""
    codes = Counter(o.code for o in outcomes)
    ok = sorted(o.latency_s for o in outcomes if o.code == "OK")
    return {
        "offered": len(outcomes),
        "answered": sum(n for code, n in codes.items() if code in answers),
        "codes": dict(codes),
        "lost": sum(n for code, n in codes.items() if code not in answers),
        "lost_details": sorted({o.details for o in outcomes if o.code not in answers}),
        "goodput": len(ok) / seconds,
        "p50_ms": 1000 * ok[len(ok) // 2] if ok else None,
        "p99_ms": 1000 * ok[min(len(ok) - 1, int(len(ok) * 0.99))] if ok else None,
    }


@pytest.fixture
def overload_server(tiny_repository: Path) -> Iterator[ServerProcess]:
    server = start_subprocess(tiny_repository, *OVERLOAD_FLAGS)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)


@pytest.mark.slow
async def test_five_times_capacity_is_answered_bounded_and_drains_on_sigterm(
    overload_server: ServerProcess,
) -> None:
    server = overload_server
    pid = server.process.pid
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClipServiceStub(channel)
        await closed_loop(stub, 1.0, 4)  # warm the connection and the pools
        before = await closed_loop(stub, 3.0, 3)  # 3 calls keep the queue (4 images) busy
        rss_at_capacity = peak_rss_mib(pid)
        rate, seconds = 5 * before, 16.0
        overload = summary(await open_loop(stub, rate, seconds), seconds)
        rss_overload = peak_rss_mib(pid)
        # measured again right after: on a shared machine the CPU this process gets drifts
        after = await closed_loop(stub, 3.0, 3)
        capacity = (before + after) / 2

        sent: list[float] = []

        def sigterm_after_one_second(elapsed: float) -> None:
            if elapsed >= 1.0 and not sent:
                sent.append(elapsed)
                server.terminate()

        outcomes = await open_loop(stub, rate, 3.0, sigterm_after_one_second)
        draining = summary(outcomes, 3.0, DRAIN_ANSWERS)
    exit_code = await asyncio.to_thread(server.process.wait, 30)

    print(
        f"\noverload: capacity {capacity:.1f} calls/s (1 image each; {before:.1f} before, "
        f"{after:.1f} after); offered "
        f"{overload['offered']} calls at {rate:.1f}/s for {seconds:.0f}s; answered "
        f"{overload['answered']} {overload['codes']}; lost {overload['lost']}; goodput "
        f"{overload['goodput']:.1f} calls/s ({overload['goodput'] / capacity:.0%} of capacity); "
        f"OK latency p50 {overload['p50_ms']:.0f} ms, p99 {overload['p99_ms']:.0f} ms "
        f"(queue timeout {QUEUE_TIMEOUT_MS} ms); peak RSS {rss_at_capacity:.0f} MiB at "
        f"capacity, {rss_overload:.0f} MiB after overload"
        f"\nSIGTERM under 5x load: offered {draining['offered']}, answered "
        f"{draining['answered']} {draining['codes']}, lost {draining['lost']}; exit {exit_code}"
    )
    assert overload["lost"] == 0, overload
    assert overload["codes"].get("RESOURCE_EXHAUSTED", 0) > 0  # refused at the door, at once
    assert overload["p99_ms"] < QUEUE_TIMEOUT_MS
    # Goodput vs capacity is a speed figure: printed above (the 90% target), guarded
    # here only against a collapse (before admission control it fell to 27%), because shared
    # CI cores make a tighter timing assert flaky.
    assert overload["goodput"] >= 0.5 * capacity
    assert rss_overload - rss_at_capacity < 200  # MiB: bounded queues, bounded memory
    assert exit_code == 0
    assert draining["lost"] == 0, draining
    assert "draining:" in "".join(server.log)


# -- a failing inference session -------------------------------------------------------------
SECRET_PATH = "/srv/models/secret-tenant/clip_vision/1/model.onnx"


class FailingSession:
    """Stands in for an onnxruntime.InferenceSession whose device broke: every run raises.

    Test-only fault injection: the server has no hook for it; the test swaps a tower's session.
    The error text carries a path, which must reach the log but never a caller.
    """

    def __init__(self, real: Any) -> None:
        self._real = real
        self.calls = 0

    def run(self, outputs: Any, feeds: Any) -> Any:
        self.calls += 1
        raise RuntimeError(
            "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while "
            f"running MatMul node; {SECRET_PATH}: CUDA failure 700: an illegal memory access"
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def vision_towers(server: ServerThread) -> list[Any]:
    """The vision tower's OnnxTowers, one per model instance (test-only access to the runners
    behind the batcher)."""
    return [runner.tower for runner in server.server.model.vision._batch_fns]


def vision_tower(server: ServerThread) -> Any:
    """The first instance's OnnxTower."""
    return vision_towers(server)[0]


class HealthWatch:
    """Every status grpc.health.v1.Watch reports for the server, collected on a thread."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        stub = health_pb2_grpc.HealthStub(self._channel)
        self._call = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
        self.statuses: list[str] = []
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        try:
            for response in self._call:
                name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
                self.statuses.append(name)
        except grpc.RpcError:
            pass  # cancelled by close()

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(10)
        self._channel.close()


def one_image() -> pb.EncodeImageRequest:
    return pb.EncodeImageRequest(images=[pb.Image(data=jpeg(64, 48, 7))])


@pytest.mark.parametrize("instances", [1, 2])
def test_a_failing_session_turns_not_serving_is_rebuilt_and_serves_again(
    tiny_repository: Path, caplog: pytest.LogCaptureFixture, instances: int
) -> None:
    from clipserve.server.grpc_errors import INTERNAL_MESSAGE

    with running_server(
        tiny_repository, session_failure_threshold=2, vision_instances=instances
    ) as server:
        watch = HealthWatch(server.address)
        wait_until(lambda: watch.statuses == ["SERVING"], what="the first health status")
        towers = vision_towers(server)
        assert len(towers) == instances
        broken = [FailingSession(tower._session) for tower in towers]
        for tower, session in zip(towers, broken, strict=True):
            tower._session = session  # the device failed: every instance fails
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ClipServiceStub(channel)
            errors = []
            for _ in range(2):  # two consecutive failed batches: the threshold
                with pytest.raises(grpc.RpcError) as info:
                    stub.EncodeImage(one_image(), timeout=30)
                errors.append(info.value)
            supervisor = server.server.supervisor
            wait_until(lambda: supervisor.rebuilds == 1, what="the session rebuild")
            wait_until(lambda: health_status(server.address) == "SERVING", what="SERVING")
            response = stub.EncodeImage(one_image(), timeout=30)
        watch.close()
    assert sum(session.calls for session in broken) == 2
    assert [(e.code().name, e.details()) for e in errors] == [("INTERNAL", INTERNAL_MESSAGE)] * 2
    for tower, session in zip(towers, broken, strict=True):
        assert tower._session is not session  # every instance's session was rebuilt
    assert np.linalg.norm(response.embeddings[0].values) == pytest.approx(1.0, abs=1e-5)
    assert watch.statuses == ["SERVING", "NOT_SERVING", "SERVING"]
    assert SECRET_PATH in caplog.text  # the operator sees the cause ...
    assert all(SECRET_PATH not in (e.details() or "") for e in errors)  # ... callers never


def test_a_failing_text_session_fails_encode_text_and_rank_then_is_rebuilt(
    tiny_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The text tower's session fails like the vision one: its callers (EncodeText, and Rank
    with a text query, whose image candidates succeed) get INTERNAL without the detail; at the
    threshold the session is rebuilt and texts are served again."""
    from clipserve.server.grpc_errors import INTERNAL_MESSAGE

    with running_server(tiny_repository, session_failure_threshold=3) as server:
        towers = [runner.tower for runner in server.server.model.text._batch_fns]
        broken = [FailingSession(tower._session) for tower in towers]
        for tower, session in zip(towers, broken, strict=True):
            tower._session = session
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ClipServiceStub(channel)
            texts = pb.EncodeTextRequest(texts=["a cat"])
            rank = pb.RankRequest(query=pb.RankItem(text="a cat"),
                                  candidates=[pb.RankItem(image=one_image().images[0])])
            errors = []
            for call, request in ((stub.EncodeText, texts), (stub.Rank, rank),
                                  (stub.EncodeText, texts)):
                if call is stub.EncodeText and errors:  # below the threshold: images still work
                    assert len(stub.EncodeImage(one_image(), timeout=30).embeddings) == 1
                with pytest.raises(grpc.RpcError) as info:
                    call(request, timeout=30)
                errors.append(info.value)
            supervisor = server.server.supervisor
            wait_until(lambda: supervisor.rebuilds == 1, what="the text session's rebuild")
            wait_until(lambda: health_status(server.address) == "SERVING", what="SERVING")
            response = stub.EncodeText(texts, timeout=30)
    assert sum(session.calls for session in broken) == 3
    assert [(e.code().name, e.details()) for e in errors] == [("INTERNAL", INTERNAL_MESSAGE)] * 3
    assert all(tower._session is not session for tower, session in zip(towers, broken,
                                                                        strict=True))
    assert np.linalg.norm(response.embeddings[0].values) == pytest.approx(1.0, abs=1e-5)
    assert SECRET_PATH in caplog.text


def test_a_failing_session_answers_the_http_api_500_without_the_detail(
    tiny_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from clipserve.server.grpc_errors import INTERNAL_MESSAGE

    with running_server(tiny_repository, http_port=0, session_failure_threshold=0) as server:
        tower = vision_tower(server)
        real = tower._session
        tower._session = FailingSession(real)
        try:
            image = "data:image/jpeg;base64," + base64.b64encode(jpeg(64, 48, 7)).decode()
            error = http_embeddings_error(server, [image])
            body = error.read().decode()
        finally:
            tower._session = real
    assert error.code == 500
    fields = json.loads(body)["error"]
    assert (fields["message"], fields["type"], fields["code"]) == (
        INTERNAL_MESSAGE, "server_error", "internal"
    )
    assert SECRET_PATH not in body
    assert SECRET_PATH in caplog.text


class HeldReload:
    """Stands in for a tower's `reload` (the session rebuild) and waits for `release`."""

    def __init__(self, tower: Any) -> None:
        self._tower, self._real = tower, tower.reload
        self.entered, self.release = threading.Event(), threading.Event()
        self.done = threading.Event()
        tower.reload = self

    def __call__(self) -> None:
        self.entered.set()
        self.release.wait(60)
        try:
            self._real()
        finally:
            self.done.set()

    def restore(self) -> None:
        """Let a held rebuild finish (on its own thread) before the next test starts."""
        self.release.set()
        if self.entered.is_set():
            self.done.wait(60)
        self._tower.reload = self._real


def _fail_one_batch(server: ServerThread) -> Any:
    """Break the vision session and send one image: with threshold 1, a rebuild starts."""
    tower = vision_tower(server)
    real = tower._session
    tower._session = FailingSession(real)
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError):
        pb_grpc.ClipServiceStub(channel).EncodeImage(one_image(), timeout=30)
    return real


def test_a_stop_while_a_session_is_rebuilt_does_not_wait_for_the_rebuild(
    tiny_repository: Path,
) -> None:
    server = ServerThread(tiny_repository, session_failure_threshold=1).start()
    held = HeldReload(vision_tower(server))
    try:
        _fail_one_batch(server)
        assert held.entered.wait(30)  # the rebuild runs, on the inference thread, and waits
        supervisor = server.server.supervisor
        assert supervisor.recovering
        assert health_status(server.address) == "NOT_SERVING"
        started = time.monotonic()
        server.stop(1.0)
        assert time.monotonic() - started < 30  # the held rebuild would take 60 s
        assert not supervisor.recovering  # cancelled
        assert supervisor.rebuilds == 0
    finally:
        held.restore()
        server.stop(1.0)  # idempotent: a failed assertion must not leave the server running


def test_a_rebuild_that_ends_during_the_drain_does_not_turn_serving_again(
    tiny_repository: Path,
) -> None:
    server = ServerThread(tiny_repository, session_failure_threshold=1).start()
    model = server.server.model
    text_tower = model.text._batch_fns[0].tower
    text_session = text_tower._session
    blocking = text_tower._session = BlockingSession(text_session)  # keeps a call in flight
    held = HeldReload(vision_tower(server))
    stopping: threading.Thread | None = None
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ClipServiceStub(channel)
            in_flight = stub.EncodeText.future(pb.EncodeTextRequest(texts=["a cat"]),
                                               timeout=60)
            assert blocking.entered.wait(30)
            _fail_one_batch(server)
            assert held.entered.wait(30)
            stopping = threading.Thread(target=server.stop, args=(30.0,))
            stopping.start()  # drains: waits for the text call
            wait_until(lambda: "in_flight" in server.server.drain_report,
                       what="the drain to start")
            held.release.set()  # the rebuild ends while the server drains
            supervisor = server.server.supervisor
            wait_until(lambda: supervisor.rebuilds == 1 and not supervisor.recovering,
                       what="the recovery to end")
            assert model.ready is False  # not admitting again:
            with pytest.raises(grpc.RpcError) as info:
                stub.EncodeText(pb.EncodeTextRequest(texts=["a dog"]), timeout=30)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            blocking.release.set()
            assert len(in_flight.result(timeout=30).embeddings) == 1  # drained, answered
        stopping.join(60)
        assert not stopping.is_alive()
    finally:
        held.restore()
        blocking.release.set()
        if stopping is not None:
            stopping.join(60)
        server.stop(1.0)
        text_tower._session = text_session


@pytest.mark.parametrize(
    ("case", "settings"),
    [
        ("the rebuild fails", {"session_failure_threshold": 1}),
        ("no rebuild left", {"session_failure_threshold": 1, "max_session_rebuilds": 0}),
    ],
)
def test_a_session_that_cannot_be_recovered_makes_the_server_exit_70(
    tiny_repository: Path, case: str, settings: dict[str, int]
) -> None:
    server = ServerThread(tiny_repository, **settings).start()
    try:
        tower = vision_tower(server)
        tower._session = FailingSession(tower._session)

        def reload() -> None:
            raise RuntimeError(f"cannot load {SECRET_PATH}: device lost")

        tower.reload = reload  # test-only: the model file or device is gone for good
        with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as info:
            pb_grpc.ClipServiceStub(channel).EncodeImage(one_image(), timeout=30)
        assert info.value.code() is grpc.StatusCode.INTERNAL
        def stopped() -> bool:
            stopping = server.server._stopping
            return stopping is not None and stopping.done()

        wait_until(stopped, what=f"the server to stop ({case})")
        assert server.server.exit_code == EXIT_SESSION_FAILURE
        with pytest.raises(grpc.RpcError) as after:
            health_status(server.address)
        assert after.value.code() is grpc.StatusCode.UNAVAILABLE  # the port is closed
    finally:
        server.stop(grace_s=1)


# -- clients that go away or stall -----------------------------------------------------------
class BlockingSession:
    """Holds every run until released (the test decides when the inference thread is busy)."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.entered = threading.Event()
        self.release = threading.Event()

    def run(self, outputs: Any, feeds: Any) -> Any:
        self.entered.set()
        self.release.wait(60)
        return self._real.run(outputs, feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@contextmanager
def one_call_holding_the_engine(
    server: ServerThread,
) -> Iterator[tuple[Any, grpc.Future, BlockingSession]]:
    """A stub, and one EncodeImage call whose batch is inside the first vision instance's
    session, held there (`BlockingSession`) until `release` is set; released and put back on
    exit."""
    tower = vision_tower(server)
    real = tower._session
    blocking = tower._session = BlockingSession(real)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ClipServiceStub(channel)
            running = stub.EncodeImage.future(one_image(), timeout=60)
            assert blocking.entered.wait(30)  # its batch holds the engine
            yield stub, running, blocking
    finally:
        blocking.release.set()
        tower._session = real


def http_embeddings_error(server: ServerThread, inputs: list[str]) -> urllib.error.HTTPError:
    """POST /v1/embeddings with `inputs` to the server's HTTP port; the error it answers."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.server.http_port}/v1/embeddings",
        data=json.dumps({"model": TINY_MODEL, "input": inputs}).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    return info.value


def test_clients_that_disconnect_do_not_cost_batch_slots(tiny_repository: Path) -> None:
    """Cancelled items are dropped from the batch waiting for the engine and from the queue."""

    def images(n: int) -> pb.EncodeImageRequest:
        return pb.EncodeImageRequest(images=[one_image().images[0]] * n)

    with running_server(tiny_repository, max_queue_delay_us=1000) as server:
        model = server.server.model
        batcher = model.vision  # max_batch_size 8
        with one_call_holding_the_engine(server) as (stub, running, blocking):
            computed = batcher.stats.inference_count
            cancelled = batcher.stats.cancelled_items
            staying = stub.EncodeImage.future(images(4), timeout=60)
            # the next batch waits for the engine (a test-only look at it): 4 + 4 = full
            wait_until(lambda: len(batcher._held) == 4, what="the next batch")
            leaving_held = stub.EncodeImage.future(images(4), timeout=60)
            wait_until(lambda: len(batcher._held) == 8, what="a full next batch")
            leaving_queued = stub.EncodeImage.future(images(4), timeout=60)
            wait_until(lambda: batcher.queued == 4, what="items behind the full batch")
            leaving_held.cancel()  # two clients go away: 4 items in the waiting batch,
            leaving_queued.cancel()  # 4 in the queue
            wait_until(lambda: model.in_flight == 2, what="the server to see the cancels")
            blocking.release.set()
            assert len(running.result().embeddings) == 1
            assert len(staying.result().embeddings) == 4
            wait_until(lambda: batcher.queued == 0, what="the queue to empty")
            assert batcher.stats.cancelled_items - cancelled == 8  # skipped ...
            assert batcher.stats.inference_count - computed == 1 + 4  # ... not computed
            assert len(stub.EncodeImage(one_image(), timeout=30).embeddings) == 1



def test_requests_above_max_concurrent_requests_are_refused_at_once_on_both_ports(
    tiny_repository: Path,
) -> None:
    """With the one admitted call held in the engine, the next call is refused at the door:
    RESOURCE_EXHAUSTED over gRPC, 429 with Retry-After over HTTP, each naming the limit."""
    with running_server(tiny_repository, max_concurrent_requests=1, http_port=0) as server:
        model = server.server.model
        with one_call_holding_the_engine(server) as (stub, held, blocking):
            assert model.in_flight == 1
            with pytest.raises(grpc.RpcError) as info:
                stub.EncodeText(pb.EncodeTextRequest(texts=["a cat"]), timeout=30)
            assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert info.value.details() == (
                "1 requests in flight, the limit is 1 (max_concurrent_requests); "
                "retry with backoff"
            )
            refused = http_embeddings_error(server, ["a cat"])
            assert refused.code == 429
            assert refused.headers["Retry-After"] == "1"
            body = json.loads(refused.read())
            assert "(max_concurrent_requests)" in body["error"]["message"]
            blocking.release.set()
            assert len(held.result(timeout=30).embeddings) == 1
            wait_until(lambda: model.in_flight == 0, what="the held call to leave")
            assert len(stub.EncodeText(pb.EncodeTextRequest(texts=["a cat"]),
                                       timeout=30).embeddings) == 1


def test_images_whose_queue_timeout_passed_behind_the_decoders_are_never_decoded(
    tiny_repository: Path,
) -> None:
    """--queue-timeout-ms bounds the wait from admission, the decoding pool's queue included:
    an image still waiting for a busy decoder when it passes is answered DEADLINE_EXCEEDED,
    naming the item, without being decoded."""
    with running_server(tiny_repository, preprocess_workers=1, queue_timeout_ms=300) as server:
        model = server.server.model
        real_decode = model.preprocessor.decode
        gate, entered, decoded = threading.Event(), threading.Event(), []

        def held_decode(data: bytes, **kwargs: Any) -> np.ndarray:
            decoded.append(len(data))
            entered.set()
            gate.wait(60)
            return real_decode(data, **kwargs)

        model.preprocessor.decode = held_decode
        try:
            with grpc.insecure_channel(server.address) as channel:
                stub = pb_grpc.ClipServiceStub(channel)
                first = stub.EncodeImage.future(one_image(), timeout=30)
                assert entered.wait(30)  # the one decoder is busy with the first call
                second = stub.EncodeImage.future(
                    pb.EncodeImageRequest(images=[pb.Image(data=jpeg(64, 48, 8))]), timeout=30
                )
                wait_until(lambda: model.in_flight == 2, what="the second call's admission")
                time.sleep(0.6)  # twice the queue timeout, with the decoder held
                gate.set()
                error = second.exception(timeout=30)
                assert error is not None
                assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
                assert error.details() == (
                    "images[0]: the queue timeout or the call's deadline passed before "
                    "preprocessing"
                )
                first.exception(timeout=30)  # answered one way or the other (it waited too)
                assert len(decoded) == 1  # the second image was never decoded
        finally:
            gate.set()
            model.preprocessor.decode = real_decode


def test_items_past_their_queue_timeout_expire_before_compute_and_are_not_computed(
    tiny_repository: Path,
) -> None:
    """With the engine held, a call whose queue timeout (500 ms) passes in the batch queue, long
    before its own deadline (60 s), gets DEADLINE_EXCEEDED from the batcher's expiry: its items
    are counted expired, none cancelled, none computed."""
    late_items = 3
    with running_server(tiny_repository, max_queue_delay_us=1000, queue_timeout_ms=500) as server:
        batcher = server.server.model.vision  # max_batch_size 8
        with one_call_holding_the_engine(server) as (stub, running, blocking):
            before = (batcher.stats.inference_count, batcher.stats.expired_items,
                      batcher.stats.cancelled_items)
            request = pb.EncodeImageRequest(images=[one_image().images[0]] * late_items)
            late = stub.EncodeImage.future(request, timeout=60)
            wait_until(lambda: len(batcher._held) == late_items, what="the late batch")
            expires = max(item.expires for item in batcher._held)  # type: ignore[type-var]
            time.sleep(max(0.0, expires - time.monotonic()) + 0.05)
            blocking.release.set()
            error = late.exception(timeout=30)
            assert error is not None
            assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert re.search(r"deadline passed after \d+\.\d{3}s in the vision queue, before "
                             r"compute$", error.details()), error.details()
            assert len(running.result(timeout=30).embeddings) == 1
            after = (batcher.stats.inference_count, batcher.stats.expired_items,
                     batcher.stats.cancelled_items)
            assert [b - a for a, b in zip(before, after, strict=True)] == [1, late_items, 0]


def test_a_calls_deadline_goes_with_its_items_and_expired_work_is_never_computed(
    tiny_repository: Path,
) -> None:
    """The caller's deadline reaches the batch queue with each item; when it passes while the
    engine is busy, the caller gets DEADLINE_EXCEEDED and its items are dropped, not computed
    (gRPC cancels the handler at the deadline, so they count as cancelled or expired, whichever
    comes first; the next test reaches the expiry alone)."""
    late_items = 3
    with running_server(tiny_repository, max_queue_delay_us=1000) as server:
        batcher = server.server.model.vision  # max_batch_size 8
        with one_call_holding_the_engine(server) as (stub, running, blocking):
            computed = batcher.stats.inference_count
            dropped = batcher.stats.cancelled_items + batcher.stats.expired_items
            request = pb.EncodeImageRequest(images=[one_image().images[0]] * late_items)
            sent = time.monotonic()
            late = stub.EncodeImage.future(request, timeout=1.0)
            # the late call's items form the next batch (a test-only look at it)
            wait_until(lambda: len(batcher._held) == late_items, what="the late batch")
            expires = [item.expires for item in batcher._held]
            for deadline in expires:  # each item carries the call's deadline
                assert deadline is not None
                assert sent + 0.5 < deadline < sent + 1.5  # about sent + 1 s
            error = late.exception(timeout=30)
            assert error is not None
            assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            # the server's deadline is the client's plus the transit: let it pass too
            time.sleep(max(0.0, max(expires) - time.monotonic()) + 0.05)  # type: ignore[type-var]
            blocking.release.set()
            assert len(running.result(timeout=30).embeddings) == 1
            wait_until(lambda: not batcher._held and batcher.queued == 0,
                       what="the late batch to be dropped")
            assert batcher.stats.inference_count - computed == 1  # the running call only
            assert (batcher.stats.cancelled_items + batcher.stats.expired_items
                    - dropped) == late_items
            assert len(stub.EncodeImage(one_image(), timeout=30).embeddings) == 1


def _hpack_literal(name: str, value: str) -> bytes:
    """HPACK literal header field without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    assert max(len(name), len(value)) < 127
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


def _frame(kind: int, flags: int, stream: int, payload: bytes, length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def stalled_connection(address: str, stage: str) -> socket.socket:
    """A raw TCP client that stops at `stage`: 'connect', 'preface' or 'mid-message'."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    if stage == "connect":
        return sock
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b""))  # SETTINGS
    if stage == "preface":
        return sock
    headers = b"".join(
        _hpack_literal(n, v)
        for n, v in (
            (":method", "POST"), (":scheme", "http"),
            (":path", "/clipserve.v1.ClipService/EncodeText"), (":authority", address),
            ("content-type", "application/grpc"), ("te", "trailers"),
        )
    )
    sock.sendall(_frame(1, 0x4, 1, headers))  # HEADERS, END_HEADERS
    # a DATA frame announcing 105 bytes (a 100-byte gRPC message) of which 10 ever arrive
    sock.sendall(_frame(0, 0, 1, b"\x00" + struct.pack(">I", 100) + b"\x0a\x03abc", length=105))
    return sock


def test_stalled_clients_do_not_block_others(clip_server: ServerThread) -> None:
    stages = ("connect", "preface", "mid-message") * 4
    sockets = [stalled_connection(clip_server.address, stage) for stage in stages]
    try:
        started = time.monotonic()
        with grpc.insecure_channel(clip_server.address) as channel:
            stub = pb_grpc.ClipServiceStub(channel)
            calls = [
                stub.EncodeText.future(pb.EncodeTextRequest(texts=[f"text {i}"]), timeout=20)
                for i in range(16)
            ]
            assert all(len(call.result().embeddings) == 1 for call in calls)
        assert time.monotonic() - started < 10
        assert clip_server.server.model.in_flight == 0  # a half-sent call holds no slot
        assert health_status(clip_server.address) == "SERVING"
    finally:
        for sock in sockets:
            sock.close()
