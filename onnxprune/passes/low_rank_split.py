"""low-rank-split: one linear layer into two thin ones.

Before:  x -> Gemm(W: m x n, b) -> y            (also MatMul [+ Add], Conv)
After:   x -> Gemm(B: k x n) -> Gemm(A: m x k, b) -> y

    svd:  W = U S V^T, A = U_k, B = S_k V_k^T                    (weights only)
    dalr: A = top-k eigenvectors of W S W^T, B = A^T W S (S + lam I)^-1
          with S = E[x x^T] on the target inputs (DALR paper, section 4)

A Conv (M x C x kh x kw) is linear on its im2col patches (n = C kh kw): it becomes a Conv
with k filters (same kernel, strides, pads, dilations) and a 1x1 Conv with the bias.
A split that would not reduce parameters, k (m + n) >= m n, is skipped and reported.
New nodes are named ``{layer}/low_rank/B`` and ``{layer}/low_rank/A``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
from onnx import helper

from onnxprune import linalg
from onnxprune.calibration.stats import Moments, StatRequest
from onnxprune.graph import LinearLayer, find_linear_layers
from onnxprune.model import get_array, remove_unused_initializers, set_array, unique_name
from onnxprune.passes.base import Pass, PassContext, PassResult, check_choice, check_fraction, register

# Inputs wider than this keep their raw rows (sample space) instead of an n x n Gram matrix.
WIDE_INPUT = 8192


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

    def __post_init__(self):
        check_choice("low-rank-split", "method", self.method, ("svd", "dalr"))
        given = [n for n in ("rank", "fraction", "energy", "keep") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of rank, fraction, energy, keep (got {', '.join(given)})")
        if not given:
            object.__setattr__(self, "keep", 0.25)
        if self.rank is not None and int(self.rank) < 1:
            raise ValueError(f"rank={self.rank} must be >= 1")
        for name in ("fraction", "energy", "keep"):
            check_fraction("low-rank-split", name, getattr(self, name))
        if isinstance(self.ridge, str):
            check_choice("low-rank-split", "ridge", self.ridge, ("auto",))
        elif self.ridge < 0:
            raise ValueError(f"ridge={self.ridge} must be >= 0")
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "ops", tuple(self.ops))


def layer_request(layer: LinearLayer) -> StatRequest:
    """The input statistics a layer's split reads: rows for Gemm/MatMul, patches for Conv."""
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
                       dilations=dilations, keep_rows=layer.in_features > WIDE_INPUT)


def second_moment(moments: Moments) -> linalg.SecondMoment:
    if moments.rows is not None:
        return linalg.SecondMoment.from_rows(moments.rows)
    return linalg.SecondMoment.from_gram(moments.gram, moments.count)


def layer_weight(model: onnx.ModelProto, layer: LinearLayer) -> tuple[np.ndarray, np.ndarray | None]:
    """(W: m x n, b: m or None) in float64 with y = W x + b, whatever the op's layout."""
    w = get_array(model, layer.weight).astype(np.float64)
    b = get_array(model, layer.bias).astype(np.float64) if layer.bias else None
    if layer.op == "Gemm":
        alpha, beta = layer.attrs.get("alpha", 1.0), layer.attrs.get("beta", 1.0)
        w = alpha * (w if layer.attrs.get("transB", 0) else w.T)
        if b is not None:
            b = beta * np.broadcast_to(b.reshape(-1), (w.shape[0],)).copy()
    elif layer.op == "MatMul":
        w = w.T
        if b is not None:
            b = np.broadcast_to(b.reshape(-1), (w.shape[0],)).copy()
    else:
        w = w.reshape(w.shape[0], -1)
    return w, b


def split_params(m: int, n: int, k: int) -> int:
    return k * (m + n)


def rank_for_energy(spectrum: np.ndarray, energy: float) -> int:
    """Smallest k whose leading ``spectrum`` entries hold ``energy`` of the total."""
    total = spectrum.sum()
    if total <= 0:
        return 1
    cumulative = np.cumsum(spectrum) / total
    return int(min(np.searchsorted(cumulative, energy - 1e-12) + 1, len(spectrum)))


def global_ranks(spectra: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]], keep: float) -> dict[str, int]:
    """One energy threshold for all layers, the largest whose parameters fit ``keep`` of the total.

    A layer whose split would not save parameters stays dense (its full m n counts).
    """
    budget = keep * sum(m * n for m, n in shapes.values())

    def cost(threshold: float) -> tuple[int, dict[str, int]]:
        ranks = {name: rank_for_energy(s, threshold) for name, s in spectra.items()}
        total = sum(min(split_params(*shapes[name], k), shapes[name][0] * shapes[name][1])
                    for name, k in ranks.items())
        return total, ranks

    candidates = np.unique(np.concatenate(
        [np.cumsum(s) / max(s.sum(), 1e-300) for s in spectra.values()] + [np.array([0.0])]))
    lo, hi = 0, len(candidates) - 1
    best = cost(0.0)[1]
    while lo <= hi:
        mid = (lo + hi) // 2
        total, ranks = cost(float(candidates[mid]))
        if total <= budget:
            best, lo = ranks, mid + 1
        else:
            hi = mid - 1
    return best


@register
class LowRankSplit(Pass):
    """Gemm(W: m x n) -> Gemm(B: k x n) -> Gemm(A: m x k); also MatMul(+Add) and Conv.

    svd: A = U_k, B = S_k V_k^T. dalr: A = U_k of W S W^T, B = A^T W S (S + lam I)^-1 with S
    the target input second moment; ridge "auto" picks lam (or plain SVD) by held-out
    reconstruction error. Skipped unless k (m + n) < m n.
    """

    name = "low-rank-split"
    Options = LowRankOptions

    def layers(self, model: onnx.ModelProto) -> tuple[list[LinearLayer], list[dict]]:
        chosen, skipped = [], []
        wanted = set(self.options.layers)
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

    def requests(self, model):
        layers, _ = self.layers(model)
        return [(layer_request(layer), ("target",)) for layer in layers]

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        opts = self.options
        layers, skipped = self.layers(model)
        stats = ctx.statistics(model, [layer_request(layer) for layer in layers], ("target",)) if layers else None

        weights, spectra, moments = {}, {}, {}
        for layer in layers:
            w, b = layer_weight(model, layer)
            weights[layer.name] = (w, b)
            total = second_moment(stats.moments(layer_request(layer), "target"))
            moments[layer.name] = total
            spectra[layer.name] = linalg.output_spectrum(w, total if opts.method == "dalr" else None)

        ranks = self._ranks(weights, spectra)
        rows = []
        for layer in layers:
            w, b = weights[layer.name]
            m, n = w.shape
            k = min(ranks[layer.name], m, n)
            if split_params(m, n, k) >= m * n:
                skipped.append({"layer": layer.name, "op": layer.op,
                                "reason": f"rank {k} would not reduce parameters ({k}*({m}+{n}) >= {m}*{n})"})
                continue
            if ctx.mode == "sequential":
                # This layer's input as the layers already split before it now produce it.
                stats = ctx.statistics(model, [layer_request(layer)], ("target",))
                moments[layer.name] = second_moment(stats.moments(layer_request(layer), "target"))
            total = moments[layer.name]
            a_mat, b_mat, info = self._factor(layer, w, k, stats, total)
            self._rewrite(model, layer, a_mat, b_mat, b)
            spectrum = spectra[layer.name]
            rows.append({
                "layer": layer.name, "op": layer.op, "shape": [m, n], "rank": k,
                "params_before": m * n + (m if b is not None else 0),
                "params_after": split_params(m, n, k) + (m if b is not None else 0),
                "energy": float(spectrum[:k].sum() / max(spectrum.sum(), 1e-300)),
                "error": float(linalg.reconstruction_error(w, a_mat, b_mat, total)),
                **info,
            })
            ctx.approximated[layer.name] = {
                "weight": w, "approx": a_mat @ b_mat, "request": layer_request(layer), "op": layer.op,
                "mean": stats.moments(layer_request(layer), "target").mean,
                "node": f"{layer.name}/low_rank/A",
                "bias": f"{layer.name}/low_rank/bias" if b is not None else None,
            }
        remove_unused_initializers(model)
        return PassResult(changed=bool(rows), report={"split": rows, "skipped": skipped})

    def _ranks(self, weights, spectra) -> dict[str, int]:
        opts = self.options
        shapes = {name: w.shape for name, (w, _) in weights.items()}
        if opts.keep is not None:
            return global_ranks(spectra, shapes, opts.keep)
        ranks = {}
        for name, (m, n) in shapes.items():
            if opts.rank is not None:
                ranks[name] = int(opts.rank)
            elif opts.fraction is not None:
                ranks[name] = max(1, math.floor(opts.fraction * m * n / (m + n)))
            else:
                ranks[name] = rank_for_energy(spectra[name], opts.energy)
        return ranks

    def _factor(self, layer, w, k, stats, total):
        opts = self.options
        if opts.method == "svd":
            a_mat, b_mat = linalg.truncated_svd(w, k)
            return a_mat, b_mat, {"method": "svd"}
        if opts.ridge != "auto":
            a_mat, b_mat = linalg.dalr(w, total, k, ridge=float(opts.ridge))
            return a_mat, b_mat, {"method": "dalr", "ridge": float(opts.ridge)}
        # Held-out choice among DALR ridges (shrinking B to 0, or the approximation towards
        # W, whose infinite-ridge end is the SVD) and plain SVD: fit on fold 0, score on fold 1.
        request = layer_request(layer)
        folds = [second_moment(stats.moments(request, "target", fold=f)) for f in (0, 1)]
        _, _, info = linalg.best_low_rank(w, k, folds[0], folds[1], methods=("dalr", "dalr-weight", "svd"))
        if info["method"] == "svd":
            a_mat, b_mat = linalg.truncated_svd(w, k)
            return a_mat, b_mat, {"method": "dalr", "chosen": "svd"}
        ridge, shrink = float(info["ridge"]), info["shrink_to"]
        a_mat, b_mat = linalg.dalr(w, total, k, ridge=ridge, shrink_to=shrink)
        return a_mat, b_mat, {"method": "dalr", "chosen": f"dalr (ridge {ridge:g}, to {shrink})",
                              "ridge": ridge, "shrink_to": shrink}

    def _rewrite(self, model, layer: LinearLayer, a_mat, b_mat, bias) -> None:
        graph = model.graph
        index = next(i for i, node in enumerate(graph.node) if node.name == layer.name or
                     (not node.name and layer.node_index == i))
        node = graph.node[index]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(
            next(t.data_type for t in graph.initializer if t.name == layer.weight))
        m, k = a_mat.shape
        base = layer.name
        mid = unique_name(model, f"{base}/low_rank/hidden")
        b_name, a_name = f"{base}/low_rank/B/weight", f"{base}/low_rank/A/weight"
        bias_name = f"{base}/low_rank/bias"
        x = layer.input
        if layer.op == "Gemm":
            set_array(model, b_name, b_mat.astype(dtype))
            set_array(model, a_name, a_mat.astype(dtype))
            first = helper.make_node("Gemm", [x, b_name], [mid], name=f"{base}/low_rank/B", transB=1)
            second = helper.make_node("Gemm", [mid, a_name], [node.output[0]], name=f"{base}/low_rank/A", transB=1)
        elif layer.op == "MatMul":
            set_array(model, b_name, np.ascontiguousarray(b_mat.T).astype(dtype))
            set_array(model, a_name, np.ascontiguousarray(a_mat.T).astype(dtype))
            first = helper.make_node("MatMul", [x, b_name], [mid], name=f"{base}/low_rank/B")
            second = helper.make_node("MatMul", [mid, a_name], [node.output[0]], name=f"{base}/low_rank/A")
            if layer.bias_node:
                add = next(n for n in graph.node if n.name == layer.bias_node)
                slot = list(add.input).index(layer.bias)
                set_array(model, bias_name, bias.astype(dtype))
                add.input[slot] = bias_name
        else:
            w = get_array(model, layer.weight)
            set_array(model, b_name, b_mat.reshape((k,) + w.shape[1:]).astype(dtype))
            set_array(model, a_name, a_mat.reshape((m, k) + (1,) * (w.ndim - 2)).astype(dtype))
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            attrs.pop("group", None)
            first = helper.make_node("Conv", [x, b_name], [mid], name=f"{base}/low_rank/B", **attrs)
            second = helper.make_node("Conv", [mid, a_name], [node.output[0]],
                                      name=f"{base}/low_rank/A", kernel_shape=[1] * (w.ndim - 2))
        if bias is not None and layer.op != "MatMul":
            set_array(model, bias_name, bias.astype(dtype))
            second.input.append(bias_name)
        graph.node.remove(node)
        graph.node.insert(index, second)
        graph.node.insert(index, first)
