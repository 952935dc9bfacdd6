"""The one shape-inference engine: ONNX shape inference (with data propagation) on a light copy.

A light copy keeps the nodes and small initializers; large weights (and external data)
become typed graph inputs, so it is cheap to build and never near the 2 GB protobuf limit.
Graph inputs can be given concrete shapes (cost.py: symbolic dims -> 1 or the caller's
``input_shapes``) or just a batch of 1 (``fix_batch``). Best effort: tensors inference
cannot type are absent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.graph.index import attributes

# Initializers at most this large stay in the shape-inference copy (data propagation needs
# the values of shape tensors); larger ones become typed graph inputs.
_KEEP_INITIALIZER_ELEMENTS = 4096


def inferred_value_info(model: onnx.ModelProto, *, fix_batch: bool = True,
                        input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, onnx.ValueInfoProto]:
    """Value infos from ONNX shape inference (with data propagation) on a light copy.

    Large weights become typed inputs so the copy is cheap; with ``fix_batch`` a symbolic
    first dimension of each graph input is set to 1; ``input_shapes`` sets whole input
    shapes (cost.py: every symbolic dim 1, or the caller's). Best effort: tensors inference
    cannot type are absent.
    """
    light = _light_copy(model, fix_batch=fix_batch, input_shapes=input_shapes)
    infos = _infer(light)
    # Data propagation misses some shape arithmetic (e.g. Unsqueeze before opset 13): fold
    # the target shapes of Reshapes left untyped ourselves and infer once more.
    pending = [node for node in light.graph.node if node.op_type == "Reshape" and len(node.input) > 1
               and node.output[0] not in _known(infos)]
    if pending:
        values = _fold_shape_values(light, infos)
        folded = False
        for node in pending:
            value = values.get(node.input[1])
            if value is not None and node.input[1] not in {t.name for t in light.graph.initializer}:
                name = f"{node.input[1]}/folded"
                light.graph.initializer.append(numpy_helper.from_array(value.astype(np.int64), name))
                node.input[1] = name
                folded = True
        if folded:
            infos = _infer(light)
    return infos


def _infer(light: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError):
        inferred = light
    graph = inferred.graph
    return {v.name: v for v in [*graph.input, *graph.value_info, *graph.output] if v.type.HasField("tensor_type")}


def _known(infos: dict[str, onnx.ValueInfoProto]) -> set[str]:
    return {name for name, value in infos.items() if value.type.tensor_type.HasField("shape")}


def _fold_shape_values(light: onnx.ModelProto, infos: dict[str, onnx.ValueInfoProto]) -> dict[str, np.ndarray]:
    """Values of small integer tensors computed from shapes (Shape, Gather, Unsqueeze, Concat, ...)."""
    values: dict[str, np.ndarray] = {}
    for tensor in light.graph.initializer:
        if tensor.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and len(tensor.dims) <= 1:
            values[tensor.name] = numpy_helper.to_array(tensor).astype(np.int64)

    def static_shape(name: str) -> list[int] | None:
        value = infos.get(name)
        if value is None or not value.type.tensor_type.HasField("shape"):
            return None
        dims = value.type.tensor_type.shape.dim
        return [int(d.dim_value) for d in dims] if all(d.HasField("dim_value") for d in dims) else None

    for node in light.graph.node:
        op, attrs = node.op_type, attributes(node)
        args = [values.get(name) if name else None for name in node.input]
        result = None
        if op == "Shape":
            shape = static_shape(node.input[0])
            if shape is not None:
                result = np.array(shape, dtype=np.int64)[slice(attrs.get("start", 0), attrs.get("end"))]
        elif any(arg is None for arg in args[:1]):
            continue
        elif op in ("Identity", "Cast"):
            result = args[0]
        elif op == "Gather" and len(args) > 1 and args[1] is not None:
            result = np.take(args[0], args[1], axis=int(attrs.get("axis", 0)))
        elif op in ("Unsqueeze", "Squeeze"):
            axes = attrs.get("axes") if "axes" in attrs else (args[1] if len(args) > 1 else None)
            if op == "Unsqueeze" and axes is not None:
                result = args[0].reshape(-1) if args[0].ndim == 0 else None
            elif op == "Squeeze":
                result = args[0].reshape(()) if args[0].size == 1 else None
        elif op == "Concat" and all(arg is not None for arg in args):
            result = np.concatenate([np.atleast_1d(arg) for arg in args])
        elif op in ("Add", "Sub", "Mul", "Div") and len(args) == 2 and args[1] is not None:
            fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.floor_divide}[op]
            result = fn(args[0], args[1])
        if result is not None and node.output and result.size <= 64:
            values[node.output[0]] = np.asarray(result, dtype=np.int64)
    return values


def tensor_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None
                  ) -> dict[str, tuple[int | None, ...] | None]:
    """Shape of every tensor (batch 1 for symbolic batches; None for unknown dims or rank);
    ``input_shapes`` fixes whole input shapes (``cost.sample_shapes``)."""
    shapes: dict[str, tuple[int | None, ...] | None] = {}
    for name, value in inferred_value_info(model, fix_batch=True, input_shapes=input_shapes).items():
        ttype = value.type.tensor_type
        if not ttype.HasField("shape"):
            shapes[name] = None
            continue
        shapes[name] = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in ttype.shape.dim)
    for tensor in model.graph.initializer:
        shapes[tensor.name] = tuple(int(d) for d in tensor.dims)
    return shapes


def _light_copy(model: onnx.ModelProto, *, fix_batch: bool,
                input_shapes: Mapping[str, Sequence[int]] | None = None) -> onnx.ModelProto:
    """A copy without large weights (they become typed inputs), cheap to build and never near
    the 2 GB protobuf limit; input shapes fixed as ``fix_batch`` / ``input_shapes`` say."""
    graph = model.graph
    input_shapes = input_shapes or {}
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    light.graph.name = graph.name
    light.graph.node.extend(graph.node)
    inits = {t.name for t in graph.initializer}
    listed = set()
    for value in graph.input:
        listed.add(value.name)
        copy = light.graph.input.add()
        copy.CopyFrom(value)
        dims = copy.type.tensor_type.shape.dim
        if value.name in input_shapes:
            del dims[:]
            for d in input_shapes[value.name]:
                dims.add().dim_value = int(d)
        elif fix_batch and value.name not in inits and len(dims) and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1
    for tensor in graph.initializer:
        size = int(np.prod(tensor.dims, dtype=np.int64))
        if size <= _KEEP_INITIALIZER_ELEMENTS and tensor.data_location != onnx.TensorProto.EXTERNAL:
            light.graph.initializer.append(tensor)
        elif tensor.name not in listed:
            light.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    for value in graph.output:
        # keep the element type only: a stale symbolic output shape must not fight inference
        if value.type.HasField("tensor_type"):
            light.graph.output.append(onnx.helper.make_tensor_value_info(
                value.name, value.type.tensor_type.elem_type, None))
        else:
            light.graph.output.append(value)
    return light
