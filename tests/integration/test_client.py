"""The Python clients and `clipserve client` against a real running server.

`clip_server` (tests/integration/conftest.py) is the real clipserve server on a tiny model
repository. Retry and load balancing are checked against small real `grpc.aio` servers started
here on port 0 (the bound port is read back, never guessed).

Expected results are computed from the server's own encode_* answers, so these tests hold for
any model the fixture serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from clipserve.clients import (
    AsyncClipClient,
    ClipClient,
    ClipServiceError,
    DeadlineExceededError,
    ImageRef,
    InvalidArgumentError,
    ModelInfo,
    PermissionDeniedError,
    RetryPolicy,
    UnavailableError,
)
from clipserve.v1 import clip_service_pb2 as pb
from clipserve.v1 import clip_service_pb2_grpc as pb_grpc

# Embeddings of the same input computed in different batches may differ in the last bits.
ATOL = 1e-4
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)
TEXTS = ["a photo of a cat", "a red circle", "a blue square on a noisy background"]
LABELS = ["red circle", "green square", "blue triangle", "a photo of a dog"]


# ---- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def info(client: ClipClient) -> ModelInfo:
    return client.info()


def _picture(seed: int, size: tuple[int, int]) -> Image.Image:
    """A deterministic RGB picture: smooth gradients plus a coloured block and some noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [
            127 + 120 * np.sin(x / (7 + seed)),
            127 + 120 * np.cos(y / (5 + seed)),
            255 * x / w,
        ],
        axis=-1,
    )  # [H, W, 3]
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    base[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 256, 3)
    base += rng.normal(0, 8, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three PNG files of different, non-square sizes (the server resizes and crops them)."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for seed, size in enumerate([(96, 64), (64, 80), (120, 120)]):
        path = folder / f"picture{seed}.png"
        _picture(seed, size).save(path)
        paths.append(path)
    return paths


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64) - logits.max()
    exp = np.exp(logits)
    return exp / exp.sum()


def _assert_unit_rows(x: np.ndarray, dim: int) -> None:
    assert x.dtype == np.float32
    assert x.shape[1] == dim
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-3)


# ---- info and encode -----------------------------------------------------------------------


def test_info_describes_the_model(info: ModelInfo) -> None:
    assert info.model_name
    assert info.embedding_dim > 0
    assert info.image_size > 0
    assert info.context_length > 0
    assert info.precision in ("fp32", "fp16")
    assert info.logit_scale > 0
    assert info.max_items_per_request >= 1
    assert len(info.image_mean) == len(info.image_std) == 3


def test_encode_text_unit_norm_and_dim(client: ClipClient, info: ModelInfo) -> None:
    x = client.encode_text(TEXTS)
    assert x.shape == (len(TEXTS), info.embedding_dim)
    _assert_unit_rows(x, info.embedding_dim)
    again = client.encode_text([TEXTS[1], TEXTS[1]])
    np.testing.assert_allclose(again[0], again[1], atol=ATOL)
    np.testing.assert_allclose(again[0], x[1], atol=ATOL)
    assert not np.allclose(x[0], x[1], atol=1e-3)


def test_embedding_formats_agree(client: ClipClient) -> None:
    as_float = client.encode_text(TEXTS, embedding_format="float")
    as_fp32 = client.encode_text(TEXTS, embedding_format="fp32_bytes")
    as_fp16 = client.encode_text(TEXTS, embedding_format="fp16_bytes")
    assert as_fp16.dtype == np.float32
    np.testing.assert_allclose(as_fp32, as_float, atol=ATOL)
    np.testing.assert_allclose(as_fp16, as_float, atol=2e-3)


def test_image_kinds_give_the_same_embedding(
    client: ClipClient, info: ModelInfo, image_paths: list[Path]
) -> None:
    path = image_paths[0]
    with Image.open(path) as opened:
        pil = opened.convert("RGB")
    kinds = [str(path), path, path.read_bytes(), pil, ImageRef(path)]
    x = client.encode_image(kinds)
    assert x.shape == (len(kinds), info.embedding_dim)
    _assert_unit_rows(x, info.embedding_dim)
    for row in x[1:]:
        np.testing.assert_allclose(row, x[0], atol=ATOL)
    others = client.encode_image(image_paths[1:])
    assert not np.allclose(others[0], x[0], atol=1e-3)


def test_preprocessed_tensor_matches_server_preprocessing(
    client: ClipClient, info: ModelInfo
) -> None:
    size = info.image_size
    picture = _picture(7, (size, size))  # already the model's size: no resize, no crop
    mean = np.asarray(info.image_mean, dtype=np.float32)
    std = np.asarray(info.image_std, dtype=np.float32)
    pixels = np.asarray(picture, dtype=np.float32) / 255.0  # [S, S, 3]
    tensor = ((pixels - mean) / std).transpose(2, 0, 1)  # [3, S, S]
    x = client.encode_image([picture, tensor, tensor.astype(np.float16)])
    assert float(x[0] @ x[1]) > 0.999
    assert float(x[0] @ x[2]) > 0.99
    batch = client.encode_image(tensor[None])  # [1, 3, S, S]
    np.testing.assert_allclose(batch[0], x[1], atol=ATOL)


def test_truncation(client: ClipClient, info: ModelInfo) -> None:
    long_text = " ".join(["cat"] * (info.context_length * 2))
    assert client.encode_text([long_text]).shape == (1, info.embedding_dim)
    with pytest.raises(InvalidArgumentError) as error:
        client.encode_text([long_text], truncate=False)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT


# ---- classify and rank ---------------------------------------------------------------------


def test_classify_probabilities_sum_to_one(client: ClipClient, image_paths: list[Path]) -> None:
    results = client.classify(image_paths[:2], LABELS)
    assert len(results) == 2
    for scores in results:
        assert len(scores) == len(LABELS)
        assert sum(s.probability for s in scores) == pytest.approx(1.0, abs=1e-4)
        assert sorted(s.index for s in scores) == list(range(len(LABELS)))
        assert all(s.label == LABELS[s.index] for s in scores)
        probabilities = [s.probability for s in scores]
        assert probabilities == sorted(probabilities, reverse=True)


@pytest.mark.parametrize("templates", [None, ["a photo of a {}."], ["{}", "a drawing of a {}."]])
def test_classify_scores_match_embeddings(
    client: ClipClient, info: ModelInfo, image_paths: list[Path], templates: list[str] | None
) -> None:
    image = client.encode_image([image_paths[2]])[0]
    used = templates or list(info.default_templates)
    assert used, "the server reports no default templates"
    label_vectors = []
    for label in LABELS:
        per_template = client.encode_text([t.replace("{}", label) for t in used])
        mean = per_template.mean(axis=0)
        label_vectors.append(mean / np.linalg.norm(mean))
    cosine = np.stack(label_vectors) @ image  # [N_labels]
    expected = _softmax(info.logit_scale * cosine + info.logit_bias)

    [scores] = client.classify([image_paths[2]], LABELS, templates=templates)
    for s in scores:
        assert s.score == pytest.approx(float(cosine[s.index]), abs=1e-3)
        assert s.probability == pytest.approx(float(expected[s.index]), abs=1e-3)


def test_classify_top_k_is_the_head_of_the_full_list(
    client: ClipClient, image_paths: list[Path]
) -> None:
    [full] = client.classify([image_paths[0]], LABELS, templates=["{}"])
    [top] = client.classify([image_paths[0]], LABELS, templates=["{}"], top_k=2)
    assert [s.index for s in top] == [s.index for s in full[:2]]
    for a, b in zip(top, full, strict=False):
        assert a.probability == pytest.approx(b.probability, abs=1e-5)


def test_rank_text_query_over_images(client: ClipClient, image_paths: list[Path]) -> None:
    query = "a colourful picture"
    q = client.encode_text([query])[0]
    candidates = client.encode_image(image_paths)
    cosine = candidates @ q
    ranked = client.rank(query, image_paths)  # Path: images
    assert len(ranked) == len(image_paths)
    for r in ranked:
        assert r.score == pytest.approx(float(cosine[r.index]), abs=1e-3)
    scores = [r.score for r in ranked]
    assert scores == sorted(scores, reverse=True)
    assert sum(r.probability for r in ranked) == pytest.approx(1.0, abs=1e-4)
    top = client.rank(query, [ImageRef(p) for p in image_paths], top_k=1)
    assert [r.index for r in top] == [ranked[0].index]


def test_rank_image_query_over_texts(client: ClipClient, image_paths: list[Path]) -> None:
    image = client.encode_image([image_paths[1]])[0]
    cosine = client.encode_text(TEXTS) @ image
    ranked = client.rank(ImageRef(image_paths[1]), TEXTS)  # str: texts
    assert [r.index for r in ranked] == [int(i) for i in np.argsort(-cosine, kind="stable")]
    for r in ranked:
        assert r.score == pytest.approx(float(cosine[r.index]), abs=1e-3)


# ---- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda c: c.encode_text([]), id="no-texts"),
        pytest.param(lambda c: c.encode_image([]), id="no-images"),
        pytest.param(lambda c: c.encode_image([b"not an image"]), id="undecodable"),
        pytest.param(lambda c: c.classify([b"x"], []), id="no-labels"),
        pytest.param(lambda c: c.rank("query", []), id="no-candidates"),
    ],
)
def test_invalid_requests_raise_invalid_argument(client: ClipClient, call: Any) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        call(client)
    assert isinstance(error.value, ClipServiceError)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.message
    assert error.value.attempts == 1


def test_classify_argument_errors_name_the_problem(
    client: ClipClient, image_paths: list[Path]
) -> None:
    with pytest.raises(InvalidArgumentError, match="labels"):
        client.classify([image_paths[0]], ["cat", "cat"])
    with pytest.raises(InvalidArgumentError, match="top_k"):
        client.classify([image_paths[0]], ["cat", "dog"], top_k=3)


def test_url_images_are_refused_by_default(client: ClipClient) -> None:
    with pytest.raises(PermissionDeniedError) as error:
        client.encode_image([ImageRef(url="https://example.com/cat.jpg")])
    assert error.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_round_robin_dns_target(address: str) -> None:
    with ClipClient(f"dns:///{address}", load_balancing="round_robin") as c:
        assert c.info().embedding_dim > 0


# ---- async client --------------------------------------------------------------------------


async def test_async_client_matches_sync(
    address: str, client: ClipClient, image_paths: list[Path]
) -> None:
    async with AsyncClipClient(address, timeout=60.0) as aclient:
        assert await aclient.info() == client.info()
        np.testing.assert_allclose(
            await aclient.encode_text(TEXTS), client.encode_text(TEXTS), atol=ATOL
        )
        np.testing.assert_allclose(
            await aclient.encode_image(image_paths), client.encode_image(image_paths), atol=ATOL
        )
        a_scores = await aclient.classify(image_paths[:1], LABELS, templates=["{}"])
        s_scores = client.classify(image_paths[:1], LABELS, templates=["{}"])
        assert [s.index for s in a_scores[0]] == [s.index for s in s_scores[0]]
        a_rank = await aclient.rank("a picture", image_paths, top_k=2)
        assert [r.index for r in a_rank] == [
            r.index for r in client.rank("a picture", image_paths, top_k=2)
        ]


async def test_async_concurrent_calls(address: str, client: ClipClient) -> None:
    texts = [f"a photo of {n} cats" for n in range(8)]
    expected = client.encode_text(texts)
    async with AsyncClipClient(address, timeout=60.0) as aclient:
        results = await asyncio.gather(*(aclient.encode_text([t]) for t in texts))
    np.testing.assert_allclose(np.concatenate(results), expected, atol=ATOL)


async def test_async_errors(address: str) -> None:
    async with AsyncClipClient(address) as aclient:
        with pytest.raises(InvalidArgumentError) as error:
            await aclient.encode_text([])
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT


# ---- retry and load balancing, against small real servers ----------------------------------


class CountingService(pb_grpc.ClipServiceServicer):
    """Fails GetModelInfo with ``code`` ``failures`` times, then answers; records metadata."""

    def __init__(
        self,
        failures: int = 0,
        code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
        name: str = "counting",
    ) -> None:
        self.failures = failures
        self.code = code
        self.name = name
        self.calls = 0
        self.metadata: list[dict[str, str | bytes]] = []

    async def GetModelInfo(  # noqa: N802 - generated servicer method name
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        self.calls += 1
        self.metadata.append(dict(context.invocation_metadata() or ()))
        if self.calls <= self.failures:
            await context.abort(self.code, "warming up")
        return pb.GetModelInfoResponse(model_name=self.name, embedding_dim=4)


@contextlib.asynccontextmanager
async def serving(service: CountingService) -> AsyncIterator[int]:
    """A real grpc.aio server on 127.0.0.1, port chosen by the OS; yields the bound port."""
    server = grpc.aio.server()
    pb_grpc.add_ClipServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


async def test_async_retries_unavailable_then_succeeds() -> None:
    service = CountingService(failures=2)
    async with (
        serving(service) as port,
        AsyncClipClient(f"127.0.0.1:{port}", retry=FAST_RETRY) as aclient,
    ):
        info = await aclient.info()
    assert info.model_name == "counting"
    assert service.calls == 3


async def test_async_gives_up_after_max_attempts() -> None:
    service = CountingService(failures=5)
    policy = RetryPolicy(max_attempts=2, initial_backoff_s=0.01)
    async with (
        serving(service) as port,
        AsyncClipClient(f"127.0.0.1:{port}", retry=policy) as aclient,
    ):
        with pytest.raises(UnavailableError) as error:
            await aclient.info()
    assert service.calls == 2
    assert error.value.attempts == 2
    assert error.value.message == "warming up"


async def test_other_codes_are_not_retried() -> None:
    service = CountingService(failures=1, code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    async with (
        serving(service) as port,
        AsyncClipClient(f"127.0.0.1:{port}", retry=FAST_RETRY) as aclient,
    ):
        with pytest.raises(ClipServiceError) as error:
            await aclient.info()
    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert service.calls == 1


class SlowService(CountingService):
    """Answers GetModelInfo after ``delay_s`` seconds."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    async def GetModelInfo(  # noqa: N802 - generated servicer method name
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return pb.GetModelInfoResponse(model_name="slow")


async def test_deadline_exceeded_per_call_and_by_default() -> None:
    service = SlowService(delay_s=5.0)
    async with (
        serving(service) as port,
        AsyncClipClient(f"127.0.0.1:{port}", timeout=0.2) as aclient,
    ):
        with pytest.raises(DeadlineExceededError) as error:
            await aclient.info()
        assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(DeadlineExceededError):
            await aclient.info(timeout=0.1)
    assert service.calls <= 2  # DEADLINE_EXCEEDED is not retried


async def test_retries_stop_at_the_deadline() -> None:
    service = CountingService(failures=100)
    policy = RetryPolicy(max_attempts=100, initial_backoff_s=0.1, multiplier=1.0, jitter=0.0)
    async with (
        serving(service) as port,
        AsyncClipClient(f"127.0.0.1:{port}", retry=policy, timeout=0.35) as aclient,
    ):
        # Usually the last UNAVAILABLE; on a loaded machine the last attempt may run out of time.
        with pytest.raises((UnavailableError, DeadlineExceededError)) as error:
            await aclient.info()
    assert 1 <= service.calls <= 4  # stopped by the deadline, far below max_attempts
    assert error.value.attempts <= 4


async def test_sync_client_retries_and_sends_the_token() -> None:
    service = CountingService(failures=2)

    def call(port: int) -> ModelInfo:
        with ClipClient(f"127.0.0.1:{port}", retry=FAST_RETRY, token="s3cret") as c:
            return c.info()

    async with serving(service) as port:
        # The blocking client runs in a thread so this loop keeps serving.
        info = await asyncio.to_thread(call, port)
    assert info.model_name == "counting"
    assert service.calls == 3
    assert all(m.get("authorization") == "Bearer s3cret" for m in service.metadata)


async def test_round_robin_spreads_calls_over_addresses() -> None:
    first, second = CountingService(name="first"), CountingService(name="second")
    async with serving(first) as port1, serving(second) as port2:
        target = f"ipv4:127.0.0.1:{port1},127.0.0.1:{port2}"
        names: set[str] = set()
        async with AsyncClipClient(target, load_balancing="round_robin") as aclient:
            for _ in range(50):  # the second address may connect a moment after the first
                names.add((await aclient.info()).model_name)
                if len(names) == 2:
                    break
        async with AsyncClipClient(target, load_balancing="pick_first") as aclient:
            pinned = {(await aclient.info()).model_name for _ in range(4)}
    assert names == {"first", "second"}
    assert len(pinned) == 1


# ---- the CLI, as a subprocess --------------------------------------------------------------


def _cli(
    *args: str, address: str | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSERVE_")}
    if address is not None:
        env["CLIPSERVE_ADDRESS"] = address
    return subprocess.run(
        [sys.executable, "-m", "clipserve", "client", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_cli_info(address: str, info: ModelInfo) -> None:
    done = _cli("info", "--address", address)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["embedding_dim"] == info.embedding_dim
    assert out["model_name"] == info.model_name


def test_cli_encode_text_with_stdin(address: str, client: ClipClient, info: ModelInfo) -> None:
    done = _cli("encode-text", TEXTS[0], "-", address=address, stdin=f"{TEXTS[1]}\n\n")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert (out["count"], out["dim"]) == (2, info.embedding_dim)
    expected = client.encode_text(TEXTS[:2])
    np.testing.assert_allclose(np.asarray(out["embeddings"], np.float32), expected, atol=ATOL)


def test_cli_encode_image_summary(address: str, image_paths: list[Path]) -> None:
    done = _cli("encode-image", *map(str, image_paths[:2]), "--summary", "--address", address)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert [item["input"] for item in out["items"]] == [str(p) for p in image_paths[:2]]
    assert all(item["norm"] == pytest.approx(1.0, abs=1e-3) for item in out["items"])
    assert "embeddings" not in out


def test_cli_classify_and_rank(address: str, image_paths: list[Path]) -> None:
    done = _cli("classify", str(image_paths[0]), "--labels", ",".join(LABELS), address=address)
    assert done.returncode == 0, done.stderr
    [result] = json.loads(done.stdout)["results"]
    assert result["image"] == str(image_paths[0])
    assert sum(s["probability"] for s in result["labels"]) == pytest.approx(1.0, abs=1e-3)

    done = _cli("rank", "a picture", *map(str, image_paths), "--top-k", "2", address=address)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)["results"]
    assert len(results) == 2
    assert all(r["candidate"] == str(image_paths[r["index"]]) for r in results)


def test_cli_errors(address: str, image_paths: list[Path]) -> None:
    done = _cli("classify", str(image_paths[0]), "--labels", "cat,cat", address=address)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: INVALID_ARGUMENT: ")
    assert done.stdout == ""

    done = _cli("classify", str(image_paths[0]), address=address)  # no labels: bad usage
    assert done.returncode == 2
