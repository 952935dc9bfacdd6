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
from onnxprune.graph.segment import float_tensors, segment
from onnxprune.model import cone_hashes, input_specs
from onnxprune.runtime import fill_batch, make_session, run_batches

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
        # Only what the output needs: walk back from it through changed tensors; unchanged
        # float activations become inputs (one row per sample, cacheable), constants and shape
        # arithmetic are recomputed inside the suffix
        cut = segment(model, names - changed, [output])
        self.inputs = cut.inputs
        suffix = cut.model
        del suffix.graph.output[1:]                    # the output only, not the frontier
        suffix.graph.name = f"{graph.name}/suffix"
        for value_info in suffix.graph.input[:len(self.inputs)]:
            value_info.type.tensor_type.ClearField("shape")   # typed from the cached values in run()
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
        # a fixed-batch model's suffix may hold its batch too (a Reshape to [1, C]): feed it as the model
        fixed = fixed_batch_of(cache.model)
        size = fixed or batch_size
        parts = []
        for start in range(0, n, size):
            feeds = {name: values[name][start:start + size] for name in self.inputs}
            rows = min(size, n - start)
            parts.append(session.run([self.output], fill_batch(feeds, fixed) if fixed and feeds else feeds)[0][:rows])
        return np.concatenate(parts)


def upstream_inputs(model: onnx.ModelProto, nodes) -> list[str]:
    """The float activations a rewrite of ``nodes`` (node names) reads from the part of the
    graph it leaves unchanged: inputs of those nodes, and of every node downstream of them,
    that none of these produces. A superset of the ``Suffix`` inputs of such a rewrite (which
    also leaves out what the measured output does not need), for fetching them ahead."""
    floats = float_tensors(model)
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

    def __init__(self, model: onnx.ModelProto, samples, *, batch_size: int = 32, device: str = "cpu",
                 judge: str | None = None):
        self.model = model
        self.samples = samples
        self.batch_size = batch_size
        self.device = device
        self.output_name = measured_output(model, judge)
        self.values: dict[str, np.ndarray] = {}
        self.runs = 0
        self._sample_bytes: dict[str, int] = {}
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
        """Bytes one sample of each of ``tensors`` takes (from one sample run through the model,
        for the tensors no earlier call measured)."""
        tensors = list(dict.fromkeys(tensors))
        missing = [t for t in tensors if t not in self._sample_bytes]
        if missing:
            exposed, names = expose(self.model, missing)
            session = make_session(exposed, device=self.device)
            _, result = next(run_batches(session, self.samples.subset(np.arange(1)), names, batch_size=1,
                                         fixed_batch=fixed_batch_of(self.model)))
            self._sample_bytes.update((t, int(v.nbytes)) for t, v in zip(missing, result))
        return {t: self._sample_bytes[t] for t in tensors}

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


def measured_output(model: onnx.ModelProto, judge: str | None = None) -> str:
    """The output whose damage the planner measures: ``judge`` (``--judge-output``), else the first
    float output (a model may echo its integer inputs as outputs first, as exported sentence
    encoders do); in a token model the first float output of rank 2 (the sentence embedding),
    see ``onnxprune.embedding``."""
    from onnxprune.embedding import measured_output as chosen

    return chosen(model, judge)


def fixed_batch_of(model: onnx.ModelProto) -> int | None:
    """The model's fixed batch size, or None when its batch dimension is free."""
    fixed = {spec.fixed_batch for spec in input_specs(model)} - {None}
    return fixed.pop() if len(fixed) == 1 else None


def reference_hashes(model: onnx.ModelProto) -> dict[str, str]:
    names = {o for node in model.graph.node for o in node.output if o}
    return cone_hashes(model, names)
