"""`clipserve client`: call a running server from the command line; results are JSON on stdout.

Exit status: 0 on success, 1 when the server (or the connection) fails the call, 2 for bad usage
(including unreadable input files). Errors are one line on stderr: ``error: <CODE>: <message>``
for a failed call, ``error: <message>`` for bad usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .channel import DEFAULT_TARGET, LOAD_BALANCING_POLICIES
from .client import ClipClient
from .errors import ClipServiceError
from .retry import RetryPolicy
from .types import EMBEDDING_FORMATS, RankInput

logger = logging.getLogger(__name__)

ADDRESS_ENV = "CLIPSERVE_ADDRESS"
TOKEN_ENV = "CLIPSERVE_TOKEN"
SUMMARY_HEAD = 4  # leading values of each embedding shown by --summary

_RAW = argparse.RawDescriptionHelpFormatter

DESCRIPTION = """\
Call a running clipserve server. Results are JSON on stdout; errors are one line on stderr,
`error: <CODE>: <message>`, with exit status 1 for a failed call and 2 for bad usage.

sub-commands:
  encode-text    embed texts:                clipserve client encode-text "a photo of a cat"
  encode-image   embed image files:          clipserve client encode-image cat.jpg dog.jpg
  classify       zero-shot classification:   clipserve client classify cat.jpg --labels "cat,dog"
  rank           order candidates by query:  clipserve client rank "a cat" a.jpg b.jpg c.jpg
  info           what the server serves:     clipserve client info

Run `clipserve client <sub-command> --help` for its options.
"""

Handler = Callable[[argparse.Namespace, ClipClient], dict[str, Any]]


class UsageError(Exception):
    """The command line names something unusable (a missing file, an empty label list)."""


# ---- argument parsing ----------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _connection_parser() -> argparse.ArgumentParser:
    """Options every sub-command takes (a parent parser, so they go after the sub-command)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument(
        "--address",
        default=None,
        help=f"server target, e.g. host:port or dns:///name:port (default: ${ADDRESS_ENV} "
        f"or {DEFAULT_TARGET})",
    )
    group.add_argument(
        "--timeout",
        type=_positive_float,
        default=30.0,
        help="deadline of the call in seconds, retries included (default: %(default)s)",
    )
    group.add_argument(
        "--max-attempts",
        type=_positive_int,
        default=RetryPolicy().max_attempts,
        help="attempts in all when the server is UNAVAILABLE (default: %(default)s)",
    )
    group.add_argument(
        "--load-balancing",
        choices=LOAD_BALANCING_POLICIES,
        default=None,
        help="client-side load balancing over every address of a dns:/// target",
    )
    group.add_argument("--tls", action="store_true", help="use TLS with the system CA roots")
    group.add_argument("--ca-cert", type=Path, help="PEM CA bundle of the server (implies TLS)")
    group.add_argument("--client-cert", type=Path, help="PEM client certificate (mutual TLS)")
    group.add_argument("--client-key", type=Path, help="PEM client private key (mutual TLS)")
    group.add_argument("--server-name", help="server name expected in its TLS certificate")
    group.add_argument(
        "--token-file",
        type=Path,
        help=f"file holding a bearer token; without it, the token itself from ${TOKEN_ENV} "
        "when set",
    )
    return parent


def _add_embedding_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        dest="embedding_format",
        choices=EMBEDDING_FORMATS,
        default="fp32_bytes",
        help="wire format of the embeddings; output is always float (default: %(default)s)",
    )
    parser.add_argument(
        "--summary",
        action="store_true",
        help=f"print count, dim, and per input its norm and first {SUMMARY_HEAD} values "
        "instead of the full embeddings",
    )


def _sub(
    sub: Any, name: str, parent: argparse.ArgumentParser, help_text: str, example: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        parents=[parent],
        help=help_text,
        description=help_text[0].upper() + help_text[1:] + ".",
        epilog="example:\n" + example,
        formatter_class=_RAW,
    )
    return parser


def add_parser(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Register ``clipserve <name>`` and its sub-commands on ``subparsers``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=help_text, description=DESCRIPTION, formatter_class=_RAW
    )
    parent = _connection_parser()
    sub = parser.add_subparsers(dest="client_command", metavar="SUB-COMMAND", required=True)

    p = _sub(
        sub,
        "encode-text",
        parent,
        "embed texts (L2-normalised)",
        '  clipserve client encode-text "a photo of a cat" "a photo of a dog"\n'
        "  clipserve client encode-text - --summary < captions.txt",
    )
    p.add_argument(
        "texts", nargs="+", metavar="TEXT", help="texts; '-' reads one text per stdin line"
    )
    p.add_argument(
        "--no-truncate",
        dest="truncate",
        action="store_false",
        help="refuse texts longer than the model's context instead of truncating them",
    )
    _add_embedding_output(p)
    p.set_defaults(run=_command(_encode_text))

    p = _sub(
        sub,
        "encode-image",
        parent,
        "embed image files (L2-normalised)",
        "  clipserve client encode-image cat.jpg dog.png --summary",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    _add_embedding_output(p)
    p.set_defaults(run=_command(_encode_image))

    p = _sub(
        sub,
        "classify",
        parent,
        "zero-shot classification of image files against labels",
        '  clipserve client classify cat.jpg --labels "cat,dog,car"\n'
        "  clipserve client classify *.jpg --labels-file labels.txt --top-k 3",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help='comma-separated labels, e.g. "cat,dog,car"')
    labels.add_argument("--labels-file", type=Path, help="file with one label per line")
    p.add_argument(
        "--templates-file",
        type=Path,
        help='file with one prompt template per line, each with one "{}" for the label '
        "(default: the model's templates)",
    )
    p.add_argument("--top-k", type=_positive_int, help="labels per image (default: all)")
    p.set_defaults(run=_command(_classify))

    p = _sub(
        sub,
        "rank",
        parent,
        "order candidates by similarity to a query",
        '  clipserve client rank "a photo of a cat" a.jpg b.jpg c.jpg\n'
        "  clipserve client rank cat.jpg --query-kind image --candidate-kind text - < captions.txt",
    )
    p.add_argument("query", metavar="QUERY", help="query text, or image file with --query-kind")
    p.add_argument(
        "candidates",
        nargs="+",
        metavar="CANDIDATE",
        help="candidate image files, or texts with --candidate-kind text ('-': stdin lines)",
    )
    p.add_argument("--query-kind", choices=("text", "image"), default="text")
    p.add_argument("--candidate-kind", choices=("text", "image"), default="image")
    p.add_argument("--top-k", type=_positive_int, help="candidates returned (default: all)")
    p.set_defaults(run=_command(_rank))

    p = _sub(
        sub,
        "info",
        parent,
        "show the served model, its preprocessing, batching and limits",
        "  clipserve client info --address dns:///clipserve.ns.svc:8001",
    )
    p.set_defaults(run=_command(_info))
    return parser


# ---- inputs --------------------------------------------------------------------------------


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None


def _read_lines(path: Path, what: str) -> list[str]:
    text = _read_bytes(path, what).decode("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def expand_stdin(items: Sequence[str], stdin: Callable[[], str]) -> list[str]:
    """Replace a ``-`` item by the non-blank lines of stdin (read once)."""
    if "-" not in items:
        return list(items)
    lines = [line for line in stdin().splitlines() if line.strip()]
    out: list[str] = []
    for item in items:
        out.extend(lines if item == "-" else [item])
    return out


def parse_labels(args: argparse.Namespace) -> list[str]:
    """Labels from ``--labels`` (comma-separated, blanks dropped) or ``--labels-file``."""
    if args.labels_file is not None:
        labels = _read_lines(args.labels_file, "labels file")
    else:
        labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if not labels:
        raise UsageError("no labels given")
    return labels


def _image(path: str) -> bytes:
    return _read_bytes(Path(path), "image")


def resolve_address(address: str | None, environ: Mapping[str, str]) -> str:
    """``--address``, else ``$CLIPSERVE_ADDRESS``, else ``localhost:8001``."""
    return address or environ.get(ADDRESS_ENV) or DEFAULT_TARGET


def resolve_token(token_file: Path | None, environ: Mapping[str, str]) -> str | None:
    """The bearer token from ``--token-file``, else ``$CLIPSERVE_TOKEN``, else None."""
    if token_file is not None:
        return _read_bytes(token_file, "token file").decode("utf-8").strip() or None
    return environ.get(TOKEN_ENV) or None


def client_from_args(args: argparse.Namespace) -> ClipClient:
    """A client configured from the connection options (and the environment)."""
    address = resolve_address(args.address, os.environ)
    token = resolve_token(args.token_file, os.environ)
    if (args.client_cert is None) != (args.client_key is None):
        raise UsageError("--client-cert and --client-key go together")
    return ClipClient(
        address,
        timeout=args.timeout,
        retry=RetryPolicy(max_attempts=args.max_attempts),
        load_balancing=args.load_balancing,
        tls=args.tls,
        root_certificates=_read_bytes(args.ca_cert, "CA file") if args.ca_cert else None,
        certificate_chain=(
            _read_bytes(args.client_cert, "certificate") if args.client_cert else None
        ),
        private_key=_read_bytes(args.client_key, "key") if args.client_key else None,
        server_name=args.server_name,
        token=token,
    )


# ---- output --------------------------------------------------------------------------------


def _f32(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (0.1, not 0.10000000149)."""
    return float(str(np.float32(value)))


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return _f32(obj)
    if isinstance(obj, dict):
        return {key: _clean(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(value) for value in obj]
    return obj


def _embeddings_json(
    inputs: Sequence[str], vectors: npt.NDArray[np.float32], summary: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {"count": int(vectors.shape[0]), "dim": int(vectors.shape[1])}
    if summary:
        norms = np.linalg.norm(vectors, axis=1)
        out["items"] = [
            {
                "input": name,
                "norm": _f32(float(norm)),
                "head": [float(str(v)) for v in row[:SUMMARY_HEAD]],
            }
            for name, norm, row in zip(inputs, norms, vectors, strict=True)
        ]
    else:
        out["embeddings"] = [[float(str(v)) for v in row] for row in vectors]
    return out


# ---- sub-commands --------------------------------------------------------------------------


def _encode_text(args: argparse.Namespace, client: ClipClient) -> dict[str, Any]:
    texts = expand_stdin(args.texts, sys.stdin.read)
    vectors = client.encode_text(
        texts, truncate=args.truncate, embedding_format=args.embedding_format
    )
    return _embeddings_json(texts, vectors, args.summary)


def _encode_image(args: argparse.Namespace, client: ClipClient) -> dict[str, Any]:
    images = [_image(path) for path in args.images]
    vectors = client.encode_image(images, embedding_format=args.embedding_format)
    return _embeddings_json(args.images, vectors, args.summary)


def _classify(args: argparse.Namespace, client: ClipClient) -> dict[str, Any]:
    labels = parse_labels(args)
    templates = None
    if args.templates_file is not None:
        templates = _read_lines(args.templates_file, "templates file")
    images = [_image(path) for path in args.images]
    results = client.classify(images, labels, templates=templates, top_k=args.top_k)
    return {
        "results": [
            {"image": path, "labels": [_clean(dataclasses.asdict(s)) for s in scores]}
            for path, scores in zip(args.images, results, strict=True)
        ]
    }


def _rank(args: argparse.Namespace, client: ClipClient) -> dict[str, Any]:
    query: RankInput = args.query if args.query_kind == "text" else _image(args.query)
    names = args.candidates
    candidates: list[RankInput]
    if args.candidate_kind == "text":
        names = expand_stdin(names, sys.stdin.read)
        candidates = list(names)
    else:
        candidates = [_image(path) for path in names]
    ranked = client.rank(query, candidates, top_k=args.top_k)
    return {
        "query": {args.query_kind: args.query},
        "results": [{"candidate": names[c.index], **_clean(dataclasses.asdict(c))} for c in ranked],
    }


def _info(args: argparse.Namespace, client: ClipClient) -> dict[str, Any]:
    info: dict[str, Any] = _clean(dataclasses.asdict(client.info()))
    return info


def _command(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """Wrap a handler: make the client, print its result as JSON, map errors to exit codes."""

    def run(args: argparse.Namespace) -> int:
        logger.debug("clipserve client %s", args.client_command)
        try:
            with client_from_args(args) as client:
                result = handler(args, client)
        except ClipServiceError as exc:
            print(f"error: {exc.code.name}: {exc.message}", file=sys.stderr)
            return 1
        except (UsageError, UnicodeDecodeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if "embeddings" in result:  # long lists of floats: one compact line
            print(json.dumps(result, separators=(",", ":"), ensure_ascii=False))
        else:
            print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0

    return run
