"""low-rank-split and bias-compensate against constructed truth.

    gemm_lowrank:   x[N,16] -> Gemm(W: 24x16, rank 4, b) -> Relu -> Gemm(10x24) -> y
    matmul_lowrank: x[N,16] -> MatMul(W: 16x24, rank 4) -> Add(b) -> y
    conv_lowrank:   x[N,3,8,8] -> Conv(8x3x3x3, rank 2 on im2col, pads 1) -> y
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import assert_equivalent
from onnx import TensorProto, helper, numpy_helper

from onnxprune.api import compress
from onnxprune.pipeline import Recipe

RNG = np.random.default_rng(0)


def make(nodes, inits, x_shape, y_shape, name="g"):
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *y_shape])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def low_rank(m, n, k):
    return RNG.normal(size=(m, k)) @ RNG.normal(size=(k, n))


def gemm_lowrank(trans_b=1, alpha=1.0, beta=1.0):
    w = low_rank(24, 16, 4)
    return make(
        [helper.make_node("Gemm", ["x", "W", "b"], ["h"], name="fc1", transB=trans_b, alpha=alpha, beta=beta),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "W2"], ["y"], name="fc2", transB=1)],
        {"W": w if trans_b else w.T, "b": RNG.normal(size=24), "W2": RNG.normal(size=(10, 24))}, [16], [10])


def matmul_lowrank():
    return make(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
         helper.make_node("Add", ["h", "b"], ["y"], name="mm_bias")],
        {"W": low_rank(16, 24, 4), "b": RNG.normal(size=24)}, [16], [24])


def conv_lowrank():
    w = low_rank(8, 27, 2).reshape(8, 3, 3, 3)
    return make([helper.make_node("Conv", ["x", "W", "b"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
                {"W": w, "b": RNG.normal(size=8)}, [3, 8, 8], [8, 8, 8])


def run(model, x, passes, **recipe):
    recipe = Recipe(passes=tuple(passes), **recipe)
    return compress(model, [{"x": x}], recipe=recipe, progress=False, measure_latency=False)


@pytest.mark.parametrize("method", ["svd", "dalr"])
@pytest.mark.parametrize("build", [gemm_lowrank, lambda: gemm_lowrank(0, 0.5, 2.0), matmul_lowrank, conv_lowrank],
                         ids=["gemm", "gemm_transB0_alpha_beta", "matmul_add", "conv"])
def test_exact_rank_splits_losslessly(build, method):
    model = build()
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = RNG.normal(size=(64, *shape)).astype(np.float32)
    rank = 2 if build is conv_lowrank else 4
    layer = {gemm_lowrank: "fc1", conv_lowrank: "conv", matmul_lowrank: "mm"}.get(build, "fc1")
    options = {"method": method, "rank": rank, "layers": (layer,)}
    if method == "dalr":
        options["ridge"] = 1e-9
    result = run(model, x, [("low-rank-split", options)])
    split = result.report["passes"][0]["split"]
    assert split and split[0]["rank"] == rank
    assert split[0]["error"] < 1e-8
    assert_equivalent(model, result.model, {"x": x[:8]}, tol=1e-4)
    names = {n.name for n in result.model.graph.node}
    layer = split[0]["layer"]
    assert {f"{layer}/low-rank-split/A", f"{layer}/low-rank-split/B"} <= names
    assert [i.name for i in result.model.graph.input] == ["x"]
    assert result.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_split_that_saves_nothing_is_skipped():
    model = gemm_lowrank()
    x = RNG.normal(size=(32, 16)).astype(np.float32)
    result = run(model, x, [("low-rank-split", {"method": "svd", "rank": 12})])
    report = result.report["passes"][0]
    assert not report["split"]
    assert any("would not reduce parameters" in s["reason"] for s in report["skipped"])


def test_dalr_error_never_above_svd_at_same_rank():
    # Correlated inputs: the input second moment is far from isotropic.
    mix = RNG.normal(size=(16, 16)) * np.linspace(3, 0.01, 16)
    model = make([helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=1)],
                 {"W": RNG.normal(size=(24, 16)), "b": np.zeros(24)}, [16], [24])
    x = (RNG.normal(size=(400, 16)) @ mix.T).astype(np.float32)
    for rank in (1, 2, 4, 6):
        errors = {}
        for method in ("svd", "dalr"):
            result = run(model, x, [("low-rank-split", {"method": method, "rank": rank})])
            errors[method] = result.report["passes"][0]["split"][0]["error"]
        assert errors["dalr"] <= errors["svd"] + 1e-9, (rank, errors)


def test_global_keep_budget_is_respected():
    model = gemm_lowrank()
    x = RNG.normal(size=(64, 16)).astype(np.float32)
    result = run(model, x, [("low-rank-split", {"method": "svd", "keep": 0.5})])
    rows = result.report["passes"][0]["split"]
    total_before = 24 * 16 + 10 * 24
    total_after = sum(r["rank"] * sum(r["shape"]) for r in rows)
    untouched = sum(m * n for m, n in [(24, 16), (10, 24)]) - sum(r["shape"][0] * r["shape"][1] for r in rows)
    assert total_after + untouched <= 0.5 * total_before


def test_a_global_keep_below_the_smallest_ranks_says_so():
    """keep 0.01 of a 24x16 + 10x24 chain: rank 1 everywhere still keeps 74 of 624 parameters.
    The smallest ranks are used (as before), and the pass report carries a warning."""
    model = gemm_lowrank()
    x = RNG.normal(size=(64, 16)).astype(np.float32)
    passes = run(model, x, [("low-rank-split", {"method": "svd", "keep": 0.01})]).report["passes"]
    assert all(r["rank"] == 1 for r in passes[0]["split"])
    assert passes[0]["warnings"] == ["low-rank-split: keep 0.01 cannot be met: the smallest ranks of the 2 "
                                     "layer(s) leave 11.9% of their parameters"]
    fits = run(model, x, [("low-rank-split", {"method": "svd", "keep": 0.5})])
    assert "warnings" not in fits.report["passes"][0]


def test_input_model_is_not_modified():
    model = gemm_lowrank()
    before = model.SerializeToString()
    run(model, RNG.normal(size=(32, 16)).astype(np.float32), [("low-rank-split", {"method": "svd", "rank": 2})])
    assert model.SerializeToString() == before


def test_round_rank_fills_whole_channel_blocks():
    from onnxprune.linalg import round_rank

    assert [round_rank(k, 8, 64) for k in (1, 4, 5, 11, 12, 20, 60, 64)] == [8, 8, 8, 8, 16, 24, 64, 64]
    assert round_rank(13, 1, 64) == 13                    # multiple 1: unchanged
    assert round_rank(5, 16, 12) == 5                     # layer narrower than one block: unchanged
    assert round_rank(30, 16, 24) == 24                   # never above min(m, n)


def test_ranks_are_rounded_to_the_multiple():
    model = make([helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=1)],
                 {"W": RNG.normal(size=(64, 48)), "b": RNG.normal(size=64)}, [48], [64])
    x = RNG.normal(size=(128, 48)).astype(np.float32)
    plain = run(model, x, [("low-rank-split", {"method": "svd", "rank": 11})])
    blocks = run(model, x, [("low-rank-split", {"method": "svd", "rank": 11, "multiple": 8})])
    assert plain.report["passes"][0]["split"][0]["rank"] == 11
    assert blocks.report["passes"][0]["split"][0]["rank"] == 8
    with pytest.raises(Exception, match="multiple"):
        run(model, x, [("low-rank-split", {"method": "svd", "rank": 11, "multiple": 0})])


def test_rounded_ranks_still_fit_the_global_budget():
    model = make([helper.make_node("Gemm", ["x", "W", "b"], ["h"], name="fc1", transB=1),
                  helper.make_node("Relu", ["h"], ["r"], name="relu"),
                  helper.make_node("Gemm", ["r", "W2"], ["y"], name="fc2", transB=1)],
                 {"W": RNG.normal(size=(64, 96)), "b": RNG.normal(size=64), "W2": RNG.normal(size=(80, 64))},
                 [96], [80])
    x = RNG.normal(size=(256, 96)).astype(np.float32)
    result = run(model, x, [("low-rank-split", {"method": "svd", "keep": 0.5, "multiple": 8})])
    rows = result.report["passes"][0]["split"]
    assert rows and all(r["rank"] % 8 == 0 for r in rows)
    dense = 64 * 96 + 80 * 64
    after = sum(r["rank"] * sum(r["shape"]) for r in rows) + dense - sum(r["shape"][0] * r["shape"][1] for r in rows)
    assert after <= 0.5 * dense


def test_latency_aware_split_skips_a_split_that_cannot_pay_and_keeps_one_that_does():
    """x[N,64] -> Gemm tiny (64x64) -> Relu -> Gemm wide (1024x64... 1024x1024 via up) -> y at batch 1:

        x -> tiny (64x64, rank 31: ideal 1.03x) -> Relu -> up (1024x64, whole) -> wide (1024x1024, rank 4)
    """
    model = make([helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="tiny", transB=1),
                  helper.make_node("Relu", ["h"], ["r"], name="relu"),
                  helper.make_node("Gemm", ["r", "W2"], ["u"], name="up", transB=1),
                  helper.make_node("Gemm", ["u", "W3", "b3"], ["y"], name="wide", transB=1)],
                 {"W1": RNG.normal(size=(64, 64)), "b1": RNG.normal(size=64), "W2": RNG.normal(size=(1024, 64)),
                  "W3": RNG.normal(size=(1024, 1024)), "b3": RNG.normal(size=1024)}, [64], [1024])
    x = RNG.normal(size=(64, 64)).astype(np.float32)
    result = run(model, x, [("low-rank-split", {"method": "svd", "ranks": {"tiny": 31, "wide": 4}, "latency": True})])
    report = result.report["passes"][0]
    timed = {row["layer"]: row for row in report["latency"]}
    assert set(timed) == {"tiny", "wide"}
    for row in timed.values():
        assert {"ideal_mac_ratio", "ms_before", "ms_after", "realised", "decision", "batch", "rank"} <= set(row)
        assert row["batch"] == 1 and row["ms_before"] > 0 and row["ms_after"] > 0
    # tiny: two products of nearly the same work as one: skipped, the layer left intact
    assert timed["tiny"]["decision"] == "skipped", timed["tiny"]
    assert timed["tiny"]["ideal_mac_ratio"] == pytest.approx(64 * 64 / (31 * 128))
    assert timed["tiny"]["rank_shrunk"] == 24
    assert any(s["layer"] == "tiny" and "faster" in s["reason"] and "ms_before" in s for s in report["skipped"])
    nodes = {n.name: n for n in result.model.graph.node}
    assert "tiny" in nodes and "tiny/low-rank-split/B" not in nodes
    kept = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert np.array_equal(kept[nodes["tiny"].input[1]], numpy_helper.to_array(model.graph.initializer[0]))
    # wide: 1024x1024 at rank 4 (ideal 128x fewer MACs): kept, and clearly faster
    assert timed["wide"]["decision"] == "kept", timed["wide"]
    assert timed["wide"]["ms_after"] < 0.5 * timed["wide"]["ms_before"]
    split = {row["layer"]: row for row in report["split"]}
    assert set(split) == {"wide"} and split["wide"]["rank"] == 4 and "realised" in split["wide"]
    assert "wide/low-rank-split/A" in nodes and "wide" not in nodes


def test_latency_timings_are_cached_per_layer_rank_and_batch(monkeypatch):
    from onnxprune.calibration.provider import StatsProvider
    from onnxprune.data.samples import open_samples
    from onnxprune.model import clone
    from onnxprune.passes.base import PassContext
    from onnxprune.passes.low_rank_split import LowRankSplit
    from onnxprune.plan import latency

    model = make([helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=1)],
                 {"W": RNG.normal(size=(256, 256)), "b": RNG.normal(size=256)}, [256], [256])
    calls = []
    real = latency.time_models
    monkeypatch.setattr(latency, "time_models", lambda models, **kw: calls.append(len(models)) or real(models, **kw))
    provider = StatsProvider({"target": open_samples([{"x": RNG.normal(size=(32, 256)).astype(np.float32)}], model)},
                             folds=2, progress=False)
    ctx = PassContext(statistics=provider, folds=2, cache={})
    for batch, expected in ((1, [3]), (1, [3]), (4, [3, 3])):
        LowRankSplit(method="svd", rank=20, latency=True, latency_batch=batch).run(clone(model), ctx)
        assert calls == expected, (batch, calls)         # layer, rank 20 and rank 16, timed once per batch
    with pytest.raises(Exception, match="latency_batch"):
        LowRankSplit(method="svd", rank=20, latency=True, latency_batch=0)


@pytest.mark.parametrize("times, saving, decision, rank", [
    ((1.0, 0.5, 0.4), 0.05, "kept", 20),          # the chosen rank pays: kept (the smaller one is not taken)
    ((1.0, 0.99, 0.6), 0.05, "shrunk", 16),       # only one block less pays: shrunk
    ((1.0, 0.97, 0.96), 0.05, "skipped", 20),     # neither saves 5 %: the layer stays whole
    ((1.0, 0.97, 0.96), 0.0, "kept", 20),         # latency_saving 0: any saving keeps it
])
def test_latency_decision_follows_the_measured_times(monkeypatch, times, saving, decision, rank):
    from onnxprune.plan import latency

    calls = []
    monkeypatch.setattr(latency, "time_models", lambda models, **kw: calls.append(1) or list(times[:len(models)]))
    model = make([helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=1)],
                 {"W": RNG.normal(size=(64, 64)), "b": RNG.normal(size=64)}, [64], [64])
    x = RNG.normal(size=(32, 64)).astype(np.float32)
    result = run(model, x, [("low-rank-split", {"method": "svd", "rank": 20, "latency": True,
                                                "latency_saving": saving})])
    report = result.report["passes"][0]
    row = report["latency"][0]
    assert (row["decision"], row["rank"], row["rank_chosen"], row["rank_shrunk"]) == (decision, rank, 20, 16)
    assert row["ms_before"] == pytest.approx(1e3) and row["ideal_mac_ratio"] == pytest.approx(64 * 64 / (rank * 128))
    assert row["realised"] == pytest.approx(1.0 / times[1 if rank == 20 else 2] / row["ideal_mac_ratio"])
    assert len(calls) == (2 if decision == "skipped" else 1)     # a skip is confirmed by a second timing
    nodes = {n.name for n in result.model.graph.node}
    if decision == "skipped":
        assert nodes == {"fc"} and not report["split"] and report["skipped"][0]["decision"] == "skipped"
    else:
        assert "fc/low-rank-split/A" in nodes and report["split"][0]["rank"] == rank
        assert report["split"][0]["decision"] == decision


def conv_spatial(k=2, strides=(1, 1)):
    """x[N,4,9,10] -> Conv(6x4x3x3, exactly rank k in the spatial form, pads 1, b) -> y."""
    v = RNG.normal(size=(k, 12))
    h = RNG.normal(size=(3, 6, k))
    w = np.einsum("jmr,rn->mnj", h, v).reshape(6, 4, 3, 3)
    out = [(9 + 2 - 3) // strides[0] + 1, (10 + 2 - 3) // strides[1] + 1]
    return make([helper.make_node("Conv", ["x", "W", "b"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                  strides=list(strides))],
                {"W": w, "b": RNG.normal(size=6)}, [4, 9, 10], [6, *out])


@pytest.mark.parametrize("method", ["svd", "dalr"])
@pytest.mark.parametrize("strides", [(1, 1), (2, 1), (1, 2)])
def test_spatial_split_of_a_spatially_low_rank_conv_is_lossless(method, strides):
    model = conv_spatial(2, strides)
    x = RNG.normal(size=(64, 4, 9, 10)).astype(np.float32)
    result = run(model, x, [("low-rank-split", {"method": method, "rank": 2, "conv": "spatial"})])
    split = result.report["passes"][0]["split"]
    assert split[0]["form"] == "spatial" and split[0]["method"] == f"{method}-spatial"
    assert split[0]["params_after"] == 2 * (4 * 3 + 6 * 3) + 6
    assert split[0]["error"] < 1e-6
    assert_equivalent(model, result.model, {"x": x[:8]}, tol=1e-4)
    convs = [n for n in result.model.graph.node if n.op_type == "Conv"]
    assert [n.name for n in convs] == ["conv/low-rank-split/V", "conv/low-rank-split/H"]
    assert [list(helper.get_attribute_value(a) for a in n.attribute if a.name == "kernel_shape")[0] for n in convs] \
        == [[3, 1], [1, 3]]
    onnx.shape_inference.infer_shapes(result.model, strict_mode=True)


@pytest.mark.parametrize("conv", ["channel", "spatial"])
def test_an_auto_pad_conv_is_split_as_its_explicit_pads_twin(conv):
    """auto_pad SAME_UPPER at stride 2 on 9 x 10 pads rows (1, 1) and columns (0, 1): the patch
    statistics see those zeros, so DALR fits the same factors as for the explicit-pads model."""
    model = conv_spatial(2, (2, 2))
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    node = model.graph.node[0]
    node.attribute.remove(next(a for a in node.attribute if a.name == "pads"))
    node.attribute.append(helper.make_attribute("auto_pad", "SAME_UPPER"))
    for a in twin.graph.node[0].attribute:
        if a.name == "pads":
            a.ints[:] = [1, 0, 1, 1]
    x = RNG.normal(size=(64, 4, 9, 10)).astype(np.float32)
    assert_equivalent(model, twin, {"x": x[:4]}, tol=1e-5)
    step = [("low-rank-split", {"method": "dalr", "rank": 3, "conv": conv, "ridge": 1e-3})]
    ours, theirs = run(model, x, step), run(twin, x, step)
    assert ours.report["passes"][0]["split"][0]["form"] == conv
    for a, b in zip(ours.model.graph.initializer, theirs.model.graph.initializer):
        np.testing.assert_allclose(numpy_helper.to_array(a), numpy_helper.to_array(b), rtol=1e-5, atol=1e-6)
    assert_equivalent(model, ours.model, {"x": x[:4]}, tol=10.0)     # it runs, at its shapes


def test_a_spatial_dalr_split_reports_the_share_of_the_outputs_it_keeps():
    """DALR fits the data: where inputs hardly vary (three of four channels here) its weights may be
    far from the layer's, so 'retained' is the outputs' share (1 - rel. error), not the weights'
    (which read -99.9 % on LeNet's conv2)."""
    w = RNG.normal(size=(6, 4, 3, 3))
    model = make([helper.make_node("Conv", ["x", "W"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
                 {"W": w}, [4, 9, 10], [6, 9, 10])
    x = RNG.normal(size=(64, 4, 9, 10)) * np.array([1.0, 1e-3, 1e-3, 1e-3])[:, None, None]
    result = run(model, x.astype(np.float32), [("low-rank-split", {"method": "dalr", "rank": 2, "conv": "spatial"})])
    row = result.report["passes"][0]["split"][0]
    assert 0 <= row["energy"] <= 1 and row["energy"] == pytest.approx(1 - row["error"])


@pytest.mark.parametrize("strides, splits", [((2, 1), True), ((1, 2), False)])
def test_spatial_split_that_would_add_multiply_adds_is_skipped(strides, splits):
    """The k x 1 Conv runs at every input column: with a horizontal stride of 2 it has twice the
    layer's positions, so rank 6 (180 of 216 weights) would cost 42 x 6 = 252 multiply-adds per
    output position against the layer's 216; a vertical stride it applies itself costs nothing."""
    model = conv_spatial(2, strides)
    x = RNG.normal(size=(64, 4, 9, 10)).astype(np.float32)
    result = run(model, x, [("low-rank-split", {"method": "dalr", "rank": 6, "conv": "spatial"})])
    report = result.report["passes"][0]
    assert bool(report["split"]) == splits, report
    if not splits:
        assert "would not reduce multiply-adds (1.17 x the layer's" in report["skipped"][0]["reason"]
        assert result.report["validation"]["macs_candidate"] == result.report["validation"]["macs_reference"]


def test_spatial_form_applies_only_to_kernels_wider_than_one_both_ways():
    """A 1x1 Conv and a Gemm keep the channel form under conv='spatial'."""
    model = make([helper.make_node("Conv", ["x", "W1"], ["h"], name="pointwise", kernel_shape=[1, 1]),
                  helper.make_node("Conv", ["h", "W3"], ["y"], name="conv3", kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
                 {"W1": RNG.normal(size=(12, 8, 1, 1)), "W3": RNG.normal(size=(8, 12, 3, 3))}, [8, 6, 6], [8, 6, 6])
    x = RNG.normal(size=(64, 8, 6, 6)).astype(np.float32)
    result = run(model, x, [("low-rank-split", {"method": "dalr", "rank": 3, "conv": "spatial"})])
    forms = {row["layer"]: row["form"] for row in result.report["passes"][0]["split"]}
    assert forms == {"pointwise": "channel", "conv3": "spatial"}


def test_spatial_options_are_checked():
    from onnxprune.errors import RecipeError
    from onnxprune.passes.low_rank_split import LowRankOptions

    assert LowRankOptions(conv="spatial").fraction == 0.25
    for bad in ({"conv": "spatial", "keep": 0.5}, {"conv": "spatial", "energy": 0.9},
                {"conv": "spatial", "latency": True}, {"conv": "diagonal"}):
        with pytest.raises((ValueError, RecipeError)):
            LowRankOptions(**bad)
