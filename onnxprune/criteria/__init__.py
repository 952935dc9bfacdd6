"""Channel-selection criteria of select-nodes, registered by name (like Torch-Pruning's ``Importance``).

A criterion is one class: the statistics it requests at a channel group (``requests``), how
it ranks the group's channels (``score``), what a global budget sweeps for it
(``threshold``), which per-group count options it accepts (``per_group``) and its default
budget. select-nodes does the rest for every criterion alike: counts (fraction, alpha,
tau, a global keep/flops budget), rounding, and reconstruct-next-layer the compensation.

Adding a criterion is one new module in this package defining a ``@register``-ed subclass;
every module here is imported when the registry is first read, so nothing else changes
(the CLI's ``--method`` choices and ``select_nodes.CRITERIA`` come from ``names()``).
"""

from __future__ import annotations

import abc
import importlib
import pkgutil
from typing import Any, ClassVar

import numpy as np
import onnx

from onnxprune.calibration.requests import StatRequest

_REGISTRY: dict[str, type[Criterion]] = {}
_DISCOVERED = False


def site_request(group) -> StatRequest:
    """Second moments of the group's site, one row per sample and spatial position (per
    real token for last-axis groups of [N, T, C] activations)."""
    return StatRequest(group.site, kind="features", axis=getattr(group, "axis", 1))


def pooled_request(group, pool: str) -> StatRequest:
    """Moments of the site pooled over space (over real tokens) per sample (PFA's responses)."""
    return StatRequest(group.site, kind="pooled", axis=getattr(group, "axis", 1), pool=pool)


class Criterion(abc.ABC):
    """Base class. ``score`` returns a dict with at least ``sigma`` (the site's C x C second
    moment, which reconstruct-next-layer needs) and one of: ``ranking`` (a lazy ``Ranking``),
    ``order`` (channels best first), ``pooled_cov`` (PFA's correlation choice); PFA criteria
    add ``spectrum``."""

    name: ClassVar[str]
    #: sample sets the site statistics are gathered on ("source" makes --source-data required)
    sets: ClassVar[tuple[str, ...]] = ("target",)
    #: what a global keep/flops budget sweeps: "retention" (needs a ranking with ratios),
    #: "energy" (needs a spectrum) or "fraction" (of each group's channels)
    threshold: ClassVar[str] = "fraction"
    #: per-group count options this criterion accepts besides fraction: "alpha", "tau"
    per_group: ClassVar[tuple[str, ...]] = ()
    #: select-nodes options besides the count that this criterion reads ("lam": MoMaSP's weight)
    reads: ClassVar[tuple[str, ...]] = ()
    #: (option, value) set when no count option is given; None: ``count`` decides
    default: ClassVar[tuple[str, float] | None] = ("keep", 0.5)

    def __init__(self, options: Any):
        self.options = options

    @classmethod
    def needs_source(cls) -> bool:
        return "source" in cls.sets

    def requests(self, group) -> list[tuple[StatRequest, tuple[str, ...]]]:
        return [(site_request(group), self.sets)]

    @abc.abstractmethod
    def score(self, model: onnx.ModelProto, group, views) -> dict:
        """What ranks ``group``'s channels on ``model``, from the statistics ``views``."""

    def count(self, group, score: dict) -> int | None:
        """The criterion's own channel count for a group (PFA's rules), or None."""
        return None


def register(cls: type[Criterion]) -> type[Criterion]:
    if not (cls.__doc__ or "").strip():
        raise TypeError(f"criterion {cls.__name__} needs a docstring (what it ranks by)")
    if cls.threshold not in ("retention", "energy", "fraction"):
        raise TypeError(f"criterion {cls.name}: threshold {cls.threshold!r} is not retention, energy or fraction")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"criterion {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Criterion]]:
    """Every criterion by name: the built-in ones first, then the other modules alphabetically."""
    global _DISCOVERED
    if not _DISCOVERED:
        _DISCOVERED = True
        importlib.import_module(f"{__name__}.builtin")
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")
    return _REGISTRY


def names() -> tuple[str, ...]:
    return tuple(registry())


def get(name: str) -> type[Criterion]:
    return registry()[name]


class Ranking:
    """A greedy channel ranking computed lazily: ``select(alpha=..., count=...)`` returns
    (order, ratios) and is called again, further, only when more of it is needed.

    Greedy selection is deterministic, so a longer run extends a shorter one: a prefix
    computed with a small ``count`` or ``alpha`` is the start of the full ranking. A run
    with ``alpha`` stops early when no informative channel is left (``complete``). A
    global budget rarely needs more than 99 % retention, so wide groups (MobileNetV2's 960
    channels) are ranked only that far unless the budget asks for more.
    """

    def __init__(self, select, channels: int):
        self.select = select
        self.channels = channels
        self.order = np.zeros(0, dtype=np.int64)
        self.ratios = np.zeros(0)
        self.complete = False
        self.informative = channels          # channels ranked before the greedy ran out (when complete)

    def _run(self, **stop) -> tuple[int, float]:
        """Run the selection; keep the longer ranking; (channels ranked, last ratio) of this run."""
        order, ratios = self.select(**stop)
        if len(order) >= len(self.order):
            self.order, self.ratios = np.asarray(order, dtype=np.int64), np.asarray(ratios, dtype=np.float64)
        return len(order), float(ratios[-1]) if len(ratios) else 0.0

    def top(self, count: int) -> np.ndarray:
        """The first ``count`` channels of the ranking (forced picks past the informative ones)."""
        count = int(min(max(count, 1), self.channels))
        if len(self.order) < count:
            self._run(count=count)
        return self.order[:count]

    def reached(self, alpha: float) -> bool:
        return len(self.ratios) > 0 and self.ratios[-1] >= alpha - 1e-12

    def extend_to(self, alpha: float) -> None:
        """Rank until the retention ratio reaches ``alpha``: first to max(alpha, 0.99), then,
        if that is not enough, every informative channel (each run starts afresh, so few
        and long runs are cheaper than many short ones)."""
        if self.complete or self.reached(alpha):
            return
        goal = max(alpha, 0.99) if not len(self.ratios) else 1.0
        ranked, last = self._run(alpha=goal)
        if last < goal - 1e-12:              # stopped early: nothing informative left
            self.complete = True
            self.informative = ranked

    def count_at(self, alpha: float) -> tuple[int, bool]:
        """(channels needed for retention ``alpha``, whether that is exact rather than a lower bound)."""
        if self.reached(alpha):
            return count_for_ratio(self.ratios, alpha), True
        if self.complete:
            return max(self.informative, 1), True
        if len(self.order) >= self.channels:
            return self.channels, True
        return len(self.order) + 1, False

    def count_for(self, alpha: float) -> int:
        """Fewest channels reaching ``alpha`` (all informative ones when it cannot be reached)."""
        self.extend_to(alpha)
        return self.count_at(alpha)[0]


def count_for_ratio(ratios: np.ndarray, alpha: float) -> int:
    """Fewest channels whose retention ratio reaches ``alpha`` (ratios[i] = after i + 1 picks)."""
    reached = np.nonzero(np.asarray(ratios) >= alpha - 1e-12)[0]
    return int(reached[0] + 1) if len(reached) else len(ratios)
