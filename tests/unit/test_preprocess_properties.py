"""Property tests of clipserve.server.preprocess (hypothesis).

* Arbitrary bytes, bytes behind a valid magic number, and valid images with bytes overwritten
  or cut off: ``decode`` returns a finite float32 [3, S, S] or raises InvalidInput, nothing
  else, and within the deadline (no hang).
* Valid images of random sizes, modes, formats, EXIF orientations and configurations: always a
  finite, C-contiguous float32 [3, S, S].
"""

from __future__ import annotations

import io
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from clipserve.repository import INTERPOLATIONS, RESIZE_MODES, Preprocess
from clipserve.server.errors import InvalidInput
from clipserve.server.preprocess import ImagePreprocessor

pytestmark = pytest.mark.filterwarnings("error")  # no warning may escape either

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
SIZE = 32
# A lower pixel limit than the server's keeps the mutated-header cases quick.
PREPROCESSOR = ImagePreprocessor(Preprocess(SIZE, MEAN, STD), max_image_pixels=1_000_000)
FAST = ImagePreprocessor(Preprocess(SIZE, MEAN, STD), max_image_pixels=1_000_000, fast=True)
SIMD = ImagePreprocessor(Preprocess(SIZE, MEAN, STD), max_image_pixels=1_000_000, simd=True)
BY_MODE = {"exact": PREPROCESSOR, "fast": FAST, "simd": SIMD}
PATHS = st.sampled_from(sorted(BY_MODE))
FUZZ = settings(
    max_examples=300,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow],
)
MAGICS = (
    b"\xff\xd8\xff",
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    b"\x89PNG\r\n\x1a\n",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"RIFF\x00\x00\x00\x00WEBPVP8L",
    b"RIFF\x00\x00\x00\x00WEBPVP8X",
    b"II*\x00",
    b"%PDF-1.4",
    b"<svg",
)
# (mode, format, save options) combinations Pillow writes and the server accepts.
ENCODINGS = (
    ("RGB", "JPEG", {"quality": 85}),
    ("L", "JPEG", {}),
    ("CMYK", "JPEG", {}),
    ("RGB", "PNG", {}),
    ("RGBA", "PNG", {}),
    ("LA", "PNG", {}),
    ("L", "PNG", {}),
    ("P", "PNG", {"transparency": 3}),
    ("1", "PNG", {}),
    ("I;16", "PNG", {}),
    ("RGB", "WEBP", {"quality": 80}),
    ("RGBA", "WEBP", {"lossless": True}),
    ("RGB", "BMP", {}),
    ("P", "BMP", {}),
    ("1", "BMP", {}),
    ("P", "GIF", {}),
    ("L", "GIF", {}),
)


def sample_image(width: int, height: int, mode: str, seed: int) -> Image.Image:
    """Noise over a gradient, so that both smooth and sharp content occur."""
    rng = np.random.default_rng(seed)
    gradient = np.add.outer(np.linspace(0, 180, height), np.linspace(0, 60, width))  # [H, W]
    noise = rng.integers(0, 16, size=(height, width, 4))
    rgba = np.clip(gradient[..., None] + noise * (seed % 5), 0, 255).astype(np.uint8)
    base = Image.fromarray(rgba, "RGBA")
    if mode == "I;16":
        return Image.fromarray((gradient * 300).astype(np.uint16))
    if mode == "P":
        return base.convert("RGB").quantize(colors=64)
    return base if mode == "RGBA" else base.convert(mode)


def encode(img: Image.Image, fmt: str, orientation: int = 1, **options: object) -> bytes:
    buf = io.BytesIO()
    if orientation != 1 and fmt in ("JPEG", "PNG", "WEBP"):
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif
    img.save(buf, fmt, **options)
    return buf.getvalue()


def decodes_or_refuses(pp: ImagePreprocessor, data: bytes) -> None:
    refused: InvalidInput | None = None
    try:
        out = pp.decode(data)
    except InvalidInput as exc:  # anything else fails the test
        refused = exc
    if refused is not None:
        assert refused.detail
        assert refused.item is None
        return
    assert out.shape == (3, SIZE, SIZE)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()


@FUZZ
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes(data: bytes) -> None:
    decodes_or_refuses(PREPROCESSOR, data)


@FUZZ
@given(magic=st.sampled_from(MAGICS), tail=st.binary(max_size=4096), path=PATHS)
def test_bytes_behind_a_magic_number(magic: bytes, tail: bytes, path: str) -> None:
    decodes_or_refuses(BY_MODE[path], magic + tail)


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A small valid image with a few bytes overwritten and maybe cut short."""
    mode, fmt, options = draw(st.sampled_from(ENCODINGS))
    width, height = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    data = bytearray(encode(sample_image(width, height, mode, 0), fmt, **options))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(1, len(data)))
    return bytes(data[:cut])


@FUZZ
@given(data=mutated_images(), path=PATHS)
def test_damaged_images(data: bytes, path: str) -> None:
    decodes_or_refuses(BY_MODE[path], data)


@settings(max_examples=150, deadline=timedelta(seconds=10))
@given(
    encoding=st.sampled_from(ENCODINGS),
    width=st.integers(1, 400),
    height=st.integers(1, 400),
    orientation=st.integers(1, 8),
    size=st.sampled_from([1, 7, 32, 224]),
    resize_mode=st.sampled_from(RESIZE_MODES),
    interpolation=st.sampled_from(INTERPOLATIONS),
    fill_color=st.integers(0, 255),
    path=PATHS,
    seed=st.integers(0, 2**16),
)
def test_valid_images_give_finite_tensors(
    encoding: tuple[str, str, dict[str, object]],
    width: int,
    height: int,
    orientation: int,
    size: int,
    resize_mode: str,
    interpolation: str,
    fill_color: int,
    path: str,
    seed: int,
) -> None:
    mode, fmt, options = encoding
    data = encode(sample_image(width, height, mode, seed), fmt, orientation, **options)
    cfg = Preprocess(size, MEAN, STD, interpolation, resize_mode, fill_color)
    out = ImagePreprocessor(cfg, fast=path == "fast", simd=path == "simd").decode(data)
    assert out.shape == (3, size, size)
    assert out.dtype == np.float32
    assert out.flags.c_contiguous
    assert np.isfinite(out).all()
    # Every value is a normalised 8-bit level: (v / 255 - mean) / std with v in 0..255.
    levels = out * np.asarray(STD, np.float32).reshape(3, 1, 1) + np.asarray(MEAN).reshape(3, 1, 1)
    assert levels.min() >= -1e-5
    assert levels.max() <= 1 + 1e-5


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@FUZZ
@given(draw=st.data())
def test_arbitrary_tensors(dtype: str, draw: st.DataObject) -> None:
    """Any shape and bytes: the tensor's own values back as float32 [3, S, S] when the shape
    is right, the bytes are exactly that many values and all are finite; else InvalidInput."""
    wire, width = ("<f4", 32) if dtype == "float32" else ("<f2", 16)
    right = [3, SIZE, SIZE]
    shape = draw.draw(st.one_of(st.just(right), st.lists(st.integers(-2, 40), max_size=4)))
    values: np.ndarray | None = None
    if draw.draw(st.booleans()):  # exactly a tensor's bytes, NaN and Inf among them at times
        values = draw.draw(arrays(
            wire, right, elements=st.floats(width=width),
            fill=st.one_of(st.just(0.0), st.floats(-3, 3, width=width)),
        ))
        data = values.tobytes()
    else:
        data = draw.draw(st.binary(max_size=8192))
    accepted = shape == right and values is not None and bool(np.isfinite(values).all())
    if not accepted:
        with pytest.raises(InvalidInput):
            PREPROCESSOR.from_tensor(shape, dtype, data)
        return
    assert values is not None
    out = PREPROCESSOR.from_tensor(shape, dtype, data)
    assert out.dtype == np.float32
    assert out.shape == (3, SIZE, SIZE)
    np.testing.assert_array_equal(out, values.astype(np.float32))
