"""``Statistics``: the Moments per sample set, request and fold, with a JSON header that ties
them to the model's hash; merge by addition. Its file format is ``statsfile.py``.
numpy only: onnxruntime lives in ``collect.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from onnxprune.calibration.moments import (
    Moments,
)
from onnxprune.calibration.requests import StatRequest
from onnxprune.errors import CalibrationError


class Statistics:
    """Moments per (sample set, request key, fold), with a JSON-able header.

    header: {"model_hash", "sets": {name: samples.describe()}, "folds", "seed",
    "requests": [request dicts], "samples": {set: [samples per fold]}, "onnxprune_version"}.
    """


    def __init__(self, header: dict, moments: dict[tuple[str, str, int], Moments] | None = None):
        self.header = header
        self._moments: dict[tuple[str, str, int], Moments] = dict(moments or {})
        #: values ``collect(keep=...)`` returned with these statistics (in memory only, never saved)
        self.activations: dict = {}

    @property
    def folds(self) -> int:
        return int(self.header.get("folds", 1))

    @property
    def model_hash(self) -> str | None:
        return self.header.get("model_hash")

    def entries(self) -> list[tuple[str, str, int]]:
        """(set, request key, fold) of every Moments held."""
        return sorted(self._moments)

    def sets(self) -> list[str]:
        return sorted({s for s, _, _ in self._moments})

    def has(self, request: StatRequest | str, set: str = "target") -> bool:
        key = request if isinstance(request, str) else request.key
        return any(s == set and k == key for s, k, _ in self._moments)

    def moments(self, request: StatRequest | str, set: str = "target", fold: int | None = None) -> Moments:
        """The Moments of ``request`` on sample set ``set``; ``fold=None`` merges every fold
        (a new object; with ``keep_rows`` its rows come fold by fold)."""
        key = request if isinstance(request, str) else request.key
        parts = sorted((f, m) for (s, k, f), m in self._moments.items() if s == set and k == key)
        if not parts:
            sets = self.sets()
            if set not in sets:
                raise CalibrationError(set, f"no statistics for sample set {set!r} (have: {', '.join(sets) or 'none'})",
                                       "gather them with the corresponding data")
            raise CalibrationError(key, f"no {set} statistics for this request",
                                   "gather statistics with the recipe that needs them")
        if fold is None:
            return sum(m for _, m in parts)
        for f, m in parts:
            if f == fold:
                return m
        raise CalibrationError(key, f"no fold {fold} in {set} statistics (folds: {self.folds})",
                               "calibrate with more folds")

    def merge(self, other: Statistics) -> Statistics:
        """Combine with statistics of the same model: other sample sets, or other shards of a set."""
        if self.model_hash != other.model_hash:
            raise CalibrationError("statistics", f"cannot merge statistics of model {self.model_hash} "
                                   f"with those of model {other.model_hash}")
        if self.folds != other.folds:
            raise CalibrationError("statistics", f"cannot merge {self.folds}-fold with {other.folds}-fold statistics",
                                   "calibrate both with the same --folds")
        mine, theirs = set(self.sets()), set(other.sets())
        for name in mine & theirs:
            a = {k for s, k, _ in self._moments if s == name}
            b = {k for s, k, _ in other._moments if s == name}
            if a != b:
                raise CalibrationError(name, "shards of one sample set must hold the same requests "
                                       f"({len(a ^ b)} differ)")
        moments = {key: m.copy() for key, m in self._moments.items()}
        for key, m in other._moments.items():
            moments[key] = moments[key] + m if key in moments else m.copy()
        header = json.loads(json.dumps(self.header))
        sets = header.setdefault("sets", {})
        samples = header.setdefault("samples", {})
        for name, describe in other.header.get("sets", {}).items():
            if name in sets:
                sets[name] = _merged_description(sets[name], describe)
            else:
                sets[name] = describe
        for name, counts in other.header.get("samples", {}).items():
            if name in samples:
                samples[name] = [a + b for a, b in zip(samples[name], counts)]
            else:
                samples[name] = list(counts)
        requests = {r["key"]: r for r in header.get("requests", [])}
        for r in other.header.get("requests", []):
            requests.setdefault(r["key"], r)
        header["requests"] = list(requests.values())
        return Statistics(header, moments)

    __add__ = merge

    # -- files (format: ``statsfile.py``) ---------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write one .npz atomically (``statsfile.save``)."""
        from onnxprune.calibration import statsfile

        return statsfile.save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, model=None) -> Statistics:
        """Read statistics saved by ``save`` (``statsfile.load``); with ``model`` (a ModelProto
        or its hash), check that they were computed for it."""
        from onnxprune.calibration import statsfile

        return statsfile.load(path, model=model)

    def __repr__(self) -> str:
        return (f"Statistics(model={self.model_hash}, sets={self.sets()}, "
                f"requests={len(self.header.get('requests', []))}, folds={self.folds})")


def _merged_description(a: dict, b: dict) -> dict:
    shards = (a.get("shards") or [a]) + (b.get("shards") or [b])
    out = {"shards": shards}
    counts = [s.get("count") for s in shards]
    if all(isinstance(c, int) for c in counts):
        out["count"] = sum(counts)
    return out
