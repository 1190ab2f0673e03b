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
from typing import Any, get_args, get_type_hints

ENV_PREFIX = "CLIPSERVE_"


class Device(str, enum.Enum):
    """Where ONNX Runtime runs the towers."""

    AUTO = "auto"  # CUDA if onnxruntime-gpu sees a GPU, else CPU (logged loudly)
    CUDA = "cuda"
    CPU = "cpu"


class LogFormat(str, enum.Enum):
    """How log lines are written."""

    TEXT = "text"  # human-readable lines
    JSON = "json"  # one JSON object per line; access lines carry their fields as keys


class ConfigError(ValueError):
    """A setting names something unusable at start (a missing file or variable, a bad key)."""


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
    preprocess_nice: int = _opt(
        10,
        "Linux: niceness added to the preprocessing threads, so that under contention the "
        "inference threads and the event loop run first and image decoding fills the gaps "
        "(0 leaves them at the server's priority; 0-19)",
    )
    preprocess_simd: bool = _opt(
        False,
        "decode JPEGs with libjpeg-turbo (simplejpeg) and shrink them with libvips' SIMD "
        "reducers: about 2x the images/s per core of the exact path at 1920x1080, within 0.2 "
        "levels of open_clip's pixels on photos (the requirement: 0.5); bicubic models and "
        "shrinks of 2x to 24x only, every other image keeps the exact path; needs the `simd` "
        "extra (docs/preprocessing.md). Off: Pillow, bit-for-bit open_clip's transform",
    )
    switch_interval_us: int = _opt(
        0,
        "the interpreter's thread switch interval in microseconds (0 keeps Python's 5000): how "
        "long a thread returning from C code (inference, decoding) may wait for the interpreter "
        "lock while the event loop runs; lower it on many-core machines whose loop is busy "
        "(docs/performance.md, 'The interpreter lock')",
    )
    intra_op_spinning: bool = _opt(
        False,
        "let ONNX Runtime threads busy-wait for work between operators (faster only on cores "
        "that nothing else needs; off leaves them to gRPC and preprocessing)",
    )
    prepack_weights: bool = _opt(
        True,
        "CPU: let ONNX Runtime keep its own re-laid-out copy of the matrix weights (measured "
        "with ViT-L-14: about 6 percent faster, a third more memory for the weights); off for "
        "memory-bound CPU deployments",
    )
    cpu_mem_arena: bool = _opt(
        True,
        "CPU: keep activation memory in ONNX Runtime's arena between batches (off returns it "
        "after each batch; measured in docs/performance.md); off for memory-bound CPU "
        "deployments",
    )
    gpu_mem_limit_mb: int = _opt(
        0, "CUDA: memory arena limit of each tower's session in MiB (0: no limit)"
    )
    cudnn_conv_algo_search: str = _opt(
        "heuristic",
        "CUDA: how cuDNN picks convolution algorithms: heuristic (fast start), exhaustive "
        "(benchmarks each shape once at warm-up, can be faster) or default",
    )
    io_binding: bool = _opt(
        True,
        "CUDA: run batches through I/O binding: page-locked staging buffers and bound device "
        "buffers per batch shape (no effect on CPU)",
    )
    cuda_graphs: bool = _opt(
        False,
        "CUDA: capture each batch shape as a CUDA graph at warm-up and replay it (less launch "
        "overhead for small batches; needs --io-binding)",
    )
    tensorrt: bool = _opt(
        False, "use ONNX Runtime's TensorRT execution provider in front of CUDA, when present"
    )
    tensorrt_cache_dir: str = _opt(
        "",
        "TensorRT engine and timing cache folder, so that engines are built once, not at every "
        "start (empty: no cache)",
    )
    tensorrt_fp16: bool = _opt(False, "let TensorRT run fp32 models in fp16")
    vision_max_batch_size: int = _opt(16, "largest image batch the vision tower runs")
    text_max_batch_size: int = _opt(64, "largest text batch the text tower runs")
    vision_instances: int = _opt(
        1,
        "model instances of the vision tower (Triton's instance_group count): sessions that run "
        "batches side by side, each on its own thread, sharing the tower's queue; with "
        "--intra-op-threads 0 they share the cores out. Each instance holds its own copy of the "
        "weights",
    )
    text_instances: int = _opt(1, "model instances of the text tower (as --vision-instances)")
    max_queue_delay_us: int = _opt(
        2000, "how long the oldest queued item waits for a batch to fill (microseconds)"
    )
    adaptive_queue_delay: bool = _opt(
        True,
        "skip --max-queue-delay-us while requests arrive alone: a batch waits for company only "
        "while at least a quarter of the tower's recent requests arrived while another was "
        "queued or running (a lone client in a closed loop is not charged the delay; clients "
        "that arrive together still share a batch); off: always wait the full delay, as Triton "
        "does",
    )
    max_queue_size: int = _opt(
        2048,
        "items waiting for each tower (images being decoded included); beyond it requests fail "
        "at once with RESOURCE_EXHAUSTED",
    )
    queue_timeout_ms: int = _opt(
        0,
        "work that waited longer than this for compute, counted from admission (decoding "
        "included), fails with DEADLINE_EXCEEDED (0: only the call deadline)",
    )
    batch_buckets: str = _opt(
        "auto",
        "batch sizes the engine runs, smaller batches padded up: 'pow2' (1,2,4,... up to the "
        "max batch size), 'all' (every size), a comma list, or 'auto': pow2 on a GPU; on the CPU "
        "every batch runs at its own size, unpadded (CPU kernels need no warm-up per shape, and "
        "padding only adds compute), with the pow2 sizes warmed up",
    )
    batch_trimming: bool = _opt(
        False,
        "run a smaller batch bucket full, leaving the rest queued, instead of padding up to the "
        "next bucket when the shapes' measured costs say it carries a fifth more items per second "
        "(only where batches are padded: a GPU, or an explicit --batch-buckets; opt-in: measured "
        "gains and losses, docs/performance.md)",
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
        100_000,
        "label embeddings Classify keeps (LRU, keyed by label and templates; as many rows again "
        "for whole label sets sent before)",
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
    session_failure_threshold: int = _opt(
        3,
        "consecutive failed batches of a tower after which the server turns NOT_SERVING, "
        "rebuilds that tower's ONNX Runtime session, warms it up and serves again (0: never)",
    )
    max_session_rebuilds: int = _opt(
        3,
        "session rebuilds allowed within 10 minutes; one more, or a rebuild that fails, makes "
        "the server drain and exit with status 70 so that its supervisor restarts it",
    )
    tls_cert: str = _opt(
        "", "PEM certificate chain of the server; with --tls-key the port serves TLS only"
    )
    tls_key: str = _opt("", "PEM private key of --tls-cert (unencrypted)")
    tls_client_ca: str = _opt(
        "", "PEM CA certificates; when set, clients must present a certificate they signed (mTLS)"
    )
    auth_token_file: str = _opt(
        "",
        "file of accepted bearer tokens, one per line; with it (or --auth-token-env) every call "
        "needs the metadata `authorization: Bearer <token>`",
    )
    auth_token_env: str = _opt(
        "",
        "name of an environment variable holding accepted bearer tokens, comma separated (the "
        "name, not the token: secrets stay off the command line)",
    )
    auth_public_health: bool = _opt(
        True, "with authentication on, grpc.health.v1 still answers without a token (probes)"
    )
    auth_public_reflection: bool = _opt(
        False, "with authentication on, server reflection still answers without a token"
    )
    allow_url_inputs: bool = _opt(
        False, "fetch Image.url inputs (http and https) from the hosts of --url-allowlist"
    )
    url_allowlist: str = _opt(
        "",
        "hosts URL inputs may name, comma separated; '*.example.com' matches its subdomains, "
        "'*' any host (private, loopback and link-local addresses stay refused)",
    )
    url_max_bytes: int = _opt(16 << 20, "largest image fetched from a URL (bytes)")
    url_timeout_s: float = _opt(
        5.0, "time limit of one URL fetch, redirects included (seconds)"
    )
    url_allow_private: bool = _opt(
        False,
        "UNSAFE, for tests only: let URL inputs reach private, loopback and link-local "
        "addresses (server-side request forgery)",
    )
    warmup: bool = _opt(True, "run every batch shape once before reporting SERVING")
    reflection: bool = _opt(True, "serve gRPC server reflection")
    metrics: bool = _opt(True, "serve Prometheus metrics (Triton's nv_* names) over HTTP")
    metrics_port: int = _opt(
        8002, "HTTP port of /metrics, on --host (0 picks a free port and logs it)"
    )
    http_port: int | None = _opt(
        None,
        "port of the OpenAI-compatible HTTP API (/v1/embeddings, /v1/classify, /v1/rank, "
        "/v1/models, /health/ready) on --host, on the same batchers as gRPC; off when unset or "
        "'off', 0 picks a free port and logs it (needs the `http` extra)",
    )
    log_format: LogFormat = _opt(
        LogFormat.TEXT, "text or json: how log lines, access lines included, are written"
    )
    access_log: bool = _opt(
        True,
        "write one log line per RPC and HTTP API request (method, status, items, latency, "
        "queue time)",
    )

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_us / 1e6

    def validate(self) -> None:
        """Raise ValueError naming the first setting that cannot work."""
        positive = (
            "vision_max_batch_size",
            "text_max_batch_size",
            "vision_instances",
            "text_instances",
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
        for name in (
            "intra_op_threads", "preprocess_workers", "max_queue_delay_us", "port", "metrics_port",
            "switch_interval_us",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be 0 to 65535 or off, got {self.http_port}")
        if self.drain_grace_s < 0 or self.max_connection_age_s < 0:
            raise ValueError("drain_grace_s and max_connection_age_s must be >= 0")
        if self.max_items_per_request > self.max_queue_size:
            raise ValueError(
                f"max_items_per_request ({self.max_items_per_request}) must not exceed "
                f"max_queue_size ({self.max_queue_size}): such a request could never be queued"
            )
        parse_buckets(self.batch_buckets, self.vision_max_batch_size)
        if not 0 <= self.preprocess_nice <= 19:
            raise ValueError(f"preprocess_nice must be 0 to 19, got {self.preprocess_nice}")
        if self.cudnn_conv_algo_search.lower() not in ("heuristic", "exhaustive", "default"):
            raise ValueError(
                "cudnn_conv_algo_search must be heuristic, exhaustive or default, got "
                f"{self.cudnn_conv_algo_search!r}"
            )
        if self.gpu_mem_limit_mb < 0:
            raise ValueError(f"gpu_mem_limit_mb must be >= 0, got {self.gpu_mem_limit_mb}")
        if self.cuda_graphs and not self.io_binding:
            raise ValueError("cuda_graphs needs io_binding (fixed device buffers per shape)")
        parse_length_buckets(self.text_length_buckets, 77)
        self._validate_security()

    def _validate_security(self) -> None:
        """TLS files come in pairs; URL inputs need an allowlist; limits must be usable."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be set together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.allow_url_inputs and not self.url_allowlist.strip():
            raise ValueError("allow_url_inputs needs url_allowlist (a host list, or '*')")
        if self.url_max_bytes <= 0 or self.url_timeout_s <= 0:
            raise ValueError("url_max_bytes and url_timeout_s must be positive")
        if self.session_failure_threshold < 0 or self.max_session_rebuilds < 0:
            raise ValueError("session_failure_threshold and max_session_rebuilds must be >= 0")


def parse_buckets(spec: str, max_batch_size: int) -> tuple[int, ...]:
    """Batch buckets from 'pow2', 'all' or '1,4,16'; always ends with max_batch_size."""
    spec = spec.strip().lower()
    if spec in ("pow2", "auto"):
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


def _optional_of(kind: Any) -> Any:
    """`X` for the type hint `X | None`, else None."""
    args = get_args(kind)
    if len(args) == 2 and type(None) in args:
        return next(a for a in args if a is not type(None))
    return None


def _convert(kind: Any, raw: str) -> Any:
    inner = _optional_of(kind)
    if inner is not None:  # "", "off" and "none" unset an optional setting
        return None if raw.strip().lower() in ("", "off", "none") else _convert(inner, raw)
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
        elif _optional_of(kind) is not None:  # converted by from_sources: "off" is a value
            parser.add_argument(_flag(f.name), dest=f.name, default=None, help=help_text)
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
    if value is None:
        return "off"
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
        if flag_value is not None and _optional_of(kind) is not None:
            try:
                values[f.name] = _convert(kind, flag_value)
            except ValueError as exc:
                raise ValueError(f"{_flag(f.name)}: {exc}") from exc
        elif flag_value is not None:
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
