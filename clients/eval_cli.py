"""`clipserve eval`: measure a running server's zero-shot accuracy and retrieval recall.

A client of the server (``--address``), like `clipserve client`: it imports no torch, no ONNX
Runtime and no server code. The summary goes to stdout, the progress bar to stderr, the full
result to ``--output`` as JSON. Exit status: 0 on success, 1 when the server fails a call, 2 for
bad usage or unusable data.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import eval_data, evaluation
from .cli import UsageError, _connection_parser, _positive_int, client_from_args
from .errors import ClipServiceError
from .eval_data import DataError
from .eval_metrics import per_class_accuracy
from .eval_plot import save_confusion_png
from .progress import ProgressBar, ProgressFactory, no_progress

logger = logging.getLogger(__name__)

EVAL_TIMEOUT_S = 300.0
#: Per-class lines printed in full up to this many classes; beyond, the weakest ones.
PER_CLASS_PRINT_MAX = 50
WEAKEST_PRINTED = 10

_RAW = argparse.RawDescriptionHelpFormatter

DESCRIPTION = """\
Evaluate the model a running clipserve server serves, through its gRPC API.

sub-commands:
  zero-shot   top-1/top-5 and per-class accuracy of zero-shot classification (Classify)
  retrieval   image->text and text->image recall@1/5/10 (EncodeImage, EncodeText)

examples:
  clipserve eval zero-shot --generated 1008 --output results.json --confusion-png confusion.png
  clipserve eval zero-shot --images imagenet/val --classes imagenet --templates openai
  clipserve eval retrieval --images coco/val2017 --captions captions.tsv --output recall.json
  clipserve eval retrieval --generated 360 --captions-per-image 2

Run `clipserve eval <sub-command> --help` for its options; docs/evaluation.md has the details.
"""

ZERO_SHOT_EPILOG = """\
classes (--classes):
  folders      the ImageFolder sub-folder names, underscores as spaces (default with --images)
  synthetic    the generated set's 36 classes (default with --generated)
  imagenet     ImageNet-1k's class names (open_clip's), folder i in sorted order = class i
  FILE         one class name per line; folder i in sorted order = class i, or by name when
               every folder is a class name with spaces written as underscores
templates (--templates):
  model        the server's default templates (default with --images)
  synthetic    "a photo of a {}." (default with --generated)
  openai       OpenAI's 80 ImageNet templates
  FILE         one template per line, each with one "{}" for the class name

examples:
  clipserve eval zero-shot --generated 1008 --seed 0 --confusion-png confusion.png
  clipserve eval zero-shot --images imagenet/val --classes imagenet --templates openai \\
      --output imagenet.json --batch-size 128 --concurrency 8
"""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the generated images (default: %(default)s)")
    parser.add_argument("--batch-size", type=_positive_int, default=64,
                        help="images or texts per request (default: %(default)s, capped by the "
                        "server's max_items_per_request)")
    parser.add_argument("--concurrency", type=_positive_int, default=4,
                        help="requests in flight at once (default: %(default)s)")
    parser.add_argument("--output", type=Path, help="write the full result here as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(timeout=EVAL_TIMEOUT_S)


def add_parser(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Register ``clipserve <name>`` with its `zero-shot` and `retrieval` sub-commands."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=help_text, description=DESCRIPTION, formatter_class=_RAW
    )
    parent = _connection_parser()
    sub = parser.add_subparsers(dest="eval_command", metavar="SUB-COMMAND", required=True)

    p = sub.add_parser("zero-shot", parents=[parent], formatter_class=_RAW,
                       help="zero-shot classification accuracy",
                       description="Zero-shot top-1/top-5 and per-class accuracy (Classify).",
                       epilog=ZERO_SHOT_EPILOG)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, metavar="DIR",
                        help="ImageFolder layout: DIR/<class folder>/<image files>")
    source.add_argument("--generated", type=_positive_int, metavar="N",
                        help="N generated held-out images of coloured shapes")
    p.add_argument("--classes", default=None, metavar="SPEC",
                   help="folders | synthetic | imagenet | FILE (see below)")
    p.add_argument("--templates", default=None, metavar="SPEC",
                   help="model | synthetic | openai | FILE (see below)")
    p.add_argument("--max-images", type=_positive_int, metavar="N",
                   help="evaluate N images spread evenly over the set (a quick check)")
    p.add_argument("--confusion-png", type=Path, metavar="FILE",
                   help="draw the confusion matrix into this PNG file")
    _common(p)
    p.set_defaults(run=_command(_zero_shot))

    p = sub.add_parser("retrieval", parents=[parent], formatter_class=_RAW,
                       help="image-text retrieval recall@k",
                       description="Image->text and text->image recall@1/5/10 of the served "
                       "embeddings (EncodeImage, EncodeText).",
                       epilog="captions file: one 'filename<TAB>caption' per line, filenames "
                       "relative to --images;\nan image may have several lines.\n\nexamples:\n"
                       "  clipserve eval retrieval --images val2017 --captions captions.tsv\n"
                       "  clipserve eval retrieval --generated 360 --captions-per-image 2")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, metavar="DIR", help="folder of the images")
    source.add_argument("--generated", type=_positive_int, metavar="N",
                        help="N generated held-out images with generated captions")
    p.add_argument("--captions", type=Path, metavar="FILE",
                   help="TSV of filename<TAB>caption (with --images)")
    p.add_argument("--captions-per-image", type=_positive_int, default=1,
                   help="captions of each generated image (default: %(default)s)")
    _common(p)
    p.set_defaults(run=_command(_retrieval))
    return parser


# ---- sub-commands -----------------------------------------------------------------------------


Handler = Callable[[argparse.Namespace], dict[str, Any]]


def _progress(args: argparse.Namespace) -> ProgressFactory:
    if args.no_progress:
        return no_progress
    return lambda title, total, unit: ProgressBar(title, total, unit, sys.stderr)


def _check_writable(*paths: Path | None) -> None:
    """Fail before a long run, not after it, when an output file cannot be written."""
    for path in paths:
        if path is not None and not path.resolve().parent.is_dir():
            raise UsageError(f"cannot write {str(path)!r}: its folder does not exist")


def _zero_shot(args: argparse.Namespace) -> dict[str, Any]:
    _check_writable(args.output, args.confusion_png)
    if args.images is not None:
        data = eval_data.image_folder_zero_shot(args.images, args.classes or "folders")
        template_spec = args.templates or "model"
    else:
        data = eval_data.generated_zero_shot(args.generated, args.seed,
                                             args.classes or "synthetic")
        template_spec = args.templates or "synthetic"
    if args.max_images is not None:
        data = eval_data.spread_subset(data, args.max_images)
    template_source, templates = eval_data.resolve_templates(template_spec)
    count = "the server's default set" if templates is None else f"{len(templates)}"
    print(f"zero-shot: {len(data.images)} images, {len(data.class_names)} classes, "
          f"templates: {template_source} ({count})", file=sys.stderr)
    with client_from_args(args) as client:
        result = evaluation.zero_shot(
            client, data, templates, template_source=template_source,
            batch_size=args.batch_size, concurrency=args.concurrency, progress=_progress(args),
        )
    _print_zero_shot(result)
    if args.confusion_png is not None:
        save_confusion_png(
            args.confusion_png, result.confusion(), data.class_names,
            f"{result.model.model_name}: zero-shot top-1 {result.top1:.1%} "
            f"({result.n} images, {len(data.class_names)} classes)",
        )
        print(f"confusion matrix: {args.confusion_png}")
    return result.to_json()


def _print_zero_shot(result: evaluation.ZeroShotResult) -> None:
    names = result.data.class_names
    correct = int((result.predictions == result.labels).sum())
    print(f"model: {result.model.model_name} ({result.model.pretrained})")
    print(f"images: {result.n}  classes: {len(names)}  templates: {len(result.templates)} "
          f"({result.template_source})")
    print(f"top-1: {result.top1:.2%} ({correct}/{result.n})")
    print(f"top-{min(5, result.k)}: {result.top5:.2%}")
    per_class = list(enumerate(per_class_accuracy(result.confusion())))
    shown = [(i, c) for i, c in per_class if c.n]
    if len(shown) > PER_CLASS_PRINT_MAX:
        shown = sorted(shown, key=lambda item: (item[1].correct / item[1].n, item[0]))
        shown = shown[:WEAKEST_PRINTED]
        print(f"per-class top-1 (the {len(shown)} weakest of {len(per_class)}; all in --output):")
    else:
        print("per-class top-1:")
    width = max(len(names[i]) for i, _ in shown) if shown else 0
    for i, c in shown:
        print(f"  {names[i]:<{width}}  {c.correct / c.n:7.2%}  ({c.correct}/{c.n})")
    rate = result.throughput
    print(f"throughput: {rate.per_second:.1f} images/s ({rate.items} images in "
          f"{rate.seconds:.1f}s, batch {rate.batch_size}, {rate.concurrency} requests in flight; "
          f"label embeddings {result.label_seconds:.1f}s before)")


def _retrieval(args: argparse.Namespace) -> dict[str, Any]:
    _check_writable(args.output)
    if args.images is not None:
        if args.captions is None:
            raise UsageError("--images needs --captions FILE (filename<TAB>caption lines)")
        data = eval_data.read_captions(args.images, args.captions)
    else:
        if args.captions is not None:
            raise UsageError("--captions goes with --images, not --generated")
        data = eval_data.generated_retrieval(args.generated, args.seed, args.captions_per_image)
    print(f"retrieval: {len(data.images)} images, {len(data.captions)} captions",
          file=sys.stderr)
    with client_from_args(args) as client:
        result = evaluation.retrieval(
            client, data, batch_size=args.batch_size, concurrency=args.concurrency,
            progress=_progress(args),
        )
    print(f"model: {result.model.model_name} ({result.model.pretrained})")
    print(f"images: {len(data.images)}  captions: {len(data.captions)}")
    rows = [("image->text", result.image_to_text), ("text->image", result.text_to_image)]
    if result.class_recall is not None:
        rows += [(f"{name.replace('_to_', '->')} (class)", values)
                 for name, values in result.class_recall.items()]
    for title, values in rows:
        print(f"{title:<20}  " + "  ".join(f"R@{k} {v:7.2%}" for k, v in values.items()))
    for rate, unit in ((result.image_throughput, "images"), (result.text_throughput, "texts")):
        print(f"throughput: {rate.per_second:.1f} {unit}/s ({rate.items} {unit} in "
              f"{rate.seconds:.1f}s, batch {rate.batch_size}, {rate.concurrency} in flight)")
    return result.to_json()


def _command(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """Wrap a handler: run it, write its JSON, map errors to exit codes."""

    def run(args: argparse.Namespace) -> int:
        logger.debug("clipserve eval %s", args.eval_command)
        try:
            result = handler(args)
        except ClipServiceError as exc:
            print(f"error: {exc.code.name}: {exc.message}", file=sys.stderr)
            return 1
        except (UsageError, DataError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if args.output is not None:
            args.output.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
            print(f"results: {args.output}")
        return 0

    return run
