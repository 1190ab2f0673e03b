"""`Arrivals`: the share of a tower's requests that found another one pending."""

from __future__ import annotations

import pytest

from clipserve.server.arrivals import ACCOMPANIED_SHARE, Arrivals


def test_the_share_starts_expecting_company() -> None:
    arrivals = Arrivals()
    assert arrivals.share == 1.0
    assert arrivals.expect_company()


def test_requests_that_arrive_alone_lower_the_share_geometrically() -> None:
    arrivals = Arrivals(weight=0.1)
    for _ in range(14):
        arrivals.add(accompanied=False)
    assert arrivals.share == pytest.approx(0.9**14)
    assert arrivals.share < ACCOMPANIED_SHARE
    assert not arrivals.expect_company()


def test_requests_in_company_raise_the_share_again() -> None:
    arrivals = Arrivals(weight=0.1, share=0.0)
    for _ in range(3):
        arrivals.add(accompanied=True)
    assert arrivals.share == pytest.approx(1 - 0.9**3)
    assert arrivals.share >= ACCOMPANIED_SHARE
    assert arrivals.expect_company()


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"weight": 0.0}, "weight"), ({"weight": 1.5}, "weight"), ({"share": 1.1}, "share"),
     ({"share": -0.1}, "share")],
)
def test_impossible_parameters_are_refused(kwargs: dict[str, float], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        Arrivals(**kwargs)
