"""Procedurally generated image–caption pairs: coloured shapes on textured backgrounds.

This is the data of clipserve's demo model (`clipserve-demo`): the model is trained on it by
`clipserve.export.train_demo` and evaluated on it, in process and through the server, to show
that preprocessing, tokenisation, normalisation and logit scaling are right end to end. It needs
only numpy and Pillow, so the server's tests and the evaluation client can use it without torch.

Every image holds one shape of one colour (the class, e.g. ``"red circle"``: 6 shapes x 6 colours)
at a random size, position and rotation, on a dark, tinted, textured and noisy background. Images
have random sides of 200-400 px (rarely square), and the shape always lies inside the centre
square that a shortest-side resize followed by a centre crop keeps.

Determinism: item ``i`` of split ``s`` with seed ``k`` is drawn from its own random stream
``SeedSequence([k, SPLIT_KEYS[s], i])``, so it does not depend on ``n``, on the order of
iteration or on the other items, and the two splits never share a stream. The same seed gives the
same bytes on every platform (numpy's PCG64 and Pillow's rasteriser are both deterministic).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")

# Reference RGB of each colour name; each image jitters it a little.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 45, 45),
    "green": (55, 200, 70),
    "blue": (50, 100, 245),
    "yellow": (245, 225, 40),
    "purple": (170, 70, 225),
    "orange": (255, 145, 25),
}
_COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

# Class ``i`` is colour ``i % 6`` and shape ``i // 6``: "red circle", "green circle", ...
CLASSES: list[str] = [f"{colour} {shape}" for shape in SHAPES for colour in _COLOUR_NAMES]

# Captions of training pairs: one template is drawn per caption.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {} on a textured background.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
    "a rendering of a {}.",
    "a close-up photo of a {}.",
    "a {} on a noisy background.",
    "a single {}.",
    "there is a {} in the picture.",
    "a {}.",
    "{}",
)

# Prompts of zero-shot classification: the same in the in-process and the served evaluation.
ZERO_SHOT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

SPLIT_KEYS: dict[str, int] = {"train": 1, "heldout": 2}

MIN_SIDE = 200
MAX_SIDE = 400
# Shape placement, relative to the image's shortest side (the side of the centre crop).
RADIUS_RANGE = (0.3, 0.42)
MAX_SHIFT = 0.08
MAX_ROTATION_DEG = 12.0


def shape_and_colour(class_index: int) -> tuple[str, str]:
    """The (shape, colour) names of a class index."""
    _check_class(class_index)
    shape_index, colour_index = divmod(class_index, len(_COLOUR_NAMES))
    return SHAPES[shape_index], _COLOUR_NAMES[colour_index]


def item_rng(split: str, seed: int, index: int) -> np.random.Generator:
    """The random stream of item `index` of `split` (independent of every other item)."""
    if split not in SPLIT_KEYS:
        raise ValueError(f"unknown split {split!r}: expected one of {sorted(SPLIT_KEYS)}")
    if seed < 0 or index < 0:
        raise ValueError("seed and index must be non-negative")
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_KEYS[split], index]))


def caption(class_index: int, rng: np.random.Generator) -> str:
    """A caption of the class from a random template, e.g. "a drawing of a blue star."."""
    _check_class(class_index)
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    return template.format(CLASSES[class_index])


def render(
    class_index: int,
    rng: np.random.Generator,
    size: tuple[int, int] | None = None,
) -> Image.Image:
    """Draw one RGB image of the class; `size` is (width, height), random 200-400 px if None."""
    shape, colour = shape_and_colour(class_index)
    if size is None:
        width, height = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    else:
        width, height = size
    if min(width, height) < 32:
        raise ValueError(f"image size {size} is too small: sides must be >= 32 px")

    background = _background(rng, width, height)  # [H, W, 3] float32 in about 0..255

    # The shape stays inside the centre square kept by shortest-side resize + centre crop.
    side = min(width, height)
    radius = float(rng.uniform(*RADIUS_RANGE)) * side
    slack = max(min(MAX_SHIFT * side, side / 2 - 1.05 * radius - 2.0), 0.0)
    cx = width / 2 + float(rng.uniform(-slack, slack))
    cy = height / 2 + float(rng.uniform(-slack, slack))
    angle = math.radians(float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)))
    mask = _shape_mask(shape, width, height, cx, cy, radius, angle)  # [H, W, 1] bool

    base = np.asarray(COLOURS[colour], dtype=np.float32)
    fill = np.clip(base * float(rng.uniform(0.85, 1.08)) + rng.uniform(-18, 18, size=3), 0, 255)
    image = np.where(mask, fill.astype(np.float32), background)  # [H, W, 3]

    # Pixel noise, uniform with a random amplitude (0..+-14 levels), over shape and background.
    amplitude = float(rng.uniform(0.0, 14.0)) / 127.5
    noise = np.frombuffer(rng.bytes(height * width * 3), dtype=np.uint8).reshape(height, width, 3)
    image += (noise.astype(np.float32) - 127.5) * amplitude
    np.clip(image + 0.5, 0, 255, out=image)
    return Image.fromarray(image.astype(np.uint8))  # [H, W, 3] uint8: RGB


class Sample(NamedTuple):
    """One generated item: unpacks as ``image, label``."""

    image: Image.Image
    label: int


def dataset(split: str, n: int, seed: int = 0) -> Iterator[Sample]:
    """Yield `n` (image, class_index) samples of `split`; item i is of class ``i % len(CLASSES)``.

    Classes are balanced (every run of ``len(CLASSES)`` items holds each class once), and item i
    is the same for every `n` > i.
    """
    if n < 0:
        raise ValueError("n must be non-negative")
    for index in range(n):
        rng = item_rng(split, seed, index)
        class_index = index % len(CLASSES)
        yield Sample(render(class_index, rng), class_index)


def folder_name(class_name: str) -> str:
    """The ImageFolder sub-folder of a class: spaces become underscores ("red_circle")."""
    return class_name.replace(" ", "_")


def class_name_from_folder(folder: str) -> str:
    """The class name of an ImageFolder sub-folder written by `write_image_folder`."""
    return folder.replace("_", " ")


def write_image_folder(
    root: Path | str,
    n_per_class: int,
    seed: int = 0,
    split: str = "heldout",
) -> list[tuple[Path, int]]:
    """Write ``root/<folder_name(class)>/<item:05d>.png`` (lossless) and return (path, class).

    The images are those of ``dataset(split, n_per_class * len(CLASSES), seed)``, so an
    evaluation that reads the folder sees the same pixels as one that calls `dataset`.
    """
    root = Path(root)
    for name in CLASSES:
        (root / folder_name(name)).mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, int]] = []
    for index, (image, class_index) in enumerate(
        dataset(split, n_per_class * len(CLASSES), seed)
    ):
        path = root / folder_name(CLASSES[class_index]) / f"{index:05d}.png"
        image.save(path, format="PNG")
        written.append((path, class_index))
    logger.info("wrote %d images of %d classes to %s", len(written), len(CLASSES), root)
    return written


def _check_class(class_index: int) -> None:
    if not 0 <= class_index < len(CLASSES):
        raise ValueError(f"class index {class_index} out of range 0..{len(CLASSES) - 1}")


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A dark, tinted, low-saturation background with smooth blotches and a linear gradient.

    Dark, so that every shape colour is brighter than its background: shape outlines are then
    visible in plain brightness, whatever the colour, which a small ViT learns far sooner.
    """
    grey = float(rng.uniform(15, 50))
    tint = rng.uniform(-10, 10, size=3).astype(np.float32)
    # Smooth texture: a coarse random grid upsampled bicubically.
    grid = rng.uniform(0, 255, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9))))
    coarse = Image.fromarray(grid.astype(np.uint8))  # 2-D uint8: mode L
    coarse = coarse.resize((width, height), Image.Resampling.BICUBIC)
    blotches = (np.asarray(coarse, dtype=np.float32) - 127.5) / 127.5  # [H, W] in -1..1
    amplitude = float(rng.uniform(3, 15))
    # Gradient in a random direction.
    theta = float(rng.uniform(0, 2 * math.pi))
    ys = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None]
    xs = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :]
    gradient = float(rng.uniform(0, 20)) * (math.cos(theta) * xs + math.sin(theta) * ys)
    level = grey + amplitude * blotches + gradient  # [H, W]
    return level[:, :, None] + tint[None, None, :]  # [H, W, 3]


def _polygon(shape: str) -> list[tuple[float, float]]:
    """Vertices of the shape in unit coordinates (radius about 1, y pointing down)."""
    if shape == "circle":
        steps = 96
        return [(math.cos(2 * math.pi * k / steps), math.sin(2 * math.pi * k / steps)) for k in
                range(steps)]
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "triangle":
        return [(math.cos(a), math.sin(a) + 0.15) for a in
                (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        points = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.42
            a = -math.pi / 2 + k * math.pi / 5
            points.append((r * math.cos(a), r * math.sin(a)))
        return points
    if shape == "cross":
        w = 0.32
        return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
                (-1, w), (-1, -w), (-w, -w)]
    if shape == "heart":
        points = []
        for k in range(96):
            t = 2 * math.pi * k / 96
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append((x / 16.5, -y / 16.5 - 0.1))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def _shape_mask(
    shape: str, width: int, height: int, cx: float, cy: float, radius: float, angle: float
) -> np.ndarray:
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    vertices = [
        (cx + radius * (x * cos_a - y * sin_a), cy + radius * (x * sin_a + y * cos_a))
        for x, y in _polygon(shape)
    ]
    canvas = Image.new("1", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(vertices, fill=1)
    return np.asarray(canvas, dtype=bool)[:, :, None]  # [H, W, 1]
