"""clipserve.server.preprocess: parity with open_clip, modes, formats, EXIF, limits, tensors.

Parity is measured in 8-bit pixel units: ``mean(|ours - ref| * std) * 255`` over every value
of the two normalised [3, S, S] tensors, i.e. the mean absolute difference of the un-normalised
images on the 0..255 scale. The requirement is < 0.5; the exact (default) mode is bit-for-bit
but for rare +-1 rounding flips, so it is also held to < 0.01.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import warnings
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps
from skimage import data as skdata

from clipserve.repository import Preprocess
from clipserve.server import preprocess
from clipserve.server.errors import InvalidInput
from clipserve.server.preprocess import ImagePreprocessor

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
SUPPORTED = "(supported: JPEG, PNG, WebP, BMP, GIF)"
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")
SIZES = (
    (7, 5), (1, 1), (1, 37), (37, 1), (300, 500), (500, 300), (224, 224), (225, 224), (1920, 1080),
)  # fmt: skip
# (Pillow mode, container, save options): every mode the allowed formats decode to.
ENCODINGS = (
    ("RGB", "JPEG", {"quality": 90}),
    ("RGB", "PNG", {}),
    ("RGB", "WEBP", {"quality": 90}),
    ("RGB", "BMP", {}),
    ("P", "GIF", {}),
    ("L", "PNG", {}),
    ("LA", "PNG", {}),
    ("RGBA", "PNG", {}),
    ("RGBA", "WEBP", {"lossless": True}),
    ("P", "PNG", {"transparency": 0}),
    ("1", "BMP", {}),
    ("CMYK", "JPEG", {"quality": 90}),
    ("L", "JPEG", {"quality": 90}),
)


def photo(name: str, width: int, height: int) -> Image.Image:
    return Image.fromarray(getattr(skdata, name)()).resize((width, height), Image.LANCZOS)


def with_alpha(img: Image.Image) -> Image.Image:
    """Add a diagonal alpha ramp, transparent to opaque, so premultiplication matters."""
    rgba = np.asarray(img.convert("RGBA")).copy()  # [H, W, 4]
    h, w = rgba.shape[:2]
    ramp = np.add.outer(np.arange(h) / max(h, 1), np.arange(w) / max(w, 1)) * 127.5
    rgba[..., 3] = ramp.astype(np.uint8)
    return Image.fromarray(rgba)


def encode(img: Image.Image, mode: str, fmt: str, **options: object) -> bytes:
    if mode in ("RGBA", "LA"):
        img = with_alpha(img).convert(mode)
    elif mode != img.mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def pixel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """Mean |ours - ref| on the 0..255 scale (normalised values scaled back by std)."""
    std = np.asarray(STD, dtype=np.float64).reshape(3, 1, 1)
    return float(np.mean(np.abs(ours.astype(np.float64) - ref) * std) * 255.0)


def config(
    resize_mode: str = "shortest", interpolation: str = "bicubic", size: int = 224
) -> Preprocess:
    return Preprocess(size, MEAN, STD, interpolation, resize_mode)


def reference(cfg: Preprocess) -> Callable[[Image.Image], np.ndarray]:
    """open_clip's own evaluation transform for ``cfg``: PIL image -> float32 [3, S, S]."""
    transform_module = pytest.importorskip("open_clip.transform")
    transform = transform_module.image_transform_v2(
        transform_module.PreprocessCfg(
            size=cfg.size,
            mean=cfg.mean,
            std=cfg.std,
            interpolation=cfg.interpolation,
            resize_mode=cfg.resize_mode,
            fill_color=cfg.fill_color,
        ),
        is_train=False,
    )
    return lambda img: transform(img).numpy()


def parity_images() -> Iterator[tuple[str, bytes]]:
    """Every size in every encoding (the largest in five), cycling through the photos."""
    for i, (width, height) in enumerate(SIZES):
        encodings = ENCODINGS if width * height < 500_000 else ENCODINGS[:5]
        for j, (mode, fmt, options) in enumerate(encodings):
            name = PHOTOS[(i + j) % len(PHOTOS)]
            yield (
                f"{name} {width}x{height} {mode} {fmt}",
                encode(photo(name, width, height), mode, fmt, **options),
            )


@pytest.fixture(scope="module")
def images() -> list[tuple[str, bytes]]:
    return list(parity_images())


@pytest.mark.slow
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("resize_mode", ["shortest", "squash", "longest"])
def test_parity_with_open_clip(
    images: list[tuple[str, bytes]], resize_mode: str, interpolation: str
) -> None:
    cfg = config(resize_mode, interpolation)
    ours, ref = ImagePreprocessor(cfg), reference(cfg)
    errors = {}
    for label, data in images:
        out = ours.decode(data)
        assert out.shape == (3, 224, 224)
        assert out.dtype == np.float32
        assert out.flags.c_contiguous
        errors[label] = pixel_error(out, ref(Image.open(io.BytesIO(data))))
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] < 0.5, f"{worst}: {errors[worst]:.4f}"
    assert errors[worst] < 0.01, f"exact mode drifted from open_clip: {worst}: {errors[worst]:.4f}"


@pytest.mark.parametrize("fill_color", [0, 255])
def test_longest_pads_with_fill_colour_in_the_image_mode(fill_color: int) -> None:
    cfg = Preprocess(224, MEAN, STD, "bicubic", "longest", fill_color)
    ours, ref = ImagePreprocessor(cfg), reference(cfg)
    for mode, fmt, options in ENCODINGS:
        data = encode(photo("rocket", 300, 120), mode, fmt, **options)
        assert pixel_error(ours.decode(data), ref(Image.open(io.BytesIO(data)))) < 0.01, mode


@pytest.mark.slow
def test_fast_mode_parity_on_photos() -> None:
    """Fast mode drafts 1920x1080 JPEGs at 1/2 scale: measured ~0.28, required < 0.5."""
    cfg = config()
    exact, fast, ref = ImagePreprocessor(cfg), ImagePreprocessor(cfg, fast=True), reference(cfg)
    for name in PHOTOS:
        for width, height in ((1920, 1080), (1080, 1920), (4000, 3000)):
            data = encode(photo(name, width, height), "RGB", "JPEG", quality=90)
            expected = ref(Image.open(io.BytesIO(data)))
            error = pixel_error(fast.decode(data), expected)
            assert 0.0 < error < 0.5, (name, width, height, error)  # > 0: the draft was used
            assert pixel_error(exact.decode(data), expected) < 0.01


def test_resize_crop_equals_whole_resize_then_crop() -> None:
    """The boxed two-pass resize of the shortest mode, on noise (no torch involved).

    Pillow takes box corners as float32, so values that sit exactly on a rounding tie (frequent
    with noise and rational scales such as 6/7) may round the other way: +-1 after a pass, up
    to +-2 after both (bicubic lobes), on up to ~7% of the values of a noise image. Alpha is
    kept >= 128 so that un-premultiplying amplifies those by 2 at most.
    """
    rng = np.random.default_rng(7)
    for _ in range(60):
        width, height = (int(v) for v in rng.integers(2, 700, size=2))
        size = int(rng.integers(8, 300))
        mode = str(rng.choice(["L", "RGB", "RGBA"]))
        resample = rng.choice([Image.Resampling.BICUBIC, Image.Resampling.BILINEAR])
        pixels = rng.integers(0, 256, size=(height, width, len(mode)), dtype=np.uint8)
        if mode == "RGBA":
            pixels[..., 3] |= 0x80
        img = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
        geo = preprocess.plan_geometry(width, height, size, "shortest")
        if not geo.resize:
            continue
        left, top = geo.crop
        whole = img.resize(geo.scaled, resample).crop((left, top, left + size, top + size))
        ours = preprocess._resize(img, geo, resample, preprocess._pillow_vertical_first())
        diff = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(whole, dtype=np.int16))
        case = (width, height, size, mode, resample)
        assert diff.max() <= (3 if mode == "RGBA" else 2), case
        assert diff.mean() <= 0.1, case


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", ["RGB", "P", "RGBA"])
@pytest.mark.parametrize("resize_mode", ["shortest", "squash", "longest"])
@pytest.mark.parametrize("shape", [(1, 40_000), (40_000, 1)])
def test_extreme_aspect_ratios_stay_cheap(
    shape: tuple[int, int], resize_mode: str, mode: str
) -> None:
    """open_clip would resize 1 x 40000 to 224 x 8960000 before cropping; we do not."""
    buf = io.BytesIO()
    Image.new("RGB", shape, (255, 0, 0)).convert(mode).save(buf, "PNG")
    out = ImagePreprocessor(config(resize_mode)).decode(buf.getvalue())
    assert np.isfinite(out).all()
    red = np.isclose(out[0], (1.0 - MEAN[0]) / STD[0], atol=1e-5)  # [S, S]
    # longest: a 1-pixel red line on the fill colour; otherwise red everywhere
    assert red.sum() == (224 if resize_mode == "longest" else 224 * 224)


# -- modes ---------------------------------------------------------------------------------


def test_sixteen_bit_greyscale_is_scaled_not_clipped_to_white() -> None:
    ramp = np.linspace(0, 65535, 300 * 200).reshape(200, 300).astype(np.uint16)  # [H, W]
    data = encode(Image.fromarray(ramp), "I;16", "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    cfg = config()
    out = ImagePreprocessor(cfg).decode(data)
    eight_bit = Image.fromarray(np.rint(ramp / 257.0).astype(np.uint8), "L")
    assert pixel_error(out, reference(cfg)(eight_bit)) < 0.01
    pixels = out * np.asarray(STD).reshape(3, 1, 1) + np.asarray(MEAN).reshape(3, 1, 1)
    assert 0.3 < pixels.mean() < 0.7  # a ramp, not white (1.0)


def test_rare_modes_are_brought_to_rgb_correctly() -> None:
    values = np.array([[0, 1000, 65535, 70000]], dtype=np.int32)
    as_l = preprocess._native_mode(Image.fromarray(values, "I"))
    assert as_l.mode == "L"
    assert np.asarray(as_l).tolist() == [[0, 4, 255, 255]]
    floats = preprocess._native_mode(Image.fromarray(np.array([[-5.0, 12.4, 300.0]], np.float32)))
    assert np.asarray(floats).tolist() == [[0, 12, 255]]
    pa = Image.new("PA", (4, 4))
    assert preprocess._native_mode(pa).mode == "RGBA"
    for mode in ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK"):
        assert preprocess._native_mode(Image.new(mode, (2, 2))).mode == mode


def test_first_frame_of_animations() -> None:
    frames = [Image.new("RGB", (64, 48), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    pp = ImagePreprocessor(config())
    first = pp.decode(encode(frames[0], "RGB", "PNG"))
    for fmt in ("GIF", "WEBP", "PNG"):
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100)
        assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 2
        assert pixel_error(pp.decode(buf.getvalue()), first) < 1.0, fmt


# -- EXIF orientation ----------------------------------------------------------------------

_INVERSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def stored_with_orientation(upright: Image.Image, orientation: int, fmt: str) -> bytes:
    """The bytes a camera would write: pixels stored turned, EXIF saying how to turn them back."""
    stored = upright.transpose(_INVERSE[orientation]) if orientation in _INVERSE else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    options = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {})
    stored.save(buf, fmt, exif=exif, **options)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation: int, fmt: str) -> None:
    upright = photo("astronaut", 320, 200)
    data = stored_with_orientation(upright, orientation, fmt)
    pp = ImagePreprocessor(config())
    got = pp.decode(data)
    # The same decoded pixels turned by Pillow's own exif_transpose, then stored without EXIF.
    turned = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert turned.size == (320, 200)
    assert np.array_equal(got, pp.decode(encode(turned, "RGB", "PNG")))
    if fmt != "JPEG":  # lossless: also the very pixels before they were turned
        assert np.array_equal(got, pp.decode(encode(upright, "RGB", "PNG")))


@pytest.mark.slow
@pytest.mark.parametrize("orientation", range(1, 9))
def test_fast_mode_keeps_orientation_and_alignment(orientation: int) -> None:
    """Draft decoding of an odd-sized JPEG: the surplus pixel lands on the right side."""
    upright = photo("coffee", 1921, 1081)
    data = stored_with_orientation(upright, orientation, "JPEG")
    cfg = config()
    fast = ImagePreprocessor(cfg, fast=True).decode(data)
    expected = reference(cfg)(Image.open(io.BytesIO(encode(upright, "RGB", "PNG"))))
    assert pixel_error(fast, expected) < 0.5


# -- errors --------------------------------------------------------------------------------


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_declaring(width: int, height: int) -> bytes:
    """A small, well-formed PNG whose IHDR declares ``width`` x ``height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def gif_with_frame(screen: tuple[int, int], frame: tuple[int, int]) -> bytes:
    """A GIF whose first frame is larger than its logical screen (Pillow grows the canvas)."""
    header = b"GIF89a" + struct.pack("<HHBBB", *screen, 0, 0, 0)
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, *frame, 0)
    return header + descriptor + b"\x02\x02\x44\x01\x00;"


def webp_declaring(width: int, height: int) -> bytes:
    """The first 30 bytes of an extended WebP whose canvas is ``width`` x ``height``."""
    vp8x = b"\0\0\0\0" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 22) + b"WEBP" + b"VP8X" + struct.pack("<I", 10) + vp8x


def encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buf, fmt)
    return buf.getvalue()


SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty image data"),
        (b"hello, world", f"cannot identify image format {SUPPORTED}"),
        (encoded("TIFF"), f"image format TIFF is not supported {SUPPORTED}"),
        (encoded("ICO"), f"image format ICO is not supported {SUPPORTED}"),
        (encoded("PDF"), f"image format PDF is not supported {SUPPORTED}"),
        (encoded("PPM"), f"image format PNM (PBM/PGM/PPM) is not supported {SUPPORTED}"),
        (SVG, f"image format SVG is not supported {SUPPORTED}"),
        (
            b"<svg xmlns='http://www.w3.org/2000/svg'/>",
            f"image format SVG is not supported {SUPPORTED}",
        ),
        (b"\0\0\0\x1cftypheic" + b"\0" * 20, f"image format HEIC is not supported {SUPPORTED}"),
        (b"\0\0\0\x1cftypavif" + b"\0" * 20, f"image format AVIF is not supported {SUPPORTED}"),
        (
            png_declaring(30_000, 30_000),
            "image has 900000000 pixels, above the limit of 40000000 (max_image_pixels)",
        ),
        (
            png_declaring(10_000, 5_000),  # below Pillow's own limit, above ours
            "image has 50000000 pixels, above the limit of 40000000 (max_image_pixels)",
        ),
        (
            gif_with_frame((10, 10), (20_000, 20_000)),  # Pillow's DecompressionBombError
            "image has 400000000 pixels, above the limit of 40000000 (max_image_pixels)",
        ),
        (
            webp_declaring(16_000, 16_000),  # refused before libwebp allocates the canvas
            "image has 256000000 pixels, above the limit of 40000000 (max_image_pixels)",
        ),
        (encoded("JPEG")[:200], "image is truncated or corrupt: Truncated File Read"),
        (b"\x89PNG\r\n\x1a\n" + b"junk" * 8, "image is truncated or corrupt: Truncated File Read"),
        (b"BM" + b"\0" * 40, "image is truncated or corrupt: Unsupported BMP header type (0)"),
    ],
)
def test_invalid_images_are_refused_with_a_precise_message(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        ImagePreprocessor(config()).decode(data)
    assert info.value.detail == message
    assert info.value.item is None
    assert str(info.value.at("images[3]")) == f"images[3]: {message}"


def test_the_decoder_gets_the_whole_image_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each decoder call lets go of the interpreter lock: one call, not one per 64 KiB."""
    calls: list[int] = []
    real = Image._getdecoder

    class Counting:
        def __init__(self, decoder: object) -> None:
            self._decoder = decoder

        def decode(self, data: bytes) -> object:
            calls.append(len(data))
            return self._decoder.decode(data)  # type: ignore[attr-defined]

        def __getattr__(self, name: str) -> object:
            return getattr(self._decoder, name)

    def getdecoder(mode: str, name: str, *args: object) -> object:
        return Counting(real(mode, name, *args)) if name == "jpeg" else real(mode, name, *args)

    monkeypatch.setattr(Image, "_getdecoder", getdecoder)
    noise = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "RGB", "JPEG")
    assert len(data) > 4 * ImageFile.MAXBLOCK
    out = ImagePreprocessor(config()).decode(data)
    assert calls == [len(data)]
    monkeypatch.setattr(Image, "_getdecoder", real)
    np.testing.assert_array_equal(out, ImagePreprocessor(config()).decode(data))


def test_truncated_pixel_data_is_refused() -> None:
    data = encode(photo("chelsea", 300, 200), "RGB", "PNG")
    with pytest.raises(InvalidInput, match=r"^image is truncated or corrupt: "):
        ImagePreprocessor(config()).decode(data[: len(data) // 2])


def test_bomb_is_refused_before_any_pixel_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    data = png_declaring(30_000, 30_000)
    assert len(data) < 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor any DecompressionBombWarning on the way
        with pytest.raises(InvalidInput, match="900000000 pixels"):
            ImagePreprocessor(config()).decode(data)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's process-wide limit is left alone


@pytest.mark.parametrize("action", ["error", "ignore", "always"])
def test_pillow_bomb_warning_maps_to_invalid_input(action: str) -> None:
    """A GIF frame of 100M pixels: above Pillow's warning limit, below its error limit.

    Pillow warns while reading the frame header, before our own check can see the size; with
    the default filters the warning is logged, then the image is refused all the same.
    """
    data = gif_with_frame((10, 10), (10_000, 10_000))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter(action)  # whatever the deployment's filters do with it
        with pytest.raises(InvalidInput) as info:
            ImagePreprocessor(config()).decode(data)
    expected = "image has 100000000 pixels, above the limit of 40000000 (max_image_pixels)"
    assert info.value.detail == expected
    kinds = {warning.category for warning in caught}
    assert kinds == ({Image.DecompressionBombWarning} if action == "always" else set())


def test_limits_are_configurable() -> None:
    data = encode(photo("coffee", 64, 48), "RGB", "PNG")
    with pytest.raises(InvalidInput) as info:
        ImagePreprocessor(config(), max_image_bytes=100).decode(data)
    assert (
        info.value.detail
        == f"image data has {len(data)} bytes, above the limit of 100 (max_image_bytes)"
    )
    with pytest.raises(InvalidInput) as info:
        ImagePreprocessor(config(), max_image_pixels=3000).decode(data)
    assert info.value.detail == "image has 3072 pixels, above the limit of 3000 (max_image_pixels)"
    assert ImagePreprocessor(config(), max_image_pixels=3072).decode(data).shape == (3, 224, 224)


def test_bad_configuration_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="interpolation"):
        ImagePreprocessor(Preprocess(224, MEAN, STD, "lanczos"))
    with pytest.raises(ValueError, match="resize_mode"):
        ImagePreprocessor(Preprocess(224, MEAN, STD, "bicubic", "fit"))
    with pytest.raises(ValueError, match="size"):
        ImagePreprocessor(Preprocess(0, MEAN, STD))


# -- tensors ---------------------------------------------------------------------------------


def test_tensor_float32_and_float16() -> None:
    pp = ImagePreprocessor(config(size=32))
    assert pp.output_shape == (3, 32, 32)
    values = np.random.default_rng(0).standard_normal((3, 32, 32)).astype(np.float32)
    data = values.astype("<f4").tobytes()
    out = pp.from_tensor([3, 32, 32], "float32", data)
    assert out.dtype == np.float32
    assert out.flags.c_contiguous
    assert out.flags.writeable
    assert np.array_equal(out, values)
    half = pp.from_tensor((3, 32, 32), "float16", values.astype("<f2").tobytes())
    assert half.dtype == np.float32
    assert np.array_equal(half, values.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize(
    ("shape", "dtype", "data", "message"),
    [
        ([3, 32, 32], "int8", b"", "tensor dtype must be float32 or float16, got 'int8'"),
        ([3, 32, 32], "FP32", b"", "tensor dtype must be float32 or float16, got 'FP32'"),
        ([1, 3, 32, 32], "float32", b"", "tensor shape must be [3, 32, 32], got [1, 3, 32, 32]"),
        ([32, 32, 3], "float32", b"", "tensor shape must be [3, 32, 32], got [32, 32, 3]"),
        (
            [3, 32, 32],
            "float32",
            b"\0" * 10,
            "tensor data has 10 bytes, expected 12288 for float32 [3, 32, 32]",
        ),
        (
            [3, 32, 32],
            "float16",
            b"\0" * 12288,
            "tensor data has 12288 bytes, expected 6144 for float16 [3, 32, 32]",
        ),
    ],
)
def test_tensor_errors(shape: list[int], dtype: str, data: bytes, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        ImagePreprocessor(config(size=32)).from_tensor(shape, dtype, data)
    assert info.value.detail == message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tensor_non_finite_values_are_refused(bad: float, dtype: str) -> None:
    values = np.zeros((3, 32, 32), dtype=np.float32)
    values[1, 2, 3] = values[2, 0, 0] = bad
    data = values.astype("<f4" if dtype == "float32" else "<f2").tobytes()
    with pytest.raises(InvalidInput) as info:
        ImagePreprocessor(config(size=32)).from_tensor([3, 32, 32], dtype, data)
    assert info.value.detail == "tensor contains NaN or Inf (2 of 3072 values)"


def test_out_writes_into_a_batch_row() -> None:
    pp = ImagePreprocessor(config(size=32))
    batch = np.zeros((4, 3, 32, 32), dtype=np.float32)  # [N, 3, S, S]
    data = encode(photo("rocket", 64, 48), "RGB", "PNG")
    result = pp.decode(data, out=batch[2])
    assert result is batch[2] or np.shares_memory(result, batch)
    assert np.array_equal(batch[2], pp.decode(data))
    tensor = np.ones((3, 32, 32), dtype="<f4").tobytes()
    pp.from_tensor([3, 32, 32], "float32", tensor, out=batch[0])
    assert (batch[0] == 1).all()
    assert (batch[1] == 0).all()
    with pytest.raises(ValueError, match="out must be"):
        pp.decode(data, out=np.zeros((3, 32, 32), dtype=np.float64))
    with pytest.raises(ValueError, match="out must be"):
        pp.decode(data, out=batch[:, 0])


def test_server_module_does_not_import_torch() -> None:
    code = "import sys, clipserve.server.preprocess; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
