"""Parameters and MACs per layer: hand-computed counts on tiny graphs, totals on real models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import cost
from onnxprune.cost import LayerCost, layer_costs, total_macs
from onnxprune.errors import ModelError
from onnxprune.model import count_parameters, load_model


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs],
        [numpy_helper.from_array(np.ones(shape, np.float32), name) for name, shape in inits],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def _one(model, op) -> LayerCost:
    (layer,) = [c for c in layer_costs(model) if c.op == op]
    return layer


# x [N,3,8,8] -> Conv(W [4,3,3,3], b [4], stride 2, pad 1) -> y [N,4,4,4]
def conv_strided_padded(batch="N"):
    return _model(
        [helper.make_node("Conv", ["x", "W", "b"], ["y"], name="conv", strides=[2, 2], pads=[1, 1, 1, 1])],
        [("x", [batch, 3, 8, 8])], [("y", [batch, 4, 4, 4])], [("W", [4, 3, 3, 3]), ("b", [4])])


def test_conv_strided_padded():
    layer = _one(conv_strided_padded(), "Conv")
    assert layer.name == "conv"
    assert layer.params == 4 * 3 * 3 * 3 + 4
    assert layer.macs == (4 * 4 * 4) * 3 * 3 * 3  # out elems * C_in * kh * kw
    assert layer.input == (1, 3, 8, 8) and layer.output == (1, 4, 4, 4)      # what a spatial split costs reads


def test_conv_input_shape_is_measured_where_inference_cannot_tell():
    """A Conv reading a tensor shape inference leaves unknown (here: a Pad by amounts computed at
    run time) still gets its input shape: a spatial split's first Conv runs at every input column."""
    graph = helper.make_graph(
        [helper.make_node("Abs", ["p"], ["pads"], name="abs"),
         helper.make_node("Pad", ["x", "pads"], ["r"], name="pad"),
         helper.make_node("Conv", ["r", "W"], ["y"], name="conv", strides=[2, 2], pads=[1, 1, 1, 1])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "W"),
         numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64), "p")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    assert _one(model, "Conv").input == (1, 3, 10, 10)


# x [N,4,5,5] -> Conv(W [6,2,3,3], group 2, pad 1) -> y [N,6,5,5]
def test_conv_grouped():
    model = _model([helper.make_node("Conv", ["x", "W"], ["y"], group=2, pads=[1, 1, 1, 1])],
                   [("x", ["N", 4, 5, 5])], [("y", ["N", 6, 5, 5])], [("W", [6, 2, 3, 3])])
    layer = _one(model, "Conv")
    assert layer.name == "Conv_0"  # unnamed nodes get op_index
    assert layer.params == 6 * 2 * 9
    assert layer.macs == (6 * 5 * 5) * (4 // 2) * 9


# x [N,8,6,6] -> depthwise Conv(W [8,1,3,3], group 8) -> y [N,8,4,4]
def test_conv_depthwise():
    model = _model([helper.make_node("Conv", ["x", "W"], ["y"], group=8)],
                   [("x", ["N", 8, 6, 6])], [("y", ["N", 8, 4, 4])], [("W", [8, 1, 3, 3])])
    assert _one(model, "Conv").macs == (8 * 4 * 4) * 1 * 9


# x [N,4,3,3] -> ConvTranspose(W [4,2,2,2], stride 2) -> y [N,2,6,6]
def test_conv_transpose():
    model = _model([helper.make_node("ConvTranspose", ["x", "W"], ["y"], strides=[2, 2])],
                   [("x", ["N", 4, 3, 3])], [("y", ["N", 2, 6, 6])], [("W", [4, 2, 2, 2])])
    # every output element receives one tap from each of the 4 input channels
    assert _one(model, "ConvTranspose").macs == (2 * 6 * 6) * 4


# x [N,5] -> Gemm(W [3,5], transB) + b [3] -> y [N,3]
def test_gemm():
    model = _model([helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1)],
                   [("x", ["N", 5])], [("y", ["N", 3])], [("W", [3, 5]), ("b", [3])])
    layer = _one(model, "Gemm")
    assert (layer.params, layer.macs) == (18, 15)


# x [N,5] -> Transpose -> t [5,N] -> Gemm(transA, W [5,3]) -> y [N,3]
def test_gemm_trans_a():
    model = _model([helper.make_node("Transpose", ["x"], ["t"]),
                    helper.make_node("Gemm", ["t", "W"], ["y"], transA=1)],
                   [("x", ["N", 5])], [("y", ["N", 3])], [("W", [5, 3])])
    assert _one(model, "Gemm").macs == 15


# x [N,7,5] -> MatMul(W [5,3]) -> y [N,7,3]
def test_matmul_constant():
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                   [("x", ["N", 7, 5])], [("y", ["N", 7, 3])], [("W", [5, 3])])
    layer = _one(model, "MatMul")
    assert (layer.params, layer.macs) == (15, 7 * 3 * 5)


# a [N,2,4,6] @ b [N,2,6,3] -> y [N,2,4,3]   (both operands dynamic)
def test_matmul_dynamic():
    model = _model([helper.make_node("MatMul", ["a", "b"], ["y"])],
                   [("a", ["N", 2, 4, 6]), ("b", ["N", 2, 6, 3])], [("y", ["N", 2, 4, 3])])
    layer = _one(model, "MatMul")
    assert (layer.params, layer.macs) == (0, 2 * 4 * 3 * 6)


# x -> MatMul(W) -> Relu -> MatMul(W) -> y     (shared_weight: counted once)
def test_shared_weight_counted_once():
    model = _model([helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
                    helper.make_node("Relu", ["h"], ["r"]),
                    helper.make_node("MatMul", ["r", "W"], ["y"], name="mm")],
                   [("x", ["N", 4])], [("y", ["N", 4])], [("W", [4, 4])])
    costs = layer_costs(model)
    assert [c.name for c in costs] == ["MatMul_0", "Relu_1", "MatMul_2"]  # as graph.node_names: unique
    assert [c.op for c in costs] == ["MatMul", "Relu", "MatMul"]
    assert [c.params for c in costs] == [16, 0, 0]
    assert [c.macs for c in costs] == [16, 0, 16]
    assert sum(c.params for c in costs) == count_parameters(model)
    assert total_macs(model) == 32


def test_fixed_batch_counts_per_sample():
    assert total_macs(conv_strided_padded(batch=4)) == total_macs(conv_strided_padded())


def test_input_shapes_override():
    model = _model([helper.make_node("Conv", ["x", "W"], ["y"])],
                   [("x", ["N", 3, "H", "W_"])], [("y", ["N", 2, "H", "W_"])], [("W", [2, 3, 1, 1])])
    assert total_macs(model, input_shapes={"x": [1, 3, 10, 20]}) == 2 * 10 * 20 * 3
    with pytest.raises(ModelError, match="not an input"):
        total_macs(model, input_shapes={"nope": [1]})


def test_falls_back_to_onnxruntime_when_inference_fails(monkeypatch):
    model = conv_strided_padded()
    expected = layer_costs(model)
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", lambda m, **kw: m)
    assert cost._infer_shapes(model, None)[0].get("y") is None  # really not inferred
    assert layer_costs(model) == expected


def test_caller_model_untouched():
    model = conv_strided_padded()
    before = model.SerializeToString()
    layer_costs(model)
    assert model.SerializeToString() == before


# ----------------------------------------------------------------------------- real models

# name: (MACs per sample, parameters); MACs from the layer formulas in onnxprune/cost.py,
# matching the published figures (MobileNetV2 300M, ResNet-20 41M, LeNet 2.3M).
REAL = {
    "lenet_caffe_mnist.onnx": (2_293_000, 431_080),
    "mnist_cnn_fc3136.onnx": (4_241_152, 421_642),
    "mnist_extdata/mnist.onnx": (411_008, 216_650),
    "resnet20_cifar10.onnx": (40_551_040, 269_034),
    "mobilenetv2_imagenet_fp32.onnx": (300_774_272, 3_487_816),     # not its 65 Clips' 130 float bounds
}


@pytest.mark.real
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_model_totals(shared, name):
    model = load_model(shared / "models" / name)
    costs = layer_costs(model)
    macs, params = REAL[name]
    assert sum(c.macs for c in costs) == macs
    assert sum(c.params for c in costs) == params == count_parameters(model)
    heavy = [c for c in costs if c.op in ("Conv", "Gemm", "MatMul")]
    assert heavy and all(c.macs > 0 for c in heavy)
    assert all(c.macs == 0 for c in costs if c not in heavy)


# ----------------------------------------------------------------------------- integer, fused, recurrent

def _typed(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _graph_model(nodes, inputs, outputs, inits, domains=(("", 13),)):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in domains], ir_version=8)


def test_integer_and_quantized_ops_count_as_their_float_forms():
    u8 = TensorProto.UINT8
    conv = _graph_model(
        [helper.make_node("ConvInteger", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        [_typed("x", u8, ["N", 3, 8, 8])], [_typed("y", TensorProto.INT32, ["N", 4, 8, 8])],
        [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.uint8), "w")], (("", 10),))
    assert _one(conv, "ConvInteger").macs == 4 * 8 * 8 * 3 * 3 * 3
    matmul = _graph_model(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"], name="mm")],
        [_typed("a", u8, ["N", 5])], [_typed("y", TensorProto.INT32, ["N", 7])],
        [numpy_helper.from_array(np.ones((5, 7), np.uint8), "b")], (("", 10),))
    assert _one(matmul, "MatMulInteger").macs == 7 * 5
    scale, zero = numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8), "z")
    qconv = _graph_model(
        [helper.make_node("QLinearConv", ["x", "s", "z", "w", "s", "z", "s", "z"], ["y"], name="qconv")],
        [_typed("x", u8, ["N", 3, 8, 8])], [_typed("y", u8, ["N", 4, 6, 6])],
        [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.uint8), "w"), scale, zero], (("", 10),))
    assert _one(qconv, "QLinearConv").macs == 4 * 6 * 6 * 3 * 3 * 3


def test_recurrent_ops_count_every_step():
    hidden, features, steps = 6, 4, 5
    model = _graph_model(           # batch first (layout 1), as a batch_first export: [N, T, C]
        [helper.make_node("LSTM", ["x", "W", "R"], ["y"], name="lstm", hidden_size=hidden, layout=1)],
        [_typed("x", TensorProto.FLOAT, ["N", steps, features])], [_typed("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((1, 4 * hidden, features), np.float32), "W"),
         numpy_helper.from_array(np.ones((1, 4 * hidden, hidden), np.float32), "R")], (("", 14),))
    assert _one(model, "LSTM").macs == steps * 4 * hidden * (features + hidden)


def test_fused_ops_of_onnxruntime_count_as_what_they_fuse():
    model = _graph_model(
        [helper.make_node("FusedConv", ["x", "W"], ["y"], name="fused", domain="com.microsoft", activation="Relu")],
        [_typed("x", TensorProto.FLOAT, ["N", 3, 8, 8])], [_typed("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "W")], (("", 13), ("com.microsoft", 1)))
    assert _one(model, "FusedConv").macs == 4 * 8 * 8 * 3


# x [N,2,4,4] -> Conv(W [3,2,1,1], b [3]) -> Clip(lo, hi) -> Pad(pads int64, value) -> Resize(roi, scales)
#   -> Reshape(shape int64) -> y [N, 300]; plus an initializer no node reads
def resize_head():
    f32 = lambda name, value: numpy_helper.from_array(np.asarray(value, np.float32), name)   # noqa: E731
    i64 = lambda name, value: numpy_helper.from_array(np.asarray(value, np.int64), name)     # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "W", "b"], ["c"], name="conv"),
             helper.make_node("Clip", ["c", "lo", "hi"], ["r"], name="clip"),
             helper.make_node("Pad", ["r", "pads", "value"], ["p"], name="pad"),
             helper.make_node("Resize", ["p", "roi", "scales"], ["u"], name="resize"),
             helper.make_node("Reshape", ["u", "shape"], ["y"], name="flat")]
    inits = [f32("W", np.ones((3, 2, 1, 1))), f32("b", np.zeros(3)), f32("lo", 0.0), f32("hi", 6.0),
             i64("pads", [0, 0, 1, 1, 0, 0, 1, 1]), f32("value", 0.0), f32("roi", []), f32("scales", [1, 1, 2, 2]),
             i64("shape", [-1, 300]), f32("unused", np.ones(50))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 300])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_parameters_are_weights_not_scales_bounds_shapes_or_unused_tensors():
    """A Resize's float scales, Clip's bounds and Pad's value (attributes in earlier opsets), shapes
    and an initializer no node reads are no parameters: the Conv's 6 + 3 weights are."""
    import onnxprune

    model = resize_head()
    onnx.checker.check_model(model)
    assert count_parameters(model) == 9
    assert {c.name: c.params for c in layer_costs(model)} == {"conv": 9, "clip": 0, "pad": 0, "resize": 0, "flat": 0}
    info = onnxprune.inspect(model)
    assert info["params"] == 9
    assert [layer["name"] for layer in info["layers"]] == ["conv"]      # no Reshape or Resize as a layer


def test_an_if_holds_the_weights_its_branches_read():
    """The layers' parameters sum to the model's: an If's branches read W and W2 (inspect listed no layer)."""
    import onnxprune

    def branch(weight, out):
        return helper.make_graph([helper.make_node("MatMul", ["x", weight], [out])], out, [],
                                 [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 3])])

    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch("W", "t"), else_branch=branch("W2", "e"))],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
              helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.ones((4, 3), np.float32), name) for name in ("W", "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    assert [(c.name, c.params) for c in layer_costs(model)] == [("if", 24)] and count_parameters(model) == 24
    assert [layer["name"] for layer in onnxprune.inspect(model)["layers"]] == ["if"]


def test_the_integer_weights_of_a_quantized_model_are_its_parameters():
    """QDQ (DequantizeLinear of an int8 weight) and integer ops (ConvInteger, QLinearMatMul's int32-free
    form): the int8 weights count, their scales and zero points do not (a dynamically quantized LeNet read
    584 parameters, its float biases and scales)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-5, 5, (4, 3)).astype(np.int8), "wq"),
             numpy_helper.from_array(np.array(0.1, np.float32), "ws"), numpy_helper.from_array(np.array(0, np.int8), "wz"),
             numpy_helper.from_array(rng.integers(-5, 5, (2, 4, 1, 1)).astype(np.int8), "cw"),
             numpy_helper.from_array(np.array(0, np.uint8), "xz"), numpy_helper.from_array(np.array(0, np.int8), "cz")]
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("ConvInteger", ["img", "cw", "xz", "cz"], ["c"])]
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                                            helper.make_tensor_value_info("img", TensorProto.UINT8, ["N", 4, 3, 3])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 3]),
                               helper.make_tensor_value_info("c", TensorProto.INT32, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    assert count_parameters(model) == 12 + 8
