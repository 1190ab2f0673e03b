"""The confusion matrix of a zero-shot run as a PNG, drawn with Pillow (no plotting library).

Rows are true classes, columns predicted ones; a cell's shade grows with its share of the row
(white 0, dark blue 1, on a square-root scale so that rare confusions show). Up to
`LABELLED_MAX_CLASSES` classes the picture names every row and column (and prints the counts
when they fit); beyond that it is a plain heatmap, one small square per cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

LABELLED_MAX_CLASSES = 50
COUNTS_MAX_CLASSES = 40
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
GRID = (200, 200, 200)
LOW = np.array([255, 255, 255], dtype=np.float32)
HIGH = np.array([8, 48, 107], dtype=np.float32)
MARGIN = 12

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def _font(size: int) -> Font:
    """Pillow's bundled font at `size` px (a fixed bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # pragma: no cover - Pillow built without FreeType
        return ImageFont.load_default()


def _text_size(font: Font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return int(right - left), int(bottom - min(top, 0))


def row_shares(confusion: npt.NDArray[np.integer]) -> npt.NDArray[np.float32]:
    """Each row divided by its sum (rows without images stay 0): [C, C] in 0..1."""
    counts = confusion.astype(np.float32)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def _colours(shares: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """[C, C] shares -> [C, C, 3] RGB between `LOW` and `HIGH`, by the square root of the share
    so that rare confusions (a few percent of a row) still show."""
    mix = LOW + (HIGH - LOW) * np.sqrt(shares)[:, :, None]
    return np.clip(mix + 0.5, 0, 255).astype(np.uint8)


def confusion_image(
    confusion: npt.NDArray[np.integer], class_names: Sequence[str], title: str = ""
) -> Image.Image:
    """The picture of a confusion matrix [C, C] (rows true, columns predicted)."""
    size = confusion.shape[0]
    if confusion.shape != (size, size) or len(class_names) != size or size == 0:
        raise ValueError(
            f"need a square confusion matrix with one name per class, got {confusion.shape} "
            f"and {len(class_names)} names"
        )
    if size <= LABELLED_MAX_CLASSES:
        return _labelled(confusion, class_names, title)
    return _heatmap(confusion, title)


def save_confusion_png(
    path: Path, confusion: npt.NDArray[np.integer], class_names: Sequence[str], title: str = ""
) -> None:
    """Write `confusion_image` as a PNG file."""
    confusion_image(confusion, class_names, title).save(path, format="PNG")


def _heatmap(confusion: npt.NDArray[np.integer], title: str) -> Image.Image:
    size = confusion.shape[0]
    cell = max(1, min(8, 1000 // size))
    cells = Image.fromarray(_colours(row_shares(confusion)), mode="RGB")
    cells = cells.resize((size * cell, size * cell), Image.Resampling.NEAREST)
    font = _font(14)
    text = title or "confusion"
    text += f"  ({size} classes; rows true, columns predicted; shade = sqrt of share of row)"
    text_w, text_h = _text_size(font, text)
    width = max(cells.width, text_w) + 2 * MARGIN
    image = Image.new("RGB", (width, cells.height + text_h + 3 * MARGIN), BACKGROUND)
    ImageDraw.Draw(image).text((MARGIN, MARGIN), text, fill=INK, font=font)
    image.paste(cells, (MARGIN, text_h + 2 * MARGIN))
    return image


def _vertical_text(text: str, font: Font, height: int) -> Image.Image:
    """`text` written bottom to top, in a strip `height` px tall."""
    text_w, text_h = _text_size(font, text)
    strip = Image.new("RGB", (max(text_w, 1), height), BACKGROUND)
    ImageDraw.Draw(strip).text((0, (height - text_h) // 2), text, fill=INK, font=font)
    return strip.rotate(90, expand=True)


def _labelled(
    confusion: npt.NDArray[np.integer], class_names: Sequence[str], title: str
) -> Image.Image:
    size = confusion.shape[0]
    cell = max(16, min(32, 720 // size))
    font = _font(max(9, int(cell * 0.55)))
    title_font = _font(16)
    shares = row_shares(confusion)
    colours = _colours(shares)

    label_w = max(_text_size(font, name)[0] for name in class_names)
    axis_h = _text_size(title_font, "predicted class")[1]
    title_h = _text_size(title_font, title or "x")[1]
    left = MARGIN + axis_h + MARGIN + label_w + 6
    top = MARGIN + title_h + MARGIN + axis_h + MARGIN + label_w + 6
    grid = size * cell
    width = max(left + grid + MARGIN, MARGIN + _text_size(title_font, title)[0] + MARGIN)
    image = Image.new("RGB", (width, top + grid + MARGIN), BACKGROUND)
    draw = ImageDraw.Draw(image)

    draw.text((MARGIN, MARGIN), title, fill=INK, font=title_font)
    axis_y = MARGIN + title_h + MARGIN
    draw.text((left, axis_y), "predicted class", fill=INK, font=title_font)
    axis = _vertical_text("true class", title_font, _text_size(title_font, "true class")[1])
    image.paste(axis, (MARGIN, top + max((grid - axis.height) // 2, 0)))

    for i, name in enumerate(class_names):
        text_w, text_h = _text_size(font, name)
        y = top + i * cell + (cell - text_h) // 2
        draw.text((left - 6 - text_w, y), name, fill=INK, font=font)  # row label, right-aligned
        column = _vertical_text(name, font, cell)
        image.paste(column, (left + i * cell, top - 6 - column.height))

    for row in range(size):
        for col in range(size):
            x, y = left + col * cell, top + row * cell
            colour = tuple(int(v) for v in colours[row, col])
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=colour, outline=GRID)
            count = int(confusion[row, col])
            if size <= COUNTS_MAX_CLASSES and count:
                text = str(count)
                text_w, text_h = _text_size(font, text)
                ink = BACKGROUND if shares[row, col] > 0.25 else INK
                draw.text((x + (cell - text_w) // 2, y + (cell - text_h) // 2), text, fill=ink,
                          font=font)
    return image
