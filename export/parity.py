"""Parity gate: ONNX Runtime must reproduce open_clip's PyTorch embeddings before publishing.

The reference is open_clip itself: ``encode_image(normalize=True)`` on preprocessed generated
images, and ``encode_text(normalize=True)`` on token ids padded to the full context (77), the only
input open_clip accepts. The ONNX text tower gets the same ids at lengths 2, 16 and 77 (texts cut
the way open_clip truncates), at batch sizes 1, 3 and 17; the vision tower at the same batch
sizes. Every item's cosine similarity must reach the threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from clipserve.repository import TEXT_INPUT, VISION_INPUT

from .options import ParityError
from .samples import sample_images, sample_texts

logger = logging.getLogger(__name__)


@dataclass
class References:
    """Inputs and PyTorch fp32 outputs, computed once and checked against each exported graph."""

    pixels: np.ndarray  # [M, 3, S, S] float32
    image_embeds: np.ndarray  # [M, D]
    texts: list[str]
    ids_full: np.ndarray  # [T, context] int64: open_clip's tokenizer output
    #: length -> (ids [T, length] int64, reference embeddings [T, D])
    text_by_length: dict[int, tuple[np.ndarray, np.ndarray]]
    batch_sizes: tuple[int, ...]


def truncate_ids(ids: np.ndarray, length: int, eot: int) -> np.ndarray:
    """open_clip's truncation to `length`: rows [T, >= length] -> [T, length], last id eot."""
    out = ids[:, :length].copy()  # [T, length]
    too_long = (ids[:, length:] != 0).any(axis=1) if ids.shape[1] > length else np.zeros(
        len(ids), dtype=bool
    )
    out[too_long, -1] = eot
    return out


def build_references(
    model: torch.nn.Module,
    preprocess_cfg: dict[str, Any],
    model_name: str,
    eot: int,
    batch_sizes: Sequence[int],
    lengths: Sequence[int],
    seed: int = 0,
) -> References:
    """Generate inputs and run open_clip's PyTorch model on them."""
    count = max(batch_sizes)
    cfg = PreprocessCfg(**{k: v for k, v in preprocess_cfg.items() if k != "mode"})
    transform = image_transform_v2(cfg, is_train=False)
    pixels = torch.stack([transform(img) for img in sample_images(count, seed)])  # [M, 3, S, S]
    texts = sample_texts(count)
    tokenizer = open_clip.get_tokenizer(model_name)
    ids77 = tokenizer(texts).numpy()  # [T, context]
    context = ids77.shape[1]
    by_length: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    with torch.no_grad():
        image_embeds = model.encode_image(pixels, normalize=True).numpy()  # [M, D]
        for length in sorted(set(lengths)):
            ids = truncate_ids(ids77, length, eot)  # [T, length]
            padded = np.zeros((len(ids), context), dtype=np.int64)  # [T, context]
            padded[:, :length] = ids
            embeds = model.encode_text(torch.from_numpy(padded), normalize=True).numpy()
            by_length[length] = (ids, embeds)
    return References(
        pixels=pixels.numpy().astype(np.float32),
        image_embeds=image_embeds,
        texts=texts,
        ids_full=ids77.astype(np.int64),
        text_by_length=by_length,
        batch_sizes=tuple(batch_sizes),
    )


def _compare(actual: np.ndarray, expected: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-row cosine similarity (float64) and the largest absolute difference."""
    a = actual.astype(np.float64)
    b = expected.astype(np.float64)
    cosine = (a * b).sum(-1) / np.maximum(
        np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12
    )
    cosine = np.where(np.isfinite(cosine), cosine, -1.0)
    return cosine, float(np.abs(a - b).max()) if a.size else 0.0


class _Stats:
    def __init__(self) -> None:
        self.cosines: list[float] = []
        self.max_abs_diff = 0.0
        self.worst = ""

    def add(self, cosine: np.ndarray, max_abs: float, where: str) -> None:
        if cosine.size and (not self.cosines or cosine.min() < min(self.cosines)):
            self.worst = f"{where}, item {int(cosine.argmin())}"
        self.cosines.extend(cosine.tolist())
        self.max_abs_diff = max(self.max_abs_diff, max_abs)

    def report(self, **extra: Any) -> dict[str, Any]:
        return {
            "min_cosine": float(min(self.cosines)),
            "mean_cosine": float(np.mean(self.cosines)),
            "max_abs_diff": self.max_abs_diff,
            "items": len(self.cosines),
            "worst": self.worst,
            **extra,
        }


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def check_towers(
    refs: References,
    vision_path: Path,
    text_path: Path,
    min_cosine: float,
    label: str,
) -> dict[str, Any]:
    """Run both ONNX towers on the reference inputs; raise ParityError below `min_cosine`."""
    vision = _Stats()
    session = _session(vision_path)
    for batch in refs.batch_sizes:
        (out,) = session.run(None, {VISION_INPUT: refs.pixels[:batch]})  # [batch, D]
        vision.add(*_compare(out, refs.image_embeds[:batch]), f"vision batch {batch}")
    text = _Stats()
    session = _session(text_path)
    for length, (ids, expected) in refs.text_by_length.items():
        for batch in refs.batch_sizes:
            (out,) = session.run(None, {TEXT_INPUT: ids[:batch]})  # [batch, D]
            text.add(*_compare(out, expected[:batch]), f"text batch {batch} length {length}")
    report = {
        "threshold": min_cosine,
        "vision": vision.report(batch_sizes=list(refs.batch_sizes)),
        "text": text.report(
            batch_sizes=list(refs.batch_sizes), lengths=sorted(refs.text_by_length)
        ),
    }
    logger.info(
        "parity %s: vision min cosine %.7f (max abs diff %.2e), text min cosine %.7f "
        "(max abs diff %.2e), threshold %s",
        label,
        report["vision"]["min_cosine"],
        report["vision"]["max_abs_diff"],
        report["text"]["min_cosine"],
        report["text"]["max_abs_diff"],
        min_cosine,
    )
    failed = [
        f"{tower} min cosine {report[tower]['min_cosine']:.7f} at {report[tower]['worst']}"
        for tower in ("vision", "text")
        if not report[tower]["min_cosine"] >= min_cosine
    ]
    if failed:
        raise ParityError(
            f"parity gate ({label}) failed, threshold {min_cosine}: " + "; ".join(failed)
        )
    return report


def check_tokenizer(refs: References, root: Path, tokenizer_info: Any) -> dict[str, Any]:
    """The runtime tokenizer on the written tokenizer.json must give open_clip's ids."""
    from clipserve.server.tokenizer import ClipTokenizer, pad_batch

    tokenizer = ClipTokenizer.from_repository(root, tokenizer_info)
    actual = pad_batch(tokenizer.encode_batch(refs.texts), refs.ids_full.shape[1])
    mismatches = int((actual != refs.ids_full).any(axis=1).sum())
    if mismatches:
        raise ParityError(
            f"the runtime tokenizer differs from open_clip's on {mismatches} of "
            f"{len(refs.texts)} texts"
        )
    return {"texts": len(refs.texts), "mismatches": 0}
