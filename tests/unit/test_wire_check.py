"""Requests protobuf cannot parse are described, naming the field (clipserve.server.wire_check)."""

from __future__ import annotations

from clipserve.server.errors import InvalidInput
from clipserve.server.wire_check import Malformed, describe, first_invalid_utf8, lenient
from clipserve.v1 import clip_service_pb2 as pb

BAD = b"\xff\xfe"


def string_field(number: int, value: bytes) -> bytes:
    return bytes([(number << 3) | 2, len(value)]) + value


def test_a_valid_message_parses_as_usual() -> None:
    parse = lenient(pb.EncodeTextRequest.FromString)
    assert parse(pb.EncodeTextRequest(texts=["a"]).SerializeToString()).texts == ["a"]


def test_invalid_utf8_names_the_repeated_item() -> None:
    data = pb.EncodeTextRequest(texts=["a", "b"]).SerializeToString() + string_field(1, BAD)
    parsed = lenient(pb.EncodeTextRequest.FromString)(data)
    assert isinstance(parsed, Malformed)
    assert parsed.error.item == "texts[2]"
    assert str(parsed.error).startswith("texts[2]: not valid UTF-8")


def test_invalid_utf8_in_a_nested_message() -> None:
    request = pb.RankRequest(query=pb.RankItem(text="q"), candidates=[pb.RankItem(text="ok")])
    item = string_field(1, BAD)  # RankItem.text
    data = request.SerializeToString() + bytes([0x12, len(item)]) + item
    assert first_invalid_utf8(pb.RankRequest.DESCRIPTOR, data) == "candidates[1].text"
    single = bytes([0x0A, len(item)]) + item  # the query (not repeated)
    assert first_invalid_utf8(pb.RankRequest.DESCRIPTOR, single) == "query.text"


def test_bytes_fields_and_unknown_fields_are_not_blamed() -> None:
    image = string_field(1, BAD)  # Image.data is bytes: anything goes
    unknown = b"\x9a\x06\x02" + BAD  # field 99, length-delimited (a two-byte key)
    data = bytes([0x0A, len(image)]) + image + unknown
    assert first_invalid_utf8(pb.EncodeImageRequest.DESCRIPTOR, data) is None


def test_broken_wire_format_gets_a_generic_message() -> None:
    error = describe(pb.EncodeTextRequest.DESCRIPTOR, b"\x0a\xff")
    assert isinstance(error, InvalidInput)
    assert error.item is None
    assert str(error) == (
        "the request is not a valid clipserve.v1.EncodeTextRequest message (protobuf cannot "
        "parse it)"
    )
