"""A suffix model fed with cached activations reproduces the rewritten model exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from graphs import flatten_to_gemm, residual_add, set_init
from onnxprune.data.samples import open_samples
from onnxprune.model import clone, load_model
from onnxprune.graph.prune import prune_channels
from onnxprune.graph.groups import find_channel_groups
from onnxprune.plan.suffix import ActivationCache, Suffix, reference_hashes, upstream_inputs
from onnxprune.passes import REGISTRY
from onnxprune.runtime import make_session

ROOT = Path(__file__).resolve().parents[2]


def full_output(model, samples) -> np.ndarray:
    session = make_session(model)
    name = model.graph.output[0].name
    return np.concatenate([session.run([name], feeds)[0] for _, feeds in samples.batches(16)])


@pytest.fixture(scope="module")
def lenet():
    model = load_model(ROOT / "models" / "lenet_caffe_mnist.onnx")
    samples = open_samples(ROOT / "models" / "usps_test.npz", model).subset(np.arange(40))
    return model, samples


def test_suffix_of_a_pruned_group_matches_the_full_model(lenet):
    model, samples = lenet
    trial = clone(model)
    group = next(g for g in find_channel_groups(trial) if g.prunable and g.channels == 50)
    rng = np.random.default_rng(0)
    prune_channels(trial, group, np.arange(0, 50, 2), rng.standard_normal((50, 25)))
    suffix = Suffix(trial, reference_hashes(model), model.graph.output[0].name)
    # only what follows the first changed node runs: conv1 and its pool stay outside
    ops = [n.op_type for n in suffix.model.graph.node]
    assert ops.count("Conv") == 1 and len(suffix.inputs) == 1
    cache = ActivationCache(model, samples, batch_size=16)
    np.testing.assert_allclose(suffix.run(cache, batch_size=7), full_output(trial, samples), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache.output, full_output(model, samples), rtol=1e-6, atol=1e-6)


def test_unchanged_output_needs_no_run(lenet):
    model, samples = lenet
    suffix = Suffix(clone(model), reference_hashes(model), model.graph.output[0].name)
    assert suffix.model is None
    cache = ActivationCache(model, samples)
    assert suffix.run(cache) is cache.output


def test_suffix_through_a_residual_add_reads_both_branches():
    model = residual_add()
    trial = clone(model)
    group = next(g for g in find_channel_groups(trial) if g.prunable)
    prune_channels(trial, group, np.arange(group.channels - 1))
    suffix = Suffix(trial, reference_hashes(model), model.graph.output[0].name)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5,) + tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]))

    class Samples:
        def __len__(self):
            return 5

        def batches(self, size):
            yield np.arange(5), {"x": x.astype(np.float32)}
    cache = ActivationCache(model, Samples())
    expected = make_session(trial).run(None, {"x": x.astype(np.float32)})[0]
    np.testing.assert_allclose(suffix.run(cache), expected, rtol=1e-5, atol=1e-5)


def test_suffix_of_a_fixed_batch_model_is_fed_its_batch():
    """A model exported with batch 1 can hold that batch in a constant (torch's x.view(1, -1):
    Reshape to [1, 64]); its suffix then takes the cached activations one sample a run, as the
    model itself."""
    model = flatten_to_gemm(reshape=True)
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    set_init(model, "flat.shape", np.array([1, 64], dtype=np.int64))
    trial = clone(model)
    group = next(g for g in find_channel_groups(trial) if g.prunable)
    prune_channels(trial, group, np.arange(group.channels - 1))
    suffix = Suffix(trial, reference_hashes(model), model.graph.output[0].name)
    x = np.random.default_rng(1).standard_normal((5, 2, 8, 8)).astype(np.float32)
    cache = ActivationCache(model, open_samples([{"x": x}], model))
    session = make_session(trial)
    expected = np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(5)])
    np.testing.assert_allclose(suffix.run(cache, batch_size=4), expected, rtol=1e-5, atol=1e-5)


def test_upstream_inputs_cover_what_every_trial_suffix_reads():
    """What the planner fetches ahead for a site includes every input of the site's suffix."""
    import graphs
    from onnxprune.calibration.provider import StatsProvider
    from onnxprune.passes import PassContext
    from onnxprune.plan.planner import Costs, PlanOptions, find_sites, ladder_sizes

    options = PlanOptions(min_share=0.0, low_rank="svd", bias=False)
    for model in (residual_add(), load_model(ROOT / "models" / "lenet_caffe_mnist.onnx")):
        feeds = graphs.feeds(model, batch=20, seed=0)
        provider = StatsProvider({"target": open_samples([feeds], model)}, folds=2, progress=False)
        sites, _ = find_sites(model, options, Costs(model, "macs"))
        assert {s.family for s in sites} == {"prune", "low-rank"}
        hashes = reference_hashes(model)
        for site in sites:
            trial = clone(model)
            ctx = PassContext(statistics=provider, folds=2)
            for name, opts in site.passes(ladder_sizes(site, options)[-1][1], options):
                REGISTRY[name](**opts).run(trial, ctx)
            suffix = Suffix(trial, hashes, model.graph.output[0].name)
            assert suffix.inputs and set(suffix.inputs) <= set(upstream_inputs(model, site.nodes)), site.key
