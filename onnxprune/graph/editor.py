"""The one graph editor: every rewrite of a model's top-level graph goes through it.

``GraphEditor(model, owner)`` extends the read-only ``GraphIndex`` (names, producers, uses,
constants, shapes) with the writes a pass needs, and keeps the lookups right after each:

- nodes by name and the producer / readers of every tensor (rebuilt after a structural
  change, on the next lookup);
- initializers by name in O(1): ``array`` (a copy), ``set_array`` (add or replace; IR 3
  keeps every initializer listed as a graph input, with its shape), ``remove_unused``;
- ``write_input``: a node's new value of one initializer input, copy-on-write when other
  nodes read the same initializer;
- new names: ``name(original, role)`` is ``{original}/{owner}/{role}`` (``owner`` the
  pass), made unique with ``/1``, ``/2``...;
- ``replace``/``insert_after``: new nodes where the old one stood, so topological order is
  kept without sorting.

Nothing here decides what to rewrite; passes and ``graph/prune.py`` do.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.graph.index import GraphIndex, subgraph_inputs


class GraphEditor(GraphIndex):
    """Reads and writes one model in place (see the module docstring)."""

    def __init__(self, model: onnx.ModelProto, owner: str = ""):
        super().__init__(model)
        self.owner = owner
        self._stale = False

    # lookups that follow the writes -------------------------------------------------

    def _index(self) -> None:
        """Recompute names, producers and uses after a structural change."""
        if self._stale:
            GraphIndex.__init__(self, self.model)
            self._stale = False

    def _changed(self) -> None:
        self._stale = True
        self._shapes = None

    def node(self, name: str) -> onnx.NodeProto:
        self._index()
        return super().node(name)

    def has_node(self, name: str) -> bool:
        self._index()
        return name in self.index_of

    def producer_of(self, tensor: str) -> onnx.NodeProto | None:
        """The node that outputs ``tensor`` (None: a graph input or an initializer)."""
        self._index()
        i = self.producer.get(tensor)
        return None if i is None else self.nodes[i]

    def readers(self, tensor: str) -> list[onnx.NodeProto]:
        """The nodes that read ``tensor`` (directly or inside a subgraph), in graph order."""
        self._index()
        seen: list[int] = []
        for i, _ in self.uses.get(tensor, ()):
            if i not in seen:
                seen.append(i)
        return [self.nodes[i] for i in seen]

    def use_count(self, name: str) -> int:
        self._index()
        return super().use_count(name)

    # initializers ------------------------------------------------------------------

    def has_initializer(self, name: str) -> bool:
        return name in self.inits

    def array(self, name: str) -> np.ndarray:
        """The value of initializer ``name`` (a copy); KeyError when there is none."""
        return numpy_helper.to_array(self.inits[name]).copy()

    def set_array(self, name: str, array: np.ndarray) -> None:
        """Replace (or add) initializer ``name`` with ``array``.

        IR version 3 lists every initializer as a graph input too: a new initializer gets its
        input entry, a replaced one's entry follows the new shape (so does a value_info typing it).
        """
        new = numpy_helper.from_array(np.ascontiguousarray(array), name)
        graph = self.model.graph
        if name in self.inits:
            self.inits[name].CopyFrom(new)
            tensor = self.inits[name]
        else:
            graph.initializer.append(new)
            tensor = self.inits[name] = graph.initializer[-1]
            self._changed()
        self._sync_entries(tensor)

    def _sync_entries(self, tensor: onnx.TensorProto) -> None:
        graph = self.model.graph
        for entry in [*graph.input, *graph.value_info]:
            if entry.name == tensor.name and entry.type.HasField("tensor_type"):
                entry.type.tensor_type.elem_type = tensor.data_type
                entry.type.tensor_type.shape.Clear()
                for d in tensor.dims:
                    entry.type.tensor_type.shape.dim.add().dim_value = int(d)
        if self.model.ir_version < 4 and not any(v.name == tensor.name for v in graph.input):
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))

    def write_input(self, node: onnx.NodeProto, name: str, value: np.ndarray) -> str:
        """Give ``node`` the new value of its initializer input ``name``; when other nodes read
        ``name`` too, the node gets a copy ``{name}/{owner}/copy`` instead. Returns the name
        the node now reads."""
        value = np.ascontiguousarray(value)
        if self.use_count(name) > 1:
            new_name = self.name(name, "copy")
            self.set_array(new_name, value)
            for slot, input_name in enumerate(node.input):
                if input_name == name:
                    node.input[slot] = new_name
            self._changed()
            return new_name
        self.set_array(name, value)
        return name

    def remove_unused(self) -> None:
        """Drop initializers no node (nor subgraph) reads, and their legacy graph-input entries."""
        graph = self.model.graph
        used = {o.name for o in graph.output}
        for node in graph.node:
            used.update(node.input)
            used |= subgraph_inputs(node)
        dropped = {t.name for t in graph.initializer if t.name not in used}
        if not dropped:
            return
        keep = [t for t in graph.initializer if t.name not in dropped]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        inputs = [v for v in graph.input if v.name not in dropped]
        del graph.input[:]
        graph.input.extend(inputs)
        self.inits = {t.name: t for t in graph.initializer}
        self._changed()

    # names -------------------------------------------------------------------------

    def _taken(self) -> set[str]:
        graph = self.model.graph
        taken = {n.name for n in graph.node}
        taken |= {o for n in graph.node for o in n.output}
        taken |= set(self.inits)
        taken |= {v.name for v in graph.input}
        return taken

    def fresh(self, base: str) -> str:
        """``base`` if no node, tensor or initializer has that name yet, else ``base/1``, ``base/2``..."""
        taken = self._taken()
        if base not in taken:
            return base
        i = 1
        while f"{base}/{i}" in taken:
            i += 1
        return f"{base}/{i}"

    def name(self, original: str, role: str) -> str:
        """The name of a new node or tensor: ``{original}/{owner}/{role}`` (unique)."""
        return self.fresh(f"{original}/{self.owner}/{role}" if self.owner else f"{original}/{role}")

    # nodes -------------------------------------------------------------------------

    def position(self, node: onnx.NodeProto) -> int:
        for i, other in enumerate(self.model.graph.node):
            if other is node:
                return i
        raise KeyError(f"node {node.name!r} is not in the graph")

    def replace(self, node: onnx.NodeProto, new_nodes: list[onnx.NodeProto]) -> None:
        """Put ``new_nodes`` (in order) where ``node`` stood: topological order is kept when
        they read only what ``node`` could read, and ``node``'s readers come after them."""
        graph = self.model.graph
        index = self.position(node)
        del graph.node[index]
        for offset, new in enumerate(new_nodes):
            graph.node.insert(index + offset, new)
        self._changed()

    def insert_after(self, node: onnx.NodeProto, new: onnx.NodeProto) -> None:
        """Insert ``new`` right after ``node`` (it may read ``node``'s outputs)."""
        self.model.graph.node.insert(self.position(node) + 1, new)
        self._changed()
