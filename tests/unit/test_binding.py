"""I/O binding of a session (`IoBinder`, on the CPU here) and the towers' reusable buffers."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from clipserve.repository import RepositoryError  # noqa: E402
from clipserve.server.binding import IoBinder  # noqa: E402
from clipserve.server.engine import (  # noqa: E402
    CUDA,
    EngineOptions,
    OnnxTower,
    cuda_provider_options,
    tensorrt_provider_options,
)
from clipserve.server.settings import Device  # noqa: E402
from clipserve.server.towers import VisionRunner  # noqa: E402

WEIGHTS = np.arange(3 * 4 * 4 * 5, dtype=np.float32).reshape(48, 5) / 100.0  # [3*4*4, 5]


def linear_model(path: Path) -> Path:
    """pixel_values [N, 3, 4, 4] -> flatten -> MatMul [48, 5] -> image_embeds [N, 5]."""
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["pixel_values"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["image_embeds"]),
        ],
        "linear",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor("w", TensorProto.FLOAT, WEIGHTS.shape, WEIGHTS.flatten())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def reference(batch: np.ndarray) -> np.ndarray:
    return batch.reshape(len(batch), -1) @ WEIGHTS


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return linear_model(tmp_path / "model.onnx")


def test_bound_runs_match_plain_runs_for_every_shape(model_path: Path) -> None:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    binder = IoBinder(session, "pixel_values", "image_embeds", 5, device="cpu")
    rng = np.random.default_rng(0)
    for n in (1, 4, 1, 2, 4):
        batch = rng.standard_normal((n, 3, 4, 4), dtype=np.float32)
        out = binder.run(batch)  # copied into the staging buffer
        np.testing.assert_allclose(out, reference(batch), rtol=1e-5)
        staging = binder.staging((n, 3, 4, 4), np.float32)
        staging[...] = batch[::-1]
        np.testing.assert_allclose(binder.run(staging), reference(batch[::-1]), rtol=1e-5)
    assert binder.staging((4, 3, 4, 4), np.float32) is binder.staging((4, 3, 4, 4), np.float32)
    assert not binder.cuda_graphs
    binder.close()


def test_outputs_are_not_overwritten_by_the_next_run(model_path: Path) -> None:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    binder = IoBinder(session, "pixel_values", "image_embeds", 5, device="cpu")
    ones = np.ones((2, 3, 4, 4), np.float32)
    first = binder.run(ones)
    kept = first.copy()
    binder.run(np.zeros((2, 3, 4, 4), np.float32))
    np.testing.assert_array_equal(first, kept)


def test_vision_runner_stacks_into_a_reused_padded_buffer(model_path: Path) -> None:
    tower = OnnxTower("vision", model_path, "pixel_values", "image_embeds",
                      EngineOptions(intra_op_threads=1))
    runner = VisionRunner(tower, 4, (1, 2, 4))
    rng = np.random.default_rng(1)
    images = [rng.standard_normal((3, 4, 4), dtype=np.float32) for _ in range(4)]
    out4 = runner(images)
    out3 = runner(images[:3])  # padded to 4 in the same buffer: the stale 4th row is zeroed
    np.testing.assert_allclose(np.stack(out4), reference(np.stack(images)), rtol=1e-5)
    np.testing.assert_allclose(np.stack(out3), reference(np.stack(images[:3])), rtol=1e-5)
    buffer = tower.batch_buffer((4, 3, 4, 4), np.float32)
    assert not buffer[3].any()
    assert runner.warm_up() == 3


def test_copy_rows_copies_every_kind_of_item_and_zeroes_the_rest() -> None:
    from clipserve.server.towers import copy_rows

    rng = np.random.default_rng(3)
    plain = rng.standard_normal((3, 4, 4), dtype=np.float32)
    request = np.frombuffer(plain[::-1].tobytes(), np.float32).reshape(3, 4, 4)  # read-only view
    wide = rng.standard_normal((3, 4, 4))  # float64: numpy converts it
    swapped = plain.astype(">f4")  # big-endian: same values, other bytes
    strided = rng.standard_normal((4, 4, 3), dtype=np.float32).transpose(2, 0, 1)
    items = [plain, request, wide, swapped, strided]
    out = np.full((7, 3, 4, 4), np.nan, np.float32)  # stale rows from an earlier batch
    copy_rows(items, out)
    np.testing.assert_array_equal(out[:5], np.stack(items).astype(np.float32))
    assert not out[5:].any()
    copy_rows([], out)
    assert not out.any()
    view = np.full((6, 3, 4, 4), np.nan, np.float32)[::2]  # not C-contiguous: numpy copies
    copy_rows(items[:2], view)
    np.testing.assert_array_equal(view[:2], np.stack(items[:2]))
    assert not view[2:].any()


def test_unpadded_runners_run_each_batch_at_its_own_size_in_one_buffer(
    model_path: Path,
) -> None:
    from clipserve.server.towers import TextRunner

    tower = OnnxTower("vision", model_path, "pixel_values", "image_embeds",
                      EngineOptions(intra_op_threads=1))
    shapes: list[tuple[int, ...]] = []
    real_run = tower.run

    def run(batch: np.ndarray) -> np.ndarray:
        shapes.append(batch.shape)
        return real_run(batch)

    tower.run = run  # type: ignore[method-assign]
    runner = VisionRunner(tower, 4, (1, 2, 4, 8), pad=False)
    assert runner.warm_up() == 4
    rng = np.random.default_rng(2)
    images = [rng.standard_normal((3, 4, 4), dtype=np.float32) for _ in range(7)]
    for n in (7, 3, 5):
        np.testing.assert_allclose(np.stack(runner(images[:n])), reference(np.stack(images[:n])),
                                   rtol=1e-5)
    assert shapes == [(b, 3, 4, 4) for b in (1, 2, 4, 8, 7, 3, 5)]
    # every size is a view of the one buffer that warm-up grew to the largest bucket
    assert np.shares_memory(tower.batch_buffer((3, 3, 4, 4), np.float32),
                            tower.batch_buffer((8, 3, 4, 4), np.float32))
    assert len(tower._buffers) == 1
    text = RecordingTower()
    runner_t = TextRunner(text, (1, 16), (8, 77), pad=False)  # type: ignore[arg-type]
    runner_t([np.array([1, 2, 3])] * 5, 8)
    assert text.shapes == [(5, 8)]  # unpadded rows, still the length bucket


def test_auto_buckets_pad_only_off_the_cpu() -> None:
    from clipserve.server.engine import pads_batches

    assert not pads_batches("auto", "CPUExecutionProvider")
    assert pads_batches("auto", "CUDAExecutionProvider")
    assert pads_batches("auto", "TensorrtExecutionProvider")
    assert pads_batches("pow2", "CPUExecutionProvider")
    assert pads_batches("1,8", "CPUExecutionProvider")


def test_cuda_and_tensorrt_provider_options() -> None:
    options = EngineOptions(gpu_mem_limit_mb=512, cudnn_conv_algo_search="EXHAUSTIVE",
                            cuda_graphs=True)
    cuda = cuda_provider_options(options)
    assert cuda["arena_extend_strategy"] == "kSameAsRequested"
    assert cuda["gpu_mem_limit"] == str(512 << 20)
    assert cuda["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert cuda["do_copy_in_default_stream"] == "1"
    assert cuda["enable_cuda_graph"] == "1"
    assert "gpu_mem_limit" not in cuda_provider_options(EngineOptions())
    trt = tensorrt_provider_options(
        EngineOptions(tensorrt=True, tensorrt_cache_dir="/cache", tensorrt_fp16=True,
                      tensorrt_profile=((1, 3, 224, 224), (16, 3, 224, 224), (16, 3, 224, 224))),
        "pixel_values",
    )
    assert trt["trt_engine_cache_path"] == trt["trt_timing_cache_path"] == "/cache"
    assert trt["trt_fp16_enable"] == "True"
    assert trt["trt_profile_min_shapes"] == "pixel_values:1x3x224x224"
    assert trt["trt_profile_max_shapes"] == "pixel_values:16x3x224x224"
    assert "trt_engine_cache_enable" not in tensorrt_provider_options(EngineOptions(), "x")


def test_no_binding_on_cpu(model_path: Path) -> None:
    tower = OnnxTower("vision", model_path, "pixel_values", "image_embeds",
                      EngineOptions(intra_op_threads=1, io_binding=True))
    assert tower.provider != CUDA
    assert tower._binder is None


def test_a_cuda_provider_that_cannot_start_is_an_error_for_device_cuda(
    model_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """onnxruntime-gpu without a usable GPU lists CUDA but runs the session on the CPU."""
    import clipserve.server.engine as engine

    if CUDA in ort.get_available_providers():
        pytest.fail("this test expects a CPU-only onnxruntime (the project's test install)")
    monkeypatch.setattr(engine.ort, "get_available_providers",
                        lambda: [CUDA, "CPUExecutionProvider"])
    with pytest.raises(RepositoryError, match="vision model runs on CPUExecutionProvider"):
        OnnxTower("vision", model_path, "pixel_values", "image_embeds",
                  EngineOptions(device=Device.CUDA, intra_op_threads=1))
    tower = OnnxTower("vision", model_path, "pixel_values", "image_embeds",
                      EngineOptions(device=Device.AUTO, intra_op_threads=1))
    assert tower.provider == "CPUExecutionProvider"
    assert "CUDA provider could not start" in caplog.text
    batch = np.ones((2, 3, 4, 4), dtype=np.float32)
    np.testing.assert_allclose(tower.run(batch), reference(batch), rtol=1e-6)


def test_from_tensor_without_copy_is_a_checked_read_only_view() -> None:
    from clipserve.repository import Preprocess
    from clipserve.server.errors import InvalidInput
    from clipserve.server.preprocess import ImagePreprocessor

    pp = ImagePreprocessor(Preprocess(4, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", "shortest"))
    values = np.arange(48, dtype="<f4").reshape(3, 4, 4)
    data = values.tobytes()
    view = pp.from_tensor([3, 4, 4], "float32", data, copy=False)
    assert np.array_equal(view, values)
    assert not view.flags.writeable
    assert np.shares_memory(view, np.frombuffer(data, dtype="<f4"))
    half = pp.from_tensor([3, 4, 4], "float16", values.astype("<f2").tobytes(), copy=False)
    assert half.flags.writeable  # converted: a new array
    bad = values.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InvalidInput, match="NaN or Inf"):
        pp.from_tensor([3, 4, 4], "float32", bad.tobytes(), copy=False)


class RecordingTower:
    """Records the shapes it runs; `warmup_runs` as a CUDA-graph tower reports it."""

    def __init__(self, warmup_runs: int = 1) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.warmup_runs = warmup_runs

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.shapes.append(batch.shape)
        return np.zeros((batch.shape[0], 2), np.float32)

    def batch_buffer(self, shape: tuple[int, ...], dtype: object) -> np.ndarray:
        return np.zeros(shape, dtype)  # type: ignore[call-overload]


@pytest.mark.parametrize("runs", [1, 3])
def test_warm_up_runs_every_batch_and_length_bucket(runs: int) -> None:
    from clipserve.server.batch_plan import BatchPlanner
    from clipserve.server.towers import TextRunner

    vision = RecordingTower(runs)
    assert VisionRunner(vision, 8, (1, 2, 4)).warm_up() == 3  # type: ignore[arg-type]
    assert vision.shapes == [(b, 3, 8, 8) for b in (1, 2, 4) for _ in range(runs)]
    text = RecordingTower(runs)
    assert TextRunner(text, (1, 16), (8, 77)).warm_up() == 4  # type: ignore[arg-type]
    assert sorted(set(text.shapes)) == [(1, 8), (1, 77), (16, 8), (16, 77)]
    assert len(text.shapes) == 4 * runs
    # with batch trimming, a cheap shape (all of these) runs once more for a steady timing
    timed = RecordingTower(runs)
    planner = BatchPlanner((1, 2, 4))
    assert VisionRunner(timed, 8, (1, 2, 4), planner).warm_up() == 3  # type: ignore[arg-type]
    assert timed.shapes == [(b, 3, 8, 8) for b in (1, 2, 4) for _ in range(runs + 1)]
    assert all(planner.cost(None, b) is not None for b in (1, 2, 4))


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is Linux's")
def test_preprocessing_threads_run_at_a_lower_priority() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from clipserve.server.engine import lower_thread_priority

    def nice_of_this_thread() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    base = os.getpriority(os.PRIO_PROCESS, 0)
    with ThreadPoolExecutor(1, initializer=lower_thread_priority, initargs=(5,)) as pool:
        assert pool.submit(nice_of_this_thread).result() == min(19, base + 5)
    with ThreadPoolExecutor(1, initializer=lower_thread_priority, initargs=(0,)) as pool:
        assert pool.submit(nice_of_this_thread).result() == base
    assert nice_of_this_thread() == base  # the caller's own thread is untouched
