"""The bench's statistics, measurement windows, targets and report (no sockets, no model)."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipserve.bench import report
from clipserve.bench.loadgen import _Window
from clipserve.bench.measure import Sample, engine_sample_side_by_side, interleave, merged
from clipserve.bench.stats import percentile, ratio, summarize
from clipserve.bench.targets import TARGETS, Target, TargetResult, result


@pytest.mark.parametrize("p", [0, 1, 25, 50, 90, 95, 99, 100])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_percentile_matches_numpy_linear(p: float, n: int) -> None:
    values = list(np.random.default_rng(n).exponential(size=n))
    assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)))


def test_percentile_edge_cases() -> None:
    assert math.isnan(percentile([], 50))
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input
    assert percentile([1.0, 2.0], 50) == 1.5
    with pytest.raises(ValueError, match="between 0 and 100"):
        percentile([1.0], 101)


def test_summarize_rates_and_milliseconds() -> None:
    stats = summarize([0.010, 0.020, 0.030, 0.040], 2.0, 8, errors=1, mean_batch=4.0,
                      queue_ms=1.5)
    assert stats.requests == 4
    assert stats.items == 32
    assert stats.requests_per_s == 2.0
    assert stats.items_per_s == 16.0
    assert stats.p50_ms == pytest.approx(25.0)
    assert stats.p99_ms == pytest.approx(39.7)
    assert stats.mean_ms == pytest.approx(25.0)
    assert stats.errors == 1
    assert stats.to_dict()["mean_batch"] == 4.0
    with pytest.raises(ValueError, match="positive"):
        summarize([0.1], 0.0, 1)


def test_summarize_without_answers_gives_zero_throughput_and_nan_latency() -> None:
    stats = summarize([], 1.0, 1, errors=3)
    assert stats.items_per_s == 0.0
    assert math.isnan(stats.p50_ms)


def test_ratio() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert math.isnan(ratio(1.0, 0.0))
    assert math.isnan(ratio(math.nan, 1.0))


def test_samples_merge_by_concatenation_so_percentiles_stay_exact() -> None:
    a = Sample([0.1, 0.2], 1.0, items_per_request=2, batch_items=4, batches=2, queue_ns=8_000_000)
    b = Sample([0.3], 2.0, errors=1, items_per_request=2, batch_items=2, batches=1,
               queue_ns=1_000_000)
    total = merged([a, b])
    assert total.latencies_s == [0.1, 0.2, 0.3]
    stats = total.stats()
    assert stats.requests_per_s == pytest.approx(1.0)
    assert stats.items_per_s == pytest.approx(2.0)
    assert stats.errors == 1
    assert stats.mean_batch == pytest.approx(2.0)
    assert stats.queue_ms == pytest.approx(1.5)
    assert stats.p50_ms == pytest.approx(200.0)


def test_the_servers_count_over_whole_batch_cycles_overrides_the_clients() -> None:
    from clipserve.bench.servers import BatchLog

    log = BatchLog()
    for t, size in ((10.0, 8), (11.0, 8), (12.0, 8), (13.0, 8), (20.0, 8)):
        log._events.append((t, size, 0))
    assert log.rate_between(10.5, 13.5) == (16, 2.0)  # batches at 11, 12, 13: 2 cycles
    assert log.rate_between(10.5, 11.5) == (0, 0.0)  # one batch: no whole cycle
    assert log.between(9.0, 12.5).items == 24
    sample = Sample([1.0] * 10, 4.0, server_items=16, server_seconds=2.0)
    stats = sample.stats()
    assert stats.items_per_s == 8.0  # not 10 / 4
    assert stats.p50_ms == 1000.0
    assert merged([sample, sample]).stats().items_per_s == 8.0


def test_interleave_alternates_the_systems_round_by_round() -> None:
    calls: list[str] = []

    def system(name: str):
        def measure() -> Sample:
            calls.append(name)
            return Sample([0.5], 1.0)

        return measure

    taken = interleave(3, {"a": system("a"), "b": system("b")})
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert taken["a"].seconds == 3.0
    assert len(taken["b"].latencies_s) == 3


def test_engine_instances_run_side_by_side_and_their_calls_add_up() -> None:
    # each instance's first three calls (one unmeasured, at least two measured: all of them
    # happen) pass only while the other instance is calling too
    barrier = threading.Barrier(2, timeout=5)
    calls = {"a": 0, "b": 0}

    def run(name: str):
        def call(_batch: np.ndarray) -> None:
            if calls[name] < 3:
                barrier.wait()
            calls[name] += 1

        return call

    batch = np.zeros((3, 2), np.float32)
    sample = engine_sample_side_by_side([run("a"), run("b")], batch, 0.2)
    assert not barrier.broken
    # each instance's first call is not measured; every other call is, with its 3 items
    assert len(sample.latencies_s) == calls["a"] + calls["b"] - 2
    assert sample.items_per_request == 3
    # one window of wall time, not the sum of the two (>= 0.4 s): the rates add up
    assert 0.2 <= sample.seconds < 0.4
    assert sample.stats().items_per_s == pytest.approx(
        3 * len(sample.latencies_s) / sample.seconds
    )


class TestWindow:
    def test_timed_window_waits_for_warm_up_time_and_answers(self) -> None:
        w = _Window(warmup_s=1.0, warmup_requests=2, seconds=2.0, min_requests=0,
                    max_seconds=100, exact_count=False)
        w.begin(0.0)
        assert not w.answered(0.5, 0)  # warm-up: too early
        assert not w.answered(1.2, 0)  # warm-up closes: time and 2 answers
        assert w.opened == 1.2
        assert w.answered(2.0, 0)
        assert w.answered(3.1, 1)
        assert not w.answered(3.3, 2)  # past 2 s: closes, does not count
        assert w.done
        assert w.length() == pytest.approx(1.9)  # up to the last counted answer

    def test_timed_window_stretches_until_enough_answers(self) -> None:
        w = _Window(0.0, 0, seconds=1.0, min_requests=3, max_seconds=100, exact_count=False)
        w.begin(0.0)
        assert w.answered(5.0, 0)
        assert w.answered(6.0, 1)
        assert w.answered(7.0, 2)
        assert not w.answered(8.0, 3)
        assert w.length() == pytest.approx(7.0)

    def test_timed_window_never_exceeds_its_maximum(self) -> None:
        w = _Window(0.0, 0, seconds=1.0, min_requests=1000, max_seconds=10, exact_count=False)
        w.begin(0.0)
        assert w.answered(9.0, 0)
        assert not w.answered(10.5, 1)
        assert w.done

    def test_counted_window_stops_after_exactly_count_answers(self) -> None:
        w = _Window(0.0, 0, seconds=0.0, min_requests=2, max_seconds=100, exact_count=True)
        w.begin(0.0)
        assert w.answered(1.0, 0)
        assert w.answered(2.0, 1)
        assert w.done
        assert not w.answered(3.0, 2)
        assert w.length() == pytest.approx(2.0)


def test_targets_status_and_shown() -> None:
    speed = TARGETS["batching_speedup"]
    assert result("batching_speedup", 4.5).status == "met"
    assert result("batching_speedup", 3.9).status == "missed"
    assert result("batching_speedup", None).status == "not measured"
    assert result("batching_speedup", math.nan).status == "not measured"
    assert result("batching_speedup", 4.5).shown() == "4.50x / >= 4.00x"
    assert speed.higher_is_better
    growth = result("memory_growth", 2.04)
    assert growth.status == "met"
    assert growth.shown() == "2.0% / <= 5.0%"
    assert result("memory_peak_ratio", 1.31).status == "missed"
    data = result("vs_pytorch", 2.5, "how").to_dict()
    assert data["status"] == "met"
    assert data["detail"] == "how"


def test_every_target_of_the_issue_is_listed() -> None:
    assert set(TARGETS) == {
        "engine_fraction", "batching_speedup", "vs_pytorch", "preprocess_speedup",
        "tokenizer_speedup", "length_buckets_speedup", "label_cache_speedup",
        "memory_peak_ratio", "memory_growth",
    }


def _point(model: str, scenario: str, concurrency: int, items: float) -> dict:
    stats = summarize([0.01] * 10, 1.0, 1).to_dict()
    stats["items_per_s"] = items
    return {"model": model, "system": "clipserve", "scenario": scenario,
            "concurrency": concurrency, "sweep": True, **stats}


def test_report_table_json_and_plot(tmp_path: Path) -> None:
    points = [
        _point("tiny", "text_short", c, 100.0 * c) for c in (1, 4, 16)
    ] + [_point("tiny", "tensor", c, 10.0 * c) for c in (1, 4, 16)]
    points.append({**_point("tiny", "tensor", 16, 1.0), "sweep": False, "mean_batch": None})
    targets = [TargetResult(Target("k", "d", 2.0), 3.0, "detail"), result("memory_growth", None)]
    document = {
        "meta": {"command": "clipserve bench --quick", "quick": True, "cpus": 2,
                 "load_before": [1.0], "load_after": [1.0], "duration_s": 1.0,
                 "versions": "v"},
        "points": points,
        "targets": [t.to_dict() for t in targets],
        "notes": ["something skipped"],
    }
    text = report.render_text(document)
    assert "| model | system" in text
    assert "3.00x / >= 2.00x" in text
    assert "not measured" in text
    assert "note: something skipped" in text
    report.write_json(document, tmp_path / "bench.json")
    assert json.loads((tmp_path / "bench.json").read_text())["points"][0]["model"] == "tiny"
    assert report.plot_throughput(points, tmp_path / "plot.png")
    with Image.open(tmp_path / "plot.png") as image:
        assert image.size[0] > 400
    assert not report.plot_throughput(points[-1:], tmp_path / "none.png")
