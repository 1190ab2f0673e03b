"""Model architectures and checkpoints that ship with clipserve.

`clipserve-demo` is a small CLIP trained by `clipserve.export.train_demo` on the generated
shapes-and-colours data of `clipserve.synthetic` (see docs/demo-model.md). It takes the same
input as ViT-L-14: 224 x 224 RGB through open_clip's default preprocessing (OpenAI mean/std,
bicubic shortest-side resize, centre crop) and the CLIP BPE tokenizer (vocabulary 49408, context
77), so it exercises the same serving path as a real model while being small enough to commit.

The architecture is registered with open_clip (`register_builtin_configs`), and its checkpoint
is a plain open_clip safetensors state dict, so both of these work offline::

    open_clip.create_model_and_transforms("clipserve-demo", pretrained=str(builtin_checkpoint(...)))
    clipserve export --model clipserve-demo
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch

logger = logging.getLogger(__name__)

DEMO_MODEL = "clipserve-demo"

DEMO_DIR = Path(__file__).resolve().parent / "demo"
# open_clip names a registered config after its file's stem, so the file is named as the model.
DEMO_CONFIG = DEMO_DIR / f"{DEMO_MODEL}.json"
DEMO_CHECKPOINT = DEMO_DIR / "clipserve_demo.safetensors"

# Built-in model name -> (open_clip config file, committed checkpoint).
_BUILTINS: dict[str, tuple[Path, Path]] = {DEMO_MODEL: (DEMO_CONFIG, DEMO_CHECKPOINT)}

_register_lock = threading.Lock()


def register_builtin_configs() -> None:
    """Register clipserve's architectures with open_clip; calling it again does nothing."""
    with _register_lock:
        known = set(open_clip.list_models())
        for name, (config, _) in _BUILTINS.items():
            if name not in known:
                open_clip.add_model_config(config)
                logger.debug("registered open_clip model config %s from %s", name, config)


def builtin_checkpoint(name: str) -> Path | None:
    """The committed checkpoint of a built-in model, or None if `name` has none."""
    entry = _BUILTINS.get(name)
    if entry is None or not entry[1].is_file():
        return None
    return entry[1]


def load_demo_model(
    checkpoint: Path | str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, Callable[[Any], torch.Tensor]]:
    """Load `clipserve-demo` in eval mode with its inference preprocess transform.

    `checkpoint` defaults to the committed one. This is open_clip's own loading
    (``create_model_and_transforms(DEMO_MODEL, pretrained=checkpoint)``): half-precision tensors
    in the file are copied into the float32 model.
    """
    register_builtin_configs()
    path = Path(checkpoint) if checkpoint is not None else builtin_checkpoint(DEMO_MODEL)
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"no {DEMO_MODEL} checkpoint at {path or DEMO_CHECKPOINT}: "
            "rebuild it with `python -m clipserve.export.train_demo --output FILE`"
        )
    model, _, preprocess = open_clip.create_model_and_transforms(
        DEMO_MODEL, pretrained=str(path), device=device
    )
    model.eval()
    return model, preprocess
