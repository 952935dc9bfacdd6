"""Embedding outputs: cosine, kNN (k=10, cosine, ties to the smallest label), linear probe;
validate and the planner's damage on them."""

from __future__ import annotations

import numpy as np
import pytest

import onnxprune
from onnxprune import embedding
from onnxprune.errors import RecipeError
from onnxprune.plan.planner import damage, measure
from tests.graphs import gemm_chain, token_feeds, token_ffn


def _clusters(n: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    centres = rng.standard_normal((3, 16)) * 2
    return centres[labels] + rng.standard_normal((n, 16)), labels


def test_cosine_rows():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [0.0, -1.0], [0.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(embedding.cosine_rows(a, b), [1.0, -1.0, 1.0, 0.0])


def test_knn_votes_and_ties_go_to_the_smallest_label():
    # index: two rows of label 1 closest, two of label 0 as close: a 2-2 tie at k=4 -> label 0
    index = np.array([[1.0, 0.1], [1.0, -0.1], [1.0, 0.1], [1.0, -0.1], [-1.0, 0.0]])
    labels_index = np.array([1, 1, 0, 0, 2])
    queries = np.array([[1.0, 0.0]] * 5)
    x = np.concatenate([index, queries])
    labels = np.concatenate([labels_index, [0, 0, 0, 0, 1]])
    correct = embedding.knn_correct(x, labels, k=4)
    np.testing.assert_array_equal(correct, [True, True, True, True, False])


def test_knn_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.neighbors")
    x, y = _clusters()
    half = len(x) // 2
    expected = sklearn.KNeighborsClassifier(n_neighbors=10, metric="cosine", algorithm="brute").fit(
        x[:half], y[:half]).score(x[half:], y[half:])
    assert embedding.knn_accuracy(x, y) == pytest.approx(expected)


def test_leave_one_out_knn_matches_scikit_learn_on_each_row():
    sklearn = pytest.importorskip("sklearn.neighbors")
    x, y = _clusters(seed=2)
    x = x + 2.0 * np.random.default_rng(5).standard_normal(x.shape)    # overlapping clusters
    correct = embedding.knn_correct_loo(x, y, k=5)
    expected = [sklearn.KNeighborsClassifier(n_neighbors=5, metric="cosine", algorithm="brute").fit(
        np.delete(x, i, axis=0), np.delete(y, i)).predict(x[i:i + 1])[0] == y[i] for i in range(len(x))]
    np.testing.assert_array_equal(correct, expected)
    assert 0 < correct.mean() < 1                                # neither trivial nor hopeless
    twins = np.repeat(x[:3], 2, axis=0)                          # each row's twin is its nearest other row
    np.testing.assert_array_equal(embedding.knn_correct_loo(twins, np.array([0, 0, 1, 1, 2, 2]), k=1), True)


def test_probe_is_logistic_regression_on_normalised_rows():
    linear = pytest.importorskip("sklearn.linear_model")
    x, y = _clusters(seed=1)
    half = len(x) // 2
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = linear.LogisticRegression(C=1.0, max_iter=5000).fit(xn[:half], y[:half]).score(xn[half:], y[half:])
    assert embedding.probe_accuracy(x, y) == pytest.approx(expected)


def test_output_kind_and_measured_output():
    model = token_ffn()
    assert embedding.measured_output(model) == "sentence"       # rank 2 first in a token model
    assert embedding.output_kind(model) == "classes"            # 8 wide: class scores for auto
    assert embedding.output_kind(model, np.zeros((2, 384))) == "embedding"
    assert embedding.output_kind(model, metric="embedding") == "embedding"
    assert embedding.output_kind(gemm_chain(), np.zeros((2, 384))) == "classes"   # no token mask input
    with pytest.raises(RecipeError):
        embedding.output_kind(model, metric="cosine")


def test_validate_reports_cosine_knn_and_probe():
    model = token_ffn()
    data = token_feeds(batch=40, tokens=5, seed=2)
    data["y"] = (data["x"][:, 0, 0] > 0).astype(np.int64)
    report = onnxprune.validate(model, model, data, measure_latency=False, metric="embedding")
    e = report.embedding
    assert e["output"] == "sentence" and e["cosine"] == pytest.approx(1.0)
    assert e["knn_reference"] == e["knn_candidate"] == report.accuracy_reference
    assert report.agreement == pytest.approx(1.0)
    assert report.to_dict()["embedding"]["queries"] == 20
    assert any(line.startswith("cosine") for line in report.summary_lines())
    classes = onnxprune.validate(model, model, {k: v for k, v in data.items() if k != "y"}, measure_latency=False)
    assert classes.embedding is None


def test_planner_damage_of_embeddings_is_one_minus_cosine():
    rng = np.random.default_rng(0)
    r = rng.standard_normal((50, 32))
    c = r + 0.1 * rng.standard_normal((50, 32))
    d = damage(r, c, "embedding")
    assert d["damage"] == pytest.approx(1 - embedding.cosine_rows(r, c).mean())
    assert damage(r, r, "embedding")["damage"] == pytest.approx(0.0, abs=1e-12)
    check = measure(r, c, None, "embedding")
    assert check.drop == pytest.approx(100 * d["damage"]) and check.se > 0
    labels = (r[:, 0] > 0).astype(np.int64)
    labelled = measure(r, r, labels, "embedding")
    assert labelled.drop == 0 and labelled.accuracy_reference == embedding.knn_correct_loo(r, labels).mean()


def test_the_knn_k_reported_is_the_one_used_with_a_small_index():
    """With 12 samples the index holds 6: k is capped to 6, and the report and its line say 6."""
    model = token_ffn()
    data = token_feeds(batch=12, tokens=5, seed=2)
    data["y"] = (data["x"][:, 0, 0] > 0).astype(np.int64)
    report = onnxprune.validate(model, model, data, measure_latency=False, metric="embedding")
    assert report.embedding["k"] == 6 and report.embedding["index"] == 6
    assert any("k=6, index 6" in line for line in report.summary_lines())


def test_a_near_chance_original_on_token_data_names_the_flags_of_token_data():
    from onnxprune.validation import IMAGE_FLAGS, TOKEN_FLAGS, data_flags, reference_warnings

    assert data_flags(token_ffn(vocab=16)) == TOKEN_FLAGS and data_flags(gemm_chain()) == IMAGE_FLAGS
    labels = np.arange(40) % 4
    warning, = reference_warnings(0.25, labels, None, flags=TOKEN_FLAGS)
    assert "--tokenizer, --max-length" in warning and "--mean" not in warning
    model = token_ffn(vocab=16)
    rng = np.random.default_rng(3)
    lengths = rng.integers(2, 7, size=40)
    data = {"input_ids": rng.integers(0, 16, size=(40, 6)).astype(np.int64),
            "attention_mask": (np.arange(6)[None] < lengths[:, None]).astype(np.int64),
            "y": rng.integers(0, 4, size=40)}
    report = onnxprune.validate(model, model, data, measure_latency=False, metric="embedding")
    assert report.accuracy_reference < 0.5              # random labels of 4 classes: near chance
    assert "--tokenizer" in report.warnings[0] and all("--mean" not in w for w in report.warnings)


def test_labels_of_one_class_are_left_out_of_an_embedding_with_a_warning():
    """Every kNN vote is right with one class: validate printed kNN 100% -> 100% (and a --max-drop
    passed whatever the embeddings), compress's planner saw no kNN drop at any size."""
    from onnxprune.pipeline import Recipe

    model = token_ffn()
    data = token_feeds(batch=40, tokens=5, seed=2)
    data["y"] = np.zeros(40, dtype=np.int64)
    report = onnxprune.validate(model, model, data, measure_latency=False, metric="embedding")
    assert report.accuracy_reference is None and "knn_reference" not in report.embedding
    assert "hold one class only" in report.warnings[0]
    recipe = Recipe(passes=(("select-nodes", {"criterion": "spectral", "counts": {"ffn1": 8}}),
                            ("reconstruct-next-layer", {})), calib_size=None, metric="embedding")
    result = onnxprune.compress(model, data, recipe=recipe, measure_latency=False, progress=False)
    assert any("hold one class only" in w for w in result.report["warnings"]), result.report["warnings"]
    assert "knn_reference" not in result.report["validation"]["embedding"]
