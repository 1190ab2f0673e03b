"""`clipserve bench --quick` end to end on the tiny model: structure, not speed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from clipserve.cli import main
from tests.conftest import TINY_CONFIG, TINY_SEED

SECTIONS_RUN = ("sweep", "engine", "batching", "lengths", "labels", "memory")


def benchmark(script: str, *args: str) -> str:
    """What benchmarks/SCRIPT prints to stdout, run as its docs run it; fails on a non-zero exit."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / script
    done = subprocess.run(
        [sys.executable, str(path), *args],
        capture_output=True, text=True, timeout=300, check=True,
    )
    return done.stdout


def test_quick_bench_writes_table_json_and_plot(tiny_repository: Path, tmp_path: Path) -> None:
    output = tmp_path / "results"
    started = time.monotonic()
    status = main([
        "--log-level", "WARNING", "bench", "--quick", "--repository", f"tiny={tiny_repository}",
        "--skip", "pytorch,preprocess,tokenizer", "--output", str(output),
        "--seconds", "0.3", "--concurrency", "1,4", "--memory-requests", "40",
    ])
    elapsed = time.monotonic() - started
    assert status == 0
    document = json.loads((output / "bench.json").read_text())
    assert document["meta"]["quick"] is True
    assert document["meta"]["command"].startswith("clipserve bench")
    assert document["notes"] == []

    sweep = [p for p in document["points"] if p.get("sweep")]
    scenarios = {p["scenario"] for p in sweep}
    assert scenarios == {"jpeg_640x480", "jpeg_1920x1080", "tensor", "text_short", "text_77",
                         "classify_1000"}
    assert {p["concurrency"] for p in sweep} == {1, 4}
    for p in sweep:
        assert p["errors"] == 0, p
        assert p["requests"] > 0
        assert p["items_per_s"] > 0
        assert p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"]
        assert p["mean_batch"] >= 1.0
        assert p["queue_ms"] >= 0.0
    systems = {p["system"] for p in document["points"]}
    assert "clipserve, batching off" in systems
    assert any(s.startswith("raw ORT session") for s in systems)
    (ceiling,) = [p for p in document["points"] if "transport ceiling" in p["system"]]
    assert ceiling["errors"] == 0
    assert ceiling["items_per_s"] > 0
    assert ceiling["mean_batch"] is None  # no batcher behind it

    targets = {t["key"]: t for t in document["targets"]}
    measured = ("engine_fraction", "batching_speedup", "length_buckets_speedup",
                "label_cache_speedup", "memory_peak_ratio", "memory_growth")
    for key in measured:
        assert targets[key]["measured"] is not None, targets[key]
        assert targets[key]["status"] in ("met", "missed")
        assert " / " in targets[key]["shown"]
    for key in ("vs_pytorch", "preprocess_speedup", "tokenizer_speedup"):
        assert targets[key]["status"] == "not measured"
    assert document["extra"]["length_buckets"]["tiny"]["min_cosine"] > 0.9999
    # the memory-lean server really ran with two malloc arenas (read from its /proc environ)
    assert document["extra"]["memory"]["lean"]["env"] == {"MALLOC_ARENA_MAX": "2"}
    assert "MALLOC_ARENA_MAX=2 --no-prepack-weights" in targets["memory_peak_ratio"]["detail"]

    text = (output / "bench.md").read_text()
    assert "| model | system" in text
    assert "measured / target" in text
    assert (output / "throughput.png").stat().st_size > 1000
    print(f"quick bench took {elapsed:.1f}s")


def test_the_engine_limit_of_two_vision_instances_is_two_raw_sessions(
    tiny_repository: Path, tmp_path: Path
) -> None:
    output = tmp_path / "results"
    status = main([
        "--log-level", "WARNING", "bench", "--quick", "--repository", f"tiny={tiny_repository}",
        "--skip", "sweep,batching,pytorch,preprocess,tokenizer,lengths,labels,memory",
        "--output", str(output), "--seconds", "0.3", "--vision-instances", "2",
    ])
    assert status == 0
    document = json.loads((output / "bench.json").read_text())
    raw = [p for p in document["points"] if p["system"].startswith("raw ORT")]
    assert raw
    assert all(p["system"].startswith("raw ORT, 2 sessions, batch ") for p in raw)
    assert all(p["errors"] == 0 and p["items_per_s"] > 0 for p in raw)
    served = [p for p in document["points"] if p["system"] == "clipserve"]
    assert served
    assert served[0]["errors"] == 0
    engine = {t["key"]: t for t in document["targets"]}["engine_fraction"]
    assert engine["measured"] is not None
    assert "raw ORT, 2 sessions" in engine["detail"]
    assert " each;" in engine["detail"]


def test_ab_servers_compares_two_settings_side_by_side(tiny_repository: Path) -> None:
    lines = benchmark(
        "ab_servers.py", "--repository", str(tiny_repository), "--scenario", "text_short",
        "--clients", "4", "--seconds", "0.3", "--rounds", "2",
        "--a", "--text-max-batch-size 1", "--b", "",
    ).splitlines()
    assert lines[0] == "A: {'text_max_batch_size': 1}"
    assert lines[1] == "B: defaults"
    rounds = [line for line in lines if line.startswith("round ")]
    assert [line.split(":")[0] for line in rounds] == ["round 1 A", "round 1 B", "round 2 A",
                                                        "round 2 B"]
    assert all("errors 0" in line for line in rounds)
    assert "(mean batch 1.0," in rounds[0]  # server A really runs with its own settings
    assert lines[-1].startswith("B / A: ")
    assert lines[-1].endswith("(text_short, 4 clients)")


def test_engine_gaps_reads_the_engines_idle_time_between_batches(tiny_repository: Path) -> None:
    lines = benchmark(
        "engine_gaps.py", "--repository", str(tiny_repository), "--scenario", "tensor",
        "--items", "8", "--clients", "6", "--seconds", "0.5", "--rounds", "2",
        "--flags", "--vision-max-batch-size 8 --max-items-per-request 64",
    ).splitlines()
    assert lines[0] == "server: {'vision_max_batch_size': 8, 'max_items_per_request': 64}"
    rounds = [line for line in lines if line.startswith("round ")]
    assert len(rounds) == 2
    for line in rounds:
        assert "errors 0" in line
        batch = float(re.search(r"mean batch ([\d.]+)", line).group(1))  # type: ignore[union-attr]
        assert 1.0 <= batch <= 8.0  # the server's own limit holds
        busy = int(re.search(r"engine busy (\d+)%", line).group(1))  # type: ignore[union-attr]
        assert 0 < busy <= 100
        assert re.search(r"gaps \d+: mean ", line)
    assert lines[-1].endswith("(tensor x8, 6 clients)")


def test_bench_preprocess_diagnose_locates_fast_modes_parity_loss() -> None:
    stdout = benchmark(
        "bench_preprocess.py", "--diagnose", "--sizes", "1920x1080", "--rounds", "1",
        "--seconds", "0.05", "--json",
    )
    rows = {r["implementation"]: r for r in json.loads(stdout)["rows"]}
    assert set(rows) == {"open_clip", "clipserve exact", "clipserve simd", "clipserve fast",
                         "full + reduce 2", "full, float resize"}
    exact, fast = rows["clipserve exact"], rows["clipserve fast"]
    reduced, floating = rows["full + reduce 2"], rows["full, float resize"]
    assert exact["detail_worst"] < 0.01
    # A 2x box reduce before the resize loses what a 1/2-scale draft loses: within 20% of it.
    assert abs(reduced["detail_worst"] - fast["detail_worst"]) < 0.2 * fast["detail_worst"]
    # Exact resampling without the 8-bit intermediate is neither bit-exact nor far off.
    assert 0.01 < floating["parity_mean"] < 0.5 * reduced["parity_mean"]
    # The SIMD path starts from the full decode too: within the requirement where fast mode
    # is not, and not bit-exact.
    simd = rows["clipserve simd"]
    assert 0.01 < simd["detail_worst"] < 0.5 < fast["detail_worst"]
    assert all(r["per_core"] > 0 for r in rows.values())


def test_gpu_check_runs_every_step_on_the_cpu(
    tiny_model: str, tiny_repository: Path, tmp_path: Path
) -> None:
    """benchmarks/gpu_check.py, which only a lent GPU runs for real, runs every step on the
    CPU provider: a broken step would otherwise be found with the GPU's minutes running."""
    from clipserve.export.options import ExportOptions
    from clipserve.export.writer import export_repository

    fp16, attention = tmp_path / "fp16", tmp_path / "fp16-opset23"
    for output, opset in ((fp16, 18), (attention, 23)):
        export_repository(ExportOptions(
            model=tiny_model, pretrained="none", seed=TINY_SEED, output=output,
            precision="fp16", opset=opset, max_batch_size=32,
        ))
    config = tmp_path / f"{tiny_model}.json"  # for the PyTorch reference's own process
    config.write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "gpu_check.json"
    stdout = benchmark(
        "gpu_check.py", "--fp32", str(tiny_repository), "--fp16", str(fp16),
        "--fp16-attention", str(attention), "--device", "cpu", "--buckets", "1,2",
        "--seconds", "0.1", "--processes", "1", "--model-config", str(config),
        "--out", str(out),
    )
    assert "STEP FAILED" not in stdout
    results = json.loads(out.read_text())
    assert not [key for key in results if key.startswith("failed/")]
    for name in ("fp16", "fp16-attention"):
        assert results[f"{name}_vs_fp32_min_cosine"] > 0.999
        for variant in ("session.run", "I/O binding"):
            assert results[f"raw/{name}/{variant}/2"] > 0
    assert results["pytorch/fp32/1"] > 0
    assert results["pytorch/fp32/2"] > 0
    assert "CPUExecutionProvider" in results["placement/fp16-attention"]
    served = {key: value for key, value in results.items() if key.startswith("grpc/")}
    scenarios = {key.split("/", 2)[2] for key in served if key.startswith("grpc/fp16/")}
    assert scenarios == {"tensor/8", "tensor/16", "jpeg_640x480/8", "jpeg_1920x1080/4",
                         "text_short/16"}
    assert "grpc/fp16-2-instances/tensor/8" in served
    assert "grpc/fp16-switch-0.5ms/tensor/8" in served
    assert "grpc/fp16-simd/jpeg_1920x1080/4" in served  # the test extras hold the simd extra's
    for point in served.values():
        assert point["errors"] == 0
        assert point["items_per_s"] > 0


def test_gil_waits_times_every_step_at_both_switch_intervals() -> None:
    """benchmarks/gil_waits.py, the last part of the GPU check, prints every step's row."""
    lines = benchmark("gil_waits.py", "--repeats", "1", "--batches", "2").splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("step "))
    assert lines[header].split()[-4:] == ["ms", "busy,", "0.5", "ms"]
    rows = [line for line in lines[header + 1:] if line.strip()]
    steps = [line[:29].strip() for line in rows if not line.startswith(" ")]
    assert steps == ["stack 2 images"] * 2 + ["JPEG 640x480 load"] * 2 + [
        "JPEG 640x480 -> tensor"] + ["JPEG 1920x1080 load"] * 2 + ["JPEG 1920x1080 -> tensor"]
    for line in rows:
        figures = [float(value.rstrip("x")) for value in line.split()[-3:]]
        assert all(figure > 0 for figure in figures), line
