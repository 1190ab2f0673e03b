"""The prefetched batch stays open while the engine is busy (no sockets, no model)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Hashable

import pytest

from clipserve.server.errors import DeadlineExpired, NotReady
from tests.unit.test_batcher import Recorder, make


async def test_items_that_arrive_while_the_engine_is_busy_join_the_waiting_batch() -> None:
    rec = Recorder()
    rec.gate = threading.Event()
    async with make(rec, size=8, delay=0.01) as batcher:
        first = batcher.submit([1])  # runs at once and blocks on the gate
        await asyncio.sleep(0.1)
        second = batcher.submit([2])  # formed after the delay, waits for the engine
        await asyncio.sleep(0.1)
        third = batcher.submit([3, 4])  # arrive long after the delay: they join it
        fourth = batcher.submit([5])
        await asyncio.sleep(0.05)
        rec.gate.set()
        results = await asyncio.wait_for(
            asyncio.gather(*first, *second, *third, *fourth), 5
        )
    assert results == [2, 4, 6, 8, 10]
    assert [values for values, _ in rec.batches] == [[1], [2, 3, 4, 5]]


async def test_the_waiting_batch_takes_no_more_than_the_maximum_size() -> None:
    rec = Recorder()
    rec.gate = threading.Event()
    async with make(rec, size=3, delay=0.01) as batcher:
        futures = batcher.submit([1])
        await asyncio.sleep(0.1)
        futures += batcher.submit([2, 3, 4, 5, 6])
        await asyncio.sleep(0.1)
        rec.gate.set()
        await asyncio.wait_for(asyncio.gather(*futures), 5)
    assert [len(values) for values, _ in rec.batches] == [1, 3, 2]


async def test_the_waiting_batch_only_takes_items_of_its_group() -> None:
    rec = Recorder()
    rec.gate = threading.Event()
    async with make(rec, size=8, delay=0.01, group_of=lambda v: v % 2) as batcher:
        futures = batcher.submit([1])
        await asyncio.sleep(0.1)
        futures += batcher.submit([2])
        await asyncio.sleep(0.1)
        futures += batcher.submit([3, 4, 6])
        await asyncio.sleep(0.05)
        rec.gate.set()
        await asyncio.wait_for(asyncio.gather(*futures), 5)
    assert [values for values, _ in rec.batches] == [[1], [2, 4, 6], [3]]


async def test_closing_fails_a_batch_still_waiting_for_the_engine() -> None:
    rec = Recorder()
    rec.gate = threading.Event()
    batcher = make(rec, size=8, delay=0.01)
    await batcher.start()
    running = batcher.submit([1])
    await asyncio.sleep(0.1)
    waiting = batcher.submit([2])
    await asyncio.sleep(0.1)  # well past the 10 ms delay: taken into the waiting batch
    assert batcher.queued == 0
    await batcher.close(grace_s=0.1)
    rec.gate.set()
    outcomes = await asyncio.gather(*running, *waiting, return_exceptions=True)
    assert all(isinstance(o, NotReady) for o in outcomes)


async def test_closing_with_grace_computes_the_waiting_batch() -> None:
    rec = Recorder()
    rec.gate = threading.Event()
    batcher = make(rec, size=8, delay=0.01)
    await batcher.start()
    futures = batcher.submit([1])
    await asyncio.sleep(0.1)
    futures += batcher.submit([2])
    await asyncio.sleep(0.1)
    assert batcher.queued == 0
    threading.Timer(0.2, rec.gate.set).start()
    await batcher.close(grace_s=5)
    assert await asyncio.gather(*futures) == [2, 4]


async def test_the_engine_takes_the_waiting_batch_without_waiting_for_a_busy_loop() -> None:
    """The inference thread claims the batch that waits for the engine as soon as it finishes
    its own: on a busy loop (each iteration blocked 5 ms, as by parsing large requests) the
    engine does not wait for loop iterations between two batches (a task chain on the loop
    took five here; a callback that launched the next batch, one or two)."""
    iterations = 0
    starts: list[int] = []  # the loop's iteration count when the engine began each batch
    ends: list[int] = []

    class Counting(Recorder):
        def __call__(self, values: list[int], group: Hashable) -> list[int]:
            starts.append(iterations)
            out = super().__call__(values, group)
            ends.append(iterations)
            return out

    busy = True

    async def busy_loop() -> None:  # one step per loop iteration
        nonlocal iterations
        while busy:
            time.sleep(0.005)  # noqa: ASYNC251 - blocks the loop (on purpose), not the lock
            iterations += 1
            await asyncio.sleep(0)

    rec = Counting()
    rec.gate = threading.Event()
    async with make(rec, size=4, delay=0.0) as batcher:
        first = batcher.submit([1])  # runs at once and blocks on the gate
        await asyncio.sleep(0.05)
        second = batcher.submit([2])  # formed, waits for the engine
        await asyncio.sleep(0.05)
        hog = asyncio.create_task(busy_loop())
        await asyncio.sleep(0.05)
        rec.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*first, *second), 5)
        busy = False
        await hog
    assert results == [2, 4]
    assert [values for values, _ in rec.batches] == [[1], [2]]
    assert starts[1] - ends[0] <= 1, (starts, ends)  # 0 unless a lock switch fell in between
    assert batcher.stats.execution_count == 2


async def test_a_claimed_batch_skips_items_whose_callers_left_and_fails_expired_ones() -> None:
    rec = Recorder()
    rec.gate = threading.Event()
    async with make(rec, size=8, delay=0.0) as batcher:
        first = batcher.submit([1])  # runs at once and blocks on the gate
        await asyncio.sleep(0.05)
        leaving = batcher.submit([2])
        expiring = batcher.submit([3], deadline=time.monotonic() + 0.1)
        staying = batcher.submit([4])
        await asyncio.sleep(0.05)  # the three wait in one batch for the engine
        leaving[0].cancel()
        await asyncio.sleep(0.1)  # the deadline passes before the thread claims the batch
        rec.gate.set()
        assert await asyncio.wait_for(asyncio.gather(*first, *staying), 5) == [2, 8]
        with pytest.raises(DeadlineExpired):
            await asyncio.wait_for(expiring[0], 5)
    assert [values for values, _ in rec.batches] == [[1], [4]]
    assert (batcher.stats.cancelled_items, batcher.stats.expired_items) == (1, 1)


async def test_a_session_rebuild_runs_between_batches_that_the_engine_would_chain() -> None:
    """`run_exclusive` gets its turn on the inference thread while batches keep waiting: the
    thread stops claiming them until the job ran."""
    rec = Recorder()
    rec.gate = threading.Event()
    seen_by_job: list[int] = []  # batches computed when the job ran

    async with make(rec, size=1, delay=0.0, queue=64) as batcher:
        futures = batcher.submit([1])  # runs at once and blocks on the gate
        await asyncio.sleep(0.05)
        futures += batcher.submit([2, 3, 4])  # each a batch of its own, one held
        await asyncio.sleep(0.05)
        job = asyncio.ensure_future(
            batcher.run_exclusive(lambda _i: seen_by_job.append(len(rec.batches)))
        )
        await asyncio.sleep(0.05)
        rec.gate.set()
        await asyncio.wait_for(job, 5)
        assert await asyncio.wait_for(asyncio.gather(*futures), 5) == [2, 4, 6, 8]
    assert seen_by_job == [1]  # right after the batch it waited behind, before the held one
    assert [values for values, _ in rec.batches] == [[1], [2], [3], [4]]
