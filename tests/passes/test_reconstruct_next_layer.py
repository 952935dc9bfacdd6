"""reconstruct-next-layer: A_J = S_FJ (S_JJ + rho)^-1 folded into the consumers, its held-out
ridge, the site error it reports, and what it requires (select-nodes before it).

    gemm_chain:     x[N,8] -> fc1(16) -> Relu -> fc2(6) -> Relu -> fc3(4) -> Relu -> fc4 -> y
"""

from __future__ import annotations

import graphs
import numpy as np
import pytest
from conftest import assert_equivalent

import onnxprune.passes.reconstruct_next_layer as reconstruct_module
from onnxprune import linalg
from onnxprune.calibration.provider import StatsProvider
from onnxprune.data.samples import open_samples
from onnxprune.errors import RecipeError
from onnxprune.model import clone
from onnxprune.passes import REGISTRY, PassContext
from onnxprune.passes.reconstruct_next_layer import heldout_ridge, site_error
from onnxprune.pipeline import Recipe, run_pipeline


def data(model, n=256, seed=0):
    return graphs.feeds(model, batch=n, seed=seed)["x"]


def prune(model, passes, *, x=None, folds=2):
    """Run ``passes`` through the pipeline with statistics from ``x``."""
    x = data(model) if x is None else x
    provider = StatsProvider({"target": open_samples([{"x": x}], model)}, batch_size=64, folds=folds,
                             progress=False)
    return run_pipeline(model, Recipe(passes=tuple(passes), folds=folds, batch_size=64), provider)


def pruned_rows(report):
    return {row["group"]: row for p in report["passes"] for row in p.get("pruned", [])}


def test_needs_a_selection_before_it():
    with pytest.raises(RecipeError, match="reconstruct-next-layer needs channel selections"):
        Recipe(passes=(("reconstruct-next-layer", {}),))


def test_a_duplicated_channel_is_rebuilt_exactly():
    """Channel 3 of fc1 copies channel 0: keeping 15 of 16, the reconstruction folds the
    dropped one into the consumer, exactly."""
    model = graphs.gemm_chain()
    group = graphs.group_of(model, "fc1")

    def copy(value, axis):
        value = np.moveaxis(value.copy(), axis, 0)
        value[3] = value[0]
        return np.moveaxis(value, 0, axis)
    graphs.edit_channel(model, group, copy)
    select = ("select-nodes", {"counts": {"fc1": 15}, "criterion": "spectral"})
    rebuilt, report = prune(model, [select, ("reconstruct-next-layer", {})])
    assert pruned_rows(report)["fc1"]["kept"] == 15
    feeds = graphs.feeds(model, batch=7, seed=5)
    assert_equivalent(model, rebuilt, feeds, tol=1e-4)
    assert pruned_rows(report)["fc1"]["error"] < 1e-9


# --------------------------------------------------------------------------- report rows

def test_report_rows_give_the_error_with_and_without_reconstruction():
    model = graphs.gemm_chain()
    x = data(model)
    passes = [("select-nodes", {"criterion": "spectral", "fraction": 0.5, "groups": ("fc1",)})]
    _, rec = prune(model, passes + [("reconstruct-next-layer", {"ridge": 1e-6})], x=x)
    _, drop = prune(model, passes + [("reconstruct-next-layer", {"reconstruct": False})], x=x)
    r, d = pruned_rows(rec)["fc1"], pruned_rows(drop)["fc1"]
    selected = rec["passes"][0]["selected"][0]
    assert r["error"] == pytest.approx(1 - selected["retention"], abs=1e-6)
    assert r["reconstructed"] and not d["reconstructed"]
    assert d["error"] > r["error"] > 0
    for row in (r, d):
        assert row["params_after"] < row["params_before"] and row["kept"] == 8 and row["channels"] == 16


def test_auto_ridge_reports_its_choice_and_heldout_error():
    model = graphs.gemm_chain()
    _, report = prune(model, [("select-nodes", {"fraction": 0.5}), ("reconstruct-next-layer", {})])
    for row in pruned_rows(report).values():
        assert row["ridge"] > 0 and 0 <= row["heldout_error"] <= 1
    _, single = prune(model, [("select-nodes", {"fraction": 0.5}), ("reconstruct-next-layer", {})], folds=1)
    for row in pruned_rows(single).values():
        assert row["ridge"] == linalg.SELECT_RIDGE and "heldout_error" not in row


def test_a_shared_cache_fits_each_selection_once(monkeypatch):
    """The planner rebuilds the same selections on the same statistics (one cache per half):
    the second rewrite reuses the fit (and select-nodes its retention) and gives the same
    model; another count fits again."""
    fits, retentions = [], []
    monkeypatch.setattr(reconstruct_module, "heldout_ridge", lambda folds, keep: fits.append(len(keep)) or (1e-3, 0.5))
    ratio = linalg.retention_ratio
    monkeypatch.setattr(linalg, "retention_ratio",
                        lambda sigma, keep, **kw: retentions.append(len(keep)) or ratio(sigma, keep, **kw))
    model = graphs.gemm_chain()
    provider = StatsProvider({"target": open_samples([{"x": data(model)}], model)}, batch_size=64, folds=2,
                             progress=False)
    cache = {}

    def rewrite(count):
        work = clone(model)
        ctx = PassContext(statistics=provider, folds=2, cache=cache, original=model)
        REGISTRY["select-nodes"](counts={"fc1": count}, groups=("fc1",)).run(work, ctx)
        REGISTRY["reconstruct-next-layer"]().run(work, ctx)
        return work
    first, again, other = rewrite(10), rewrite(10), rewrite(6)
    assert fits == [10, 6] and retentions == [10, 6]
    assert first.SerializeToString() == again.SerializeToString()
    assert first.SerializeToString() != other.SerializeToString()


# --------------------------------------------------------------------------- numerics of the helpers

def test_site_error_matches_its_definition():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6))
    S = X.T @ X / len(X)
    keep = np.array([0, 2, 5])
    A = linalg.reconstruction_matrix(S, keep)
    direct = np.sum((X.T - A @ X[:, keep].T) ** 2) / np.sum(X ** 2)
    assert site_error(S, keep, A) == pytest.approx(direct, rel=1e-9)
    assert site_error(S, keep, None) == pytest.approx(1 - np.sum(X[:, keep] ** 2) / np.sum(X ** 2))
    assert site_error(S, np.arange(6), None) == 0.0


def test_heldout_ridge_prefers_small_ridges_for_exact_copies_and_large_for_noise():
    rng = np.random.default_rng(1)
    Z = rng.standard_normal((400, 5))
    exact = np.hstack([Z, Z[:, :2]])                                   # channels 5, 6 copy 0, 1
    folds = [(200, exact[:200].T @ exact[:200] / 200), (200, exact[200:].T @ exact[200:] / 200)]
    ridge, err = heldout_ridge(folds, np.arange(5))
    assert ridge == 1e-6 and err < 1e-9
    # 60 kept channels seen 80 times: the unregularised fit overfits the noise
    W = rng.standard_normal((80, 60))
    X = W + 0.05 * rng.standard_normal((80, 60))
    X = np.hstack([X, (X @ rng.standard_normal(60))[:, None] / 8 + rng.standard_normal((80, 1))])
    folds = [(40, X[:40].T @ X[:40] / 40), (40, X[40:].T @ X[40:] / 40)]
    ridge, err = heldout_ridge(folds, np.arange(60))
    assert ridge > 1e-6
