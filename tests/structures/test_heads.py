"""Attention heads: Q/K/V columns, biases and the output projection's rows pruned together,
Reshape head counts patched, the output projection corrected by least squares."""

from __future__ import annotations

import numpy as np
import pytest

import onnxprune
from onnxprune import linalg
from onnxprune.errors import ModelError
from onnxprune.graph.groups import find_channel_groups
from onnxprune.graph.prune import prune_channels
from onnxprune.pipeline import Recipe
from tests.conftest import assert_equivalent, run_model
from tests.graphs import attention, get_init, set_init, token_feeds

GROUP = "out/heads"


def _duplicate_head(model, source: int = 0, copy: int = 3, size: int = 2):
    """Head ``copy`` computes exactly what head ``source`` computes (same Q, K, V columns)."""
    for role in ("q", "k", "v"):
        w, b = get_init(model, f"{role}.W").copy(), get_init(model, f"{role}.B").copy()
        w[:, copy * size:(copy + 1) * size] = w[:, source * size:(source + 1) * size]
        b[copy * size:(copy + 1) * size] = b[source * size:(source + 1) * size]
        set_init(model, f"{role}.W", w)
        set_init(model, f"{role}.B", b)
    return model


def test_one_head_group_across_q_k_v_and_the_output_projection():
    group = next(g for g in find_channel_groups(attention()) if g.structure == "heads")
    assert group.name == GROUP and group.skip is None and group.unit == 2 and group.channels == 8
    assert [p.weight for p in group.producers] == ["q.W", "k.W", "v.W"]
    assert [p.bias for p in group.producers] == ["q.B", "k.B", "v.B"]
    assert [(c.weight, c.axis) for c in group.consumers] == [("out.W", 0)]
    assert sorted(group.shape_entries) == [("context.shape", 2), ("k.shape", 2), ("q.shape", 2), ("v.shape", 2)]
    assert group.site == "context.reshape.out"


def test_pruning_a_duplicated_head_is_exact_with_reconstruction():
    model = _duplicate_head(attention())
    data = token_feeds(batch=48, tokens=5, seed=4)
    recipe = Recipe(passes=(("select-nodes", {"criterion": "spectral", "counts": {GROUP: 6}}),
                            ("reconstruct-next-layer", {"ridge": 1e-9})), calib_size=None)
    result = onnxprune.compress(model, data, recipe=recipe, measure_latency=False, progress=False)
    out = result.model
    assert get_init(out, "q.W").shape == (8, 6) and get_init(out, "out.W").shape == (6, 8)
    assert list(get_init(out, "q.shape")) == [0, 0, 3, 2] and list(get_init(out, "context.shape")) == [0, 0, 6]
    assert_equivalent(model, out, token_feeds(batch=4, tokens=6, seed=11), tol=1e-4)
    plain = Recipe(passes=(("select-nodes", {"criterion": "spectral", "counts": {GROUP: 6}}),
                           ("reconstruct-next-layer", {"reconstruct": False})), calib_size=None)
    dropped = onnxprune.compress(model, data, recipe=plain, measure_latency=False, progress=False).model
    feeds = token_feeds(batch=4, tokens=6, seed=11)
    assert np.abs(run_model(model, feeds)[1] - run_model(dropped, feeds)[1]).max() > 1e-3


def test_counts_round_up_to_whole_heads_and_wanda_ranks_heads():
    model = attention()
    recipe = Recipe(passes=(("select-nodes", {"criterion": "wanda", "counts": {GROUP: 3}}),
                            ("reconstruct-next-layer", {})), calib_size=None)
    result = onnxprune.compress(model, token_feeds(batch=40, tokens=5), recipe=recipe, measure_latency=False,
                                progress=False)
    assert get_init(result.model, "v.W").shape == (8, 4)        # 3 channels -> 2 heads of 2
    assert list(get_init(result.model, "v.shape")) == [0, 0, 2, 2]
    assert all(np.isfinite(o).all() for o in run_model(result.model, token_feeds(batch=3)))


def test_keep_must_hold_whole_heads():
    model = attention()
    group = next(g for g in find_channel_groups(model) if g.structure == "heads")
    with pytest.raises(ModelError, match="whole blocks"):
        prune_channels(model, group, np.array([0, 1, 2]))
    with pytest.raises(ModelError, match="whole blocks"):
        prune_channels(model, group, np.array([1, 2]))


def test_block_selection_skips_a_duplicated_block():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((500, 6))
    x = np.concatenate([z, z[:, :2]], axis=1)           # block 3 copies block 0
    sigma = x.T @ x / len(x)
    blocks, ratios = linalg.block_spectral_select(sigma, 2, count=3)
    assert 3 not in blocks and ratios[-1] == pytest.approx(1.0, abs=1e-6)


def test_the_planner_leaves_attention_projections_to_head_pruning():
    """Q/K/V and output-projection splits lose onnxruntime's Attention fusion: with head pruning
    on, the planner offers heads there and no low-rank site; FFN MatMuls stay offered."""
    from onnxprune.plan.planner import Costs, PlanOptions, find_sites
    from tests.graphs import token_ffn

    model = attention(heads=4, size=4, width=16)
    projections = {"q", "k", "v", "out"}
    sites, skipped = find_sites(model, PlanOptions(), Costs(model, "macs"))
    assert [(s.name, s.family) for s in sites] == [(GROUP, "prune")]
    left = {row["site"] for row in skipped if row["family"] == "low-rank" and "head pruning" in row["reason"]}
    assert left == projections
    # low rank alone (no head pruning to leave them to): the projections are offered
    sites, _ = find_sites(model, PlanOptions(families=("low-rank",)), Costs(model, "macs"))
    assert {s.name for s in sites} == projections
    ffn = token_ffn(features=16, hidden=64)
    sites, _ = find_sites(ffn, PlanOptions(), Costs(ffn, "macs"))
    assert {s.name for s in sites if s.family == "low-rank"} == {"ffn1", "ffn2"}
