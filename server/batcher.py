"""A Triton-style dynamic batcher for one model, on asyncio.

Contract:
- `submit(items, deadline)` admits all of a request's items or none (`Overloaded` when the
  bounded queue cannot take them) and returns one future per item.
- One task owns the queue. A batch is flushed when it reaches `max_batch_size` or when the
  oldest queued item has waited `max_queue_delay`; waiting is event-driven (no polling).
- Items carry a group key (e.g. a text-length bucket); a batch holds items of one group, the
  group of the oldest item, so a batch costs what its members need.
- Cancelled items (the caller went away) are skipped; expired items (deadline or queue timeout)
  fail with `DeadlineExpired` before compute.
- The batch function runs on the batcher's own single-thread executor, never on the event loop;
  at most one further batch is formed while one runs (prefetch of one).
- An exception fans out to every item of the failed batch; an output whose length differs from
  the batch fails the batch too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from clipserve.server.errors import (
    ClipServeError,
    DeadlineExpired,
    ModelFailure,
    NotReady,
    Overloaded,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

BatchFn = Callable[[list[T], Hashable], Sequence[R]]


@dataclass(frozen=True)
class BatcherConfig:
    """Queue policy of one batcher (Triton's `dynamic_batching` fields)."""

    max_batch_size: int
    max_queue_delay_s: float
    max_queue_size: int
    queue_timeout_s: float = 0.0  # 0: only the caller's deadline bounds queueing


@dataclass
class BatchStats:
    """Running totals, read by metrics and tests (Triton's statistics vocabulary)."""

    inference_count: int = 0  # items computed
    execution_count: int = 0  # batches computed
    failed_items: int = 0
    expired_items: int = 0
    cancelled_items: int = 0
    queue_ns: int = 0  # summed over computed items
    compute_ns: int = 0  # summed over batches
    batch_sizes: dict[int, int] = field(default_factory=dict)

    @property
    def mean_batch_size(self) -> float:
        return self.inference_count / self.execution_count if self.execution_count else 0.0


@dataclass(eq=False)
class _Item(Generic[T]):
    value: T
    group: Hashable
    future: asyncio.Future[Any]
    enqueued: float  # time.monotonic()
    expires: float | None  # monotonic deadline


class DynamicBatcher(Generic[T, R]):
    """Batches items submitted from many requests into calls of `batch_fn`."""

    def __init__(
        self,
        name: str,
        batch_fn: BatchFn[T, R],
        config: BatcherConfig,
        *,
        group_of: Callable[[T], Hashable] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.stats = BatchStats()
        self._batch_fn = batch_fn
        self._group_of = group_of or (lambda _item: None)
        self._queues: dict[Hashable, deque[_Item[T]]] = {}
        self._queued = 0
        self._arrived = asyncio.Event()
        self._idle = asyncio.Event()  # set whenever nothing is queued or running
        self._slots = asyncio.Semaphore(2)  # one batch running + one prefetched
        self._running: set[asyncio.Future[Any]] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}")
        self._task: asyncio.Task[None] | None = None
        self._accepting = False

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._accepting = True
            self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.name}")

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop admitting; let queued and running work finish for `grace_s`; cancel the rest."""
        self._accepting = False
        if self._queued or self._running:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace_s)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._fail_queued(NotReady(f"{self.name} model is shutting down"))
        for running in list(self._running):  # their items fail with NotReady
            running.cancel()
        if self._running:
            await asyncio.wait(list(self._running))
        # a batch still inside the engine finishes on its thread; nothing waits for it
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> DynamicBatcher[T, R]:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    @property
    def queued(self) -> int:
        return self._queued

    def run_direct(self, values: list[T], group: Hashable = None) -> Sequence[R]:
        """Run the batch function synchronously (warm-up before serving)."""
        return self._batch_fn(values, group)

    # -- admission -------------------------------------------------------------------------
    def submit(self, values: Sequence[T], deadline: float | None = None) -> list[asyncio.Future[R]]:
        """Queue all `values` or none; `deadline` is a time.monotonic() instant."""
        if not self._accepting:
            raise NotReady(f"{self.name} model is not accepting requests")
        if self._queued + len(values) > self.config.max_queue_size:
            raise Overloaded(
                f"{self.name} queue is full ({self._queued} of {self.config.max_queue_size} "
                f"items queued, request has {len(values)}); retry with backoff"
            )
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        expires = deadline
        if self.config.queue_timeout_s > 0:
            limit = now + self.config.queue_timeout_s
            expires = limit if expires is None else min(expires, limit)
        futures: list[asyncio.Future[R]] = []
        for value in values:
            item = _Item(value, self._group_of(value), loop.create_future(), now, expires)
            self._queues.setdefault(item.group, deque()).append(item)
            futures.append(item.future)
        self._queued += len(values)
        self._arrived.set()
        return futures

    # -- the batching task -----------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            if not batch:  # every item was cancelled or expired
                self._slots.release()
                self._check_idle()
                continue
            running = asyncio.ensure_future(self._run(batch))
            self._running.add(running)
            running.add_done_callback(self._finished)

    def _finished(self, running: asyncio.Future[Any]) -> None:
        self._running.discard(running)
        self._slots.release()
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._queued and not self._running:
            self._idle.set()

    def _oldest_group(self) -> Hashable | None:
        heads = [(q[0].enqueued, g) for g, q in self._queues.items() if q]
        return min(heads, key=lambda h: h[0])[1] if heads else None

    async def _next_batch(self) -> list[_Item[T]]:
        """Wait for work, then for a full batch or the oldest item's delay; take one batch."""
        while self._queued == 0:
            self._arrived.clear()
            await self._arrived.wait()
        group = self._oldest_group()
        queue = self._queues[group]
        flush_at = queue[0].enqueued + self.config.max_queue_delay_s
        while len(queue) < self.config.max_batch_size:
            remaining = flush_at - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        return self._take(queue)

    def _take(self, queue: deque[_Item[T]]) -> list[_Item[T]]:
        batch: list[_Item[T]] = []
        now = time.monotonic()
        while queue and len(batch) < self.config.max_batch_size:
            item = queue.popleft()
            self._queued -= 1
            if item.future.done():  # cancelled by a caller that went away
                self.stats.cancelled_items += 1
                continue
            if item.expires is not None and now >= item.expires:
                self.stats.expired_items += 1
                item.future.set_exception(
                    DeadlineExpired(
                        f"deadline passed after {now - item.enqueued:.3f}s in the {self.name} "
                        "queue, before compute"
                    )
                )
                continue
            batch.append(item)
        return batch

    async def _run(self, batch: list[_Item[T]]) -> None:
        loop = asyncio.get_running_loop()
        # the group decides padding (e.g. text length bucket)
        group = batch[0].group
        values = [item.value for item in batch]
        started = time.monotonic()
        try:
            outputs = await loop.run_in_executor(self._executor, self._batch_fn, values, group)
            if len(outputs) != len(batch):
                raise ModelFailure(
                    f"{self.name} returned {len(outputs)} outputs for a batch of {len(batch)}"
                )
        except asyncio.CancelledError:  # closed past its grace period
            shutting_down = NotReady(f"{self.name} model shut down before this batch finished")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(shutting_down)
            raise
        except Exception as exc:  # fan the failure out to every item of the batch
            if not isinstance(exc, ClipServeError):
                log.exception("%s batch of %d failed", self.name, len(batch))
            error = exc if isinstance(exc, ClipServeError) else ModelFailure(
                f"{self.name} inference failed"
            )
            self.stats.failed_items += len(batch)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        finished = time.monotonic()
        stats = self.stats
        stats.execution_count += 1
        stats.inference_count += len(batch)
        stats.compute_ns += int((finished - started) * 1e9)
        stats.batch_sizes[len(batch)] = stats.batch_sizes.get(len(batch), 0) + 1
        for item, output in zip(batch, outputs, strict=True):
            stats.queue_ns += int((started - item.enqueued) * 1e9)
            if not item.future.done():
                item.future.set_result(output)

    def _fail_queued(self, error: ClipServeError) -> None:
        for queue in self._queues.values():
            while queue:
                item = queue.popleft()
                if not item.future.done():
                    item.future.set_exception(error)
        self._queued = 0
