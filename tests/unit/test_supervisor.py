"""Session recovery (clipserve.server.supervisor) on a real batcher with a breakable engine."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

import pytest

from clipserve.server.batcher import BatcherConfig, DynamicBatcher
from clipserve.server.errors import ModelFailure
from clipserve.server.supervisor import SessionSupervisor


class Engine:
    """Doubles its inputs until broken; `rebuild` mends it (or fails, if told to)."""

    def __init__(self) -> None:
        self.broken = False
        self.rebuild_fails = False
        self.rebuilds = 0

    def __call__(self, values: list[int], _group: Hashable) -> list[int]:
        if self.broken:
            raise ModelFailure("engine failed")
        return [2 * v for v in values]

    def rebuild(self, _instance: int) -> None:
        if self.rebuild_fails:
            raise RuntimeError("device lost")
        self.rebuilds += 1
        self.broken = False


class Server:
    """What the supervisor drives: serving on/off, and giving up."""

    def __init__(self) -> None:
        self.serving: list[bool] = []
        self.gave_up: list[str] = []

    async def set_serving(self, serving: bool) -> None:
        self.serving.append(serving)

    def give_up(self, reason: str) -> None:
        self.gave_up.append(reason)


async def fail_batches(batcher: DynamicBatcher[int, int], count: int) -> None:
    for _ in range(count):
        with pytest.raises(ModelFailure):
            await asyncio.gather(*batcher.submit([1]))


async def settle(supervisor: SessionSupervisor) -> None:
    for _ in range(200):
        if not supervisor.recovering:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the supervisor did not settle")


def setup(threshold: int = 3, max_rebuilds: int = 2):
    engine, server = Engine(), Server()
    batcher = DynamicBatcher("vision", engine, BatcherConfig(4, 0.0, 64))
    supervisor = SessionSupervisor(
        threshold, max_rebuilds, set_serving=server.set_serving, give_up=server.give_up
    )
    supervisor.watch("vision", batcher, engine.rebuild)
    return engine, server, batcher, supervisor


async def test_a_success_resets_the_count_and_the_threshold_triggers_one_rebuild() -> None:
    engine, server, batcher, supervisor = setup(threshold=3)
    async with batcher:
        engine.broken = True
        await fail_batches(batcher, 2)
        engine.broken = False
        assert await asyncio.gather(*batcher.submit([1])) == [2]  # resets the count
        assert batcher.stats.consecutive_failures == 0
        engine.broken = True
        await fail_batches(batcher, 2)
        assert server.serving == []  # 2 in a row: below the threshold
        await fail_batches(batcher, 1)
        await settle(supervisor)
        assert server.serving == [False, True]
        assert (engine.rebuilds, supervisor.rebuilds) == (1, 1)
        assert await asyncio.gather(*batcher.submit([3])) == [6]
    assert server.gave_up == []
    assert batcher.stats.failed_batches == 5


async def test_a_failed_rebuild_gives_up() -> None:
    engine, server, batcher, supervisor = setup(threshold=1)
    async with batcher:
        engine.broken = engine.rebuild_fails = True
        await fail_batches(batcher, 1)
        await settle(supervisor)
    assert server.serving == [False]
    assert server.gave_up == ["vision session could not be rebuilt"]


async def test_too_many_rebuilds_within_the_window_give_up() -> None:
    engine, server, batcher, supervisor = setup(threshold=1, max_rebuilds=2)
    async with batcher:
        for _ in range(3):
            engine.broken = True
            await fail_batches(batcher, 1)
            await settle(supervisor)
    assert engine.rebuilds == 2
    assert server.gave_up == ["vision session failed again after 2 rebuild(s) within 600s"]


async def test_threshold_zero_never_rebuilds() -> None:
    engine, server, batcher, supervisor = setup(threshold=0)
    async with batcher:
        engine.broken = True
        await fail_batches(batcher, 5)
    assert (server.serving, engine.rebuilds, supervisor.recovering) == ([], 0, False)
