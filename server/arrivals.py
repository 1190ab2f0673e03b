"""Whether requests have been arriving in company: the share of arrivals that followed the one
before within a window (the queue delay), exponentially weighted over recent arrivals.

The dynamic batcher uses it to stop waiting for a batch to fill when waiting has stopped paying
off. With one client in a closed loop, no other item can arrive while its request waits, and
the whole queue delay would be added to every answer; clients released together by a finished
batch, on the other hand, arrive within microseconds of each other, and a short wait batches
them. The share tells the two apart where an average rate cannot: closed-loop clients arrive in
bursts, so the same mean rate can mean company within the delay or none.
"""

from __future__ import annotations


class Arrivals:
    """The weighted share of recent arrivals that came within `window_s` of the previous one."""

    def __init__(self, window_s: float, weight: float = 0.1, share: float = 1.0) -> None:
        """`weight`: how much each arrival moves the share. `share`: the share before any
        arrival. The default 1.0 expects company, as a fixed delay does: clients that start
        together are batched together and stay in step; a start at 0 would run the first of
        them alone, and closed-loop clients out of step never fall back in."""
        if window_s < 0:
            raise ValueError(f"window must not be negative, got {window_s}")
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        if not 0 <= share <= 1:
            raise ValueError(f"share must be in [0, 1], got {share}")
        self.window_s = window_s
        self.weight = weight
        self.share = share
        self._last: float | None = None

    def add(self, now: float) -> None:
        """One arrival (a request, whatever its item count) at `now`, a time.monotonic()."""
        if self._last is not None:
            accompanied = 1.0 if now - self._last <= self.window_s else 0.0
            self.share += self.weight * (accompanied - self.share)
        self._last = now
