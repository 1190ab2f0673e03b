"""The committed `clipserve-demo` checkpoint: loadable by open_clip, small, and accurate.

Zero-shot top-1 is measured in process with PyTorch open_clip (its own preprocess transform) on
held-out generated images; `test_demo_served.py` compares the served model with this.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from clipserve import synthetic

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from clipserve.export.demo_eval import zero_shot_eval_torch  # noqa: E402
from clipserve.export.models import (  # noqa: E402
    DEMO_CHECKPOINT,
    DEMO_MODEL,
    builtin_checkpoint,
    load_demo_model,
    register_builtin_configs,
)

MAX_CHECKPOINT_BYTES = 10 * 1000 * 1000
HELDOUT_IMAGES = 28 * len(synthetic.CLASSES)  # 1008
HELDOUT_SEED = 7  # not the seed the training run reports on
MIN_TOP1 = 0.90


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo() -> tuple[Any, Any]:
    if builtin_checkpoint(DEMO_MODEL) is None:
        pytest.fail(f"the committed checkpoint {DEMO_CHECKPOINT} is missing")
    return load_demo_model()


def test_checkpoint_is_committed_and_small() -> None:
    path = builtin_checkpoint(DEMO_MODEL)
    assert path == DEMO_CHECKPOINT
    assert path.stat().st_size <= MAX_CHECKPOINT_BYTES
    assert builtin_checkpoint("ViT-L-14") is None


def test_registration_is_idempotent() -> None:
    register_builtin_configs()
    register_builtin_configs()
    assert open_clip.list_models().count(DEMO_MODEL) == 1


def test_open_clip_loads_the_file_directly() -> None:
    """The exporter's generic `--checkpoint FILE` path: plain open_clip loading, strict."""
    register_builtin_configs()
    model = open_clip.create_model(DEMO_MODEL, pretrained=str(DEMO_CHECKPOINT))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.visual.image_size == (224, 224)
    assert model.context_length == 77
    assert model.vocab_size == 49408


def test_preprocess_is_vit_l_14s(demo: tuple[Any, Any]) -> None:
    model, _ = demo
    cfg = open_clip.get_model_preprocess_cfg(model)
    assert tuple(cfg["size"]) == (224, 224)
    assert tuple(cfg["mean"]) == open_clip.OPENAI_DATASET_MEAN
    assert tuple(cfg["std"]) == open_clip.OPENAI_DATASET_STD
    assert cfg["interpolation"] == "bicubic"
    assert cfg["resize_mode"] == "shortest"
    tokenizer = open_clip.get_tokenizer(DEMO_MODEL)
    assert tokenizer(["a photo of a red circle."]).shape == (1, 77)


def test_logit_scale_is_sane(demo: tuple[Any, Any]) -> None:
    model, _ = demo
    scale = float(model.logit_scale.detach().exp())
    assert math.isfinite(scale)
    assert 10.0 <= scale <= 100.0
    assert model.logit_bias is None


def test_heldout_zero_shot_top1(demo: tuple[Any, Any]) -> None:
    model, preprocess = demo
    tokenizer = open_clip.get_tokenizer(DEMO_MODEL)
    result = zero_shot_eval_torch(model, preprocess, tokenizer, HELDOUT_IMAGES, HELDOUT_SEED)
    print(f"\nin-process zero-shot top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f} "
          f"on {result['n']} images")
    assert result["n"] == HELDOUT_IMAGES >= 1000
    assert result["num_classes"] == len(synthetic.CLASSES) >= 24
    assert sorted(set(result["labels"])) == list(range(len(synthetic.CLASSES)))
    assert result["top1"] >= MIN_TOP1
    assert result["top5"] >= result["top1"]
