"""Linear layers: every Conv / Gemm / MatMul as ``y = W x (+ b)`` with W an initializer.

``find_linear_layers`` gives each one's shape (m out, n in; a Conv is linear on its im2col
patches, n = C kh kw) and, when it cannot be split, why; ``layer_weight`` reads a layer's
(W, b) in float64 whatever the op's layout. Analysis only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import onnx

from onnxprune.graph.index import FLOAT_TYPES, GraphIndex, attributes


@dataclasses.dataclass
class LinearLayer:
    """One ``y = W x + b`` layer that a low-rank split could replace."""

    name: str                 # node name (unnamed nodes: f"{op}_{index}")
    op: str                   # "Gemm" | "MatMul" | "Conv"
    node_index: int
    input: str                # the activation entering the layer
    output: str               # the layer's final output (MatMul + Add: the Add's output)
    weight: str               # initializer name
    bias: str | None          # Gemm C, Conv B, or the constant of the Add after a MatMul
    bias_node: str | None     # the Add node holding a MatMul's bias
    out_features: int         # m of y = W x (Conv: M)
    in_features: int          # n of y = W x (Conv: C kh kw)
    attrs: dict               # Gemm: transA, transB, alpha, beta; Conv: kernel_shape, strides, ...
    skip: str | None = None   # why it cannot be split (None: splittable)


def find_linear_layers(model: onnx.ModelProto) -> list[LinearLayer]:
    """Every Conv, Gemm and MatMul of the top-level graph, in graph order, each with the
    reason it cannot be split (``skip``) or None."""
    index = GraphIndex(model)
    layers = []
    for i, node in enumerate(index.nodes):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        if len(node.input) < 2:
            continue
        layers.append(_linear_layer(index, i))
    return layers


def _linear_layer(index: GraphIndex, i: int) -> LinearLayer:
    node = index.nodes[i]
    name, op = index.names[i], node.op_type
    attrs = attributes(node)
    weight = node.input[1]
    x = node.input[0]
    output = node.output[0]
    bias = bias_node = None
    skip: str | None = None
    m = n = 0

    if op == "MatMul" and index.const(x) is not None and index.const(weight) is None:
        skip = "the weight is the left operand (x W with W on the left is not supported)"
        weight, x = x, weight
    if index.const(weight) is None:
        skip = skip or "weight is not an initializer"
    elif index.const(weight).data_type not in FLOAT_TYPES:
        skip = "weight is not floating point"

    dims = index.dims(weight) if index.const(weight) is not None else ()
    if op == "Gemm":
        attrs = {"transA": int(attrs.get("transA", 0)), "transB": int(attrs.get("transB", 0)),
                 "alpha": float(attrs.get("alpha", 1.0)), "beta": float(attrs.get("beta", 1.0))}
        if len(dims) == 2:
            m, n = (dims[0], dims[1]) if attrs["transB"] else (dims[1], dims[0])
        elif dims:
            skip = skip or f"weight is {len(dims)}-D, not 2-D"
        if attrs["transA"]:
            skip = skip or "transA=1 (the input is transposed)"
        if len(node.input) > 2 and node.input[2]:
            bias = node.input[2]
            if index.const(bias) is None:
                skip = skip or "bias C is not an initializer"
    elif op == "MatMul":
        attrs = {}
        if len(dims) == 2:
            n, m = dims
        elif dims:
            skip = skip or f"weight is {len(dims)}-D, not 2-D"
        if len(dims) == 2 and not skip:
            add = matmul_bias(index, i, m)
            if add is not None:
                bias_node, bias = index.names[add[0]], add[1]
                output = index.nodes[add[0]].output[0]
    else:  # Conv
        kernel = list(dims[2:]) if len(dims) >= 3 else list(attrs.get("kernel_shape", []))
        spatial = len(kernel)
        attrs = {
            "kernel_shape": list(attrs.get("kernel_shape", kernel)),
            "strides": list(attrs.get("strides", [1] * spatial)),
            "pads": list(attrs.get("pads", [0] * 2 * spatial)),
            "dilations": list(attrs.get("dilations", [1] * spatial)),
            "group": int(attrs.get("group", 1)),
            "auto_pad": attrs.get("auto_pad", "NOTSET"),
        }
        if isinstance(attrs["auto_pad"], bytes):
            attrs["auto_pad"] = attrs["auto_pad"].decode()
        pads = explicit_pads(attrs, (index.shape(x) or ())[2:]) if attrs["auto_pad"] != "NOTSET" else None
        if pads is not None:        # the layer's statistics and a spatial split read explicit pads
            attrs.update(pads=pads, auto_pad="NOTSET")
        if dims:
            m, n = dims[0], int(np.prod(dims[1:], dtype=np.int64))
            if len(dims) != 4:
                skip = skip or f"only 2-D Conv is split (weight is {len(dims)}-D)"
        if attrs["group"] != 1:
            skip = skip or f"grouped/depthwise Conv (group={attrs['group']})"
        if len(node.input) > 2 and node.input[2]:
            bias = node.input[2]
            if index.const(bias) is None:
                skip = skip or "bias B is not an initializer"

    if index.const(weight) is not None and index.use_count(weight) > 1:
        others = sorted({index.names[j] for j, _ in index.uses.get(weight, ()) if j != i})
        skip = skip or f"weight {weight} is shared with {', '.join(others) or 'a graph output'}"
    return LinearLayer(name=name, op=op, node_index=i, input=x, output=output, weight=weight, bias=bias,
                       bias_node=bias_node, out_features=int(m), in_features=int(n), attrs=attrs, skip=skip)


def explicit_pads(attrs: dict, spatial: tuple) -> list[int] | None:
    """The pads ([begins..., ends...]) a Conv's ``auto_pad`` stands for, or None when they depend on
    an input size the graph does not fix (SAME with a stride above 1 on a symbolic size). VALID pads
    nothing; SAME_UPPER puts an odd pad's extra row at the end, SAME_LOWER at the beginning."""
    if attrs["auto_pad"] == "VALID":
        return [0] * len(attrs["pads"])
    if attrs["auto_pad"] not in ("SAME_UPPER", "SAME_LOWER"):
        return None
    begins, ends = [], []
    for i, (k, s, d) in enumerate(zip(attrs["kernel_shape"], attrs["strides"], attrs["dilations"])):
        size = spatial[i] if i < len(spatial) else None
        if s != 1 and not size:
            return None
        span = (k - 1) * d + 1
        total = span - 1 if s == 1 else max((-(-size // s) - 1) * s + span - size, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if attrs["auto_pad"] == "SAME_UPPER" else big)
        ends.append(big if attrs["auto_pad"] == "SAME_UPPER" else small)
    return begins + ends


def layer_weight(index: GraphIndex, layer: LinearLayer) -> tuple[np.ndarray, np.ndarray | None]:
    """(W: m x n, b: m or None) in float64 with y = W x + b, whatever the op's layout."""
    w = index.array(layer.weight).astype(np.float64)
    b = index.array(layer.bias).astype(np.float64) if layer.bias else None
    if layer.op == "Gemm":
        alpha, beta = layer.attrs.get("alpha", 1.0), layer.attrs.get("beta", 1.0)
        w = alpha * (w if layer.attrs.get("transB", 0) else w.T)
        if b is not None:
            b = beta * np.broadcast_to(b.reshape(-1), (w.shape[0],)).copy()
    elif layer.op == "MatMul":
        w = w.T
        if b is not None:
            b = np.broadcast_to(b.reshape(-1), (w.shape[0],)).copy()
    else:
        w = w.reshape(w.shape[0], -1)
    return w, b


def matmul_bias(index: GraphIndex, i: int, m: int) -> tuple[int, str] | None:
    """(Add node index, constant) when MatMul ``i``'s only reader adds a constant bias of m entries."""
    out = index.nodes[i].output[0]
    uses = index.uses.get(out, [])
    if out in index.graph_outputs or len(uses) != 1:
        return None
    j, slot = uses[0]
    add = index.nodes[j]
    if add.op_type != "Add" or slot < 0 or len(add.input) != 2:
        return None
    other = add.input[1 - slot]
    if not index.is_float_const(other):
        return None
    dims = index.dims(other)
    if len(dims) not in (1, 2) or dims[-1] != m or int(np.prod(dims)) != m:
        return None
    return j, other


def describe_linear_layers(layers: Iterable[LinearLayer]) -> list[dict]:
    """JSON-able summaries of linear layers (for ``onnxprune inspect``)."""
    return [{"name": layer.name, "op": layer.op, "shape": [layer.out_features, layer.in_features],
             "splittable": layer.skip is None, "skip": layer.skip, "weight": layer.weight, "bias": layer.bias}
            for layer in layers]
