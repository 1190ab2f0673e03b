"""ONNX Runtime sessions: provider choice, thread settings, padded batch execution.

Only this module (and `binding`, its I/O binding helper) imports onnxruntime. A tower runs one
numpy batch at a time (the batcher gives each tower its own inference thread) and checks the
output against the batch it was given. On CUDA with `io_binding`, batches go through host
staging buffers per shape (`batch_buffer`) and bound device buffers, optionally replayed as
CUDA graphs; see docs/performance.md for the GPU settings.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from clipserve.repository import RepositoryError
from clipserve.server.binding import CUDA_GRAPH_WARMUP_RUNS, IoBinder
from clipserve.server.errors import ModelFailure
from clipserve.server.settings import Device

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


def usable_cores() -> int:
    """Cores this process may run on (cgroup/affinity aware where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def lower_thread_priority(niceness: int) -> None:
    """Add `niceness` to the calling thread's (Linux threads have their own; elsewhere the call
    would reach the whole process, so nothing is done). A pool's thread initializer."""
    if niceness <= 0 or sys.platform != "linux":
        return
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + niceness))
    except OSError as exc:  # e.g. a seccomp profile that refuses it: keep serving
        log.warning("cannot lower the priority of thread %s: %s", threading.current_thread().name,
                    exc)


@dataclass(frozen=True)
class EngineOptions:
    device: Device = Device.AUTO
    intra_op_threads: int = 0  # 0: usable_cores()
    intra_op_spinning: bool = False  # ORT threads busy-wait for work between operators
    prepack_weights: bool = True  # CPU kernels keep a re-laid-out copy of matrix weights
    cpu_mem_arena: bool = True  # CPU activations stay in ONNX Runtime's arena between runs
    gpu_mem_limit_mb: int = 0  # CUDA arena limit per session (0: no limit)
    cudnn_conv_algo_search: str = "HEURISTIC"  # EXHAUSTIVE, HEURISTIC or DEFAULT
    io_binding: bool = True  # CUDA: staging buffers and bound device buffers per shape
    cuda_graphs: bool = False  # CUDA: capture each batch shape once, replay it (needs binding)
    tensorrt: bool = False  # TensorRT EP in front of CUDA, when onnxruntime has it
    tensorrt_cache_dir: str = ""  # engine and timing caches ("" : rebuilt at every start)
    tensorrt_fp16: bool = False
    #: TensorRT optimisation profile of the tower's input: (min, opt, max) shapes.
    tensorrt_profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None


def per_instance(options: EngineOptions, instances: int) -> EngineOptions:
    """One model instance's options: unless set, its threads are the usable cores shared out
    between the tower's instances (at least one each)."""
    threads = options.intra_op_threads or max(1, usable_cores() // instances)
    return replace(options, intra_op_threads=threads)


def cuda_provider_options(options: EngineOptions) -> dict[str, str]:
    """The CUDA EP's options (ONNX Runtime takes them as strings)."""
    cuda = {
        # grow the arena by what is asked for, not by powers of two: memory stays near the need
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": options.cudnn_conv_algo_search.upper(),
        "do_copy_in_default_stream": "1",
    }
    if options.gpu_mem_limit_mb > 0:
        cuda["gpu_mem_limit"] = str(options.gpu_mem_limit_mb << 20)
    if options.cuda_graphs:
        cuda["enable_cuda_graph"] = "1"
    return cuda


def tensorrt_provider_options(options: EngineOptions, input_name: str) -> dict[str, str]:
    """The TensorRT EP's options: caches, precision and the input's shape profile."""
    trt = {"trt_fp16_enable": "True" if options.tensorrt_fp16 else "False"}
    if options.tensorrt_cache_dir:
        trt.update(
            trt_engine_cache_enable="True",
            trt_engine_cache_path=options.tensorrt_cache_dir,
            trt_timing_cache_enable="True",
            trt_timing_cache_path=options.tensorrt_cache_dir,
        )
    if options.tensorrt_profile is not None:
        low, opt, high = ("x".join(str(d) for d in shape) for shape in options.tensorrt_profile)
        trt.update(
            trt_profile_min_shapes=f"{input_name}:{low}",
            trt_profile_opt_shapes=f"{input_name}:{opt}",
            trt_profile_max_shapes=f"{input_name}:{high}",
        )
    return trt


def choose_providers(
    device: Device, options: EngineOptions | None = None, input_name: str = ""
) -> list[str | tuple[str, dict[str, str]]]:
    """Execution providers for `device`; CUDA first when asked for or available."""
    available = ort.get_available_providers()
    options = options or EngineOptions(device=device)
    if device is Device.CPU:
        return [CPU]
    if CUDA in available:
        providers: list[str | tuple[str, dict[str, str]]] = [
            (CUDA, cuda_provider_options(options)), CPU
        ]
        if options.tensorrt:
            if TENSORRT in available:
                providers.insert(0, (TENSORRT, tensorrt_provider_options(options, input_name)))
            else:
                log.warning("--tensorrt: this onnxruntime has no TensorrtExecutionProvider")
        return providers
    if device is Device.CUDA:
        raise RepositoryError(
            "--device cuda was asked for but this onnxruntime has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}); install the `gpu` extra (onnxruntime-gpu)"
        )
    log.warning(
        "device auto: no CUDAExecutionProvider in this onnxruntime (%s); running on CPU",
        ", ".join(available),
    )
    return [CPU]


class OnnxTower:
    """One ONNX model with a single input and a single output, batch first."""

    def __init__(
        self, name: str, path: Path, input_name: str, output_name: str, options: EngineOptions
    ) -> None:
        self.name = name
        self._path = path
        self._options = options
        self._input = input_name
        threads = options.intra_op_threads or usable_cores()
        self._session = self._load(threads)
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        if input_name not in inputs or output_name not in outputs:
            raise RepositoryError(
                f"{name} model has inputs {sorted(inputs)} and outputs {sorted(outputs)}; "
                f"the manifest expects {input_name!r} -> {output_name!r}"
            )
        self.input_name = input_name
        self.output_name = output_name
        self.input_shape: list[int | str | None] = list(inputs[input_name].shape)
        self.output_shape: list[int | str | None] = list(outputs[output_name].shape)
        self.provider = self._session.get_providers()[0]
        self._check_provider()
        self._buffers: dict[tuple[tuple[int, ...], str], np.ndarray] = {}
        self._binder = self._bind()
        log.info(
            "%s model on %s with %d threads%s", name, self.provider, threads,
            "" if self._binder is None else (
                ", I/O binding" + (" and CUDA graphs" if self._binder.cuda_graphs else "")
            ),
        )

    def _check_provider(self) -> None:
        """ONNX Runtime falls back to CPU when the CUDA provider cannot start (a missing CUDA
        or cuDNN library, no GPU): an error for `--device cuda`, a loud warning for auto."""
        if self._options.device is Device.CPU or self.provider in (CUDA, TENSORRT):
            return
        if CUDA not in ort.get_available_providers():
            return  # auto on a CPU-only onnxruntime: choose_providers already said so
        if self._options.device is Device.CUDA:
            raise RepositoryError(
                f"--device cuda: the {self.name} model runs on {self.provider} because "
                "onnxruntime's CUDA provider could not start (no GPU visible, or the CUDA 13 / "
                "cuDNN 9 libraries are not on the library path)"
            )
        log.warning(
            "device auto: onnxruntime's CUDA provider could not start; the %s model runs on %s",
            self.name, self.provider,
        )

    def _bind(self) -> IoBinder | None:
        """I/O binding on CUDA when asked for (`io_binding`); None runs `session.run`."""
        if not self._options.io_binding or self.provider not in (CUDA, TENSORRT):
            return None
        dim = self.output_shape[-1]
        if not isinstance(dim, int):
            log.warning("%s output dimension is not fixed: no I/O binding", self.name)
            return None
        return IoBinder(
            self._session, self.input_name, self.output_name, dim, device="cuda",
            cuda_graphs=self._options.cuda_graphs,
        )

    @property
    def warmup_runs(self) -> int:
        """Runs of each shape at warm-up: CUDA graphs are captured only after a few runs."""
        graphs = self._binder is not None and self._binder.cuda_graphs
        return CUDA_GRAPH_WARMUP_RUNS if graphs else 1

    def batch_buffer(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """A reusable host buffer for a batch of `shape`: fill it and pass it to `run`.

        With I/O binding it is the shape's (page-locked) staging buffer, so the batch is
        written once and copied to the device from there. Otherwise it is the first rows of one
        buffer per row shape, grown to the most rows asked for, so batches of every size (unpadded
        on the CPU) share one allocation. Use it on the inference thread only.
        """
        if self._binder is not None:
            return self._binder.staging(shape, dtype)
        rows, row_shape = shape[0], tuple(shape[1:])
        key = (row_shape, np.dtype(dtype).str)
        buffer = self._buffers.get(key)
        if buffer is None or len(buffer) < rows:
            buffer = self._buffers[key] = np.zeros((rows, *row_shape), dtype=dtype)
        return buffer[:rows]

    def _load(self, threads: int) -> ort.InferenceSession:
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = threads
        session_options.inter_op_num_threads = 1
        session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session_options.log_severity_level = 3
        # Spinning ORT threads keep the cores busy between operators: a little faster alone,
        # slower when gRPC, preprocessing and the other tower need the same cores.
        session_options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if self._options.intra_op_spinning else "0"
        )
        # Off: activation buffers go back to the allocator after each run instead of staying in
        # an arena sized for the largest batch shape seen (warm-up included).
        session_options.enable_cpu_mem_arena = self._options.cpu_mem_arena
        if not self._options.prepack_weights:  # one copy of the weights, not two
            session_options.add_session_config_entry("session.disable_prepacking", "1")
        try:
            return ort.InferenceSession(
                str(self._path), sess_options=session_options,
                providers=choose_providers(self._options.device, self._options, self._input),
            )
        except RepositoryError:
            raise
        except Exception as exc:  # ORT raises its own exception types for corrupt files
            raise RepositoryError(
                f"cannot load {self.name} model {self._path.name}: {exc}"
            ) from exc

    def reload(self) -> None:
        """Replace the session with a fresh one from the same file (after repeated failures).

        Call it on the tower's inference thread (`DynamicBatcher.run_exclusive`), never while
        a batch runs. Raises RepositoryError when the file no longer loads.
        """
        threads = self._options.intra_op_threads or usable_cores()
        self._session = self._load(threads)
        if self._binder is not None:
            self._binder.close()
            self._binder = self._bind()
        log.warning("%s model session rebuilt from %s", self.name, self._path.name)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """batch: [N, ...] -> embeddings [N, D]."""
        try:
            if self._binder is not None:
                out = self._binder.run(batch)
            else:
                (out,) = self._session.run([self.output_name], {self.input_name: batch})
        except Exception as exc:
            log.exception("%s inference failed on input %s", self.name, batch.shape)
            raise ModelFailure(f"{self.name} inference failed") from exc
        if out.shape[0] != batch.shape[0]:
            raise ModelFailure(
                f"{self.name} returned {out.shape[0]} rows for a batch of {batch.shape[0]}"
            )
        return out


def open_instances(
    name: str, path: Path, input_name: str, output_name: str, options: EngineOptions, count: int
) -> list[OnnxTower]:
    """`count` model instances of one tower, each a session of its own (`per_instance`)."""
    own = per_instance(options, count)
    return [OnnxTower(name, path, input_name, output_name, own) for _ in range(count)]


def pads_batches(spec: str, provider: str) -> bool:
    """Whether batches are padded up to a bucket: always, except `--batch-buckets auto` on the
    CPU provider, where a new batch size costs no more than a known one."""
    return not (spec.strip().lower() == "auto" and provider == CPU)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n (buckets sorted ascending, the last one the maximum)."""
    for size in buckets:
        if size >= n:
            return size
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def pad_rows(batch: np.ndarray, rows: int) -> np.ndarray:
    """Pad [N, ...] to [rows, ...] with zeros (rows >= N)."""
    if batch.shape[0] == rows:
        return batch
    padded = np.zeros((rows, *batch.shape[1:]), dtype=batch.dtype)
    padded[: batch.shape[0]] = batch
    return padded
