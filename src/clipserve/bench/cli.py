"""`clipserve bench`: run the side-by-side benchmark and write its table, JSON and plot."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DESCRIPTION = """\
Measure clipserve side by side with its reference points, in one run: the raw ONNX Runtime
session (engine limit), the same server with batching off, and open_clip in PyTorch behind a
plain grpc.aio server. Servers are started here (port 0); closed-loop clients run in a separate
process. Compared systems are measured in alternation, so ratios hold on a busy machine even
when absolute figures do not. Models are exported with --pretrained none (random weights) into
--work-dir once. Needs the export extra (torch, open_clip) for exports and references.

examples:
  clipserve bench --quick                 # CI-sized: tiny model only, short windows
  clipserve bench                         # full: tiny, ViT-B-32, ViT-L-14 (sweep, memory)
  clipserve bench --skip pytorch,memory   # leave sections out
"""


def add_parser(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    from clipserve.bench.runner import SECTIONS

    parser = subparsers.add_parser(
        name, help=help_text, description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized run: tiny model only, short windows, one round")
    parser.add_argument("--output", type=Path, default=Path("bench-results"),
                        help="folder for bench.json, bench.md and throughput.png "
                        "(default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=Path("model_repository") / "bench",
                        help="where exported models are kept between runs (default: %(default)s)")
    parser.add_argument("--repository", action="append", default=[], metavar="MODEL=PATH",
                        help="use this repository for MODEL (tiny, ViT-B-32, ViT-L-14) instead "
                        "of exporting it")
    parser.add_argument("--skip", default="", metavar="SECTIONS",
                        help=f"comma list of sections to leave out: {', '.join(SECTIONS)}")
    parser.add_argument("--seconds", type=float, default=None,
                        help="measured seconds per point and round (full 4, quick 0.6)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternating rounds per comparison (full 3, quick 1)")
    parser.add_argument("--concurrency", default=None, metavar="LIST",
                        help="client counts of the sweep (full 1,4,16,32; quick 1,8)")
    parser.add_argument("--memory-requests", type=int, default=None,
                        help="requests of the memory check (full 10000, quick 300)")
    parser.add_argument("--memory-model", default=None,
                        help="model of the memory check (full ViT-L-14, quick tiny)")
    parser.add_argument("--image-model", default=None,
                        help="model of the engine and PyTorch comparisons "
                        "(full ViT-B-32, quick tiny)")
    parser.add_argument("--large-model", default=None,
                        help="model swept last, at 1 and 4 clients with batches of at most 4 "
                        "images and 16 texts (full ViT-L-14, quick none; 'none' leaves it out)")
    parser.add_argument("--intra-op-threads", type=int, default=None,
                        help="the servers' --intra-op-threads (default: the server's default)")
    parser.add_argument("--preprocess-workers", type=int, default=None,
                        help="the servers' --preprocess-workers (default: the server's default)")
    parser.add_argument("--vision-instances", type=int, default=None,
                        help="the servers' --vision-instances; the engine limit is then as many "
                        "raw sessions side by side, each with an instance's threads (default: "
                        "the server's default, 1)")
    parser.set_defaults(run=run)


def _plan(args: argparse.Namespace) -> Any:
    from clipserve.bench.runner import ARCHITECTURES, SECTIONS, Plan

    repositories = {}
    for item in args.repository:
        key, _, path = item.partition("=")
        if key not in ARCHITECTURES or not path:
            raise SystemExit(f"--repository {item!r}: expected MODEL=PATH, MODEL one of "
                             f"{', '.join(ARCHITECTURES)}")
        repositories[key] = Path(path)
    skip = frozenset(s.strip() for s in args.skip.split(",") if s.strip())
    unknown = skip - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--skip: unknown section(s) {', '.join(sorted(unknown))}")
    concurrency = None
    if args.concurrency:
        concurrency = tuple(int(c) for c in args.concurrency.split(","))
    return Plan.create(
        args.quick, args.work_dir, repositories=repositories, skip=skip, seconds=args.seconds,
        rounds=args.rounds, concurrency=concurrency, memory_requests=args.memory_requests,
        memory_model=args.memory_model, image_model=args.image_model,
        large_model="" if args.large_model == "none" else args.large_model,
        intra_op_threads=args.intra_op_threads, preprocess_workers=args.preprocess_workers,
        vision_instances=args.vision_instances,
    )


def _versions() -> str:
    import grpc
    import numpy
    import onnxruntime
    import PIL

    return (f"Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, "
            f"numpy {numpy.__version__}, grpcio {grpc.__version__}, Pillow {PIL.__version__}")


def run(args: argparse.Namespace) -> int:
    from clipserve.bench import report
    from clipserve.bench.runner import run_plan
    from clipserve.server.engine import usable_cores

    plan = _plan(args)
    # one access-log line per request would dominate the bench's own output
    logging.getLogger("clipserve.server.access_log").setLevel(logging.WARNING)
    command = "clipserve bench " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["bench"]
                                              else sys.argv[1:])
    load_before = os.getloadavg()
    started = time.monotonic()
    args.output.mkdir(parents=True, exist_ok=True)

    def document(outcome: Any, partial: bool) -> dict[str, Any]:
        return {
            "meta": {
                "command": command.strip(),
                "quick": plan.quick,
                "partial": partial,
                "cpus": usable_cores(),
                "load_before": [round(v, 1) for v in load_before],
                "load_after": [round(v, 1) for v in os.getloadavg()],
                "duration_s": time.monotonic() - started,
                "versions": _versions(),
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            "points": outcome.points,
            "targets": [t.to_dict() for t in outcome.targets],
            "notes": outcome.notes,
            "extra": outcome.extra,
        }

    def save_partial(outcome: Any) -> None:  # a long run that is stopped keeps what it measured
        report.write_json(document(outcome, True), args.output / "bench.partial.json")

    outcome = run_plan(plan, save_partial)
    final = document(outcome, False)
    report.write_json(final, args.output / "bench.json")
    (args.output / "bench.partial.json").unlink(missing_ok=True)
    text = report.render_text(final)
    (args.output / "bench.md").write_text(text, encoding="utf-8")
    if report.plot_throughput(outcome.points, args.output / "throughput.png"):
        text += f"\nplot: {args.output / 'throughput.png'}\n"
    sys.stdout.write(text)
    return 0
