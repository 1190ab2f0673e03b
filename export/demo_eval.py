"""In-process zero-shot evaluation of a CLIP model on `clipserve.synthetic` images (PyTorch).

This is the reference the served evaluation is compared with: the same images
(``synthetic.dataset(split, n, seed)``), class names (``synthetic.CLASSES``) and prompt
templates (``synthetic.ZERO_SHOT_TEMPLATES``), through open_clip's own preprocess transform.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.nn import functional

from clipserve import synthetic

logger = logging.getLogger(__name__)


@torch.no_grad()
def class_embeddings(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str],
) -> torch.Tensor:
    """Zero-shot classifier weights: per class, the renormalised mean of its prompt embeddings.

    Returns float32 [num_classes, embed_dim], unit rows.
    """
    prompts = [template.format(name) for name in class_names for template in templates]
    tokens = tokenizer(prompts)  # [C * T, context]
    text = model.encode_text(tokens, normalize=True)  # [C * T, D]
    text = text.reshape(len(class_names), len(templates), -1).mean(dim=1)  # [C, D]
    return functional.normalize(text, dim=-1)


@torch.no_grad()
def zero_shot_eval_torch(
    model: torch.nn.Module,
    preprocess: Callable[[Any], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    n: int,
    seed: int = 0,
    *,
    split: str = "heldout",
    templates: Sequence[str] = synthetic.ZERO_SHOT_TEMPLATES,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Zero-shot top-1/top-5 of `model` on ``synthetic.dataset(split, n, seed)``.

    `preprocess` is open_clip's val transform (PIL image -> normalised [3, S, S] tensor). The
    result holds ``top1`` and ``top5`` as fractions, ``correct``, ``n``, per-item
    ``predictions`` and ``labels`` (class indices into ``synthetic.CLASSES``), ``logit_scale``
    (the exponentiated scale) and the evaluation's parameters.
    """
    was_training = model.training
    model.eval()
    try:
        classifier = class_embeddings(model, tokenizer, synthetic.CLASSES, templates)  # [C, D]
        logit_scale = float(model.logit_scale.exp())
        predictions: list[int] = []
        labels: list[int] = []
        top5_hits = 0
        batch: list[torch.Tensor] = []
        batch_labels: list[int] = []

        def flush() -> None:
            nonlocal top5_hits
            pixels = torch.stack(batch)  # [B, 3, S, S]
            image = model.encode_image(pixels, normalize=True)  # [B, D]
            logits = logit_scale * image @ classifier.T  # [B, C]
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # [B, 5]
            target = torch.tensor(batch_labels)  # [B]
            predictions.extend(int(v) for v in top5[:, 0])
            top5_hits += int((top5 == target[:, None]).any(dim=1).sum())
            labels.extend(batch_labels)
            batch.clear()
            batch_labels.clear()

        for image, label in synthetic.dataset(split, n, seed):
            batch.append(preprocess(image))
            batch_labels.append(label)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    finally:
        model.train(was_training)

    correct = sum(p == t for p, t in zip(predictions, labels, strict=True))
    result: dict[str, Any] = {
        "top1": correct / n if n else 0.0,
        "top5": top5_hits / n if n else 0.0,
        "correct": correct,
        "n": n,
        "num_classes": len(synthetic.CLASSES),
        "split": split,
        "seed": seed,
        "templates": list(templates),
        "logit_scale": logit_scale,
        "predictions": predictions,
        "labels": labels,
    }
    logger.info("zero-shot top-1 %.4f top-5 %.4f on %d %s images (seed %d)",
                result["top1"], result["top5"], n, split, seed)
    return result
