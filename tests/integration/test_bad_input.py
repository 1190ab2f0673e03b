"""Bad-input battery against a real server: every case gets its exact status and message.

Each case is sent together with two good requests (an image and a text) so that they share
batches with it; the good ones must come back with their reference embeddings, and the server
must report SERVING afterwards. Cases that are valid (odd modes, sizes, EXIF, animation, empty
or very long strings, unknown fields) must succeed with unit-norm embeddings.

Messages containing Pillow's own words are those of the pinned Pillow (.ci/requirements.txt).
docs/robustness.md lists the cases with their statuses and messages.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image, ImageOps

from clipserve.v1 import clip_service_pb2 as pb
from clipserve.v1 import clip_service_pb2_grpc as pb_grpc
from tests.integration.harness import ServerThread, health_status, running_server

MAX_MESSAGE_BYTES = 8 << 20
SIZE = 224  # the tiny model's image size
SUPPORTED = "(supported: JPEG, PNG, WebP, BMP, GIF)"
RNG = np.random.default_rng(20240601)


# -- inputs --------------------------------------------------------------------------------
def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def picture(width: int = 96, height: int = 64, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: asymmetric, so rotations and frames are told apart."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(1, width), y * 255 // max(1, height), (x + y) % 256], -1)
    rgb = np.clip(rgb + rng.integers(0, 40, rgb.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB").convert(mode)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header declaring `width` x `height` RGB, with a few bytes of pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + png_chunk(b"IEND", b"")
    )


def gif_declaring(width: int, height: int) -> bytes:
    """A GIF whose logical screen and only frame claim `width` x `height`."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00" * 6
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00;"
    return screen + frame


def exif_rotated_jpeg() -> tuple[bytes, bytes]:
    """(JPEG stored sideways with EXIF orientation 6, PNG of what a viewer shows)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg = encode(picture(120, 80, seed=3), "JPEG", quality=95, exif=exif)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(jpeg)))
    return jpeg, encode(upright)


def animated_gif() -> tuple[bytes, bytes, bytes]:
    """(two-frame GIF, first frame as PNG, second frame as PNG), both frames in mode P."""
    first = picture(80, 80, seed=4).quantize(64)
    second = Image.fromarray(RNG.integers(0, 255, (80, 80, 3), dtype=np.uint8)).quantize(64)
    gif = encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    frames = Image.open(io.BytesIO(gif))
    pngs = []
    for index in (0, 1):
        frames.seek(index)
        pngs.append(encode(frames.copy()))
    return gif, pngs[0], pngs[1]


def sixteen_bit_png() -> bytes:
    values = np.linspace(0, 65535, 64 * 48, dtype=np.uint16).reshape(48, 64)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    return encode(image)


def tensor(shape: tuple[int, ...], dtype: int = pb.DATA_TYPE_FLOAT32,
           poison: float | None = None) -> pb.Image:
    np_dtype = "<f2" if dtype == pb.DATA_TYPE_FLOAT16 else "<f4"
    values = np.zeros(shape, dtype=np_dtype)
    if poison is not None:
        values.flat[7] = poison
    return pb.Image(tensor=pb.Tensor(shape=shape, dtype=dtype, data=values.tobytes()))


GOOD_PNG = encode(picture(seed=1))
GOOD_JPEG = encode(picture(seed=1), "JPEG", quality=90)
GOOD = pb.Image(data=GOOD_PNG)
TIFF = encode(picture(), "TIFF")
WORDS = "word " * 2000  # 10,000 characters, 2,002 tokens
RAW_FIELD_99 = b"\xf8\x06\x2a" + b"\xa2\x06\x05extra"  # field 99 varint 42, field 100 "extra"


def image_request(bad: pb.Image) -> pb.EncodeImageRequest:
    """The case's image at index 1, after a good one: the message must name images[1]."""
    return pb.EncodeImageRequest(images=[GOOD, bad])


def with_invalid_utf8(message: Any, field_number: int, prefix: bytes = b"") -> bytes:
    """`message` serialized, plus one string field holding bytes that are not UTF-8."""
    payload = prefix + bytes([(field_number << 3) | 2, 2]) + b"\xff\xfe"
    return message.SerializeToString() + payload


def rank_candidate_with_invalid_utf8() -> bytes:
    request = pb.RankRequest(query=pb.RankItem(text="q"), candidates=[pb.RankItem(text="ok")])
    item = b"\x0a\x02\xff\xfe"  # RankItem.text (1) = ff fe
    return request.SerializeToString() + b"\x12" + bytes([len(item)]) + item


# -- cases ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One request and its exact outcome: `status` name and `message` (None: success)."""

    id: str
    method: str
    request: Any  # a message, bytes sent as they are, or a function making either (large)
    status: str = "OK"
    message: str | None = None
    check: Callable[[Any, pb_grpc.ClipServiceStub], None] | None = None
    timeout: float = 60.0
    #: Another message the same status may carry, as a full-match regex: for a race between
    #: two correct answers (the client's own deadline timer against the server's reply).
    or_message: str | None = None


def unit_norm(response: Any, _stub: pb_grpc.ClipServiceStub) -> None:
    matrix = embeddings(response)
    assert np.all(np.isfinite(matrix))
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)


def same_as(reference: bytes, other: bytes | None = None) -> Callable[..., None]:
    """The case's last image embeds like `reference` (and unlike `other`)."""

    def check(response: Any, stub: pb_grpc.ClipServiceStub) -> None:
        unit_norm(response, stub)
        got = embeddings(response)[-1]
        want = embeddings(stub.EncodeImage(image_request(pb.Image(data=reference)), timeout=30))
        assert float(got @ want[-1]) >= 0.9999
        if other is not None:
            unwanted = embeddings(stub.EncodeImage(image_request(pb.Image(data=other)), timeout=30))
            assert float(got @ want[-1]) > float(got @ unwanted[-1])

    return check


def token_counts(*counts: int) -> Callable[..., None]:
    def check(response: Any, stub: pb_grpc.ClipServiceStub) -> None:
        unit_norm(response, stub)
        assert list(response.token_counts) == list(counts)

    return check


def same_text_embedding(response: Any, stub: pb_grpc.ClipServiceStub) -> None:
    unit_norm(response, stub)
    plain = stub.EncodeText(pb.EncodeTextRequest(texts=["a photo"]), timeout=30)
    np.testing.assert_allclose(embeddings(response), embeddings(plain), atol=1e-5)


def embeddings(response: Any) -> np.ndarray:
    return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)


def image_cases() -> Iterator[Case]:
    item = "images[1]: "
    corrupt = item + "image is truncated or corrupt: "
    bad = {
        "empty-bytes": (b"", item + "empty image data"),
        "random-bytes": (RNG.bytes(4096), f"{item}cannot identify image format {SUPPORTED}"),
        "truncated-jpeg": (
            GOOD_JPEG[: len(GOOD_JPEG) // 2],
            corrupt + "image file is truncated (49 bytes not processed)",
        ),
        "truncated-png": (GOOD_PNG[: len(GOOD_PNG) // 2], corrupt + "image file is truncated"),
        "jpeg-header-only": (GOOD_JPEG[:20], corrupt + "not identified by this driver"),
        "jpeg-header-zeroed-data": (
            GOOD_JPEG[:200] + bytes(len(GOOD_JPEG) - 200), corrupt + "cannot load this image"
        ),
        "png-header-random-data": (
            GOOD_PNG[:60] + RNG.bytes(len(GOOD_PNG) - 60),
            corrupt + "broken data stream when reading image file",
        ),
        "gif-magic-only": (b"GIF89a" + bytes(10), corrupt + "image not found in GIF frame"),
        "bmp-magic-garbage": (b"BM" + RNG.bytes(60), corrupt + "Truncated File Read"),
        "webp-magic-garbage": (
            b"RIFF\x24\x00\x00\x00WEBPVP8 " + RNG.bytes(24),
            corrupt + "could not create decoder object",
        ),
        "png-bomb-30000x30000": (
            png_declaring(30_000, 30_000),
            item + "image has 900000000 pixels, above the limit of 40000000 (max_image_pixels)",
        ),
        "gif-bomb-65535x65535": (
            gif_declaring(65_535, 65_535),
            item + "image has 4294836225 pixels, above the limit of 40000000 (max_image_pixels)",
        ),
        "png-zero-width": (png_declaring(0, 10), corrupt + "not identified by this driver"),
        "svg": (
            b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="9" '
            b'height="9"><rect width="9" height="9"/></svg>',
            f"{item}image format SVG is not supported {SUPPORTED}",
        ),
        "pdf": (b"%PDF-1.7\n1 0 obj <<>> endobj\n%%EOF\n",
                f"{item}image format PDF is not supported {SUPPORTED}"),
        "tiff": (TIFF, f"{item}image format TIFF is not supported {SUPPORTED}"),
        "heic": (b"\x00\x00\x00\x18ftypheic" + bytes(16),
                 f"{item}image format HEIC is not supported {SUPPORTED}"),
    }
    for name, (data, message) in bad.items():
        yield Case(name, "EncodeImage", image_request(pb.Image(data=data)),
                   "INVALID_ARGUMENT", message)

    jpeg, upright = exif_rotated_jpeg()
    gif, first, second = animated_gif()
    valid = {
        "1x1": (encode(Image.new("RGB", (1, 1), (200, 10, 10))), unit_norm),
        "1x3000": (encode(picture(1, 3000)), unit_norm),
        "3000x1": (encode(picture(3000, 1)), unit_norm),
        "16-bit-grey": (sixteen_bit_png(), unit_norm),
        "cmyk-jpeg": (encode(picture(mode="CMYK"), "JPEG"), unit_norm),
        "palette-png-transparency": (
            encode(picture().quantize(16), transparency=3), unit_norm
        ),
        "la-png": (encode(picture(mode="LA")), unit_norm),
        "rgba-png": (encode(picture(mode="RGBA")), unit_norm),
        "grey-jpeg": (encode(picture(mode="L"), "JPEG"), unit_norm),
        "webp": (encode(picture(), "WEBP", lossless=True), unit_norm),
        "bmp": (encode(picture(), "BMP"), unit_norm),
        "exif-rotated-jpeg": (jpeg, same_as(upright)),
        "animated-gif-first-frame": (gif, same_as(first, other=second)),
    }
    for name, (data, check) in valid.items():
        yield Case(name, "EncodeImage", image_request(pb.Image(data=data)), check=check)
    # a large but legal image: exactly max_image_pixels (8000 x 5000), decoded and resized
    def huge() -> pb.EncodeImageRequest:
        data = encode(Image.new("RGB", (8000, 5000), (90, 160, 30)), "JPEG", quality=50)
        return image_request(pb.Image(data=data))

    yield Case("huge-legal-40-megapixels", "EncodeImage", huge, check=unit_norm)


def tensor_cases() -> Iterator[Case]:
    item = "images[1]: "
    full = (3, SIZE, SIZE)
    values = 3 * SIZE * SIZE
    bad = {
        "tensor-wrong-shape": (
            tensor((3, 32, 32)), f"{item}tensor shape must be [3, 224, 224], got [3, 32, 32]"
        ),
        "tensor-rank-4": (
            tensor((1, 3, SIZE, SIZE)),
            f"{item}tensor shape must be [3, 224, 224], got [1, 3, 224, 224]",
        ),
        "tensor-dtype-unspecified": (
            tensor(full, pb.DATA_TYPE_UNSPECIFIED),
            f"{item}tensor dtype DATA_TYPE_UNSPECIFIED is not supported (use DATA_TYPE_FLOAT32 "
            "or DATA_TYPE_FLOAT16)",
        ),
        "tensor-dtype-unknown-enum": (
            tensor(full, 7),
            f"{item}tensor dtype 7 is not supported (use DATA_TYPE_FLOAT32 or DATA_TYPE_FLOAT16)",
        ),
        "tensor-short-data": (
            pb.Image(tensor=pb.Tensor(shape=full, dtype=pb.DATA_TYPE_FLOAT32, data=b"\0" * 12)),
            f"{item}tensor data has 12 bytes, expected {values * 4} for float32 [3, 224, 224]",
        ),
        "tensor-nan": (
            tensor(full, poison=float("nan")),
            f"{item}tensor contains NaN or Inf (1 of {values} values)",
        ),
        "tensor-inf-fp16": (
            tensor(full, pb.DATA_TYPE_FLOAT16, poison=float("inf")),
            f"{item}tensor contains NaN or Inf (1 of {values} values)",
        ),
        "image-without-source": (pb.Image(), f"{item}no image data (set data, tensor or url)"),
    }
    for name, (image, message) in bad.items():
        yield Case(name, "EncodeImage", image_request(image), "INVALID_ARGUMENT", message)
    yield Case("url-input-disabled", "EncodeImage",
               image_request(pb.Image(url="http://example.com/a.jpg")),
               "PERMISSION_DENIED", f"{item}URL inputs are disabled on this server")
    yield Case("fp16-tensor", "EncodeImage", image_request(tensor(full, pb.DATA_TYPE_FLOAT16)),
               check=unit_norm)
    # float32 tensors are checked on the loop, everything else on the pool: the first failed
    # item by position is named either way
    nan, tiff = tensor(full, poison=float("nan")), pb.Image(data=TIFF)
    yield Case("bad-tensor-before-bad-image", "EncodeImage",
               pb.EncodeImageRequest(images=[GOOD, nan, tiff]), "INVALID_ARGUMENT",
               f"{item}tensor contains NaN or Inf (1 of {values} values) "
               "(and 1 more failed item(s))")
    yield Case("bad-image-before-bad-tensor", "EncodeImage",
               pb.EncodeImageRequest(images=[GOOD, tiff, nan]), "INVALID_ARGUMENT",
               f"{item}image format TIFF is not supported {SUPPORTED} (and 1 more failed item(s))")


def text_cases() -> Iterator[Case]:
    too_long = (
        "texts[1]: text is 2002 tokens long, the model accepts at most 77 (including start and "
        "end of text); shorten it or allow truncation"
    )
    utf8 = "not valid UTF-8 (protobuf string fields must hold UTF-8 text; send bytes as bytes)"
    yield Case("empty-string", "EncodeText", pb.EncodeTextRequest(texts=["", "a"]),
               check=token_counts(2, 3))
    yield Case("10000-characters-truncated", "EncodeText",
               pb.EncodeTextRequest(texts=["a", WORDS]), check=token_counts(3, 77))
    yield Case("10000-characters-truncation-none", "EncodeText",
               pb.EncodeTextRequest(texts=["a", WORDS], truncation=pb.TRUNCATION_NONE),
               "INVALID_ARGUMENT", too_long)
    yield Case("invalid-utf8-text", "EncodeText",
               with_invalid_utf8(pb.EncodeTextRequest(texts=["fine"]), 1),
               "INVALID_ARGUMENT", f"texts[1]: {utf8}")
    yield Case("invalid-utf8-label", "Classify",
               with_invalid_utf8(pb.ClassifyRequest(images=[GOOD]), 2),
               "INVALID_ARGUMENT", f"labels[0]: {utf8}")
    yield Case("invalid-utf8-rank-candidate", "Rank", rank_candidate_with_invalid_utf8(),
               "INVALID_ARGUMENT", f"candidates[1].text: {utf8}")
    yield Case("not-a-protobuf-message", "EncodeText", b"\x0a\xff",
               "INVALID_ARGUMENT",
               "the request is not a valid clipserve.v1.EncodeTextRequest message (protobuf "
               "cannot parse it)")
    yield Case("unknown-fields-ignored", "EncodeText",
               pb.EncodeTextRequest(texts=["a photo"]).SerializeToString() + RAW_FIELD_99,
               check=same_text_embedding)
    yield Case("unknown-truncation-enum", "EncodeText",
               pb.EncodeTextRequest(texts=["a"], truncation=7),
               "INVALID_ARGUMENT", "truncation 7 is not a known Truncation")
    yield Case("unknown-format-enum", "EncodeText", pb.EncodeTextRequest(texts=["a"], format=42),
               "INVALID_ARGUMENT", "format 42 is not a known EmbeddingFormat")
    yield Case("no-texts", "EncodeText", pb.EncodeTextRequest(),
               "INVALID_ARGUMENT", "texts is empty: send at least one item")
    yield Case("257-texts", "EncodeText", pb.EncodeTextRequest(texts=["t"] * 257),
               "INVALID_ARGUMENT",
               "texts has 257 items, above the limit of 256 (max_items_per_request): split the "
               "request")


def classify_cases() -> Iterator[Case]:
    def classify(**fields: Any) -> pb.ClassifyRequest:
        fields.setdefault("images", [GOOD])
        return pb.ClassifyRequest(**fields)

    invalid = {
        "zero-labels": (classify(), "labels is empty: send at least one candidate label"),
        "100000-labels": (
            classify(labels=[f"l{i}" for i in range(100_000)]),
            "labels has 100000 items, above the limit of 10000 (max_labels)",
        ),
        "duplicate-labels": (
            classify(labels=["a", "b", "a"]),
            "labels[2]: duplicate of labels[0] ('a'): labels must be unique",
        ),
        "blank-label": (classify(labels=["a", "  "]), "labels[1]: label is empty"),
        "template-without-braces": (
            classify(labels=["a", "b"], templates=["a photo"]),
            "templates[0]: template 'a photo' must contain exactly one '{}' for the label",
        ),
        "template-with-two-braces": (
            classify(labels=["a"], templates=["{}", "{} and {}"]),
            "templates[1]: template '{} and {}' must contain exactly one '{}' for the label",
        ),
        "101-templates": (
            classify(labels=["a"], templates=[f"{{}} {i}" for i in range(101)]),
            "templates has 101 items, above the limit of 100 (max_templates)",
        ),
        "top-k-zero": (
            classify(labels=["a", "b"], top_k=0), "top_k is 0; it must be between 1 and 2 (labels)"
        ),
        "top-k-above-labels": (
            classify(labels=["a", "b"], top_k=3), "top_k is 3; it must be between 1 and 2 (labels)"
        ),
        "classify-no-images": (classify(images=[], labels=["a"]),
                               "images is empty: send at least one item"),
        "classify-bad-image": (
            classify(images=[GOOD, pb.Image(data=b"junk")], labels=["a"]),
            f"images[1]: cannot identify image format {SUPPORTED}",
        ),
    }
    for name, (request, message) in invalid.items():
        yield Case(name, "Classify", request, "INVALID_ARGUMENT", message)
    yield Case("top-k-equal-to-labels", "Classify", classify(labels=["a", "b"], top_k=2))


def rank_cases() -> Iterator[Case]:
    text = pb.RankItem(text="a photo")
    broken = pb.RankItem(image=pb.Image(data=b"junk"))
    cannot = f"cannot identify image format {SUPPORTED}"
    invalid = {
        "rank-no-query": (
            pb.RankRequest(candidates=[text]), "query is empty: set a text or an image"
        ),
        "rank-empty-candidate": (
            pb.RankRequest(query=text, candidates=[text, pb.RankItem()]),
            "candidates[1]: empty: set text or image",
        ),
        "rank-bad-image-among-texts": (
            pb.RankRequest(query=text, candidates=[text, text, broken]), f"candidates[2]: {cannot}"
        ),
        "rank-two-bad-images": (
            pb.RankRequest(query=text, candidates=[text, broken, text, broken]),
            f"candidates[1]: {cannot} (and 1 more failed item(s))",
        ),
        "rank-bad-query-image": (
            pb.RankRequest(query=pb.RankItem(image=pb.Image(data=b"")), candidates=[text]),
            "query: empty image data",
        ),
        "rank-top-k-above-candidates": (
            pb.RankRequest(query=text, candidates=[text, text], top_k=5),
            "top_k is 5; it must be between 1 and 2 (candidates)",
        ),
    }
    for name, (request, message) in invalid.items():
        yield Case(name, "Rank", request, "INVALID_ARGUMENT", message)


def limit_cases() -> Iterator[Case]:
    yield Case("no-images", "EncodeImage", pb.EncodeImageRequest(),
               "INVALID_ARGUMENT", "images is empty: send at least one item")
    yield Case("257-images", "EncodeImage", pb.EncodeImageRequest(images=[GOOD] * 257),
               "INVALID_ARGUMENT",
               "images has 257 items, above the limit of 256 (max_items_per_request): split the "
               "request")
    size = MAX_MESSAGE_BYTES + 1  # one image of this many bytes, in 10 bytes of framing
    yield Case("message-above-size-limit", "EncodeImage",
               lambda: pb.EncodeImageRequest(images=[pb.Image(data=b"\0" * size)]),
               "RESOURCE_EXHAUSTED",
               f"SERVER: Received message larger than max ({size + 10} vs. {MAX_MESSAGE_BYTES})")
    yield Case("unknown-format-enum-image", "EncodeImage",
               pb.EncodeImageRequest(images=[GOOD], format=9),
               "INVALID_ARGUMENT", "format 9 is not a known EmbeddingFormat")
    yield Case("deadline-already-past", "EncodeText", pb.EncodeTextRequest(texts=["late"]),
               "DEADLINE_EXCEEDED", "Deadline Exceeded", timeout=-1,
               or_message=r"deadline passed after \d+\.\d{3}s in the text queue, before compute")


CASES = [
    *image_cases(), *tensor_cases(), *text_cases(), *classify_cases(), *rank_cases(),
    *limit_cases(),
]
RESPONSES = {
    "EncodeImage": pb.EncodeImageResponse, "EncodeText": pb.EncodeTextResponse,
    "Classify": pb.ClassifyResponse, "Rank": pb.RankResponse,
}


def test_the_battery_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)


# -- running a case ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_repository) -> Iterator[ServerThread]:
    with running_server(tiny_repository, max_message_bytes=MAX_MESSAGE_BYTES) as thread:
        yield thread


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES)]
    with grpc.insecure_channel(server.address, options=options) as chan:
        yield chan


@pytest.fixture(scope="module")
def references(channel: grpc.Channel) -> dict[str, np.ndarray]:
    """The good requests' embeddings, alone on the server."""
    stub = pb_grpc.ClipServiceStub(channel)
    return {
        "image": embeddings(stub.EncodeImage(pb.EncodeImageRequest(images=[GOOD]), timeout=30)),
        "text": embeddings(stub.EncodeText(pb.EncodeTextRequest(texts=["a cat"]), timeout=30)),
    }


def send(channel: grpc.Channel, case: Case) -> grpc.Future:
    request = case.request() if callable(case.request) else case.request
    call = channel.unary_unary(
        f"/clipserve.v1.ClipService/{case.method}",
        request_serializer=None if isinstance(request, bytes) else type(request).SerializeToString,
        response_deserializer=RESPONSES[case.method].FromString,
    )
    return call.future(request, timeout=case.timeout)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_case(case: Case, server: ServerThread, channel: grpc.Channel,
              references: dict[str, np.ndarray]) -> None:
    stub = pb_grpc.ClipServiceStub(channel)
    good_image = stub.EncodeImage.future(pb.EncodeImageRequest(images=[GOOD]), timeout=60)
    outcome = send(channel, case)
    good_text = stub.EncodeText.future(pb.EncodeTextRequest(texts=["a cat"]), timeout=60)

    error = outcome.exception()
    if case.status == "OK":
        assert error is None, f"{error.code().name}: {error.details()}"
        if case.check is not None:
            case.check(outcome.result(), stub)
    else:
        assert error is not None, "the case succeeded"
        details = error.details() or ""
        assert error.code().name == case.status, details
        assert details == case.message or (
            case.or_message is not None and re.fullmatch(case.or_message, details)
        ), details
        assert not re.search(r"/(tmp|home|root|usr)/", error.details() or "")
    # requests batched with it are answered as if alone, and the server is still healthy
    np.testing.assert_allclose(embeddings(good_image.result()), references["image"], atol=1e-5)
    np.testing.assert_allclose(embeddings(good_text.result()), references["text"], atol=1e-5)
    assert health_status(server.address) == "SERVING"
