"""clipserve.synthetic: deterministic, disjoint, balanced, varied (numpy + Pillow only)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipserve import synthetic


def _digest(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes() + repr(image.size).encode()).hexdigest()


def test_classes_are_shapes_times_colours() -> None:
    assert len(synthetic.CLASSES) >= 24
    assert len(set(synthetic.CLASSES)) == len(synthetic.CLASSES)
    assert synthetic.CLASSES[0] == "red circle"
    for index, name in enumerate(synthetic.CLASSES):
        shape, colour = synthetic.shape_and_colour(index)
        assert name == f"{colour} {shape}"


def test_same_seed_same_bytes() -> None:
    first = [_digest(image) for image, _ in synthetic.dataset("heldout", 8, seed=3)]
    second = [_digest(image) for image, _ in synthetic.dataset("heldout", 8, seed=3)]
    other_seed = [_digest(image) for image, _ in synthetic.dataset("heldout", 8, seed=4)]
    assert first == second
    assert not set(first) & set(other_seed)


def test_item_does_not_depend_on_n() -> None:
    short = [_digest(image) for image, _ in synthetic.dataset("train", 3, seed=0)]
    long = [_digest(image) for image, _ in synthetic.dataset("train", 6, seed=0)]
    assert long[:3] == short


def test_same_bytes_in_a_fresh_interpreter() -> None:
    """Nothing process-specific (hash seeds, import order) leaks into the images."""
    code = (
        "import hashlib; from clipserve import synthetic; "
        "print(hashlib.sha256(b''.join(i.tobytes() for i, _ in "
        "synthetic.dataset('heldout', 2, 5))).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    expected = hashlib.sha256(
        b"".join(image.tobytes() for image, _ in synthetic.dataset("heldout", 2, 5))
    ).hexdigest()
    assert out.stdout.strip() == expected


def test_splits_are_disjoint() -> None:
    n = 2 * len(synthetic.CLASSES)
    train = {_digest(image) for image, _ in synthetic.dataset("train", n, seed=0)}
    heldout = {_digest(image) for image, _ in synthetic.dataset("heldout", n, seed=0)}
    assert len(train) == n
    assert len(heldout) == n
    assert not train & heldout


def test_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown split"):
        next(synthetic.dataset("test", 1))


def test_classes_are_balanced_and_covered() -> None:
    labels = [label for _, label in synthetic.dataset("heldout", 2 * len(synthetic.CLASSES))]
    counts = np.bincount(labels, minlength=len(synthetic.CLASSES))
    assert counts.tolist() == [2] * len(synthetic.CLASSES)


def test_images_vary_in_size_and_stay_in_range() -> None:
    sizes = [image.size for image, _ in synthetic.dataset("train", 24, seed=1)]
    assert len(set(sizes)) > 10
    assert any(w != h for w, h in sizes)
    for width, height in sizes:
        assert synthetic.MIN_SIDE <= width <= synthetic.MAX_SIDE
        assert synthetic.MIN_SIDE <= height <= synthetic.MAX_SIDE


def test_shape_colour_dominates_the_centre_crop() -> None:
    """The shape lies in the centre square, and its pixels are near the class colour."""
    for class_index in range(len(synthetic.CLASSES)):
        rng = np.random.default_rng(class_index)
        image = synthetic.render(class_index, rng, size=(360, 240))
        pixels = np.asarray(image, dtype=np.float32)  # [H, W, 3]
        _, colour = synthetic.shape_and_colour(class_index)
        reference = np.asarray(synthetic.COLOURS[colour], dtype=np.float32)
        near = np.linalg.norm(pixels - reference, axis=-1) < 60  # [H, W]
        assert near.sum() > 0.02 * 240 * 240
        # Nothing of the shape outside the centre 240 x 240 square (60 px each side).
        assert near[:, :60].sum() + near[:, 300:].sum() < 0.002 * near.sum() + 5


def test_render_size_and_mode() -> None:
    image = synthetic.render(5, np.random.default_rng(0), size=(321, 207))
    assert image.mode == "RGB"
    assert image.size == (321, 207)
    with pytest.raises(ValueError, match="out of range"):
        synthetic.render(len(synthetic.CLASSES), np.random.default_rng(0))


def test_captions_name_the_class() -> None:
    rng = np.random.default_rng(0)
    captions = {synthetic.caption(7, rng) for _ in range(200)}
    assert len(captions) > 5
    assert all(synthetic.CLASSES[7] in text for text in captions)
    for template in (*synthetic.CAPTION_TEMPLATES, *synthetic.ZERO_SHOT_TEMPLATES):
        assert template.count("{}") == 1


def test_write_image_folder_matches_dataset(tmp_path: Path) -> None:
    written = synthetic.write_image_folder(tmp_path, n_per_class=1, seed=2)
    assert len(written) == len(synthetic.CLASSES)
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert folders == sorted(synthetic.folder_name(c) for c in synthetic.CLASSES)
    for (path, label), (image, expected) in zip(
        written, synthetic.dataset("heldout", len(synthetic.CLASSES), 2), strict=True
    ):
        assert label == expected
        assert synthetic.class_name_from_folder(path.parent.name) == synthetic.CLASSES[label]
        with Image.open(path) as saved:
            assert saved.size == image.size
            assert saved.convert("RGB").tobytes() == image.tobytes()


def test_no_torch_import() -> None:
    code = "import sys, clipserve.synthetic; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "False"
