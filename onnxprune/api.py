"""The Python API behind each subcommand: compress, calibrate, inspect, validate.

The CLI only parses options and prints what these functions return.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxprune import cost
from onnxprune.calibration.collect import collect
from onnxprune.calibration.provider import StatsProvider
from onnxprune.calibration.readers import Preprocess, SampleSet, open_samples
from onnxprune.calibration.stats import Statistics
from onnxprune.errors import DataError, RecipeError
from onnxprune.graph import describe_groups, find_channel_groups, find_linear_layers
from onnxprune.model import count_parameters, input_specs, load_model, jsonable, model_bytes, output_names, save_model, write_text_atomic
from onnxprune.passes import REGISTRY
from onnxprune.pipeline import Recipe, run_pipeline
from onnxprune.validate import ValidationReport, check_thresholds
from onnxprune.validate import validate as _validate

def as_model(model) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_model(model)


def as_samples(data, model: onnx.ModelProto, preprocess: Preprocess | dict | None) -> SampleSet:
    if isinstance(data, SampleSet):
        return data
    if isinstance(preprocess, dict):
        preprocess = Preprocess(**preprocess)
    return open_samples(data, model, preprocess=preprocess)


@dataclasses.dataclass
class CompressResult:
    model: onnx.ModelProto
    report: dict[str, Any]
    output: Path | None


def compress(model, target_data, *, recipe: Recipe, output: str | os.PathLike | None = None,
             source_data=None, eval_data=None, stats: str | os.PathLike | None = None,
             device: str = "cpu", progress: bool = True, max_drop: float | None = None,
             min_agreement: float | None = None, measure_latency: bool = True,
             finetune=None) -> CompressResult:
    """Calibrate on the target data, run the recipe, validate on held-out data, write the output.

    With ``max_drop``/``min_agreement`` a failed check raises ValidationFailed and nothing is
    written. The input model file is never modified, and the output never overwrites it.
    ``finetune`` (an ``onnxprune.train.distill.TrainConfig``, needs the [train] extra) distils the
    original into the compressed model on the calibration part of the target data before validating.
    """
    source_path = None if isinstance(model, onnx.ModelProto) else Path(model)
    if output is not None and source_path is not None and Path(output).resolve() == source_path.resolve():
        raise RecipeError(str(output), "is the input model", "choose another output path (-o)")
    original = as_model(model)
    target = as_samples(target_data, original, recipe.preprocess)
    if eval_data is not None:
        calib, held_out = target, as_samples(eval_data, original, recipe.preprocess)
    else:
        calib, held_out = target.split(recipe.split, seed=recipe.seed)
    val_fold = None
    if finetune is not None:  # the checkpoint fold must not calibrate: a calibration fold flatters the untrained model
        val_fold, calib = calib.split(finetune.val_fraction, seed=recipe.seed)
    train_set = calib
    if recipe.calib_size is not None and recipe.calib_size < len(calib):
        calib = calib.subset(np.arange(recipe.calib_size))
    samples = {"target": calib}
    if source_data is not None:
        samples["source"] = as_samples(source_data, original, recipe.preprocess)
    if "source" in recipe.sets() and "source" not in samples and stats is None:
        raise DataError("--source-data", "this recipe needs source-domain samples", "pass --source-data DIR")
    preloaded = Statistics.load(stats, model=original) if stats is not None else None
    provider = StatsProvider(samples, batch_size=recipe.batch_size, folds=recipe.folds, device=device,
                             progress=progress, seed=recipe.seed, preloaded=preloaded, preloaded_model=original)
    compressed, report = run_pipeline(original, recipe, provider)
    if finetune is not None:
        from onnxprune.train.api import recover

        compressed, report["finetune"], report["validation_before_finetune"] = recover(
            original, compressed, train_set, held_out, config=finetune, batch_size=recipe.batch_size, device=device,
            val=val_fold)
    report["calibration"] = {name: s.describe() for name, s in samples.items()}
    report["evaluation"] = held_out.describe()
    validation = _validate(original, compressed, held_out, batch_size=recipe.batch_size, device=device,
                           measure_latency=measure_latency, progress=progress)
    report["validation"] = validation.to_dict()
    report["recipe"] = recipe.to_dict()
    check_thresholds(validation, max_drop=max_drop, min_agreement=min_agreement)
    if output is not None:
        output = Path(output)
        save_model(compressed, output)
        write_text_atomic(report_path(output), json.dumps(jsonable(report), indent=2) + "\n")
        recipe.save(recipe_path(output))
    return CompressResult(compressed, report, output)


def report_path(output: Path) -> Path:
    return output.with_name(output.stem + ".report.json")


def recipe_path(output: Path) -> Path:
    return output.with_name(output.stem + ".recipe.json")


def calibrate(model, target_data, *, recipe: Recipe, output: str | os.PathLike, source_data=None,
              device: str = "cpu", progress: bool = True) -> Statistics:
    """Gather the statistics ``recipe`` needs and save them to ``output`` (.npz) for ``--stats``."""
    original = as_model(model)
    samples = {"target": as_samples(target_data, original, recipe.preprocess)}
    if source_data is not None:
        samples["source"] = as_samples(source_data, original, recipe.preprocess)
    requests: dict[str, list] = {}
    for p in recipe.build():
        for request, sets in p.requests(original):
            for set_name in sets:
                if set_name in samples:
                    requests.setdefault(set_name, []).append(request)
    if not requests:
        raise RecipeError("recipe", "needs no statistics on this model (no compressible layer)")
    stats = None
    for set_name, todo in requests.items():
        part = collect(original, {set_name: samples[set_name]}, list(dict.fromkeys(todo)),
                       batch_size=recipe.batch_size, folds=recipe.folds, device=device, progress=progress,
                       seed=recipe.seed)
        stats = part if stats is None else stats.merge(part)
    stats.save(output)
    return stats


def inspect(model) -> dict[str, Any]:
    """Inputs/outputs, op histogram, parameters and MACs per layer, and what each method can touch."""
    m = as_model(model)
    ops: dict[str, int] = {}
    for node in m.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    layers = cost.layer_costs(m)
    linear = find_linear_layers(m)
    groups = find_channel_groups(m)
    return {
        "ir_version": m.ir_version,
        "opset": {d.domain or "ai.onnx": d.version for d in m.opset_import},
        "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": str(s.dtype)} for s in input_specs(m)],
        "outputs": output_names(m),
        "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "params": count_parameters(m),
        "macs": int(sum(layer.macs for layer in layers)),
        "bytes": model_bytes(m),
        "layers": [dataclasses.asdict(layer) for layer in layers if layer.params or layer.macs],
        "low_rank": [{"layer": layer.name, "op": layer.op, "shape": [layer.out_features, layer.in_features],
                      "splittable": layer.skip is None, "reason": layer.skip} for layer in linear],
        "channel_groups": describe_groups(groups),
        "passes": sorted(REGISTRY),
    }


def validate(reference, candidate, data, *, preprocess: Preprocess | dict | None = None, batch_size: int = 32,
             device: str = "cpu", measure_latency: bool = True, latency_runs: int = 10,
             max_drop: float | None = None, min_agreement: float | None = None,
             progress: bool = False) -> ValidationReport:
    """Compare ``candidate`` with ``reference`` on ``data``; raises ValidationFailed on a missed threshold."""
    ref, cand = as_model(reference), as_model(candidate)
    samples = as_samples(data, ref, preprocess)
    report = _validate(ref, cand, samples, batch_size=batch_size, device=device, measure_latency=measure_latency,
                       latency_runs=latency_runs, progress=progress)
    check_thresholds(report, max_drop=max_drop, min_agreement=min_agreement)
    return report
