"""What a busy event loop costs the server's other threads, through the interpreter lock.

The server's inference and preprocessing threads spend most of their time in C code that lets
go of the interpreter lock (ONNX Runtime, libjpeg, Pillow's resampling, large numpy copies).
Each time such a call returns, the thread has to take the lock back; while the event loop is
busy running Python (parsing requests, answering them), that waits until the loop gives the
lock up, which CPython forces after the switch interval (5 ms by default). This measures the
wall time of the steps those threads take, with the interpreter idle and with a second thread
running Python bytecode without a pause (what a loaded event loop does), side by side:

- stacking a batch of 3x224x224 float32 images into the batch buffer: ``np.stack`` (numpy
  lets go of the lock for each large item) against `clipserve.server.towers.copy_rows`
  (memoryview copies, which keep it);
- decoding a JPEG with Pillow reading 64 KiB at a time (its default: one lock release per
  block) against reading the whole image in one call (what `ImagePreprocessor` does);
- the whole `ImagePreprocessor.decode` (bytes -> normalised tensor), at 640x480 and 1920x1080.

Each step is timed with the switch interval at 5 ms and at 0.5 ms (``--switch-interval-us``
of ``clipserve serve``). The figures are medians of ``--repeats`` runs; the implementations
alternate.

With ``--repository``, the same comparison runs inside a served clipserve (in this process,
port 0) under `clipserve bench`'s closed-loop load (``--scenario``, default preprocessed
tensors): round by round, the vision runner stacks with ``np.stack`` at the default switch
interval, with `copy_rows` at the default, and with `copy_rows` at 0.5 ms; the table gives
the time per batch spent stacking and the items/s served.

    .venv/bin/python benchmarks/gil_waits.py [--repeats 15] [--batches 16 128] \
        [--repository model_repository/bench/tiny --scenario tensor --clients 16 \
         --seconds 6 --rounds 3]

The JPEGs are the bench's photos (scikit-image's, or synthetic ones where it is missing).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from clipserve.bench import payloads
from clipserve.repository import Preprocess
from clipserve.server import towers
from clipserve.server.preprocess import ImagePreprocessor
from clipserve.server.towers import copy_rows

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
INTERVALS_S = (0.005, 0.0005)


@contextmanager
def busy_interpreter(on: bool) -> Iterator[None]:
    """While the block runs, a second thread executes Python bytecode without pause."""
    if not on:
        yield
        return
    stop = threading.Event()

    def spin() -> None:
        total = 0
        while not stop.is_set():
            for i in range(1000):
                total += i

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    time.sleep(0.05)
    try:
        yield
    finally:
        stop.set()
        thread.join()


def median_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, the functions taking turns."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def pillow_load(data: bytes, block: int | None) -> None:
    with Image.open(io.BytesIO(data)) as image:
        if block is not None:
            image.decodermaxblock = block
        image.load()


def steps(batches: list[int]) -> list[tuple[str, dict[str, Callable[[], object]]]]:
    """(step, {implementation: call}) for every step measured."""
    rng = np.random.default_rng(0)
    out: list[tuple[str, dict[str, Callable[[], object]]]] = []
    for n in batches:
        images = [rng.standard_normal((3, 224, 224), dtype=np.float32) for _ in range(n)]
        buffer = np.empty((n, 3, 224, 224), np.float32)
        out.append((f"stack {n} images", {
            "np.stack": lambda i=images, b=buffer: np.stack(i, out=b),
            "copy_rows": lambda i=images, b=buffer: copy_rows(i, b),
        }))
    pre = ImagePreprocessor(Preprocess(224, MEAN, STD, "bicubic", "shortest"))
    for width, height in ((640, 480), (1920, 1080)):
        data = payloads.photos(width, height)[0][1]  # chelsea (or a synthetic image)
        out.append((f"JPEG {width}x{height} load", {
            "64 KiB reads": lambda d=data: pillow_load(d, None),
            "one read": lambda d=data: pillow_load(d, len(d)),
        }))
        out.append((f"JPEG {width}x{height} -> tensor", {"decode": lambda d=data: pre.decode(d)}))
    return out


def numpy_rows(values: list[np.ndarray], out: np.ndarray) -> None:
    """What the vision runner did before `copy_rows`."""
    np.stack(values, out=out[: len(values)])
    out[len(values) :] = 0.0


#: The served comparison: (name, stacking function, switch interval in seconds).
SERVED_WAYS = (
    ("np.stack, 5 ms", numpy_rows, 0.005),
    ("copy_rows, 5 ms", copy_rows, 0.005),
    ("copy_rows, 0.5 ms", copy_rows, 0.0005),
)


def served(args: argparse.Namespace) -> None:
    """Stacking time per batch and items/s of a served clipserve, each way, alternated."""
    from clipserve.bench.measure import load_point
    from clipserve.bench.servers import InProcessServer, LoadGenerator

    spent: list[float] = []
    taken: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in SERVED_WAYS}

    def timed(fn: Callable[[list[np.ndarray], np.ndarray], None]) -> Callable[..., None]:
        def stack(values: list[np.ndarray], out: np.ndarray) -> None:
            started = time.perf_counter()
            fn(values, out)
            spent.append(time.perf_counter() - started)

        return stack

    default = sys.getswitchinterval()
    clients, scenario = args.clients, args.scenario
    try:
        with InProcessServer(args.repository) as server, LoadGenerator() as lg:
            point = {"seconds": args.seconds, "warmup_s": 0.5, "server": server}
            load_point(lg, server.address, scenario, clients, **point)
            for _ in range(args.rounds):
                for name, fn, interval in SERVED_WAYS:
                    towers.copy_rows = timed(fn)  # type: ignore[assignment]
                    sys.setswitchinterval(interval)
                    spent.clear()
                    sample = load_point(lg, server.address, scenario, clients, **point)
                    stacking = statistics.fmean(spent) * 1e3 if spent else 0.0
                    taken[name].append((stacking, sample.server_items / sample.server_seconds))
    finally:
        towers.copy_rows = copy_rows
        sys.setswitchinterval(default)
    print(f"\nserved {scenario}, {args.repository.name}, {clients} clients, {args.rounds} "
          f"rounds x {args.seconds:g} s (per round: stacking ms per batch / items/s)")
    base = sum(r[1] for r in taken[SERVED_WAYS[0][0]])
    for name, rounds in taken.items():
        each = ", ".join(f"{ms:.2f} / {rate:.0f}" for ms, rate in rounds)
        print(f"{name:<18} {each}   items/s {sum(r[1] for r in rounds) / base:.2f}x the first")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--repository", type=Path, default=None,
                        help="also measure a served clipserve on this model repository")
    parser.add_argument("--scenario", default="tensor",
                        help="the bench's scenario for --repository (tensor, text_short, ...)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=6.0, help="per round and way")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    default = sys.getswitchinterval()
    print(f"{'step':<28} {'implementation':<14} {'idle ms':>8}"
          + "".join(f" {f'busy, {s * 1e3:g} ms':>13}" for s in INTERVALS_S))
    try:
        for step, fns in steps(args.batches):
            idle = median_ms(fns, args.repeats)
            busy: dict[float, dict[str, float]] = {}
            for interval in INTERVALS_S:
                sys.setswitchinterval(interval)
                with busy_interpreter(True):
                    busy[interval] = median_ms(fns, args.repeats)
            sys.setswitchinterval(default)
            for name in fns:
                print(f"{step:<28} {name:<14} {idle[name]:8.2f}"
                      + "".join(f" {busy[s][name]:13.2f}" for s in INTERVALS_S))
            if len(fns) == 2:
                first, second = fns
                print(f"{'':<28} {'ratio':<14} {idle[first] / idle[second]:7.2f}x"
                      + "".join(f" {busy[s][first] / busy[s][second]:12.2f}x"
                                for s in INTERVALS_S))
    finally:
        sys.setswitchinterval(default)
    if args.repository is not None:
        served(args)


if __name__ == "__main__":
    main()
