"""The SIMD JPEG path of image preprocessing: libjpeg-turbo decoding (simplejpeg) and libvips'
vectorised reducers, for `ImagePreprocessor(simd=True)` (``clipserve serve --preprocess-simd``).

The exact path resamples with Pillow, bit-for-bit what open_clip does, in scalar 8-bit passes
that cost more than the JPEG decode at 1920x1080. This path decodes the whole JPEG (a
reduced-scale decode loses parity: docs/preprocessing.md, "Where the parity goes"), then lets
libvips shrink it with the same filter (Catmull-Rom cubic, widened by the shrink factor as
Pillow's is): its reducers run on vector units and, demand-driven, compute only the pixels the
centre crop needs, on the calling thread; each thread reuses the decode buffer and graph of
the last size it saw (`REUSE_MAX_BYTES`). Not bit-exact: the passes run in the other order and
round differently. docs/preprocessing.md measures its parity and speed.

Only what both libraries do as Pillow does comes here: baseline or progressive JPEGs in
greyscale or YCbCr/RGB, for bicubic models, inside the envelope below (each axis kept or shrunk
2x to 24x, outputs of 128 pixels or more a side). Everything else, and every JPEG that
libjpeg-turbo decodes only with a warning (truncated or corrupt data), goes back to the exact
path, which accepts or refuses it and words the error as for every other image.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipserve.repository import Preprocess

logger = logging.getLogger(__name__)

#: What `clipserve serve --preprocess-simd` needs besides the server's own dependencies.
INSTALL_HINT = 'pip install "clipserve[simd]" (simplejpeg and pyvips[binary])'

# Bicubic only: libvips' triangle filter strays further from Pillow's bilinear one than its
# cubic from Pillow's bicubic, so bilinear models keep the exact path.
_KERNELS = {"bicubic": "cubic"}
# Where libvips' reducers stay close to Pillow's passes on any content (noise included; the
# limits are tests/unit/test_preprocess_simd.py's envelope): each axis keeps its size or
# shrinks by MIN_SHRINK to MAX_SHRINK, and the output is at least MIN_OUTPUT pixels on each side.
# Below MIN_SHRINK the two libraries' fixed-point rounding differs most on fine detail; above
# MAX_SHRINK libvips' wide filter drifts from Pillow's; in small outputs the edge pixels, which
# the two filters treat differently, weigh more. Everything else takes the exact path.
MIN_SHRINK = 2.0
MAX_SHRINK = 24.0
MIN_OUTPUT = 128
# libjpeg's fast ("merged") chroma upsampling replicates chroma pixels instead of interpolating
# them, a faster decode; from this shrink on along both axes the cubic filter smooths the
# difference away even for colour noise (at a 4x shrink it does not). Below it, the decode is
# libjpeg-turbo's default, bit-identical to the one Pillow (and open_clip) sees.
FAST_UPSAMPLE_SHRINK = 8.0
# Each thread keeps the pipeline of the last image geometry it saw (the decode buffer and the
# libvips graph that reads it) when the decoded image holds at most this many bytes: building a
# graph takes almost as long as running it at 1920x1080 (longer at 640x480), and the sizes of
# a stream of uploads repeat. Larger images build theirs per call and keep nothing. A kept
# pipeline also holds the buffers libvips' operations keep between fetches: under twice the
# decode buffer in all, which a test checks.
REUSE_MAX_BYTES = 8 << 20

# EXIF orientation -> libvips operations that turn the stored image upright (as
# `PIL.Image.transpose` with `_TRANSPOSE` in preprocess.py does).
_ORIENT: dict[int, tuple[tuple[str, str], ...]] = {
    2: (("flip", "horizontal"),),
    3: (("rot", "d180"),),
    4: (("flip", "vertical"),),
    5: (("rot", "d90"), ("flip", "horizontal")),
    6: (("rot", "d90"),),
    7: (("rot", "d270"), ("flip", "horizontal")),
    8: (("rot", "d270"),),
}


def _load() -> tuple[Any, Any]:
    """(simplejpeg, pyvips), set up for short pipelines on the calling thread's behalf."""
    try:
        import pyvips
        import simplejpeg
    except (ImportError, OSError) as exc:  # OSError: the libvips shared library did not load
        raise RuntimeError(f"SIMD preprocessing needs {INSTALL_HINT}: {exc}") from exc
    # pyvips hands every libvips log message to Python logging, info included (two per reducer
    # per image: "21 point mask", "using vector path"): each one is a callback that takes the
    # interpreter lock back from inside libvips, a wait while the event loop is busy. Leave
    # them to GLib's default handler instead (warnings to stderr, info dropped).
    remove_log_handler = getattr(pyvips, "_remove_log_handler", None)
    if remove_log_handler is not None:
        remove_log_handler()
    else:  # a pyvips without it: at least keep the messages out of the server's log
        logging.getLogger("pyvips").setLevel(logging.WARNING)
    # No operation cache: each thread keeps its own pipeline (SimdJpeg), nothing else repeats.
    pyvips.cache_set_max(0)
    return simplejpeg, pyvips


def unavailable() -> str:
    """Why the SIMD path cannot start here (the `simd` extra missing), or "" when it can."""
    try:
        _load()
    except RuntimeError as exc:
        return str(exc)
    return ""


@dataclass(frozen=True)
class _Key:
    """What a pipeline is built for: the stored JPEG's band count (1 grey, 3 colour) and EXIF
    orientation, and the geometry (`preprocess.Geometry`) of the oriented image."""

    bands: int
    orientation: int
    geo: Any

    @property
    def stored_shape(self) -> tuple[int, int, int]:
        """The decoded (rows, cols, bands): the stored image, before the orientation."""
        width, height = self.geo.source
        rows, cols = (width, height) if self.orientation in (5, 6, 7, 8) else (height, width)
        return rows, cols, self.bands


@dataclass(frozen=True, eq=False)
class _Pipeline:
    """A decode buffer and the libvips graph that resamples it to ``key``'s geometry, for one
    thread (a region belongs to the thread that fetches it)."""

    key: _Key
    buffer: np.ndarray  # uint8 [rows, cols, bands], what the graph reads
    image: Any  # the libvips image over ``buffer``
    region: Any  # a libvips region of the graph's output
    crop: tuple[int, int, int, int]  # left, top, width, height

    def run(self) -> Any:
        """The crop's pixels (a buffer of uint8 [height, width, bands]) from what ``buffer``
        holds now."""
        # libvips' contract for memory changed under an image: drop whatever pixels the graph
        # holds from the last run (today's libvips recomputes a fetched region anyway).
        self.image.invalidate()
        return self.region.fetch(*self.crop)


class SimdJpeg:
    """JPEG bytes -> uint8 [S, S, bands] with open_clip's geometry, or None (use the exact path).

    Thread-safe: both libraries release the interpreter lock while they work, and the pipeline
    a thread reuses (`REUSE_MAX_BYTES`) is its own.
    """

    def __init__(self, cfg: Preprocess) -> None:
        self._jpeg, self._vips = _load()
        self._local = threading.local()
        self.kernel = _KERNELS.get(cfg.interpolation)
        self.fill = cfg.fill_color
        self.versions = {
            "simplejpeg": str(getattr(self._jpeg, "__version__", "?")),
            "libvips": ".".join(str(self._vips.version(i)) for i in range(3)),
        }
        logger.info(
            "SIMD JPEG preprocessing (%s interpolation: %s): simplejpeg %s, libvips %s",
            cfg.interpolation, "on" if self.kernel else "exact path instead",
            self.versions["simplejpeg"], self.versions["libvips"],
        )

    def accepts(self, geo: Any) -> bool:
        """Whether this path takes an image of geometry ``geo`` (a `preprocess.Geometry`):
        a bicubic model and a resize inside the envelope; nearest neighbour, plain crops,
        enlargements and the rest are Pillow's job. Swapping the image's axes (an EXIF
        rotation) does not change the answer."""
        return self.kernel is not None and geo.resize and _within_envelope(geo)

    def pixels(
        self, data: bytes, *, grey: bool, orientation: int, geo: Any
    ) -> np.ndarray | None:
        """Decode and resample ``data`` (a JPEG whose header Pillow read: ``grey`` for mode L,
        else RGB) to ``geo`` (a `preprocess.Geometry` of the oriented image, which `accepts`);
        None when the exact path must do it after all."""
        (width, height), (scaled_w, scaled_h) = geo.source, geo.scaled
        shrink = min(width / scaled_w, height / scaled_h)
        key = _Key(1 if grey else 3, orientation, geo)
        rows, cols, bands = key.stored_shape  # as Pillow's header read it
        pipeline: _Pipeline | None = getattr(self._local, "pipeline", None)
        if pipeline is not None and pipeline.key != key:
            self._local.pipeline = None  # another geometry: let its buffer go before decoding
            pipeline = None
        try:
            decoded = self._jpeg.decode_jpeg(
                data, "GRAY" if grey else "RGB",
                fastupsample=shrink >= FAST_UPSAMPLE_SHRINK, strict=True,
                buffer=None if pipeline is None else pipeline.buffer,
            )
        except ValueError:  # corrupt, truncated, a warning, or larger than the header said
            logger.debug("SIMD JPEG decode declined", exc_info=True)
            return None
        if decoded.shape[:2] != (rows, cols):
            return None  # not the image Pillow's header described (e.g. a multi-frame file)
        try:
            if pipeline is None:
                pipeline = self._build_pipeline(decoded.reshape(rows, cols, bands), key)
                if pipeline is None:
                    return None
                if decoded.nbytes <= REUSE_MAX_BYTES:
                    self._local.pipeline = pipeline
            region = pipeline.run()
        except self._vips.Error:  # e.g. a limit of libvips': the exact path can still do it
            logger.debug("SIMD resampling declined", exc_info=True)
            self._local.pipeline = None
            return None
        (out_w, out_h) = geo.size
        pixels = np.frombuffer(region, np.uint8).reshape(out_h, out_w, bands)
        if geo.pad is not None:
            left_pad, top_pad, right_pad, bottom_pad = geo.pad
            pixels = np.pad(
                pixels, ((top_pad, bottom_pad), (left_pad, right_pad), (0, 0)),
                constant_values=self.fill,
            )
        return pixels

    def _build_pipeline(self, decoded: np.ndarray, key: _Key) -> _Pipeline | None:
        """libvips' graph over ``decoded``: orient, shrink to the geometry's scaled size, and
        compute the crop's region only; None if libvips would not make the geometry's sizes."""
        rows, cols, bands = decoded.shape
        image = self._vips.Image.new_from_memory(decoded.data, cols, rows, bands, "uchar")
        output = image
        for method, direction in _ORIENT.get(key.orientation, ()):
            output = getattr(output, method)(direction)
        geo = key.geo
        (width, height), (scaled_w, scaled_h) = geo.source, geo.scaled
        vshrink, hshrink = height / scaled_h, width / scaled_w
        if scaled_h != height and scaled_w != width:
            output = output.reduce(hshrink, vshrink, kernel=self.kernel)  # vertical pass first
        elif scaled_h != height:
            output = output.reducev(vshrink, kernel=self.kernel)
        else:
            output = output.reduceh(hshrink, kernel=self.kernel)
        if (output.width, output.height) != (scaled_w, scaled_h):
            return None  # libvips rounded a size differently: never hand back a wrong shape
        (out_w, out_h), (left, top) = geo.size, geo.crop
        # Fetching one region runs the graph on this thread, for that region only (the crop's
        # columns of the vertical pass): no worker thread, no crop operation.
        region = self._vips.Region.new(output)
        return _Pipeline(key, decoded, image, region, (left, top, out_w, out_h))


def _within_envelope(geo: Any) -> bool:
    """Whether libvips' reducers stay close to Pillow's for this geometry (see MIN_SHRINK)."""
    (width, height), (scaled_w, scaled_h) = geo.source, geo.scaled
    if min(geo.size) < MIN_OUTPUT:
        return False
    return all(
        new == old or MIN_SHRINK <= old / new <= MAX_SHRINK
        for old, new in ((width, scaled_w), (height, scaled_h))
    )
