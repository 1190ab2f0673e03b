"""The bench's plan and its sections; each section measures and returns rows and targets.

A section that fails (a missing extra, a server that does not start) records why and the run
goes on: its targets read "not measured" with the reason.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from clipserve.bench import payloads
from clipserve.bench.measure import (
    Sample,
    engine_sample_side_by_side,
    interleave,
    load_point,
    merged,
)
from clipserve.bench.servers import (
    CannedServer,
    InProcessServer,
    LoadGenerator,
    SubprocessServer,
    clipserve_command,
    proc_environ,
    proc_status,
)
from clipserve.bench.stats import ratio
from clipserve.bench.targets import PARITY_LIMIT, TARGETS, TargetResult, result

log = logging.getLogger(__name__)

TINY = "tiny"
#: model key -> open_clip architecture exported with --pretrained none (random weights)
ARCHITECTURES = {TINY: "clipserve-demo", "ViT-B-32": "ViT-B-32", "ViT-L-14": "ViT-L-14"}
SECTIONS = ("sweep", "engine", "batching", "pytorch", "preprocess", "tokenizer", "lengths",
            "labels", "memory")  # fmt: skip
SECTION_TARGETS = {
    "engine": ("engine_fraction",), "batching": ("batching_speedup",),
    "pytorch": ("vs_pytorch",), "preprocess": ("preprocess_speedup",),
    "tokenizer": ("tokenizer_speedup",), "lengths": ("length_buckets_speedup",),
    "labels": ("label_cache_speedup",), "memory": ("memory_peak_ratio", "memory_growth"),
}


@dataclass
class Plan:
    """What one run measures; `quick` shrinks every window and drops the large models."""

    quick: bool
    work_dir: Path
    repositories: dict[str, Path] = field(default_factory=dict)  # given with --repository
    skip: frozenset[str] = frozenset()
    seconds: float = 4.0
    warmup_s: float = 1.0
    rounds: int = 3
    concurrency: tuple[int, ...] = (1, 4, 16, 32)
    memory_requests: int = 10_000
    memory_model: str = "ViT-L-14"
    image_model: str = "ViT-B-32"  # engine fraction, vs PyTorch
    large_model: str = "ViT-L-14"  # swept at few clients after the others; "" leaves it out
    intra_op_threads: int = 0
    preprocess_workers: int = 0
    vision_instances: int = 1  # the servers' and the raw engine's

    @classmethod
    def create(cls, quick: bool, work_dir: Path, **overrides: Any) -> Plan:
        if quick:
            base: dict[str, Any] = dict(
                seconds=0.6, warmup_s=0.2, rounds=1, concurrency=(1, 8), memory_requests=300,
                memory_model=TINY, image_model=TINY, large_model="",
            )
        else:
            base = {}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(quick=quick, work_dir=work_dir, **base)

    def runs(self, section: str) -> bool:
        return section not in self.skip

    def server_overrides(self) -> dict[str, Any]:
        return {
            "intra_op_threads": self.intra_op_threads,
            "preprocess_workers": self.preprocess_workers,
            "vision_instances": self.vision_instances,
        }

    def sweeps(self) -> list[Sweep]:
        """The in-process servers of the run, in order, and what each one's sweep covers."""
        plans = [Sweep(TINY, SWEEP_TINY, self.concurrency)]
        if self.image_model != TINY:
            plans.append(Sweep(self.image_model, SWEEP_IMAGE_MODEL, tuple(
                c for c in self.concurrency if c <= IMAGE_MODEL_MAX_CLIENTS)))
        if self.large_model and self.runs("sweep") and self.large_model not in (
            TINY, self.image_model
        ):
            plans.append(Sweep(self.large_model, SWEEP_IMAGE_MODEL, tuple(
                c for c in self.concurrency if c <= LARGE_MODEL_MAX_CLIENTS
            ), LARGE_MODEL_SERVER))  # the sweep only: no other section applies to it
        return plans

    def server_flags(self) -> list[str]:
        """`server_overrides` as `clipserve serve` flags (those that differ from its defaults),
        for the servers the bench starts as subprocesses."""
        from clipserve.server.settings import ServerSettings

        defaults = {f.name: f.default for f in fields(ServerSettings)}
        flags: list[str] = []
        for name, value in self.server_overrides().items():
            if value != defaults[name]:
                flags += [f"--{name.replace('_', '-')}", str(value)]
        return flags


@dataclass(frozen=True)
class Sweep:
    """One model's in-process server: its sweep's scenarios and client counts (the tiny and the
    image model's servers also run the sections that apply to them)."""

    model: str
    scenarios: tuple[str, ...]
    concurrency: tuple[int, ...]
    server: dict[str, Any] = field(default_factory=dict)  # settings beside the plan's


@dataclass
class Outcome:
    """Everything a run produced, in the order the report shows it."""

    points: list[dict[str, Any]] = field(default_factory=list)
    targets: list[TargetResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    #: called after every section (the CLI writes what was measured so far)
    on_section: Callable[[Outcome], None] | None = None

    def point(self, model: str, system: str, scenario: str, concurrency: int, sample: Sample,
              **more: Any) -> dict[str, Any]:
        row = {"model": model, "system": system, "scenario": scenario,
               "concurrency": concurrency, **sample.stats().to_dict(), **more}
        if sample.error_sample:
            row["error_sample"] = sample.error_sample
        self.points.append(row)
        log.info(
            "%s %s %s c=%d: %.1f items/s p50 %.1f ms p99 %.1f ms batch %s",
            model, system, scenario, concurrency, row["items_per_s"], row["p50_ms"],
            row["p99_ms"], "-" if row["mean_batch"] is None else f"{row['mean_batch']:.1f}",
        )
        return row


# -- repositories and helpers ---------------------------------------------------------------
def source_root() -> Path | None:
    """The source checkout (for benchmarks/), or None when clipserve is installed as a wheel."""
    import clipserve

    root = Path(clipserve.__file__).resolve().parents[2]
    return root if (root / "benchmarks" / "torch_server.py").is_file() else None


def repository(plan: Plan, model: str) -> Path:
    """The repository of `model`: given, cached in the work dir, or exported now."""
    if model in plan.repositories:
        return plan.repositories[model]
    path = plan.work_dir / model
    if not (path / "clipserve.json").is_file():
        log.info("exporting %s (--pretrained none) to %s", ARCHITECTURES[model], path)
        started = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "clipserve", "--log-level", "WARNING", "export", "--model",
             ARCHITECTURES[model], "--pretrained", "none", "--output", str(path), "--force"],
            check=True,
        )
        log.info("exported %s in %.0fs", model, time.monotonic() - started)
    return path


def model_files_bytes(root: Path) -> int:
    """Bytes of the ONNX towers (external data included) that the server loads."""
    return sum(
        f.stat().st_size for tower in ("clip_vision", "clip_text")
        for f in (root / tower).rglob("*") if f.is_file() and f.name != "config.pbtxt"
    )


def image_size(root: Path) -> int:
    return int(json.loads((root / "clipserve.json").read_text())["preprocess"]["size"])


@contextmanager
def section(outcome: Outcome, name: str, *target_keys: str) -> Iterator[None]:
    """Run a section; on failure note why and mark its targets as not measured."""
    started = time.monotonic()
    log.info("-- %s", name)
    try:
        yield
    except Exception as exc:
        log.exception("section %s failed", name)
        lines = [line for line in str(exc).splitlines() if line.strip()] or [""]
        last = f" ... {lines[-1].strip()}" if len(lines) > 1 else ""
        reason = f"{name} failed: {type(exc).__name__}: {lines[0]}"[:300] + last[:300]
        outcome.notes.append(reason)
        done = {t.target.key for t in outcome.targets}
        outcome.targets += [result(k, None, reason) for k in target_keys if k not in done]
    finally:
        log.info("-- %s took %.0fs", name, time.monotonic() - started)
        if outcome.on_section is not None:
            outcome.on_section(outcome)


def skipped(outcome: Outcome, reason: str, *keys: str) -> None:
    outcome.targets += [result(k, None, reason) for k in keys]


# -- sections -------------------------------------------------------------------------------
def sweep(outcome: Outcome, lg: LoadGenerator, server: InProcessServer, model: str,
          scenarios: tuple[str, ...], levels: tuple[int, ...], seconds: float,
          warmup_s: float) -> None:
    """Every scenario at every concurrency: the table and the plot."""
    size = image_size(Path(server.settings.model_repository))
    for scenario in scenarios:
        for concurrency in levels:
            sample = load_point(
                lg, server.address, scenario, concurrency, seconds=seconds,
                warmup_s=warmup_s, image_size=size, server=server,
            )
            outcome.point(model, "clipserve", scenario, concurrency, sample, sweep=True)


def engine_fraction(plan: Plan, outcome: Outcome, lg: LoadGenerator, server: InProcessServer,
                    model: str, clients: int = 16) -> None:
    """Served tensors at `clients` vs the raw session at its best batch size, interleaved.

    With several vision instances, the raw engine is as many sessions, each with an
    instance's threads, run side by side at that batch size each: the server's configuration.
    """
    from clipserve.repository import load_manifest
    from clipserve.server.engine import EngineOptions, open_instances
    from clipserve.server.settings import parse_buckets

    root = Path(server.settings.model_repository)
    manifest = load_manifest(root)
    s = server.settings
    instances = s.vision_instances
    runs = [tower.run for tower in open_instances(
        "vision", root / manifest.vision.file, manifest.vision.input, manifest.vision.output,
        EngineOptions(device=s.device, intra_op_threads=s.intra_op_threads), instances,
    )]
    raw_name = "raw ORT session" if instances == 1 else f"raw ORT, {instances} sessions"
    size = manifest.preprocess.size
    rng = np.random.default_rng(0)
    buckets = parse_buckets(s.batch_buckets, s.vision_max_batch_size)
    window = max(plan.seconds / 2, 0.3)
    by_size = {}
    for bucket in buckets:  # [n, 3, S, S]
        batch = rng.standard_normal((bucket, 3, size, size), dtype=np.float32)
        rate = engine_sample_side_by_side(runs, batch, window).stats().items_per_s
        by_size[bucket] = (batch, rate)
    # The sweep's short windows are noisy (one or two calls per size on a slow model): its two
    # leading sizes are both measured in the interleaved rounds, and the better one is the limit.
    leading = sorted(by_size, key=lambda b: by_size[b][1], reverse=True)[:2]
    log.info("engine items/s by batch size: %s; measuring %s side by side",
             {b: round(v[1], 1) for b, v in by_size.items()}, leading)

    def served_by(target: InProcessServer) -> Callable[[], Sample]:
        return lambda: load_point(lg, target.address, "tensor", clients, seconds=plan.seconds,
                                  warmup_s=plan.warmup_s, image_size=size, server=target)

    # a second server that pads every batch up to a power of two (the GPU default), for what
    # running each batch at its own size (the CPU default) changes
    with InProcessServer(root, batch_buckets="pow2", **plan.server_overrides()) as padding:
        taken = interleave(plan.rounds, {
            **{f"engine {b}": (
                lambda b=b: engine_sample_side_by_side(runs, by_size[b][0], plan.seconds)
            ) for b in leading},
            "served": served_by(server),
            "padded": served_by(padding),
        })
    raw = {b: outcome.point(model, f"{raw_name}, batch {b}", "tensor", instances,
                            taken[f"engine {b}"]) for b in leading}
    best = max(raw, key=lambda b: raw[b]["items_per_s"])
    engine = raw[best]
    served = outcome.point(model, "clipserve", "tensor", clients, taken["served"])
    padded = outcome.point(model, "clipserve, --batch-buckets pow2", "tensor", clients,
                           taken["padded"])
    outcome.extra["engine_by_batch"] = {str(b): v[1] for b, v in by_size.items()}
    outcome.targets.append(result(
        "engine_fraction", ratio(served["items_per_s"], engine["items_per_s"]),
        f"{model}: served {served['items_per_s']:.1f} items/s at {clients} clients (mean batch "
        f"{served['mean_batch'] or 0:.1f}) vs {raw_name} {engine['items_per_s']:.1f} items/s at "
        f"batch {best}{' each' if instances > 1 else ''}; padded to powers of two "
        f"{padded['items_per_s']:.1f} items/s (mean batch {padded['mean_batch'] or 0:.1f})",
    ))


def batching(plan: Plan, outcome: Outcome, lg: LoadGenerator, server: InProcessServer,
             model: str, clients: int = 32) -> None:
    """EncodeText short at `clients`: dynamic batching vs max batch size 1, interleaved with
    the transport's ceiling (`CannedServer`: grpc.aio answering without a model)."""

    def measure(address: str, batches: InProcessServer | None) -> Callable[[], Sample]:
        return lambda: load_point(lg, address, "text_short", clients, seconds=plan.seconds,
                                  warmup_s=plan.warmup_s, server=batches)

    root = Path(server.settings.model_repository)
    with InProcessServer(root, vision_max_batch_size=1, text_max_batch_size=1,
                         **plan.server_overrides()) as off, \
            CannedServer(one_answer(server.address, "text_short")) as canned:
        taken = interleave(plan.rounds, {
            "on": measure(server.address, server),
            "off": measure(off.address, off),
            "ceiling": measure(canned.address, None),
        })
    on = outcome.point(model, "clipserve", "text_short", clients, taken["on"])
    no = outcome.point(model, "clipserve, batching off", "text_short", clients, taken["off"])
    top = outcome.point(model, "grpc.aio, no model (transport ceiling)", "text_short", clients,
                        taken["ceiling"])
    outcome.targets.append(result(
        "batching_speedup", ratio(on["items_per_s"], no["items_per_s"]),
        f"{model}: {on['items_per_s']:.0f} vs {no['items_per_s']:.0f} texts/s at {clients} "
        f"clients (mean batch {on['mean_batch'] or 0:.1f} vs 1); grpc.aio answering without "
        f"a model: {top['items_per_s']:.0f} requests/s, the most any grpc.aio server serves "
        f"here ({ratio(top['items_per_s'], no['items_per_s']):.2f}x batching off)",
    ))


def one_answer(address: str, scenario: str) -> bytes:
    """The serialised answer of the server at `address` to `scenario`'s first request."""
    work = payloads.workload(scenario, 224)
    with grpc.insecure_channel(address) as channel:
        answer: bytes = channel.unary_unary(work.method)(work.requests[0], timeout=60)
    return answer


def vs_pytorch(plan: Plan, outcome: Outcome, lg: LoadGenerator, server: InProcessServer,
               model: str, clients: int = 16, scenario: str = "jpeg_640x480") -> None:
    """clipserve vs open_clip per request in a plain grpc.aio server, same JPEGs, interleaved."""
    root = source_root()
    if root is None:
        raise RuntimeError("the PyTorch reference server lives in a source checkout (benchmarks/)")
    manifest = json.loads((Path(server.settings.model_repository) / "clipserve.json").read_text())
    arch = manifest["source"]["model_name"]
    torch_server = SubprocessServer(
        [sys.executable, str(root / "benchmarks" / "torch_server.py"), "--model", arch],
        "PyTorch reference server",
    ).start()
    try:
        outcome.extra["pytorch_parity_cosine"] = _same_embedding(server.address,
                                                                 torch_server.address)
        taken = interleave(plan.rounds, {
            "clipserve": lambda: load_point(lg, server.address, scenario, clients,
                                            seconds=plan.seconds, warmup_s=plan.warmup_s,
                                            server=server),
            "pytorch": lambda: load_point(lg, torch_server.address, scenario, clients,
                                          seconds=plan.seconds, warmup_s=plan.warmup_s),
        })
    finally:
        torch_server.stop()
    ours = outcome.point(model, "clipserve", scenario, clients, taken["clipserve"])
    ref = outcome.point(model, "PyTorch per request (grpc.aio)", scenario, clients,
                        taken["pytorch"])
    outcome.targets.append(result(
        "vs_pytorch", ratio(ours["items_per_s"], ref["items_per_s"]),
        f"{model}, {scenario}: {ours['items_per_s']:.1f} vs {ref['items_per_s']:.1f} images/s at "
        f"{clients} clients; embedding cosine between the two "
        f"{outcome.extra['pytorch_parity_cosine']:.6f}",
    ))


def _same_embedding(ours: str, theirs: str) -> float:
    """Cosine between the two servers' embeddings of the same JPEG (same weights expected)."""
    import grpc

    from clipserve.v1 import clip_service_pb2 as pb
    from clipserve.v1 import clip_service_pb2_grpc as pb_grpc

    data, _ = payloads.photos(640, 480)
    request = pb.EncodeImageRequest(images=[pb.Image(data=data[0])])
    vectors = []
    for address in (ours, theirs):
        with grpc.insecure_channel(address) as channel:
            reply = pb_grpc.ClipServiceStub(channel).EncodeImage(request, timeout=120)
        vectors.append(np.asarray(reply.embeddings[0].values, dtype=np.float64))
    a, b = vectors
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def length_buckets(plan: Plan, outcome: Outcome, server: InProcessServer, model: str,
                   chunk: int = 50, in_flight: int = 4, target: bool = True) -> None:
    """The 1,000 ImageNet prompts: default length buckets vs forced to 77, interleaved."""
    forced = InProcessServer(
        Path(server.settings.model_repository), text_length_buckets="77",
        **plan.server_overrides(),
    ).start()
    prompts = payloads.imagenet_prompts()[: 200 if plan.quick else None]
    embeddings: dict[str, np.ndarray] = {}
    times: dict[str, list[float]] = {"buckets": [], "77": []}
    try:
        for _ in range(max(1, plan.rounds - 1)):
            for name, srv in (("buckets", server), ("77", forced)):
                seconds, matrix = _encode_all(srv.address, prompts, chunk, in_flight)
                times[name].append(seconds)
                embeddings.setdefault(name, matrix)
    finally:
        forced.stop()
    a, b = embeddings["buckets"], embeddings["77"]
    diff = float(np.abs(a - b).max())
    cosine = float(np.min(np.sum(a * b, axis=1)))
    t_buckets, t_77 = statistics.median(times["buckets"]), statistics.median(times["77"])
    n = len(prompts)
    for name, t in (("clipserve", t_buckets), ("clipserve, --text-length-buckets 77", t_77)):
        outcome.points.append({
            "model": model, "system": name, "scenario": "imagenet_prompts",
            "concurrency": in_flight, "requests": n // chunk, "items": n, "seconds": t,
            "items_per_s": n / t, "requests_per_s": n / chunk / t,
        })
    detail = (
        f"{model}: {n / t_buckets:.0f} vs {n / t_77:.0f} texts/s ({n} prompts in requests of "
        f"{chunk}, {in_flight} in flight); embeddings max |diff| {diff:.2e}, min cosine "
        f"{cosine:.7f}"
    )
    outcome.extra.setdefault("length_buckets", {})[model] = {
        "max_abs_diff": diff, "min_cosine": cosine, "speedup": ratio(t_77, t_buckets),
    }
    if target:
        outcome.targets.append(result("length_buckets_speedup", ratio(t_77, t_buckets), detail))
    else:
        outcome.notes.append(f"length buckets {ratio(t_77, t_buckets):.2f}x on {detail}")


def _encode_all(address: str, texts: list[str], chunk: int, in_flight: int,
                ) -> tuple[float, np.ndarray]:
    """EncodeText of every text, `chunk` per request, `in_flight` requests at a time."""
    import grpc

    from clipserve.v1 import clip_service_pb2 as pb
    from clipserve.v1 import clip_service_pb2_grpc as pb_grpc

    requests = [
        pb.EncodeTextRequest(texts=texts[i : i + chunk], format=pb.EMBEDDING_FORMAT_FP32_BYTES)
        for i in range(0, len(texts), chunk)
    ]
    rows: list[np.ndarray] = [np.empty(0)] * len(requests)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ClipServiceStub(channel)
        started = time.perf_counter()
        pending: list[tuple[int, Any]] = []
        for index, request in enumerate(requests):
            pending.append((index, stub.EncodeText.future(request, timeout=600)))
            if len(pending) >= in_flight:
                i, future = pending.pop(0)
                rows[i] = _matrix(future.result())
        for i, future in pending:
            rows[i] = _matrix(future.result())
        seconds = time.perf_counter() - started
    return seconds, np.concatenate(rows)


def _matrix(reply: Any) -> np.ndarray:
    return np.stack([np.frombuffer(e.raw, dtype="<f4") for e in reply.embeddings])


def label_cache(plan: Plan, outcome: Outcome, server: InProcessServer, model: str,
                target: bool = True) -> None:
    """Classify with 1,000 labels: the first call (label cache empty) vs the second."""
    import grpc

    from clipserve.v1 import clip_service_pb2 as pb
    from clipserve.v1 import clip_service_pb2_grpc as pb_grpc

    data, _ = payloads.photos(640, 480)
    request = pb.ClassifyRequest(
        images=[pb.Image(data=data[0])], labels=payloads.unique_labels(payloads.imagenet_classes()),
        templates=[payloads.PROMPT], top_k=5,
    )
    first, second = [], []
    with grpc.insecure_channel(server.address) as channel:
        classify = pb_grpc.ClipServiceStub(channel).Classify
        for _ in range(1 if plan.quick else max(3, plan.rounds)):
            server.clear_label_cache()
            for times in (first, second):
                started = time.perf_counter()
                classify(request, timeout=600)
                times.append(time.perf_counter() - started)
    t1, t2 = statistics.median(first), statistics.median(second)
    outcome.extra.setdefault("label_cache_ms", {})[model] = {
        "first": [t * 1e3 for t in first], "second": [t * 1e3 for t in second],
    }
    detail = (
        f"{model}: first call {t1 * 1e3:.1f} ms, second {t2 * 1e3:.1f} ms (medians of "
        f"{len(first)}; one 640x480 JPEG, 1,000 labels, one template)"
    )
    if target:
        outcome.targets.append(result("label_cache_speedup", ratio(t1, t2), detail))
    else:
        outcome.notes.append(f"label cache {ratio(t1, t2):.2f}x on {detail}")


def memory(plan: Plan, outcome: Outcome, lg: LoadGenerator, model: str,
           clients: int = 16, steps: int = 10) -> None:
    """Server subprocess: peak RSS vs model files; RSS growth over cheap requests."""
    root = repository(plan, model)
    files = model_files_bytes(root)
    flags = plan.server_flags()
    server = SubprocessServer(clipserve_command(root, *flags), f"clipserve {model}").start()
    try:
        ready = proc_status(server.pid)
        per_step = max(1, plan.memory_requests // steps)
        series, samples = [], []
        for _ in range(steps):
            samples.append(load_point(lg, server.address, "text_short", clients, count=per_step))
            series.append(proc_status(server.pid)["VmRSS"])
        final = proc_status(server.pid)
    finally:
        server.stop()
    outcome.point(model, "clipserve (subprocess)", "text_short", clients, merged(samples))
    baseline = series[0]  # after the first step: allocator pools and caches have settled
    growth = (series[-1] - baseline) / baseline * 100.0
    peak = final["VmHWM"] / files
    mib = 1 << 20
    outcome.extra["memory"] = {
        "model": model, "model_files_bytes": files, "ready": ready, "final": final,
        "rss_series": series, "requests": per_step * steps,
    }
    lean = _lean_peak(plan, lg, root, flags)
    outcome.extra["memory"]["lean"] = lean
    outcome.targets.append(result(
        "memory_peak_ratio", lean["peak"] / files,
        f"{model}: peak RSS {lean['peak'] / mib:.0f} MiB with {lean_configuration()} (after "
        f"{lean['images']} images and {lean['texts']} texts; at ready {lean['ready'] / mib:.0f} "
        f"MiB) vs model files {files / mib:.0f} MiB; default settings {peak:.2f}x "
        f"({final['VmHWM'] / mib:.0f} MiB)",
    ))
    outcome.targets.append(result(
        "memory_growth", growth,
        f"{model}: RSS {baseline / mib:.0f} MiB after {per_step} requests -> "
        f"{series[-1] / mib:.0f} MiB after {per_step * steps} (EncodeText short, {clients} "
        f"clients); at ready {ready['VmRSS'] / mib:.0f} MiB",
    ))


#: The memory-bound CPU configuration of docs/performance.md: one copy of the weights (no
#: pre-packing), activations returned after each batch (no arena), and batch shapes whose
#: activations stay small (CPU throughput barely grows beyond a batch of 4 images).
LEAN_FLAGS = ("--no-prepack-weights", "--no-cpu-mem-arena", "--vision-max-batch-size", "4",
              "--text-max-batch-size", "16")
#: ... and two glibc malloc arenas instead of up to eight per core: without ONNX Runtime's
#: arena every batch's activations come from malloc, and each thread that allocates while
#: another holds an arena's lock gets an arena of its own, which keeps what it freed. The
#: peak then depends on how many arenas the threads happened to touch (docs/performance.md).
LEAN_ENV = {"MALLOC_ARENA_MAX": "2"}


def lean_configuration() -> str:
    """The memory-lean configuration as a command line's environment and flags."""
    return " ".join([*(f"{k}={v}" for k, v in LEAN_ENV.items()), *LEAN_FLAGS])


def _lean_peak(plan: Plan, lg: LoadGenerator, root: Path, flags: list[str]) -> dict[str, Any]:
    """Peak RSS of a server started with `LEAN_FLAGS`, after full image and text batches."""
    server = SubprocessServer(clipserve_command(root, *flags, *LEAN_FLAGS),
                              "clipserve (memory-lean)", env=LEAN_ENV).start()
    images, texts = (8, 64) if plan.quick else (16, 400)
    try:
        environ = proc_environ(server.pid, LEAN_ENV)  # what the server really runs with
        ready = proc_status(server.pid)["VmHWM"]
        load_point(lg, server.address, "tensor", 4, count=images, image_size=image_size(root))
        load_point(lg, server.address, "text_77", 16, count=texts)
        peak = proc_status(server.pid)["VmHWM"]
    finally:
        server.stop()
    return {"flags": list(LEAN_FLAGS), "env": environ, "ready": ready, "peak": peak,
            "images": images, "texts": texts}


def script(name: str, *args: str, timeout_s: float = 900) -> dict[str, Any]:
    """Run benchmarks/<name> with --json; its JSON result."""
    root = source_root()
    if root is None:
        raise RuntimeError(f"benchmarks/{name} lives in a source checkout")
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / name), *args, "--json"],
        capture_output=True, text=True, timeout=timeout_s, check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed: {done.stderr.strip()[-500:]}")
    data: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return data


#: clipserve's preprocessing paths in bench_preprocess.py's rows, and how each is chosen.
PREPROCESS_PATHS = {
    "clipserve exact": "exact, the default",
    "clipserve simd": "--preprocess-simd",
    "clipserve fast": "fast mode, library only",
}
#: The paths a server can be told to take (the target measures one of them).
SERVED_PATHS = ("clipserve exact", "clipserve simd")


def preprocess_choice(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The fastest of the server's paths whose every image (photos and detail mosaics) is
    within the parity requirement; the exact path (bit-for-bit) whenever nothing faster is."""
    within = [
        row for name, row in rows.items()
        if name in SERVED_PATHS and _worst(row) < PARITY_LIMIT
    ]
    return max(within, key=lambda row: row["vs_open_clip"], default=rows["clipserve exact"])


def _worst(row: dict[str, Any]) -> float:
    return float(max(row["parity_worst"], row["detail_worst"]))


def preprocessing(plan: Plan, outcome: Outcome) -> None:
    rounds, seconds = ("1", "0.3") if plan.quick else ("5", "1.0")
    data = script("bench_preprocess.py", "--sizes", "1920x1080", "--rounds", rounds,
                  "--seconds", seconds)
    outcome.extra["preprocess"] = data
    rows = {r["implementation"]: r for r in data["rows"]}
    best = preprocess_choice(rows)
    parts = [
        f"{PREPROCESS_PATHS[name]}: {row['vs_open_clip']:.2f}x ({row['per_core']:.1f} img/s/core),"
        f" parity {row['parity_mean']:.4f}, worst {_worst(row):.4f}"
        for name, row in rows.items() if name in PREPROCESS_PATHS
    ]
    if data.get("simd_missing"):
        parts.append(f"--preprocess-simd not measured: {data['simd_missing']}")
    outcome.targets.append(result(
        "preprocess_speedup", best["vs_open_clip"],
        f"{PREPROCESS_PATHS[best['implementation']]} (the fastest within {PARITY_LIMIT} levels)"
        f" vs open_clip {rows['open_clip']['per_core']:.1f} img/s/core; " + "; ".join(parts),
    ))


def tokenizer(plan: Plan, outcome: Outcome, root: Path) -> None:
    rounds, seconds = ("1", "0.3") if plan.quick else ("5", "0.5")
    data = script("bench_tokenizer.py", "--repository", str(root), "--rounds", rounds,
                  "--seconds", seconds)
    outcome.extra["tokenizer"] = data
    outcome.targets.append(result(
        "tokenizer_speedup", data["speedup"] if data["identical_ids"] else math.nan,
        f"{data['strings']} strings: {data['clipserve_per_core']:.0f} vs "
        f"{data['open_clip_per_core']:.0f} strings/s/core; identical ids: "
        f"{data['identical_ids']}",
    ))




# -- the whole run --------------------------------------------------------------------------
SWEEP_TINY = tuple(payloads.SCENARIOS)
SWEEP_IMAGE_MODEL = ("tensor", "jpeg_640x480", "text_short")
#: the larger model's sweep stops at 16 clients: every point waits for two answers per client
IMAGE_MODEL_MAX_CLIENTS = 16
#: ViT-L-14 serves a few images a second on 2 cores: its sweep stops at 4 clients, and its
#: batches at 4 images and 16 texts, so that warm-up runs few large shapes
LARGE_MODEL_MAX_CLIENTS = 4
LARGE_MODEL_SERVER = {"vision_max_batch_size": 4, "text_max_batch_size": 16}


def run_plan(plan: Plan, on_section: Callable[[Outcome], None] | None = None) -> Outcome:
    """Every section of `plan`, models in turn (one in-process server each), then the rest."""
    outcome = Outcome(on_section=on_section)
    outcome.extra["photos"] = payloads.photos(8, 8)[1]
    with LoadGenerator() as lg:
        for sweep_plan in plan.sweeps():
            model = sweep_plan.model
            with section(outcome, f"{model} server"):
                root = repository(plan, model)
                settings = {**plan.server_overrides(), **sweep_plan.server}
                with InProcessServer(root, **settings) as server:
                    _model_sections(plan, outcome, lg, server, sweep_plan)
        if plan.runs("preprocess"):
            with section(outcome, "preprocess", "preprocess_speedup"):
                preprocessing(plan, outcome)
        if plan.runs("tokenizer"):
            with section(outcome, "tokenizer", "tokenizer_speedup"):
                tokenizer(plan, outcome, repository(plan, TINY))
        if plan.runs("memory"):
            with section(outcome, "memory", "memory_peak_ratio", "memory_growth"):
                memory(plan, outcome, lg, plan.memory_model)
    measured = {t.target.key for t in outcome.targets}
    for name, keys in SECTION_TARGETS.items():
        reason = f"skipped (--skip {name})" if name in plan.skip else "not measured: see notes"
        skipped(outcome, reason, *(k for k in keys if k not in measured))
    order = list(TARGETS)
    outcome.targets.sort(key=lambda t: order.index(t.target.key))
    return outcome


def _model_sections(plan: Plan, outcome: Outcome, lg: LoadGenerator, server: InProcessServer,
                    sweep_plan: Sweep) -> None:
    model = sweep_plan.model
    steps: list[tuple[str, tuple[str, ...], Callable[[], None]]] = []
    if plan.runs("sweep"):
        steps.append(("sweep", (), lambda: sweep(
            outcome, lg, server, model, sweep_plan.scenarios, sweep_plan.concurrency,
            plan.seconds, plan.warmup_s,
        )))
    # Length buckets and the label cache save text-tower compute: their targets are measured on
    # the image model (ViT-B-32 in the full run), where that compute is what a request costs; on
    # the tiny model the per-request cost of gRPC and Python caps both ratios (shown as well).
    target = model == plan.image_model
    if model == TINY or target:
        if plan.runs("lengths"):
            steps.append(("lengths", ("length_buckets_speedup",) if target else (),
                          lambda: length_buckets(plan, outcome, server, model, target=target)))
        if plan.runs("labels"):
            steps.append(("labels", ("label_cache_speedup",) if target else (),
                          lambda: label_cache(plan, outcome, server, model, target=target)))
    if model == TINY and plan.runs("batching"):
        steps.append(("batching", ("batching_speedup",),
                      lambda: batching(plan, outcome, lg, server, model)))
    if model == plan.image_model:
        if plan.runs("engine"):
            steps.append(("engine", SECTION_TARGETS["engine"],
                          lambda: engine_fraction(plan, outcome, lg, server, model)))
        if plan.runs("pytorch"):
            steps.append(("pytorch", SECTION_TARGETS["pytorch"],
                          lambda: vs_pytorch(plan, outcome, lg, server, model)))
    for name, keys, step in steps:
        with section(outcome, f"{model} {name}", *keys):
            step()
