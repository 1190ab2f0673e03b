"""Which in-process servers a bench plan starts, and what each one's sweep covers."""

from __future__ import annotations

from pathlib import Path

from clipserve.bench.runner import SWEEP_IMAGE_MODEL, SWEEP_TINY, Plan, preprocess_choice


def test_the_full_run_sweeps_vit_l_14_last_at_few_clients_and_small_batches() -> None:
    sweeps = Plan.create(False, Path("work")).sweeps()
    assert [(s.model, s.scenarios, s.concurrency) for s in sweeps] == [
        ("tiny", SWEEP_TINY, (1, 4, 16, 32)),
        ("ViT-B-32", SWEEP_IMAGE_MODEL, (1, 4, 16)),
        ("ViT-L-14", SWEEP_IMAGE_MODEL, (1, 4)),
    ]
    assert [s.server for s in sweeps] == [
        {}, {}, {"vision_max_batch_size": 4, "text_max_batch_size": 16},
    ]


def test_the_quick_run_starts_the_tiny_model_only() -> None:
    assert [s.model for s in Plan.create(True, Path("work")).sweeps()] == ["tiny"]


def test_the_large_model_is_left_out_without_a_sweep_or_when_asked() -> None:
    no_sweep = Plan.create(False, Path("work"), skip=frozenset({"sweep"})).sweeps()
    assert [s.model for s in no_sweep] == ["tiny", "ViT-B-32"]  # their other sections still run
    assert [s.model for s in Plan.create(False, Path("work"), large_model="").sweeps()] == [
        "tiny", "ViT-B-32",
    ]
    same = Plan.create(False, Path("work"), large_model="ViT-B-32").sweeps()
    assert [s.model for s in same] == ["tiny", "ViT-B-32"]  # one server per model


def test_the_preprocessing_target_takes_the_fastest_served_path_within_parity() -> None:
    def row(name: str, speed: float, worst: float, detail: float) -> dict[str, object]:
        return {"implementation": name, "vs_open_clip": speed, "parity_worst": worst,
                "detail_worst": detail}

    rows = {r["implementation"]: r for r in (
        row("open_clip", 1.0, 0.0, 0.0),
        row("clipserve exact", 1.5, 0.0005, 0.0001),
        row("clipserve simd", 2.8, 0.14, 0.16),
        row("clipserve fast", 3.0, 0.28, 0.53),  # faster, but a detail mosaic breaks parity
        row("full + reduce 2", 4.0, 0.1, 0.1),  # a diagnostic, not a serving path
    )}
    assert preprocess_choice(rows)["implementation"] == "clipserve simd"
    rows["clipserve fast"]["detail_worst"] = 0.3  # within, but not a setting of the server
    assert preprocess_choice(rows)["implementation"] == "clipserve simd"
    del rows["clipserve simd"]  # the simd extra not installed
    assert preprocess_choice(rows)["implementation"] == "clipserve exact"
    rows["clipserve exact"]["parity_worst"] = 0.7  # never: then exact is still what is served
    assert preprocess_choice(rows)["implementation"] == "clipserve exact"
