"""graph/groups.py: coupled channel groups, on tiny graphs and real models."""

from __future__ import annotations

import json

import graphs
import numpy as np
import onnx
import pytest

from onnxprune.graph.groups import describe_groups, find_channel_groups
from onnxprune.graph.layers import describe_linear_layers, find_linear_layers
from onnxprune.model import load_model


def by_name(groups):
    return {g.name: g for g in groups}


# --------------------------------------------------------------------------- channel groups

def test_gemm_chain_groups():
    groups = by_name(find_channel_groups(graphs.gemm_chain()))
    fc1, fc2, fc3, fc4 = groups["fc1"], groups["fc2"], groups["fc3"], groups["fc4"]
    assert fc1.skip is None and fc1.channels == 16 and fc1.site == "relu1.out"
    assert [(p.node, p.weight, p.axis, p.bias) for p in fc1.producers] == [("fc1", "fc1.W", 0, "fc1.B")]
    assert [(c.node, c.weight, c.axis, c.spatial) for c in fc1.consumers] == [("fc2", "fc2.W", 0, 1)]
    assert fc2.skip is None and fc2.channels == 6
    assert [(p.node, p.axis) for p in fc2.producers] == [("fc2", 1)]               # transB=0
    assert [(c.node, c.axis) for c in fc2.consumers] == [("fc3", 0)]               # MatMul
    assert fc3.skip is None and fc3.site == "relu3.out"
    assert [(p.node, p.weight, p.axis, p.bias) for p in fc3.producers] == [("fc3", "fc3.W", 1, "fc3.B")]
    assert [p.node for p in fc3.path] == ["relu3"]                                # the bias Add is absorbed
    assert "graph output" in fc4.skip


def test_conv_bn_relu_group():
    groups = by_name(find_channel_groups(graphs.conv_bn_relu()))
    group = groups["conv1"]
    assert group.skip is None and group.channels == 8 and group.site == "relu.out"
    assert [p.node for p in group.path] == ["bn", "relu"]
    assert group.path[0].params == [("bn.scale", 0), ("bn.B", 0), ("bn.mean", 0), ("bn.var", 0)]
    assert [(c.node, c.axis) for c in group.consumers] == [("conv2", 1)]
    assert "graph output" in groups["conv2"].skip


@pytest.mark.parametrize("reshape", [False, True])
def test_flatten_to_gemm_group(reshape):
    group = by_name(find_channel_groups(graphs.flatten_to_gemm(reshape=reshape)))["conv"]
    assert group.skip is None and group.channels == 4
    assert group.site == "pool.out"                       # before the Flatten: [N, C, H, W]
    assert [p.node for p in group.path] == ["relu", "pool", "flat"]
    assert [(c.node, c.axis, c.spatial) for c in group.consumers] == [("fc", 1, 16)]
    assert group.reshapes == (["flat"] if reshape else [])


def test_residual_add_couples_the_stream_and_leaves_the_inner_group_prunable():
    groups = by_name(find_channel_groups(graphs.residual_add()))
    stream = groups["conv0"]
    assert [p.node for p in stream.producers] == ["conv0", "convB"]
    assert [c.node for c in stream.consumers] == ["convA", "out"]
    assert "residual" in stream.skip and "add" in stream.skip
    inner = groups["convA"]
    assert inner.skip is None and inner.channels == 6
    assert [c.node for c in inner.consumers] == ["convB"]
    assert "convB" not in groups                          # convB belongs to the stream group


def test_add_of_two_branches_is_one_prunable_group():
    groups = by_name(find_channel_groups(graphs.add_branches()))
    group = groups["convA"]
    assert group.skip is None and group.site == "relu.out"
    assert [p.node for p in group.producers] == ["convA", "convB"]
    assert [p.node for p in group.path] == ["add", "relu"]


def test_concat_branches_are_skipped_with_a_reason():
    groups = by_name(find_channel_groups(graphs.concat_branches()))
    for name in ("convA", "convB"):
        assert "Concat concat" in groups[name].skip


def test_depthwise_conv_is_on_the_path():
    groups = by_name(find_channel_groups(graphs.depthwise()))
    group = groups["expand"]
    assert group.skip is None and group.channels == 12 and group.site == "clip2.out"
    assert [p.node for p in group.path] == ["clip1", "dw", "clip2"]
    assert group.path[1].params == [("dw.W", 0), ("dw.B", 0)]
    assert [c.node for c in group.consumers] == ["project"]
    assert "dw" not in groups                              # a depthwise conv starts no group


def test_shared_consumer_group_has_two_consumers():
    group = by_name(find_channel_groups(graphs.shared_consumer()))["conv0"]
    assert group.skip is None and group.site == "relu.out"
    assert [c.node for c in group.consumers] == ["convA", "convB"]


def test_consumers_of_different_tensors_are_skipped():
    # relu.out feeds convA; conv0.out (before the Relu) also feeds a new conv: two sites
    model = graphs.shared_consumer()
    model.graph.node[3].input[0] = "conv0.out"            # convB reads before the Relu
    group = by_name(find_channel_groups(model))["conv0"]
    assert "different tensors" in group.skip


def test_grouped_conv_consumer_and_unknown_op_are_skipped():
    model = graphs.depthwise()
    dw = next(n for n in model.graph.node if n.name == "dw")
    dw.op_type = "Softmax"                                # crosses channels
    del dw.attribute[:]
    del dw.input[1:]
    group = by_name(find_channel_groups(model))["expand"]
    assert "Softmax dw" in group.skip


def test_describe_groups_is_json():
    rows = describe_groups(find_channel_groups(graphs.flatten_to_gemm(reshape=True)))
    text = json.dumps(rows)
    assert json.loads(text)[0]["consumers"] == [{"node": "fc", "weight": "fc.W", "axis": 1, "spatial": 16}]
    assert rows[0]["prunable"] and not rows[1]["prunable"]
    json.dumps(describe_linear_layers(find_linear_layers(graphs.gemm_chain())))


# --------------------------------------------------------------------------- real models

REAL = ["lenet_caffe_mnist.onnx", "mnist_cnn_fc3136.onnx", "mnist_extdata/mnist.onnx",
        "resnet20_cifar10.onnx", "mobilenetv2_imagenet_fp32.onnx"]


@pytest.mark.real
@pytest.mark.parametrize("file", REAL)
def test_real_models_analyse(shared, file):
    model = load_model(shared / "models" / file)
    groups = find_channel_groups(model)
    assert groups
    for group in groups:
        assert group.skip is None or group.skip.strip()
        if group.skip is None:
            assert group.producers and group.consumers
    json.dumps(describe_groups(groups))
    layers = find_linear_layers(model)
    assert layers and any(layer.skip is None for layer in layers)


@pytest.mark.real
def test_real_lenet_groups(shared):
    groups = by_name(find_channel_groups(load_model(shared / "models" / "lenet_caffe_mnist.onnx")))
    assert groups["conv1"].skip is None and groups["conv1"].channels == 20
    conv2 = groups["conv2"]
    assert conv2.skip is None and conv2.channels == 50 and conv2.site == "pool2"
    assert [(c.node, c.spatial) for c in conv2.consumers] == [("ip1", 16)]
    assert groups["ip1"].skip is None and groups["ip1"].channels == 500
    assert "graph output" in groups["ip2"].skip


@pytest.mark.real
def test_real_mnist_cnn_groups(shared):
    groups = by_name(find_channel_groups(load_model(shared / "models" / "mnist_cnn_fc3136.onnx")))
    assert groups["/conv1/Conv"].skip is None
    conv2 = groups["/conv2/Conv"]
    assert conv2.skip is None and conv2.reshapes == ["/Reshape"]
    assert [(c.node, c.spatial) for c in conv2.consumers] == [("/fc1/Gemm", 49)]
    assert groups["/fc1/Gemm"].skip is None and groups["/fc1/Gemm"].channels == 128


@pytest.mark.real
def test_real_resnet20_inner_groups_are_prunable(shared):
    model = load_model(shared / "models" / "resnet20_cifar10.onnx")
    groups = find_channel_groups(model)
    inner = [g for g in groups if g.name.endswith("conv1/Conv") and g.name.startswith("/layer")]
    assert len(inner) == 9
    for group in inner:
        assert group.skip is None, group.skip
        assert [c.node for c in group.consumers] == [group.name.replace("conv1", "conv2")]
    streams = [g for g in groups if g not in inner and len(g.producers) > 1]
    assert len(streams) == 3
    assert all(g.skip for g in streams)
    assert any("Slice" in g.skip for g in streams) and any("Pad" in g.skip for g in streams)


@pytest.mark.real
def test_real_mobilenet_expansion_groups_are_prunable(shared):
    model = load_model(shared / "models" / "mobilenetv2_imagenet_fp32.onnx")
    groups = find_channel_groups(model)
    ops = {n.name: n for n in model.graph.node}

    def is_depthwise(name):
        return any(a.name == "group" and a.i > 1 for a in ops[name].attribute)

    expansions = [g for g in groups if any(ops[p.node].op_type == "Conv" and is_depthwise(p.node) for p in g.path)]
    assert len(expansions) == 17                          # the stem conv and the 16 expand 1x1 convs
    for group in expansions:
        assert group.skip is None, group.skip
        assert len([p for p in group.path if is_depthwise(p.node)]) == 1
    residual = [g for g in groups if len(g.producers) > 1]
    assert len(residual) == 5 and all("residual" in g.skip for g in residual)
    head = by_name(groups)["Conv_124"]                    # 1280 channels through GAP + Reshape into MatMul
    assert head.skip is None and head.reshapes == ["Reshape_103"]
    assert [(c.node, c.axis, c.spatial) for c in head.consumers] == [("MatMul_129", 0, 1)]


def test_an_activation_broadcast_along_the_channels_is_not_coupled():
    # y = relu(conv0) * sigmoid(gate) with gate [N,1,H,W]: the gate does not carry channels
    model = graphs.add_branches()
    add = next(n for n in model.graph.node if n.name == "add")
    add.op_type = "Mul"
    convB = next(n for n in model.graph.node if n.name == "convB")
    w = next(t for t in model.graph.initializer if t.name == "convB.W")
    b = next(t for t in model.graph.initializer if t.name == "convB.B")
    w.CopyFrom(onnx.numpy_helper.from_array(np.ones((1, 3, 1, 1), np.float32), "convB.W"))
    b.CopyFrom(onnx.numpy_helper.from_array(np.zeros(1, np.float32), "convB.B"))
    add.input[:] = [convB.output[0], add.input[0]]          # the broadcast operand first
    groups = by_name(find_channel_groups(model))
    assert groups["convA"].skip is None and [p.node for p in groups["convA"].producers] == ["convA"]
    assert groups["convB"].channels == 1 and "convA" not in [p.node for p in groups["convB"].producers]


@pytest.mark.parametrize("keepdims", [0, 1])
def test_a_spatial_reduce_mean_is_a_per_channel_pooling(keepdims):
    """x.mean((2, 3)) exports as ReduceMean over H, W: channel c stays channel c."""
    group = by_name(find_channel_groups(graphs.reduce_to_gemm(keepdims=keepdims)))["conv"]
    assert group.skip is None and group.channels == 4
    assert [c.node for c in group.consumers] == ["fc"]
    model = graphs.reduce_to_gemm(keepdims=keepdims)
    next(n for n in model.graph.node if n.op_type == "ReduceMean").attribute[0].ints[:] = [1, 2]   # over C too
    assert "ReduceMean" in by_name(find_channel_groups(model))["conv"].skip
