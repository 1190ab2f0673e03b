"""Property tests through a real server and the ONNX model (few examples: each is an RPC).

* Valid random images (sizes, modes, formats, EXIF orientations) always give one finite,
  unit-norm embedding.
* Arbitrary bytes, bare or behind a magic number, get an embedding or INVALID_ARGUMENT naming
  the item, never another status, and the server keeps answering (no crashed or hung worker).

tests/unit/test_preprocess_properties.py covers the decoder itself with many more examples.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipserve.v1 import clip_service_pb2 as pb
from clipserve.v1 import clip_service_pb2_grpc as pb_grpc
from tests.integration.harness import health_status
from tests.unit.test_preprocess_properties import ENCODINGS, MAGICS, encode, sample_image

THROUGH_THE_SERVER = settings(
    max_examples=20,
    deadline=timedelta(seconds=30),
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def stub(clip_server) -> Iterator[pb_grpc.ClipServiceStub]:
    with grpc.insecure_channel(clip_server.address) as channel:
        yield pb_grpc.ClipServiceStub(channel)


@THROUGH_THE_SERVER
@given(
    encoding=st.sampled_from(ENCODINGS),
    width=st.integers(1, 300),
    height=st.integers(1, 300),
    orientation=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_valid_images_give_unit_norm_embeddings(
    stub: pb_grpc.ClipServiceStub,
    encoding: tuple[str, str, dict[str, object]],
    width: int,
    height: int,
    orientation: int,
    seed: int,
) -> None:
    mode, fmt, options = encoding
    data = encode(sample_image(width, height, mode, seed), fmt, orientation, **options)
    response = stub.EncodeImage(pb.EncodeImageRequest(images=[pb.Image(data=data)]), timeout=60)
    (embedding,) = response.embeddings
    values = np.asarray(embedding.values, dtype=np.float32)
    assert values.shape == (response.dim,)
    assert np.isfinite(values).all()
    assert abs(float(np.linalg.norm(values)) - 1.0) < 1e-5


@THROUGH_THE_SERVER
@given(magic=st.sampled_from((b"", *MAGICS)), tail=st.binary(max_size=2048))
def test_arbitrary_bytes_are_refused_by_name_or_embedded(
    stub: pb_grpc.ClipServiceStub, clip_server, magic: bytes, tail: bytes
) -> None:
    good = pb.Image(data=encode(sample_image(16, 16, "RGB", 1), "PNG"))
    request = pb.EncodeImageRequest(images=[good, pb.Image(data=magic + tail)])
    future = stub.EncodeImage.future(request, timeout=60)
    error = future.exception()
    if error is None:
        assert len(future.result().embeddings) == 2
    else:
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert error.details().startswith("images[1]: ")
    assert health_status(clip_server.address) == "SERVING"
