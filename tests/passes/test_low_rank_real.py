"""low-rank-split on the real models in ../shared (skipped when it is absent).

Calibration on the first half of the target set, accuracy on the held-out second half
(the ImageNet folder is sorted by class, so its halves come from a seeded permutation).
"""

from __future__ import annotations

import onnx
import pytest

from conftest import IMAGENET, RealTask
from onnxprune.data.preprocess import Preprocess

pytestmark = pytest.mark.real


def split(layer: str, rank: int, method: str):
    return ("low-rank-split", {"method": method, "rank": rank, "layers": (layer,)})


SVD_BC = lambda layer, rank: [split(layer, rank, "svd"), ("bias-compensate", {})]  # noqa: E731


def check_output(task: RealTask, result: dict, layer: str) -> None:
    model = result["model"]
    onnx.checker.check_model(model)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    names = {n.name for n in model.graph.node}
    assert {f"{layer}/low-rank-split/A", f"{layer}/low-rank-split/B"} <= names
    assert [i.name for i in model.graph.input] == [i.name for i in task.model.graph.input]
    assert [o.name for o in model.graph.output] == [o.name for o in task.model.graph.output]
    assert model.ir_version == task.model.ir_version


def test_lenet_usps_dalr_beats_svd_at_high_compression(shared):
    """LeNet ip1 (800 -> 500) at rank 4: the DALR paper's high-compression regime."""
    task = RealTask(shared / "models/lenet_caffe_mnist.onnx", shared / "data/digits/usps_test.npz", Preprocess(),
                    1003, 1004, shuffle=False)
    svd = task.run([split("ip1", 4, "svd")])
    svd_bc = task.run(SVD_BC("ip1", 4))
    dalr = task.run([split("ip1", 4, "dalr")])
    assert dalr["params"] == svd["params"] < 0.1
    assert dalr["accuracy"] > svd["accuracy"] + 0.08
    assert dalr["accuracy"] > svd_bc["accuracy"] + 0.05
    assert dalr["agreement"] > svd_bc["agreement"]
    check_output(task, dalr, "ip1")


@pytest.mark.parametrize("target", ["usps_test.npz", "mnist_m_test.npz"])
def test_mnist_cnn_dalr_never_below_svd_bc(shared, target):
    """mnist_cnn fc1 (3136 -> 128): on both shifted targets DALR (default ridge) stays within
    one point of SVD + BC at every rank tried, and is ahead at the smallest."""
    task = RealTask(shared / "models/mnist_cnn_fc3136.onnx", shared / "data/digits" / target,
                    Preprocess(mean=(0.5,), std=(0.5,)), 800, 1000, shuffle=False)
    gaps = []
    for rank in (4, 16):
        gaps.append(task.run([split("/fc1/Gemm", rank, "dalr")])["accuracy"]
                    - task.run(SVD_BC("/fc1/Gemm", rank))["accuracy"])
    assert min(gaps) >= -0.01, gaps


@pytest.mark.slow
def test_mobilenetv2_classifier_dalr_adapts_its_ridge(shared):
    """The 1280 -> 1000 classifier at 10 % of its parameters from 250 calibration images:
    DALR with a fixed small ridge over-fits the 250-dimensional span of the data; the default
    ridge (chosen on held-out calibration folds) stays within a point of SVD + BC."""
    task = RealTask(shared / "models/mobilenetv2_imagenet_fp32.onnx", shared / "data/imagenet_samples",
                    Preprocess(resize=256, center_crop=224, mean=IMAGENET.mean, std=IMAGENET.std), 250, 250,
                    shuffle=True)
    layer = next(n.name for n in task.model.graph.node if n.op_type in ("MatMul", "Gemm"))
    rank = int(0.1 * 1280 * 1000 / (1280 + 1000))
    svd_bc = task.run(SVD_BC(layer, rank))
    dalr = task.run([split(layer, rank, "dalr")])
    fixed = task.run([("low-rank-split", {"method": "dalr", "rank": rank, "layers": (layer,), "ridge": 1e-4})])
    assert dalr["accuracy"] >= svd_bc["accuracy"] - 0.01
    assert dalr["agreement"] >= svd_bc["agreement"] - 0.01
    assert fixed["agreement"] < dalr["agreement"]
    check_output(task, dalr, layer)
