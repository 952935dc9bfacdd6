"""The pipeline on graphs exporters really emit: unnamed nodes, opset 7 with IR version 3.

    unnamed_chain: x[N,8] -> Gemm -> Relu -> Gemm -> Relu -> Gemm -> y   (every name "")
    opset7_chain:  x[N,2,6,6] -> Conv -> Relu -> Flatten -> Gemm -> Relu -> Gemm -> Relu -> Gemm -> y
                   (opset 7: Gemm needs C; IR 3: initializers are also graph inputs)

Weights are made exactly low rank (or channels exactly dead) so every rewrite must
reproduce the original outputs.
"""

from __future__ import annotations

import dataclasses
import math

import graphs
import numpy as np
import onnx
import pytest
from conftest import assert_equivalent

from onnxprune.api import compress
from onnxprune.calibration.provider import StatsProvider
from onnxprune.data.samples import open_samples
from onnxprune.errors import InternalError, OnnxPruneError, RecipeError
from onnxprune.graph.index import name_nodes, node_names
from onnxprune.model import load_model
from onnxprune.passes.base import REGISTRY, Approximation, Pass, PassResult, Selection
from onnxprune.pipeline import Recipe, run_pipeline
from onnxprune.recipes import method_passes

METHODS = {name: method_passes(name, rank=2) for name in ("svd", "dalr", "dalr-bc")}


def rank_two(model, *names):
    """Make each weight ``name`` exactly rank 2 (so a rank-2 split is exact)."""
    rng = np.random.default_rng(3)
    for name in names:
        m, n = graphs.get_init(model, name).shape
        graphs.set_init(model, name, rng.standard_normal((m, 2)) @ rng.standard_normal((2, n)) / np.sqrt(n))


def run(model, passes, *, n=256, mode="one-shot"):
    x = graphs.feeds(model, batch=n, seed=0)["x"]
    provider = StatsProvider({"target": open_samples([{"x": x}], model)}, batch_size=64, folds=2, progress=False)
    return run_pipeline(model, Recipe(passes=tuple(passes), mode=mode, batch_size=64), provider)


def split_layers(report):
    return [row["layer"] for p in report["passes"] for row in p.get("split", [])]


# --------------------------------------------------------------------------- unnamed nodes

def test_node_names_fill_in_unnamed_nodes_once_and_avoid_taken_names():
    model = graphs.unnamed_chain()
    assert node_names(model) == ["Gemm_0", "Relu_1", "Gemm_2", "Relu_3", "Gemm_4"]
    model.graph.node[4].name = "Relu_1"          # someone's own name equals a generated one
    assert node_names(model) == ["Gemm_0", "Relu_1_1", "Gemm_2", "Relu_3", "Relu_1"]
    assert name_nodes(model) == 4 and name_nodes(model) == 0
    assert [n.name for n in model.graph.node] == ["Gemm_0", "Relu_1_1", "Gemm_2", "Relu_3", "Relu_1"]


def test_load_model_names_every_node(tmp_path):
    path = tmp_path / "unnamed.onnx"
    onnx.save(graphs.unnamed_chain(), str(path))
    loaded = load_model(path)
    assert [n.name for n in loaded.graph.node] == ["Gemm_0", "Relu_1", "Gemm_2", "Relu_3", "Gemm_4"]
    assert onnx.load(str(path)).graph.node[0].name == ""          # the file is untouched


@pytest.mark.parametrize("method", sorted(METHODS))
def test_unnamed_chain_splits_two_layers(method):
    """The second split used to address its node by a position the first split made stale
    ("Nodes in a graph must be topologically sorted")."""
    model = graphs.unnamed_chain()
    rank_two(model, "fc1.W", "fc2.W")
    before = model.SerializeToString()
    passes = [(name, dict(opts)) for name, opts in METHODS[method]]
    passes[0][1]["layers"] = ("Gemm_0", "Gemm_2")
    out, report = run(model, passes)
    assert split_layers(report) == ["Gemm_0", "Gemm_2"]
    assert model.SerializeToString() == before                    # the caller's model is not renamed
    assert [n.name for n in out.graph.node] == [
        "Gemm_0/low-rank-split/B", "Gemm_0/low-rank-split/A", "Relu_1", "Gemm_2/low-rank-split/B",
        "Gemm_2/low-rank-split/A", "Relu_3",
        "Gemm_4"]
    onnx.checker.check_model(out)
    assert_equivalent(model, out, graphs.feeds(model, batch=7, seed=5), tol=1e-4)


def test_unnamed_chain_through_the_python_api():
    """A ModelProto handed to api.compress is named on the pipeline's clone, never in place."""
    model = graphs.unnamed_chain()
    rank_two(model, "fc1.W", "fc2.W", "fc3.W")
    before = model.SerializeToString()
    x = graphs.feeds(model, batch=300, seed=0)["x"]
    recipe = Recipe(passes=(("low-rank-split", {"method": "dalr", "rank": 2}), ("bias-compensate", {})))
    result = compress(model, x, recipe=recipe, progress=False, measure_latency=False)
    assert model.SerializeToString() == before
    assert split_layers(result.report) == ["Gemm_0", "Gemm_2", "Gemm_4"]
    assert result.report["validation"]["relative_error"] < 1e-4


def test_a_recipe_that_changes_nothing_returns_the_input_with_its_value_info():
    """An exporter's value_info (the mnist_extdata export has 10) was dropped by the check after
    each pass, so a run that split nothing (--energy 0.999) reported "changed": true and never
    said "no layer changed"; now the input comes back as it is."""
    model = onnx.shape_inference.infer_shapes(graphs.gemm_chain())
    assert model.graph.value_info
    x = graphs.feeds(model, batch=64, seed=0)["x"]
    recipe = Recipe(passes=(("low-rank-split", {"method": "svd", "energy": 1.0}), ("bias-compensate", {})))
    result = compress(model, x, recipe=recipe, progress=False, measure_latency=False)
    assert not split_layers(result.report) and result.report["changed"] is False
    assert result.report["note"].startswith("no layer changed")
    assert result.model.graph == model.graph


def test_unnamed_chain_prunes_channels():
    model = graphs.unnamed_chain()
    w, b = graphs.get_init(model, "fc1.W"), graphs.get_init(model, "fc1.B")
    w[3], b[3] = 0.0, -1.0                                          # channel 3 of Gemm_0 is dead
    graphs.set_init(model, "fc1.W", w)
    graphs.set_init(model, "fc1.B", b)
    passes = [("select-nodes", {"criterion": "spectral", "alpha": 1.0, "groups": ("Gemm_0",)}),
              ("reconstruct-next-layer", {}), ("low-rank-split", {"method": "svd", "rank": 1, "layers": ("Gemm_4",)})]
    out, report = run(model, passes)
    pruned = {row["group"]: row["kept"] for p in report["passes"] for row in p.get("pruned", [])}
    assert pruned == {"Gemm_0": 15}
    assert split_layers(report) == ["Gemm_4"]
    onnx.checker.check_model(out)


# --------------------------------------------------------------------------- opset 7, IR 3

def assert_ir3_consistent(model):
    """IR 3: every initializer is a graph input (with its shape), and nothing else is stale."""
    assert model.ir_version == 3
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    listed = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim) for v in model.graph.input}
    for name, dims in inits.items():
        assert listed.get(name) == dims, name
    assert set(listed) - set(inits) == {"x"}
    for node in model.graph.node:
        if node.op_type == "Gemm":
            assert len(node.input) == 3, node.name                   # Gemm-7 requires C
    onnx.checker.check_model(model)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_opset7_low_rank_split(method):
    model = graphs.opset7_chain()
    rank_two(model, "fc1.W", "fc2.W")
    passes = [(name, dict(opts)) for name, opts in METHODS[method]]
    passes[0][1]["layers"] = ("fc1", "fc2", "conv")
    out, report = run(model, passes)
    assert split_layers(report) == ["conv", "fc1", "fc2"]
    assert_ir3_consistent(out)
    assert [o.version for o in out.opset_import] == [7]
    # fc1 and fc2 are exact; the 4-filter conv at rank 2 is not: compare with the conv split alone
    alone, _ = run(model, [(name, {**opts, "layers": ("conv",)} if name == "low-rank-split" else opts)
                           for name, opts in METHODS[method]])
    assert_equivalent(alone, out, graphs.feeds(model, batch=7, seed=5), tol=1e-4)


def test_opset7_bias_compensate_adds_to_the_zero_bias():
    """A Gemm-7 split gets explicit zero biases; bias-compensate must add to them, not append a 4th input."""
    model = graphs.opset7_chain()
    passes = [("low-rank-split", {"method": "svd", "rank": 2, "layers": ("fc2",)}), ("bias-compensate", {})]
    out, report = run(model, passes)
    assert_ir3_consistent(out)
    rows = report["passes"][1]["compensated"]
    assert [r["layer"] for r in rows] == ["fc2"] and rows[0]["bias_shift_norm"] > 0


@pytest.mark.parametrize("mode", ["one-shot", "sequential"])
def test_opset7_select_nodes_and_reconstruct(mode):
    model = graphs.opset7_chain()
    w, b = graphs.get_init(model, "fc1.W"), graphs.get_init(model, "fc1.B")
    w[[4, 9]], b[[4, 9]] = 0.0, -1.0                                # two dead channels of fc1
    graphs.set_init(model, "fc1.W", w)
    graphs.set_init(model, "fc1.B", b)
    passes = [("select-nodes", {"criterion": "spectral", "alpha": 1.0, "groups": ("fc1", "conv")}),
              ("reconstruct-next-layer", {})]
    out, report = run(model, passes, mode=mode)
    pruned = {row["group"]: row["kept"] for p in report["passes"] for row in p.get("pruned", [])}
    assert pruned["fc1"] == 22
    assert_ir3_consistent(out)
    assert_equivalent(model, out, graphs.feeds(model, batch=7, seed=5), tol=1e-4)


# --------------------------------------------------------------------------- internal errors

@dataclasses.dataclass(frozen=True)
class _NoOptions:
    """None."""


class _Unsorted(Pass):
    """Moves the last node first: a rewrite that breaks topological order (a bug to catch)."""

    name = "test-unsorted"
    Options = _NoOptions

    def run(self, model, ctx):
        last = onnx.NodeProto()
        last.CopyFrom(model.graph.node[-1])
        del model.graph.node[-1]
        model.graph.node.insert(0, last)
        return PassResult(changed=True, report={})


class _Crash(Pass):
    """Raises a plain Python exception, as a bug would."""

    name = "test-crash"
    Options = _NoOptions

    def run(self, model, ctx):
        return {}["missing"]


@pytest.mark.parametrize("cls, words", [(_Unsorted, ("pass test-unsorted", "fails the check", "topologically")),
                                        (_Crash, ("pass test-crash", "KeyError", "missing"))])
def test_a_pass_that_breaks_the_graph_is_an_internal_error(monkeypatch, cls, words):
    monkeypatch.setitem(REGISTRY, cls.name, cls)
    with pytest.raises(InternalError) as info:
        run(graphs.unnamed_chain(), [(cls.name, {})])
    assert not isinstance(info.value, OnnxPruneError) and info.value.exit_code == 4
    for word in words:
        assert word in str(info.value)


def test_an_input_model_that_fails_the_check_stays_a_model_error():
    """x[2,8] -> Relu -> MatMul(W 7x3): shape inference fails on the input already, so the
    failure after a pass is the model's, not the pass's."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxprune.errors import ModelError

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["h"], name="relu"), helper.make_node("MatMul", ["h", "W"], ["y"], name="mm")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.ones((7, 3), np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    provider = StatsProvider({"target": open_samples([{"x": np.ones((4, 8), np.float32)}], model)}, progress=False)
    with pytest.raises(ModelError, match="Incompatible dimensions") as info:
        run_pipeline(model, Recipe(passes=(("select-nodes", {"counts": {}}),)), provider)
    assert not isinstance(info.value, InternalError)


# --------------------------------------------------------------------------- declared hand-offs

@pytest.mark.parametrize("passes, words", [
    ([("bias-compensate", {})], ("bias-compensate needs approximated layers", "low-rank-split before it")),
    ([("reconstruct-next-layer", {})], ("reconstruct-next-layer needs channel selections", "select-nodes")),
    ([("reconstruct-next-layer", {}), ("select-nodes", {})], ("reconstruct-next-layer needs",)),
    ([("select-nodes", {}), ("bias-compensate", {})], ("bias-compensate needs approximated layers",)),
])
def test_a_pass_whose_requirements_no_earlier_pass_produces_is_a_recipe_error(passes, words):
    """bias-compensate without a low-rank pass before it used to be a silent no-op."""
    with pytest.raises(RecipeError) as info:
        Recipe(passes=tuple(passes))
    for word in words:
        assert word in str(info.value)
    with pytest.raises(RecipeError, match="needs approximated layers"):
        Recipe.from_dict({"passes": [{"name": "bias-compensate"}, {"name": "low-rank-split"}]})


def test_declarations_of_the_built_in_passes():
    assert REGISTRY["low-rank-split"].produces == (Approximation,)
    assert REGISTRY["bias-compensate"].requires == (Approximation,)
    assert REGISTRY["select-nodes"].produces == (Selection,)
    assert REGISTRY["reconstruct-next-layer"].requires == (Selection,)
    assert not REGISTRY["correct-drift"].requires            # reads selections when there are some
    Recipe(passes=(("select-nodes", {}), ("reconstruct-next-layer", {}), ("low-rank-split", {}),
                   ("bias-compensate", {}), ("correct-drift", {})))


@dataclasses.dataclass
class _Mark:
    """A record of the test passes below."""

    site: str


class _PerSite(Pass):
    """Marks one site per round (a per-site producer)."""

    name = "test-per-site"
    Options = _NoOptions
    produces = (_Mark,)

    def sites(self, model):
        return ["a", "b"]

    def run(self, model, ctx):
        ctx.cache.setdefault("log", []).append(("mark", ctx.only_group))
        return PassResult(changed=False, report={})


class _Applies(Pass):
    """Applies the marks (their consumer)."""

    name = "test-applies"
    Options = _NoOptions
    requires = (_Mark,)

    def run(self, model, ctx):
        ctx.cache.setdefault("log", []).append(("apply", ctx.only_group))
        return PassResult(changed=False, report={})


@pytest.mark.parametrize("mode, expected", [
    ("one-shot", [("mark", None), ("apply", None)]),
    ("sequential", [("mark", "a"), ("apply", "a"), ("mark", "b"), ("apply", "b")]),
])
def test_sequential_mode_pairs_a_per_site_pass_with_the_pass_that_requires_its_records(monkeypatch, mode, expected):
    """No pass names in the pipeline: any per-site producer and its consumer run site by site."""
    from onnxprune import pipeline

    monkeypatch.setitem(REGISTRY, _PerSite.name, _PerSite)
    monkeypatch.setitem(REGISTRY, _Applies.name, _Applies)
    shared = {}
    real = pipeline.PassContext
    monkeypatch.setattr(pipeline, "PassContext", lambda **kw: real(**kw, cache=shared))
    run(graphs.unnamed_chain(), [(_PerSite.name, {}), (_Applies.name, {})], mode=mode)
    assert shared["log"] == expected


@pytest.mark.parametrize("key, value, words", [("split", "half", "split must be a number, got 'half'"),
                                               ("seed", True, "seed must be an integer, got True"),
                                               ("batch_size", 2.5, "batch_size must be an integer"),
                                               ("preprocess", [], "preprocess must be a table")])
def test_recipe_top_level_values_of_the_wrong_type_name_their_key(key, value, words):
    with pytest.raises(RecipeError, match=words):
        Recipe.from_dict({"passes": [{"name": "low-rank-split", "keep": 0.5}], key: value})


@pytest.mark.parametrize("passes, words", [
    ([{"name": "low-rank-split", "keep": 0.3, "ridge": math.nan}], "low-rank-split | ridge must be finite, got nan"),
    ([{"name": "low-rank-split", "keep": 0.3, "ridge": math.inf}], "low-rank-split | ridge must be finite, got inf"),
    ([{"name": "select-nodes", "criterion": "momasp-j", "keep": 0.5, "lam": math.nan},
      {"name": "reconstruct-next-layer"}], "select-nodes | lam must be finite"),
    ([{"name": "select-nodes", "keep": 0.5}, {"name": "reconstruct-next-layer", "ridge": math.inf}],
     "reconstruct-next-layer | ridge must be finite"),
    ([{"name": "low-rank-split", "keep": 0.3, "layers": [1]}], "layers must be a list of strings, got \\(1,\\)"),
])
def test_recipe_option_values_that_are_not_finite_or_lists_of_the_wrong_kind_are_recipe_errors(passes, words):
    """A recipe file's NaN/Infinity (TOML's nan/inf) is refused when the recipe is read, as the flags
    refuse them (it was accepted, then failed inside the pass, exit 4, or was written back to the
    recipe as a non-JSON Infinity)."""
    with pytest.raises(RecipeError, match=words):
        Recipe.from_dict({"passes": passes})


@pytest.mark.parametrize("plan, words", [({"max_drop": True}, "max_drop must be a number, got True"),
                                         ({"max_drop": "abc"}, "max_drop must be a number, got 'abc'"),
                                         ({"max_drop": 1, "drift": "no"}, "drift must be true or false, got 'no'"),
                                         ({"max_drop": 1, "bias": "no"}, "bias must be true or false"),
                                         ({"max_drop": 1, "ladder": [0.5, "x"]}, "ladder must be a list of numbers"),
                                         ({"max_drop": 1, "min_share": math.nan}, "min_share must be finite")])
def test_plan_table_values_of_the_wrong_type_name_their_key(plan, words):
    """A plan table is checked like a pass's options: "drift": "no" was taken as true, a string
    max_drop crashed (exit 4)."""
    with pytest.raises(RecipeError, match=words):
        Recipe.from_dict({"passes": [], "plan": plan})


def test_a_plan_table_names_one_site_alone_as_that_site():
    assert Recipe.from_dict({"passes": [], "plan": {"max_drop": 1, "sites": "fc1"}}).plan["sites"] == ["fc1"]


def test_a_numerical_failure_names_the_pass_and_few_calibration_samples(monkeypatch):
    """An ill-conditioned solve on a handful of samples: the message says which pass, and that
    the calibration set is small."""
    from onnxprune.errors import NumericalError
    from onnxprune.passes.select_nodes import SelectNodes

    def singular(self, model, ctx):
        raise NumericalError("Sigma_JJ + rho I", "is not positive definite", "increase the ridge")

    monkeypatch.setattr(SelectNodes, "run", singular)
    model = graphs.gemm_chain()
    samples = open_samples(graphs.feeds(model, batch=12), model)
    provider = StatsProvider({"target": samples}, batch_size=32, progress=False)
    with pytest.raises(NumericalError) as excinfo:
        run_pipeline(model, Recipe(passes=method_passes("spectral", fraction=0.5)), provider)
    message = str(excinfo.value)
    assert message.startswith("select-nodes: Sigma_JJ + rho I | is not positive definite")
    assert "increase the ridge; or calibrate on more samples (12 target samples" in message
