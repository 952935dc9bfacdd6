"""graph/layers.py: linear layers (what a low-rank split can replace), on tiny graphs."""

from __future__ import annotations

import graphs
import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxprune.graph.index import node_names
from onnxprune.graph.layers import find_linear_layers


def by_name(groups):
    return {g.name: g for g in groups}


# --------------------------------------------------------------------------- linear layers

def test_linear_layers_of_gemm_chain():
    layers = {layer.name: layer for layer in find_linear_layers(graphs.gemm_chain())}
    fc1, fc2, fc3 = layers["fc1"], layers["fc2"], layers["fc3"]
    assert (fc1.op, fc1.out_features, fc1.in_features, fc1.skip) == ("Gemm", 16, 8, None)
    assert fc1.attrs == {"transA": 0, "transB": 1, "alpha": 1.0, "beta": 1.0}
    assert (fc1.input, fc1.output, fc1.weight, fc1.bias) == ("x", "fc1.out", "fc1.W", "fc1.B")
    assert (fc2.out_features, fc2.in_features) == (6, 16)          # transB=0: W is n x m
    # MatMul + Add: the layer ends at the Add, whose constant is the bias
    assert (fc3.op, fc3.out_features, fc3.in_features) == ("MatMul", 4, 6)
    assert (fc3.output, fc3.bias, fc3.bias_node, fc3.skip) == ("fc3_bias.out", "fc3.B", "fc3_bias", None)
    assert [layer.node_index for layer in layers.values()] == [0, 2, 4, 7]


def test_linear_layers_of_convs():
    layers = {layer.name: layer for layer in find_linear_layers(graphs.depthwise())}
    expand, dw = layers["expand"], layers["dw"]
    assert (expand.out_features, expand.in_features, expand.skip) == (12, 4, None)
    assert expand.attrs == {"kernel_shape": [1, 1], "strides": [1, 1], "pads": [0, 0, 0, 0],
                            "dilations": [1, 1], "group": 1, "auto_pad": "NOTSET"}
    assert (dw.out_features, dw.in_features) == (12, 9)
    assert "group=12" in dw.skip
    conv1 = next(layer for layer in find_linear_layers(graphs.conv_bn_relu()) if layer.name == "conv1")
    assert (conv1.out_features, conv1.in_features) == (8, 3 * 3 * 3)


def test_linear_layer_skips():
    skips = {layer.name: layer.skip for layer in find_linear_layers(graphs.shared_weight())}
    assert "shared with fc2" in skips["fc1"] and "shared with fc1" in skips["fc2"] and skips["fc3"] is None

    w = onnx.numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    nodes = [
        helper.make_node("MatMul", ["W", "x"], ["left"]),                     # weight on the left
        helper.make_node("Gemm", ["x2", "W2"], ["transposed"], transA=1),
        helper.make_node("MatMul", ["x3", "x4"], ["dynamic"]),                # no constant weight
    ]
    graph = helper.make_graph(
        nodes, "skips",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
         for n, s in [("x", [3, 2]), ("x2", [4, 2]), ("x3", [2, 4]), ("x4", [4, 2])]],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("left", "transposed", "dynamic")],
        initializer=[w, onnx.numpy_helper.from_array(np.ones((4, 5), np.float32), "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    layers = find_linear_layers(model)
    assert [layer.name for layer in layers] == ["MatMul_0", "Gemm_1", "MatMul_2"]   # unnamed: op_index
    assert "left" in layers[0].skip
    assert "transA" in layers[1].skip
    assert "not an initializer" in layers[2].skip


def test_node_names_are_unique_and_stable():
    model = graphs.gemm_chain()
    model.graph.node[1].name = ""
    model.graph.node[3].name = "fc1"          # a duplicate name falls back to op_index
    names = node_names(model)
    assert names == ["Gemm_0", "Relu_1", "fc2", "Relu_3", "fc3", "fc3_bias", "relu3", "fc4"]
    assert node_names(model) == names


def _conv_model(kernel, stride, pads=None, auto_pad=None, size=7, seed=0):
    """x [N, 3, size, size] -> Conv (5 filters, kernel, stride, pads or auto_pad) -> y."""
    w = np.random.default_rng(seed).standard_normal((5, 3) + tuple(kernel)).astype(np.float32)
    attrs = {"kernel_shape": list(kernel), "strides": [stride] * 2}
    attrs.update({"pads": pads} if pads is not None else {"auto_pad": auto_pad})
    graph = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["y"], name="conv", **attrs)], "conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[onnx.numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=graphs.IR_VERSION)


def test_auto_pad_same_is_read_as_the_pads_onnxruntime_applies():
    """A SAME_* Conv's patch statistics and spatial split read explicit pads: the ones that give
    onnxruntime's own output (odd totals: SAME_UPPER pads the end more, SAME_LOWER the beginning)."""
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((2, 3, 7, 7)).astype(np.float32)
    for kernel, stride in (((3, 3), 1), ((4, 2), 1), ((3, 3), 2), ((2, 4), 2)):
        for mode in ("SAME_UPPER", "SAME_LOWER", "VALID"):
            model = _conv_model(kernel, stride, auto_pad=mode)
            (layer,) = find_linear_layers(model)
            assert layer.attrs["auto_pad"] == "NOTSET", (kernel, stride, mode)
            run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
                None, {"x": x})[0]
            np.testing.assert_allclose(run(_conv_model(kernel, stride, pads=layer.attrs["pads"])), run(model),
                                       rtol=1e-5, atol=1e-5, err_msg=f"{kernel} stride {stride} {mode}")
    # a stride above 1 on a symbolic size: the pads depend on it, auto_pad stays
    model = _conv_model((3, 3), 2, auto_pad="SAME_UPPER")
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "W"
    (layer,) = find_linear_layers(model)
    assert layer.attrs["auto_pad"] == "SAME_UPPER" and layer.attrs["pads"] == [0, 0, 0, 0]
