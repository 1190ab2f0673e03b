"""Export the two CLIP towers to ONNX with a dynamic batch (and text length) axis.

* vision: ``pixel_values`` float32 [N, 3, S, S] -> ``image_embeds`` float32 [N, D]
* text:   ``input_ids`` int64 [N, L], 1 <= L <= context length -> ``text_embeds`` [N, D]

Both outputs are L2-normalised inside the graph. The text tower is re-implemented here
(`TextTower`) because open_clip's ``encode_text`` adds the positional embedding and causal mask
of the full context (77) and so only accepts inputs padded to it. With a causal mask and a pooling
that picks a token at or before the end of text, the features of a text padded to L equal those of
the same text padded to 77: every position only attends to the positions before it.

Traps this module avoids (all measured):

* PyTorch's MultiheadAttention fast path has no export rule: it is switched off for the export.
* Pooling takes ``argmax`` of the ids (eot 49407 is the largest id): example inputs must hold
  real token ids, never random ones.
* Example batch and length of 1 would be specialised by `torch.export`: examples use >= 2.
* The legacy TorchScript exporter bakes the example text length into reshapes: the text tower is
  exported with ``dynamo=True`` and `torch.export.Dim` for both axes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F  # noqa: N812 (the universal torch alias)
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import TextTransformer, text_global_pool
from torch import nn

from clipserve.repository import TEXT_INPUT, TEXT_OUTPUT, VISION_INPUT, VISION_OUTPUT

from .options import ExportError

logger = logging.getLogger(__name__)

#: Poolings whose result does not depend on the positions after the end of text.
_LENGTH_INDEPENDENT_POOLS = ("argmax", "eos", "first")


class VisionTower(nn.Module):
    """pixel_values [N, 3, S, S] -> L2-normalised image embeddings [N, D]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.visual = model.visual

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.visual(pixel_values)  # [N, D]
        return F.normalize(features, dim=-1)


class TextTower(nn.Module):
    """input_ids [N, L] (L <= context) -> L2-normalised text embeddings [N, D].

    open_clip's ``encode_text`` for `CLIP` and ``TextTransformer.forward`` for `CustomTextCLIP`,
    with the positional embedding and causal mask sliced to the input's length.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        text = _text_parts(model)
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding  # [context, W]
        self.transformer = text.transformer
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection
        self.pool_type: str = text.pool_type
        self.eos_id: int | None = text.eos_id
        self.register_buffer("attn_mask", text.attn_mask.clone(), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # index_select, not [:L]: slicing makes torch.export guard on L != context.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # [L]
        x = self.token_embedding(input_ids)  # [N, L, W]
        x = x + self.positional_embedding.index_select(0, positions)  # [N, L, W]
        mask = self.attn_mask.index_select(0, positions).index_select(1, positions)  # [L, L]
        x = self.transformer(x, attn_mask=mask)  # [N, L, W]
        x = self.ln_final(x)  # [N, L, W]
        pooled = text_global_pool(x, input_ids, self.pool_type, eos_token_id=self.eos_id)  # [N, W]
        if isinstance(self.text_projection, nn.Linear):
            pooled = self.text_projection(pooled)  # [N, D]
        elif self.text_projection is not None:
            pooled = pooled @ self.text_projection  # [N, D]
        return F.normalize(pooled, dim=-1)


class _TextParts:
    """The text-tower modules of either open_clip model class, under one set of names."""

    def __init__(self, source: nn.Module, pool_type: str, eos_id: int | None) -> None:
        self.token_embedding = source.token_embedding
        self.positional_embedding = source.positional_embedding
        self.transformer = source.transformer
        self.ln_final = source.ln_final
        self.text_projection = source.text_projection
        self.attn_mask = source.attn_mask
        self.pool_type = pool_type
        self.eos_id = eos_id


def _text_parts(model: nn.Module) -> _TextParts:
    if isinstance(model, CLIP):
        parts = _TextParts(model, model.text_pool_type, getattr(model, "text_eos_id", None))
    elif isinstance(model, CustomTextCLIP):
        text = model.text
        if not isinstance(text, TextTransformer):
            raise ExportError(
                f"the text tower is a {type(text).__name__} (a Hugging Face text model): "
                "clipserve exports open_clip's own TextTransformer only"
            )
        if text.cls_emb is not None or text.use_pad_mask or text.output_tokens:
            raise ExportError(
                "text towers with a class token, a padding mask or token outputs (CoCa-style) "
                "are not supported"
            )
        parts = _TextParts(text, text.pool_type, text.eos_id)
    else:
        raise ExportError(f"cannot export the text tower of a {type(model).__name__}")
    if parts.attn_mask is None or parts.pool_type not in _LENGTH_INDEPENDENT_POOLS:
        raise ExportError(
            f"the text tower pools with {parts.pool_type!r} and "
            f"{'a causal' if parts.attn_mask is not None else 'no'} attention mask: its output "
            "depends on the padding to the full context, which a dynamic-length export cannot keep"
        )
    return parts


def example_token_ids(context_length: int, sot: int, eot: int, batch: int = 2) -> torch.Tensor:
    """Real-looking ids [batch, L] with 2 <= L <= context: sot, word ids, eot, padding."""
    length = min(8, context_length)
    ids = torch.zeros(batch, length, dtype=torch.long)  # [B, L]
    for row in range(batch):
        n_words = max(0, min(length - 2, 3 + 2 * row))
        ids[row, 0] = sot
        ids[row, 1 : 1 + n_words] = torch.arange(320, 320 + n_words)
        ids[row, 1 + n_words] = eot
    return ids


def export_vision(model: nn.Module, path: Path, image_size: int, opset: int) -> None:
    """Write the vision tower to `path` (dynamic batch)."""
    tower = VisionTower(model).eval()
    example = torch.randn(2, 3, image_size, image_size)  # [2, 3, S, S]
    batch = torch.export.Dim("batch", min=1)
    _export(tower, example, path, VISION_INPUT, VISION_OUTPUT, {0: batch}, opset)


def export_text(model: nn.Module, path: Path, context_length: int, sot: int, eot: int,
                opset: int) -> None:
    """Write the text tower to `path` (dynamic batch and length up to `context_length`)."""
    tower = TextTower(model).eval()
    example = example_token_ids(context_length, sot, eot)  # [2, L]
    batch = torch.export.Dim("batch", min=1)
    length = torch.export.Dim("length", min=1, max=context_length)
    _export(tower, example, path, TEXT_INPUT, TEXT_OUTPUT, {0: batch, 1: length}, opset)


def _export(
    tower: nn.Module,
    example: torch.Tensor,
    path: Path,
    input_name: str,
    output_name: str,
    dims: dict[int, torch.export.Dim],
    opset: int,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                tower,
                (example,),
                dynamo=True,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_shapes={input_name: dims},
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    if program is None:
        raise ExportError(f"torch.onnx.export returned no program for {input_name}")
    # Weights in one external file beside the graph (`model.onnx.data`): no 2 GB protobuf limit,
    # and ONNX Runtime memory-maps the file instead of copying the weights out of a parsed
    # protobuf, which lowers the server's peak memory while loading (docs/performance.md).
    program.save(str(path), external_data=True)
    onnx.checker.check_model(str(path), full_check=True)
    logger.debug("exported %s -> %s to %s", input_name, output_name, path)
