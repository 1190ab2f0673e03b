"""Per-request accounting, carried in a context variable from the RPC edge to the batchers.

The call layer (`call_layer`) binds a `RequestTrace` around each call; `ClipModel` adds its
preprocessing time and the batchers add items, queue and compute time as the request's batches
finish. Nothing is recorded when no trace is bound (e.g. warm-up, unit tests of the core).
A context variable rather than a parameter because every path from an RPC to a batcher
(encode, classify's label texts, rank's mixed lists) would otherwise have to pass it along.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar, Token
from dataclasses import dataclass


@dataclass
class RequestTrace:
    """What one request cost; mutated in place by the core and the batchers."""

    model: str | None = None  # the Triton model it addressed (None: clipserve.v1)
    items: int = 0  # items submitted to the towers (cached label embeddings excluded)
    batches: int = 0  # batches that computed them
    input_ns: int = 0  # decoding, preprocessing and tokenisation
    queue_ns: int = 0  # longest time one of its items waited for its batch
    compute_ns: int = 0  # compute time of those batches, summed (a shared batch counts in full)

    def timing_input(self) -> _InputTimer:
        """A context manager that adds the time its block takes to `input_ns`."""
        return _InputTimer(self)


class _InputTimer:
    __slots__ = ("_started", "_trace")

    def __init__(self, trace: RequestTrace) -> None:
        self._trace = trace
        self._started = 0

    def __enter__(self) -> None:
        self._started = time.perf_counter_ns()

    def __exit__(self, *_exc: object) -> None:
        self._trace.input_ns += time.perf_counter_ns() - self._started


_CURRENT: ContextVar[RequestTrace | None] = ContextVar("clipserve_request_trace", default=None)


def current() -> RequestTrace | None:
    """The trace of the request being handled, if one is bound."""
    return _CURRENT.get()


def bind(trace: RequestTrace) -> Token[RequestTrace | None]:
    """Bind `trace` until `unbind` gets the token back (`bound` as two plain calls)."""
    return _CURRENT.set(trace)


def unbind(token: Token[RequestTrace | None]) -> None:
    _CURRENT.reset(token)


@contextlib.contextmanager
def bound(trace: RequestTrace | None = None) -> Iterator[RequestTrace]:
    """Bind `trace` (or the current one, or a new one) for the block; yield it."""
    trace = trace or _CURRENT.get() or RequestTrace()
    token = _CURRENT.set(trace)
    try:
        yield trace
    finally:
        _CURRENT.reset(token)
