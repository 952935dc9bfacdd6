"""File-level entry points behind ``onnxprune finetune``, ``onnxprune coprune`` and
``compress --finetune``: open the data, split it, train, validate, write the outputs atomically."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import onnx

from onnxprune.errors import DataError, RecipeError, ValidationFailed
from onnxprune.model import count_parameters, input_specs, jsonable, model_name, save_model
from onnxprune.outputs import text, write_all
from onnxprune.train import require_torch
from onnxprune.validation import check_threshold_values

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    model: onnx.ModelProto
    report: dict[str, Any]
    output: Path | None


#: the hint of finetune's exit 3
TRAINING_REMEDY = "train longer (--epochs) or on more samples, or start from a less compressed student"


def report_path(output: Path) -> Path:
    return output.with_name(output.stem + ".report.json")


def curve_path(output: Path) -> Path:
    return output.with_name(output.stem + ".curve.png")


def split_data(target, eval_data, split: float, seed: int, model, preprocess):
    """(train, held-out) SampleSets and warnings (logged): --eval-data when given (refused when
    every sample of it is in the target data, which trains: ``api.shared_samples``), else a seeded
    split of the target data."""
    from onnxprune.api import as_samples, shared_samples

    data = as_samples(target, model, preprocess)
    if eval_data is not None:
        held_out = as_samples(eval_data, model, preprocess)
        return data, held_out, shared_samples(held_out, data, eval_data, target, "--target-data",
                                              "trains in full when --eval-data is given")
    return *data.split(split, seed=seed), []


def check_labels(model: onnx.ModelProto, sample_sets, *, batch_size: int, device: str = "cpu") -> None:
    """compress's check of the labels (``api.judge_labels``) for every set a training reads or is
    scored on (None: skipped): labels outside the model's classes are a DataError naming the set,
    before they reach a loss (an IndexError) or an accuracy (counted wrong)."""
    from onnxprune import embedding
    from onnxprune.api import check_label_range, label_probe
    from onnxprune.plan.planner import model_outputs

    labelled = [s for s in sample_sets if s is not None and s.labels is not None]
    if not labelled or embedding.output_kind(model) != "classes":
        return
    outputs = model_outputs(model, label_probe(labelled[0]), batch_size=batch_size, device=device)
    check_label_range(labelled, outputs.shape[-1] if outputs.ndim == 2 else None)


def refuse_held_out_training(target_data, eval_data) -> None:
    """--eval-data that is the --target-data file: it trains in full, so accuracy on it would not be
    held out (a DataError, as compress refuses it)."""
    from onnxprune.api import refuse_same_file

    refuse_same_file(eval_data, target_data, "--target-data", "which trains in full when --eval-data is given: "
                     "accuracy on it would not be held out",
                     "drop --eval-data (then --split holds part of --target-data out) or pass other samples")


def check_config(config, kind: type) -> None:
    """A RecipeError unless ``config`` is a ``kind`` (TrainConfig, CoPruneConfig): a dict or a number
    given in its place would fail deep inside the training."""
    if not isinstance(config, kind):
        raise RecipeError("config", f"must be an {kind.__module__}.{kind.__name__}, not a {type(config).__name__}",
                          f"e.g. config={kind.__name__}(...) with the options as keywords")


def check_training_outputs(output, companions, model, others: dict) -> Path:
    """The output, its ``.data``, ``.report.json`` and ``companions`` must not be an input (any
    model with its external data, sample files or folders) and must have a usable folder;
    checked before any work (OutputError, exit 1)."""
    from onnxprune.api import input_paths
    from onnxprune.paths import check_output_text, check_outputs, model_files

    check_output_text(output)
    output = Path(output)
    models = {k: v for k, v in others.items() if k in ("--teacher", "--source-model")}
    inputs = input_paths(model, {k: v for k, v in others.items() if k not in models})
    for label, path in models.items():
        inputs[label] = model_files(path) if isinstance(path, (str, os.PathLike)) else None
    files = [output, output.with_name(output.name + ".data"), report_path(output)] + [f(output) for f in companions]
    check_outputs(files, inputs)
    return output


def worse_after_training(before: dict, after: dict, remedy: str, *, agreement: bool = True) -> str | None:
    """A warning when the trained model scores below the untrained one on the held-out samples
    (validation dicts against the same reference: top-1 accuracy with labels, else agreement with
    the reference unless ``agreement`` is False: a reference that is the untrained model itself), or
    None. They are not picked between: the held-out samples only evaluate."""
    if after.get("accuracy_candidate") is not None and before.get("accuracy_candidate") is not None:
        key, what = "accuracy_candidate", "top-1 accuracy"
    elif agreement:
        key, what = "agreement", "agreement"
    else:
        return None
    b, a = before.get(key), after.get(key)
    if a is None or b is None or not a < b:
        return None
    return (f"training did not help on the {after['samples']} held-out samples: {what} {100 * a:.2f}% after, "
            f"{100 * b:.2f}% before it; {remedy}")


def recover(original: onnx.ModelProto, compressed: onnx.ModelProto, train, held_out, *, config,
            batch_size: int = 32, device: str = "cpu", progress: bool = False,
            val=None, trained: tuple[onnx.ModelProto, dict] | None = None,
            name: str = "student") -> tuple[onnx.ModelProto, dict, dict]:
    """Distil ``original`` into ``compressed`` on ``train`` (checkpoint on ``val`` when given: best
    samples that did not calibrate the compression); (model, training report, validation before).
    ``trained``: (model, training report) of a distillation already run (``plan.recovery``);
    ``name``: what errors call the model (the file it came from)."""
    from onnxprune.train.distill import finetune
    from onnxprune.validation import validate

    require_torch()
    before = validate(original, compressed, held_out, batch_size=batch_size, device=device,
                      measure_latency=False, progress=False)
    tuned, report = trained or finetune(compressed, original, train, config=config, val_samples=val, name=name)
    return tuned, report, before.to_dict()


def finetune_files(student, output, target_data, *, teacher=None, eval_data=None, val_data=None, split: float = 0.5,
                   preprocess: dict | None = None, config=None, device: str = "cpu", progress: bool = True,
                   measure_latency: bool = True, max_drop: float | None = None,
                   min_agreement: float | None = None) -> TrainResult:
    """``onnxprune finetune``: train STUDENT on the target data (distilling TEACHER when given),
    validate against the teacher (or the untrained student) on held-out data, write OUTPUT,
    ``.report.json`` and ``.curve.png``."""
    require_torch()
    from onnxprune.api import as_model, refuse_same_file
    from onnxprune.train.distill import (TrainConfig, check_training_samples, finetune, plot_curve, same_model,
                                         shared_labels)
    from onnxprune.validation import check_thresholds, validate

    config = TrainConfig() if config is None else config
    check_config(config, TrainConfig)
    check_threshold_values(max_drop=max_drop, min_agreement=min_agreement)
    output = check_training_outputs(output, [curve_path], student, {"--teacher": teacher, "--target-data": target_data,
                                                                    "--eval-data": eval_data, "--val-data": val_data})
    refuse_held_out_training(target_data, eval_data)
    refuse_same_file(val_data, target_data, "--target-data", "which trains: a checkpoint picked on it would not "
                     "be held out", "drop --val-data (then --val-fraction of the training samples picks it) or pass "
                     "other samples")
    refuse_same_file(val_data, eval_data, "--eval-data", "so the checkpoint would be picked on the evaluation "
                     "samples, which are then no longer held out", "pass other samples as --val-data, or drop it")
    student_model = as_model(student)
    teacher_model = as_model(teacher) if teacher is not None else None
    warnings = []
    if teacher_model is not None:
        # data inputs, not weights (IR 3 models list their initializers as inputs too)
        s_in, t_in = ([spec.name for spec in input_specs(m)] for m in (student_model, teacher_model))
        s_out, t_out = [o.name for o in student_model.graph.output], [o.name for o in teacher_model.graph.output]
        if s_out != t_out or not set(s_in) <= set(t_in) | {t.name for t in teacher_model.graph.initializer}:
            raise DataError(model_name(teacher, "--teacher"), f"has other inputs or outputs than the student "
                            f"{model_name(student, 'STUDENT')} (inputs {', '.join(t_in)}; outputs {', '.join(t_out)}; "
                            f"the student's: {', '.join(s_in)}; {', '.join(s_out)})",
                            "the teacher (--teacher) must be the model the student was compressed from")
        sizes = count_parameters(student_model), count_parameters(teacher_model)
        if sizes[0] > sizes[1]:     # STUDENT is the model trained: the original given in its place?
            warnings.append(f"the student {model_name(student, 'STUDENT')} has more parameters ({sizes[0]:,}) than "
                            f"the teacher {model_name(teacher, '--teacher')} ({sizes[1]:,}): the student is the model "
                            "trained (the compressed one) and --teacher the original; were they given the other "
                            "way round?")
            log.warning("%s", warnings[-1])
    train, held_out, notes = split_data(target_data, eval_data, split, config.seed, student_model, preprocess)
    warnings += notes
    val = None
    if val_data is not None:
        from onnxprune.api import as_samples, shared_samples

        val = as_samples(val_data, student_model, preprocess)
        for other, other_data, flag, role, problem, some in (
                (train, target_data, "--target-data", "trains", "a checkpoint picked on it would be picked on "
                 "training samples", "the checkpoint is picked partly on training samples"),
                (held_out, eval_data, "--eval-data", "evaluates", "the checkpoint would be picked on the evaluation "
                 "samples, which are then no longer held out", "those evaluation samples also pick the "
                 "checkpoint, so they are not held out")):
            if other_data is not None:
                warnings += shared_samples(val, other, val_data, other_data, flag, role, kind="checkpoint",
                                           problem=problem, some=some)
    check_labels(student_model, (train, val, held_out), batch_size=config.batch_size, device=device)
    check_training_samples(train, val, teacher=teacher_model is not None, config=config)
    if teacher_model is not None and same_model(student_model, teacher_model) and \
            (config.label_weight == 0 or shared_labels(train, val)[0] is None):
        raise DataError(model_name(student, "STUDENT"), f"is the teacher {model_name(teacher, '--teacher')} itself "
                        "(the same graph and weights): distilling a model into itself leaves it as it is",
                        "give the compressed model as STUDENT and its original as --teacher (or, to fine-tune "
                        "the original on labelled data, add --label-weight)")
    reference = teacher_model if teacher_model is not None else student_model
    before = validate(reference, student_model, held_out, batch_size=config.batch_size, device=device,
                      measure_latency=False, progress=False)
    tuned, train_report = finetune(student_model, teacher_model, train, config=config, val_samples=val,
                                   name=model_name(student, "student"))
    after = validate(reference, tuned, held_out, batch_size=config.batch_size, device=device,
                     measure_latency=measure_latency, progress=progress)
    report = {
        "student": model_name(student),
        "teacher": None if teacher is None else model_name(teacher),
        "reference": "teacher" if teacher_model is not None else "student before training",
        "finetune": train_report,
        "evaluation": held_out.describe(),
        "validation_before": before.to_dict(),
        "validation": after.to_dict(),
        "warnings": warnings + list(train_report["warnings"]),
    }
    remedy = ("the last epoch was kept (--checkpoint last): fewer epochs, a lower --lr or a checkpoint picked on "
              "the fold (--checkpoint auto) may do better" if config.checkpoint == "last" else
              "the checkpoint fold picked this epoch: fewer epochs, a lower --lr or a larger fold "
              "(--val-fraction, --val-data) may do better")
    worse = worse_after_training(report["validation_before"], report["validation"], remedy,
                                 agreement=teacher_model is not None)
    if worse:
        log.warning("%s", worse)
        report["warnings"].append(worse)
    try:
        check_thresholds(after, max_drop=max_drop, min_agreement=min_agreement, remedy=TRAINING_REMEDY)
    except ValidationFailed as exc:
        exc.report = report     # the command prints what training did; nothing is written
        raise
    report["curve_png"] = str(curve_path(output)) if importlib.util.find_spec("matplotlib") else None  # no figure
    write_all([(output, functools.partial(save_model, tuned)),
               (report_path(output), text(json.dumps(jsonable(report), indent=2) + "\n")),
               (curve_path(output), functools.partial(plot_curve, train_report))])
    return TrainResult(tuned, report, output)



def coprune_files(source_model, target_model, source_data, target_data, output, *, config, eval_data=None,
                  split: float = 0.5, preprocess: dict | None = None, device: str = "cpu",
                  measure_latency: bool = True) -> TrainResult:
    """``onnxprune coprune``: Co-Prune the target model, validate it against the dense target model on
    held-out target data, write OUTPUT and ``.report.json``."""
    require_torch()
    from onnxprune.api import as_model, as_samples, shared_samples
    from onnxprune.train.coprune import CoPruneConfig, coprune, nonzero_parameters
    from onnxprune.validation import validate

    check_config(config, CoPruneConfig)
    output = check_training_outputs(output, [], target_model, {"--source-model": source_model,
                                                                "--source-data": source_data,
                                                                "--target-data": target_data, "--eval-data": eval_data})
    refuse_held_out_training(target_data, eval_data)
    if any(a > 0 for a in config.alphas):   # the source network trains, and its weights help choose the target's mask
        from onnxprune.api import refuse_same_file

        if eval_data is not None:
            refuse_same_file(eval_data, source_data, "--source-data", "which trains the source network, whose "
                             "weights help choose the target's mask: accuracy on it would not be held out",
                             "pass other samples as --eval-data (or as --source-data)")
        else:
            refuse_same_file(source_data, target_data, "--target-data", "so the part --split holds out to "
                             "evaluate would train the source network, whose weights help choose the target's "
                             "mask: accuracy on it would not be held out",
                             "pass source-domain samples as --source-data, or held-out ones as --eval-data")
    source, target = as_model(source_model), as_model(target_model)
    train, held_out, notes = split_data(target_data, eval_data, split, config.seed, target, preprocess)
    source_samples = as_samples(source_data, source, preprocess)
    if any(a > 0 for a in config.alphas):
        notes += shared_samples(held_out, source_samples, target_data if eval_data is None else eval_data,
                                source_data, "--source-data", "trains the source network, whose weights help "
                                "choose the target's mask")
    check_labels(target, (train, held_out), batch_size=config.batch_size, device=device)
    check_labels(source, (source_samples,), batch_size=config.batch_size, device=device)
    pruned, train_report = coprune(source, target, source_samples, train, config=config,
                                   model_names=(model_name(source_model, "--source-model"),
                                                model_name(target_model, "--target-model")))
    after = validate(target, pruned, held_out, batch_size=max(config.batch_size, 64), device=device,
                     measure_latency=measure_latency, progress=False)
    report = {
        "source_model": model_name(source_model), "target_model": model_name(target_model),
        "coprune": train_report,
        "evaluation": held_out.describe(),
        "nonzero_parameters": {"target": nonzero_parameters(target), "pruned": nonzero_parameters(pruned),
                               "total": count_parameters(pruned)},
        "validation": after.to_dict(),
        "warnings": notes + list(train_report["warnings"]),
    }
    write_all([(output, functools.partial(save_model, pruned)),
               (report_path(output), text(json.dumps(jsonable(report), indent=2) + "\n"))])
    return TrainResult(pruned, report, output)
