"""Triton's per-model statistics (ModelStatistics, and the nv_* metrics read from them).

Fed two ways, both pushed, never polled:
- the batchers' `BatchEvent`s: a tower model (clip_vision, clip_text) counts every item and
  execution of its tower, whoever sent it (its own requests, the front models, clipserve.v1),
  like a composing model of a Triton ensemble; a front model counts its own items and the
  executions that held them;
- the servicer's end of each request: success/fail and the request's queue, compute_input,
  compute_infer and compute_output times (`RequestTrace`), for requests to that model.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from clipserve.server.batcher import BatchEvent
from clipserve.server.trace import RequestTrace
from clipserve.server.triton.models import VERSION, TritonModel
from clipserve.triton import grpc_service_pb2 as pb


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += max(0, ns)

    def message(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)


@dataclass
class ModelTally:
    """Running totals of one model (Triton's vocabulary)."""

    last_inference_ms: int = 0
    inference_count: int = 0  # items computed
    execution_count: int = 0  # batches computed
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, Duration] = field(default_factory=dict)  # batch size -> compute time
    in_flight: int = 0  # requests being handled


class TritonStatistics:
    """The tallies of every model; all methods run on the event loop."""

    def __init__(
        self, models: Mapping[str, TritonModel], queued: Mapping[str, Callable[[], int]]
    ) -> None:
        """`queued`: per tower batcher name, how many items wait in its queue now."""
        self.models = models
        self._queued = queued
        self._tallies = {name: ModelTally() for name in models}
        self._tower_of = {m.tower: name for name, m in models.items() if m.is_tower}

    def tally(self, name: str) -> ModelTally:
        return self._tallies[name]

    def pending(self, name: str) -> int:
        """Items waiting in the queue of a tower; requests being handled by a front model."""
        model = self.models[name]
        return self._queued[model.tower]() if model.is_tower else self._tallies[name].in_flight

    # -- feeding -----------------------------------------------------------------------------
    def observe_batch(self, event: BatchEvent) -> None:
        """Batcher observer: count the batch for its tower and for the models it served."""
        tower = self._tower_of.get(event.batcher)
        if tower is None:
            return
        now_ms = int(time.time() * 1000)
        tally = self._tallies[tower]
        tally.last_inference_ms = now_ms
        tally.inference_count += event.size
        tally.execution_count += 1
        tally.batches.setdefault(event.size, Duration()).add(event.compute_ns)
        served = Counter(m for m in event.models if m is not None and m != tower)
        for name, items in served.items():
            front = self._tallies.get(name)
            if front is not None:
                front.last_inference_ms = now_ms
                front.inference_count += items
                front.execution_count += 1

    @contextlib.contextmanager
    def handling(self, name: str) -> Iterator[None]:
        """Count a request of model `name` as in flight for the block."""
        tally = self._tallies[name]
        tally.in_flight += 1
        try:
            yield
        finally:
            tally.in_flight -= 1

    def record(
        self, name: str, *, ok: bool, duration_ns: int, trace: RequestTrace, output_ns: int
    ) -> None:
        """The end of one request to model `name`."""
        tally = self._tallies[name]
        if not ok:
            tally.fail.add(duration_ns)
            return
        tally.success.add(duration_ns)
        tally.queue.add(trace.queue_ns)
        tally.compute_input.add(trace.input_ns)
        tally.compute_infer.add(trace.compute_ns)
        tally.compute_output.add(output_ns)

    # -- reading -----------------------------------------------------------------------------
    def message(self, name: str) -> pb.ModelStatistics:
        t = self._tallies[name]
        return pb.ModelStatistics(
            name=name,
            version=VERSION,
            last_inference=t.last_inference_ms,
            inference_count=t.inference_count,
            execution_count=t.execution_count,
            inference_stats=pb.InferStatistics(
                success=t.success.message(),
                fail=t.fail.message(),
                queue=t.queue.message(),
                compute_input=t.compute_input.message(),
                compute_infer=t.compute_infer.message(),
                compute_output=t.compute_output.message(),
                cache_hit=pb.StatisticDuration(),
                cache_miss=pb.StatisticDuration(),
            ),
            batch_stats=[
                # padding and splitting run inside the batch: compute_infer holds them
                pb.InferBatchStatistics(
                    batch_size=size,
                    compute_input=pb.StatisticDuration(count=d.count),
                    compute_infer=d.message(),
                    compute_output=pb.StatisticDuration(count=d.count),
                )
                for size, d in sorted(t.batches.items())
            ],
        )
