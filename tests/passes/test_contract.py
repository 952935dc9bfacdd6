"""Every registered pass honours the contract: docstring, options round-trip, no-op on a
graph it cannot touch (changed=False, graph unchanged), graph inputs/outputs keep their names.

    relu_only:  x[N,4] -> Relu -> y          (nothing to compress)
    gemm_pair:  x[N,16] -> Gemm(24x16) -> Relu -> Gemm(8x24) -> y
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.calibration.provider import StatsProvider
from onnxprune.data.samples import open_samples
from onnxprune.passes import REGISTRY, options_to_dict
from onnxprune.passes.base import options_from_dict
from onnxprune.pipeline import Recipe, run_pipeline

RNG = np.random.default_rng(1)


def model_of(nodes, inits, n_in, n_out):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def relu_only():
    return model_of([helper.make_node("Relu", ["x"], ["y"], name="relu")], {}, 4, 4)


def gemm_pair():
    return model_of([helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
                     helper.make_node("Relu", ["h"], ["r"], name="relu"),
                     helper.make_node("Gemm", ["r", "W2"], ["y"], name="fc2", transB=1)],
                    {"W1": RNG.normal(size=(24, 16)), "b1": RNG.normal(size=24), "W2": RNG.normal(size=(8, 24))},
                    16, 8)


def pipeline_for(name):
    """The smallest recipe that exercises pass ``name`` (some passes need a partner)."""
    partner = {"select-nodes": [("reconstruct-next-layer", {})],
               "bias-compensate": [], "reconstruct-next-layer": []}
    before = {"bias-compensate": [("low-rank-split", {"method": "svd", "rank": 2})],
              "reconstruct-next-layer": [("select-nodes", {"fraction": 0.5})]}
    return tuple(before.get(name, []) + [(name, {})] + partner.get(name, []))


def run(model, passes, n_in):
    x = RNG.normal(size=(64, n_in)).astype(np.float32)
    samples = open_samples([{"x": x}], model)
    provider = StatsProvider({"target": samples, "source": samples}, progress=False)
    return run_pipeline(model, Recipe(passes=passes), provider)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_docstring_and_options_round_trip(name):
    cls = REGISTRY[name]
    assert (cls.__doc__ or "").strip(), f"{name} has no docstring"
    assert cls.__module__.rsplit(".", 1)[-1] == name.replace("-", "_")
    options = cls().options
    assert options_from_dict(cls.Options, options_to_dict(options), owner=name) == options


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_noop_graph_reports_unchanged(name):
    model = relu_only()
    before = model.SerializeToString()
    out, report = run(model, pipeline_for(name), 4)
    assert not any(p["changed"] for p in report["passes"])
    assert model.SerializeToString() == before
    assert [n.op_type for n in out.graph.node] == ["Relu"]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_graph_io_names_kept(name):
    model = gemm_pair()
    out, _ = run(model, pipeline_for(name), 16)
    assert [i.name for i in out.graph.input] == ["x"]
    assert [o.name for o in out.graph.output] == ["y"]
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert out.ir_version == model.ir_version
    onnx.checker.check_model(out)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_requirement_has_a_producer_and_the_smallest_recipe_is_in_order(name):
    """What a pass requires, some registered pass produces; ``pipeline_for`` puts it first."""
    cls = REGISTRY[name]
    for kind in cls.requires:
        assert any(kind in other.produces for other in REGISTRY.values()), (name, kind)
    Recipe(passes=pipeline_for(name))                      # check_order accepts it
