"""Statistics computed by onnxruntime itself: per-batch channel sums and Grams as graph outputs.

Copying every exposed activation out of onnxruntime and folding it in numpy costs more
than the inference (MobileNetV2: 53 tensors, 12 MB per sample). Instead the calibration
graph gets, for each request and fold, a few nodes that reduce the activation in place:

    rows  Y (R x d)   features: Transpose (feature axis last) + Flatten
                      pooled:   ReduceMax/ReduceMean over the spatial axes
                      patches:  Pad + Transpose to NHWC + Flatten, then one Gather of the
                                rows of every kernel tap at the output positions wanted
                                (all, or the seeded sample of ``positions``): im2col in-graph
    shift m (1 x d)   ReduceMean of the first 256 rows: near the mean, cheap
    outputs           G = (Y - m)^T (Y - m)  (Gemm, transA),  s = sum(Y) (ReduceSum in the
                      activation's own layout),  m,  Shape(Y)

so only d + d^2 values per request leave the session. Float32 Grams of centred rows keep
their accuracy (no catastrophic cancellation of a large mean), and the float64 moments of
the raw rows follow exactly:  Gram = G + m c^T + c m^T + R m m^T  with  c = s - R m.
Samples of each fold are picked in-graph by a Gather on the batch axis (folds, and the
padding of fixed-batch models), from index inputs fed per batch.

``plan`` decides which requests can run in-graph (float32 activations of known rank;
patches need static spatial dims; ``keep_rows`` requests need the rows themselves); the
rest are exposed and folded in numpy as before (collect.py).
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.calibration.requests import StatRequest, sample_positions

PREFIX = "onnxprune/calibrate"
#: the shift subtracted before each Gram is the mean of this many leading rows
SHIFT_ROWS = 256


@dataclasses.dataclass
class Site:
    """One request computed in-graph: its output names per fold, and how to feed it."""

    request: StatRequest
    outputs: list[tuple[str, str, str, str]]      # per fold: (gram, centred sum, shift, rows shape)
    taps: list[str] = dataclasses.field(default_factory=list)   # patches: index input per fold
    padded: tuple[int, ...] = ()                  # patches: padded spatial shape
    out_spatial: tuple[int, ...] = ()             # patches: output positions per axis
    in_shape: tuple = ()                          # the activation's inferred shape


@dataclasses.dataclass
class Plan:
    model: onnx.ModelProto
    sites: list[Site]
    fold_inputs: list[str]                        # Gather indices of each fold's samples (may be empty)


def supported(request: StatRequest, value: onnx.ValueInfoProto | None) -> tuple | None:
    """The activation's shape (dims as int or None) when ``request`` can be computed in-graph."""
    if request.keep_rows or value is None or not value.type.HasField("tensor_type"):
        return None
    tensor = value.type.tensor_type
    if tensor.elem_type != TensorProto.FLOAT or not tensor.HasField("shape"):
        return None
    shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
    rank = len(shape)
    if request.kind == "patches":
        if rank != 2 + len(request.kernel) or any(d is None for d in shape[1:]):
            return None
        probe = (1,) + shape[1:]
        if request.check(probe) is not None:
            return None
        return shape
    if request.kind == "pooled":
        return shape if rank >= 2 and request.axis % rank == 1 else None
    if rank < 2 or not -rank <= request.axis < rank or request.axis % rank == 0:
        return None
    return shape


def build(model: onnx.ModelProto, sites: list[tuple[StatRequest, tuple]], folds: int, *,
          select_folds: bool, taken: set[str]) -> Plan:
    """Add the reduction nodes of ``sites`` [(request, activation shape)] to ``model`` (in place)."""
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    b = _Builder(graph, opset, taken)
    fold_inputs = []
    if select_folds and any(request.kind != "patches" for request, _ in sites):   # patches pick by index
        for f in range(folds):
            name = b.name(f"fold{f}")
            graph.input.append(helper.make_tensor_value_info(name, TensorProto.INT64, [None]))
            fold_inputs.append(name)
    planned = []
    for i, (request, shape) in enumerate(sites):
        tag = f"{i}"
        site = Site(request=request, outputs=[], in_shape=shape)
        x = request.tensor
        rank = len(shape)
        if request.kind == "patches":
            nd = len(request.kernel)
            pads = request.pads or (0,) * (2 * nd)
            site.padded = tuple(shape[2 + a] + pads[a] + pads[nd + a] for a in range(nd))
            site.out_spatial = request.out_spatial((1,) + tuple(shape[1:]))
            if any(pads):
                x = b.pad(x, pads, rank, tag)
            nhwc = b.node("Transpose", [x], tag, perm=[0] + list(range(2, rank)) + [1])
            flat = b.node("Flatten", [nhwc], tag, axis=rank - 1)               # (N * prod(padded), C)
            for f in range(folds):
                taps = b.name(f"{tag}/taps{f}")
                graph.input.append(helper.make_tensor_value_info(taps, TensorProto.INT64, [None, None]))
                site.taps.append(taps)
                rows = b.node("Gather", [flat, taps], tag, axis=0)            # (taps, R, C)
                rows = b.node("Transpose", [rows], tag, perm=[1, 2, 0])       # (R, C, taps)
                rows = b.node("Flatten", [rows], tag, axis=1)                 # (R, C * taps): channel-major
                site.outputs.append(b.moments(rows, f"{tag}/f{f}"))
        else:
            if request.kind == "pooled":
                if rank > 2:
                    op = "ReduceMax" if request.pool == "max" else "ReduceMean"
                    x = b.reduce(op, x, list(range(2, rank)), tag, keepdims=0)
                axis = 1
                rank = 2
            else:
                axis = request.axis % rank
            for f in range(folds):
                part = b.node("Gather", [x, fold_inputs[f]], tag, axis=0) if select_folds else x
                # the sum over every non-feature axis in the tensor's own layout (a fast strided
                # reduction in onnxruntime), before the rows are laid out for the Gram
                total = b.reduce("ReduceSum", part, [a for a in range(rank) if a != axis], f"{tag}/f{f}",
                                 keepdims=0)
                if axis != rank - 1:
                    part = b.node("Transpose", [part], tag,
                                  perm=[a for a in range(rank) if a != axis] + [axis])
                if rank > 2:
                    part = b.node("Flatten", [part], tag, axis=rank - 1)
                site.outputs.append(b.moments(part, f"{tag}/f{f}", total=total))
        planned.append(site)
    return Plan(model=model, sites=planned, fold_inputs=fold_inputs)


class _Builder:
    def __init__(self, graph: onnx.GraphProto, opset: int, taken: set[str]):
        self.graph = graph
        self.opset = opset
        self.taken = taken
        self.count = 0

    def name(self, suffix: str) -> str:
        candidate, k = f"{PREFIX}/{suffix}", 1
        while candidate in self.taken:
            candidate = f"{PREFIX}/{suffix}/{k}"
            k += 1
        self.taken.add(candidate)
        return candidate

    def node(self, op: str, inputs: list[str], tag: str, **attrs) -> str:
        self.count += 1
        out = self.name(f"{tag}/{op}{self.count}")
        self.graph.node.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(self, values, tag: str) -> str:
        name = self.name(f"{tag}/const{self.count}")
        self.count += 1
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    def zero(self, tag: str) -> str:
        name = self.name(f"{tag}/zero{self.count}")
        self.count += 1
        self.graph.initializer.append(numpy_helper.from_array(np.zeros((), dtype=np.float32), name))
        return name

    def reduce(self, op: str, x: str, axes: list[int], tag: str, keepdims: int) -> str:
        # axes became an input in opset 13 (ReduceSum) and 18 (the others)
        as_input = self.opset >= (13 if op == "ReduceSum" else 18)
        if as_input:
            return self.node(op, [x, self.const(axes, tag)], tag, keepdims=keepdims)
        return self.node(op, [x], tag, axes=axes, keepdims=keepdims)

    def pad(self, x: str, pads: tuple[int, ...], rank: int, tag: str) -> str:
        nd = len(pads) // 2
        full = [0, 0] + list(pads[:nd]) + [0, 0] + list(pads[nd:])
        if self.opset >= 11:
            return self.node("Pad", [x, self.const(full, tag)], tag, mode="constant")
        return self.node("Pad", [x], tag, mode="constant", pads=full)

    def moments(self, rows: str, tag: str, total: str | None = None) -> tuple[str, str, str, str]:
        """Outputs (Gram of centred rows, sum of the rows, shift, Shape(rows)) of ``rows`` (R x d).

        The shift is the mean of the first ``SHIFT_ROWS`` rows (cheap, and close enough to the
        mean for float32 accuracy: the correction is exact whatever the shift). ``total``:
        the rows' sum when the caller has it already.
        """
        head = self.node("Slice", [rows, self.const([0], tag), self.const([SHIFT_ROWS], tag),
                                   self.const([0], tag)], tag) if self.opset >= 10 else \
            self.node("Slice", [rows], tag, starts=[0], ends=[SHIFT_ROWS], axes=[0])
        shift = self.reduce("ReduceMean", head, [0], tag, keepdims=1)        # (1, d)
        centred = self.node("Sub", [rows, shift], tag)
        # Gemm's C became optional in opset 11
        bias = [] if self.opset >= 11 else [self.zero(tag)]
        gram = self.node("Gemm", [centred, centred, *bias], tag, transA=1)  # (d, d)
        if total is None:
            total = self.reduce("ReduceSum", rows, [0], tag, keepdims=0)     # (d,)
        shape = self.node("Shape", [rows], tag)
        names = (gram, total, shift, shape)
        for name, elem in zip(names, (TensorProto.FLOAT,) * 3 + (TensorProto.INT64,)):
            self.graph.output.append(helper.make_tensor_value_info(name, elem, None))
        return names


# --------------------------------------------------------------------------------------
# Feeds and results


def tap_indices(site: Site, members: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
    """(taps, R) rows of the flattened padded NHWC activation that form the im2col patches of
    the samples ``members`` (batch offsets) at output positions ``positions`` ((n, k) flat
    indices per sample, or None for all), in the order of ``patches()``."""
    request = site.request
    nd = len(request.kernel)
    strides = request.strides or (1,) * nd
    dilations = request.dilations or (1,) * nd
    per_sample = math.prod(site.padded)
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(site.out_spatial, strides)], indexing="ij")
    origin = np.ravel_multi_index([g.ravel() for g in grids], site.padded)            # (P,)
    taps = np.meshgrid(*[np.arange(k) * d for k, d in zip(request.kernel, dilations)], indexing="ij")
    offset = np.ravel_multi_index([t.ravel() for t in taps], site.padded)              # (T,)
    base = members.astype(np.int64)[:, None] * per_sample
    if positions is None:
        at = base + origin[None, :]
    else:
        at = base + origin[positions]
    return offset[:, None] + at.reshape(1, -1)


def draw_positions(request: StatRequest, n: int, per_sample: int, seed: int, set_name: str, position: int,
                   fold: int) -> np.ndarray | None:
    """The sampled output positions (n, k) of a fold's ``n`` samples, exactly as the numpy path
    draws them (``StatRequest.rows`` with the generator of ``collect._fold_in``)."""
    take = request.positions if 0 < request.positions < per_sample else None
    if not take:
        return None
    rng = np.random.default_rng([seed, zlib.crc32(f"{set_name}/{request.key}".encode()), position, fold])
    return sample_positions(rng, n, per_sample, take)


class Accumulator:
    """float64 sums of one request and fold over the batches' in-graph results.

    Per batch only the float32 Gram of centred rows is added (one pass over d^2 values); the
    shifts and centred sums are kept as short vectors and the exact correction
    sum_b (m_b s_b^T + s_b m_b^T + R_b m_b m_b^T) is applied once, as two matrix products,
    by ``moments()``.
    """

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.gram = np.zeros((self.dim, self.dim), dtype=np.float64)
        self.shifts: list[np.ndarray] = []
        self.sums: list[np.ndarray] = []
        self.counts: list[int] = []

    def add(self, gram: np.ndarray, total: np.ndarray, shift: np.ndarray, count: int) -> None:
        """One batch: Gram of its rows minus ``shift``, the rows' (uncentred) sum, the shift."""
        np.add(self.gram, gram, out=self.gram)
        self.shifts.append(np.asarray(shift, dtype=np.float64).reshape(-1))
        self.sums.append(np.asarray(total, dtype=np.float64).reshape(-1))
        self.counts.append(int(count))

    def moments(self):
        from onnxprune.calibration.moments import Moments

        out = Moments(self.dim)
        if not self.counts:
            return out
        m = np.stack(self.shifts)                       # (B, d) shift of each batch
        total = np.stack(self.sums)                     # (B, d) sums of the rows
        r = np.asarray(self.counts, dtype=np.float64)   # (B,)
        s = total - r[:, None] * m                      # sums of the shifted rows
        # sum_b sum_i y y^T = sum_b [G_b + m_b s_b^T + s_b m_b^T + R_b m_b m_b^T]; a float32 error
        # in a sum moves the mean and this Gram alike and cancels in the covariance
        cross = m.T @ s
        gram = self.gram + cross + cross.T + (m * r[:, None]).T @ m
        out.add_sums(int(r.sum()), total.sum(axis=0), gram)
        return out
