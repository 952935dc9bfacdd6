"""Command line: parsing and printing only. Results on stdout, logs on stderr.

Exit codes: 0 success (also a compress that changed nothing, which says so); 1 user error
(one line naming the problem, nothing written); 2 usage (a bad option value, naming the
flag); 3 the compressed model failed the requested accuracy check (compress still prints the
layer table and writes OUT.report.json with "verdict": "failed", but no model); 4 internal error (a bug in
onnxprune: one line naming the stage or pass, the full traceback written to
``onnxprune-internal-<time>-<pid>.log`` in the system temp directory, whose path is printed);
130 interrupted (Ctrl-C).

Logging: warnings by default, ``-v`` what each stage and pass does (sites found, skipped and
why, sizes chosen, timings), ``-vv`` the numbers behind each choice, ``-q`` errors only; on stderr.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import math
import os
import sys
import tempfile
import traceback
from pathlib import Path

import click

from onnxprune import MISSING_RUNTIME, __version__

if MISSING_RUNTIME:  # neither onnxruntime wheel is installed: one line, exit 1
    sys.exit(f"error: {MISSING_RUNTIME}")
from onnxprune import recipes
from onnxprune.launch import INTERRUPTED_EXIT_CODE
from onnxprune.errors import INTERNAL_EXIT_CODE, InternalError, OnnxPruneError, UsageError, ValidationFailed
from onnxprune.pipeline import DEFAULT_CALIB_SIZE

log = logging.getLogger("onnxprune")


class FiniteRange(click.FloatRange):
    """A click.FloatRange that refuses nan and inf as well (nan compares false with every bound,
    so click.FloatRange lets it through; inf passes a range open above)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


#: a fraction in (0, 1]: budgets and retention ratios
FRACTION = FiniteRange(0, 1, min_open=True)
#: a fraction in (0, 1): splits of the data, held-out folds
OPEN_FRACTION = FiniteRange(0, 1, min_open=True, max_open=True)
#: a number > 0: learning rates, temperatures, times
POSITIVE = FiniteRange(min=0, min_open=True)
#: a number >= 0: loss weights, reserves
NON_NEGATIVE = FiniteRange(min=0)


class NumberList(click.ParamType):
    """Comma-separated numbers, each one checked by ``item`` (a click type such as FloatRange)."""

    name = "X,..."

    def __init__(self, item: click.ParamType = click.FLOAT):
        self.item = item

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        items = [v.strip() for v in str(value).split(",")]
        if items and not items[-1]:          # "0.9,0.8," : a trailing comma ends the list
            items.pop()
        if not items or not all(items):
            self.fail(f"{value!r} is not a list of numbers like 0.9,0.8,0.7", param, ctx)
        for v in items:         # a percentage or a space-separated list: say what to write, not "float range"
            try:
                number = float(v[:-1] if v.endswith("%") else v)
            except ValueError:
                self.fail(f"{value!r} is not a list of numbers like 0.9,0.8,0.7 (commas between them)", param, ctx)
            if v.endswith("%"):
                self.fail(f"{v!r} is a percentage: give fractions, e.g. {number / 100:g} for {v}", param, ctx)
        return tuple(self.item.convert(v, param, ctx) for v in items)


#: compress's console: "not planned" lines shown without -v, and their width (``skipped_lines``)
SKIPPED_SHOWN = 4
SKIPPED_WIDTH = 160
#: sweep's budgets: fractions in (0, 1] (1: the original, as compress --keep 1.0)
BUDGETS = NumberList(FRACTION)


class SizeType(click.ParamType):
    """An image size: N (int) or HxW / H,W (a pair), each >= 1."""

    name = "size"

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            sizes = tuple(int(v) for v in value.lower().replace("x", ",").split(","))
        except ValueError:
            sizes = ()
        if len(sizes) not in (1, 2) or min(sizes) < 1:
            self.fail(f"{value!r} is not a size like 224 or 224x224 (each at least 1)", param, ctx)
        return sizes[0] if len(sizes) == 1 else sizes


class ShardType(click.ParamType):
    """``I/N`` (1-based) -> (I - 1, N), as ``calibration.shard.parse_shard`` reads it."""

    name = "I/N"

    def convert(self, value, param, ctx):
        from onnxprune.calibration.shard import parse_shard

        if isinstance(value, tuple):
            return value
        try:
            return parse_shard(value)
        except OnnxPruneError as exc:
            self.fail(exc.problem + (f" ({exc.hint})" if exc.hint else ""), param, ctx)


class BadFile(click.ClickException):
    """A path that cannot be the file it should be: a user error (exit 1), one ``error:`` line."""

    exit_code = 1

    def show(self, file=None):
        click.echo(f"error: {self.message}", err=True)


class FilePath(click.Path):
    """A file path (it need not exist); an existing directory is a bad file (exit 1), not a usage error."""

    def __init__(self):
        super().__init__(dir_okay=False)

    def convert(self, value, param, ctx):
        if os.path.isdir(value):
            where = f" (for {param.get_error_hint(ctx)})" if param is not None else ""
            raise BadFile(f"{value} | is a directory, not a file{where}")
        return super().convert(value, param, ctx)


#: a file argument or option (model, output, recipe, statistics...)
FILE = FilePath()


class RidgeType(click.ParamType):
    """'auto' or a number >= 0."""

    name = "RIDGE"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)) or value == "auto":
            return value
        try:
            ridge = float(value)
        except ValueError:
            self.fail(f"{value!r} is not 'auto' or a number >= 0", param, ctx)
        if not ridge >= 0:
            self.fail(f"{value!r} is not 'auto' or a number >= 0", param, ctx)
        return ridge


class CalibSizeType(click.ParamType):
    """A number of samples >= 1, or 'all' (None)."""

    name = "N|all"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        if str(value).lower() == "all":
            return None
        try:
            size = int(value)
        except ValueError:
            self.fail(f"{value!r} is not a number of samples or 'all'", param, ctx)
        if size < 1:
            self.fail(f"{value!r} must be at least 1 (or 'all')", param, ctx)
        return size


def preprocess_options(func):
    """Options that turn image data into model input (ignored for float arrays)."""
    options = [
        click.option("--resize", type=SizeType(), help="Resize images: N (shorter side) or HxW; default: the model's input size."),
        click.option("--center-crop", type=SizeType(), help="Center-crop images to N or HxW after resizing."),
        click.option("--grayscale/--color", default=None, help="Convert to gray (default: when the model has 1 channel)."),
        click.option("--scale", type=POSITIVE, default=None, help="Multiply pixel values by this (default 1/255)."),
        click.option("--mean", type=NumberList(FiniteRange()), help="Per-channel mean to subtract after scaling, e.g. 0.485,0.456,0.406."),
        click.option("--std", type=NumberList(POSITIVE), help="Per-channel std to divide by, e.g. 0.229,0.224,0.225."),
        click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default=None, help="Model input layout."),
        click.option("--tokenizer", type=FILE,
                     help="tokenizer.json that turns .txt (a sentence a line) / .tsv (text, label columns) data "
                          "into token inputs ([text] extra)."),
        click.option("--max-length", type=click.IntRange(min=2, max=1 << 20),    # data.text.MAX_LENGTH_LIMIT
                     help="Tokens per sentence with --tokenizer: cut and padded to this (default 128; at most the "
                          "model's positions)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


#: the preprocessing options (``preprocess_options``), as keywords
PREPROCESS_KEYS = ("resize", "center_crop", "mean", "std", "grayscale", "scale", "layout", "tokenizer", "max_length")


#: the data arguments of the commands (any of them may be a text file that --tokenizer reads)
DATA_KEYS = ("target_data", "source_data", "eval_data", "data", "val_data")


def preprocess_dict(kwargs, *data) -> dict:
    """The preprocessing flags given (popped from ``kwargs``); --mean and --std of different
    lengths are a usage error, and so is --tokenizer when no data (the ``DATA_KEYS`` of ``kwargs``,
    and ``data``) is text: it would be recorded in the recipe without having run. The --tokenizer path is made absolute: the recipe written
    next to an output keeps it, and a --recipe run from another folder must find the same file."""
    from onnxprune.data.text import SUFFIXES, is_text_file

    out = {}
    for key in PREPROCESS_KEYS:
        value = kwargs.pop(key, None)
        if value is not None:
            out[key] = os.path.abspath(value) if key == "tokenizer" else value
    data = [d for d in (*data, *(kwargs.get(key) for key in DATA_KEYS)) if d]
    if "tokenizer" in out and data and not any(is_text_file(d) for d in data):
        raise click.UsageError(f"--tokenizer does not apply: none of the data is text ({', '.join(SUFFIXES)}), and "
                               "token arrays are fed as they are")
    mean, std = out.get("mean"), out.get("std")
    if mean is not None and std is not None and len(mean) != len(std):
        raise click.UsageError(f"--mean has {len(mean)} values but --std has {len(std)}: give one "
                               "value, or one per channel, for both")
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


class _Stderr(logging.Handler):
    """Writes records to whatever ``sys.stderr`` is at the time (click's test runner swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001  (logging's own contract)  # pragma: no cover
            self.handleError(record)


def setup_logging(verbose: int, quiet: int) -> None:
    """The ``onnxprune`` loggers at WARNING, INFO (-v), DEBUG (-vv) or ERROR (-q), on stderr."""
    level = max(logging.WARNING - 10 * verbose + 10 * quiet, logging.DEBUG)
    for handler in [h for h in log.handlers if isinstance(h, _Stderr)]:
        log.removeHandler(handler)
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(level)


def internal_error_log(command: str, exc: BaseException) -> Path:
    """Write the full traceback of an internal error to a new file in the temp directory."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = Path(tempfile.gettempdir()) / f"onnxprune-internal-{stamp}-{os.getpid()}.log"
    text = (f"onnxprune {__version__}, command {command}, python {sys.version.split()[0]}\n"
            f"argv: {' '.join(sys.argv)}\n\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    path.write_text(text)
    return path


def _where(command: str, exc: BaseException) -> str:
    """The stage an unexpected exception came from: the InternalError's, else the innermost
    onnxprune frame of its traceback."""
    if isinstance(exc, InternalError):
        return exc.stage
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}onnxprune{os.sep}" in f.filename]
    if not frames:
        return command
    frame = frames[-1]
    module = frame.filename.rsplit(f"{os.sep}onnxprune{os.sep}", 1)[-1]
    return f"{command} ({module}:{frame.lineno}, {frame.name})"


def user_errors(func):
    """OnnxPruneError: a one-line message and its exit code (1, 3); Ctrl-C: "interrupted", exit
    code 130. Anything else is a bug: one line naming where, the traceback written to a log
    file, exit code 4."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        setup_logging(kwargs.get("verbose", 0), kwargs.get("quiet", 0))
        stdout, sys.stdout = sys.stdout, ClosedPipeSafe(sys.stdout)
        try:
            return func(*args, **kwargs)
        except UsageError as exc:  # found after parsing: click's usage message too
            raise click.UsageError(str(exc), click.get_current_context(silent=True)) from None
        except OnnxPruneError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(INTERRUPTED_EXIT_CODE)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise                   # usage errors (exit 2) and click's own exits
        except Exception as exc:  # noqa: BLE001  (every other exception is a bug: reported, exit 4)
            command = func.__name__
            try:
                where = f"traceback written to {internal_error_log(command, exc)}"
            except OSError as write_error:
                where = f"the traceback could not be written ({write_error}); rerun with -vv"
            problem = exc.problem if isinstance(exc, InternalError) else \
                f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            click.echo(f"internal error in {_where(command, exc)}: {problem}. This is a bug in onnxprune, "
                       f"not in your input; {where}, please send it to us.", err=True)
            sys.exit(INTERNAL_EXIT_CODE)
        finally:
            sys.stdout = stdout

    return wrapper


class ClosedPipeSafe:
    """stdout for a command: once its reader has gone (``| head``), the rest of what it prints
    goes to os.devnull, so that the command still finishes and exits with its own code (a
    closed pipe is no error of the command, and no bug)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        """Point the stream's file descriptor at os.devnull: what it still holds, and writes
        after this, are dropped without another error (also at exit)."""
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="onnxprune")
def main():
    """Compress ONNX models for a target domain without retraining."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _given(name: str) -> bool:
    """The option was given on the command line (not its default)."""
    from click.core import ParameterSource

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return False
    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def build_recipe(kw: dict, preprocess: dict, *, sized: bool = True):
    """The recipe the flags describe (``recipes.build_recipe``), or the --recipe file with the
    recipe-level flags given on the command line (--calib-size, --split, --seed, --mode,
    --batch-size, preprocessing) applied over it. Method flags cannot be combined with --recipe,
    nor contradict each other (usage error)."""
    import dataclasses

    from onnxprune.pipeline import Recipe

    if kw.get("recipe"):
        # the file fixes the method, its budget and the planner's options (its plan table): a flag for
        # them would be ignored
        clash = [_flag(k if kw[k] is not False else f"no_{k}")
                 for k in (*recipes.METHOD_OPTIONS, *recipes.PLANNER_OPTIONS) if k in kw and _given(k)]
        if clash:
            raise click.UsageError(f"--recipe fixes the method, its budget and the planner's options: "
                                   f"{', '.join(clash)} cannot be combined with it (edit the recipe file, or drop "
                                   "--recipe)")
        recipe = Recipe.load(kw["recipe"])
        changes = {k: kw[k] for k in recipes.RECIPE_SETTINGS if k in kw and _given(k)}
        if preprocess:
            changes["preprocess"] = {**recipe.preprocess, **preprocess}
        return dataclasses.replace(recipe, **changes) if changes else recipe
    try:
        return recipes.build_recipe(kw, preprocess, flag=_flag, sized=sized)
    except recipes.OptionConflict as exc:
        raise click.UsageError(exc.problem) from None


METRIC_HELP = ("How outputs are compared: classes (accuracy, agreement), embedding (cosine to the original; "
               "with labels kNN and linear-probe accuracy), auto: embedding for a token model's (attention_mask "
               "input) vector output at least 64 wide, else classes.")


#: compress --finetune's learning rate: its students are near the original, where 1e-3 (finetune's
#: default, for badly damaged models) first moves them away (ResNet-20 planned to 70 % of the MACs,
#: 79.30 % untrained, original 80.84 %: in 5 epochs 1e-3 never beat the untrained student; in 10,
#: 5e-4 reached 80.60 %, 2e-4 79.94 %)
COMPRESS_LR = 5e-4
#: compress --max-drop --finetune's checkpoint fold (of the calibration part) decides which
#: distilled plan is kept (and then does not pick epochs: the last is kept): half of it (ResNet-20:
#: 2500 images read a candidate's drop to +- 0.5-0.65 points and let the search go below 80 % of
#: the MACs, 77.5 % at split seed 0; 1000 read it to +- 0.6-0.8 and stopped at 83.1 %, for about the
#: same training: 16 epochs of 2500 images, 10 of 4000). With a budget it only picks the epoch: 0.1
SEARCH_FOLD = 0.5
#: the options of ``training_options`` besides --epochs (their parameter names)
TRAINING_FLAGS = ("lr", "temperature", "label_weight", "augment", "patience", "val_fraction", "max_minutes", "threads",
                  "feature_weight", "train_layers", "checkpoint")


def training_options(func, *, epochs: bool = True, lr: float = 1e-3, val_fraction: float | None = 0.1,
                     patience: int | None = 5, checkpoint: str | None = "auto"):
    """Options of recovery training (finetune; compress --finetune, which gives the epochs itself,
    starts from a model near the original: a smaller ``lr``, no early stop, and decides its plan
    on the checkpoint fold: a larger ``val_fraction``, the last epoch kept; None: set by the
    command)."""
    options = [
        click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True, help="Training epochs."),
    ] if epochs else []
    options += [
        click.option("--lr", type=POSITIVE, default=lr, show_default=True, help="Adam learning rate (cosine schedule)."),
        click.option("--temperature", type=POSITIVE, default=4.0, show_default=True,
                     help="Distillation temperature for classifier outputs."),
        click.option("--label-weight", type=NON_NEGATIVE, default=0.0, show_default=True,
                     help="Cross-entropy weight when the data has labels"
                          + (" (1 without --teacher)." if epochs else ".")),   # compress: the original teaches
        click.option("--augment", is_flag=True, help="Random crop with padding (+ horizontal flip for RGB images)."),
        click.option("--patience", type=click.IntRange(min=1), default=patience, show_default=patience is not None,
                     help="Stop after this many epochs without improvement on the held-out fold"
                          + ("." if patience is not None else " (default: never stop early).")),
        click.option("--val-fraction", type=OPEN_FRACTION, default=val_fraction, show_default=val_fraction is not None,
                     help="Fraction of the training samples held out to pick the checkpoint"
                          + ("." if val_fraction is not None else
                             " (default: 0.5 with --max-drop, where it also decides the plan; else 0.1).")),
        click.option("--max-minutes", type=POSITIVE, help="Stop after the epoch that passes this wall time."),
        click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
                     help="torch CPU threads (more can be much slower on a shared machine)."),
        click.option("--feature-weight", type=NON_NEGATIVE, default=0.0, show_default=True,
                     help="Weight of the feature loss: relative MSE between the student's and the teacher's "
                          "outputs of every rewritten layer (same name and shape); 0 matches final outputs only."),
        click.option("--train-layers", type=click.Choice(["all", "rewritten"]), default="all", show_default=True,
                     help="Train every weight, or only those the compression created or changed."),
        click.option("--checkpoint", type=click.Choice(["auto", "agreement", "loss", "last"]), default=checkpoint,
                     show_default=checkpoint is not None,
                     help="Pick the epoch by held-out top-1 agreement (accuracy without a teacher) or by held-out "
                          "output loss; auto: loss on a fold under 100 samples; last: the last epoch"
                          + ("." if checkpoint is not None else
                             " (default: last with --max-drop, where the fold decides the plan; else auto).")),
    ]
    for option in reversed(options):
        func = option(func)
    return func


JUDGE_OUTPUT = click.option(
    "--judge-output", metavar="NAME",
    help="The model output accuracy, agreement and the planner's damage are measured on (default: the first float "
         "output; a token model's sentence embedding). Other outputs are compared and warned about, not judged.")


def token_options(func):
    """--mask-input, --metric: token models (transformer encoders)."""
    options = [
        click.option("--mask-input", help="Model input whose zeros mark padded tokens, left out of the statistics "
                                          "(default: attention_mask when the model has it; 'none': no masking)."),
        click.option("--metric", type=click.Choice(["auto", "classes", "embedding"]), help=METRIC_HELP),
    ]
    for option in reversed(options):
        func = option(func)
    return func


#: how low rank splits k x k Convs (compress, sensitivity, sweep)
CONV_SPLIT = click.option(
    "--conv-split", type=click.Choice(["spatial", "channel"]),
    help="Low rank of k x k Convs. spatial: k x 1 into r channels, then 1 x k; the planner offers it beside the "
         "channel form and keeps per layer the one that pays (its default), a fixed recipe applies it to every "
         "k x k Conv. channel: k x k into r channels, then 1 x 1 only (fixed recipes' default).")


def calibration_options(func):
    """--split, --calib-size, --seed: which target samples calibrate (compress and calibrate alike)."""
    options = [
        click.option("--calib-size", type=CalibSizeType(), default=DEFAULT_CALIB_SIZE, show_default=True,
                     help="At most this many calibration samples per set (target, and source), drawn at random "
                          "(seeded); 'all' uses every one."),
        click.option("--split", type=OPEN_FRACTION, default=0.5,
                     show_default=True, help="Fraction of --target-data that calibrates; the rest evaluates."),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Seed of the split and the sampling."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@main.command(short_help="Compress a model for a target domain; writes the model, report and recipe.")
@click.argument("model", type=FILE)
@click.option("--target-data", required=True, help="Samples from the deployment domain (file or folder).")
@click.option("--source-data", help="Samples from the training domain (MoMaSP regulariser).")
@click.option("--eval-data", help="Held-out evaluation samples (default: the part of --target-data not used to calibrate).")
@click.option("-o", "--output", required=True, type=FILE, help="Compressed model path.")
@click.option("--recipe", type=FILE,
              help="Recipe file (JSON or TOML) instead of the method flags; --calib-size, --split, --seed, --mode, "
                   "--batch-size and preprocessing flags given with it apply over it.")
@click.option("--method", type=click.Choice(recipes.method_names(auto=True)), default="auto",
              show_default=True, help="auto: the planner chooses pruning or low rank per site; or restrict it to "
                                      "low rank (svd, svd-bc, dalr, dalr-bc) or one pruning criterion.")
@click.option("--objective", type=click.Choice(["macs", "params", "latency"]),
              help="What 'smaller' means for --max-drop planning (default macs; --keep implies params; "
                   "latency: measured onnxruntime time, see --latency-batch).")
@click.option("--latency-batch", type=click.IntRange(min=1), help="--objective latency or --latency-aware-splits: "
                                                                  "the batch size timed (default 1).")
@click.option("--latency-aware-splits", is_flag=True,
              help="Low rank: time each layer against its split on onnxruntime (1 thread, --latency-batch) and "
                   "skip the split, or shrink it by one channel block, unless it saves >= 5 % of the layer's time. "
                   "Runs the one recipe the flags describe (no planning).")
@click.option("--allocation", type=click.Choice(["plan", "global"]), default="plan", show_default=True,
              help="Meet --keep/--flops by per-site planning, or by one global threshold (the old way).")
@click.option("--margin", type=NON_NEGATIVE,
              help="Planner: standard errors kept in reserve below --max-drop, of the difference between the plan's "
                   "check and the evaluation on the held-out samples (default 1).")
@click.option("--check-extra", type=click.IntRange(min=0),
              help="Planner: the checks also score at most this many target samples that calibrate nothing (what "
                   "--calib-size left of the calibration part; default 4000, 0: none): a smaller standard error "
                   "for the same calibration.")
@click.option("--correct-drift/--no-correct-drift", "correct_drift", default=None,
              help="Planner: refit the layers after the compressed sites against the original (default on).")
@click.option("--keep", type=FRACTION, help="Keep this fraction of the model's parameters (a budget; with "
                                            "--allocation global: of the compressible parameters).")
@click.option("--rank", type=click.IntRange(min=1), help="Low rank: the same rank for every layer.")
@click.option("--fraction", type=FRACTION, help="Keep this fraction of each layer's parameters.")
@click.option("--energy", type=FRACTION, help="Low rank: smallest rank retaining this energy per layer.")
@click.option("--alpha", type=FRACTION, help="Pruning: information retention ratio per group (spectral, momasp).")
@click.option("--tau", type=FRACTION, help="Pruning: PFA-En energy threshold.")
@click.option("--flops", type=FRACTION, help="Keep this fraction of the model's MACs (a budget; with --allocation "
                                             "global: of the pruned layers' MACs).")
@click.option("--lam", type=NON_NEGATIVE, help="MoMaSP regulariser weight (default 1).")
@click.option("--ridge", type=RidgeType(), help="DALR ridge relative to trace(S)/n, or 'auto' (default: chosen on held-out data).")
@CONV_SPLIT
@click.option("--layers", help="Comma-separated layer (or group) names to touch; default all.")
@click.option("--mode", type=click.Choice(["one-shot", "sequential"]), help="Pruning: one calibration, or re-gather after each site.")
@click.option("--no-reconstruct", is_flag=True, help="Pruning: drop channels without compensating the next layer.")
@click.option("--then-low-rank", type=FRACTION, help="After pruning, DALR-split the FC layers keeping this fraction.")
@calibration_options
@token_options
@JUDGE_OUTPUT
@click.option("--stats", type=FILE, help="Reuse statistics saved by `onnxprune calibrate`.")
@click.option("--max-drop", type=FiniteRange(0, 100),
              help="Smallest model within this many points of accuracy (agreement without labels; embeddings: "
                   "kNN accuracy, 100 (1 - mean cosine) without labels); the default goal (1) when no budget is "
                   "given. Exit 3 (report only, no model) if the held-out check misses.")
@click.option("--min-agreement", type=FiniteRange(0, 1),
              help="Fail (exit 3, report only, no model) below this top-1 agreement (embeddings: mean cosine to "
                   "the original's; a fraction, 0-1).")
@click.option("--latency-runs", type=click.IntRange(min=1), default=10, show_default=True,
              help="Validation: timed runs of each model per batch size (interleaved).")
@click.option("--no-latency", is_flag=True, help="Skip latency measurement during validation.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@click.option("--finetune", "finetune_epochs", type=click.IntRange(min=1),
              help="Then distil the original into the result for this many epochs ([train] extra); with "
                   "--max-drop (or no budget) the plan is the smallest whose distilled model is within the drop. "
                   "The training options below apply.")
@click.option("--finetune-trials", type=click.IntRange(min=1), default=3, show_default=True,
              help="With --finetune and --max-drop: plans distilled at most (each a whole training).")
@click.option("--finetune-margin", type=NON_NEGATIVE,
              help="With --finetune and --max-drop: standard errors kept in reserve below --max-drop, of the "
                   "difference between a distilled plan's checkpoint-fold drop and the held-out evaluation "
                   "(default: --margin's).")
@click.option("--finetune-refit/--no-finetune-refit", default=True, show_default=True,
              help="With --finetune and --max-drop: distil the chosen plan again on the training samples and the "
                   "checkpoint fold together (one more training; the fold has decided), or keep its search weights.")
# no early stop: compress's students first move away from the original, and the cosine schedule's
# last epochs are where they gain (ResNet-20, 2500 training images, 16 epochs planned at 5e-4 with
# --patience 5: every candidate stopped after 5 epochs, keeping epoch 0's weights)
@functools.partial(training_options, epochs=False, lr=COMPRESS_LR, val_fraction=None, patience=None,
                   checkpoint=None)
@preprocess_options
@common_options
@user_errors
def compress(model, output, as_json, verbose, quiet, device, **kw):
    """Compress MODEL for the domain of --target-data and write -o OUTPUT.

    Exit 0 when written (also when no layer changed: then the output equals the input), 1 for
    a user error (nothing written), 2 for a usage error, 3 when --max-drop/--min-agreement
    is missed: the per-layer summary is printed and OUTPUT.report.json is written with
    "verdict": "failed", but no model.
    """
    from onnxprune import api

    given = {name for name in kw if click.get_current_context().get_parameter_source(name)
             == click.core.ParameterSource.COMMANDLINE}
    refuse_idle_run_flags(kw)
    if kw["stats"] and kw["finetune_epochs"]:
        raise click.UsageError(api.FINETUNE_STATS)
    if kw.get("recipe") or kw["stats"]:        # before either file is read
        from onnxprune.paths import check_output_text, check_outputs
        check_output_text(output)
        check_outputs(api.output_files(output), {name: [kw[key]] for name, key in (("--recipe", "recipe"),
                                                                                   ("--stats", "stats")) if kw.get(key)})
    saved = stats_recipe(kw, given, quiet=quiet) if kw["stats"] and not kw.get("recipe") else None
    preprocess = preprocess_dict(kw)
    recipe = saved or build_recipe(kw, preprocess)
    refuse_idle_source(kw, recipe)
    finetune = None
    if kw["finetune_epochs"]:
        from onnxprune.train import require_torch
        from onnxprune.train.distill import TrainConfig

        searching = (recipe.plan or {}).get("max_drop") is not None   # the fold decides the plan
        search_only = [_flag(name) for name in ("finetune_trials", "finetune_margin", "finetune_refit")
                       if _given(name)]
        if search_only and not searching:
            raise click.UsageError(f"{', '.join(search_only)} appl{'ies' if len(search_only) == 1 else 'y'} only "
                                   "to --finetune's search for the smallest plan within --max-drop (not with a "
                                   "--keep/--flops budget or a fixed recipe)")
        require_torch()
        if kw["val_fraction"] is None:
            kw["val_fraction"] = SEARCH_FOLD if searching else TrainConfig.val_fraction
        if kw["checkpoint"] is None:
            kw["checkpoint"] = "last" if searching else TrainConfig.checkpoint
        refuse_idle_training_flags(kw, held_out=False)   # compress's --split beside --eval-data is its own matter
        finetune = train_config(kw, batch_size=TrainConfig.batch_size, seed=kw["seed"], progress=show_progress(quiet),
                                epochs=kw["finetune_epochs"])
    else:
        search_flags = ("finetune_trials", "finetune_margin", "finetune_refit")
        given = [f"--{name.replace('_', '-')}" for name in TRAINING_FLAGS + search_flags
                 if click.get_current_context().get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"{', '.join(given)}: training options, given without --finetune EPOCHS")
    try:
        result = api.compress(model, kw["target_data"], recipe=recipe, output=output, source_data=kw["source_data"],
                              eval_data=kw["eval_data"], stats=kw["stats"], device=device,
                              progress=show_progress(quiet), max_drop=kw["max_drop"],
                              min_agreement=kw["min_agreement"], measure_latency=not kw["no_latency"],
                              latency_runs=kw["latency_runs"], finetune=finetune, recovery=api.RecoveryOptions(kw["finetune_trials"], kw["finetune_margin"],
                                                                          kw["finetune_refit"]))
    except ValidationFailed as exc:
        report = getattr(exc, "report", None)
        if report is not None:
            print_report(report, output, as_json=as_json, quiet=quiet, verbose=verbose)
        raise
    print_report(result.report, output, as_json=as_json, quiet=quiet, verbose=verbose)


#: compress flags that choose the method or its budget: without any, `compress --stats` runs the
#: recipe the statistics were gathered for
METHOD_FLAGS = ("method", "objective", "allocation", "layers", "no_reconstruct", "then_low_rank", "conv_split",
                "latency_aware_splits", *recipes.BUDGET_OPTIONS, *recipes.RULE_OPTIONS)


def stats_recipe(kw: dict, given: set[str], *, quiet: int):
    """``compress --stats`` (no --recipe): the file fixes which samples calibrated, so --seed,
    --split and --calib-size left out are taken from it (``kw`` updated). With no method flag at
    all, the recipe is the one the file was gathered for (``calibrate``'s default: dalr-bc keep
    0.25), with its preprocessing unless flags give one, checked against the default goal
    (--max-drop 1) unless a threshold is given: returned. Else None (the flags' recipe)."""
    from onnxprune.calibration.stats import Statistics
    from onnxprune.pipeline import Recipe

    header = Statistics.load(kw["stats"]).header
    saved = header.get("recipe")
    if saved is None:                  # a file from before recipes were recorded: the flags decide
        return None
    target = header.get("sets", {}).get("target", {})
    defaults = {"seed": saved.get("seed"), "calib_size": saved.get("calib_size")}
    if isinstance(target.get("split"), (int, float)) and target["split"] < 1:
        defaults["split"] = target["split"]
    for name, value in defaults.items():
        if name not in given and value is not None:
            kw[name] = None if value == "all" else value
    if any(name in given for name in METHOD_FLAGS):
        return None
    planner_only = [_flag(name if kw[name] is not False else f"no_{name}") for name in recipes.PLANNER_OPTIONS
                    if name in given]
    if planner_only:
        raise click.UsageError(f"{', '.join(planner_only)} appl{'ies' if len(planner_only) == 1 else 'y'} only to "
                               "planning, and --stats makes compress run one fixed recipe (drop --stats to plan)")
    flags = any(name in given for name in PREPROCESS_KEYS)
    recipe = Recipe.from_dict({**saved, "seed": kw["seed"], "split": kw["split"],
                               "calib_size": "all" if kw["calib_size"] is None else kw["calib_size"],
                               "batch_size": kw["batch_size"],
                               "preprocess": preprocess_dict(dict(kw)) if flags else saved.get("preprocess", {})},
                              source=str(kw["stats"]))
    passes = ", ".join(f"{name} {_options_text(options)}".strip() for name, options in recipe.passes)
    goal = ""
    if kw["max_drop"] is None and kw["min_agreement"] is None:
        kw["max_drop"] = 1.0
        goal = ", checked against the default goal --max-drop 1 (exit 3 if missed)"
    if not quiet:
        click.echo(f"--stats without method flags: running the recipe the statistics were gathered for ({passes}; "
                   f"a budget flag such as --keep changes it; the planner does not take saved statistics){goal}",
                   err=True)
    return recipe


def _options_text(options: dict) -> str:
    """A pass's budget options, for one line."""
    return " ".join(f"{k} {v}" for k, v in options.items() if k in ("method", "criterion", *recipes.BUDGET_OPTIONS)
                    and v is not None)


def print_report(report: dict, output, *, as_json: bool, quiet: int, verbose: int = 0) -> None:
    """The layer table and the verdict (or the report as JSON) on stdout (``verbose``: every site
    the planner could not plan, in full)."""
    from onnxprune import api

    if as_json:
        click.echo(json.dumps(api.jsonable(report), indent=2))
        return
    if "validation" not in report:       # a budget the plan cannot reach: what it measured, what was written
        for line in plan_lines(report, verbose) + written_lines(report, output):
            click.echo(line)
        return
    if quiet == 0:
        for line in layer_table(report):
            click.echo(line)
        click.echo()
        for line in plan_lines(report, verbose):
            click.echo(line)
    for line in verdict_lines(report, output):
        click.echo(line)


def layer_table(report: dict) -> list[str]:
    """One row per layer or channel group, one schema (``api.layer_rows``)."""
    from onnxprune.api import layer_rows

    rows = []
    for row in layer_rows(report):
        rows.append((row["name"], row["op"], row["kept"], _number(row["params_removed"], ","),
                     _number(row["retained"], ".1%"), _number(row["error"], ".4f"), row["note"]))
    if not rows:                         # the verdict's note says why, when nothing changed
        return [] if report.get("note") else ["no layer was changed"]
    header = ("layer", "op", "kept", "params removed", "retained", "rel.err", "method / note")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header) - 1)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)) + "  " + header[-1]]
    for r in rows:
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(r, widths)) + "  " + str(r[-1]))
    return lines


def _number(value, spec: str, missing: str = "") -> str:
    """``value`` formatted with ``spec``, or ``missing`` for None, a string or a non-finite float."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return missing
    if isinstance(value, float) and not math.isfinite(value):
        return missing
    return format(value, spec)


def epochs_text(training: dict) -> str:
    """"1 epoch" / "N epochs" a training report's curve ran (its first point is before training)."""
    epochs = len(training["curve"]) - 1
    return f"{epochs} epoch{'s' if epochs != 1 else ''}"


def plan_lines(report: dict, verbose: int = 0) -> list[str]:
    """What the planner chose and what its cross-fitted check measured (nothing without a plan);
    the sites it could not plan in full with ``verbose``, else the first few, shortened."""
    plan = report.get("plan")
    if not plan:
        return []
    goal = plan["goal"]
    wanted = (f"within {goal['max_drop']:g} point{'' if goal['max_drop'] == 1 else 's'}" if "max_drop" in goal
              else f"{'at' if plan.get('budget_met', True) else 'short of the budget'} {100 * goal['budget']:g}% of "
                   f"the {plan['objective']}")
    check = plan["check"]
    metric = "accuracy" if check.get("accuracy_reference") is not None else "agreement"
    if plan.get("output_kind") == "embedding":
        metric = "kNN accuracy" if check.get("accuracy_reference") is not None else "100 (1 - cosine)"
    elif "agreement" in check and check["agreement"] is None:
        # no class scores to agree on (a dense map, a regression value): the check's drop is
        # 100 x the relative squared error (planner.measure)
        metric = "100 x relative squared error"
    measured = metric if metric.endswith("error") else f"{metric} drop"
    seconds = plan.get("seconds", {})
    skipped = skipped_lines(plan.get("skipped", []), verbose)
    predicted = " by its prediction" if plan["objective"] == "latency" else ""     # timed per site (plan.latency)
    chosen = (f"plan: {len(plan['sites'])} of {plan['sites_considered']} sites compressed, {wanted}: "
              f"{100 * plan['cost']:.1f}% of the {plan['objective']}{predicted}, step {plan['step']}/{plan['steps']}")
    lines = [*skipped, chosen]
    recovery = plan.get("recovery")
    if recovery:
        before = recovery["without_training"]
        lines.append(f"without training the plan stopped at {100 * before['cost']:.1f}% (checked drop "
                     f"{before['check']['drop']:.2f} +- {before['check']['se']:.2f}); distilled plans, "
                     f"{metric} drop on {recovery['checkpoint_samples']} checkpoint samples:")
        lines += [f"  {100 * t['cost']:.1f}% of the {plan['objective']}: drop {t['drop_before']:.2f} -> {t['drop']:.2f} +- "
                  f"{t['se']:.2f}" + (f" (+ {t['reserve']:.2f} in reserve)" if t.get("reserve") is not None else "")
                  + f" after {t['epochs']} epochs ({t['seconds']:.0f} s): "
                  + ("within the goal" if t["passed"] else "missed") for t in recovery["trials"]]
        fallback = recovery.get("fallback")
        if fallback is not None:
            lines.append(f"  none met the goal: the plan without training, distilled, read {fallback['drop_before']:.2f} "
                         f"-> {fallback['drop']:.2f} +- {fallback['se']:.2f} on the fold: the output is that plan "
                         f"{fallback['kept']}")
        elif recovery["chosen"] is None:
            lines.append("  none met the goal: the output is the plan without training")
        finetune = report.get("finetune") or {}
        if finetune.get("refit"):
            lines.append(f"  the output: that plan distilled again on {finetune['train_samples']} samples, the training "
                         "ones and the checkpoint fold (--no-finetune-refit: keep the search's weights)")
        lines.append(f"planning took {sum(seconds.values()):.0f} s, {seconds.get('recovery', 0):.0f} s of it the "
                     "distilled plans")
    else:
        reserve = ""
        if plan.get("goal", {}).get("max_drop") is not None and plan.get("reserve") is not None:
            against = f"the {plan['evaluated']} held-out samples' noise" if plan.get("evaluated") else "its noise"
            reserve = f" (+ {plan['reserve']:.2f} in reserve against {against})"
        lines.append(f"plan check ({checked_samples(plan)}, cross-fitted): {measured} {check['drop']:.2f} "
                     f"+- {check['se']:.2f} points{reserve}; planning took {sum(seconds.values()):.0f} s")
    return lines + [""]


def skipped_lines(rows: list[dict], verbose: int = 0) -> list[str]:
    """One "not planned" line per reason (the sites that share it named together); without
    ``verbose`` at most SKIPPED_SHOWN of them, each cut to SKIPPED_WIDTH characters, and a count
    of the rest: MobileNetV2 has 23 such sites, MiniLM 24 with reasons of 600 characters, a
    wall of text above the plan. The report's plan.skipped keeps every site and reason."""
    grouped: dict[tuple[str, str], dict[str, None]] = {}
    for row in rows:
        kind = ", ".join(filter(None, (row["family"], row.get("form"))))
        grouped.setdefault((kind, row["reason"]), {})[row["site"]] = None
    lines = [(f"  not planned: {', '.join(sites)} ({kind}): {reason}", len(sites))
             for (kind, reason), sites in grouped.items()]
    if verbose:
        return [line for line, _ in lines]
    shown = lines if len(lines) <= SKIPPED_SHOWN + 1 else lines[:SKIPPED_SHOWN]
    out = [line if len(line) <= SKIPPED_WIDTH else line[:SKIPPED_WIDTH - 3] + "..." for line, _ in shown]
    rest = sum(count for _, count in lines) - sum(count for _, count in shown)
    if rest:
        out.append(f"  ... and {rest} more site{'s' if rest != 1 else ''} not planned (-v lists every reason in full; "
                   "so does the report's plan.skipped)")
    return out


def checked_samples(plan: dict) -> str:
    calibration = plan["calibration_samples"]
    extra = plan.get("checked_samples", calibration) - calibration
    return f"{calibration} calibration samples" + (f" and {extra} more" if extra else "")


def verdict_lines(report: dict, output) -> list[str]:
    """Size, accuracy, agreement, error, latency, what calibrated, and what was written."""
    v = report["validation"]
    lines = []
    if not report.get("changed", True):
        lines.append(report.get("note") or "no layer changed: the output equals the input")
    pb, pa = v["params_reference"], v["params_candidate"]
    mb, ma = v["macs_reference"], v["macs_candidate"]
    lines.append(f"parameters {pb:,} -> {pa:,} ({100 * pa / max(pb, 1):.1f}%), "
                 f"MACs {mb:,} -> {ma:,} ({100 * ma / max(mb, 1):.1f}%)")
    calibration = report.get("calibration") or {}
    counts = ", ".join(f"{_count_of(desc)} {name}" for name, desc in calibration.items())
    where = f" (from {report['statistics']['file']})" if report.get("calibration_runs") == 0 and \
        report.get("statistics") else ""
    lines.append(f"calibrated on {counts or 'no'} samples{where}; evaluated on {v['samples']:,} held-out samples")
    sqnr = ("inf dB (outputs identical)" if v.get("identical") else
            "n/a" if v.get("sqnr_db") is None else f"{v['sqnr_db']:.1f} dB")
    e = v.get("embedding")
    if e:
        lines.append(f"embedding {e['output']}: cosine to the original {e['cosine']:.4f} (mean; 5th percentile "
                     f"{e['cosine_p05']:.4f}), relative error {_number(v.get('relative_error'), '.4f', 'n/a')}")
        if e.get("knn_reference") is not None:
            probe = (f", linear probe {_number(e.get('probe_reference'), '.2%', 'n/a')} -> "
                     f"{_number(e.get('probe_candidate'), '.2%', 'n/a')}") if e.get("probe_reference") is not None else ""
            lines.append(f"kNN accuracy (k={e['k']}) {e['knn_reference']:.2%} -> {e['knn_candidate']:.2%}{probe}")
    elif v.get("accuracy_reference") is not None:
        drop = v.get("accuracy_drop")
        noise = f" +- {v['accuracy_drop_se']:.2f}" if v.get("accuracy_drop_se") is not None else ""
        lines.append(f"top-1 accuracy {_number(v['accuracy_reference'], '.2%', 'n/a')} -> "
                     f"{_number(v['accuracy_candidate'], '.2%', 'n/a')}"
                     + (f" (drop {drop:.2f}{noise} points)" if drop is not None else ""))
    if not e:
        lines.append(f"agreement {_number(v.get('agreement'), '.2%', 'n/a (no class axis)')}, relative error "
                     f"{_number(v.get('relative_error'), '.4f', 'n/a')}, SQNR {sqnr}")
    if report.get("finetune"):
        b, ft = report["validation_before_finetune"], report["finetune"]
        acc = f"accuracy {_number(b.get('accuracy_candidate'), '.2%', 'n/a')}, " \
            if b.get("accuracy_candidate") is not None else ""
        lines.append(f"before fine-tuning: {acc}agreement {_number(b.get('agreement'), '.2%', 'n/a')} "
                     f"({epochs_text(ft)} in {ft['seconds']:.0f} s, checkpoint epoch {ft['best_epoch']})")
    lat = v.get("latency_ms") or {}
    if lat.get("reference") and lat.get("candidate"):
        parts = []
        for k in lat["reference"]:
            part = f"{k} {_number(lat['reference'][k], '.2f', '?')} -> {_number(lat['candidate'].get(k), '.2f', '?')} ms"
            quartiles = (lat.get("spread") or {}).get(k, {}).get("speedup")
            if quartiles:
                part += f" (speedup {quartiles[0]:.2f}-{quartiles[1]:.2f}x interquartile)"
            parts.append(part)
        lines.append("latency " + ", ".join(parts))
    return lines + written_lines(report, output)


def written_lines(report: dict, output) -> list[str]:
    """What a run wrote: the model and its files, or for a failed run (a missed accuracy check, a
    budget the plan cannot reach) the report only, naming the files an earlier run left at OUT."""
    from onnxprune.api import report_path

    if report.get("verdict") != "failed":
        return [f"wrote {output} (+ .report.json, .recipe.json)"]
    what = "the accuracy check" if "validation" in report else "to reach the budget"
    lines = [f"FAILED {what}: wrote {report_path(output)} only (no model)"]
    if report.get("not_from_this_run"):
        lines.append(f"left as they were, from an earlier run: {', '.join(report['not_from_this_run'])}")
    return lines


def _count_of(desc: dict) -> str:
    count = desc.get("count")
    return f"{count:,}" if isinstance(count, int) else "?"


@main.command(short_help="Gather calibration statistics once, for `compress --stats`.")
@click.argument("model", type=FILE)
@click.option("--target-data", required=True, help="Samples from the deployment domain (file or folder).")
@click.option("--source-data", help="Samples from the training domain (needed by momasp-J/j).")
@click.option("-o", "--output", required=True, type=FILE, help="Statistics file (.npz).")
@click.option("--recipe", type=FILE, help="Gather what this recipe needs (default: DALR on all layers).")
@click.option("--method", type=click.Choice(recipes.method_names()), default="dalr-bc",
              show_default=True, help="Gather what this method needs.")
@click.option("--layers", help="Comma-separated layer (or group) names; default all.")
@click.option("--calib-size", type=CalibSizeType(), default=DEFAULT_CALIB_SIZE, show_default=True,
              help="At most this many samples per set (target, and source), drawn at random (seeded); 'all' "
                   "uses every one.")
@click.option("--split", type=FRACTION, default=0.5, show_default=True,
              help="Fraction of --target-data that calibrates, as in compress (1: all of it, then evaluate on "
                   "other data with compress --eval-data).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the split and the sampling.")
@click.option("--shard", type=ShardType(), help="Only shard I of N (I/N, 1-based: contiguous whole batches); merge with merge-stats.")
@click.option("--cluster", help="Run the shards on the Dask scheduler at this address (tcp://host:8786).")
@click.option("--workers", type=click.IntRange(min=1), help="Run the shards on a local Dask cluster of N workers.")
@click.option("--shards", type=click.IntRange(min=1), help="Shards for --cluster/--workers (default: one per worker).")
@click.option("--engine", type=click.Choice(["auto", "graph", "numpy"]), default="auto", show_default=True,
              help="auto: pooled responses in-graph, features and patches by float32 BLAS (on cuda: graph); "
                   "graph: all inside onnxruntime; numpy: float64.")
@token_options
@preprocess_options
@common_options
@user_errors
def calibrate(model, output, verbose, quiet, device, **kw):
    """Gather target (and source) statistics for MODEL once and save them for `compress --stats`.

    Uses the same samples `compress` with the same --split, --seed and --calib-size
    calibrates on, and records which ones, so `compress --stats` refuses to evaluate on them.
    """
    from onnxprune import api

    preprocess = preprocess_dict(kw)
    shard, cluster, workers, shards, engine = (kw.pop(k) for k in ("shard", "cluster", "workers", "shards", "engine"))
    if shards is not None and cluster is None and workers is None:
        raise click.UsageError("--shards needs --cluster or --workers")
    if shard is not None and (cluster is not None or workers is not None):
        raise click.UsageError("--shard runs one shard here: do not combine it with --cluster/--workers")
    if cluster is not None and workers is not None:
        raise click.UsageError("give --cluster or --workers, not both")
    split = kw.pop("split")
    kw.update(split=0.5 if split >= 1 else split, mode=None, allocation="global")
    recipe = build_recipe(kw, preprocess, sized=False)
    refuse_idle_source(kw, recipe)
    if kw.get("recipe"):
        from onnxprune.paths import check_output_text, check_outputs
        check_output_text(output)
        check_outputs([output], {"--recipe": [kw["recipe"]]})
    stats = api.calibrate(model, kw["target_data"], recipe=recipe, output=output, source_data=kw["source_data"],
                          device=device, progress=show_progress(quiet), split=split, shard=shard, cluster=cluster,
                          workers=workers, shards=shards, engine=engine)
    record = stats.header.get("shard")
    if record:
        sets = ", ".join(f"{k}: samples {v['start']}-{v['stop'] - 1} of {v['set'].get('count')}"
                         for k, v in record["sets"].items())
        click.echo(f"wrote {output} (shard {record['index'] + 1}/{record['count']}; "
                   f"{len(stats.header.get('requests', []))} tensors; {sets})")
        return
    sets = ", ".join(f"{k}: {v.get('count')} samples" for k, v in stats.header.get("sets", {}).items())
    click.echo(f"wrote {output} ({len(stats.header.get('requests', []))} tensors; {sets})")


def plan_flags(func):
    """What the planner may touch: --method (auto / a family / a criterion), --objective, --layers."""
    options = [
        click.option("--method", type=click.Choice(recipes.method_names(auto=True)), default="auto",
                     show_default=True, help="auto: pruning and low rank per site; or one family / criterion."),
        click.option("--objective", type=click.Choice(["macs", "params"]), help="What 'smaller' means (default macs)."),
        click.option("--layers", help="Comma-separated group / layer names to consider; default all."),
        CONV_SPLIT,
        click.option("--calib-size", type=CalibSizeType(), default=DEFAULT_CALIB_SIZE, show_default=True,
                     help="At most this many calibration samples per set, drawn at random (seeded); 'all' uses all."),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Seed of the split and the sampling."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def plan_only_recipe(kw: dict, preprocess: dict, **goal):
    """A recipe whose plan table carries the flags of `sensitivity` / `sweep`."""
    try:
        return recipes.plan_only_recipe(kw, preprocess, flag=_flag, **goal)
    except recipes.OptionConflict as exc:
        raise click.UsageError(exc.problem) from None


@main.command(short_help="Damage of compressing each site alone at each size: JSON, table, heat map.")
@click.argument("model", type=FILE)
@click.option("--target-data", required=True, help="Samples from the deployment domain (file or folder).")
@click.option("--source-data", help="Samples from the training domain: also show where the domains differ.")
@click.option("-o", "--output", required=True, type=FILE, help="Curves as JSON (.json).")
@click.option("--figure", type=FILE, help="Heat map PNG (default: next to -o).")
@plan_flags
@token_options
@JUDGE_OUTPUT
@preprocess_options
@common_options
@user_errors
def sensitivity(model, output, figure, verbose, quiet, device, **kw):
    """Damage of compressing each site of MODEL alone, at each size (JSON, table and heat map)."""
    from pathlib import Path

    from onnxprune import api
    from onnxprune.paths import check_output_text
    from onnxprune.plan.figures import sensitivity_table

    preprocess = preprocess_dict(kw)
    recipe = plan_only_recipe(kw, preprocess, max_drop=1.0)
    check_output_text(output)       # before the heat map's name is made from it (an empty one has none)
    figure = figure or str(Path(output).with_suffix(".png"))
    result = api.sensitivity(model, kw["target_data"], recipe=recipe, source_data=kw["source_data"], output=output,
                             figure=figure, device=device, progress=show_progress(quiet))
    if quiet == 0:
        for line in sensitivity_table(result["sensitivity"]):
            click.echo(line)
        for key, row in (result.get("shift") or {}).items():
            click.echo(f"shift {key}: mean {row['mean_shift']:.3f}, cov {row['moment_cov']:.3f}, "
                       f"angle {row['subspace_angle']:.1f} deg")
    written = ", ".join([str(output), *result.get("figures", [])])
    click.echo(f"wrote {written} ({_plural(len(result['sensitivity']), 'site')}, {result['seconds'].get('sensitivity', 0):.1f} s)")
    if result.get("not_from_this_run"):
        click.echo(f"left as it was, from an earlier run with --source-data: {', '.join(result['not_from_this_run'])}")


@main.command(short_help="Compress at several budgets from one planning run; Pareto table and plot.")
@click.argument("model", type=FILE)
@click.option("--target-data", required=True, help="Samples from the deployment domain (file or folder).")
@click.option("--source-data", help="Samples from the training domain (MoMaSP criteria).")
@click.option("--eval-data", help="Held-out evaluation samples (default: the part of --target-data not used to calibrate).")
@click.option("--flops", type=BUDGETS, help="Comma-separated MAC budgets, e.g. 0.9,0.8,0.7 (fractions of the original).")
@click.option("--keep", type=BUDGETS, help="Comma-separated parameter budgets instead.")
@click.option("--split", type=OPEN_FRACTION, default=0.5, show_default=True,
              help="Fraction of --target-data that calibrates.")
@click.option("--latency-runs", type=click.IntRange(min=1), default=10, show_default=True,
              help="Timed runs of each model per batch size (interleaved).")
@click.option("--no-latency", is_flag=True, help="Skip latency measurement.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder.")
@plan_flags
@token_options
@JUDGE_OUTPUT
@preprocess_options
@common_options
@user_errors
def sweep(model, output, verbose, quiet, device, **kw):
    """Compress MODEL at several budgets from one calibration and sensitivity run; Pareto table + plot."""
    from onnxprune import api

    if (kw["flops"] is None) == (kw["keep"] is None):
        raise click.UsageError("give one list of budgets: --flops (MACs) or --keep (parameters), e.g. "
                               "--flops 0.9,0.8,0.7")
    refuse_idle_run_flags(kw)
    flag, objective = ("--flops", "macs") if kw["flops"] is not None else ("--keep", "params")
    budgets = kw["flops"] or kw["keep"]
    if kw.get("objective") not in (None, objective):
        raise click.UsageError(f"--objective {kw['objective']} contradicts {flag}, budgets of {objective}")
    preprocess = preprocess_dict(kw)
    kw["objective"] = objective
    recipe = plan_only_recipe(kw, preprocess, budget=budgets[0])
    refuse_idle_source(kw, recipe)
    result = api.sweep(model, kw["target_data"], budgets, recipe=recipe, output_dir=output,
                       source_data=kw["source_data"], eval_data=kw["eval_data"], device=device,
                       progress=show_progress(quiet), measure_latency=not kw["no_latency"],
                       latency_runs=kw["latency_runs"])
    click.echo(f"calibrated on {result['calibration']} target samples; evaluated on {result['evaluated']} held-out "
               f"samples{result['reference']}")
    for line in result["table"]:
        click.echo(line)
    click.echo(f"wrote {os.path.join(output, '')} ({', '.join(result['written'])})")     # sw/, not sw//


@main.command("merge-stats", short_help="Merge the shard files of `calibrate --shard` into one statistics file.")
@click.argument("inputs", nargs=-1, required=True, type=FILE)
@click.option("-o", "--output", required=True, type=FILE, help="Merged statistics (.npz).")
@click.option("-v", "--verbose", count=True, help="More logging (repeatable).")
@click.option("-q", "--quiet", count=True, help="Less output.")
@user_errors
def merge_stats(inputs, output, verbose, quiet):
    """Merge the shard files of `calibrate --shard i/n` (all n of them) into one statistics file."""
    from onnxprune import api

    stats = api.merge_stats(inputs, output)
    sets = ", ".join(f"{k}: {v.get('count')} samples" for k, v in stats.header.get("sets", {}).items())
    click.echo(f"wrote {output} ({len(inputs)} shard{'s' if len(inputs) != 1 else ''}; {len(stats.header.get('requests', []))} tensors; {sets})")


@main.command(short_help="Show inputs, ops, parameters, MACs and what each method can touch.")
@click.argument("model", type=FILE)
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("-v", "--verbose", count=True, help="More logging (repeatable).")
@click.option("-q", "--quiet", count=True, help="Less logging (warnings off).")
@user_errors
def inspect(model, as_json, verbose, quiet):
    """Show MODEL's inputs, ops, parameters and MACs per layer, and what each method can touch."""
    from onnxprune import api

    info = api.inspect(model)
    if as_json:
        click.echo(json.dumps(api.jsonable(info), indent=2))
        return
    opsets = ", ".join(f"{domain} {version}" for domain, version in info["opset"].items())
    click.echo(f"{model}: IR {info['ir_version']}, opset {opsets}")
    for i in info["inputs"]:
        click.echo(f"  input  {i['name']} {i['shape']} {i['dtype']}")
    for o in info["outputs"]:
        click.echo(f"  output {o}")
    click.echo("  ops    " + ", ".join(f"{k} {v}" for k, v in info["ops"].items()))
    if info["folded"]:
        click.echo("  folded " + ", ".join(f"{k} {v}" for k, v in info["folded"].items())
                   + " (on loading, as every command does; counted in no op above)")
    click.echo(f"  params {info['params']:,}   MACs {info['macs']:,}   size {info['bytes'] / 1e6:.2f} MB")
    if info["macs_note"]:
        click.echo(f"  note   {info['macs_note']}")
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
        size = f"{group['channels']:>5} ch"
        if group.get("structure") == "heads":
            size = f"{group['channels'] // group['unit']} heads x {group['unit']}"
        elif group.get("structure") == "last-axis":
            size = f"{group['channels']:>5} units (last axis)"
        click.echo(f"  {group['name']:<40} {size}  {status}")
    for row in info.get("attention_skipped", []):
        click.echo(f"  {row['layer']:<40} attention not recognised: {row['reason']}")
    n_split = sum(1 for layer in info["low_rank"] if layer["splittable"])
    n_groups = sum(1 for g in info["channel_groups"] if not g.get("skip"))
    click.echo(f"\n{_plural(n_split, 'splittable layer')}, {_plural(n_groups, 'prunable channel group')}")


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


@main.command(short_help="Compare a compressed model with its reference: accuracy, error, size, latency.")
@click.argument("reference", type=FILE)
@click.argument("candidate", type=FILE)
@click.option("--data", required=True, help="Evaluation samples (labels enable accuracy).")
@click.option("--max-drop", type=FiniteRange(0, 100),
              help="Exit 3 if accuracy drops more than this many points (agreement without labels; embeddings: "
                   "kNN accuracy, 100 (1 - mean cosine) without labels).")
@click.option("--min-agreement", type=FiniteRange(0, 1),
              help="Exit 3 below this top-1 agreement (embeddings: mean cosine; a fraction, 0-1).")
@click.option("--latency-runs", type=click.IntRange(min=1), default=10, show_default=True,
              help="Timed runs of each model per batch size (interleaved).")
@click.option("--no-latency", is_flag=True, help="Skip latency measurement.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--metric", type=click.Choice(["auto", "classes", "embedding"]), default="auto", show_default=True,
              help=METRIC_HELP)
@JUDGE_OUTPUT
@preprocess_options
@common_options
@user_errors
def validate(reference, candidate, data, as_json, verbose, quiet, device, batch_size, **kw):
    """Compare CANDIDATE with REFERENCE on --data: accuracy, agreement, error, size, MACs, latency."""
    from onnxprune import api

    refuse_idle_run_flags(kw)
    preprocess = preprocess_dict(kw, data)
    failed = None
    try:
        report = api.validate(reference, candidate, data, preprocess=preprocess, batch_size=batch_size, device=device,
                              measure_latency=not kw["no_latency"], latency_runs=kw["latency_runs"],
                              progress=show_progress(quiet), metric=kw["metric"], judge_output=kw["judge_output"],
                              max_drop=kw["max_drop"], min_agreement=kw["min_agreement"])
        checked = kw["max_drop"] is not None or kw["min_agreement"] is not None
        document = {**report.to_dict(), **({"verdict": "passed"} if checked else {})}
    except ValidationFailed as exc:      # the measurements first, then the one line of the miss (exit 3)
        failed, document, report = exc, exc.report, exc.validation
    if as_json:
        click.echo(json.dumps(api.jsonable(document), indent=2))
    else:
        for line in report.summary_lines():
            click.echo(line)
    if failed is not None:
        raise failed


def refuse_idle_source(kw: dict, recipe) -> None:
    """--source-data with a recipe that reads the target only (usage error): its samples would be
    opened, and calibrated, for nothing. The criteria that read both domains are momasp-*;
    `sensitivity` reads it for its domain-shift report and does not call this."""
    if kw.get("source_data") is not None and "source" not in recipe.sets():
        raise click.UsageError("--source-data applies to methods that read both domains (--method momasp-J, "
                               "momasp-j); this recipe reads the target data only (sensitivity reports the domain "
                               "shift per site)")


def refuse_idle_run_flags(kw: dict) -> None:
    """Flags of compress, sweep and validate that could not act (usage errors): --latency-runs
    beside --no-latency, --split beside --eval-data (that file evaluates, all of --target-data
    calibrates)."""
    if _given("latency_runs") and kw.get("no_latency"):
        raise click.UsageError("--latency-runs does not apply with --no-latency: no latency is measured")
    if "split" in kw and _given("split") and kw.get("eval_data") is not None:
        raise click.UsageError("--split does not apply with --eval-data: --eval-data evaluates and --target-data "
                               "calibrates (at most --calib-size of it)")


def refuse_idle_training_flags(kw: dict, *, held_out: bool = True) -> None:
    """Training flags given on the command line that could not act (usage errors): --patience when
    the last epoch is kept (it stops nothing); with ``held_out`` (finetune, coprune) also --split
    beside --eval-data (all of --target-data trains) and --val-fraction beside --val-data (those
    samples pick the checkpoint)."""
    if _given("patience") and kw.get("checkpoint") == "last":
        raise click.UsageError("--patience stops training early when the checkpoint fold stops improving; with "
                               "--checkpoint last (compress --finetune's default with --max-drop) the last epoch "
                               "is kept, so it would do nothing: drop it, or pick the epoch on the fold "
                               "(--checkpoint auto)")
    if held_out and _given("split") and kw.get("eval_data") is not None:
        raise click.UsageError("--split does not apply with --eval-data: all of --target-data trains and --eval-data "
                               "evaluates")
    if held_out and _given("val_fraction") and kw.get("val_data") is not None:
        raise click.UsageError("--val-fraction does not apply with --val-data: the --val-data samples pick the "
                               "checkpoint and every training sample trains")


def train_config(kw: dict, *, batch_size: int, seed: int, progress: bool, epochs: int | None = None):
    """The TrainConfig of ``training_options`` (popped from ``kw``); ``epochs``: instead of --epochs."""
    from onnxprune.train.distill import TrainConfig

    return TrainConfig(epochs=kw.pop("epochs") if epochs is None else epochs, lr=kw.pop("lr"),
                       batch_size=batch_size, temperature=kw.pop("temperature"),
                       label_weight=kw.pop("label_weight"), augment=kw.pop("augment"), patience=kw.pop("patience"),
                       val_fraction=kw.pop("val_fraction"), seed=seed, progress=progress, threads=kw.pop("threads"),
                       feature_weight=kw.pop("feature_weight"), train_layers=kw.pop("train_layers"),
                       checkpoint=kw.pop("checkpoint"),
                       max_seconds=None if kw.get("max_minutes") is None else 60 * kw.pop("max_minutes"))


@main.command(short_help="Recover a compressed model's accuracy by distilling the original into it.")
@click.argument("student", type=FILE)
@click.option("--teacher", type=FILE, help="The original model to distil (default: plain fine-tuning on labels).")
@click.option("--target-data", required=True, help="Training samples from the deployment domain (labels optional).")
@click.option("--eval-data", help="Held-out evaluation samples (default: the part of --target-data not used to train).")
@click.option("--split", type=OPEN_FRACTION, default=0.5, show_default=True,
              help="Fraction of --target-data that trains.")
@click.option("--val-data", help="Held-out training samples that pick the checkpoint (default: --val-fraction of "
              "the training samples); best samples that did not calibrate the compression.")
@click.option("-o", "--output", required=True, type=FILE)
@training_options
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the split, the sampling and the training.")
@click.option("--max-drop", type=FiniteRange(0, 100),
              help="Fail (exit 3, no output) if accuracy drops more than this many points.")
@click.option("--min-agreement", type=FiniteRange(0, 1),
              help="Fail (exit 3, no output) below this top-1 agreement (0-1).")
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
    from onnxprune.train.distill import check_teacher_options

    if kw["teacher"] is None and _given("label_weight") and kw["label_weight"] == 0:
        raise click.UsageError("--label-weight 0 needs --teacher: without one the labels are all there is to train on")
    refuse_idle_training_flags(kw)
    preprocess = preprocess_dict(kw)
    config = train_config(kw, batch_size=batch_size, seed=seed, progress=show_progress(quiet))
    check_teacher_options(config, teacher=kw["teacher"] is not None)
    try:
        result = finetune_files(student, output, kw["target_data"], teacher=kw["teacher"], eval_data=kw["eval_data"],
                                val_data=kw["val_data"],
                                split=kw["split"], preprocess=preprocess, config=config, progress=show_progress(quiet),
                                measure_latency=not kw["no_latency"], max_drop=kw["max_drop"],
                                min_agreement=kw["min_agreement"])
    except ValidationFailed as exc:     # exit 3: what training did (as on success), then the one-line verdict
        report = getattr(exc, "report", None)
        if report is not None and as_json:
            click.echo(json.dumps(api_jsonable(report), indent=2))
        elif report is not None:
            for line in training_lines(report):
                click.echo(line)
        raise
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
    untrained = ", the untrained student," if ft["best_epoch"] == 0 else ""
    lines = [(f"trained {epochs_text(ft)} in {ft['seconds']:.0f} s on {ft['train_samples']} samples "
              f"(checkpoint: epoch {ft['best_epoch']}{untrained} on {ft['val_samples']} held-out training samples; "
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


class LayerKeepType(click.ParamType):
    """NAME=F,NAME=F: a keep fraction in (0, 1] per named weight."""

    name = "NAME=F,..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        out = []
        for item in str(value).split(","):
            name, sep, fraction = item.rpartition("=")
            if not sep or not name:
                self.fail(f"{item!r} is not NAME=FRACTION", param, ctx)
            out.append((name, FRACTION.convert(fraction, param, ctx)))
        return tuple(out)


@main.command(short_help="Co-Prune: unstructured pruning of a target model with a source model's help.")
@click.option("--source-model", required=True, type=FILE, help="Network trained on the source domain.")
@click.option("--target-model", required=True, type=FILE,
              help="The same network fine-tuned on the target domain (e.g. with `onnxprune finetune`).")
@click.option("--source-data", required=True, help="Labelled source-domain samples.")
@click.option("--target-data", required=True, help="Labelled target-domain samples (training).")
@click.option("--eval-data", help="Held-out target samples (default: the part of --target-data not used to train).")
@click.option("--split", type=OPEN_FRACTION, default=0.5, show_default=True,
              help="Fraction of --target-data that trains.")
@click.option("--keep", type=FRACTION, required=True, help="Fraction of the Conv/Gemm/MatMul weights kept (non-zero).")
@click.option("--alpha", type=NumberList(FiniteRange(0, 1)), default="0.7,0.5,0.3", show_default=True,
              help="Transfer factor per stage (one value: three stages at it); 0 = target-only magnitude "
                   "pruning with the same training.")
@click.option("--allocation", type=click.Choice(["global", "layer"]), default="global", show_default=True,
              help="One magnitude threshold over all layers, or --keep in every layer.")
@click.option("--fusion", type=click.Choice(["abs", "signed"]), default="abs", show_default=True,
              help="Target mask from alpha|W_s| + (1-alpha)|W_t| (abs) or |alpha W_s + (1-alpha) W_t| (signed, "
                   "the paper's eq. 4).")
@click.option("--layer-keep", type=LayerKeepType(),
              help="Fixed keep ratios for chosen weights: NAME=F,NAME=F (initializer names).")
@click.option("--lr", type=POSITIVE, default=1e-3, show_default=True, help="Adam learning rate at each stage's start.")
@click.option("--patience", type=click.IntRange(min=1), default=3, show_default=True,
              help="lr / 10 after this many epochs without a lower training loss.")
@click.option("--max-epochs", type=click.IntRange(min=1), default=30, show_default=True,
              help="At most this many epochs per alpha stage (a stage ends at lr < 1e-6).")
@click.option("--val-fraction", type=OPEN_FRACTION, default=0.1, show_default=True,
              help="Fraction of the target training samples held out to pick the checkpoint.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the split, the sampling and the training.")
@click.option("-o", "--output", required=True, type=FILE)
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

    refuse_idle_training_flags(kw)
    preprocess = preprocess_dict(kw)
    alphas = kw["alpha"]
    if len(alphas) == 1:  # one value: the default's three stages, so --alpha 0 trains as long as Co-Prune
        alphas = alphas * 3
    config = CoPruneConfig(keep=kw["keep"], alphas=alphas, allocation=kw["allocation"], fusion=kw["fusion"],
                           layer_keep=kw["layer_keep"] or (), lr=kw["lr"], patience=kw["patience"],
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
    else:   # --eval-data without labels: how far the pruned model's answers moved from the dense target's
        click.echo(f"top-1 agreement with the dense target on {v['samples']} held-out target samples (no labels): "
                   f"{100 * v['agreement']:.2f}% (checkpoint: stage {cp['best']['stage']}, epoch "
                   f"{cp['best']['epoch']}; {cp['seconds']:.0f} s)")
    click.echo("note: " + cp["note"])
    click.echo(f"wrote {output} (+ .report.json)")


if __name__ == "__main__":  # pragma: no cover
    main()
