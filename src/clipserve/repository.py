"""The model repository: a Triton-shaped folder plus clipserve's manifest.

Layout written by `clipserve export` and read by `clipserve serve`::

    model_repository/
      clipserve.json            manifest (this module's `Manifest`)
      tokenizer.json            Hugging Face `tokenizers` JSON (CLIP BPE)
      clip_vision/config.pbtxt  Triton model configuration
      clip_vision/1/model.onnx  pixel_values float32 [N,3,S,S] -> image_embeds float32 [N,D]
      clip_vision/1/model.onnx.data   its weights (ONNX external data, memory-mapped on load)
      clip_text/config.pbtxt
      clip_text/1/model.onnx    input_ids int64 [N,L] (1 <= L <= context) -> text_embeds [N,D]
      clip_text/1/model.onnx.data

Triton only loads sub-folders as models, so the two files at the top are ignored by it and the
same folder also loads in Triton. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "clipserve.json"
TOKENIZER_NAME = "tokenizer.json"
FORMAT_VERSION = 1

VISION_MODEL = "clip_vision"
TEXT_MODEL = "clip_text"
VISION_INPUT = "pixel_values"
VISION_OUTPUT = "image_embeds"
TEXT_INPUT = "input_ids"
TEXT_OUTPUT = "text_embeds"

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
RESIZE_MODES = ("shortest", "longest", "squash")
PRECISIONS = ("fp32", "fp16")


class RepositoryError(Exception):
    """The model repository is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class Preprocess:
    """Image preprocessing of the pretrained tag (open_clip's `get_model_preprocess_cfg`)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0


@dataclass(frozen=True)
class TokenizerInfo:
    """Where the tokenizer lives and the ids the text tower relies on."""

    file: str
    context_length: int
    sot_token_id: int
    eot_token_id: int
    pad_token_id: int = 0


@dataclass(frozen=True)
class TowerInfo:
    """One ONNX tower: its Triton model name, file and tensor names."""

    name: str
    file: str
    input: str
    output: str
    sha256: str = ""


@dataclass(frozen=True)
class SourceInfo:
    """Where the weights came from."""

    model_name: str
    pretrained: str
    checkpoint_sha256: str = ""
    open_clip_version: str = ""
    torch_version: str = ""
    opset: int = 0


@dataclass(frozen=True)
class Manifest:
    """Everything the server needs to serve the repository, and nothing from torch."""

    source: SourceInfo
    embedding_dim: int
    precision: str
    vision: TowerInfo
    text: TowerInfo
    preprocess: Preprocess
    tokenizer: TokenizerInfo
    logit_scale: float
    logit_bias: float | None = None
    default_templates: tuple[str, ...] = ("a photo of a {}.",)
    parity: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise RepositoryError(
                f"manifest format_version is {version!r}, this clipserve reads {FORMAT_VERSION}: "
                "re-export the repository with this version of clipserve"
            )
        try:
            pre = data["preprocess"]
            manifest = cls(
                source=SourceInfo(**data["source"]),
                embedding_dim=int(data["embedding_dim"]),
                precision=str(data["precision"]),
                vision=TowerInfo(**data["vision"]),
                text=TowerInfo(**data["text"]),
                preprocess=Preprocess(
                    size=int(pre["size"]),
                    mean=_triple(pre["mean"], "preprocess.mean"),
                    std=_triple(pre["std"], "preprocess.std"),
                    interpolation=pre.get("interpolation", "bicubic"),
                    resize_mode=pre.get("resize_mode", "shortest"),
                    fill_color=int(pre.get("fill_color", 0)),
                ),
                tokenizer=TokenizerInfo(**data["tokenizer"]),
                logit_scale=float(data["logit_scale"]),
                logit_bias=None if data.get("logit_bias") is None else float(data["logit_bias"]),
                default_templates=tuple(data.get("default_templates") or ("{}",)),
                parity=dict(data.get("parity") or {}),
                format_version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RepositoryError(f"manifest is malformed: {exc!r}") from exc
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Check the values a server relies on; raise RepositoryError naming the field."""
        checks = [
            (self.embedding_dim > 0, "embedding_dim must be positive"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
            (self.preprocess.size > 0, "preprocess.size must be positive"),
            (
                self.preprocess.interpolation in INTERPOLATIONS,
                f"preprocess.interpolation must be one of {INTERPOLATIONS}",
            ),
            (
                self.preprocess.resize_mode in RESIZE_MODES,
                f"preprocess.resize_mode must be one of {RESIZE_MODES}",
            ),
            (all(s > 0 for s in self.preprocess.std), "preprocess.std must be positive"),
            (self.tokenizer.context_length >= 2, "tokenizer.context_length must be >= 2"),
            (self.logit_scale > 0, "logit_scale must be positive"),
            (
                all(t.count("{}") == 1 for t in self.default_templates),
                "every default template must contain exactly one '{}'",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise RepositoryError(f"manifest: {message}")


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise RepositoryError(f"manifest: {name} must have 3 values, got {len(values)}")
    return values  # type: ignore[return-value]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    return _sha256((path,), chunk)


def sha256_onnx(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of an ONNX graph file followed by its external data file (`<name>.data`)."""
    data = path.with_name(path.name + ".data")
    return _sha256((path, data) if data.is_file() else (path,), chunk)


def _sha256(paths: tuple[Path, ...], chunk: int) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def load_manifest(root: Path) -> Manifest:
    """Read and check the manifest and that every file it names exists."""
    root = Path(root)
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} does not exist or is not a folder")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise RepositoryError(
            f"{path} is missing: is {root} a repository written by `clipserve export`?"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RepositoryError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise RepositoryError(f"{path} must hold a JSON object")
    manifest = Manifest.from_dict(data)
    for rel in (manifest.vision.file, manifest.text.file, manifest.tokenizer.file):
        if not (root / rel).is_file():
            raise RepositoryError(f"model repository {root} lacks {rel}, named by the manifest")
    return manifest
