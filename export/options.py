"""Options and errors of `clipserve export` (no torch here: the CLI imports this at start-up)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "ViT-L-14"
DEFAULT_PRETRAINED = "datacomp_xl_s13b_b90k"
#: ``--pretrained none``: random weights from ``--seed``.
RANDOM_WEIGHTS = "none"
DEFAULT_OUTPUT = Path("model_repository")
#: Pinned ONNX opset: 18 is the lowest the dynamo exporter emits without a version conversion
#: pass, and ONNX Runtime >= 1.14 and Triton's ORT backend run it.
DEFAULT_OPSET = 18
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_QUEUE_DELAY_US = 1000
DEFAULT_SEED = 0
#: Parity gates: minimum cosine similarity per item between ONNX Runtime and PyTorch fp32.
FP32_MIN_COSINE = 0.99999
FP16_MIN_COSINE = 0.999
#: Batch sizes and text lengths at which the exported graphs are checked.
PARITY_BATCH_SIZES = (1, 3, 17)
PARITY_TEXT_LENGTHS = (2, 16, 77)


class ExportError(Exception):
    """The export cannot be done as asked; the message says why and what to do."""


class ParityError(ExportError):
    """An exported tower does not reproduce PyTorch closely enough; nothing was published."""


class OutputExistsError(ExportError):
    """The output folder exists and ``--force`` was not given."""


@dataclass(frozen=True)
class ExportOptions:
    """What to export and where; the fields mirror the ``clipserve export`` flags."""

    model: str = DEFAULT_MODEL
    #: A pretrained tag of `model`, ``"none"`` for random weights, or None for the default:
    #: the model's built-in checkpoint when it has one, else `DEFAULT_PRETRAINED`. With
    #: `checkpoint`, a known tag only selects the image preprocessing recorded in the manifest.
    pretrained: str | None = None
    #: A local open_clip checkpoint (.pt, .bin, .safetensors) to load instead of the hub.
    checkpoint: Path | None = None
    output: Path = DEFAULT_OUTPUT
    precision: str = "fp32"
    opset: int = DEFAULT_OPSET
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US
    force: bool = False
    seed: int = DEFAULT_SEED
    fp32_min_cosine: float = FP32_MIN_COSINE
    fp16_min_cosine: float = FP16_MIN_COSINE
    batch_sizes: tuple[int, ...] = PARITY_BATCH_SIZES
    text_lengths: tuple[int, ...] = PARITY_TEXT_LENGTHS

    def validate(self) -> None:
        """Refuse inconsistent options before any heavy work starts."""
        if self.precision not in ("fp32", "fp16"):
            raise ExportError(f"precision must be fp32 or fp16, got {self.precision!r}")
        if self.checkpoint is not None and self.pretrained == RANDOM_WEIGHTS:
            raise ExportError("--checkpoint and --pretrained none contradict each other")
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise ExportError(f"checkpoint {self.checkpoint} does not exist or is not a file")
        if self.opset < 18:
            raise ExportError(f"opset must be >= 18 (dynamo export), got {self.opset}")
        if self.max_batch_size < 1:
            raise ExportError("max batch size must be >= 1")
        if self.max_queue_delay_us < 0:
            raise ExportError("max queue delay must be >= 0")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ExportError("parity batch sizes must be >= 1")
        if not self.text_lengths or min(self.text_lengths) < 2:
            raise ExportError("parity text lengths must be >= 2 (start and end of text)")
