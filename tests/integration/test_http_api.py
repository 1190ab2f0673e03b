"""The OpenAI-compatible HTTP API against real servers (port 0), with the official `openai`
client: results equal the gRPC API's, errors come in OpenAI's shape with the right status, and
overload and drain behave as on gRPC. Images are scikit-image's photographs, encoded here.

A request can be held in flight on purpose: its input is a URL served by `HeldImages`, which
answers only when the test says so (URL inputs enabled for 127.0.0.1 on those servers).
"""

from __future__ import annotations

import base64
import http.client
import http.server
import io
import json
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import openai
import pytest
from PIL import Image
from skimage import data as skdata

from clipserve.repository import load_manifest
from clipserve.server.tokenizer import ClipTokenizer
from clipserve.v1 import clip_service_pb2 as pb
from clipserve.v1 import clip_service_pb2_grpc as pb_grpc
from tests.conftest import TINY_EMBEDDING_DIM, TINY_MODEL
from tests.integration.harness import HeldImages, ServerThread, start_subprocess
from tests.integration.test_security import issue

TOKEN = "http-api-test-token"
TEXTS = ["a photo of a cat", "an astronaut in a space suit", "a cup of coffee"]
MAX_BODY = 1 << 20


def encoded(array: np.ndarray, kind: str) -> bytes:
    """A photograph as a file (shrunk: request bodies stay small)."""
    image = Image.fromarray(array)
    image.thumbnail((256, 256))
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


PHOTOS = {
    "chelsea": encoded(skdata.chelsea(), "JPEG"),
    "astronaut": encoded(skdata.astronaut(), "PNG"),
    "coffee": encoded(skdata.coffee(), "JPEG"),
}


def data_uri(image: bytes) -> str:
    kind = "png" if image.startswith(b"\x89PNG") else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(image).decode()


# -- servers -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def http_server(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
    ServerThread
]:
    """Bearer tokens on, URL inputs off, a 1 MiB message limit."""
    tokens = tmp_path_factory.mktemp("http_tokens") / "tokens"
    tokens.write_text(TOKEN + "\n")
    server = ServerThread(
        tiny_repository, http_port=0, auth_token_file=str(tokens), max_message_bytes=MAX_BODY
    ).start()
    yield server
    server.stop(grace_s=5)


def base_url(server: ServerThread) -> str:
    return f"http://127.0.0.1:{server.server.http_port}"


@pytest.fixture(scope="module")
def client(http_server: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=base_url(http_server) + "/v1", api_key=TOKEN, max_retries=0, timeout=60
    ) as c:
        yield c


@pytest.fixture(scope="module")
def stub(http_server: ServerThread) -> Iterator[Callable[[str, Any], Any]]:
    """Call a ClipService RPC of the same server: stub("EncodeText", request)."""
    channel = grpc.insecure_channel(http_server.address)
    service = pb_grpc.ClipServiceStub(channel)
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    yield lambda rpc, request: getattr(service, rpc)(request, metadata=metadata, timeout=60)
    channel.close()


def rows(response: Any) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([d.embedding for d in response.data], dtype=np.float64)


def grpc_rows(embeddings: Any) -> np.ndarray:
    return np.array([list(e.values) for e in embeddings], dtype=np.float64)


# -- embeddings --------------------------------------------------------------------------------
def test_text_embeddings_equal_grpc_and_usage_counts_the_tokenizers_tokens(
    client: openai.OpenAI, stub: Callable[[str, Any], Any], tiny_repository: Path
) -> None:
    response = client.embeddings.create(model=TINY_MODEL, input=TEXTS, encoding_format="float")
    expected = stub("EncodeText", pb.EncodeTextRequest(texts=TEXTS))
    assert response.object == "list"
    assert response.model == TINY_MODEL
    assert all(d.object == "embedding" for d in response.data)
    np.testing.assert_allclose(rows(response), grpc_rows(expected.embeddings), atol=1e-6)
    tokenizer = ClipTokenizer.from_repository(
        tiny_repository, load_manifest(tiny_repository).tokenizer
    )
    tokens = sum(len(ids) for ids in tokenizer.encode_batch(TEXTS))  # start and end included
    assert tokens == sum(expected.token_counts) == 7 + 8 + 6
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens
    single = client.embeddings.create(model=TINY_MODEL, input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(rows(single)[0], rows(response)[0], atol=1e-6)


def test_image_embeddings_from_data_uris_equal_grpc(
    client: openai.OpenAI, stub: Callable[[str, Any], Any]
) -> None:
    photos = list(PHOTOS.values())
    response = client.embeddings.create(
        model=TINY_MODEL, input=[data_uri(p) for p in photos], encoding_format="float"
    )
    expected = stub("EncodeImage", pb.EncodeImageRequest(images=[pb.Image(data=p) for p in photos]))
    np.testing.assert_allclose(rows(response), grpc_rows(expected.embeddings), atol=1e-6)
    assert response.usage.prompt_tokens == 0  # images count no tokens


def test_mixed_inputs_keep_their_order_and_the_explicit_form_means_the_same(
    client: openai.OpenAI, stub: Callable[[str, Any], Any]
) -> None:
    cat = PHOTOS["chelsea"]
    mixed = [TEXTS[0], data_uri(cat), TEXTS[1]]
    response = client.embeddings.create(model=TINY_MODEL, input=mixed, encoding_format="float")
    texts = grpc_rows(stub("EncodeText", pb.EncodeTextRequest(texts=TEXTS[:2])).embeddings)
    image = grpc_rows(stub("EncodeImage", pb.EncodeImageRequest(images=[pb.Image(data=cat)]))
                      .embeddings)
    np.testing.assert_allclose(rows(response), [texts[0], image[0], texts[1]], atol=1e-6)
    explicit = [
        {"type": "text", "text": TEXTS[0]},
        {"type": "image_url", "image_url": {"url": data_uri(cat)}},
        {"type": "text", "text": "https://example.com/not/fetched.png"},  # a text, not a URL
    ]
    again = client.embeddings.create(
        model=f"{TINY_MODEL}/none", input=explicit, encoding_format="float"  # type: ignore[arg-type]
    )
    as_text = stub("EncodeText", pb.EncodeTextRequest(texts=[TEXTS[0], explicit[2]["text"]]))
    np.testing.assert_allclose(rows(again)[:2], rows(response)[:2], atol=1e-6)
    np.testing.assert_allclose(rows(again)[2], grpc_rows(as_text.embeddings)[1], atol=1e-6)
    assert response.usage.prompt_tokens == 7 + 8
    assert again.usage.prompt_tokens == sum(as_text.token_counts)


def test_base64_is_little_endian_float32_of_the_float_result(
    client: openai.OpenAI,
) -> None:
    floats = rows(client.embeddings.create(model=TINY_MODEL, input=TEXTS, encoding_format="float"))
    packed = client.embeddings.create(model=TINY_MODEL, input=TEXTS, encoding_format="base64")
    decoded = np.array(
        [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in packed.data]  # type: ignore[arg-type]
    )
    assert decoded.shape == (len(TEXTS), TINY_EMBEDDING_DIM)
    np.testing.assert_array_equal(decoded, floats.astype(np.float32))
    # the client's default asks for base64 and decodes it itself
    np.testing.assert_allclose(rows(client.embeddings.create(model=TINY_MODEL, input=TEXTS)),
                               floats, atol=1e-6)


def test_dimensions_other_than_the_models_are_refused(client: openai.OpenAI) -> None:
    same = client.embeddings.create(
        model=TINY_MODEL, input="a cat", dimensions=TINY_EMBEDDING_DIM, user="someone"
    )
    assert len(same.data[0].embedding) == TINY_EMBEDDING_DIM
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=TINY_MODEL, input="a cat", dimensions=16)
    error = info.value.body
    assert info.value.status_code == 400
    assert error["param"] == "dimensions"  # type: ignore[index]
    assert error["type"] == "invalid_request_error"  # type: ignore[index]
    assert f"have {TINY_EMBEDDING_DIM} dimensions" in error["message"]  # type: ignore[index]
    assert "16" in error["message"]  # type: ignore[index]


def test_an_unknown_model_is_not_found_in_openais_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(model="text-embedding-3-small", input="a cat")
    assert info.value.body == {  # the client hands over the body's "error" object
        "message": f"The model 'text-embedding-3-small' does not exist on this server; it "
                   f"serves '{TINY_MODEL}' or '{TINY_MODEL}/none'",
        "type": "not_found_error", "param": "model", "code": "model_not_found",
    }


def test_bearer_tokens_of_the_grpc_port_guard_the_http_api(
    http_server: ServerThread, client: openai.OpenAI
) -> None:
    with openai.OpenAI(base_url=base_url(http_server) + "/v1", api_key="wrong-token",
                       max_retries=0) as other, pytest.raises(openai.AuthenticationError) as info:
        other.embeddings.create(model=TINY_MODEL, input="a cat")
    assert info.value.body == {  # never says how close the guess was, nor echoes it
        "message": "invalid bearer token", "type": "authentication_error", "param": None,
        "code": "unauthenticated",
    }
    request = urllib.request.Request(
        base_url(http_server) + "/v1/embeddings", method="POST",
        data=json.dumps({"model": TINY_MODEL, "input": "a cat"}).encode(),
    )
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(request, timeout=30)
    assert missing.value.code == 401
    assert missing.value.headers["WWW-Authenticate"] == "Bearer"
    assert "missing bearer token" in json.loads(missing.value.read())["error"]["message"]
    # probes stay public (auth_public_health), the model list does not
    assert _get(http_server, "/health/ready") == (200, {"status": "SERVING"})
    assert _get(http_server, "/health/live")[0] == 200
    assert _get(http_server, "/v1/models")[0] == 401
    assert client.models.list().data[0].id == TINY_MODEL


def _get(server: ServerThread, path: str, token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(base_url(server) + path)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_unknown_routes_and_methods_get_404_and_405_in_the_error_format(
    http_server: ServerThread,
) -> None:
    status, body = _get(http_server, "/v1/nope", TOKEN)
    assert status == 404
    assert body["error"]["code"] == "not_found"
    assert body["error"]["type"] == "invalid_request_error"
    assert "GET /v1/nope" in body["error"]["message"]
    request = urllib.request.Request(base_url(http_server) + "/v1/embeddings")  # GET, not POST
    request.add_header("Authorization", f"Bearer {TOKEN}")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == 405
    assert "POST" in info.value.headers["Allow"]
    error = json.loads(info.value.read())["error"]
    assert error["code"] == "method_not_allowed"
    assert "GET /v1/embeddings" in error["message"]


def test_models_lists_the_model_with_its_info(
    http_server: ServerThread, client: openai.OpenAI, stub: Callable[[str, Any], Any]
) -> None:
    status, listing = _get(http_server, "/v1/models", TOKEN)
    assert status == 200
    assert listing["object"] == "list"
    (entry,) = listing["data"]
    assert entry["id"] == TINY_MODEL
    assert entry["object"] == "model"
    assert entry["aliases"] == [f"{TINY_MODEL}/none"]
    info = stub("GetModelInfo", pb.GetModelInfoRequest())
    assert entry["info"]["embeddingDim"] == info.embedding_dim == TINY_EMBEDDING_DIM
    assert entry["info"]["contextLength"] == info.context_length
    assert client.models.retrieve(f"{TINY_MODEL}/none").id == TINY_MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_a_bad_item_is_named_and_fails_only_its_own_request(
    client: openai.OpenAI, http_server: ServerThread
) -> None:
    bad = [TEXTS[0], TEXTS[1], data_uri(PHOTOS["coffee"]), "data:image/png;base64,iVBORw0KGgo="]
    with ThreadPoolExecutor(6) as pool:
        good = [pool.submit(client.embeddings.create, model=TINY_MODEL, input=TEXTS)
                for _ in range(5)]
        failing = pool.submit(client.embeddings.create, model=TINY_MODEL, input=bad)
        assert all(len(g.result().data) == len(TEXTS) for g in good)
        with pytest.raises(openai.BadRequestError) as info:
            failing.result()
    assert info.value.body["param"] == "input[3]"  # type: ignore[index]
    assert info.value.body["message"].startswith("input[3]: ")  # type: ignore[index]
    cases = {
        "": "input[0]: empty text",
        "data:image/png;base64,***": "input[0]: the image data URI is not valid base64",
        "data:image/png,raw": "input[0]: an image data URI must be data:image/<type>;base64,",
    }
    for value, message in cases.items():
        with pytest.raises(openai.BadRequestError, match=re.escape(message)):
            client.embeddings.create(model=TINY_MODEL, input=[value])
    with pytest.raises(openai.BadRequestError, match="token arrays are not supported"):
        client.embeddings.create(model=TINY_MODEL, input=[1, 2, 3])
    with pytest.raises(openai.BadRequestError, match="unrecognized request argument"):
        client.embeddings.create(model=TINY_MODEL, input="x", extra_body={"truncate": True})


def test_urls_are_refused_naming_the_item_when_the_server_does_not_fetch_them(
    client: openai.OpenAI,
) -> None:
    url = "https://example.com/cat.jpg"
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.embeddings.create(model=TINY_MODEL, input=["a cat", url])
    assert info.value.body["param"] == "input[1]"  # type: ignore[index]
    assert "URL inputs are disabled" in info.value.body["message"]  # type: ignore[index]
    explicit = {"type": "image_url", "image_url": {"url": url}}  # the explicit form, same rule
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.embeddings.create(model=TINY_MODEL, input=[explicit])  # type: ignore[list-item]
    assert info.value.body["param"] == "input[0]"  # type: ignore[index]
    assert "URL inputs are disabled" in info.value.body["message"]  # type: ignore[index]
    as_text = client.embeddings.create(
        model=TINY_MODEL, input=[{"type": "text", "text": url}]  # type: ignore[list-item]
    )
    assert len(as_text.data) == 1


def test_a_body_above_the_message_limit_is_refused_with_413(client: openai.OpenAI) -> None:
    huge = "word " * (MAX_BODY // 5 + 1000)
    with pytest.raises(openai.APIStatusError) as info:
        client.embeddings.create(model=TINY_MODEL, input=[huge])
    assert info.value.status_code == 413
    assert info.value.body["code"] == "request_too_large"  # type: ignore[index]
    assert f"larger than {MAX_BODY} bytes" in info.value.body["message"]  # type: ignore[index]
    assert len(client.embeddings.create(model=TINY_MODEL, input="still fine").data) == 1


# -- classify and rank -------------------------------------------------------------------------
async def _post(server: ServerThread, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as session, session.post(
        base_url(server) + path, json=body, headers=headers
    ) as response:
        return response.status, await response.json()


def _b64(image: bytes) -> str:
    return base64.b64encode(image).decode()


async def test_classify_equals_grpc(
    http_server: ServerThread, stub: Callable[[str, Any], Any]
) -> None:
    labels = ["cat", "astronaut", "coffee", "car"]
    photos = [PHOTOS["chelsea"], PHOTOS["astronaut"]]
    body = {
        "images": [{"data": _b64(photos[0])}, {"url": data_uri(photos[1])}],
        "labels": labels, "templates": ["a photo of a {}."], "topK": 3,
    }
    status, result = await _post(http_server, "/v1/classify", body)
    assert status == 200, result
    expected = stub("Classify", pb.ClassifyRequest(
        images=[pb.Image(data=p) for p in photos], labels=labels,
        templates=["a photo of a {}."], top_k=3,
    ))
    assert len(result["classifications"]) == 2
    for got, want in zip(result["classifications"], expected.classifications, strict=True):
        assert [x["label"] for x in got["labels"]] == [x.label for x in want.labels]
        assert [x["index"] for x in got["labels"]] == [x.index for x in want.labels]
        np.testing.assert_allclose([x["score"] for x in got["labels"]],
                                   [x.score for x in want.labels], atol=1e-6)
        np.testing.assert_allclose([x["probability"] for x in got["labels"]],
                                   [x.probability for x in want.labels], atol=1e-6)
    status, error = await _post(http_server, "/v1/classify", {**body, "labels": ["cat", "cat"]})
    assert status == 400
    assert error["error"]["param"] == "labels[1]"


async def test_rank_equals_grpc(http_server: ServerThread, stub: Callable[[str, Any], Any]) -> None:
    photos = list(PHOTOS.values())
    body = {
        "query": {"text": "a photo of a cat"},
        "candidates": [{"image": {"data": _b64(p)}} for p in photos] + [{"text": "a dog"}],
    }
    status, result = await _post(http_server, "/v1/rank", body)
    assert status == 200, result
    expected = stub("Rank", pb.RankRequest(
        query=pb.RankItem(text="a photo of a cat"),
        candidates=[pb.RankItem(image=pb.Image(data=p)) for p in photos]
        + [pb.RankItem(text="a dog")],
    ))
    assert [c["index"] for c in result["candidates"]] == [c.index for c in expected.candidates]
    np.testing.assert_allclose([c["score"] for c in result["candidates"]],
                               [c.score for c in expected.candidates], atol=1e-6)
    status, error = await _post(http_server, "/v1/rank", {"candidates": [{"text": "x"}],
                                                          "top_k": 1, "nope": 1})
    assert status == 400
    assert "nope" in error["error"]["message"]


def test_http_requests_are_counted_in_the_metrics(
    http_server: ServerThread, client: openai.OpenAI
) -> None:
    client.embeddings.create(model=TINY_MODEL, input="count me")
    port = http_server.server.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    assert re.search(
        r'clipserve_requests_total\{code="OK",method="POST /v1/embeddings"\} [1-9]', text
    )
    assert 'method="POST /v1/embeddings"' in text
    assert 'code="NOT_FOUND"' in text


# -- overload and drain ------------------------------------------------------------------------
URL_SETTINGS = {
    "allow_url_inputs": True, "url_allowlist": "127.0.0.1", "url_allow_private": True,
    "url_timeout_s": 60.0,
}


def test_overload_is_refused_with_429_and_other_work_goes_on(tiny_repository: Path) -> None:
    held = HeldImages(PHOTOS["chelsea"])
    server = ServerThread(
        tiny_repository, http_port=0, max_queue_size=2, max_items_per_request=2, **URL_SETTINGS
    ).start()
    try:
        with openai.OpenAI(base_url=base_url(server) + "/v1", api_key="none", max_retries=0,
                           timeout=60) as client, ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(
                client.embeddings.create, model=TINY_MODEL,
                input=[held.url("a"), held.url("b")], encoding_format="float",
            )
            held.wait_for(2)  # two images fetching: the vision queue (2) is full
            with pytest.raises(openai.RateLimitError) as info:
                client.embeddings.create(model=TINY_MODEL, input=data_uri(PHOTOS["coffee"]))
            assert info.value.body["code"] == "resource_exhausted"  # type: ignore[index]
            assert "vision queue is full" in info.value.body["message"]  # type: ignore[index]
            assert info.value.response.headers["retry-after"] == "1"
            assert len(client.embeddings.create(model=TINY_MODEL, input=TEXTS[:2]).data) == 2
            held.release()
            fetched = rows(waiting.result())
            direct = rows(client.embeddings.create(
                model=TINY_MODEL, input=data_uri(PHOTOS["chelsea"]), encoding_format="float"
            ))
            np.testing.assert_allclose(fetched, np.repeat(direct, 2, axis=0), atol=1e-6)
    finally:
        held.close()
        server.stop(grace_s=5)


def test_sigterm_drains_http_requests_in_flight_and_readiness_turns_503(
    tiny_repository: Path,
) -> None:
    held = HeldImages(PHOTOS["astronaut"])
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}")
             for k, v in URL_SETTINGS.items()]
    server = start_subprocess(tiny_repository, "--http-port", "0", "--drain-grace-s", "30",
                              *flags)
    try:
        port = int(re.search(r"HTTP API \S+ on port (\d+)", "".join(server.log)).group(1))
        url = f"http://127.0.0.1:{port}"

        def status(path: str) -> int:
            try:
                with urllib.request.urlopen(url + path, timeout=10) as response:
                    return response.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert status("/health/ready") == 200
        with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                           timeout=60) as client, ThreadPoolExecutor(1) as pool:
            in_flight: Future[Any] = pool.submit(
                client.embeddings.create, model=TINY_MODEL, input=held.url("a"),
                encoding_format="float",
            )
            held.wait_for(1)
            server.terminate()
            deadline = time.monotonic() + 30
            while status("/health/ready") != 503:
                assert time.monotonic() < deadline, "readiness never turned 503"
                time.sleep(0.02)
            assert status("/health/live") == 200
            with pytest.raises(openai.InternalServerError) as info:  # 503: go elsewhere
                client.embeddings.create(model=TINY_MODEL, input="too late")
            assert info.value.status_code == 503
            assert info.value.body["code"] == "unavailable"  # type: ignore[index]
            held.release()
            response = in_flight.result()  # admitted before SIGTERM: it completes
            assert len(response.data[0].embedding) == TINY_EMBEDDING_DIM
        assert server.process.wait(30) == 0
    finally:
        held.close()
        if server.process.poll() is None:
            server.process.kill()
    log = "".join(server.log)
    assert re.search(r"draining: [1-9]\d* request", log)
    assert "POST /v1/embeddings OK" in log
    assert "stopped" in log
    with pytest.raises(urllib.error.URLError, match="refused"):  # the port is closed
        urllib.request.urlopen(url + "/health/live", timeout=5)


def test_requests_beyond_the_drain_grace_are_cancelled_and_the_port_closes(
    tiny_repository: Path,
) -> None:
    held = HeldImages(PHOTOS["chelsea"])
    server = ServerThread(tiny_repository, http_port=0, **URL_SETTINGS).start()
    try:
        with openai.OpenAI(base_url=base_url(server) + "/v1", api_key="none", max_retries=0,
                           timeout=60) as client, ThreadPoolExecutor(1) as pool:
            stuck = pool.submit(client.embeddings.create, model=TINY_MODEL, input=held.url("a"))
            held.wait_for(1)
            started = time.monotonic()
            server.stop(grace_s=1.0)
            assert time.monotonic() - started < 5  # not the URL fetch's 60 s
            assert server.server.drain_report["drained"] is False
            with pytest.raises(openai.APIConnectionError):
                stuck.result()
        with pytest.raises(urllib.error.URLError, match="refused"):
            urllib.request.urlopen(base_url(server) + "/health/live", timeout=5)
    finally:
        held.close()


def test_the_http_port_serves_the_grpc_ports_tls_and_mtls(
    tiny_repository: Path, tmp_path: Path
) -> None:
    ca = issue("clipserve test CA", ca=True)
    server_pem = issue("localhost", ca, server=True)[0]
    client_pem = issue("client", ca)[0]
    files = {}
    for name, data in (("ca.pem", ca[0].cert), ("server.pem", server_pem.cert),
                       ("server.key", server_pem.key), ("client.pem", client_pem.cert),
                       ("client.key", client_pem.key)):
        (tmp_path / name).write_bytes(data)
        files[name] = str(tmp_path / name)
    server = ServerThread(
        tiny_repository, http_port=0, tls_cert=files["server.pem"], tls_key=files["server.key"],
        tls_client_ca=files["ca.pem"],
    ).start()
    try:
        port = server.server.http_port
        trusted = ssl.create_default_context(cafile=files["ca.pem"])
        trusted.load_cert_chain(files["client.pem"], files["client.key"])
        with urllib.request.urlopen(f"https://localhost:{port}/health/ready", timeout=30,
                                    context=trusted) as response:
            assert response.status == 200
        anonymous = ssl.create_default_context(cafile=files["ca.pem"])
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"https://localhost:{port}/health/ready", timeout=30,
                                   context=anonymous).read()
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=30).read()
    finally:
        server.stop(grace_s=5)
