"""Command line: parsing and printing only. Results on stdout, logs on stderr.

Exit codes: 0 success; 1 user error (one line naming the problem); 2 usage;
3 the compressed model failed the requested accuracy check.
"""

from __future__ import annotations

import functools
import json
import logging
import sys

import click

from onnxprune import __version__
from onnxprune.errors import OnnxPruneError, RecipeError

log = logging.getLogger("onnxprune")

# --method presets: the recipe each one stands for.
METHODS = {
    "svd": [("low-rank-split", {"method": "svd"})],
    "svd-bc": [("low-rank-split", {"method": "svd"}), ("bias-compensate", {})],
    "dalr": [("low-rank-split", {"method": "dalr"})],
    "dalr-bc": [("low-rank-split", {"method": "dalr"}), ("bias-compensate", {})],
}
PRUNING_CRITERIA = ("spectral", "momasp-J", "momasp-j", "pfa-en", "pfa-kl", "mean", "l1")


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None


def _size(text: str | None):
    if text is None:
        return None
    try:
        parts = [int(v) for v in text.lower().replace("x", ",").split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size like 224 or 224x224") from None
    return parts[0] if len(parts) == 1 else tuple(parts)


def preprocess_options(func):
    """Options that turn image data into model input (ignored for float arrays)."""
    options = [
        click.option("--resize", help="Resize images: N (shorter side) or HxW; default: the model's input size."),
        click.option("--center-crop", help="Center-crop images to N or HxW after resizing."),
        click.option("--grayscale/--color", default=None, help="Convert to gray (default: when the model has 1 channel)."),
        click.option("--scale", type=float, default=None, help="Multiply pixel values by this (default 1/255)."),
        click.option("--mean", help="Per-channel mean to subtract after scaling, e.g. 0.485,0.456,0.406."),
        click.option("--std", help="Per-channel std to divide by, e.g. 0.229,0.224,0.225."),
        click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default=None, help="Model input layout."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def preprocess_dict(kwargs) -> dict:
    out = {}
    for key in ("resize", "center_crop"):
        value = _size(kwargs.pop(key, None))
        if value is not None:
            out[key] = value
    for key in ("mean", "std"):
        value = _floats(kwargs.pop(key, None))
        if value is not None:
            out[key] = value
    for key in ("grayscale", "scale", "layout"):
        value = kwargs.pop(key, None)
        if value is not None:
            out[key] = value
    return out


def common_options(func):
    """-v/-q, --device, --batch-size."""
    func = click.option("-v", "--verbose", count=True, help="More logging (repeatable).")(func)
    func = click.option("-q", "--quiet", count=True, help="Less output; no progress bar.")(func)
    func = click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                        help="onnxruntime execution provider.")(func)
    func = click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)(func)
    return func


def show_progress(quiet: int) -> bool:
    """Progress bars only for a person watching a terminal."""
    return quiet == 0 and sys.stderr.isatty()


def user_errors(func):
    """Turn OnnxPruneError into a one-line message and its exit code; bugs keep their traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        verbose, quiet = kwargs.get("verbose", 0), kwargs.get("quiet", 0)
        level = logging.WARNING - 10 * verbose + 10 * quiet
        logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)
        try:
            return func(*args, **kwargs)
        except OnnxPruneError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="onnxprune")
def main():
    """Compress ONNX models for a target domain without retraining."""


def build_recipe(kw: dict, preprocess: dict):
    from onnxprune.pipeline import Recipe

    if kw.get("recipe"):
        recipe = Recipe.load(kw["recipe"])
        if preprocess:
            recipe = _replace(recipe, preprocess={**recipe.preprocess, **preprocess})
        return recipe
    method = kw["method"]
    budget = {k: kw[k] for k in ("keep", "rank", "fraction", "energy") if kw.get(k) is not None}
    layers = tuple(v for v in (kw.get("layers") or "").split(",") if v)
    if method in METHODS:
        for flag in ("alpha", "tau", "flops", "lam"):
            if kw.get(flag) is not None:
                raise RecipeError(f"--{flag}", f"applies to channel pruning, not --method {method}",
                                  "use --keep, --rank, --fraction or --energy")
        passes = [(name, dict(opts)) for name, opts in METHODS[method]]
        lr = passes[0][1]
        lr.update(budget)
        if layers:
            lr["layers"] = layers
        if kw.get("ridge") is not None:
            lr["ridge"] = kw["ridge"] if kw["ridge"] == "auto" else float(kw["ridge"])
    else:
        passes = _pruning_passes(method, budget, layers, kw)
    return Recipe(passes=tuple(passes), mode=kw.get("mode") or "one-shot", seed=kw["seed"],
                  calib_size=kw.get("calib_size"), split=kw["split"], batch_size=kw["batch_size"],
                  preprocess=preprocess)


def _pruning_passes(method, budget, layers, kw):
    for flag in ("rank", "energy"):
        if flag in budget:
            raise RecipeError(f"--{flag}", f"does not apply to --method {method}",
                              "use --keep, --flops, --fraction, --alpha or --tau")
    select = {"criterion": method, **{k: budget[k] for k in ("keep", "fraction") if k in budget}}
    for key in ("alpha", "tau", "flops", "lam"):
        if kw.get(key) is not None:
            select[key] = kw[key]
    if layers:
        select["groups"] = layers
    passes = [("select-nodes", select), ("reconstruct-next-layer", {"reconstruct": not kw.get("no_reconstruct")})]
    if kw.get("then_low_rank") is not None:
        passes.append(("low-rank-split", {"method": "dalr", "keep": kw["then_low_rank"], "ops": ("Gemm", "MatMul")}))
    return passes


def _replace(recipe, **changes):
    import dataclasses
    return dataclasses.replace(recipe, **changes)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--target-data", required=True, help="Samples from the deployment domain (file or folder).")
@click.option("--source-data", help="Samples from the training domain (MoMaSP regulariser).")
@click.option("--eval-data", help="Held-out evaluation samples (default: the part of --target-data not used to calibrate).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Compressed model path.")
@click.option("--recipe", type=click.Path(dir_okay=False), help="Recipe file (JSON or TOML); overrides method flags.")
@click.option("--method", type=click.Choice(list(METHODS) + list(PRUNING_CRITERIA)), default="dalr-bc",
              show_default=True, help="Low-rank (svd, svd-bc, dalr, dalr-bc) or channel pruning criterion.")
@click.option("--keep", type=float, help="Keep this fraction of the compressible parameters (global budget).")
@click.option("--rank", type=int, help="Low rank: the same rank for every layer.")
@click.option("--fraction", type=float, help="Keep this fraction of each layer's parameters.")
@click.option("--energy", type=float, help="Low rank: smallest rank retaining this energy per layer.")
@click.option("--alpha", type=float, help="Pruning: information retention ratio per group (spectral, momasp).")
@click.option("--tau", type=float, help="Pruning: PFA-En energy threshold.")
@click.option("--flops", type=float, help="Pruning: keep this fraction of the MACs (global budget).")
@click.option("--lam", type=float, help="MoMaSP regulariser weight (default 1).")
@click.option("--ridge", help="DALR ridge relative to trace(S)/n, or 'auto' (default: chosen on held-out data).")
@click.option("--layers", help="Comma-separated layer (or group) names to touch; default all.")
@click.option("--mode", type=click.Choice(["one-shot", "sequential"]), help="Pruning: one calibration, or re-gather after each site.")
@click.option("--no-reconstruct", is_flag=True, help="Pruning: drop channels without compensating the next layer.")
@click.option("--then-low-rank", type=float, help="After pruning, DALR-split the FC layers keeping this fraction.")
@click.option("--calib-size", type=click.IntRange(min=1), help="At most this many calibration samples.")
@click.option("--split", type=float, default=0.5, show_default=True, help="Fraction of --target-data that calibrates.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--stats", type=click.Path(dir_okay=False), help="Reuse statistics saved by `onnxprune calibrate`.")
@click.option("--max-drop", type=float, help="Fail (exit 3, no output) if accuracy drops more than this many points.")
@click.option("--min-agreement", type=float, help="Fail (exit 3, no output) below this top-1 agreement (0-1).")
@click.option("--no-latency", is_flag=True, help="Skip latency measurement during validation.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@click.option("--finetune", "finetune_epochs", type=click.IntRange(min=1),
              help="Then distil the original into the result for this many epochs ([train] extra).")
@preprocess_options
@common_options
@user_errors
def compress(model, output, as_json, verbose, quiet, device, **kw):
    """Compress MODEL for the domain of --target-data and write -o OUTPUT."""
    from onnxprune import api

    preprocess = preprocess_dict(kw)
    recipe = build_recipe(kw, preprocess)
    finetune = None
    if kw.get("finetune_epochs"):
        from onnxprune.train import require_torch
        from onnxprune.train.distill import TrainConfig

        require_torch()
        finetune = TrainConfig(epochs=kw["finetune_epochs"], seed=kw["seed"], progress=show_progress(quiet))
    result = api.compress(model, kw["target_data"], recipe=recipe, output=output, source_data=kw["source_data"],
                          eval_data=kw["eval_data"], stats=kw["stats"], device=device, progress=show_progress(quiet),
                          max_drop=kw["max_drop"], min_agreement=kw["min_agreement"],
                          measure_latency=not kw["no_latency"], finetune=finetune)
    if as_json:
        click.echo(json.dumps(api.jsonable(result.report), indent=2))
        return
    if quiet == 0:
        for line in layer_table(result.report):
            click.echo(line)
        click.echo()
    for line in verdict_lines(result.report, output):
        click.echo(line)


def layer_table(report: dict) -> list[str]:
    rows = []
    for p in report["passes"]:
        for row in p.get("split", []):
            rows.append((row["layer"], row["op"], f"rank {row['rank']}", row["params_before"], row["params_after"],
                         f"{100 * row['energy']:.1f}%", f"{row['error']:.4f}", row.get("chosen", row["method"])))
        for row in p.get("pruned", []):
            rows.append((row["group"], "channels", f"{row['kept']}/{row['channels']}", row["params_before"],
                         row["params_after"], f"{100 * row.get('retention', float('nan')):.1f}%",
                         f"{row.get('error', float('nan')):.4f}", row.get("criterion", "")))
        for row in p.get("skipped", []):
            rows.append((row.get("layer") or row.get("group"), row.get("op", ""), "skipped", "", "", "", "",
                         row["reason"]))
    if not rows:
        return ["no layer was changed"]
    header = ("layer", "op", "kept", "params", "after", "energy", "rel.err", "method / note")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header) - 1)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)) + "  " + header[-1]]
    for r in rows:
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(r, widths)) + "  " + str(r[-1]))
    return lines


def verdict_lines(report: dict, output) -> list[str]:
    v = report["validation"]
    lines = []
    pb, pa = v["params_reference"], v["params_candidate"]
    mb, ma = v["macs_reference"], v["macs_candidate"]
    lines.append(f"parameters {pb:,} -> {pa:,} ({100 * pa / max(pb, 1):.1f}%), "
                 f"MACs {mb:,} -> {ma:,} ({100 * ma / max(mb, 1):.1f}%)")
    if v.get("accuracy_reference") is not None:
        lines.append(f"top-1 accuracy {100 * v['accuracy_reference']:.2f}% -> {100 * v['accuracy_candidate']:.2f}% "
                     f"on {v['samples']} held-out samples")
    lines.append(f"agreement {100 * v['agreement']:.2f}%, relative error {v['relative_error']:.4f}, "
                 f"SQNR {v['sqnr_db']:.1f} dB")
    if report.get("finetune"):
        b, ft = report["validation_before_finetune"], report["finetune"]
        acc = f"accuracy {100 * b['accuracy_candidate']:.2f}%, " if b.get("accuracy_candidate") is not None else ""
        lines.append(f"before fine-tuning: {acc}agreement {100 * b['agreement']:.2f}% "
                     f"({len(ft['curve']) - 1} epochs in {ft['seconds']:.0f} s, checkpoint epoch {ft['best_epoch']})")
    lat = v.get("latency_ms") or {}
    if lat.get("reference") and lat.get("candidate"):
        parts = [f"{k} {lat['reference'][k]:.2f} -> {lat['candidate'][k]:.2f} ms" for k in lat["reference"]]
        lines.append("latency " + ", ".join(parts))
    lines.append(f"wrote {output} (+ .report.json, .recipe.json)")
    return lines


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--target-data", required=True)
@click.option("--source-data")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Statistics file (.npz).")
@click.option("--recipe", type=click.Path(dir_okay=False), help="Gather what this recipe needs (default: DALR on all layers).")
@click.option("--method", type=click.Choice(list(METHODS) + list(PRUNING_CRITERIA)), default="dalr-bc")
@click.option("--layers")
@click.option("--seed", type=int, default=0)
@preprocess_options
@common_options
@user_errors
def calibrate(model, output, verbose, quiet, device, **kw):
    """Gather target (and source) statistics for MODEL once and save them for `compress --stats`."""
    from onnxprune import api

    preprocess = preprocess_dict(kw)
    kw.update(split=0.5, calib_size=None, mode=None)
    recipe = build_recipe(kw, preprocess)
    stats = api.calibrate(model, kw["target_data"], recipe=recipe, output=output, source_data=kw["source_data"],
                          device=device, progress=show_progress(quiet))
    sets = ", ".join(f"{k}: {v.get('count')} samples" for k, v in stats.header.get("sets", {}).items())
    click.echo(f"wrote {output} ({len(stats.header.get('requests', []))} tensors; {sets})")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
@common_options
@user_errors
def inspect(model, as_json, verbose, quiet, device, batch_size):
    """Show MODEL's inputs, ops, parameters and MACs per layer, and what each method can touch."""
    from onnxprune import api

    info = api.inspect(model)
    if as_json:
        click.echo(json.dumps(api.jsonable(info), indent=2))
        return
    click.echo(f"{model}: IR {info['ir_version']}, opset {info['opset']}")
    for i in info["inputs"]:
        click.echo(f"  input  {i['name']} {i['shape']} {i['dtype']}")
    for o in info["outputs"]:
        click.echo(f"  output {o}")
    click.echo("  ops    " + ", ".join(f"{k} {v}" for k, v in info["ops"].items()))
    click.echo(f"  params {info['params']:,}   MACs {info['macs']:,}   size {info['bytes'] / 1e6:.2f} MB")
    click.echo("\nlayers (params, MACs per sample):")
    for layer in info["layers"]:
        click.echo(f"  {layer['name']:<40} {layer['op']:<10} {layer['params']:>10,} {layer['macs']:>14,}")
    click.echo("\nlow-rank-split:")
    for layer in info["low_rank"]:
        status = "splittable" if layer["splittable"] else f"skipped: {layer['reason']}"
        click.echo(f"  {layer['layer']:<40} {layer['op']:<7} {layer['shape'][0]}x{layer['shape'][1]:<8} {status}")
    click.echo("\nchannel groups (select-nodes / reconstruct-next-layer):")
    for group in info["channel_groups"]:
        status = "prunable" if not group.get("skip") else f"skipped: {group['skip']}"
        click.echo(f"  {group['name']:<40} {group['channels']:>5} ch  {status}")
    n_split = sum(1 for layer in info["low_rank"] if layer["splittable"])
    n_groups = sum(1 for g in info["channel_groups"] if not g.get("skip"))
    click.echo(f"\n{n_split} splittable layers, {n_groups} prunable channel groups")


@main.command()
@click.argument("reference", type=click.Path(dir_okay=False))
@click.argument("candidate", type=click.Path(dir_okay=False))
@click.option("--data", required=True, help="Evaluation samples (labels enable accuracy).")
@click.option("--max-drop", type=float, help="Exit 3 if accuracy drops more than this many points.")
@click.option("--min-agreement", type=float, help="Exit 3 below this top-1 agreement (0-1).")
@click.option("--latency-runs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--no-latency", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@preprocess_options
@common_options
@user_errors
def validate(reference, candidate, data, as_json, verbose, quiet, device, batch_size, **kw):
    """Compare CANDIDATE with REFERENCE on --data: accuracy, agreement, error, size, MACs, latency."""
    from onnxprune import api
    from onnxprune.validate import check_thresholds

    preprocess = preprocess_dict(kw)
    report = api.validate(reference, candidate, data, preprocess=preprocess, batch_size=batch_size, device=device,
                          measure_latency=not kw["no_latency"], latency_runs=kw["latency_runs"], progress=show_progress(quiet))
    if as_json:
        click.echo(json.dumps(api.jsonable(report.to_dict()), indent=2))
    else:
        for line in report.summary_lines():
            click.echo(line)
    check_thresholds(report, max_drop=kw["max_drop"], min_agreement=kw["min_agreement"])


def training_options(func):
    """Options of recovery training (finetune, compress --finetune)."""
    options = [
        click.option("--epochs", type=click.IntRange(min=0), default=10, show_default=True, help="Training epochs."),
        click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate (cosine schedule)."),
        click.option("--temperature", type=float, default=4.0, show_default=True,
                     help="Distillation temperature for classifier outputs."),
        click.option("--label-weight", type=float, default=0.0, show_default=True,
                     help="Cross-entropy weight when the data has labels (1 without --teacher)."),
        click.option("--augment", is_flag=True, help="Random crop with padding (+ horizontal flip for RGB images)."),
        click.option("--patience", type=click.IntRange(min=1), default=5, show_default=True,
                     help="Stop after this many epochs without improvement on the held-out fold."),
        click.option("--val-fraction", type=float, default=0.1, show_default=True,
                     help="Fraction of the training samples held out to pick the checkpoint."),
        click.option("--max-minutes", type=float, help="Stop after the epoch that passes this wall time."),
        click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
                     help="torch CPU threads (more can be much slower on a shared machine)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def train_config(kw: dict, *, batch_size: int, seed: int, progress: bool, epochs: int | None = None):
    from onnxprune.train.distill import TrainConfig

    return TrainConfig(epochs=kw.pop("epochs") if epochs is None else epochs, lr=kw.pop("lr"),
                       batch_size=batch_size, temperature=kw.pop("temperature"),
                       label_weight=kw.pop("label_weight"), augment=kw.pop("augment"), patience=kw.pop("patience"),
                       val_fraction=kw.pop("val_fraction"), seed=seed, progress=progress, threads=kw.pop("threads"),
                       max_seconds=None if kw.get("max_minutes") is None else 60 * kw.pop("max_minutes"))


@main.command()
@click.argument("student", type=click.Path(dir_okay=False))
@click.option("--teacher", type=click.Path(dir_okay=False), help="The original model to distil (default: plain fine-tuning on labels).")
@click.option("--target-data", required=True, help="Training samples from the deployment domain (labels optional).")
@click.option("--eval-data", help="Held-out evaluation samples (default: the part of --target-data not used to train).")
@click.option("--split", type=float, default=0.5, show_default=True, help="Fraction of --target-data that trains.")
@click.option("--val-data", help="Held-out training samples that pick the checkpoint (default: --val-fraction of "
              "the training samples); best samples that did not calibrate the compression.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@training_options
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-drop", type=float, help="Fail (exit 3, no output) if accuracy drops more than this many points.")
@click.option("--min-agreement", type=float, help="Fail (exit 3, no output) below this top-1 agreement (0-1).")
@click.option("--no-latency", is_flag=True, help="Skip latency measurement during validation.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@preprocess_options
@click.option("-v", "--verbose", count=True, help="More logging (repeatable).")
@click.option("-q", "--quiet", count=True, help="Less output; no progress bar.")
@user_errors
def finetune(student, output, as_json, verbose, quiet, batch_size, seed, **kw):
    """Recover STUDENT's accuracy by distilling --teacher on --target-data (needs the [train] extra)."""
    from onnxprune.train import require_torch

    require_torch()
    from onnxprune.train.api import finetune_files

    preprocess = preprocess_dict(kw)
    config = train_config(kw, batch_size=batch_size, seed=seed, progress=show_progress(quiet))
    result = finetune_files(student, output, kw["target_data"], teacher=kw["teacher"], eval_data=kw["eval_data"],
                            val_data=kw["val_data"],
                            split=kw["split"], preprocess=preprocess, config=config, progress=show_progress(quiet),
                            measure_latency=not kw["no_latency"], max_drop=kw["max_drop"],
                            min_agreement=kw["min_agreement"])
    if as_json:
        click.echo(json.dumps(api_jsonable(result.report), indent=2))
        return
    for line in training_lines(result.report):
        click.echo(line)
    click.echo(f"wrote {output} (+ .report.json" + (", .curve.png)" if result.report.get("curve_png") else ")"))


def api_jsonable(value):
    from onnxprune.model import jsonable

    return jsonable(value)


def training_lines(report: dict) -> list[str]:
    ft = report["finetune"]
    before, after = report["validation_before"], report["validation"]
    ref = report.get("reference", "teacher")
    lines = [(f"trained {len(ft['curve']) - 1} epochs in {ft['seconds']:.0f} s on {ft['train_samples']} samples "
              f"(checkpoint: epoch {ft['best_epoch']} on {ft['val_samples']} held-out training samples; "
              f"stopped: {ft['stopped']})")]
    if after.get("accuracy_reference") is not None and report.get("teacher"):
        lines.append(f"top-1 accuracy on {after['samples']} evaluation samples: {ref} "
                     f"{100 * after['accuracy_reference']:.2f}%, student before {100 * before['accuracy_candidate']:.2f}%, "
                     f"after {100 * after['accuracy_candidate']:.2f}%")
    elif after.get("accuracy_reference") is not None:
        lines.append(f"top-1 accuracy on {after['samples']} evaluation samples: before "
                     f"{100 * before['accuracy_candidate']:.2f}%, after {100 * after['accuracy_candidate']:.2f}%")
    lines.append(f"agreement with the {ref}: before {100 * before['agreement']:.2f}%, after {100 * after['agreement']:.2f}%")
    return lines


def _layer_keep(text: str | None) -> tuple[tuple[str, float], ...]:
    if not text:
        return ()
    out = []
    for item in text.split(","):
        name, sep, value = item.rpartition("=")
        try:
            out.append((name, float(value)))
        except ValueError:
            raise click.BadParameter(f"{item!r} is not NAME=FRACTION") from None
        if not sep or not name:
            raise click.BadParameter(f"{item!r} is not NAME=FRACTION")
    return tuple(out)


@main.command()
@click.option("--source-model", required=True, type=click.Path(dir_okay=False), help="Network trained on the source domain.")
@click.option("--target-model", required=True, type=click.Path(dir_okay=False),
              help="The same network fine-tuned on the target domain (e.g. with `onnxprune finetune`).")
@click.option("--source-data", required=True, help="Labelled source-domain samples.")
@click.option("--target-data", required=True, help="Labelled target-domain samples (training).")
@click.option("--eval-data", help="Held-out target samples (default: the part of --target-data not used to train).")
@click.option("--split", type=float, default=0.5, show_default=True, help="Fraction of --target-data that trains.")
@click.option("--keep", type=float, required=True, help="Fraction of the Conv/Gemm/MatMul weights kept (non-zero).")
@click.option("--alpha", default="0.7,0.5,0.3", show_default=True,
              help="Transfer factor per stage (one value: three stages at it); 0 = target-only magnitude "
                   "pruning with the same training.")
@click.option("--allocation", type=click.Choice(["global", "layer"]), default="global", show_default=True,
              help="One magnitude threshold over all layers, or --keep in every layer.")
@click.option("--layer-keep", help="Fixed keep ratios for chosen weights: NAME=F,NAME=F (initializer names).")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate at each stage's start.")
@click.option("--patience", type=click.IntRange(min=1), default=3, show_default=True,
              help="lr / 10 after this many epochs without a lower training loss.")
@click.option("--max-epochs", type=click.IntRange(min=1), default=30, show_default=True,
              help="At most this many epochs per alpha stage (a stage ends at lr < 1e-6).")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Fraction of the target training samples held out to pick the checkpoint.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@click.option("--no-latency", is_flag=True, help="Skip latency measurement during validation.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@preprocess_options
@click.option("-v", "--verbose", count=True, help="More logging (repeatable).")
@click.option("-q", "--quiet", count=True, help="Less output; no progress bar.")
@user_errors
def coprune(output, as_json, verbose, quiet, **kw):
    """Co-Prune: prune --target-model to --keep non-zero weights with the source model's help ([train] extra)."""
    from onnxprune.train import require_torch

    require_torch()
    from onnxprune.train.api import coprune_files
    from onnxprune.train.coprune import CoPruneConfig

    preprocess = preprocess_dict(kw)
    alphas = _floats(kw["alpha"])
    if len(alphas) == 1:  # one value: the default's three stages, so --alpha 0 trains as long as Co-Prune
        alphas = alphas * 3
    config = CoPruneConfig(keep=kw["keep"], alphas=alphas, allocation=kw["allocation"],
                           layer_keep=_layer_keep(kw["layer_keep"]), lr=kw["lr"], patience=kw["patience"],
                           max_epochs=kw["max_epochs"], batch_size=kw["batch_size"], val_fraction=kw["val_fraction"],
                           seed=kw["seed"], threads=kw["threads"], progress=show_progress(quiet))
    result = coprune_files(kw["source_model"], kw["target_model"], kw["source_data"], kw["target_data"], output,
                           config=config, eval_data=kw["eval_data"], split=kw["split"], preprocess=preprocess,
                           measure_latency=not kw["no_latency"])
    if as_json:
        click.echo(json.dumps(api_jsonable(result.report), indent=2))
        return
    r, v = result.report, result.report["validation"]
    cp = r["coprune"]
    click.echo(f"{cp['method']}: kept {cp['kept_weights']:,} of {cp['masked_weights']:,} masked weights "
               f"({100 * cp['kept_weights'] / cp['masked_weights']:.2f}%); non-zero parameters "
               f"{r['nonzero_parameters']['target']:,} -> {r['nonzero_parameters']['pruned']:,}")
    if v.get("accuracy_reference") is not None:
        click.echo(f"top-1 accuracy on {v['samples']} held-out target samples: dense target "
                   f"{100 * v['accuracy_reference']:.2f}% -> pruned {100 * v['accuracy_candidate']:.2f}% "
                   f"(checkpoint: stage {cp['best']['stage']}, epoch {cp['best']['epoch']}; {cp['seconds']:.0f} s)")
    click.echo("note: " + cp["note"])
    click.echo(f"wrote {output} (+ .report.json)")


if __name__ == "__main__":  # pragma: no cover
    main()
