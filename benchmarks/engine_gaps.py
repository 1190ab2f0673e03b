"""How long the engine idles between two batches while work waits for it, under load.

Serves a model repository in this process (port 0, like `ab_servers.py`), drives the bench's
closed-loop load at it for a few rounds, and reads every batch of the loaded tower as the
batcher reports it (`BatchEvent`: when the batch was handed to the engine, how long until the
loop had its result, how long its items had queued). For each batch whose first item was
already queued when the batch before it ended, the gap is the time from that end to this
batch's hand-off: time in which the engine could have been computing and was not. Large
requests make it visible: each one the event loop parses lengthens the loop iteration that
every step between two batches has to wait for.

A batch starts when the loop hands it to its instance's thread, or when that thread, done
with the batch before, claims it; it ends when the thread has its outputs. A thread's wake-up
and its wait for the interpreter lock before the engine's run count as compute; the gap is
the rest: handing the result to the loop, the loop's way to the next batch, the hand-off.
On a CPU the engine's idle time is not lost (the loop and the load generator use the cores);
on a GPU it is.

    python benchmarks/engine_gaps.py --repository model_repository/bench/tiny \\
        --scenario tensor --items 16 --clients 6 --rounds 4 \\
        --flags "--vision-max-batch-size 64 --max-items-per-request 256"

Prints, per round and merged: items/s, mean batch, p50 latency, the engine's busy share of
the window, and the gaps (mean, p50, p95, in ms).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from ab_servers import overrides

from clipserve.bench.measure import load_point
from clipserve.bench.payloads import SCENARIOS
from clipserve.bench.servers import InProcessServer, LoadGenerator
from clipserve.server.batcher import BatchEvent

_TEXT_SCENARIOS = ("text_short", "text_77")


def gaps_ms(events: list[BatchEvent]) -> tuple[list[float], float]:
    """(gaps in ms while work waited, the engine's busy share) over consecutive batches.

    The busy share is the batches' compute time after the first one over the time from the
    first batch's end to the last one's (summed over instances: two instances may read 200%).
    """
    gaps: list[float] = []
    previous_end = None
    for event in events:
        first_queued = event.started - max(event.queue_ns, default=0) / 1e9
        if previous_end is not None and first_queued < previous_end <= event.started:
            gaps.append((event.started - previous_end) * 1e3)
        previous_end = event.started + event.compute_ns / 1e9
    if len(events) < 2:
        return gaps, float("nan")
    span = (events[-1].started + events[-1].compute_ns / 1e9) - (
        events[0].started + events[0].compute_ns / 1e9
    )
    busy = sum(event.compute_ns for event in events[1:]) / 1e9
    return gaps, busy / max(span, 1e-9)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True, help="model repository")
    parser.add_argument("--scenario", default="tensor", choices=sorted(SCENARIOS))
    parser.add_argument("--items", type=int, default=16, help="items per request")
    parser.add_argument("--clients", type=int, default=6, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds a round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--flags", default="", help="`clipserve serve` flags (quoted)")
    args = parser.parse_args()

    changed = overrides(args.flags)
    print(f"server: {changed or 'defaults'}", flush=True)
    tower = "text" if args.scenario in _TEXT_SCENARIOS else "vision"
    events: list[BatchEvent] = []
    server = InProcessServer(args.repository, **changed).start()
    model: Any = server.server.model
    getattr(model, tower).add_observer(events.append)
    loadgen = LoadGenerator()
    all_gaps: list[float] = []
    rates: list[float] = []
    try:
        for round_ in range(1, args.rounds + 1):
            events.clear()
            sample = load_point(loadgen, server.address, args.scenario, args.clients,
                                seconds=args.seconds, warmup_s=1.0, server=server,
                                items=args.items)
            stats = sample.stats()
            steady = events[len(events) // 5:]  # the warm-up's batches out
            gaps, busy = gaps_ms(steady)
            all_gaps += gaps
            rates.append(stats.items_per_s)
            print(f"round {round_}: {stats.items_per_s:8.1f} items/s, mean batch "
                  f"{stats.mean_batch or 0:.1f}, p50 {stats.p50_ms:.1f} ms, errors "
                  f"{stats.errors}, engine busy {busy:.0%}, "
                  f"gaps {len(gaps)}: mean "
                  f"{statistics.fmean(gaps) if gaps else float('nan'):.2f} ms, p50 "
                  f"{percentile(gaps, 0.5):.2f}, p95 {percentile(gaps, 0.95):.2f}", flush=True)
    finally:
        loadgen.close()
        server.stop()
    print(f"median {statistics.median(rates):.1f} items/s over {args.rounds} rounds; "
          f"gaps {len(all_gaps)}: mean {statistics.fmean(all_gaps) if all_gaps else 0:.2f} ms, "
          f"p50 {percentile(all_gaps, 0.5):.2f}, p95 {percentile(all_gaps, 0.95):.2f} "
          f"({args.scenario} x{args.items}, {args.clients} clients)")


if __name__ == "__main__":
    main()
