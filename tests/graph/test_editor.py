"""graph/editor.py: the one graph editor (lookups that follow writes, initializers, names, order)."""

from __future__ import annotations

import graphs
import numpy as np
import onnx
from conftest import assert_equivalent
from onnx import helper

from onnxprune.graph.editor import GraphEditor
from onnxprune.graph.index import name_nodes


def named_chain():
    model = graphs.unnamed_chain()
    name_nodes(model)          # Gemm_0, Relu_1, Gemm_2, Relu_3, Gemm_4
    return model


def test_lookups_follow_structural_writes():
    model = named_chain()
    graph = GraphEditor(model, owner="test")
    assert graph.producer_of("h1").name == "Gemm_0"
    assert [n.name for n in graph.readers("h1")] == ["Relu_1"]
    assert graph.producer_of("x") is None and graph.use_count("y") == 1            # a graph output
    # Relu_1 becomes Relu -> Identity: the readers of h2 and the new tensor are found at once
    relu = graph.node("Relu_1")
    hidden = graph.name("Relu_1", "hidden")
    assert hidden == "Relu_1/test/hidden"
    relu.output[0] = hidden
    graph.insert_after(relu, helper.make_node("Identity", [hidden], ["h2"], name=graph.name("Relu_1", "copy")))
    assert graph.producer_of("h2").name == "Relu_1/test/copy"
    assert [n.name for n in graph.readers(hidden)] == ["Relu_1/test/copy"]
    assert graph.has_node("Relu_1/test/copy") and not graph.has_node("nope")
    assert [n.name for n in model.graph.node][:3] == ["Gemm_0", "Relu_1", "Relu_1/test/copy"]
    onnx.checker.check_model(model)
    assert_equivalent(named_chain(), model, graphs.feeds(model, batch=3))


def test_replace_keeps_topological_order():
    model = named_chain()
    graph = GraphEditor(model)
    relu = graph.node("Relu_3")
    first = helper.make_node("Relu", ["h3"], ["mid"], name="a")
    second = helper.make_node("Relu", ["mid"], ["h4"], name="b")        # Relu(Relu(x)) == Relu(x)
    graph.replace(relu, [first, second])
    assert [n.name for n in model.graph.node] == ["Gemm_0", "Relu_1", "Gemm_2", "a", "b", "Gemm_4"]
    assert graph.producer_of("h4").name == "b" and not graph.has_node("Relu_3")
    onnx.checker.check_model(model)
    assert_equivalent(named_chain(), model, graphs.feeds(model, batch=3))


def test_initializers_read_write_add_and_remove():
    model = named_chain()
    graph = GraphEditor(model)
    w = graph.array("fc1.W")
    w[0] = 0.0                                     # a copy: the model is unchanged
    assert graph.array("fc1.W")[0].any()
    graph.set_array("fc1.W", w)
    assert not graph.array("fc1.W")[0].any() and graph.has_initializer("fc1.W")
    graph.set_array("extra", np.ones(3, np.float32))
    assert graph.has_initializer("extra") and "extra" in {t.name for t in model.graph.initializer}
    assert graph.fresh("extra") == "extra/1" and graph.fresh("new") == "new"
    graph.remove_unused()
    assert not graph.has_initializer("extra") and "extra" not in {t.name for t in model.graph.initializer}
    assert graph.has_initializer("fc1.W")


def test_ir3_initializers_stay_listed_as_inputs():
    model = graphs.opset7_chain()
    graph = GraphEditor(model)
    graph.set_array("fc1.W", graph.array("fc1.W")[:, :10])       # a new shape: the input entry follows
    graph.set_array("added", np.zeros((2, 5), np.float32))       # a new initializer gets its entry
    listed = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    assert listed["fc1.W"] == [24, 10] and listed["added"] == [2, 5]
    graph.remove_unused()
    assert "added" not in {v.name for v in model.graph.input}


def test_write_input_copies_a_shared_initializer():
    model = graphs.shared_weight()
    graph = GraphEditor(model, owner="prune")
    shared = next(name for name in graph.inits if graph.use_count(name) > 1)
    reader = graph.readers(shared)[0]
    value = graph.array(shared) * 2
    new = graph.write_input(reader, shared, value)
    assert new == f"{shared}/prune/copy" and new in reader.input and shared not in reader.input
    np.testing.assert_array_equal(graph.array(new), value)
    assert graph.use_count(shared) >= 1 and graph.use_count(new) == 1
    again = graph.write_input(reader, new, value * 3)      # no longer shared: in place
    assert again == new
    np.testing.assert_array_equal(graph.array(new), value * 3)
