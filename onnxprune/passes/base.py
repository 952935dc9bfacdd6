"""The pass interface: options, statistics a pass needs, and what it returns.

A pass mutates the graph it is given (the pipeline cloned it once on entry) and returns
``PassResult(changed, report)``. It asks ``ctx.statistics(requests)`` for the statistics
of the *current* graph: the provider answers from what was gathered before the pipeline
started when the tensors' upstream subgraph is unchanged, and re-gathers otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import onnx

from onnxprune.calibration.stats import StatRequest, Statistics
from onnxprune.errors import RecipeError


@dataclasses.dataclass
class PassResult:
    changed: bool
    report: dict[str, Any]


@dataclasses.dataclass
class PassContext:
    """What passes share: a statistics source and notes passed between passes."""

    statistics: Callable[[onnx.ModelProto, Sequence[StatRequest], Sequence[str]], Statistics]
    sets: tuple[str, ...] = ("target",)
    folds: int = 2
    # Weights a pass approximated, for bias-compensate: layer name -> dict(original weight
    # (m x n, float64), input tensor, request, bias initializer name, kind).
    approximated: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # Channel selections made by select-nodes, applied by reconstruct-next-layer.
    selections: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # Options of the whole pipeline that passes may read (mode, seed).
    mode: str = "one-shot"
    seed: int = 0
    # Sequential mode: the one channel group a per-site pass handles in this round.
    only_group: str | None = None
    # Anything else passes hand each other (e.g. channel counts fixed before a sequential run).
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The model the pipeline started from (correct-drift fits the compressed model to it).
    original: onnx.ModelProto | None = None
    # Derived quantities (channel rankings) that stay valid across runs over the same
    # statistics and graph; None: nothing is cached (a single pipeline run needs none).
    cache: dict[Any, Any] | None = None


class Pass:
    """Base class; subclasses set ``name``, ``Options`` and implement ``requests`` and ``run``."""

    name: ClassVar[str]
    Options: ClassVar[type]

    def __init__(self, options: Any = None, **kwargs: Any):
        if options is None:
            options = options_from_dict(self.Options, kwargs, owner=self.name)
        elif kwargs:
            options = dataclasses.replace(options, **kwargs)
        self.options = options

    def requests(self, model: onnx.ModelProto) -> list[tuple[StatRequest, tuple[str, ...]]]:
        """Statistics this pass will read on ``model``: (request, sample-set names) pairs."""
        return []

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError


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


def check_choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise RecipeError(owner, f"{name}={value!r} is not one of {', '.join(map(str, choices))}")


def check_fraction(owner: str, name: str, value: float | None, *, inclusive: bool = True) -> None:
    if value is None:
        return
    ok = 0 < value <= 1 if inclusive else 0 < value < 1
    if not ok:
        raise RecipeError(owner, f"{name}={value} must be in (0, 1]")
