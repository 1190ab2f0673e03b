"""Measured samples and the ways the bench takes them: load points, engine runs, interleaving.

A `Sample` is one measurement window of one system: the latencies of the answers that
arrived in it, its length, and the server's batch counters over it. Samples of the same
system from several rounds merge by concatenation, so percentiles stay exact.

Compared systems are measured in alternation (`interleave`): round 1 of A, round 1 of B,
round 2 of A, ... On a shared machine, background load then hits both alike and the ratio
stays meaningful even when the absolute figures do not.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from clipserve.bench.servers import InProcessServer, LoadGenerator
from clipserve.bench.stats import PointStats, summarize


@dataclass
class Sample:
    latencies_s: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: int = 0
    items_per_request: int = 1
    batch_items: int = 0  # server-side items and batches computed during the window
    batches: int = 0
    queue_ns: int = 0
    error_sample: str = ""
    #: the server's own count over whole batch cycles (in-process servers): items and seconds
    server_items: int = 0
    server_seconds: float = 0.0

    def extend(self, other: Sample) -> None:
        self.latencies_s += other.latencies_s
        self.seconds += other.seconds
        self.errors += other.errors
        self.items_per_request = other.items_per_request
        self.batch_items += other.batch_items
        self.batches += other.batches
        self.queue_ns += other.queue_ns
        self.error_sample = self.error_sample or other.error_sample
        self.server_items += other.server_items
        self.server_seconds += other.server_seconds

    def stats(self) -> PointStats:
        mean_batch = self.batch_items / self.batches if self.batches else None
        queue_ms = self.queue_ns / self.batch_items / 1e6 if self.batch_items else None
        stats = summarize(
            self.latencies_s, max(self.seconds, 1e-9), self.items_per_request, self.errors,
            mean_batch=mean_batch, queue_ms=queue_ms,
        )
        if self.server_seconds > 0 and self.server_items > 0:
            # answers come a batch at a time: the server's count over whole batch cycles is
            # exact where the clients' window may hold a fraction of a batch too many or few
            rate = self.server_items / self.server_seconds
            stats = replace(stats, items_per_s=rate,
                            requests_per_s=rate / self.items_per_request)
        return stats


def merged(samples: Sequence[Sample]) -> Sample:
    total = Sample()
    for sample in samples:
        total.extend(sample)
    return total


def tower_of(scenario: str) -> str:
    return "text" if scenario.startswith("text") else "vision"


def load_point(
    loadgen: LoadGenerator,
    address: str,
    scenario: str,
    concurrency: int,
    *,
    seconds: float = 0.0,
    count: int = 0,
    warmup_s: float = 0.0,
    image_size: int = 224,
    items: int = 1,
    server: InProcessServer | None = None,
    min_answers: int = 2,
    max_seconds: float = 60.0,
) -> Sample:
    """One closed-loop window against `address`; batches read from `server` if given.

    The warm-up lasts `warmup_s` and one answer per client; a timed window lasts `seconds` and
    at least `min_answers` answers per client (at most `max_seconds`), so that a slow model
    still gives a steady-state figure over several batch cycles (answers come a batch at a
    time: a window of few cycles counts a fraction of a batch too many or too few).
    """
    reply = loadgen.run(
        address=address, scenario=scenario, concurrency=concurrency, seconds=seconds,
        count=count, warmup_s=warmup_s, image_size=image_size, items=items,
        warmup_requests=concurrency if warmup_s > 0 else 0,
        min_requests=0 if count else min_answers * concurrency,
        max_seconds=max_seconds if not count else 3600.0,
    )
    sample = Sample(
        latencies_s=reply["latencies_s"], seconds=reply["seconds"], errors=reply["errors"],
        items_per_request=reply["items_per_request"], error_sample=reply["error_sample"],
    )
    if server is not None:
        log_ = server.batches[tower_of(scenario)]
        totals = log_.between(*reply["window"])
        sample.batch_items, sample.batches = totals.items, totals.batches
        sample.queue_ns = totals.queue_ns
        sample.server_items, sample.server_seconds = log_.rate_between(*reply["window"])
    return sample


def engine_sample(run: Callable[[np.ndarray], object], batch: np.ndarray, seconds: float) -> Sample:
    """Call `run(batch)` back to back for `seconds` (at least twice): one 'request' a call."""
    run(batch)  # this shape's first call is not measured
    latencies: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        run(batch)
        now = time.perf_counter()
        latencies.append(now - t0)
        if now - start >= seconds and len(latencies) >= 2:
            break
    return Sample(latencies_s=latencies, seconds=now - start, items_per_request=len(batch))


def engine_sample_side_by_side(
    runs: Sequence[Callable[[np.ndarray], object]], batch: np.ndarray, seconds: float
) -> Sample:
    """`engine_sample` of each of `runs` (one per model instance) on its own thread at once:
    their calls add up, as a server's instances' batches do."""
    if len(runs) == 1:
        return engine_sample(runs[0], batch, seconds)
    with ThreadPoolExecutor(len(runs)) as pool:
        samples = list(pool.map(lambda run: engine_sample(run, batch, seconds), runs))
    total = merged(samples)
    total.seconds = max(s.seconds for s in samples)  # side by side, not one after another
    return total


def interleave(rounds: int, systems: dict[str, Callable[[], Sample]]) -> dict[str, Sample]:
    """Measure every system once per round, in turn; merge each system's rounds."""
    taken: dict[str, list[Sample]] = {name: [] for name in systems}
    for _ in range(rounds):
        for name, measure in systems.items():
            taken[name].append(measure())
    return {name: merged(samples) for name, samples in taken.items()}
