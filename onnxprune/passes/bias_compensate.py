"""bias-compensate: correct the bias of every layer whose weights a pass approximated.

In one-shot mode the input means are those gathered before any rewrite (no extra pass over
the data); in sequential mode they are re-gathered layer by layer on the approximated graph,
so each layer's correction is for the inputs it actually receives: its mean output becomes
W E[x~] + b, what the original weights give on the drifted input, not the original mean
W E[x] + b (undoing the drift itself is what the correct-drift pass does).

Before:  y_hat = W_hat x + b          (W_hat = A B from low-rank-split)
After:   y_hat = W_hat x + b + (W - W_hat) x_mean

with x_mean the mean of the layer's input on the target set, so the mean output of the
approximated layer equals the original's exactly (the SVD + BC baseline of the DALR paper).
A layer whose bias low-rank-split already shifted (``dalr`` with ridge "auto" fits the bias
jointly) only gets the difference, which is zero in one-shot mode.
A layer without a bias gets one (a Gemm C input, a Conv B input, or an Add after a MatMul).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx
from onnx import helper

from onnxprune.graph.editor import GraphEditor
from onnxprune.passes.base import Approximation, Pass, PassContext, PassResult, register

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BiasCompensateOptions:
    """No options: every approximated layer is compensated."""


@register
class BiasCompensate(Pass):
    """y = W_hat x + b  ->  y = W_hat x + b + (W - W_hat) E[x]  for each approximated layer.

    Exact for the mean on the target calibration set; never worse in expectation.
    """

    name = "bias-compensate"
    Options = BiasCompensateOptions
    requires = (Approximation,)

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        entries = {name: e for name, e in ctx.approximations.items() if not e.compensated}
        if not entries:
            log.info("bias-compensate: no approximated layer to compensate")
            return PassResult(changed=False, report={"compensated": []})
        rows = []
        for name, entry in entries.items():
            if ctx.mode == "sequential":
                # The input mean as it is now, after every earlier approximation and compensation.
                mean = ctx.statistics(model, [entry.request], ("target",)).moments(entry.request, "target").mean
            else:
                # One-shot: the mean gathered with the statistics the approximation itself used.
                mean = entry.mean
            delta = (entry.weight - entry.approx) @ mean
            if entry.bias_shift is not None:
                # low-rank-split's affine DALR already added (W - W_hat) x_mean for its own
                # mean: only the rest (zero in one-shot mode) is added here.
                delta = delta - entry.bias_shift
            self._add_to_bias(model, name, entry, delta)
            entry.compensated = True
            rows.append({"layer": name, "bias_shift_norm": float(np.linalg.norm(delta))})
            log.info("bias-compensate: %s bias shifted by |delta| = %.4g (%s input mean)", name,
                     rows[-1]["bias_shift_norm"], "re-gathered" if ctx.mode == "sequential" else "calibration")
        return PassResult(changed=True, report={"compensated": rows})

    @staticmethod
    def _add_to_bias(model: onnx.ModelProto, layer: str, entry: Approximation, delta: np.ndarray) -> None:
        graph = GraphEditor(model, owner=BiasCompensate.name)
        node = graph.node(entry.node)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(graph.inits[node.input[1]].data_type)
        if entry.bias:
            bias = graph.array(entry.bias)
            graph.set_array(entry.bias, (bias + delta.reshape(bias.shape)).astype(dtype))
            return
        name = graph.name(layer, "bias")
        graph.set_array(name, delta.astype(dtype))
        entry.bias = name
        if entry.op in ("Gemm", "Conv"):
            node.input.append(name)
            return
        # MatMul without a bias: y = MatMul(...) becomes y = Add(MatMul(...), bias)
        out = node.output[0]
        hidden = graph.name(layer, "unbiased")
        node.output[0] = hidden
        graph.insert_after(node, helper.make_node("Add", [hidden, name], [out], name=graph.name(layer, "add_bias")))
