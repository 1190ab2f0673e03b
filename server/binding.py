"""I/O binding of a tower's session: host staging buffers per batch shape, optional CUDA graphs.

Without binding, `session.run` takes a numpy batch the runner just stacked, copies it to the
device from pageable memory and allocates the output. With binding, each batch shape (a batch
bucket, and a length bucket for text) gets once:

* a host staging buffer the runner writes the batch into directly (page-locked on CUDA, so the
  copy to the GPU is one DMA transfer), and
* on CUDA, device buffers for input and output bound to the session; with CUDA graphs, each
  shape is captured as its own graph (`gpu_graph_id`) on first use and replayed after, which
  needs exactly these fixed device addresses.

Only this module and `engine` import onnxruntime. Binding to the CPU works too (the tests use
it); on CPU it saves the batch allocation, nothing else.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

#: ONNX Runtime runs a shape this many times before it captures its CUDA graph.
CUDA_GRAPH_WARMUP_RUNS = 3


@dataclass
class _Shape:
    """Everything bound for one input shape."""

    staging: np.ndarray  # host buffer the runner fills, [N, ...]
    binding: Any  # ort.IOBinding
    device_input: Any | None  # ort.OrtValue on the device (CUDA), None on CPU
    device_output: Any | None
    graph_id: int
    unpin: weakref.finalize | None  # unregisters the page-locked staging buffer, once


class IoBinder:
    """Runs a session through I/O binding with one set of buffers per input shape."""

    def __init__(
        self,
        session: ort.InferenceSession,
        input_name: str,
        output_name: str,
        output_dim: int,
        *,
        device: str = "cuda",  # "cuda" or "cpu"
        device_id: int = 0,
        cuda_graphs: bool = False,
    ) -> None:
        self._session = session
        self._input = input_name
        self._output = output_name
        self._dim = output_dim
        self._device = device
        self._device_id = device_id
        self._graphs = cuda_graphs and device == "cuda"
        self._shapes: dict[tuple[tuple[int, ...], str], _Shape] = {}
        self._run_options: dict[int, ort.RunOptions] = {}
        self._cudart = _cudart() if device == "cuda" else None

    @property
    def cuda_graphs(self) -> bool:
        return self._graphs

    def staging(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """The host buffer of `shape`: write the batch into it, then `run` it."""
        return self._get(tuple(shape), np.dtype(dtype)).staging

    def run(self, batch: np.ndarray) -> np.ndarray:
        """batch [N, ...] -> outputs [N, D] (a new host array)."""
        bound = self._get(batch.shape, batch.dtype)
        if batch is not bound.staging:
            np.copyto(bound.staging, batch)
        if bound.device_input is not None:
            bound.device_input.update_inplace(bound.staging)  # host -> device
        options = self._run_options.get(bound.graph_id) if self._graphs else None
        self._session.run_with_iobinding(bound.binding, options)
        if bound.device_output is not None:
            return bound.device_output.numpy()  # device -> host, a new array
        (out,) = bound.binding.copy_outputs_to_cpu()
        return np.asarray(out)

    def _get(self, shape: tuple[int, ...], dtype: np.dtype) -> _Shape:
        key = (shape, dtype.str)
        bound = self._shapes.get(key)
        if bound is None:
            bound = self._shapes[key] = self._create(shape, dtype)
        return bound

    def _create(self, shape: tuple[int, ...], dtype: np.dtype) -> _Shape:
        staging = np.zeros(shape, dtype=dtype)
        unpin = _pin(self._cudart, staging) if self._cudart is not None else None
        binding = self._session.io_binding()
        device_input = device_output = None
        graph_id = len(self._shapes) + 1  # 0 is ORT's default graph; one id per shape
        if self._device == "cuda":
            device_input = ort.OrtValue.ortvalue_from_numpy(staging, "cuda", self._device_id)
            device_output = ort.OrtValue.ortvalue_from_shape_and_type(
                (shape[0], self._dim), np.float32, "cuda", self._device_id
            )
            binding.bind_ortvalue_input(self._input, device_input)
            binding.bind_ortvalue_output(self._output, device_output)
            if self._graphs:
                options = ort.RunOptions()
                options.add_run_config_entry("gpu_graph_id", str(graph_id))
                self._run_options[graph_id] = options
        else:  # the CPU reads the staging buffer in place
            binding.bind_cpu_input(self._input, staging)
            binding.bind_output(self._output, "cpu")
        log.debug("bound shape %s %s (pinned=%s, graph=%s)", shape, dtype, unpin is not None,
                  graph_id if self._graphs else "-")
        return _Shape(staging, binding, device_input, device_output, graph_id, unpin)

    def close(self) -> None:
        """Unpin the staging buffers (the session is being replaced or closed)."""
        for bound in self._shapes.values():
            if bound.unpin is not None:
                bound.unpin()
        self._shapes.clear()


def _cudart() -> Any | None:
    """The CUDA runtime library (for cudaHostRegister), or None where none is found."""
    names = [ctypes.util.find_library("cudart")]
    names += [f"libcudart.so.{v}" for v in (13, 12, 11)]
    for name in names:
        if not name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    log.info("libcudart not found: staging buffers stay pageable (one extra copy per batch)")
    return None


def _pin(cudart: Any, array: np.ndarray) -> weakref.finalize | None:
    """Page-lock `array`'s memory for fast, asynchronous host -> device copies.

    Returns the finalizer that unregisters it: called by `close`, or when the array is freed,
    before numpy releases the memory (a range freed while still registered makes the next
    allocation at that address fail to register). None where registering failed.
    """
    address = array.ctypes.data
    status = cudart.cudaHostRegister(
        ctypes.c_void_p(address), ctypes.c_size_t(array.nbytes), ctypes.c_uint(0)
    )
    if status != 0:
        cudart.cudaGetLastError()  # clear it: ONNX Runtime would report it as its own error
        log.warning("cudaHostRegister failed (%d): staging buffer stays pageable", status)
        return None
    return weakref.finalize(array, _unpin, cudart, address)


def _unpin(cudart: Any, address: int) -> None:
    if cudart.cudaHostUnregister(ctypes.c_void_p(address)) != 0:
        cudart.cudaGetLastError()
