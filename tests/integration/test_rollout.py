"""A rolling update loses no call: what Kubernetes does to a pod, done to a real server process.

Two real servers share the load of one client that balances per request (round_robin over both
addresses, as over a headless Service's DNS records) and watches each server's grpc.health.v1
status, as docs/deploy.md tells such clients to. One server gets SIGTERM while calls flow, as a
pod does when a rollout or a scale-down removes it: it reports NOT_SERVING (the client stops
picking it), refuses calls that still reach it with UNAVAILABLE (the client retries them on the
other server), lets its in-flight calls finish and exits. Every call must succeed and, once the
process is gone, all of them are served by the survivor.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from clipserve.clients import ClipClient, RetryPolicy
from clipserve.server.app import SERVICE_NAME
from tests.integration.harness import ServerProcess, start_subprocess

pytestmark = pytest.mark.slow

WORKERS = 4
#: Bounds on the load loop: it stops by itself whatever happens.
MAX_CALLS = 4000
MAX_SECONDS = 120.0
#: Calls each server must have served before one is stopped (balancing is really per request).
WARM_CALLS_EACH = 10
#: Calls to make after the stopped server's process has exited.
CALLS_AFTER_EXIT = 40
#: Slack for a worker thread that got an answer just before the exit but recorded it after.
RECORDING_SLACK_S = 1.0
#: round_robin with client-side health checking: a subchannel whose server reports NOT_SERVING
#: for the API leaves the rotation at once, before the server closes its port.
SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": SERVICE_NAME},
})

#: Each server reports its own --max-items-per-request in GetModelInfo: that tells which one
#: answered a call (Python's client-side gRPC API does not expose the peer).
LEAVING_ID, STAYING_ID = 201, 202


@dataclass(frozen=True)
class Answer:
    done: float  # time.monotonic() when the call completed
    server: int  # the answering server's max_items_per_request


@contextmanager
def two_servers(repository: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    servers: list[ServerProcess] = []
    try:
        for ident in (LEAVING_ID, STAYING_ID):
            servers.append(
                start_subprocess(
                    repository, "--drain-grace-s", "10", "--max-items-per-request", str(ident)
                )
            )
        yield servers[0], servers[1]
    finally:
        for server in servers:
            if server.process.poll() is None:
                server.process.kill()
                server.process.wait(30)


class Load:
    """Worker threads calling EncodeText, then GetModelInfo to see who answered, until told to
    stop (or a bound is reached)."""

    def __init__(self, client: ClipClient) -> None:
        self.client = client
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._end = time.monotonic() + MAX_SECONDS

    def worker(self, index: int) -> None:
        while not self.stop.is_set() and time.monotonic() < self._end:
            with self._lock:
                if self.ok + len(self.failures) >= MAX_CALLS:
                    return
            try:
                vectors = self.client.encode_text([f"a photo of thing {index}"], timeout=30)
                assert vectors.shape[0] == 1
                server = self.client.info(timeout=30).max_items_per_request
            except Exception as exc:
                with self._lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
            else:
                with self._lock:
                    self.ok += 1
                    self.answers.append(Answer(time.monotonic(), server))

    def served_by(self, server: int, after: float = 0.0) -> int:
        with self._lock:
            return sum(1 for a in self.answers if a.server == server and a.done > after)

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        while not condition():
            if time.monotonic() > self._end:
                pytest.fail(f"timed out waiting until {what}")
            time.sleep(0.02)


def test_sigterm_under_round_robin_load_loses_no_call(tiny_repository: Path) -> None:
    with two_servers(tiny_repository) as (leaving, staying):
        target = f"ipv4:{leaving.address},{staying.address}"
        retry = RetryPolicy(max_attempts=6, initial_backoff_s=0.05, max_backoff_s=0.5)
        options = [("grpc.service_config", SERVICE_CONFIG)]
        with ClipClient(target, retry=retry, options=options) as client:
            load = Load(client)
            with ThreadPoolExecutor(WORKERS) as pool:
                for index in range(WORKERS):
                    pool.submit(load.worker, index)
                load.wait_until(
                    lambda: min(load.served_by(LEAVING_ID), load.served_by(STAYING_ID))
                    >= WARM_CALLS_EACH,
                    "both servers have served calls",
                )
                leaving.terminate()  # what the kubelet does once the preStop hook has run
                code = leaving.process.wait(60)
                settled = time.monotonic() + RECORDING_SLACK_S
                load.wait_until(
                    lambda: load.served_by(STAYING_ID, after=settled) >= CALLS_AFTER_EXIT,
                    "the survivor has served calls after the other exited",
                )
                load.stop.set()

    log = "".join(leaving.log)
    assert load.failures == [], load.failures[:5]
    assert code == 0, log
    assert "draining" in log
    assert "stopped" in log
    # once the process is gone, every call is answered by the survivor
    assert load.served_by(LEAVING_ID, after=settled) == 0
