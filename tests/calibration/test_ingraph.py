"""Statistics computed inside onnxruntime (engine="graph") against the float64 numpy path."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxprune.calibration.collect import collect
from onnxprune.calibration.ingraph import Accumulator
from onnxprune.calibration.moments import Moments
from onnxprune.calibration.requests import StatRequest
from onnxprune.data.preprocess import Preprocess
from onnxprune.data.samples import open_samples
from onnxprune.model import load_model
from onnxprune.passes import REGISTRY
from tests.calibration.test_collect import conv_relu_gemm, real

IMAGENET = Preprocess(resize=256, center_crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
CIFAR = Preprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
DALR = [("low-rank-split", {"method": "dalr", "keep": 0.25})]
SPECTRAL = [("select-nodes", {"criterion": "spectral", "keep": 0.5})]


def requests_of(model, passes):
    out = []
    for name, options in passes:
        out += [r for r, sets in REGISTRY[name](**options).requests(model) if "target" in sets]
    return list(dict.fromkeys(out))


def errors(reference, candidate) -> dict:
    """Largest relative errors over every request and fold: mean (to the rows' RMS), second
    moment and covariance (to their largest entry)."""
    worst = {"mean": 0.0, "second_moment": 0.0, "covariance": 0.0}
    assert reference.entries() == candidate.entries()
    for set_name, key, fold in reference.entries():
        a, b = reference.moments(key, set_name, fold), candidate.moments(key, set_name, fold)
        assert a.count == b.count
        rms = math.sqrt(float(np.diag(a.second_moment).max()))
        worst["mean"] = max(worst["mean"], float(np.abs(a.mean - b.mean).max()) / rms)
        for name in ("second_moment", "covariance"):
            x, y = getattr(a, name), getattr(b, name)
            worst[name] = max(worst[name], float(np.abs(x - y).max() / np.abs(x).max()))
    return worst


def both(model, samples, requests, **options):
    """(graph, numpy) statistics; also checks the default engine ("auto": pooled responses
    in-graph, features and patches by float32 BLAS, as `calibrate --help` says) against the
    float64 path."""
    graph = collect(model, {"target": samples}, requests, progress=False, engine="graph", **options)
    numpy = collect(model, {"target": samples}, requests, progress=False, engine="numpy", **options)
    auto = collect(model, {"target": samples}, requests, progress=False, **options)
    assert auto.header["engine"]["graph"] == sum(r.kind == "pooled" for r in requests)
    err = errors(numpy, auto)
    assert err["mean"] < 1e-5 and err["second_moment"] < 1e-5 and err["covariance"] < 1e-4, err
    return graph, numpy


def test_accumulator_corrects_the_shifts_exactly():
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((n, 4)) * 0.1 + 1e3 for n in (7, 1, 12)]     # mean >> spread
    acc, direct = Accumulator(4), Moments(4)
    for x in rows:
        shift = x.mean(axis=0)
        centred = x - shift
        acc.add(centred.T @ centred, x.sum(axis=0), shift, len(x))
        direct.update(x)
    m = acc.moments()
    assert m.count == direct.count == 20
    assert np.allclose(m.sum, direct.sum, rtol=1e-13)
    assert np.allclose(m.gram, direct.gram, rtol=1e-13)
    # the point of the shift: the covariance of rows far from the origin survives
    assert np.allclose(m.covariance, np.cov(np.concatenate(rows), rowvar=False, bias=True), atol=1e-12)


@pytest.mark.parametrize("opset", [10, 13, 18])
def test_every_kind_on_old_and_new_opsets(opset):
    """Pad and the Reduce ops changed signature in opsets 11, 13 and 18."""
    model = conv_relu_gemm()
    model.opset_import[0].version = opset
    x = np.random.default_rng(1).standard_normal((13, 2, 6, 6)).astype(np.float32) + 3.0
    requests = [StatRequest("x"), StatRequest("x", kind="patches", kernel=(3, 3), pads=(1, 1, 1, 1)),
                StatRequest("relu.out", kind="patches", kernel=(2, 2), strides=(2, 2), dilations=(1, 1)),
                StatRequest("relu.out", kind="patches", kernel=(3, 3), pads=(1, 0, 1, 0), dilations=(2, 1),
                            positions=4),
                StatRequest("relu.out", kind="pooled"), StatRequest("relu.out", kind="pooled", pool="mean"),
                StatRequest("flat.out", axis=-1), StatRequest("flat.out", axis=-1, keep_rows=True)]
    graph, numpy = both(model, real(model, x), requests, batch_size=4, folds=3)
    assert graph.header["engine"] == {"graph": 7, "numpy": 1}          # keep_rows needs the rows
    assert numpy.header["engine"] == {"graph": 0, "numpy": 8}
    err = errors(numpy, graph)
    assert err["mean"] < 1e-6 and err["second_moment"] < 1e-6 and err["covariance"] < 1e-5, err


@pytest.mark.real
def test_lenet_dalr_statistics(shared):
    model = load_model(shared / "models" / "lenet_caffe_mnist.onnx")
    digits = np.load(shared / "data" / "digits" / "usps_test.npz")
    samples = open_samples(digits["x"][:300], model)
    requests = requests_of(model, DALR)
    assert {r.kind for r in requests} == {"features", "patches"}
    graph, numpy = both(model, samples, requests, batch_size=32, folds=2)
    assert graph.header["engine"]["numpy"] == 0
    err = errors(numpy, graph)
    assert err["mean"] < 1e-5 and err["second_moment"] < 1e-5 and err["covariance"] < 1e-4, err


@pytest.mark.real
@pytest.mark.parametrize("passes", [DALR, SPECTRAL], ids=["dalr", "spectral"])
def test_resnet20_statistics(shared, passes):
    model = load_model(shared / "models" / "resnet20_cifar10.onnx")
    cifar = np.load(shared / "data" / "cifar10" / "cifar10_test_jpeg.npz")
    samples = open_samples(cifar["x"][::100][:64], model, preprocess=CIFAR)
    requests = requests_of(model, passes)
    graph, numpy = both(model, samples, requests, batch_size=32, folds=2)
    assert graph.header["engine"]["numpy"] == 0
    err = errors(numpy, graph)
    assert err["mean"] < 1e-5 and err["second_moment"] < 1e-5 and err["covariance"] < 1e-4, err


@pytest.mark.real
def test_resnet20_full_patches_in_graph(shared):
    """Every output position (no sampling): the in-graph im2col Gather of a stride-2 layer."""
    model = load_model(shared / "models" / "resnet20_cifar10.onnx")
    cifar = np.load(shared / "data" / "cifar10" / "cifar10_test_jpeg.npz")
    samples = open_samples(cifar["x"][:40], model, preprocess=CIFAR)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    strided = next(n for n in convs if any(a.name == "strides" and list(a.ints) == [2, 2] for a in n.attribute))
    attrs = {a.name: list(a.ints) for a in strided.attribute}
    requests = [StatRequest(strided.input[0], kind="patches", kernel=attrs["kernel_shape"], strides=attrs["strides"],
                            pads=attrs.get("pads", ()))]
    graph, numpy = both(model, samples, requests, batch_size=16, folds=2)
    err = errors(numpy, graph)
    assert err["second_moment"] < 1e-5 and err["covariance"] < 1e-4, err


@pytest.mark.real
def test_mobilenetv2_statistics(shared):
    model = load_model(shared / "models" / "mobilenetv2_imagenet_fp32.onnx")
    samples = open_samples(shared / "data" / "imagenet_samples", model, preprocess=IMAGENET)
    samples = samples.subset(np.arange(12))
    requests = requests_of(model, DALR)
    graph, numpy = both(model, samples, requests, batch_size=6, folds=2)
    # the classifier's input comes from a Reshape whose shape is computed: no inferred shape,
    # so it is exposed and folded in numpy; every Conv/expansion request runs in-graph
    assert graph.header["engine"] == {"graph": len(requests) - 1, "numpy": 1}
    err = errors(numpy, graph)
    assert err["mean"] < 1e-5 and err["second_moment"] < 1e-5 and err["covariance"] < 1e-4, err
