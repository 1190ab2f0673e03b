"""Whether requests have been arriving in company: the share of a tower's requests that arrived
while another of its requests was still queued or running, weighted towards recent ones.

The dynamic batcher uses it to stop waiting for a batch to fill when waiting has stopped paying
off. With one client in a closed loop, no other request can arrive while its request waits,
and the whole queue delay would be added to every answer; clients released together by a
finished batch, on the other hand, arrive while the first of them is still queued, and a short
wait batches them. Company is judged by what is pending, not by the time since the previous
arrival: a lone client that no longer waits calls again sooner, and a time window would take
that for company.
"""

from __future__ import annotations

#: Company is expected while at least this share of recent requests found another pending;
#: below it, a batch does not wait (`DynamicBatcher`).
ACCOMPANIED_SHARE = 0.25


class Arrivals:
    """The weighted share of recent requests that arrived while another was pending."""

    def __init__(self, weight: float = 0.1, share: float = 1.0) -> None:
        """`weight`: how much each arrival moves the share. `share`: the share before any
        arrival. The default 1.0 expects company, as a fixed delay does: clients that start
        together are batched together and stay in step; a start at 0 would run the first of
        them alone, and closed-loop clients out of step never fall back in."""
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        if not 0 <= share <= 1:
            raise ValueError(f"share must be in [0, 1], got {share}")
        self.weight = weight
        self.share = share

    def add(self, accompanied: bool) -> None:
        """One request arrived; `accompanied`: another of the tower's requests was pending."""
        self.share += self.weight * ((1.0 if accompanied else 0.0) - self.share)

    def expect_company(self) -> bool:
        """Whether another request is likely to join a waiting one: waiting may pay."""
        return self.share >= ACCOMPANIED_SHARE
