"""Tokenisation throughput and parity: open_clip's tokenizer vs clipserve's.

1,000 strings (the ImageNet prompts "a photo of a {}.") -> int64 ids ``[1000, 77]``, padded as
open_clip pads them, in one batch call each. Throughput is strings per CPU-second of the whole
process (the `tokenizers` library may use threads: their time counts), so it is "per core" and
stays meaningful on a shared machine. Both sides are warm (open_clip keeps a BPE cache; it is
filled by the first round), the two alternate within each round, and the median round is
reported. Parity: the id arrays must be identical.

    .venv/bin/python benchmarks/bench_tokenizer.py --repository REPO [--rounds 7] [--json]

Needs the export extra (open_clip, torch) for the reference; the server does not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip

from clipserve.bench.payloads import imagenet_prompts
from clipserve.repository import load_manifest
from clipserve.server.tokenizer import ClipTokenizer, pad_batch


def rate(fn: Callable[[], object], n: int, seconds: float) -> float:
    """Strings per CPU-second of the process, calling ``fn`` (n strings) for ``seconds``."""
    calls = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while True:
        fn()
        calls += 1
        if time.perf_counter() - wall0 >= seconds:
            return calls * n / max(time.process_time() - cpu0, 1e-9)


def measure(repository: Path, rounds: int, seconds: float) -> dict[str, object]:
    manifest = load_manifest(repository)
    ours = ClipTokenizer.from_repository(repository, manifest.tokenizer)
    # what open_clip.get_tokenizer(name) returns for every model clipserve serves
    length = manifest.tokenizer.context_length
    reference = open_clip.tokenizer.SimpleTokenizer(context_length=length)
    texts = imagenet_prompts()

    def clipserve_ids() -> np.ndarray:
        return pad_batch(ours.encode_batch(texts), length, manifest.tokenizer.pad_token_id)

    def open_clip_ids() -> np.ndarray:
        return reference(texts, context_length=length).numpy()

    identical = bool(np.array_equal(clipserve_ids(), open_clip_ids()))  # also warms both up
    results: dict[str, list[float]] = {"open_clip": [], "clipserve": []}
    for _ in range(rounds):
        results["open_clip"].append(rate(open_clip_ids, len(texts), seconds))
        results["clipserve"].append(rate(clipserve_ids, len(texts), seconds))
    ref, mine = (statistics.median(results[k]) for k in ("open_clip", "clipserve"))
    return {
        "strings": len(texts),
        "open_clip_per_core": ref,
        "clipserve_per_core": mine,
        "speedup": mine / ref,
        "identical_ids": identical,
        "open_clip": open_clip.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True, help="an exported repository")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.5, help="per implementation per round")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = measure(args.repository, args.rounds, args.seconds)
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{result['strings']} strings: open_clip {result['open_clip_per_core']:.0f}/s/core, "
        f"clipserve {result['clipserve_per_core']:.0f}/s/core, {result['speedup']:.1f}x, "
        f"identical ids: {result['identical_ids']}"
    )


if __name__ == "__main__":
    main()
