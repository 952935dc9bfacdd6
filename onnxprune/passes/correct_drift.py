"""correct-drift: refit the linear layers that read activations the compression moved.

Every site is compressed assuming the rest of the model is the original (one-shot); with
many sites the errors add up downstream: a layer reading tensor t now sees x~ (the
compressed model's t) instead of x (the original's, restricted to the channels K kept
there). Each linear reader of t is refitted on the calibration samples to answer x~ as
it answered x:

    x[K] ~= A x~ + a,   [A a] = E[x[K] z^T] (E[z z^T] + rho I)^-1,   z = [x~; 1]
    W' = W A (a Conv: at every tap, M[:, :, i, j] A),   b' = b + W a

which for a 1x1 Conv, a Gemm or a MatMul is exactly the least-squares fit of the layer's
original response W x[K] + b from x~. The joint second moment of (x[K], x~) comes from one
onnxruntime pass over a graph holding both models side by side (``side_by_side``). The
intercept a is fitted only where every reader can absorb it exactly (a bias and no zero
padding); rho is chosen on held-out calibration folds, and a tensor keeps its readers as
they are unless the refit predicts x[K] better than x~ itself on the held-out folds.

A correction moves the inputs of the layers after it, so the tensors are fitted in graph
order, each on the model the corrections before it produced (one calibration pass per
tensor, by default). Fitting them all at once from one pass overshoots where the drift is
large: ResNet-20 planned to 70 % of its MACs keeps 70.3 % top-1 without this pass, 41.6 %
with every tensor fitted at once, 69.4 % with 4 stages and 79.3 % fully sequential (19
stages; original 80.8 %). ``stages`` groups consecutive tensors to save passes.
Depthwise convolutions (group > 1) are left alone (A would mix their channels).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx
from onnx import helper

from onnxprune.calibration.requests import StatRequest
from onnxprune.errors import RecipeError
from onnxprune.graph.editor import GraphEditor
from onnxprune.graph.index import GraphIndex, node_names
from onnxprune.graph.layers import LinearLayer, find_linear_layers
from onnxprune.model import cone_hashes
from onnxprune.passes.base import Pass, PassContext, PassResult, Selection, check_types, register

log = logging.getLogger(__name__)

#: ridges (relative to trace(E[z z^T]) / dim) tried on held-out folds
RIDGE_GRID = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
#: a refit is kept when its held-out error is below this share of leaving the readers alone
GAIN = 0.98
PREFIX = "correct-drift/"


@dataclasses.dataclass(frozen=True)
class CorrectDriftOptions:
    """stages: groups of drifted tensors fitted one after the other (one calibration pass each);
    None (default): one tensor per stage, fully sequential. max_channels: wider tensors are
    left alone (their joint second moment has (2 C)^2 entries and an eigendecomposition per
    fold: 3136 channels, a flattened 64 x 7 x 7 map, would hold GBs and take minutes)."""

    stages: int | None = None
    max_channels: int = 2048

    def __post_init__(self):
        check_types("correct-drift", self)
        if self.stages is not None and self.stages < 1:
            raise ValueError(f"stages={self.stages!r} must be an integer >= 1 or None")
        if self.max_channels < 1:
            raise ValueError(f"max_channels={self.max_channels!r} must be an integer >= 1")


@dataclasses.dataclass
class _Tensor:
    """A drifted tensor t: its kept original channels K (None: all), axis, and linear readers."""

    name: str
    keep: np.ndarray | None
    axis: int
    readers: list[LinearLayer]
    intercept: bool
    width: int


@register
class CorrectDrift(Pass):
    """Readers W of a drifted activation x~ become W A (+ W a in the bias), with
    [A a] the ridge regression of the original's x[K] on [x~; 1] over the calibration set.

    Needs the original model (``ctx.original``); runs after the compressing passes.
    """

    name = "correct-drift"
    Options = CorrectDriftOptions

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        if ctx.original is None:
            raise RecipeError(self.name, "needs the original model (run it inside a pipeline)")
        rows = []
        graph = GraphEditor(model, owner=self.name)
        everything = []
        for t in drifted_tensors(ctx.original, model, ctx.selections):
            if t.width <= self.options.max_channels:
                everything.append(t)
                continue
            rows.append({"stage": None, "tensor": t.name, "readers": [r.name for r in t.readers],
                         "channels": t.width, "refit": False, "skipped": f"wider than max_channels={self.options.max_channels}"})
            log.info("correct-drift: %s left alone (%d channels > max_channels %d)", t.name, t.width,
                     self.options.max_channels)
        stages = len(everything) if self.options.stages is None else min(self.options.stages, len(everything))
        bounds = np.linspace(0, len(everything), max(stages, 1) + 1)
        for stage, (lo, hi) in enumerate(zip(bounds[:-1].round().astype(int), bounds[1:].round().astype(int))):
            # refits rewrite weight values only (same initializer names), so the tensors and
            # readers found once stay valid; each stage gathers on the model corrected so far
            tensors = everything[lo:hi]
            if not tensors:
                continue
            # a provider that stores activations gets the whole joint graph and computes only
            # what lies between the activations it kept from the last stage and these tensors
            joint, joined = side_by_side(ctx.original, model, tensors,
                                         whole=getattr(ctx.statistics, "stores_activations", False))
            requests = [StatRequest(joined[t.name], kind="features", axis=t.axis) for t in tensors]
            view = ctx.statistics(joint, requests, ctx.sets[:1])
            for t, request in zip(tensors, requests):
                folds = [view.moments(request, ctx.sets[0], fold=f) for f in range(ctx.folds)]
                fit = _refit(folds, t.intercept)
                row = {"stage": stage + 1, "tensor": t.name, "readers": [r.name for r in t.readers],
                       "channels": int(folds[0].dim // 2), **{k: v for k, v in fit.items() if k != "map"}}
                if fit["map"] is not None:
                    A, a = fit["map"]
                    for layer in t.readers:
                        _apply(graph, layer, A, a)
                rows.append(row)
                log.info("correct-drift stage %d: %s (%d channels, %d reader(s)): %s", stage + 1, t.name,
                         row["channels"], len(t.readers),
                         f"refit, held-out error {fit['error_before']:.4g} -> {fit['error_after']:.4g}"
                         if fit["map"] is not None else "left alone")
        return PassResult(changed=any(r.get("refit") for r in rows), report={"tensors": rows})


def drifted_tensors(original: onnx.ModelProto, model: onnx.ModelProto,
                    selections: dict[str, Selection]) -> list[_Tensor]:
    """Tensors that linear layers of ``model`` read, that the original has too, and whose
    value the compression changed (their cone differs), with the original channels kept."""
    keep_of = _kept_channels(model, selections)
    index_o, index_c = GraphIndex(original), GraphIndex(model)
    readers: dict[str, list[LinearLayer]] = {}
    for layer in find_linear_layers(model):
        if layer.skip:
            continue            # depthwise and grouped convolutions, shared weights, ...
        if index_o.const(layer.input) is not None or layer.input not in index_o.producer:
            continue            # a graph input or a constant: never drifts
        readers.setdefault(layer.input, []).append(layer)
    if not readers:
        return []
    hashes_o = cone_hashes(original, set(readers))
    hashes_c = cone_hashes(model, set(readers))
    out = []
    for name, layers in readers.items():
        if hashes_o[name] == hashes_c[name]:
            continue
        op = layers[0].op
        rank = index_c.rank(name) or 2
        axis = 1 if op in ("Conv", "Gemm") or rank == 2 else rank - 1
        if any((1 if la.op in ("Conv", "Gemm") or rank == 2 else rank - 1) != axis for la in layers):
            continue
        keep = keep_of.get(name)
        dims_o, dims_c = index_o.shape(name), index_c.shape(name)
        if not dims_o or not dims_c or len(dims_o) != len(dims_c):
            continue
        width_o, width_c = dims_o[axis], dims_c[axis]
        if not isinstance(width_o, int) or not isinstance(width_c, int):
            continue
        if keep is None and width_o != width_c or keep is not None and len(keep) != width_c:
            continue            # a channel map this pass cannot follow (e.g. through a Flatten)
        intercept = all(_absorbs_intercept(la) and int(np.prod(index_c.dims(la.bias))) == la.out_features
                        for la in layers)
        out.append(_Tensor(name, keep, axis, layers, intercept, width_c))
    return out


def _kept_channels(model: onnx.ModelProto, selections: dict[str, Selection]) -> dict[str, np.ndarray]:
    """Tensor -> the original channels it still carries, for the groups select-nodes pruned."""
    nodes = dict(zip(node_names(model), model.graph.node))
    out = {}
    for selection in selections.values():
        group, keep = selection.group, np.asarray(selection.keep, dtype=np.int64)
        if len(keep) == group.channels:
            continue
        names = [p.node for p in group.producers] + [p.node for p in group.path]
        for name in names:
            node = nodes.get(name)
            if node is not None:
                out.update({o: keep for o in node.output if o})
        out[group.site] = keep
    return out


def _absorbs_intercept(layer: LinearLayer) -> bool:
    if layer.op == "Conv":
        return layer.bias is not None and not any(layer.attrs["pads"]) and layer.attrs["auto_pad"] == "NOTSET"
    return layer.bias is not None and (layer.op != "Gemm" or layer.attrs["beta"] == 1.0)


def side_by_side(original: onnx.ModelProto, model: onnx.ModelProto,
                 tensors: list[_Tensor], *, whole: bool = False) -> tuple[onnx.ModelProto, dict[str, str]]:
    """One graph computing both models from the same inputs, plus, per drifted tensor t, a
    tensor ``names[t]`` = Concat(original t[K], compressed t) along t's feature axis; only
    the nodes these need, or (``whole``) every node of both models."""
    graph = original.graph
    inputs = {v.name for v in graph.input}
    inits = {t.name for t in model.graph.initializer}

    def rename(name: str) -> str:
        return name if not name or (name in inputs and name not in inits) else PREFIX + "c/" + name

    nodes = list(graph.node)
    for i, node in enumerate(model.graph.node):
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{PREFIX}c/{i}" 
        copy.input[:] = [rename(i) for i in node.input]
        copy.output[:] = [rename(o) for o in node.output]
        nodes.append(copy)
    initializers = list(graph.initializer)
    for tensor in model.graph.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        copy.name = rename(tensor.name)
        initializers.append(copy)
    names = {}
    for t in tensors:
        left = t.name
        if t.keep is not None:
            index = PREFIX + "keep/" + t.name
            initializers.append(onnx.numpy_helper.from_array(t.keep, index))
            left = PREFIX + "original/" + t.name
            nodes.append(helper.make_node("Gather", [t.name, index], [left], axis=t.axis,
                                          name=PREFIX + "gather/" + t.name))
        names[t.name] = PREFIX + "joint/" + t.name
        nodes.append(helper.make_node("Concat", [left, rename(t.name)], [names[t.name]], axis=t.axis,
                                      name=PREFIX + "concat/" + t.name))
    if not whole:
        nodes, initializers = _cone(nodes, initializers, set(names.values()))
    outputs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names.values()]
    joint_graph = helper.make_graph(nodes, graph.name, list(graph.input), outputs, initializers)
    joint = helper.make_model(joint_graph, opset_imports=list(original.opset_import))
    joint.ir_version = max(original.ir_version, 4)     # IR 3 would want every initializer as an input
    return joint, names


def _cone(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto], wanted: set[str]
          ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes (in order) and initializers that ``wanted`` depend on: a stage early in the
    graph runs only the prefix of both models that it reads."""
    needed = set(wanted)
    keep = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
            for attr in node.attribute:         # names a subgraph reads from the outer scope
                for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                    needed.update(i for n in sub.node for i in n.input)
    return keep[::-1], [t for t in initializers if t.name in needed]


def _refit(folds, intercept: bool) -> dict:
    """Ridge regression of the first half of the joint features (x[K]) on the second (x~),
    with an unpenalised intercept (centred moments) or none; the ridge, and whether to refit
    at all, chosen on held-out folds (each fold left out in turn). One eigendecomposition per
    fold scores every ridge of the grid, as ``heldout_ridge`` does for reconstruct-next-layer."""
    dim = folds[0].dim // 2
    # of each fold's joint Gram of v = (x, z) only the z z^T and z x^T blocks and the traces are
    # used (the x x^T block, a quarter of it, only by its trace)
    grams = [m.gram for m in folds]
    zz = [g[dim:, dim:] for g in grams]
    zx = [g[dim:, :dim] for g in grams]
    xx = [float(np.trace(g[:dim, :dim])) for g in grams]

    def pooled(parts):
        """(E[z z^T], E[z x^T], E||x||^2, E[v]) over the folds ``parts``."""
        n = sum(folds[i].count for i in parts)
        return (sum(zz[i] for i in parts) / n, sum(zx[i] for i in parts) / n, sum(xx[i] for i in parts) / n,
                sum(folds[i].sum for i in parts) / n)

    def blocks(second_zz, second_zx, second_xx, mean, centre):
        """(E[z z^T], E[z x^T], E||x||^2) about ``centre`` with an intercept, else as they are."""
        if not intercept:
            return second_zz, second_zx, second_xx
        mx, mz, cx, cz = mean[:dim], mean[dim:], centre[:dim], centre[dim:]
        return (second_zz - np.outer(mz, cz) - np.outer(cz, mz) + np.outer(cz, cz),
                second_zx - np.outer(mz, cx) - np.outer(cz, mx) + np.outer(cz, cx),
                second_xx - 2.0 * float(mx @ cx) + float(cx @ cx))

    everything = list(range(len(folds)))
    total = sum(m.count for m in folds)
    trace_xx, trace_zz = sum(xx), sum(float(np.trace(z)) for z in zz)
    before = float(trace_xx - 2.0 * sum(float(np.trace(c)) for c in zx) + trace_zz)
    energy = max(trace_xx, 1e-300)
    scores = np.zeros(len(RIDGE_GRID))
    usable = len(folds) > 1 and all(m.count > 0 for m in folds)
    for f in everything if usable else ():
        *second, mean = pooled([i for i in everything if i != f])
        Z, C, _ = blocks(*second, mean, mean)
        *second_held, mean_held = pooled([f])
        Zh, Ch, yy = blocks(*second_held, mean_held, mean)
        mu, V = np.linalg.eigh(0.5 * (Z + Z.T))
        mu = np.maximum(mu, 0.0)
        P, Q = V.T @ C, V.T @ Ch
        M = V.T @ Zh @ V
        PQ = np.einsum("ij,ij->i", P, Q)
        PP = P @ P.T
        unit = max(float(mu.sum()) / dim, 1e-300)
        for g, ridge in enumerate(RIDGE_GRID):
            d = 1.0 / (mu + ridge * unit)          # B = V diag(d) P: z -> x
            err = yy - 2.0 * float(d @ PQ) + float(np.einsum("ij,ij->", M, (d[:, None] * PP) * d[None, :]))
            scores[g] += folds[f].count * max(err, 0.0)
    best = int(np.argmin(scores)) if usable else 2
    after = float(scores[best])
    result = {"ridge": RIDGE_GRID[best], "error_before": before / energy, "error_after": after / energy,
              "intercept": intercept, "samples": int(total), "refit": False, "map": None}
    if not usable or after >= GAIN * before:
        return result
    *second, mean = pooled(everything)
    Z, C, _ = blocks(*second, mean, mean)
    unit = max(float(np.trace(Z)) / dim, 1e-300)
    A = np.linalg.solve(Z + RIDGE_GRID[best] * unit * np.eye(dim), C).T     # x ~= A x~ (+ a)
    a = mean[:dim] - A @ mean[dim:] if intercept else None
    result.update(refit=True, map=(A, a))
    return result


def _apply(graph: GraphEditor, layer: LinearLayer, A: np.ndarray, a: np.ndarray | None) -> None:
    """``layer`` reads A x~ + a instead of x~: W -> W A, b -> b + W a."""
    W = graph.array(layer.weight)
    dtype = W.dtype
    W = W.astype(np.float64)
    if layer.op == "Conv":
        shift = W.reshape(W.shape[0], W.shape[1], -1).sum(axis=2) @ a if a is not None else None
        W = np.einsum("mc...,cd->md...", W, A)
    elif layer.op == "Gemm" and layer.attrs["transB"]:
        shift = W @ a if a is not None else None
        W = W @ A
    else:                                           # Gemm transB=0, MatMul: W is (in, out)
        shift = a @ W if a is not None else None
        W = A.T @ W
    graph.set_array(layer.weight, W.astype(dtype))
    if shift is not None:
        b = graph.array(layer.bias)
        graph.set_array(layer.bias, (b.astype(np.float64) + shift.reshape(b.shape)).astype(b.dtype))
