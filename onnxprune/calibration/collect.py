"""Gather statistics with onnxruntime: one run over each sample set, every batch folded at once.

The model is cloned and every requested tensor becomes an extra graph output (once, however
many requests share it). onnxruntime then runs over each sample set in batches; each
batch's activations are turned into rows and folded into float64 ``Moments`` request by
request and dropped, so memory stays at one batch of exposed activations plus the
statistics, never all activations.

Sample i goes to fold ``(position of i in iteration order) % folds``; passes use the folds
to choose ridges on held-out calibration data.
"""

from __future__ import annotations

import difflib
import logging
import sys
import time
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
from tqdm import tqdm

from onnxprune import __version__
from onnxprune.calibration.stats import Moments, StatRequest, Statistics, release_buffers
from onnxprune.errors import CalibrationError, DataError
from onnxprune.model import clone, input_specs, model_hash
from onnxprune.runtime import batch_size_for, make_session, run_batches

log = logging.getLogger(__name__)

ORT_ERRORS = (ort_state.Fail, ort_state.InvalidArgument, ort_state.InvalidGraph,
              ort_state.NotImplemented, ort_state.RuntimeException)


def collect(
    model: onnx.ModelProto,
    samples: Mapping[str, object],
    requests: Sequence[StatRequest],
    *,
    batch_size: int = 32,
    folds: int = 1,
    device: str = "cpu",
    progress: bool = True,
    seed: int = 0,
    offset: int = 0,
    threads: int | None = None,
) -> Statistics:
    """Statistics of ``requests`` on each sample set of ``samples`` ({"target": SampleSet, ...}).

    ``threads``: onnxruntime intra-op threads (None: its default).
    ``offset``: the position of the first sample in a larger set this one is a shard of
    (see ``calibration/shard.py``): folds and sampled patch positions follow the position in
    the whole set, so shards merge to the statistics of the whole set.

    Raises CalibrationError for an unknown tensor, a non-finite activation, an empty
    sample set or a tensor whose shape does not fit its request.
    """
    if int(folds) < 1:
        raise CalibrationError("folds", f"must be >= 1, got {folds}")
    if int(offset) < 0:
        raise CalibrationError("offset", f"must be >= 0, got {offset}")
    if int(batch_size) < 1:
        raise CalibrationError("batch_size", f"must be >= 1, got {batch_size}")
    folds = int(folds)
    if not samples:
        raise CalibrationError("samples", "no sample set given", "pass target data")
    for name, sample_set in samples.items():
        if len(sample_set) == 0:
            raise CalibrationError(name, "sample set is empty", "point it at a file or folder with samples")
    requests = list(dict.fromkeys(requests))
    tensors = list(dict.fromkeys(r.tensor for r in requests))
    check_tensors(model, tensors)

    header = {
        "model_hash": model_hash(model),
        "sets": {name: s.describe() for name, s in samples.items()},
        "folds": folds,
        "seed": int(seed),
        "requests": [r.to_dict() for r in requests],
        "samples": {},
        "onnxprune_version": __version__,
    }
    moments: dict[tuple[str, str, int], Moments] = {}
    if not requests:
        return Statistics(header, moments)

    exposed, outputs = expose(model, tensors)
    session = make_session(exposed, device=device, threads=threads)
    size = batch_size_for(model, int(batch_size))
    fixed = {spec.fixed_batch for spec in input_specs(model)} - {None}
    fixed_batch = fixed.pop() if len(fixed) == 1 else None
    by_tensor: dict[str, list[StatRequest]] = {}
    for r in requests:
        by_tensor.setdefault(r.tensor, []).append(r)

    for set_name, sample_set in samples.items():
        started = time.perf_counter()
        log.info("calibration: %d samples of the %s set through %d exposed tensors (%d requests), batches of %d, "
                 "%d folds", len(sample_set), set_name, len(tensors), len(requests), size, folds)
        per_fold = [0] * folds
        position = int(offset)
        bar = _progress(len(sample_set), f"calibrate {set_name}", progress)
        batches = run_batches(session, sample_set, outputs, batch_size=size, fixed_batch=fixed_batch)
        try:
            while True:
                try:
                    indices, result = next(batches)
                except StopIteration:
                    break
                except ORT_ERRORS as exc:
                    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                    raise DataError(set_name, f"onnxruntime rejected a batch: {first}",
                                    "check that the samples match the model's inputs") from None
                n = len(indices)
                for j, tensor in enumerate(tensors):
                    x = result[j]
                    result[j] = None           # the only reference left is x: freed after use
                    updated = [m for request in by_tensor[tensor]
                               for m in _fold_in(moments, request, set_name, x, position, folds, seed)]
                    # every value folded in reaches a sum: a NaN or Inf leaves it non-finite
                    if not all(np.isfinite(m.sum).all() for m in updated):
                        _raise_non_finite(x, tensor, set_name, indices)
                    del x
                del result
                for f in range(folds):
                    per_fold[f] += len(range((f - position) % folds, n, folds))
                position += n
                bar.update(n)
        finally:
            bar.close()
            batches.close()
            release_buffers()
        header["samples"][set_name] = per_fold
        log.info("calibration: %s set done in %.2f s (samples per fold %s)", set_name, time.perf_counter() - started,
                 per_fold)
    return Statistics(header, moments)


def _fold_in(moments: dict, request: StatRequest, set_name: str, x: np.ndarray, position: int,
             folds: int, seed: int = 0) -> list[Moments]:
    """Fold batch ``x`` (first sample at ``position``) into the Moments of ``request``, fold by
    fold; returns the Moments it updated. Sampled patch positions depend on ``seed``, the
    request, the set and ``position`` only (not on which other requests are gathered)."""
    problem = request.check(x.shape)
    if problem:
        raise CalibrationError(request.tensor, problem, f"request {request.key} does not fit this tensor")
    dim = request.dim(x.shape)
    updated = []
    for fold in range(folds):
        # samples at batch offsets j with (position + j) % folds == fold: a strided view
        part = x[(fold - position) % folds::folds] if folds > 1 else x
        if part.shape[0] == 0:
            continue
        key = (set_name, request.key, fold)
        m = moments.get(key)
        if m is None:
            m = moments[key] = Moments(dim, keep_rows=request.keep_rows)
        elif m.dim != dim:
            raise CalibrationError(request.tensor, f"feature size changed from {m.dim} to {dim} between batches",
                                   "statistics need a fixed feature dimension")
        rng = (np.random.default_rng([seed, zlib.crc32(f"{set_name}/{request.key}".encode()), position, fold])
               if request.positions else None)
        with np.errstate(invalid="ignore", over="ignore"):   # non-finite values are reported by the caller
            for rows in request.rows(part, rng):
                m.update(rows)
        updated.append(m)
    return updated


def _raise_non_finite(x: np.ndarray, tensor: str, set_name: str, indices) -> None:
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)
    which = [int(indices[j]) for j in np.flatnonzero(bad)[:5]]
    raise CalibrationError(tensor, f"non-finite activation (NaN or Inf) on {set_name} sample(s) {which}",
                           "check the input data and preprocessing")


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    disable = not enabled or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    return tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, disable=disable, leave=False)


# --------------------------------------------------------------------------------------
# The exposed model


def tensor_names(model: onnx.ModelProto) -> list[str]:
    """Tensors statistics can be gathered on: graph inputs (not weights) and node outputs."""
    inits = {t.name for t in model.graph.initializer}
    names = [v.name for v in model.graph.input if v.name not in inits]
    names += [out for node in model.graph.node for out in node.output if out]
    return list(dict.fromkeys(names))


def check_tensors(model: onnx.ModelProto, tensors: Sequence[str]) -> None:
    valid = tensor_names(model)
    known = set(valid)
    inits = {t.name for t in model.graph.initializer}
    for name in tensors:
        if name in known:
            continue
        if name in inits:
            raise CalibrationError(name, "is a weight (initializer), not an activation",
                                   "request statistics at a node input or output")
        close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
        few = close or valid[:5]
        raise CalibrationError(name, "no such tensor in the model",
                               f"valid tensors include {', '.join(repr(v) for v in few)}"
                               f"{' ...' if len(valid) > len(few) else ''}")


def expose(model: onnx.ModelProto, tensors: Sequence[str]) -> tuple[onnx.ModelProto, list[str]]:
    """A clone of ``model`` with each of ``tensors`` available as a graph output.

    Returns (model, output names in the order of ``tensors``). A tensor that is already a
    graph output is fetched under its own name; a graph input is passed through an
    Identity node (``{name}/calibrate/copy``); any other tensor is added as an output typed
    from shape inference when it knows the tensor, else float with unknown shape. The
    ir_version and opsets are kept.
    """
    exposed = clone(model)
    graph = exposed.graph
    existing = {o.name for o in graph.output}
    inputs = {v.name for v in graph.input}
    todo = [t for t in tensors if t not in existing and t not in inputs]
    types = _value_types(model, todo) if todo else {}
    taken = set(tensor_names(model)) | {t.name for t in graph.initializer}
    outputs = []
    for name in tensors:
        if name in existing:
            outputs.append(name)
            continue
        if name in inputs:
            copy = _unique(f"{name}/calibrate/copy", taken)
            graph.node.append(onnx.helper.make_node("Identity", [name], [copy], name=copy))
            source = next(v for v in graph.input if v.name == name)
            value = onnx.ValueInfoProto()
            value.CopyFrom(source)
            value.name = copy
            graph.output.append(value)
            existing.add(copy)
            outputs.append(copy)
            continue
        value = types.get(name)
        if value is None:
            value = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        graph.output.append(value)
        existing.add(name)
        outputs.append(name)
    return exposed, outputs


def _value_types(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, onnx.ValueInfoProto]:
    """ValueInfo of ``names`` from shape inference (without weights' data when possible)."""
    wanted = set(names)
    found = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output) if v.name in wanted}
    if wanted <= set(found):
        return _known_types(found)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shape inference is best effort (custom ops, >2 GB)
        return _known_types(found)
    for v in inferred.graph.value_info:
        if v.name in wanted:
            found.setdefault(v.name, v)
    return _known_types(found)


def _known_types(values: dict[str, onnx.ValueInfoProto]) -> dict[str, onnx.ValueInfoProto]:
    out = {}
    for name, v in values.items():
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(v)
            out[name] = copy
    return out


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate = f"{name}/{i}"
        i += 1
    taken.add(candidate)
    return candidate
