"""prune_channels: the rewrite primitive of structured (channel) pruning.

Before (a group of C channels, see ``onnxprune.graph.groups.find_channel_groups``)::

    x -> producer(W_p: C rows, b_p) -> per-channel path (BN, Relu, depthwise Conv, pools)
      -> phi (C channels) [-> Flatten] -> consumer(W_c: C * spatial columns)

After, for kept channels J (|J| = k)::

    x -> producer(W_p[J], b_p[J]) -> path (params[J]) -> phi_J (k channels)
      [-> Flatten] -> consumer(W_c A)

The algebra: the consumer computes ``W_c phi``. With a reconstruction A (C x k) such that
phi ~= A phi_J, ``W_c phi ~= (W_c A) phi_J``; without one, A is the column selection
(``W_c[:, J]``), exact when the dropped channels are zero at the site. For a Conv
consumer A is applied at every spatial tap (``M[:, :, h, w] A``); through a Flatten of
[C, H, W] channel c owns columns c*H*W .. (c+1)*H*W - 1 and A is applied per position.
Everything runs in float64 and is cast back to the weight's dtype.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.errors import ModelError
from onnxprune.graph.editor import GraphEditor
from onnxprune.graph.groups import CHANNEL_AXIS, ChannelGroup, reshape_entry
from onnxprune.graph.shapes import inferred_value_info

#: owner of the names prune_channels makes: a copy of a shared initializer is ``{name}/prune/copy``
OWNER = "prune"
COPY = f"/{OWNER}/copy"


def prune_channels(model: onnx.ModelProto, group: ChannelGroup, keep: np.ndarray,
                   reconstruction: np.ndarray | None = None) -> None:
    """Keep channels ``keep`` of ``group`` in ``model`` (in place).

    keep: (k,) distinct channel indices in [0, C); their order is the new channel order.
    reconstruction: (C, k) matrix A with phi ~= A phi_keep, or None for plain column
    selection. Initializers shared with nodes outside the rewrite are copied under
    ``{name}/prune/copy`` first; graph inputs, outputs, ir_version and opsets are untouched.

    Raises ModelError for a skipped group, bad ``keep``/``reconstruction``, or a group
    that no longer matches the model (find the groups again after rewriting the graph).
    """
    if group.skip is not None:
        raise ModelError(group.name, f"channel group is not prunable: {group.skip}")
    channels = group.channels
    keep = _check_keep(group, keep)
    if reconstruction is not None:
        reconstruction = np.asarray(reconstruction, dtype=np.float64)
        if reconstruction.shape != (channels, len(keep)):
            raise ModelError(group.name, f"reconstruction has shape {reconstruction.shape}, "
                                         f"expected ({channels}, {len(keep)})")
        if not np.all(np.isfinite(reconstruction)):
            raise ModelError(group.name, "reconstruction has non-finite entries")

    editor = _GroupView(model, group.name)
    # Plan every write first (reading the current values and checking their sizes), so a
    # group that does not match the model raises before anything changes.
    writes: list[tuple[onnx.NodeProto, str, np.ndarray]] = []
    changed: set[str] = set()

    for producer in group.producers:
        node = editor.node(producer.node)
        weight = editor.read(node, producer.weight)
        editor.expect(weight.ndim > producer.axis and weight.shape[producer.axis] == channels,
                      f"{producer.node} weight {producer.weight}")
        writes.append((node, producer.weight, np.take(weight, keep, axis=producer.axis)))
        changed.update(out for out in node.output if out)
        if producer.bias:
            holder = editor.holder(node, producer.bias)
            bias = editor.read(holder, producer.bias)
            if bias.ndim and bias.shape[-1] == channels:
                writes.append((holder, producer.bias, np.take(bias, keep, axis=-1)))
            changed.update(out for out in holder.output if out)

    depthwise = []
    for entry in group.path:
        node = editor.node(entry.node)
        for name, axis in entry.params:
            value = editor.read(node, name)
            editor.expect(value.ndim > axis and value.shape[axis] == channels, f"{entry.node} parameter {name}")
            writes.append((node, name, np.take(value, keep, axis=axis)))
        if node.op_type == "Conv":
            depthwise.append(node)
        changed.update(out for out in node.output if out)

    for consumer in group.consumers:
        node = editor.node(consumer.node)
        weight = editor.read(node, consumer.weight)
        editor.expect(weight.ndim > consumer.axis and weight.shape[consumer.axis] == channels * consumer.spatial,
                      f"{consumer.node} weight {consumer.weight}")
        writes.append((node, consumer.weight,
                       _consumer_weight(weight, consumer.axis, consumer.spatial, keep, reconstruction)))

    if group.reshapes:
        index = editor.graph
        for name in group.reshapes:
            node = editor.node(name)
            found = reshape_entry(index, index.index_of[name], CHANNEL_AXIS)
            if found is None:
                raise ModelError(name, "the Reshape target shape is not a constant",
                                 "find the channel groups again on the current model")
            holder, init, offset = index.nodes[found[0]], found[1], found[2]
            value = _reshape_target(name, editor.read(holder, init), offset, channels, len(keep))
            if value is not None:
                writes.append((holder, init, value))
            changed.update(out for out in node.output if out)

    for tensor, offset in group.shape_entries:
        writes.append(_shape_entry_write(editor, group, tensor, offset, len(keep)))
        changed.update(out for node in editor.graph.readers(tensor) for out in node.output if out)

    for node, name, value in writes:
        if node is None:            # a Constant node's value: ``name`` is the node
            _set_constant(editor.node(name), value)
            continue
        editor.write(node, name, value)
    for node in depthwise:               # one group per kept channel
        _set_int_attribute(node, "group", len(keep))
    _refresh_value_info(model, changed)


def _check_keep(group: ChannelGroup, keep) -> np.ndarray:
    keep = np.asarray(keep)
    if keep.ndim != 1 or keep.size == 0 or not np.issubdtype(keep.dtype, np.integer):
        raise ModelError(group.name, "keep must be a non-empty 1-D array of channel indices")
    if keep.min() < 0 or keep.max() >= group.channels:
        raise ModelError(group.name, f"keep has indices outside [0, {group.channels})")
    if len(np.unique(keep)) != len(keep):
        raise ModelError(group.name, "keep has repeated channel indices")
    unit = int(getattr(group, "unit", 1))
    if unit > 1:
        blocks = keep.reshape(-1, unit) if keep.size % unit == 0 else None
        if blocks is None or np.any(blocks % unit != np.arange(unit)) or np.any(blocks // unit != blocks[:, :1] // unit):
            raise ModelError(group.name, f"keep must hold whole blocks of {unit} channels (attention heads), "
                                         "each in order")
    return keep.astype(np.int64)


def _shape_entry_write(editor: _GroupView, group: ChannelGroup, tensor: str, offset: int, kept: int):
    """The write that scales entry ``offset`` of shape constant ``tensor`` by kept / channels:
    (reader node, initializer, value), or (None, Constant node name, value)."""
    constant = editor.constant_node(tensor)
    if constant is not None:
        value = numpy_helper.to_array(next(a.t for a in constant.attribute if a.name == "value"))
    else:
        readers = editor.graph.readers(tensor)
        if not readers or not editor.graph.has_initializer(tensor):
            raise ModelError(group.name, f"shape constant {tensor} is not in the model",
                             "find the channel groups again on the current model")
        value = editor.read(readers[0], tensor)
    flat = value.reshape(-1).copy()
    old = int(flat[offset])
    if old * kept % group.channels:
        raise ModelError(group.name, f"shape entry {old} of {tensor} does not scale to {kept} of "
                                     f"{group.channels} channels")
    flat[offset] = old * kept // group.channels
    new = flat.reshape(value.shape).astype(value.dtype)
    return (None, constant.name, new) if constant is not None else (readers[0], tensor, new)


def _set_constant(node: onnx.NodeProto, value: np.ndarray) -> None:
    for attr in node.attribute:
        if attr.name == "value":
            attr.t.CopyFrom(numpy_helper.from_array(value, attr.t.name))
            return


def _consumer_weight(weight: np.ndarray, axis: int, spatial: int, keep: np.ndarray,
                     reconstruction: np.ndarray | None) -> np.ndarray:
    """W (.., C*spatial, ..) along ``axis`` -> W A per spatial position (.., k*spatial, ..)."""
    moved = np.moveaxis(weight, axis, 0)
    rest = moved.shape[1:]
    blocks = moved.reshape((moved.shape[0] // spatial, spatial) + rest)     # (C, spatial, ...)
    if reconstruction is None:
        new = blocks[keep]
    else:
        new = np.tensordot(reconstruction.T, blocks.astype(np.float64), axes=([1], [0]))  # (k, spatial, ...)
    new = new.reshape((len(keep) * spatial,) + rest)
    return np.moveaxis(new, 0, axis).astype(weight.dtype)


def _reshape_target(reshape: str, value: np.ndarray, offset: int, channels: int,
                    kept: int) -> np.ndarray | None:
    """The Reshape target shape with its channel-carrying entry (C * spatial) set to
    kept * spatial; None when that entry is 0 or -1 (copied or inferred: nothing to change)."""
    flat = value.reshape(-1)
    old = int(flat[offset])
    if old in (0, -1):
        return None
    if old % channels:
        raise ModelError(reshape, f"target shape entry {old} is not a multiple of {channels} channels",
                         "find the channel groups again on the current model")
    new = flat.copy()
    new[offset] = old // channels * kept
    return new.reshape(value.shape)


def _set_int_attribute(node: onnx.NodeProto, name: str, value: int) -> None:
    for attr in node.attribute:
        if attr.name == name:
            attr.i = value
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _refresh_value_info(model: onnx.ModelProto, changed: set[str]) -> None:
    """Drop stale value_info of the tensors whose channel count changed and re-infer them."""
    graph = model.graph
    stale = [v for v in graph.value_info if v.name in changed]
    if not stale:
        return
    keep = [v for v in graph.value_info if v.name not in changed]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    inferred = inferred_value_info(model, fix_batch=False)
    for value in stale:
        if value.name in inferred:
            graph.value_info.append(inferred[value.name])


class _GroupView:
    """The group's view of a ``GraphEditor``: nodes and initializers the group names, checked
    against the model (a group found before an earlier rewrite still applies)."""

    def __init__(self, model: onnx.ModelProto, group: str):
        self.graph = GraphEditor(model, owner=OWNER)
        self.group = group

    def constant_node(self, tensor: str) -> onnx.NodeProto | None:
        """The Constant node whose output is ``tensor``, if any."""
        node = self.graph.producer_of(tensor)
        return node if node is not None and node.op_type == "Constant" else None

    def node(self, name: str) -> onnx.NodeProto:
        if not self.graph.has_node(name):
            raise ModelError(self.group, f"node {name} is not in the model",
                             "find the channel groups again on the current model")
        return self.graph.node(name)

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            raise ModelError(self.group, f"{what} does not have the group's channel count",
                             "find the channel groups again on the current model")

    def holder(self, node: onnx.NodeProto, name: str) -> onnx.NodeProto:
        """The node that reads ``name``: ``node`` itself or the bias Add after a MatMul."""
        if any(i == name or i.startswith(name + COPY) for i in node.input):
            return node
        for other in self.graph.readers(node.output[0]):
            if other.op_type == "Add" and any(i == name or i.startswith(name + COPY) for i in other.input):
                return other
        raise ModelError(self.group, f"bias {name} of {node.name} is not in the model",
                         "find the channel groups again on the current model")

    def resolve(self, node: onnx.NodeProto, name: str) -> str:
        """The input of ``node`` that holds ``name``: itself, or its copy-on-write ``{name}/prune/copy``
        made by an earlier rewrite (so groups found before a rewrite still apply)."""
        if name in node.input and self.graph.has_initializer(name):
            return name
        copies = [i for i in node.input if i.startswith(name + COPY) and self.graph.has_initializer(i)]
        if len(copies) == 1:
            return copies[0]
        raise ModelError(self.group, f"{name} is not an initializer read by {node.name or node.op_type}",
                         "find the channel groups again on the current model")

    def read(self, node: onnx.NodeProto, name: str) -> np.ndarray:
        return self.graph.array(self.resolve(node, name))

    def write(self, node: onnx.NodeProto, name: str, value: np.ndarray) -> None:
        """Give ``node`` the new value of input ``name``, copying the initializer when others read it."""
        self.graph.write_input(node, self.resolve(node, name), value)
