"""The systems the bench measures: clipserve in-process, server subprocesses, the load generator.

clipserve runs in-process (its own event loop in a thread, like the integration tests' harness)
so that the bench reads the batchers' `BatchStats` directly; servers whose memory is measured,
and the PyTorch reference, run as subprocesses that print ``SERVING on port N`` when ready.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import grpc

from clipserve.v1 import clip_service_pb2 as pb
from clipserve.v1 import clip_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_READY = re.compile(r"SERVING on port (\d+)")


@dataclass(frozen=True)
class BatchTotals:
    """What a tower's batcher computed in a time window."""

    items: int = 0
    batches: int = 0
    queue_ns: int = 0


class BatchLog:
    """Every computed batch of a tower with its wall-clock time (a `DynamicBatcher` observer)."""

    def __init__(self) -> None:
        self._events: list[tuple[float, int, int]] = []  # (time.time(), items, queue ns)

    def __call__(self, event: Any) -> None:  # on the server's loop
        self._events.append((time.time(), event.size, sum(event.queue_ns)))

    def between(self, start: float, end: float) -> BatchTotals:
        """Batches that finished inside [start, end] (time.time())."""
        chosen = [e for e in list(self._events) if start <= e[0] <= end]
        return BatchTotals(sum(e[1] for e in chosen), len(chosen), sum(e[2] for e in chosen))

    def rate_between(self, start: float, end: float) -> tuple[int, float]:
        """(items, seconds) over whole batch cycles inside [start, end]: the items of every
        batch after the first, over the time from the first batch's end to the last's."""
        chosen = [e for e in list(self._events) if start <= e[0] <= end]
        if len(chosen) < 2:
            return 0, 0.0
        return sum(e[1] for e in chosen[1:]), chosen[-1][0] - chosen[0][0]


class _LoopThread:
    """A private event loop running in a daemon thread, for a server inside this process."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.address = ""

    def call(self, coroutine: Any, timeout_s: float = 60) -> Any:
        """Run `coroutine` on the loop; its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def _end_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


class InProcessServer(_LoopThread):
    """A `ClipServer` on 127.0.0.1, port 0, on a private event loop in a daemon thread."""

    def __init__(self, repository: Path, **overrides: Any) -> None:
        super().__init__()
        from clipserve.server.app import ClipServer
        from clipserve.server.settings import ServerSettings

        values = {"host": "127.0.0.1", "port": 0, "metrics": False, "reflection": False}
        self.settings = ServerSettings(model_repository=repository, **{**values, **overrides})
        self.settings.validate()
        self.server = ClipServer(self.settings)
        self.batches = {"vision": BatchLog(), "text": BatchLog()}

    def start(self, timeout_s: float = 900) -> Self:
        self._thread.start()
        port = self.call(self.server.start(), timeout_s)
        self.address = f"127.0.0.1:{port}"
        model = self.server.model
        assert model is not None
        model.vision.add_observer(self.batches["vision"])
        model.text.add_observer(self.batches["text"])
        return self

    def clear_label_cache(self) -> None:
        model = self.server.model
        assert model is not None

        from clipserve.server.label_cache import LabelCache

        async def clear() -> None:  # on the server's loop, which owns the cache
            model.label_cache = LabelCache(model.label_cache.capacity)

        self.call(clear())

    def stop(self) -> None:
        try:
            self.call(self.server.stop(1.0), 60)
        finally:
            self._end_loop()


class CannedServer(_LoopThread):
    """The transport's ceiling: a bare grpc.aio `ClipService` whose EncodeText answers every
    request with one fixed response, in-process like `InProcessServer`.

    It parses each request and serialises the response as any servicer does, and does nothing
    else: what Python gRPC alone costs per request on this machine, driven by the same load
    generator. No server written on grpc.aio can answer faster here. Its answers are not the
    requests' embeddings (`response` is one answer that clipserve gave), so it only ever
    serves as a reference point.
    """

    def __init__(self, response: bytes) -> None:
        super().__init__()
        self.response = pb.EncodeTextResponse.FromString(response)
        self._server: Any = None

    async def _start(self) -> int:
        answer = self.response

        class Canned(pb_grpc.ClipServiceServicer):
            async def EncodeText(self, request: Any, context: Any) -> Any:  # noqa: N802
                return answer

        self._server = grpc.aio.server()
        pb_grpc.add_ClipServiceServicer_to_server(Canned(), self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return int(port)

    def start(self) -> Self:
        self._thread.start()
        self.address = f"127.0.0.1:{self.call(self._start())}"
        return self

    def stop(self) -> None:
        try:
            if self._server is not None:
                self.call(self._server.stop(0), 30)
        finally:
            self._end_loop()


class SubprocessServer:
    """A server process that logs ``SERVING on port N`` when ready; its output is kept."""

    def __init__(self, command: Sequence[str], name: str, env: dict[str, str] | None = None):
        self.name = name
        self.command = list(command)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process: subprocess.Popen[str] | None = None
        self.address = ""
        self.lines: list[str] = []

    def start(self, timeout_s: float = 900) -> SubprocessServer:
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=self.env,
        )
        assert self.process.stdout is not None
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            line = self.process.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            match = _READY.search(line)
            if match:
                self.address = f"127.0.0.1:{match.group(1)}"
                threading.Thread(target=self._drain, daemon=True).start()
                return self
        self.stop()
        tail = "".join(self.lines[-20:])
        raise RuntimeError(f"{self.name} did not become ready:\n{tail}")

    def _drain(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            del self.lines[:-200]

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> SubprocessServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def clipserve_command(repository: Path, *flags: str) -> list[str]:
    """`python -m clipserve serve` on 127.0.0.1, port 0, metrics off, and `flags`."""
    return [
        sys.executable, "-m", "clipserve", "serve", "--model-repository", str(repository),
        "--host", "127.0.0.1", "--port", "0", "--no-metrics", "--no-reflection", *flags,
    ]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes, from /proc/PID/status."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def proc_environ(pid: int, names: Iterable[str]) -> dict[str, str | None]:
    """The values of `names` in a process's environment, from /proc/PID/environ."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = (entry.partition(b"=") for entry in f.read().split(b"\0") if entry)
        environ = {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}
    return {name: environ.get(name) for name in names}


class LoadGenerator:
    """The load-generator process; `run` sends one command and waits for its result."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "clipserve.bench.loadgen"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def run(self, **command: Any) -> dict[str, Any]:
        assert self._process.stdin is not None
        assert self._process.stdout is not None
        self._process.stdin.write(json.dumps(command) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError("the load generator exited")
        reply: dict[str, Any] = json.loads(line)
        if "failure" in reply:
            raise RuntimeError(f"load generator: {reply['failure']}")
        return reply

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(30)
        except subprocess.TimeoutExpired:
            self._process.kill()

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
