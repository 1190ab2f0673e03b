"""The GPU check's measurements (run by benchmarks/gpu_check.sh, which installs and exports).

For an fp32 and an fp16 repository of the same model: fp16 parity against fp32 on the device,
images/s of the raw session at every batch bucket (plain `session.run`, I/O binding, CUDA
graphs), then images/s through gRPC (tensors and JPEGs, several load-generator processes),
texts/s, tensors again with two vision model instances and with a 0.5 ms interpreter switch
interval, and last open_clip's own image tower in PyTorch at the same buckets (fp16, eager:
the framework's figure on this GPU), with the GPU memory in use after each step. Prints one
line per figure and writes everything to a JSON file.

With ``--fp16-attention REPO`` (the fp16 export at ``--opset 23``, whose attention is one ONNX
``Attention`` node per layer, which recent CUDA providers can run with flash attention),
also: which execution provider ran each kind of node of it, its parity against fp32, and its
raw-session images/s next to the default export's.

    python benchmarks/gpu_check.py --fp32 REPO --fp16 REPO [--fp16-attention REPO]
                                   [--device cuda] [--out FILE] [--model-config FILE.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

with contextlib.suppress(ImportError):  # the GPU machine's PyTorch brings the CUDA 13
    import torch  # libraries that ONNX Runtime's CUDA provider needs
import onnxruntime as ort

from clipserve.bench.measure import Sample, engine_sample, load_point, merged
from clipserve.bench.servers import InProcessServer, LoadGenerator
from clipserve.repository import load_manifest
from clipserve.server.engine import EngineOptions, OnnxTower, choose_providers
from clipserve.server.preprocess_simd import unavailable as simd_unavailable
from clipserve.server.settings import Device

log = logging.getLogger("gpu_check")
RESULTS: dict[str, Any] = {}


def say(key: str, value: Any, text: str) -> None:
    RESULTS[key] = value
    print(text, flush=True)


def gpu_memory_mib() -> list[int]:
    """Memory in use per GPU (nvidia-smi), [] where there is none."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(line) for line in out.split() if line.strip().isdigit()]


def tower(repo: Path, device: Device, **options: Any) -> OnnxTower:
    manifest = load_manifest(repo)
    return OnnxTower("vision", repo / manifest.vision.file, manifest.vision.input,
                     manifest.vision.output, EngineOptions(device=device, **options))


def parity(fp32: Path, fp16: Path, device: Device, name: str = "fp16") -> None:
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((16, 3, 224, 224), dtype=np.float32)  # [16, 3, S, S]
    a = tower(fp32, device, io_binding=False).run(batch)
    b = tower(fp16, device, io_binding=False).run(batch)
    cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    say(f"{name}_vs_fp32_min_cosine", float(cosine.min()),
        f"{name} vs fp32 vision embeddings on {device.value}: min cosine {cosine.min():.6f} "
        f"(16 images; the export gate is 0.999 against PyTorch)")


def placement(name: str, repo: Path, device: Device) -> None:
    """Which execution provider ran each kind of node of the vision tower (ONNX Runtime's
    profile of one batch of 8): a node the CUDA provider does not take runs on the CPU."""
    manifest = load_manifest(repo)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / f"profile-{name}")
    session = ort.InferenceSession(str(repo / manifest.vision.file), options,
                                   providers=choose_providers(device))
    size = manifest.preprocess.size
    session.run(None, {manifest.vision.input: np.zeros((8, 3, size, size), np.float32)})
    events = json.loads(Path(session.end_profiling()).read_text())
    by_provider: dict[str, dict[str, int]] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            ops = by_provider.setdefault(args.get("provider", "?"), {})
            ops[args.get("op_name", "?")] = ops.get(args.get("op_name", "?"), 0) + 1
    say(f"placement/{name}", by_provider,
        f"{name} vision nodes by provider (one run): " + "; ".join(
            f"{provider}: " + ", ".join(f"{op} x{n}" for op, n in sorted(ops.items()))
            for provider, ops in by_provider.items()))


def raw_sessions(name: str, repo: Path, device: Device, buckets: list[int],
                 seconds: float) -> None:
    variants = {"session.run": {"io_binding": False}, "I/O binding": {"io_binding": True}}
    if device is Device.CUDA:
        variants["CUDA graphs"] = {"io_binding": True, "cuda_graphs": True}
    size = load_manifest(repo).preprocess.size
    rng = np.random.default_rng(0)
    for variant, options in variants.items():
        t = tower(repo, device, **options)
        for bucket in buckets:
            batch = t.batch_buffer((bucket, 3, size, size), np.float32)
            batch[...] = rng.standard_normal(batch.shape, dtype=np.float32)
            for _ in range(3):  # CUDA graphs are captured after a few runs of a shape
                t.run(batch)
            rate = engine_sample(t.run, batch, seconds).stats().items_per_s
            say(f"raw/{name}/{variant}/{bucket}", rate,
                f"raw {name} {variant:<12} batch {bucket:>3}: {rate:8.1f} images/s")
        del t
    say(f"gpu_mib/after_raw_{name}", gpu_memory_mib(), f"GPU memory in use: {gpu_memory_mib()} MiB")


def pytorch_reference(repo: Path, device: Device, buckets: list[int], seconds: float) -> None:
    """open_clip's own image tower in PyTorch on the same device, at the same buckets: what the
    framework gets from this GPU, for the raw sessions to be read against (fp16 weights on
    CUDA, fp32 on the CPU; eager, inference mode, embeddings normalised as the export's are).
    Well above the ONNX figures, it says the exported graph is what to improve."""
    import torch

    from clipserve.export.loader import load_model
    from clipserve.export.options import ExportOptions

    manifest = load_manifest(repo)
    cuda = device is Device.CUDA
    dtype = torch.float16 if cuda else torch.float32
    target = "cuda" if cuda else "cpu"
    label = "fp16" if cuda else "fp32"
    size = manifest.preprocess.size

    def measure() -> None:  # the model is freed when this returns
        options = ExportOptions(model=manifest.source.model_name, pretrained="none")
        model = load_model(options).model.to(target, dtype)

        def run(batch: torch.Tensor) -> None:
            with torch.inference_mode():
                model.encode_image(batch, normalize=True)
            if cuda:
                torch.cuda.synchronize()

        for bucket in buckets:
            batch = torch.randn(bucket, 3, size, size, device=target, dtype=dtype)
            run(batch)  # the first call of a shape picks its kernels
            rate = engine_sample(run, batch, seconds).stats().items_per_s  # type: ignore[arg-type]
            say(f"pytorch/{label}/{bucket}", rate,
                f"PyTorch {label} eager  batch {bucket:>3}: {rate:8.1f} images/s")

    measure()
    if cuda:
        torch.cuda.empty_cache()
    say(f"gpu_mib/after_pytorch_{label}", gpu_memory_mib(),
        f"GPU memory in use: {gpu_memory_mib()} MiB")


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by each thread of this process (the in-process server's), by
    Python thread name; threads Python did not start (ONNX Runtime's, gRPC's) are summed by
    their kernel name. Linux only ({} elsewhere)."""
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    tick = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {}
    for task in Path("/proc/self/task").glob("*"):
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            comm = (task / "comm").read_text().strip()
        except OSError:  # the thread ended
            continue
        name = names.get(int(task.name), f"other ({comm})")
        used[name] = used.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return used


def busiest_threads(before: dict[str, float], after: dict[str, float], seconds: float) -> str:
    """'name 97%, name 40%, ...': the threads' share of one core over `seconds`."""
    share = {k: (after[k] - before.get(k, 0.0)) / seconds for k in after}
    top = sorted(share.items(), key=lambda kv: -kv[1])[:6]
    return ", ".join(f"{name} {100 * value:.0f}%" for name, value in top if value >= 0.05)


def parallel(loadgens: list[LoadGenerator], **command: Any) -> Sample:
    """The same load from every load generator at once; one merged sample (rates add up)."""
    with ThreadPoolExecutor(len(loadgens)) as pool:
        samples = list(pool.map(lambda lg: load_point(lg, **command), loadgens))
    total = merged(samples)
    total.seconds = max(s.seconds for s in samples)  # they ran side by side
    return total


#: (scenario, items per request, clients per load generator) of each gRPC point.
ALL_SCENARIOS = (
    ("tensor", 8, 16), ("tensor", 16, 16), ("jpeg_640x480", 8, 16),
    ("jpeg_1920x1080", 4, 16), ("text_short", 16, 32),
)
TENSORS = ALL_SCENARIOS[:2]
JPEGS = ALL_SCENARIOS[2:4]


def served(name: str, repo: Path, device: Device, processes: int, seconds: float,
           settings: dict[str, Any],
           scenarios: tuple[tuple[str, int, int], ...] = ALL_SCENARIOS) -> None:
    loadgens = [LoadGenerator() for _ in range(processes)]
    try:
        with InProcessServer(repo, device=device, **settings) as server:
            say(f"gpu_mib/serving_{name}", gpu_memory_mib(),
                f"GPU memory after warm-up ({name}): {gpu_memory_mib()} MiB")
            for scenario, items, clients in scenarios:
                cpu_before, started = thread_cpu_seconds(), time.monotonic()
                sample = parallel(loadgens, address=server.address, scenario=scenario,
                                  concurrency=clients, items=items, seconds=seconds,
                                  warmup_s=1.0, server=server)
                threads = busiest_threads(cpu_before, thread_cpu_seconds(),
                                          time.monotonic() - started)
                stats = sample.stats()
                tag = f"{scenario} x{items}/request, {processes}x{clients} clients"
                say(f"grpc/{name}/{scenario}/{items}", {**stats.to_dict(), "threads": threads},
                    f"gRPC {name} {tag}: {stats.items_per_s:8.1f} items/s, p50 "
                    f"{stats.p50_ms:.1f} ms, p99 {stats.p99_ms:.1f} ms, batch "
                    f"{stats.mean_batch or 0:.1f}, errors {stats.errors}\n"
                    f"    server threads (share of one core, warm-up included): {threads}")
            say(f"gpu_mib/after_grpc_{name}", gpu_memory_mib(),
                f"GPU memory in use: {gpu_memory_mib()} MiB")
    finally:
        for lg in loadgens:
            lg.close()


def served_with_switch_interval(seconds: float, *args: Any) -> None:
    """`served(*args)` with the interpreter's thread switch interval set to `seconds`."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        served(*args)
    finally:
        sys.setswitchinterval(before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp32", type=Path, required=True)
    parser.add_argument("--fp16", type=Path, required=True)
    parser.add_argument("--fp16-attention", type=Path, default=None,
                        help="fp16 export at --opset 23 (ONNX Attention nodes), measured beside")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--buckets", default="1,8,16,32,64,128")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--processes", type=int, default=6, help="load-generator processes")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--model-config", type=Path, default=None,
                        help="an open_clip model config (JSON) to register first, for the "
                        "PyTorch reference of a model open_clip does not know")
    args = parser.parse_args()
    if args.model_config is not None:
        import open_clip

        open_clip.add_model_config(args.model_config)
    logging.basicConfig(level=logging.WARNING)
    if hasattr(ort, "preload_dlls") and args.device == "cuda":
        ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* packages, where installed
    device = Device(args.device)
    buckets = [int(b) for b in args.buckets.split(",")]
    started = time.monotonic()
    say("gpu_mib/start", gpu_memory_mib(), f"GPU memory in use at start: {gpu_memory_mib()} MiB")
    serving = {"vision_max_batch_size": max(buckets), "text_max_batch_size": 256,
               "max_items_per_request": 256, "max_queue_size": 8192,
               "max_concurrent_requests": 4096}
    steps = [
        ("parity", lambda: parity(args.fp32, args.fp16, device)),
        ("raw fp16", lambda: raw_sessions("fp16", args.fp16, device, buckets, args.seconds)),
        ("grpc fp16", lambda: served(
            "fp16", args.fp16, device, args.processes, args.seconds * 2, serving,
        )),
        # two model instances: one batch's host work (stacking, the copy in) overlaps the
        # other's kernels, on a second CUDA stream
        ("grpc fp16 2 instances", lambda: served(
            "fp16-2-instances", args.fp16, device, args.processes, args.seconds * 2,
            {**serving, "vision_instances": 2}, TENSORS,
        )),
        # the interpreter lock: a thread that wants it waits up to the switch interval (5 ms)
        # while the event loop parses requests; the inference thread needs it between the
        # steps of every batch
        ("grpc fp16 switch 0.5 ms", lambda: served_with_switch_interval(
            0.0005, "fp16-switch-0.5ms", args.fp16, device, args.processes, args.seconds * 2,
            serving, TENSORS,
        )),
        ("raw fp32", lambda: raw_sessions("fp32", args.fp32, device, buckets[:4], args.seconds)),
        # last: whatever PyTorch keeps on the GPU must not count in the server's memory figures
        ("pytorch", lambda: pytorch_reference(args.fp32, device, buckets, args.seconds)),
    ]
    missing = simd_unavailable()  # the simd extra's wheels, carried by gpu_wheels.sh
    if not missing:  # the JPEG points again with the SIMD JPEG path (--preprocess-simd)
        after = [name for name, _ in steps].index("grpc fp16") + 1  # the JPEG points again
        steps.insert(after, ("grpc fp16 simd JPEGs", lambda: served(
            "fp16-simd", args.fp16, device, args.processes, args.seconds * 2,
            {**serving, "preprocess_simd": True}, JPEGS,
        )))
    else:
        say("skipped/grpc fp16 simd JPEGs", missing,
            f"no SIMD JPEG points (gpu_wheels.sh SIMD=1 carries them): {missing}")
    if args.fp16_attention is not None:
        attention = args.fp16_attention
        steps[2:2] = [
            ("placement fp16-attention", lambda: placement("fp16-attention", attention, device)),
            ("parity fp16-attention", lambda: parity(args.fp32, attention, device,
                                                     "fp16-attention")),
            ("raw fp16-attention", lambda: raw_sessions("fp16-attention", attention, device,
                                                        buckets, args.seconds)),
        ]
    for name, step in steps:
        try:
            step()
        except Exception as exc:  # report and go on: one broken step must not hide the rest
            log.exception("step %s failed", name)
            say(f"failed/{name}", repr(exc), f"STEP FAILED: {name}: {exc!r}")
        args.out.write_text(json.dumps(RESULTS, indent=2, default=str))
    print(f"gpu check measured in {time.monotonic() - started:.0f}s; results in {args.out}")


if __name__ == "__main__":
    main()
