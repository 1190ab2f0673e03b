"""A bounded LRU of label embeddings for Classify, so a repeated label set skips the text tower.

Keys are (templates, label); the model name is implicit because one cache serves one model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable

import numpy as np


class LabelCache:
    """Least-recently-used map from a key to a normalised embedding [D]."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, np.ndarray] = OrderedDict()

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
