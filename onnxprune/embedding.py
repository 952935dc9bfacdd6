"""Embedding outputs: which output is measured, whether it is an embedding, and its metrics.

A sentence encoder (e.g. paraphrase-MiniLM) has no classes: its output is a vector per
sample, and argmax "accuracy" or softmax KL of it mean nothing. For such outputs
validation and the planner use:

- **cosine**: per sample, cos(reference embedding, candidate embedding); the mean is the
  fidelity ("agreement" of an embedding model), 1 - cosine the planner's damage;
- **kNN accuracy** with labels: the samples in their order, the first half (``N // 2``) is
  the index, the second half the queries; k = 10 nearest index rows by cosine similarity,
  one vote each, ties to the smallest label (scikit-learn's
  ``KNeighborsClassifier(n_neighbors=10, metric="cosine", algorithm="brute")``);
- **linear probe** with labels: scikit-learn ``LogisticRegression(C=1.0, max_iter=5000)``
  on the L2-normalised embeddings of the first half, accuracy on the second half (None
  when scikit-learn, the ``text`` extra, is not installed).

Which output: the first floating-point output, except in a token model (one with a mask
input, ``collect.token_mask_input``), where the first float output of rank 2 (one vector
per sample, e.g. the masked mean of the token embeddings) comes first. Whether it is an
embedding (``output_kind``): ``metric`` "embedding" or "classes" says so; "auto" takes a
token model's rank-2 output at least ``MIN_EMBEDDING_WIDTH`` wide for an embedding (a
sentence embedding has hundreds of dimensions, a transformer classifier a few classes),
everything else for class scores, as before.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from onnxprune.errors import RecipeError

log = logging.getLogger(__name__)

METRICS = ("auto", "classes", "embedding")
KNN_K = 10
#: an auto-detected embedding is at least this wide (narrower outputs are class scores)
MIN_EMBEDDING_WIDTH = 64
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise RecipeError("--metric", f"{metric!r} is not one of {', '.join(METRICS)}")
    return metric


def _rank(output: onnx.ValueInfoProto) -> int | None:
    tensor = output.type.tensor_type
    return len(tensor.shape.dim) if tensor.HasField("shape") else None


def is_token_model(model: onnx.ModelProto) -> bool:
    from onnxprune.calibration.collect import token_mask_input

    return token_mask_input(model) is not None


def measured_output(model: onnx.ModelProto, judge: str | None = None) -> str:
    """The output whose damage is measured: ``judge`` (``--judge-output``) when given, else as the
    module docstring says. A ``judge`` that is not an output of the model, or not a float one (token
    ids or a mask echoed by the export), is a RecipeError."""
    if judge is not None:
        names = [o.name for o in model.graph.output]
        if judge not in names:
            raise RecipeError("--judge-output", f"{judge!r} is not an output of the model",
                              f"its outputs are {', '.join(names)}")
        elem = next(o for o in model.graph.output if o.name == judge).type.tensor_type.elem_type
        if elem and elem not in _FLOATS:        # ids, a mask: no compression changes them, every check passes
            floats = [o.name for o in model.graph.output if o.type.tensor_type.elem_type in _FLOATS]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
            raise RecipeError("--judge-output", f"{judge!r} is an output of dtype {dtype}, not class scores or an "
                              "embedding: it cannot measure what compression changes",
                              f"its float outputs are {', '.join(floats)}" if floats else None)
        return judge
    floats = [o for o in model.graph.output if o.type.tensor_type.elem_type in _FLOATS]
    if floats and is_token_model(model):
        vectors = [o for o in floats if _rank(o) == 2]
        if vectors:
            return vectors[0].name
    if floats:
        return floats[0].name
    return model.graph.output[0].name


def output_kind(model: onnx.ModelProto, output: np.ndarray | None = None, metric: str = "auto",
                judge: str | None = None) -> str:
    """"embedding" or "classes" for the measured output of ``model`` (``judge``, or the default:
    ``measured_output``; ``output``: a batch of it, for its width when the graph does not say)."""
    check_metric(metric)
    name = measured_output(model, judge)
    if metric != "auto":
        return metric
    if not is_token_model(model):
        return "classes"
    value = next(o for o in model.graph.output if o.name == name)
    if _rank(value) != 2:
        return "classes"
    width = None
    dims = value.type.tensor_type.shape.dim
    if dims[1].HasField("dim_value"):
        width = int(dims[1].dim_value)
    if output is not None and output.ndim == 2:
        width = int(output.shape[1])
    return "embedding" if width is None or width >= MIN_EMBEDDING_WIDTH else "classes"


def cosine_rows(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """(N,) cosine similarity of each row of ``candidate`` with the same row of ``reference``
    (float64; two zero rows count as identical, one zero row as 0)."""
    r = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    c = np.asarray(candidate, dtype=np.float64).reshape(len(candidate), -1)
    nr, nc = np.linalg.norm(r, axis=1), np.linalg.norm(c, axis=1)
    dot = np.einsum("ij,ij->i", r, c)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where((nr > 0) & (nc > 0), dot / (nr * nc), np.where((nr == 0) & (nc == 0), 1.0, 0.0))
    return np.clip(cos, -1.0, 1.0)


def normalised(embeddings: np.ndarray) -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def knn_correct(embeddings: np.ndarray, labels: np.ndarray, *, k: int = KNN_K) -> np.ndarray:
    """(queries,) whether each query of the second half is classified right by its ``k``
    nearest index rows of the first half (cosine; one vote each; ties to the smallest label)."""
    x = normalised(embeddings)
    labels = np.asarray(labels).astype(np.int64)
    half = len(x) // 2
    index, queries = x[:half], x[half:]
    if half == 0 or len(queries) == 0:
        raise ValueError(f"kNN needs at least 2 samples, got {len(x)}")
    k = min(k, half)
    classes = np.unique(labels[:half])
    correct = np.zeros(len(queries), dtype=bool)
    for start in range(0, len(queries), 1024):
        predicted = _vote(queries[start:start + 1024] @ index.T, labels[:half], classes, k)
        correct[start:start + 1024] = predicted == labels[half + start:half + start + len(predicted)]
    return correct


def knn_correct_loo(embeddings: np.ndarray, labels: np.ndarray, *, k: int = KNN_K) -> np.ndarray:
    """(n,) whether each row is classified right by its ``k`` nearest other rows (leave one out:
    every row a query against all the others; cosine, one vote each, ties to the smallest label).
    Twice the queries and index of ``knn_correct`` on the same rows: the planner's check of a
    kNN goal has a smaller standard error (AG News, 500 sentences: 500 queries against 250)."""
    x = normalised(embeddings)
    labels = np.asarray(labels).astype(np.int64)
    if len(x) < 2:
        raise ValueError(f"kNN needs at least 2 samples, got {len(x)}")
    k = min(k, len(x) - 1)
    classes = np.unique(labels)
    correct = np.zeros(len(x), dtype=bool)
    for start in range(0, len(x), 1024):
        sims = x[start:start + 1024] @ x.T
        rows = np.arange(len(sims))
        sims[rows, start + rows] = -np.inf                  # a row is not its own neighbour
        correct[start:start + len(sims)] = _vote(sims, labels, classes, k) == labels[start:start + len(sims)]
    return correct


def _vote(sims: np.ndarray, index_labels: np.ndarray, classes: np.ndarray, k: int) -> np.ndarray:
    """The label most of each query's ``k`` most similar index rows have (``sims``: queries x
    index); ties among rows go to the lower index row (a stable sort of -sims), among labels to
    the smallest (argmax takes the first)."""
    nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    votes = (index_labels[nearest][:, :, None] == classes[None, None, :]).sum(axis=1)
    return classes[np.argmax(votes, axis=1)]


def knn_accuracy(embeddings: np.ndarray, labels: np.ndarray, *, k: int = KNN_K) -> float:
    return float(np.mean(knn_correct(embeddings, labels, k=k)))


def probe_accuracy(embeddings: np.ndarray, labels: np.ndarray) -> float | None:
    """Linear-probe accuracy (first half trains, second half tests), None without scikit-learn
    or with a single class in the first half."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        log.info("linear probe skipped: scikit-learn is not installed (pip install onnxprune[text])")
        return None
    x = normalised(embeddings)
    labels = np.asarray(labels).astype(np.int64)
    half = len(x) // 2
    if half == 0 or len(np.unique(labels[:half])) < 2:
        return None
    model = LogisticRegression(C=1.0, max_iter=5000)
    model.fit(x[:half], labels[:half])
    return float(np.mean(model.predict(x[half:]) == labels[half:]))


def embedding_metrics(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None,
                      *, output: str, probe: bool = True) -> dict:
    """Cosine (mean, min, 5th percentile) and, with labels, kNN and probe accuracy of both."""
    cos = cosine_rows(reference, candidate)
    out = {"output": output, "samples": len(cos), "cosine": float(cos.mean()), "cosine_min": float(cos.min()),
           "cosine_p05": float(np.percentile(cos, 5))}
    if labels is not None and len(cos) >= 2:
        # k as knn_correct uses it: at most the index's size
        out.update({"k": min(KNN_K, len(cos) // 2), "index": int(len(cos) // 2),
                    "queries": int(len(cos) - len(cos) // 2),
                    "knn_reference": knn_accuracy(reference, labels), "knn_candidate": knn_accuracy(candidate, labels)})
        if probe:
            out["probe_reference"] = probe_accuracy(reference, labels)
            out["probe_candidate"] = probe_accuracy(candidate, labels)
    return out
