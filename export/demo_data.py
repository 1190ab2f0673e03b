"""Training data of the demo model: generated images through open_clip's preprocessing, captions.

The images go through exactly the transform the model is served with (open_clip's val
transform: PIL bicubic shortest-side resize, centre crop, OpenAI normalisation), split in two:
the PIL stages run once per image and give uint8 crops; the tensor stages (`normalize_batch`)
run per batch. `render_split` checks that the two together equal the whole transform.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import open_clip
import torch
from torchvision.transforms import Compose, ToTensor

from clipserve import synthetic

logger = logging.getLogger(__name__)

Preprocess = Callable[[Any], torch.Tensor]

_CHUNK = 64


def split_preprocess(preprocess: Preprocess) -> tuple[Preprocess, Preprocess]:
    """Split open_clip's val transform into its PIL stages and its tensor stages.

    The PIL stages (resize, centre crop, mode) give the uint8 image the model sees; the tensor
    stages (to-tensor, normalise) only rescale it, so they can be applied per batch.
    """
    stages = list(preprocess.transforms)  # type: ignore[attr-defined]
    cut = next(i for i, stage in enumerate(stages) if isinstance(stage, ToTensor))
    return Compose(stages[:cut]), Compose(stages[cut:])


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> OpenAI-normalised float32 [B, 3, S, S] (open_clip's tensor stages)."""
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return images.float().div_(255.0).sub_(mean).div_(std)


def _worker_init() -> None:
    torch.set_num_threads(1)


def _render_chunk(
    pil_stages: Preprocess, split: str, seed: int, start: int, stop: int
) -> tuple[torch.Tensor, list[int]]:
    """Items [start, stop) of `split` after the PIL stages: uint8 [k, 3, S, S] and labels."""
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for index in range(start, stop):
        label = index % len(synthetic.CLASSES)
        image = pil_stages(synthetic.render(label, synthetic.item_rng(split, seed, index)))
        pixels = np.asarray(image, dtype=np.uint8).copy()  # [S, S, 3]
        images.append(torch.from_numpy(pixels).permute(2, 0, 1))  # [3, S, S]
        labels.append(label)
    return torch.stack(images), labels


def render_split(
    preprocess: Preprocess, split: str, n: int, seed: int, workers: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Items 0..n-1 of ``synthetic.dataset(split, n, seed)`` as uint8 [n, 3, S, S], labels [n].

    ``normalize_batch`` of the result equals `preprocess` of the PIL images (checked on item 0).
    Items are independent random streams, so rendering them in `workers` processes gives the
    same tensor as rendering them in one.
    """
    pil_stages, _ = split_preprocess(preprocess)
    bounds = [(start, min(start + _CHUNK, n)) for start in range(0, n, _CHUNK)]
    if workers > 1 and len(bounds) > 1:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as pool:
            futures = [
                pool.submit(_render_chunk, pil_stages, split, seed, a, b) for a, b in bounds
            ]
            parts = [future.result() for future in futures]
    else:
        parts = [_render_chunk(pil_stages, split, seed, a, b) for a, b in bounds]
    images = torch.cat([part[0] for part in parts])  # [n, 3, S, S] uint8
    labels = torch.tensor([label for part in parts for label in part[1]], dtype=torch.long)

    if n:
        reference = preprocess(synthetic.render(0, synthetic.item_rng(split, seed, 0)))
        if not torch.allclose(normalize_batch(images[:1])[0], reference, atol=1e-5):
            raise RuntimeError("uint8 crops + normalize_batch do not reproduce the preprocess")
    return images, labels


def caption_tokens(tokenizer: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
    """Every training caption, tokenized: int64 [num_classes, num_templates, context]."""
    captions = [
        template.format(name)
        for name in synthetic.CLASSES
        for template in synthetic.CAPTION_TEMPLATES
    ]
    tokens = tokenizer(captions)  # [C * T, context]
    return tokens.reshape(len(synthetic.CLASSES), len(synthetic.CAPTION_TEMPLATES), -1)
