"""The bench's outputs: a readable table, a JSON document and a PNG plot (Pillow only)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from clipserve.bench.targets import TargetResult

COLUMNS = (
    ("model", "model", "{}"),
    ("system", "system", "{}"),
    ("scenario", "scenario", "{}"),
    ("concurrency", "clients", "{}"),
    ("requests_per_s", "req/s", "{:.1f}"),
    ("items_per_s", "items/s", "{:.1f}"),
    ("p50_ms", "p50 ms", "{:.1f}"),
    ("p95_ms", "p95 ms", "{:.1f}"),
    ("p99_ms", "p99 ms", "{:.1f}"),
    ("mean_batch", "batch", "{:.1f}"),
    ("queue_ms", "queue ms", "{:.1f}"),
    ("errors", "errors", "{}"),
)


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def points_table(points: Sequence[dict[str, Any]]) -> str:
    rows = [[_cell(p.get(key), fmt) for key, _, fmt in COLUMNS] for p in points]
    return markdown_table([title for _, title, _ in COLUMNS], rows)


def targets_table(targets: Sequence[TargetResult]) -> str:
    rows = [[t.target.key, t.shown(), t.status, t.detail] for t in targets]
    return markdown_table(["target", "measured / target", "status", "how"], rows)


def render_text(document: dict[str, Any]) -> str:
    meta = document["meta"]
    parts = [
        f"clipserve bench ({'quick' if meta['quick'] else 'full'}): `{meta['command']}`",
        f"{meta['cpus']} cores, load average {meta['load_before']} before / "
        f"{meta['load_after']} after, {meta['duration_s']:.0f} s; {meta['versions']}",
        "",
        points_table(document["points"]),
        "",
        targets_table([_result_from(t) for t in document["targets"]]),
    ]
    if document["notes"]:
        parts += ["", *("note: " + n for n in document["notes"])]
    return "\n".join(parts) + "\n"


def _result_from(data: dict[str, Any]) -> TargetResult:
    from clipserve.bench.targets import Target

    target = Target(data["key"], data["description"], data["goal"], data["unit"],
                    data["higher_is_better"])
    return TargetResult(target, data["measured"], data["detail"])


def write_json(document: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")


# -- plot -----------------------------------------------------------------------------------
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127))  # fmt: skip


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def plot_throughput(points: Sequence[dict[str, Any]], path: Path) -> bool:
    """items/s vs clients, one panel per model, one line per scenario (the sweep's points).

    Returns False (and writes nothing) when no scenario was measured at two concurrencies.
    """
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for p in points:
        if not p.get("sweep"):
            continue
        series.setdefault(p["model"], {}).setdefault(p["scenario"], []).append(
            (int(p["concurrency"]), float(p["items_per_s"]))
        )
    panels = {m: {s: sorted(set(v)) for s, v in by.items() if len({c for c, _ in v}) > 1}
              for m, by in series.items()}
    panels = {m: by for m, by in panels.items() if by}
    if not panels:
        return False
    width, height, margin = 560, 380, (70, 40, 20, 55)  # left, top, right, bottom
    image = Image.new("RGB", (width * len(panels), height + 110), "white")
    draw = ImageDraw.Draw(image)
    title, small = _font(16), _font(12)
    for k, (model, by) in enumerate(panels.items()):
        concurrencies = sorted({c for v in by.values() for c, _ in v})
        axes = _Axes(
            (k * width + margin[0], margin[1], (k + 1) * width - margin[2], height - margin[3]),
            concurrencies[0], concurrencies[-1], _nice(max(y for v in by.values() for _, y in v)),
        )
        x0, y0, x1, y1 = axes.box
        draw.text((x0, 10), f"{model}: items/s vs concurrent clients", fill="black", font=title)
        draw.line([(x0, y0), (x0, y1), (x1, y1)], fill="black")
        for i in range(5):
            value = axes.top * i / 4
            _, y = axes.xy(concurrencies[0], value)
            draw.line([(x0 - 4, y), (x0, y)], fill="black")
            draw.line([(x0 + 1, y), (x1, y)], fill=(230, 230, 230))
            draw.text((x0 - 8, y), f"{value:g}", fill="black", font=small, anchor="rm")
        for c in concurrencies:
            x, _ = axes.xy(c, 0)
            draw.line([(x, y1), (x, y1 + 4)], fill="black")
            draw.text((x, y1 + 8), str(c), fill="black", font=small, anchor="mt")
        draw.text(((x0 + x1) / 2, y1 + 26), "clients (log scale)", fill="black", font=small,
                  anchor="mt")
        for j, (scenario, values) in enumerate(sorted(by.items())):
            colour = PALETTE[j % len(PALETTE)]
            xy = [axes.xy(c, y) for c, y in values]
            draw.line(xy, fill=colour, width=2)
            for x, y in xy:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            lx, ly = x0 + (j % 2) * 240, height + 10 + (j // 2) * 18
            draw.line([(lx, ly + 7), (lx + 20, ly + 7)], fill=colour, width=3)
            draw.text((lx + 26, ly), scenario, fill="black", font=small)
    image.save(path)
    return True


class _Axes:
    """Pixel positions of (clients, items/s) in one panel: log2 x axis, linear y from 0."""

    def __init__(self, box: tuple[int, int, int, int], low: int, high: int, top: float) -> None:
        self.box = box
        self.top = top
        self._lo, self._hi = math.log2(low), math.log2(high)

    def xy(self, clients: int, value: float) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        span = self._hi - self._lo
        fx = (math.log2(clients) - self._lo) / span if span > 0 else 0.5
        return x0 + fx * (x1 - x0), y1 - value / self.top * (y1 - y0)


def _nice(value: float) -> float:
    """A round axis maximum >= value."""
    if value <= 0:
        return 1.0
    exponent = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exponent:
            return step * exponent
    return 10 * exponent
