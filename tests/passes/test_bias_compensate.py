"""bias-compensate: b += (W - W_hat) E[x] for every layer low-rank-split approximated; what it
requires (a low-rank pass before it), and the bias it adds where a layer had none (one-shot
and sequential mode).

    gemm:   x[N,16] -> Gemm fc (W 24x16, b) -> y[N,24]
    matmul: x[N,16] -> MatMul mm (W 16x24, no bias) -> y[N,24]
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import run_model
from onnx import TensorProto, helper, numpy_helper

from onnxprune.api import compress
from onnxprune.calibration.provider import StatsProvider
from onnxprune.data.samples import open_samples
from onnxprune.errors import RecipeError
from onnxprune.pipeline import Recipe, run_pipeline

RNG = np.random.default_rng(0)


def make(node, inits):
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 24])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def inputs(n=200):
    return (RNG.normal(size=(n, 16)) + 3.0).astype(np.float32)      # a non-zero input mean


def mean_error(model, candidate, x):
    return (run_model(candidate, {"x": x})[0] - run_model(model, {"x": x})[0]).mean(axis=0)


def test_needs_an_approximation_before_it():
    """Without a low-rank pass before it, it used to be a silent no-op."""
    with pytest.raises(RecipeError, match="bias-compensate needs approximated layers") as info:
        Recipe(passes=(("bias-compensate", {}),))
    assert "low-rank-split before it" in str(info.value)


def test_bias_compensation_zeroes_mean_error_on_calibration_set():
    model = make(helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=1),
                 {"W": RNG.normal(size=(24, 16)), "b": RNG.normal(size=24)})
    x = inputs()
    recipe = Recipe(passes=(("low-rank-split", {"method": "svd", "rank": 2}), ("bias-compensate", {})), split=0.5)
    plain = Recipe(passes=(("low-rank-split", {"method": "svd", "rank": 2}),), split=0.5)
    with_bc = compress(model, [{"x": x}], recipe=recipe, eval_data=[{"x": x}], progress=False, measure_latency=False)
    without = compress(model, [{"x": x}], recipe=plain, eval_data=[{"x": x}], progress=False, measure_latency=False)
    err_bc, err = mean_error(model, with_bc.model, x), mean_error(model, without.model, x)
    assert np.abs(err).max() > 0.1
    assert np.abs(err_bc).max() < 1e-3 * np.abs(err).max()


@pytest.mark.parametrize("mode", ["one-shot", "sequential"])
def test_a_matmul_without_bias_gets_an_add(mode):
    """MatMul y = x W has no bias input: compensation adds y = Add(MatMul(...), delta), named
    after the layer and the pass."""
    model = make(helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"), {"W": RNG.normal(size=(16, 24))})
    x = inputs(256)
    provider = StatsProvider({"target": open_samples([{"x": x}], model)}, batch_size=64, folds=2, progress=False)
    recipe = Recipe(passes=(("low-rank-split", {"method": "svd", "rank": 2}), ("bias-compensate", {})),
                    mode=mode, batch_size=64)
    out, report = run_pipeline(model, recipe, provider)
    assert [n.op_type for n in out.graph.node] == ["MatMul", "MatMul", "Add"]
    assert out.graph.node[2].name == "mm/bias-compensate/add_bias"
    assert "mm/bias-compensate/bias" in {t.name for t in out.graph.initializer}
    assert [r["layer"] for r in report["passes"][1]["compensated"]] == ["mm"]
    np.testing.assert_allclose(mean_error(model, out, x), 0.0, atol=1e-3)
    onnx.checker.check_model(out)
