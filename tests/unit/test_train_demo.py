"""The demo training script's shortcuts compute what open_clip computes; a tiny run works."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from clipserve import synthetic

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from clipserve.export import train_demo  # noqa: E402
from clipserve.export.demo_data import (  # noqa: E402
    caption_tokens,
    normalize_batch,
    render_split,
)
from clipserve.export.models import DEMO_MODEL, register_builtin_configs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fresh() -> tuple[Any, Any, Any]:
    """A randomly initialised demo model (fixed patch embedding), its preprocess, tokenizer."""
    register_builtin_configs()
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(DEMO_MODEL, load_weights=False)
    model.eval()
    train_demo.init_patch_embedding(model.visual)
    return model, preprocess, open_clip.get_tokenizer(DEMO_MODEL)


def test_uint8_crops_reproduce_the_preprocess(fresh: tuple[Any, Any, Any]) -> None:
    _, preprocess, _ = fresh
    images, labels = render_split(preprocess, "heldout", 3, seed=5)
    assert images.dtype == torch.uint8
    assert tuple(images.shape) == (3, 3, 224, 224)
    assert labels.tolist() == [0, 1, 2]
    for i, (image, _) in enumerate(synthetic.dataset("heldout", 3, 5)):
        assert torch.allclose(normalize_batch(images[i:i + 1])[0], preprocess(image), atol=1e-5)


def test_patch_features_shortcut_equals_the_full_vision_tower(fresh: tuple[Any, Any, Any]) -> None:
    model, preprocess, _ = fresh
    images, _ = render_split(preprocess, "heldout", 2, seed=6)
    patches = train_demo.patch_features(model.visual, images)  # [2, 2, width, 7, 7]
    assert tuple(patches.shape) == (2, 2, 64, 7, 7)
    with torch.no_grad():
        plain = model.encode_image(normalize_batch(images))
        mirrored = model.encode_image(normalize_batch(images.flip(-1)))
        with train_demo.patches_as_input(model.visual):
            assert torch.allclose(model.encode_image(patches[:, 0]), plain, atol=1e-5)
            assert torch.allclose(model.encode_image(patches[:, 1]), mirrored, atol=1e-5)
    assert not model.visual.conv1.weight.requires_grad
    assert isinstance(model.visual.conv1, torch.nn.Conv2d)  # restored


def test_short_text_and_compact_vocab_equal_encode_text(fresh: tuple[Any, Any, Any]) -> None:
    model, _, tokenizer = fresh
    tokens = caption_tokens(tokenizer)  # [C, T, 77]
    sample = tokens[:5, :3].reshape(-1, tokens.shape[-1])  # [15, 77]
    with torch.no_grad():
        expected = model.encode_text(sample, normalize=True)
        vocab = train_demo.CompactVocab(model, tokens)
        try:
            compact = vocab.remap(sample)
            length = int((compact != 0).sum(dim=-1).max())
            assert torch.allclose(train_demo.encode_text_short(model, compact[:, :length]),
                                  expected, atol=1e-5)
            with pytest.raises(ValueError, match="outside"):
                vocab.remap(tokenizer(["zebra"]))
        finally:
            vocab.restore()
        assert torch.allclose(model.encode_text(sample, normalize=True), expected)


def test_clip_loss_equals_open_clips_when_classes_differ() -> None:
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(20.0)
    ours = train_demo.clip_loss(image, text, scale, torch.arange(8))
    assert torch.allclose(ours, open_clip.ClipLoss()(image, text, scale))
    # Captions 0 and 1 swapped: wrong pairs, unless items 0 and 1 are of one class, where
    # either caption is a positive of either image.
    swapped = torch.cat([image[1:2], image[0:1], image[2:]])
    same_class = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])
    assert train_demo.clip_loss(image, swapped, scale, same_class) < train_demo.clip_loss(
        image, swapped, scale, torch.arange(8)
    )


def test_tiny_training_run_writes_an_open_clip_checkpoint(tmp_path: Path) -> None:
    output = tmp_path / "demo.safetensors"
    args = train_demo.parse_args([
        "--output", str(output), "--steps", "3", "--batch-size", "36",
        "--images-per-class", "1", "--eval-images", "0", "--workers", "1", "--warmup", "1",
    ])
    before = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    summary = train_demo.train(args)
    assert (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()) == before
    assert summary["checkpoint_bytes"] == output.stat().st_size <= 10 * 1000 * 1000
    model = open_clip.create_model(DEMO_MODEL, pretrained=str(output))
    assert all(p.dtype == torch.float32 for p in model.parameters())
