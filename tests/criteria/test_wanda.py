"""wanda (onnxprune/criteria/wanda.py): structured Wanda, ||consumer column j|| * ||x_j||.

Checked against the score computed by hand from the activations (run to the site with
onnxruntime) and the consumer weights, on three consumer layouts:

    gemm_chain:      fc1 (16) -> Relu -> Gemm fc2 (W 16x6, transB=0: columns are rows of W)
    conv_bn_relu:    conv1 (8) -> BN -> Relu -> Conv conv2 (W 4x8x3x3: all taps of channel j)
    flatten_to_gemm: conv (4) -> Relu -> MaxPool -> Flatten -> Gemm fc (W 5x64: 16 columns per channel)

and, with reconstruction, a dead channel is dropped first and the rewrite stays lossless.
"""

from __future__ import annotations

import graphs
import numpy as np
import onnx
import pytest
from conftest import assert_equivalent, run_model

from onnxprune.calibration.provider import StatsProvider
from onnxprune.criteria import get
from onnxprune.data.samples import open_samples
from onnxprune.passes.select_nodes import CRITERIA
from onnxprune.pipeline import Recipe, run_pipeline
from onnxprune.recipes import PRUNING_CRITERIA

N = 128


def activations(model, tensor, x):
    """Values of ``tensor`` for input ``x`` (the model with ``tensor`` as an extra output)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    return run_model(probe, {"x": x})[-1].astype(np.float64)


def select(model, group, x, **options):
    provider = StatsProvider({"target": open_samples([{"x": x}], model)}, batch_size=64, folds=2, progress=False)
    passes = (("select-nodes", {"criterion": "wanda", "groups": (group,), **options}), ("reconstruct-next-layer", {}))
    out, report = run_pipeline(model, Recipe(passes=passes, batch_size=64), provider)
    return out, report


def expected_keep(model, group_name, x, count):
    group = graphs.group_of(model, group_name)
    phi = activations(model, group.site, x)                       # [N, C, ...]
    phi = np.moveaxis(phi, 1, -1).reshape(-1, group.channels)     # calibration rows
    x_norm = np.sqrt((phi ** 2).sum(axis=0))
    (consumer,) = group.consumers
    w = np.moveaxis(graphs.get_init(model, consumer.weight).astype(np.float64), consumer.axis, 0)
    w_norm = np.linalg.norm(w.reshape(group.channels, -1), axis=1)
    return np.sort(np.argsort(-(w_norm * x_norm), kind="stable")[:count])


CASES = [(graphs.gemm_chain, "fc1", 0.5), (graphs.conv_bn_relu, "conv1", 0.5), (graphs.flatten_to_gemm, "conv", 0.5)]


@pytest.mark.parametrize("build, group, fraction", CASES, ids=[c[1] for c in CASES])
def test_wanda_keeps_the_channels_with_the_largest_column_times_activation_norm(build, group, fraction):
    model = build()
    x = graphs.feeds(model, batch=N, seed=0)["x"]
    out, report = select(model, group, x, fraction=fraction)
    (row,) = report["passes"][0]["selected"]
    count = row["kept"]
    keep = expected_keep(model, group, x, count)
    # the kept producer rows are exactly the expected channels
    producer = graphs.group_of(model, group).producers[0]
    before = np.moveaxis(graphs.get_init(model, producer.weight), producer.axis, 0)
    after = np.moveaxis(graphs.get_init(out, producer.weight), producer.axis, 0)
    np.testing.assert_array_equal(after, before[keep])


def test_wanda_differs_from_weights_or_activations_alone():
    """A channel with a tiny activation but a huge consumer column, and one the other way
    round: Wanda weighs both factors."""
    model = graphs.gemm_chain()
    x = graphs.feeds(model, batch=N, seed=0)["x"]
    w2 = graphs.get_init(model, "fc2.W")
    w1, b1 = graphs.get_init(model, "fc1.W"), graphs.get_init(model, "fc1.B")
    w1[0] *= 1e-3
    b1[0] = 1e-3                                                 # channel 0: tiny activation...
    w2[0] *= 1e4                                                 # ...read by a huge column
    graphs.set_init(model, "fc1.W", w1)
    graphs.set_init(model, "fc1.B", b1)
    graphs.set_init(model, "fc2.W", w2)
    keep = expected_keep(model, "fc1", x, 8)
    assert 0 in keep                                             # kept for its column, despite its activation
    out, _ = select(model, "fc1", x, fraction=0.5)
    after = graphs.get_init(out, "fc1.W")
    np.testing.assert_array_equal(after, graphs.get_init(model, "fc1.W")[keep])


@pytest.mark.parametrize("mode", ["one-shot", "sequential"])
def test_wanda_with_reconstruction_drops_a_dead_channel_losslessly(mode):
    model = graphs.conv_bn_relu()
    group = graphs.group_of(model, "conv1")

    def dead(value, axis):
        value = np.moveaxis(value.copy(), axis, 0)
        value[5] = 0
        return np.moveaxis(value, 0, axis)
    graphs.edit_channel(model, group, dead)
    x = graphs.feeds(model, batch=N, seed=0)["x"]
    provider = StatsProvider({"target": open_samples([{"x": x}], model)}, batch_size=64, folds=2, progress=False)
    passes = (("select-nodes", {"criterion": "wanda", "fraction": 0.875, "groups": ("conv1",)}),
              ("reconstruct-next-layer", {}))
    out, report = run_pipeline(model, Recipe(passes=passes, mode=mode, batch_size=64), provider)
    (row,) = [r for p in report["passes"] for r in p.get("pruned", [])]
    assert row["kept"] == 7 and row["criterion"] == "wanda" and row["reconstructed"]
    assert row["error"] < 1e-9
    assert graphs.get_init(out, "conv1.W").shape[0] == 7
    assert_equivalent(model, out, graphs.feeds(model, batch=5, seed=7), tol=1e-4)


def test_wanda_is_registered_and_offered_by_the_cli():
    assert "wanda" in CRITERIA and "wanda" in PRUNING_CRITERIA
    from onnxprune.cli import compress
    method = next(p for p in compress.params if p.name == "method")
    assert "wanda" in method.type.choices
    assert get("wanda").threshold == "fraction" and not get("wanda").needs_source()


@pytest.mark.real
def test_lenet_usps_wanda_with_reconstruction(shared):
    """Half the parameters of LeNet on USPS: reconstruction keeps wanda within 2 points of the
    original's held-out accuracy; dropping the same channels without it costs 10 points."""
    from conftest import RealTask

    from onnxprune.data.preprocess import Preprocess

    task = RealTask(shared / "models/lenet_caffe_mnist.onnx", shared / "data/digits/usps_test.npz", Preprocess(),
                    1003, 1004, shuffle=False)
    rebuilt = task.run([("select-nodes", {"criterion": "wanda", "keep": 0.5}), ("reconstruct-next-layer", {})])
    dropped = task.run([("select-nodes", {"criterion": "wanda", "keep": 0.5}),
                        ("reconstruct-next-layer", {"reconstruct": False})])
    assert rebuilt["params"] < 0.5 and dropped["params"] == rebuilt["params"]
    assert rebuilt["accuracy"] > task.accuracy - 0.02
    assert rebuilt["accuracy"] > dropped["accuracy"] + 0.05
