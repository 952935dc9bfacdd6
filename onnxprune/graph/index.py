"""Stable node identity and lookups over a model's top-level graph.

``node_names``/``name_nodes``: a unique, stable name per node, written once when a model is
loaded (nothing downstream addresses a node by position). ``GraphIndex``: names, producers,
uses, constants and (lazily) shapes of one model, for the analyses in this package.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

#: weights the passes can read and rewrite as numpy arrays
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE})
#: every floating-point tensor type (parameters counted, activations followed)
FLOAT_TENSOR_TYPES = FLOAT_TYPES | {onnx.TensorProto.BFLOAT16}


def node_names(model: onnx.ModelProto) -> list[str]:
    """A stable, unique name per top-level node: its own when unique, else ``f"{op}_{index}"``
    (``_1``, ``_2``... appended in the rare case that name is some other node's own name).

    ``name_nodes`` writes these names into the model once, when it is loaded and when the
    pipeline clones it, so that later rewrites (which insert and remove nodes) never have to
    find a node by its position.
    """
    counts: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        if node.name:
            counts[node.name] += 1
    own = {name for name, count in counts.items() if count == 1}
    names = []
    taken = set(own)
    for index, node in enumerate(model.graph.node):
        if node.name in own:
            names.append(node.name)
            continue
        name, k = f"{node.op_type}_{index}", 0
        while name in taken:
            k += 1
            name = f"{node.op_type}_{index}_{k}"
        taken.add(name)
        names.append(name)
    return names


def name_nodes(model: onnx.ModelProto) -> int:
    """Give every top-level node of ``model`` its ``node_names`` name, in place (like
    onnxoptimizer's ``set_unique_name_for_nodes``); returns how many nodes were renamed.
    Idempotent: a model whose node names are unique and non-empty is left as it is."""
    renamed = 0
    for node, name in zip(model.graph.node, node_names(model)):
        if node.name != name:
            node.name = name
            renamed += 1
    return renamed


def subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Every tensor name read inside the subgraphs of ``node`` (If/Loop/Scan bodies)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for sub in graphs:
            for inner in sub.node:
                names.update(name for name in inner.input if name)
                names |= subgraph_inputs(inner)
    return names


def attributes(node: onnx.NodeProto) -> dict:
    """The node's attributes as python values (bytes decoded to str)."""
    values = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        values[attr.name] = value
    return values


class GraphIndex:
    """Lookups over a model's top-level graph: names, producers, uses, constants, shapes."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.model = model
        self.nodes = list(graph.node)
        self.names = node_names(model)
        self.index_of = {name: i for i, name in enumerate(self.names)}
        self.inits = {t.name: t for t in graph.initializer}
        self.graph_inputs = {v.name for v in graph.input} - set(self.inits)
        self.graph_outputs = {v.name for v in graph.output}
        self.producer: dict[str, int] = {}
        self.uses: dict[str, list[tuple[int, int]]] = defaultdict(list)   # (node, slot); slot -1: subgraph
        for i, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = i
            for slot, name in enumerate(node.input):
                if name:
                    self.uses[name].append((i, slot))
            for name in subgraph_inputs(node):
                self.uses[name].append((i, -1))
        self._shapes: dict[str, tuple[int | None, ...] | None] | None = None

    # constants --------------------------------------------------------------

    def const(self, name: str) -> onnx.TensorProto | None:
        return self.inits.get(name) if name else None

    def is_float_const(self, name: str) -> bool:
        tensor = self.const(name)
        return tensor is not None and tensor.data_type in FLOAT_TYPES

    def dims(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.inits[name].dims)

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def use_count(self, name: str) -> int:
        return len(self.uses.get(name, ())) + (name in self.graph_outputs)

    # shapes -----------------------------------------------------------------

    @property
    def shapes(self) -> dict[str, tuple[int | None, ...] | None]:
        if self._shapes is None:
            from onnxprune.graph.shapes import tensor_shapes  # shapes uses this module's helpers

            self._shapes = tensor_shapes(self.model)
        return self._shapes

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def node(self, name: str) -> onnx.NodeProto:
        return self.nodes[self.index_of[name]]
