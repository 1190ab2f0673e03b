"""Model instances (`--vision-instances`, `--text-instances`) on a real server.

Two sessions per tower share one queue: concurrent callers must get exactly the embeddings of
the one-instance session server, both instances must compute, the cores are shared out between
them, and the Triton model config reports the count.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from clipserve.clients import ClipClient
from clipserve.server.engine import usable_cores
from clipserve.triton import grpc_service_pb2 as tpb
from clipserve.triton import grpc_service_pb2_grpc as tpb_grpc
from tests.integration.harness import ServerThread, running_server

TEXTS = [f"a photo of a {name}" for name in ("cat", "dog", "rocket", "cup of coffee")] + [
    "x " * 90, "Ünïcode façade ☕"
]


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


IMAGES = [jpeg(skdata.chelsea()), jpeg(skdata.astronaut()), jpeg(skdata.coffee()),
          jpeg(skdata.rocket())]


class Overlap:
    """How many runs of a tower's sessions were in flight at once, at most."""

    def __init__(self) -> None:
        self.now = self.most = 0
        self.lock = threading.Lock()


class SlowSession:
    """Wraps an onnxruntime session: counts its runs and makes each take at least 30 ms, so
    that batches overlap if the batcher lets them (test-only, like the fault tests' sessions;
    the tiny model alone is over before the next batch forms)."""

    def __init__(self, real: Any, overlap: Overlap) -> None:
        self._real = real
        self._overlap = overlap
        self.runs = 0

    def run(self, outputs: Any, feeds: Any) -> Any:
        o = self._overlap
        with o.lock:
            self.runs += 1
            o.now += 1
            o.most = max(o.most, o.now)
        try:
            time.sleep(0.03)
            return self._real.run(outputs, feeds)
        finally:
            with o.lock:
                o.now -= 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.fixture(scope="module")
def two_instances(tiny_repository: Path) -> Iterator[ServerThread]:
    with running_server(tiny_repository, vision_instances=2, text_instances=2) as server:
        yield server


def slow_sessions(server: ServerThread, tower: str) -> tuple[list[SlowSession], Overlap]:
    """Swap each instance's session for a slow counting one."""
    overlap, swapped = Overlap(), []
    for runner in getattr(server.server.model, tower)._batch_fns:
        runner.tower._session = SlowSession(runner.tower._session, overlap)
        swapped.append(runner.tower._session)
    return swapped, overlap


def test_concurrent_callers_get_the_one_instance_embeddings_from_both_instances(
    two_instances: ServerThread, client: ClipClient
) -> None:
    (vision, vision_overlap), (text, text_overlap) = (
        slow_sessions(two_instances, "vision"), slow_sessions(two_instances, "text")
    )
    expected_images = client.encode_image(IMAGES)
    expected_texts = client.encode_text(TEXTS)
    with ClipClient(two_instances.address, timeout=60.0) as two, ThreadPoolExecutor(8) as pool:
        images = list(pool.map(lambda k: two.encode_image([IMAGES[k % 4]]), range(48)))
        texts = list(pool.map(lambda k: two.encode_text([TEXTS[k % 6]]), range(96)))
    for k, got in enumerate(images):
        np.testing.assert_allclose(got[0], expected_images[k % 4], atol=1e-5)
    for k, got in enumerate(texts):
        np.testing.assert_allclose(got[0], expected_texts[k % 6], atol=1e-5)
    # both instances of each tower computed batches, side by side, and never more than two
    assert all(s.runs > 0 for s in vision), [s.runs for s in vision]
    assert all(s.runs > 0 for s in text), [s.runs for s in text]
    assert vision_overlap.most == text_overlap.most == 2


def test_instances_share_out_the_cores_and_model_info_and_triton_count_them(
    two_instances: ServerThread,
) -> None:
    for tower in ("vision", "text"):
        runners = getattr(two_instances.server.model, tower)._batch_fns
        assert len(runners) == 2
        assert runners[0].tower is not runners[1].tower  # a session each
        for runner in runners:
            assert runner.tower._options.intra_op_threads == max(1, usable_cores() // 2)
    with grpc.insecure_channel(two_instances.address) as channel:
        stub = tpb_grpc.GRPCInferenceServiceStub(channel)
        for name in ("clip_vision", "clip_text", "clip_image_bytes", "clip_text_strings"):
            config = stub.ModelConfig(tpb.ModelConfigRequest(name=name), timeout=10).config
            assert config.instance_group[0].count == 2, name
    with ClipClient(two_instances.address, timeout=60.0) as client:
        info = client.info()
    assert info.vision_batching.instances == info.text_batching.instances == 2


def test_instances_must_be_positive(tiny_repository: Path) -> None:
    with pytest.raises(ValueError, match="vision_instances must be positive, got 0"):
        ServerThread(tiny_repository, vision_instances=0)
