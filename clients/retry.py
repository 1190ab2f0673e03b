"""Retry policy: exponential backoff with jitter, on UNAVAILABLE only.

Pure functions of their arguments (the caller supplies the clock reading and the random draw), so
the policy is tested without sockets or sleeps. Every clipserve RPC is a pure function of its
request, so retrying one is always safe; only UNAVAILABLE is retried because it is the one status
that says the request did not reach a ready server (connection refused, server starting or
draining). RESOURCE_EXHAUSTED is deliberately not retried: the server refused at the door because
it is full, and immediate retries from every client would keep it full.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

RETRYABLE_CODES: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before trying a call again.

    The wait before attempt ``n + 1`` (after ``n`` failures) is
    ``cap * (1 - jitter * r)`` with ``cap = min(max_backoff_s, initial_backoff_s * multiplier **
    (n - 1))`` and ``r`` uniform in ``[0, 1)``: ``jitter=0`` waits exactly ``cap``, ``jitter=1``
    is "full jitter" (anywhere in ``(0, cap]``). A retry is skipped when the wait would reach
    past the call's deadline; the last error is raised instead.
    """

    max_attempts: int = 4
    """Attempts in all, the first included; 1 disables retries."""
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5
    """Fraction of the wait that is random, in [0, 1]; spreads out clients that failed together."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("backoff times must be >= 0")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")


NO_RETRY = RetryPolicy(max_attempts=1)


def is_retryable(code: grpc.StatusCode) -> bool:
    """Whether a call that failed with ``code`` may be tried again."""
    return code in RETRYABLE_CODES


def backoff_s(policy: RetryPolicy, failures: int, rand: float) -> float:
    """Seconds to wait after ``failures`` failed attempts (``failures >= 1``), for a random
    draw ``rand`` in [0, 1)."""
    if failures < 1:
        raise ValueError(f"failures must be >= 1, got {failures}")
    cap = min(policy.max_backoff_s, policy.initial_backoff_s * policy.multiplier ** (failures - 1))
    return cap * (1.0 - policy.jitter * rand)


def next_delay(
    policy: RetryPolicy,
    code: grpc.StatusCode,
    failures: int,
    rand: float,
    remaining_s: float | None = None,
) -> float | None:
    """Seconds to wait before the next attempt, or None to give up and raise.

    Args:
        policy: the retry policy.
        code: status of the attempt that just failed.
        failures: attempts made so far, all failed (1 after the first failure).
        rand: a uniform random draw in [0, 1) for the jitter.
        remaining_s: time left before the call's overall deadline; None for no deadline.
    """
    if not is_retryable(code) or failures >= policy.max_attempts:
        return None
    delay = backoff_s(policy, failures, rand)
    if remaining_s is not None and delay >= remaining_s:
        return None
    return delay
