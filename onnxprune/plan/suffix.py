"""Run only what a rewrite changed: suffix models over cached activations.

A trial rewrite of one site changes a few nodes; everything upstream of them computes
exactly what the original model computes. ``Suffix`` compares the rewritten model with
the original by cone hash (model.cone_hashes: the same hash means the tensor is computed
the same way from the same inputs), keeps the nodes whose outputs changed, and turns the
unchanged tensors they read into graph inputs::

    original:    x -> [A] -> t -> [B] -> [C] -> y
    rewritten:   x -> [A] -> t -> [B'] -> [C] -> y        changed: B', C (C reads B')
    suffix:           t (input) -> [B'] -> [C] -> y

Fed with the original's values of ``t`` (``ActivationCache``), the suffix reproduces the
rewritten model's output exactly, at the cost of the changed part only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx

from onnxprune.calibration.collect import expose
from onnxprune.model import cone_hashes, input_specs
from onnxprune.runtime import make_session, run_batches

log = logging.getLogger(__name__)


class Suffix:
    """The part of ``model`` that differs from the original whose cone hashes are ``reference``.

    ``inputs``: unchanged tensors the changed part reads (to be fed from the original);
    ``model``: None when the output does not change at all.
    """

    def __init__(self, model: onnx.ModelProto, reference: dict[str, str], output: str):
        graph = model.graph
        names = {o for node in graph.node for o in node.output if o}
        hashes = cone_hashes(model, names)
        changed = {name for name in names if reference.get(name) != hashes[name]}
        self.output = output
        if output not in changed:
            self.inputs: list[str] = []
            self.model = None
            return
        # Only what the output needs: walk back from it through changed tensors. Unchanged
        # float activations become inputs (one row per sample, cacheable); constants and
        # shape arithmetic (int tensors, e.g. Pad's pads) are recomputed inside the suffix.
        producer = {o: node for node in graph.node for o in node.output if o}
        needed_nodes: set[int] = set()
        boundary: dict[str, None] = {}
        inits = {t.name for t in graph.initializer}
        graph_inputs = {v.name for v in graph.input} - inits
        floats = _float_tensors(model)
        stack = [output]
        seen = set()
        while stack:
            tensor = stack.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            node = producer[tensor]
            needed_nodes.add(id(node))
            for name in node.input:
                if not name or name in inits:
                    continue
                if name in changed or (name not in graph_inputs and name not in floats):
                    stack.append(name)
                else:
                    boundary[name] = None
        nodes = [node for node in graph.node if id(node) in needed_nodes]
        used = {name for node in nodes for name in node.input}
        self.inputs = sorted(boundary)
        suffix = onnx.ModelProto()
        suffix.ir_version = model.ir_version
        suffix.opset_import.extend(model.opset_import)
        g = suffix.graph
        g.name = f"{graph.name}/suffix"
        g.node.extend(nodes)
        g.initializer.extend(t for t in graph.initializer if t.name in used)
        for name in self.inputs:
            g.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        if model.ir_version < 4:       # IR 3: initializers are graph inputs too
            g.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                           for t in g.initializer)
        out = next((o for o in graph.output if o.name == output), None)
        g.output.append(out if out is not None else onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
        self.model = suffix

    def run(self, cache: ActivationCache, *, batch_size: int = 64, device: str = "cpu") -> np.ndarray:
        """The rewritten model's output on the cached samples."""
        if self.model is None:
            return cache.output
        values = cache.get(self.inputs)
        for value_info in self.model.graph.input[:len(self.inputs)]:
            # intermediate tensors need not be float (shape tensors): type them as cached
            dtype = values[value_info.name].dtype
            value_info.type.tensor_type.elem_type = onnx.helper.np_dtype_to_tensor_dtype(dtype)
        session = make_session(self.model, device=device)
        n = len(cache.output)
        parts = []
        for start in range(0, n, batch_size):
            feeds = {name: values[name][start:start + batch_size] for name in self.inputs}
            parts.append(session.run([self.output], feeds)[0])
        return np.concatenate(parts)


def upstream_inputs(model: onnx.ModelProto, nodes) -> list[str]:
    """The float activations a rewrite of ``nodes`` (node names) reads from the part of the
    graph it leaves unchanged: inputs of those nodes, and of every node downstream of them,
    that none of these produces. A superset of the ``Suffix`` inputs of such a rewrite (which
    also leaves out what the measured output does not need), for fetching them ahead."""
    floats = _float_tensors(model)
    changed: set[str] = set()
    out: dict[str, None] = {}
    for node in model.graph.node:          # topological order
        if node.name in nodes or any(i in changed for i in node.input if i):
            changed.update(o for o in node.output if o)
            out.update((i, None) for i in node.input if i and i not in changed and i in floats)
    return [t for t in out if t not in changed]


class ActivationCache:
    """Values of the original model's tensors on a fixed set of samples, fetched on demand.

    ``output``: the original's first output on the samples. ``prefetch`` fetches many
    tensors in one onnxruntime run (one run per call, however many tensors).
    """

    def __init__(self, model: onnx.ModelProto, samples, *, batch_size: int = 32, device: str = "cpu"):
        self.model = model
        self.samples = samples
        self.batch_size = batch_size
        self.device = device
        self.output_name = measured_output(model)
        self.values: dict[str, np.ndarray] = {}
        self.runs = 0
        self.output = self._run([self.output_name])[self.output_name]

    def _run(self, tensors: Sequence[str]) -> dict[str, np.ndarray]:
        exposed, names = expose(self.model, list(tensors))
        session = make_session(exposed, device=self.device)
        parts: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
        for _, result in run_batches(session, self.samples, names, batch_size=self.batch_size,
                                     fixed_batch=fixed_batch_of(self.model)):
            for tensor, value in zip(tensors, result):
                parts[tensor].append(value)
        self.runs += 1
        return {t: np.concatenate(v) for t, v in parts.items()}

    def sample_bytes(self, tensors: Sequence[str]) -> dict[str, int]:
        """Bytes one sample of each of ``tensors`` takes (from one sample run through the model)."""
        tensors = list(dict.fromkeys(tensors))
        if not tensors:
            return {}
        exposed, names = expose(self.model, tensors)
        session = make_session(exposed, device=self.device)
        _, result = next(run_batches(session, self.samples.subset(np.arange(1)), names, batch_size=1,
                                     fixed_batch=fixed_batch_of(self.model)))
        return {t: int(v.nbytes) for t, v in zip(tensors, result)}

    def prefetch(self, tensors: Sequence[str]) -> None:
        missing = [t for t in dict.fromkeys(tensors) if t not in self.values]
        if missing:
            self.values.update(self._run(missing))

    def get(self, tensors: Sequence[str]) -> dict[str, np.ndarray]:
        self.prefetch(tensors)
        return {t: self.values[t] for t in tensors}

    def drop(self, keep: Sequence[str] = ()) -> None:
        """Forget every cached tensor except ``keep`` (memory)."""
        keep = set(keep)
        self.values = {k: v for k, v in self.values.items() if k in keep}

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.values.values())


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors that hold float activations: the outputs of nodes that read a float graph
    input or a float activation (not of constant or shape arithmetic), by forward type
    propagation from the graph's float inputs."""
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                   onnx.TensorProto.BFLOAT16}
    inits = {t.name for t in model.graph.initializer}
    float_inits = {t.name for t in model.graph.initializer if t.data_type in float_types}
    live = {v.name for v in model.graph.input if v.name not in inits
            and v.type.tensor_type.elem_type in float_types}
    non_float_ops = {"Shape", "Size", "ArgMax", "ArgMin", "NonZero", "TopK"}
    for node in model.graph.node:         # topological order
        if node.op_type in non_float_ops or node.op_type.startswith("Cast"):
            if node.op_type == "Cast" and any(a.name == "to" and a.i in float_types for a in node.attribute) \
                    and any(i in live for i in node.input):
                live.update(o for o in node.output if o)
            continue
        embedding = node.op_type == "Gather" and node.input[0] in float_inits   # int ids -> float rows
        if embedding or any(i in live for i in node.input if i):
            live.update(o for o in node.output if o)
    return live


def measured_output(model: onnx.ModelProto) -> str:
    """The output whose damage the planner measures: the first float output (a model may echo
    its integer inputs as outputs first, as exported sentence encoders do); in a token model
    the first float output of rank 2 (the sentence embedding), see ``onnxprune.embedding``."""
    from onnxprune.embedding import measured_output as chosen

    return chosen(model)


def fixed_batch_of(model: onnx.ModelProto) -> int | None:
    """The model's fixed batch size, or None when its batch dimension is free."""
    fixed = {spec.fixed_batch for spec in input_specs(model)} - {None}
    return fixed.pop() if len(fixed) == 1 else None


def reference_hashes(model: onnx.ModelProto) -> dict[str, str]:
    names = {o for node in model.graph.node for o in node.output if o}
    return cone_hashes(model, names)
