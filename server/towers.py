"""Batch functions of the two towers: stack, pad to a bucket, run, split.

They run on the batchers' inference threads. Padding to a bounded set of shapes (batch buckets,
and token-length buckets for text) keeps the engine on shapes it has already run once, which is
what warm-up relies on where a shape's first run costs more (cuDNN's algorithm search, CUDA
graph capture, TensorRT profiles). On the CPU a new batch size costs no more than a known one,
so with ``pad=False`` a batch runs at its own size and warm-up runs the buckets only to size the
buffers; the text tower still pads to its token-length buckets. With batch trimming on, each
runner times its batches (warm-up included) for its `BatchPlanner`, which tells the batcher when
a smaller full bucket beats padding.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Sequence

import numpy as np

from clipserve.server.batch_plan import BatchPlanner
from clipserve.server.engine import OnnxTower, bucket_for

log = logging.getLogger(__name__)


class VisionRunner:
    """list of float32 [3, S, S] -> list of embeddings [D]."""

    def __init__(
        self, tower: OnnxTower, image_size: int, batch_buckets: Sequence[int],
        planner: BatchPlanner | None = None, *, pad: bool = True,
    ) -> None:
        self.tower = tower
        self.image_size = image_size
        self.batch_buckets = tuple(batch_buckets)
        self.planner = planner
        self.pad = pad

    def __call__(self, values: list[np.ndarray], _group: Hashable = None) -> list[np.ndarray]:
        started = time.perf_counter()
        n = len(values)
        s = self.image_size
        rows = bucket_for(n, self.batch_buckets) if self.pad else n
        # [n, 3, S, S] stacked straight into the bucket's reusable buffer [bucket, 3, S, S]
        batch = self.tower.batch_buffer((rows, 3, s, s), np.float32)
        copy_rows(values, batch)
        out = list(self.tower.run(batch)[:n])
        if self.planner is not None:
            self.planner.record(None, rows, time.perf_counter() - started)
        return out

    def rebuild(self) -> None:
        """A fresh session, checked on every batch shape (session recovery)."""
        self.tower.reload()
        self.warm_up()

    def warm_up(self) -> int:
        """Run every batch bucket once; return the number of shapes run."""
        s = self.image_size
        for size in self.batch_buckets:  # through the batch buffers, which this sizes
            batch = self.tower.batch_buffer((size, 3, s, s), np.float32)
            batch.fill(0.0)
            _warm(self.tower, batch, self.planner, None)
        return len(self.batch_buckets)


class TextRunner:
    """list of int64 token ids (variable length) -> list of embeddings [D].

    The batcher groups texts by length bucket; the group is the padded length of the batch.
    """

    def __init__(
        self,
        tower: OnnxTower,
        batch_buckets: Sequence[int],
        length_buckets: Sequence[int],
        pad_id: int = 0,
        eot_id: int = 49407,
        planner: BatchPlanner | None = None,
        *,
        pad: bool = True,
    ) -> None:
        self.tower = tower
        self.batch_buckets = tuple(batch_buckets)
        self.length_buckets = tuple(length_buckets)
        self.pad_id = pad_id
        self.eot_id = eot_id
        self.planner = planner
        self.pad = pad

    def group_of(self, ids: np.ndarray) -> int:
        return bucket_for(len(ids), self.length_buckets)

    def __call__(self, values: list[np.ndarray], group: Hashable = None) -> list[np.ndarray]:
        started = time.perf_counter()
        n = len(values)
        length = int(group) if group is not None else max(len(v) for v in values)  # type: ignore[call-overload]
        rows = bucket_for(n, self.batch_buckets) if self.pad else n
        # [rows, length] int64, pad id after each text's end-of-text token
        batch = self.tower.batch_buffer((rows, length), np.int64)
        batch.fill(self.pad_id)
        for row, ids in enumerate(values):
            batch[row, : len(ids)] = ids
        out = list(self.tower.run(batch)[:n])
        if self.planner is not None:
            self.planner.record(length, rows, time.perf_counter() - started)
        return out

    def rebuild(self) -> None:
        """A fresh session, checked on every batch shape (session recovery)."""
        self.tower.reload()
        self.warm_up()

    def warm_up(self) -> int:
        """Run every (batch bucket, length bucket) shape once; return the number run."""
        for length in self.length_buckets:
            for size in self.batch_buckets:
                ids = self.tower.batch_buffer((size, length), np.int64)
                ids.fill(self.pad_id)
                ids[:, -1] = self.eot_id
                _warm(self.tower, ids, self.planner, length)
        return len(self.length_buckets) * len(self.batch_buckets)


def copy_rows(values: Sequence[np.ndarray], out: np.ndarray) -> None:
    """``out[i] = values[i]`` for each item, then zeros in the rows after them.

    Each copy is a memoryview assignment, a plain memcpy under the interpreter lock. numpy's
    own copy (``np.stack``, ``np.copyto``, a slice fill) lets go of the lock for a large array,
    and taking it back waits for whichever thread holds it, up to the switch interval (5 ms by
    default) while the event loop is busy: once per item of the batch (beside a thread running
    Python, 128 images took ~650 ms that way instead of ~3.5 ms; ``benchmarks/gil_waits.py``).
    An item that is not a C-contiguous row of `out`'s dtype goes through numpy.
    """
    dst = memoryview(out).cast("B") if out.flags.c_contiguous else None
    step = out[0].nbytes if len(out) else 0
    for i, value in enumerate(values):
        if (
            dst is not None
            and value.dtype == out.dtype
            and value.shape == out.shape[1:]
            and value.flags.c_contiguous
        ):
            dst[i * step : (i + 1) * step] = memoryview(value).cast("B")
        else:
            out[i] = value
    if len(values) < len(out):
        if dst is None:
            out[len(values) :] = 0
            return
        zero = memoryview(bytes(step))
        for i in range(len(values), len(out)):
            dst[i * step : (i + 1) * step] = zero


#: With a planner, warm-up runs a shape once more when its run took less than this (seconds)
#: and gives the planner the second timing: a first run carries one-off allocations.
RETIME_BELOW_S = 0.5


def _warm(
    tower: OnnxTower, batch: np.ndarray, planner: BatchPlanner | None, group: Hashable
) -> None:
    """Run one warm-up shape `warmup_runs` times; with a planner, time it (steady cost)."""
    for _ in range(tower.warmup_runs):
        started = time.perf_counter()
        tower.run(batch)
    if planner is None:
        return
    seconds = time.perf_counter() - started
    if seconds < RETIME_BELOW_S:
        started = time.perf_counter()
        tower.run(batch)
        seconds = time.perf_counter() - started
    planner.record(group, len(batch), seconds)


def timed_warm_up(name: str, runner: VisionRunner | TextRunner) -> None:
    started = time.monotonic()
    shapes = runner.warm_up()
    log.info("%s warm-up: %d shapes in %.1fs", name, shapes, time.monotonic() - started)
