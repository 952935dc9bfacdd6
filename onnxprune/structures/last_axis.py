"""Channel groups along the last axis: the hidden units of a transformer's feed-forward block.

Activations of token models are [batch, tokens, features] with the features last, and their
linear layers are MatMuls with a 2-D weight (x W, W: n x m)::

    x [N, T, n] -> MatMul(W1: n x C) (+ Add b1) -> GELU -> phi [N, T, C] -> MatMul(W2: C x m)
                   producer: columns of W1,        per-unit   site        consumer: rows of W2
                   entries of b1                   ops

GELU is either one ``Gelu`` node or the exported Erf pattern ``x * 0.5 * (1 + erf(x / sqrt 2))``
(Div, Erf, Add, Mul, Mul with scalar constants): every op between producer and consumer
must act on each feature separately (elementwise with scalars or per-feature constants,
or of activations carrying the same features). The walk is the one of axis-1 groups
(``graph._Component``) with the channel axis last; ops that only make sense on axis 1
(Conv, pools, BatchNormalization, Flatten/Reshape) leave a group alone, as does anything
mixing features (LayerNormalization, Softmax, a Reshape into heads, a residual Add whose
other side is not a prunable producer), with the reason in ``skip``.

Statistics at the site are token rows: every real token of every sample is one row
(``StatRequest(axis=-1)``; padded tokens are left out by the calibration's token mask).
Attention heads (Q/K/V columns coupled with the output projection's rows) are another
structure.
"""

from __future__ import annotations

from onnxprune.graph.groups import (
    ChannelGroup,
    _Component,
    _ProducerInfo,
    component_groups,
    register_structure,
)
from onnxprune.graph.index import GraphIndex
from onnxprune.graph.layers import matmul_bias

# ops that act on axis 1 only: on [N, T, C] they would mix tokens, not keep features apart
_AXIS1_ONLY = frozenset({"Conv", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
                         "GlobalLpPool", "BatchNormalization", "InstanceNormalization", "Flatten", "Reshape"})


def _producer(index: GraphIndex, i: int) -> _ProducerInfo | None:
    """A MatMul x W (+ a bias Add) with a constant 2-D W whose output has rank >= 3."""
    node = index.nodes[i]
    if node.domain not in ("", "ai.onnx") or node.op_type != "MatMul" or len(node.input) < 2:
        return None
    weight = node.input[1]
    if not index.is_float_const(weight) or index.const(node.input[0]) is not None:
        return None
    dims = index.dims(weight)
    rank = index.rank(node.output[0])
    if len(dims) != 2 or rank is None or rank < 3:
        return None
    add = matmul_bias(index, i, dims[1])
    if add is None:
        return _ProducerInfo(weight, 1, None, node.output[0], dims[1], None)
    return _ProducerInfo(weight, 1, add[1], index.nodes[add[0]].output[0], dims[1], add[0])


class _LastAxisComponent(_Component):
    """The axis-1 walk with the channels on the last axis."""

    axis = -1
    structure = "last-axis"

    def channel_axis(self, rank: int) -> int:
        return rank - 1

    def reads_rank(self, op: str, rank: int | None) -> str | None:
        if op != "MatMul":
            return f"with {op}, which needs [N, C]"
        return None if rank is not None and rank >= 3 else f"of rank {rank}, not [N, T, C]"

    def through(self, i: int, slot: int, tensor: str, *, reached_backward: bool = False) -> bool:
        op = self.index.nodes[i].op_type
        if op in _AXIS1_ONLY:
            if not reached_backward:
                self.skip(f"{self.label(i)} reads {tensor} (features on the last axis: only MatMul "
                          "consumers and per-feature ops)")
            return False
        return super().through(i, slot, tensor, reached_backward=reached_backward)


@register_structure("last-axis")
def find_last_axis_groups(index: GraphIndex) -> list[ChannelGroup]:
    """Groups of features along the last axis of [N, T, C] activations (FFN hidden units)."""
    return component_groups(index, _producer, _LastAxisComponent)
