"""The dynamic batcher's contract, with a recording batch function (no sockets, no model)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Hashable

import pytest

from clipserve.server.arrivals import Arrivals
from clipserve.server.batcher import BatcherConfig, DynamicBatcher
from clipserve.server.errors import DeadlineExpired, ModelFailure, NotReady, Overloaded


class Recorder:
    """Doubles its inputs and remembers every batch it saw."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[int], Hashable]] = []
        self.fail_on: int | None = None
        self.short = False
        self.gate: threading.Event | None = None

    def __call__(self, values: list[int], group: Hashable) -> list[int]:
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append((list(values), group))
        if self.fail_on is not None and self.fail_on in values:
            raise RuntimeError("engine exploded")
        out = [2 * v for v in values]
        return out[:-1] if self.short else out


def make(recorder: Recorder, *, size: int = 4, delay: float = 10.0, queue: int = 64,
         timeout: float = 0.0, group_of=None) -> DynamicBatcher[int, int]:
    config = BatcherConfig(size, delay, queue, timeout)
    return DynamicBatcher("test", recorder, config, group_of=group_of)


async def test_flushes_when_the_batch_is_full_without_waiting_for_the_delay() -> None:
    rec = Recorder()
    async with make(rec, size=4, delay=30.0) as batcher:
        started = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*batcher.submit([1, 2, 3, 4])), 5)
    assert results == [2, 4, 6, 8]
    assert rec.batches == [([1, 2, 3, 4], None)]
    assert time.monotonic() - started < 5


async def test_flushes_a_partial_batch_after_the_queue_delay() -> None:
    rec = Recorder()
    async with make(rec, size=8, delay=0.2) as batcher:
        started = time.monotonic()
        assert await asyncio.gather(*batcher.submit([5])) == [10]
        waited = time.monotonic() - started
    assert rec.batches == [([5], None)]
    assert waited >= 0.19


async def test_requests_from_different_callers_share_a_batch() -> None:
    rec = Recorder()
    async with make(rec, size=8, delay=0.3) as batcher:
        a = batcher.submit([1, 2])
        b = batcher.submit([3])
        c = batcher.submit([4, 5, 6])
        results = await asyncio.gather(asyncio.gather(*a), asyncio.gather(*b), asyncio.gather(*c))
    assert results == [[2, 4], [6], [8, 10, 12]]
    assert rec.batches == [([1, 2, 3, 4, 5, 6], None)]
    assert batcher.stats.mean_batch_size == 6


async def test_a_large_request_is_split_into_batches_of_the_maximum_size() -> None:
    rec = Recorder()
    async with make(rec, size=4, delay=0.01) as batcher:
        assert await asyncio.gather(*batcher.submit(list(range(10)))) == [2 * i for i in range(10)]
    assert [len(b) for b, _ in rec.batches] == [4, 4, 2]


async def test_an_error_fails_every_item_of_its_batch_and_only_that_batch() -> None:
    rec = Recorder()
    rec.fail_on = 3
    async with make(rec, size=2, delay=0.01) as batcher:
        futures = batcher.submit([1, 3, 5, 7])
        results = await asyncio.gather(*futures, return_exceptions=True)
    assert isinstance(results[0], ModelFailure)
    assert isinstance(results[1], ModelFailure)
    assert "test inference failed" in str(results[0])
    assert "exploded" not in str(results[0])  # internals stay in the log
    assert results[2:] == [10, 14]
    assert batcher.stats.failed_items == 2


async def test_an_output_of_the_wrong_length_fails_the_batch() -> None:
    rec = Recorder()
    rec.short = True
    async with make(rec, size=3, delay=0.01) as batcher:
        results = await asyncio.gather(*batcher.submit([1, 2, 3]), return_exceptions=True)
    assert all(isinstance(r, ModelFailure) for r in results)
    assert "returned 2 outputs for a batch of 3" in str(results[0])


async def test_cancelled_items_are_skipped_before_compute() -> None:
    rec = Recorder()
    async with make(rec, size=8, delay=0.2) as batcher:
        gone = batcher.submit([100, 101])
        kept = batcher.submit([1])
        for future in gone:
            future.cancel()
        assert await asyncio.gather(*kept) == [2]
    assert rec.batches == [([1], None)]
    assert batcher.stats.cancelled_items == 2


async def test_expired_items_fail_with_deadline_exceeded_and_are_not_computed() -> None:
    rec = Recorder()
    async with make(rec, size=8, delay=0.05) as batcher:
        late = batcher.submit([1], deadline=time.monotonic() - 1)
        fine = batcher.submit([2], deadline=time.monotonic() + 30)
        results = await asyncio.gather(*late, *fine, return_exceptions=True)
    assert isinstance(results[0], DeadlineExpired)
    assert "before compute" in str(results[0])
    assert results[1] == 4
    assert rec.batches == [([2], None)]


async def test_queue_timeout_expires_items_that_waited_too_long() -> None:
    rec = Recorder()
    async with make(rec, size=8, delay=0.3, timeout=0.05) as batcher:
        results = await asyncio.gather(*batcher.submit([1, 2]), return_exceptions=True)
    assert all(isinstance(r, DeadlineExpired) for r in results)
    assert rec.batches == []


async def test_a_full_queue_refuses_the_whole_request_at_once() -> None:
    rec = Recorder()
    rec.gate = threading.Event()  # hold the engine so the queue fills
    async with make(rec, size=2, delay=0.0, queue=4) as batcher:
        first = batcher.submit([1, 2])
        await asyncio.sleep(0.05)  # let the loop take the first batch
        second = batcher.submit([3, 4, 5, 6])
        with pytest.raises(Overloaded, match="queue is full"):
            batcher.submit([7])
        queued_before = batcher.queued
        rec.gate.set()
        assert await asyncio.gather(*first, *second) == [2, 4, 6, 8, 10, 12]
    assert queued_before == 4
    assert all(7 not in values for values, _ in rec.batches)


async def test_at_most_one_batch_is_prefetched_while_one_runs() -> None:
    rec = Recorder()
    rec.gate = threading.Event()
    async with make(rec, size=2, delay=0.0, queue=64) as batcher:
        futures = batcher.submit(list(range(10)))
        await asyncio.sleep(0.1)
        # one batch running, one formed and waiting: 6 items still queued
        assert batcher.queued == 6
        rec.gate.set()
        await asyncio.gather(*futures)


async def test_items_of_different_groups_never_share_a_batch() -> None:
    rec = Recorder()
    async with make(rec, size=8, delay=0.1, group_of=lambda v: v % 2) as batcher:
        results = await asyncio.gather(*batcher.submit([1, 2, 3, 4, 5]))
    assert results == [2, 4, 6, 8, 10]
    groups = {group: values for values, group in rec.batches}
    assert groups == {1: [1, 3, 5], 0: [2, 4]}
    # the oldest item's group goes first
    assert rec.batches[0][1] == 1


async def test_close_drains_queued_work_then_refuses_new_work() -> None:
    rec = Recorder()
    batcher = make(rec, size=4, delay=0.05)
    await batcher.start()
    futures = batcher.submit([1, 2, 3])
    await batcher.close(grace_s=5)
    assert [f.result() for f in futures] == [2, 4, 6]
    with pytest.raises(NotReady):
        batcher.submit([4])


async def test_close_without_grace_fails_what_is_still_queued() -> None:
    rec = Recorder()
    rec.gate = threading.Event()
    batcher = make(rec, size=1, delay=0.0)
    await batcher.start()
    futures = batcher.submit([1, 2, 3, 4])
    await asyncio.sleep(0.05)
    closing = asyncio.ensure_future(batcher.close(grace_s=0))
    await asyncio.sleep(0.05)
    rec.gate.set()
    await closing
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert any(isinstance(r, NotReady) for r in results)
    assert all(isinstance(r, (int, NotReady)) for r in results)


def make_adaptive(
    recorder: Recorder, arrivals: Arrivals, *, delay: float
) -> DynamicBatcher[int, int]:
    return DynamicBatcher("test", recorder, BatcherConfig(8, delay, 64), arrivals=arrivals)


async def test_a_request_that_came_alone_does_not_wait_for_the_queue_delay() -> None:
    rec = Recorder()
    lone = Arrivals(weight=1.0, share=0.0)  # the history says: requests come alone
    async with make_adaptive(rec, lone, delay=30.0) as batcher:
        assert await asyncio.wait_for(asyncio.gather(*batcher.submit([5])), 5) == [10]
    assert rec.batches == [([5], None)]


async def test_requests_that_come_together_still_wait_and_share_a_batch() -> None:
    rec = Recorder()
    arrivals = Arrivals(weight=1.0, share=0.0)
    async with make_adaptive(rec, arrivals, delay=0.3) as batcher:
        started = time.monotonic()
        first = batcher.submit([1])
        second = batcher.submit([2])  # the first is still queued: company, so the batch waits
        assert await asyncio.gather(*first, *second) == [2, 4]
        waited = time.monotonic() - started
    assert rec.batches == [([1, 2], None)]
    assert waited >= 0.29


async def test_the_batcher_stops_waiting_once_requests_arrive_alone() -> None:
    rec = Recorder()
    arrivals = Arrivals(weight=0.6)  # expects company until it sees otherwise
    async with make_adaptive(rec, arrivals, delay=1.0) as batcher:
        started = time.monotonic()
        await asyncio.gather(*batcher.submit([1]))  # alone: the share falls from 1 to 0.4
        assert time.monotonic() - started >= 0.99  # waited the delay, as a fixed delay does
        started = time.monotonic()  # the next one comes alone too (the first was answered)
        await asyncio.wait_for(asyncio.gather(*batcher.submit([2])), 5)
        assert time.monotonic() - started < 0.9  # did not wait for the 1 s delay
    assert rec.batches == [([1], None), ([2], None)]


# -- model instances ---------------------------------------------------------------------------


class Instance:
    """One model instance: doubles its inputs, notes the thread of every batch and job, and
    waits at a barrier shared with the other instances before it answers (when given one)."""

    def __init__(self, barrier: threading.Barrier | None = None) -> None:
        self.barrier = barrier
        self.threads: set[str] = set()
        self.job_threads: set[str] = set()
        self.fail_next = False

    def __call__(self, values: list[int], _group: Hashable) -> list[int]:
        self.threads.add(threading.current_thread().name)
        if self.barrier is not None:
            self.barrier.wait()  # raises BrokenBarrierError unless the others come too
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("instance failed")
        return [2 * v for v in values]

    def job(self) -> str:
        self.job_threads.add(threading.current_thread().name)
        return threading.current_thread().name


async def test_instances_run_batches_side_by_side_each_on_its_own_thread() -> None:
    barrier = threading.Barrier(2, timeout=5)  # passes only if two batches run at once
    instances = [Instance(barrier), Instance(barrier)]
    config = BatcherConfig(1, 0.0, 64)
    async with DynamicBatcher("test", instances, config) as batcher:
        assert batcher.instances == 2
        for round_ in range(3):
            values = [10 * round_, 10 * round_ + 1]
            assert await asyncio.gather(*batcher.submit(values)) == [2 * v for v in values]
    assert not barrier.broken
    assert all(len(i.threads) == 1 for i in instances)  # each instance keeps its thread
    assert instances[0].threads != instances[1].threads
    assert batcher.stats.execution_count == 6


async def test_one_instance_runs_one_batch_at_a_time() -> None:
    barrier = threading.Barrier(2, timeout=0.5)
    async with DynamicBatcher("test", Instance(barrier), BatcherConfig(1, 0.0, 64)) as batcher:
        with pytest.raises(ModelFailure):  # the lone batch waits at the barrier for no one
            await asyncio.gather(*batcher.submit([1, 2]))
    assert barrier.broken


async def test_each_instance_runs_one_batch_and_one_more_is_prefetched() -> None:
    gate = threading.Event()

    class Gated(Instance):
        def __call__(self, values: list[int], group: Hashable) -> list[int]:
            gate.wait(5)
            return super().__call__(values, group)

    async with DynamicBatcher("test", [Gated(), Gated(), Gated()], BatcherConfig(2, 0.0, 64)) as b:
        futures = b.submit(list(range(20)))
        await asyncio.sleep(0.1)
        # three batches running, one formed and waiting: 20 - 4 x 2 items still queued
        assert b.queued == 12
        gate.set()
        assert await asyncio.gather(*futures) == [2 * v for v in range(20)]


async def test_a_failed_batch_fails_only_its_items_and_frees_its_instance() -> None:
    barrier = threading.Barrier(2, timeout=5)
    instances = [Instance(barrier), Instance(barrier)]
    async with DynamicBatcher("test", instances, BatcherConfig(1, 0.0, 64)) as batcher:
        instances[0].fail_next = instances[1].fail_next = True
        results = await asyncio.gather(*batcher.submit([1, 2]), return_exceptions=True)
        assert all(isinstance(r, ModelFailure) for r in results)
        # both instances are free again: two more batches still meet at the barrier
        assert await asyncio.gather(*batcher.submit([3, 4])) == [6, 8]
    assert batcher.stats.failed_batches == 2


async def test_run_exclusive_runs_the_job_on_each_instance_thread() -> None:
    instances = [Instance(), Instance()]
    async with DynamicBatcher("test", instances, BatcherConfig(1, 0.0, 64)) as batcher:
        await asyncio.gather(*batcher.submit([1, 2, 3, 4]))
        names = await batcher.run_exclusive(lambda i: instances[i].job())
    assert len(set(names)) == 2
    for instance in instances:
        assert instance.job_threads <= instance.threads  # the job ran where its batches run


async def test_run_exclusive_raises_a_failure_after_every_instance_finished() -> None:
    done: list[int] = []

    def job(i: int) -> None:
        if i == 0:
            raise RuntimeError("rebuild failed")
        time.sleep(0.1)
        done.append(i)

    async with DynamicBatcher("test", [Instance(), Instance()], BatcherConfig(1, 0.0, 64)) as b:
        with pytest.raises(RuntimeError, match="rebuild failed"):
            await b.run_exclusive(job)
    assert done == [1]


def test_a_batcher_needs_an_instance() -> None:
    with pytest.raises(ValueError, match="at least one model instance"):
        DynamicBatcher("test", [], BatcherConfig(1, 0.0, 64))
