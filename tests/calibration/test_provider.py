"""calibration/provider.py: statistics on demand, reused while a tensor's upstream is unchanged."""

from __future__ import annotations

import graphs
import numpy as np
import pytest

from onnxprune.calibration.provider import StatsProvider
from onnxprune.calibration.requests import StatRequest
from onnxprune.data.samples import open_samples
from onnxprune.errors import CalibrationError
from onnxprune.graph.editor import GraphEditor
from onnxprune.model import clone


def provider_for(model, n=64):
    x = graphs.feeds(model, batch=n, seed=0)["x"]
    return StatsProvider({"target": open_samples([{"x": x}], model)}, batch_size=32, folds=2, progress=False)


def test_reuses_statistics_while_the_upstream_is_unchanged():
    model = graphs.gemm_chain()
    provider = provider_for(model)
    early, late = StatRequest("fc1.out", axis=1), StatRequest("fc3.out", axis=1)
    first = provider(model, [early, late])
    assert provider.collections == 1
    again = provider(clone(model), [early, late])          # same graph: no new run
    assert provider.collections == 1
    np.testing.assert_array_equal(first.moments(early).second_moment, again.moments(early).second_moment)
    # a weight after fc1 changes: fc1's statistics stay valid, fc3's are gathered again
    changed = clone(model)
    graph = GraphEditor(changed)
    graph.set_array("fc2.W", graph.array("fc2.W") * 2.0)
    assert provider.cached(changed, [early]) is not None
    assert provider.cached(changed, [late]) is None
    view = provider(changed, [early, late])
    assert provider.collections == 2
    np.testing.assert_array_equal(view.moments(early).second_moment, first.moments(early).second_moment)
    assert not np.allclose(view.moments(late).second_moment, first.moments(late).second_moment)
    assert view.moments(late, fold=0).count + view.moments(late, fold=1).count == view.moments(late).count


def test_a_missing_sample_set_and_unknown_requests_are_user_errors():
    """A method that reads the source domain without --source-data is told to pass it (DataError);
    a request no run gathered is a CalibrationError."""
    from onnxprune.errors import DataError

    model = graphs.gemm_chain()
    provider = provider_for(model)
    with pytest.raises(DataError, match=r"--source-data \| this method needs source-domain samples"):
        provider(model, [StatRequest("fc1.out", axis=1)], ("source",))
    view = provider(model, [StatRequest("fc1.out", axis=1)])
    with pytest.raises(CalibrationError, match="no target statistics"):
        view.moments(StatRequest("fc2.out", axis=1))


def test_stored_activations_serve_later_requests_with_the_same_statistics():
    """With an activation store a later request runs only the graph after the activations the
    earlier run kept; the statistics equal those of a full run, also once a weight between
    them changed (the stored values are keyed by cone hash, so a changed upstream is recomputed)."""
    model = graphs.gemm_chain()
    x = graphs.feeds(model, batch=64, seed=0)["x"]
    stored = StatsProvider({"target": open_samples([{"x": x}], model)}, batch_size=16, folds=2, progress=False)
    plain = StatsProvider({"target": open_samples([{"x": x}], model)}, batch_size=16, folds=2, progress=False,
                          activation_bytes=0)
    assert stored.stores_activations and not plain.stores_activations
    early, late = StatRequest("fc1.out", axis=1), StatRequest("fc3.out", axis=1)
    stored(model, [early])
    store = stored._stores["target"]
    assert len(store.values) > 0                       # the frontier after fc1 was kept
    changed = clone(model)
    graph = GraphEditor(changed)
    graph.set_array("fc2.W", graph.array("fc2.W") * 2.0)
    for m in (model, changed):
        a, b = stored(m, [late]).moments(late), plain(m, [late]).moments(late)
        np.testing.assert_allclose(a.second_moment, b.second_moment, rtol=1e-6)
        np.testing.assert_allclose(a.mean, b.mean, rtol=1e-6, atol=1e-9)
        for fold in (0, 1):
            assert stored(m, [late]).moments(late, fold=fold).count == plain(m, [late]).moments(late, fold=fold).count


def test_the_store_stays_within_its_byte_budget():
    model = graphs.gemm_chain()
    x = graphs.feeds(model, batch=64, seed=0)["x"]
    samples = open_samples([{"x": x}], model)
    inputs = x.nbytes
    provider = StatsProvider({"target": samples}, batch_size=16, folds=2, progress=False,
                             activation_bytes=inputs * 2 + 64 * 16 * 4)     # inputs, plus one fc1-sized tensor
    provider(model, [StatRequest("fc1.out", axis=1)])
    provider(model, [StatRequest("fc2.out", axis=1)])
    store = provider._stores["target"]
    assert sum(v.nbytes for v in store.values.values()) + inputs <= store.max_bytes
    # inputs over half the budget: no store, plain runs
    tiny = StatsProvider({"target": samples}, batch_size=16, folds=2, progress=False, activation_bytes=inputs)
    tiny(model, [StatRequest("fc3.out", axis=1)])
    assert not tiny.stores_activations


def test_collect_keeps_activations_within_a_byte_budget():
    from onnxprune.calibration.collect import collect, expose
    from onnxprune.runtime import make_session

    model = graphs.gemm_chain()
    x = graphs.feeds(model, batch=40, seed=0)["x"]
    samples = {"target": open_samples([{"x": x}], model)}
    request = StatRequest("fc2.out", axis=1)
    stats = collect(model, samples, [request], batch_size=16, progress=False, keep=["fc1.out"])
    exposed, names = expose(model, ["fc1.out"])
    np.testing.assert_array_equal(stats.activations["fc1.out"], make_session(exposed).run(names, {"x": x})[0])
    # kept batch by batch (40 = 16 + 16 + 8), each its own memory: onnxruntime's outputs are views of
    # its arena, which would grow while they are held
    assert [len(p) for p in stats.activations["fc1.out"].parts] == [16, 16, 8]
    assert all(p.flags.owndata for p in stats.activations["fc1.out"].parts)
    assert collect(model, samples, [request], batch_size=16, progress=False, keep=["fc1.out"],
                   keep_bytes=40 * 16 * 4 - 1).activations == {}


def test_activations_over_the_budget_are_never_copied(monkeypatch):
    """Whether every sample's activations fit is known from the first batch: over the budget, no
    batch is copied (MobileNetV2's correct-drift copied 0.5-1 GB per stage and then dropped it)."""
    import onnxprune.calibration.collect as collect_module

    copies = []

    class CountingNumpy:
        def __getattr__(self, name):
            return getattr(np, name)

        def array(self, *args, **kwargs):
            copies.append(1)
            return np.array(*args, **kwargs)

    model = graphs.gemm_chain()
    samples = {"target": open_samples([graphs.feeds(model, batch=40, seed=0)], model)}
    request = StatRequest("fc2.out", axis=1)
    monkeypatch.setattr(collect_module, "np", CountingNumpy())
    stats = collect_module.collect(model, samples, [request], batch_size=16, progress=False, keep=["fc1.out"],
                                   keep_bytes=40 * 16 * 4 - 1)
    assert stats.activations == {} and copies == []
    kept = collect_module.collect(model, samples, [request], batch_size=16, progress=False, keep=["fc1.out"],
                                  keep_bytes=40 * 16 * 4)
    assert len(kept.activations["fc1.out"]) == 40 and len(copies) == 3
