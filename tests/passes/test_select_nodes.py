"""select-nodes + reconstruct-next-layer through the pipeline, on tiny graphs.

Constructed truth: a dead channel (zero at the site) and a duplicated channel (a copy of
a kept one) carry no information, so spectral selection with alpha = 1 drops exactly
them and the reconstruction makes the rewrite lossless. Everything else checks the
contract: coupled groups, names and dynamic axes, every criterion, global budgets,
one-shot and sequential modes, the report rows.

    gemm_chain:     x[N,8] -> fc1(16) -> Relu -> fc2(6) -> Relu -> fc3(4) -> Relu -> fc4 -> y
    conv_bn_relu:   x[N,3,8,8] -> conv1(8) -> BN -> Relu -> conv2 -> y
    residual_add:   conv0 -> Relu = a -> convA(6) -> Relu -> convB -> Add(a) -> Relu -> out
    add_branches:   convA(5) + convB(5) -> Add -> Relu -> out
    concat_branches convA(3), convB(5) -> Concat -> out
    depthwise:      expand(12) -> Clip -> dw(12, group 12) -> Clip -> project
"""

from __future__ import annotations

import graphs
import numpy as np
import onnx
import pytest
from conftest import assert_equivalent, run_model

from onnxprune import cost, linalg
from onnxprune.api import compress
from onnxprune.calibration.provider import StatsProvider
from onnxprune.data.samples import open_samples
from onnxprune.errors import DataError, OnnxPruneError, RecipeError
from onnxprune.graph.groups import find_channel_groups
from onnxprune.model import count_parameters
from onnxprune.passes.reconstruct_next_layer import ReconstructOptions
from onnxprune.passes.select_nodes import CRITERIA, Footprint, Ranking, SelectNodes, count_for_ratio
from onnxprune.pipeline import Recipe, run_pipeline

N_CALIB = 256


def data(model, n=N_CALIB, seed=0):
    return graphs.feeds(model, batch=n, seed=seed)["x"]


def prune(model, passes, *, x=None, mode="one-shot", source=None, folds=2):
    """Run ``passes`` through the pipeline with statistics from ``x`` (and ``source``)."""
    x = data(model) if x is None else x
    samples = {"target": open_samples([{"x": x}], model)}
    if source is not None:
        samples["source"] = open_samples([{"x": source}], model)
    provider = StatsProvider(samples, batch_size=64, folds=folds, progress=False)
    recipe = Recipe(passes=tuple(passes), mode=mode, folds=folds, batch_size=64)
    return run_pipeline(model, recipe, provider)



def kill(model, group_name, c):
    """Channel c of the group is zero at the site: zero rows, a negative bias before the ReLU."""
    group = graphs.group_of(model, group_name)

    def dead(value, axis):
        value = np.moveaxis(value.copy(), axis, 0)
        value[c] = 0
        return np.moveaxis(value, 0, axis)
    graphs.edit_channel(model, group, dead)
    for p in group.producers[:1]:
        if p.bias:
            bias = graphs.get_init(model, p.bias)
            bias[..., c] = -5.0
            graphs.set_init(model, p.bias, bias)


def duplicate(model, group_name, c, of):
    group = graphs.group_of(model, group_name)

    def copy(value, axis):
        value = np.moveaxis(value.copy(), axis, 0)
        value[c] = value[of]
        return np.moveaxis(value, 0, axis)
    graphs.edit_channel(model, group, copy)


def pruned_rows(report):
    return {row["group"]: row for p in report["passes"] for row in p.get("pruned", [])}


def skipped_rows(report):
    return {row["group"]: row["reason"] for p in report["passes"] for row in p.get("skipped", [])}


def spectral_lossless(groups, **select):
    return [("select-nodes", {"criterion": "spectral", "alpha": 1.0, "groups": groups, **select}),
            ("reconstruct-next-layer", {})]


# --------------------------------------------------------------------------- lossless

LOSSLESS = [
    # builder, group, dead channel, (duplicate, of)
    (graphs.gemm_chain, "fc1", 5, (9, 2)),
    (graphs.conv_bn_relu, "conv1", 3, (6, 1)),
    (graphs.flatten_to_gemm, "conv", 1, (3, 0)),
    (graphs.residual_add, "convA", 4, (2, 0)),
    (graphs.add_branches, "convA", 2, (4, 0)),
    (graphs.depthwise, "expand", 7, (10, 3)),
    (graphs.shared_consumer, "conv0", 1, (5, 2)),
]


@pytest.mark.parametrize("mode", ["one-shot", "sequential"])
@pytest.mark.parametrize("build, name, dead, dup", LOSSLESS,
                         ids=[c[1] + "-" + c[0].__name__ for c in LOSSLESS])
def test_dead_and_duplicate_channels_prune_losslessly(build, name, dead, dup, mode):
    model = build()
    kill(model, name, dead)
    duplicate(model, name, *dup)
    channels = graphs.group_of(model, name).channels
    out, report = prune(model, spectral_lossless((name,)), mode=mode)
    row = pruned_rows(report)[name]
    assert row["kept"] == channels - 2
    assert row["reconstructed"] and row["error"] < 1e-6
    assert_equivalent(model, out, graphs.feeds(model, batch=5, seed=7), tol=1e-4)
    # the dead channel and one copy of the duplicate are gone
    kept = report["passes"][0]["selected"][0]
    assert kept["kept"] == channels - 2


def test_kept_paths_are_unchanged():
    """Producer rows, biases and BN entries of the kept channels are the originals; the
    consumer's columns of kept channels are unchanged when the removed channel was dead."""
    model = graphs.conv_bn_relu()
    kill(model, "conv1", 3)
    out, report = prune(model, spectral_lossless(("conv1",)))
    keep = [c for c in range(8) if c != 3]
    for name in ("conv1.W", "conv1.B", "bn.scale", "bn.B", "bn.mean", "bn.var"):
        np.testing.assert_array_equal(graphs.get_init(out, name), graphs.get_init(model, name)[keep])
    np.testing.assert_allclose(graphs.get_init(out, "conv2.W"), graphs.get_init(model, "conv2.W")[:, keep],
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(graphs.get_init(out, "conv2.B"), graphs.get_init(model, "conv2.B"))
    assert pruned_rows(report)["conv1"]["error"] < 1e-9


# --------------------------------------------------------------------------- coupled groups

def test_residual_stream_is_skipped_with_a_reason():
    model = graphs.residual_add()
    out, report = prune(model, [("select-nodes", {"fraction": 0.5}), ("reconstruct-next-layer", {})])
    assert "residual" in skipped_rows(report)["conv0"]
    assert set(pruned_rows(report)) == {"convA"}
    assert graphs.get_init(out, "convA.W").shape[0] == 3
    assert graphs.get_init(out, "conv0.W").shape[0] == 4 and graphs.get_init(out, "convB.W").shape[0] == 4
    run_model(out, graphs.feeds(model))


def test_add_coupled_producers_are_pruned_together():
    model = graphs.add_branches()
    out, report = prune(model, [("select-nodes", {"fraction": 0.6}), ("reconstruct-next-layer", {})])
    assert pruned_rows(report)["convA"]["kept"] == 3
    assert graphs.get_init(out, "convA.W").shape[0] == graphs.get_init(out, "convB.W").shape[0] == 3
    assert graphs.get_init(out, "out.W").shape[1] == 3
    run_model(out, graphs.feeds(model))


def test_concat_groups_are_skipped_with_a_reason():
    model = graphs.concat_branches()
    out, report = prune(model, [("select-nodes", {"fraction": 0.5}), ("reconstruct-next-layer", {})])
    skipped = skipped_rows(report)
    assert "Concat" in skipped["convA"] and "Concat" in skipped["convB"]
    assert not pruned_rows(report)
    assert_equivalent(model, out, graphs.feeds(model), tol=1e-6)


def test_depthwise_conv_follows_the_expansion_channels():
    model = graphs.depthwise()
    out, report = prune(model, [("select-nodes", {"fraction": 0.5}), ("reconstruct-next-layer", {})])
    assert pruned_rows(report)["expand"]["kept"] == 6
    dw = next(n for n in out.graph.node if n.name == "dw")
    assert next(a.i for a in dw.attribute if a.name == "group") == 6
    assert graphs.get_init(out, "dw.W").shape[0] == 6 and graphs.get_init(out, "project.W").shape[1] == 6
    run_model(out, graphs.feeds(model))


def test_readout_is_the_consumers_weights_where_they_read_each_channel_at_one_position():
    from onnxprune.criteria.builtin import readout_matrix

    model = graphs.depthwise()           # expand -> dw 3x3 (the path) -> project 1x1: read pointwise
    W = readout_matrix(model, graphs.group_of(model, "expand"))
    np.testing.assert_array_equal(W, graphs.get_init(model, "project.W").reshape(4, 12))
    chain = graphs.gemm_chain()          # fc2's channels read by MatMul fc3 (W 6 x 4): rows are its outputs
    np.testing.assert_array_equal(readout_matrix(chain, graphs.group_of(chain, "fc2")),
                                  graphs.get_init(chain, "fc3.W").T)
    conv = graphs.conv_bn_relu()         # a 3x3 consumer sums over neighbours: no exact read-out
    assert readout_matrix(conv, graphs.group_of(conv, "conv1")) is None
    flat = graphs.flatten_to_gemm()      # a Gemm through a Flatten reads each channel at every position
    assert readout_matrix(flat, graphs.group_of(flat, "conv")) is None


def test_spectral_with_readout_keeps_the_channels_the_projection_reads():
    """Half the expansion channels are never read (their projection columns are zero) and are the
    loudest: plain spectral keeps them and loses the output, ``readout`` keeps the read half and
    prunes without changing the output."""
    model = graphs.depthwise()
    project = graphs.get_init(model, "project.W").copy()
    project[:, :6] = 0
    graphs.set_init(model, "project.W", project)
    expand = graphs.get_init(model, "expand.W").copy()
    expand[:6] *= 20                     # the unread channels carry the most energy at the site
    graphs.set_init(model, "expand.W", expand)
    x = graphs.feeds(model, batch=5, seed=7)
    errors = {}
    for readout in (False, True):
        out, report = prune(model, [("select-nodes", {"fraction": 0.5, "readout": readout}),
                                    ("reconstruct-next-layer", {})])
        reference, candidate = run_model(model, x)[0], run_model(out, x)[0]
        errors[readout] = float(np.linalg.norm(candidate - reference) / np.linalg.norm(reference))
    assert errors[True] < 1e-5 < 0.05 < errors[False], errors
    with pytest.raises(RecipeError, match="readout"):
        Recipe(passes=(("select-nodes", {"criterion": "mean", "readout": True}),))


def test_unknown_group_name_is_reported():
    model = graphs.gemm_chain()
    out, report = prune(model, [("select-nodes", {"fraction": 0.5, "groups": ("nope",)}),
                                ("reconstruct-next-layer", {})])
    assert "no such channel group" in skipped_rows(report)["nope"]
    assert_equivalent(model, out, graphs.feeds(model), tol=1e-6)


# --------------------------------------------------------------------------- contract

def test_output_keeps_names_dynamic_axes_and_passes_the_checker():
    model = graphs.flatten_to_gemm(reshape=True)
    out, _ = prune(model, [("select-nodes", {"fraction": 0.5}), ("reconstruct-next-layer", {})])
    onnx.checker.check_model(out, full_check=True)
    for before, after in ((model.graph.input, out.graph.input), (model.graph.output, out.graph.output)):
        assert [v.name for v in before] == [v.name for v in after]
        for a, b in zip(before, after):
            dims = a.type.tensor_type.shape.dim, b.type.tensor_type.shape.dim
            assert dims[0][0].dim_param == dims[1][0].dim_param == "N"
    assert run_model(out, graphs.feeds(model, batch=7))[0].shape == (7, 5)
    assert model.graph.initializer[0].name in {t.name for t in out.graph.initializer}


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("mode", ["one-shot", "sequential"])
def test_every_criterion_runs(criterion, mode):
    model = graphs.conv_bn_relu()
    select = {"criterion": criterion}
    if criterion == "pfa-en":
        select["tau"] = 0.8
    elif criterion != "pfa-kl":
        select["keep"] = 0.5
    source = data(model, seed=3) * 1.5 + 0.2 if criterion.startswith("momasp") else None
    out, report = prune(model, [("select-nodes", select), ("reconstruct-next-layer", {})], mode=mode,
                        source=source)
    row = pruned_rows(report)["conv1"]
    assert 1 <= row["kept"] <= 8 and row["criterion"] == criterion
    assert 0.0 <= row["error"] <= 1.0 and abs(row["retention"] + row["error"] - 1) < 1e-12
    y = run_model(out, graphs.feeds(model))[0]
    assert y.shape == (3, 4, 8, 8) and np.isfinite(y).all()


def test_pfa_correlation_choice_runs():
    model = graphs.gemm_chain()
    out, report = prune(model, [("select-nodes", {"criterion": "pfa-kl", "choose": "correlation"}),
                                ("reconstruct-next-layer", {})])
    assert pruned_rows(report)
    assert np.isfinite(run_model(out, graphs.feeds(model))[0]).all()


@pytest.mark.parametrize("budget", [("keep", 0.5), ("keep", 0.2), ("flops", 0.4), ("flops", 0.15)])
@pytest.mark.parametrize("criterion", ["spectral", "momasp-j", "pfa-en", "pfa-kl", "mean", "l1"])
def test_global_budgets_are_met(budget, criterion):
    """Touched parameters (MACs) after <= budget x before; untouched ones are unchanged (pfa-kl
    too: a budget replaces its own rule, which ignored it)."""
    model = graphs.gemm_chain()
    groups = [g for g in find_channel_groups(model) if g.skip is None]
    touched = Footprint(model, groups).full()
    assert touched[0] == 282 and touched[1] == 128 + 96 + 24 + 8    # all but fc4's bias
    source = data(model, seed=5) + 0.3 if criterion.startswith("momasp") else None
    out, report = prune(model, [("select-nodes", {"criterion": criterion, budget[0]: budget[1]}),
                                ("reconstruct-next-layer", {})], source=source)
    total = (count_parameters, cost.total_macs)[budget[0] == "flops"]
    index = budget[0] == "flops"
    after = total(out) - (total(model) - touched[index])
    assert after <= budget[1] * touched[index] + 1e-9
    assert after >= 0.5 * budget[1] * touched[index]     # the loosest threshold that fits, not far below


def test_a_global_budget_below_the_fewest_channels_says_so():
    """keep 0.02 of a 100-wide group: it keeps 8 (one multiple), as before, and the pass report
    (and compress's warnings) say the budget was not met instead of exiting 0 silently."""
    model = graphs.wide_mlp(100)
    _, report = prune(model, [("select-nodes", {"criterion": "spectral", "keep": 0.02}),
                              ("reconstruct-next-layer", {})])
    assert pruned_rows(report)["fc1"]["kept"] == 8
    assert report["passes"][0]["warnings"] == ["select-nodes: keep 0.02 cannot be met: the fewest channels "
                                               "the 1 group(s) can keep leave 8.0% of their layers' "
                                               "parameters (wide groups keep a multiple of 8)"]
    _, fits = prune(model, [("select-nodes", {"criterion": "spectral", "keep": 0.3}),
                            ("reconstruct-next-layer", {})])
    assert "warnings" not in fits["passes"][0]
    recipe = Recipe(passes=(("select-nodes", {"criterion": "spectral", "keep": 0.02}),
                            ("reconstruct-next-layer", {})))
    result = compress(model, {"x": data(model)}, recipe=recipe, progress=False, measure_latency=False)
    assert report["passes"][0]["warnings"][0] in result.report["warnings"]


@pytest.mark.parametrize("how", [{"fraction": 0.3}, {"keep": 0.3}, {"alpha": 0.9}])
def test_wide_groups_keep_a_multiple_of_eight_channels(how):
    """onnxruntime's CPU kernels work on blocks of 8/16 channels: a wide group keeps a
    multiple of ``multiple`` (and the global budget still holds); multiple=1 keeps the raw count."""
    model = graphs.wide_mlp(100)
    rounded = pruned_rows(prune(model, [("select-nodes", {"criterion": "spectral", **how}),
                                        ("reconstruct-next-layer", {})])[1])["fc1"]["kept"]
    raw = pruned_rows(prune(model, [("select-nodes", {"criterion": "spectral", "multiple": 1, **how}),
                                    ("reconstruct-next-layer", {})])[1])["fc1"]["kept"]
    assert rounded % 8 == 0
    if "keep" in how:
        assert rounded <= raw and rounded * (8 + 1 + 3) <= 0.3 * 100 * (8 + 1 + 3)
    else:
        assert raw <= rounded < raw + 8
    narrow = pruned_rows(prune(graphs.wide_mlp(30), [("select-nodes", {"criterion": "spectral", "fraction": 0.3}),
                                                      ("reconstruct-next-layer", {})])[1])["fc1"]["kept"]
    assert narrow == 9                                    # under 32 channels: not rounded
    with pytest.raises(RecipeError, match="multiple=0 must be >= 1"):
        prune(model, [("select-nodes", {"criterion": "spectral", "multiple": 0})])


def test_footprint_counts_depthwise_biases_and_consumers():
    model = graphs.depthwise()
    groups = [g for g in find_channel_groups(model) if g.skip is None]
    fp = Footprint(model, groups)
    assert set(fp.nodes) == {"expand", "dw", "project"}
    params, macs = fp({"expand": 6})
    full = fp.full()
    assert full[0] == count_parameters(model) - 4     # not project's bias (the Clip bounds are no parameters)
    assert params == pytest.approx(full[0] / 2) and macs == pytest.approx(full[1] / 2)


def test_momasp_without_source_data_is_a_clear_error():
    model = graphs.gemm_chain()
    with pytest.raises(OnnxPruneError, match="source"):
        prune(model, [("select-nodes", {"criterion": "momasp-J"}), ("reconstruct-next-layer", {})])
    recipe = Recipe(passes=(("select-nodes", {"criterion": "momasp-j"}), ("reconstruct-next-layer", {})))
    with pytest.raises(DataError, match="--source-data"):
        compress(model, {"x": data(model)}, recipe=recipe, progress=False, measure_latency=False)


def test_bad_options_are_rejected():
    with pytest.raises(RecipeError):
        Recipe(passes=(("select-nodes", {"criterion": "nope"}),))
    with pytest.raises(RecipeError):
        Recipe(passes=(("select-nodes", {"keep": 0.5, "flops": 0.5}),))
    with pytest.raises(RecipeError):
        Recipe(passes=(("select-nodes", {"criterion": "mean", "alpha": 0.9}),))
    with pytest.raises(RecipeError):
        Recipe(passes=(("reconstruct-next-layer", {"ridge": "often"}),))
    assert ReconstructOptions().ridge == "auto" and ReconstructOptions(ridge=0.0).ridge == 0.0


def test_one_shot_and_sequential_keep_the_same_counts():
    model = graphs.gemm_chain()
    outs = {}
    for mode in ("one-shot", "sequential"):
        out, report = prune(model, [("select-nodes", {"keep": 0.4}), ("reconstruct-next-layer", {})],
                            mode=mode)
        outs[mode] = ({g: r["kept"] for g, r in pruned_rows(report).items()}, out)
        assert np.isfinite(run_model(out, graphs.feeds(model))[0]).all()
    assert outs["one-shot"][0] == outs["sequential"][0]
    assert set(outs["one-shot"][0]) == {"fc1", "fc2", "fc3"}


def test_sequential_selects_on_the_pruned_upstream():
    """The second group's statistics come from the graph with the first group pruned."""
    model = graphs.gemm_chain()
    x = data(model)
    _, one = prune(model, [("select-nodes", {"fraction": 0.5}), ("reconstruct-next-layer", {})], x=x)
    _, seq = prune(model, [("select-nodes", {"fraction": 0.5}), ("reconstruct-next-layer", {})], x=x,
                   mode="sequential")
    assert pruned_rows(one)["fc1"]["error"] == pytest.approx(pruned_rows(seq)["fc1"]["error"])
    assert pruned_rows(one)["fc2"]["error"] != pytest.approx(pruned_rows(seq)["fc2"]["error"], abs=1e-12)
    assert len([p for p in seq["passes"] if p["pass"] == "select-nodes"]) == 3


def test_lazy_ranking_gives_the_counts_of_the_full_ranking():
    rng = np.random.default_rng(2)
    F = rng.standard_normal((200, 30))
    sigma = F @ F.T / 30 + np.diag(rng.uniform(0, 0.05, 200))
    sigma[7] = sigma[:, 7] = 0.0                                        # a dead channel
    full_order, full_ratios = linalg.spectral_select(sigma, count=200)
    calls = []

    def select(**stop):
        calls.append(stop)
        return linalg.spectral_select(sigma, **stop)
    ranking = Ranking(select, 200)
    for alpha in (0.5, 0.8, 0.9, 0.95, 0.99, 0.999):
        assert ranking.count_for(alpha) == count_for_ratio(full_ratios, alpha)
        np.testing.assert_array_equal(ranking.top(ranking.count_for(alpha)),
                                      full_order[:count_for_ratio(full_ratios, alpha)])
    assert all("count" not in c or c["count"] < 200 for c in calls)
    # at alpha = 1 only the informative channels are kept (the dead one is dropped)
    assert ranking.count_for(1.0) < 200 and 7 not in ranking.top(ranking.count_for(1.0))
    assert len(ranking.top(200)) == 200


def test_select_nodes_reports_skipped_groups_without_statistics():
    model = graphs.concat_branches()
    p = SelectNodes(fraction=0.5)
    assert p.requests(model) == []
