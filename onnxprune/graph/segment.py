"""Cut out the part of a graph that computes some tensors from others already known.

    graph:     x -> [A] -> t -> [B] -> u -> [C] -> y
    known {t}, outputs [y]:     t (input) -> [B] -> [C] -> y

``segment`` walks back from the outputs and stops at known float activations, which become
the segment's inputs; constants and shape arithmetic (integer tensors, e.g. Pad's pads) are
recomputed inside it. Fed with the known tensors' values, the segment computes the outputs
exactly as the whole graph does, at the cost of the nodes in between. Used by the planner's
suffix models (``plan/suffix.py``: known = what a trial left unchanged) and by the
statistics provider's activation store (``calibration/provider.py``: known = what an earlier
calibration run computed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import onnx

from onnxprune.graph.index import FLOAT_TENSOR_TYPES


@dataclasses.dataclass
class Segment:
    """``model`` computes ``outputs`` from ``inputs`` (known tensors or graph inputs);
    ``produced``: the tensors its nodes compute; ``frontier``: the float ones of those that
    nodes outside it (or graph outputs) read, which it also outputs (after ``outputs``)."""

    model: onnx.ModelProto
    inputs: list[str]
    outputs: list[str]
    produced: set[str]
    frontier: list[str]


def segment(model: onnx.ModelProto, known: Iterable[str], outputs: Sequence[str], *,
            floats: set[str] | None = None) -> Segment:
    """The nodes of ``model`` that ``outputs`` need, walking back until a known float
    activation or a graph input (both become inputs of the segment). Graph inputs are
    inputs whether known or not; an output that is itself known is computed by nothing
    (it is passed through as an input)."""
    graph = model.graph
    known = set(known)
    floats = float_tensors(model) if floats is None else floats
    producer = {o: node for node in graph.node for o in node.output if o}
    inits = {t.name for t in graph.initializer}
    graph_inputs = {v.name for v in graph.input} - inits
    needed: set[int] = set()
    boundary: dict[str, None] = {}
    stack, seen = list(outputs), set()
    while stack:
        tensor = stack.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        if tensor in graph_inputs or (tensor in known and tensor in floats):
            boundary[tensor] = None
            continue
        node = producer[tensor]
        needed.add(id(node))
        for name in node.input:
            if name and name not in inits:
                stack.append(name)
    nodes = [node for node in graph.node if id(node) in needed]
    produced = {o for node in nodes for o in node.output if o}
    read_outside = {i for node in graph.node if id(node) not in needed for i in node.input if i}
    read_outside |= {o.name for o in graph.output}
    frontier = sorted(produced & read_outside & floats)
    used = {name for node in nodes for name in node.input}
    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.opset_import.extend(model.opset_import)
    g = out.graph
    g.name = f"{graph.name}/segment"
    g.node.extend(nodes)
    g.initializer.extend(t for t in graph.initializer if t.name in used)
    declared = {v.name: v for v in graph.input}
    inputs = sorted(boundary)
    for name in inputs:
        g.input.append(declared[name] if name in declared else
                       onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    if model.ir_version < 4:       # IR 3: initializers are graph inputs too
        g.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer)
    declared_out = {o.name: o for o in graph.output}
    for name in list(dict.fromkeys([*outputs, *frontier])):
        g.output.append(declared_out.get(name) or onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return Segment(out, inputs, list(dict.fromkeys(outputs)), produced, frontier)


def float_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors that hold float activations: the outputs of nodes that read a float graph
    input or a float activation (not of constant or shape arithmetic), by forward type
    propagation from the graph's float inputs."""
    inits = {t.name for t in model.graph.initializer}
    float_inits = {t.name for t in model.graph.initializer if t.data_type in FLOAT_TENSOR_TYPES}
    live = {v.name for v in model.graph.input if v.name not in inits
            and v.type.tensor_type.elem_type in FLOAT_TENSOR_TYPES}
    non_float_ops = {"Shape", "Size", "ArgMax", "ArgMin", "NonZero", "TopK"}
    for node in model.graph.node:         # topological order
        if node.op_type in non_float_ops or node.op_type.startswith("Cast"):
            if node.op_type == "Cast" and any(a.name == "to" and a.i in FLOAT_TENSOR_TYPES for a in node.attribute) \
                    and any(i in live for i in node.input):
                live.update(o for o in node.output if o)
            continue
        embedding = node.op_type == "Gather" and node.input[0] in float_inits   # int ids -> float rows
        if embedding or any(i in live for i in node.input if i):
            live.update(o for o in node.output if o)
    return live
