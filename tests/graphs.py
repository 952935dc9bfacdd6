"""Tiny graphs built in code, each under a sketch of what it is.

Every builder returns a checked ModelProto (opset 13, IR version 10) with a graph input
``x`` whose batch dimension is symbolic (``N``) and random float32 weights from ``seed``.
Weights are initializers named after their node (``conv1.W``, ``bn.scale``, ...), so
tests can edit them with ``set_init``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.graph.groups import find_channel_groups

OPSET = 13
IR_VERSION = 10


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, name: str, *shape: int, scale: float = 0.5) -> str:
        return self.init(name, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        out = f"{name}.out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def conv(self, x: str, name: str, c_in: int, c_out: int, k: int = 3, group: int = 1, **attrs) -> str:
        w = self.weight(f"{name}.W", c_out, c_in // group, k, k)
        b = self.weight(f"{name}.B", c_out, scale=0.1)
        attrs.setdefault("pads", [k // 2] * 4)
        return self.node("Conv", [x, w, b], name, kernel_shape=[k, k], group=group, **attrs)

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: dict[str, tuple]) -> onnx.ModelProto:
        """``outputs``: name -> shape without the batch dimension."""
        graph = helper.make_graph(self.nodes, "test", inputs, [_output(o, shape) for o, shape in outputs.items()],
                                  initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
        onnx.checker.check_model(model)
        return model


def _input(*shape: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape])


def _output(name: str, shape: tuple) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *shape])


def gemm_chain(seed: int = 0) -> onnx.ModelProto:
    """
    x [N,8] -> Gemm fc1 (W 16x8, transB=1) -> Relu -> Gemm fc2 (W 16x6, transB=0) -> Relu
            -> MatMul fc3 (W 6x4) -> Add fc3_bias (b 4) -> Relu -> Gemm fc4 (W 2x4, transB=1) -> y [N,2]
    groups: fc1 (16), fc2 (6, consumer MatMul), fc3 (4, bias in the Add): prunable; fc4 (graph output)
    """
    b = _Builder(seed)
    h = b.node("Gemm", ["x", b.weight("fc1.W", 16, 8), b.weight("fc1.B", 16, scale=0.1)], "fc1", transB=1)
    h = b.node("Relu", [h], "relu1")
    h = b.node("Gemm", [h, b.weight("fc2.W", 16, 6), b.weight("fc2.B", 6, scale=0.1)], "fc2")
    h = b.node("Relu", [h], "relu2")
    h = b.node("MatMul", [h, b.weight("fc3.W", 6, 4)], "fc3")
    h = b.node("Relu", [b.node("Add", [h, b.weight("fc3.B", 4, scale=0.1)], "fc3_bias")], "relu3")
    y = b.node("Gemm", [h, b.weight("fc4.W", 2, 4), b.weight("fc4.B", 2, scale=0.1)], "fc4", transB=1)
    return b.model([_input(8)], {y: (2,)})


def wide_mlp(hidden: int = 100, seed: int = 0) -> onnx.ModelProto:
    """
    x [N,8] -> Gemm fc1 (W hidden x 8, transB=1) -> Relu -> Gemm fc2 (W 3 x hidden, transB=1) -> y [N,3]
    groups: fc1 (hidden, prunable), fc2 (graph output)
    """
    b = _Builder(seed)
    h = b.node("Gemm", ["x", b.weight("fc1.W", hidden, 8), b.weight("fc1.B", hidden, scale=0.1)], "fc1", transB=1)
    h = b.node("Relu", [h], "relu1")
    y = b.node("Gemm", [h, b.weight("fc2.W", 3, hidden), b.weight("fc2.B", 3, scale=0.1)], "fc2", transB=1)
    return b.model([_input(8)], {y: (3,)})


def conv_bn_relu(seed: int = 0) -> onnx.ModelProto:
    """
    x [N,3,8,8] -> Conv conv1 (8, 3x3) -> BatchNormalization bn -> Relu -> Conv conv2 (4, 3x3) -> y
    groups: conv1 (8, prunable, path bn + relu), conv2 (graph output)
    """
    b = _Builder(seed)
    h = b.conv("x", "conv1", 3, 8)
    h = b.node("BatchNormalization", [h, b.init("bn.scale", b.rng.uniform(0.5, 1.5, 8).astype(np.float32)),
                                      b.weight("bn.B", 8, scale=0.1), b.weight("bn.mean", 8, scale=0.1),
                                      b.init("bn.var", b.rng.uniform(0.5, 1.5, 8).astype(np.float32))], "bn")
    h = b.node("Relu", [h], "relu")
    y = b.conv(h, "conv2", 8, 4)
    return b.model([_input(3, 8, 8)], {y: (4, 8, 8)})


def reduce_to_gemm(seed: int = 0, *, keepdims: int = 0) -> onnx.ModelProto:
    """
    x [N,2,8,8] -> Conv conv (4, 3x3) -> Relu -> ReduceMean over (2, 3) [N,4] (keepdims=1:
    [N,4,1,1] -> Flatten) -> Gemm fc (5x4) -> y: global pooling as torch's x.mean((2, 3)) exports it
    groups: conv (4, prunable), fc (graph output)
    """
    b = _Builder(seed)
    h = b.conv("x", "conv", 2, 4)
    h = b.node("Relu", [h], "relu")
    h = b.node("ReduceMean", [h], "pool", axes=[2, -1], keepdims=keepdims)
    if keepdims:
        h = b.node("Flatten", [h], "flat", axis=1)
    y = b.node("Gemm", [h, b.weight("fc.W", 5, 4, scale=0.2), b.weight("fc.B", 5, scale=0.1)], "fc", transB=1)
    return b.model([_input(2, 8, 8)], {y: (5,)})


def flatten_to_gemm(seed: int = 0, *, reshape: bool = False) -> onnx.ModelProto:
    """
    x [N,2,8,8] -> Conv conv (4, 3x3) -> Relu -> MaxPool 2x2 -> Flatten [N,64] -> Gemm fc (5x64) -> y
    (reshape=True: Reshape to the constant shape [-1, 64] instead of Flatten)
    groups: conv (4, prunable, spatial 16), fc (graph output)
    """
    b = _Builder(seed)
    h = b.conv("x", "conv", 2, 4)
    h = b.node("Relu", [h], "relu")
    h = b.node("MaxPool", [h], "pool", kernel_shape=[2, 2], strides=[2, 2])
    if reshape:
        h = b.node("Reshape", [h, b.init("flat.shape", np.array([-1, 64], dtype=np.int64))], "flat")
    else:
        h = b.node("Flatten", [h], "flat", axis=1)
    y = b.node("Gemm", [h, b.weight("fc.W", 5, 64, scale=0.2), b.weight("fc.B", 5, scale=0.1)], "fc", transB=1)
    return b.model([_input(2, 8, 8)], {y: (5,)})


def residual_add(seed: int = 0) -> onnx.ModelProto:
    """
    x [N,4,6,6] -> Conv conv0 (4) -> Relu = a -> Conv convA (6) -> Relu -> Conv convB (4) -> Add(a) -> Relu
                                      \\________________________________________/
                -> Conv out (3) -> y
    groups: conv0 + convB (the residual stream: convA and out read different tensors, skipped),
            convA (6, prunable), out (graph output)
    """
    b = _Builder(seed)
    a = b.node("Relu", [b.conv("x", "conv0", 4, 4)], "relu0")
    h = b.node("Relu", [b.conv(a, "convA", 4, 6)], "reluA")
    h = b.conv(h, "convB", 6, 4)
    h = b.node("Relu", [b.node("Add", [h, a], "add")], "relu_add")
    y = b.conv(h, "out", 4, 3)
    return b.model([_input(4, 6, 6)], {y: (3, 6, 6)})


def add_branches(seed: int = 0) -> onnx.ModelProto:
    """
    x [N,3,6,6] -> Conv convA (5) -\\
                                    Add -> Relu -> Conv out (2) -> y
    x [N,3,6,6] -> Conv convB (5) -/
    groups: convA + convB (one group of 5 coupled by the Add, one site: prunable), out (graph output)
    """
    b = _Builder(seed)
    h = b.node("Add", [b.conv("x", "convA", 3, 5), b.conv("x", "convB", 3, 5, k=1)], "add")
    y = b.conv(b.node("Relu", [h], "relu"), "out", 5, 2)
    return b.model([_input(3, 6, 6)], {y: (2, 6, 6)})


def concat_branches(seed: int = 0) -> onnx.ModelProto:
    """
    x [N,3,6,6] -> Conv convA (3) -> Relu -\\
                                           Concat (axis 1, 8) -> Conv out (2) -> y
    x [N,3,6,6] -> Conv convB (5) -> Relu -/
    groups: convA, convB (skipped: Concat), out (graph output)
    """
    b = _Builder(seed)
    a = b.node("Relu", [b.conv("x", "convA", 3, 3)], "reluA")
    c = b.node("Relu", [b.conv("x", "convB", 3, 5)], "reluB")
    h = b.node("Concat", [a, c], "concat", axis=1)
    y = b.conv(h, "out", 8, 2)
    return b.model([_input(3, 6, 6)], {y: (2, 6, 6)})


def depthwise(seed: int = 0) -> onnx.ModelProto:
    """
    x [N,4,8,8] -> Conv expand (12, 1x1) -> Clip(0,6) -> Conv dw (12, 3x3, group 12) -> Clip(0,6)
                -> Conv project (4, 1x1) -> y
    groups: expand (12, prunable, dw in the path), project (graph output)
    """
    b = _Builder(seed)
    lo, hi = b.init("clip.lo", np.float32(0.0)), b.init("clip.hi", np.float32(6.0))
    h = b.node("Clip", [b.conv("x", "expand", 4, 12, k=1), lo, hi], "clip1")
    h = b.node("Clip", [b.conv(h, "dw", 12, 12, group=12), lo, hi], "clip2")
    y = b.conv(h, "project", 12, 4, k=1)
    return b.model([_input(4, 8, 8)], {y: (4, 8, 8)})


def shared_consumer(seed: int = 0) -> onnx.ModelProto:
    """
    x [N,3,6,6] -> Conv conv0 (6) -> Relu -> Conv convA (3) -> y1
                                          \\-> Conv convB (2) -> y2
    groups: conv0 (6, prunable, two consumers), convA and convB (graph outputs)
    """
    b = _Builder(seed)
    h = b.node("Relu", [b.conv("x", "conv0", 3, 6)], "relu")
    y1 = b.conv(h, "convA", 6, 3)
    y2 = b.conv(h, "convB", 6, 2, k=1)
    return b.model([_input(3, 6, 6)], {y1: (3, 6, 6), y2: (2, 6, 6)})


def shared_weight(seed: int = 0) -> onnx.ModelProto:
    """
    x [N,6] -> Gemm fc1 (W 6x6, transB=1) -> Relu -> Gemm fc2 (the same W) -> Relu -> Gemm fc3 (4x6) -> y
    linear layers: fc1 and fc2 skipped (shared weight); groups: fc1 (6, consumer fc2) and
    fc2 (6, consumer fc3) both prunable: rewriting one must copy W, not change the other
    """
    b = _Builder(seed)
    w = b.weight("fc.W", 6, 6)
    h = b.node("Relu", [b.node("Gemm", ["x", w], "fc1", transB=1)], "relu1")
    h = b.node("Relu", [b.node("Gemm", [h, w], "fc2", transB=1)], "relu2")
    y = b.node("Gemm", [h, b.weight("fc3.W", 4, 6)], "fc3", transB=1)
    return b.model([_input(6)], {y: (4,)})


# --------------------------------------------------------------------------- helpers

def get_init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name).copy()


def set_init(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(numpy_helper.from_array(np.asarray(value, dtype=numpy_helper.to_array(tensor).dtype), name))
            return
    raise KeyError(name)


def group_of(model: onnx.ModelProto, name: str):
    """The channel group called ``name`` in ``model``."""
    return next(g for g in find_channel_groups(model) if g.name == name)


def edit_channel(model: onnx.ModelProto, group, edit) -> None:
    """Apply ``edit(array, axis)`` to every per-channel array of ``group`` (weights, biases, params)."""
    for producer in group.producers:
        set_init(model, producer.weight, edit(get_init(model, producer.weight), producer.axis))
        if producer.bias:
            set_init(model, producer.bias, edit(get_init(model, producer.bias), -1))
    for entry in group.path:
        for name, axis in entry.params:
            set_init(model, name, edit(get_init(model, name), axis))


def feeds(model: onnx.ModelProto, batch: int = 3, seed: int = 1) -> dict[str, np.ndarray]:
    """Random inputs for every graph input (symbolic dims -> ``batch``)."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    result = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in value.type.tensor_type.shape.dim]
        result[value.name] = rng.standard_normal(dims).astype(np.float32)
    return result


# --------------------------------------------------------------------------- exporter quirks

def unnamed_chain(seed: int = 0, *, bias: bool = True) -> onnx.ModelProto:
    """
    x [N,8] -> Gemm (W 16x8, transB=1) -> Relu -> Gemm (W 16x16, transB=1) -> Relu
            -> Gemm (W 4x16, transB=1) -> y [N,4]
    every node has name "" (as TensorFlow and hand-built exporters emit); tensors are
    h1..h4; weights fc1.W, fc2.W, fc3.W (+ fc*.B with ``bias``)
    """
    b = _Builder(seed)
    sizes = [(16, 8), (16, 16), (4, 16)]
    x = "x"
    for i, (m, n) in enumerate(sizes, 1):
        inputs = [x, b.weight(f"fc{i}.W", m, n)] + ([b.weight(f"fc{i}.B", m, scale=0.1)] if bias else [])
        out = "y" if i == len(sizes) else f"h{2 * i - 1}"
        b.nodes.append(helper.make_node("Gemm", inputs, [out], name="", transB=1))
        if i < len(sizes):
            x = f"h{2 * i}"
            b.nodes.append(helper.make_node("Relu", [out], [x], name=""))
    return b.model([_input(8)], {"y": (4,)})


def opset7_chain(seed: int = 0) -> onnx.ModelProto:
    """
    x [N,2,6,6] -> Conv conv (4, 3x3, pads 1) -> Relu -> Flatten [N,144] -> Gemm fc1 (W 24x144)
                -> Relu -> Gemm fc2 (W 12x24) -> Relu -> Gemm fc3 (W 3x12) -> y [N,3]
    opset 7 (Gemm needs its C input) and IR version 3 (every initializer is also listed as
    a graph input); all Gemm have transB=1 and a bias
    groups: conv (4, spatial 36), fc1 (24), fc2 (12): prunable; fc3 (graph output)
    """
    b = _Builder(seed)
    h = b.conv("x", "conv", 2, 4)
    h = b.node("Flatten", [b.node("Relu", [h], "relu0")], "flat", axis=1)
    for i, (m, n) in enumerate([(24, 144), (12, 24), (3, 12)], 1):
        h = b.node("Gemm", [h, b.weight(f"fc{i}.W", m, n, scale=0.3), b.weight(f"fc{i}.B", m, scale=0.1)],
                   f"fc{i}", transB=1)
        if i < 3:
            h = b.node("Relu", [h], f"relu{i}")
    inputs = [_input(2, 6, 6)] + [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in b.inits]
    graph = helper.make_graph(b.nodes, "opset7", inputs, [_output(h, (3,))], initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=3)
    onnx.checker.check_model(model)
    return model


def token_ffn(seed: int = 0, *, gelu: str = "erf", features: int = 8, hidden: int = 16,
              vocab: int | None = None) -> onnx.ModelProto:
    """A transformer feed-forward block on token features, with a masked-mean sentence output::

        x [N, T, 8] -> MatMul(ffn1.W: 8 x 16) -> Add(ffn1.B) -> GELU -> MatMul(ffn2.W: 16 x 8)
          -> Add(ffn2.B) -> tokens [N, T, 8] -> mean over attention_mask -> sentence [N, 8]

    GELU is the exported Erf pattern (Div, Erf, Add, Mul, Mul; ``gelu="erf"``) or one Gelu
    node (``gelu="op"``, opset 20). ``attention_mask`` [N, T] is int64, 1 on real tokens.
    With ``vocab``, the input is ``input_ids`` [N, T] (int64) and x = Gather(embedding, input_ids).
    """
    b = _Builder(seed)
    x = "x" if vocab is None else b.node("Gather", [b.weight("embedding", vocab, features), "input_ids"], "embed")
    h = b.node("MatMul", [x, b.weight("ffn1.W", features, hidden)], "ffn1")
    h = b.node("Add", [b.weight("ffn1.B", hidden, scale=0.1), h], "ffn1.add")
    if gelu == "op":
        a = b.node("Gelu", [h], "gelu")
    else:
        d = b.node("Div", [h, b.init("gelu.sqrt2", np.array(1.4142135, dtype=np.float32))], "gelu.div")
        e = b.node("Erf", [d], "gelu.erf")
        p = b.node("Add", [e, b.init("gelu.one", np.array(1.0, dtype=np.float32))], "gelu.add")
        m = b.node("Mul", [h, p], "gelu.mul")
        a = b.node("Mul", [m, b.init("gelu.half", np.array(0.5, dtype=np.float32))], "gelu.mul1")
    y = b.node("MatMul", [a, b.weight("ffn2.W", hidden, features)], "ffn2")
    y = b.node("Add", [y, b.weight("ffn2.B", features, scale=0.1)], "ffn2.add")
    b.nodes.append(helper.make_node("Identity", [y], ["tokens"], name="tokens"))
    mask = b.node("Cast", ["attention_mask"], "mask.cast", to=TensorProto.FLOAT)
    mask = b.node("Unsqueeze", [mask, b.init("mask.axes", np.array([2], dtype=np.int64))], "mask.unsqueeze")
    total = b.node("ReduceSum", [b.node("Mul", ["tokens", mask], "mask.mul"), b.init("sum.axes", np.array([1]))],
                   "sum", keepdims=0)
    count = b.node("ReduceSum", [mask, "sum.axes"], "count", keepdims=0)
    b.nodes.append(helper.make_node("Div", [total, count], ["sentence"], name="sentence"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", features]) if vocab is None else
              helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "T"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "T"])]
    outputs = [helper.make_tensor_value_info("sentence", TensorProto.FLOAT, ["N", features]),
               helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["N", "T", features])]
    graph = helper.make_graph(b.nodes, "token_ffn", inputs, outputs, initializer=b.inits)
    opset = 20 if gelu == "op" else OPSET
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def token_feeds(batch: int = 6, tokens: int = 5, features: int = 8, seed: int = 1) -> dict[str, np.ndarray]:
    """Random token features and a right-padded mask (sample i has tokens - i % tokens... >= 1 real)."""
    rng = np.random.default_rng(seed)
    lengths = np.array([tokens - (i % tokens) for i in range(batch)])
    mask = (np.arange(tokens)[None, :] < lengths[:, None]).astype(np.int64)
    return {"x": rng.standard_normal((batch, tokens, features)).astype(np.float32), "attention_mask": mask}


def attention(seed: int = 0, *, heads: int = 4, size: int = 2, width: int = 8) -> onnx.ModelProto:
    """Multi-head self-attention as PyTorch exports it, with a residual and a masked-mean output::

        x [N, T, 8] -> q/k/v: MatMul (8 x H d) + Add -> Reshape [0, 0, H, d] -> Transpose
          scores = q k^T / sqrt(d) + (1 - mask) * -1e4 -> Softmax -> @ v -> Transpose
          -> Reshape [0, 0, H d] -> out: MatMul (H d x 8) + Add -> + x -> tokens; sentence = masked mean

    H = ``heads`` heads of ``size``; every Reshape target is its own initializer.
    """
    b = _Builder(seed)
    D = heads * size
    mask = b.node("Cast", ["attention_mask"], "mask.cast", to=TensorProto.FLOAT)
    bias = b.node("Mul", [b.node("Sub", [b.init("one", np.array(1.0, dtype=np.float32)), mask], "mask.sub"),
                          b.init("big", np.array(-1e4, dtype=np.float32))], "mask.mul")
    bias = b.node("Unsqueeze", [bias, b.init("mask.axes", np.array([1, 2], dtype=np.int64))], "mask.unsqueeze")
    split = {}
    for role, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        h = b.node("MatMul", ["x", b.weight(f"{role}.W", width, D)], role)
        h = b.node("Add", [h, b.weight(f"{role}.B", D, scale=0.1)], f"{role}.add")
        h = b.node("Reshape", [h, b.init(f"{role}.shape", np.array([0, 0, heads, size], dtype=np.int64))],
                   f"{role}.reshape")
        split[role] = b.node("Transpose", [h], f"{role}.transpose", perm=perm)
    scores = b.node("MatMul", [split["q"], split["k"]], "scores")
    scores = b.node("Div", [scores, b.init("scale", np.array(np.sqrt(size), dtype=np.float32))], "scores.div")
    scores = b.node("Add", [scores, bias], "scores.mask")
    probs = b.node("Softmax", [scores], "softmax", axis=-1)
    ctx = b.node("MatMul", [probs, split["v"]], "context")
    ctx = b.node("Transpose", [ctx], "context.transpose", perm=[0, 2, 1, 3])
    ctx = b.node("Reshape", [ctx, b.init("context.shape", np.array([0, 0, D], dtype=np.int64))], "context.reshape")
    y = b.node("MatMul", [ctx, b.weight("out.W", D, width)], "out")
    y = b.node("Add", [y, b.weight("out.B", width, scale=0.1)], "out.add")
    b.nodes.append(helper.make_node("Add", [y, "x"], ["tokens"], name="residual"))
    m = b.node("Unsqueeze", [mask, b.init("sum.axes2", np.array([2], dtype=np.int64))], "mask.unsqueeze2")
    total = b.node("ReduceSum", [b.node("Mul", ["tokens", m], "mean.mul"), b.init("sum.axes", np.array([1]))],
                   "sum", keepdims=0)
    count = b.node("ReduceSum", [m, "sum.axes"], "count", keepdims=0)
    b.nodes.append(helper.make_node("Div", [total, count], ["sentence"], name="sentence"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", width]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "T"])]
    outputs = [helper.make_tensor_value_info("sentence", TensorProto.FLOAT, ["N", width]),
               helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["N", "T", width])]
    graph = helper.make_graph(b.nodes, "attention", inputs, outputs, initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model
