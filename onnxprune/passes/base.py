"""The pass interface: options, statistics a pass needs, what it hands on, and what it returns.

A pass mutates the graph it is given (the pipeline cloned it once on entry) and returns
``PassResult(changed, report)``. It asks ``ctx.statistics(requests)`` for the statistics
of the *current* graph: the provider answers from what was gathered before the pipeline
started when the tensors' upstream subgraph is unchanged, and re-gathers otherwise.

Passes hand each other typed records through the context, and declare them (as torch.fx
passes declare requires/ensures): ``produces`` the record types a pass adds, ``requires``
those an earlier pass must have added. ``check_order`` refuses a recipe whose pass requires
what no earlier pass produces (bias-compensate without a low-rank pass before it), and the
pipeline pairs a per-site pass with the next pass that requires its records (sequential mode).

- ``Approximation`` (low-rank-split -> bias-compensate): a layer's original and approximated weight.
- ``Selection`` (select-nodes -> reconstruct-next-layer, read by correct-drift): the channels
  kept in one channel group and the statistics they were chosen on.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import onnx

from onnxprune.calibration.requests import StatRequest
from onnxprune.calibration.stats import Statistics
from onnxprune.errors import RecipeError
from onnxprune.graph.groups import ChannelGroup


@dataclasses.dataclass
class PassResult:
    changed: bool
    report: dict[str, Any]


@dataclasses.dataclass
class Approximation:
    """A layer whose weight a pass replaced by an approximation (low-rank-split), for bias-compensate."""

    layer: str
    op: str
    weight: np.ndarray                 # the original W (m x n, float64)
    approx: np.ndarray                 # W_hat (m x n)
    request: StatRequest               # the layer's input statistics
    mean: np.ndarray                   # the input mean the approximation was fitted on
    node: str                          # the node that now carries the layer's bias input
    bias: str | None                   # its bias initializer (None: none yet)
    bias_shift: np.ndarray | None = None   # bias shift already applied (affine DALR)
    compensated: bool = False


@dataclasses.dataclass
class Selection:
    """The channels select-nodes keeps in one group, for reconstruct-next-layer to apply."""

    group: ChannelGroup
    keep: np.ndarray                   # kept channel indices, ascending
    sigma: np.ndarray                  # the group's second moment (C x C) the choice was made on
    criterion: str
    retention: float
    folds: list                        # per calibration fold: (sample count, second moment)
    applied: bool = False


@dataclasses.dataclass
class PassContext:
    """What passes share: a statistics source and the typed records passed between passes."""

    statistics: Callable[[onnx.ModelProto, Sequence[StatRequest], Sequence[str]], Statistics]
    sets: tuple[str, ...] = ("target",)
    folds: int = 2
    # Layers a pass approximated (low-rank-split), by layer name, for bias-compensate.
    approximations: dict[str, Approximation] = dataclasses.field(default_factory=dict)
    # Channel selections made by select-nodes, by group name, applied by reconstruct-next-layer.
    selections: dict[str, Selection] = dataclasses.field(default_factory=dict)
    # Options of the whole pipeline that passes may read (mode, seed).
    mode: str = "one-shot"
    seed: int = 0
    # Sequential mode: the one site a per-site pass handles in this round, and the per-group
    # channel counts fixed (from every group at once) before the first round.
    only_group: str | None = None
    counts: dict[str, int] | None = None
    # The model the pipeline started from (correct-drift fits the compressed model to it).
    original: onnx.ModelProto | None = None
    # Derived quantities (channel rankings) that stay valid across runs over the same
    # statistics and graph; None: nothing is cached (a single pipeline run needs none).
    cache: dict[Any, Any] | None = None
    # One sample's shape per input with a dynamic dimension after the batch (cost.sample_shapes):
    # what MAC budgets and latency timings of such a model count at; {}: symbolic dims are 1.
    input_shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    def remembered(self, key: tuple | None, compute: Callable[[], Any], *, on: tuple = ()) -> Any:
        """``compute()``, remembered in ``cache`` under ``key`` in one-shot mode (the planner's
        trial and check rewrites of the original share one cache per statistics). ``on``: the
        objects the result is computed from, matched by identity (the entry holds them, so their
        ids stay theirs); ``key`` None or no cache: computed."""
        if key is None or self.cache is None or self.mode != "one-shot":
            return compute()
        full = key + tuple(id(o) for o in on)
        hit = self.cache.get(full)
        if hit is None or any(a is not b for a, b in zip(hit[0], on)):
            hit = self.cache[full] = (on, compute())
        return hit[1]


class Pass:
    """Base class; subclasses set ``name``, ``Options`` and implement ``requests`` and ``run``."""

    name: ClassVar[str]
    Options: ClassVar[type]
    #: record types (``Approximation``, ``Selection``) an earlier pass must produce
    requires: ClassVar[tuple[type, ...]] = ()
    #: record types this pass adds to the context for later passes
    produces: ClassVar[tuple[type, ...]] = ()

    def __init__(self, options: Any = None, **kwargs: Any):
        if options is None:
            options = options_from_dict(self.Options, kwargs, owner=self.name)
        elif kwargs:
            options = dataclasses.replace(options, **kwargs)
        self.options = options

    def requests(self, model: onnx.ModelProto) -> list[tuple[StatRequest, tuple[str, ...]]]:
        """Statistics this pass will read on ``model``: (request, sample-set names) pairs."""
        return []

    def sites(self, model: onnx.ModelProto) -> list[str] | None:
        """Per-site passes: the sites one sequential round each handles (``ctx.only_group``);
        None: the pass handles all its sites in one run."""
        return None

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError


def check_order(names: Sequence[str], *, owner: str = "recipe") -> None:
    """Every pass's ``requires`` is produced by a pass before it (else a RecipeError naming both)."""
    available: set[type] = set()
    for name in names:
        cls = REGISTRY[name]
        missing = [t for t in cls.requires if t not in available]
        if missing:
            makers = sorted(n for n, c in REGISTRY.items() if any(t in c.produces for t in missing))
            raise RecipeError(owner, f"pass {name} needs {' and '.join(_record(t) for t in missing)} from an "
                                     "earlier pass, and none before it produces them",
                              f"put {' or '.join(makers)} before it")
        available.update(cls.produces)


def _record(kind: type) -> str:
    return {"Approximation": "approximated layers", "Selection": "channel selections"}.get(
        kind.__name__, kind.__name__)


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if not (cls.__doc__ or "").strip():
        raise TypeError(f"pass {cls.__name__} needs a docstring (Before/After and the algebra)")
    REGISTRY[cls.name] = cls
    return cls


def options_from_dict(options_cls: type, values: dict[str, Any], *, owner: str) -> Any:
    """Build a frozen options dataclass from a dict (recipe file or CLI), with clear errors."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise RecipeError(owner, f"unknown option(s) {', '.join(unknown)}",
                          f"valid options: {', '.join(sorted(fields))}")
    clean = {}
    for key, value in values.items():
        if isinstance(value, list):
            value = tuple(value)
        clean[key] = value
    try:
        return options_cls(**clean)
    except (TypeError, ValueError) as exc:
        raise RecipeError(owner, str(exc)) from None


def options_to_dict(options: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


#: what a field's annotated type means in a recipe file's words
_KINDS = {float: "a number", int: "an integer", bool: "true or false", str: "a string", tuple: "a list",
          dict: "a table"}


@functools.cache
def _field_kinds(options_cls: type) -> dict[str, tuple[type, ...]]:
    """Per field of an options dataclass, the types its annotation allows (``float | None``: float, NoneType)."""
    hints = typing.get_type_hints(options_cls)
    return {name: typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
            for name, hint in hints.items()}


def _items(kind: Any) -> Any:
    """The element type of ``tuple[X, ...]``, else None."""
    args = typing.get_args(kind)
    return args[0] if typing.get_origin(kind) is tuple and len(args) == 2 and args[1] is Ellipsis else None


def _holds(kind: Any, value: Any) -> bool:
    origin = typing.get_origin(kind) or kind
    if isinstance(value, (bool, np.bool_)):          # bool is an int in Python, never a number here
        return origin is bool
    if origin is float:
        return isinstance(value, numbers.Real)
    if origin is int:
        return isinstance(value, numbers.Integral)
    if origin is tuple:
        item = _items(kind)
        return isinstance(value, (tuple, list)) and (item is None or all(_holds(item, v) for v in value))
    return isinstance(value, origin)


def _describe(kind: Any) -> str:
    plural = {float: "numbers", int: "integers", str: "strings"}.get(_items(kind))
    return f"a list of {plural}" if plural else _KINDS[typing.get_origin(kind) or kind]


def check_types(owner: str, options: Any) -> None:
    """Every field of an options dataclass holds what its annotation says: a number (never a
    bool, and finite: a recipe file's NaN or Infinity, TOML's nan or inf, is refused as the
    command line's flags are) for float, an integer for int, true/false for bool, a list for a
    tuple (of what ``tuple[X, ...]`` says), a table for a dict; else a RecipeError naming the
    field and the value."""
    for name, kinds in _field_kinds(type(options)).items():
        value = getattr(options, name)
        if not any(_holds(kind, value) for kind in kinds):
            wanted = " or ".join(_describe(k) for k in kinds if k is not type(None))
            raise RecipeError(owner, f"{name} must be {wanted}, got {value!r}")
        numbers_in = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, numbers.Real) and not math.isfinite(v) for v in numbers_in):
            raise RecipeError(owner, f"{name} must be finite, got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise RecipeError(owner, f"{name}={value!r} is not one of {', '.join(map(str, choices))}")


def check_fraction(owner: str, name: str, value: float | None, *, inclusive: bool = True) -> None:
    if value is None:
        return
    ok = 0 < value <= 1 if inclusive else 0 < value < 1
    if not ok:
        raise RecipeError(owner, f"{name}={value} must be in (0, 1]")
