"""ONNX Runtime sessions: provider choice, thread settings, padded batch execution.

Only this module imports onnxruntime. A tower runs one numpy batch at a time (the batcher gives
each tower its own inference thread) and checks the output against the batch it was given.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from clipserve.repository import RepositoryError
from clipserve.server.errors import ModelFailure
from clipserve.server.settings import Device

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def usable_cores() -> int:
    """Cores this process may run on (cgroup/affinity aware where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class EngineOptions:
    device: Device = Device.AUTO
    intra_op_threads: int = 0  # 0: usable_cores()


def choose_providers(device: Device) -> list[str | tuple[str, dict[str, str]]]:
    """Execution providers for `device`; CUDA first when asked for or available."""
    available = ort.get_available_providers()
    cuda_options = {
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",
        "do_copy_in_default_stream": "1",
    }
    if device is Device.CPU:
        return [CPU]
    if CUDA in available:
        return [(CUDA, cuda_options), CPU]
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
        threads = options.intra_op_threads or usable_cores()
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = threads
        session_options.inter_op_num_threads = 1
        session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session_options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=session_options, providers=choose_providers(options.device)
            )
        except RepositoryError:
            raise
        except Exception as exc:  # ORT raises its own exception types for corrupt files
            raise RepositoryError(f"cannot load {name} model {path.name}: {exc}") from exc
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
        log.info("%s model on %s with %d threads", name, self.provider, threads)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """batch: [N, ...] -> embeddings [N, D]."""
        try:
            (out,) = self._session.run([self.output_name], {self.input_name: batch})
        except Exception as exc:
            log.exception("%s inference failed on input %s", self.name, batch.shape)
            raise ModelFailure(f"{self.name} inference failed") from exc
        if out.shape[0] != batch.shape[0]:
            raise ModelFailure(
                f"{self.name} returned {out.shape[0]} rows for a batch of {batch.shape[0]}"
            )
        return out


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
