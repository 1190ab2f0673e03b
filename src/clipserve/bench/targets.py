"""The issue's performance targets, each reported as measured / target (never asserted).

A target is met when the measured value is on the right side of the goal: at least the goal
for speed-ups and throughput ratios, at most the goal for memory ratios and growth.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    """One goal of the issue and how the bench measures it."""

    key: str
    description: str
    goal: float
    unit: str = "x"  # "x" (a ratio) or "%"
    higher_is_better: bool = True


@dataclass(frozen=True)
class TargetResult:
    target: Target
    measured: float | None  # None: not measured in this run (skipped, or it failed)
    detail: str = ""  # how it was measured, the two raw figures, parity

    @property
    def status(self) -> str:
        """'met', 'missed' or 'not measured'."""
        if self.measured is None or math.isnan(self.measured):
            return "not measured"
        goal, value = self.target.goal, self.measured
        return "met" if (value >= goal if self.target.higher_is_better else value <= goal) else (
            "missed"
        )

    def shown(self) -> str:
        """'0.93x / >= 0.90x' or '2.1% / <= 5%'."""
        t = self.target
        sign = ">=" if t.higher_is_better else "<="
        goal = _fmt(t.goal, t.unit)
        if self.measured is None or math.isnan(self.measured):
            return f"- / {sign} {goal}"
        return f"{_fmt(self.measured, t.unit)} / {sign} {goal}"

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self.target),
            "measured": self.measured,
            "status": self.status,
            "shown": self.shown(),
            "detail": self.detail,
        }


def _fmt(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value:.1f}%"
    return f"{value:.2f}{unit}"


#: The parity requirement of preprocessing (docs/preprocessing.md): mean |difference| per image,
#: in 8-bit levels.
PARITY_LIMIT = 0.5

TARGETS: dict[str, Target] = {
    t.key: t
    for t in (
        Target(
            "engine_fraction",
            "EncodeImage, preprocessed tensors, ViT-B-32, 16 clients: served items/s vs the raw "
            "ONNX Runtime session at its best batch size",
            0.90,
        ),
        Target(
            "batching_speedup",
            "EncodeText, tiny model, 32 clients: dynamic batching vs the same server with max "
            "batch size 1",
            4.0,
        ),
        Target(
            "vs_pytorch",
            "EncodeImage, JPEG, ViT-B-32, 16 clients: clipserve vs open_clip in PyTorch called per "
            "request in a plain grpc.aio server",
            2.0,
        ),
        Target(
            "preprocess_speedup",
            "1920x1080 JPEG -> tensor per core vs open_clip's transform, with parity "
            f"(< {PARITY_LIMIT} levels mean abs difference)",
            3.0,
        ),
        Target(
            "tokenizer_speedup",
            "tokenising 1,000 strings per core vs open_clip's tokenizer, identical ids",
            10.0,
        ),
        Target(
            "length_buckets_speedup",
            "EncodeText of the 1,000 ImageNet prompts: length buckets vs forced to 77 tokens, "
            "same embeddings",
            5.0,
        ),
        Target(
            "label_cache_speedup",
            "Classify with 1,000 labels: second call vs first call",
            20.0,
        ),
        Target(
            "memory_peak_ratio",
            "server peak RSS vs the size of the model files (ViT-L-14 fp32, CPU)",
            1.3,
            higher_is_better=False,
        ),
        Target(
            "memory_growth",
            "server RSS growth over 10,000 cheap requests (EncodeText, short)",
            5.0,
            unit="%",
            higher_is_better=False,
        ),
    )
}


def result(key: str, measured: float | None, detail: str = "") -> TargetResult:
    return TargetResult(TARGETS[key], measured, detail)
