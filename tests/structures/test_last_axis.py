"""Last-axis channel groups: the hidden units of a feed-forward block on [N, T, C] tokens."""

from __future__ import annotations

import numpy as np
import pytest

import onnxprune
from onnxprune.graph.groups import describe_groups, find_channel_groups, structures
from onnxprune.pipeline import Recipe
from tests.conftest import assert_equivalent, run_model
from tests.graphs import conv_bn_relu, gemm_chain, get_init, set_init, token_feeds, token_ffn


@pytest.mark.parametrize("gelu", ["erf", "op"])
def test_ffn_hidden_units_are_one_last_axis_group(gelu):
    groups = {g.name: g for g in find_channel_groups(token_ffn(gelu=gelu))}
    ffn = groups["ffn1"]
    assert ffn.skip is None and ffn.axis == -1 and ffn.structure == "last-axis" and ffn.channels == 16
    assert [p.weight for p in ffn.producers] == ["ffn1.W"] and ffn.producers[0].axis == 1
    assert ffn.producers[0].bias == "ffn1.B"
    assert [(c.weight, c.axis) for c in ffn.consumers] == [("ffn2.W", 0)]
    assert ffn.site == ("gelu.out" if gelu == "op" else "gelu.mul1.out")
    # the residual-stream side (a graph output, then a reduction) is left alone, with the reason
    assert "graph output" in groups["ffn2"].skip
    assert describe_groups([ffn])[0]["axis"] == -1


def test_axis1_models_find_the_same_groups_as_before():
    assert list(structures())[0] == "channels" and {"last-axis", "heads"} <= set(structures())
    for model in (gemm_chain(), conv_bn_relu()):
        assert all(g.axis == 1 and g.structure == "channels" for g in find_channel_groups(model))


def _duplicated(model, copies: int = 4):
    """Hidden units 12..15 are copies of units 0..3 (same weights and bias): exactly redundant."""
    w, b = get_init(model, "ffn1.W").copy(), get_init(model, "ffn1.B").copy()
    w[:, 16 - copies:], b[16 - copies:] = w[:, :copies], b[:copies]
    set_init(model, "ffn1.W", w)
    set_init(model, "ffn1.B", b)
    return model


def _data(n: int = 64, tokens: int = 6, seed: int = 3):
    return token_feeds(batch=n, tokens=tokens, seed=seed)


@pytest.mark.parametrize("criterion", ["spectral", "pfa-en", "wanda"])
def test_redundant_units_prune_with_exact_reconstruction(criterion):
    model = _duplicated(token_ffn())
    recipe = Recipe(passes=(("select-nodes", {"criterion": criterion, "counts": {"ffn1": 12}}),
                            ("reconstruct-next-layer", {"ridge": 1e-9})), calib_size=None)
    result = onnxprune.compress(model, _data(), recipe=recipe, measure_latency=False, progress=False)
    assert get_init(result.model, next(n for n in [i.name for i in result.model.graph.initializer]
                                       if n.startswith("ffn1.W"))).shape == (8, 12)
    if criterion == "spectral":     # spectral keeps one unit of each duplicated pair: nothing is lost
        assert_equivalent(model, result.model, token_feeds(batch=5, tokens=7, seed=9), tol=1e-4)
    else:
        out = run_model(result.model, token_feeds(batch=5, tokens=7, seed=9))
        assert all(np.isfinite(o).all() for o in out)


def test_without_reconstruction_the_pruned_units_are_missing():
    model = _duplicated(token_ffn())
    recipe = Recipe(passes=(("select-nodes", {"criterion": "spectral", "counts": {"ffn1": 12}}),
                            ("reconstruct-next-layer", {"reconstruct": False})), calib_size=None)
    result = onnxprune.compress(model, _data(), recipe=recipe, measure_latency=False, progress=False)
    feeds = token_feeds(batch=5, tokens=7, seed=9)
    ref, out = run_model(model, feeds)[1], run_model(result.model, feeds)[1]
    assert np.abs(ref - out).max() > 1e-3


def test_planner_prunes_ffn_units_under_a_mac_budget():
    model = token_ffn()
    recipe = Recipe(passes=(), plan={"budget": 0.7, "families": ["prune"]}, calib_size=None, metric="embedding")
    result = onnxprune.compress(model, _data(n=96), recipe=recipe, measure_latency=False, progress=False)
    plan = result.report["plan"]
    assert plan["output_kind"] == "embedding"
    assert [s for s in plan["sites"]], plan
    assert result.report["validation"]["embedding"]["cosine"] > 0.5
    assert get_init(result.model, "ffn1.W").shape[1] < 16
