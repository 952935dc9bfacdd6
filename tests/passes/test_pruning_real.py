"""Channel pruning on the real models in ../shared (skipped when it is absent).

Calibration and evaluation samples are disjoint (CIFAR-10 and the ImageNet samples are
stored sorted by class, so their halves are drawn by a seeded permutation). Sample counts
are small to keep the file well under 90 s on a 2-core machine.
"""

from __future__ import annotations

import pytest
from conftest import IMAGENET
from conftest import RealTask as Task

from onnxprune.data.preprocess import Preprocess
from onnxprune.graph.groups import find_channel_groups
from onnxprune.graph.index import GraphIndex

pytestmark = pytest.mark.real

def passes(criterion, reconstruct=True, **how):
    return [("select-nodes", {"criterion": criterion, **how}),
            ("reconstruct-next-layer", {"reconstruct": reconstruct})]


def test_lenet_usps_reconstruction_beats_no_reconstruction_and_mean(shared):
    task = Task(shared / "models/lenet_caffe_mnist.onnx", shared / "data/digits/usps_test.npz", Preprocess(),
                1003, 1004, shuffle=False)
    assert task.accuracy > 0.7
    spectral = task.run(passes("spectral", keep=0.03))
    dropped = task.run(passes("spectral", reconstruct=False, keep=0.03))
    mean = task.run(passes("mean", reconstruct=False, keep=0.03))
    assert spectral["params"] < 0.035 and dropped["params"] == spectral["params"]
    assert spectral["accuracy"] > dropped["accuracy"] + 0.15
    assert spectral["accuracy"] > mean["accuracy"] + 0.2
    assert spectral["accuracy"] > task.accuracy - 0.15
    rows = [r for p in spectral["report"]["passes"] for r in p.get("pruned", [])]
    assert {r["group"] for r in rows} == {"conv1", "conv2", "ip1"}
    assert all(0 < r["error"] < 0.3 and r["heldout_error"] >= 0 for r in rows)


def test_resnet20_inner_channels(shared):
    task = Task(shared / "models/resnet20_cifar10.onnx", shared / "data/cifar10/cifar10_test_jpeg.npz",
                IMAGENET, 256, 400, shuffle=True)
    groups = [g.name for g in find_channel_groups(task.model) if g.skip is None]
    assert len(groups) == 9 and all(g.endswith("conv1/Conv") for g in groups)
    spectral = task.run(passes("spectral", flops=0.8, groups=groups))
    l1 = task.run(passes("l1", flops=0.8, groups=groups))
    assert 0.75 < spectral["macs"] < 0.9 and l1["macs"] <= spectral["macs"] + 0.02
    assert spectral["accuracy"] > task.accuracy - 0.1
    assert spectral["accuracy"] > l1["accuracy"]
    assert spectral["agreement"] > 0.8


def test_mobilenetv2_expansion_channels(shared):
    """The three 576-channel expansions (14 x 14 sites) of MobileNetV2 keep 70 % of their
    channels with 32 calibration images; top-1 agreement with the original stays high."""
    task = Task(shared / "models/mobilenetv2_imagenet_fp32.onnx", shared / "data/imagenet_samples",
                Preprocess(resize=256, center_crop=224, mean=IMAGENET.mean, std=IMAGENET.std), 32, 32,
                shuffle=True)
    ops = {n.name: n.op_type for n in task.model.graph.node}
    expansion = [g for g in find_channel_groups(task.model) if g.skip is None
                 and any(ops[p.node] == "Conv" for p in g.path)
                 and GraphIndex(task.model).dims(g.producers[0].weight)[2:] == (1, 1)]
    assert len(expansion) == 16
    groups = tuple(g.name for g in expansion if g.channels == 576)
    result = task.run(passes("spectral", fraction=0.7, groups=groups))
    rows = [r for p in result["report"]["passes"] for r in p.get("pruned", [])]
    assert {r["group"] for r in rows} == set(groups) and all(r["kept"] == 408 for r in rows)   # 404 -> x8
    assert all(r["heldout_error"] < 0.1 for r in rows)
    assert result["macs"] < 0.95
    assert result["agreement"] >= 0.8
