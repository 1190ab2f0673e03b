"""The SIMD JPEG path (`ImagePreprocessor(simd=True)`): parity with open_clip, what it leaves
to the exact path, orientation, and errors worded as the exact path words them.

Parity in 8-bit pixel units as in test_preprocess.py; the requirement is < 0.5 per image.
"""

from __future__ import annotations

import ctypes
import gc
import io
import logging
import threading
from typing import Any

import numpy as np
import pytest
from PIL import Image

from benchmarks.bench_preprocess import detail  # the bench's mosaics, the docs' figures
from clipserve.repository import Preprocess
from clipserve.server import preprocess_simd
from clipserve.server.errors import InvalidInput
from clipserve.server.preprocess import ImagePreprocessor, plan_geometry
from clipserve.server.preprocess_simd import FAST_UPSAMPLE_SHRINK, SimdJpeg
from tests.unit.test_preprocess import (
    MEAN,
    PHOTOS,
    STD,
    config,
    encode,
    images,  # noqa: F401  (fixture)
    photo,
    pixel_error,
    reference,
)

# Inside the SIMD path's envelope at size 224 (shrinks of 2 to 24, fast chroma upsampling from 8).
JPEG_SIZES = ((1920, 1080), (1080, 1920), (1280, 720), (640, 480), (448, 448), (2048, 2048))


def jpeg(name: str, width: int, height: int, mode: str = "RGB", **options: object) -> bytes:
    return encode(photo(name, width, height), mode, "JPEG", **{"quality": 90, **options})


def rotated(name: str, width: int, height: int, orientation: int) -> bytes:
    """A JPEG of the photo stored with this EXIF orientation."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    photo(name, width, height).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def simd() -> ImagePreprocessor:
    return ImagePreprocessor(config(), simd=True)


@pytest.mark.slow
@pytest.mark.parametrize("resize_mode", ["shortest", "squash", "longest"])
def test_jpeg_parity_with_open_clip(resize_mode: str) -> None:
    """Photos and detail mosaics, both chroma upsamplings (2048x2048 shrinks by more than
    FAST_UPSAMPLE_SHRINK, the others by less): within the requirement, and not bit-exact
    (> 0: the SIMD path ran, not the exact one)."""
    cfg = config(resize_mode)
    ours, ref = ImagePreprocessor(cfg, simd=True), reference(cfg)
    errors = {}
    for width, height in JPEG_SIZES:
        cases = [(name, jpeg(name, width, height)) for name in PHOTOS]
        cases += [(f"detail {seed}", detail(width, height, seed)) for seed in range(2)]
        for name, data in cases:
            out = ours.decode(data)
            assert out.shape == (3, 224, 224)
            assert out.dtype == np.float32
            errors[f"{name} {width}x{height}"] = pixel_error(out, ref(Image.open(io.BytesIO(data))))
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] < 0.5, f"{worst}: {errors[worst]:.4f}"
    assert min(errors.values()) > 0.0, "the SIMD path did not run"


def noise_jpeg(width: int, height: int, subsampling: int, seed: int = 0) -> bytes:
    """Colour noise: the worst content for resampling and for replicated chroma."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90, subsampling=subsampling)
    return buf.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("size", "resize_mode", "width", "height"),
    [
        (224, "shortest", 448, 448),  # MIN_SHRINK
        (224, "shortest", 449, 672),
        (224, "squash", 1075, 605),
        (224, "shortest", 1920, 1080),  # below FAST_UPSAMPLE_SHRINK: replicated chroma shows here
        (224, "shortest", 1792, 1792),  # FAST_UPSAMPLE_SHRINK: replicated chroma from here
        (128, "shortest", 256, 256),  # MIN_OUTPUT
        (128, "squash", 3000, 3000),  # near MAX_SHRINK
    ],
)
def test_the_envelope_holds_on_colour_noise(
    size: int, resize_mode: str, width: int, height: int
) -> None:
    """At the corners of the envelope (MIN_SHRINK, MAX_SHRINK, MIN_OUTPUT,
    FAST_UPSAMPLE_SHRINK), colour noise with and without chroma subsampling stays within the
    requirement; the SIMD path ran (not bit-exact)."""
    cfg = config(resize_mode, size=size)
    ours, exact = ImagePreprocessor(cfg, simd=True), ImagePreprocessor(cfg)
    for subsampling in (0, 2):  # 4:4:4, 4:2:0
        data = noise_jpeg(width, height, subsampling)
        error = pixel_error(ours.decode(data), exact.decode(data).astype(np.float64))
        assert 0.0 < error < 0.5, (subsampling, error)


@pytest.mark.parametrize(
    ("size", "width", "height"),
    [(224, 336, 336), (224, 300, 500), (100, 1920, 1080), (128, 4000, 3200), (224, 100, 80)],
    ids=["shrink-1.5", "shrink-1.34", "output-100", "shrink-25", "enlarged"],
)
def test_outside_the_envelope_is_the_exact_path(size: int, width: int, height: int) -> None:
    """Shrinks below MIN_SHRINK or above MAX_SHRINK, outputs below MIN_OUTPUT, enlargements:
    bit-identical to the exact path."""
    cfg = config(size=size)
    data = jpeg("chelsea", width, height)
    np.testing.assert_array_equal(
        ImagePreprocessor(cfg, simd=True).decode(data), ImagePreprocessor(cfg).decode(data)
    )
    assert not SimdJpeg(cfg).accepts(plan_geometry(width, height, size, "shortest"))


@pytest.mark.parametrize(
    "options",
    [
        {"progressive": True},
        {"subsampling": 0},  # 4:4:4: no chroma to upsample
        {"subsampling": 1},  # 4:2:2
        {"optimize": True, "restart_marker_rows": 1},
        {"quality": 40},
    ],
    ids=["progressive", "444", "422", "optimized-restarts", "q40"],
)
def test_jpeg_variants_keep_parity(options: dict[str, object]) -> None:
    """Progressive scans, every chroma subsampling, optimised Huffman tables with restart
    markers, heavy quantisation: libjpeg-turbo decodes what Pillow does."""
    cfg = config()
    ours, ref = ImagePreprocessor(cfg, simd=True), reference(cfg)
    for width, height in ((1920, 1080), (640, 480)):
        data = jpeg("coffee", width, height, **options)
        error = pixel_error(ours.decode(data), ref(Image.open(io.BytesIO(data))))
        assert 0.0 < error < 0.5, (options, width, height, error)


@pytest.mark.slow
def test_every_other_image_is_the_exact_paths(images: list[tuple[str, bytes]]) -> None:  # noqa: F811
    """test_preprocess's parity set: what the SIMD path does not take (PNG, WebP, BMP, GIF,
    CMYK JPEGs, and JPEGs outside its envelope: enlargements, plain crops, small shrinks) comes
    out bit-identical to the exact path, and the JPEGs it takes stay within the requirement."""
    cfg = config()
    exact, ours, ref = ImagePreprocessor(cfg), ImagePreprocessor(cfg, simd=True), reference(cfg)
    path, taken = SimdJpeg(cfg), 0
    for label, data in images:
        out = ours.decode(data)
        size = Image.open(io.BytesIO(data)).size
        geo = plan_geometry(*size, cfg.size, cfg.resize_mode)
        if " JPEG" in label and " CMYK " not in label and path.accepts(geo):
            taken += 1
            assert pixel_error(out, ref(Image.open(io.BytesIO(data)))) < 0.5, label
        else:
            np.testing.assert_array_equal(out, exact.decode(data), err_msg=label)
    assert taken >= 1  # the 1920x1080 JPEG


def test_below_the_fast_upsampling_shrink_the_decode_is_pillows() -> None:
    """libjpeg-turbo's default decode through simplejpeg gives Pillow's pixels exactly: what
    the path's parity loses is the resampling alone (and, from FAST_UPSAMPLE_SHRINK, the
    replicated chroma)."""
    path = SimdJpeg(config())
    for name, (width, height) in zip(PHOTOS, ((1920, 1080), (640, 480), (301, 199), (64, 48)),
                                     strict=True):
        for mode in ("RGB", "L"):
            data = jpeg(name, width, height, mode=mode)
            ours = path._jpeg.decode_jpeg(data, "GRAY" if mode == "L" else "RGB")
            pillow = np.asarray(Image.open(io.BytesIO(data)))
            np.testing.assert_array_equal(ours.reshape(pillow.shape), pillow)


def test_bilinear_models_take_the_exact_path() -> None:
    big = jpeg("coffee", 640, 480)
    cfg = config(interpolation="bilinear")
    np.testing.assert_array_equal(
        ImagePreprocessor(cfg, simd=True).decode(big), ImagePreprocessor(cfg).decode(big)
    )
    shrunk = ImagePreprocessor(config(), simd=True).decode(big)
    assert not np.array_equal(shrunk, ImagePreprocessor(config()).decode(big))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_as_the_exact_path(simd: ImagePreprocessor, orientation: int) -> None:
    """Each EXIF orientation is applied by libvips as the exact path applies it with Pillow: a
    wrong flip or rotation of this asymmetric photo would differ by tens of levels."""
    data = rotated("astronaut", 900, 500, orientation)
    exact = ImagePreprocessor(config()).decode(data)
    # > 0: the SIMD path took it (its acceptance is decided before EXIF, on the stored size)
    assert 0.0 < pixel_error(simd.decode(data), exact.astype(np.float64)) < 0.5
    if orientation > 1:  # and the orientation mattered
        upright = ImagePreprocessor(config()).decode(jpeg("astronaut", 900, 500))
        assert pixel_error(exact, upright.astype(np.float64)) > 5


def test_greyscale_jpeg_becomes_three_equal_channels(simd: ImagePreprocessor) -> None:
    data = jpeg("coffee", 800, 600, mode="L")
    out = simd.decode(data)
    std, mean = (np.asarray(v, np.float32).reshape(3, 1, 1) for v in (STD, MEAN))
    pixels = out * std + mean
    np.testing.assert_allclose(pixels[0], pixels[1], atol=1e-6)
    np.testing.assert_allclose(pixels[0], pixels[2], atol=1e-6)
    expected = reference(config())(Image.open(io.BytesIO(data)))
    assert 0.0 < pixel_error(out, expected) < 0.5


def test_corrupt_and_truncated_jpegs_fail_as_on_the_exact_path(simd: ImagePreprocessor) -> None:
    data = jpeg("rocket", 1280, 720)
    exact = ImagePreprocessor(config())
    for bad in (data[: len(data) // 2], data[:600] + bytes(len(data) - 600)):
        with pytest.raises(InvalidInput) as ours:
            simd.decode(bad)
        with pytest.raises(InvalidInput) as theirs:
            exact.decode(bad)
        assert str(ours.value) == str(theirs.value)


def test_out_buffer_and_pixel_limit(simd: ImagePreprocessor) -> None:
    data = jpeg("chelsea", 1280, 720)
    row = np.zeros((2, 3, 224, 224), np.float32)
    assert np.shares_memory(simd.decode(data, out=row[1]), row[1])
    assert not row[0].any()
    np.testing.assert_array_equal(row[1], simd.decode(data))
    limited = ImagePreprocessor(config(), simd=True, max_image_pixels=1280 * 720 - 1)
    with pytest.raises(InvalidInput, match="above the limit of 921599"):
        limited.decode(data)


def test_threads_get_the_same_pixels(simd: ImagePreprocessor) -> None:
    """Both libraries release the interpreter lock; concurrent calls share no state, also
    while each thread's kept pipeline changes geometry (sizes, a rotation) under the others."""
    datas = [jpeg(name, 1280, 720) for name in PHOTOS]
    datas += [jpeg("rocket", 900, 500), rotated("coffee", 720, 1280, 6)]
    expected = [simd.decode(d) for d in datas]
    results: dict[int, list[np.ndarray]] = {}
    steps = 12

    def work(k: int) -> None:  # thread k: four images of one size, then every image by turns
        results[k] = [simd.decode(datas[pick(k, i)]) for i in range(steps)]

    def pick(k: int, i: int) -> int:
        return (k + i) % 4 if i < 4 else (k + i) % len(datas)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 1, 2, 3]  # every thread finished without an exception
    for k, outs in results.items():
        for i, out in enumerate(outs):
            np.testing.assert_array_equal(out, expected[pick(k, i)], err_msg=f"thread {k}, {i}")


Built = tuple[tuple[int, ...], int]  # the decoded (rows, cols, bands) and the orientation


def count_builds(pp: ImagePreprocessor, monkeypatch: pytest.MonkeyPatch) -> list[Built]:
    """What the pipelines that ``pp``'s SIMD path builds from now on are for."""
    path = pp._simd
    assert isinstance(path, SimdJpeg)
    built: list[Built] = []
    build = path._build_pipeline

    def spy(decoded: np.ndarray, key: Any) -> object:
        built.append((decoded.shape, key.orientation))
        return build(decoded, key)

    monkeypatch.setattr(path, "_build_pipeline", spy)
    return built


def spy_buffers(pp: ImagePreprocessor, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """For each decode from now on: whether it went into a kept pipeline's buffer."""
    path = pp._simd
    assert isinstance(path, SimdJpeg)
    into: list[bool] = []
    decode = path._jpeg.decode_jpeg

    def spy(data: bytes, colorspace: str, **kw: object) -> np.ndarray:
        into.append(kw["buffer"] is not None)
        return decode(data, colorspace, **kw)

    monkeypatch.setattr(path, "_jpeg", type("Spy", (), {"decode_jpeg": staticmethod(spy)}))
    return into


def test_reused_pipeline_gives_a_fresh_pipelines_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread reuses the decode buffer and libvips graph of the last size it saw: every
    image comes out bit-identical to a pipeline built for it alone, whatever came before it
    (other photos of the size, another size, another orientation, a grey image, a corrupt
    file that stopped half-way through the buffer)."""
    cases = [jpeg(name, 1280, 720) for name in PHOTOS] + [detail(1280, 720, 0)]
    cases += [rotated("astronaut", 720, 1280, 6), rotated("coffee", 720, 1280, 8)]
    cases += [jpeg("coffee", 1280, 720, mode="L"), jpeg("rocket", 900, 500)]
    cases += [rotated("chelsea", 720, 1280, 5), rotated("rocket", 720, 1280, 7)]
    order = [0, 1, 2, 3, 4, 0, 5, 6, 5, 1, 7, 2, 8, 8, 3, 4, 3, 9, 10, 10, 9]
    with monkeypatch.context() as m:
        m.setattr(preprocess_simd, "REUSE_MAX_BYTES", 0)  # every call builds its own
        alone = ImagePreprocessor(config(), simd=True)
        built_alone = count_builds(alone, m)
        expected = [alone.decode(data) for data in cases]
        assert len(built_alone) == len(cases)
    pp = ImagePreprocessor(config(), simd=True)
    built, into = count_builds(pp, monkeypatch), spy_buffers(pp, monkeypatch)
    truncated = cases[1][: len(cases[1]) * 2 // 3]
    for step, k in enumerate(order):
        np.testing.assert_array_equal(pp.decode(cases[k]), expected[k], err_msg=f"step {step}")
        if step == 3:  # the same size, cut short: refused, and the next image is whole again
            with pytest.raises(InvalidInput, match="truncated or corrupt"):
                pp.decode(truncated)
            assert into[-1]  # it stopped half-way through the kept buffer
    # One build per change of stored size, bands or orientation, not one per image.
    keys = [((720, 1280, 3), 1)] * 5 + [((1280, 720, 3), 6), ((1280, 720, 3), 8)]
    keys += [((720, 1280, 1), 1), ((500, 900, 3), 1), ((1280, 720, 3), 5), ((1280, 720, 3), 7)]
    changes = [keys[k] for i, k in enumerate(order) if i == 0 or keys[k] != keys[order[i - 1]]]
    assert built == changes
    assert sum(into) == len(order) + 1 - len(changes)  # every other decode reused a buffer


def test_large_images_keep_no_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above REUSE_MAX_BYTES a decoded image is not kept between calls."""
    monkeypatch.setattr(preprocess_simd, "REUSE_MAX_BYTES", 1280 * 720 * 3 - 1)
    pp = ImagePreprocessor(config(), simd=True)
    built = count_builds(pp, monkeypatch)
    small, large = jpeg("rocket", 1280, 719), jpeg("rocket", 1280, 720)
    for data in (large, large, small, small):
        pp.decode(data)
    assert built == [((720, 1280, 3), 1), ((720, 1280, 3), 1), ((719, 1280, 3), 1)]
    assert pp._simd is not None
    assert pp._simd._local.pipeline.buffer.shape == (719, 1280, 3)
    pp.decode(large)  # a large image also lets the kept small one go
    assert pp._simd._local.pipeline is None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost",
    )]


def malloc_in_use() -> int:
    """Bytes glibc's malloc has handed out and not had back (numpy's and libvips' memory)."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    gc.collect()
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


@pytest.mark.skipif(
    not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc 2.33+ (mallinfo2)"
)
@pytest.mark.parametrize(("width", "height", "orientation"), [(1920, 1080, 1), (1920, 1080, 6)])
def test_a_kept_pipeline_holds_under_twice_its_decode_buffer(
    width: int, height: int, orientation: int
) -> None:
    """What a thread keeps between calls (docs/preprocessing.md): the decode buffer and the
    buffers libvips' operations hold for the next fetch, under twice the buffer in all."""
    pp = ImagePreprocessor(config(), simd=True)
    assert pp._simd is not None
    data = rotated("astronaut", width, height, orientation)
    pp.decode(data)
    kept = pp._simd._local.pipeline
    assert kept is not None
    decoded = kept.buffer.nbytes
    del kept
    with_pipeline = malloc_in_use()
    pp._simd._local.pipeline = None
    held = with_pipeline - malloc_in_use()
    assert decoded <= held < 2 * decoded


def test_fast_upsampling_only_when_the_shrink_hides_it() -> None:
    """libjpeg's replicated chroma is used from FAST_UPSAMPLE_SHRINK on (2048x2048 to 224:
    9.1x) and not below (1920x1080: 4.8x, where colour noise would show it)."""
    calls: list[bool] = []
    pp = ImagePreprocessor(config(), simd=True)
    path = pp._simd
    assert isinstance(path, SimdJpeg)
    decode = path._jpeg.decode_jpeg

    def spy(data: bytes, colorspace: str, **kw: object) -> np.ndarray:
        calls.append(bool(kw["fastupsample"]))
        return decode(data, colorspace, **kw)

    path._jpeg = type("Spy", (), {"decode_jpeg": staticmethod(spy)})
    pp.decode(jpeg("rocket", 2048, 2048))
    pp.decode(jpeg("rocket", 1920, 1080))
    assert calls == [True, False]
    assert 2048 / 224 >= FAST_UPSAMPLE_SHRINK > 1080 / 224


def test_simd_and_fast_exclude_each_other() -> None:
    with pytest.raises(ValueError, match="not both"):
        ImagePreprocessor(Preprocess(224, MEAN, STD), fast=True, simd=True)



def test_libvips_messages_do_not_call_back_into_python(
    simd: ImagePreprocessor, caplog: pytest.LogCaptureFixture
) -> None:
    """libvips logs two info lines per reducer and image; pyvips would hand each to Python
    logging through a callback that takes the interpreter lock back (and print them in the
    server's log at INFO). The SIMD path leaves them to GLib's default handler."""
    with caplog.at_level(logging.DEBUG):
        simd.decode(jpeg("rocket", 1280, 720))
    assert not [r.getMessage() for r in caplog.records if r.getMessage().startswith("VIPS:")]
