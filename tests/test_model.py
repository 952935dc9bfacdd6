"""Model loading and saving: external data, the >2 GB path, constant folding, atomic writes."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from conftest import assert_equivalent
from onnx import TensorProto, helper, numpy_helper

from onnxprune import model as model_io
from onnxprune.errors import ModelError
from onnxprune.graph.index import GraphIndex


def const_gemm():
    """x[N,4] -> Gemm(W from a Constant node, b) -> y"""
    w = helper.make_node("Constant", [], ["W"], name="w_const",
                         value=numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4)))
    gemm = helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=1)
    graph = helper.make_graph([w, gemm], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(np.ones(3, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_constants_fold_into_initializers(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(const_gemm(), str(path))
    loaded = model_io.load_model(path)
    assert [n.op_type for n in loaded.graph.node] == ["Gemm"]
    assert GraphIndex(loaded).dims("W") == (3, 4)
    assert_equivalent(const_gemm(), loaded, {"x": np.ones((2, 4), np.float32)})


def test_large_models_are_saved_with_external_data(tmp_path, monkeypatch):
    model = const_gemm()
    model_io.fold_constants(model)
    monkeypatch.setattr(model_io, "PROTO_LIMIT", 10)   # pretend the model is over 2 GB
    out = model_io.save_model(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    monkeypatch.undo()
    again = model_io.load_model(out)
    assert model_io.model_hash(again) == model_io.model_hash(model)
    assert_equivalent(model, again, {"x": np.ones((2, 4), np.float32)})


def test_model_hash_is_what_it_was_for_every_weight_type():
    # the hash names the model in statistics files: its value must not change with how it is computed
    def reference(model):
        digest = hashlib.sha256()
        graph = onnx.GraphProto()
        graph.CopyFrom(model.graph)
        del graph.initializer[:]
        digest.update(graph.SerializeToString(deterministic=True))
        for tensor in sorted(model.graph.initializer, key=lambda t: t.name):
            digest.update(tensor.name.encode())
            digest.update(numpy_helper.to_array(tensor).tobytes())
        return digest.hexdigest()[:16]

    model = const_gemm()
    model.graph.doc_string = "documented"
    rng = np.random.default_rng(0)
    model.graph.initializer.extend([
        numpy_helper.from_array(rng.standard_normal(5).astype(np.float16), "half"),
        numpy_helper.from_array(np.arange(4, dtype=np.int64), "steps"),
        numpy_helper.from_array(rng.standard_normal((2, 3)), "double"),
        helper.make_tensor("listed", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]),          # float_data, no raw_data
        helper.make_tensor("brain", TensorProto.BFLOAT16, [2], [1.0, -2.0]),
    ])
    model.graph.value_info.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 3]))
    assert model_io.model_hash(model) == reference(model)
    model.graph.initializer[-2].float_data[0] = 4.0
    assert model_io.model_hash(model) == reference(model)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = const_gemm()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save", broken)
    with pytest.raises(OSError):
        model_io.save_model(model, tmp_path / "out.onnx", external_data=True)
    assert list(tmp_path.iterdir()) == []


def test_unreadable_external_data_is_a_model_error(tmp_path):
    model = const_gemm()
    model_io.fold_constants(model)
    path = model_io.save_model(model, tmp_path / "m.onnx", external_data=True)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(ModelError, match="m.onnx"):
        model_io.load_model(path)


@pytest.mark.real
def test_external_data_model_loads_and_hash_ignores_storage(shared, tmp_path):
    loaded = model_io.load_model(shared / "models/mnist_extdata/mnist.onnx")
    assert model_io.count_parameters(loaded) == 216650
    inline = model_io.save_model(loaded, tmp_path / "inline.onnx", external_data=False)
    assert model_io.model_hash(model_io.load_model(inline)) == model_io.model_hash(loaded)


@pytest.mark.parametrize("edit, words", [
    ("half", "has float16 tensors"),
    ("cast", "has float16 tensors"),
    ("if", "has control flow (If)"),
    ("qdq", "is quantized (1 DequantizeLinear, 1 QuantizeLinear): onnxprune compresses float models"),
])
def test_what_compression_cannot_handle_is_one_model_error(edit, words):
    """float16 tensors (weights, or a Cast inside a float32 model), control flow and quantized
    layers are refused before calibration builds graphs around them; a plain float32 model passes."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    nodes, inits = [helper.make_node("Relu", ["x"], ["y"])], []
    if edit == "half":           # a half weight an op reads as it is (a Cast of it would be fine)
        inits = [numpy_helper.from_array(np.zeros(4, np.float16), "w")]
        nodes = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
                 helper.make_node("Add", ["h", "w"], ["a"]), helper.make_node("Cast", ["a"], ["y"], to=TensorProto.FLOAT)]
    elif edit == "cast":
        nodes = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
                 helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT)]
    elif edit == "if":
        branch = helper.make_graph([helper.make_node("Identity", ["x"], ["b"])], "b", [], [y])
        cond = numpy_helper.from_array(np.array(True), "c")
        nodes, inits = [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)], [cond]
    elif edit == "qdq":          # what onnxruntime.quantization writes around each layer (QDQ format)
        inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    with pytest.raises(ModelError, match=words.replace("(", "\\(").replace(")", "\\)")):
        model_io.check_compressible(model, name="m.onnx")
    model_io.check_compressible(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                                                    [x], [y]), ir_version=8))


def test_an_identity_of_a_small_stored_tensor_is_folded_on_load(tmp_path):
    """torch (do_constant_folding=False) exports a BatchNorm mean equal to its bias as
    Identity(bias): loaded, it is a tensor of its own, as the graph analysis needs; an
    Identity of a large tensor (a tied weight) stays shared."""
    from onnxprune.runtime import make_session

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    big = np.arange(model_io.IDENTITY_FOLD_SIZE + 1, dtype=np.float32)
    nodes = [helper.make_node("Identity", ["b"], ["b2"]), helper.make_node("Add", ["x", "b2"], ["h"]),
             helper.make_node("Identity", ["big"], ["big2"]), helper.make_node("ReduceSum", ["big2"], ["s"]),
             helper.make_node("Add", ["h", "s"], ["y"])]
    inits = [numpy_helper.from_array(np.array([1, 2, 3], np.float32), "b"), numpy_helper.from_array(big, "big")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    loaded = model_io.load_model(path)
    identities = [n.input[0] for n in loaded.graph.node if n.op_type == "Identity"]
    assert identities == ["big"] and "b2" in {t.name for t in loaded.graph.initializer}
    feed = {"x": np.ones((2, 3), np.float32)}
    np.testing.assert_array_equal(make_session(loaded).run(None, feed)[0], make_session(model).run(None, feed)[0])
