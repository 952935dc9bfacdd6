"""Recipe -> ordered passes, checks between passes, and the report of what changed.

A recipe is the one description of a compression job: passes with their options, the
mode (one-shot or sequential), calibration settings and preprocessing. Command-line
flags (through ``onnxprune.recipes``) and recipe files (JSON or TOML) build the same
object, and the recipe actually used is written next to the output so a run can be
repeated with ``--recipe``. Making a recipe validates it: pass names, every pass's options,
and the order (each pass's ``requires`` produced by a pass before it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxprune.calibration.provider import StatsProvider
from onnxprune.data.preprocess import Preprocess
from onnxprune.errors import InternalError, ModelError, NumericalError, OnnxPruneError, RecipeError
from onnxprune.graph.index import name_nodes
from onnxprune.linalg import blas_threads
from onnxprune.model import check_model, clone, count_parameters, jsonable, needs_external_data, write_text_atomic
from onnxprune.passes import REGISTRY, Pass, PassContext, check_order, options_to_dict
from onnxprune.passes.base import check_types

log = logging.getLogger(__name__)

#: calibration samples per set (target, and source) unless a recipe or --calib-size says
#: otherwise; None ("all" in a recipe file or on the command line) lifts the cap
DEFAULT_CALIB_SIZE = 1000
#: calibration sets smaller than this are named in a numerical failure's hint
FEW_SAMPLES = 100


def few_samples(counts: Mapping[str, int]) -> str | None:
    """A hint naming calibration sets of fewer than FEW_SAMPLES samples (None when none is)."""
    few = {name: n for name, n in counts.items() if n < FEW_SAMPLES}
    if not few:
        return None
    sets = ", ".join(f"{n} {name} samples" for name, n in few.items())
    return f"or calibrate on more samples ({sets} for layers of many channels)"


#: the keys of a recipe's preprocess table: image preprocessing (``Preprocess``) and text files'
PREPROCESS_KEYS = frozenset(f.name for f in dataclasses.fields(Preprocess)) | {"tokenizer", "max_length"}


def pass_entry(entry) -> tuple[str, dict]:
    """One pass of a recipe as (name, options): also a bare name, or a dict with "name" as the
    recipe files write it; anything else is a RecipeError."""
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
        return entry["name"], {k: v for k, v in entry.items() if k != "name"}
    if (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)
            and isinstance(entry[1], Mapping)):
        return entry[0], dict(entry[1])
    raise RecipeError("recipe", f"pass {entry!r:.60} is not (name, options)",
                      'e.g. ("low-rank-split", {"method": "dalr", "keep": 0.5})')


@dataclasses.dataclass(frozen=True, eq=False)
class Recipe:
    """passes: ((name, options dict), ...) run in order. Two recipes are equal (and hash alike)
    when their ``to_dict()`` forms are: the same passes with the same options, defaults spelled
    out or not."""

    passes: tuple[tuple[str, dict], ...]
    mode: str = "one-shot"           # "one-shot": all sites from one calibration; "sequential": re-gather after each site
    seed: int = 0
    calib_size: int | None = DEFAULT_CALIB_SIZE  # at most this many calibration samples per set; None: all
    split: float = 0.5               # fraction of the target data that calibrates when no --eval-data is given
    batch_size: int = 32
    folds: int = 2                   # calibration folds (held-out ridge selection)
    preprocess: dict = dataclasses.field(default_factory=dict)
    # Accuracy-driven planning (onnxprune.plan): the passes are chosen per site by the planner.
    # Keys: max_drop (points) or budget (fraction of the objective), and PlanOptions fields.
    plan: dict | None = None
    # Token models: the input whose zeros mark padding ("auto": attention_mask when present; "none"),
    # and how outputs are compared ("auto", "classes", "embedding"; see onnxprune.embedding).
    mask_input: str = "auto"
    metric: str = "auto"
    # The model output the result is judged on (validation, the planner's damage and checks);
    # None: the first float output (a token model's sentence embedding), onnxprune.embedding.
    judge_output: str | None = None

    def __post_init__(self):
        for field in ("seed", "calib_size", "split", "batch_size", "folds"):    # numpy scalars as Python numbers:
            value = getattr(self, field)                                        # json (the recipe file) takes those
            if isinstance(value, (np.integer, np.floating)):
                object.__setattr__(self, field, value.item())
        if self.calib_size == "all":
            object.__setattr__(self, "calib_size", None)
        elif isinstance(self.calib_size, str):
            raise RecipeError("recipe", f"calib_size={self.calib_size!r} must be an integer >= 1 or 'all'")
        if not isinstance(self.passes, (list, tuple)):
            raise RecipeError("recipe", f"passes must be a list of (name, options) pairs, got {self.passes!r:.60}")
        object.__setattr__(self, "passes", tuple(pass_entry(entry) for entry in self.passes))
        check_types("recipe", self)
        if self.mode not in ("one-shot", "sequential"):
            raise RecipeError("recipe", f"mode={self.mode!r} is not one-shot or sequential")
        if self.plan is not None:
            from onnxprune.plan.planner import plan_settings

            object.__setattr__(self, "plan", plan_settings(self.plan))
            if self.passes:
                raise RecipeError("recipe", "has both passes and a plan", "give one: the planner chooses the passes")
        elif not self.passes:
            raise RecipeError("recipe", "has no passes")
        for name, _ in self.passes:
            if name not in REGISTRY:
                raise RecipeError("recipe", f"unknown pass {name!r}", f"known passes: {', '.join(sorted(REGISTRY))}")
        check_order([name for name, _ in self.passes])
        # every pass's options validated once, here: a bad option is a RecipeError when the recipe is made
        object.__setattr__(self, "_options", tuple(REGISTRY[name](**options).options for name, options in self.passes))
        unknown = sorted(set(self.preprocess) - PREPROCESS_KEYS)
        if unknown:
            raise RecipeError("recipe", f"unknown preprocess key {unknown[0]!r}",
                              f"known keys: {', '.join(sorted(PREPROCESS_KEYS))}")
        if not 0 < self.split < 1:
            raise RecipeError("recipe", f"split={self.split} must be in (0, 1)")
        if self.calib_size is not None and (isinstance(self.calib_size, bool) or not isinstance(self.calib_size, int)
                                            or self.calib_size < 1):
            raise RecipeError("recipe", f"calib_size={self.calib_size!r} must be an integer >= 1 or 'all'")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise RecipeError("recipe", f"seed={self.seed!r} must be an integer >= 0")
        if self.folds < 1 or self.batch_size < 1:
            raise RecipeError("recipe", "folds and batch_size must be >= 1")
        from onnxprune.embedding import check_metric

        check_metric(self.metric)
        if not isinstance(self.mask_input, str) or not self.mask_input:
            raise RecipeError("recipe", f"mask_input={self.mask_input!r} must be an input name, 'auto' or 'none'")

    @property
    def mask(self) -> str | None:
        """``mask_input`` as ``collect(mask=)`` takes it."""
        return None if self.mask_input == "none" else self.mask_input

    def build(self) -> list[Pass]:
        """Fresh instances of the passes, from the options validated when the recipe was made."""
        return [REGISTRY[name](options) for (name, _), options in zip(self.passes, self._options)]

    def _key(self) -> str:
        return json.dumps(jsonable(self.to_dict()), sort_keys=True)

    def __eq__(self, other) -> bool:
        return isinstance(other, Recipe) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a recipe file holds it: plain JSON values (numpy scalars given as options
        become Python numbers, so the file can be written)."""
        built = self.build()
        return jsonable({
            "mode": self.mode, "seed": self.seed, "calib_size": "all" if self.calib_size is None else self.calib_size,
            "split": self.split,
            "batch_size": self.batch_size, "folds": self.folds, "preprocess": dict(self.preprocess),
            "passes": [{"name": p.name, **options_to_dict(p.options)} for p in built],
            **({"plan": dict(self.plan)} if self.plan is not None else {}),
            **({"mask_input": self.mask_input} if self.mask_input != "auto" else {}),
            **({"metric": self.metric} if self.metric != "auto" else {}),
            **({"judge_output": self.judge_output} if self.judge_output is not None else {}),
        })

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(source, f"top level must be a table/object, not {type(data).__name__} {data!r:.40}",
                              'e.g. {"passes": [{"name": "low-rank-split", "keep": 0.5}]}')
        data = dict(data)
        raw = data.pop("passes", None)
        if raw is None and data.get("plan") is not None:
            raw = []
        if not isinstance(raw, list):
            raise RecipeError(source, "needs a list 'passes' of {name = ..., options...}")
        passes = []
        for entry in raw:
            if not isinstance(entry, dict) or "name" not in entry:
                raise RecipeError(source, f"pass entry {entry!r} has no name")
            entry = dict(entry)
            passes.append((entry.pop("name"), entry))
        known = {f.name for f in dataclasses.fields(cls)} - {"passes"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(source, f"unknown key(s) {', '.join(unknown)}", f"valid keys: passes, {', '.join(sorted(known))}")
        try:
            return cls(passes=tuple(passes), **data)
        except TypeError as exc:
            raise RecipeError(source, str(exc)) from None

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if path.is_dir():
            raise RecipeError(str(path), "is a directory, not a file", "give a recipe file (.json or .toml)")
        if not path.is_file():
            raise RecipeError(str(path), "no such recipe file")
        try:
            text = path.read_text()
        except UnicodeDecodeError:      # a model or an .npz given as the recipe (arguments swapped)
            raise RecipeError(str(path), "is not a text file, so not a recipe", "give a recipe file (.json or "
                              ".toml), e.g. the OUT.recipe.json of a compress run") from None
        try:
            if path.suffix.lower() == ".toml":
                import tomllib
                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except (ValueError, ImportError) as exc:
            raise RecipeError(str(path), f"cannot be parsed ({exc})") from None
        return cls.from_dict(data, source=str(path))

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def sets(self) -> tuple[str, ...]:
        """Sample sets the passes read (target always; source when a pass needs it)."""
        needed = {"target"}
        if self.plan is not None and str(self.plan.get("criterion", "")).startswith("momasp"):
            needed.add("source")
        for p in self.build():
            if getattr(p, "needs_source", False):
                needed.add("source")
        return tuple(sorted(needed, key=["target", "source"].index))


def check_graph(model: onnx.ModelProto, *, after: str) -> None:
    """The ONNX checker and shape inference must accept the graph after every pass."""
    del model.graph.value_info[:]  # stale shapes of rewritten tensors would mislead runtimes
    check_model(model, name=f"after {after}")
    if needs_external_data(model):
        return
    try:
        onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        raise ModelError(f"after {after}", f"shape inference fails: {str(exc).splitlines()[0]}") from None


def check_after_pass(work: onnx.ModelProto, original: onnx.ModelProto, label: str) -> None:
    """``check_graph`` after pass ``label``: a failure is that pass's bug (InternalError),
    unless the input model itself fails the same check (then it stays a ModelError)."""
    try:
        check_graph(work, after=label)
    except ModelError as exc:
        try:
            check_graph(clone(original), after="loading")
        except ModelError:
            raise exc from None
        raise InternalError(f"pass {label}", f"its output fails the check: {exc.problem}") from exc


def _internal(stage: str, exc: Exception) -> InternalError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return InternalError(stage, f"{type(exc).__name__}: {first}" if first else type(exc).__name__)


def run_pipeline(model: onnx.ModelProto, recipe: Recipe, provider: StatsProvider) -> tuple[onnx.ModelProto, dict]:
    """Clone ``model``, run the recipe's passes on the clone, check after each; never touches ``model``.

    An exception that is not an OnnxPruneError, or a pass output failing the checker, is
    raised as InternalError naming the pass (or "calibration"). BLAS runs with
    ``linalg.blas_threads()`` (one thread unless $ONNXPRUNE_BLAS_THREADS says otherwise).
    """
    with blas_threads():
        return _run_pipeline(model, recipe, provider)


def _run_pipeline(model: onnx.ModelProto, recipe: Recipe, provider: StatsProvider) -> tuple[onnx.ModelProto, dict]:
    passes = recipe.build()
    work = clone(model)
    renamed = name_nodes(work)        # stable identity: every later lookup is by name, never by position
    if renamed:
        log.info("named %d unnamed or duplicate-named nodes (op_index)", renamed)
    ctx = PassContext(statistics=provider, folds=recipe.folds, mode=recipe.mode, seed=recipe.seed, original=model,
                      input_shapes=provider.sample_shapes(model))
    log.info("recipe: %s, mode %s, %d calibration folds",
             " -> ".join(p.name for p in passes), recipe.mode, recipe.folds)

    # Gather every statistic the passes announce on the original graph in one run per set.
    wanted: dict[str, list] = {}
    for p in passes:
        for request, sets in p.requests(work):
            for set_name in sets:
                wanted.setdefault(set_name, []).append(request)
    started = time.perf_counter()
    for set_name, requests in wanted.items():
        log.info("calibration: %d tensor statistics on the %s set", len(requests), set_name)
        try:
            provider(work, requests, (set_name,))
        except OnnxPruneError:
            raise
        except Exception as exc:
            raise _internal("calibration", exc) from exc
    timings = {"calibration": time.perf_counter() - started}
    if wanted:
        log.info("calibration: done in %.2f s", timings["calibration"])

    reports = []

    def run_one(p, label=None):
        label = label or p.name
        started = time.perf_counter()
        log.info("pass %s: start", label)
        try:
            result = p.run(work, ctx)
        except NumericalError as exc:       # name the pass and what few samples calibrated it
            counts = {name: len(s) for name, s in getattr(provider, "samples", {}).items()}
            raise NumericalError(f"{label}: {exc.thing}" if exc.thing else label, exc.problem,
                                 "; ".join(filter(None, [exc.hint, few_samples(counts)]))) from None
        except OnnxPruneError:
            raise
        except Exception as exc:
            raise _internal(f"pass {label}", exc) from exc
        check_after_pass(work, model, label)
        seconds = time.perf_counter() - started
        timings[p.name] = timings.get(p.name, 0.0) + seconds
        log.info("pass %s: %s in %.2f s (%d nodes, %d parameters)", label,
                 "changed the graph" if result.changed else "no change", seconds, len(work.graph.node),
                 count_parameters(work))
        reports.append({"pass": p.name, "options": options_to_dict(p.options), "changed": result.changed,
                        "seconds": round(seconds, 3), **result.report})

    i = 0
    while i < len(passes):
        p = passes[i]
        partner = passes[i + 1] if i + 1 < len(passes) else None
        sites = p.sites(work) if recipe.mode == "sequential" and partner is not None \
            and set(partner.requires) & set(p.produces) else None
        if sites is not None:
            # Site by site: a per-site pass and the next pass that applies its records, each
            # round on statistics of the graph rewritten so far.
            log.info("sequential: %d sites of %s, one at a time", len(sites), p.name)
            for site in sites:
                ctx.only_group = site
                run_one(p, f"{p.name} ({site})")
                run_one(partner, f"{partner.name} ({site})")
            ctx.only_group = None
            i += 2
            continue
        run_one(p)
        i += 1
    if not any(r["changed"] for r in reports):
        work = clone(model)     # nothing rewritten: the input as it is (check_graph dropped its value_info)
    work.ir_version = model.ir_version
    report = {
        "passes": reports,
        "params_before": count_parameters(model),
        "params_after": count_parameters(work),
        "calibration_runs": provider.collections,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
    }
    log.info("parameters %d -> %d, %d calibration run(s)", report["params_before"], report["params_after"],
             provider.collections)
    return work, report
