"""Requests protobuf cannot parse: INVALID_ARGUMENT naming the field, instead of INTERNAL.

gRPC answers a request its deserializer rejects with INTERNAL ("Exception deserializing
request!"), as if the server were at fault. The commonest cause a client can produce is a proto3
``string`` field holding bytes that are not UTF-8 (protobuf checks them while parsing). This
module makes the deserializer lenient (`lenient`): a message that does not parse becomes a
`Malformed` value, and the error interceptor answers it with `InvalidInput` naming the first
string field that is not UTF-8 (``texts[1]``, ``candidates[2].text``), found by walking the
wire format against the message descriptor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from clipserve.server.errors import InvalidInput

log = logging.getLogger(__name__)

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class Malformed:
    """Stands in for a request protobuf could not parse; `error` is what the caller hears."""

    error: InvalidInput


def lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """Wrap a generated ``Message.FromString`` so that parse errors become `Malformed`."""
    if deserializer is None:
        return None
    descriptor: Descriptor | None = getattr(
        getattr(deserializer, "__self__", None), "DESCRIPTOR", None
    )

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # protobuf's DecodeError, or anything a broken message triggers
            log.debug("request does not parse", exc_info=True)
            return Malformed(describe(descriptor, data))

    return parse


def describe(descriptor: Descriptor | None, data: bytes) -> InvalidInput:
    """The error a caller gets for `data`, which does not parse as `descriptor`."""
    name = descriptor.full_name if descriptor is not None else "request"
    field = None
    if descriptor is not None:
        try:
            field = first_invalid_utf8(descriptor, data)
        except (IndexError, ValueError):  # broken wire format: no field to name
            field = None
    if field is not None:
        return InvalidInput(
            "not valid UTF-8 (protobuf string fields must hold UTF-8 text; send bytes as "
            "bytes)",
            item=field,
        )
    return InvalidInput(f"the request is not a valid {name} message (protobuf cannot parse it)")


def first_invalid_utf8(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """Path of the first string field of `data` whose bytes are not UTF-8, or None."""
    seen: dict[str, int] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            _, pos = _varint(data, pos)
        elif wire_type == _FIXED64:
            pos += 8
        elif wire_type == _FIXED32:
            pos += 4
        elif wire_type == _LENGTH:
            length, pos = _varint(data, pos)
            chunk, pos = data[pos : pos + length], pos + length
            if len(chunk) != length:
                raise ValueError("truncated field")
            found = _check_field(descriptor.fields_by_number.get(number), chunk, prefix, seen)
            if found is not None:
                return found
        else:  # groups and invalid wire types: nothing more to say
            raise ValueError(f"wire type {wire_type}")
    return None


def _check_field(
    field: FieldDescriptor | None, chunk: bytes, prefix: str, seen: dict[str, int]
) -> str | None:
    if field is None:  # unknown field: protobuf keeps those, they are never the problem
        return None
    name = field.name
    if field.is_repeated:
        index = seen.get(name, 0)
        seen[name] = index + 1
        name = f"{name}[{index}]"
    path = f"{prefix}.{name}" if prefix else name
    if field.type == FieldDescriptor.TYPE_STRING:
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError:
            return path
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        return first_invalid_utf8(field.message_type, chunk, path)
    return None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]  # IndexError on a truncated varint
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")
