"""What the load generator sends: real-looking JPEGs, tensors, texts, label sets.

Requests are built once and serialised once (the load generator sends the bytes), so the
clients spend their CPU on gRPC, not on protobuf. Images are skimage's sample photos resized to
the scenario's size (JPEG quality 90); without scikit-image, the generated shapes images of
`clipserve.synthetic` stand in (the report says which).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from importlib import resources

import numpy as np
from PIL import Image

from clipserve.v1 import clip_service_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = "/clipserve.v1.ClipService/"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
JPEG_SIZES = {"jpeg_640x480": (640, 480), "jpeg_1920x1080": (1920, 1080)}
#: A sentence long enough to be cut at the context length (77 tokens) by every CLIP tokenizer.
LONG_TEXT = " ".join(
    ["a detailed photograph of a small brown dog sitting on green grass in the sun"] * 8
)
PROMPT = "a photo of a {}."


@dataclass(frozen=True)
class Workload:
    """A scenario's request: the RPC, its serialised bytes (a few variants), items per call."""

    name: str
    method: str  # full gRPC method path
    requests: tuple[bytes, ...]  # clients cycle through them
    items_per_request: int


def imagenet_classes() -> list[str]:
    """The 1,000 ImageNet class names of open_clip's zero-shot metadata (package data)."""
    text = resources.files("clipserve").joinpath("data/imagenet_classes.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def unique_labels(names: list[str]) -> list[str]:
    """Classify refuses duplicate labels; ImageNet repeats two names: number the repeats."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} {seen[name]}")
    return out


def imagenet_prompts() -> list[str]:
    return [PROMPT.format(name) for name in imagenet_classes()]


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def photos(width: int, height: int) -> tuple[list[bytes], str]:
    """Four JPEGs of `width` x `height` and where they came from."""
    try:
        from skimage import data as skdata
    except ImportError:
        from clipserve import synthetic

        images = [s.image for s in synthetic.dataset("heldout", len(PHOTOS), 0)]
        source = "clipserve.synthetic shapes (scikit-image is not installed)"
        return [_jpeg(im.convert("RGB").resize((width, height))) for im in images], source
    arrays = [getattr(skdata, name)() for name in PHOTOS]
    resized = [
        Image.fromarray(a).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
        for a in arrays
    ]
    return [_jpeg(im) for im in resized], "skimage photos " + ", ".join(PHOTOS)


def tensors(image_size: int, count: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Preprocessed-looking float32 [3, S, S] tensors (standard normal)."""
    rng = np.random.default_rng(seed)
    shape = (3, image_size, image_size)
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(count)]


def _image_request(images: list[pb.Image]) -> bytes:
    return pb.EncodeImageRequest(
        images=images, format=pb.EMBEDDING_FORMAT_FLOAT
    ).SerializeToString()


def workload(name: str, image_size: int, items: int = 1) -> Workload:
    """The requests of scenario `name` (see `SCENARIOS`), `items` images or texts per call."""
    if name in JPEG_SIZES:
        data, _ = photos(*JPEG_SIZES[name])
        requests = [
            _image_request([pb.Image(data=data[(i + k) % len(data)]) for k in range(items)])
            for i in range(len(data))
        ]
        return Workload(name, SERVICE + "EncodeImage", tuple(requests), items)
    if name == "tensor":
        arrays = tensors(image_size)
        requests = [
            _image_request(
                [
                    pb.Image(
                        tensor=pb.Tensor(
                            shape=[3, image_size, image_size],
                            dtype=pb.DATA_TYPE_FLOAT32,
                            data=arrays[(i + k) % len(arrays)].tobytes(),
                        )
                    )
                    for k in range(items)
                ]
            )
            for i in range(len(arrays))
        ]
        return Workload(name, SERVICE + "EncodeImage", tuple(requests), items)
    if name in ("text_short", "text_77"):
        prompts = imagenet_prompts()
        texts = prompts[:64] if name == "text_short" else [f"{p} {LONG_TEXT}" for p in prompts[:16]]
        requests = [
            pb.EncodeTextRequest(
                texts=[texts[(i + k) % len(texts)] for k in range(items)]
            ).SerializeToString()
            for i in range(len(texts))
        ]
        return Workload(name, SERVICE + "EncodeText", tuple(requests), items)
    if name == "classify_1000":
        data, _ = photos(640, 480)
        labels = unique_labels(imagenet_classes())
        requests = [
            pb.ClassifyRequest(
                images=[pb.Image(data=data[(i + k) % len(data)]) for k in range(items)],
                labels=labels,
                templates=[PROMPT],
                top_k=5,
            ).SerializeToString()
            for i in range(len(data))
        ]
        return Workload(name, SERVICE + "Classify", tuple(requests), items)
    raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")


#: scenario -> what it sends (one item per request unless the plan says otherwise)
SCENARIOS: dict[str, str] = {
    "jpeg_640x480": "EncodeImage, one 640x480 JPEG photo per request",
    "jpeg_1920x1080": "EncodeImage, one 1920x1080 JPEG photo per request",
    "tensor": "EncodeImage, one preprocessed float32 [3,S,S] tensor per request",
    "text_short": "EncodeText, one ImageNet prompt per request ('a photo of a tench.')",
    "text_77": "EncodeText, one text cut at 77 tokens per request",
    "classify_1000": "Classify, one 640x480 JPEG against 1,000 ImageNet labels (cached)",
}
