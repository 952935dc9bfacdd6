"""Recipe presets: what a ``--method`` name stands for, and the recipe a set of method options
describes. One source for the command line, the Python API, bench/ and the tests.

- ``METHODS``: the low-rank presets (svd, svd-bc, dalr, dalr-bc) as pass lists;
  ``PRUNING_CRITERIA``: every channel-pruning criterion registered in ``onnxprune.criteria``.
- ``method_passes(method, **options)``: the passes of one method with its budget and options
  (``("low-rank-split", {...}), ("bias-compensate", {})`` for dalr-bc, select-nodes +
  reconstruct-next-layer for a criterion).
- ``build_recipe(options, preprocess)``: the whole recipe the command-line options describe
  (a fixed recipe, or a plan table for the planner). Options that contradict each other raise
  ``OptionConflict`` (the command line's usage error, exit 2); a bad pass option raises
  ``RecipeError`` when the recipe is built (``Recipe`` validates every pass's options once).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from onnxprune import criteria
from onnxprune.errors import RecipeError, UsageError
from onnxprune.pipeline import Recipe

#: --method presets for low rank: the passes each one stands for (budget options added by method_passes)
METHODS: dict[str, tuple[tuple[str, dict], ...]] = {
    "svd": (("low-rank-split", {"method": "svd"}),),
    "svd-bc": (("low-rank-split", {"method": "svd"}), ("bias-compensate", {})),
    "dalr": (("low-rank-split", {"method": "dalr"}),),
    "dalr-bc": (("low-rank-split", {"method": "dalr"}), ("bias-compensate", {})),
}
#: channel-pruning criteria: every one registered in onnxprune.criteria
PRUNING_CRITERIA: tuple[str, ...] = criteria.names()

#: options that choose the method and its budget (a recipe file fixes them)
METHOD_OPTIONS = ("method", "keep", "rank", "fraction", "energy", "alpha", "tau", "flops", "lam", "ridge", "layers",
                  "no_reconstruct", "then_low_rank", "latency_aware_splits", "latency_batch", "conv_split",
                  "allocation")
#: recipe-level settings (given over a recipe file, they change it)
RECIPE_SETTINGS = ("mode", "seed", "calib_size", "split", "batch_size", "mask_input", "metric", "judge_output")
BUDGET_OPTIONS = ("keep", "rank", "fraction", "energy", "alpha", "tau", "flops")
LOW_RANK_ONLY = ("rank", "energy", "ridge", "latency_aware_splits", "conv_split")
PRUNING_ONLY = ("alpha", "tau", "flops", "lam", "no_reconstruct", "then_low_rank")
#: options that set a per-layer rule or a pass option the planner does not choose: with any of
#: them, compress runs the one recipe they describe (one global threshold for keep/flops)
RULE_OPTIONS = ("rank", "fraction", "energy", "alpha", "tau", "ridge", "mode", "then_low_rank", "lam")
#: options that only some pruning criteria read (``Criterion.per_group``, ``Criterion.reads``)
CRITERION_OPTIONS = ("alpha", "tau", "lam")
#: options of the planner only: with a fixed recipe they would do nothing (a usage error)
PLANNER_OPTIONS = ("objective", "margin", "check_extra", "correct_drift")


class OptionConflict(UsageError):
    """Options that cannot go together (the command line reports it as a usage error, exit 2)."""

    def __init__(self, problem: str):
        super().__init__(problem)


def _same(name: str) -> str:
    return name


def method_names(*, auto: bool = False) -> list[str]:
    """The ``--method`` choices: the low-rank presets, then every pruning criterion."""
    return (["auto"] if auto else []) + list(METHODS) + list(PRUNING_CRITERIA)


def check_method_options(method: str, options: Mapping[str, Any], flag: Callable[[str], str] = _same) -> None:
    """Low-rank-only options with a pruning criterion, pruning-only ones with a low-rank preset,
    a ridge with SVD, or a criterion's own options (alpha, tau, lam) with a criterion that does
    not read them, are an ``OptionConflict`` (``method`` "auto" accepts both families)."""
    wrong = () if method == "auto" else LOW_RANK_ONLY if method not in METHODS else PRUNING_ONLY
    for name in wrong:
        if options.get(name) not in (None, False):
            kind = "low rank (svd, svd-bc, dalr, dalr-bc)" if name in LOW_RANK_ONLY else "channel pruning"
            raise OptionConflict(f"{flag(name)} applies to {kind}, not {flag('method')} {method}")
    if method in METHODS and METHODS[method][0][1]["method"] == "svd" and options.get("ridge") is not None:
        dalr = ", ".join(m for m in METHODS if METHODS[m][0][1]["method"] == "dalr")
        raise OptionConflict(f"{flag('ridge')} applies to {flag('method')} {dalr}, not {method} "
                             "(SVD has no ridge)")
    if method not in PRUNING_CRITERIA:
        return
    for name in CRITERION_OPTIONS:
        readers = [c for c in PRUNING_CRITERIA if name in criteria.get(c).per_group + criteria.get(c).reads]
        if options.get(name) is not None and method not in readers:
            raise OptionConflict(f"{flag(name)} applies to {flag('method')} {', '.join(readers)}, not {method}")


def method_passes(method: str, *, keep: float | None = None, rank: int | None = None, fraction: float | None = None,
                  energy: float | None = None, alpha: float | None = None, tau: float | None = None,
                  flops: float | None = None, lam: float | None = None, ridge: Any = None,
                  layers: tuple[str, ...] = (), reconstruct: bool = True,
                  then_low_rank: float | None = None, latency: bool = False,
                  latency_batch: int | None = None, conv_split: str | None = None) -> tuple[tuple[str, dict], ...]:
    """The passes of ``method`` (a low-rank preset or a pruning criterion) with these options.

    >>> method_passes("dalr-bc", keep=0.25)
    (('low-rank-split', {'method': 'dalr', 'keep': 0.25}), ('bias-compensate', {}))
    """
    check_method_options(method, {"rank": rank, "energy": energy, "ridge": ridge, "alpha": alpha, "tau": tau,
                                  "flops": flops, "lam": lam, "no_reconstruct": not reconstruct,
                                  "then_low_rank": then_low_rank, "latency_aware_splits": latency,
                                  "conv_split": conv_split})
    budget = {k: v for k, v in (("keep", keep), ("rank", rank), ("fraction", fraction), ("energy", energy))
              if v is not None}
    if method in METHODS:
        passes = [(name, dict(opts)) for name, opts in METHODS[method]]
        split = passes[0][1]
        split.update(budget)
        if layers:
            split["layers"] = tuple(layers)
        if ridge is not None:
            split["ridge"] = ridge
        if conv_split is not None:
            split["conv"] = conv_split
        if latency:
            # time each split against its layer; skip or shrink those that do not pay
            split["latency"] = True
            if latency_batch is not None:
                split["latency_batch"] = int(latency_batch)
        return tuple(passes)
    if method not in PRUNING_CRITERIA:
        raise RecipeError(f"method {method!r}", "is not a known method",
                          f"known: {', '.join(method_names())}")
    select = {"criterion": method, **{k: budget[k] for k in ("keep", "fraction") if k in budget}}
    for key, value in (("alpha", alpha), ("tau", tau), ("flops", flops), ("lam", lam)):
        if value is not None:
            select[key] = value
    if layers:
        select["groups"] = tuple(layers)
    passes = [("select-nodes", select), ("reconstruct-next-layer", {"reconstruct": reconstruct})]
    if then_low_rank is not None:
        passes.append(("low-rank-split", {"method": "dalr", "keep": then_low_rank, "ops": ("Gemm", "MatMul")}))
    return tuple(passes)


def layer_list(text: str | None) -> tuple[str, ...]:
    """Comma-separated layer (or group) names -> tuple, blanks dropped."""
    return tuple(v.strip() for v in (text or "").split(",") if v.strip())


def output_settings(options: Mapping[str, Any]) -> dict:
    """The recipe's settings of what the outputs are (mask_input, metric, judge_output) that were
    given (defaults: auto, auto, the first float output)."""
    return {key: options[key] for key in ("mask_input", "metric", "judge_output") if options.get(key) is not None}


def fixed_by(options: Mapping[str, Any], flag: Callable[[str], str] = _same) -> str | None:
    """The option that makes compress run one fixed recipe instead of planning per site (the
    default), as ``flag`` spells it; None: compress plans."""
    if options.get("allocation") == "global":
        return f"{flag('allocation')} global"
    for name in ("no_reconstruct", "stats", "latency_aware_splits"):
        if options.get(name):
            return flag(name)
    if options["method"] == "pfa-kl" and options.get("keep") is None and options.get("flops") is None:
        return f"{flag('method')} pfa-kl"        # its own rule; a budget is planned as for any criterion
    return next((flag(name) for name in RULE_OPTIONS if options.get(name) is not None), None)


def plan_request(options: Mapping[str, Any], layers: tuple[str, ...],
                 flag: Callable[[str], str] = _same) -> dict:
    """The recipe's plan table from the options: a budget (flops, keep) or max_drop (default 1)."""
    if options.get("flops") is not None and options.get("keep") is not None:
        raise RecipeError(f"{flag('flops')}/{flag('keep')}", "give one budget",
                          f"{flag('flops')} F (MACs) or {flag('keep')} F (parameters)")
    objective = options.get("objective")
    plan: dict = {}
    if options.get("flops") is not None or options.get("keep") is not None:
        name, implied = ("flops", "macs") if options.get("flops") is not None else ("keep", "params")
        if objective == "latency":
            raise OptionConflict(f"{flag('objective')} latency takes no budget ({flag(name)} is a budget of {implied}): "
                                 f"drop {flag(name)} for the fastest model within --max-drop, or drop "
                                 f"{flag('objective')} to meet {flag(name)}")
        if objective not in (None, implied):
            raise OptionConflict(f"{flag('objective')} {objective} contradicts {flag(name)}, a budget of {implied}: "
                                 f"drop {flag('objective')} or use {flag('keep') if implied == 'macs' else flag('flops')}")
        if options.get("margin") is not None:      # the reserve is the --max-drop search's
            raise OptionConflict(f"{flag('margin')} applies only to the search for the smallest model within "
                                 f"--max-drop; with {flag(name)} the planner meets a budget: drop {flag('margin')}")
        objective = implied
        plan["budget"] = options[name]
    else:
        plan["max_drop"] = 1.0 if options.get("max_drop") is None else options["max_drop"]
    plan["objective"] = objective or "macs"
    method = options["method"]
    if method in METHODS:
        plan.update(families=["low-rank"], low_rank=METHODS[method][0][1]["method"], bias=method.endswith("-bc"))
    elif method != "auto":
        plan.update(families=["prune"], criterion=method)
    if layers:
        plan["sites"] = list(layers)
    for name in ("margin", "check_extra"):
        if options.get(name) is not None:
            plan[name] = options[name]
    if options.get("conv_split") is not None:
        if plan["objective"] == "latency" and options["conv_split"] == "spatial":
            raise OptionConflict(f"{flag('objective')} latency times the channel form of Conv splits only: drop "
                                 f"{flag('conv_split')} spatial (or use {flag('conv_split')} channel)")
        plan["conv"] = options["conv_split"]
    if options.get("latency_batch") is not None:
        if plan["objective"] != "latency":
            raise OptionConflict(f"{flag('latency_batch')} only applies to {flag('objective')} latency")
        plan["latency_batch"] = options["latency_batch"]
    if options.get("correct_drift") is not None:
        plan["drift"] = options["correct_drift"]
    return plan


def build_recipe(options: Mapping[str, Any], preprocess: dict, *, flag: Callable[[str], str] = _same,
                 sized: bool = True) -> Recipe:
    """The recipe the method options describe: the planner's plan table (compress's default), or
    the fixed passes of ``method`` with its budget. ``options`` holds the command line's
    keywords (method, keep, rank, ..., seed, calib_size, split, batch_size, allocation, ...);
    ``flag`` names an option in messages (the command line passes ``--keep``-style). A fixed
    recipe needs a size (keep, rank, ...) unless its criterion has its own rule (pfa-kl) or
    ``sized`` is False (`calibrate`: the statistics serve every size)."""
    method = options["method"]
    given = [flag(k) for k in BUDGET_OPTIONS if options.get(k) is not None]
    if len(given) > 1:
        raise OptionConflict(f"give only one budget: {' and '.join(given)} were both given")
    fixed = fixed_by(options, flag)
    # --flops is the planner's MAC budget with any method; only a fixed recipe's is pruning's
    if fixed and method in METHODS and options.get("flops") is not None:
        raise OptionConflict(f"{flag('flops')} with {flag('method')} {method} is a budget for the planner, "
                             f"and {fixed} makes compress run one fixed recipe: drop {fixed}, or give the "
                             f"low-rank recipe {flag('keep')}, {flag('rank')}, {flag('fraction')} or "
                             f"{flag('energy')}")
    check_method_options(method, options if fixed else {**options, "flops": None}, flag)
    layers = layer_list(options.get("layers"))
    settings = dict(seed=options["seed"], calib_size=options.get("calib_size"), split=options["split"],
                    batch_size=options["batch_size"], preprocess=preprocess, **output_settings(options))
    if fixed is None:
        return Recipe(passes=(), plan=plan_request(options, layers, flag), **settings)
    ignored = [flag(name if options[name] is not False else f"no_{name}") for name in PLANNER_OPTIONS
               if options.get(name) is not None]
    if ignored:
        raise OptionConflict(f"{', '.join(ignored)} appl{'ies' if len(ignored) == 1 else 'y'} only to planning, and "
                             f"{fixed} makes compress run one fixed recipe (drop {fixed} to plan)")
    if method == "auto":
        method = "spectral" if any(options.get(k) not in (None, False) for k in PRUNING_ONLY) else "dalr-bc"
        check_method_options(method, options, flag)     # --lam, --tau: options spectral does not read
    if sized and not given and not (method in PRUNING_CRITERIA and criteria.get(method).default is None):
        sizes = ("keep", "rank", "fraction", "energy") if method in METHODS else ("keep", "flops", "fraction",
                                                                                  *criteria.get(method).per_group)
        raise OptionConflict(f"{fixed} makes compress run one fixed recipe ({method}), which needs a size: give one "
                             f"of {', '.join(flag(k) for k in sizes)} (or drop {fixed} to let the planner choose)")
    spatial = [flag(k) for k in ("keep", "energy") if options.get(k) is not None] \
        if options.get("conv_split") == "spatial" else []
    if spatial:      # low-rank-split's conv="spatial" has no spectrum to threshold
        raise OptionConflict(f"{flag('conv_split')} spatial in a fixed recipe takes {flag('rank')} or "
                             f"{flag('fraction')}, not {spatial[0]} (which ranks the channel form's spectrum): "
                             f"give {flag('fraction')}, or drop {fixed} to let the planner choose the form per "
                             "layer")
    latency = bool(options.get("latency_aware_splits"))
    if options.get("latency_batch") is not None and not latency:
        raise OptionConflict(f"{flag('latency_batch')} only applies to {flag('objective')} latency or "
                             f"{flag('latency_aware_splits')}")
    passes = method_passes(method, **{k: options.get(k) for k in ("keep", "rank", "fraction", "energy", "alpha",
                                                                  "tau", "flops", "lam", "ridge")},
                           layers=layers, reconstruct=not options.get("no_reconstruct"),
                           then_low_rank=options.get("then_low_rank"), latency=latency,
                           latency_batch=options.get("latency_batch"), conv_split=options.get("conv_split"))
    return Recipe(passes=passes, mode=options.get("mode") or "one-shot", **settings)


def plan_only_recipe(options: Mapping[str, Any], preprocess: dict, *, flag: Callable[[str], str] = _same,
                     **goal) -> Recipe:
    """A recipe whose plan table carries the options of `sensitivity` / `sweep` and ``goal``."""
    options = {**options, "max_drop": None, "flops": None, "keep": None}
    check_method_options(options["method"], options, flag)      # --conv-split with a pruning criterion
    plan = plan_request(options, tuple(v for v in (options.get("layers") or "").split(",") if v), flag)
    plan.pop("max_drop", None)
    plan.update(goal)
    return Recipe(passes=(), plan=plan, seed=options["seed"], calib_size=options.get("calib_size"),
                  split=options.get("split", 0.5), batch_size=options["batch_size"], preprocess=preprocess,
                  **output_settings(options))
