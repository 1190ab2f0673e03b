"""Statistics of one measured point: throughput and latency percentiles (no numpy needed).

Percentiles interpolate linearly between the two nearest ranks, like numpy's default
(``method="linear"``): the p-th percentile of sorted values ``v[0..n-1]`` sits at rank
``(n - 1) * p / 100``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0..100) of ``values``, linearly interpolated; NaN if empty."""
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be between 0 and 100, got {p}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    fraction = rank - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


@dataclass(frozen=True)
class PointStats:
    """One closed-loop point: what the clients saw plus what the server's batcher formed."""

    requests: int
    items: int
    errors: int
    seconds: float
    requests_per_s: float
    items_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    mean_batch: float | None = None  # items per engine batch (server BatchStats)
    queue_ms: float | None = None  # mean time an item waited in the batcher's queue

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(
    latencies_s: Sequence[float],
    seconds: float,
    items_per_request: int,
    errors: int = 0,
    *,
    mean_batch: float | None = None,
    queue_ms: float | None = None,
) -> PointStats:
    """Throughput over ``seconds`` and latency percentiles of the successful requests."""
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    n = len(latencies_s)
    ms = [v * 1000.0 for v in latencies_s]
    return PointStats(
        requests=n,
        items=n * items_per_request,
        errors=errors,
        seconds=seconds,
        requests_per_s=n / seconds,
        items_per_s=n * items_per_request / seconds,
        p50_ms=percentile(ms, 50),
        p95_ms=percentile(ms, 95),
        p99_ms=percentile(ms, 99),
        mean_ms=statistics.fmean(ms) if ms else math.nan,
        mean_batch=mean_batch,
        queue_ms=queue_ms,
    )


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is zero or either is NaN."""
    if denominator == 0 or math.isnan(numerator) or math.isnan(denominator):
        return math.nan
    return numerator / denominator
