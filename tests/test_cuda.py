"""``--device cuda``: onnxruntime's CUDA execution provider, against the CPU path.

Marked ``cuda`` and skipped where onnxruntime has no CUDA provider (the CPU wheel, or no GPU):
CI runs on CPU, so these run on a GPU machine by hand (see README, "GPU").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from onnxprune.calibration.collect import collect
from onnxprune.cli import main
from onnxprune.data.samples import open_samples
from onnxprune.model import load_model
from onnxprune.runtime import make_session
from tests.calibration.test_ingraph import CIFAR, DALR, IMAGENET, SPECTRAL, errors, requests_of

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                       reason="onnxruntime has no CUDA execution provider here"),
]

ROOT = Path(__file__).resolve().parents[1]
LENET = ROOT / "models" / "lenet_caffe_mnist.onnx"
USPS = ROOT / "models" / "usps_test.npz"


def test_sessions_run_on_the_gpu_and_agree_with_the_cpu():
    model = load_model(LENET)
    feeds = open_samples(USPS, model).batch(np.arange(64))
    gpu = make_session(model, device="cuda")
    assert gpu.get_providers()[0] == "CUDAExecutionProvider"
    options = gpu.get_provider_options()["CUDAExecutionProvider"]
    assert options.get("use_tf32") == "0"
    (a,), (b,) = gpu.run(None, feeds), make_session(model).run(None, feeds)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


@pytest.mark.real
@pytest.mark.parametrize("passes", [DALR, SPECTRAL], ids=["dalr", "spectral"])
def test_resnet20_statistics_on_the_gpu_match_float64(shared, passes):
    """On CUDA the default engine reduces every request in-graph (float32 Gemm on the GPU,
    shifted and corrected in float64): within the CPU engines' error bounds of the float64 path."""
    model = load_model(shared / "models" / "resnet20_cifar10.onnx")
    cifar = np.load(shared / "data" / "cifar10" / "cifar10_test_jpeg.npz")
    samples = open_samples(cifar["x"][::100][:64], model, preprocess=CIFAR)
    requests = requests_of(model, passes)
    gpu = collect(model, {"target": samples}, requests, batch_size=32, folds=2, progress=False, device="cuda")
    exact = collect(model, {"target": samples}, requests, batch_size=32, folds=2, progress=False, engine="numpy")
    assert gpu.header["engine"]["numpy"] == 0
    err = errors(exact, gpu)
    assert err["mean"] < 1e-5 and err["second_moment"] < 1e-5 and err["covariance"] < 1e-4, err


@pytest.mark.real
def test_mobilenetv2_statistics_on_the_gpu_match_float64(shared):
    model = load_model(shared / "models" / "mobilenetv2_imagenet_fp32.onnx")
    samples = open_samples(shared / "data" / "imagenet_samples", model, preprocess=IMAGENET).subset(np.arange(12))
    requests = requests_of(model, DALR)
    gpu = collect(model, {"target": samples}, requests, batch_size=6, folds=2, progress=False, device="cuda")
    exact = collect(model, {"target": samples}, requests, batch_size=6, folds=2, progress=False, engine="numpy")
    err = errors(exact, gpu)
    assert err["mean"] < 1e-5 and err["second_moment"] < 1e-5 and err["covariance"] < 1e-4, err


@pytest.mark.real
def test_compress_on_the_gpu_matches_the_cpu(shared, tmp_path):
    """The whole command on CUDA (calibration, passes, validation, latency): the same channels
    kept as on the CPU and the same held-out accuracy to within a few disagreeing samples."""
    cifar = np.load(shared / "data" / "cifar10" / "cifar10_test_jpeg.npz")
    pick = np.sort(np.random.default_rng(0).permutation(len(cifar["y"]))[:600])   # stored sorted by class
    data = tmp_path / "cifar600.npz"
    np.savez(data, x=cifar["x"][pick], y=cifar["y"][pick])
    reports = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.onnx"
        result = CliRunner().invoke(main, [
            "compress", str(shared / "models" / "resnet20_cifar10.onnx"), "--target-data", str(data), "-o", str(out),
            "--method", "spectral", "--flops", "0.6", "--allocation", "global", "--calib-size", "300",
            "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--device", device, "-q"])
        assert result.exit_code == 0, result.output + result.stderr
        reports[device] = json.loads(out.with_name(f"{device}.report.json").read_text())
    cpu, gpu = reports["cpu"]["validation"], reports["cuda"]["validation"]
    assert gpu["params_candidate"] == cpu["params_candidate"] and gpu["macs_candidate"] == cpu["macs_candidate"]
    assert abs(gpu["accuracy_candidate"] - cpu["accuracy_candidate"]) <= 0.01
    assert gpu["latency_ms"]
