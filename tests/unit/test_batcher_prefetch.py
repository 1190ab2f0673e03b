"""The prefetched batch stays open while the engine is busy (no sockets, no model)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Hashable

from clipserve.server.errors import NotReady
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


async def test_a_busy_loop_hands_the_waiting_batch_to_the_engine_within_two_iterations() -> None:
    """The callback that receives a finished batch launches the waiting one itself: on a busy
    loop (each iteration blocked 5 ms, as by parsing large requests) the engine idles for at
    most two iterations, not the several that waking the batching task would take."""
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
    assert starts[1] - ends[0] <= 2, (starts, ends)
