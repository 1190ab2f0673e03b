"""Assemble a model repository: export, gate, write, then publish with one rename.

Everything is written into a temporary folder next to the output (same file system) and renamed
into place only after every parity gate passed, so a failed or interrupted export never leaves a
half-written repository where a server could load it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import open_clip
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from clipserve.repository import (
    MANIFEST_NAME,
    TEXT_INPUT,
    TEXT_MODEL,
    TEXT_OUTPUT,
    TOKENIZER_NAME,
    VISION_INPUT,
    VISION_MODEL,
    VISION_OUTPUT,
    Manifest,
    Preprocess,
    RepositoryError,
    SourceInfo,
    TokenizerInfo,
    TowerInfo,
    load_manifest,
    sha256_onnx,
)

from . import onnx_export, parity
from .fp16 import convert_to_fp16
from .loader import LoadedModel, load_model
from .options import ExportError, ExportOptions, OutputExistsError
from .tokenizer_json import PAD_TOKEN_ID, write_tokenizer_json
from .triton_config import text_config, vision_config

logger = logging.getLogger(__name__)

MODEL_FILE = "1/model.onnx"


class _Clock:
    """Elapsed seconds since the export started, for progress lines."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


class _DropLibraryInfo(logging.Filter):
    """Drop open_clip's INFO chatter, which it logs on the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}open_clip{os.sep}" not in (
            record.pathname
        )


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Keep the progress lines readable: libraries only log warnings during the export."""
    noisy = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [lg.level for lg in noisy]
    root_filter = _DropLibraryInfo()
    logging.getLogger().addFilter(root_filter)
    for lg in noisy:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        logging.getLogger().removeFilter(root_filter)
        for lg, level in zip(noisy, levels, strict=True):
            lg.setLevel(level)


def default_templates() -> tuple[str, ...]:
    """open_clip's OpenAI ImageNet prompt templates (callables) as ``"{}"`` strings."""
    return tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)


def export_repository(options: ExportOptions) -> Path:
    """Export `options.model` to a model repository at `options.output`; return its path.

    Raises OutputExistsError, ParityError (nothing written) or ExportError.
    """
    options.validate()
    output = Path(options.output)
    if output.exists() and not options.force:
        raise OutputExistsError(f"{output} exists; pass --force to replace it")
    with quiet_libraries():
        return _export(options, output)


def _export(options: ExportOptions, output: Path) -> Path:
    clock = _Clock()
    logger.info("[%6.1fs] loading %s (pretrained=%s, checkpoint=%s)", clock(), options.model,
                options.pretrained or "default", options.checkpoint or "-")
    loaded = load_model(options)
    logger.info("[%6.1fs] loaded %s (%s), embedding dim %d", clock(), loaded.model_name,
                loaded.pretrained, loaded.embedding_dim)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a server may run as another user
    try:
        _build(loaded, options, staging, clock)
        _publish(staging, output, options.force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("[%6.1fs] wrote %s", clock(), output)
    return output


def _image_size(loaded: LoadedModel) -> int:
    size = loaded.preprocess_cfg["size"]
    if isinstance(size, int):
        return size
    height, width = size
    if height != width:
        raise ExportError(f"{loaded.model_name} takes {height}x{width} images; only square inputs")
    return int(height)


def _build(loaded: LoadedModel, options: ExportOptions, root: Path, clock: _Clock) -> None:
    """Export and gate the towers into `root`, then write the tokenizer, configs and manifest."""
    size = _image_size(loaded)
    report, refs = _export_and_gate(loaded, options, root, size, clock)
    _write_metadata(loaded, options, root, size, report, refs, clock)


def _export_and_gate(
    loaded: LoadedModel, options: ExportOptions, root: Path, size: int, clock: _Clock
) -> tuple[dict[str, Any], parity.References]:
    """Write both towers (fp32, or fp16 after gating fp32) into `root`.

    Returns the parity report and the reference inputs (the tokenizer is checked on them).
    """
    fp16 = options.precision == "fp16"
    # fp16: the fp32 graphs are gated first, in a scratch folder removed before publishing.
    graphs = root / ".fp32" if fp16 else root
    vision_fp32 = graphs / VISION_MODEL / MODEL_FILE
    text_fp32 = graphs / TEXT_MODEL / MODEL_FILE
    logger.info("[%6.1fs] exporting the vision tower (opset %d)", clock(), options.opset)
    onnx_export.export_vision(loaded.model, vision_fp32, size, options.opset)
    logger.info("[%6.1fs] exporting the text tower", clock())
    onnx_export.export_text(loaded.model, text_fp32, loaded.context_length,
                            loaded.sot_token_id, loaded.eot_token_id, options.opset)

    logger.info("[%6.1fs] parity: running PyTorch on the reference inputs", clock())
    refs = parity.build_references(loaded.model, loaded.preprocess_cfg, loaded.model_name,
                                   loaded.eot_token_id, options.batch_sizes,
                                   options.text_lengths, options.seed)
    loaded.release_model()  # every later step compares with `refs`
    gc.collect()
    report: dict[str, Any] = {
        "reference": "open_clip PyTorch fp32; text ids padded to the full context",
        "onnxruntime_version": onnxruntime.__version__,
        "onnx_version": onnx.__version__,
        "images": len(refs.pixels),
        "texts": len(refs.texts),
    }
    logger.info("[%6.1fs] parity: ONNX Runtime fp32", clock())
    report["fp32"] = parity.check_towers(refs, vision_fp32, text_fp32,
                                         options.fp32_min_cosine, "fp32")
    if fp16:
        logger.info("[%6.1fs] converting to fp16", clock())
        for name, source in ((VISION_MODEL, vision_fp32), (TEXT_MODEL, text_fp32)):
            (root / name / "1").mkdir(parents=True, exist_ok=True)
            convert_to_fp16(source, root / name / MODEL_FILE)
        shutil.rmtree(graphs)
        logger.info("[%6.1fs] parity: ONNX Runtime fp16", clock())
        report["fp16"] = parity.check_towers(refs, root / VISION_MODEL / MODEL_FILE,
                                             root / TEXT_MODEL / MODEL_FILE,
                                             options.fp16_min_cosine, "fp16")
    return report, refs


def _write_metadata(
    loaded: LoadedModel,
    options: ExportOptions,
    root: Path,
    size: int,
    report: dict[str, Any],
    refs: parity.References,
    clock: _Clock,
) -> None:
    logger.info("[%6.1fs] writing tokenizer, Triton configs and manifest", clock())
    write_tokenizer_json(root / TOKENIZER_NAME)
    tokenizer = TokenizerInfo(
        file=TOKENIZER_NAME,
        context_length=loaded.context_length,
        sot_token_id=loaded.sot_token_id,
        eot_token_id=loaded.eot_token_id,
        pad_token_id=PAD_TOKEN_ID,
    )
    report["tokenizer"] = parity.check_tokenizer(refs, root, tokenizer)
    (root / VISION_MODEL / "config.pbtxt").write_text(
        vision_config(size, loaded.embedding_dim, options.max_batch_size,
                      options.max_queue_delay_us)
    )
    (root / TEXT_MODEL / "config.pbtxt").write_text(
        text_config(loaded.embedding_dim, options.max_batch_size, options.max_queue_delay_us)
    )
    manifest = _manifest(loaded, options, root, size, tokenizer, report)
    (root / MANIFEST_NAME).write_text(manifest.to_json())
    try:
        load_manifest(root)
    except RepositoryError as exc:  # a bug here, not the user's: say so plainly
        raise ExportError(f"the written repository does not read back: {exc}") from exc


def _manifest(
    loaded: LoadedModel,
    options: ExportOptions,
    root: Path,
    size: int,
    tokenizer: TokenizerInfo,
    report: dict[str, Any],
) -> Manifest:
    pre = loaded.preprocess_cfg
    vision_file = f"{VISION_MODEL}/{MODEL_FILE}"
    text_file = f"{TEXT_MODEL}/{MODEL_FILE}"
    manifest = Manifest(
        source=SourceInfo(
            model_name=loaded.model_name,
            pretrained=loaded.pretrained,
            checkpoint_sha256=loaded.checkpoint_sha256,
            open_clip_version=open_clip.__version__,
            torch_version=torch.__version__,
            opset=options.opset,
        ),
        embedding_dim=loaded.embedding_dim,
        precision=options.precision,
        vision=TowerInfo(VISION_MODEL, vision_file, VISION_INPUT, VISION_OUTPUT,
                         sha256_onnx(root / vision_file)),
        text=TowerInfo(TEXT_MODEL, text_file, TEXT_INPUT, TEXT_OUTPUT,
                       sha256_onnx(root / text_file)),
        preprocess=Preprocess(
            size=size,
            mean=tuple(float(v) for v in pre["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in pre["std"]),  # type: ignore[arg-type]
            interpolation=str(pre.get("interpolation", "bicubic")),
            resize_mode=str(pre.get("resize_mode", "shortest")),
            fill_color=int(pre.get("fill_color", 0)),
        ),
        tokenizer=tokenizer,
        logit_scale=loaded.logit_scale,
        logit_bias=loaded.logit_bias,
        default_templates=default_templates(),
        parity=report,
    )
    try:
        manifest.validate()
    except RepositoryError as exc:
        raise ExportError(f"{loaded.model_name} cannot be served by clipserve: {exc}") from exc
    return manifest


def _publish(staging: Path, output: Path, force: bool) -> None:
    """Rename `staging` to `output`, replacing an existing `output` only with `force`."""
    if not output.exists():
        staging.rename(output)
        return
    if not force:
        raise OutputExistsError(f"{output} appeared during the export; pass --force to replace it")
    retired = output.with_name(f".{output.name}.old-{staging.name.rsplit('-', 1)[-1]}")
    output.rename(retired)
    try:
        staging.rename(output)
    except BaseException:
        retired.rename(output)
        raise
    if retired.is_dir():
        shutil.rmtree(retired, ignore_errors=True)
    else:
        retired.unlink(missing_ok=True)
