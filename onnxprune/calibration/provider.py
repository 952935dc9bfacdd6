"""Statistics on demand for a graph that passes keep rewriting.

The pipeline gathers every statistic its passes announce in one onnxruntime pass per
sample set before the first rewrite. A pass then asks for statistics of the *current*
graph; an entry is reused while the subgraph computing its tensor is unchanged (same
cone hash), and re-gathered on the current graph otherwise, which is what sequential
pruning needs (later layers see the already-compressed upstream).

With an activation store (``activation_bytes`` > 0), a run also keeps the activations at its
frontier (what the nodes after the computed part read), by cone hash. A later request whose
tensors lie downstream of stored ones runs only the graph in between (``graph/segment.py``):
correct-drift asks for one tensor after another, each on the model corrected so far, and
then computes each layer once instead of the whole prefix per tensor.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import onnx

from onnxprune.calibration.collect import collect, token_mask_input
from onnxprune.calibration.moments import Moments
from onnxprune.calibration.requests import StatRequest
from onnxprune.calibration.stats import Statistics
from onnxprune.cost import sample_shapes
from onnxprune.data.samples import Feeds
from onnxprune.errors import CalibrationError, DataError
from onnxprune.graph.segment import float_tensors, segment
from onnxprune.model import cone_hashes, input_specs

log = logging.getLogger(__name__)


class StatsView:
    """Read-only view over several Statistics objects, keyed like Statistics.moments."""

    def __init__(self, entries: dict[tuple[str, str], Statistics]):
        self._entries = entries

    def moments(self, request: StatRequest, set: str = "target", fold: int | None = None) -> Moments:
        try:
            stats = self._entries[(set, request.key)]
        except KeyError:
            raise CalibrationError(request.tensor, f"no {set} statistics gathered for {request.key}") from None
        return stats.moments(request, set=set, fold=fold)


#: default byte budget of a provider's activation store (per sample set)
ACTIVATION_BYTES = 1 << 30


class ActivationStore:
    """Activations of one sample set (every sample, in order) by cone hash, least recently
    used dropped first past ``max_bytes``; the set's decoded inputs count against it too."""

    def __init__(self, samples, max_bytes: int):
        self.samples = samples
        self.max_bytes = int(max_bytes)
        self.values: OrderedDict[str, np.ndarray] = OrderedDict()
        self.nbytes = 0                 # of ``values``
        self._inputs: dict[str, np.ndarray] | None = None
        self._input_bytes = 0           # of ``_inputs``
        self.usable = self.max_bytes > 0

    def inputs(self) -> dict[str, np.ndarray] | None:
        """The samples' model inputs, decoded once (None once they proved too large)."""
        if self._inputs is None and self.usable:
            first = self.samples.batch(np.arange(1))
            if sum(v.nbytes for v in first.values()) * len(self.samples) > self.max_bytes // 2:
                self.usable = False
                return None
            self._inputs = self.samples.batch(np.arange(len(self.samples)))
            self._input_bytes = sum(v.nbytes for v in self._inputs.values())
        return self._inputs

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def get(self, key: str) -> np.ndarray:
        self.values.move_to_end(key)
        return self.values[key]

    def room(self) -> int:
        """Bytes the stored activations may take (the budget less the decoded inputs)."""
        return max(self.max_bytes - self._input_bytes, 0)

    def put(self, key: str, value: np.ndarray) -> None:
        budget = self.room()
        if value.nbytes > budget:
            return
        if key in self.values:
            self.nbytes -= self.values.pop(key).nbytes
        self.values[key] = value
        self.nbytes += value.nbytes
        while self.nbytes > budget:
            self.nbytes -= self.values.popitem(last=False)[1].nbytes


class StatsProvider:
    """Collects statistics lazily and caches them with the cone hash of their tensor."""

    def __init__(self, samples: dict, *, batch_size: int = 32, folds: int = 2, device: str = "cpu",
                 progress: bool = True, seed: int = 0, preloaded: Statistics | None = None,
                 preloaded_model: onnx.ModelProto | None = None, engine: str = "auto",
                 mask: str | None = "auto", activation_bytes: int = ACTIVATION_BYTES):
        self.samples = samples
        self.batch_size = batch_size
        self.folds = folds
        self.device = device
        self.progress = progress
        self.seed = seed
        self.engine = engine          # collect(engine=): "auto", "graph" (in onnxruntime) or "numpy"
        self.mask = mask              # collect(mask=): the token-mask input ("auto": attention_mask if present)
        self.collections = 0          # onnxruntime passes run (per sample set), for reports
        self.activation_bytes = int(activation_bytes)     # the store's budget per sample set
        self._cache: dict[tuple[str, str], tuple[str, Statistics]] = {}
        self._stores = {name: ActivationStore(sample_set, activation_bytes) for name, sample_set in samples.items()}
        self._preloaded = preloaded
        self._preloaded_hashes: dict[str, str] = {}
        if preloaded is not None and preloaded_model is not None:
            keys = {r["tensor"] for r in preloaded.header.get("requests", []) if isinstance(r, dict)}
            self._preloaded_hashes = cone_hashes(preloaded_model, keys)

    def __call__(self, model: onnx.ModelProto, requests: Sequence[StatRequest],
                 sets: Sequence[str] = ("target",)) -> StatsView:
        return self._view(model, requests, sets, gather=True)

    def cached(self, model: onnx.ModelProto, requests: Sequence[StatRequest],
               sets: Sequence[str] = ("target",)) -> StatsView | None:
        """Like calling the provider, but None instead of a calibration run when anything is missing."""
        return self._view(model, requests, sets, gather=False)

    def _view(self, model, requests, sets, *, gather: bool) -> StatsView | None:
        memo: dict[str, str] = {}           # shared with _collect: the weights are hashed once
        hashes = cone_hashes(model, {r.tensor for r in requests}, memo=memo)
        missing: dict[str, list[StatRequest]] = {}
        entries: dict[tuple[str, str], Statistics] = {}
        for set_name in sets:
            if set_name not in self.samples and self._preloaded is None:
                if set_name in ("source", "target"):       # a method that reads both domains (momasp-*)
                    raise DataError(f"--{set_name}-data", f"this method needs {set_name}-domain samples",
                                    f"pass --{set_name}-data DIR")
                raise CalibrationError(set_name, "no such sample set")
            for request in dict.fromkeys(requests):
                cached = self._cache.get((set_name, request.key))
                if cached and cached[0] == hashes[request.tensor]:
                    entries[(set_name, request.key)] = cached[1]
                elif self._from_preloaded(request, set_name, hashes[request.tensor]):
                    entries[(set_name, request.key)] = self._preloaded
                else:
                    missing.setdefault(set_name, []).append(request)
        if missing and not gather:
            return None
        reused = len(entries)
        if reused:
            log.debug("statistics: %d request(s) answered from cache or --stats (upstream unchanged)", reused)
        for set_name, todo in missing.items():
            log.debug("statistics: %d request(s) on the %s set need a new calibration run", len(todo), set_name)
            if set_name not in self.samples:
                raise CalibrationError(set_name, "statistics file lacks what this recipe needs",
                                       f"pass --{set_name}-data so they can be gathered")
            stats = self._collect(model, set_name, todo, memo)
            self.collections += 1
            for request in todo:
                self._cache[(set_name, request.key)] = (hashes[request.tensor], stats)
                entries[(set_name, request.key)] = stats
        return StatsView(entries)

    def sample_shapes(self, model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
        """``cost.sample_shapes`` of the target samples ({} without them): the size a model with
        a dynamic height and width, or sequence length, runs at on this data."""
        target = self.samples.get("target")
        return {} if target is None else sample_shapes(model, target.batch(np.arange(1)))

    @property
    def stores_activations(self) -> bool:
        """Whether runs keep their frontier activations (a caller may then hand over a whole
        graph and let each request compute only its part)."""
        return any(store.usable for store in self._stores.values())

    def _collect(self, model: onnx.ModelProto, set_name: str, requests: list[StatRequest],
                 memo: dict[str, str]) -> Statistics:
        options = {"batch_size": self.batch_size, "folds": self.folds, "device": self.device,
                   "progress": self.progress, "seed": self.seed, "engine": self.engine}
        store = self._stores.get(set_name)
        if store is None or not store.usable or not self._segmentable(model):
            return collect(model, {set_name: self.samples[set_name]}, requests, mask=self.mask, **options)
        floats = float_tensors(model)
        hashes = cone_hashes(model, floats | {r.tensor for r in requests}, memo=memo)
        cut = segment(model, {t for t in floats if hashes[t] in store}, [r.tensor for r in requests], floats=floats)
        graph_inputs = {spec.name for spec in input_specs(model)}
        inputs = store.inputs() if graph_inputs & set(cut.inputs) else {}
        if inputs is None:
            return collect(model, {set_name: self.samples[set_name]}, requests, mask=self.mask, **options)
        feeds = {name: inputs[name] if name in graph_inputs else store.get(hashes[name]) for name in cut.inputs}
        for value in cut.model.graph.input[:len(cut.inputs)]:
            array = feeds[value.name]
            value.type.tensor_type.elem_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            dims.add().dim_param = "N"
            for d in array.shape[1:]:
                dims.add().dim_value = int(d)
        part = Feeds(feeds, name=self.samples[set_name].name)
        log.debug("statistics: %d request(s) from %d stored tensor(s) and %d node(s) of %d",
                  len(requests), len(cut.inputs), len(cut.model.graph.node), len(model.graph.node))
        stats = collect(cut.model, {set_name: part}, requests, mask=None, keep=cut.frontier,
                        keep_bytes=store.room(), **options)
        for name, value in stats.activations.items():
            store.put(hashes[name], value)
        stats.activations = {}
        return stats

    def _segmentable(self, model: onnx.ModelProto) -> bool:
        """Segments need a free batch dimension (fixed-batch graphs reshape with it) and no
        token mask (its rows are dropped by the input the segment would not see)."""
        specs = input_specs(model)
        return all(not isinstance(spec.shape[0], int) for spec in specs if spec.shape) \
            and token_mask_input(model, self.mask) is None

    def _from_preloaded(self, request: StatRequest, set_name: str, cone: str) -> bool:
        if self._preloaded is None or self._preloaded_hashes.get(request.tensor) != cone:
            return False
        return self._preloaded.has(request, set=set_name)
