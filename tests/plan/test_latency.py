"""--objective latency: sites cut out as models of their own reproduce the whole model's
tensors, timed savings follow the work removed, and the planner plans for latency."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import graphs
from conftest import run_model
from onnxprune.api import as_model, as_samples
from onnxprune.graph.shapes import tensor_shapes
from onnxprune.plan.latency import LatencyCosts, site_model
from onnxprune.plan.planner import Costs, Planner, PlanOptions, find_sites
from onnxprune.calibration.collect import expose

ROOT = Path(__file__).resolve().parents[2]


def test_a_site_model_computes_what_the_whole_model_computes_there():
    model = graphs.gemm_chain()
    sites, _ = find_sites(model, PlanOptions(min_share=0.0), Costs(model, "macs"))
    site = next(s for s in sites if s.key == "prune:fc2")          # fc2 -> relu2 -> fc3 (+ its bias Add)
    sub = site_model(model, set(site.nodes), tensor_shapes(model), batch=5)
    x = graphs.feeds(model, batch=5, seed=2)
    exposed, names = expose(model, [i.name for i in sub.graph.input] + [o.name for o in sub.graph.output])
    values = dict(zip(names, run_model(exposed, x)[-len(names):]))
    inputs = {i.name: values[i.name] for i in sub.graph.input}
    for name, value in zip([o.name for o in sub.graph.output], run_model(sub, inputs)):
        np.testing.assert_allclose(value, values[name], rtol=1e-5, atol=1e-6)


def test_timed_savings_follow_the_work_removed():
    model = graphs.wide_mlp(hidden=4096)
    costs = Costs(model, "macs")
    sites, _ = find_sites(model, PlanOptions(min_share=0.0, families=("prune",)), costs)
    site, = sites
    latency = LatencyCosts(model, sites, lambda s: [64, 2048], batch=256)
    big, small = latency.saving(site, 64), latency.saving(site, 2048)
    # the site is nearly the whole model: its saving approaches the model's time, which is
    # timed separately (fastest of its runs), so a loaded machine may put it a little above
    assert latency.total > 0 and big > small > 0 and big < 1.15 * latency.total
    assert latency.saving(site, 1024) == pytest.approx((small + big) / 2 + (small - big) * (1024 - 1056) / 1984,
                                                       rel=1e-6)       # interpolated between sizes
    assert latency.plan_cost([(site, 64)]) == pytest.approx(latency.total - big)
    assert latency.saving(site, 4096) == 0.0


@pytest.mark.slow
def test_planning_for_latency_on_lenet():
    model = as_model(ROOT / "models" / "lenet_caffe_mnist.onnx")
    calib, _ = as_samples(ROOT / "models" / "usps_test.npz", model, None).split(0.5, seed=0)
    planner = Planner(model, calib.subset(np.arange(200)),
                      options=PlanOptions(objective="latency", check_samples=32, families=("prune",)))
    result = planner.for_max_drop(2.0)
    assert result["objective"] == "latency" and 0 < result["cost"] < 1
    assert planner.timings["latency"] > 0
    assert set(planner.costs.table) == {s.key for s in planner.sites}      # every LeNet site was timed
