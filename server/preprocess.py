"""Server-side image preprocessing: encoded bytes (or a raw tensor) -> float32 [3, S, S].

Reproduces open_clip's evaluation transform (`open_clip.image_transform(..., is_train=False)`)
for the pretrained tag's `Preprocess` without torch:

* ``shortest``: torchvision ``Resize(S)`` (shortest side to S, long side truncated with
  ``int()``) then ``CenterCrop(S)`` (offsets rounded with Python's ``round``).
* ``squash``: ``Resize((S, S))``.
* ``longest``: ``ResizeKeepRatio(S, longest=1)`` (sides rounded with ``round``) then
  ``CenterCropOrPad(S, fill=fill_color)``.
* then ``convert("RGB")``, ``ToTensor`` (/255) and ``Normalize(mean, std)``.

As in open_clip, the geometry runs in the decoded image's own mode and the RGB conversion comes
last: Pillow resizes RGBA/LA with premultiplied alpha, resizes P and 1 images with nearest
neighbour whatever the interpolation, and pads P images with palette index ``fill_color``.
Doing the same keeps parity for every mode. Departures from open_clip, all deliberate:

* EXIF orientation is applied (open_clip leaves it to the caller).
* 16-bit greyscale (I;16*, I) is scaled to 8 bits (v / 257) before anything else; open_clip's
  ``convert("RGB")`` would clip it to white. F is clipped to 0..255 as Pillow does.
  PA, La, RGBa and other rare modes are converted to RGBA or RGB first.
* The shortest-side resize computes only the centre crop (Pillow's ``box``), with the same
  filter weights as resizing the whole image and then cropping, so a 1 x 40,000,000 image costs
  a 224 x 224 resize instead of a 224 x 8,960,000,000 one. A ``longest`` side that rounds to 0
  is clamped to 1 (open_clip fails on it).

``fast=True`` trades parity for speed on JPEG: it decodes at a reduced DCT scale
(``Image.draft``) while keeping at least `FAST_DRAFT_MARGIN` source pixels per output pixel,
and lets Pillow pre-shrink with a box filter (``reducing_gap=FAST_REDUCING_GAP``).
``simd=True`` decodes JPEGs with libjpeg-turbo (simplejpeg) and resamples them with libvips'
vectorised reducers (`preprocess_simd`): not bit-exact, well inside the parity requirement,
and faster than Pillow's scalar passes; other images take the exact path.
docs/preprocessing.md holds the measured parity and speed of the modes.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO

import numpy as np
from PIL import Image, ImageFile, ImageOps

from clipserve.repository import RESIZE_MODES, Preprocess

from .errors import InvalidInput
from .preprocess_simd import SimdJpeg

logger = logging.getLogger(__name__)

SUPPORTED_FORMATS = ("JPEG", "PNG", "WebP", "BMP", "GIF")
_SUPPORTED_TEXT = ", ".join(SUPPORTED_FORMATS)
# Pillow's registry names of the allowed formats; JPEG's factory also opens MPO (camera JPEGs).
_PIL_FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "WebP": "WEBP", "BMP": "BMP", "GIF": "GIF"}
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
_TENSOR_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}

# Fast mode (measured in docs/preprocessing.md): decode JPEGs at 1/2, 1/4 or 1/8 scale as long as
# at least this many decoded pixels remain per output pixel along each axis ...
FAST_DRAFT_MARGIN = 2.0
# ... and let Pillow shrink by an integer box filter first while the remaining factor is >= this.
FAST_REDUCING_GAP = 3.0

_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Which axes of the oriented image run backwards through the stored one: (x, y).
_REVERSED = {2: (1, 0), 3: (1, 1), 4: (0, 1), 5: (0, 0), 6: (1, 0), 7: (1, 1), 8: (0, 1)}
_SIXTEEN_BIT = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
# Modes resized as they are (like open_clip); anything else is converted before the geometry.
_NATIVE = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})

# Magic numbers of formats we refuse, so that the message can name them.
_REFUSED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"%PDF", "PDF"),
    (b"%!PS", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"8BPS", "PSD"),
    (b"icns", "ICNS"),
    (b"DDS ", "DDS"),
    (b"qoif", "QOI"),
    (b"gimp xcf", "XCF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\x76\x2f\x31\x01", "OpenEXR"),
    (b"#?RADIANCE", "Radiance HDR"),
)
_FTYP_BRANDS = {
    b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC",
    b"heim": "HEIC", b"heis": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF",
}  # fmt: skip
_PNM = re.compile(rb"P[1-7]\s")
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def sniff_format(data: bytes) -> str | None:
    """The allowed format the bytes claim to be (by magic number), or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:2] == b"BM":
        return "BMP"
    return None


def name_refused_format(data: bytes) -> str | None:
    """Name a recognisable format that is not allowed (TIFF, ICO, PDF, SVG, HEIC, ...)."""
    for magic, name in _REFUSED_MAGIC:
        if data.startswith(magic):
            return name
    if data[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(data[8:12], "ISO media (ftyp)")
    head = data[:1024].removeprefix(b"\xef\xbb\xbf").lstrip().lower()
    if head.startswith(b"<") and b"<svg" in head:
        return "SVG"
    if _PNM.match(data[:3]):
        return "PNM (PBM/PGM/PPM)"
    return None


def webp_canvas_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a WebP header, read before libwebp allocates the canvas."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8 " and len(data) >= 30:
        return (
            int.from_bytes(data[26:28], "little") & 0x3FFF,
            int.from_bytes(data[28:30], "little") & 0x3FFF,
        )
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    return None


@dataclass(frozen=True)
class Geometry:
    """Where open_clip's resize/crop/pad lands, in oriented source pixel coordinates.

    open_clip resizes the whole ``source`` (w, h) to ``scaled`` (w, h), then crops or pads.
    Equivalently, the ``box`` (x0, y0, x1, y1) of the source is resampled to ``size`` and
    ``pad`` (left, top, right, bottom) added with the fill colour. ``resize`` is False when
    open_clip skips the resize (source already at ``scaled``); ``box`` is then an integer crop.
    """

    source: tuple[int, int]
    scaled: tuple[int, int]
    size: tuple[int, int]
    box: tuple[float, float, float, float]
    resize: bool
    pad: tuple[int, int, int, int] | None = None
    crop: tuple[int, int] = (0, 0)  # (left, top) of the crop in the ``scaled`` image


def plan_geometry(width: int, height: int, target: int, resize_mode: str) -> Geometry:
    """open_clip's evaluation geometry for a ``width`` x ``height`` image (see module doc)."""
    w, h, s = width, height, target
    full = (0.0, 0.0, float(w), float(h))
    if resize_mode == "squash":
        return Geometry((w, h), (s, s), (s, s), full, resize=(w, h) != (s, s))
    if resize_mode == "longest":
        ratio = max(h / s, w / s)
        nw, nh = max(1, round(w / ratio)), max(1, round(h / ratio))
        pad = None
        if nw < s or nh < s:
            pad = ((s - nw) // 2, (s - nh) // 2, (s - nw + 1) // 2, (s - nh + 1) // 2)
        return Geometry((w, h), (nw, nh), (nw, nh), full, resize=(nw, nh) != (w, h), pad=pad)
    # shortest: torchvision Resize(int), then CenterCrop, which never pads here.
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(s * long / short)
    nw, nh = (s, new_long) if w <= h else (new_long, s)
    top, left = round((nh - s) / 2.0), round((nw - s) / 2.0)
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, min(w, (left + s) * sx), min(h, (top + s) * sy))
    return Geometry((w, h), (nw, nh), (s, s), box, resize=(nw, nh) != (w, h), crop=(left, top))


class ImagePreprocessor:
    """Decode and preprocess one image for the vision tower; thread-safe and stateless.

    ``decode`` is CPU-bound and releases the GIL in Pillow and numpy: run it on a thread pool,
    off the event loop; so is ``from_tensor`` of float16 (a conversion). ``from_tensor`` of
    float32 with ``copy=False`` is a view and a finiteness check (~15 us at 224 px), cheaper
    than the hand-off to a pool.
    """

    def __init__(
        self,
        cfg: Preprocess,
        *,
        max_image_pixels: int = 40_000_000,
        max_image_bytes: int = 32 << 20,
        fast: bool = False,
        simd: bool = False,
    ) -> None:
        if cfg.size <= 0:
            raise ValueError(f"preprocess size must be positive, got {cfg.size}")
        if cfg.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {tuple(_RESAMPLE)}")
        if cfg.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}")
        if len(cfg.mean) != 3 or len(cfg.std) != 3 or min(cfg.std) <= 0:
            raise ValueError("mean and std must hold 3 values, std positive")
        if max_image_pixels <= 0 or max_image_bytes <= 0:
            raise ValueError("max_image_pixels and max_image_bytes must be positive")
        if fast and simd:
            raise ValueError("choose fast (draft decoding) or simd, not both")
        self.cfg = cfg
        self.fast = fast
        self.max_image_pixels = max_image_pixels
        self.max_image_bytes = max_image_bytes
        self._resample = _RESAMPLE[cfg.interpolation]
        # ToTensor + Normalize as one multiply-add: (x / 255 - mean) / std = x * scale + bias.
        std = np.asarray(cfg.std, dtype=np.float64)
        self._scale = (1.0 / (255.0 * std)).astype(np.float32).reshape(3, 1, 1)  # [3, 1, 1]
        self._bias = (-np.asarray(cfg.mean, np.float64) / std).astype(np.float32).reshape(3, 1, 1)
        self._factories = _allowed_factories()
        self._simd: SimdJpeg | None = SimdJpeg(cfg) if simd else None
        logger.info(
            "image preprocessing: size=%d resize_mode=%s interpolation=%s mode=%s",
            cfg.size,
            cfg.resize_mode,
            cfg.interpolation,
            "simd" if simd else "fast" if fast else "exact",
        )

    @property
    def simd_versions(self) -> dict[str, str]:
        """simplejpeg's and libvips' versions when the SIMD path is on, else empty."""
        return dict(self._simd.versions) if self._simd is not None else {}

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (3, self.cfg.size, self.cfg.size)

    def decode(self, data: bytes, *, out: np.ndarray | None = None) -> np.ndarray:
        """Encoded JPEG/PNG/WebP/BMP/GIF bytes -> float32 [3, S, S] (C-contiguous).

        ``out``: an optional float32 [3, S, S] C-contiguous array (e.g. a row of the batch
        buffer) to write into and return. Raises InvalidInput for anything a client sent wrong.
        """
        out = self._check_out(out)
        if not data:
            raise InvalidInput("empty image data")
        if len(data) > self.max_image_bytes:
            raise InvalidInput(
                f"image data has {len(data)} bytes, above the limit of {self.max_image_bytes} "
                "(max_image_bytes)"
            )
        with self._open(data) as image:
            try:
                pixels = self._simd_pixels(data, image) if self._simd is not None else None
                return self._normalize(self._to_rgb(image) if pixels is None else pixels, out)
            except (InvalidInput, MemoryError):
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise self._bomb(exc) from None
            except Exception as exc:  # Pillow raises many types on corrupt data; none is ours.
                logger.debug("image decode failed", exc_info=True)
                raise InvalidInput(f"image is truncated or corrupt: {_describe(exc)}") from None

    def from_tensor(
        self, shape: Sequence[int], dtype: str, data: bytes | memoryview, *,
        out: np.ndarray | None = None,
        copy: bool = True,
    ) -> np.ndarray:
        """A preprocessed little-endian float32/float16 tensor -> float32 [3, S, S] (a copy).

        ``copy=False`` (and no ``out``): float32 data on a little-endian machine comes back as
        a read-only view of ``data`` instead, checked all the same (the server stacks the batch
        from it, so a copy here would be one copy too many).
        """
        view_ok = (
            not copy and out is None and dtype == "float32" and np.dtype("<f4") == np.float32
        )
        out = None if view_ok else self._check_out(out)
        expected = list(self.output_shape)
        np_dtype = _TENSOR_DTYPES.get(dtype)
        if np_dtype is None:
            raise InvalidInput(f"tensor dtype must be float32 or float16, got {dtype!r}")
        if list(shape) != expected:
            raise InvalidInput(f"tensor shape must be {expected}, got {list(shape)}")
        want = math.prod(expected) * np_dtype.itemsize
        if len(data) != want:
            raise InvalidInput(
                f"tensor data has {len(data)} bytes, expected {want} for {dtype} {expected}"
            )
        src = np.frombuffer(data, dtype=np_dtype).reshape(expected)  # [3, S, S]
        if out is None:
            out = src  # read-only, shares the request's bytes
        else:
            out[...] = src
        bad = out.size - int(np.count_nonzero(np.isfinite(out)))
        if bad:
            raise InvalidInput(f"tensor contains NaN or Inf ({bad} of {out.size} values)")
        return out

    # -- decoding -------------------------------------------------------------------------

    def _open(self, data: bytes) -> ImageFile.ImageFile:
        """Identify and open (header only), refusing bombs before any pixel is decoded."""
        fmt = sniff_format(data)
        if fmt is None or fmt not in self._factories:
            refused = fmt or name_refused_format(data)
            if refused is None:
                raise InvalidInput(f"cannot identify image format (supported: {_SUPPORTED_TEXT})")
            raise InvalidInput(
                f"image format {refused} is not supported (supported: {_SUPPORTED_TEXT})"
            )
        if fmt == "WebP" and (size := webp_canvas_size(data)) is not None:
            self._check_pixels(*size)  # libwebp allocates the canvas while opening
        try:
            # The plugin factory, not Image.open: Pillow's own bomb check there warns through the
            # process-wide warnings filters; ours below raises instead.
            image = self._factories[fmt](io.BytesIO(data), "")
        except MemoryError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise self._bomb(exc) from None
        except Exception as exc:
            logger.debug("image open failed", exc_info=True)
            raise InvalidInput(f"image is truncated or corrupt: {_describe(exc)}") from None
        try:
            self._check_pixels(*image.size)
        except InvalidInput:
            image.close()
            raise
        # One decoder call for the whole image instead of one per 64 KiB block: each call lets
        # go of the interpreter lock, and taking it back waits while the event loop is busy.
        image.decodermaxblock = max(image.decodermaxblock, len(data))
        return image

    def _check_pixels(self, width: int, height: int) -> None:
        if width <= 0 or height <= 0:
            raise InvalidInput(f"image has an empty size ({width}x{height})")
        if width * height > self.max_image_pixels:
            raise InvalidInput(
                f"image has {width * height} pixels, above the limit of {self.max_image_pixels} "
                "(max_image_pixels)"
            )

    def _bomb(self, exc: Exception) -> InvalidInput:
        """Pillow's own DecompressionBombError (a frame or canvas we did not see) as ours."""
        match = _BOMB_PIXELS.search(str(exc))
        pixels = match.group(1) if match else "too many"
        return InvalidInput(
            f"image has {pixels} pixels, above the limit of {self.max_image_pixels} "
            "(max_image_pixels)"
        )

    def _simd_pixels(self, data: bytes, image: ImageFile.ImageFile) -> np.ndarray | None:
        """The SIMD path's uint8 [S, S, 1 or 3] for a greyscale or colour JPEG, else None."""
        assert self._simd is not None
        if image.format not in ("JPEG", "MPO") or image.mode not in ("L", "RGB"):
            return None  # CMYK/YCCK JPEGs and every other format: the exact path
        size, mode = self.cfg.size, self.cfg.resize_mode
        geo = plan_geometry(*image.size, size, mode)
        if not self._simd.accepts(geo):
            return None  # decided before reading EXIF: a rotation only swaps the axes
        orientation = _orientation(image)  # JPEG's EXIF comes with the header
        oriented = _oriented_size(image.size, orientation)
        if oriented != image.size:
            geo = plan_geometry(*oriented, size, mode)
        return self._simd.pixels(data, grey=image.mode == "L", orientation=orientation, geo=geo)

    def _to_rgb(self, image: ImageFile.ImageFile) -> Image.Image:
        """First frame, oriented, resized/cropped/padded in its own mode, then RGB [S, S]."""
        raw_size, scale = image.size, 1
        if self.fast and image.format in ("JPEG", "MPO"):  # JPEG's EXIF comes with the header
            scale = self._draft(image, _orientation(image))
        image.load()
        orientation = _orientation(image)  # after load: PNG's eXIf may follow the pixels
        img: Image.Image = image
        if orientation in _TRANSPOSE:
            img = img.transpose(_TRANSPOSE[orientation])
        # Geometry in full-size source pixels, also when the JPEG was drafted smaller.
        width, height = _oriented_size(raw_size, orientation) if scale > 1 else img.size
        img = _native_mode(img)
        geo = plan_geometry(width, height, self.cfg.size, self.cfg.resize_mode)
        if scale > 1 or (self.fast and _reduces(geo)):
            img = self._resize_fast(img, geo, scale, orientation)
        elif not geo.resize:
            if geo.box != (0.0, 0.0, float(width), float(height)):
                img = img.crop(tuple(int(v) for v in geo.box))
        else:
            img = _resize(img, geo, self._resample, _pillow_vertical_first())
        if geo.pad is not None:
            img = _pad(img, geo.pad, self.cfg.fill_color)
        if img.mode == "RGB":
            return img
        # RGB keeps no transparency; dropping it first changes no pixel and spares Pillow's
        # "Palette images with Transparency expressed in bytes" warning.
        img.info.pop("transparency", None)
        return img.convert("RGB")

    def _resize_fast(
        self, img: Image.Image, geo: Geometry, scale: int, orientation: int
    ) -> Image.Image:
        """One boxed resize of the (possibly drafted) image with Pillow's box pre-shrink."""
        offset = (0, 0)
        if scale > 1:
            # The drafted image covers ceil(n / s) * s source pixels; on axes the orientation
            # reversed, the surplus sits at the start of the oriented image.
            width, height = geo.source
            rev = _REVERSED.get(orientation, (0, 0))
            offset = (
                rev[0] * (img.size[0] * scale - width),
                rev[1] * (img.size[1] * scale - height),
            )
        x0, y0, x1, y1 = geo.box
        box = (
            (x0 + offset[0]) / scale,
            (y0 + offset[1]) / scale,
            min(img.size[0], (x1 + offset[0]) / scale),
            min(img.size[1], (y1 + offset[1]) / scale),
        )
        return img.resize(geo.size, self._resample, box=box, reducing_gap=FAST_REDUCING_GAP)

    def _draft(self, image: ImageFile.ImageFile, orientation: int) -> int:
        """Ask libjpeg for a 1/2, 1/4 or 1/8 scale decode that keeps the margin; the scale."""
        raw_w, raw_h = image.size
        width, height = _oriented_size((raw_w, raw_h), orientation)
        geo = plan_geometry(width, height, self.cfg.size, self.cfg.resize_mode)
        x0, y0, x1, y1 = geo.box
        room = min((x1 - x0) / geo.size[0], (y1 - y0) / geo.size[1]) / FAST_DRAFT_MARGIN
        scale = next((s for s in (8, 4, 2) if s <= room), 1)
        if scale == 1:
            return 1
        drafted = image.draft(None, (max(1, raw_w // scale), max(1, raw_h // scale)))
        if drafted is None:
            return 1
        return round(raw_w / drafted[1][2])

    # -- output ---------------------------------------------------------------------------

    def _check_out(self, out: np.ndarray | None) -> np.ndarray:
        if out is None:
            return np.empty(self.output_shape, dtype=np.float32)
        if (
            out.shape != self.output_shape
            or out.dtype != np.float32
            or not out.flags.c_contiguous
            or not out.flags.writeable
        ):
            raise ValueError(f"out must be a writable C-contiguous float32 {self.output_shape}")
        return out

    def _normalize(self, rgb: Image.Image | np.ndarray, out: np.ndarray) -> np.ndarray:
        """uint8 [S, S, 3] (or [S, S, 1]: grey) -> (x / 255 - mean) / std as float32
        [3, S, S], into ``out``."""
        pixels = np.asarray(rgb)  # [S, S, 3] uint8
        np.multiply(pixels.transpose(2, 0, 1), self._scale, out=out)  # [3, S, S]
        out += self._bias
        return out


def _allowed_factories() -> dict[str, Callable[[IO[bytes], str], ImageFile.ImageFile]]:
    Image.init()  # registers every plugin; we only ever call the allowed formats' factories
    missing = [name for name, pil in _PIL_FORMATS.items() if pil not in Image.OPEN]
    if missing:
        logger.warning("this Pillow build cannot decode %s: such images will be refused", missing)
    return {name: Image.OPEN[pil][0] for name, pil in _PIL_FORMATS.items() if pil in Image.OPEN}


def _reduces(geo: Geometry) -> bool:
    """Whether Pillow's ``reducing_gap`` pre-shrink would act on this resize."""
    x0, y0, x1, y1 = geo.box
    factor = max((x1 - x0) / geo.size[0], (y1 - y0) / geo.size[1])
    return geo.resize and factor >= 2 * FAST_REDUCING_GAP


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1..8); 1 when absent or when the EXIF block is unreadable."""
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block does not make the pixels unusable
        logger.debug("unreadable EXIF ignored", exc_info=True)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _oriented_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def _native_mode(img: Image.Image) -> Image.Image:
    """Bring rare modes to one open_clip's path handles; 16-bit greyscale scaled, not clipped."""
    if img.mode in _NATIVE:
        return img
    if img.mode in _SIXTEEN_BIT:
        values = np.asarray(img).astype(np.float32)  # [H, W] 0..65535
        return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        return img.convert("L")
    return img.convert("RGBA" if "A" in img.getbands() or img.mode == "RGBa" else "RGB")


_SUPPORT = {Image.Resampling.BICUBIC: 2.0, Image.Resampling.BILINEAR: 1.0}
_PREMULTIPLIED = {"LA": "La", "RGBA": "RGBa"}
# Above this many pixels, a nearest-neighbour shortest-side resize samples only the crop ...
_NEAREST_WHOLE_LIMIT = 1 << 24
# ... and a whole-image resize never goes through a larger horizontal-pass image.
_TEMPORARY_LIMIT = 1 << 26


def _resize(
    img: Image.Image, geo: Geometry, resample: Image.Resampling, vertical_first: bool
) -> Image.Image:
    """Resize the whole image to ``geo.scaled`` and crop ``geo.box``, computing only the crop.

    Pillow resizes in two 8-bit passes and the order changes the rounding, so the passes are
    made explicitly, in the order Pillow takes for the whole-image resize open_clip makes (see
    `_pillow_vertical_first`). Each pass gets the same filter weights as in the whole resize
    (Pillow clamps the filter at the image edges, not at the box), but takes the box corners
    as float32: values that sit exactly on a rounding tie may come out 1 level apart. Only the
    rows the crop needs go through the horizontal pass, so extreme aspect ratios stay cheap.
    """
    (out_w, out_h), (x0, y0, x1, y1), (w, h) = geo.size, geo.box, img.size
    whole = geo.box == (0.0, 0.0, float(w), float(h))
    if resample not in _SUPPORT or img.mode in ("1", "P"):
        # Nearest neighbour (Pillow forces it for 1 and P) is one lookup whose float box
        # arithmetic differs from the whole-image one: do what open_clip does unless huge.
        nearest = Image.Resampling.NEAREST
        if whole or geo.scaled[0] * geo.scaled[1] > _NEAREST_WHOLE_LIMIT:
            return img.resize(geo.size, nearest, box=geo.box)
        left, top = geo.crop
        return img.resize(geo.scaled, nearest).crop((left, top, left + out_w, top + out_h))
    (scaled_w, scaled_h), mode = geo.scaled, img.mode
    if mode in _PREMULTIPLIED:  # what Image.resize does for alpha, once for both passes
        img = img.convert(_PREMULTIPLIED[mode])
    if vertical_first:
        vertical_first = scaled_h < h and h - scaled_h > 2 * (w - scaled_w)
    if not vertical_first and whole and scaled_w * h > _TEMPORARY_LIMIT:
        vertical_first = True  # older Pillow would go horizontal first through a huge image
    if vertical_first:
        img = img.resize((w, out_h), resample, box=(0, y0, w, y1))  # vertical only
        img = img.resize((out_w, out_h), resample, box=(x0, 0, x1, out_h))  # horizontal only
    else:
        support = _SUPPORT[resample] * max(1.0, (y1 - y0) / out_h)
        r0, r1 = max(0, math.floor(y0 - support) - 2), min(h, math.ceil(y1 + support) + 2)
        if (r0, r1) != (0, h):
            img = img.crop((0, r0, w, r1))
        img = img.resize((out_w, r1 - r0), resample, box=(x0, 0, x1, r1 - r0))
        img = img.resize((out_w, out_h), resample, box=(0, y0 - r0, out_w, y1 - r0))
    return img.convert(mode) if img.mode != mode else img


@functools.cache
def _pillow_vertical_first() -> bool:
    """Whether this Pillow resizes vertically first when the height shrinks much more.

    Pillow 13 (python-pillow/Pillow#9549) runs the vertical pass first when the target height
    is below the source's and the height loses more than twice the pixels the width loses;
    earlier versions always go horizontal first. Probed once on a 100x100 -> 90x30 resize,
    where the two orders give different pixels.
    """
    rng = np.random.default_rng(0)
    probe = Image.fromarray(rng.integers(0, 256, (100, 100), dtype=np.uint8), "L")
    bicubic = Image.Resampling.BICUBIC
    whole = np.asarray(probe.resize((90, 30), bicubic))
    vertical = np.asarray(probe.resize((100, 30), bicubic).resize((90, 30), bicubic))
    return bool(np.array_equal(whole, vertical))


def _pad(img: Image.Image, pad: tuple[int, int, int, int], fill: int) -> Image.Image:
    """torchvision's PIL pad (constant), as CenterCropOrPad calls it, in the image's mode."""
    bands = len(img.getbands())
    color: int | tuple[int, ...] = fill if bands == 1 else (fill,) * bands
    if img.mode == "P":
        palette = img.getpalette()
        padded = ImageOps.expand(img, border=pad, fill=color)
        if palette is not None:
            padded.putpalette(palette)
        return padded
    return ImageOps.expand(img, border=pad, fill=color)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return text or type(exc).__name__
