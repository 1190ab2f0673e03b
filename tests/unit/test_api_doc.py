"""docs/api.md cannot drift from the proto, the error table or the settings.

Checked against the generated descriptors (no server, no sockets):

- every ```json block names its message in the fence (```json clipserve.v1.RankResponse) and
  parses into it with `json_format` (unknown fields refused); ``...`` shortens a list;
- every grpcurl call to ``clipserve.v1.ClipService/<RPC>`` names a real RPC, its ``-d '<json>'``
  parses into the RPC's request message, and every RPC has a call and a response block;
- every message has a field table listing exactly its fields (number, name, JSON name, type),
  and every enum a table listing exactly its values;
- every status code of the error table (`grpc_errors.STATUS_OF`) has a row under Errors;
- every ``--flag`` named is a `clipserve serve` setting, with the default the code has;
- no machine-specific path.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import tempfile
from pathlib import Path

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from clipserve.server.grpc_errors import STATUS_OF
from clipserve.server.settings import ServerSettings, _flag, _show
from clipserve.v1 import clip_service_pb2 as pb

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "api.md"
DOC = DOC_PATH.read_text(encoding="utf-8")
FILE = pb.DESCRIPTOR
SERVICE = FILE.services_by_name["ClipService"]
MESSAGES: dict[str, type[Message]] = {
    **{d.full_name: getattr(pb, name) for name, d in FILE.message_types_by_name.items()},
    "grpc.health.v1.HealthCheckRequest": health_pb2.HealthCheckRequest,
    "grpc.health.v1.HealthCheckResponse": health_pb2.HealthCheckResponse,
}
FENCE = re.compile(r"^ *```([^\n]*)\n(.*?)^ *```", re.MULTILINE | re.DOTALL)
RPC = re.compile(r"clipserve\.v1\.ClipService/(\w+)")
BODY = re.compile(r" -d '([^']*)'")
ELIDED = re.compile(r",\s*\.\.\.(?=\s*\])")
SCALARS = {
    FieldDescriptor.TYPE_STRING: "string", FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_FLOAT: "float", FieldDescriptor.TYPE_DOUBLE: "double",
    FieldDescriptor.TYPE_INT64: "int64", FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_INT32: "int32", FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_BOOL: "bool",
}  # fmt: skip


def fences() -> list[tuple[str, str]]:
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(DOC)]


def json_blocks() -> list[tuple[str, str]]:
    return [(info, body) for info, body in fences() if info.split()[:1] == ["json"]]


def grpcurl_calls() -> list[tuple[str, str | None]]:
    """(rpc, request JSON) of every grpcurl call to ClipService in a shell block; the JSON is
    None for requests read from stdin (``-d @``) and "{}" for calls without ``-d``."""
    calls = []
    for info, body in fences():
        if info != "sh":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            rpc = RPC.search(line)
            if "grpcurl " not in line or rpc is None:
                continue
            data = BODY.search(line)
            stdin = " -d @" in line
            calls.append((rpc.group(1), data.group(1) if data else None if stdin else "{}"))
    return calls


def table_after(anchor: str) -> list[list[str]]:
    """Cells of the first table after the line `anchor` (a heading or a `Name` caption)."""
    match = re.search(rf"^(?:#+ {re.escape(anchor)}|`{re.escape(anchor)}`)\n", DOC, re.MULTILINE)
    assert match, f"docs/api.md has no heading or caption for {anchor}"
    lines = DOC[match.end() :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2 :]:  # after the header and the |---| line
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def plain(cell: str) -> str:
    """Markdown cell text without links, backticks and a trailing remark in parentheses."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", cell).replace("`", "")
    return re.sub(r"\s*\([^)]*\)$", "", text).strip()


def type_name(field: FieldDescriptor) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        base = field.message_type.name
    elif field.type == FieldDescriptor.TYPE_ENUM:
        base = field.enum_type.name
    else:
        base = SCALARS[field.type]
    oneof = field.containing_oneof
    if field.is_repeated:
        return f"repeated {base}"
    if oneof is not None and oneof.name == f"_{field.name}":  # proto3 `optional`
        return f"optional {base}"
    return base


# -- examples ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("info", "body"), json_blocks())
def test_every_json_block_parses_into_the_message_it_names(info: str, body: str) -> None:
    words = info.split()
    assert len(words) == 2, f"label the block with its message: ```json <message> (got {info!r})"
    assert words[1] in MESSAGES, f"{words[1]} is not a message of the API"
    data = json.loads(ELIDED.sub("", body))
    json_format.ParseDict(data, MESSAGES[words[1]]())  # refuses unknown fields and bad values


@pytest.mark.parametrize(("rpc", "body"), grpcurl_calls())
def test_every_grpcurl_request_parses_into_the_rpc_request(rpc: str, body: str | None) -> None:
    assert rpc in SERVICE.methods_by_name, f"ClipService has no RPC {rpc}"
    if body is not None:  # None: read from stdin by a script shown with it
        request = MESSAGES[SERVICE.methods_by_name[rpc].input_type.full_name]()
        json_format.Parse(body, request)  # refuses unknown fields and bad values


def test_every_rpc_has_a_heading_a_grpcurl_call_and_a_response_block() -> None:
    called = {rpc for rpc, _ in grpcurl_calls()}
    answered = {info.split()[1] for info, _ in json_blocks() if len(info.split()) == 2}
    for method in SERVICE.methods:
        assert f"\n### {method.name}\n" in DOC, f"no section for {method.name}"
        assert method.name in called, f"no grpcurl example of {method.name}"
        assert method.output_type.full_name in answered, f"no response of {method.name}"


def test_the_examples_are_found() -> None:  # the parsers above must not silently match nothing
    assert len([body for _, body in grpcurl_calls() if body not in (None, "{}")]) >= 10
    assert len(json_blocks()) >= 8


# -- reference tables -------------------------------------------------------------------------
@pytest.mark.parametrize("message", list(FILE.message_types_by_name.values()), ids=lambda d: d.name)
def test_every_message_has_a_table_of_exactly_its_fields(message: Descriptor) -> None:
    if not message.fields:
        assert f"`{message.name}` has no fields" in DOC
        return
    want = [(str(f.number), f"`{f.name}` (`{f.json_name}`)", type_name(f)) for f in message.fields]
    got = [(row[0], row[1], plain(row[2])) for row in table_after(message.name)]
    assert got == want, f"the table of {message.name} disagrees with the proto"


@pytest.mark.parametrize("enum", list(FILE.enum_types_by_name.values()), ids=lambda d: d.name)
def test_every_enum_has_a_table_of_exactly_its_values(enum: EnumDescriptor) -> None:
    want = [(f"`{v.name}`", str(v.number)) for v in enum.values]
    got = [(row[0], row[1]) for row in table_after(enum.name)]
    assert got == want, f"the table of {enum.name} disagrees with the proto"


def test_every_status_code_of_the_error_table_is_documented() -> None:
    rows = {row[0] for row in table_after("Errors")}
    for code in {*STATUS_OF.values()}:
        assert f"`{code.name}`" in rows, f"{code.name} has no row under Errors"


# -- settings and hygiene ---------------------------------------------------------------------
def test_every_flag_is_a_setting() -> None:
    fields = {_flag(f.name) for f in dataclasses.fields(ServerSettings)}
    serve_text = re.sub(r"clipserve export[^`\n]*", "", DOC)  # other commands' flags
    for flag in set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", serve_text)):
        name = flag.replace("--no-", "--", 1)
        assert flag in fields or name in fields, f"{flag} is not a clipserve serve setting"


def test_the_limits_table_shows_the_defaults_of_the_code() -> None:
    defaults = {_flag(f.name): _show(f.default) for f in dataclasses.fields(ServerSettings)}
    rows = [row for row in table_after("Limits") if row[2].startswith("`--")]
    assert len(rows) >= 10
    for row in rows:
        flag, shown = row[2].strip("`"), re.search(r"`([^`]*)`", row[1])
        assert shown is not None, f"{flag}: no default in backticks"
        assert shown.group(1) == defaults[flag], (
            f"{flag}: the table says {row[1]}, the default is {defaults[flag]}"
        )


def test_no_machine_specific_paths() -> None:
    """No path of the machine that wrote the doc: its checkout, home, temp folder, Python."""
    machine = {str(Path(__file__).resolve().parents[2]), str(Path.home()),
               tempfile.gettempdir(), sys.prefix, sys.base_prefix}
    found = sorted(path for path in machine if len(path) > 1 and path in DOC)
    assert not found, f"machine-specific paths in docs/api.md: {found}"
