"""prune_channels: dead and duplicate channels prune exactly; kept paths stay as they were."""

from __future__ import annotations

import graphs
import numpy as np
import onnx
import pytest
from conftest import assert_equivalent, run_model
from onnx import numpy_helper

from onnxprune.errors import ModelError
from onnxprune.graph.groups import find_channel_groups
from onnxprune.graph.prune import prune_channels
from onnxprune.model import clone, load_model

# (builder, group, channel to drop, channel it duplicates)
CASES = [
    (graphs.gemm_chain, "fc1", 5, 2),
    (graphs.gemm_chain, "fc2", 0, 4),               # Gemm transB=0 producer, MatMul consumer
    (graphs.gemm_chain, "fc3", 1, 3),               # MatMul producer, bias in the Add after it
    (graphs.conv_bn_relu, "conv1", 3, 6),
    (graphs.flatten_to_gemm, "conv", 1, 3),
    (lambda: graphs.flatten_to_gemm(reshape=True), "conv", 2, 0),
    (graphs.reduce_to_gemm, "conv", 3, 1),                                # ReduceMean over H, W as the pooling
    (lambda: graphs.reduce_to_gemm(keepdims=1), "conv", 0, 2),
    (graphs.residual_add, "convA", 4, 1),
    (graphs.add_branches, "convA", 2, 4),           # two producers coupled by an Add
    (graphs.depthwise, "expand", 7, 2),
    (graphs.shared_consumer, "conv0", 1, 5),
    (graphs.shared_weight, "fc1", 4, 0),            # the weight is shared with the consumer
]
IDS = ["gemm_chain-fc1", "gemm_chain-fc2", "gemm_chain-fc3", "conv_bn_relu", "flatten_to_gemm", "flatten_to_gemm-reshape",
       "reduce_to_gemm", "reduce_to_gemm-keepdims",
       "residual_add-inner", "add_branches", "depthwise", "shared_consumer", "shared_weight"]



def kill_channel(model, group, c):
    """Make channel c zero at the site: zero producer rows and biases, zero BN shift/mean and dw bias."""
    def zero(value, axis):
        value = np.moveaxis(value.copy(), axis, 0)
        value[c] = 0
        return np.moveaxis(value, 0, axis)

    for producer in group.producers:
        graphs.set_init(model, producer.weight, zero(graphs.get_init(model, producer.weight), producer.axis))
        if producer.bias:
            graphs.set_init(model, producer.bias, zero(graphs.get_init(model, producer.bias), -1))
    for entry in group.path:
        for name, axis in entry.params:
            if name.endswith((".B", ".mean")):
                graphs.set_init(model, name, zero(graphs.get_init(model, name), axis))


def duplicate_channel(model, group, j, i):
    """Make channel j an exact copy of channel i everywhere before the site."""
    def copy(value, axis):
        value = np.moveaxis(value.copy(), axis, 0)
        value[j] = value[i]
        return np.moveaxis(value, 0, axis)

    graphs.edit_channel(model, group, copy)


def initializer_bytes(model):
    return {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


def group_initializers(group):
    names = {p.weight for p in group.producers} | {p.bias for p in group.producers if p.bias}
    names |= {name for entry in group.path for name, _ in entry.params}
    return names | {c.weight for c in group.consumers}


def check_interface(reference, candidate):
    onnx.checker.check_model(candidate, full_check=True)
    assert candidate.ir_version == reference.ir_version
    assert list(candidate.opset_import) == list(reference.opset_import)
    assert candidate.graph.input == reference.graph.input          # names and symbolic batch dims
    assert candidate.graph.output == reference.graph.output


@pytest.mark.parametrize("build,name,drop,source", CASES, ids=IDS)
def test_dead_channel_prunes_exactly(build, name, drop, source):
    reference = build()
    kill_channel(reference, graphs.group_of(reference, name), drop)
    candidate = clone(reference)
    group = graphs.group_of(candidate, name)
    keep = np.array([c for c in range(group.channels) if c != drop])
    prune_channels(candidate, group, keep)
    check_interface(reference, candidate)
    assert_equivalent(reference, candidate, graphs.feeds(reference), tol=1e-5)
    pruned = graphs.group_of(candidate, name)
    assert pruned.skip is None and pruned.channels == group.channels - 1


@pytest.mark.parametrize("build,name,drop,source", CASES, ids=IDS)
def test_duplicate_channel_prunes_exactly_with_reconstruction(build, name, drop, source):
    reference = build()
    duplicate_channel(reference, graphs.group_of(reference, name), drop, source)
    candidate = clone(reference)
    group = graphs.group_of(candidate, name)
    keep = np.array([c for c in range(group.channels) if c != drop])
    # phi = A phi_keep: the identity on kept channels, and the dropped copy reads its source
    a = np.zeros((group.channels, len(keep)))
    a[keep, np.arange(len(keep))] = 1.0
    a[drop, list(keep).index(source)] = 1.0
    prune_channels(candidate, group, keep, a)
    check_interface(reference, candidate)
    assert_equivalent(reference, candidate, graphs.feeds(reference), tol=1e-5)


@pytest.mark.parametrize("build,name,drop,source", CASES, ids=IDS)
def test_permuting_channels_is_exact(build, name, drop, source):
    reference = build()
    candidate = clone(reference)
    group = graphs.group_of(candidate, name)
    prune_channels(candidate, group, np.arange(group.channels)[::-1])
    assert_equivalent(reference, candidate, graphs.feeds(reference), tol=1e-5)


@pytest.mark.parametrize("build,name,drop,source", CASES, ids=IDS)
def test_other_weights_are_untouched(build, name, drop, source):
    reference = build()
    candidate = clone(reference)
    group = graphs.group_of(candidate, name)
    prune_channels(candidate, group, np.arange(1, group.channels))
    before, after = initializer_bytes(reference), initializer_bytes(candidate)
    touched = group_initializers(group) | {n for n in after if "/prune/copy" in n}
    for init in set(before) - touched:
        if init.endswith(".shape"):
            continue                                        # a Reshape target, rewritten on purpose
        assert after[init] == before[init], init
    assert [(n.name, n.op_type) for n in candidate.graph.node] == [(n.name, n.op_type) for n in reference.graph.node]


def test_shared_weight_is_copied_not_mutated():
    reference = graphs.shared_weight()
    candidate = clone(reference)
    group = graphs.group_of(candidate, "fc1")
    prune_channels(candidate, group, np.array([0, 2, 3, 5]))
    fc1, fc2 = (next(n for n in candidate.graph.node if n.name == k) for k in ("fc1", "fc2"))
    assert fc1.input[1] == "fc.W/prune/copy" and fc2.input[1] == "fc.W"
    original = graphs.get_init(reference, "fc.W")
    np.testing.assert_array_equal(graphs.get_init(candidate, "fc.W/prune/copy"), original[[0, 2, 3, 5]])
    np.testing.assert_array_equal(graphs.get_init(candidate, "fc.W"), original[:, [0, 2, 3, 5]])


def test_groups_found_before_a_copy_on_write_still_apply():
    reference = graphs.shared_weight()
    candidate = clone(reference)
    groups = {g.name: g for g in find_channel_groups(candidate)}
    prune_channels(candidate, groups["fc2"], np.arange(6)[::-1])      # fc2 now reads fc.W/prune/copy
    prune_channels(candidate, groups["fc1"], np.array([4, 0, 2, 1, 3, 5]))
    assert [n.input[1] for n in candidate.graph.node if n.op_type == "Gemm"] == ["fc.W", "fc.W/prune/copy", "fc3.W"]
    assert_equivalent(reference, candidate, graphs.feeds(reference), tol=1e-5)


def test_consumer_weights_follow_the_formula():
    rng = np.random.default_rng(3)
    # Conv consumer: every spatial tap M[:, :, h, w] -> M[:, :, h, w] A
    model = graphs.conv_bn_relu()
    group = graphs.group_of(model, "conv1")
    w = graphs.get_init(model, "conv2.W").astype(np.float64)
    keep = np.array([0, 2, 5, 7])
    a = rng.standard_normal((8, 4))
    prune_channels(model, group, keep, a)
    expected = np.stack([np.stack([w[:, :, h, x] @ a for x in range(3)], -1) for h in range(3)], -2)
    np.testing.assert_allclose(graphs.get_init(model, "conv2.W"), expected, rtol=1e-5, atol=1e-6)
    # Gemm through a Flatten: columns c*16 .. c*16+15 belong to channel c; A per position
    model = graphs.flatten_to_gemm()
    group = graphs.group_of(model, "conv")
    w = graphs.get_init(model, "fc.W").astype(np.float64)          # (5, 4*16)
    keep = np.array([3, 1])
    a = rng.standard_normal((4, 2))
    prune_channels(model, group, keep, a)
    blocks = w.reshape(5, 4, 16)
    expected = np.stack([blocks[:, :, s] @ a for s in range(16)], -1).reshape(5, 32)
    np.testing.assert_allclose(graphs.get_init(model, "fc.W"), expected, rtol=1e-5, atol=1e-6)


def test_reshape_target_and_depthwise_group_are_rewritten():
    model = graphs.flatten_to_gemm(reshape=True)
    prune_channels(model, graphs.group_of(model, "conv"), np.array([0, 3, 1]))
    assert graphs.get_init(model, "flat.shape").tolist() == [-1, 48]
    model = graphs.depthwise()
    prune_channels(model, graphs.group_of(model, "expand"), np.arange(5))
    dw = next(n for n in model.graph.node if n.name == "dw")
    assert next(a.i for a in dw.attribute if a.name == "group") == 5
    assert graphs.get_init(model, "dw.W").shape == (5, 1, 3, 3)
    assert run_model(model, graphs.feeds(model))[0].shape == (3, 4, 8, 8)


def test_value_info_is_refreshed_with_symbolic_batch():
    reference = onnx.shape_inference.infer_shapes(graphs.conv_bn_relu())
    assert any(v.name == "relu.out" for v in reference.graph.value_info)
    model = clone(reference)
    prune_channels(model, graphs.group_of(model, "conv1"), np.arange(5))
    onnx.checker.check_model(model, full_check=True)
    relu = next(v for v in model.graph.value_info if v.name == "relu.out")
    dims = relu.type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [5, 8, 8]


def test_bad_requests_raise_model_error():
    model = graphs.residual_add()
    groups = {g.name: g for g in find_channel_groups(model)}
    with pytest.raises(ModelError, match="not prunable"):
        prune_channels(model, groups["conv0"], np.arange(3))
    inner = groups["convA"]
    for keep in (np.array([], dtype=int), np.array([0, 0, 1]), np.array([0, 6]), np.array([0.0, 1.0])):
        with pytest.raises(ModelError):
            prune_channels(model, inner, keep)
    with pytest.raises(ModelError, match="shape"):
        prune_channels(model, inner, np.arange(3), np.eye(6))
    prune_channels(model, inner, np.arange(3))
    before = model.SerializeToString()
    with pytest.raises(ModelError, match="again"):              # the group is stale now
        prune_channels(model, inner, np.arange(3))
    assert model.SerializeToString() == before                  # a refused rewrite changes nothing


# --------------------------------------------------------------------------- real models

REAL = ["lenet_caffe_mnist.onnx", "mnist_cnn_fc3136.onnx", "mnist_extdata/mnist.onnx",
        "resnet20_cifar10.onnx", "mobilenetv2_imagenet_fp32.onnx"]


def real_feeds(model, batch=2):
    return graphs.feeds(model, batch=batch)


@pytest.mark.real
@pytest.mark.parametrize("file", REAL)
@pytest.mark.parametrize("order", ["identity", "reversed"])
def test_real_pruning_with_all_channels_is_exact(shared, file, order):
    """Every prunable group at once, keep = all channels, A = the matching permutation."""
    reference = load_model(shared / "models" / file)
    candidate = clone(reference)
    groups = [g for g in find_channel_groups(candidate) if g.skip is None]
    assert groups
    for group in groups:
        keep = np.arange(group.channels)
        if order == "reversed":
            keep = keep[::-1]
        a = np.zeros((group.channels, group.channels))
        a[keep, np.arange(group.channels)] = 1.0
        prune_channels(candidate, group, keep, a)
    check_interface(reference, candidate)
    assert_equivalent(reference, candidate, real_feeds(reference), tol=1e-4)


@pytest.mark.real
@pytest.mark.parametrize("file", REAL)
def test_real_pruning_one_channel_per_group_runs(shared, file):
    reference = load_model(shared / "models" / file)
    candidate = clone(reference)
    groups = [g for g in find_channel_groups(candidate) if g.skip is None]
    for group in groups:
        prune_channels(candidate, group, np.arange(group.channels - 1))
    check_interface(reference, candidate)
    feeds = real_feeds(reference)
    ref, out = run_model(reference, feeds), run_model(candidate, feeds)
    assert [r.shape for r in ref] == [o.shape for o in out]
    assert all(np.isfinite(o).all() for o in out)
    left = {g.name: g.channels for g in find_channel_groups(candidate) if g.skip is None}
    assert left == {g.name: g.channels - 1 for g in groups}
