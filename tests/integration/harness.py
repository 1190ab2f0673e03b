"""Run a real `ClipServer` on port 0 in a thread with its own event loop.

Its own loop means sync tests (blocking clients) and async tests (on pytest's loop) can both
call it. Subprocess servers (for signals) are started with `start_subprocess`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.server
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipserve.server.app import ClipServer
from clipserve.server.settings import ServerSettings

TEST_SETTINGS = {
    "host": "127.0.0.1",
    "port": 0,
    "metrics_port": 0,
    "intra_op_threads": 1,
    "preprocess_workers": 2,
    "vision_max_batch_size": 8,
    "text_max_batch_size": 16,
    "max_queue_delay_us": 5000,
    "drain_grace_s": 10.0,
}


class ServerThread:
    """A ClipServer running on a private event loop in a daemon thread."""

    def __init__(self, repository: Path, **overrides: Any) -> None:
        values = {**TEST_SETTINGS, **overrides}
        self.settings = ServerSettings(model_repository=repository, **values)
        self.settings.validate()
        self.server = ClipServer(self.settings)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.address = ""
        self._stopped = False

    def start(self) -> ServerThread:
        self._thread.start()
        port = self.call(self.server.start(), timeout=300)
        self.address = f"127.0.0.1:{port}"
        return self

    def call(self, coroutine: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, grace_s: float | None = None) -> None:
        """Stop the server and its loop; a second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self.call(self.server.stop(grace_s), timeout=120)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)


@contextmanager
def running_server(repository: Path, **overrides: Any) -> Iterator[ServerThread]:
    thread = ServerThread(repository, **overrides).start()
    try:
        yield thread
    finally:
        thread.stop(grace_s=5)


def health_status(address: str, service: str = "") -> str:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def wait_until(condition: Callable[[], object], timeout: float = 30, what: str = "") -> None:
    """Poll `condition` until it is true; AssertionError naming `what` after `timeout` s."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.005)


@dataclasses.dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    address: str
    log: list[str]

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)


def start_subprocess(repository: Path, *extra: str, ready_timeout: float = 120) -> ServerProcess:
    """`python -m clipserve serve --port 0 ...`; returns once it logs SERVING."""
    command = [
        sys.executable, "-m", "clipserve", "serve",
        "--model-repository", str(repository), "--host", "127.0.0.1", "--port", "0",
        "--metrics-port", "0", "--intra-op-threads", "1", *extra,
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    end = time.monotonic() + ready_timeout
    assert process.stdout is not None
    while time.monotonic() < end:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"SERVING on port (\d+)", line)
        if match:
            threading.Thread(target=_drain, args=(process, lines), daemon=True).start()
            return ServerProcess(process, f"127.0.0.1:{match.group(1)}", lines)
    process.kill()
    raise RuntimeError("server did not become ready:\n" + "".join(lines))


def _drain(process: subprocess.Popen[str], lines: list[str]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)


class HeldImages:
    """An HTTP server on 127.0.0.1:0 whose image answers wait until `release()`."""

    def __init__(self, image: bytes) -> None:
        self.released = threading.Event()
        self.arrived = threading.Semaphore(0)
        held = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                held.arrived.release()
                held.released.wait(60)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(image)))
                    self.end_headers()
                    self.wfile.write(image)
                except ConnectionError:  # the server gave up on the fetch
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/{name}.jpg"

    def wait_for(self, requests: int) -> None:
        for _ in range(requests):
            assert self.arrived.acquire(timeout=60), "the server never fetched the URL"

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.released.set()
        self._httpd.shutdown()
        self._httpd.server_close()
