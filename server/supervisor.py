"""What the server does when an inference session keeps failing (docs/robustness.md).

A failed batch fails only its own items (INTERNAL, generic message, details in the log). After
`threshold` consecutive failed batches of one tower the session is presumed broken:

1. the server turns NOT_SERVING and refuses new requests with UNAVAILABLE (retryable: a balancer
   sends them to another replica), while admitted requests go on;
2. the tower's ONNX Runtime sessions (one per model instance) are rebuilt from its file and
   every batch shape runs once, each on its instance's own inference thread, between two of its
   batches (off the event loop);
3. on success the server is SERVING again; if the rebuild or its warm-up fails, or more than
   `max_rebuilds` rebuilds were needed within `window_s`, the server gives up: it drains and exits
   with `EXIT_SESSION_FAILURE`, so that its orchestrator restarts it (a fresh process, or another
   node when the device is at fault).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from clipserve.server.batcher import DynamicBatcher

log = logging.getLogger(__name__)

EXIT_SESSION_FAILURE = 70  # EX_SOFTWARE: the process cannot go on; restart it
REBUILD_WINDOW_S = 600.0


class SessionSupervisor:
    """Watches batchers for consecutive failures; rebuilds their sessions or gives up."""

    def __init__(
        self,
        threshold: int,
        max_rebuilds: int,
        *,
        set_serving: Callable[[bool], Awaitable[None]],
        give_up: Callable[[str], None],
        window_s: float = REBUILD_WINDOW_S,
    ) -> None:
        self.threshold = threshold
        self.max_rebuilds = max_rebuilds
        self.window_s = window_s
        self.rebuilds = 0  # successful rebuilds since start
        self._set_serving = set_serving
        self._give_up = give_up
        self._recent: list[float] = []  # monotonic start times of rebuilds within the window
        self._task: asyncio.Task[None] | None = None

    def watch(self, name: str, batcher: DynamicBatcher, rebuild: Callable[[int], object]) -> None:
        """Rebuild with `rebuild(i)` for each model instance i (run on that instance's inference
        thread) when `name` fails."""
        if self.threshold <= 0:
            return

        def failed(consecutive: int) -> None:
            if consecutive >= self.threshold and not self.recovering:
                self._task = asyncio.ensure_future(self._recover(name, batcher, rebuild))

        batcher.add_failure_observer(failed)

    @property
    def recovering(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _recover(
        self, name: str, batcher: DynamicBatcher, rebuild: Callable[[int], object]
    ) -> None:
        log.error(
            "%s: %d consecutive batches failed; NOT_SERVING while the session is rebuilt",
            name, batcher.stats.consecutive_failures,
        )
        await self._set_serving(False)
        now = time.monotonic()
        self._recent = [t for t in self._recent if now - t < self.window_s]
        if len(self._recent) >= self.max_rebuilds:
            self._give_up(
                f"{name} session failed again after {len(self._recent)} rebuild(s) within "
                f"{self.window_s:.0f}s"
            )
            return
        self._recent.append(now)
        try:
            await batcher.run_exclusive(rebuild)
        except Exception:
            log.exception("%s session rebuild failed", name)
            self._give_up(f"{name} session could not be rebuilt")
            return
        batcher.stats.consecutive_failures = 0
        self.rebuilds += 1
        log.warning("%s session rebuilt and warmed up in %.1fs", name, time.monotonic() - now)
        await self._set_serving(True)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
