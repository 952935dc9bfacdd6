"""low-rank-split: one linear layer into two thin ones.

Before:  x -> Gemm(W: m x n, b) -> y            (also MatMul [+ Add], Conv)
After:   x -> Gemm(B: k x n) -> Gemm(A: m x k, b) -> y

    svd:  W = U S V^T, A = U_k, B = S_k V_k^T                    (weights only)
    dalr: A = top-k eigenvectors of W S W^T, B = A^T W S (S + lam I)^-1
          with S = E[x x^T] on the target inputs (DALR paper, section 4)
    dalr, ridge "auto": the affine form (DALR with a free output bias, i.e. DALR + bias
          compensation done jointly): A = top-k eigenvectors of W (C + lam I) W^T with
          C = Cov[x], B = A^T W, b += (W - A B) E[x]. lam = 0 is centred DALR + bias,
          lam = inf is SVD + BC; lam is chosen by cross-validation over the calibration
          folds (both directions), preferring the largest lam within a small tolerance.

A Conv (M x C x kh x kw) is linear on its im2col patches (n = C kh kw): it becomes a Conv
with k filters (same kernel, strides, pads, dilations) and a 1x1 Conv with the bias.
A split that would not reduce parameters, k (m + n) >= m n, is skipped and reported; so is a
spatial split with more multiply-adds than the layer (its k x 1 Conv runs at every input column).

``latency=True`` (latency-aware splits): each layer is cut out as a model of its own at the
shapes it has in the model (batch ``latency_batch``; ``plan.latency.site_model``) and timed
as it is and split at its rank (random factors: values do not change the time), and at its
rank shrunk to the channel block below it (``multiple``, or 8 when that is 1), interleaved,
the fastest of several runs, one onnxruntime thread (``plan.latency.time_models``; a split
about to be skipped is timed a second time and the fastest of both taken). The split is
kept at its rank when it saves at least ``latency_saving`` (default 5 %) of the layer's time,
else at the shrunk rank when that does, else skipped (the layer is left whole; splits near
the parameter break-even time within a few per cent of the layer, which noise decides).
Timings are cached in ``ctx.cache`` per (layer, rank, batch). The report gives per layer the ideal MAC ratio, the measured times,
realised/ideal and the decision.
New nodes are named ``{layer}/low-rank-split/B`` and ``{layer}/low-rank-split/A`` (``GraphEditor.name``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time

import numpy as np
import onnx
from onnx import helper

from onnxprune import linalg
from onnxprune.calibration.moments import Moments
from onnxprune.calibration.requests import StatRequest
from onnxprune.errors import CalibrationError
from onnxprune.graph.editor import GraphEditor
from onnxprune.graph.index import GraphIndex, name_nodes
from onnxprune.graph.layers import LinearLayer, find_linear_layers, layer_weight
from onnxprune.model import cone_hashes, opset_version
from onnxprune.passes.base import (
    Approximation,
    Pass,
    PassContext,
    PassResult,
    check_choice,
    check_fraction,
    check_types,
    register,
)

log = logging.getLogger(__name__)

# Inputs wider than this keep their raw rows (sample space) instead of an n x n Gram matrix.
WIDE_INPUT = 8192

#: Conv layers: output positions per sample whose im2col patches enter the statistics
#: (0: all). A patch Gram costs positions x (C k^2)^2 per sample, many times the layer.
PATCH_POSITIONS = 16

#: how a 2-D Conv is split (``linalg/spatial.py``): "channel" (the kernel into k channels, then
#: a 1x1) or "spatial" (kh x 1 into k channels, then 1 x kw)
CONV_FORMS = ("channel", "spatial")


@dataclasses.dataclass(frozen=True)
class SplitShape:
    """What splitting one layer at rank k costs, in the form it is split: per unit of rank,
    ``first`` weights in the first factor and ``second`` in the second (the layer: m n);
    ``limit``: the largest useful rank; ``widen``: the first factor's output positions over
    the layer's (the spatial form's first Conv keeps every input column; ``spatial_widen``)."""

    form: str
    m: int
    n: int
    first: int
    second: int
    limit: int
    widen: float = 1.0

    @property
    def per_rank(self) -> int:
        return self.first + self.second

    def params(self, k: int) -> int:
        return int(k) * self.per_rank

    def pays(self, k: int) -> bool:
        """Whether rank ``k`` has fewer weights and multiply-adds than the layer."""
        return self.params(k) < self.m * self.n and self.macs_ratio(k) < 1.0

    def macs_ratio(self, k: int) -> float:
        """Multiply-adds of the split over the layer's."""
        return int(k) * (self.first * self.widen + self.second) / (self.m * self.n)

    def rank_for(self, fraction: float) -> int:
        """The rank keeping about ``fraction`` of the layer's weights."""
        return max(1, math.floor(fraction * self.m * self.n / self.per_rank))


def split_shape(layer: LinearLayer, conv: str = "channel") -> SplitShape:
    """How ``layer`` is split under ``conv`` (``CONV_FORMS``): "spatial" applies to a 2-D Conv
    whose kernel is wider than 1 both ways (group 1, explicit pads, not a wide input); every
    other layer, and every layer with "channel", is split into k channels (k (m + n) weights)."""
    m, n = layer.out_features, layer.in_features
    kernel = tuple(int(k) for k in layer.attrs.get("kernel_shape") or ())
    auto_pad = layer.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if conv == "spatial" and layer.op == "Conv" and len(kernel) == 2 and min(kernel) > 1 \
            and int(layer.attrs.get("group", 1)) == 1 and auto_pad == "NOTSET" and n <= WIDE_INPUT:
        kh, kw = kernel
        channels = n // (kh * kw)
        return SplitShape("spatial", m, n, channels * kh, m * kw, linalg.spatial_rank_limit(channels, m, kernel))
    return SplitShape("channel", m, n, n, m, min(m, n))


def spatial_widen(split: SplitShape, layer_cost) -> SplitShape:
    """``split`` with its ``widen`` from the layer's shapes (``cost.LayerCost``): a spatial
    split's first Conv runs at the layer's output rows and at every input column."""
    if split.form != "spatial" or layer_cost is None or not layer_cost.input or not layer_cost.output:
        return split
    return dataclasses.replace(split, widen=layer_cost.input[-1] / max(layer_cost.output[-1], 1))


def graph_widen(split: SplitShape, index: GraphIndex, layer: LinearLayer) -> SplitShape:
    """``spatial_widen`` from the shapes the graph gives (the pass has no layer costs): the input
    width over the output width, else (a symbolic width) the horizontal stride. Without it a
    strided Conv's spatial split would pass ``pays`` with more multiply-adds than the layer."""
    if split.form != "spatial":
        return split
    x, y = index.shape(layer.input), index.shape(layer.output)
    if x and y and x[-1] and y[-1]:
        return dataclasses.replace(split, widen=x[-1] / y[-1])
    return dataclasses.replace(split, widen=float((layer.attrs.get("strides") or (1, 1))[-1]))


@dataclasses.dataclass(frozen=True)
class LowRankOptions:
    """How each layer's rank is chosen: exactly one of rank, fraction, energy, keep."""

    method: str = "dalr"              # "svd" (weights only) or "dalr" (activation-aware)
    rank: int | None = None           # the same rank for every layer
    fraction: float | None = None     # keep this fraction of each layer's parameters
    energy: float | None = None       # smallest rank retaining this fraction of the energy
    keep: float | None = None         # global budget: keep this fraction of all splittable parameters
    ridge: float | str = "auto"       # DALR ridge relative to trace(S)/n, or "auto" (chosen on held-out data)
    layers: tuple[str, ...] = ()      # only these layers (node names); empty = every splittable layer
    ops: tuple[str, ...] = ("Gemm", "MatMul", "Conv")
    positions: int = PATCH_POSITIONS  # Conv: sampled output positions per sample (0: all)
    multiple: int = 1                 # round each rank to a multiple of this (onnxruntime's channel blocks)
    latency: bool = False             # time each split against its layer; skip or shrink splits that are not faster
    latency_batch: int = 1            # latency: the batch size the layers are timed at
    latency_saving: float = 0.05      # latency: keep a split only if it saves at least this fraction of the layer's time
    ranks: dict | None = None         # per layer: exactly this rank (a plan); layers not named stay whole
    conv: str = "channel"             # 2-D Convs: "channel" (k x k Conv into k channels, 1x1) or "spatial" (k x 1, 1 x k)

    def __post_init__(self):
        check_types("low-rank-split", self)
        check_choice("low-rank-split", "method", self.method, ("svd", "dalr"))
        check_choice("low-rank-split", "conv", self.conv, CONV_FORMS)
        given = [n for n in ("rank", "fraction", "energy", "keep", "ranks") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of rank, fraction, energy, keep, ranks (got {', '.join(given)})")
        if not given:
            object.__setattr__(self, "keep" if self.conv == "channel" else "fraction", 0.25)
        if self.conv == "spatial" and (self.keep is not None or self.energy is not None):
            raise ValueError("conv='spatial' takes rank, fraction or ranks (keep and energy rank the channel form's spectrum)")
        if self.conv == "spatial" and self.latency:
            raise ValueError("latency-aware splits time the channel form only: use conv='channel' with latency")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank={self.rank} must be >= 1")
        for name in ("fraction", "energy", "keep"):
            check_fraction("low-rank-split", name, getattr(self, name))
        if isinstance(self.ridge, str):
            check_choice("low-rank-split", "ridge", self.ridge, ("auto",))
        elif self.ridge < 0:
            raise ValueError(f"ridge={self.ridge} must be >= 0")
        if self.positions < 0:
            raise ValueError(f"positions={self.positions} must be >= 0")
        if self.multiple < 1:
            raise ValueError(f"multiple={self.multiple} must be >= 1")
        if self.latency_batch < 1:
            raise ValueError(f"latency_batch={self.latency_batch} must be >= 1")
        if not 0 <= self.latency_saving < 1:
            raise ValueError(f"latency_saving={self.latency_saving} must be in [0, 1)")
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "ops", tuple(self.ops))
        if self.ranks is not None:
            ranks = dict(self.ranks)
            if any(not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1 for v in ranks.values()):
                raise ValueError(f"ranks must map layer names to ranks >= 1, got {ranks}")
            object.__setattr__(self, "ranks", {str(k): int(v) for k, v in ranks.items()})


def layer_request(layer: LinearLayer, positions: int = PATCH_POSITIONS) -> StatRequest:
    """The input statistics a layer's split reads: rows for Gemm/MatMul, patches for Conv
    (``positions`` sampled output positions per sample; 0: all)."""
    attrs = layer.attrs
    if layer.op != "Conv":
        return StatRequest(layer.input, kind="features", axis=-1, keep_rows=layer.in_features > WIDE_INPUT)
    kernel = tuple(attrs["kernel_shape"])
    strides = tuple(attrs.get("strides") or (1,) * len(kernel))
    pads = tuple(attrs.get("pads") or (0,) * (2 * len(kernel)))
    dilations = tuple(attrs.get("dilations") or (1,) * len(kernel))
    if all(k == 1 for k in kernel) and all(s == 1 for s in strides) and not any(pads):
        return StatRequest(layer.input, kind="features", axis=1)
    return StatRequest(layer.input, kind="patches", axis=1, kernel=kernel, strides=strides, pads=pads,
                       dilations=dilations, keep_rows=layer.in_features > WIDE_INPUT, positions=int(positions))


def second_moment(moments: Moments) -> linalg.SecondMoment:
    if moments.rows is not None:
        return linalg.SecondMoment.from_rows(moments.rows)
    return linalg.SecondMoment.from_gram(moments.gram, moments.count)














def downstream_metric(model: onnx.ModelProto, layer: LinearLayer, bias: np.ndarray | None):
    """How the layer's output errors reach the next linear layer, as a function of the output
    statistics (E[W x], Var[W x]) -> M (m x m), or None (identity: the plain output error).

    Followed: the layer's output through Identity/Dropout and at most one ReLU or Clip to a
    single Gemm/MatMul/Conv reading it. The error e then costs E||W_next D e||^2 with D the
    gate's 0/1 mask, each unit open with the Gaussian probability of its pre-activation
    (``gated_metric``); a Conv reader sums W_next^T W_next over its kernel taps (depthwise:
    per channel). A graph output, a branch (several readers), or anything else gives None.
    """
    index = GraphIndex(model)
    m = layer.out_features
    tensor = layer.output
    gate = None
    readers = {l.node_index: l for l in find_linear_layers(model)}
    for _ in range(8):
        uses = index.uses.get(tensor, [])
        if tensor in index.graph_outputs or len(uses) != 1 or uses[0][1] != 0:
            return None
        node = index.nodes[uses[0][0]]
        if node.op_type in ("Identity", "Dropout"):
            tensor = node.output[0]
            continue
        if node.op_type in ("Relu", "Clip") and gate is None:
            low, high = 0.0, math.inf
            if node.op_type == "Clip":
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                low, high = float(attrs.get("min", -math.inf)), float(attrs.get("max", math.inf))
                for slot, name in ((1, "min"), (2, "max")):
                    if len(node.input) > slot and node.input[slot]:
                        if index.const(node.input[slot]) is None:
                            return None
                        value = float(index.array(node.input[slot]).reshape(-1)[0])
                        low, high = (value, high) if name == "min" else (low, value)
            gate = (low, high)
            tensor = node.output[0]
            continue
        nxt = readers.get(uses[0][0])
        if nxt is None or nxt.input != tensor or index.const(nxt.weight) is None:
            return None
        w = index.array(nxt.weight).astype(np.float64)
        if nxt.op == "Conv":
            group = int(nxt.attrs.get("group", 1))
            if w.ndim != 4 or w.shape[1] * group != m:
                return None
            if group == 1:
                gram = np.einsum("ocij,odij->cd", w, w)
            elif group == m and w.shape[0] == m:
                gram = np.diag(np.einsum("ocij,ocij->o", w, w))
            else:
                return None
        else:
            w_next, _ = layer_weight(index, nxt)
            if w_next.shape[1] != m:
                return None
            gram = w_next.T @ w_next
        break
    else:
        return None
    shift = np.zeros(m) if bias is None else bias

    def metric(mean: np.ndarray, var: np.ndarray) -> np.ndarray:
        if gate is None:
            return gram
        return linalg.gated_metric(gram, linalg.open_probability(mean + shift, var, *gate))

    return metric


def _part(keys: dict, layer, part) -> tuple | None:
    """The cache key of ``part`` of ``layer``'s computation (None: not cached)."""
    key = keys.get(layer.name)
    return None if key is None else key + (part,)


@register
class LowRankSplit(Pass):
    """Gemm(W: m x n) -> Gemm(B: k x n) -> Gemm(A: m x k); also MatMul(+Add) and Conv.

    svd: A = U_k, B = S_k V_k^T. dalr: A = U_k of W S W^T, B = A^T W S (S + lam I)^-1 with S
    the target input second moment; ridge "auto" picks lam (or plain SVD) by held-out
    reconstruction error. Skipped unless k (m + n) < m n.
    """

    name = "low-rank-split"
    Options = LowRankOptions
    produces = (Approximation,)

    def layers(self, model: onnx.ModelProto) -> tuple[list[LinearLayer], list[dict]]:
        chosen, skipped = [], []
        wanted = set(self.options.layers) | set(self.options.ranks or ())
        found = set()
        for layer in find_linear_layers(model):
            if wanted and layer.name not in wanted:
                continue
            found.add(layer.name)
            if layer.op not in self.options.ops:
                continue
            if layer.skip:
                skipped.append({"layer": layer.name, "op": layer.op, "reason": layer.skip})
                continue
            chosen.append(layer)
        for name in sorted(wanted - found):
            skipped.append({"layer": name, "op": "?", "reason": "no such linear layer in the model"})
        return chosen, skipped

    def _request(self, layer: LinearLayer) -> StatRequest:
        return layer_request(layer, self.options.positions)

    def requests(self, model):
        layers, _ = self.layers(model)
        return [(self._request(layer), ("target",)) for layer in layers]

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        opts = self.options
        name_nodes(model)       # a no-op in the pipeline (named on entry); layers are found by name
        layers, skipped = self.layers(model)
        log.info("low-rank-split: %d layer(s) to split (%s), %d skipped; method %s, budget %s", len(layers),
                 ", ".join(layer.name for layer in layers) or "none", len(skipped), opts.method, self._budget())
        for row in skipped:
            log.info("low-rank-split: skip %s: %s", row["layer"], row["reason"])
        stats = ctx.statistics(model, [self._request(layer) for layer in layers], ("target",)) if layers else None

        # per layer: its input's Moments over all folds (merging folds sums dim^2 Grams: once)
        weights, spectra, merged, moments, keys = {}, {}, {}, {}, {}
        cones = cone_hashes(model, {layer.input for layer in layers}) if ctx.cache is not None else {}
        index = GraphIndex(model)
        forms = {layer.name: graph_widen(split_shape(layer, opts.conv), index, layer) for layer in layers}
        for layer in layers:
            w, b = layer_weight(index, layer)
            weights[layer.name] = (w, b)
            merged[layer.name] = stats.moments(self._request(layer), "target")
            total = moments[layer.name] = second_moment(merged[layer.name])
            if ctx.cache is not None and ctx.mode == "one-shot":
                # the same weight on the same statistics factors the same way (planner trials)
                keys[layer.name] = (self.name, layer.name, cones[layer.input], opts.method, opts.ridge,
                                    opts.positions, hashlib.sha256(w.tobytes()).hexdigest())
            if forms[layer.name].form == "channel":     # the spatial form neither ranks nor reports by it
                spectra[layer.name] = ctx.remembered(_part(keys, layer, "spectrum"), lambda: linalg.output_spectrum(
                    w, total if opts.method == "dalr" else None))

        warnings = []
        ranks = self._ranks(weights, spectra, forms, warnings)
        log.debug("low-rank-split: ranks chosen %s", ranks)
        timed = self._latency(model, layers, ranks, weights, ctx) if opts.latency and layers else {}
        rows = []
        for layer in layers:
            started = time.perf_counter()
            w, b = weights[layer.name]
            m, n = w.shape
            form = forms[layer.name]
            k = min(ranks[layer.name], form.limit)
            if not form.pays(k):
                reason = (f"rank {k} would not reduce parameters ({form.params(k)} >= {m}*{n})"
                          if form.params(k) >= m * n else
                          f"rank {k} would not reduce multiply-adds ({form.macs_ratio(k):.2f} x the layer's: the "
                          "spatial form's first Conv runs at every input column)")
                skipped.append({"layer": layer.name, "op": layer.op, "reason": reason})
                log.info("low-rank-split: skip %s: %s", layer.name, skipped[-1]["reason"])
                continue
            timing = timed.get(layer.name)
            if timing is not None and timing["decision"] == "skipped":
                skipped.append({"layer": layer.name, "op": layer.op, "rank": k, **timing,
                                "reason": f"split not {100 * opts.latency_saving:g} % faster at batch {timing['batch']}: "
                                          f"{timing['ms_before']:.3f} ms -> {timing['ms_after']:.3f} ms at rank {k}"})
                log.info("low-rank-split: skip %s: %s", layer.name, skipped[-1]["reason"])
                continue
            if timing is not None:
                k = timing["rank"]
            if ctx.mode == "sequential":
                # This layer's input as the layers already split before it now produce it.
                stats = ctx.statistics(model, [self._request(layer)], ("target",))
                merged[layer.name] = stats.moments(self._request(layer), "target")
                moments[layer.name] = second_moment(merged[layer.name])
            total = moments[layer.name]
            mean = merged[layer.name].mean
            if form.form == "spatial":
                first, second_weight, a_mat, b_mat, info = ctx.remembered(
                    _part(keys, layer, ("spatial", k)), lambda: self._factor_spatial(layer, w, k, merged[layer.name]))
            else:
                a_mat, b_mat, info = ctx.remembered(_part(keys, layer, ("factor", k, ctx.folds)), lambda: self._factor(
                    model, layer, w, b, k, stats, total, ctx.folds))
            info = dict(info)
            delta = info.pop("bias_delta", None)
            new_bias = b
            if delta is not None and (b is not None or np.abs(delta).max() > 1e-12 * max(np.abs(w @ mean).max(), 1e-300)):
                new_bias = delta if b is None else b + delta
            else:
                delta = None
            approx = a_mat @ b_mat
            if form.form == "spatial":
                bias_name, second = self._rewrite_spatial(model, layer, first, second_weight, new_bias)
                energy = None       # dalr: of the outputs, as the channel form's spectrum (below)
                if self.options.method != "dalr":
                    energy = 1.0 - float(np.sum((w - approx) ** 2) / max(np.sum(w ** 2), 1e-300))   # of the weights
            else:
                bias_name, second = self._rewrite(model, layer, a_mat, b_mat, new_bias)
                spectrum = spectra[layer.name]
                energy = float(spectrum[:k].sum() / max(spectrum.sum(), 1e-300))
            error = float(linalg.reconstruction_error(w, a_mat, b_mat, total) if delta is None else
                          linalg.reconstruction_error(w, a_mat, b_mat, total, mean=mean, bias_delta=delta))
            if energy is None:      # a fit to the data may be far from the weights where the data does not go
                energy = 1.0 - error
            rows.append({
                "layer": layer.name, "op": layer.op, "shape": [m, n], "rank": k, "form": form.form,
                "params_before": m * n + (m if b is not None else 0),
                "params_after": form.params(k) + (m if b is not None else 0),
                "energy": energy,
                "error": error,
                **info,
                **(timing or {}),
            })
            row = rows[-1]
            log.info("low-rank-split: %s %s %dx%d -> rank %d (params %d -> %d, energy %.1f%%, rel. error %.4f, %s) "
                     "in %.2f s", layer.name, layer.op, m, n, k, row["params_before"], row["params_after"],
                     100 * row["energy"], row["error"], row.get("chosen", row["method"]), time.perf_counter() - started)
            if "cv_errors" in info:
                log.debug("low-rank-split: %s held-out error per ridge %s (%s metric)", layer.name,
                          {g: round(e, 5) for g, e in info["cv_errors"].items()}, info.get("metric"))
            ctx.approximations[layer.name] = Approximation(
                layer=layer.name, op=layer.op, weight=w, approx=approx, request=self._request(layer),
                mean=mean, node=second, bias=bias_name,
                # bias shift already applied (affine DALR): bias-compensate adds only the rest
                bias_shift=delta)
        GraphEditor(model).remove_unused()
        report = {"split": rows, "skipped": skipped}
        if timed:
            report["latency"] = [{"layer": name, **timing} for name, timing in timed.items()]
        if warnings:
            report["warnings"] = warnings
        return PassResult(changed=bool(rows), report=report)

    def _latency(self, model, layers, ranks, weights, ctx: PassContext) -> dict[str, dict]:
        """Per layer that would be split: its rank after timing it against its split(s), the
        times and the decision (``kept``, ``shrunk`` or ``skipped``); see the module docstring."""
        from onnxprune.graph.shapes import tensor_shapes
        from onnxprune.plan.latency import site_model, time_models

        opts = self.options
        batch = int(opts.latency_batch)
        block = int(opts.multiple) if int(opts.multiple) > 1 else 8
        shapes = tensor_shapes(model, ctx.input_shapes)
        out = {}
        for layer in layers:
            m, n = weights[layer.name][0].shape
            k = min(ranks[layer.name], m, n)
            if linalg.split_params(m, n, k) >= m * n:
                continue                       # skipped for parameters in run()
            shrunk = (k - 1) // block * block
            candidates = [k] + ([shrunk] if shrunk >= 1 and linalg.split_params(m, n, shrunk) < m * n else [])
            signature = (self.name, "latency", layer.name, layer.op, (m, n), repr(sorted(layer.attrs.items())),
                         shapes.get(layer.input), batch)
            cache = ctx.cache if ctx.cache is not None else {}
            if any(signature + (r,) not in cache for r in [None] + candidates):
                try:
                    measured = self._time_split(model, layer, candidates, shapes, batch, site_model, time_models)
                    if not any(t < (1 - float(opts.latency_saving)) * measured[0] for t in measured[1:]):
                        # about to skip: confirm on a second interleaved measurement (fastest of both),
                        # a loaded machine's single measurement can invert a real saving
                        again = self._time_split(model, layer, candidates, shapes, batch, site_model, time_models)
                        measured = [min(a, b) for a, b in zip(measured, again)]
                except Exception as exc:          # a layer this cannot cut out: split it as chosen
                    log.info("low-rank-split: %s not timed alone (%s: %s); split as chosen", layer.name,
                             type(exc).__name__, exc)
                    continue
                for r, seconds in zip([None] + candidates, measured):
                    cache[signature + (r,)] = seconds
            before = cache[signature + (None,)]
            after = {r: cache[signature + (r,)] for r in candidates}
            limit = (1 - float(opts.latency_saving)) * before
            if after[k] < limit:
                rank, decision = k, "kept"
            elif shrunk in after and after[shrunk] < limit:
                rank, decision = shrunk, "shrunk"
            else:
                rank, decision = k, "skipped"
            ideal = m * n / linalg.split_params(m, n, rank)
            out[layer.name] = {
                "rank_chosen": k, "rank": rank, "decision": decision, "batch": batch,
                "ideal_mac_ratio": ideal, "ms_before": 1e3 * before, "ms_after": 1e3 * after[rank],
                "realised": (before / after[rank]) / ideal,
                **({"ms_shrunk": 1e3 * after[shrunk], "rank_shrunk": shrunk} if shrunk in after else {}),
            }
            log.info("low-rank-split: %s at batch %d: %.3f ms whole, %.3f ms at rank %d%s -> %s (ideal %.2fx, "
                     "realised/ideal %.2f)", layer.name, batch, 1e3 * before, 1e3 * after[k], k,
                     f", {1e3 * after[shrunk]:.3f} ms at rank {shrunk}" if shrunk in after else "", decision,
                     ideal, out[layer.name]["realised"])
        return out

    def _time_split(self, model, layer: LinearLayer, ranks, shapes, batch, site_model, time_models) -> list[float]:
        """Seconds of ``layer`` alone, then split at each of ``ranks`` (random factors)."""
        nodes = {layer.name} | ({layer.bias_node} if layer.bias_node else set())
        base = site_model(model, nodes, shapes, batch)
        variants = []
        rng = np.random.default_rng(0)
        for rank in ranks:
            variant = onnx.ModelProto()
            variant.CopyFrom(base)
            here = next(la for la in find_linear_layers(variant) if la.name == layer.name)
            a = rng.standard_normal((here.out_features, rank))
            b = rng.standard_normal((rank, here.in_features))
            bias = np.zeros(here.out_features) if here.bias is not None else None
            self._rewrite(variant, here, a, b, bias)
            GraphEditor(variant).remove_unused()
            variants.append(variant)
        return time_models([base] + variants)

    def _budget(self) -> str:
        opts = self.options
        return next(f"{name}={getattr(opts, name)}" for name in ("rank", "fraction", "energy", "keep", "ranks")
                    if getattr(opts, name) is not None)

    def _ranks(self, weights, spectra, forms: dict[str, SplitShape], warnings: list[str]) -> dict[str, int]:
        """The rank of each layer; a budget that cannot be met adds its line to ``warnings``."""
        opts = self.options
        if opts.ranks is not None:
            return {name: opts.ranks[name] for name in forms}      # a plan's ranks are used as they are
        chosen = self._chosen_ranks(forms, spectra, warnings)
        return {name: linalg.round_rank(k, int(opts.multiple), forms[name].limit) for name, k in chosen.items()}

    def _chosen_ranks(self, forms: dict[str, SplitShape], spectra, warnings: list[str]) -> dict[str, int]:
        opts = self.options
        if opts.keep is not None:
            shapes = {name: (form.m, form.n) for name, form in forms.items()}
            ranks = linalg.global_ranks(spectra, shapes, opts.keep, multiple=int(opts.multiple))
            full = sum(m * n for m, n in shapes.values())
            kept = sum(min(linalg.split_params(*shapes[name], k), shapes[name][0] * shapes[name][1])
                       for name, k in ranks.items())
            if kept > opts.keep * full:     # even the smallest ranks (rank 1, or one `multiple`) exceed it
                warnings.append(f"low-rank-split: keep {opts.keep:g} cannot be met: the smallest ranks of the "
                                f"{len(shapes)} layer(s) leave {kept / full:.1%} of their parameters")
                log.warning("%s", warnings[-1])
            return ranks
        ranks = {}
        for name, form in forms.items():
            if opts.rank is not None:
                ranks[name] = int(opts.rank)
            elif opts.fraction is not None:
                ranks[name] = form.rank_for(opts.fraction)
            else:
                ranks[name] = linalg.rank_for_energy(spectra[name], opts.energy)
        return ranks

    def _factor_spatial(self, layer: LinearLayer, w: np.ndarray, k: int, moments: Moments):
        """The spatial split of the Conv (weight ``w`` as (M, C kh kw)) at rank ``k``
        (``linalg.spatial_split``): dalr fits it on the centred patch covariance and the bias takes
        the mean error, b += (W - W_hat) mu; svd: the weights alone."""
        kh, kw = layer.attrs["kernel_shape"]
        m, n = w.shape
        dalr = self.options.method == "dalr"
        first, second, a_mat, b_mat = linalg.spatial_split(w.reshape(m, n // (kh * kw), kh, kw),
                                                           moments.covariance if dalr else None, k)
        info = {"method": f"{self.options.method}-spatial"}
        if dalr:
            info["bias_delta"] = w @ moments.mean - a_mat @ (b_mat @ moments.mean)
        return first, second, a_mat, b_mat, info

    def _rewrite_spatial(self, model, layer: LinearLayer, first: np.ndarray, second: np.ndarray, bias
                         ) -> tuple[str | None, str]:
        """Replace the Conv by a kh x 1 Conv (vertical stride, pads and dilation) into k channels
        and a 1 x kw Conv (horizontal ones) with the bias; returns (bias name or None, second node)."""
        graph = GraphEditor(model, owner=self.name)
        node = graph.node(layer.name)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(graph.inits[layer.weight].data_type)
        base = layer.name
        attrs = layer.attrs
        strides = list(attrs.get("strides") or (1, 1))
        pads = list(attrs.get("pads") or (0, 0, 0, 0))
        dilations = list(attrs.get("dilations") or (1, 1))
        mid, v_name, h_name = graph.name(base, "hidden"), graph.name(base, "V_weight"), graph.name(base, "H_weight")
        graph.set_array(v_name, first.astype(dtype))
        graph.set_array(h_name, second.astype(dtype))
        vertical = helper.make_node("Conv", [layer.input, v_name], [mid], name=graph.name(base, "V"),
                                    kernel_shape=[first.shape[2], 1], strides=[strides[0], 1],
                                    pads=[pads[0], 0, pads[2], 0], dilations=[dilations[0], 1])
        horizontal = helper.make_node("Conv", [mid, h_name], [node.output[0]], name=graph.name(base, "H"),
                                      kernel_shape=[1, second.shape[3]], strides=[1, strides[1]],
                                      pads=[0, pads[1], 0, pads[3]], dilations=[1, dilations[1]])
        bias_name = None
        if bias is not None:
            bias_name = graph.name(base, "bias")
            graph.set_array(bias_name, bias.astype(dtype))
            horizontal.input.append(bias_name)
        graph.replace(node, [vertical, horizontal])
        return bias_name, horizontal.name

    def _factor(self, model, layer, w, bias, k, stats, total, nfolds: int = 2):
        opts = self.options
        if opts.method == "svd":
            a_mat, b_mat = linalg.truncated_svd(w, k)
            return a_mat, b_mat, {"method": "svd"}
        if opts.ridge != "auto":
            a_mat, b_mat = linalg.dalr(w, total, k, ridge=float(opts.ridge))
            return a_mat, b_mat, {"method": "dalr", "ridge": float(opts.ridge)}
        folds = []
        for f in range(max(int(nfolds), 1)):
            try:
                moments = stats.moments(self._request(layer), "target", fold=f)
            except CalibrationError:
                break
            folds.append((second_moment(moments), moments.mean))
        if len(folds) < 2:
            # Nothing held out to choose on: the paper's DALR at the default ridge.
            a_mat, b_mat = linalg.dalr(w, total, k)
            return a_mat, b_mat, {"method": "dalr", "chosen": "dalr (no folds to cross-validate)",
                                  "ridge": linalg.DEFAULT_RIDGE}
        metric = downstream_metric(model, layer, bias)
        a_mat, b_mat, delta, info = linalg.affine_low_rank(w, k, folds, metric=metric)
        info["metric"] = "downstream" if metric is not None else "output"
        return a_mat, b_mat, {"method": "dalr", **info, "bias_delta": delta}

    def _rewrite(self, model, layer: LinearLayer, a_mat, b_mat, bias) -> tuple[str | None, str]:
        """Replace ``layer``'s node by the two thin ones, in its place (topological order kept);
        returns the name of the bias initializer the second one reads (None: no bias) and the
        second node's name."""
        graph = GraphEditor(model, owner=self.name)
        node = graph.node(layer.name)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(graph.inits[layer.weight].data_type)
        m, k = a_mat.shape
        base = layer.name
        mid = graph.name(base, "hidden")
        b_name, a_name = graph.name(base, "B_weight"), graph.name(base, "A_weight")
        bias_name = graph.name(base, "bias")
        x = layer.input
        extra = None
        if layer.op == "Gemm":
            graph.set_array(b_name, b_mat.astype(dtype))
            graph.set_array(a_name, a_mat.astype(dtype))
            first = helper.make_node("Gemm", [x, b_name], [mid], name=graph.name(base, "B"), transB=1)
            second = helper.make_node("Gemm", [mid, a_name], [node.output[0]], name=graph.name(base, "A"), transB=1)
            if opset_version(model) < 11:
                # Gemm before opset 11 requires its C input: zero biases where there is none.
                zeros = graph.name(base, "B_bias")
                graph.set_array(zeros, np.zeros(k, dtype=dtype))
                first.input.append(zeros)
                if bias is None:
                    bias = np.zeros(m)
        elif layer.op == "MatMul":
            graph.set_array(b_name, np.ascontiguousarray(b_mat.T).astype(dtype))
            graph.set_array(a_name, np.ascontiguousarray(a_mat.T).astype(dtype))
            first = helper.make_node("MatMul", [x, b_name], [mid], name=graph.name(base, "B"))
            second = helper.make_node("MatMul", [mid, a_name], [node.output[0]], name=graph.name(base, "A"))
            if layer.bias_node:
                add = graph.node(layer.bias_node)
                slot = list(add.input).index(layer.bias)
                graph.set_array(bias_name, bias.astype(dtype))
                add.input[slot] = bias_name
            elif bias is not None:
                # a bias the split introduced (affine DALR): y = Add(MatMul(...), bias)
                graph.set_array(bias_name, bias.astype(dtype))
                hidden = graph.name(base, "unbiased")
                second.output[0] = hidden
                extra = helper.make_node("Add", [hidden, bias_name], [node.output[0]], name=graph.name(base, "add_bias"))
        else:
            w = graph.array(layer.weight)
            graph.set_array(b_name, b_mat.reshape((k,) + w.shape[1:]).astype(dtype))
            graph.set_array(a_name, a_mat.reshape((m, k) + (1,) * (w.ndim - 2)).astype(dtype))
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            attrs.pop("group", None)
            first = helper.make_node("Conv", [x, b_name], [mid], name=graph.name(base, "B"), **attrs)
            second = helper.make_node("Conv", [mid, a_name], [node.output[0]],
                                      name=graph.name(base, "A"), kernel_shape=[1] * (w.ndim - 2))
        if bias is not None and layer.op != "MatMul":
            graph.set_array(bias_name, bias.astype(dtype))
            second.input.append(bias_name)
        graph.replace(node, [first, second] + ([extra] if extra is not None else []))
        return (bias_name if bias is not None else None), second.name
