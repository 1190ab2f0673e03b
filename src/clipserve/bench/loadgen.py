"""Closed-loop gRPC load: N concurrent clients, each sending its next request when the last
one answered, for a fixed time or a fixed number of requests.

It runs in its own process (``python -m clipserve.bench.loadgen``) so that the clients' Python
does not share the server's interpreter lock. The bench talks to it over stdin/stdout, one JSON
object per line: a command in, a result out. Requests are sent pre-serialised and responses
are not parsed (the first of each run is, to check it), so the clients cost as little as gRPC
allows.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from clipserve.bench.payloads import Workload, workload

#: A client that sees this many errors in a row stops (a broken server must not spin the bench).
MAX_CONSECUTIVE_ERRORS = 50


@dataclass
class RunResult:
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    error_sample: str = ""
    seconds: float = 0.0
    window: tuple[float, float] = (0.0, 0.0)  # time.time() when the window opened and closed

    def to_dict(self) -> dict[str, Any]:
        return {
            "latencies_s": self.latencies_s,
            "errors": self.errors,
            "error_sample": self.error_sample,
            "seconds": self.seconds,
            "window": list(self.window),
        }


async def run_load(
    address: str,
    work: Workload,
    concurrency: int,
    *,
    seconds: float = 0.0,
    count: int = 0,
    warmup_s: float = 0.0,
    warmup_requests: int = 0,
    min_requests: int = 0,
    max_seconds: float = 300.0,
    timeout_s: float = 300.0,
    channels: int = 1,
) -> RunResult:
    """Drive `concurrency` closed-loop clients and measure one window.

    Warm-up lasts `warmup_s` and at least `warmup_requests` answers (e.g. one per client, so
    that the window starts in the steady state). The window then lasts `seconds` and at least
    `min_requests` answers (so that a slow model still gives enough of them), at most
    `max_seconds`; or, with `count`, exactly `count` answers. Answers that arrive inside the
    window count, for throughput and latency.
    """
    if (seconds <= 0) == (count <= 0):
        raise ValueError("give either seconds or count")
    options = [
        ("grpc.max_receive_message_length", 256 << 20),
        ("grpc.max_send_message_length", 256 << 20),
    ]
    opened = [
        grpc.aio.insecure_channel(address, options=[*options, ("grpc.channel_id", i)])
        for i in range(max(1, channels))
    ]
    calls = [ch.unary_unary(work.method) for ch in opened]  # bytes in, bytes out
    result = RunResult()
    window = _Window(warmup_s, warmup_requests, seconds, max(min_requests, count), max_seconds,
                     count > 0)

    async def client(index: int) -> None:
        call = calls[index % len(calls)]
        k = index
        failures = 0
        while not window.done:
            request = work.requests[k % len(work.requests)]
            k += 1
            sent = time.perf_counter()
            try:
                await call(request, timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                result.errors += 1
                failures += 1
                result.error_sample = result.error_sample or f"{exc.code().name}: {exc.details()}"
                if failures >= MAX_CONSECUTIVE_ERRORS:
                    window.done = True
                continue
            failures = 0
            now = time.perf_counter()
            if window.answered(now, len(result.latencies_s)):
                result.latencies_s.append(now - sent)

    try:
        await calls[0](work.requests[0], timeout=timeout_s)  # connect, and fail fast
        window.begin(time.perf_counter())
        await asyncio.gather(*(client(i) for i in range(concurrency)))
    except grpc.aio.AioRpcError as exc:
        result.errors += 1
        result.error_sample = f"{exc.code().name}: {exc.details()}"
    finally:
        result.seconds = window.length()
        to_wall = time.time() - time.perf_counter()
        result.window = (window.opened + to_wall, window.opened + result.seconds + to_wall)
        for ch in opened:
            await ch.close()
    return result


class _Window:
    """When the measured window opens and closes, from the answers' arrival times."""

    def __init__(self, warmup_s: float, warmup_requests: int, seconds: float,
                 min_requests: int, max_seconds: float, exact_count: bool) -> None:
        self.warmup_s, self.warmup_requests = warmup_s, warmup_requests
        self.seconds, self.min_requests = seconds, min_requests
        self.max_seconds, self.exact_count = max_seconds, exact_count
        self.done = False
        self.start = self.opened = self.closed = self.last = math.inf
        self.warm_answers = 0

    def begin(self, now: float) -> None:
        self.start = now
        if self.warmup_s <= 0 and self.warmup_requests <= 0:
            self.opened = now

    def answered(self, now: float, counted: int) -> bool:
        """An answer arrived at `now` (`counted` so far): whether it counts."""
        if self.done:
            return False
        if self.opened == math.inf:
            self.warm_answers += 1
            if now - self.start >= self.warmup_s and self.warm_answers >= self.warmup_requests:
                self.opened = now  # this answer closes the warm-up; the next ones count
            return False
        elapsed = now - self.opened
        if self.exact_count:
            if counted + 1 >= self.min_requests:
                self._close(now)
            self.last = now
            return True
        if elapsed >= self.max_seconds or (
            elapsed >= self.seconds and counted >= self.min_requests
        ):
            self._close(now)
            return False
        self.last = now
        return True

    def _close(self, now: float) -> None:
        self.done = True
        self.closed = now

    def length(self) -> float:
        """From the opening answer to the last counted one (the closing answer, which is not
        counted, would add time without its answers: a bias of one batch per window)."""
        if self.opened == math.inf:
            return 1e-9
        if self.last != math.inf:
            return max(1e-9, self.last - self.opened)
        end = self.closed if self.closed != math.inf else time.perf_counter()
        return max(1e-9, end - self.opened)


_WORKLOADS: dict[tuple[str, int, int], Workload] = {}


def _workload(name: str, image_size: int, items: int) -> Workload:
    key = (name, image_size, items)
    if key not in _WORKLOADS:
        _WORKLOADS[key] = workload(name, image_size, items)
    return _WORKLOADS[key]


def handle(command: dict[str, Any]) -> dict[str, Any]:
    """One command: {address, scenario, image_size, items, concurrency, seconds|count, ...}."""
    work = _workload(command["scenario"], int(command.get("image_size", 224)),
                     int(command.get("items", 1)))
    result = asyncio.run(
        run_load(
            command["address"],
            work,
            int(command["concurrency"]),
            seconds=float(command.get("seconds", 0.0)),
            count=int(command.get("count", 0)),
            warmup_s=float(command.get("warmup_s", 0.0)),
            warmup_requests=int(command.get("warmup_requests", 0)),
            min_requests=int(command.get("min_requests", 0)),
            max_seconds=float(command.get("max_seconds", 300.0)),
            timeout_s=float(command.get("timeout_s", 300.0)),
            channels=int(command.get("channels", 1)),
        )
    )
    return {**result.to_dict(), "items_per_request": work.items_per_request}


def main() -> int:
    """Serve commands from stdin until it closes (one JSON object per line each way)."""
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = handle(json.loads(line))
        except Exception as exc:  # report, keep serving: the bench decides what to do
            reply = {"failure": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
