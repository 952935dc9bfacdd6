"""correct-drift against constructed truth: a compressed model whose activations are an
invertible affine (or linear) distortion of the original's is corrected exactly.

    linear_chain: x[N,8] -> Gemm fc1 (6x8, b) -> Gemm fc2 (4x6, b) -> y[N,4]
    conv_chain:   x[N,3,6,6] -> Conv c1 (5, 1x1) -> Conv c2 (4, 3x3, pads 1) -> y
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphs
from conftest import run_model
from onnxprune.calibration.provider import StatsProvider
from onnxprune.data.samples import open_samples
from onnxprune.model import clone
from onnxprune.passes import PassContext
from onnxprune.passes.correct_drift import CorrectDrift, CorrectDriftOptions, drifted_tensors, side_by_side
from onnxprune.pipeline import Recipe, run_pipeline


def linear_chain(seed=0):
    b = graphs._Builder(seed)
    h = b.node("Gemm", ["x", b.weight("fc1.W", 6, 8), b.weight("fc1.B", 6, scale=0.1)], "fc1", transB=1)
    y = b.node("Gemm", [h, b.weight("fc2.W", 4, 6), b.weight("fc2.B", 4, scale=0.1)], "fc2", transB=1)
    return b.model([graphs._input(8)], {y: (4,)})


def conv_chain(seed=0, k=3, pads=1):
    b = graphs._Builder(seed)
    h = b.conv("x", "c1", 3, 5, k=1)
    y = b.conv(h, "c2", 5, 4, k=k, pads=[pads] * 4)
    size = 6 + 2 * pads - k + 1
    return b.model([graphs._input(3, 6, 6)], {y: (4, size, size)})


def correct(original, compressed, n=200, folds=2):
    x = graphs.feeds(original, batch=n, seed=0)["x"]
    provider = StatsProvider({"target": open_samples([{"x": x}], original)}, batch_size=64, folds=folds,
                             progress=False)
    ctx = PassContext(statistics=provider, folds=folds, original=original)
    work = clone(compressed)
    result = CorrectDrift(CorrectDriftOptions()).run(work, ctx)
    return work, result


def distort(model, weight, bias, M, c):
    """The layer owning ``weight`` (out x in) answers M y + c instead of y."""
    W, B = graphs.get_init(model, weight), graphs.get_init(model, bias)
    W = np.einsum("ij,j...->i...", M, W)
    graphs.set_init(model, weight, W.astype(np.float32))
    graphs.set_init(model, bias, (M @ B + c).astype(np.float32))


def test_an_affine_distortion_before_a_gemm_is_undone_exactly():
    original = linear_chain()
    rng = np.random.default_rng(5)
    compressed = clone(original)
    distort(compressed, "fc1.W", "fc1.B", np.eye(6) + 0.3 * rng.standard_normal((6, 6)), rng.standard_normal(6))
    x = graphs.feeds(original, batch=50, seed=9)
    (y0,), (y1,) = run_model(original, x), run_model(compressed, x)
    assert np.abs(y1 - y0).max() > 0.1
    work, result = correct(original, compressed)
    (y2,) = run_model(work, x)
    np.testing.assert_allclose(y2, y0, atol=2e-3)
    row, = result.report["tensors"]
    assert row["refit"] and row["intercept"] and row["readers"] == ["fc2"]
    assert row["error_after"] < 1e-4 < row["error_before"]


def test_the_joint_graph_runs_only_what_the_fitted_tensor_depends_on():
    original = linear_chain()
    compressed = clone(original)
    distort(compressed, "fc1.W", "fc1.B", 2.0 * np.eye(6), np.ones(6))
    tensor, = drifted_tensors(original, compressed, {})
    joint, names = side_by_side(original, compressed, [tensor])
    # both copies of fc1 and the Concat; neither copy of fc2 (downstream of the fitted tensor)
    assert sorted(n.op_type for n in joint.graph.node) == ["Concat", "Gemm", "Gemm"]
    assert [o.name for o in joint.graph.output] == [names[tensor.name]]
    x = graphs.feeds(original, batch=5, seed=1)
    (both,) = run_model(joint, x)
    (h,) = run_model(_exposing(original, tensor.name), x)
    np.testing.assert_allclose(both, np.concatenate([h, 2.0 * h + 1.0], axis=1), rtol=1e-5, atol=1e-5)


def _exposing(model, name):
    out = clone(model)
    del out.graph.output[:]
    out.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return out


def test_a_linear_distortion_before_a_padded_conv_is_undone_at_every_tap():
    original = conv_chain()
    rng = np.random.default_rng(6)
    compressed = clone(original)
    distort(compressed, "c1.W", "c1.B", np.eye(5) + 0.3 * rng.standard_normal((5, 5)), np.zeros(5))
    x = graphs.feeds(original, batch=20, seed=9)
    work, result = correct(original, compressed, n=100)
    row, = result.report["tensors"]
    assert row["refit"] and not row["intercept"]         # zero padding: no exact intercept
    (y0,), (y2,) = run_model(original, x), run_model(work, x)
    np.testing.assert_allclose(y2, y0, atol=2e-3)


def test_an_affine_distortion_before_an_unpadded_conv_moves_into_its_bias():
    original = conv_chain(k=3, pads=0)
    rng = np.random.default_rng(7)
    compressed = clone(original)
    distort(compressed, "c1.W", "c1.B", np.eye(5) + 0.3 * rng.standard_normal((5, 5)), rng.standard_normal(5))
    x = graphs.feeds(original, batch=20, seed=9)
    work, result = correct(original, compressed, n=100)
    row, = result.report["tensors"]
    assert row["refit"] and row["intercept"]
    (y0,), (y2,) = run_model(original, x), run_model(work, x)
    np.testing.assert_allclose(y2, y0, atol=2e-3)


def test_an_undistorted_model_is_left_alone():
    original = linear_chain()
    assert drifted_tensors(original, clone(original), {}) == []
    work, result = correct(original, clone(original))
    assert not result.changed and result.report["tensors"] == []


def test_after_pruning_the_pass_follows_the_kept_channels_and_does_not_hurt():
    model = graphs.gemm_chain()
    x = graphs.feeds(model, batch=400, seed=0)["x"]
    samples = open_samples([{"x": x}], model)
    errors = {}
    for extra in ((), (("correct-drift", {}),)):
        provider = StatsProvider({"target": samples}, batch_size=64, folds=2, progress=False)
        recipe = Recipe(passes=(("select-nodes", {"criterion": "spectral", "keep": 0.5}),
                                ("reconstruct-next-layer", {})) + extra, batch_size=64)
        small, report = run_pipeline(model, recipe, provider)
        (y0,), (y1,) = run_model(model, {"x": x}), run_model(small, {"x": x})
        errors[bool(extra)] = float(np.sum((y1 - y0) ** 2) / np.sum(y0 ** 2))
    rows = {r["tensor"]: r for r in report["passes"][-1]["tensors"]}
    assert set(rows) == {"relu1.out", "relu2.out", "relu3.out"}     # every pruned site's readers
    assert rows["relu1.out"]["error_before"] < 1e-9                 # fc1 only lost rows: x~ = x[K]
    assert not rows["relu1.out"]["refit"]
    assert errors[True] <= errors[False] * 1.01


def test_it_needs_the_original_model():
    model = linear_chain()
    ctx = PassContext(statistics=None, folds=2)
    with pytest.raises(Exception, match="original"):
        CorrectDrift(CorrectDriftOptions()).run(clone(model), ctx)


def test_tensors_wider_than_max_channels_are_left_alone():
    original = linear_chain()
    rng = np.random.default_rng(5)
    compressed = clone(original)
    distort(compressed, "fc1.W", "fc1.B", np.eye(6) + 0.3 * rng.standard_normal((6, 6)), rng.standard_normal(6))
    x = graphs.feeds(original, batch=200, seed=0)["x"]
    provider = StatsProvider({"target": open_samples([{"x": x}], original)}, batch_size=64, folds=2, progress=False)
    ctx = PassContext(statistics=provider, folds=2, original=original)
    work = clone(compressed)
    result = CorrectDrift(CorrectDriftOptions(max_channels=5)).run(work, ctx)
    row, = result.report["tensors"]
    assert not result.changed and not row["refit"] and "max_channels" in row["skipped"]
    assert graphs.get_init(work, "fc2.W").tobytes() == graphs.get_init(compressed, "fc2.W").tobytes()
    assert CorrectDrift(CorrectDriftOptions(max_channels=6)).run(clone(compressed), ctx).changed


def test_the_activation_store_fits_the_same_corrections():
    """A provider that stores activations gets the whole joint graph and computes each stage
    from the last one's frontier: the same refits as stage-by-stage full runs (float32
    rounding apart)."""
    original = graphs.conv_bn_relu(seed=3)
    pruned, _ = run_pipeline(original, Recipe(passes=(("select-nodes", {"criterion": "spectral", "keep": 0.5}),
                                                       ("reconstruct-next-layer", {})), folds=2),
                             StatsProvider({"target": open_samples([graphs.feeds(original, batch=120, seed=0)],
                                                                   original)}, batch_size=32, folds=2, progress=False))
    x = graphs.feeds(original, batch=120, seed=4)["x"]
    results = []
    for budget in (0, 1 << 28):
        provider = StatsProvider({"target": open_samples([{"x": x}], original)}, batch_size=32, folds=2,
                                 progress=False, activation_bytes=budget)
        ctx = PassContext(statistics=provider, folds=2, original=original)
        work = clone(pruned)
        CorrectDrift(CorrectDriftOptions()).run(work, ctx)
        results.append({t.name: onnx.numpy_helper.to_array(t) for t in work.graph.initializer})
    assert results[0].keys() == results[1].keys()
    for name, value in results[0].items():
        np.testing.assert_allclose(results[1][name], value, rtol=1e-5, atol=1e-6 * np.abs(value).max())
