"""`clipserve eval` as a subprocess against a real server on the tiny model (random weights).

The figures of a random model are meaningless, so these tests check the command's contract:
the JSON fields, the PNG, the progress and throughput lines, the exit codes, and that an
ImageFolder copy of the generated set gives exactly the predictions of the generated run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from clipserve import synthetic

N_CLASSES = len(synthetic.CLASSES)
SEED = 5


def _eval(address: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clipserve", "eval", *args, "--address", address,
         "--batch-size", "16", "--concurrency", "2"],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.fixture(scope="module")
def generated_run(address: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One zero-shot run over 2 x 36 generated images, with its outputs."""
    out = tmp_path_factory.mktemp("eval")
    proc = _eval(address, "zero-shot", "--generated", str(2 * N_CLASSES), "--seed", str(SEED),
                 "--output", str(out / "results.json"),
                 "--confusion-png", str(out / "confusion.png"))
    assert proc.returncode == 0, proc.stderr
    return {"proc": proc, "json": json.loads((out / "results.json").read_text()), "dir": out}


def test_zero_shot_json_fields(generated_run: dict[str, Any]) -> None:
    result = generated_run["json"]
    n = 2 * N_CLASSES
    assert result["task"] == "zero-shot"
    assert result["model"]["name"]
    assert result["dataset"] == {"source": "generated", "split": "heldout", "seed": SEED, "n": n,
                                 "images": n}
    assert result["classes"] == N_CLASSES
    assert result["class_names"] == synthetic.CLASSES
    assert result["templates"]["source"] == "synthetic"
    assert result["templates"]["templates"] == list(synthetic.ZERO_SHOT_TEMPLATES)
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
    assert result["labels"] == [i % N_CLASSES for i in range(n)]
    assert len(result["predictions"]) == n
    assert all(0 <= p < N_CLASSES for p in result["predictions"])
    correct = sum(p == t for p, t in zip(result["predictions"], result["labels"], strict=True))
    assert result["correct"] == correct
    assert result["top1"] == pytest.approx(correct / n)
    assert [c["class"] for c in result["per_class"]] == synthetic.CLASSES
    assert all(c["images"] == 2 for c in result["per_class"])
    assert sum(c["correct"] for c in result["per_class"]) == correct
    confusion = result["confusion"]
    assert len(confusion) == N_CLASSES
    assert all(len(row) == N_CLASSES for row in confusion)
    assert [sum(row) for row in confusion] == [2] * N_CLASSES
    assert sum(confusion[i][i] for i in range(N_CLASSES)) == correct
    throughput = result["throughput"]
    assert throughput["images"] == n
    assert throughput["images_per_s"] > 0
    assert throughput["batch_size"] == 16
    assert throughput["concurrency"] == 2


def test_zero_shot_prints_summary_progress_and_throughput(generated_run: dict[str, Any]) -> None:
    proc = generated_run["proc"]
    assert "top-1:" in proc.stdout
    assert "top-5:" in proc.stdout
    assert "per-class top-1:" in proc.stdout
    assert "red circle" in proc.stdout
    assert "throughput:" in proc.stdout
    assert "images/s" in proc.stdout
    progress = [line for line in proc.stderr.splitlines() if line.startswith("zero-shot [")]
    assert progress, proc.stderr
    assert progress[-1].split("]")[1].split()[0] == f"{2 * N_CLASSES}/{2 * N_CLASSES}"
    assert "images/s" in progress[-1]


def test_zero_shot_confusion_png(generated_run: dict[str, Any]) -> None:
    path = generated_run["dir"] / "confusion.png"
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        # labelled: every class name needs room beyond the bare 36 x 16 px grid
        assert image.width > 36 * 16 + 100
        assert image.height > 36 * 16 + 100


def test_image_folder_gives_the_generated_predictions(
    address: str, generated_run: dict[str, Any], tmp_path: Path
) -> None:
    """`write_image_folder` holds the very items of the generated run (lossless PNG): the
    folder run, with classes taken from folder names, predicts exactly the same classes."""
    synthetic.write_image_folder(tmp_path / "images", n_per_class=2, seed=SEED)
    proc = _eval(address, "zero-shot", "--images", str(tmp_path / "images"),
                 "--templates", "synthetic", "--no-progress",
                 "--output", str(tmp_path / "folder.json"))
    assert proc.returncode == 0, proc.stderr
    assert "zero-shot [" not in proc.stderr
    folder = json.loads((tmp_path / "folder.json").read_text())
    generated = generated_run["json"]
    # --classes folders: sorted folder names, "blue_circle" -> "blue circle"
    assert folder["class_names"] == sorted(synthetic.CLASSES)
    to_synthetic = [synthetic.CLASSES.index(name) for name in folder["class_names"]]
    by_item = {int(Path(name).stem): (to_synthetic[label], to_synthetic[prediction])
               for name, label, prediction in
               zip(folder["image_names"], folder["labels"], folder["predictions"], strict=True)}
    assert len(by_item) == 2 * N_CLASSES
    for index, (label, prediction) in by_item.items():
        assert label == generated["labels"][index]
        assert prediction == generated["predictions"][index]


def test_retrieval_generated(address: str, tmp_path: Path) -> None:
    proc = _eval(address, "retrieval", "--generated", str(N_CLASSES), "--captions-per-image", "2",
                 "--output", str(tmp_path / "recall.json"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "recall.json").read_text())
    assert result["task"] == "retrieval"
    assert result["dataset"]["images"] == N_CLASSES
    assert result["dataset"]["captions"] == 72
    for direction in ("image_to_text", "text_to_image"):
        recall = result[direction]
        assert list(recall) == ["R@1", "R@5", "R@10"]
        assert 0.0 <= recall["R@1"] <= recall["R@5"] <= recall["R@10"] <= 1.0
        assert list(result["class_level"][direction]) == ["R@1", "R@5", "R@10"]
    assert result["throughput"]["images"]["images_per_s"] > 0
    assert result["throughput"]["texts"]["texts_per_s"] > 0
    assert "image->text" in proc.stdout
    assert "R@10" in proc.stdout
    assert "throughput:" in proc.stdout
    assert "texts/s" in proc.stdout
    assert any(line.startswith("captions [") for line in proc.stderr.splitlines())


def test_retrieval_from_captions_file(address: str, tmp_path: Path) -> None:
    written = synthetic.write_image_folder(tmp_path / "images", n_per_class=1, seed=SEED)
    lines = []
    for path, label in written[:6]:
        name = path.relative_to(tmp_path / "images").as_posix()
        lines += [f"{name}\t{synthetic.CLASSES[label]}", f"{name}\ta photo of a thing"]
    (tmp_path / "captions.tsv").write_text("\n".join(lines) + "\n")
    proc = _eval(address, "retrieval", "--images", str(tmp_path / "images"),
                 "--captions", str(tmp_path / "captions.tsv"), "--no-progress",
                 "--output", str(tmp_path / "recall.json"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "recall.json").read_text())
    assert result["dataset"]["images"] == 6
    assert result["dataset"]["captions"] == 12
    # 6 images: every image and every caption is within the first 10
    assert result["image_to_text"]["R@10"] == 1.0
    assert result["text_to_image"]["R@10"] == 1.0
    assert "class_level" not in result


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["zero-shot", "--images", "/nonexistent/images"], "is not a directory"),
        (["zero-shot", "--generated", "10", "--classes", "imagenet"], "does not name"),
        (["retrieval", "--generated", "4", "--captions", "x.tsv"], "goes with --images"),
    ],
)
def test_bad_usage_exits_2(address: str, args: list[str], message: str) -> None:
    proc = _eval(address, *args, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:")
    assert message in proc.stderr
