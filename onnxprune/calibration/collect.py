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
import math
import os
import sys
import time
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import onnx
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
from tqdm import tqdm

from onnxprune import __version__
from onnxprune.calibration import ingraph
from onnxprune.calibration.moments import Moments, release_buffers
from onnxprune.calibration.requests import StatRequest
from onnxprune.calibration.stats import Statistics
from onnxprune.data.samples import Parts
from onnxprune.errors import CalibrationError, DataError
from onnxprune.linalg import blas_threads
from onnxprune.model import clone, input_specs, model_hash
from onnxprune.runtime import batch_size_for, error_line, feeds_text, make_session

log = logging.getLogger(__name__)

ENGINES = ("auto", "graph", "numpy")
#: the model input whose zeros mark padded token positions, found by name unless told otherwise
MASK_INPUT = "attention_mask"
#: inputs a tokenizer gives that are never a token mask (``--mask-input`` refuses them), and what they hold
NOT_MASKS = {"input_ids": "token ids", "token_type_ids": "segment ids", "position_ids": "position ids"}

#: fold the exposed tensors of a batch in parallel threads (one per tensor at a time, up to
#: onnxruntime's thread count) from this many bytes of activations on. Measured by hand on 2
#: cores: MobileNetV2's calibration (batches of hundreds of MiB) took 3.7 s instead of 4.9 s for
#: 250 images; LeNet's (under 1 MiB) 36 ms instead of 24, the hand-offs costing more than the products
PARALLEL_BYTES = 16 * 2**20

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
    engine: str = "auto",
    mask: str | None = "auto",
    keep: Sequence[str] = (),
    keep_bytes: int | None = None,
) -> Statistics:
    """Statistics of ``requests`` on each sample set of ``samples`` ({"target": SampleSet, ...}).

    ``engine``: how the statistics are computed (all three agree to float32 rounding, ~1e-6):
      - "auto" (default): "pooled" requests are reduced inside onnxruntime (``ingraph.py``:
        only N x C values leave the session instead of the whole activation); "features" and
        "patches" are exposed and their Grams taken in numpy as float32 BLAS products (ssyrk)
        of shifted rows, each corrected exactly and accumulated in float64 -- the fastest on
        CPU in bench/results/calibration_speed.md (ssyrk does half the multiply-adds of
        onnxruntime's Gemm and ran 2.5-3.7x faster on MobileNetV2's shapes; sampled patch
        positions make numpy's im2col cheap); on ``device="cuda"`` "auto" is "graph";
      - "graph": every supported request reduced inside onnxruntime, only C + C^2 values per
        request leave the session (for a GPU, or where copying activations out is dear);
      - "numpy": every tensor exposed and folded in float64 (exact, slowest).
    Requests the graph cannot take (``keep_rows``, non-float or unknown shapes) use the numpy
    fold in every engine.
    ``mask``: the model input whose zeros mark padded token positions ([N, T] beside
    [N, T, features] activations): those rows never enter a "features" statistic with the
    features on the last axis, nor a "pooled" one (see ``token_mask_input``). "auto": the
    input named ``attention_mask`` when the model has one; None: no masking.
    ``threads``: onnxruntime intra-op threads (None: its default).
    ``keep``: tensors whose values on every sample are also returned, in sample order, as
    ``Statistics.activations`` (one sample set only; the statistics provider's activation store);
    once they would take more than ``keep_bytes``, none are kept.
    ``offset``: the position of the first sample in a larger set this one is a shard of
    (see ``calibration/shard.py``): folds and sampled patch positions follow the position in
    the whole set, so shards merge to the statistics of the whole set.

    Raises CalibrationError for an unknown tensor, a non-finite activation, an empty
    sample set or a tensor whose shape does not fit its request. numpy's BLAS runs with
    ``linalg.blas_threads()`` (one thread by default: onnxruntime has its own pool).
    """
    with blas_threads():
        return _collect(model, samples, requests, batch_size=batch_size, folds=folds, device=device,
                        progress=progress, seed=seed, offset=offset, threads=threads, engine=engine,
                        mask=token_mask_input(model, mask), keep=keep, keep_bytes=keep_bytes)


def token_mask_input(model: onnx.ModelProto, mask: str | None = "auto") -> str | None:
    """The graph input that masks padded tokens: ``mask`` itself (checked: an input of the model,
    [batch, tokens], not one of ``NOT_MASKS``), or with "auto" the input named ``MASK_INPUT``
    when there is one, else None (nothing is masked). The mask's values are checked with the
    samples (``data.tokens.check_token_samples``: 0 and 1 only)."""
    specs = {spec.name: spec for spec in input_specs(model)}
    names = list(specs)
    if mask == "auto":
        return MASK_INPUT if MASK_INPUT in names else None
    if mask is None or mask == "none":
        return None
    if mask not in names:
        raise CalibrationError(mask, "is not an input of the model, so it cannot mask padded tokens",
                               f"inputs: {', '.join(names)}")
    hint = (f"--mask-input names the input that is 1 on real tokens and 0 on padding"
            f"{' (here ' + MASK_INPUT + ', the default)' if MASK_INPUT in names else ''}, or none to mask nothing")
    if mask in NOT_MASKS:
        raise CalibrationError(mask, f"holds {NOT_MASKS[mask]}, not a token mask, so it cannot mask padded tokens",
                               hint)
    if specs[mask].rank and specs[mask].rank != 2:
        raise CalibrationError(mask, f"is a rank-{specs[mask].rank} input, not a [batch, tokens] token mask", hint)
    return mask


def token_rows(request: StatRequest, x: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    """Which rows of ``x`` a masked request keeps: the (N, T) boolean of real tokens when
    ``mask`` (N, T) lines up with a token axis of ``x`` ([N, T, features], features last),
    else None (every row counts)."""
    if mask is None or request.kind == "patches" or x.ndim < 3 or x.shape[:2] != mask.shape:
        return None
    if request.kind == "features" and request.axis % x.ndim != x.ndim - 1:
        return None
    if request.kind == "pooled" and request.axis % x.ndim != x.ndim - 1:
        return None
    return np.asarray(mask) != 0


def _masked_rows(request: StatRequest, x: np.ndarray, real: np.ndarray):
    """Rows of ``x`` ([N, T, ..., C]) at real tokens only: "features" -> (k, C) for the real
    positions; "pooled" -> (N, C) max or mean over each sample's real tokens."""
    if request.kind == "features":
        yield x[real].reshape(-1, x.shape[-1])
        return
    flat = x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1]) if x.ndim > 3 else x[:, :, None, :]
    weight = real[:, :, None, None]
    if request.pool == "max":
        pooled = np.where(weight, flat, -np.inf).max(axis=(1, 2))
        pooled[~np.isfinite(pooled)] = 0.0          # a sample without real tokens
        yield pooled
    else:
        count = np.maximum(weight.sum(axis=(1, 2)) * flat.shape[2], 1)
        yield (flat * weight).sum(axis=(1, 2), dtype=np.float64) / count


def _collect(model, samples, requests, *, batch_size, folds, device, progress, seed, offset, threads, engine,
             mask=None, keep=(), keep_bytes=None):
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
    if mask is not None:
        header["mask"] = mask
    moments: dict[tuple[str, str, int], Moments] = {}
    keep = list(dict.fromkeys(keep))
    if keep and len(samples) != 1:
        raise CalibrationError("keep", "activations are kept for one sample set at a time")
    if not requests and not keep:
        return Statistics(header, moments)

    if engine not in ENGINES:
        raise CalibrationError("engine", f"must be one of {', '.join(ENGINES)}, not {engine!r}")
    size = batch_size_for(model, int(batch_size))
    fixed = {spec.fixed_batch for spec in input_specs(model)} - {None}
    fixed_batch = fixed.pop() if len(fixed) == 1 else None

    # which requests onnxruntime reduces itself (ingraph.py), which are exposed and folded here
    in_graph: list[tuple[StatRequest, tuple]] = []
    # "auto" on a GPU reduces everything it can in-graph: the products run on the device
    candidates = [r for r in requests
                  if engine == "graph" or (engine == "auto" and (r.kind == "pooled" or device == "cuda"))]
    if candidates:
        values = _value_types(model, [r.tensor for r in candidates], with_inputs=True)
        for r in candidates:
            shape = ingraph.supported(r, values.get(r.tensor))
            if shape is not None and mask is not None and len(shape) >= 3 and r.axis % len(shape) == len(shape) - 1:
                shape = None            # token statistics: padded rows are dropped in numpy
            if shape is not None:
                in_graph.append((r, shape))
    products = "float64" if engine == "numpy" else "float32"
    graph_keys = {r.key for r, _ in in_graph}
    numpy_requests = [r for r in requests if r.key not in graph_keys]
    numpy_tensors = list(dict.fromkeys(r.tensor for r in numpy_requests))
    exposed_tensors = numpy_tensors + [t for t in keep if t not in numpy_tensors]
    exposed, outputs = expose(model, exposed_tensors)
    kept: dict[str, list[np.ndarray]] = {t: [] for t in keep}
    kept_bytes = 0
    taken = set(tensor_names(exposed)) | {t.name for t in exposed.graph.initializer} | \
        {v.name for v in exposed.graph.input}
    plan = ingraph.build(exposed, in_graph, folds, select_folds=folds > 1 or fixed_batch is not None, taken=taken)
    session = make_session(plan.model, device=device, threads=threads)
    site_outputs = [name for site in plan.sites for fold in site.outputs for name in fold]
    fetch = outputs + site_outputs
    header["engine"] = {"graph": len(plan.sites), "numpy": len(numpy_requests)}
    header["products"] = products
    by_tensor: dict[str, list[StatRequest]] = {}
    for r in numpy_requests:
        by_tensor.setdefault(r.tensor, []).append(r)
    taps_cache: dict = {}
    pending: dict[tuple[str, str, int], ingraph.Accumulator] = {}
    # a large batch's exposed tensors are folded one per thread (numpy's copies and BLAS release
    # the GIL; onnxruntime is idle meanwhile): each job adds only its own requests' Moments
    workers = min(int(threads or os.cpu_count() or 1), len(numpy_tensors))

    for set_name, sample_set in samples.items():
        started = time.perf_counter()
        log.info("calibration: %d samples of the %s set, %d requests reduced by onnxruntime, %d through %d "
                 "exposed tensors, batches of %d, %d folds", len(sample_set), set_name, len(plan.sites),
                 len(numpy_requests), len(numpy_tensors), size, folds)
        per_fold = [0] * folds
        position = int(offset)
        bar = _progress(len(sample_set), f"calibrate {set_name}", progress)
        pool = None                         # started for the first batch that exposes PARALLEL_BYTES
        try:
            for indices, feeds in sample_set.batches(size):
                n = len(indices)
                run_feeds = dict(feeds)
                if fixed_batch and n < fixed_batch:
                    run_feeds = {k: np.concatenate([v, np.repeat(v[-1:], fixed_batch - n, axis=0)])
                                 for k, v in feeds.items()}
                members = [np.arange((f - position) % folds, n, folds, dtype=np.int64) for f in range(folds)]
                for f, name in enumerate(plan.fold_inputs):
                    run_feeds[name] = members[f] if len(members[f]) else np.zeros(1, dtype=np.int64)
                for k, site in enumerate(plan.sites):
                    for f, name in enumerate(site.taps):
                        run_feeds[name] = _taps(site, k, members[f], seed, set_name, position, f, taps_cache)
                try:
                    result = session.run(fetch, run_feeds)
                except ORT_ERRORS as exc:
                    first = error_line(exc)
                    raise DataError(set_name, f"onnxruntime rejected a batch ({feeds_text(feeds)}): {first}",
                                    "check that the samples match the model's inputs (and, for token ids, that the "
                                    "rows are no longer than the model's positions)") from None
                reduced = result[len(outputs):]
                result = result[:len(outputs)]
                if keep and keep_bytes is not None and position == offset:
                    # what keeping every sample would take, from this batch: over budget, nothing is
                    # copied (MobileNetV2's correct-drift frontiers, 0.5-1 GB at 250 images, were copied
                    # and then dropped at every stage)
                    per_sample = sum(result[exposed_tensors.index(t)][:1].nbytes for t in keep)
                    if per_sample * len(sample_set) > keep_bytes:
                        keep, kept = [], {}
                for tensor in keep:
                    # a copy: onnxruntime's outputs are views of its arena, which grows while they are held
                    kept[tensor].append(np.array(result[exposed_tensors.index(tensor)][:n]))
                    kept_bytes += kept[tensor][-1].nbytes
                if keep and keep_bytes is not None and kept_bytes > keep_bytes:
                    keep, kept = [], {}         # over budget: keep nothing (memory stays bounded)
                at = 0
                for site in plan.sites:
                    for f, _ in enumerate(site.outputs):
                        gram, total, shift, shape = reduced[at:at + 4]
                        at += 4
                        if not len(members[f]):
                            continue
                        if not (np.isfinite(gram).all() and np.isfinite(total).all()):
                            _diagnose(model, site.request.tensor, run_feeds, n, set_name, indices, device)
                        key = (set_name, site.request.key, f)
                        acc = pending.get(key)
                        if acc is None:
                            acc = pending[key] = ingraph.Accumulator(gram.shape[0])
                        acc.add(gram, total, shift, int(shape[0]))
                del reduced
                # the exposed activations, each folded into its requests' Moments and then freed
                jobs = [partial(_fold_tensor, moments, by_tensor[tensor], set_name,
                                result[j][:n] if fixed_batch and n < fixed_batch else result[j], position,
                                folds, seed, products=products, mask=feeds.get(mask) if mask else None,
                                indices=indices)
                        for j, tensor in enumerate(numpy_tensors)]
                parallel = workers > 1 and sum(a.nbytes for a in result) >= PARALLEL_BYTES
                del result
                if parallel:
                    pool = pool or ThreadPoolExecutor(workers, thread_name_prefix="onnxprune-fold")
                    for done in [pool.submit(job) for job in jobs]:
                        done.result()
                    jobs.clear()
                while jobs:                         # one at a time: each activation freed once folded
                    jobs.pop(0)()
                for f in range(folds):
                    per_fold[f] += len(members[f])
                position += n
                bar.update(n)
        finally:
            bar.close()
            release_buffers()
            if pool is not None:
                pool.shutdown()             # its threads end, and their work buffers with them
        for key, acc in pending.items():
            moments[key] = acc.moments()
        pending.clear()
        header["samples"][set_name] = per_fold
        log.info("calibration: %s set done in %.2f s (samples per fold %s)", set_name, time.perf_counter() - started,
                 per_fold)
    stats = Statistics(header, moments)
    stats.activations = {t: Parts(v) for t, v in kept.items() if v}      # the batches, not joined
    return stats


def _taps(site, k: int, members: np.ndarray, seed: int, set_name: str, position: int, fold: int,
          cache: dict) -> np.ndarray:
    """Gather indices of a patches site for one fold of one batch (cached when not sampled)."""
    if not len(members):
        members = np.zeros(1, dtype=np.int64)
    per_sample = math.prod(site.out_spatial)
    positions = ingraph.draw_positions(site.request, len(members), per_sample, seed, set_name, position, fold)
    if positions is not None:
        return ingraph.tap_indices(site, members, positions)
    key = (k, members.tobytes())
    if key not in cache:
        if len(cache) > 64:
            cache.clear()
        cache[key] = ingraph.tap_indices(site, members, None)
    return cache[key]


def _diagnose(model, tensor: str, feeds: dict, n: int, set_name: str, indices, device: str) -> None:
    """A reduced statistic came out non-finite: find the samples from the activation itself."""
    exposed, outputs = expose(model, [tensor])
    inputs = {v.name for v in exposed.graph.input}
    x = make_session(exposed, device=device).run(outputs, {k: v for k, v in feeds.items() if k in inputs})[0][:n]
    _raise_non_finite(x, tensor, set_name, indices)
    raise CalibrationError(tensor, f"statistics overflow float32 on {set_name} samples {list(indices[:5])}",
                           "activations are too large for in-graph statistics: use engine='numpy'")


def _fold_tensor(moments: dict, requests: Sequence[StatRequest], set_name: str, x: np.ndarray, position: int,
                 folds: int, seed: int, *, products: str, mask: np.ndarray | None, indices) -> None:
    """Fold activation ``x`` into the Moments of every request on it (``_fold_in``); a NaN or
    Inf anywhere in ``x`` reaches a sum and is reported with the samples it came from."""
    updated = [m for request in requests
               for m in _fold_in(moments, request, set_name, x, position, folds, seed, products=products,
                                 mask=mask)]
    if not all(np.isfinite(m.sum).all() for m in updated):
        _raise_non_finite(x, requests[0].tensor, set_name, indices)


def _fold_in(moments: dict, request: StatRequest, set_name: str, x: np.ndarray, position: int,
             folds: int, seed: int = 0, *, products: str = "float64", mask: np.ndarray | None = None
             ) -> list[Moments]:
    """Fold batch ``x`` (first sample at ``position``) into the Moments of ``request``, fold by
    fold; returns the Moments it updated. Sampled patch positions depend on ``seed``, the
    request, the set and ``position`` only (not on which other requests are gathered).
    ``mask`` (N, T): the batch's token mask; padded rows are left out (``token_rows``)."""
    problem = request.check(x.shape)
    if problem:
        raise CalibrationError(request.tensor, problem, f"request {request.key} does not fit this tensor")
    dim = request.dim(x.shape)
    real = token_rows(request, x, mask)
    if real is not None and request.kind == "pooled":
        dim = int(x.shape[-1])
    updated = []
    for fold in range(folds):
        # samples at batch offsets j with (position + j) % folds == fold: a strided view
        part = x[(fold - position) % folds::folds] if folds > 1 else x
        part_real = None if real is None else (real[(fold - position) % folds::folds] if folds > 1 else real)
        if part.shape[0] == 0:
            continue
        key = (set_name, request.key, fold)
        m = moments.get(key)
        if m is None:
            m = moments[key] = Moments(dim, keep_rows=request.keep_rows, products=products)
        elif m.dim != dim:
            raise CalibrationError(request.tensor, f"feature size changed from {m.dim} to {dim} between batches",
                                   "statistics need a fixed feature dimension")
        rng = (np.random.default_rng([seed, zlib.crc32(f"{set_name}/{request.key}".encode()), position, fold])
               if request.positions else None)
        with np.errstate(invalid="ignore", over="ignore"):   # non-finite values are reported by the caller
            blocks = request.rows(part, rng) if part_real is None else _masked_rows(request, part, part_real)
            for rows in blocks:
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


def _value_types(model: onnx.ModelProto, names: Sequence[str], *, with_inputs: bool = False
                 ) -> dict[str, onnx.ValueInfoProto]:
    """ValueInfo of ``names`` from shape inference (without weights' data when possible);
    ``with_inputs``: graph inputs too."""
    wanted = set(names)
    known = list(model.graph.value_info) + list(model.graph.output)
    if with_inputs:
        # the graph engine needs shapes: an entry without one does not count as known
        known = [v for v in known + list(model.graph.input) if v.type.tensor_type.HasField("shape")]
    found = {v.name: v for v in known if v.name in wanted}
    if not with_inputs:
        found.update(_reader_types(model, wanted - set(found)))
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


#: operators whose first input has the element type of their constant second input (the weight)
_TYPED_BY_WEIGHT = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _reader_types(model: onnx.ModelProto, names: set[str]) -> dict[str, onnx.ValueInfoProto]:
    """Element type (no shape) of each of ``names`` that a Conv, Gemm or MatMul reads with a
    weight initializer: the weight's, as the operator requires. What calibration exposes is
    mostly such inputs, typed so without a shape inference of the whole model."""
    if not names:
        return {}
    weights = {t.name: t.data_type for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type in _TYPED_BY_WEIGHT and len(node.input) > 1 and node.input[0] in names \
                and node.input[1] in weights and node.input[0] not in out:
            out[node.input[0]] = onnx.helper.make_tensor_value_info(node.input[0], weights[node.input[1]], None)
    return out


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
