"""Objective "latency": what each option saves in measured onnxruntime time.

MACs are a poor proxy on CPUs (a MobileNetV2 pruned to 83 % of its MACs ran 0.56x as fast
at batch 32, bench/results/speed.md). With ``--objective latency`` every site's options are
timed: the nodes a site rewrites (a channel group's producers, per-channel path and
consumers; a split layer) are cut out as a model of their own, at the shapes they have in
the whole model (batch ``batch``), and timed as they are and rewritten to each ladder size
(pruned to the first k channels, or split into two random rank-k factors: values do not
change the time), interleaved, the fastest of several runs, one thread. A site's saving
at a size is the difference (a smaller size never taken to save less than a larger one);
between measured sizes it is interpolated. The whole model's time
is measured the same way, and a plan's cost is that time minus its sites' savings (taken as
additive, like the damages). The final model's real latency is measured by validation.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import onnx
from onnx import helper

from onnxprune.graph.index import node_names
from onnxprune.graph.layers import find_linear_layers
from onnxprune.graph.prune import prune_channels
from onnxprune.graph.shapes import tensor_shapes
from onnxprune.model import clone
from onnxprune.passes.low_rank_split import LowRankSplit
from onnxprune.runtime import make_session

log = logging.getLogger(__name__)

#: runs per variant: at least MIN_RUNS, more until a variant has taken MIN_SECONDS in all
MIN_RUNS, MAX_RUNS, MIN_SECONDS = 7, 200, 0.1


def site_model(model: onnx.ModelProto, nodes: set[str], shapes: dict, batch: int) -> onnx.ModelProto:
    """The nodes named ``nodes`` as a model: inputs are the activations they read that none of
    them makes (shapes of the whole model, batch ``batch``); outputs what they make for others."""
    names = node_names(model)
    chosen = [(name, node) for name, node in zip(names, model.graph.node) if name in nodes]
    inits = {t.name: t for t in model.graph.initializer}
    made = {o for _, node in chosen for o in node.output if o}
    read = [i for _, node in chosen for i in node.input if i]
    used_outside = {i for name, node in zip(names, model.graph.node) if name not in nodes for i in node.input}
    used_outside |= {o.name for o in model.graph.output}
    inputs = [t for t in dict.fromkeys(read) if t not in made and t not in inits]
    outputs = [t for _, node in chosen for t in node.output if t and t in used_outside] \
        or [chosen[-1][1].output[0]]

    def info(tensor: str):
        shape = shapes.get(tensor)
        if shape is None or any(d is None for d in shape[1:]):
            raise ValueError(f"shape of {tensor} unknown")
        return helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, [batch, *shape[1:]])

    sub_inits = [inits[i] for i in dict.fromkeys(read) if i in inits]
    graph = helper.make_graph([node for _, node in chosen], "site", [info(t) for t in inputs],
                              [helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in outputs],
                              [clone_tensor(t) for t in sub_inits])
    sub = helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = max(model.ir_version, 4)
    return sub


def clone_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    return copy


def time_models(models: list[onnx.ModelProto], *, device: str = "cpu") -> list[float]:
    """Seconds per run of each model on random inputs: the fastest of its runs (what other work
    on the machine adds is never negative), runs interleaved, one thread."""
    sessions = [make_session(m, device=device, threads=1) for m in models]
    rng = np.random.default_rng(0)
    feeds = []
    for session in sessions:
        feeds.append({i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape])
                      .astype(np.float32) for i in session.get_inputs()})
    for session, feed in zip(sessions, feeds):           # warm up
        session.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    runs = 0
    while runs < MIN_RUNS or (runs < MAX_RUNS and min(sum(t) for t in times) < MIN_SECONDS):
        for which, (session, feed) in enumerate(zip(sessions, feeds)):
            start = time.perf_counter()
            session.run(None, feed)
            times[which].append(time.perf_counter() - start)
        runs += 1
    return [float(np.min(t)) for t in times]


class LatencyCosts:
    """Measured seconds per run (batch ``batch``) of the model and saved by each site option."""

    objective = "latency"

    def __init__(self, model: onnx.ModelProto, sites, sizes_of, *, batch: int = 1, device: str = "cpu",
                 fallback=None, input_shapes: dict | None = None):
        """``sites``: the planner's sites; ``sizes_of(site)``: the sizes its ladder tries;
        ``fallback``: costs (MACs) scaled to seconds for a site that cannot be timed alone;
        ``input_shapes``: ``cost.sample_shapes`` of the data (a dynamic height and width, or
        sequence length, is timed at the data's size, not at 1)."""
        started = time.perf_counter()
        self.model = model
        self.batch = batch
        input_shapes = input_shapes or {}
        full = clone(model)
        shapes = tensor_shapes(model, input_shapes)
        for value in list(full.graph.input):
            if value.name in {t.name for t in full.graph.initializer}:
                continue
            dims = value.type.tensor_type.shape.dim
            if value.name in input_shapes:
                for dim, size in zip(dims[1:], input_shapes[value.name][1:]):
                    dim.dim_value = int(size)
            if dims and not dims[0].HasField("dim_value"):
                dims[0].dim_value = batch
        self.total = time_models([full], device=device)[0]
        self.table: dict[str, dict[int, float]] = {}
        self.untimed: dict[str, str] = {}
        self.fallback = fallback
        for site in sites:
            sizes = sorted(set(sizes_of(site)))
            try:
                base = site_model(model, set(site.nodes) | set(getattr(site.group, "reshapes", None) or ()),
                                  shapes, batch)
                variants = [self._variant(base, site, k) for k in sizes]
                measured = time_models([base] + variants, device=device)
            except Exception as exc:             # a layout this cannot cut out: scale its MAC saving
                self.untimed[site.key] = f"{type(exc).__name__}: {exc}"
                log.info("latency: %s not timed alone (%s); its MAC saving is scaled instead", site.key, exc)
                continue
            # a smaller size never saves less (what timing noise leaves non-monotone is levelled)
            savings = np.maximum.accumulate(np.maximum(measured[0] - np.asarray(measured[1:]), 0.0)[::-1])[::-1]
            self.table[site.key] = dict(zip(sizes, savings.tolist()))
            self.table[site.key][full_size(site)] = 0.0
            log.info("latency: %s %.3f ms; saves %s", site.key, 1e3 * measured[0],
                     ", ".join(f"{k}: {1e3 * s:.3f}" for k, s in sorted(self.table[site.key].items())))
        self.seconds = time.perf_counter() - started

    @staticmethod
    def _variant(base: onnx.ModelProto, site, size: int) -> onnx.ModelProto:
        variant = clone(base)
        if site.family == "prune":
            prune_channels(variant, site.group, np.arange(size))
        else:
            layer = next(la for la in find_linear_layers(variant) if la.name == site.layer.name)
            rng = np.random.default_rng(0)
            a = rng.standard_normal((layer.out_features, size))
            b = rng.standard_normal((size, layer.in_features))
            bias = None
            if layer.bias is not None:
                bias = np.zeros(layer.out_features)
            LowRankSplit(method="svd", ranks={layer.name: size})._rewrite(variant, layer, a, b, bias)
        return variant

    def saving(self, site, size: int) -> float:
        table = self.table.get(site.key)
        if table is None:
            if self.fallback is None:
                return 0.0
            return self.fallback.saving(site, size) / self.fallback.total * self.total
        sizes = sorted(table)
        return float(np.interp(size, sizes, [table[k] for k in sizes]))

    def plan_cost(self, chosen) -> float:
        """Seconds of the model with each (site, size) of ``chosen`` applied (savings added)."""
        return self.total - sum(self.saving(site, size) for site, size in chosen)


def full_size(site) -> int:
    """A site uncompressed: all its channels, or the largest useful rank of its split's form."""
    return site.size if site.family == "prune" else site.split.limit
