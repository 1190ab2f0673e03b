"""Real-looking inputs for the parity gate: generated images and varied captions.

Only numpy and Pillow: the export command must not depend on scikit-image or on downloads.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

_COLOURS = [
    (220, 40, 40), (40, 160, 60), (30, 60, 200), (240, 200, 30), (250, 250, 250),
    (10, 10, 10), (130, 70, 180), (255, 140, 0), (90, 200, 220), (150, 150, 150),
]
_SIZES = [(224, 224), (320, 240), (180, 360), (640, 480), (97, 131), (512, 512), (300, 200)]


def sample_images(count: int, seed: int = 0) -> list[Image.Image]:
    """`count` RGB images of varied size, aspect ratio and content (deterministic)."""
    rng = np.random.default_rng(seed)
    kinds = (_gradient, _shapes, _noise, _checker, _stripes, _photo_like)
    images = []
    for i in range(count):
        width, height = _SIZES[i % len(_SIZES)]
        images.append(kinds[i % len(kinds)](width, height, rng))
    return images


def _gradient(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)  # [H, W] each
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, np.pi)
    t = (np.cos(angle) * x / width + np.sin(angle) * y / height) / 2 + 0.25  # [H, W]
    t = np.clip(t, 0, 1)[..., None]
    pixels = start * (1 - t) + end * t  # [H, W, 3]
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def _shapes(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    image = Image.new("RGB", (width, height), _pick(rng))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 7))):
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        box = (x0, y0, max(x1, x0 + 4), max(y1, y0 + 4))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            draw.ellipse(box, fill=_pick(rng))
        elif shape == 1:
            draw.rectangle(box, fill=_pick(rng), outline=_pick(rng), width=3)
        else:
            points = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(3)]
            draw.polygon(points, fill=_pick(rng))
    return image


def _noise(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    base = rng.uniform(60, 200, 3)
    pixels = base + rng.normal(0, 40, (height, width, 3))  # [H, W, 3]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _checker(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    cell = int(rng.integers(8, 40))
    y, x = np.mgrid[0:height, 0:width]
    mask = ((x // cell + y // cell) % 2).astype(bool)[..., None]  # [H, W, 1]
    pixels = np.where(mask, np.array(_pick(rng)), np.array(_pick(rng)))  # [H, W, 3]
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def _stripes(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    freq = rng.uniform(0.02, 0.2)
    x = np.arange(width, dtype=np.float32)
    wave = (np.sin(x * freq) + 1) / 2  # [W]
    grey = np.tile(wave * 255, (height, 1))  # [H, W]
    return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")


def _photo_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A sky-over-ground scene with a blurred sun and some texture."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    horizon = height * rng.uniform(0.4, 0.7)
    sky = np.stack([90 + 0.2 * y, 140 + 0.2 * y, 230 - 0.1 * y], -1)  # [H, W, 3]
    ground = np.stack([60 + 0.1 * y, 120 + 0.05 * y, 40 + 0 * y], -1)
    pixels = np.where((y > horizon)[..., None], ground, sky)
    cx, cy, r = rng.uniform(0, width), rng.uniform(0, horizon), rng.uniform(10, 40)
    sun = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r**2))[..., None]
    pixels = pixels * (1 - sun) + np.array([255, 240, 180]) * sun
    pixels += rng.normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _pick(rng: np.random.Generator) -> tuple[int, int, int]:
    return _COLOURS[int(rng.integers(0, len(_COLOURS)))]


def sample_texts(count: int) -> list[str]:
    """`count` captions: short, long (> 77 tokens), empty, punctuation, non-ASCII."""
    base = [
        "",
        "a photo of a dog.",
        "A close-up photo of a RED apple on a wooden table!",
        "a diagram",
        "an origami crane, folded from blue paper, sitting next to a cup of green tea "
        "on a sunny windowsill in the early morning light " * 3,
        "“Café crème” & croissants — 2 for €5 :)",
        "東京タワーの夜景",
        "a bad photo of the airliner.",
        "it's a painting of a cat; isn't it?",
        "the number 42",
        "a tattoo of a goldfish.",
        "a sketch of a mountain range at dusk, with snow.",
        "🐶🐱 emoji pets",
        "    extra   whitespace\tand\nnewlines   ",
        "a low resolution photo of the red panda.",
        "a rendering of a black and white striped zebra standing in tall savanna grass",
        "x",
    ]
    texts = []
    while len(texts) < count:
        texts.extend(base)
    return texts[:count]
