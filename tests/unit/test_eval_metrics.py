"""Metrics of `clipserve eval` on hand-made predictions and score matrices."""

from __future__ import annotations

import numpy as np
import pytest

from clipserve.clients.eval_metrics import (
    ClassAccuracy,
    confusion_matrix,
    first_relevant_rank,
    per_class_accuracy,
    recall_at,
    top_k_accuracy,
    top_k_indices,
)

# 4 images x 3 classes; true classes 0, 1, 2, 2.
SCORES = np.array(
    [
        [0.9, 0.1, 0.0],  # ranking 0, 1, 2: top-1 hit
        [0.5, 0.4, 0.1],  # 0, 1, 2: label 1 second
        [0.2, 0.3, 0.1],  # 1, 0, 2: label 2 last
        [0.3, 0.3, 0.3],  # tie: 0, 1, 2 (lower index first)
    ]
)
LABELS = [0, 1, 2, 2]


def test_top_k_indices_best_first_ties_to_lower_index() -> None:
    assert top_k_indices(SCORES, 2).tolist() == [[0, 1], [0, 1], [1, 0], [0, 1]]
    assert top_k_indices(SCORES, 5).shape == (4, 3)  # k is capped at the class count


def test_top_k_accuracy() -> None:
    ranked = top_k_indices(SCORES, 3)
    assert top_k_accuracy(ranked, LABELS, 1) == 0.25
    assert top_k_accuracy(ranked, LABELS, 2) == 0.5
    assert top_k_accuracy(ranked, LABELS, 3) == 1.0
    assert top_k_accuracy(np.zeros((0, 3), dtype=np.int64), [], 1) == 0.0
    with pytest.raises(ValueError, match="predictions for"):
        top_k_accuracy(ranked, LABELS[:3], 1)


def test_confusion_matrix_rows_true_columns_predicted() -> None:
    predictions = top_k_indices(SCORES, 1)[:, 0]  # 0, 0, 1, 0
    confusion = confusion_matrix(LABELS, predictions, 3)
    assert confusion.tolist() == [[1, 0, 0], [1, 0, 0], [1, 1, 0]]
    assert confusion.sum() == len(LABELS)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 3], [0, 0], 3)
    with pytest.raises(ValueError, match="predictions for"):
        confusion_matrix([0, 1], [0], 3)


def test_per_class_accuracy() -> None:
    confusion = np.array([[3, 1, 0], [0, 0, 0], [2, 0, 2]])
    per_class = per_class_accuracy(confusion)
    assert per_class == [ClassAccuracy(4, 3), ClassAccuracy(0, 0), ClassAccuracy(4, 2)]
    assert [c.accuracy for c in per_class] == [0.75, None, 0.5]


def _unit(rows: list[list[float]]) -> np.ndarray:
    array = np.asarray(rows, dtype=np.float64)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def test_first_relevant_rank_one_to_one() -> None:
    # queries and gallery as dot products: q0 best matches g0, q1 matches g0 better than g1.
    queries = np.array([[1.0, 0.0], [0.6, 0.4]])
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    ranks = first_relevant_rank(queries, gallery, [0, 1], [0, 1, 2])
    # q1 scores: g0 0.6, g1 0.4, g2 0.5 -> g1 ranks third (index 2)
    assert ranks.tolist() == [0, 2]


def test_first_relevant_rank_several_relevant_takes_the_best() -> None:
    # image->text with two captions per image: image 0 owns captions 0 and 2.
    images = np.eye(3)[:2]  # [2, 3]
    captions = _unit([[0.1, 1.0, 0.0], [0.0, 1.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.2, 1.0]])
    ranks = first_relevant_rank(images, captions, [0, 1], [0, 1, 0, 1])
    # image 0: caption 2 scores highest of all -> rank 0; image 1: caption 1 (1.0) is first.
    assert ranks.tolist() == [0, 0]
    # text->image: caption 0 ([0.1, 1.0]) is closer to image 1 than to its own image 0.
    ranks = first_relevant_rank(captions, images, [0, 1, 0, 1], [0, 1])
    assert ranks.tolist() == [1, 0, 0, 0]


def test_first_relevant_rank_ties_and_missing() -> None:
    queries = np.array([[1.0, 0.0]])
    gallery = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # the relevant item ties with another: not pushed down
    assert first_relevant_rank(queries, gallery, [7], [3, 7, 3]).tolist() == [0]
    # no relevant item: rank = gallery size, a miss at every k
    assert first_relevant_rank(queries, gallery, [9], [3, 7, 3]).tolist() == [3]
    with pytest.raises(ValueError, match="one key"):
        first_relevant_rank(queries, gallery, [1, 2], [3, 7, 3])


def test_first_relevant_rank_chunking_changes_nothing() -> None:
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(37, 8))
    gallery = rng.normal(size=(50, 8))
    query_keys = rng.integers(0, 10, size=37)
    gallery_keys = rng.integers(0, 10, size=50)
    whole = first_relevant_rank(queries, gallery, query_keys, gallery_keys, chunk=1000)
    assert np.array_equal(first_relevant_rank(queries, gallery, query_keys, gallery_keys,
                                              chunk=4), whole)
    # brute force
    scores = queries @ gallery.T
    for q in range(37):
        relevant = gallery_keys == query_keys[q]
        expected = (scores[q] > scores[q][relevant].max()).sum() if relevant.any() else 50
        assert whole[q] == expected


def test_recall_at() -> None:
    ranks = np.array([0, 1, 4, 9, 10, 50])
    assert recall_at(ranks, (1, 5, 10)) == {1: 1 / 6, 5: 3 / 6, 10: 4 / 6}
    assert recall_at(np.array([], dtype=np.int64), (1,)) == {1: 0.0}
