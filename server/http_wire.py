"""Conversion between the HTTP API's JSON and the serving core's types, at the edge.

No web framework here (`http_api` is the aiohttp adapter), so these rules are unit-tested
without sockets. /v1/embeddings takes and returns OpenAI's shapes; /v1/classify and /v1/rank
take and return the `clipserve.v1` messages in protobuf's JSON mapping (the proto's JSON names,
``topK``; bytes as base64), so they mean exactly what the gRPC RPCs mean.

Image inputs of /v1/embeddings, one rule (docs/http.md):

* a string starting with ``data:image/`` is an image: ``data:image/<type>;base64,<file>``;
* a string that is one http(s) URL (``http://`` or ``https://`` and no whitespace) is an image
  fetched by the server when it allows URL inputs (``--allow-url-inputs``, the same policy as
  gRPC's ``Image.url``), and is refused (403, naming the item) when it does not;
* every other string is a text;
* explicit items, shaped like OpenAI's chat content parts, say what they are:
  ``{"type": "text", "text": "..."}`` and
  ``{"type": "image_url", "image_url": {"url": "<data URI or http(s) URL>"}}``.

In /v1/classify and /v1/rank an ``Image.url`` that is a ``data:image/...;base64,`` URI is read
as the image's bytes too, so the one rule holds across the HTTP API.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from clipserve.repository import Manifest
from clipserve.server import wire
from clipserve.server.errors import Forbidden, InvalidInput, NotFound
from clipserve.server.model import EncodedImage, ImageInput, RankInput, UrlImage
from clipserve.v1 import clip_service_pb2 as pb

_DATA_IMAGE = re.compile(r"data:image/", re.IGNORECASE)
_DATA_URI = re.compile(r"data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)
_URL = re.compile(r"https?://\S+", re.IGNORECASE)

EMBEDDING_FIELDS = frozenset({"input", "model", "encoding_format", "dimensions", "user"})
ENCODINGS = ("float", "base64")
URLS_DISABLED = (
    "URL inputs are disabled on this server (a string that is an http(s) URL is an image "
    "input); to embed the URL as text, send {\"type\": \"text\", \"text\": ...}"
)


class ModelNotFound(NotFound):
    """`model` names a model this server does not serve (404 ``model_not_found``)."""

    code = "model_not_found"
    param = "model"


@dataclass(frozen=True)
class ServedModel:
    """The model's id in the HTTP API and the other names a request may use for it."""

    id: str  # the open_clip architecture, e.g. "ViT-L-14"
    aliases: tuple[str, ...]  # "<architecture>/<pretrained tag>", e.g. "ViT-L-14/datacomp_..."

    @classmethod
    def of(cls, manifest: Manifest) -> ServedModel:
        name = manifest.source.model_name
        return cls(name, (f"{name}/{manifest.source.pretrained}",))

    @property
    def names(self) -> tuple[str, ...]:
        return (self.id, *self.aliases)

    def check(self, requested: object) -> None:
        """Refuse a request for another model, as OpenAI does (404 model_not_found)."""
        if requested is None:
            raise InvalidInput(f"model is required (this server serves {self.id!r})", item="model")
        if not isinstance(requested, str):
            raise InvalidInput("must be a string", item="model")
        if requested not in self.names:
            raise ModelNotFound(
                f"The model {requested!r} does not exist on this server; it serves "
                + " or ".join(repr(n) for n in self.names)
            )


@dataclass(frozen=True)
class EmbeddingsRequest:
    items: list[RankInput]  # str: a text; otherwise an image
    encoding: str  # "float" | "base64"


# -- /v1/embeddings ---------------------------------------------------------------------------
def embeddings_request(
    body: object, model: ServedModel, dim: int, *, urls: bool
) -> EmbeddingsRequest:
    """Check an OpenAI embeddings request and turn its inputs into the core's items."""
    body = _object(body)
    unknown = sorted(set(body) - EMBEDDING_FIELDS)
    if unknown:
        raise InvalidInput(
            f"unrecognized request argument(s) {', '.join(unknown)}; this endpoint takes "
            + ", ".join(sorted(EMBEDDING_FIELDS)),
            item=unknown[0],
        )
    model.check(body.get("model"))
    encoding = body.get("encoding_format") or "float"
    if encoding not in ENCODINGS:
        raise InvalidInput(f"must be 'float' or 'base64', got {encoding!r}", item="encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (type(dimensions) is not int or dimensions != dim):
        raise InvalidInput(
            f"this model's embeddings have {dim} dimensions and cannot be shortened, "
            f"{dimensions!r} were asked for; omit dimensions or send {dim}",
            item="dimensions",
        )
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise InvalidInput("must be a string", item="user")
    if "input" not in body:
        raise InvalidInput("input is required: a string or a list of strings", item="input")
    return EmbeddingsRequest(embedding_inputs(body["input"], urls=urls), encoding)


def embedding_inputs(value: object, *, urls: bool) -> list[RankInput]:
    """OpenAI's ``input`` (a string, a list of strings or explicit items) -> the core's items."""
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        raise InvalidInput("must be a string or a list of strings", item="input")
    if value and all(type(v) is int for v in value):
        raise InvalidInput(
            "token arrays are not supported; send the text as a string", item="input"
        )
    return [embedding_input(v, f"input[{i}]", urls=urls) for i, v in enumerate(value)]


def embedding_input(value: object, item: str, *, urls: bool) -> RankInput:
    """One input item by the rule of the module docstring."""
    if isinstance(value, dict):
        return _explicit_input(value, item, urls=urls)
    if isinstance(value, list):
        raise InvalidInput("token arrays are not supported; send the text as a string", item=item)
    if not isinstance(value, str):
        raise InvalidInput(f"must be a string or an input object, got {_kind(value)}", item=item)
    if _DATA_IMAGE.match(value):
        return data_uri_image(value, item)
    if _URL.fullmatch(value):
        if not urls:
            raise Forbidden(URLS_DISABLED, item=item)
        return UrlImage(value)
    if not value:
        raise InvalidInput("empty text; send at least one character", item=item)
    return value


def _explicit_input(value: Mapping[str, Any], item: str, *, urls: bool) -> RankInput:
    kind = value.get("type")
    if kind == "text":
        text = value.get("text")
        if not isinstance(text, str) or not text:
            raise InvalidInput("an input of type 'text' needs a non-empty string 'text'", item=item)
        return text
    if kind == "image_url":
        image_url = value.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else None
        if not isinstance(url, str):
            raise InvalidInput(
                "an input of type 'image_url' needs {\"image_url\": {\"url\": ...}}", item=item
            )
        if _DATA_IMAGE.match(url):
            return data_uri_image(url, item)
        if _URL.fullmatch(url):
            if not urls:
                raise Forbidden("URL inputs are disabled on this server", item=item)
            return UrlImage(url)
        raise InvalidInput(
            "image_url.url must be a data:image/...;base64, URI or an http(s) URL", item=item
        )
    raise InvalidInput(
        f"an input object needs type 'text' or 'image_url', got {kind!r}", item=item
    )


def data_uri_image(uri: str, item: str) -> EncodedImage:
    """``data:image/<type>;base64,<file>`` -> the file's bytes (decoded by the preprocessor)."""
    match = _DATA_URI.match(uri)
    if match is None:
        raise InvalidInput(
            "an image data URI must be data:image/<type>;base64,<data> (base64 only)", item=item
        )
    try:
        data = base64.b64decode(uri[match.end() :], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("the image data URI is not valid base64", item=item) from None
    if not data:
        raise InvalidInput("the image data URI holds no data", item=item)
    return EncodedImage(data)


def embeddings_response(
    matrix: np.ndarray, token_counts: Sequence[int], model: str, encoding: str
) -> dict[str, Any]:
    """OpenAI's embeddings response; base64 is of the little-endian float32 bytes, as OpenAI's."""
    # [N, D] float32
    if encoding == "base64":
        rows: list[Any] = [
            base64.b64encode(row.tobytes()).decode("ascii")
            for row in matrix.astype("<f4", copy=False)
        ]
    else:
        rows = matrix.tolist()
    tokens = int(sum(token_counts))
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


# -- /v1/classify and /v1/rank -----------------------------------------------------------------
def parse_message(body: object, message: Message) -> Message:
    """A `clipserve.v1` request from its JSON form (proto JSON names; unknown fields refused)."""
    try:
        return json_format.ParseDict(_object(body), message)
    except json_format.ParseError as exc:
        raise InvalidInput(str(exc)) from None


def image_inputs(images: Sequence[pb.Image], field: str = "images") -> list[ImageInput]:
    """`wire.image_inputs`, with data URIs in ``url`` read as the image's bytes."""
    return [_inline(image, f"{field}[{i}]") for i, image in enumerate(images)]


def rank_inputs(request: pb.RankRequest) -> tuple[RankInput | None, list[RankInput]]:
    """(query, candidates) of a RankRequest, as the gRPC adapter reads them."""
    query = _inline_rank(request.query, "query") if request.HasField("query") else None
    return query, [_inline_rank(c, f"candidates[{i}]") for i, c in enumerate(request.candidates)]


def _inline(image: pb.Image, item: str) -> ImageInput:
    if image.WhichOneof("source") == "url" and _DATA_IMAGE.match(image.url):
        return data_uri_image(image.url, item)
    return wire.image_input(image, item)


def _inline_rank(value: pb.RankItem, item: str) -> RankInput:
    if value.WhichOneof("item") == "image":
        return _inline(value.image, item)
    return wire.rank_input(value, item)


def message_json(message: Message) -> dict[str, Any]:
    """A response message in protobuf's JSON mapping, fields at their defaults included."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


# -- common ------------------------------------------------------------------------------------
def parse_json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"the request body is not valid JSON ({exc})") from None


def error_body(message: str, kind: str, code: str, param: str | None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _object(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidInput(f"the request body must be a JSON object, got {_kind(body)}")
    return body


def _kind(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")
