"""`Arrivals`: the share of requests that came within the window of the one before."""

from __future__ import annotations

import pytest

from clipserve.server.arrivals import Arrivals
from clipserve.server.batcher import ACCOMPANIED_SHARE


def test_the_share_starts_expecting_company() -> None:
    assert Arrivals(0.002).share == 1.0


def test_requests_that_arrive_alone_lower_the_share_geometrically() -> None:
    arrivals = Arrivals(0.002, weight=0.1)
    for second in range(15):  # one request a second: never within 2 ms of the one before
        arrivals.add(float(second))
    assert arrivals.share == pytest.approx(0.9**14)  # the first arrival has no gap to judge
    assert arrivals.share < ACCOMPANIED_SHARE


def test_requests_in_company_raise_the_share_again() -> None:
    arrivals = Arrivals(0.002, weight=0.1, share=0.0)
    arrivals.add(10.0)
    for k in range(1, 4):
        arrivals.add(10.0 + k * 0.001)  # 1 ms apart
    assert arrivals.share == pytest.approx(1 - 0.9**3)
    assert arrivals.share >= ACCOMPANIED_SHARE


def test_a_gap_equal_to_the_window_counts_as_company() -> None:
    arrivals = Arrivals(0.5, weight=1.0, share=0.0)
    arrivals.add(1.0)
    arrivals.add(1.5)
    assert arrivals.share == 1.0
    arrivals.add(2.0001)
    assert arrivals.share == 0.0


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"window_s": -1.0}, "window"), ({"weight": 0.0}, "weight"), ({"weight": 1.5}, "weight"),
     ({"share": 1.1}, "share")],
)
def test_impossible_parameters_are_refused(kwargs: dict[str, float], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        Arrivals(**{"window_s": 0.001, **kwargs})
