"""Which in-process servers a bench plan starts, and what each one's sweep covers."""

from __future__ import annotations

from pathlib import Path

from clipserve.bench.runner import SWEEP_IMAGE_MODEL, SWEEP_TINY, Plan


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
