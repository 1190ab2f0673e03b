"""A bounded LRU of label embeddings for Classify, so a repeated label set skips the text tower.

Two levels, both keyed with the templates (the model name is implicit: one cache serves one
model):
- per label, ``(templates, label)`` -> embedding [D]: a new label set that shares labels with
  earlier ones computes only its new labels;
- per label set, ``(templates, labels)`` -> the stacked, read-only matrix [N, D]: the common case
  of one label set sent again and again costs one hash of the set instead of one look-up per
  label and a copy of every row.
Each level holds at most `capacity` rows.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable

import numpy as np


class LabelCache:
    """Least-recently-used maps from a label key to an embedding and from a set to its matrix."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.hits = 0  # labels served from either level
        self.misses = 0
        self._entries: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._sets: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._set_rows = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get_many(self, keys: Iterable[Hashable]) -> list[np.ndarray | None]:
        found: list[np.ndarray | None] = []
        for key in keys:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
                self._entries.move_to_end(key)
            found.append(value)
        return found

    def put_many(self, items: Iterable[tuple[Hashable, np.ndarray]]) -> None:
        if self.capacity <= 0:
            return
        for key, value in items:
            self._entries[key] = value
            self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def get_set(self, key: Hashable) -> np.ndarray | None:
        """The matrix of a whole label set, if this exact set (and templates) was put before."""
        matrix = self._sets.get(key)
        if matrix is not None:
            self._sets.move_to_end(key)
            self.hits += len(matrix)
        return matrix

    def put_set(self, key: Hashable, matrix: np.ndarray) -> np.ndarray:
        """Keep `matrix` [N, D] for `key` (read-only from now on); returns it."""
        matrix.setflags(write=False)
        rows = len(matrix)
        if rows > self.capacity or key in self._sets:
            return matrix
        self._sets[key] = matrix
        self._set_rows += rows
        while self._set_rows > self.capacity:
            _, evicted = self._sets.popitem(last=False)
            self._set_rows -= len(evicted)
        return matrix
