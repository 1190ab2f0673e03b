"""The `clipserve` command: export, serve, client, demo, eval.

Each sub-command lives in its own module with ``add_parser(subparsers, name, help)`` and
``run(args)``. Those modules stay light at import (flags only); each imports its heavy
dependencies inside ``run``, so `clipserve serve` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from clipserve import __version__

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "export": ("clipserve.export.cli", "export an open_clip model to an ONNX model repository"),
    "serve": ("clipserve.server.cli", "serve a model repository over gRPC"),
    "client": ("clipserve.clients.cli", "call a running server (encode, classify, rank, info)"),
    "demo": ("clipserve.demo", "export the built-in demo model, serve it, classify (offline)"),
    "eval": ("clipserve.clients.eval_cli", "measure a running server's zero-shot accuracy, recall"),
    "bench": ("clipserve.bench.cli", "benchmark clipserve side by side with its reference points"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipserve",
        description="CLIP embeddings, zero-shot classification and ranking over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"clipserve {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default: %(default)s)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_parser(sub, name, help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
