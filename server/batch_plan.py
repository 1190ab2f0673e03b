"""Which batch to run: pad the queued items up to a bucket, or run a smaller bucket full.

Opt-in (`--batch-trimming`): docs/performance.md has the measured gains and losses.

Batches are padded to a bounded set of shapes (batch buckets) that warm-up has run. Padded rows
cost what real ones do wherever the engine is compute-bound (on a CPU always, on a GPU from a
few dozen images up): 11 images padded to 16 take as long as 16. When a smaller bucket carries
clearly more items per second (8 of the 11 now, the other 3 at the head of the queue for the
next batch, which forms while this one runs), the batcher runs that instead. Where small
batches cost about the same as large ones (a GPU at small sizes), padding wins and stays.

The choice compares measured costs: each shape's warm-up run seeds it, and every batch run
after that updates a moving average, so the plan follows the machine it runs on. A shape that
has not been timed yet is never chosen over padding, and one batch in `EXPLORE_EVERY` that
would be trimmed runs whole instead, so that a cost that was measured too high (a first run's
allocations) is measured again rather than avoided for good.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence

from clipserve.server.engine import bucket_for

#: A smaller bucket must carry this much more per second than padding to be chosen.
TRIM_MARGIN = 0.20
#: Weight of the newest timing in a shape's moving average.
SMOOTHING = 0.2
#: One trimmed batch in this many runs whole instead, to time the larger shape again.
EXPLORE_EVERY = 100


class BatchPlanner:
    """Costs per (group, bucket) and the batch size to take for `n` queued items.

    `record` runs on the inference thread, `size_for` on the event loop.
    """

    def __init__(self, buckets: Sequence[int]) -> None:
        self.buckets = tuple(sorted(buckets))
        self._cost: dict[tuple[Hashable, int], float] = {}
        self._lock = threading.Lock()
        self._trimmed = 0  # batches trimmed so far (for EXPLORE_EVERY)

    def record(self, group: Hashable, rows: int, seconds: float) -> None:
        """One run of a batch of `rows` (a bucket, padding included) took `seconds`."""
        key = (group, rows)
        with self._lock:
            old = self._cost.get(key)
            self._cost[key] = seconds if old is None else old + SMOOTHING * (seconds - old)

    def cost(self, group: Hashable, rows: int) -> float | None:
        """Seconds per batch of `rows` in `group`, None before the first timing."""
        return self._cost.get((group, rows))

    def size_for(self, group: Hashable, n: int) -> int:
        """How many of `n` queued items to run now (`n` itself: pad them to a bucket).

        A full bucket always runs whole: per item, batches of different sizes cost about the
        same on a compute-bound engine, and choosing between them would follow the noise of
        the timings (measured: +-25% on a shared 2-core VM). Padding, by contrast, costs
        whole rows for sure; the margin keeps a nearly full batch padded.
        """
        padded = bucket_for(n, self.buckets)
        pad_cost = self.cost(group, padded)
        if padded == n or pad_cost is None or pad_cost <= 0:
            return n
        beat = n / pad_cost * (1 + TRIM_MARGIN)  # items per second a smaller bucket must beat
        for rows in reversed(self.buckets):  # the largest such bucket: fewest items left over
            if rows >= n:
                continue
            cost = self.cost(group, rows)
            if cost is not None and cost > 0 and rows / cost > beat:
                self._trimmed += 1
                return n if self._trimmed % EXPLORE_EVERY == 0 else rows
        return n
