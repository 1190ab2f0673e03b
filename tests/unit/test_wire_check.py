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


def test_every_wire_type_is_walked_past_to_the_bad_text() -> None:
    """Varints (the format enum), fixed 32- and 64-bit fields and a known string come before
    the text that is not UTF-8: the walk steps over each and still names it."""
    valid = pb.EncodeTextRequest(texts=["a"], format=pb.EMBEDDING_FORMAT_FP16_BYTES)
    fixed64 = b"\x99\x06" + bytes(8)  # field 99, wire type 1 (unknown: skipped)
    fixed32 = b"\xa5\x06" + bytes(4)  # field 100, wire type 5
    data = valid.SerializeToString() + fixed64 + fixed32 + string_field(1, BAD)
    assert first_invalid_utf8(pb.EncodeTextRequest.DESCRIPTOR, data) == "texts[1]"


def test_wire_formats_no_walk_can_describe_get_the_generic_message() -> None:
    for data in (
        b"\x0a\x7f" + string_field(1, BAD),  # a field longer than what is left
        b"\x0b" + string_field(1, BAD),  # wire type 3 (a group): not in proto3
        b"\x08" + b"\xff" * 11 + string_field(1, BAD),  # a varint of more than 64 bits
        b"\x08\xff",  # a varint cut off
    ):
        error = describe(pb.EncodeTextRequest.DESCRIPTOR, data)
        assert isinstance(error, InvalidInput)
        assert error.item is None, data
        assert "protobuf cannot parse it" in str(error)
