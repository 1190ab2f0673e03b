"""LabelCache: per-label and per-set LRU levels, each bounded in rows."""

from __future__ import annotations

import numpy as np
import pytest

from clipserve.server.label_cache import LabelCache

T = ("a photo of a {}.",)


def rows(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + n * 4, dtype=np.float32).reshape(n, 4)


def test_a_set_comes_back_whole_and_read_only() -> None:
    cache = LabelCache(10)
    key = (T, ("cat", "dog"))
    assert cache.get_set(key) is None
    kept = cache.put_set(key, rows(2))
    got = cache.get_set(key)
    assert got is kept
    assert cache.hits == 2  # one per label
    with pytest.raises(ValueError, match="read-only"):
        got[0, 0] = 1.0


def test_sets_are_evicted_least_recent_first_by_rows() -> None:
    cache = LabelCache(5)
    a, b, c = (T, ("a", "b")), (T, ("c", "d")), (T, ("e", "f"))
    cache.put_set(a, rows(2))
    cache.put_set(b, rows(2))
    assert cache.get_set(a) is not None  # a is now the most recent
    cache.put_set(c, rows(2))  # 6 rows > 5: the least recent (b) goes
    assert cache.get_set(b) is None
    assert cache.get_set(a) is not None
    assert cache.get_set(c) is not None


def test_a_set_larger_than_the_capacity_is_not_kept() -> None:
    cache = LabelCache(3)
    key = (T, ("a", "b", "c", "d"))
    matrix = cache.put_set(key, rows(4))
    assert matrix.shape == (4, 4)
    assert cache.get_set(key) is None


def test_other_templates_are_another_set() -> None:
    cache = LabelCache(10)
    cache.put_set((T, ("a",)), rows(1))
    assert cache.get_set((("{}",), ("a",))) is None


def test_labels_are_kept_one_by_one_too() -> None:
    cache = LabelCache(3)
    cache.put_many([((T, "a"), rows(1)[0]), ((T, "b"), rows(1, 4)[0])])
    found = cache.get_many([(T, "a"), (T, "x"), (T, "b")])
    assert found[1] is None
    np.testing.assert_array_equal(found[2], rows(1, 4)[0])
    assert (cache.hits, cache.misses) == (2, 1)
    cache.put_many([((T, f"n{i}"), rows(1)[0]) for i in range(3)])
    assert len(cache) == 3
    assert cache.get_many([(T, "a")]) == [None]  # evicted, least recent first


def test_zero_capacity_keeps_nothing() -> None:
    cache = LabelCache(0)
    cache.put_many([((T, "a"), rows(1)[0])])
    cache.put_set((T, ("a",)), rows(1))
    assert len(cache) == 0
    assert cache.get_set((T, ("a",))) is None
