"""The HTTP API without sockets: the error table's HTTP column, the image-input rule, request
checks and response shapes of /v1/embeddings, and the `http_port` setting."""

from __future__ import annotations

import argparse
import base64
import inspect

import grpc
import numpy as np
import pytest

from clipserve.server import errors
from clipserve.server.errors import ClipServeError, Forbidden, InvalidInput
from clipserve.server.grpc_errors import (
    INTERNAL_MESSAGE,
    STATUSES,
    status_for,
    wire_status_for,
)
from clipserve.server.http_wire import (
    ModelNotFound,
    ServedModel,
    embedding_inputs,
    embeddings_request,
    embeddings_response,
    image_inputs,
    parse_json,
    parse_message,
)
from clipserve.server.model import EncodedImage, UrlImage
from clipserve.server.settings import add_arguments, from_sources
from clipserve.v1 import clip_service_pb2 as pb

MODEL = ServedModel("ViT-L-14", ("ViT-L-14/datacomp_xl_s13b_b90k",))
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))
PNG_URI = "data:image/png;base64," + base64.b64encode(PNG).decode()


# -- the one error table -----------------------------------------------------------------------
def domain_errors() -> list[type[ClipServeError]]:
    return [
        kind for _, kind in inspect.getmembers(errors, inspect.isclass)
        if issubclass(kind, ClipServeError) and kind is not ClipServeError
    ]


def test_every_domain_error_has_a_grpc_and_an_http_status() -> None:
    assert len(domain_errors()) >= 8
    for kind in domain_errors():
        status = STATUSES[kind]
        code, _ = status_for(kind("what went wrong"))  # what a gRPC caller gets
        assert code is status.grpc
        assert 400 <= status.http < 600
        assert status.http_type.endswith("_error")


def test_the_http_column_agrees_with_the_grpc_column() -> None:
    expected = {
        grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
        grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.INTERNAL: 500,
        grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    }
    assert {s.grpc: s.http for s in STATUSES.values()} == expected


def test_subclasses_use_their_parents_row_and_unknown_errors_say_nothing() -> None:
    status, message = wire_status_for(ModelNotFound("The model 'x' does not exist"))
    assert (status.http, status.grpc) == (404, grpc.StatusCode.NOT_FOUND)
    assert message == "The model 'x' does not exist"
    status, message = wire_status_for(KeyError("/secret/path"))
    assert (status.http, message) == (500, INTERNAL_MESSAGE)
    assert status_for(errors.ModelFailure("cuda says no")) == (
        grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
    )


# -- the image-input rule ----------------------------------------------------------------------
def test_strings_are_texts_images_or_urls_by_one_rule() -> None:
    items = embedding_inputs(
        ["a cat", PNG_URI, "http://example.com/a.jpg", "see https://x.y/z", "data: the new oil"],
        urls=True,
    )
    assert items == [
        "a cat", EncodedImage(PNG), UrlImage("http://example.com/a.jpg"), "see https://x.y/z",
        "data: the new oil",
    ]
    assert embedding_inputs("one text", urls=False) == ["one text"]


def test_urls_are_refused_naming_the_item_unless_the_server_fetches_them() -> None:
    with pytest.raises(Forbidden) as info:
        embedding_inputs(["a cat", "https://example.com/a.jpg"], urls=False)
    assert info.value.item == "input[1]"
    assert "URL inputs are disabled" in str(info.value)


def test_explicit_items_say_what_they_are() -> None:
    items = embedding_inputs([
        {"type": "text", "text": "https://example.com/a.jpg"},
        {"type": "image_url", "image_url": {"url": PNG_URI, "detail": "auto"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/b.png"}},
    ], urls=True)
    assert items == ["https://example.com/a.jpg", EncodedImage(PNG),
                     UrlImage("https://example.com/b.png")]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "input[0]: empty text"),
        ("data:image/png;base64,@@@", "input[0]: the image data URI is not valid base64"),
        ("data:image/png;base64,", "input[0]: the image data URI holds no data"),
        ("data:image/png,%89PNG", "input[0]: an image data URI must be"),
        ([1, 2], "input[0]: token arrays are not supported"),
        (3.5, "input[0]: must be a string or an input object, got a number"),
        ({"type": "video"}, "input[0]: an input object needs type 'text' or 'image_url'"),
        ({"type": "text", "text": ""}, "input[0]: an input of type 'text' needs"),
        ({"type": "image_url", "image_url": "x"}, "input[0]: an input of type 'image_url' needs"),
        ({"type": "image_url", "image_url": {"url": "ftp://a/b"}}, "input[0]: image_url.url"),
    ],
)
def test_bad_items_are_named(value: object, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        embedding_inputs([value], urls=True)
    assert str(info.value).startswith(message)


# -- /v1/embeddings requests and responses ---------------------------------------------------
def test_a_request_in_openais_shape() -> None:
    request = embeddings_request(
        {"model": "ViT-L-14/datacomp_xl_s13b_b90k", "input": ["a", PNG_URI],
         "encoding_format": "base64", "dimensions": 768, "user": "u"},
        MODEL, 768, urls=False,
    )
    assert request.items == ["a", EncodedImage(PNG)]
    assert request.encoding == "base64"
    assert embeddings_request({"model": "ViT-L-14", "input": "a"}, MODEL, 768,
                              urls=False).encoding == "float"


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        ([], InvalidInput, "the request body must be a JSON object, got an array"),
        ({"input": "a"}, InvalidInput, "model: model is required"),
        ({"model": "gpt-4", "input": "a"}, ModelNotFound, "The model 'gpt-4' does not exist"),
        ({"model": "ViT-L-14"}, InvalidInput, "input: input is required"),
        ({"model": "ViT-L-14", "input": "a", "dimensions": 256}, InvalidInput,
         "dimensions: this model's embeddings have 768 dimensions"),
        ({"model": "ViT-L-14", "input": "a", "dimensions": True}, InvalidInput, "dimensions:"),
        ({"model": "ViT-L-14", "input": "a", "encoding_format": "fp16"}, InvalidInput,
         "encoding_format: must be 'float' or 'base64'"),
        ({"model": "ViT-L-14", "input": "a", "truncate": True}, InvalidInput,
         "truncate: unrecognized request argument(s) truncate"),
        ({"model": "ViT-L-14", "input": [1, 2, 3]}, InvalidInput, "input: token arrays"),
        ({"model": "ViT-L-14", "input": 7}, InvalidInput, "input: must be a string or a list"),
        (None, InvalidInput, "the request body must be a JSON object, got null"),
        ({"model": 5, "input": "a"}, InvalidInput, "model: must be a string"),
        ({"model": "ViT-L-14", "input": "a", "user": 42}, InvalidInput, "user: must be a string"),
    ],
)
def test_bad_requests_name_the_field(
    body: object, error: type[ClipServeError], message: str
) -> None:
    with pytest.raises(error) as info:
        embeddings_request(body, MODEL, 768, urls=False)
    assert str(info.value).startswith(message)


def test_the_response_in_openais_shape_and_base64_of_little_endian_float32() -> None:
    matrix = np.array([[0.6, 0.8], [1.0, 0.0]], dtype=np.float32)
    floats = embeddings_response(matrix, [7, 0], "ViT-L-14", "float")
    assert floats == {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 0, "embedding": matrix[0].tolist()},
            {"object": "embedding", "index": 1, "embedding": [1.0, 0.0]},
        ],
        "model": "ViT-L-14",
        "usage": {"prompt_tokens": 7, "total_tokens": 7},
    }
    packed = embeddings_response(matrix, [7, 0], "ViT-L-14", "base64")
    raw = base64.b64decode(packed["data"][0]["embedding"])
    assert raw == np.array([0.6, 0.8], dtype="<f4").tobytes()


def test_classify_and_rank_bodies_are_the_protos_json() -> None:
    request = parse_message(
        {"images": [{"data": base64.b64encode(PNG).decode()}, {"url": PNG_URI}],
         "labels": ["cat"], "topK": 1},
        pb.ClassifyRequest(),
    )
    assert request.top_k == 1
    assert image_inputs(request.images) == [EncodedImage(PNG), EncodedImage(PNG)]
    with pytest.raises(InvalidInput, match="no field named"):
        parse_message({"labelz": []}, pb.ClassifyRequest())
    with pytest.raises(InvalidInput, match="not valid JSON"):
        parse_json(b"{nope")


# -- the setting -------------------------------------------------------------------------------
def test_http_port_is_off_unless_set_and_zero_picks_a_port() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert from_sources(parser.parse_args([]), environ={}).http_port is None
    assert from_sources(parser.parse_args([]), {"CLIPSERVE_HTTP_PORT": "8000"}).http_port == 8000
    assert from_sources(parser.parse_args(["--http-port", "0"]), environ={}).http_port == 0
    env = {"CLIPSERVE_HTTP_PORT": "8000"}
    assert from_sources(parser.parse_args(["--http-port", "off"]), env).http_port is None
    assert from_sources(parser.parse_args([]), {"CLIPSERVE_HTTP_PORT": "off"}).http_port is None
    with pytest.raises(ValueError, match="CLIPSERVE_HTTP_PORT"):
        from_sources(parser.parse_args([]), {"CLIPSERVE_HTTP_PORT": "eighty"})
    with pytest.raises(ValueError, match="--http-port"):
        from_sources(parser.parse_args(["--http-port", "eighty"]), environ={})
    with pytest.raises(ValueError, match="http_port must be 0 to 65535"):
        from_sources(parser.parse_args(["--http-port", "70000"]), environ={})
