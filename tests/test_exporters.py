"""Models as other exporters write them: the bundled LeNet rebuilt in older or unusual forms
must compress as the original does, or be refused with one line and a documented exit code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from onnxprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "lenet_caffe_mnist.onnx"
DATA = ROOT / "models" / "usps_test.npz"
FAST = ["--method", "spectral", "--keep", "0.5", "--calib-size", "200", "--no-latency", "-q"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ir3_lenet_with_constant_shape() -> onnx.ModelProto:
    """LeNet as an old exporter (IR version 3, opset 8) writes it: every initializer is also a
    graph input, and the flatten before the FC layers is a Reshape whose shape is a Constant node."""
    model = onnx.load(str(MODEL))
    model.ir_version = 3
    model.opset_import[0].version = 8
    graph = model.graph
    listed = {i.name for i in graph.input}
    graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                       for t in graph.initializer if t.name not in listed)
    (index, flatten), = [(i, n) for i, n in enumerate(graph.node) if n.op_type == "Flatten"]
    shape = helper.make_node("Constant", [], ["flat_shape"], name="flat_shape",
                             value=numpy_helper.from_array(np.array([-1, 800], np.int64)))
    reshape = helper.make_node("Reshape", [flatten.input[0], "flat_shape"], [flatten.output[0]], name=flatten.name)
    graph.node.remove(flatten)
    graph.node.insert(index, reshape)
    graph.node.insert(index, shape)
    onnx.checker.check_model(model)
    return model


def test_ir3_model_with_a_constant_node_compresses_to_a_valid_ir3_model(tmp_path):
    # The Constant folded into an initializer must also become a graph input in IR 3; it was
    # not, and compress blamed the model: "error: after select-nodes | fails the ONNX checker:
    # flat_shape in initializer but not in graph input" (exit 1).
    source = tmp_path / "lenet_ir3.onnx"
    onnx.save(ir3_lenet_with_constant_shape(), str(source))
    out = tmp_path / "small.onnx"
    result = cli("compress", source, "--target-data", DATA, "-o", out, *FAST)
    assert result.exit_code == 0, result.output + result.stderr
    small = onnx.load(str(out))
    onnx.checker.check_model(small, full_check=True)
    assert small.ir_version == 3
    inputs = {i.name for i in small.graph.input}
    assert {t.name for t in small.graph.initializer} <= inputs
    report = json.loads(out.with_name("small.report.json").read_text())
    assert report["changed"]
    assert report["validation"]["agreement"] > 0.85


def transposed_weight_lenet() -> onnx.ModelProto:
    """LeNet's FC layers as torch exports ``F.linear`` without constant folding:
    ``MatMul(x, Transpose(W)) + b`` with W stored [out, in]."""
    model = onnx.load(str(MODEL))
    nodes = []
    for node in model.graph.node:
        if node.op_type != "Gemm":
            nodes.append(node)
            continue
        x, w, b = node.input
        nodes += [helper.make_node("Transpose", [w], [f"{w}_t"], name=f"{node.name}_t", perm=[1, 0]),
                  helper.make_node("MatMul", [x, f"{w}_t"], [f"{node.name}_mm"], name=f"{node.name}_mm"),
                  helper.make_node("Add", [f"{node.name}_mm", b], [node.output[0]], name=f"{node.name}_add")]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model


def test_weight_behind_a_transpose_node_is_compressed(tmp_path):
    # ip1 (93 % of LeNet's weights) read its weight through a Transpose node: it was "not a
    # constant", no plan reached half the parameters and compress exited 3.
    source = tmp_path / "lenet_transposed.onnx"
    onnx.save(transposed_weight_lenet(), str(source))
    out = tmp_path / "small.onnx"
    result = cli("compress", source, "--target-data", DATA, "-o", out, *FAST)
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(out.with_name("small.report.json").read_text())
    validation = report["validation"]
    assert validation["params_candidate"] <= 0.5 * validation["params_reference"]
    assert validation["agreement"] > 0.85
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_a_transpose_of_a_weight_read_elsewhere_stays():
    # tied weights (an embedding read by Gather and, transposed, by the output MatMul) stay one tensor
    from onnxprune.model import fold_constants

    model = transposed_weight_lenet()
    ip2 = next(n for n in model.graph.node if n.name == "ip2_add")
    tied = helper.make_node("Identity", ["ip2_w"], ["ip2_w_tied"], name="tied")
    model.graph.node.append(tied)
    model.graph.output.append(helper.make_tensor_value_info("ip2_w_tied", onnx.TensorProto.FLOAT, [10, 500]))
    fold_constants(model)
    transposes = [n.input[0] for n in model.graph.node if n.op_type == "Transpose"]
    assert transposes == ["ip2_w"], transposes
    assert ip2.output[0] == "ip2"
    names = [t.name for t in model.graph.initializer]
    assert "ip1_w_t" in names and "ip1_w" not in names and "ip2_w" in names


def _gemm_to(model: onnx.ModelProto, form: str) -> onnx.ModelProto:
    """LeNet's Gemm layers (transB=1) as Gemm with transB=0 or as MatMul + Add."""
    weights = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type != "Gemm":
            nodes.append(node)
            continue
        x, w, b = node.input
        weights[w].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights[w]).T.copy(), w))
        if form == "transB0":
            nodes.append(helper.make_node("Gemm", [x, w, b], list(node.output), name=node.name, transB=0))
        else:
            nodes += [helper.make_node("MatMul", [x, w], [f"{node.name}_mm"], name=f"{node.name}_mm"),
                      helper.make_node("Add", [f"{node.name}_mm", b], list(node.output), name=f"{node.name}_add")]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _unfused_bn(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each Conv split into Conv + BatchNormalization (the same function), and Dropout + Identity
    after the ReLU, as an export without BN folding in inference mode writes them."""
    rng = np.random.default_rng(0)
    weights = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            _, w, b = node.input
            gamma, var = rng.uniform(0.5, 2.0, (2, weights[w].dims[0]))
            beta, mean = rng.normal(0, 0.1, (2, gamma.size))
            scale = gamma / np.sqrt(var + 1e-5)
            weight = numpy_helper.to_array(weights[w]).astype(np.float64) / scale[:, None, None, None]
            bias = (numpy_helper.to_array(weights[b]) - beta) / scale + mean
            weights[w].CopyFrom(numpy_helper.from_array(weight.astype(np.float32), w))
            weights[b].CopyFrom(numpy_helper.from_array(bias.astype(np.float32), b))
            stats = [f"{node.name}_bn_{k}" for k in ("scale", "bias", "mean", "var")]
            model.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), n)
                                           for n, v in zip(stats, (gamma, beta, mean, var)))
            out = node.output[0]
            node.output[0] = f"{out}_conv"
            nodes += [node, helper.make_node("BatchNormalization", [f"{out}_conv", *stats], [out],
                                             name=f"{node.name}_bn", epsilon=1e-5)]
        elif node.op_type == "Relu":
            out = node.output[0]
            node.output[0] = f"{out}_relu"
            nodes += [node, helper.make_node("Dropout", [f"{out}_relu"], [f"{out}_drop"], name="drop"),
                      helper.make_node("Identity", [f"{out}_drop"], [out], name="identity")]
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _nhwc(model: onnx.ModelProto) -> onnx.ModelProto:
    """An NHWC input transposed to NCHW in front of the first Conv (fed with --layout NHWC)."""
    data = model.graph.input[0]
    for node in model.graph.node:
        node.input[:] = [f"{data.name}_nchw" if x == data.name else x for x in node.input]
    model.graph.node.insert(0, helper.make_node("Transpose", [data.name], [f"{data.name}_nchw"], name="to_nchw",
                                                perm=[0, 3, 1, 2]))
    data.CopyFrom(helper.make_tensor_value_info(data.name, onnx.TensorProto.FLOAT, ["N", 28, 28, 1]))
    return model


def _batch(model: onnx.ModelProto, size: int = 8) -> onnx.ModelProto:
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].Clear()
        value.type.tensor_type.shape.dim[0].dim_value = size
    return model


def _odd_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Exporter-style names: '/', ':' and spaces in node and weight names, the odd node unnamed."""
    renamed = {t.name: f"onnx::{t.name} w:0" for t in model.graph.initializer}
    for t in model.graph.initializer:
        t.name = renamed[t.name]
    for i, node in enumerate(model.graph.node):
        node.name = "" if i % 2 else f"/model/layer {i}/{node.op_type}:0"
        node.input[:] = [renamed.get(x, x) for x in node.input]
    return model


FORMS = {"gemm_transB0": lambda m: _gemm_to(m, "transB0"), "matmul_add": lambda m: _gemm_to(m, "matmul"),
         "unfused_bn_dropout_identity": _unfused_bn, "nhwc_input": _nhwc, "fixed_batch_8": _batch,
         "odd_names": _odd_names}


@pytest.fixture(scope="module")
def original_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("original") / "small.onnx"
    result = cli("compress", MODEL, "--target-data", DATA, "-o", out, *FAST)
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(out.with_name("small.report.json").read_text())["validation"]


@pytest.mark.parametrize("form", sorted(FORMS))
def test_exporter_forms_compress_as_the_original(tmp_path, form, original_result):
    model = FORMS[form](onnx.load(str(MODEL)))
    onnx.checker.check_model(model)
    source = tmp_path / f"lenet_{form}.onnx"
    onnx.save(model, str(source))
    out = tmp_path / "small.onnx"
    layout = ["--layout", "NHWC"] if form == "nhwc_input" else []
    result = cli("compress", source, "--target-data", DATA, "-o", out, *FAST, *layout)
    assert result.exit_code == 0, result.output + result.stderr
    validation = json.loads(out.with_name("small.report.json").read_text())["validation"]
    assert validation["accuracy_reference"] == original_result["accuracy_reference"]
    assert abs(validation["agreement"] - original_result["agreement"]) <= 0.02
    ratio = validation["params_candidate"] / validation["params_reference"]
    assert abs(ratio - original_result["params_candidate"] / original_result["params_reference"]) <= 0.02
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_an_input_of_any_size_fed_images_of_another_size_says_to_resize(tmp_path):
    """LeNet with height and width left free ([N, 1, H, W]) takes the 16x16 USPS digits as they are, and its FC
    layer then refuses them: compress and validate said only that onnxruntime failed; the hint now says the
    input takes any size and to resize the samples (with --resize 28 it compresses)."""
    model = onnx.load(str(MODEL))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    path = tmp_path / "free_size.onnx"
    onnx.save(model, path)
    hint = "input data takes any size (N, 1, H, W), so the samples were fed as they are (1x16x16)"
    for args in (["compress", path, "--target-data", DATA, "-o", tmp_path / "o.onnx", *FAST],
                 ["validate", path, path, "--data", DATA, "--no-latency"]):
        result = cli(*args)
        assert result.exit_code == 1 and hint in result.stderr, (result.exit_code, result.stderr)
        assert "Traceback" not in result.output + result.stderr
    result = cli("compress", path, "--target-data", DATA, "-o", tmp_path / "o.onnx", "--resize", "28", *FAST)
    assert result.exit_code == 0, result.output + result.stderr
