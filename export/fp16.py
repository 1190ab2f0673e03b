"""fp16 variant of an exported tower: float16 weights and compute, float32 where it matters.

Inputs and outputs stay float32 (``keep_io_types``), so the server and Triton clients see the
same tensors as with fp32. LayerNorm and Softmax run in float32, and so does the final L2
normalisation (ReduceL2, Clip, Expand, Div): a sum of squares overflows float16 (max 65504) long
before an embedding's norm gets large.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import onnx_ir
from onnxruntime.transformers.float16 import convert_float_to_float16

logger = logging.getLogger(__name__)

#: Op types kept in float32 wherever they occur.
FP32_OP_TYPES = ("LayerNormalization", "Softmax", "ReduceL2", "ReduceSumSquare", "Sqrt", "Clip")
#: Op types kept in float32 when they lead to a graph output (the normalisation's division).
_NORMALISATION_TAIL = ("Div", "Expand", "Max", "Clip", "ReduceL2", "Sqrt", "ReduceSumSquare")


def normalisation_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes of the final L2 normalisation: walk back from each output."""
    producers = {out: node for node in model.graph.node for out in node.output}
    blocked: list[str] = []
    pending = [o.name for o in model.graph.output]
    seen: set[str] = set()
    while pending:
        node = producers.get(pending.pop())
        if node is None or node.name in seen or node.op_type not in _NORMALISATION_TAIL:
            continue
        seen.add(node.name)
        blocked.append(node.name)
        pending.extend(node.input)
    return blocked


def convert_to_fp16(source: Path, destination: Path) -> None:
    """Write the fp16 variant of the ONNX model at `source` to `destination`."""
    model = onnx.load(str(source))
    tail = normalisation_nodes(model)
    divisions = {node.name for node in model.graph.node if node.op_type == "Div"}
    if not divisions.intersection(tail):
        logger.warning("%s: no L2 normalisation found at the output", source.name)
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=list(FP32_OP_TYPES),
        node_block_list=tail,
    )
    merge_duplicate_casts(converted)
    removed = remove_fp16_round_trips(converted, set(FP32_OP_TYPES), set(tail))
    # The converter leaves value_info entries for initializers typed float16 even where it kept
    # the initializer float32 (inputs of the fp32 islands): the checker rejects that. Drop those
    # entries only; ONNX Runtime 1.32's CPU NchwcTransformer crashes on this graph when the other
    # value_info entries are replaced by re-inferred ones (measured), so they stay as written.
    initializers = {init.name for init in converted.graph.initializer}
    kept = [v for v in converted.graph.value_info if v.name not in initializers]
    del converted.graph.value_info[:]
    converted.graph.value_info.extend(kept)
    # It also appends the input casts after their users; the ONNX spec wants nodes in
    # topological order (ONNX Runtime sorts itself, the checker and other runtimes do not).
    ir_model = onnx_ir.from_proto(converted)
    ir_model.graph.sort()
    onnx.save(  # weights beside the graph, as the fp32 export writes them (onnx_export)
        onnx_ir.to_proto(ir_model), str(destination), save_as_external_data=True,
        all_tensors_to_one_file=True, location=destination.name + ".data",
    )
    onnx.checker.check_model(str(destination), full_check=True)
    logger.debug(
        "wrote fp16 variant of %s (fp32 tail: %s, %d fp16 round trips removed)",
        source.name, tail, removed,
    )


def merge_duplicate_casts(model: onnx.ModelProto) -> int:
    """Keep one Cast per tensor and type; return how many duplicates were dropped.

    onnxruntime(-gpu) 1.31's converter adds one Cast for every float32 consumer of a float16
    tensor, all with the same output name, which is not a valid graph (one producer per name);
    1.32 shares one Cast. Identical duplicates are dropped, with their value_info entries.
    """
    first: dict[str, onnx.NodeProto] = {}
    duplicates: list[int] = []
    for index, node in enumerate(model.graph.node):
        if node.op_type == "Cast" and len(node.output) == 1 and node.output[0] in first:
            earlier = first[node.output[0]]
            if (earlier.op_type, list(earlier.input), list(earlier.attribute)) == (
                "Cast", list(node.input), list(node.attribute)
            ):
                duplicates.append(index)
                continue
        for output in node.output:
            first.setdefault(output, node)
    for index in reversed(duplicates):
        del model.graph.node[index]
    seen: set[str] = set()
    repeated: list[int] = []
    for index, value in enumerate(model.graph.value_info):
        if value.name in seen:
            repeated.append(index)
        seen.add(value.name)
    for index in reversed(repeated):
        del model.graph.value_info[index]
    return len(duplicates)


def remove_fp16_round_trips(
    model: onnx.ModelProto, fp32_op_types: set[str], fp32_nodes: set[str]
) -> int:
    """Skip float32 -> float16 -> float32 cast pairs between float32 nodes; return how many.

    The converter wraps every blocked node on its own: its output is cast to float16 and the
    next blocked node casts it back, so a chain of float32 nodes (the normalisation tail, and
    the graph output of keep_io_types) would still be rounded to float16 between nodes.
    """
    producers = {out: node for node in model.graph.node for out in node.output}

    def cast_to(node: onnx.NodeProto | None) -> int | None:
        if node is None or node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    def is_fp32_source(name: str) -> bool:
        node = producers.get(name)
        if node is None:
            return False
        return (
            node.op_type in fp32_op_types
            or node.name in fp32_nodes
            or cast_to(node) == onnx.TensorProto.FLOAT
        )

    rewired = 0
    for node in model.graph.node:
        if cast_to(node) != onnx.TensorProto.FLOAT:
            continue
        inner = producers.get(node.input[0])
        if cast_to(inner) == onnx.TensorProto.FLOAT16 and is_fp32_source(inner.input[0]):
            node.input[0] = inner.input[0]  # now a float32 -> float32 cast: an identity
            rewired += 1
    used = {name for node in model.graph.node for name in node.input}
    used |= {output.name for output in model.graph.output}
    dead = [
        node for node in model.graph.node
        if cast_to(node) == onnx.TensorProto.FLOAT16 and not used.intersection(node.output)
    ]
    for node in dead:
        model.graph.node.remove(node)
    return rewired
