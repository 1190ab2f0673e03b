"""Server settings: one typed object, parsed once in `main()`.

Every field is a command-line flag *and* an environment variable (``CLIPSERVE_<FIELD>``, upper
case); a flag wins over the environment, the environment over the default. The help text of
each flag is the field's ``help`` metadata, so `clipserve serve --help` documents them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

ENV_PREFIX = "CLIPSERVE_"


class Device(str, enum.Enum):
    """Where ONNX Runtime runs the towers."""

    AUTO = "auto"  # CUDA if onnxruntime-gpu sees a GPU, else CPU (logged loudly)
    CUDA = "cuda"
    CPU = "cpu"


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class ServerSettings:
    """Everything `clipserve serve` can be told."""

    model_repository: Path = _opt(
        Path("model_repository"), "model repository written by `clipserve export`"
    )
    host: str = _opt("[::]", "address to bind the gRPC port on")
    port: int = _opt(8001, "gRPC port (0 picks a free port and logs it)")
    device: Device = _opt(
        Device.AUTO, "auto, cuda or cpu: execution provider of the towers (auto: CUDA if present)"
    )
    intra_op_threads: int = _opt(
        0, "ONNX Runtime threads per inference (0: every core this process may use)"
    )
    preprocess_workers: int = _opt(
        0, "threads decoding and resizing images (0: every core this process may use)"
    )
    vision_max_batch_size: int = _opt(16, "largest image batch the vision tower runs")
    text_max_batch_size: int = _opt(64, "largest text batch the text tower runs")
    max_queue_delay_us: int = _opt(
        2000, "how long the oldest queued item waits for a batch to fill (microseconds)"
    )
    max_queue_size: int = _opt(
        2048, "items each tower's queue holds; beyond it requests fail with RESOURCE_EXHAUSTED"
    )
    queue_timeout_ms: int = _opt(
        0, "items queued longer than this fail with DEADLINE_EXCEEDED (0: only the call deadline)"
    )
    batch_buckets: str = _opt(
        "pow2",
        "batch sizes the engine runs, smaller batches padded up: 'pow2' (1,2,4,... up to the "
        "max batch size), 'all' (every size, no padding) or a comma list",
    )
    text_length_buckets: str = _opt(
        "8,16,32,77",
        "token lengths the text tower runs; a batch holds texts of one bucket and is padded to "
        "it, so it costs its longest member (the context length is always the last bucket)",
    )
    max_concurrent_requests: int = _opt(
        512, "requests handled at once; beyond it requests fail at once with RESOURCE_EXHAUSTED"
    )
    max_items_per_request: int = _opt(256, "images or texts one request may carry")
    max_labels: int = _opt(10_000, "labels one Classify request may carry")
    max_templates: int = _opt(100, "prompt templates one Classify request may carry")
    label_cache_size: int = _opt(
        100_000, "label embeddings Classify keeps (LRU, keyed by label and templates)"
    )
    max_image_pixels: int = _opt(
        40_000_000, "largest decoded image (width x height); larger ones are refused unread"
    )
    max_message_bytes: int = _opt(64 << 20, "largest gRPC message received or sent (bytes)")
    drain_grace_s: float = _opt(
        25.0, "on SIGTERM, how long in-flight requests may take to finish before cancellation"
    )
    max_connection_age_s: float = _opt(
        0.0, "close client connections after this age so clients rebalance (0: never)"
    )
    warmup: bool = _opt(True, "run every batch shape once before reporting SERVING")
    reflection: bool = _opt(True, "serve gRPC server reflection")

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_us / 1e6

    def validate(self) -> None:
        """Raise ValueError naming the first setting that cannot work."""
        positive = (
            "vision_max_batch_size",
            "text_max_batch_size",
            "max_queue_size",
            "max_concurrent_requests",
            "max_items_per_request",
            "max_labels",
            "max_templates",
            "max_image_pixels",
            "max_message_bytes",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("intra_op_threads", "preprocess_workers", "max_queue_delay_us", "port"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.drain_grace_s < 0 or self.max_connection_age_s < 0:
            raise ValueError("drain_grace_s and max_connection_age_s must be >= 0")
        if self.max_items_per_request > self.max_queue_size:
            raise ValueError(
                f"max_items_per_request ({self.max_items_per_request}) must not exceed "
                f"max_queue_size ({self.max_queue_size}): such a request could never be queued"
            )
        parse_buckets(self.batch_buckets, self.vision_max_batch_size)
        parse_length_buckets(self.text_length_buckets, 77)


def parse_buckets(spec: str, max_batch_size: int) -> tuple[int, ...]:
    """Batch buckets from 'pow2', 'all' or '1,4,16'; always ends with max_batch_size."""
    spec = spec.strip().lower()
    if spec == "pow2":
        sizes = {1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size}
    elif spec == "all":
        sizes = set(range(1, max_batch_size + 1))
    else:
        try:
            sizes = {int(part) for part in spec.split(",") if part.strip()}
        except ValueError as exc:
            raise ValueError(f"batch_buckets: cannot parse {spec!r}") from exc
        if not sizes or min(sizes) < 1:
            raise ValueError(f"batch_buckets: sizes must be >= 1, got {spec!r}")
        sizes = {s for s in sizes if s < max_batch_size}
    sizes.add(max_batch_size)
    return tuple(sorted(sizes))


def parse_length_buckets(spec: str, context_length: int) -> tuple[int, ...]:
    """Token-length buckets, capped at and always ending with the context length."""
    try:
        lengths = {int(part) for part in spec.split(",") if part.strip()}
    except ValueError as exc:
        raise ValueError(f"text_length_buckets: cannot parse {spec!r}") from exc
    if any(n < 2 for n in lengths):
        raise ValueError(f"text_length_buckets: lengths must be >= 2, got {spec!r}")
    lengths = {n for n in lengths if n < context_length}
    lengths.add(context_length)
    return tuple(sorted(lengths))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _convert(kind: Any, raw: str) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {raw!r}")
    return kind(raw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per settings field, help text included (defaults come from `from_sources`)."""
    hints = get_type_hints(ServerSettings)
    for f in dataclasses.fields(ServerSettings):
        kind = hints[f.name]
        help_text = f"{f.metadata['help']} [env {_env(f.name)}; default {_show(f.default)}]"
        if kind is bool:
            parser.add_argument(
                _flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                default=None, help=help_text,
            )
        elif isinstance(kind, type) and issubclass(kind, enum.Enum):
            parser.add_argument(
                _flag(f.name), dest=f.name, default=None,
                choices=[m.value for m in kind], help=help_text,
            )
        else:
            parser.add_argument(
                _flag(f.name), dest=f.name, default=None, type=kind, help=help_text
            )


def _show(value: Any) -> str:
    return value.value if isinstance(value, enum.Enum) else str(value)


def from_sources(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> ServerSettings:
    """Settings from flags, then environment variables, then defaults; validated."""
    environ = os.environ if environ is None else environ
    hints = get_type_hints(ServerSettings)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ServerSettings):
        kind = hints[f.name]
        flag_value = getattr(args, f.name, None) if args is not None else None
        if flag_value is not None:
            values[f.name] = kind(flag_value) if not isinstance(flag_value, kind) else flag_value
        elif _env(f.name) in environ:
            try:
                values[f.name] = _convert(kind, environ[_env(f.name)])
            except ValueError as exc:
                raise ValueError(f"{_env(f.name)}: {exc}") from exc
    settings = ServerSettings(**values)
    settings.validate()
    return settings


def setting_names() -> list[str]:
    """Every setting's environment variable name (for docs and manifest checks)."""
    return [_env(f.name) for f in dataclasses.fields(ServerSettings)]
