"""Padding vs a smaller full bucket: `BatchPlanner` on its own, in the batcher, and fed by a
runner's real ONNX Runtime timings."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from pathlib import Path

import numpy as np
import pytest

from clipserve.server.batch_plan import BatchPlanner
from clipserve.server.batcher import BatcherConfig, DynamicBatcher

BUCKETS = (1, 2, 4, 8, 16)


def planner_with(cost: dict[int, float], group: Hashable = None) -> BatchPlanner:
    planner = BatchPlanner(BUCKETS)
    for rows, seconds in cost.items():
        planner.record(group, rows, seconds)
    return planner


def test_a_compute_bound_engine_runs_a_smaller_bucket_full() -> None:
    planner = planner_with({b: 0.1 * b for b in BUCKETS})  # cost grows with the rows: a CPU
    assert planner.size_for(None, 11) == 8  # 8 per 0.8 s beats 11 per 1.6 s (padded to 16)
    assert planner.size_for(None, 5) == 4
    assert planner.size_for(None, 3) == 2
    assert planner.size_for(None, 8) == 8  # a bucket already: nothing to decide
    assert planner.size_for(None, 15) == 15  # 15 of 16 padded: 9.4/s vs 8 of 8: 10/s, < margin
    assert planner.size_for(None, 14) == 14  # 8.75/s padded vs 10/s: within the 20% margin


def test_a_full_bucket_runs_whole_even_when_a_smaller_one_timed_faster_per_item() -> None:
    planner = planner_with({1: 0.1, 2: 0.16, 4: 0.33, 8: 0.57, 16: 1.43})  # noisy timings
    assert planner.size_for(None, 16) == 16
    assert planner.size_for(None, 8) == 8


def test_an_engine_whose_small_batches_cost_the_same_pads() -> None:
    planner = planner_with({1: 0.010, 2: 0.010, 4: 0.010, 8: 0.011, 16: 0.012})  # a GPU
    assert planner.size_for(None, 11) == 11
    assert planner.size_for(None, 3) == 3


def test_untimed_shapes_are_never_chosen_over_padding() -> None:
    assert BatchPlanner(BUCKETS).size_for(None, 11) == 11  # nothing timed yet
    assert planner_with({16: 1.6}).size_for(None, 11) == 11  # only the padded shape timed
    assert planner_with({b: 0.1 * b for b in BUCKETS}, group=77).size_for(8, 11) == 11


def test_costs_follow_a_moving_average() -> None:
    planner = planner_with({8: 1.0})
    planner.record(None, 8, 2.0)
    assert planner.cost(None, 8) == pytest.approx(1.2)


class Engine:
    """Doubles its inputs; each batch costs its padded size (as a CPU would); records batches."""

    def __init__(self, planner: BatchPlanner) -> None:
        self.planner = planner
        self.batches: list[list[int]] = []

    def __call__(self, values: list[int], group: Hashable) -> list[int]:
        self.batches.append(list(values))
        rows = next(b for b in BUCKETS if b >= len(values))
        self.planner.record(group, rows, 0.001 * rows)
        return [2 * v for v in values]


async def test_the_batcher_runs_the_chosen_bucket_and_the_rest_next_in_order() -> None:
    planner = planner_with({b: 0.001 * b for b in BUCKETS})
    engine = Engine(planner)
    config = BatcherConfig(max_batch_size=16, max_queue_delay_s=0.05, max_queue_size=64)
    batcher = DynamicBatcher("vision", engine, config, size_for=planner.size_for)
    async with batcher:
        results = await asyncio.wait_for(asyncio.gather(*batcher.submit(list(range(11)))), 5)
    assert results == [2 * v for v in range(11)]  # nothing lost, every caller its own answer
    assert engine.batches[0] == list(range(8))
    assert [v for b in engine.batches for v in b] == list(range(11))  # order kept
    assert all(len(b) in BUCKETS for b in engine.batches)  # no padded batch at all
    assert batcher.queued == 0


async def test_without_a_size_rule_the_batch_is_padded_whole() -> None:
    planner = planner_with({b: 0.001 * b for b in BUCKETS})
    engine = Engine(planner)
    config = BatcherConfig(max_batch_size=16, max_queue_delay_s=0.05, max_queue_size=64)
    async with DynamicBatcher("vision", engine, config) as batcher:
        await asyncio.wait_for(asyncio.gather(*batcher.submit(list(range(11)))), 5)
    assert engine.batches == [list(range(11))]


def test_a_runner_times_every_shape_at_warm_up_and_every_batch(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from clipserve.server.engine import EngineOptions, OnnxTower
    from clipserve.server.towers import VisionRunner
    from tests.unit.test_binding import linear_model, reference

    tower = OnnxTower("vision", linear_model(tmp_path / "m.onnx"), "pixel_values",
                      "image_embeds", EngineOptions(intra_op_threads=1))
    planner = BatchPlanner((1, 2, 4))
    runner = VisionRunner(tower, 4, (1, 2, 4), planner)
    assert runner.warm_up() == 3
    assert all((planner.cost(None, rows) or 0) > 0 for rows in (1, 2, 4))
    images = [np.full((3, 4, 4), i, dtype=np.float32) for i in range(3)]
    before = planner.cost(None, 4)
    out = runner(images)
    np.testing.assert_allclose(np.stack(out), reference(np.stack(images)), rtol=1e-6)
    assert planner.cost(None, 4) != before  # the padded batch of 3 was timed as 4 rows


def test_one_trimmed_batch_in_a_while_runs_whole_to_be_timed_again() -> None:
    from clipserve.server.batch_plan import EXPLORE_EVERY

    planner = planner_with({b: 0.1 * b for b in BUCKETS})
    choices = [planner.size_for(None, 11) for _ in range(2 * EXPLORE_EVERY)]
    assert choices.count(11) == 2
    assert choices.count(8) == 2 * EXPLORE_EVERY - 2
