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
the KServe v2 / Triton protocol inference.GRPCInferenceService, grpc.health.v1, reflection) on
ONNX Runtime with dynamic batching, and Prometheus metrics (Triton's names) on --metrics-port.
With --http-port (the `http` extra), an OpenAI-compatible HTTP API (/v1/embeddings,
/v1/classify, /v1/rank, /v1/models, /health/ready) on the same batchers: docs/http.md.

Every flag is also an environment variable (CLIPSERVE_<FLAG>, e.g. CLIPSERVE_PORT=8001); a flag
wins over the environment. Health reports SERVING once the model is loaded and every batch shape
has run once. SIGTERM drains: NOT_SERVING, new requests refused with UNAVAILABLE, in-flight
requests finish within --drain-grace-s.

exit status: 0 after a drain; 2 an unusable setting (TLS file, token source); 3 an unusable
model repository; 4 the port cannot be bound; 70 an inference session failed and could not be
rebuilt (restart the process).

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
    from clipserve.server.access_log import use_log_format
    from clipserve.server.app import serve

    try:
        settings = settings_mod.from_sources(args)
    except ValueError as exc:
        print(f"error: invalid setting: {exc}", file=sys.stderr)
        return 2
    use_log_format(settings.log_format)
    try:
        return asyncio.run(serve(settings))  # 70: gave up on a failing session, restart me
    except settings_mod.ConfigError as exc:  # a token or TLS file named by a setting
        print(f"error: invalid setting: {exc}", file=sys.stderr)
        return 2
    except RepositoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
