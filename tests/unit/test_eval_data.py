"""`clipserve eval` without a server: built-in data, data sources, batching, progress, the plot,
and the zero-shot bookkeeping against a fake client (no sockets)."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from clipserve import synthetic
from clipserve.clients import eval_data, evaluation
from clipserve.clients.eval_data import DataError
from clipserve.clients.eval_plot import LABELLED_MAX_CLASSES, confusion_image
from clipserve.clients.progress import ProgressBar
from clipserve.clients.types import BatchingInfo, LabelScore, ModelInfo

ROOT = Path(__file__).resolve().parents[2]


# ---- built-in lists ----------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="needs open_clip")
def test_builtin_data_files_are_what_the_script_makes_from_open_clip() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_eval_metadata.py"), "--check"],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_builtin_lists() -> None:
    classes = eval_data.imagenet_classes()
    templates = eval_data.openai_templates()
    assert len(classes) == 1000
    assert classes[0] == "tench"
    assert classes[-1] == "toilet paper"
    assert len(templates) == 80
    assert templates[0] == "a bad photo of a {}."
    assert all(t.count("{}") == 1 for t in templates)
    assert eval_data.resolve_templates("openai") == ("openai", templates)
    assert eval_data.resolve_templates("model") == ("model", None)
    assert eval_data.resolve_class_names("imagenet", None) == classes


def test_templates_and_classes_from_files(tmp_path: Path) -> None:
    path = tmp_path / "templates.txt"
    path.write_text("a photo of a {}.\n\n  itap of a {}.  \n")
    assert eval_data.resolve_templates(str(path)) == (str(path), ["a photo of a {}.",
                                                                  "itap of a {}."])
    path.write_text("no placeholder\n")
    with pytest.raises(DataError, match="exactly one"):
        eval_data.resolve_templates(str(path))
    with pytest.raises(DataError, match="cannot read"):
        eval_data.resolve_class_names(str(tmp_path / "missing.txt"), None)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match="is empty"):
        eval_data.resolve_class_names(str(tmp_path / "empty.txt"), None)
    with pytest.raises(DataError, match="needs --images"):
        eval_data.resolve_class_names("folders", None)


def test_unique_labels_keeps_first_occurrence() -> None:
    labels, members = eval_data.unique_labels(["a", "b", "a", "c", "b"])
    assert labels == ["a", "b", "c"]
    assert members == [[0, 2], [1, 4], [3]]
    # ImageNet's two shared names
    labels, members = eval_data.unique_labels(eval_data.imagenet_classes())
    assert len(labels) == 998
    assert sorted(m for m in members if len(m) > 1) == [[657, 744], [836, 837]]


# ---- image sources -----------------------------------------------------------------------------


def test_folder_classes_by_name_or_by_position() -> None:
    names = ["red circle", "blue star", "green cross"]
    # every folder names a class: by name, whatever the order
    assert eval_data.folder_classes(["blue_star", "green_cross", "red_circle"], names) == [1, 2, 0]
    assert eval_data.folder_classes(["blue_star"], names) == [1]
    # WordNet ids: by sorted position
    assert eval_data.folder_classes(["n01", "n02", "n03"], names) == [0, 1, 2]
    with pytest.raises(DataError, match="2 class folders but 3 class names"):
        eval_data.folder_classes(["n01", "n02"], names)


def test_image_folder_zero_shot(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for folder, files in {"n02": ["b.JPEG", "a.png", "notes.txt"], "n01": ["x.jpg"]}.items():
        (root / folder).mkdir(parents=True)
        for name in files:
            (root / folder / name).write_bytes(name.encode())
    (root / "n01" / "nested").mkdir()
    (root / "n01" / "nested" / "y.webp").write_bytes(b"y")
    classes = tmp_path / "classes.txt"
    classes.write_text("goldfish\nshark\n")
    data = eval_data.image_folder_zero_shot(root, str(classes))
    assert data.class_names == ["goldfish", "shark"]
    names = [data.images.name(i) for i in range(len(data.images))]
    assert names == ["n01/nested/y.webp", "n01/x.jpg", "n02/a.png", "n02/b.JPEG"]
    assert data.labels == [0, 0, 1, 1]
    assert data.images.load(3) == b"b.JPEG"
    folders = eval_data.image_folder_zero_shot(root, "folders")
    assert folders.class_names == ["n01", "n02"]
    with pytest.raises(DataError, match="not a directory"):
        eval_data.image_folder_zero_shot(tmp_path / "nope", "folders")


def test_generated_images_are_the_synthetic_dataset() -> None:
    data = eval_data.generated_zero_shot(4, seed=3)
    expected = list(synthetic.dataset("heldout", 4, 3))
    assert data.labels == [label for _, label in expected]
    for i, (image, _) in enumerate(expected):
        loaded = data.images.load(i)
        assert isinstance(loaded, bytes)
        with Image.open(io.BytesIO(loaded)) as decoded:
            assert decoded.format == "BMP"
            assert np.array_equal(np.asarray(decoded), np.asarray(image))
    with pytest.raises(DataError, match="does not name"):
        eval_data.generated_zero_shot(4, 0, "imagenet")


def test_spread_subset_reaches_every_part() -> None:
    data = eval_data.generated_zero_shot(100, seed=0)
    subset = eval_data.spread_subset(data, 5)
    assert [subset.images.name(i) for i in range(5)] == [data.images.name(i) for i in
                                                         (0, 25, 50, 74, 99)]
    assert subset.labels == [data.labels[i] for i in (0, 25, 50, 74, 99)]
    assert eval_data.spread_subset(data, 500) is data


def test_read_captions(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"x")
    tsv = tmp_path / "captions.tsv"
    tsv.write_text("# comment\nb.png\ta dog\na.png\ta cat\nb.png\t a puppy \n")
    data = eval_data.read_captions(tmp_path, tsv)
    assert [data.images.name(i) for i in range(len(data.images))] == ["b.png", "a.png"]
    assert data.captions == ["a dog", "a cat", "a puppy"]
    assert data.image_of_caption == [0, 1, 0]
    tsv.write_text("a.png a cat without a tab\n")
    with pytest.raises(DataError, match=r"captions.tsv:1: expected"):
        eval_data.read_captions(tmp_path, tsv)
    tsv.write_text("c.png\ta cow\n")
    with pytest.raises(DataError, match="no image"):
        eval_data.read_captions(tmp_path, tsv)


def test_generated_retrieval_is_deterministic() -> None:
    first = eval_data.generated_retrieval(5, seed=1, captions_per_image=2)
    again = eval_data.generated_retrieval(5, seed=1, captions_per_image=2)
    assert first.captions == again.captions
    assert first.image_of_caption == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert first.image_classes == [0, 1, 2, 3, 4]
    for caption, image in zip(first.captions, first.image_of_caption, strict=True):
        assert synthetic.CLASSES[image] in caption


# ---- batching, progress, plot -------------------------------------------------------------------


def test_run_batches_keeps_order_and_reports_progress() -> None:
    done: list[int] = []
    lock = threading.Lock()

    def on_done(count: int) -> None:
        with lock:
            done.append(count)

    results = evaluation.run_batches(10, 3, 2, lambda r: list(r), on_done)
    assert results == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert sorted(done) == [1, 3, 3, 3]


def test_run_batches_raises_the_first_failure() -> None:
    def work(indices: range) -> int:
        if indices.start == 6:
            raise RuntimeError("boom")
        return indices.start

    with pytest.raises(RuntimeError, match="boom"):
        evaluation.run_batches(30, 3, 2, work, lambda _: None)


def test_progress_bar_writes_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    bar = ProgressBar("zero-shot", 100, "images", stream)
    for _ in range(20):
        bar.advance(5)
    bar.close()
    bar.close()  # once only
    lines = stream.getvalue().splitlines()
    assert 5 <= len(lines) <= 12
    assert lines[-1].startswith("zero-shot [" + "#" * 28 + "] 100/100 images")
    assert "images/s" in lines[-1]
    assert "\r" not in stream.getvalue()


def test_confusion_image_labelled_and_plain() -> None:
    names = [f"class {i}" for i in range(12)]
    confusion = np.diag(np.arange(1, 13))
    confusion[0, 1] = 4
    labelled = confusion_image(confusion, names, "title")
    assert labelled.mode == "RGB"
    assert labelled.width > 12 * 16
    assert labelled.height > 12 * 16
    big = LABELLED_MAX_CLASSES + 150
    plain = confusion_image(np.eye(big, dtype=np.int64), [str(i) for i in range(big)])
    assert plain.width >= big
    assert plain.height >= big
    with pytest.raises(ValueError, match="square"):
        confusion_image(confusion, names[:3])


# ---- zero-shot against a fake client ------------------------------------------------------------


class FakeClient:
    """Classify from a fixed score table: image i (its class index) scores each label."""

    def __init__(self, scores: dict[str, list[float]]) -> None:
        self.scores = scores
        self.calls: list[tuple[int, list[str], int | None]] = []

    def info(self) -> ModelInfo:
        batching = BatchingInfo(8, 0, 64, (1, 8), ())
        return ModelInfo("fake", "none", 4, 224, 77, "fp32", "CPU", batching, batching, 100.0,
                         0.0, ("{}",), "0", (0.5,) * 3, (0.5,) * 3, "bicubic", "shortest",
                         3, 100)

    def classify(self, images: list[Any], labels: list[str], *, templates: Any = None,
                 top_k: int | None = None) -> list[list[LabelScore]]:
        self.calls.append((len(images), list(labels), top_k))
        out = []
        for image in images:
            row = [self.scores[label][image] for label in labels]
            order = sorted(range(len(labels)), key=lambda i: (-row[i], i))[:top_k]
            out.append([LabelScore(labels[i], i, 0.0, row[i]) for i in order])
        return out


class IndexImages:
    """Image i is the integer i (the fake client scores by it)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def name(self, index: int) -> str:
        return str(index)

    def load(self, index: int) -> Any:
        return index


def test_zero_shot_sends_shared_names_once_and_expands_them() -> None:
    # classes: 0 "cat", 1 "dog", 2 "cat" (shared), 3 "car"; images 0..4 with labels below.
    class_names = ["cat", "dog", "cat", "car"]
    scores = {"cat": [0.9, 0.1, 0.8, 0.2, 0.3], "dog": [0.1, 0.9, 0.1, 0.1, 0.2],
              "car": [0.0, 0.0, 0.0, 0.9, 0.1]}
    data = eval_data.ZeroShotData(IndexImages(5), [0, 1, 2, 3, 1], class_names)
    client = FakeClient(scores)
    result = evaluation.zero_shot(client, data, ["{}"], batch_size=10, concurrency=2,  # type: ignore[arg-type]
                                  k=3)
    assert all(labels == ["cat", "dog", "car"] for _, labels, _ in client.calls)
    assert max(n for n, _, _ in client.calls) == 3  # batch capped by max_items_per_request
    # image 4: cat 0.3 > dog 0.2 > car 0.1 -> classes 0, 2 (shared "cat"), 1
    assert result.top_k.tolist() == [[0, 2, 1], [1, 0, 2], [0, 2, 1], [3, 0, 2], [0, 2, 1]]
    assert result.top1 == pytest.approx(3 / 5)  # image 2 (class 2) loses to class 0
    assert result.top5 == 1.0
    summary = result.to_json()
    assert summary["correct"] == 3
    assert summary["per_class"][2]["correct"] == 0
    assert summary["confusion"][2] == [1, 0, 0, 0]
