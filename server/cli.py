"""`clipserve serve`: flags and environment variables -> settings -> the running server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from clipserve.server import settings as settings_mod

log = logging.getLogger(__name__)

DESCRIPTION = """\
Serve a model repository written by `clipserve export` over gRPC (clipserve.v1.ClipService,
grpc.health.v1, reflection) on ONNX Runtime with dynamic batching.

Every flag is also an environment variable (CLIPSERVE_<FLAG>, e.g. CLIPSERVE_PORT=8001); a flag
wins over the environment. Health reports SERVING once the model is loaded and every batch shape
has run once. SIGTERM drains: NOT_SERVING, new requests refused with UNAVAILABLE, in-flight
requests finish within --drain-grace-s.

example:
  clipserve serve --model-repository model_repository --port 8001
"""


def add_parser(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(
        name, help=help_text, description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    settings_mod.add_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from clipserve.repository import RepositoryError
    from clipserve.server.app import serve

    try:
        settings = settings_mod.from_sources(args)
    except ValueError as exc:
        print(f"error: invalid setting: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(settings))
    except RepositoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    return 0
