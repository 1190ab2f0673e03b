"""Evaluation of a running clipserve server: zero-shot classification and image–text retrieval.

Everything goes through the public client (`ClipClient`): zero-shot through ``Classify`` (the
server embeds the prompts, averages them per class, and scores), retrieval through
``EncodeImage`` / ``EncodeText`` and the metrics of `eval_metrics`. So the figures measure the
served model, its preprocessing and tokenizer, not a local copy.

Requests carry `batch_size` images each and `concurrency` of them are in flight at once, so the
server's dynamic batcher stays busy while the client loads (or generates) the next images. The
label embeddings of a zero-shot run are computed once, before timing, by Classify calls that
carry a slice of the classes each: the server keeps them in its label cache (its
``label_cache_size`` must hold every class), and the timed requests then only run the vision
tower.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from . import eval_metrics
from .client import ClipClient
from .eval_data import DataError, ImageSource, RetrievalData, ZeroShotData, unique_labels
from .progress import ProgressFactory, no_progress
from .types import ImageInput, ModelInfo

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_BATCH_SIZE = 64
DEFAULT_CONCURRENCY = 4
#: Prompt texts per label-cache warm-up call (labels x templates).
WARMUP_TEXTS_PER_CALL = 2048
RECALL_KS = (1, 5, 10)
#: Largest class count whose full confusion matrix goes into the JSON result.
CONFUSION_JSON_MAX_CLASSES = 100


@dataclass(frozen=True)
class Throughput:
    """`items` processed in `seconds` of wall time (client loading included)."""

    items: int
    seconds: float
    batch_size: int
    concurrency: int

    @property
    def per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0

    def to_json(self, unit: str) -> dict[str, Any]:
        return {
            unit: self.items,
            "seconds": round(self.seconds, 3),
            f"{unit}_per_s": round(self.per_second, 2),
            "batch_size": self.batch_size,
            "concurrency": self.concurrency,
        }


def run_batches(
    count: int,
    batch_size: int,
    concurrency: int,
    work: Callable[[range], T],
    on_done: Callable[[int], None],
) -> list[T]:
    """Call `work` on consecutive index ranges of ``range(count)``, `concurrency` at a time.

    Returns the results in range order. At most ``2 * concurrency`` ranges are submitted ahead,
    so a large data set is never loaded at once. The first failure cancels what has not started
    and is raised.
    """
    batches = [range(s, min(s + batch_size, count)) for s in range(0, count, batch_size)]
    results: list[T | None] = [None] * len(batches)
    pending: dict[Future[T], int] = {}
    next_batch = 0
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="clipserve-eval") as pool:
        try:
            while next_batch < len(batches) or pending:
                while next_batch < len(batches) and len(pending) < 2 * concurrency:
                    pending[pool.submit(work, batches[next_batch])] = next_batch
                    next_batch += 1
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    position = pending.pop(future)
                    results[position] = future.result()
                    on_done(len(batches[position]))
        finally:
            for future in pending:
                future.cancel()
    return results  # type: ignore[return-value]


def _load(images: ImageSource, indices: range) -> list[ImageInput]:
    return [images.load(i) for i in indices]


# ---- zero-shot -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZeroShotResult:
    """Figures of a zero-shot run; `top_k` [N, k] holds class indices, best first."""

    model: ModelInfo
    data: ZeroShotData
    templates: list[str]
    template_source: str
    labels: npt.NDArray[np.int64]
    top_k: npt.NDArray[np.int64]
    throughput: Throughput
    label_seconds: float

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def k(self) -> int:
        return int(self.top_k.shape[1])

    @property
    def predictions(self) -> npt.NDArray[np.int64]:
        return self.top_k[:, 0]

    @property
    def top1(self) -> float:
        return eval_metrics.top_k_accuracy(self.top_k, self.labels, 1)

    @property
    def top5(self) -> float:
        return eval_metrics.top_k_accuracy(self.top_k, self.labels, 5)

    def confusion(self) -> npt.NDArray[np.int64]:
        return eval_metrics.confusion_matrix(
            self.labels, self.predictions, len(self.data.class_names)
        )

    def to_json(self) -> dict[str, Any]:
        confusion = self.confusion()
        per_class = eval_metrics.per_class_accuracy(confusion)
        names = self.data.class_names
        out: dict[str, Any] = {
            "task": "zero-shot",
            "model": {"name": self.model.model_name, "pretrained": self.model.pretrained},
            "dataset": {**self.data.description, "images": self.n},
            "classes": len(names),
            "templates": {"source": self.template_source, "count": len(self.templates),
                          "templates": self.templates},
            "top1": self.top1,
            "top5": self.top5,
            "top_k": self.k,
            "correct": int((self.predictions == self.labels).sum()),
            "per_class": [
                {"class": names[i], "images": c.n, "correct": c.correct, "accuracy": c.accuracy}
                for i, c in enumerate(per_class)
            ],
            "throughput": self.throughput.to_json("images"),
            "label_embedding_seconds": round(self.label_seconds, 3),
            "class_names": names,
            "image_names": [self.data.images.name(i) for i in range(self.n)],
            "labels": self.labels.tolist(),
            "predictions": self.predictions.tolist(),
        }
        if len(names) <= CONFUSION_JSON_MAX_CLASSES:
            out["confusion"] = confusion.tolist()
        return out


def warm_label_cache(
    client: ClipClient,
    image: ImageInput,
    labels: Sequence[str],
    templates: Sequence[str] | None,
    template_count: int,
    progress: ProgressFactory = no_progress,
) -> float:
    """Have the server embed every label once (it caches them); returns the seconds taken.

    Each call classifies one image against a slice of the labels, about
    `WARMUP_TEXTS_PER_CALL` prompts, so no single call runs long.
    """
    per_call = max(1, WARMUP_TEXTS_PER_CALL // max(template_count, 1))
    bar = progress("label embeddings", len(labels), "labels")
    started = time.monotonic()
    try:
        for start in range(0, len(labels), per_call):
            chunk = labels[start : start + per_call]
            client.classify([image], chunk, templates=templates, top_k=1)
            bar.advance(len(chunk))
    finally:
        bar.close()
    return time.monotonic() - started


def zero_shot(
    client: ClipClient,
    data: ZeroShotData,
    templates: Sequence[str] | None,
    *,
    template_source: str = "",
    batch_size: int = DEFAULT_BATCH_SIZE,
    concurrency: int = DEFAULT_CONCURRENCY,
    k: int = 5,
    progress: ProgressFactory = no_progress,
) -> ZeroShotResult:
    """Classify every image of `data` through the server's Classify; top-1/top-k per image.

    `templates` None uses the server's default templates. Classes that share a name are sent
    once (see `unique_labels`).
    """
    info = client.info()
    batch_size = max(1, min(batch_size, info.max_items_per_request))
    label_names, members = unique_labels(data.class_names)
    if len(label_names) < len(data.class_names):
        shared = [m for m in members if len(m) > 1]
        logger.warning(
            "%d class names are shared by several classes (%s): each is sent once, and the "
            "first class of a shared name takes its predictions",
            len(shared), ", ".join(data.class_names[m[0]] for m in shared[:5]),
        )
    if len(label_names) > info.max_labels:
        raise DataError(
            f"{len(label_names)} classes exceed the server's max_labels ({info.max_labels})"
        )
    used_templates = list(templates) if templates is not None else list(info.default_templates)
    server_k = min(k, len(label_names))

    label_seconds = warm_label_cache(
        client, data.images.load(0), label_names, templates, len(used_templates), progress
    )
    logger.debug("label embeddings of %d classes x %d templates in %.1fs",
                 len(label_names), len(used_templates), label_seconds)

    def classify(indices: range) -> npt.NDArray[np.int64]:
        scores = client.classify(
            _load(data.images, indices), label_names, templates=templates, top_k=server_k
        )
        rows = np.empty((len(indices), min(k, len(data.class_names))), dtype=np.int64)
        for row, ranked in enumerate(scores):
            expanded = [c for score in ranked for c in members[score.index]]
            rows[row] = expanded[: rows.shape[1]]
        return rows

    bar = progress("zero-shot", len(data.images), "images")
    started = time.monotonic()
    try:
        parts = run_batches(len(data.images), batch_size, concurrency, classify, bar.advance)
    finally:
        bar.close()
    seconds = time.monotonic() - started
    return ZeroShotResult(
        model=info,
        data=data,
        templates=used_templates,
        template_source=template_source,
        labels=np.asarray(data.labels, dtype=np.int64),
        top_k=np.concatenate(parts),
        throughput=Throughput(len(data.images), seconds, batch_size, concurrency),
        label_seconds=label_seconds,
    )


# ---- retrieval -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrievalResult:
    """Recall@k both ways; `class_recall` when the data says each image's class."""

    model: ModelInfo
    data: RetrievalData
    image_to_text: dict[int, float]
    text_to_image: dict[int, float]
    class_recall: dict[str, dict[int, float]] | None
    image_throughput: Throughput
    text_throughput: Throughput

    def to_json(self) -> dict[str, Any]:
        def recall(values: dict[int, float]) -> dict[str, float]:
            return {f"R@{k}": value for k, value in values.items()}

        out: dict[str, Any] = {
            "task": "retrieval",
            "model": {"name": self.model.model_name, "pretrained": self.model.pretrained},
            "dataset": {
                **self.data.description,
                "images": len(self.data.images),
                "captions": len(self.data.captions),
            },
            "image_to_text": recall(self.image_to_text),
            "text_to_image": recall(self.text_to_image),
            "throughput": {
                "images": self.image_throughput.to_json("images"),
                "texts": self.text_throughput.to_json("texts"),
            },
        }
        if self.class_recall is not None:
            out["class_level"] = {name: recall(v) for name, v in self.class_recall.items()}
        return out


def encode_images(
    client: ClipClient,
    images: ImageSource,
    *,
    batch_size: int,
    concurrency: int,
    progress: ProgressFactory = no_progress,
) -> tuple[npt.NDArray[np.float32], Throughput]:
    """Embeddings [N, D] of every image of `images` (EncodeImage), with the throughput."""
    bar = progress("images", len(images), "images")
    started = time.monotonic()
    try:
        parts = run_batches(
            len(images), batch_size, concurrency,
            lambda indices: client.encode_image(_load(images, indices)), bar.advance,
        )
    finally:
        bar.close()
    seconds = time.monotonic() - started
    return np.concatenate(parts), Throughput(len(images), seconds, batch_size, concurrency)


def encode_texts(
    client: ClipClient,
    texts: Sequence[str],
    *,
    batch_size: int,
    concurrency: int,
    progress: ProgressFactory = no_progress,
) -> tuple[npt.NDArray[np.float32], Throughput]:
    """Embeddings [N, D] of `texts` (EncodeText), with the throughput."""
    bar = progress("captions", len(texts), "texts")
    started = time.monotonic()
    try:
        parts = run_batches(
            len(texts), batch_size, concurrency,
            lambda indices: client.encode_text([texts[i] for i in indices]), bar.advance,
        )
    finally:
        bar.close()
    seconds = time.monotonic() - started
    return np.concatenate(parts), Throughput(len(texts), seconds, batch_size, concurrency)


def retrieval(
    client: ClipClient,
    data: RetrievalData,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    concurrency: int = DEFAULT_CONCURRENCY,
    ks: Sequence[int] = RECALL_KS,
    progress: ProgressFactory = no_progress,
) -> RetrievalResult:
    """Image->text and text->image recall@k of the served embeddings.

    Image->text: an image query is a hit at k when any of its captions is among the k captions
    closest to it; text->image: a caption is a hit when its image is among the k closest images.
    """
    info = client.info()
    batch_size = max(1, min(batch_size, info.max_items_per_request))
    image_embeddings, image_rate = encode_images(
        client, data.images, batch_size=batch_size, concurrency=concurrency, progress=progress
    )  # [N_images, D]
    text_embeddings, text_rate = encode_texts(
        client, data.captions, batch_size=batch_size, concurrency=concurrency, progress=progress
    )  # [N_captions, D]
    image_keys = np.arange(len(data.images), dtype=np.int64)
    caption_keys = np.asarray(data.image_of_caption, dtype=np.int64)
    image_to_text = eval_metrics.recall_at(
        eval_metrics.first_relevant_rank(image_embeddings, text_embeddings, image_keys,
                                         caption_keys), ks)
    text_to_image = eval_metrics.recall_at(
        eval_metrics.first_relevant_rank(text_embeddings, image_embeddings, caption_keys,
                                         image_keys), ks)
    class_recall = None
    if data.image_classes is not None:
        image_class = np.asarray(data.image_classes, dtype=np.int64)
        caption_class = image_class[caption_keys]
        class_recall = {
            "image_to_text": eval_metrics.recall_at(eval_metrics.first_relevant_rank(
                image_embeddings, text_embeddings, image_class, caption_class), ks),
            "text_to_image": eval_metrics.recall_at(eval_metrics.first_relevant_rank(
                text_embeddings, image_embeddings, caption_class, image_class), ks),
        }
    return RetrievalResult(
        model=info,
        data=data,
        image_to_text=image_to_text,
        text_to_image=text_to_image,
        class_recall=class_recall,
        image_throughput=image_rate,
        text_throughput=text_rate,
    )
