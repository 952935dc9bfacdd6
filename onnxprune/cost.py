"""Parameters and multiply-accumulates (MACs) per layer.

MACs are counted per sample (batch 1) for the layers that dominate inference cost:

- Conv (grouped and depthwise too): ``out_elems * C_in/group * prod(kernel)``
- ConvTranspose: ``in_elems * C_out/group * prod(kernel)``
- Gemm: ``out_elems * K``
- MatMul (constant or dynamic operands, broadcast batch dims): ``out_elems * K``
- ConvInteger, QLinearConv and com.microsoft FusedConv as Conv; MatMulInteger and QLinearMatMul
  as MatMul; com.microsoft FusedGemm as Gemm (integer multiply-adds count as MACs)
- RNN, GRU, LSTM: ``steps * batch * (|W| + |R|)`` (each step multiplies its input by W and
  its state by R, every direction and gate)

Every other node counts 0 MACs; bias additions are not counted. Shapes come from ONNX
shape inference (``graph/shapes.py``: with data propagation, on a light copy of the graph)
with the symbolic input dimensions set to 1, or to the size of the data where a caller has it
(``sample_shapes``: compress, validate, the planner and the passes count a model exported
with a dynamic height and width, or sequence length, at its samples' size); tensors it
cannot infer are measured by running onnxruntime once on a zero input with those tensors
exposed as outputs. Nodes inside subgraphs (If, Loop,
Scan bodies) are not counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from onnxprune.errors import ModelError
from onnxprune.graph.index import node_names, subgraph_inputs
from onnxprune.graph.shapes import inferred_value_info
from onnxprune.model import input_specs, weight_names

Shape = tuple[int, ...]


@dataclasses.dataclass
class LayerCost:
    """One top-level node: its name, op type, float weights it owns, and MACs per sample."""

    name: str
    op: str
    params: int
    macs: int
    input: Shape | None = None    # the shape of the node's first input, where known
    output: Shape | None = None   # of its first output


def layer_costs(model: onnx.ModelProto, *, input_shapes: Mapping[str, Sequence[int]] | None = None
                ) -> list[LayerCost]:
    """Parameters and MACs of every top-level node of ``model``, in graph order.

    Layers are named as ``graph.index.node_names`` names them (the node's own name when unique,
    else ``f"{op}_{index}"``). ``params`` is the number of elements of the weights a node reads
    (``model.weight_names``: not a Resize's float scales, nor shapes or other integer tensors; a
    control-flow node reads those its bodies read); an initializer shared by several nodes is
    counted at the first of them only, so the column sums to ``count_parameters``. ``macs`` is
    per sample: symbolic input dimensions are set to 1 (override with ``input_shapes``, e.g.
    ``{"input": [1, 3, 320, 320]}``; give batch 1 there), and a model with a fixed batch B > 1 has
    its counts divided by B.

    Raises ModelError when a Conv, Gemm or MatMul shape can be found neither by shape
    inference nor by running the model.
    """
    shapes, batch = _infer_shapes(model, input_shapes)
    needed = {name for node in model.graph.node for name in _shape_inputs(node)}
    # a Conv's input too: what a split of it costs depends on its input width (``LayerCost.input``)
    needed |= {node.input[0] for node in model.graph.node if node.op_type == "Conv" and node.input}
    missing = sorted(name for name in needed if shapes.get(name) is None)
    if missing:
        shapes.update(_measure_shapes(model, missing, input_shapes))

    names = weight_names(model)
    weights = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer if t.name in names}
    seen: set[str] = set()
    costs = []
    for name, node in zip(node_names(model), model.graph.node):
        params = 0
        for tensor in [*node.input, *sorted(subgraph_inputs(node))]:     # an If's weights: its branches'
            if tensor in weights and tensor not in seen:
                seen.add(tensor)
                params += weights[tensor]
        macs = _node_macs(node, shapes)
        if batch > 1:
            macs = round(macs / batch)
        costs.append(LayerCost(name, node.op_type, params, macs, shapes.get(node.input[0]) if node.input else None,
                               shapes.get(node.output[0]) if node.output else None))
    return costs


def sample_shapes(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, Shape]:
    """``input_shapes`` for ``layer_costs`` from a batch of ``feeds``: {input: shape of one sample,
    batch 1} for the inputs whose shape in ``model`` leaves a dimension after the batch symbolic
    (an exported dynamic height and width, or sequence length); {} when there is none. MACs
    then count at the size of the data rather than with those dimensions at 1."""
    return {spec.name: (1, *np.shape(feeds[spec.name])[1:]) for spec in input_specs(model)
            if spec.name in feeds and spec.symbolic_axes}


def total_macs(model: onnx.ModelProto, *, input_shapes: Mapping[str, Sequence[int]] | None = None) -> int:
    """MACs per sample of the whole model (see ``layer_costs``)."""
    return sum(cost.macs for cost in layer_costs(model, input_shapes=input_shapes))


# --------------------------------------------------------------------------- MAC formulas

#: ops counted as a Conv / a MatMul-like product: (op, domain) -> (kind, index of the weight
#: input for a Conv; the first factor for products). Integer and quantized forms count their
#: integer multiply-adds; onnxruntime's fused forms (com.microsoft) as the op they fuse.
_COUNTED = {
    ("Conv", ""): ("conv", 1), ("ConvInteger", ""): ("conv", 1), ("QLinearConv", ""): ("conv", 3),
    ("FusedConv", "com.microsoft"): ("conv", 1),
    ("ConvTranspose", ""): ("conv_transpose", 1),
    ("Gemm", ""): ("gemm", 0), ("FusedGemm", "com.microsoft"): ("gemm", 0),
    ("MatMul", ""): ("matmul", 0), ("MatMulInteger", ""): ("matmul", 0), ("QLinearMatMul", ""): ("matmul", 0),
    ("RNN", ""): ("recurrent", 0), ("GRU", ""): ("recurrent", 0), ("LSTM", ""): ("recurrent", 0),
}


def _counted(node: onnx.NodeProto) -> tuple[str, int] | None:
    return _COUNTED.get((node.op_type, "" if node.domain == "ai.onnx" else node.domain))


def _shape_inputs(node: onnx.NodeProto) -> list[str]:
    """The tensors whose shapes the MAC formula of ``node`` reads."""
    counted = _counted(node)
    if counted is None:
        return []
    kind, index = counted
    if kind == "conv" and len(node.input) > index:
        return [node.output[0], node.input[index]]
    if kind == "conv_transpose" and len(node.input) > index:
        return [node.input[0], node.input[index]]
    if kind in ("gemm", "matmul") and len(node.input) >= 2:
        return [node.output[0], node.input[index]]
    if kind == "recurrent" and len(node.input) >= 3:
        return [node.input[0], node.input[1], node.input[2]]        # X, W, R
    return []


def _node_macs(node: onnx.NodeProto, shapes: Mapping[str, Shape | None]) -> int:
    names = _shape_inputs(node)
    if not names:
        return 0
    kind = _counted(node)[0]
    if kind == "conv":
        # out [N, M, *spatial], weight [M, C/group, *kernel]
        out, weight = (shapes[name] for name in names)
        return _prod(out) * _prod(weight[1:])
    if kind == "conv_transpose":
        # x [N, C, *spatial], weight [C, M/group, *kernel]: each input element meets M/g*k weights
        x, weight = (shapes[name] for name in names)
        return _prod(x) * _prod(weight[1:])
    if kind == "recurrent":
        # X [T, N, C] (layout 0) or [N, T, C]; W [dirs, gates H, C], R [dirs, gates H, H]: every
        # step of every sequence multiplies its input by W and its state by R
        x, w, r = (shapes[name] for name in names)
        return x[0] * x[1] * (_prod(w) + _prod(r))
    # Gemm / MatMul: every output element is a dot product of length K
    out, a = (shapes[name] for name in names)
    if kind == "gemm":
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        k = a[0] if trans_a else a[1]
    else:
        k = a[-1]
    return _prod(out) * k


def _prod(dims: Sequence[int]) -> int:
    return int(np.prod(dims, dtype=np.int64)) if len(dims) else 1


# --------------------------------------------------------------------------- shapes

def _fixed_input_shapes(model: onnx.ModelProto, overrides: Mapping[str, Sequence[int]] | None
                        ) -> tuple[dict[str, Shape], int]:
    """Concrete shape per real graph input (symbolic dims -> 1) and the model's fixed batch."""
    overrides = dict(overrides or {})
    specs = input_specs(model)
    unknown = set(overrides) - {spec.name for spec in specs}
    if unknown:
        raise ModelError(", ".join(sorted(unknown)), "not an input of the model",
                         f"inputs are {', '.join(spec.name for spec in specs)}")
    result = {}
    for spec in specs:
        if spec.name in overrides:
            result[spec.name] = tuple(int(d) for d in overrides[spec.name])
        else:
            result[spec.name] = tuple(d if isinstance(d, int) else 1 for d in spec.shape)
    fixed = {spec.fixed_batch for spec in specs if spec.name not in overrides} - {None}
    batch = fixed.pop() if len(fixed) == 1 else 1
    return result, max(batch, 1)


def _infer_shapes(model: onnx.ModelProto, overrides: Mapping[str, Sequence[int]] | None
                  ) -> tuple[dict[str, Shape | None], int]:
    """Shapes of every tensor ONNX shape inference can infer (None where a dim is unknown)."""
    fixed, batch = _fixed_input_shapes(model, overrides)
    infos = inferred_value_info(model, fix_batch=False, input_shapes=fixed)
    shapes: dict[str, Shape | None] = {name: _value_shape(value) for name, value in infos.items()}
    for tensor in model.graph.initializer:
        shapes[tensor.name] = tuple(int(d) for d in tensor.dims)
    return shapes, batch


def _set_shape(value: onnx.ValueInfoProto, shape: Shape) -> None:
    dims = value.type.tensor_type.shape.dim
    del dims[:]
    for d in shape:
        dims.add().dim_value = d


def _value_shape(value: onnx.ValueInfoProto) -> Shape | None:
    ttype = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not ttype.HasField("shape"):
        return None
    dims = []
    for d in ttype.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(int(d.dim_value))
    return tuple(dims)


def _measure_shapes(model: onnx.ModelProto, names: Sequence[str],
                    overrides: Mapping[str, Sequence[int]] | None) -> dict[str, Shape]:
    """Run onnxruntime once on zeros with ``names`` exposed as outputs; their shapes."""
    import onnxruntime as ort

    from onnxprune.model import clone
    from onnxprune.runtime import error_line, make_session

    fixed, _ = _fixed_input_shapes(model, overrides)
    probe = clone(model)
    outputs = {value.name for value in probe.graph.output}
    for value in probe.graph.input:
        if value.name in fixed:
            _set_shape(value, fixed[value.name])
    for name in names:
        if name not in outputs:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    session = make_session(probe)
    feeds = {spec.name: np.zeros(fixed[spec.name], dtype=spec.dtype) for spec in input_specs(model)}
    try:
        values = session.run(list(names), feeds)
    except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidArgument,
            ort.capi.onnxruntime_pybind11_state.RuntimeException) as exc:
        first = error_line(exc)
        at = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in fixed.items())
        raise ModelError(model.graph.name or "model", f"cannot measure layer shapes: onnxruntime failed on zeros "
                         f"({at}): {first}", "check that this onnxruntime runs the model; where it needs other "
                         "sizes for its symbolic dimensions, pass input_shapes with them") from None
    return {name: tuple(int(d) for d in value.shape) for name, value in zip(names, values)}
