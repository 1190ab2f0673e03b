"""Two clipserve servers with different settings, side by side under one closed-loop load.

Both servers run in this process (port 0) on the same model repository; the load generator is
`clipserve bench`'s (a separate process). The two are measured in alternation, round by round,
so that a shared machine's background load hits both alike; each round's items/s is printed,
then both servers' merged figures and the ratio B / A.

    python benchmarks/ab_servers.py --repository model_repository/bench/ViT-B-32 \\
        --scenario jpeg_1920x1080 --clients 16 --seconds 20 --rounds 3 \\
        --a "--preprocess-nice 0" --b ""

--a and --b take `clipserve serve` flags (quoted, one string each; "" is the defaults). A
lone flag without a value needs the = form, or argparse reads it as an option of this script:
``--a=--no-adaptive-queue-delay``.
Scenarios are the bench's: jpeg_640x480, jpeg_1920x1080, tensor, text_short, text_77,
classify_1000.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from pathlib import Path
from typing import Any

from clipserve.bench.measure import Sample, interleave, load_point
from clipserve.bench.payloads import SCENARIOS
from clipserve.bench.servers import InProcessServer, LoadGenerator
from clipserve.server.settings import ServerSettings, add_arguments, from_sources

#: Set by InProcessServer itself (loopback, port 0, no metrics port, no reflection).
_FIXED = {"model_repository", "host", "port", "metrics", "reflection"}


def overrides(flags: str) -> dict[str, Any]:
    """The settings that `clipserve serve` FLAGS change from the defaults."""
    parser = argparse.ArgumentParser(prog="--a/--b", add_help=False)
    add_arguments(parser)
    settings = from_sources(parser.parse_args(shlex.split(flags)), environ={})
    defaults = ServerSettings()
    return {
        f.name: getattr(settings, f.name)
        for f in dataclasses.fields(ServerSettings)
        if f.name not in _FIXED and getattr(settings, f.name) != getattr(defaults, f.name)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True, help="model repository")
    parser.add_argument("--scenario", default="tensor", choices=sorted(SCENARIOS))
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds a round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--a", default="", help="`clipserve serve` flags of server A (a lone flag: --a=--flag)"
    )
    parser.add_argument(
        "--b", default="", help="`clipserve serve` flags of server B (a lone flag: --b=--flag)"
    )
    args = parser.parse_args()
    systems = {"A": overrides(args.a), "B": overrides(args.b)}
    for name, changed in systems.items():
        print(f"{name}: {changed or 'defaults'}", flush=True)
    servers = {name: InProcessServer(args.repository, **changed).start()
               for name, changed in systems.items()}
    loadgen = LoadGenerator()
    rounds = dict.fromkeys(servers, 0)

    def measure(name: str) -> Sample:
        sample = load_point(loadgen, servers[name].address, args.scenario, args.clients,
                            seconds=args.seconds, warmup_s=1.0, server=servers[name])
        rounds[name] += 1
        stats = sample.stats()
        print(f"round {rounds[name]} {name}: {stats.items_per_s:8.2f} items/s "
              f"(mean batch {stats.mean_batch or 0:.1f}, errors {stats.errors})", flush=True)
        return sample

    try:
        taken = interleave(args.rounds, {name: (lambda name=name: measure(name))
                                         for name in servers})
    finally:
        loadgen.close()
        for server in servers.values():
            server.stop()
    total = {name: sample.stats() for name, sample in taken.items()}
    for name, stats in total.items():
        print(f"{name}: {stats.items_per_s:.2f} items/s, p50 {stats.p50_ms:.1f} ms, "
              f"p99 {stats.p99_ms:.1f} ms over {args.rounds} rounds")
    print(f"B / A: {total['B'].items_per_s / max(total['A'].items_per_s, 1e-9):.3f}x "
          f"({args.scenario}, {args.clients} clients)")


if __name__ == "__main__":
    main()
