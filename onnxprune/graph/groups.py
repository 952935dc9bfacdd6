"""Channel groups: sets of channels that must be pruned together (spectral pruning, METHODS.md)::

    producer(s) --(per-channel path)--> site --(Flatten?)--> consumer(s)
    Conv/Gemm/MatMul    Relu, Clip, BN,        phi: the      Conv/Gemm/MatMul
    rows (and bias)     pools, depthwise Conv  statistics    columns (W A)

Channels are tracked as a connected component of tensors: a per-channel op joins its input
and output, an elementwise op of two activations (a residual Add) joins all its operands, a
producer starts the component and a linear consumer ends it. Anything else that reads or
writes those channels (Concat, Slice, Pad, a graph output, an unknown op) leaves the group
alone, with the reason in ``skip``.

Structures are a registry (``register_structure``): "channels" (axis 1 of CNNs and MLPs)
is here; the others are modules of ``onnxprune/structures/``. Analysis only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import numpy as np
import onnx

from onnxprune.graph.index import FLOAT_TYPES, GraphIndex, attributes
from onnxprune.graph.layers import matmul_bias

# The channel axis of every activation a group tracks ([N, C, ...] and [N, C]).
CHANNEL_AXIS = 1


# Elementwise ops of one activation: channel c of the output depends on channel c only.
_UNARY = frozenset({
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "Sigmoid", "HardSigmoid",
    "HardSwish", "Tanh", "Softplus", "Softsign", "Gelu", "Mish", "Abs", "Neg", "Exp", "Log",
    "Sqrt", "Reciprocal", "Erf", "Identity", "Dropout", "Clip",
})


# Ops that act on each channel's spatial plane separately.
_POOLS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})


# Reductions that act on each channel separately when they reduce spatial axes only
# (x.mean((2, 3)) exported as ReduceMean: a global pooling).
_REDUCES = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2",
                      "ReduceLogSumExp", "ReduceSumSquare", "ReduceProd"})


# Elementwise ops of two or more operands (with a constant: per-channel; else coupling).
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "PRelu"})


# Ops that pass values through unchanged at inference (a site may be read through them).
_PASS_THROUGH = frozenset({"Identity", "Dropout", "Flatten", "Reshape"})


@dataclasses.dataclass
class Producer:
    """A layer whose output channels are the group's: weight rows along ``axis``, bias entries."""

    node: str
    weight: str
    axis: int                 # output-channel axis of the weight
    bias: str | None          # sliced along its last axis


@dataclasses.dataclass
class PerChannel:
    """A node on the path that keeps channels apart; ``params`` are sliced along their axis."""

    node: str
    params: list[tuple[str, int]]


@dataclasses.dataclass
class Consumer:
    """A layer reading the group's channels: weight columns along ``axis``.

    ``spatial`` is H*W when the layer is reached through a Flatten of [C, H, W] (channel c
    owns columns c*spatial .. (c+1)*spatial - 1), else 1.
    """

    node: str
    weight: str
    axis: int
    spatial: int = 1


@dataclasses.dataclass
class ChannelGroup:
    """Channels that are pruned together; ``skip`` says why a group is left alone."""

    name: str
    channels: int
    site: str                 # the consumers' input before any Flatten: [N, C, H, W] or [N, C]
    producers: list[Producer]
    path: list[PerChannel]
    consumers: list[Consumer]
    reshapes: list[str]       # Reshape nodes whose constant target shape changes with C
    skip: str | None = None
    axis: int = CHANNEL_AXIS  # where the channels live in the activations: 1 ([N, C, ...]) or -1 (last)
    structure: str = "channels"   # the analysis that found the group (``structures()``)
    unit: int = 1             # channels are kept in whole blocks of this many (attention heads: head size)
    # shape constants that scale with the kept channels: (tensor, offset), the tensor an
    # initializer or a Constant node's output; entry -> entry * kept / channels
    shape_entries: list[tuple[str, int]] = dataclasses.field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return self.skip is None


# Structures: each analysis finds the channel groups of one kind, registered by name (like
# the criteria). "channels" (below) is the channel axis 1 of CNNs and MLPs; the others live
# in ``onnxprune/structures/`` (one module each, imported when the registry is first read),
# e.g. ``structures/last_axis.py``: groups along the last axis of [batch, tokens, features].
_STRUCTURES: dict[str, Callable[[GraphIndex], list[ChannelGroup]]] = {}


_STRUCTURES_DISCOVERED = False


def register_structure(name: str):
    """Register ``finder(index) -> [ChannelGroup]`` under ``name``."""
    def wrap(finder):
        if name in _STRUCTURES and _STRUCTURES[name] is not finder:
            raise TypeError(f"structure {name!r} is registered twice")
        _STRUCTURES[name] = finder
        return finder
    return wrap


def structures() -> dict[str, Callable[[GraphIndex], list[ChannelGroup]]]:
    """Every registered structure finder: "channels" first, then ``onnxprune.structures.*``."""
    global _STRUCTURES_DISCOVERED
    if not _STRUCTURES_DISCOVERED:
        _STRUCTURES_DISCOVERED = True
        import importlib
        import pkgutil

        package = importlib.import_module("onnxprune.structures")
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"onnxprune.structures.{info.name}")
    return _STRUCTURES


def find_channel_groups(model: onnx.ModelProto) -> list[ChannelGroup]:
    """Every group of coupled channels of every registered structure, in graph order of
    their first producer; ``skip`` says why a group is left alone."""
    index = GraphIndex(model)
    found = []
    for finder in structures().values():
        found += finder(index)
    # a skipped group whose producers another structure prunes (Q, K, V in attention heads) is noise
    pruned = {p.node for g in found if g.skip is None for p in g.producers}
    found = [g for g in found if g.skip is None or not g.producers or any(p.node not in pruned for p in g.producers)]
    order = {name: i for i, name in enumerate(index.names)}
    return sorted(found, key=lambda g: order.get(g.producers[0].node if g.producers else g.name, len(order)))


def component_groups(index: GraphIndex, producer: Callable, component: type) -> list[ChannelGroup]:
    """One group per connected component of channels, walked by ``component`` (a ``_Component``
    class) from each unvisited producer, i.e. node i with ``producer(index, i)`` not None
    (a ``_ProducerInfo``)."""
    starts = {}
    for i in range(len(index.nodes)):
        info = producer(index, i)
        if info is not None:
            starts[i] = info
    seen: set[int] = set()
    groups = []
    for i in starts:
        if i in seen:
            continue
        group, members = component(index, starts).build(i)
        seen |= members
        groups.append(group)
    return groups


@register_structure("channels")
def find_axis1_groups(index: GraphIndex) -> list[ChannelGroup]:
    """Groups along axis 1 ([N, C, ...] and [N, C]): Conv/Gemm/MatMul producers through
    per-channel ops (BN, pools, depthwise Conv, Flatten) to linear consumers."""
    return component_groups(index, _producer, _Component)


@dataclasses.dataclass
class _ProducerInfo:
    weight: str
    axis: int
    bias: str | None
    output: str               # the tensor carrying the channels (after an absorbed bias Add)
    channels: int
    bias_add: int | None      # node index of a MatMul's bias Add


def _producer(index: GraphIndex, i: int) -> _ProducerInfo | None:
    """How node ``i`` produces channels, or None when it is not a prunable producer."""
    node = index.nodes[i]
    if node.domain not in ("", "ai.onnx") or len(node.input) < 2 or not node.output[0]:
        return None
    weight = node.input[1]
    if not index.is_float_const(weight) or index.const(node.input[0]) is not None:
        return None
    dims = index.dims(weight)
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and not index.is_float_const(bias):
        return None
    if node.op_type == "Conv":
        if len(dims) < 3 or int(attributes(node).get("group", 1)) != 1:
            return None
        return _ProducerInfo(weight, 0, bias, node.output[0], dims[0], None)
    if node.op_type == "Gemm":
        if len(dims) != 2:
            return None
        axis = 0 if int(attributes(node).get("transB", 0)) else 1
        channels = dims[axis]
        if bias is not None and (not index.dims(bias) or index.dims(bias)[-1] != channels):
            bias = None     # a broadcast bias is the same for every channel: nothing to slice
        return _ProducerInfo(weight, axis, bias, node.output[0], channels, None)
    if node.op_type == "MatMul":
        if len(dims) != 2 or index.rank(node.output[0]) != 2:
            return None
        add = matmul_bias(index, i, dims[1])
        if add is None:
            return _ProducerInfo(weight, 1, None, node.output[0], dims[1], None)
        return _ProducerInfo(weight, 1, add[1], index.nodes[add[0]].output[0], dims[1], add[0])
    return None


class _Component:
    """Walks the tensors that carry one set of channels, from one producer outwards.

    Channels live on axis 1 here; a structure with channels elsewhere subclasses this and
    overrides ``channel_axis``, ``reads_rank`` and ``through`` (``structures/last_axis.py``)."""

    axis = CHANNEL_AXIS
    structure = "channels"

    def channel_axis(self, rank: int) -> int:
        """The channel axis of an activation of ``rank``."""
        return CHANNEL_AXIS

    def reads_rank(self, op: str, rank: int | None) -> str | None:
        """Why a Gemm/MatMul consumer cannot read the group's channels from a tensor of
        ``rank`` (None: it can): here only [N, C]."""
        return None if rank == 2 else f"of rank {rank}, not [N, C]"

    def __init__(self, index: GraphIndex, starts: dict[int, _ProducerInfo]):
        self.index = index
        self.starts = starts
        self.by_output = {info.output: i for i, info in starts.items()}
        self.done: set[int] = set()           # path nodes, consumers and ignored readers, handled once
        self.carriers: dict[int, list[str]] = {}   # elementwise node -> inputs carrying the channels
        self.mode: dict[str, int] = {}        # tensor -> spatial factor folded into axis 1 (1: not flattened)
        self.queue: list[str] = []
        self.producers: dict[int, Producer] = {}
        self.path: dict[int, PerChannel] = {}
        self.consumers: dict[int, Consumer] = {}
        self.reshapes: dict[int, str] = {}
        self.couplings: list[int] = []
        self.reasons: list[str] = []

    # bookkeeping ------------------------------------------------------------

    def name(self, i: int) -> str:
        return self.index.names[i]

    def label(self, i: int) -> str:
        return f"{self.index.nodes[i].op_type} {self.name(i)}"

    def skip(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)

    def add(self, tensor: str, spatial: int = 1) -> None:
        if tensor in self.mode:
            if self.mode[tensor] != spatial:
                self.skip(f"{tensor} is reached both flattened and not")
            return
        self.mode[tensor] = spatial
        self.queue.append(tensor)

    # walk -------------------------------------------------------------------

    def build(self, start: int) -> tuple[ChannelGroup, set[int]]:
        info = self.starts[start]
        self.channels = info.channels
        self.add_producer(start)
        while self.queue:
            tensor = self.queue.pop(0)
            self.backward(tensor)
            self.forward(tensor)
        return self.result(start), set(self.producers)

    def add_producer(self, i: int) -> None:
        info = self.starts[i]
        if info.channels != self.channels:
            self.skip(f"{self.label(i)} has {info.channels} channels, the group {self.channels}")
        self.producers[i] = Producer(self.name(i), info.weight, info.axis, info.bias)
        self.add(info.output)

    def backward(self, tensor: str) -> None:
        """Where do the channels of ``tensor`` come from?"""
        index = self.index
        if tensor in index.graph_inputs:
            self.skip(f"reaches the graph input {tensor}")
            return
        i = index.producer.get(tensor)
        if i is None or i in self.done:
            return
        if tensor in self.by_output:
            if self.by_output[tensor] not in self.producers:
                if self.mode[tensor] != 1:
                    self.skip(f"{self.label(i)} feeds the flattened {tensor} from outside the group")
                self.add_producer(self.by_output[tensor])
            return
        if self.mode[tensor] != 1:
            self.skip(f"{self.label(i)} feeds the flattened {tensor} from outside the group")
            return
        node = index.nodes[i]
        if node.op_type in ("Flatten", "Reshape"):
            self.skip(f"{self.label(i)} feeds {tensor} from upstream")
            return
        slots = [s for s, name in enumerate(node.input) if name and index.const(name) is None]
        # prefer an input known to carry C channels over one broadcast along them
        slots.sort(key=lambda s: {self.channels: 0, None: 1}.get(self.channel_size(node.input[s], tensor), 2))
        if not slots or node.output[0] != tensor:
            self.skip(f"channels of {tensor} come from {self.label(i)}, not a prunable producer "
                      "(Conv with group 1, Gemm or MatMul with a constant weight)")
            return
        # classify the node as if reached from its first activation input
        if not self.through(i, slots[0], node.input[slots[0]], reached_backward=True):
            self.skip(f"channels of {tensor} come from {self.label(i)}, not a prunable producer "
                      "(Conv with group 1, Gemm or MatMul with a constant weight)")

    def channel_size(self, name: str, reference: str) -> int | None:
        """Size of ``name`` along the channel axis of ``reference`` (numpy broadcasting), if known."""
        shape, rank = self.index.shape(name), self.index.rank(reference)
        if shape is None or rank is None:
            return None
        axis = self.channel_axis(rank) - (rank - len(shape))
        return shape[axis] if axis >= 0 else 1

    def forward(self, tensor: str) -> None:
        """Who reads the channels of ``tensor``?"""
        index = self.index
        if tensor in index.graph_outputs:
            self.skip(f"{tensor} is a graph output")
        for i, slot in index.uses.get(tensor, ()):
            if slot < 0:
                self.skip(f"{tensor} is read inside a subgraph of {self.label(i)}")
                continue
            if i in self.done:
                continue
            self.through(i, slot, tensor)

    def through(self, i: int, slot: int, tensor: str, *, reached_backward: bool = False) -> bool:
        """Handle node ``i`` reading ``tensor`` at input ``slot``. Returns False for an op
        that neither carries nor consumes channels (the caller records why)."""
        index = self.index
        node = index.nodes[i]
        op = node.op_type
        spatial = self.mode.get(tensor, 1)
        if node.domain not in ("", "ai.onnx"):
            self.skip(f"{self.label(i)} (domain {node.domain}) reads {tensor}")
            return False
        if spatial > 1:
            return self.through_flat(i, slot, tensor, spatial)

        # linear consumers (and grouped convs) ---------------------------------
        if op in ("Conv", "Gemm", "MatMul") and not reached_backward:
            if op == "Conv" and slot == 0 and self.depthwise(i):
                self.per_channel(i, self.depthwise_params(i))
                return True
            self.consumer(i, slot, tensor, spatial)
            return True
        if op == "Conv" and reached_backward and slot == 0 and self.depthwise(i):
            self.per_channel(i, self.depthwise_params(i))
            return True

        # per-channel ops ------------------------------------------------------
        if op in _REDUCES and slot == 0 and self.spatial_reduction(i, tensor):
            self.per_channel(i, [])
            return True
        if op in _UNARY or op in _POOLS or op == "BatchNormalization" or op == "InstanceNormalization":
            if slot != 0:
                self.skip(f"{self.label(i)} reads {tensor} as a parameter")
                return False
            params = self.unary_params(i, tensor)
            if params is None:
                return False
            self.per_channel(i, params)
            return True
        if op in _BINARY:
            return self.elementwise(i, tensor)
        if op in ("Flatten", "Reshape") and not reached_backward:
            return self.flatten(i, slot, tensor)
        if op == "Shape" and not reached_backward and self.shape_is_benign(i, tensor):
            self.done.add(i)
            return True
        if reached_backward:
            return False
        if op == "Concat":
            self.skip(f"Concat {self.name(i)} joins branches at channel offsets (not supported)")
        else:
            self.skip(f"{self.label(i)} reads {tensor} (not a per-channel op, an Add or a linear layer)")
        return False

    def through_flat(self, i: int, slot: int, tensor: str, spatial: int) -> bool:
        """After a Flatten ([N, C*spatial]): only pass-through ops and Gemm/MatMul."""
        node = self.index.nodes[i]
        if node.op_type in ("Gemm", "MatMul"):
            self.consumer(i, slot, tensor, spatial)
            return True
        if node.op_type in ("Identity", "Dropout") and slot == 0:
            if self.unary_params(i, tensor) is None:
                return False
            self.per_channel(i, [], spatial)
            return True
        if node.op_type in ("Flatten", "Reshape"):
            return self.flatten(i, slot, tensor)
        self.skip(f"{self.label(i)} reads the flattened {tensor} (only Identity/Dropout may sit "
                  "between a Flatten and its Gemm/MatMul)")
        return False

    def per_channel(self, i: int, params: list[tuple[str, int]], spatial: int = 1) -> None:
        self.done.add(i)
        node = self.index.nodes[i]
        self.path[i] = PerChannel(self.name(i), params)
        for out in node.output[:1]:
            if out:
                self.add(out, spatial)
        for name in node.input:     # an input that shares the channels (walked backward)
            if name and self.index.const(name) is None and name not in self.mode and self.carries(i, name):
                self.add(name, spatial)
        if any(out and self.index.uses.get(out) for out in node.output[1:]):
            self.skip(f"{self.label(i)} has a second output in use")

    def carries(self, i: int, name: str) -> bool:
        """Whether input ``name`` of path node ``i`` carries the group's channels."""
        node = self.index.nodes[i]
        return name in self.carriers.get(i, node.input[:1])

    # consumers --------------------------------------------------------------

    def consumer(self, i: int, slot: int, tensor: str, spatial: int) -> None:
        index = self.index
        node = index.nodes[i]
        op = node.op_type
        self.done.add(i)
        label = self.label(i)
        if slot != 0:
            self.skip(f"{label} reads {tensor} as input {slot}, not as its data input")
            return
        weight = node.input[1] if len(node.input) > 1 else ""
        if not index.is_float_const(weight):
            self.skip(f"{label} reads {tensor} but its weight is not a constant")
            return
        dims = index.dims(weight)
        attrs = attributes(node)
        if op == "Conv":
            group = int(attrs.get("group", 1))
            if group != 1:
                self.skip(f"grouped Conv {self.name(i)} (group={group}) mixes channels")
                return
            axis = 1
        else:
            if len(dims) != 2:
                self.skip(f"{label} has a {len(dims)}-D weight")
                return
            problem = self.reads_rank(op, index.rank(tensor))
            if problem:
                self.skip(f"{label} reads {tensor} {problem}")
                return
            if op == "Gemm":
                if int(attrs.get("transA", 0)):
                    self.skip(f"{label} has transA=1")
                    return
                axis = 1 if int(attrs.get("transB", 0)) else 0
            else:
                axis = 0
        if dims[axis] != self.channels * spatial:
            self.skip(f"{label} has {dims[axis]} input columns, expected {self.channels} x {spatial}")
            return
        self.consumers[i] = Consumer(self.name(i), weight, axis, spatial)

    # per-channel details ----------------------------------------------------

    def depthwise(self, i: int) -> bool:
        """A Conv with group == C_in == C_out and a constant weight (channel c -> channel c)."""
        node = self.index.nodes[i]
        weight = node.input[1] if len(node.input) > 1 else ""
        if not self.index.is_float_const(weight):
            return False
        dims = self.index.dims(weight)
        group = int(attributes(node).get("group", 1))
        return group == self.channels and len(dims) >= 3 and dims[0] == self.channels and dims[1] == 1 \
            and group > 1

    def depthwise_params(self, i: int) -> list[tuple[str, int]]:
        node = self.index.nodes[i]
        params = [(node.input[1], 0)]
        if len(node.input) > 2 and node.input[2]:
            if not self.index.is_float_const(node.input[2]):
                self.skip(f"{self.label(i)} has a non-constant bias")
            params.append((node.input[2], 0))
        return params

    def spatial_reduction(self, i: int, tensor: str) -> bool:
        """Whether reduction node ``i`` reduces spatial axes only (axes >= 2, given as an attribute
        or a constant input): then channel c of its output is a function of channel c alone, and
        the channel axis stays axis 1 (keepdims or not)."""
        index = self.index
        node = index.nodes[i]
        rank = index.rank(tensor)
        axes = attributes(node).get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            constant = index.const(node.input[1])
            axes = None if constant is None else index.array(node.input[1]).reshape(-1).tolist()
        if rank is None or not axes:
            return False
        return all(2 <= (int(a) % rank) for a in axes)

    def unary_params(self, i: int, tensor: str) -> list[tuple[str, int]] | None:
        """Parameters to slice for a one-activation op, or None (reason recorded)."""
        index = self.index
        node = index.nodes[i]
        op = node.op_type
        label = self.label(i)
        attrs = attributes(node)
        extra = [name for name in node.input[1:] if name]
        if op == "Clip" or op == "Dropout":
            for name in extra:
                tensor_ = index.const(name)
                if tensor_ is None:
                    self.skip(f"{label} has a non-constant {'bound' if op == 'Clip' else 'input'} {name}")
                    return None
                if op == "Clip" and int(np.prod(tensor_.dims)) != 1:
                    self.skip(f"{label} has a non-scalar bound {name}")
                    return None
            if op == "Dropout" and len(node.input) > 2 and node.input[2] and index.array(node.input[2]).any():
                self.skip(f"{label} runs in training mode")
                return None
            return []
        if op in ("BatchNormalization", "InstanceNormalization"):
            if int(attrs.get("training_mode", 0)):
                self.skip(f"{label} runs in training mode")
                return None
            params = []
            for name in extra:
                if not index.is_float_const(name) or index.dims(name) != (self.channels,):
                    self.skip(f"{label} parameter {name} is not a constant of {self.channels} entries")
                    return None
                params.append((name, 0))
            return params
        if op in _POOLS:
            rank = index.rank(tensor)
            if rank is not None and rank < 3:
                self.skip(f"{label} reads {tensor} of rank {rank}")
                return None
            return []
        if extra:
            self.skip(f"{label} has extra inputs")
            return None
        return []

    def elementwise(self, i: int, tensor: str) -> bool:
        """An elementwise op: with constants it is per-channel; with other activations of C
        channels it couples them (a residual Add)."""
        index = self.index
        node = index.nodes[i]
        label = self.label(i)
        if node.op_type == "PRelu" and node.input[0] != tensor:
            self.skip(f"{label} reads {tensor} as its slope")
            return False
        rank = index.rank(tensor)
        params: list[tuple[str, int]] = []
        carriers = [tensor]
        for name in node.input:
            if not name or name == tensor:
                continue
            const = index.const(name)
            shape = index.dims(name) if const is not None else index.shape(name)
            if shape is None or rank is None:
                self.skip(f"{label}: cannot tell how {name} broadcasts (unknown shape)")
                return False
            if len(shape) > rank:
                self.skip(f"{label} broadcasts {tensor} to a higher rank")
                return False
            axis = self.channel_axis(rank) - (rank - len(shape))
            size = shape[axis] if axis >= 0 else 1
            if size == 1 and (const is not None or self.channels != 1):
                continue        # the same value for every channel
            if size is None and const is None:
                carriers.append(name)   # assume it carries the channels; its source decides
                continue
            if size != self.channels:
                self.skip(f"{label}: {name} has {size} entries on the channel axis, the group {self.channels}")
                return False
            if const is not None:
                if const.data_type not in FLOAT_TYPES:
                    self.skip(f"{label}: constant {name} is not floating point")
                    return False
                params.append((name, axis))
            else:
                carriers.append(name)
        self.carriers[i] = carriers
        if len(carriers) > 1:
            self.couplings.append(i)
        self.per_channel(i, params)
        return True

    def flatten(self, i: int, slot: int, tensor: str) -> bool:
        """Flatten/Reshape of [N, C, *spatial] to [N, C*spatial] (channel-major)."""
        index = self.index
        node = index.nodes[i]
        label = self.label(i)
        if slot != 0:
            self.skip(f"{label} takes {tensor} as its shape")
            return False
        before, after = index.shape(tensor), index.shape(node.output[0])
        if before is None or after is None or None in before[1:] or None in after[1:]:
            self.skip(f"{label}: unknown shape around it")
            return False
        flat = self.mode.get(tensor, 1)
        if node.op_type == "Flatten":
            axis = int(attributes(node).get("axis", 1))
            if axis < 0:
                axis += len(before)
            if axis != 1:
                self.skip(f"{label} flattens at axis {axis}, not 1")
                return False
        if len(after) != 2 or after[1] != math.prod(before[1:]) or before[0] != after[0]:
            self.skip(f"{label} does not flatten [N, C, ...] to [N, C*...] (channel-major order)")
            return False
        if node.op_type == "Reshape":
            if reshape_entry(self.index, i) is None:
                self.skip(f"{label}: its target shape is computed at run time")
                return False
            self.reshapes[i] = self.name(i)
        spatial = flat * math.prod(before[2:])
        self.done.add(i)
        self.path[i] = PerChannel(self.name(i), [])
        self.add(node.output[0], spatial)
        return True

    def shape_is_benign(self, i: int, tensor: str) -> bool:
        """A Shape whose values are only read away from the channel axis (e.g. the batch size)."""
        index = self.index
        node = index.nodes[i]
        rank = index.rank(tensor)
        if rank is None:
            return False
        attrs = attributes(node)
        start = int(attrs.get("start", 0))
        end = int(attrs.get("end", rank))
        start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
        start, end = max(0, min(start, rank)), max(0, min(end, rank))
        channel = self.channel_axis(rank)
        if not start <= channel < end:
            return True
        position = channel - start
        for j, slot in index.uses.get(node.output[0], ()):
            gather = index.nodes[j]
            if gather.op_type != "Gather" or slot != 0 or int(attributes(gather).get("axis", 0)) != 0:
                return False
            if index.const(gather.input[1]) is None:
                return False
            indices = index.array(gather.input[1]).ravel()
            length = end - start
            if any(int(k) % length == position for k in indices):
                return False
        return node.output[0] not in index.graph_outputs

    # result -----------------------------------------------------------------

    def sites(self) -> list[str]:
        """Each consumer's input, read back through Flatten/Reshape/Identity/Dropout on the path."""
        index = self.index
        sites = []
        for i in sorted(self.consumers):
            tensor = index.nodes[i].input[0]
            while True:
                j = index.producer.get(tensor)
                if j is None or j not in self.path or index.nodes[j].op_type not in _PASS_THROUGH:
                    break
                tensor = index.nodes[j].input[0]
            if tensor not in sites:
                sites.append(tensor)
        return sites

    def result(self, start: int) -> ChannelGroup:
        sites = self.sites()
        reasons = list(self.reasons)
        if not self.consumers and not reasons:
            reasons.append("no Conv/Gemm/MatMul reads these channels")
        if len(sites) > 1:
            if self.couplings:
                first = self.label(self.couplings[0])
                reasons.insert(0, f"{first} couples {len(self.producers)} producers and {len(self.consumers)} "
                                  f"consumers that read {len(sites)} different tensors (a residual stream)")
            else:
                reasons.insert(0, f"consumers read {len(sites)} different tensors ({', '.join(sites[:3])})")
        skip = None
        if reasons:
            skip = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")
        order = sorted(self.producers)
        return ChannelGroup(
            name=self.name(order[0]) if order else self.name(start),
            channels=int(self.channels),
            site=sites[0] if sites else self.starts[start].output,
            producers=[self.producers[i] for i in order],
            path=[self.path[i] for i in sorted(self.path)],
            consumers=[self.consumers[i] for i in sorted(self.consumers)],
            reshapes=[self.reshapes[i] for i in sorted(self.reshapes)],
            skip=skip,
            axis=self.axis,
            structure=self.structure,
        )


def reshape_entry(index: GraphIndex, i: int, position: int = CHANNEL_AXIS
                  ) -> tuple[int, str, int] | None:
    """Where entry ``position`` of Reshape ``i``'s target shape is stored: (node holding the
    initializer, initializer name, offset), or None when it is computed at run time.

    The shape is either an initializer or a Concat (axis 0) of pieces, the one holding
    ``position`` being an initializer (e.g. ``Concat(Shape(x)[0:1], [-1])``).
    """
    node = index.nodes[i]
    shape = node.input[1] if len(node.input) > 1 else ""
    if index.const(shape) is not None:
        return (i, shape, position) if index.dims(shape) and index.dims(shape)[0] > position else None
    j = index.producer.get(shape)
    if j is None or index.nodes[j].op_type != "Concat":
        return None
    concat = index.nodes[j]
    offset = 0
    for piece in concat.input:
        dims = index.dims(piece) if index.const(piece) is not None else index.shape(piece)
        if dims is None or len(dims) != 1 or dims[0] is None:
            return None
        if offset <= position < offset + dims[0]:
            return (j, piece, position - offset) if index.const(piece) is not None else None
        offset += dims[0]
    return None


def describe_groups(groups: Iterable[ChannelGroup]) -> list[dict]:
    """JSON-able summaries of channel groups (for ``onnxprune inspect``)."""
    rows = []
    for group in groups:
        rows.append({
            "name": group.name,
            "structure": group.structure,
            "axis": group.axis,
            "unit": group.unit,
            "channels": group.channels,
            "prunable": group.skip is None,
            "skip": group.skip,
            "site": group.site,
            "producers": [{"node": p.node, "weight": p.weight, "axis": p.axis, "bias": p.bias}
                          for p in group.producers],
            "path": [{"node": p.node, "params": [[name, axis] for name, axis in p.params]} for p in group.path],
            "consumers": [{"node": c.node, "weight": c.weight, "axis": c.axis, "spatial": c.spatial}
                          for c in group.consumers],
            "reshapes": list(group.reshapes),
        })
    return rows
