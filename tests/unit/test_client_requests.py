"""Unit tests of the Python client: request building, response decoding, retry policy, the
call loop against a fake stub, channel settings and CLI parsing. No sockets."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
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
    ImageRef,
    InvalidArgumentError,
    InvalidResponseError,
    LabelScore,
    RankedCandidate,
    RetryPolicy,
    UnavailableError,
    cli,
    wire,
)
from clipserve.clients.channel import (
    ChannelSettings,
    call_metadata,
    channel_credentials,
    channel_options,
)
from clipserve.clients.errors import ResourceExhaustedError, error_for, rpc_status
from clipserve.clients.retry import backoff_s, is_retryable, next_delay
from clipserve.v1 import clip_service_pb2 as pb

# ---- helpers -------------------------------------------------------------------------------


def _png(color: tuple[int, int, int] = (200, 30, 60), size: int = 8) -> Image.Image:
    image = Image.new("RGB", (size, size), color)
    image.putpixel((1, 2), (0, 255, 0))
    return image


class FakeRpcError(grpc.RpcError):
    """What a failed call raises: a grpc.RpcError with code() and details()."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


# ---- images --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_encoded_bytes_are_sent_as_is(kind: Any) -> None:
    assert wire.image_to_pb(kind(b"\x89PNG...")).data == b"\x89PNG..."


def test_paths_are_read_by_the_client(tmp_path: Path) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(b"image bytes")
    for image in (str(path), path, ImageRef(path), ImageRef(str(path))):
        message = wire.image_to_pb(image)
        assert message.WhichOneof("source") == "data"
        assert message.data == b"image bytes"


def test_missing_file_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        wire.image_to_pb(tmp_path / "missing.jpg")


def test_image_ref_url() -> None:
    message = wire.image_to_pb(ImageRef(url="https://example.com/cat.jpg"))
    assert message.WhichOneof("source") == "url"
    assert message.url == "https://example.com/cat.jpg"


def test_image_ref_needs_exactly_one_source() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ImageRef()
    with pytest.raises(ValueError, match="exactly one"):
        ImageRef("a.jpg", url="https://example.com/a.jpg")


def test_pil_image_is_sent_as_lossless_png() -> None:
    image = _png()
    data = wire.image_to_pb(image).data
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "PNG"
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_pil_mode_png_cannot_store_is_converted_to_rgb() -> None:
    image = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    decoded = Image.open(io.BytesIO(wire.image_to_pb(image).data))
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize(
    ("dtype", "wire_dtype"),
    [(np.float32, pb.DATA_TYPE_FLOAT32), (np.float16, pb.DATA_TYPE_FLOAT16)],
)
def test_array_is_sent_as_tensor(dtype: Any, wire_dtype: int) -> None:
    array = np.arange(3 * 4 * 4, dtype=dtype).reshape(3, 4, 4)
    tensor = wire.image_to_pb(array).tensor
    assert list(tensor.shape) == [3, 4, 4]
    assert tensor.dtype == wire_dtype
    back = np.frombuffer(tensor.data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(3, 4, 4)
    assert np.array_equal(back, array)


def test_tensor_is_little_endian_and_contiguous() -> None:
    array = np.arange(3 * 4 * 4, dtype=">f4").reshape(4, 4, 3).transpose(2, 0, 1)  # [3, 4, 4]
    tensor = wire.tensor_to_pb(array)
    back = np.frombuffer(tensor.data, dtype="<f4").reshape(3, 4, 4)
    assert np.array_equal(back, array)


def test_tensor_shape_and_dtype_are_checked() -> None:
    with pytest.raises(ValueError, match=r"\[3, S, S\]"):
        wire.image_to_pb(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="float32 or float16"):
        wire.image_to_pb(np.zeros((3, 4, 4), dtype=np.uint8))


def test_unknown_image_type_is_refused() -> None:
    with pytest.raises(TypeError, match="an image must be"):
        wire.image_to_pb(42)  # type: ignore[arg-type]


def test_image_list_refuses_a_lone_image_and_splits_a_batch_array() -> None:
    for lone in ("cat.jpg", b"bytes", Path("cat.jpg"), _png(), np.zeros((3, 4, 4), np.float32)):
        with pytest.raises(TypeError):
            wire.image_list(lone)  # type: ignore[arg-type]
    batch = np.zeros((2, 3, 4, 4), dtype=np.float32)  # [N, 3, S, S]
    assert len(wire.image_list(batch)) == 2
    assert len(wire.image_list(x for x in [b"a", b"b"])) == 2


def test_needs_io() -> None:
    assert wire.needs_io([b"x", "cat.jpg"], str_is_path=True)
    assert not wire.needs_io([b"x", "a cat"], str_is_path=False)
    assert wire.needs_io([Path("a.jpg")], str_is_path=False)
    assert wire.needs_io([_png()], str_is_path=False)
    assert not wire.needs_io([np.zeros((3, 2, 2), np.float32)], str_is_path=True)


# ---- requests ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "wire_fmt"),
    [
        ("float", pb.EMBEDDING_FORMAT_FLOAT),
        ("fp32_bytes", pb.EMBEDDING_FORMAT_FP32_BYTES),
        ("fp16_bytes", pb.EMBEDDING_FORMAT_FP16_BYTES),
    ],
)
def test_encode_requests_carry_the_format(fmt: Any, wire_fmt: int) -> None:
    assert wire.encode_text_request(["a"], fmt).format == wire_fmt
    assert wire.encode_image_request([b"x"], fmt).format == wire_fmt


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="embedding_format"):
        wire.encode_text_request(["a"], "bf16")  # type: ignore[arg-type]


def test_encode_text_request_truncation_and_texts() -> None:
    request = wire.encode_text_request(["a cat", "a dog"], "float")
    assert list(request.texts) == ["a cat", "a dog"]
    assert request.truncation == pb.TRUNCATION_END
    assert wire.encode_text_request(["a"], "float", truncate=False).truncation == (
        pb.TRUNCATION_NONE
    )


def test_empty_lists_are_left_to_the_server() -> None:
    assert len(wire.encode_text_request([], "float").texts) == 0
    assert len(wire.encode_image_request([], "float").images) == 0


def test_texts_must_be_a_list_of_str() -> None:
    with pytest.raises(TypeError, match="single str"):
        wire.encode_text_request("a cat", "float")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        wire.encode_text_request(["a", b"b"], "float")  # type: ignore[list-item]


def test_classify_request_top_k_is_optional() -> None:
    request = wire.classify_request([b"x"], ["cat", "dog"])
    assert list(request.labels) == ["cat", "dog"]
    assert list(request.templates) == []
    assert not request.HasField("top_k")
    request = wire.classify_request([b"x"], ["cat", "dog"], templates=["{}"], top_k=1)
    assert list(request.templates) == ["{}"]
    assert request.HasField("top_k")
    assert request.top_k == 1


def test_top_k_type_and_range() -> None:
    with pytest.raises(TypeError):
        wire.optional_top_k(True)
    with pytest.raises(TypeError):
        wire.optional_top_k(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_k"):
        wire.optional_top_k(-1)
    assert wire.optional_top_k(0) == 0  # the server judges the range


def test_rank_request_str_is_text_anything_else_is_an_image(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(b"png")
    request = wire.rank_request("a photo of a cat", [path, ImageRef(path), b"raw", "text"])
    assert request.query.text == "a photo of a cat"
    kinds = [c.WhichOneof("item") for c in request.candidates]
    assert kinds == ["image", "image", "image", "text"]
    assert request.candidates[0].image.data == b"png"
    assert not request.HasField("top_k")
    assert wire.rank_request(b"q", ["a", "b"], top_k=1).top_k == 1
    with pytest.raises(TypeError, match="single str"):
        wire.rank_request("q", "ab")


# ---- responses -----------------------------------------------------------------------------


def _vectors(n: int = 3, dim: int = 5) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_decode_float_values() -> None:
    x = _vectors()
    response = pb.EncodeTextResponse(
        embeddings=[pb.Embedding(values=row) for row in x], dim=5, format=pb.EMBEDDING_FORMAT_FLOAT
    )
    out = wire.decode_encode_response(response, 3)
    assert out.dtype == np.float32
    assert out.shape == (3, 5)
    assert np.array_equal(out, x)


def test_decode_unspecified_format_reads_values() -> None:
    x = _vectors(1)
    response = pb.EncodeImageResponse(embeddings=[pb.Embedding(values=x[0])], dim=5)
    assert np.array_equal(wire.decode_encode_response(response, 1), x)


def test_decode_fp32_bytes_is_exact() -> None:
    x = _vectors()
    response = pb.EncodeImageResponse(
        embeddings=[pb.Embedding(raw=row.astype("<f4").tobytes()) for row in x],
        dim=5,
        format=pb.EMBEDDING_FORMAT_FP32_BYTES,
    )
    out = wire.decode_encode_response(response, 3)
    assert out.dtype == np.float32
    assert out.flags.writeable
    assert np.array_equal(out, x)


def test_decode_fp16_bytes_widens_to_float32() -> None:
    x = _vectors()
    response = pb.EncodeTextResponse(
        embeddings=[pb.Embedding(raw=row.astype("<f2").tobytes()) for row in x],
        dim=5,
        format=pb.EMBEDDING_FORMAT_FP16_BYTES,
    )
    out = wire.decode_encode_response(response, 3)
    assert out.dtype == np.float32
    assert np.array_equal(out, x.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(out, x, atol=1e-3)


def test_decode_empty_response() -> None:
    response = pb.EncodeTextResponse(dim=7, format=pb.EMBEDDING_FORMAT_FP32_BYTES)
    assert wire.decode_encode_response(response, 0).shape == (0, 7)


def test_decode_refuses_broken_responses() -> None:
    x = _vectors(2)
    raw = [pb.Embedding(raw=row.tobytes()) for row in x]
    with pytest.raises(InvalidResponseError, match="2 embeddings for 3 inputs"):
        wire.decode_encode_response(
            pb.EncodeTextResponse(embeddings=raw, dim=5, format=pb.EMBEDDING_FORMAT_FP32_BYTES), 3
        )
    with pytest.raises(InvalidResponseError, match="raw bytes"):
        wire.decode_encode_response(
            pb.EncodeTextResponse(embeddings=raw, dim=4, format=pb.EMBEDDING_FORMAT_FP32_BYTES), 2
        )
    with pytest.raises(InvalidResponseError, match="values"):
        wire.decode_encode_response(
            pb.EncodeTextResponse(
                embeddings=[pb.Embedding(values=[1.0])], dim=2, format=pb.EMBEDDING_FORMAT_FLOAT
            ),
            1,
        )
    assert InvalidResponseError("x").code == grpc.StatusCode.DATA_LOSS


def test_decode_classify_and_rank() -> None:
    response = pb.ClassifyResponse(
        classifications=[
            pb.Classification(
                labels=[
                    pb.LabelScore(label="dog", index=1, probability=0.75, score=0.5),
                    pb.LabelScore(label="cat", index=0, probability=0.25, score=0.25),
                ]
            )
        ]
    )
    assert wire.decode_classify_response(response, 1) == [
        [LabelScore("dog", 1, 0.75, 0.5), LabelScore("cat", 0, 0.25, 0.25)]
    ]
    with pytest.raises(InvalidResponseError):
        wire.decode_classify_response(response, 2)
    ranked = wire.decode_rank_response(
        pb.RankResponse(candidates=[pb.RankedCandidate(index=2, score=0.5, probability=1.0)])
    )
    assert ranked == [RankedCandidate(index=2, score=0.5, probability=1.0)]


def test_decode_model_info() -> None:
    response = pb.GetModelInfoResponse(
        model_name="ViT-B-32",
        embedding_dim=512,
        image_size=224,
        default_templates=["a photo of a {}."],
        image_mean=[0.5, 0.25, 0.125],
        text_batching=pb.BatchingInfo(max_batch_size=8, length_buckets=[16, 77]),
        max_labels=1000,
    )
    info = wire.decode_model_info(response)
    assert info.model_name == "ViT-B-32"
    assert info.embedding_dim == 512
    assert info.default_templates == ("a photo of a {}.",)
    assert info.image_mean == (0.5, 0.25, 0.125)
    assert info.text_batching.length_buckets == (16, 77)
    assert info.max_labels == 1000
    hash(info)  # frozen value


# ---- retry policy --------------------------------------------------------------------------


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, multiplier=2.0, max_backoff_s=0.5, jitter=0.0)
    assert [backoff_s(policy, n, 0.7) for n in (1, 2, 3, 4, 5)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.5, 0.5]
    )


def test_jitter_spreads_the_wait_below_the_cap() -> None:
    policy = RetryPolicy(initial_backoff_s=1.0, max_backoff_s=10.0, jitter=0.5)
    assert backoff_s(policy, 1, 0.0) == pytest.approx(1.0)
    assert backoff_s(policy, 1, 0.999999) == pytest.approx(0.5, abs=1e-5)
    full = RetryPolicy(initial_backoff_s=1.0, jitter=1.0)
    assert 0.0 < backoff_s(full, 1, 0.9) < 0.2


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c != grpc.StatusCode.UNAVAILABLE])
def test_only_unavailable_is_retried(code: grpc.StatusCode) -> None:
    assert not is_retryable(code)
    assert next_delay(RetryPolicy(), code, 1, 0.5) is None


def test_attempts_are_bounded() -> None:
    policy = RetryPolicy(max_attempts=3, jitter=0.0)
    unavailable = grpc.StatusCode.UNAVAILABLE
    assert next_delay(policy, unavailable, 1, 0.5) == pytest.approx(0.1)
    assert next_delay(policy, unavailable, 2, 0.5) == pytest.approx(0.2)
    assert next_delay(policy, unavailable, 3, 0.5) is None
    assert next_delay(RetryPolicy(max_attempts=1), unavailable, 1, 0.5) is None


def test_no_retry_past_the_deadline() -> None:
    policy = RetryPolicy(initial_backoff_s=1.0, jitter=0.0)
    unavailable = grpc.StatusCode.UNAVAILABLE
    assert next_delay(policy, unavailable, 1, 0.0, remaining_s=1.5) == pytest.approx(1.0)
    assert next_delay(policy, unavailable, 1, 0.0, remaining_s=0.5) is None
    assert next_delay(policy, unavailable, 1, 0.0, remaining_s=None) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_attempts": 0}, {"jitter": 1.5}, {"multiplier": 0.5}, {"initial_backoff_s": -1}],
)
def test_retry_policy_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        RetryPolicy(**kwargs)


# ---- errors --------------------------------------------------------------------------------


def test_errors_carry_code_and_message() -> None:
    error = error_for(grpc.StatusCode.INVALID_ARGUMENT, "texts: empty", method="EncodeText")
    assert isinstance(error, InvalidArgumentError)
    assert isinstance(error, ClipServiceError)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "texts: empty"
    assert str(error) == "INVALID_ARGUMENT: texts: empty"
    assert type(error_for(grpc.StatusCode.ABORTED, "x")) is ClipServiceError
    assert isinstance(error_for(grpc.StatusCode.RESOURCE_EXHAUSTED, "x"), ResourceExhaustedError)


def test_rpc_status_reads_code_and_details() -> None:
    code, message = rpc_status(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "down"))
    assert (code, message) == (grpc.StatusCode.UNAVAILABLE, "down")
    assert rpc_status(grpc.RpcError()) == (grpc.StatusCode.UNKNOWN, "")


# ---- the call loop, against a fake stub ----------------------------------------------------


class FakeStub:
    """Stands in for ClipServiceStub: fails with the queued codes, then answers."""

    def __init__(self, failures: list[grpc.StatusCode], response: Any) -> None:
        self.failures = list(failures)
        self.response = response
        self.calls: list[dict[str, Any]] = []

    def _answer(self, request: Any, timeout: float | None, metadata: Any) -> Any:
        self.calls.append({"request": request, "timeout": timeout, "metadata": metadata})
        if self.failures:
            raise FakeRpcError(self.failures.pop(0), "not now")
        return self.response

    def __getattr__(self, method: str) -> Any:
        return self._answer


class AsyncFakeStub(FakeStub):
    def __getattr__(self, method: str) -> Any:
        async def call(request: Any, timeout: float | None, metadata: Any) -> Any:
            return self._answer(request, timeout, metadata)

        return call


class StubbedClient(ClipClient):
    def _connect(self) -> None:
        self._channel = None  # type: ignore[assignment]
        self._stub = None


class AsyncStubbedClient(AsyncClipClient):
    def _connect(self) -> None:
        self._channel = None  # type: ignore[assignment]
        self._stub = None


FAST = RetryPolicy(max_attempts=3, initial_backoff_s=0.001, max_backoff_s=0.002)
INFO = pb.GetModelInfoResponse(model_name="tiny", embedding_dim=4)


def test_sync_call_retries_unavailable_then_succeeds() -> None:
    client = StubbedClient("x:1", retry=FAST, timeout=5.0, token="s3cret")
    stub = FakeStub([grpc.StatusCode.UNAVAILABLE] * 2, INFO)
    client._stub = stub
    assert client.info().model_name == "tiny"
    assert len(stub.calls) == 3
    assert stub.calls[0]["metadata"] == (("authorization", "Bearer s3cret"),)
    timeouts = [call["timeout"] for call in stub.calls]
    assert all(0 < t <= 5.0 for t in timeouts)
    assert timeouts == sorted(timeouts, reverse=True)  # one deadline for all attempts


def test_sync_call_gives_up_after_max_attempts() -> None:
    client = StubbedClient("x:1", retry=FAST)
    stub = FakeStub([grpc.StatusCode.UNAVAILABLE] * 5, INFO)
    client._stub = stub
    with pytest.raises(UnavailableError) as info:
        client.info()
    assert len(stub.calls) == 3
    assert info.value.attempts == 3
    assert info.value.method == "GetModelInfo"


def test_sync_call_does_not_retry_other_codes() -> None:
    client = StubbedClient("x:1", retry=FAST)
    stub = FakeStub([grpc.StatusCode.RESOURCE_EXHAUSTED], INFO)
    client._stub = stub
    with pytest.raises(ResourceExhaustedError):
        client.info()
    assert len(stub.calls) == 1


def test_per_call_timeout_overrides_the_default() -> None:
    client = StubbedClient("x:1", timeout=30.0)
    stub = FakeStub([], INFO)
    client._stub = stub
    client.info(timeout=0.5)
    assert stub.calls[0]["timeout"] <= 0.5
    assert StubbedClient("x:1", timeout=None)._remaining(None) is None


def test_broken_response_names_the_rpc() -> None:
    client = StubbedClient("x:1")
    client._stub = FakeStub([], pb.EncodeTextResponse(dim=4))
    with pytest.raises(InvalidResponseError) as info:
        client.encode_text(["a"])
    assert info.value.method == "EncodeText"


async def test_async_call_retries_and_decodes() -> None:
    client = AsyncStubbedClient("x:1", retry=FAST)
    x = _vectors(2, 4)
    response = pb.EncodeTextResponse(
        embeddings=[pb.Embedding(raw=row.tobytes()) for row in x],
        dim=4,
        format=pb.EMBEDDING_FORMAT_FP32_BYTES,
    )
    stub = AsyncFakeStub([grpc.StatusCode.UNAVAILABLE], response)
    client._stub = stub
    out = await client.encode_text(["a", "b"])
    assert np.array_equal(out, x)
    assert len(stub.calls) == 2
    assert stub.calls[0]["request"].format == pb.EMBEDDING_FORMAT_FP32_BYTES


async def test_async_call_raises_mapped_error() -> None:
    client = AsyncStubbedClient("x:1", retry=FAST)
    client._stub = AsyncFakeStub([grpc.StatusCode.INVALID_ARGUMENT], INFO)
    with pytest.raises(InvalidArgumentError):
        await client.info()


async def test_async_reads_image_files(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    _png().save(path)
    client = AsyncStubbedClient("x:1")
    stub = AsyncFakeStub([], pb.ClassifyResponse(classifications=[pb.Classification()]))
    client._stub = stub
    assert await client.classify([path], ["cat"], top_k=1) == [[]]
    request = stub.calls[0]["request"]
    assert request.images[0].data == path.read_bytes()
    assert request.top_k == 1


def test_client_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="embedding_format"):
        StubbedClient("x:1", embedding_format="int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        StubbedClient("x:1", timeout=0)
    with pytest.raises(ValueError, match="load_balancing"):
        StubbedClient("x:1", load_balancing="random")  # type: ignore[arg-type]


# ---- channel settings ----------------------------------------------------------------------


def test_round_robin_via_service_config() -> None:
    options = dict(channel_options(ChannelSettings("dns:///clip.ns.svc:8001", "round_robin")))
    assert json.loads(options["grpc.service_config"]) == {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": "clipserve.v1.ClipService"},
    }
    assert "grpc.service_config" not in dict(channel_options(ChannelSettings()))
    pick_first = dict(channel_options(ChannelSettings("localhost:8001", "pick_first")))
    assert "healthCheckConfig" not in json.loads(pick_first["grpc.service_config"])


def test_message_limits_keepalive_and_overrides() -> None:
    settings = ChannelSettings(
        max_receive_message_length=1 << 20,
        keepalive_time_s=30,
        keepalive_timeout_s=5,
        keepalive_permit_without_calls=True,
        options=[("grpc.max_send_message_length", 123), ("grpc.enable_http_proxy", 0)],
    )
    options = dict(channel_options(settings))
    assert options["grpc.max_receive_message_length"] == 1 << 20
    assert options["grpc.max_send_message_length"] == 123  # caller's option wins
    assert options["grpc.enable_http_proxy"] == 0
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == 5_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert "grpc.keepalive_time_ms" not in dict(channel_options(ChannelSettings()))


def test_tls_and_token() -> None:
    assert channel_credentials(ChannelSettings()) is None
    assert not ChannelSettings().secure
    assert ChannelSettings(tls=True).secure
    assert ChannelSettings(root_certificates=b"pem").secure
    assert isinstance(channel_credentials(ChannelSettings(tls=True)), grpc.ChannelCredentials)
    with pytest.raises(ValueError, match="both"):
        ChannelSettings(private_key=b"key")
    assert call_metadata(ChannelSettings()) == ()
    assert call_metadata(ChannelSettings(token="t")) == (("authorization", "Bearer t"),)
    options = dict(channel_options(ChannelSettings(server_name="clip.internal")))
    assert options["grpc.ssl_target_name_override"] == "clip.internal"


# ---- CLI parsing ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipserve")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_parser(sub, "client", "call a running server")
    return parser


def test_cli_encode_text_arguments() -> None:
    args = _parser().parse_args(
        ["client", "encode-text", "a cat", "-", "--summary", "--format", "fp16_bytes"]
    )
    assert args.texts == ["a cat", "-"]
    assert args.summary
    assert args.embedding_format == "fp16_bytes"
    assert args.truncate
    assert args.address is None
    assert args.timeout == 30.0
    assert callable(args.run)
    assert not _parser().parse_args(["client", "encode-text", "x", "--no-truncate"]).truncate


def test_cli_classify_arguments(tmp_path: Path) -> None:
    args = _parser().parse_args(
        ["client", "classify", "cat.jpg", "b.png", "--labels", " cat, dog ,car,", "--top-k", "2"]
    )
    assert args.images == ["cat.jpg", "b.png"]
    assert args.top_k == 2
    assert cli.parse_labels(args) == ["cat", "dog", "car"]
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("a cat\n\na dog, sitting\n")
    args = _parser().parse_args(["client", "classify", "x.jpg", "--labels-file", str(labels_file)])
    assert cli.parse_labels(args) == ["a cat", "a dog, sitting"]
    with pytest.raises(cli.UsageError):
        cli.parse_labels(_parser().parse_args(["client", "classify", "x", "--labels", ","]))


@pytest.mark.parametrize(
    "argv",
    [
        ["client"],
        ["client", "classify", "cat.jpg"],  # no labels
        ["client", "classify", "cat.jpg", "--labels", "a", "--labels-file", "f"],
        ["client", "classify", "cat.jpg", "--labels", "a", "--top-k", "0"],
        ["client", "encode-text"],
        ["client", "info", "--timeout", "-1"],
        ["client", "rank", "query"],  # no candidates
        ["client", "encode-text", "x", "--format", "int8"],
    ],
)
def test_cli_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_cli_rank_arguments() -> None:
    args = _parser().parse_args(["client", "rank", "a cat", "a.jpg", "b.jpg", "--address", "h:1"])
    assert (args.query, args.candidates) == ("a cat", ["a.jpg", "b.jpg"])
    assert (args.query_kind, args.candidate_kind) == ("text", "image")
    assert args.address == "h:1"
    args = _parser().parse_args(
        ["client", "rank", "q.jpg", "-", "--query-kind", "image", "--candidate-kind", "text"]
    )
    assert (args.query_kind, args.candidate_kind) == ("image", "text")


def test_cli_stdin_address_and_token(tmp_path: Path) -> None:
    assert cli.expand_stdin(["a", "-", "b"], lambda: "x\n\ny\n") == ["a", "x", "y", "b"]
    assert cli.expand_stdin(["a"], lambda: pytest.fail("stdin read")) == ["a"]
    assert cli.resolve_address(None, {}) == "localhost:8001"
    assert cli.resolve_address(None, {"CLIPSERVE_ADDRESS": "env:1"}) == "env:1"
    assert cli.resolve_address("flag:1", {"CLIPSERVE_ADDRESS": "env:1"}) == "flag:1"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert cli.resolve_token(token_file, {"CLIPSERVE_TOKEN": "env"}) == "from-file"
    assert cli.resolve_token(None, {"CLIPSERVE_TOKEN": "env"}) == "env"
    assert cli.resolve_token(None, {}) is None


@pytest.mark.parametrize("command", ["encode-text", "encode-image", "classify", "rank", "info"])
def test_cli_help_has_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["client", command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out
    assert f"clipserve client {command}" in out


def test_client_package_imports_no_server_or_runtime() -> None:
    code = (
        "import sys, clipserve.clients, clipserve.clients.cli; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('onnxruntime', 'torch') "
        "or m.startswith('clipserve.server')]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
