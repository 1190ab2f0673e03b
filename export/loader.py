"""Load an open_clip model for export: hub tag, local checkpoint, built-in checkpoint or random.

Imports torch and open_clip: only the export side uses this module.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, SimpleTokenizer

from clipserve.repository import sha256_file

from .options import DEFAULT_PRETRAINED, RANDOM_WEIGHTS, ExportError, ExportOptions

logger = logging.getLogger(__name__)

#: Preprocess keys open_clip's `PreprocessCfg` accepts from a pretrained tag's config.
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode", "fill_color")


@dataclass
class LoadedModel:
    """An open_clip model in eval mode and what the manifest needs to know about it."""

    model: torch.nn.Module
    model_name: str
    #: The tag the weights came from, "none" (random), "checkpoint" for a local file of no
    #: known tag, or "builtin" for clipserve's own checkpoint of the model.
    pretrained: str
    checkpoint_path: Path | None
    checkpoint_sha256: str
    #: open_clip's `get_model_preprocess_cfg` of this model and tag.
    preprocess_cfg: dict[str, Any]
    context_length: int
    vocab_size: int
    sot_token_id: int
    eot_token_id: int
    embedding_dim: int
    logit_scale: float
    logit_bias: float | None

    def release_model(self) -> None:
        """Drop the PyTorch weights once nothing needs them (ViT-L-14: 1.7 GB fewer at peak)."""
        self.model = None  # type: ignore[assignment]


def register_builtin_configs() -> Any:
    """Register clipserve's built-in model configs; return the `models` module or None."""
    try:
        from . import models  # type: ignore[attr-defined]
    except ImportError:
        return None
    models.register_builtin_configs()
    return models


def load_model(options: ExportOptions) -> LoadedModel:
    """Create the model of `options` with its weights, in eval mode, on the CPU, in fp32."""
    models = register_builtin_configs()
    name = options.model
    if open_clip.get_model_config(name) is None:
        raise ExportError(
            f"unknown model {name!r}: not an open_clip model config "
            f"(see `open_clip.list_models()`, e.g. ViT-L-14, ViT-B-32)"
        )
    pretrained = options.pretrained
    checkpoint = Path(options.checkpoint) if options.checkpoint is not None else None
    builtin = False
    if checkpoint is None and pretrained is None and models is not None:
        checkpoint = models.builtin_checkpoint(name)
        builtin = checkpoint is not None
        if builtin:
            logger.info("using the built-in checkpoint of %s", name)
    defaulted = checkpoint is None and pretrained is None
    if defaulted:
        pretrained = DEFAULT_PRETRAINED

    tag_cfg = (
        _tag_config(name, pretrained, defaulted) if pretrained not in (None, RANDOM_WEIGHTS) else {}
    )
    if checkpoint is not None:
        model = _create(name, str(checkpoint), tag_cfg)
        label = pretrained if tag_cfg else ("builtin" if builtin else "checkpoint")
    elif pretrained == RANDOM_WEIGHTS:
        torch.manual_seed(options.seed)
        model = _create(name, None, {})
        label = RANDOM_WEIGHTS
    else:
        assert pretrained is not None
        checkpoint = _download(name, pretrained, tag_cfg)
        model = _create(name, str(checkpoint), tag_cfg)
        label = pretrained
    return _describe(model, name, label, checkpoint)


def _tag_config(name: str, tag: str, defaulted: bool = False) -> dict[str, Any]:
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        what = (
            f"model {name!r} has no built-in checkpoint and the default tag {tag!r} is not one "
            f"of its tags (known tags: {known})"
            if defaulted
            else f"pretrained tag {tag!r} is unknown for model {name!r} (known tags: {known})"
        )
        raise ExportError(
            f"{what}; pass --pretrained TAG, --checkpoint FILE to export local weights, "
            "or --pretrained none for random weights"
        )
    return dict(cfg)


def _download(name: str, tag: str, tag_cfg: dict[str, Any]) -> Path:
    """Fetch the tag's weights from the hub (or its cache), with a clear error when it fails."""
    logger.info("fetching weights of %s/%s from the hub (or its local cache)", name, tag)
    try:
        path = open_clip.download_pretrained(tag_cfg)
    except Exception as exc:  # huggingface_hub and urllib raise many types
        raise ExportError(
            f"could not download the weights of {name} pretrained={tag!r}: the model hub is "
            f"unreachable from here (no network access?) and the weights are not in the local "
            f"cache ({type(exc).__name__}: {exc}). Download the checkpoint where the hub is "
            "reachable and pass it with --checkpoint FILE (keep --pretrained to record the tag "
            "and its preprocessing), or export random weights with --pretrained none"
        ) from exc
    if not path:
        raise ExportError(f"pretrained tag {tag!r} of {name} names no downloadable weights")
    return Path(path)


def _create(name: str, checkpoint: str | None, tag_cfg: dict[str, Any]) -> torch.nn.Module:
    """open_clip's own `create_model` (and checkpoint loading), with the tag's preprocessing."""
    if tag_cfg and tag_cfg.get("quick_gelu", False) != bool(
        (open_clip.get_model_config(name) or {}).get("quick_gelu", False)
    ):
        logger.warning(
            "the tag was trained with quick_gelu=%s but model %s differs; use the matching "
            "model name (e.g. with or without -quickgelu)",
            tag_cfg.get("quick_gelu", False),
            name,
        )
    preprocess = {k: tag_cfg[k] for k in _PREPROCESS_KEYS if k in tag_cfg}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = open_clip.create_model(
                name,
                pretrained=checkpoint,
                precision="fp32",
                device="cpu",
                force_preprocess_cfg=preprocess or None,
            )
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        source = f"checkpoint {checkpoint}" if checkpoint else "random weights"
        raise ExportError(f"open_clip could not create {name} from {source}: {exc}") from exc
    return model.eval()


def _describe(
    model: torch.nn.Module, name: str, label: str, checkpoint: Path | None
) -> LoadedModel:
    tokenizer = open_clip.get_tokenizer(name)
    if not isinstance(tokenizer, SimpleTokenizer) or tokenizer.reduction_fn is not None:
        raise ExportError(
            f"{name} uses {type(tokenizer).__name__}; clipserve serves open_clip's CLIP BPE "
            "tokenizer (SimpleTokenizer, lowercase cleaning) only"
        )
    if tokenizer.clean_fn.__name__ != "_clean_lower":
        raise ExportError(f"{name} uses a non-default SimpleTokenizer cleaning; unsupported")
    context_length = int(getattr(model, "context_length", DEFAULT_CONTEXT_LENGTH))
    vocab_size = int(getattr(model, "vocab_size", tokenizer.vocab_size))
    if vocab_size != tokenizer.vocab_size:
        raise ExportError(
            f"{name} has a text vocabulary of {vocab_size} ids, "
            f"the CLIP tokenizer has {tokenizer.vocab_size}"
        )
    logit_bias = getattr(model, "logit_bias", None)
    sha = ""
    if checkpoint is not None:
        logger.info("hashing checkpoint %s", checkpoint.name)
        sha = sha256_file(checkpoint)
    embedding_dim = _embedding_dim(model)
    return LoadedModel(
        model=model,
        model_name=name,
        pretrained=label,
        checkpoint_path=checkpoint,
        checkpoint_sha256=sha,
        preprocess_cfg=dict(open_clip.get_model_preprocess_cfg(model)),
        context_length=context_length,
        vocab_size=vocab_size,
        sot_token_id=int(tokenizer.sot_token_id),
        eot_token_id=int(tokenizer.eot_token_id),
        embedding_dim=embedding_dim,
        logit_scale=float(math.exp(float(model.logit_scale.detach().reshape(-1)[0]))),
        logit_bias=None if logit_bias is None else float(logit_bias.detach().reshape(-1)[0]),
    )


def _embedding_dim(model: torch.nn.Module) -> int:
    visual = model.visual
    dim = getattr(visual, "output_dim", None)
    if dim is None:
        size = open_clip.get_model_preprocess_cfg(model)["size"]
        size = size if isinstance(size, int) else size[0]
        with torch.no_grad():
            dim = model.encode_image(torch.zeros(1, 3, size, size)).shape[-1]
    return int(dim)
