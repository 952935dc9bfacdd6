"""Reference vs candidate: metrics on constructed cases, thresholds, mismatches, real models."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import DataError, ModelError, RecipeError, ValidationFailed
from onnxprune.model import clone, load_model
from onnxprune.runtime import make_session
from onnxprune.validation import ValidationReport, check_thresholds, validate


class ArraySamples:
    """Stand-in for data.samples.SampleSet: in-memory arrays, optional labels."""

    def __init__(self, feeds: dict[str, np.ndarray], labels=None):
        self.feeds = feeds
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)

    def __len__(self):
        return len(next(iter(self.feeds.values())))

    def batch(self, indices):
        return {k: v[np.asarray(indices)] for k, v in self.feeds.items()}

    def batches(self, batch_size):
        for start in range(0, len(self), batch_size):
            indices = np.arange(start, min(start + batch_size, len(self)))
            yield indices, self.batch(indices)

    def subset(self, indices):
        labels = None if self.labels is None else self.labels[np.asarray(indices)]
        return ArraySamples(self.batch(indices), labels)

    name = "in-memory samples"

    def describe(self):
        return {"name": self.name, "count": len(self), "labelled": self.labels is not None}


def run_model(model, feeds):
    return make_session(model).run(None, feeds)


def _model(nodes, inputs, outputs, inits, batch="N") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, *shape]) for name, shape in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, *shape]) for name, shape in outputs],
        [numpy_helper.from_array(np.asarray(value, np.float32), name) for name, value in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    onnx.checker.check_model(model)
    return model


# x [N,8] -> Gemm(W1 [16,8]) -> Relu -> Gemm(W2 [5,16]) -> y [N,5]
def gemm_chain(seed=0, noise=0.0, batch="N"):
    rng = np.random.default_rng(seed)
    w1, w2 = rng.standard_normal((16, 8)), rng.standard_normal((5, 16))
    noisy = np.random.default_rng(99)
    w1 = w1 + noise * noisy.standard_normal(w1.shape)
    w2 = w2 + noise * noisy.standard_normal(w2.shape)
    return _model(
        [helper.make_node("Gemm", ["x", "W1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Gemm", ["r", "W2"], ["y"], transB=1)],
        [("x", [8])], [("y", [5])], {"W1": w1, "W2": w2}, batch=batch)


# x [N,3] -> MatMul(P [3,3]) -> y [N,3]      (P a permutation: relabels the classes)
def permute_classes(perm):
    return _model([helper.make_node("MatMul", ["x", "P"], ["y"])], [("x", [3])], [("y", [3])],
                  {"P": np.eye(3)[:, perm]})


def _samples(n=50, seed=1, labels=None):
    x = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    return ArraySamples({"x": x}, labels)


def _errors(reference, candidate, samples):
    r = run_model(reference, samples.feeds)[0].astype(np.float64)
    c = run_model(candidate, samples.feeds)[0].astype(np.float64)
    return np.linalg.norm(c - r) / np.linalg.norm(r), float(np.mean(r.argmax(1) == c.argmax(1)))


def test_identical_models():
    model = gemm_chain()
    report = validate(model, model, _samples(), batch_size=7, latency_runs=2, latency_batch=4)
    assert report.samples == 50
    assert report.agreement == 1.0
    assert report.relative_error == 0.0
    assert report.sqnr_db == math.inf
    assert report.accuracy_reference is None and report.accuracy_candidate is None
    assert report.params_reference == report.params_candidate == 16 * 8 + 5 * 16
    assert report.macs_reference == report.macs_candidate == 16 * 8 + 5 * 16
    assert report.bytes_reference == report.bytes_candidate > 0
    assert set(report.latency_ms) == {"reference", "candidate", "spread"}
    assert set(report.latency_ms["reference"]) == {"batch1", "batch4"}
    assert all(v > 0 for v in report.latency_ms["candidate"].values())
    check_thresholds(report, max_drop=0, min_agreement=1)


def test_perturbed_weights_lose_fidelity_monotonically():
    reference, samples = gemm_chain(), _samples(n=400)
    reports = [validate(reference, gemm_chain(noise=noise), samples, batch_size=64, measure_latency=False)
               for noise in (0.01, 0.1, 1.0)]
    for noise, report in zip((0.01, 0.1, 1.0), reports):
        rel, agreement = _errors(reference, gemm_chain(noise=noise), samples)
        assert report.relative_error == pytest.approx(rel, rel=1e-5)
        assert report.sqnr_db == pytest.approx(-20 * np.log10(rel), rel=1e-5)
        assert report.agreement == pytest.approx(agreement)
    sqnr = [r.sqnr_db for r in reports]
    assert sqnr[0] > sqnr[1] > sqnr[2] and sqnr[0] > 30
    assert reports[0].agreement > 0.95 > reports[2].agreement
    assert reports[0].latency_ms == {}


def test_accuracy_and_agreement_on_constructed_labels():
    # rows whose argmax is 0,1,2,0,1,2,...; labels right for 7 of 10 rows
    x = (np.eye(3)[np.arange(10) % 3] + 0.1).astype(np.float32)
    truth = np.arange(10) % 3
    labels = truth.copy()
    labels[[1, 4, 8]] = (labels[[1, 4, 8]] + 1) % 3
    samples = ArraySamples({"x": x}, labels)
    identity, swapped = permute_classes([0, 1, 2]), permute_classes([1, 0, 2])  # swaps classes 0 and 1
    report = validate(identity, swapped, samples, batch_size=4, measure_latency=False)
    predicted = np.array([1, 0, 2])[truth]
    assert report.accuracy_reference == pytest.approx(0.7)
    assert report.accuracy_candidate == pytest.approx(np.mean(predicted == labels))
    assert report.agreement == pytest.approx(np.mean(predicted == truth))  # only class-2 rows agree
    assert report.accuracy_drop == pytest.approx(100 * (0.7 - np.mean(predicted == labels)))
    # the drop's standard error: of the mean of the per-sample differences of correctness
    differences = (truth == labels).astype(float) - (predicted == labels)
    assert report.accuracy_drop_se == pytest.approx(100 * np.std(differences, ddof=1) / np.sqrt(10))
    assert report.accuracy_drop_se > 0
    assert validate(identity, identity, samples, measure_latency=False).accuracy_drop_se == 0.0
    assert validate(identity, swapped, ArraySamples({"x": x}), measure_latency=False).accuracy_drop_se is None


def test_fixed_batch_model_pads_the_last_batch():
    reference, candidate = gemm_chain(batch=4), gemm_chain(noise=0.1, batch=4)
    samples = _samples(n=10)
    report = validate(reference, candidate, samples, batch_size=3, latency_runs=2, latency_batch=16)
    rel, agreement = _errors(gemm_chain(), gemm_chain(noise=0.1), samples)
    assert report.samples == 10
    assert report.relative_error == pytest.approx(rel, rel=1e-5)
    assert report.agreement == pytest.approx(agreement)
    assert set(report.latency_ms["reference"]) == {"batch4"}


def test_several_outputs_reported_each():
    # x [N,3] -> Identity -> a ; x -> Mul(s) -> b    (the candidate scales b by 1.1 instead of 1)
    def two_outputs(scale):
        nodes = [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Mul", ["x", "s"], ["b"])]
        return _model(nodes, [("x", [3])], [("a", [3]), ("b", [3])], {"s": np.full(3, scale)})
    samples = ArraySamples({"x": np.random.default_rng(0).standard_normal((20, 3)).astype(np.float32)})
    report = validate(two_outputs(1.0), two_outputs(1.1), samples, measure_latency=False)
    assert [o.name for o in report.outputs] == ["a", "b"]
    assert report.outputs[0].relative_error == report.relative_error == 0.0
    assert report.outputs[1].relative_error == pytest.approx(0.1, rel=1e-5)
    assert report.outputs[1].sqnr_db == pytest.approx(20.0, rel=1e-4)


# x [N,3] -> MatMul(w [3]) -> y [N]     (a regression output: no class axis)
def test_output_without_class_axis_reports_errors_only():
    def dot(scale):
        return _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [3])], [("y", [])],
                      {"w": np.full(3, scale)})
    x = np.random.default_rng(0).standard_normal((20, 3)).astype(np.float32)
    report = validate(dot(1.0), dot(0.9), ArraySamples({"x": x}), measure_latency=False)
    assert report.relative_error == pytest.approx(0.1, rel=1e-5)
    assert math.isnan(report.agreement) and report.accuracy_reference is None
    with pytest.raises(ValidationFailed):
        check_thresholds(report, min_agreement=0)
    with pytest.raises(DataError, match="class scores"):
        validate(dot(1.0), dot(0.9), ArraySamples({"x": x}, labels=np.zeros(20)), measure_latency=False)


def test_report_to_dict_is_strict_json():
    model = gemm_chain()
    report = validate(model, model, _samples(), latency_runs=2, latency_batch=8)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["sqnr_db"] is None and data["identical"] is True and data["agreement"] == 1.0
    assert set(data["ratios"]["speedup"]) == {"batch1", "batch8"}
    assert data["ratios"]["params"] == 1.0
    assert data["outputs"][0]["name"] == "y"
    lines = report.summary_lines()
    assert any(line.startswith("agreement") for line in lines)
    assert any("speedup" in line for line in lines)


# ----------------------------------------------------------------------------- mismatches

def test_mismatched_inputs_raise():
    other = permute_classes([0, 1, 2])
    other.graph.input[0].name = "z"
    other.graph.node[0].input[0] = "z"
    with pytest.raises(ModelError, match="inputs"):
        validate(permute_classes([0, 1, 2]), other, ArraySamples({"x": np.zeros((2, 3), np.float32)}))


def test_mismatched_output_count_and_shape_raise():
    reference = gemm_chain()
    extra = gemm_chain()
    extra.graph.output.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 16]))
    with pytest.raises(ModelError, match="outputs"):
        validate(reference, extra, _samples())
    wider = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [("x", [8])], [("y", [6])],
                   {"W": np.ones((8, 6))})
    with pytest.raises(ModelError, match=r"y \| output shape \[N, 6\]"):
        validate(reference, wider, _samples())


def test_outputs_of_other_names_or_order_raise():
    """Outputs are compared in order: a candidate whose output has another name, or whose outputs
    come in another order, was compared with the reference's output at its position, exit 0."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    reference, renamed, swapped = _two_matmuls(a, b), _two_matmuls(a, b), _two_matmuls(a, b)
    renamed.graph.output[1].name = renamed.graph.node[1].output[0] = "w"
    swapped.graph.output.reverse()
    data = ArraySamples({"x": rng.standard_normal((8, 4)).astype(np.float32)})
    with pytest.raises(ModelError, match=r"^candidate \| outputs \['y', 'w'\] differ from the reference's \['y', 'z'\]"):
        validate(reference, renamed, data, measure_latency=False)
    with pytest.raises(ModelError, match=r"outputs \['z', 'y'\] are the reference's in another order \['y', 'z'\]"):
        validate(reference, swapped, data, measure_latency=False)


def test_empty_samples_raise():
    model = gemm_chain()
    with pytest.raises(DataError, match="no samples"):
        validate(model, model, ArraySamples({"x": np.zeros((0, 8), np.float32)}))


# ----------------------------------------------------------------------------- thresholds

def _report(acc_ref=None, acc_cand=None, agreement=1.0, drop_se=None, samples=100) -> ValidationReport:
    return ValidationReport(samples=samples, accuracy_reference=acc_ref, accuracy_candidate=acc_cand,
                            agreement=agreement, relative_error=0.1, sqnr_db=20.0, params_reference=10,
                            params_candidate=5, macs_reference=10, macs_candidate=5, bytes_reference=100,
                            bytes_candidate=50, latency_ms={}, accuracy_drop_se=drop_se)


def test_max_drop_with_labels():
    report = _report(acc_ref=0.90, acc_cand=0.89, agreement=0.5)
    check_thresholds(report, max_drop=1.0)  # exactly met: passes (no float slip)
    check_thresholds(report)  # no thresholds, nothing to miss
    expected = r"accuracy \| dropped 1.00 points \(90.00% -> 89.00% on 100 samples\)"
    with pytest.raises(ValidationFailed, match=expected) as info:
        check_thresholds(report, max_drop=0.99)
    assert info.value.exit_code == 3
    check_thresholds(_report(acc_ref=0.80, acc_cand=0.85), max_drop=0)  # gains pass


def test_missed_max_drop_says_whether_it_is_within_the_noise():
    # 250 samples, 3.6 points lost +- 1.8: the excess over 1 point is 1.4 standard errors
    noisy = _report(acc_ref=0.856, acc_cand=0.820, drop_se=1.82, samples=250)
    with pytest.raises(ValidationFailed, match=r"dropped 3.60 \+- 1.82 points \(85.60% -> 82.00% on 250 samples\)") \
            as info:
        check_thresholds(noisy, max_drop=1)
    assert "within 2 standard errors" in info.value.hint and "--eval-data" in info.value.hint
    # the same drop measured on many samples is beyond its noise: no such hint
    with pytest.raises(ValidationFailed) as info:
        check_thresholds(_report(acc_ref=0.856, acc_cand=0.820, drop_se=0.3, samples=10000), max_drop=1)
    assert "standard errors" not in info.value.hint


def test_max_drop_without_labels_applies_to_agreement():
    report = _report(agreement=0.97)
    check_thresholds(report, max_drop=3.0)
    with pytest.raises(ValidationFailed, match=r"agreement \| 97.00% is 3.00 points below"):
        check_thresholds(report, max_drop=2.9)


def test_min_agreement_as_fraction():
    report = _report(acc_ref=0.9, acc_cand=0.9, agreement=0.95)
    check_thresholds(report, min_agreement=0.95)
    with pytest.raises(ValidationFailed, match=r"agreement \| 95.00% is below min agreement 96.00%") as info:
        check_thresholds(report, min_agreement=0.96)
    assert info.value.exit_code == 3
    with pytest.raises(ValidationFailed, match="accuracy and agreement"):
        check_thresholds(_report(acc_ref=0.9, acc_cand=0.5, agreement=0.5), max_drop=1, min_agreement=0.99)
    with pytest.raises(ValidationFailed):
        check_thresholds(_report(agreement=float("nan")), min_agreement=0.5)
    with pytest.raises(RecipeError, match="fraction"):
        check_thresholds(report, min_agreement=99)  # a percentage by mistake
    with pytest.raises(RecipeError):
        check_thresholds(report, max_drop=-1)


def test_missed_thresholds_of_embeddings_name_the_cosine_and_knn():
    """For an embedding output agreement is the mean cosine and accuracy kNN's: the messages say so."""
    report = dataclasses.replace(_report(agreement=0.9911), embedding={"output": "sentence", "cosine": 0.9911})
    with pytest.raises(ValidationFailed, match=r"^cosine \| mean 0.9911 to the reference's embeddings is below min "
                                               r"agreement 0.999 \(for embeddings a minimum mean cosine\)"):
        check_thresholds(report, min_agreement=0.999)
    with pytest.raises(ValidationFailed, match=r"^cosine \| mean 0.9911 .*100 \(1 - cosine\) = 0.89 points"):
        check_thresholds(report, max_drop=0.5)
    labelled = dataclasses.replace(report, accuracy_reference=0.74, accuracy_candidate=0.72)
    with pytest.raises(ValidationFailed, match=r"^kNN accuracy \| dropped 2.00 points"):
        check_thresholds(labelled, max_drop=1)


def test_the_sweep_table_names_knn_and_cosine_for_embeddings():
    from onnxprune.api import pareto_lines

    row = {"budget": 0.7, "macs": 0.7, "params": 0.8, "accuracy": 0.73, "agreement": 0.99, "drop": 0.5,
           "drop_se": 0.3, "checked_drop": 0.4, "checked_se": 0.2, "sites": 3, "model": "m.onnx"}
    assert "| kNN % | held-out drop | cosine x 100 |" in pareto_lines([row], embedding=True)[0]
    assert "| top-1 % | held-out drop | agreement % |" in pareto_lines([row])[0]


def test_the_sweep_table_says_n_a_for_the_agreement_of_an_output_without_class_scores():
    """A dense map has no top-1 to agree on (agreement NaN, null in pareto.json): the table said 'nan'."""
    from onnxprune.api import pareto_lines

    row = {"budget": 0.5, "macs": 0.5, "params": 0.5, "accuracy": None, "agreement": float("nan"), "drop": None,
           "drop_se": None, "checked_drop": 5.4, "checked_se": 0.0, "sites": 1, "model": "m.onnx",
           "relative_error": 0.25}
    assert pareto_lines([row])[2].split(" | ")[5] == "n/a"


def test_the_sweep_table_shows_the_relative_squared_error_of_an_output_without_class_scores():
    """No top-1, so no accuracy drop: the held-out column was empty while the plot and pareto.json
    carry the relative error; both drops are 100 x the relative squared error, and say so."""
    from onnxprune.api import pareto_lines

    row = {"budget": 0.5, "macs": 0.5, "params": 0.5, "accuracy": None, "agreement": float("nan"), "drop": None,
           "drop_se": None, "checked_drop": 5.4, "checked_se": 0.1, "sites": 1, "model": "m.onnx",
           "relative_error": 0.25}
    header, _, line = pareto_lines([row, {"budget": 0.1, "status": "not reached"}])[:3]
    assert "| held-out 100 x rel. sq. error | agreement % | checked 100 x rel. sq. error |" in header
    assert line.split(" | ")[4:7] == ["6.25", "n/a", "5.40 +- 0.10"]
    labelled = {**row, "accuracy": 0.7, "agreement": 0.99, "drop": 0.5, "drop_se": 0.3}
    assert "| held-out drop | agreement % | checked drop |" in pareto_lines([labelled])[0]
    assert pareto_lines([labelled])[2].split(" | ")[4] == "0.50 +- 0.30"
    # without labels both drops are 100 - agreement %, as --max-drop reads them (the column was empty)
    header, _, line = pareto_lines([{**row, "agreement": 0.99}])
    assert "| held-out agreement drop | agreement % | checked agreement drop |" in header
    assert line.split(" | ")[4:7] == ["1.00", "99.00", "5.40 +- 0.10"]
    header, _, line = pareto_lines([{**row, "agreement": 0.99}], embedding=True)
    assert "| held-out 100 (1 - cosine) | cosine x 100 | checked 100 (1 - cosine) |" in header


# ----------------------------------------------------------------------------- real models

IMAGENET = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# model: (data under shared/data, preprocessing stated in shared/README.md)
REAL = {
    "lenet_caffe_mnist.onnx": ("digits/mnist_test.npz", {}),
    "mnist_cnn_fc3136.onnx": ("digits/mnist_test.npz", {"mean": 0.5, "std": 0.5}),
    "mnist_extdata/mnist.onnx": ("digits/mnist_test.npz", {"mean": 0.5, "std": 0.5}),
    "resnet20_cifar10.onnx": ("cifar10/cifar10_test_jpeg.npz", {"mean": IMAGENET[0], "std": IMAGENET[1]}),
    "mobilenetv2_imagenet_fp32.onnx": ("imagenet_samples",
                                       {"resize": 256, "center_crop": 224,
                                        "mean": IMAGENET[0], "std": IMAGENET[1]}),
}


def _real(shared, name):
    from onnxprune.data.preprocess import Preprocess
    from onnxprune.data.samples import open_samples

    model = load_model(shared / "models" / name)
    data, options = REAL[name]
    return model, open_samples(shared / "data" / data, model, preprocess=Preprocess(**options))


@pytest.mark.real
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_model_against_itself(shared, name):
    model, samples = _real(shared, name)
    samples = samples.subset(np.arange(5))
    report = validate(model, model, samples, batch_size=3, latency_runs=1, latency_batch=2)
    assert report.samples == 5
    assert report.agreement == 1.0
    assert report.accuracy_reference == report.accuracy_candidate is not None
    assert report.relative_error == 0.0 and report.sqnr_db == math.inf
    assert report.macs_reference == report.macs_candidate > 0
    assert set(report.latency_ms["reference"]) == {"batch1", "batch2"}
    check_thresholds(report, max_drop=0, min_agreement=1)


@pytest.mark.real
def test_real_accuracy_matches_direct_onnxruntime(shared):
    model, samples = _real(shared, "lenet_caffe_mnist.onnx")
    samples = samples.subset(np.arange(300))
    candidate = clone(model)  # LeNet with its last layer's weights rounded to 2 decimals
    weight = next(t for t in candidate.graph.initializer if t.name == candidate.graph.node[-1].input[1])
    weight.CopyFrom(numpy_helper.from_array(np.round(numpy_helper.to_array(weight), 2), weight.name))
    report = validate(model, candidate, samples, batch_size=128, measure_latency=False)
    feeds = samples.batch(np.arange(300))
    ref, cand = (run_model(m, feeds)[0].argmax(1) for m in (model, candidate))
    assert report.accuracy_reference == pytest.approx(np.mean(ref == samples.labels))
    assert report.accuracy_reference > 0.97
    assert report.accuracy_candidate == pytest.approx(np.mean(cand == samples.labels))
    assert report.agreement == pytest.approx(np.mean(ref == cand))
    assert 0 < report.relative_error < 0.05


def _two_matmuls(a: np.ndarray, b: np.ndarray, *, dense: bool = False) -> onnx.ModelProto:
    """x (N, 4) -> y = x A (N, 6), and z = x B (N, 6); ``dense``: y reshaped to N x 2 x 3 (no class axis)."""
    nodes = [helper.make_node("MatMul", ["x", "A"], ["ya"]), helper.make_node("MatMul", ["x", "B"], ["z"])]
    if dense:
        nodes.append(helper.make_node("Reshape", ["ya", "shape"], ["y"]))
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 3])
    else:
        nodes.append(helper.make_node("Identity", ["ya"], ["y"]))
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])
    inits = [numpy_helper.from_array(a.astype(np.float32), "A"), numpy_helper.from_array(b.astype(np.float32), "B"),
             numpy_helper.from_array(np.array([-1, 2, 3], dtype=np.int64), "shape")]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [y, helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_an_output_without_class_scores_is_judged_by_relative_squared_error():
    """A dense N x 2 x 3 output: agreement of an argmax over its last axis means nothing; a
    --max-drop without labels reads 100 x the relative squared error, as the planner does."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    noisy = a + 0.2 * rng.standard_normal((4, 6))
    reference, candidate = _two_matmuls(a, b, dense=True), _two_matmuls(noisy, b, dense=True)
    data = ArraySamples({"x": rng.standard_normal((64, 4)).astype(np.float32)})
    report = validate(reference, candidate, data, measure_latency=False)
    assert not report.classifier
    points = 100 * report.relative_error ** 2
    check_thresholds(report, max_drop=points + 0.01)
    with pytest.raises(ValidationFailed, match="^relative error \\| the judged output y has no class scores to agree "
                       "on: its relative squared error"):           # it said "the first output", --judge-output or not
        check_thresholds(report, max_drop=points - 0.01)
    assert validate(reference, reference, data, measure_latency=False).classifier is False


def test_another_output_that_changed_more_than_the_judged_one_is_warned_about():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    data = ArraySamples({"x": rng.standard_normal((64, 4)).astype(np.float32)})
    report = validate(_two_matmuls(a, b), _two_matmuls(a, 0.5 * b), data, measure_latency=False)
    assert report.classifier and report.agreement == 1.0
    assert any("only output y is judged" in w and "output z changed more" in w for w in report.warnings), report.warnings
    assert not validate(_two_matmuls(a, b), _two_matmuls(a, b), data, measure_latency=False).warnings


def test_a_dense_map_has_no_agreement_and_min_agreement_fails_on_it():
    """N x C x H x W: the argmax over the last axis (its width) is no top-1; agreement is n/a and
    --min-agreement cannot be met, while --max-drop reads the relative squared error."""
    from onnxprune.data.samples import open_samples

    def scaled(factor):
        return helper.make_model(helper.make_graph(
            [helper.make_node("Mul", ["x", "k"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 3, 4])],
            [numpy_helper.from_array(np.array(factor, np.float32), "k")]),
            opset_imports=[helper.make_opsetid("", 13)], ir_version=8)

    data = open_samples(np.random.default_rng(0).standard_normal((16, 2, 3, 4)).astype(np.float32), scaled(1.0))
    report = validate(scaled(1.0), scaled(1.01), data, measure_latency=False, progress=False)
    assert not report.classifier and report.agreement != report.agreement
    assert any("agreement    n/a" in line for line in report.summary_lines())
    check_thresholds(report, max_drop=1)                    # 100 x 0.01^2 = 0.01 points
    with pytest.raises(ValidationFailed, match="no \\[N, classes\\] scores"):
        check_thresholds(report, min_agreement=0.5)
