"""Attention heads: one coupled group across the Q, K, V projections and the output projection.

The multi-head attention of BERT-style exports (PyTorch, opset 11+), with H heads of size d
(D = H d) and x [N, T, n]::

    Q = x Wq + bq -> Reshape [N, T, H, d] -> Transpose (0, 2, 1, 3) ---\\
    K = x Wk + bk -> Reshape [N, T, H, d] -> Transpose (0, 2, 3, 1) --- MatMul -> (Div, Add mask, ...) -> Softmax
    V = x Wv + bv -> Reshape [N, T, H, d] -> Transpose (0, 2, 1, 3) --------------------------------- MatMul
      -> Transpose (0, 2, 1, 3) -> Reshape [N, T, D] = ctx (the site) -> MatMul Wo (+ bo)

Head h owns the columns h d .. (h + 1) d - 1 of Wq, Wk, Wv (and the bias entries) and the
same rows of Wo; its context columns depend on its own Q, K, V columns only. Pruning heads
keeps those columns and rows of the kept heads, sets the head count of the three
[N, T, H, d] Reshape targets to the kept count and the width of the [N, T, D] one to the
kept columns (``ChannelGroup.shape_entries``: initializers or Constant nodes), and corrects
Wo by least squares on the context statistics, ``Wo <- A_J^T Wo`` with
``A_J = S_FJ (S_JJ + ridge)^-1`` and S = E[ctx ctx^T] over real tokens (Kwon et al. 2022
rescale/reconstruct the output projection the same way). Heads are chosen whole
(``unit = d``): select-nodes ranks them by the context energy they retain
(``linalg.block_spectral_select``).

Anything else between the projections and Wo (a fused Attention op, other layouts, other
readers of Q, K, V or the context than the shape reads of their batch and sequence sizes)
is not a head group; ``find_head_groups`` only reports the layouts it recognises.
"""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from onnxprune.graph.groups import ChannelGroup, Consumer, PerChannel, Producer, register_structure
from onnxprune.graph.index import GraphIndex, attributes
from onnxprune.graph.layers import matmul_bias

# ops allowed between the Q K^T MatMul and the Softmax (scale, mask)
_SCORE_OPS = frozenset({"Div", "Mul", "Add", "Sub", "Where", "Cast"})


def constant_value(index: GraphIndex, name: str) -> np.ndarray | None:
    """The value of ``name`` when it is an initializer or a Constant node's output."""
    if index.const(name) is not None:
        return index.array(name)
    i = index.producer.get(name)
    if i is None or index.nodes[i].op_type != "Constant":
        return None
    attrs = {a.name: a for a in index.nodes[i].attribute}
    if "value" not in attrs:
        return None
    return numpy_helper.to_array(attrs["value"].t)


def shape_entry(index: GraphIndex, reshape: int, position: int) -> tuple[str, int, int] | None:
    """(tensor, offset, value) of entry ``position`` of Reshape ``reshape``'s target shape: a
    constant target, or a Concat (axis 0) whose piece holding it is a constant."""
    node = index.nodes[reshape]
    target = node.input[1] if len(node.input) > 1 else ""
    value = constant_value(index, target)
    if value is not None:
        flat = value.reshape(-1)
        return (target, position, int(flat[position])) if flat.size > position else None
    j = index.producer.get(target)
    if j is None or index.nodes[j].op_type != "Concat":
        return None
    offset = 0
    for piece in index.nodes[j].input:
        value = constant_value(index, piece)
        size = value.size if value is not None else None
        if size is None:
            shape = index.shape(piece)
            size = shape[0] if shape is not None and len(shape) == 1 else None
        if size is None:
            return None
        if offset <= position < offset + size:
            if value is None:
                return None
            return piece, position - offset, int(value.reshape(-1)[position - offset])
        offset += size
    return None


class _NotHeads(Exception):
    """The layout around an output projection is not multi-head attention we can prune."""


class _Match:
    def __init__(self, index: GraphIndex):
        self.index = index
        self.path: list[int] = []

    def producer(self, tensor: str, op: str, **checks) -> int:
        i = self.index.producer.get(tensor)
        if i is None or self.index.nodes[i].op_type != op:
            raise _NotHeads(f"{tensor} does not come from a {op}")
        if "perm" in checks and list(attributes(self.index.nodes[i]).get("perm", [])) != checks["perm"]:
            raise _NotHeads(f"{self.index.names[i]} transposes with another permutation")
        self.path.append(i)
        return i

    def readers_ok(self, tensor: str, reader: int) -> None:
        """``tensor`` is read by node ``reader`` and otherwise only by Shape nodes whose values
        are used for the batch and sequence sizes (axes 0 and 1)."""
        index = self.index
        if tensor in index.graph_outputs:
            raise _NotHeads(f"{tensor} is a graph output")
        for j, slot in index.uses.get(tensor, ()):
            if j == reader:
                continue
            node = index.nodes[j]
            if node.op_type != "Shape" or slot != 0:
                raise _NotHeads(f"{index.names[j]} ({node.op_type}) also reads {tensor}")
            for k, _ in index.uses.get(node.output[0], ()):
                gather = index.nodes[k]
                indices = constant_value(index, gather.input[1]) if gather.op_type == "Gather" and \
                    len(gather.input) > 1 else None
                if indices is None or np.any(indices.reshape(-1) >= 2):
                    raise _NotHeads(f"the shape of {tensor} is read beyond its batch and sequence sizes")


def _projection(index: GraphIndex, tensor: str, width: int) -> Producer:
    """The MatMul (+ bias Add) computing ``tensor`` = x W (+ b) with a constant W (n x width)."""
    i = index.producer.get(tensor)
    if i is None:
        raise _NotHeads(f"{tensor} is a graph input")
    node = index.nodes[i]
    bias = None
    if node.op_type == "Add":
        for slot, name in enumerate(node.input):
            other = node.input[1 - slot] if len(node.input) == 2 else ""
            j = index.producer.get(other)
            if index.is_float_const(name) and j is not None and index.nodes[j].op_type == "MatMul":
                found = matmul_bias(index, j, width)
                if found is not None and found[0] == i:
                    bias, i, node = name, j, index.nodes[j]
                    break
        else:
            raise _NotHeads(f"{tensor} is not a projection (MatMul + bias)")
    if node.op_type != "MatMul" or not index.is_float_const(node.input[1]) or index.const(node.input[0]) is not None:
        raise _NotHeads(f"{tensor} is not a MatMul with a constant weight")
    dims = index.dims(node.input[1])
    if len(dims) != 2 or dims[1] != width or index.use_count(node.input[1]) > 1:
        raise _NotHeads(f"{index.names[i]} weight is not an unshared {width}-column matrix")
    return Producer(index.names[i], node.input[1], 1, bias)


def _head_group(index: GraphIndex, o: int) -> ChannelGroup:
    """The head group whose output projection is MatMul ``o``; raises _NotHeads."""
    out = index.nodes[o]
    if not index.is_float_const(out.input[1]) or len(index.dims(out.input[1])) != 2:
        raise _NotHeads("no constant output projection")
    D = index.dims(out.input[1])[0]
    m = _Match(index)
    ctx = out.input[0]
    m.readers_ok(ctx, o)
    r3 = m.producer(ctx, "Reshape")
    t3 = m.producer(index.nodes[r3].input[0], "Transpose", perm=[0, 2, 1, 3])
    m.readers_ok(index.nodes[r3].input[0], r3)
    mm2 = m.producer(index.nodes[t3].input[0], "MatMul")
    m.readers_ok(index.nodes[t3].input[0], t3)
    probs, vh = index.nodes[mm2].input[:2]
    heads: dict[str, tuple[int, int]] = {}

    def head_input(tensor: str, reader: int, perm: list[int], role: str) -> str:
        m.readers_ok(tensor, reader)
        t = m.producer(tensor, "Transpose", perm=perm)
        m.readers_ok(index.nodes[t].input[0], t)
        r = m.producer(index.nodes[t].input[0], "Reshape")
        entry_h, entry_d = shape_entry(index, r, 2), shape_entry(index, r, 3)
        if entry_h is None or entry_d is None:
            raise _NotHeads(f"the {role} Reshape target's head count or size is computed at run time")
        heads[role] = (entry_h[2], entry_d[2])
        shape_entries.append(entry_h[:2])
        return index.nodes[r].input[0]

    shape_entries: list[tuple[str, int]] = []
    v = head_input(vh, mm2, [0, 2, 1, 3], "V")
    # probabilities: Softmax over the last axis of (Q K^T scaled and masked)
    sm = m.producer(probs, "Softmax")
    m.readers_ok(probs, mm2)
    axis = int(attributes(index.nodes[sm]).get("axis", -1))
    if axis not in (-1, 3):
        raise _NotHeads("Softmax is not over the last axis")
    tensor = index.nodes[sm].input[0]
    reader = sm
    while True:
        m.readers_ok(tensor, reader)
        i = index.producer.get(tensor)
        if i is None:
            raise _NotHeads("the attention scores come from a graph input")
        node = index.nodes[i]
        if node.op_type == "MatMul":
            mm1 = i
            m.path.append(i)
            break
        if node.op_type not in _SCORE_OPS:
            raise _NotHeads(f"{index.names[i]} ({node.op_type}) sits between Q K^T and the Softmax")
        rest = [name for name in node.input if name]
        carrier = rest[0] if node.op_type != "Where" else rest[1] if len(rest) > 1 else rest[0]
        for name in rest:
            if name == carrier:
                continue
            shape = index.shape(name) if constant_value(index, name) is None else constant_value(index, name).shape
            if shape is None or (len(shape) >= 3 and shape[len(shape) - 3] not in (1,)):
                raise _NotHeads(f"{index.names[i]} mixes in {name}, which may differ per head")
        m.path.append(i)
        tensor, reader = carrier, i
    qh, kh = index.nodes[mm1].input[:2]
    q = head_input(qh, mm1, [0, 2, 1, 3], "Q")
    k = head_input(kh, mm1, [0, 2, 3, 1], "K")
    if len(set(heads.values())) != 1:
        raise _NotHeads(f"Q, K and V are split into different heads: {heads}")
    H, d = heads["V"]
    if H * d != D or H < 2:
        raise _NotHeads(f"{H} heads of {d} do not make the output projection's {D} rows")
    entry = shape_entry(index, r3, 2)
    if entry is None or entry[2] not in (D, -1):
        raise _NotHeads("the context Reshape target's width is computed at run time")
    if entry[2] == D:
        shape_entries.append(entry[:2])
    for tensor, _ in shape_entries:
        if index.use_count(tensor) > 1:
            raise _NotHeads(f"shape constant {tensor} is shared")
    producers = [_projection(index, q, D), _projection(index, k, D), _projection(index, v, D)]
    name = f"{index.names[o]}/heads"
    return ChannelGroup(
        name=name, channels=D, site=ctx, producers=producers,
        path=[PerChannel(index.names[i], []) for i in sorted(set(m.path))],
        consumers=[Consumer(index.names[o], out.input[1], 0)], reshapes=[], skip=None, axis=-1,
        structure="heads", unit=d, shape_entries=shape_entries)


def _attention_outputs(index: GraphIndex):
    """(position, its head group, or the ``_NotHeads`` saying why not) for every MatMul that
    reads a rank-3 Reshape output, the shape of an attention output projection's input."""
    for i, node in enumerate(index.nodes):
        if node.op_type != "MatMul" or len(node.input) < 2 or index.rank(node.input[0]) != 3:
            continue
        j = index.producer.get(node.input[0])
        if j is None or index.nodes[j].op_type != "Reshape":
            continue
        try:
            yield i, _head_group(index, i)
        except _NotHeads as exc:
            yield i, exc


@register_structure("heads")
def find_head_groups(index: GraphIndex) -> list[ChannelGroup]:
    """One group per recognised multi-head attention block (see the module docstring)."""
    return [found for _, found in _attention_outputs(index) if not isinstance(found, _NotHeads)]


def head_layout_skips(index: GraphIndex) -> list[tuple[str, str]]:
    """(output projection, why not) for MatMuls after a Reshape that look like attention
    outputs but were not recognised, and fused attention ops (for ``inspect``)."""
    out = [(i, f"fused {node.op_type} op ({node.domain or 'ai.onnx'}): heads inside fused ops are not pruned "
               "(prune the unfused export, then let onnxruntime fuse it)")
           for i, node in enumerate(index.nodes)
           if node.op_type in ("Attention", "MultiHeadAttention", "PackedAttention", "GroupQueryAttention")]
    out += [(i, str(found)) for i, found in _attention_outputs(index) if isinstance(found, _NotHeads)]
    return [(index.names[i], why) for i, why in sorted(out, key=lambda row: row[0])]
