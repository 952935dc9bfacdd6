"""The Python API behind each subcommand: compress, calibrate, inspect, validate.

The CLI only parses options and prints what these functions return.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxprune import cost
from onnxprune.calibration.collect import collect
from onnxprune.calibration.provider import StatsProvider
from onnxprune.calibration.shard import complete as complete_shards
from onnxprune.calibration.stats import Statistics
from onnxprune.data.preprocess import Preprocess
from onnxprune.data.samples import SampleSet, open_samples
from onnxprune.data.text import DEFAULT_MAX_LENGTH, is_text_file, open_text
from onnxprune.data.tokens import check_flags, check_image_flags, check_text_model, check_token_samples
from onnxprune.embedding import measured_output
from onnxprune.errors import (
    CalibrationError,
    DataError,
    ModelError,
    OutputError,
    RecipeError,
    UsageError,
    ValidationFailed,
)
from onnxprune.graph.groups import describe_groups, find_channel_groups
from onnxprune.graph.index import GraphIndex, subgraph_inputs
from onnxprune.graph.layers import find_linear_layers
from onnxprune.model import (
    check_compressible,
    count_parameters,
    input_specs,
    jsonable,
    load_model,
    model_name,
    model_bytes,
    model_hash,
    output_names,
    save_model,
    weight_names,
)
from onnxprune.outputs import text, write_all
from onnxprune.passes import REGISTRY
from onnxprune.paths import check_output_text, check_outputs, model_files
from onnxprune.pipeline import PREPROCESS_KEYS, Recipe, run_pipeline
from onnxprune.plan.planner import FOLDS, Planner, plan_options
from onnxprune.plan.recovery import RecoveryOptions
from onnxprune.runtime import ORT_ERRORS, error_line, free_size_hint
from onnxprune.structures.heads import head_layout_skips
from onnxprune.validation import (REMEDY, ValidationReport, check_labels_fit, check_latency_runs,
                                  check_threshold_values, check_thresholds)
from onnxprune.validation import validate as _validate

log = logging.getLogger(__name__)


def as_model(model) -> onnx.ModelProto:
    """``model`` as a ModelProto: one already, or the path of an .onnx file (ModelError else)."""
    if isinstance(model, onnx.ModelProto):
        unloaded = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        if unloaded:
            raise ModelError(model.graph.name or "model", f"{len(unloaded)} weights (e.g. {unloaded[0]!r}) are in an "
                             "external data file that was not loaded",
                             "give the .onnx path, or onnx.load() it with its external data (the default)")
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise ModelError(repr(model)[:60], f"is a {type(model).__name__}, not a model",
                         "give the path of an .onnx file or an onnx.ModelProto")
    return load_model(model)


def as_recipe(recipe) -> Recipe:
    """``recipe`` as a Recipe: one already, a dict as a recipe file holds it, or the path of a
    JSON/TOML recipe file; anything else is a RecipeError."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, os.PathLike)):
        return Recipe.load(recipe)
    raise RecipeError("recipe", f"must be a Recipe, a dict or a recipe file's path, not {type(recipe).__name__}",
                      "e.g. recipe=Recipe(passes=(), plan={\"max_drop\": 1.0})")


def refuse_idle_source(recipe: Recipe, source_data) -> None:
    """``source_data`` for a recipe that reads the target only: a UsageError, as the command line's
    --source-data (its samples would be opened, and reported as calibrating, for nothing)."""
    if source_data is not None and "source" not in recipe.sets():
        raise UsageError("source_data applies to recipes that read both domains (the momasp-J and momasp-j "
                         "criteria); this recipe reads the target data only", "drop source_data")


def as_samples(data, model: onnx.ModelProto, preprocess: Preprocess | dict | None, *,
               mask: str | None = "auto") -> SampleSet:
    """``data`` as a SampleSet; a ``.txt``/``.tsv`` text file is tokenised with the ``tokenizer``
    (and ``max_length``) of a ``preprocess`` dict (``data/text.py``). Preprocessing flags that
    would do nothing with this model are a UsageError, token rows it cannot take (longer than its
    positions, none of their tokens real by the ``mask`` input: "auto", "none" or a name) a
    DataError (``data/tokens.py``)."""
    if isinstance(data, SampleSet):
        check_sample_set(data, model, preprocess)
        return data
    text = is_text_file(data)
    samples = flags = None
    if isinstance(preprocess, dict):
        unknown = sorted(set(preprocess) - PREPROCESS_KEYS)
        if unknown:         # as a Recipe's preprocess table, not a TypeError from Preprocess(**preprocess)
            raise RecipeError("preprocess", f"unknown preprocess key {unknown[0]!r}",
                              f"known keys: {', '.join(sorted(PREPROCESS_KEYS))}")
        flags = preprocess
        check_flags(model, preprocess)
        preprocess = dict(preprocess)
        tokenizer, max_length = preprocess.pop("tokenizer", None), preprocess.pop("max_length", None)
        if text:
            check_text_model(data, model)
            if tokenizer is None:
                raise DataError(str(data), "is a text file: tokenising it needs the model's tokenizer",
                                "pass --tokenizer tokenizer.json")
            arrays = open_text(data, model, tokenizer=tokenizer, max_length=max_length or DEFAULT_MAX_LENGTH)
            samples = open_samples(arrays, model, preprocess=Preprocess(**preprocess), name=str(data))
        preprocess = Preprocess(**preprocess)
    elif text:
        check_text_model(data, model)
        raise DataError(str(data), "is a text file: tokenising it needs the model's tokenizer",
                        "pass --tokenizer tokenizer.json")
    samples = samples or open_samples(data, model, preprocess=preprocess)
    if flags is not None:
        check_image_flags(samples, flags)
    check_token_samples(samples, model, mask=mask, text=text)
    return samples


def check_sample_set(samples: SampleSet, model: onnx.ModelProto, preprocess: Preprocess | dict | None) -> None:
    """A SampleSet given as data must be opened for ``model``'s inputs (names, dtypes, dimensions after
    the batch) and, when this run asks for preprocessing, with that preprocessing: else a DataError
    (not a KeyError in onnxruntime, nor a recipe's preprocessing silently not applied)."""
    def key(specs):
        return [(s.name, str(s.dtype), tuple(d if isinstance(d, int) else "?" for d in s.shape[1:])) for s in specs]

    if key(samples.specs) != key(input_specs(model)):
        raise DataError(samples.name, f"is a SampleSet opened for other model inputs "
                        f"({', '.join(f'{n} {d} {list(shape)}' for n, d, shape in key(samples.specs))}; the model "
                        f"takes {', '.join(f'{n} {d} {list(shape)}' for n, d, shape in key(input_specs(model)))})",
                        "open it for this model: onnxprune.data.samples.open_samples(data, model), or pass the "
                        "data itself")
    if isinstance(preprocess, dict):
        preprocess = {k: v for k, v in preprocess.items() if k not in ("tokenizer", "max_length")}
        preprocess = Preprocess(**preprocess) if preprocess else None
    if preprocess is not None and preprocess != Preprocess() and preprocess != samples.preprocess:
        raise DataError(samples.name, "is a SampleSet opened with its own preprocessing "
                        f"({_preprocess_text(dataclasses.asdict(samples.preprocess))}), not the "
                        f"{_preprocess_text(dataclasses.asdict(preprocess))} asked for",
                        "open it with that preprocessing (open_samples(..., preprocess=...)), or ask for none")


@dataclasses.dataclass
class CompressResult:
    """What ``compress`` returns: the compressed model, its report (the ``OUT.report.json``
    content: ``validation``, ``plan``, ``passes``, ``warnings``, ...) and the path it was
    written to (None with ``output=None``)."""

    model: onnx.ModelProto
    report: dict[str, Any]
    output: Path | None


#: compress --stats --finetune: the checkpoint fold is set aside from the calibration part first
FINETUNE_STATS = ("--stats cannot be combined with --finetune: --finetune sets its checkpoint fold (--val-fraction "
                  "of the calibration part) aside before calibrating, so no statistics file holds this run's "
                  "calibration samples; drop --stats, or compress with it and then distil the result with "
                  "`onnxprune finetune OUT --teacher MODEL`")


def compress(model, target_data, *, recipe: Recipe | dict | str | os.PathLike, output: str | os.PathLike | None = None,
             source_data=None, eval_data=None, stats: str | os.PathLike | None = None,
             device: str = "cpu", progress: bool = True, max_drop: float | None = None,
             min_agreement: float | None = None, measure_latency: bool = True, latency_runs: int = 10,
             finetune=None, recovery: RecoveryOptions = RecoveryOptions()) -> CompressResult:
    """Calibrate on the target data, plan (``recipe.plan``: the planner chooses the passes) or
    run the recipe, validate on held-out data, write the output; returns a ``CompressResult``.

    ``model``: an .onnx path or an onnx.ModelProto (with its weights loaded). ``target_data``,
    ``source_data``, ``eval_data``: a .npy/.npz file, an image folder, a folder of arrays, an
    array, a {input name: array} dict (``y``/``labels``: labels), an iterable of such batches or
    an onnxruntime CalibrationDataReader (README, "Data"). ``recipe``: a Recipe, a dict as a
    recipe file holds it, or a recipe file's path. ``progress``: progress bars on stderr;
    ``device``: "cpu" or "cuda".

    Calibration uses ``recipe.split`` of the target data (the rest evaluates, unless
    ``eval_data`` is given), at most ``recipe.calib_size`` samples per set (target and
    source), drawn by a permutation seeded with ``recipe.seed``. With ``max_drop`` /
    ``min_agreement`` a failed check raises ValidationFailed carrying the report
    (``exc.report``, ``verdict`` "failed" and the reason); that report is still written to
    OUT.report.json, the model and recipe are not. Every output path is checked before any
    work: the input files (model, its external data, samples, statistics) are never
    overwritten. ``latency_runs``: timed runs of each model per batch size when validating.
    ``finetune`` (an ``onnxprune.train.distill.TrainConfig``, needs the [train] extra) distils the
    original into the compressed model on the calibration part of the target data before validating.
    With a planner's ``max_drop`` goal as well, the plan is the most compressed whose *distilled*
    model is within the drop on the checkpoint fold (``plan.recovery``; ``recovery``: how many
    distilled candidates at most, the margin each must pass with, and whether the chosen plan is
    then distilled again on the training samples and the fold together).
    """
    check_threshold_values(max_drop=max_drop, min_agreement=min_agreement)
    check_latency_runs(latency_runs)
    recipe = as_recipe(recipe)
    refuse_idle_source(recipe, source_data)
    if stats is not None and not _is_path(stats):
        raise RecipeError("stats", f"must be the path of a statistics file, not a {type(stats).__name__}",
                          "give the .npz file onnxprune.calibrate(..., output=...) wrote")
    if finetune is not None:         # before any work: training is the last step
        from onnxprune.train import require_torch

        if stats is not None:
            raise UsageError(FINETUNE_STATS)
        require_torch()
        from onnxprune.train.distill import TrainConfig

        if not isinstance(finetune, TrainConfig):       # e.g. the command line's --finetune EPOCHS as a number
            raise RecipeError("finetune", f"must be an onnxprune.train.distill.TrainConfig, not a "
                              f"{type(finetune).__name__}", "e.g. finetune=TrainConfig(epochs=16)")
        if not progress:        # progress=False: no training bars either
            finetune = dataclasses.replace(finetune, progress=False)
    if not isinstance(recovery, RecoveryOptions):
        raise RecipeError("recovery", f"must be an onnxprune.plan.recovery.RecoveryOptions, not a "
                          f"{type(recovery).__name__}", "e.g. recovery=RecoveryOptions(trials=3)")
    if recovery != RecoveryOptions() and (finetune is None or (recipe.plan or {}).get("max_drop") is None):
        # as the command line refuses --finetune-trials/-margin/-refit there: nothing would read them
        raise UsageError("recovery options apply only to finetune's search for the smallest plan within a "
                         "max_drop goal (not without finetune, with a keep/flops budget or a fixed recipe)")
    if output is not None:
        check_output_text(output)
        check_outputs(output_files(output), input_paths(model, {"--target-data": target_data, "--source-data": source_data,
                                                                "--eval-data": eval_data, "--stats": stats}))
    original = as_model(model)
    check_compressible(original, name=model_name(model))
    check_layer_names(original, recipe)
    measured_output(original, recipe.judge_output)        # a --judge-output the model lacks: before any work
    samples, held_out, eval_source, train_set, val_fold, data_notes = compress_samples(
        original, recipe, target_data, source_data, eval_data,
        checkpoint_fraction=None if finetune is None else finetune.val_fraction,
        decode_held_out=recipe.plan is not None or finetune is not None)
    if "source" in recipe.sets() and "source" not in samples and stats is None:
        raise DataError("--source-data", "this recipe needs source-domain samples", "pass --source-data DIR")
    note, hint = judge_labels(original, samples["target"], held_out, recipe, device=device,
                              others=(train_set, val_fold))
    label_notes = data_notes + [line for line in (note, hint) if line]
    if note:
        samples["target"], held_out = samples["target"].without_labels(), held_out.without_labels()
        train_set = train_set.without_labels()
        val_fold = None if val_fold is None else val_fold.without_labels()
    if (recipe.plan or {}).get("max_drop") is not None and held_out.labels is None \
            and samples["target"].labels is not None:
        # plan for the check that judges: its agreement, not the calibration samples' accuracy
        samples["target"] = samples["target"].without_labels()
        label_notes.append(unlabelled_evaluation_note(held_out))
        log.warning("%s", label_notes[-1])
    preloaded = planning = trained = None
    if recipe.plan is not None:
        if stats is not None:
            raise RecipeError("--stats", "cannot be used when the planner chooses the compression",
                              "give an explicit recipe (--recipe) or a per-layer rule with --stats")
        goal = recipe.plan
        if goal.get("max_drop") is not None:
            max_drop = goal["max_drop"] if max_drop is None else min(max_drop, goal["max_drop"])
        search = None
        if finetune is not None and goal.get("max_drop") is not None:
            search = functools.partial(recovery_search, teacher=original, train=train_set, fold=val_fold,
                                       config=finetune, options=recovery, name=model_name(model))
        try:
            original, recipe, provider, planning, trained = plan_recipe(
                original, samples, recipe, uncapped=train_set, device=device, progress=progress, recovery=search,
                evaluated=len(held_out))
        except ValidationFailed as exc:
            exc.report["evaluation"] = held_out.describe()
            raise fail(exc.report, output, exc) from None
    else:
        if stats is not None:
            if recipe.mode == "sequential":
                raise UsageError("--stats serves one-shot recipes: --mode sequential gathers its statistics anew "
                                 "after each site", "drop --stats, or --mode sequential")
            preloaded = Statistics.load(stats, model=original)
            if preloaded.header.get("shard") and int(preloaded.header["shard"]["count"]) == 1:
                preloaded = complete_shards(preloaded, preloaded.header["shard"])     # shard 1/1: the whole set
            if preloaded.header.get("shard"):
                record = preloaded.header["shard"]
                raise DataError(str(stats), f"holds shard {int(record['index']) + 1}/{record['count']} only",
                                "merge every shard first: onnxprune merge-stats shard*.npz -o all.npz")
            check_held_out(preloaded, stats, held_out, eval_source)
            check_stats_fit(preloaded, stats, recipe, original, samples, split=1.0 if eval_data is not None else None)
        provider = StatsProvider(samples, batch_size=recipe.batch_size, folds=recipe.folds, device=device,
                                 progress=progress, seed=recipe.seed, preloaded=preloaded, preloaded_model=original,
                                 mask=recipe.mask)
    if trained is not None:         # the recovery search built and distilled the chosen plan
        compressed, report = trained.compressed, trained.pipeline
    else:
        compressed, report = run_pipeline(original, recipe, provider)
    if planning is not None:
        report["plan"] = planning
    if finetune is not None:
        from onnxprune.train.api import recover

        searched = (planning or {}).get("recovery")
        # the fold has decided a distilled plan: with refit it trains the final model as well; the
        # fallback (no distilled plan passed) keeps what the fold read better, distilled or not
        refit = recovery.refit and searched is not None and searched["chosen"] is not None
        compressed, report["finetune"], report["validation_before_finetune"] = recover(
            original, compressed, train_set.join(val_fold) if refit else train_set, held_out, config=finetune,
            batch_size=recipe.batch_size, device=device, val=val_fold,
            trained=None if trained is None or refit else (trained.output, trained.output_training),
            name=model_name(model))
        report["finetune"]["refit"] = refit
    describe_run(report, original, compressed, samples, held_out, stats=stats, preloaded=preloaded,
                 calibration_runs=provider.collections, sources={"target": target_data, "source": source_data})
    validation = _validate(original, compressed, held_out, batch_size=recipe.batch_size, device=device,
                           judge=recipe.judge_output,
                           measure_latency=measure_latency, latency_runs=latency_runs, progress=progress,
                           metric=recipe.metric)
    warnings = list(validation.warnings) + collapse_warnings(validation, held_out) + plan_warnings(planning)
    if finetune is not None:
        from onnxprune.train.api import worse_after_training

        refit = report["finetune"]["refit"]
        worse = worse_after_training(report["validation_before_finetune"], validation.to_dict(),
                                     "the output is the distilled model all the same, since the plan was chosen "
                                     "(and the epoch kept) without looking at these samples; fewer --finetune "
                                     "epochs or a lower --lr may do better"
                                     + (", or --no-finetune-refit" if refit else ""))
        warnings += [worse] if worse else []
    for warning in warnings:
        log.warning("%s", warning)
    passes = [w for entry in report.get("passes", ()) for w in entry.get("warnings", ())]    # a budget not met
    warnings = label_notes + passes + (report.get("finetune") or {}).get("warnings", []) + warnings   # logged already
    report["validation"] = validation.to_dict()
    report["warnings"] = warnings
    report["recipe"] = recipe.to_dict()
    try:
        check_thresholds(validation, max_drop=max_drop, min_agreement=min_agreement,
                         remedy=plan_remedy(planning) if stats is None else STATS_REMEDY)
    except ValidationFailed as exc:
        raise fail(report, output, exc) from None
    report["verdict"] = "passed" if max_drop is not None or min_agreement is not None else "unchecked"
    if output is not None:
        write_outputs(compressed, report, recipe, Path(output))
    return CompressResult(compressed, report, None if output is None else Path(output))


#: the original's accuracy on at most this many calibration samples decides whether labels fit
LABEL_PROBE = 128


def judge_labels(original: onnx.ModelProto, calib: SampleSet, held_out: SampleSet, recipe: Recipe, *,
                 device: str = "cpu", others: tuple[SampleSet | None, ...] = ()) -> tuple[str | None, str | None]:
    """(why the labels cannot measure this classifier, or None; a preprocessing hint, or None),
    each logged as a warning here. The labels cannot when the original scores near chance on the calibration samples (on at
    most ``LABEL_PROBE`` of them), so the labels are in another class order or the model does not
    read the data as it should; every goal is then better judged by agreement with the original.
    The hint (``preprocessing_hint``): another common pixel normalisation scores far better there.
    Labels outside the model's classes (in ``calib``, ``held_out`` or ``others``, e.g. the training
    samples) are a DataError: no answer of the model can match them. For an embedding, labels of
    one class (in ``calib`` or ``held_out``) cannot measure it either: every kNN vote is right
    whatever the embeddings."""
    from onnxprune import embedding
    from onnxprune.plan.planner import model_outputs
    from onnxprune.validation import chance_accuracy, data_flags, near_chance

    if calib.labels is None:
        return None, None
    if embedding.output_kind(original, metric=recipe.metric, judge=recipe.judge_output) != "classes":
        single = next((s for s in (calib, held_out) if s is not None and s.labels is not None
                       and len(np.unique(s.labels)) < 2), None)
        if single is None:
            return None, None
        note = (f"the labels of {single.name} hold one class only: kNN accuracy on them is 100% whatever the "
                "embeddings; they are set aside and every goal is judged by the cosine to the original's embeddings")
        log.warning("%s", note)
        return note, None
    probe = label_probe(calib)
    try:        # the first run of the original: one it cannot make is the input's fault, as in collect
        outputs = model_outputs(original, probe, batch_size=recipe.batch_size, device=device,
                                judge=recipe.judge_output)
    except ORT_ERRORS as exc:
        first = error_line(exc)
        raise DataError(calib.name, f"onnxruntime failed running the model on these samples: {first}",
                        "check that the samples match the model's inputs and that this onnxruntime runs the "
                        "model (`onnxprune validate MODEL MODEL --data D` runs it alone)"
                        + free_size_hint([(s.name, s.shape) for s in input_specs(original)],
                                         probe.batch([0]))) from None
    classes = outputs.shape[-1] if outputs.ndim == 2 else None
    check_label_range((calib, held_out, *others), classes)
    if classes is None:
        return None, None
    right = outputs.argmax(axis=1) == probe.labels
    hint = preprocessing_hint(original, probe, right, batch_size=recipe.batch_size, device=device,
                              judge=recipe.judge_output)
    accuracy, chance = float(np.mean(right)), chance_accuracy(probe.labels)
    note = None if not near_chance(accuracy, probe.labels) else (
        f"the original model scores {100 * accuracy:.1f}% on the labels of {calib.name}, "
        f"{'worse' if accuracy < chance else 'little better'} than guessing ({100 * chance:.1f}%): the labels do not fit the model (another class order, "
        f"or data it does not read as it should: check {data_flags(original)}); they are "
        "set aside and every goal is judged by agreement with the original")
    for line in (note, hint):
        if line:
            log.warning("%s", line)
    return note, hint


#: another pixel normalisation must score this many points more than the one given on the label
#: probe (and 3 paired standard errors more) before ``preprocessing_hint`` names it: no model of
#: ../shared with its documented preprocessing comes near it (tests/test_first_use.py); without
#: --mean/--std ResNet-20 scores 54 points less on its probe, MobileNetV2 37
HINT_GAIN = 10.0


def preprocessing_hint(original: onnx.ModelProto, probe: SampleSet, right: np.ndarray | None = None, *,
                       batch_size: int = 32, device: str = "cpu", judge: str | None = None,
                       samples: str = "the calibration samples", keeps: str = "compress") -> str | None:
    """A line naming a common pixel normalisation (``preprocess.CONVENTIONS``) under which the
    original classifier scores far better on the labelled image samples ``probe`` (a
    ``label_probe``; ``samples`` names them): one that beats the given preprocessing (``right``:
    whether the original's answer on each sample matches its label; None: run it) by
    ``HINT_GAIN`` points and 3 paired standard errors: the model was likely trained on inputs
    normalised another way, and every accuracy measured would be of a model misread. None
    otherwise, and for samples the image pipeline does not transform. ``keeps``: the command
    that goes on with the preprocessing given."""
    from onnxprune.data.preprocess import conventions, normalisation_flags
    from onnxprune.plan.planner import model_outputs
    from onnxprune.validation import paired_standard_error

    if probe.labels is None or not probe.images or len(probe.specs) != 1:
        return None
    if right is None:
        right = model_outputs(original, probe, batch_size=batch_size, device=device,
                              judge=judge).argmax(axis=-1) == probe.labels
    if 100 * (1 - right.mean()) < HINT_GAIN:
        return None
    better = []         # (accuracy, preprocess) of each convention that scores far better, in CONVENTIONS order
    for pre in conventions(probe.preprocess, probe.specs[0]):
        outputs = model_outputs(original, probe.with_preprocess(pre), batch_size=batch_size, device=device,
                                judge=judge)
        other = outputs.argmax(axis=-1) == probe.labels
        gain = 100 * float(other.mean() - right.mean())
        se = paired_standard_error(int(np.sum(right & ~other)), int(np.sum(other & ~right)), len(right)) or 0.0
        if gain >= max(HINT_GAIN, 3 * se):
            better.append((float(other.mean()), pre))
    if not better:
        return None
    # the most common convention within HINT_GAIN / 2 points of the best (LeNet reads pixels / 255 and
    # pixels 0..255 about equally well: name the first)
    top = max(accuracy for accuracy, _ in better)
    accuracy, pre = next(item for item in better if 100 * (top - item[0]) <= HINT_GAIN / 2)
    return (f"the original model scores {100 * right.mean():.1f}% on {len(right)} of {samples} as "
            f"preprocessed ({normalisation_flags(probe.preprocess)}), but {100 * accuracy:.1f}% with "
            f"{normalisation_flags(pre)}: check how the model expects its input ({keeps} keeps the preprocessing "
            "given)")


def unlabelled_evaluation_note(held_out: SampleSet) -> str:
    """The held-out check reads --max-drop on ``held_out`` without labels: the planner plans for that
    check (agreement with the original), not for the calibration samples' accuracy."""
    return (f"{held_out.name} has no labels: --max-drop is read as the drop without labels (disagreement with "
            "the original; embeddings: 100 (1 - cosine)), usually larger than the accuracy drop, and the planner "
            "plans for that, setting the calibration samples' labels aside; give evaluation samples with labels "
            "to plan for accuracy")


def label_probe(samples: SampleSet) -> SampleSet:
    """At most ``LABEL_PROBE`` samples spread over ``samples``: the original runs on them to learn
    its classes (and, in ``judge_labels``, how well it scores on the labels)."""
    return samples.subset(np.linspace(0, len(samples) - 1, min(len(samples), LABEL_PROBE)).round().astype(int))


def check_label_range(sample_sets, classes: int | None) -> None:
    """A DataError naming the first of ``sample_sets`` (None: skipped) whose labels lie outside
    the model's ``classes`` (``validation.check_labels_fit``; None: no class axis, nothing to check)."""
    for sample_set in sample_sets:
        if classes is not None and sample_set is not None and sample_set.labels is not None:
            check_labels_fit(sample_set.labels, classes, sample_set.name)


def compress_samples(original: onnx.ModelProto, recipe: Recipe, target_data, source_data=None, eval_data=None,
                     *, checkpoint_fraction: float | None = None, decode_held_out: bool = True
                     ) -> tuple[dict[str, SampleSet], SampleSet, Any, SampleSet, SampleSet | None, list[str]]:
    """({"target": calibration samples[, "source": ...]}, evaluation samples, where those came
    from, the whole calibration part before the --calib-size cap (what fine-tuning trains on),
    the fine-tuning checkpoint fold: with ``checkpoint_fraction`` that seeded fraction of the
    calibration part is set aside first (it neither calibrates nor trains: a fold of calibration
    samples flatters the untrained compressed model), else None; and warnings, logged already
    (``shared_samples``).

    Without ``eval_data`` the target data splits by ``recipe.split`` and ``recipe.seed``;
    calibration sets are capped at ``recipe.calib_size``. An ``eval_data`` file that is the
    target data file is refused: it would have calibrated in full; so is one whose every sample
    is stored in the target data (a copy under another name); some such samples are a warning.
    With ``decode_held_out`` the image files of the evaluation samples and the checkpoint fold are
    decoded once here (``SampleSet.check_files``; nothing else reads them before validation, after
    planning or training): 1.4 s for 5000 CIFAR-10 JPEGs, 2.2 s for 250 ImageNet ones, under 1 % of a planned
    ResNet-20 or MobileNetV2 compress, but a fifth of a fixed recipe's, which fails as fast without.
    """
    target = as_samples(target_data, original, recipe.preprocess, mask=recipe.mask_input)
    if eval_data is not None:
        refuse_same_file(eval_data, target_data, "--target-data", "which calibrates in full when --eval-data is "
                         "given: accuracy on it would not be held out",
                         "drop --eval-data (then --split holds part of --target-data out) or pass other samples")
        calib, held_out, eval_source = target, as_samples(eval_data, original, recipe.preprocess,
                                                          mask=recipe.mask_input), eval_data
        notes = shared_samples(held_out, target, eval_data, target_data, "--target-data",
                               "calibrates in full when --eval-data is given")
    else:
        (calib, held_out), eval_source = target.split(recipe.split, seed=recipe.seed), target_data
        notes = []
    val_fold = None
    if checkpoint_fraction is not None:
        from onnxprune.train.distill import check_fold, fold_size

        check_fold(calib, checkpoint_fraction)      # before any work: enough samples left to train
        # the fold check_fold counted (at least one sample: 0.1 of 5 is one, not an empty fold)
        val_fold, calib = calib.split(fold_size(len(calib), checkpoint_fraction) / len(calib), seed=recipe.seed)
    samples = {"target": cap(calib, recipe.calib_size, seed=recipe.seed)}
    if source_data is not None:
        samples["source"] = cap(as_samples(source_data, original, recipe.preprocess, mask=recipe.mask_input),
                                recipe.calib_size, seed=recipe.seed)
    for unread in (held_out, val_fold) if decode_held_out else ():   # a corrupt image fails now, not in minutes
        if unread is not None:
            unread.check_files(recipe.batch_size)
    return samples, held_out, eval_source, calib, val_fold, notes


def shared_samples(held_out: SampleSet, other: SampleSet, data, other_data, other_flag: str, role: str, *,
                   kind: str = "evaluation", problem: str = "accuracy on it would not be held out",
                   some: str = "accuracy on those is not held out") -> list[str]:
    """Held-out samples (``kind``: evaluation, or checkpoint; opened from ``data``) stored exactly
    as samples of ``other`` (from ``other_data``; ``SampleSet.shared_with``), which ``role``: a
    DataError when all of them are (a copy of the --target-data under another name: ``problem``),
    a warning (logged, and returned as [note]) when some are (``some``); [] when none. As
    ``refuse_same_file``, only files and folders are compared: arrays or readers given twice in
    Python are given on purpose."""
    if not (_is_path(data) and _is_path(other_data)):
        return []
    shared = held_out.shared_with(other)
    if shared == len(held_out):
        raise DataError(held_out.name, f"holds the same samples as {other_flag} {other.name} ({shared} of {shared}, "
                        f"compared by content), which {role}: {problem}", "pass samples that are not in " + other_flag)
    if not shared:
        return []
    note = (f"{shared} of the {len(held_out)} {kind} samples ({held_out.name}) are stored exactly as samples of "
            f"{other_flag} {other.name}, which {role}: {some}; remove them from one of the two")
    log.warning("%s", note)
    return [note]


def refuse_same_file(data, other, other_flag: str, problem: str, hint: str) -> None:
    """A DataError when the file or folder ``data`` is ``other`` (given as ``other_flag``), however
    spelled (links, ``..``): e.g. --eval-data that is the --target-data file, so its samples would not
    be held out. Data given as arrays or readers is not compared."""
    from onnxprune.paths import same_file

    if _is_path(data) and _is_path(other) and same_file(Path(data), Path(other)):
        raise DataError(str(data), f"is the {other_flag} file, {problem}", hint)


def describe_run(report: dict, original: onnx.ModelProto, compressed: onnx.ModelProto, samples: dict,
                 held_out: SampleSet, *, stats=None, preloaded: Statistics | None = None,
                 calibration_runs: int = 0, sources: dict | None = None) -> None:
    """Add to ``report`` whether the model changed, what calibrated (the statistics file when
    every statistic came from it; ``sources``, {set: data given}, adds each set's resolved file:
    ``record_paths``), what evaluates, and the per-layer rows."""
    report["changed"] = model_hash(compressed) != model_hash(original)
    if not report["changed"]:
        if layer_rows(report):
            why = ""
        elif (report.get("plan") or {}).get("sites_considered"):
            why = ": the planner kept every site whole (" + (
                "no compression it measured stays within the goal" if "max_drop" in report["plan"]["goal"]
                else "the goal needs no compression") + ")"
        else:
            why = (": this recipe found no layer or channel group it can touch (`onnxprune inspect MODEL` lists "
                   "them and why not)")
        report["note"] = NOTHING_CHANGED + why
    report["calibration"] = {name: s.describe() for name, s in samples.items()}
    if preloaded is not None:
        report["statistics"] = statistics_summary(stats, preloaded)
        if calibration_runs == 0:  # every statistic came from the file: that is what calibrated
            report["calibration"] = report["statistics"]["sets"]
    record_paths(report["calibration"], sources or {})
    report["evaluation"] = held_out.describe()
    report["layers"] = layer_rows(report)


def record_paths(calibration: dict, sources: dict) -> None:
    """Add the resolved file of each calibration set (``sources``: {set: data given}) to the
    report's ``calibration`` entries that do not name one yet, so that ``validate`` can tell when
    it is given the samples that calibrated the model."""
    for name, source in sources.items():
        desc = calibration.get(name)
        if isinstance(desc, dict) and "path" not in desc and _is_path(source):
            desc["path"] = str(Path(source).resolve())


def calibration_overlap(candidate, data) -> str | None:
    """A warning when the report beside ``candidate`` (``CANDIDATE.report.json`` of compress or
    sweep) says it was calibrated on samples of the file ``data``: validate scores every sample of
    ``data``, those too, so its scores are not held out. None otherwise (no paths, no report)."""
    from onnxprune.paths import same_file

    if not (_is_path(candidate) and _is_path(data)):
        return None
    path = report_path(Path(candidate))
    try:
        calibration = json.loads(path.read_text()).get("calibration") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(calibration, dict):
        return None
    for name, desc in calibration.items():
        source = desc.get("path") if isinstance(desc, dict) else None
        if isinstance(source, str) and same_file(Path(source), Path(data)):
            count = desc.get("count")
            return (f"{candidate} was calibrated on {count if isinstance(count, int) else 'some'} samples of {data} "
                    f"(its {path.name}, {name} set): validate scores every sample of it, those too, so these scores "
                    "are not held out; validate on samples that did not calibrate it (compress --eval-data FILE, "
                    "then validate --data FILE)")
    return None


#: the report's note when no pass changed the model (``--keep 1.0``, nothing compressible)
NOTHING_CHANGED = "no layer changed: the output equals the input"


def layer_rows(report: dict) -> list[dict]:
    """Every split, pruned or skipped layer of a compress report, in one schema:

    name, op, kept ("rank k of m x n" / "k of C ch"), params_removed (parameters this layer or
    channel group removed from the model), retained (fraction of the signal kept: the
    spectrum energy of a low-rank split, the retention ratio of a channel selection), error
    (relative reconstruction error on the calibration data) and note (the method, with the
    DALR ridge as in the pass's report, or why the layer was skipped).
    """
    rows = []
    for p in report["passes"]:
        for row in p.get("split", []):
            note = str(row.get("chosen") or row.get("method", "")).split(" (")[0]
            ridge = row.get("ridge")
            if isinstance(ridge, (int, float)) and not isinstance(ridge, bool) and np.isfinite(ridge):
                note += f" (ridge {ridge:.6g})"
            m, n = row.get("shape", ("?", "?"))
            rows.append({"name": row["layer"], "op": row["op"], "kept": f"rank {row['rank']} of {m}x{n}",
                         "params_removed": row["params_before"] - row["params_after"],
                         "retained": row.get("energy"), "error": row.get("error"), "note": note})
        for row in p.get("pruned", []):
            rows.append({"name": row["group"], "op": "channels", "kept": f"{row['kept']} of {row['channels']} ch",
                         "params_removed": row["params_before"] - row["params_after"],
                         "retained": row.get("retention"), "error": row.get("error"),
                         "note": row.get("criterion", "") + ("" if row.get("reconstructed", True) else ", dropped")})
        for row in p.get("skipped", []):
            rows.append({"name": row.get("layer") or row.get("group"), "op": row.get("op", ""), "kept": "skipped",
                         "params_removed": 0, "retained": None, "error": None, "note": row["reason"]})
    return rows


def write_outputs(compressed: onnx.ModelProto, report: dict, recipe: Recipe, output: Path) -> None:
    """The model, OUT.report.json and OUT.recipe.json, all or none of them (``outputs.write_all``)."""
    write_all([(output, functools.partial(save_model, compressed)),
               (report_path(output), text(json.dumps(jsonable(report), indent=2) + "\n")),
               (recipe_path(output), recipe.save)])


def fail(report: dict, output, error: ValidationFailed) -> ValidationFailed:
    """Mark ``report`` failed with ``error``'s reason, attach it to ``error`` and write it to
    OUT.report.json when there is an output; returns ``error`` for the caller to raise."""
    report["verdict"], report["failure"] = "failed", str(error)
    error.report = report
    if output is not None:
        write_failed_report(report, Path(output))
    return error


def write_failed_report(report: dict, output: Path) -> Path:
    """OUT.report.json of a run that missed its accuracy check (``verdict`` "failed"); no model.
    A model or recipe an earlier run left at OUT is not this run's: the report lists them."""
    earlier = [str(p) for p in output_files(output) if p != report_path(output) and p.exists()]   # .data too
    if earlier:
        report["not_from_this_run"] = earlier
    path = report_path(output)
    write_all([(path, text(json.dumps(jsonable(report), indent=2) + "\n"))])
    return path


#: agreement below this on held-out samples is a collapse, whatever the request was
AGREEMENT_FLOOR = 0.5


def collapse_warnings(validation: ValidationReport, held_out: SampleSet) -> list[str]:
    """Loud lines when the compressed model is broken: near chance, or far from the original."""
    out = []
    if validation.embedding is not None and validation.agreement < AGREEMENT_FLOOR:
        out.append(f"the compressed model's embeddings have a mean cosine similarity of only {validation.agreement:.3f} "
                   f"with the original's on {validation.samples} held-out samples: it is broken for this data")
    elif validation.agreement == validation.agreement and validation.agreement < AGREEMENT_FLOOR:
        out.append(f"the compressed model agrees with the original on only {100 * validation.agreement:.1f}% of "
                   f"{validation.samples} held-out samples: it is broken for this data")
    labels = held_out.labels
    if validation.accuracy_candidate is not None and labels is not None:
        chance = 1.0 / max(len(np.unique(labels)), 1)
        if validation.accuracy_candidate <= 1.5 * chance < validation.accuracy_reference:
            out.append(f"the compressed model's accuracy {100 * validation.accuracy_candidate:.1f}% is near chance "
                       f"({100 * chance:.1f}% for {len(np.unique(labels))} classes)")
    return out


#: the planner's check is called too noisy for --max-drop d when its standard error exceeds this times d
NOISY_CHECK = 0.5


def plan_warnings(planning: dict | None) -> list[str]:
    """A line when the planner's check could not tell its goal apart: the standard error of the
    chosen plan's checked drop above ``NOISY_CHECK`` times --max-drop (MobileNetV2 on 250 images:
    +- 1.4 points against 1; across split seeds its held-out drop then ranged -1.2 to 3.6), or, where
    no checked sample scored differently (a standard error of 0), one sample's weight in points above
    it (8 samples: 12.5 points each); and one when the planner compressed no site."""
    if planning is not None and not planning.get("sites"):
        goal = {"objective": planning.get("objective", "macs"), **planning["goal"]}
        return [f"the planner found no site to compress within {_goal_text(goal)}"]
    goal = (planning or {}).get("goal", {}).get("max_drop")
    se = None if goal is None else planning["check"]["se"]
    samples = None if goal is None else planning["checked_samples"]
    if se == 0 and goal > 0 and planning["check"].get("agreement") is not None \
            and 100 / samples > NOISY_CHECK * goal:    # no spread to measure: one sample weighs more than that
        measured = (f"found no sample of its {samples} scored differently, but one sample is {100 / samples:.2f} "
                    "points there")
    elif se is None or not se > NOISY_CHECK * goal:
        return []
    else:
        measured = f"measured its drop to +- {se:.2f} points on {samples} samples"
    return [(f"the plan's check {measured}, too coarse for --max-drop {goal:g}: on other samples the result may "
             "well miss it (give more target samples for a sharper check and evaluation)")]


#: the first hint of a missed threshold with --stats (one fixed recipe, no planning)
STATS_REMEDY = ("with --stats compress runs one fixed recipe: give it a milder budget (--keep, --rank, ...: the "
                "statistics of a method serve every budget of it), or drop --stats and let the planner find the "
                "smallest model within --max-drop")


def plan_remedy(planning: dict | None) -> str:
    """The first hint of a missed threshold: for a plan of the planner, the option that makes it
    less compressed (its search kept the most compressed plan its check passed)."""
    if not planning or planning.get("goal", {}).get("max_drop") is None:
        return REMEDY
    recovery = planning.get("recovery")
    smaller = " or a smaller --max-drop" if planning["goal"]["max_drop"] > 0 else ""
    untrained = recovery and "chosen" in recovery and recovery["chosen"] is None
    if recovery and not untrained:
        return (f"a larger --finetune-margin (now {recovery['margin']:g}: standard errors kept in reserve below "
                f"--max-drop){smaller} keeps a less compressed plan; more target samples sharpen the checkpoint fold")
    if untrained:   # no distilled candidate passed: the output is the planner's own plan (``fallback``)
        kept = (recovery.get("fallback") or {}).get("kept")
        return ("no distilled plan met the goal on the checkpoint fold, so the output is the plan found without "
                "training" + {"distilled": ", distilled", "untrained": ", not distilled (the fold read it better "
                              "untrained)"}.get(kept, "") + " (--finetune-margin plays no part in it): "
                + plan_remedy({**planning, "recovery": None})
                + ("" if kept == "untrained" else "; if training made it worse (the summary's 'before fine-tuning'), "
                   "fewer --finetune epochs or a lower --lr"))
    check = planning.get("check") or {}
    if check.get("se") == 0 and check.get("samples"):     # margin x 0: no --margin reserves anything
        return (f"the plan's check found no sample of its {check['samples']} that the compressed model scored "
                "differently, so its standard error, and the reserve any --margin keeps, is 0: more target samples "
                "(--calib-size, --check-extra) sharpen the check"
                + ("; a smaller --max-drop keeps a less compressed plan" if smaller else ""))
    return (f"a larger --margin (now {planning['margin']:g}: standard errors kept in reserve below --max-drop, "
            f"{planning.get('reserve') or 0:.2f} points here){smaller} keeps a less compressed plan; "
            "more target samples sharpen the check")


def sensitivity(model, target_data, *, recipe: Recipe, source_data=None, output: str | os.PathLike | None = None,
                figure: str | os.PathLike | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """Damage of every site compressed alone at each ladder size, on the target samples
    (``recipe.calib_size`` of them; no evaluation split is needed). With ``source_data``, also
    how far the source statistics of each site are from the target's (``linalg.domain_shift``).
    Writes the curves as JSON to ``output`` and a heat map (and a shift chart) as PNG."""
    from onnxprune.plan import figures

    recipe = as_recipe(recipe)
    outputs = [o for o in (output, figure) if o is not None]
    for o in outputs:
        check_output_text(o)
    if figure is not None and source_data is not None:
        outputs.append(shift_path(figure))
    check_outputs(outputs, input_paths(model, {"--target-data": target_data, "--source-data": source_data}),
                  flag="-o, --figure")
    original = as_model(model)
    check_compressible(original, name=model_name(model))
    target = cap(as_samples(target_data, original, recipe.preprocess, mask=recipe.mask_input), recipe.calib_size,
                 seed=recipe.seed)
    source = None
    if source_data is not None:
        refuse_same_file(source_data, target_data, "--target-data", "so the domain shift would be 0 by construction",
                         "give the samples of the domain the model was trained on as --source-data, or drop it")
        source = cap(as_samples(source_data, original, recipe.preprocess, mask=recipe.mask_input), recipe.calib_size,
                     seed=recipe.seed)
        shared_samples(source, target, source_data, target_data, "--target-data", "is the target domain",
                       kind="source", problem="the domain shift would be 0 by construction",
                       some="the shift is measured partly on the same samples")
    planner = make_planner(original, {"target": target, "source": source}, recipe, device=device, progress=progress)
    curves = planner.sensitivity()
    result = {"model": original.graph.name, "calibration": target.describe(), **planner.report()}
    if source is not None:
        result["shift"] = planner.domain_shift()
        result["source"] = source.describe()
    elif figure is not None and shift_path(figure).exists():    # a chart of a run with --source-data
        result["not_from_this_run"] = [str(shift_path(figure))]
    files = [] if output is None else [(output, text(json.dumps(jsonable(result), indent=2) + "\n"))]
    pictures = []
    if figure is not None:
        pictures = [(figure, functools.partial(figures.sensitivity_heatmap, curves))]
        if source is not None:
            pictures.append((shift_path(figure), functools.partial(figures.shift_chart, result["shift"])))
    if pictures and not curves:     # nothing to draw: no heat map (an earlier run's is removed), and the output says so
        log.warning("no site to compress: no heat map drawn")
        pictures = [(path, lambda _: None) for path, _ in pictures]
    placed = write_all(files + pictures)
    if figure is not None:      # those drawn: none without a site, or without matplotlib
        result["figures"] = [str(path) for path, _ in pictures if Path(path) in placed]
    return result


def shift_path(figure) -> Path:
    """The domain-shift chart written beside the sensitivity heat map ``figure``."""
    return Path(figure).with_name(Path(figure).stem + "_shift.png")


def sweep(model, target_data, budgets, *, recipe: Recipe, output_dir: str | os.PathLike, source_data=None,
          eval_data=None, device: str = "cpu", progress: bool = True, measure_latency: bool = True,
          latency_runs: int = 10) -> dict:
    """Compress at each budget (fractions of ``recipe.plan['objective']``) from one calibration
    and one sensitivity run; write every model with its report, and a Pareto table
    (``pareto.md``, ``pareto.json``) and plot (``pareto.png``) into ``output_dir``
    (``latency_runs``: timed runs of each model per batch size when validating)."""
    from onnxprune.plan import figures

    check_latency_runs(latency_runs)
    recipe = as_recipe(recipe)
    refuse_idle_source(recipe, source_data)
    if not _is_path(output_dir) or not isinstance(os.fspath(output_dir), str):
        raise OutputError(repr(output_dir)[:60], f"is a {type(output_dir).__name__}, not an output folder",
                          "give a folder for -o as a str or pathlib.Path")
    if not os.fspath(output_dir).strip():       # Path("") is the working folder
        raise OutputError(repr(os.fspath(output_dir)), "is an empty output folder", "give a folder for -o")
    out_dir = Path(output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(str(out_dir), "exists and is not a folder", "give a folder for -o")
    given = list(budgets) if hasattr(budgets, "__iter__") and not isinstance(budgets, (str, bytes)) else None
    if given is None or any(isinstance(b, bool) or not isinstance(b, (int, float, np.number)) for b in given):
        raise RecipeError("--flops/--keep", f"budgets must be a list of numbers, not {budgets!r}"[:120],
                          "e.g. [0.8, 0.5]")
    budgets = sorted({float(b) for b in given}, reverse=True)     # one row per distinct budget, largest first
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        raise RecipeError("--flops/--keep", f"budgets must be fractions in (0, 1], got {budgets}")
    stem = Path(model).stem if _is_path(model) else "model"       # a str and a pathlib.Path name the same files
    objective = plan_options(recipe.plan or {}).objective
    # percent to 4 significant digits: 0.125 -> _macs12.5, 0.004 -> _macs0.4 (two budgets that name
    # one file are refused by check_outputs)
    models = {budget: out_dir / f"{stem}_{objective}{100 * budget:.4g}.onnx" for budget in budgets}
    check_outputs([out_dir / name for name in ("pareto.json", "pareto.md", "pareto.png")]
                  + [file for path in models.values() for file in (path, report_path(path))],
                  input_paths(model, {"--target-data": target_data, "--source-data": source_data,
                                      "--eval-data": eval_data}), flag="-o, --flops/--keep")
    original = as_model(model)
    check_compressible(original, name=model_name(model))
    samples, held_out, _, calib, _, data_notes = compress_samples(original, recipe, target_data, source_data,
                                                                  eval_data)
    note, hint = judge_labels(original, samples["target"], held_out, recipe, device=device)
    label_notes = data_notes + [line for line in (note, hint) if line]
    if note:
        samples["target"], held_out, calib = (s.without_labels() for s in (samples["target"], held_out, calib))
    planner = make_planner(original, samples, recipe, uncapped=calib, device=device, progress=progress,
                           evaluated=len(held_out))
    planner.sensitivity()
    rows, files = [], []
    for budget in budgets:
        result = planner.for_budget(budget)
        passes = tuple(result.pop("passes"))
        result.pop("plan")
        if not passes:
            rows.append({"budget": budget, "status": "nothing to compress at this budget"})
            continue
        if not result.get("budget_met", True):       # as compress --keep/--flops: exit 3 there, no model here
            rows.append({"budget": budget, "status": f"not reached: the most compressed plan keeps "
                                                     f"{100 * result['cost']:.1f}% of the {result['objective']}"})
            continue
        final = dataclasses.replace(recipe, passes=passes, plan=None, folds=FOLDS)
        compressed, report = run_pipeline(planner.original, final, planner.provider)
        validation = _validate(planner.original, compressed, held_out, batch_size=recipe.batch_size, device=device,
                               judge=recipe.judge_output,
                               measure_latency=measure_latency, latency_runs=latency_runs, progress=progress,
                               metric=recipe.metric)
        warnings = label_notes + list(validation.warnings) + collapse_warnings(validation, held_out)
        for warning in warnings[len(label_notes):]:          # the label note is logged once, above
            log.warning("budget %g: %s", budget, warning)
        report["plan"] = result
        describe_run(report, planner.original, compressed, samples, held_out,
                     sources={"target": target_data, "source": source_data})
        report.update(validation=validation.to_dict(), recipe=final.to_dict(), warnings=warnings, verdict="unchecked")
        path = models[budget]
        files += [(path, functools.partial(save_model, compressed)),
                  (report_path(path), text(json.dumps(jsonable(report), indent=2) + "\n"))]
        v = validation
        rows.append({
            "budget": budget, "model": path.name, "macs": v.macs_candidate / max(v.macs_reference, 1),
            "params": v.params_candidate / max(v.params_reference, 1),
            "accuracy": v.accuracy_candidate, "accuracy_reference": v.accuracy_reference,
            "agreement": v.agreement, "relative_error": v.relative_error,
            "drop": v.accuracy_drop, "drop_se": v.accuracy_drop_se,
            "checked_drop": result["check"]["drop"], "checked_se": result["check"]["se"],
            "sites": len(result["sites"]),
            "speedup": v.speedup() if measure_latency else {},
        })
    for row in rows:
        if "macs" not in row:       # no model at this budget: what an earlier sweep left at its name is not this run's
            earlier = [p.name for p in (models[row["budget"]], report_path(models[row["budget"]])) if p.exists()]
            if earlier:
                row["not_from_this_run"] = earlier
                row["status"] += f" ({' and '.join(earlier)} in the folder: from an earlier run)"
    table = pareto_lines(rows, embedding=planner.kind == "embedding")
    summary = {"units": PARETO_UNITS, "budgets": rows, "planner": planner.report(), "evaluation": held_out.describe()}
    files += [(out_dir / "pareto.json", text(json.dumps(jsonable(summary), indent=2) + "\n")),
              (out_dir / "pareto.md", text("\n".join(table) + "\n"))]
    done = [r for r in rows if "macs" in r]
    if done:
        key = "accuracy" if done[0]["accuracy"] is not None else "agreement"
        reference = 100 * done[0]["accuracy_reference"] if key == "accuracy" else 100.0
        x = planner.options.objective
        ylabel = f"top-1 {key} (%)"
        if planner.kind == "embedding":
            ylabel = "kNN accuracy (%)" if key == "accuracy" else "mean cosine to the original x 100"
        points = [(r[x], 100 * r[key]) for r in done]
        if key == "agreement" and not all(math.isfinite(y) for _, y in points):   # no class scores to agree on
            points = [(r[x], 100 * r["relative_error"] ** 2) for r in done]      # what the planner reads
            reference, ylabel = 0.0, "100 x relative squared error"
        files.append((out_dir / "pareto.png", functools.partial(
            figures.pareto_chart, {"planned": points}, reference=reference,
            xlabel=f"{x} (fraction of the original)", ylabel=ylabel, title=str(stem))))
    else:           # no plot: write_all removes an earlier sweep's, which would not match pareto.md
        files.append((out_dir / "pareto.png", lambda path: None))
    plotted = out_dir / "pareto.png" in write_all(files)        # not without matplotlib
    summary["table"] = table
    summary["written"] = (["models", "reports"] if done else []) + ["pareto.md", "pareto.json"] + \
        (["pareto.png"] if plotted else [])
    summary["calibration"] = f"{len(samples['target']):,}"
    summary["evaluated"] = f"{len(held_out):,}"
    reference = next((r["accuracy_reference"] for r in done if r.get("accuracy_reference") is not None), None)
    if not done and held_out.labels is not None:     # no model validated: the original's score alone, as promised
        reference = _validate(planner.original, planner.original, held_out, batch_size=recipe.batch_size,
                              device=device, judge=recipe.judge_output, measure_latency=False, progress=progress,
                              metric=recipe.metric).accuracy_reference
    summary["reference"] = "" if reference is None else \
        f" (the original: {100 * reference:.2f}% {'kNN' if planner.kind == 'embedding' else 'top-1'})"
    return summary


def pareto_lines(rows: list[dict], *, embedding: bool = False) -> list[str]:
    """The sweep's Pareto table: per budget the held-out top-1 and drop (+- its standard error, what
    the evaluation samples alone make it vary by) next to the plan's own check. ``embedding``: the
    outputs are embeddings, whose accuracy is kNN's and whose agreement is the mean cosine. Without
    labels both drops are 100 - agreement % (embeddings: 100 (1 - cosine)); for an output without
    class scores 100 x the relative squared error (the row's ``relative_error`` squared)."""
    accuracy, agreement = ("kNN %", "cosine x 100") if embedding else ("top-1 %", "agreement %")
    # the drops are what validate's --max-drop and the planner read: without labels 100 - agreement %
    # (embeddings: 100 (1 - cosine)); an output without class scores has no top-1 to agree on (agreement
    # NaN, null in pareto.json): 100 x its relative squared error
    done = [r for r in rows if "macs" in r]
    scores = not any(r["agreement"] is None or not math.isfinite(r["agreement"]) for r in done)
    labels = any(r["accuracy"] is not None for r in done)
    drop = "drop" if labels or not done else "100 (1 - cosine)" if embedding else \
        "agreement drop" if scores else "100 x rel. sq. error"
    lines = [f"| budget | MACs | params | {accuracy} | held-out {drop} | {agreement} | checked {drop} | sites | model |",
             "|---|---|---|---|---|---|---|---|---|"]

    def points(value, se) -> str:
        return "" if value is None else f"{value:.2f}" + ("" if se is None else f" +- {se:.2f}")

    for r in rows:
        if "macs" not in r:
            lines.append(f"| {budget_text(r['budget'])} | | | | | | | | {r['status']} |")
            continue
        acc = "" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}"
        agree = "n/a" if r["agreement"] is None or not math.isfinite(r["agreement"]) else f"{100 * r['agreement']:.2f}"
        held_out = points(r["drop"], r["drop_se"])
        if drop in ("agreement drop", "100 (1 - cosine)"):
            held_out = points(100 * (1 - r["agreement"]), None)
        elif drop == "100 x rel. sq. error":
            held_out = points(100 * r["relative_error"] ** 2, None)
        lines.append(f"| {budget_text(r['budget'])} | {100 * r['macs']:.1f}% | {100 * r['params']:.1f}% | {acc} | "
                     f"{held_out} | {agree} | "
                     f"{points(r['checked_drop'], r['checked_se'])} | {r['sites']} | {r['model']} |")
    return lines


def budget_text(budget: float) -> str:
    """A sweep budget as the table shows it: two decimals (0.90), more where two would change it
    (0.125, 0.004: not 0.12 and 0.00)."""
    return f"{budget:.2f}" if round(budget, 2) == budget else f"{budget:.6g}"


#: what the numbers of pareto.json's rows are (as in a report's "validation": accuracies as fractions, drops in points)
PARETO_UNITS = {"fraction of the original": ["macs", "params"],
                "fraction of the samples": ["accuracy", "accuracy_reference", "agreement"],
                "fraction of the original output's norm": ["relative_error"],
                "percentage points": ["drop", "drop_se", "checked_drop", "checked_se"]}


def make_planner(original: onnx.ModelProto, samples: dict, recipe: Recipe, *, uncapped: SampleSet | None = None,
                 device: str = "cpu", progress: bool = True, evaluated: int | None = None) -> Planner:
    """The planner for ``recipe`` (its ``plan`` table's options, batch size, seed, metric and mask)
    on the calibration ``samples`` ({"target": ..., "source": ... or None}). ``uncapped``: the
    calibration part before the --calib-size cap; the checks also score the samples the cap
    left out of it (``PlanOptions.check_extra`` at most). ``evaluated``: the number of held-out
    samples that will evaluate the result (``Planner``)."""
    options = plan_options(recipe.plan or {})
    extra = None if uncapped is None else spare(uncapped, recipe.calib_size, options.check_extra, seed=recipe.seed)
    return Planner(original, samples["target"], options=options, source=samples.get("source"),
                   batch_size=recipe.batch_size, device=device, seed=recipe.seed, progress=progress,
                   metric=recipe.metric, mask=recipe.mask, extra=extra, evaluated=evaluated,
                   judge=recipe.judge_output)


def plan_recipe(original: onnx.ModelProto, samples: dict, recipe: Recipe, *, uncapped: SampleSet | None = None,
                device: str = "cpu", progress: bool = True, recovery=None, evaluated: int | None = None
                ) -> tuple[onnx.ModelProto, Recipe, StatsProvider, dict, Any]:
    """Run the planner that ``recipe.plan`` asks for on the calibration ``samples`` (``make_planner``).

    Returns the model to compress (the original with every node named), the recipe of the
    chosen plan (explicit per-site passes, re-runnable without planning), the statistics
    provider that already holds every statistic the recipe needs, the plan's report, and the
    chosen plan's distilled candidate (``plan.recovery.Trained``) or None. ``recovery(planner,
    recipe)``, for a ``max_drop`` goal, makes the ``RecoverySearch`` that goes on from the
    planner's plan with distillation (``recovery_search``).
    """
    goal = recipe.plan
    planner = make_planner(original, samples, recipe, uncapped=uncapped, device=device, progress=progress,
                           evaluated=evaluated)
    trained = None
    if goal.get("max_drop") is not None:
        result = planner.for_max_drop(goal["max_drop"])
        if recovery is not None:
            result, trained = recovery(planner, recipe).run(result, goal["max_drop"])
    else:
        result = planner.for_budget(goal["budget"])
    passes = tuple(result.pop("passes"))
    result.pop("plan")
    planning = {**result, **planner.report()}
    if passes and not result.get("budget_met", True):
        error = ValidationFailed("plan", f"the most compressed plan keeps {100 * result['cost']:.1f}% of the "
                                         f"{result['objective']}, more than the budget {100 * goal['budget']:g}%",
                                 "allow a larger budget")
        error.report = {"plan": planning, "calibration": {name: s.describe() for name, s in samples.items()}}
        raise error
    if not passes:       # nothing fits the goal: the identity, reported as "no layer changed" (plan_warnings)
        passes = (("select-nodes", {"counts": {}}),)
    recipe = dataclasses.replace(recipe, passes=passes, plan=None, folds=FOLDS)
    return planner.original, recipe, planner.provider, planning, trained


def recovery_search(planner: Planner, recipe: Recipe, *, teacher: onnx.ModelProto, train: SampleSet, fold: SampleSet,
                    config, options: RecoveryOptions, name: str = "student"):
    """The ``RecoverySearch`` of ``compress --max-drop --finetune``: candidates compressed on every
    calibration statistic of ``planner`` by ``recipe`` (its passes replaced), distilled from
    ``teacher`` on ``train`` (checkpoint and search scored on ``fold``); ``name``: what errors call
    a candidate."""
    from onnxprune.plan.recovery import RecoverySearch
    from onnxprune.train.distill import finetune

    def build(passes):
        return run_pipeline(planner.original, dataclasses.replace(recipe, passes=tuple(passes), plan=None, folds=FOLDS),
                            planner.provider)

    def distil(model):
        return finetune(model, teacher, train, config=config, val_samples=fold, name=name)

    return RecoverySearch(planner, build=build, train=distil, fold=fold, options=options)


def _goal_text(goal: dict) -> str:
    if goal.get("max_drop") is not None:
        return f"a drop of {goal['max_drop']:g} point{'' if goal['max_drop'] == 1 else 's'}"
    return f"a budget of {100 * goal['budget']:g}% of the {goal.get('objective', 'macs')}"


def report_path(output: Path) -> Path:
    output = Path(output)
    return output.with_name(output.stem + ".report.json")


def recipe_path(output: Path) -> Path:
    output = Path(output)
    return output.with_name(output.stem + ".recipe.json")


def output_files(output) -> list[Path]:
    """Every file ``compress -o OUTPUT`` may write: the model, its external data, report, recipe."""
    output = Path(output)
    return [output, output.with_name(output.name + ".data"), report_path(output), recipe_path(output)]


def _is_path(value) -> bool:
    return isinstance(value, (str, os.PathLike))


def input_paths(model, data: dict[str, Any]) -> dict[str, list | None]:
    """{label: paths} of the inputs that are files or folders (the model with its external data)."""
    files = model_files(model) if _is_path(model) else []
    inputs: dict[str, list | None] = {"model": files[:1], "model's external data": files[1:]}
    for label, value in data.items():
        inputs[label] = [value] if _is_path(value) else None
    return inputs


def cap(samples: SampleSet, size: int | None, *, seed: int) -> SampleSet:
    """At most ``size`` of ``samples`` (None: all), drawn by a permutation seeded with ``seed``
    and kept in source order, so a cap never takes only the first classes of a sorted set."""
    if size is None or size >= len(samples):
        return samples
    return _drawn(samples, 0, size, seed)


def spare(samples: SampleSet, size: int | None, count: int, *, seed: int) -> SampleSet | None:
    """At most ``count`` of the samples that ``cap(samples, size, seed=seed)`` leaves out (the
    next ones of its permutation, in source order); None when it leaves none out."""
    if size is None or size >= len(samples) or count <= 0:
        return None
    return _drawn(samples, size, size + count, seed)


def _drawn(samples: SampleSet, start: int, stop: int, seed: int) -> SampleSet:
    """Positions start..stop of a permutation of ``samples`` seeded with ``seed``, in source order."""
    return samples.subset(np.sort(np.random.default_rng(seed).permutation(len(samples))[start:stop]))


def check_layer_names(model: onnx.ModelProto, recipe: Recipe) -> None:
    """Every name in a pass's ``layers`` / ``groups`` / ``ranks`` / ``counts`` (a plan's per-site
    sizes, as a recipe written for another model holds), or a plan's ``sites``, must exist
    (RecipeError listing the valid ones)."""
    if recipe.plan is not None and recipe.plan.get("sites"):
        families = recipe.plan.get("families", ())
        valid = ([layer.name for layer in find_linear_layers(model)] if "low-rank" in families else []) + \
                ([group.name for group in find_channel_groups(model)] if "prune" in families else [])
        missing = [name for name in recipe.plan["sites"] if name not in valid]
        if missing:
            raise RecipeError("--layers", f"no channel group or linear layer named {', '.join(map(repr, missing))} "
                              "in the model", f"valid names (as `onnxprune inspect` prints them): "
                                              f"{', '.join(dict.fromkeys(valid)) or 'none'}")
    found: dict = {}                   # each finder runs once, whichever passes and options ask
    for p in recipe.build():
        for option, finder, what in (("layers", find_linear_layers, "linear layer"),
                                     ("ranks", find_linear_layers, "linear layer"),
                                     ("groups", find_channel_groups, "channel group"),
                                     ("counts", find_channel_groups, "channel group")):
            wanted = getattr(p.options, option, None) or ()
            if not wanted:
                continue
            if finder not in found:
                found[finder] = [item.name for item in finder(model)]
            valid = found[finder]
            missing = [name for name in wanted if name not in valid]
            if missing:
                raise RecipeError(f"{p.name} {option}", f"no {what} named {', '.join(map(repr, missing))} in the model",
                                  f"valid names (as `onnxprune inspect` prints them): {', '.join(valid) or 'none'}")


def _record(samples: SampleSet, source) -> dict:
    """Which rows of which file calibrated, and what they hold: lets ``compress --stats`` check its
    held-out set and its calibration data."""
    return {"path": str(Path(source).resolve()) if _is_path(source) else None,
            "rows": samples.source_indices.tolist(), "content_sha": samples.content_sha()}


def check_held_out(stats: Statistics, stats_path, evaluation: SampleSet, eval_source) -> None:
    """Refuse to evaluate on samples the saved statistics were gathered on (DataError); warn
    when the statistics do not say which samples they saw."""
    from onnxprune.paths import same_file

    eval_path = Path(eval_source) if _is_path(eval_source) else None
    unknown = set()
    for set_name, desc in stats.header.get("sets", {}).items():
        for part in desc.get("shards") or [desc]:
            path, rows = part.get("path"), part.get("rows")
            if path is None or rows is None or eval_path is None:
                unknown.add(set_name)
                continue
            if not same_file(Path(path), eval_path):
                continue
            shared = np.intersect1d(np.asarray(rows, dtype=np.int64), evaluation.source_indices)
            if shared.size:
                raise DataError(str(stats_path), f"the {set_name} statistics were gathered on {shared.size} of the "
                                f"{len(evaluation)} evaluation samples of {eval_source}: accuracy on them would not "
                                "be held out", "calibrate with the same --split and --seed as compress (the defaults),"
                                " or evaluate on --eval-data the statistics did not see")
    if unknown and eval_path is None:       # arrays or batches: no file to compare the statistics' record with
        log.warning("%s: cannot check that the evaluation samples are held out: they were given in memory, not as "
                    "a file, so they cannot be matched with the samples the statistics were gathered on", stats_path)
    elif unknown:
        log.warning("%s: cannot check that the evaluation samples are held out: the %s statistics do not record "
                    "which samples of which file they were gathered on (recalibrate with `onnxprune calibrate`)",
                    stats_path, " and ".join(sorted(unknown)))


def check_stats_fit(stats: Statistics, stats_path, recipe: Recipe, original: onnx.ModelProto,
                    samples: dict[str, SampleSet], *, split: float | None = None) -> None:
    """Refuse saved statistics that are not what this run would gather itself (DataError):
    gathered with other preprocessing, on other calibration samples (another --split, --seed,
    --calib-size or data), or without a statistic the recipe's passes need on the original model
    (gathered for another recipe). Anything else would be calibrated anew or mixed in silently.
    ``split``: the fraction of the target data this run calibrates on (1 with --eval-data;
    default ``recipe.split``), named in the message when the file's differs."""
    split = recipe.split if split is None else split
    gathered = stats.header.get("sets", {})
    for name, sample_set in samples.items():
        desc = gathered.get(name)
        if desc is None:
            continue
        mine = json.loads(json.dumps(sample_set.describe()))
        if "preprocess" in desc and "preprocess" in mine and desc["preprocess"] != mine["preprocess"]:
            raise DataError(str(stats_path), f"the {name} statistics were gathered with preprocessing "
                            f"{_preprocess_text(desc['preprocess'])}, this run uses {_preprocess_text(mine['preprocess'])}",
                            "give compress the preprocessing flags `calibrate` was given")
        if "indices_sha" in desc and desc["indices_sha"] != mine["indices_sha"]:
            gathered_split = desc.get("split") if name == "target" else None
            hint = ("give compress the --split, --seed and --calib-size `calibrate` was given (the command line "
                    "takes them from the file when they are left out), or drop --stats")
            if isinstance(gathered_split, (int, float)) and (gathered_split >= 1) != (split >= 1):
                # --split 1 statistics serve a run with --eval-data, and only such a run
                hint = ("they were gathered on all of the target data (calibrate --split 1): give compress "
                        "--eval-data with held-out samples, or drop --stats") if gathered_split >= 1 else \
                       (f"they were gathered on --split {gathered_split} of the target data, which serves compress "
                        "without --eval-data (the rest evaluates); for --eval-data, calibrate with --split 1")
            drawn = f" (the file: --split {gathered_split:g}, --seed {desc.get('seed')}; this run: --split " \
                f"{split:g}, --seed {recipe.seed})" if isinstance(gathered_split, (int, float)) else ""
            raise DataError(str(stats_path), f"the {name} statistics were gathered on other samples ({desc.get('count')}) "
                            f"than the {len(sample_set)} this run calibrates on{drawn}", hint)
        if "content_sha" in desc and desc["content_sha"] != sample_set.content_sha():
            raise DataError(str(stats_path), f"the {name} statistics were gathered on other data: the "
                            f"{len(sample_set)} samples this run calibrates on hold other values"
                            + (f" than those of {desc['path']}" if desc.get("path") else ""),
                            "give compress the data file `calibrate` was given, or drop --stats")
    missing = [request for p in recipe.build() for request, sets in p.requests(original)
               for name in sets if name in gathered and not stats.has(request, set=name)]
    if missing:
        what = stats.header.get("recipe", {}).get("passes")
        made_for = f" (gathered for {', '.join(p['name'] for p in what)})" if what else ""
        raise DataError(str(stats_path), f"holds no statistics for {missing[0].key}, one of {len(missing)} this recipe "
                        f"needs{made_for}",
                        "run `onnxprune calibrate` with the method flags (or --recipe) given to compress, or give "
                        "compress no method flags to run the recipe the file was gathered for")


def _preprocess_text(preprocess: dict) -> str:
    """The preprocessing settings that differ from none, for a message."""
    given = {k: v for k, v in preprocess.items() if v not in (None, [], (), False)}
    return json.dumps(given, sort_keys=True) if given else "none"


def statistics_summary(stats_path, stats: Statistics) -> dict:
    """The statistics file and what it was gathered on, for the report (row lists left out)."""
    def strip(desc: dict) -> dict:
        out = {k: v for k, v in desc.items() if k != "rows"}
        if "shards" in out:
            out["shards"] = [strip(d) for d in out["shards"]]
        return out

    return {"file": str(stats_path), "model_hash": stats.model_hash,
            "sets": {name: strip(desc) for name, desc in stats.header.get("sets", {}).items()}}


def calibrate(model, target_data, *, recipe: Recipe, output: str | os.PathLike, source_data=None,
              device: str = "cpu", progress: bool = True, split: float | None = None,
              shard: tuple[int, int] | str | None = None, client=None, cluster: str | None = None,
              workers: int | None = None, shards: int | None = None, engine: str = "auto",
              threads: int | None = None) -> Statistics:
    """Gather the statistics ``recipe`` needs and save them to ``output`` (.npz) for ``--stats``.

    Uses the part of the target data that ``compress`` with the same recipe calibrates on:
    ``split`` of it (default ``recipe.split``; 1 = all of it) drawn with ``recipe.seed``,
    then at most ``recipe.calib_size`` samples per set. The header records the file and rows
    of every set, so that ``compress --stats`` can refuse to evaluate on them.

    shard: ``(i, n)`` (0-based) or ``"i/n"`` (1-based): only shard i of n of each sample
        set (contiguous whole batches); merge the n files with ``merge_stats``.
    client / cluster / workers: run ``shards`` shards (default: one per worker) as tasks on
        a Dask ``distributed.Client``, on the scheduler at address ``cluster``, or on a new
        local cluster of ``workers`` processes; the merged result is written.
    engine: "auto", "graph" or "numpy": how statistics are computed (see ``collect``).
    threads: onnxruntime threads of each shard task (default: 1 on a local ``workers``
        cluster, whose workers are single-threaded; else onnxruntime's default).
    """
    from onnxprune.calibration import cluster as tasks_on
    from onnxprune.calibration.shard import parse_shard, shard_ranges
    from onnxprune.runtime import batch_size_for

    recipe = as_recipe(recipe)
    if recipe.plan is not None:     # not "no compressible layer": a plan's passes are chosen while it plans
        raise RecipeError("recipe", "is a planner recipe (a plan, no passes): the planner gathers its statistics "
                          "while it plans, so there are none to gather beforehand",
                          "give calibrate a recipe with passes (e.g. the OUT.recipe.json a compress run wrote, or "
                          "method flags); compress with a plan takes no --stats")
    refuse_idle_source(recipe, source_data)
    fraction = recipe.split if split is None else split
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.number)) or not 0 < fraction <= 1:
        raise RecipeError("split", f"must be a number in (0, 1], not {fraction!r}")
    if "source" in recipe.sets() and source_data is None:
        raise DataError("--source-data", "this recipe needs source-domain samples", "pass --source-data DIR")
    check_output_text(output)
    check_outputs([output], input_paths(model, {"--target-data": target_data, "--source-data": source_data}))
    original = as_model(model)
    check_compressible(original, name=model_name(model))
    check_layer_names(original, recipe)
    target = as_samples(target_data, original, recipe.preprocess, mask=recipe.mask_input)
    calib = target if fraction >= 1 else target.split(fraction, seed=recipe.seed)[0]
    samples = {"target": cap(calib, recipe.calib_size, seed=recipe.seed)}
    sources = {"target": _path_or_none(target_data)}
    if source_data is not None:
        samples["source"] = cap(as_samples(source_data, original, recipe.preprocess, mask=recipe.mask_input),
                                recipe.calib_size, seed=recipe.seed)
        sources["source"] = _path_or_none(source_data)
    requests: dict[str, list] = {}
    for p in recipe.build():
        for request, sets in p.requests(original):
            for set_name in sets:
                if set_name in samples:
                    requests.setdefault(set_name, []).append(request)
    if not requests:
        raise RecipeError("recipe", "needs no statistics on this model (no compressible layer)")
    distributed = sum(v is not None for v in (client, cluster, workers))
    if distributed > 1:
        raise RecipeError("client/cluster/workers", "give at most one of them")
    if shards is not None and (isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or shards < 1):
        raise RecipeError("shards", f"must be an integer >= 1, not {shards!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1):
        raise RecipeError("threads", f"must be an integer >= 1, not {threads!r}")
    if shards is not None and not distributed:
        raise RecipeError("shards", "cuts the work for a cluster", "give client=, cluster= or workers= too")
    if distributed and shard is not None:
        raise RecipeError("shard", "runs one shard here; it cannot be combined with a cluster",
                          "use --cluster/--workers alone (every shard runs there)")
    if isinstance(shard, str):
        shard = parse_shard(shard)
    elif shard is not None and not (isinstance(shard, (tuple, list)) and len(shard) == 2 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in shard)):
        raise RecipeError("shard", f"must be (i, n) (0-based) or \"i/n\" (1-based), not {shard!r}"[:120],
                          "e.g. shard=\"1/4\" or shard=(0, 4)")
    options = {"count": 1, "batch_size": recipe.batch_size, "folds": recipe.folds, "seed": recipe.seed,
               "device": device, "stats_options": {"engine": engine}, "threads": threads}
    model_source = _path_or_none(model)
    if shard is not None:
        index, count = int(shard[0]), int(shard[1])
        if not 0 <= index < count:
            raise RecipeError("shard", f"index {index} is not in 0..{count - 1}")
        options["count"] = count
        # in this process: the sample sets already open here serve the shard
        task, = tasks_on.plan(model_source, original, samples, {}, requests, indices=[index], **options)
        stats = tasks_on.run_shard(task, progress=progress)
    elif distributed:
        own = client is None
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, (int, np.integer))
                                    or workers < 1):
            raise RecipeError("workers", f"must be an integer >= 1, not {workers!r}")
        if client is not None and not hasattr(client, "scheduler_info"):
            raise RecipeError("client", f"must be a dask distributed.Client, not a {type(client).__name__}",
                              "pass distributed.Client(...), or cluster=\"tcp://host:port\" or workers=N instead")
        # a count the data cannot take, before starting a cluster (a local one: one shard per worker)
        planned = int(shards) if shards is not None else None if workers is None else int(workers)
        if planned is not None:
            for name in requests:
                try:
                    shard_ranges(len(samples[name]), planned, batch_size_for(original, recipe.batch_size), name=name)
                except CalibrationError as exc:
                    if shards is not None:
                        raise
                    raise CalibrationError(exc.thing, exc.problem, "give fewer --workers (one shard each), or "
                                           "--shards with fewer shards, or a smaller --batch-size") from None
        if workers is not None:
            client = tasks_on.local_client(min(int(workers), planned))     # no worker without a shard
            options["threads"] = threads or 1      # single-threaded workers: one onnxruntime thread each
        elif cluster is not None:
            client = tasks_on.connect(cluster)
        else:       # the caller's client: its tasks would wait forever on a scheduler without workers
            tasks_on.wait_for_workers(client, getattr(client.scheduler, "address", None) or "client")
        try:
            count = int(shards) if shards is not None else max(1, len(client.scheduler_info().get("workers", {})))
            options["count"] = count
            # a worker opens a data file itself, but not a text file (no tokenizer there): its tokens are shipped
            shipped = {name: None if is_text_file(path) else path for name, path in sources.items()}
            stats = tasks_on.run_on_dask(tasks_on.plan(model_source, original, samples, shipped, requests,
                                                       **options), client)
        finally:
            if own:
                _close(client)
    else:
        stats = None
        for set_name, todo in requests.items():
            part = collect(original, {set_name: samples[set_name]}, list(dict.fromkeys(todo)),
                           batch_size=recipe.batch_size, folds=recipe.folds, device=device, progress=progress,
                           seed=recipe.seed, engine=engine, mask=recipe.mask)
            stats = part if stats is None else stats.merge(part)
    # which rows of which file calibrated, for compress --stats (also in a shard's record, so
    # that merge-stats keeps it)
    used = {name: {**_record(samples[name], sources[name]), "split": fraction, "seed": recipe.seed}
            for name in samples}
    for set_name, desc in stats.header.get("sets", {}).items():
        desc.update(used.get(set_name, {}))
    for set_name, info in (stats.header.get("shard") or {}).get("sets", {}).items():
        if isinstance(info.get("set"), dict):
            info["set"].update(used.get(set_name, {}))
    stats.header["recipe"] = recipe.to_dict()      # what `compress --stats` runs when given no method flags
    write_all([(output, stats.save)])
    return stats


def merge_stats(inputs, output: str | os.PathLike) -> Statistics:
    """Merge the shard files ``inputs`` (paths; one path alone is a list of one) of one
    ``calibrate --shard`` run into ``output``."""
    from onnxprune.calibration.shard import merge_shards

    inputs = [inputs] if _is_path(inputs) else list(inputs) if hasattr(inputs, "__iter__") and \
        not isinstance(inputs, bytes) else None
    if inputs is None or not all(_is_path(p) for p in inputs):
        raise CalibrationError("merge-stats", "takes the paths of the shard files (a list, or one path)",
                               "e.g. merge_stats([\"s1.npz\", \"s2.npz\"], \"stats.npz\")")
    paths = [Path(p) for p in inputs]
    check_output_text(output)
    check_outputs([output], {"statistics shard": paths})
    merged = merge_shards([Statistics.load(p) for p in paths], names=[p.name for p in paths])
    write_all([(output, merged.save)])
    return merged


def _path_or_none(source):
    """An absolute path for a file source (a worker elsewhere resolves no relative path as the user
    meant it), None for in-memory data."""
    return str(Path(source).resolve()) if isinstance(source, (str, os.PathLike)) else None


def _close(client) -> None:
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


def symbolic_dims_note(model: onnx.ModelProto) -> str | None:
    """What ``inspect``'s MACs take for the dimensions after the batch that the model leaves
    symbolic (None when there are none)."""
    dims = [f"{spec.name}[{axis}] ({spec.shape[axis] or '?'})" for spec in input_specs(model)
            for axis in spec.symbolic_axes]
    if not dims:
        return None
    return (f"MACs count the symbolic {', '.join(dims)} as 1; compress, validate, sensitivity and sweep "
            "count them at the size of their samples")


def inspect(model) -> dict[str, Any]:
    """Inputs/outputs, op histogram, parameters and MACs per layer, and what each method can touch."""
    m = as_model(model)
    ops = Counter(node.op_type for node in m.graph.node)
    # what loading folded away (Constant nodes, BatchNormalization into the layer before it): the
    # file's op counts less the model's, read without the weights
    folded = Counter() if isinstance(model, onnx.ModelProto) else \
        Counter(n.op_type for n in onnx.load(os.fspath(model), load_external_data=False).graph.node) - ops
    layers = cost.layer_costs(m)
    # a node is a layer when it computes (MACs) or holds weights: scalar constants (a Div's
    # divisor), shapes (a Reshape's, a Slice's starts) and a Resize's scales do not make one
    weights = weight_names(m)
    tensors = {t.name for t in m.graph.initializer if t.name in weights and int(np.prod(t.dims, dtype=np.int64)) > 1}
    linear = find_linear_layers(m)
    groups = find_channel_groups(m)
    return {
        "ir_version": m.ir_version,
        "opset": {d.domain or "ai.onnx": d.version for d in m.opset_import},
        "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": str(s.dtype)} for s in input_specs(m)],
        "outputs": output_names(m),
        "ops": dict(ops.most_common()),
        "folded": dict(folded.most_common()),
        "params": count_parameters(m),
        "macs": int(sum(layer.macs for layer in layers)),
        "macs_note": symbolic_dims_note(m),
        "bytes": model_bytes(m),
        "layers": [dataclasses.asdict(layer) for layer, node in zip(layers, m.graph.node)
                   if layer.macs or any(name in tensors for name in [*node.input, *subgraph_inputs(node)])],
        "low_rank": [{"layer": layer.name, "op": layer.op, "shape": [layer.out_features, layer.in_features],
                      "splittable": layer.skip is None, "reason": layer.skip} for layer in linear],
        "channel_groups": describe_groups(groups),
        "attention_skipped": [{"layer": name, "reason": reason}
                              for name, reason in head_layout_skips(GraphIndex(m))],
        "passes": sorted(REGISTRY),
    }


def validate(reference, candidate, data, *, preprocess: Preprocess | dict | None = None, batch_size: int = 32,
             device: str = "cpu", measure_latency: bool = True, latency_runs: int = 10,
             max_drop: float | None = None, min_agreement: float | None = None,
             progress: bool = False, metric: str = "auto", judge_output: str | None = None) -> ValidationReport:
    """Compare ``candidate`` with ``reference`` on ``data``; raises ValidationFailed on a missed threshold.
    ``metric``: "auto", "classes" or "embedding" (cosine, kNN and probe: ``onnxprune.embedding``);
    ``judge_output``: the output judged (default: the first float output, a token model's embedding).
    Labels outside the reference's classes are a DataError (``_validate``)."""
    check_threshold_values(max_drop=max_drop, min_agreement=min_agreement)
    check_latency_runs(latency_runs)
    ref, cand = as_model(reference), as_model(candidate)
    samples = as_samples(data, ref, preprocess)
    report = _validate(ref, cand, samples, batch_size=batch_size, device=device, measure_latency=measure_latency,
                       latency_runs=latency_runs, progress=progress, metric=metric, judge=judge_output)
    overlap = calibration_overlap(candidate, data)
    if overlap:
        report.warnings.insert(0, overlap)
    if report.accuracy_reference is not None and report.embedding is None:
        hint = preprocessing_hint(ref, label_probe(samples), batch_size=batch_size, device=device, judge=judge_output,
                                  samples="these samples", keeps="validate")
        if hint:
            report.warnings.append(hint)
    for warning in report.warnings:
        log.warning("%s", warning)
    try:
        check_thresholds(report, max_drop=max_drop, min_agreement=min_agreement)
    except ValidationFailed as exc:
        exc.report = {**report.to_dict(), "verdict": "failed", "reason": str(exc)}   # as compress's
        exc.validation = report
        raise
    return report
