"""Metrics of `clipserve eval`: top-k and per-class accuracy, confusion matrix, recall@k.

Pure numpy on predictions or score matrices; nothing here talks to a server, so the unit tests
check every figure on hand-made inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.floating]

#: Rows of a score matrix handled at once by `first_relevant_rank` (bounds its memory).
RANK_CHUNK = 1024


def top_k_indices(scores: FloatArray, k: int) -> IntArray:
    """Column indices of the `k` highest scores of each row, best first: [N, C] -> [N, k].

    Ties go to the lower column index (a stable sort), as the server orders equal cosines.
    """
    k = min(k, scores.shape[1])
    return np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int64)


def top_k_accuracy(top_k: IntArray, labels: Sequence[int] | IntArray, k: int) -> float:
    """Fraction of rows whose label is among the first `k` predictions of `top_k` [N, >=k]."""
    predictions = np.asarray(top_k, dtype=np.int64)
    target = np.asarray(labels, dtype=np.int64)
    if predictions.shape[0] != target.shape[0]:
        raise ValueError(f"{predictions.shape[0]} predictions for {target.shape[0]} labels")
    if target.size == 0:
        return 0.0
    hits = (predictions[:, :k] == target[:, None]).any(axis=1)  # [N]
    return float(hits.mean())


def confusion_matrix(
    labels: Sequence[int] | IntArray, predictions: Sequence[int] | IntArray, num_classes: int
) -> IntArray:
    """Counts [num_classes, num_classes]: row = true class, column = predicted class."""
    target = np.asarray(labels, dtype=np.int64)
    predicted = np.asarray(predictions, dtype=np.int64)
    if target.shape != predicted.shape:
        raise ValueError(f"{predicted.size} predictions for {target.size} labels")
    for name, values in (("label", target), ("prediction", predicted)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"a {name} is outside 0..{num_classes - 1}")
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (target, predicted), 1)
    return matrix


@dataclass(frozen=True)
class ClassAccuracy:
    """Top-1 of one class: `correct` of its `n` images (accuracy None when it has none)."""

    n: int
    correct: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.n if self.n else None


def per_class_accuracy(confusion: IntArray) -> list[ClassAccuracy]:
    """Per true class (row of the confusion matrix): images and correct top-1 predictions."""
    totals = confusion.sum(axis=1)
    return [
        ClassAccuracy(int(n), int(c)) for n, c in zip(totals, np.diag(confusion), strict=True)
    ]


def first_relevant_rank(
    queries: FloatArray,
    gallery: FloatArray,
    query_keys: Sequence[int] | IntArray,
    gallery_keys: Sequence[int] | IntArray,
    *,
    chunk: int = RANK_CHUNK,
) -> IntArray:
    """Per query, the 0-based rank of its best relevant gallery item by dot product.

    `queries` [Q, D] and `gallery` [G, D] are embeddings; gallery item g is relevant to query q
    when ``query_keys[q] == gallery_keys[g]`` (e.g. an image index and the image index of each
    caption). The rank counts gallery items scoring strictly higher than the best relevant one,
    so equal scores do not push a relevant item down. A query with no relevant item gets rank G
    (never retrieved). Rows are scored `chunk` at a time, so memory stays [chunk, G].
    """
    q_keys = np.asarray(query_keys, dtype=np.int64)
    g_keys = np.asarray(gallery_keys, dtype=np.int64)
    if q_keys.shape[0] != queries.shape[0] or g_keys.shape[0] != gallery.shape[0]:
        raise ValueError("one key per query and per gallery item is needed")
    ranks = np.empty(queries.shape[0], dtype=np.int64)
    gallery_t = np.ascontiguousarray(gallery.T)  # [D, G]
    for start in range(0, queries.shape[0], chunk):
        stop = min(start + chunk, queries.shape[0])
        scores = queries[start:stop] @ gallery_t  # [q, G]
        relevant = q_keys[start:stop, None] == g_keys[None, :]  # [q, G]
        best = np.where(relevant, scores, -np.inf).max(axis=1, initial=-np.inf)  # [q]
        ranks[start:stop] = (scores > best[:, None]).sum(axis=1)
        ranks[start:stop][np.isneginf(best)] = gallery.shape[0]
    return ranks


def recall_at(ranks: IntArray, ks: Sequence[int]) -> dict[int, float]:
    """Recall@k for each k: the fraction of queries whose first relevant item ranks below k."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return {k: 0.0 for k in ks}
    return {k: float((ranks < k).mean()) for k in ks}
