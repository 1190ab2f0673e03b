"""Session fixtures shared by every test suite: a tiny open_clip model and its exported repository.

`tiny_repository` is a real `clipserve export` of a tiny CLIP architecture with random weights
(``--pretrained none``, fixed seed): two ONNX towers, tokenizer.json, Triton configs, manifest.
It is built once per session (about 20 s on two CPU cores) and is read-only for the tests.
`tiny_torch_model` is the very same PyTorch model (same seed), the reference for parity checks.

torch and open_clip are imported inside the fixtures, so suites that do not use them stay fast.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TINY_MODEL = "clipserve-test-tiny"
TINY_SEED = 1234
TINY_EMBEDDING_DIM = 32
TINY_IMAGE_SIZE = 224
#: ViT vision tower (224 input, patch 32, width 64, 2 layers) and a text tower with the real CLIP
#: tokenizer (vocabulary 49408, context 77): every serving path of ViT-L-14 at a tiny cost.
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": TINY_EMBEDDING_DIM,
    "vision_cfg": {
        "image_size": TINY_IMAGE_SIZE,
        "layers": 2,
        "width": 64,
        "head_width": 32,
        "patch_size": 32,
    },
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
    },
}


def register_tiny_model(directory: Path) -> str:
    """Register `TINY_MODEL` with open_clip (once per process); return its name."""
    import open_clip

    if TINY_MODEL not in open_clip.list_models():
        path = directory / f"{TINY_MODEL}.json"  # open_clip names a config after its file
        path.write_text(json.dumps(TINY_CONFIG))
        open_clip.add_model_config(path)
    return TINY_MODEL


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The name of the tiny open_clip architecture, registered with open_clip."""
    return register_tiny_model(tmp_path_factory.mktemp("open_clip_configs"))


@pytest.fixture(scope="session")
def tiny_repository(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository exported from the tiny model (random weights, `TINY_SEED`)."""
    from clipserve.export.options import ExportOptions
    from clipserve.export.writer import export_repository

    output = tmp_path_factory.mktemp("tiny") / "model_repository"
    return export_repository(
        ExportOptions(
            model=tiny_model, pretrained="none", seed=TINY_SEED, output=output, max_batch_size=32
        )
    )


@pytest.fixture(scope="session")
def tiny_torch_model(tiny_model: str) -> Any:
    """The PyTorch open_clip model exported into `tiny_repository` (eval mode, fp32, CPU)."""
    from clipserve.export.loader import load_model
    from clipserve.export.options import ExportOptions

    return load_model(ExportOptions(model=tiny_model, pretrained="none", seed=TINY_SEED)).model


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for a module: on a small shared CPU a spinning pool costs more than
    it gives. (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`)"""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
