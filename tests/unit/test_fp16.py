"""The fp16 converter's clean-ups, on small graphs built here and run by ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_ir")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from clipserve.export.fp16 import merge_duplicate_casts  # noqa: E402

WEIGHT = np.linspace(-1, 1, 8, dtype=np.float16)


def two_consumers_of_one_cast(copies: int) -> onnx.ModelProto:
    """x [2, 8] + float32(w) and x * float32(w), w float16, with `copies` identical Casts of w
    (what onnxruntime 1.31's float16 converter writes for a tensor with two fp32 consumers)."""
    casts = [helper.make_node("Cast", ["w"], ["w_cast_to_fp32"], to=TensorProto.FLOAT,
                              name="w_cast_to_fp32_node") for _ in range(copies)]
    graph = helper.make_graph(
        [
            *casts,
            helper.make_node("Add", ["x", "w_cast_to_fp32"], ["sum"], name="add"),
            helper.make_node("Mul", ["sum", "w_cast_to_fp32"], ["y"], name="mul"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(WEIGHT, "w")],
        value_info=[helper.make_tensor_value_info("w_cast_to_fp32", TensorProto.FLOAT, [8])]
        * copies,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_duplicate_casts_are_merged_into_one_valid_graph() -> None:
    model = two_consumers_of_one_cast(copies=2)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model, full_check=True)
    assert merge_duplicate_casts(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Cast", "Add", "Mul"]
    assert [v.name for v in model.graph.value_info] == ["w_cast_to_fp32"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    (y,) = session.run(None, {"x": x})
    w = WEIGHT.astype(np.float32)
    np.testing.assert_allclose(y, (x + w) * w, rtol=1e-6)


def test_a_graph_without_duplicates_is_left_as_it_is() -> None:
    model = two_consumers_of_one_cast(copies=1)
    before = model.SerializeToString()
    assert merge_duplicate_casts(model) == 0
    assert model.SerializeToString() == before


def test_different_casts_with_one_name_are_not_merged() -> None:
    model = two_consumers_of_one_cast(copies=2)
    model.graph.node[1].attribute[0].i = TensorProto.DOUBLE  # same name, another type
    assert merge_duplicate_casts(model) == 0
    assert len(model.graph.node) == 4
