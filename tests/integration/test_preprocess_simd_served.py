"""A real server with `--preprocess-simd`: JPEG embeddings against PyTorch open_clip's, the
images it leaves to the exact path, and bad JPEGs refused as the default server refuses them."""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from PIL import Image

from clipserve.v1 import clip_service_pb2 as pb
from clipserve.v1 import clip_service_pb2_grpc as pb_grpc
from tests.integration.harness import ServerThread, running_server
from tests.integration.test_server import PHOTOS, torch_image, torch_preprocess, values


def encode(array: np.ndarray, fmt: str, size: tuple[int, int] = (1920, 1080)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).resize(size, Image.BICUBIC).save(buf, fmt, quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def simd_server(tiny_repository) -> Iterator[ServerThread]:
    with running_server(tiny_repository, preprocess_simd=True) as server:
        yield server


def call(address: str, images: list[bytes]) -> np.ndarray:
    with grpc.insecure_channel(address) as channel:
        request = pb.EncodeImageRequest(images=[pb.Image(data=d) for d in images])
        return values(pb_grpc.ClipServiceStub(channel).EncodeImage(request, timeout=60))


def test_jpeg_embeddings_match_pytorch_open_clip(
    simd_server: ServerThread, clip_server: ServerThread, tiny_repository, tiny_torch_model
) -> None:
    jpegs = [encode(a, "JPEG") for a in PHOTOS.values()]
    jpegs.append(encode(np.asarray(Image.fromarray(PHOTOS["coffee"]).convert("L")), "JPEG"))
    served = call(simd_server.address, jpegs)
    expected = torch_image(
        tiny_torch_model, [Image.open(io.BytesIO(d)) for d in jpegs],
        torch_preprocess(tiny_repository),
    )
    cosines = np.sum(served * expected, axis=1)
    assert cosines.min() > 0.999, cosines
    # not the exact path's bit-for-bit result: the SIMD path ran
    assert not np.array_equal(served, call(clip_server.address, jpegs))


def test_concurrent_requests_of_mixed_sizes_get_each_images_own_embedding(
    simd_server: ServerThread,
) -> None:
    """The server's preprocessing threads each keep the pipeline of the last size they saw:
    requests of several sizes at once from several clients still embed each image as it
    embeds alone (a pixel left over from another image would move its embedding far)."""
    names = list(PHOTOS)
    jpegs = [encode(PHOTOS[n], "JPEG") for n in names]  # 1920x1080
    jpegs += [encode(PHOTOS[n], "JPEG", size=(640, 480)) for n in names[:2]]
    jpegs += [encode(PHOTOS[names[2]], "JPEG", size=(900, 500))]
    alone = np.concatenate([call(simd_server.address, [d]) for d in jpegs])
    mixes = [[(c + i + j * 3) % len(jpegs) for j in range(3)] for c in range(6) for i in range(4)]

    def client(mix: list[int]) -> np.ndarray:
        return call(simd_server.address, [jpegs[k] for k in mix])

    with ThreadPoolExecutor(6) as pool:
        served = list(pool.map(client, mixes))
    for mix, embeddings in zip(mixes, served, strict=True):
        np.testing.assert_allclose(embeddings, alone[mix], atol=1e-5, err_msg=str(mix))


def test_other_formats_are_the_exact_paths(
    simd_server: ServerThread, clip_server: ServerThread
) -> None:
    images = [encode(PHOTOS["rocket"], "PNG"), encode(PHOTOS["chelsea"], "WEBP")]
    images.append(encode(PHOTOS["astronaut"], "JPEG", size=(40, 30)))  # enlarged: Pillow's job
    np.testing.assert_array_equal(
        call(simd_server.address, images), call(clip_server.address, images)
    )


def test_a_bad_jpeg_is_refused_as_the_default_server_refuses_it(
    simd_server: ServerThread, clip_server: ServerThread
) -> None:
    good = encode(PHOTOS["chelsea"], "JPEG")
    errors = []
    for address in (simd_server.address, clip_server.address):
        with pytest.raises(grpc.RpcError) as info:
            call(address, [good, good[: len(good) // 3]])
        errors.append((info.value.code(), info.value.details()))
    assert errors[0] == errors[1]
    assert errors[0][0] is grpc.StatusCode.INVALID_ARGUMENT
    assert "images[1]" in errors[0][1]


def test_without_the_simd_extra_the_server_refuses_to_start(tiny_repository) -> None:
    """`--preprocess-simd` where pyvips cannot be imported: exit 2 with the install hint,
    before any model is loaded."""
    import subprocess
    import sys

    program = (
        "import sys; sys.modules['pyvips'] = None\n"  # what a missing package looks like
        "from clipserve.cli import main\n"
        f"sys.exit(main(['serve', '--model-repository', {str(tiny_repository)!r}, '--port', '0',"
        " '--preprocess-simd', '--no-metrics']))\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert "invalid setting: preprocess_simd: SIMD preprocessing needs" in done.stderr
    assert 'pip install "clipserve[simd]"' in done.stderr
