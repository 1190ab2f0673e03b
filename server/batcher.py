"""A Triton-style dynamic batcher for one model, on asyncio.

Contract:
- `submit(items, deadline)` admits all of a request's items or none (`Overloaded` when the
  bounded queue cannot take them) and returns one future per item.
- One task owns the queue. A batch is flushed when it reaches `max_batch_size` or when the
  oldest queued item has waited `max_queue_delay`; waiting is event-driven (no polling).
  Given `arrivals`, a batch does not wait at all while requests arrive alone (fewer than
  `ACCOMPANIED_SHARE` of recent ones found another request queued or running): a lone client
  then gets its answer without the delay, and clients that arrive together are still batched.
- Items carry a group key (e.g. a text-length bucket); a batch holds items of one group, the
  group of the oldest item, so a batch costs what its members need.
- `size_for(group, n)` (optional, `BatchPlanner.size_for`) may run fewer than the `n` items of
  a formed batch: the rest go back to the head of their queue, in order, for the next batch.
- Cancelled items (the caller went away) are skipped; expired items (deadline or queue timeout)
  fail with `DeadlineExpired` before compute.
- Model instances (Triton's `instance_group` count): given several batch functions, up to that
  many batches run at once, each on its instance's own single-thread executor, never on the
  event loop. One further batch is formed while every instance is busy (prefetch of one); it
  stays open until an instance is free: items of its group that arrive meanwhile join it, up to
  `max_batch_size` (it could not run earlier anyway; on a slow engine this keeps batches full
  instead of fragmenting the clients over many small ones). An inference thread that finishes
  a batch claims that waiting batch itself and computes it at once, so the engine does not
  wait for the event loop between two batches (not while batch trimming is on, nor while a
  `run_exclusive` job waits for the thread); otherwise the callback that receives a finished
  batch launches the waiting one before it answers the finished one.
- An exception fans out to every item of the failed batch; an output whose length differs from
  the batch fails the batch too.
- Observers (`add_observer`) hear of every computed batch as a `BatchEvent`, on the event loop;
  the request trace bound at `submit` (clipserve.server.trace) gets its items' times.
- Failure observers (`add_failure_observer`) hear the number of consecutive failed batches
  (the session supervisor rebuilds a failing session); `run_exclusive` runs a job on every
  instance's inference thread, between two of its batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from clipserve.server.arrivals import Arrivals
from clipserve.server.errors import (
    ClipServeError,
    DeadlineExpired,
    ModelFailure,
    NotReady,
    Overloaded,
)
from clipserve.server.trace import RequestTrace
from clipserve.server.trace import current as current_trace

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

BatchFn = Callable[[list[T], Hashable], Sequence[R]]
#: Runs a job on each model instance, given the instance's index (e.g. rebuild its session).
InstanceJob = Callable[[int], Any]


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
    failed_batches: int = 0
    consecutive_failures: int = 0  # failed batches since the last one that succeeded
    expired_items: int = 0
    cancelled_items: int = 0
    queue_ns: int = 0  # summed over computed items
    compute_ns: int = 0  # summed over batches
    batch_sizes: dict[int, int] = field(default_factory=dict)

    @property
    def mean_batch_size(self) -> float:
        return self.inference_count / self.execution_count if self.execution_count else 0.0


@dataclass(frozen=True)
class BatchEvent:
    """One computed batch, as observers see it."""

    batcher: str
    size: int
    compute_ns: int  # from `started` until the inference thread had the outputs
    queue_ns: tuple[int, ...]  # per item: time from submit to the start of the batch
    models: tuple[str | None, ...]  # per item: `RequestTrace.model` of its request
    # time.monotonic() when the batch was handed to its inference thread, or claimed by it
    started: float = 0.0


BatchObserver = Callable[[BatchEvent], None]


@dataclass(eq=False)
class _Item(Generic[T]):
    value: T
    group: Hashable
    future: asyncio.Future[Any]
    enqueued: float  # time.monotonic()
    expires: float | None  # monotonic deadline
    trace: RequestTrace | None = None


@dataclass(eq=False)
class _Run(Generic[T]):
    """A batch handed to an instance's thread."""

    batch: list[_Item[T]]
    instance: int
    started: float  # time.monotonic() when it was handed to the instance's thread
    dropped: list[_Item[T]] = field(default_factory=list)  # claimed, but cancelled or expired


class DynamicBatcher(Generic[T, R]):
    """Batches items submitted from many requests into calls of `batch_fn`."""

    def __init__(
        self,
        name: str,
        batch_fn: BatchFn[T, R] | Sequence[BatchFn[T, R]],
        config: BatcherConfig,
        *,
        group_of: Callable[[T], Hashable] | None = None,
        size_for: Callable[[Hashable, int], int] | None = None,
        arrivals: Arrivals | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.stats = BatchStats()
        # one batch function per model instance, each only ever called on its own thread
        self._batch_fns: list[BatchFn[T, R]] = (
            [batch_fn] if callable(batch_fn) else list(batch_fn)
        )
        if not self._batch_fns:
            raise ValueError(f"{name}: a batcher needs at least one model instance")
        self._group_of = group_of or (lambda _item: None)
        self._size_for = size_for
        self._queues: dict[Hashable, deque[_Item[T]]] = {}
        self._queued = 0
        self._arrived = asyncio.Event()
        self._arrivals = arrivals
        self._idle = asyncio.Event()  # set whenever nothing is queued or running
        n = len(self._batch_fns)
        self._slots = asyncio.Semaphore(n + 1)  # a batch running per instance + one prefetched
        self._free = list(range(n - 1, -1, -1))  # idle instances; the last one freed goes next
        self._held: list[_Item[T]] = []  # the next batch, formed, waiting for the engine
        self._handed_off = False  # `_held` went to the engine (claimed by a thread, or launched)
        # `_held` and `_handed_off` are shared with the inference threads, which claim the held
        # batch when they finish theirs: the loop holds this lock while it changes them
        self._lock = threading.Lock()
        self._exclusive = 0  # `run_exclusive` jobs waiting: the threads claim nothing meanwhile
        self._closed = False
        self._running: set[_Run[T]] = set()  # batches on an instance's thread, one each
        self._executors = [
            ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"infer-{name}" + (f"-{i}" if n > 1 else "")
            )
            for i in range(n)
        ]
        self._task: asyncio.Task[None] | None = None
        self._accepting = False
        self._observers: list[BatchObserver] = []
        self._failure_observers: list[Callable[[int], None]] = []

    def add_observer(self, observer: BatchObserver) -> None:
        """Call `observer` with a `BatchEvent` after every computed batch (it must not block)."""
        self._observers.append(observer)

    def add_failure_observer(self, observer: Callable[[int], None]) -> None:
        """Call `observer(consecutive_failures)` on the loop after every failed batch."""
        self._failure_observers.append(observer)

    @property
    def instances(self) -> int:
        """How many batches may run at once (one per model instance)."""
        return len(self._batch_fns)

    async def run_exclusive(self, job: InstanceJob) -> list[Any]:
        """Run `job(i)` on each instance i's inference thread, between two of its batches
        (e.g. rebuild its session); the instances run it side by side. Raises the first
        failure, after every instance has finished its job."""
        loop = asyncio.get_running_loop()
        self._exclusive += 1  # a thread running batches back to back returns to its queue
        try:
            runs = [
                loop.run_in_executor(executor, job, i)
                for i, executor in enumerate(self._executors)
            ]
            results = await asyncio.gather(*runs, return_exceptions=True)
        finally:
            self._exclusive -= 1
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._accepting = True
            self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.name}")

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop admitting; let queued and running work finish for `grace_s`; cancel the rest."""
        self._accepting = False
        if self._queued or self._running or self._held:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace_s)
        self._closed = True  # the threads claim no further batch
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._fail_queued(NotReady(f"{self.name} model is shutting down"))
        for run in self._running:  # past the grace period: their items fail
            self._shut_down(run.batch, "shut down before this batch finished")
        self._running.clear()
        # a batch still inside the engine finishes on its thread; nothing waits for it
        for executor in self._executors:
            executor.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> DynamicBatcher[T, R]:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    @property
    def queued(self) -> int:
        return self._queued

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
        if self._arrivals is not None:
            self._arrivals.add(bool(self._queued or self._running or self._held))
        expires = deadline
        if self.config.queue_timeout_s > 0:
            limit = now + self.config.queue_timeout_s
            expires = limit if expires is None else min(expires, limit)
        trace = current_trace()
        if trace is not None:
            trace.items += len(values)
        futures: list[asyncio.Future[R]] = []
        for value in values:
            item = _Item(value, self._group_of(value), loop.create_future(), now, expires, trace)
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
                with self._lock:
                    self._held, self._handed_off = batch, False
                if batch:
                    await self._top_up(batch)
            except BaseException:
                self._slots.release()
                self._shut_down(self._take_held())  # closed while the batch waited
                raise
            with self._lock:
                if self._handed_off:  # a thread claimed it, or `_completed` launched it
                    continue
                batch, self._held, self._handed_off = self._held, [], True
            self._launch(batch)

    def _launch(self, batch: list[_Item[T]]) -> None:
        """Drop the items nobody awaits, trim, and hand the batch to a free instance."""
        now = time.monotonic()  # callers may have left while the batch waited: skip them
        batch = [item for item in batch if self._wanted(item, now)]
        if self._size_for is not None and len(batch) > 1:
            batch = self._trim(batch, self._size_for(batch[0].group, len(batch)))
        if not batch:  # every item was cancelled or expired
            self._slots.release()
            self._check_idle()
            return
        self._dispatch(batch)

    def _dispatch(self, batch: list[_Item[T]]) -> None:
        """Start `_work` on a free instance's thread with `batch`."""
        instance = self._free.pop()  # one is free: at most `instances` batches are computing
        run = _Run(batch, instance, time.monotonic())
        self._running.add(run)
        try:
            self._executors[instance].submit(self._work, asyncio.get_running_loop(), run)
        except RuntimeError:  # the executor shut down (closing)
            self._running.discard(run)
            self._free.append(instance)
            self._failed(batch, NotReady(f"{self.name} model is shutting down"))
            self._slots.release()
            self._check_idle()

    def _work(self, loop: asyncio.AbstractEventLoop, first: _Run[T]) -> None:
        """On an instance's thread: compute `first`, then, while a batch waits for the engine,
        claim it and compute it too, without going back to the loop in between.

        Each result goes to the loop as one `_completed` callback, which also learns which batch
        the thread claimed. Claiming here, not on the loop, is what keeps the engine busy: the
        loop may be in the middle of a long iteration (parsing large requests) when a batch
        ends, and a thread that went back to sleep would then wait for it to submit the next
        batch, and wait again for the interpreter lock to start it.
        """
        batch_fn = self._batch_fns[first.instance]
        run: _Run[T] | None = first
        while run is not None:
            outputs: Sequence[R] | None = None
            error: BaseException | None = None
            try:
                outputs = batch_fn([item.value for item in run.batch], run.batch[0].group)
            except Exception as exc:  # reported on the loop, which fans it out
                error = exc
            ended = time.monotonic()
            following = self._claim(run.instance, ended)
            try:
                loop.call_soon_threadsafe(self._completed, run, outputs, error, ended, following)
            except RuntimeError:  # the loop closed: nobody awaits the results
                return
            run = following if following is not None and following.batch else None

    def _claim(self, instance: int, now: float) -> _Run[T] | None:
        """On an instance's thread: take the batch that waits for the engine, if any.

        Not while trimming (`size_for`: the rest would go back to the loop's queue) or while a
        `run_exclusive` job waits for this thread. Items whose caller left or whose deadline
        passed are set apart for the loop, which counts them and fails the expired ones.
        """
        if self._size_for is not None or self._exclusive or self._closed:
            return None
        batch = self._take_held()
        if not batch:
            return None
        kept: list[_Item[T]] = []
        dropped: list[_Item[T]] = []
        for item in batch:
            gone = item.future.done() or (item.expires is not None and now >= item.expires)
            (dropped if gone else kept).append(item)
        return _Run(kept, instance, now, dropped)

    def _completed(
        self, run: _Run[T], outputs: Sequence[R] | None, error: BaseException | None,
        ended: float, following: _Run[T] | None,
    ) -> None:
        """On the loop: a batch came back from its thread, which may have claimed the next
        one. Launch the waiting batch if the instance is free, then answer the finished one."""
        if run not in self._running:  # failed by `close` past its grace period
            if following is not None:  # claimed as the batcher closed: nobody will answer it
                self._shut_down(following.batch + following.dropped)
            return
        self._running.discard(run)
        self._slots.release()
        self._hand_over(run.instance, following)
        self._arrived.set()  # the batching task waits for this in `_top_up` and `_next_batch`
        if len(self._running) < len(self._batch_fns):  # first the engine, then the bookkeeping
            self._launch_held()
        self._answer(run, outputs, error, ended)
        self._check_idle()

    def _hand_over(self, instance: int, following: _Run[T] | None) -> None:
        """The instance goes on with the batch its thread claimed, or it is free."""
        if following is not None:
            now = time.monotonic()
            for item in following.dropped:  # counted, and the expired ones failed
                self._wanted(item, now)
            if following.batch:
                self._running.add(following)
                return
            self._slots.release()  # claimed, and nothing in it was still wanted
        self._free.append(instance)

    def _take_held(self) -> list[_Item[T]]:
        """Take the batch that waits for the engine, marking it handed off (any thread); [] if
        none is formed or it went already."""
        with self._lock:
            if self._handed_off or not self._held:
                return []
            batch, self._held, self._handed_off = self._held, [], True
        return batch

    def _launch_held(self) -> None:
        """Launch the batch that waits for the engine (an instance is free), topped up."""
        batch = self._take_held()
        if not batch:
            return
        queue = self._queues.get(batch[0].group)
        if queue and len(batch) < self.config.max_batch_size:
            batch += self._take(queue, self.config.max_batch_size - len(batch))
        self._launch(batch)

    def _answer(
        self, run: _Run[T], outputs: Sequence[R] | None, error: BaseException | None,
        ended: float,
    ) -> None:
        batch = run.batch
        if error is None and (outputs is None or len(outputs) != len(batch)):
            error = ModelFailure(
                f"{self.name} returned {0 if outputs is None else len(outputs)} outputs for a "
                f"batch of {len(batch)}"
            )
        if error is not None or outputs is None:  # fan the failure out to every item
            if not isinstance(error, ClipServeError):
                log.error("%s batch of %d failed", self.name, len(batch), exc_info=error)
            self._failed(batch, error if isinstance(error, ClipServeError) else ModelFailure(
                f"{self.name} inference failed"
            ))
            return
        started = run.started
        compute_ns = int((ended - started) * 1e9)
        queue_ns = tuple(int((started - item.enqueued) * 1e9) for item in batch)
        stats = self.stats
        stats.execution_count += 1
        stats.consecutive_failures = 0
        stats.inference_count += len(batch)
        stats.compute_ns += compute_ns
        stats.batch_sizes[len(batch)] = stats.batch_sizes.get(len(batch), 0) + 1
        stats.queue_ns += sum(queue_ns)
        self._trace(batch, queue_ns, compute_ns)
        for item, output in zip(batch, outputs, strict=True):
            if not item.future.done():
                item.future.set_result(output)
        models = tuple(item.trace.model if item.trace else None for item in batch)
        self._notify(BatchEvent(self.name, len(batch), compute_ns, queue_ns, models, started))

    def _check_idle(self) -> None:
        if not self._queued and not self._running and not self._held:
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
            if remaining <= 0 or self._alone():
                break
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        return self._take(queue)

    def _alone(self) -> bool:
        """Whether requests have lately been arriving alone, so that waiting would not pay."""
        return self._arrivals is not None and not self._arrivals.expect_company()

    async def _top_up(self, batch: list[_Item[T]]) -> None:
        """While every instance is busy, add newly queued items of the batch's group to it.

        A full batch waits for an instance too (held, not handed to an executor), so that items
        whose callers leave meanwhile are still dropped before compute. Returns when an
        instance is free, or when the batch went to the engine without this task.
        """
        queue = self._queues[batch[0].group]
        while True:
            with self._lock:
                if self._handed_off or len(self._running) < len(self._batch_fns):
                    return
                if queue and len(batch) < self.config.max_batch_size:
                    batch += self._take(queue, self.config.max_batch_size - len(batch))
                    continue
            self._arrived.clear()  # set again by `submit` and when a batch finishes
            await self._arrived.wait()

    def _trim(self, batch: list[_Item[T]], keep: int) -> list[_Item[T]]:
        """Run the first `keep` items; the others go back to the head of their queue."""
        keep = max(1, min(keep, len(batch)))
        rest = batch[keep:]
        if rest:
            self._queues[batch[0].group].extendleft(reversed(rest))
            self._queued += len(rest)
            self._arrived.set()
        return batch[:keep]

    def _take(self, queue: deque[_Item[T]], limit: int | None = None) -> list[_Item[T]]:
        batch: list[_Item[T]] = []
        now = time.monotonic()
        limit = self.config.max_batch_size if limit is None else limit
        while queue and len(batch) < limit:
            item = queue.popleft()
            self._queued -= 1
            if self._wanted(item, now):
                batch.append(item)
        return batch

    def _wanted(self, item: _Item[T], now: float) -> bool:
        """False (and counted) for an item whose caller left or whose deadline passed."""
        if item.future.done():  # cancelled by a caller that went away
            self.stats.cancelled_items += 1
            return False
        if item.expires is not None and now >= item.expires:
            self.stats.expired_items += 1
            item.future.set_exception(
                DeadlineExpired(
                    f"deadline passed after {now - item.enqueued:.3f}s in the {self.name} "
                    "queue, before compute"
                )
            )
            return False
        return True

    def _shut_down(self, items: Sequence[_Item[T]], why: str = "is shutting down") -> None:
        """Fail the unanswered `items` with NotReady (closing; not a model failure)."""
        error = NotReady(f"{self.name} model {why}")
        for item in items:
            if not item.future.done():
                item.future.set_exception(error)

    def _failed(self, batch: list[_Item[T]], error: ClipServeError) -> None:
        """Fail every item of `batch` with `error`; tell the failure observers."""
        self.stats.failed_items += len(batch)
        self.stats.failed_batches += 1
        self.stats.consecutive_failures += 1
        for item in batch:
            if not item.future.done():
                item.future.set_exception(error)
        for observer in self._failure_observers:
            try:
                observer(self.stats.consecutive_failures)
            except Exception:  # an observer must never break the batcher
                log.exception("%s failure observer %r failed", self.name, observer)

    @staticmethod
    def _trace(batch: list[_Item[T]], queue_ns: tuple[int, ...], compute_ns: int) -> None:
        """Add the batch's times to the traces of the requests it served."""
        seen: set[int] = set()
        for item, waited in zip(batch, queue_ns, strict=True):
            trace = item.trace
            if trace is None:
                continue
            trace.queue_ns = max(trace.queue_ns, waited)
            if id(trace) not in seen:
                seen.add(id(trace))
                trace.batches += 1
                trace.compute_ns += compute_ns

    def _notify(self, event: BatchEvent) -> None:
        for observer in self._observers:
            try:
                observer(event)
            except Exception:  # an observer must never fail a batch
                log.exception("%s batch observer %r failed", self.name, observer)

    def _fail_queued(self, error: ClipServeError) -> None:
        for queue in self._queues.values():
            while queue:
                item = queue.popleft()
                if not item.future.done():
                    item.future.set_exception(error)
        self._queued = 0
