"""`clipserve export`: an open_clip model -> a gated ONNX model repository.

torch and open_clip are imported only inside `run`: the top-level CLI imports this module for
every command, and `clipserve serve` must not pay for (or need) torch.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .options import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE_DELAY_US,
    DEFAULT_MODEL,
    DEFAULT_OPSET,
    DEFAULT_OUTPUT,
    DEFAULT_PRETRAINED,
    DEFAULT_SEED,
    FP16_MIN_COSINE,
    FP32_MIN_COSINE,
    ExportError,
    ExportOptions,
    OutputExistsError,
    ParityError,
)

logger = logging.getLogger(__name__)

DESCRIPTION = f"""\
Export an open_clip CLIP model to a model repository: two ONNX towers (vision, text) with a
dynamic batch axis, L2-normalised embeddings, a tokenizer.json reproducing open_clip's
tokenizer, Triton config.pbtxt files and the clipserve.json manifest. Nothing is published
unless ONNX Runtime reproduces PyTorch (cosine >= {FP32_MIN_COSINE} per item for fp32,
>= {FP16_MIN_COSINE} for fp16) at batch sizes 1, 3, 17 and text lengths 2, 16, 77.

examples:
  clipserve export --model ViT-L-14 --pretrained datacomp_xl_s13b_b90k --output model_repository
  clipserve export --model ViT-L-14 --pretrained datacomp_xl_s13b_b90k \\
      --checkpoint open_clip_pytorch_model.bin --output model_repository
  clipserve export --model ViT-L-14 --pretrained none --output random_repository
"""

#: Exit statuses: 1 = a parity gate failed, 2 = the export cannot be done as asked.
EXIT_PARITY = 1
EXIT_ERROR = 2


def add_parser(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL,
        help="open_clip model architecture, e.g. ViT-L-14, ViT-B-32 or clipserve-demo "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--pretrained", default=None, metavar="TAG",
        help="open_clip pretrained tag whose weights are fetched from the model hub, or 'none' "
        "for random weights (from --seed). With --checkpoint, a known tag only selects the "
        "image preprocessing recorded for the server. Default: the model's built-in "
        f"checkpoint if it has one, else {DEFAULT_PRETRAINED}",
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=None, metavar="FILE",
        help="local open_clip checkpoint (.pt, .bin or .safetensors) to export instead of "
        "downloading: use this where the model hub is unreachable",
    )
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, metavar="DIR",
        help="model repository folder to write (default: %(default)s)",
    )
    parser.add_argument(
        "--precision", choices=("fp32", "fp16"), default="fp32",
        help="fp16 halves the model files and speeds up GPUs; inputs and outputs stay "
        "float32, LayerNorm/Softmax/normalisation run in float32 (default: %(default)s)",
    )
    parser.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET,
        help="ONNX opset of the exported graphs, >= 18 (default: %(default)s)",
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
        help="max_batch_size written to the Triton config.pbtxt files; the ONNX graphs take "
        "any batch size (default: %(default)s)",
    )
    parser.add_argument(
        "--max-queue-delay-us", type=int, default=DEFAULT_MAX_QUEUE_DELAY_US,
        help="Triton dynamic batching: how long a request may wait for others to join its "
        "batch, in microseconds (default: %(default)s)",
    )
    parser.add_argument(
        "--force", action="store_true",
        help="replace the output folder if it exists (it is swapped only after every check "
        "passed)",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED,
        help="seed of the random weights (--pretrained none) and of the generated parity "
        "inputs (default: %(default)s)",
    )
    parser.set_defaults(run=run)


def options_from_args(args: argparse.Namespace) -> ExportOptions:
    return ExportOptions(
        model=args.model,
        pretrained=args.pretrained,
        checkpoint=args.checkpoint,
        output=args.output,
        precision=args.precision,
        opset=args.opset,
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
        force=args.force,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    from .writer import export_repository

    try:
        path = export_repository(options_from_args(args))
    except ParityError as exc:
        logger.error("%s; nothing was written", exc)
        return EXIT_PARITY
    except OutputExistsError as exc:
        logger.error("%s", exc)
        return EXIT_ERROR
    except ExportError as exc:
        logger.error("export failed: %s", exc)
        return EXIT_ERROR
    logger.info("model repository ready: %s", path)
    return 0
