"""Statistics on demand for a graph that passes keep rewriting.

The pipeline gathers every statistic its passes announce in one onnxruntime pass per
sample set before the first rewrite. A pass then asks for statistics of the *current*
graph; an entry is reused while the subgraph computing its tensor is unchanged (same
cone hash), and re-gathered on the current graph otherwise, which is what sequential
pruning needs (later layers see the already-compressed upstream).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import onnx

from onnxprune.calibration.collect import collect
from onnxprune.calibration.moments import Moments
from onnxprune.calibration.requests import StatRequest
from onnxprune.calibration.stats import Statistics
from onnxprune.errors import CalibrationError
from onnxprune.model import cone_hashes

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


class StatsProvider:
    """Collects statistics lazily and caches them with the cone hash of their tensor."""

    def __init__(self, samples: dict, *, batch_size: int = 32, folds: int = 2, device: str = "cpu",
                 progress: bool = True, seed: int = 0, preloaded: Statistics | None = None,
                 preloaded_model: onnx.ModelProto | None = None, engine: str = "auto",
                 mask: str | None = "auto"):
        self.samples = samples
        self.batch_size = batch_size
        self.folds = folds
        self.device = device
        self.progress = progress
        self.seed = seed
        self.engine = engine          # collect(engine=): "auto", "graph" (in onnxruntime) or "numpy"
        self.mask = mask              # collect(mask=): the token-mask input ("auto": attention_mask if present)
        self.collections = 0          # onnxruntime passes run (per sample set), for reports
        self._cache: dict[tuple[str, str], tuple[str, Statistics]] = {}
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
        hashes = cone_hashes(model, {r.tensor for r in requests})
        missing: dict[str, list[StatRequest]] = {}
        entries: dict[tuple[str, str], Statistics] = {}
        for set_name in sets:
            if set_name not in self.samples and self._preloaded is None:
                raise CalibrationError(set_name, "no such sample set",
                                       f"pass --{set_name}-data" if set_name in ("source", "target") else None)
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
            stats = collect(model, {set_name: self.samples[set_name]}, todo, batch_size=self.batch_size,
                            folds=self.folds, device=self.device, progress=self.progress, seed=self.seed,
                            engine=self.engine, mask=self.mask)
            self.collections += 1
            for request in todo:
                self._cache[(set_name, request.key)] = (hashes[request.tensor], stats)
                entries[(set_name, request.key)] = stats
        return StatsView(entries)

    def _from_preloaded(self, request: StatRequest, set_name: str, cone: str) -> bool:
        if self._preloaded is None or self._preloaded_hashes.get(request.tensor) != cone:
            return False
        return self._preloaded.has(request, set=set_name)
