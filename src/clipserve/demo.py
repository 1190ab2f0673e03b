"""`clipserve demo`: the whole product offline in one command.

Exports the built-in `clipserve-demo` model (trained by the project on generated shapes and
colours) unless the repository already exists, starts the real gRPC server on a free local port,
classifies a few generated held-out images through the Python client, prints what it saw, and
stops the server gracefully. Needs the `export` extra the first time (torch, open_clip).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

    from clipserve.clients import LabelScore

log = logging.getLogger(__name__)

DESCRIPTION = """\
Run clipserve end to end offline: export the built-in demo model (once), serve it on a free
local port, classify generated images through the gRPC client, and shut down.

example:
  clipserve demo                       # export to model_repository/clipserve-demo, then classify
  clipserve demo --images 12 --save-images demo_images
"""

DEMO_REPOSITORY = Path("model_repository") / "clipserve-demo"


def add_parser(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(
        name, help=help_text, description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--repository", type=Path, default=DEMO_REPOSITORY,
        help="model repository to serve; exported from clipserve-demo if missing "
        "(default: %(default)s)",
    )
    parser.add_argument("--images", type=int, default=8, help="images to classify (default 8)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the generated images")
    parser.add_argument(
        "--save-images", type=Path, default=None, metavar="DIR",
        help="also write the generated images as PNG files into DIR, to look at them",
    )
    parser.set_defaults(run=run)


def ensure_repository(path: Path) -> None:
    """Export clipserve-demo into `path` unless a repository is already there."""
    from clipserve.repository import MANIFEST_NAME

    if (path / MANIFEST_NAME).is_file():
        log.info("using the existing repository %s", path)
        return
    try:
        from clipserve.export.models import DEMO_MODEL
        from clipserve.export.options import ExportOptions
        from clipserve.export.writer import export_repository
    except ImportError as exc:
        raise SystemExit(
            f"exporting the demo model needs the export extra ({exc.name} is missing): "
            'pip install -e ".[export]"'
        ) from exc
    log.info("exporting %s to %s (first run only)", DEMO_MODEL, path)
    export_repository(ExportOptions(model=DEMO_MODEL, output=path))


async def classify_generated(
    repository: Path, images: list[tuple[Image.Image, int]]
) -> tuple[str, int, float, list[list[LabelScore]]]:
    """Serve `repository`, classify `images` through the gRPC client.

    Returns the model name, the port it was served on, the seconds Classify took, and the top 3
    labels per image.
    """
    from clipserve import synthetic
    from clipserve.clients import AsyncClipClient
    from clipserve.server.app import ClipServer
    from clipserve.server.settings import ServerSettings

    settings = ServerSettings(model_repository=repository, host="127.0.0.1", port=0, metrics=False)
    server = ClipServer(settings)
    async with server, AsyncClipClient(f"127.0.0.1:{server.port}") as client:
        info = await client.info()
        started = time.monotonic()
        results = await client.classify(
            [image for image, _ in images], list(synthetic.CLASSES),
            templates=list(synthetic.ZERO_SHOT_TEMPLATES), top_k=3,
        )
        elapsed = time.monotonic() - started
    return info.model_name, server.port, elapsed, results


def report(
    model_name: str, port: int, elapsed: float, images: list[tuple[Image.Image, int]],
    results: list[list[LabelScore]],
) -> float:
    """Print one line per image and the top-1 accuracy; return it."""
    from clipserve import synthetic

    print(f"\n{model_name} served on port {port}: "
          f"{len(images)} generated images x {len(synthetic.CLASSES)} labels "
          f"classified in {elapsed:.2f}s\n")
    correct = 0
    for i, ((image, label), top) in enumerate(zip(images, results, strict=True)):
        truth = synthetic.CLASSES[label]
        best = top[0]
        ok = best.label == truth
        correct += ok
        runners = ", ".join(f"{s.label} {s.probability:.2f}" for s in top[1:])
        print(f"  image {i:2d} {image.width}x{image.height}  true: {truth:<16} "
              f"predicted: {best.label:<16} p={best.probability:.3f} "
              f"{'ok ' if ok else 'MISS'}  (next: {runners})")
    accuracy = correct / len(images)
    print(f"\ntop-1: {correct}/{len(images)} = {accuracy:.1%}")
    return accuracy


def run(args: argparse.Namespace) -> int:
    from clipserve import synthetic

    if args.images < 1:
        print("error: --images must be >= 1", file=sys.stderr)
        return 2
    ensure_repository(args.repository)
    images = list(synthetic.dataset("heldout", args.images, args.seed))
    if args.save_images is not None:
        args.save_images.mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(images):
            name = synthetic.folder_name(synthetic.CLASSES[label])
            image.save(args.save_images / f"{i:02d}_{name}.png")
    model_name, port, elapsed, results = asyncio.run(
        classify_generated(args.repository, images)
    )
    report(model_name, port, elapsed, images, results)
    return 0
