"""Recovery training: distil the original (teacher) model's outputs into a compressed student.

``finetune(student, teacher, samples, ...)`` trains the student's weights in PyTorch (the graph,
its shapes and names stay as they are: see ``convert``) and returns the new ONNX model and a
report with the training curve. Classifier outputs (2-D, more than one column) are matched with
KL divergence on temperature-softened logits (times T^2, Hinton et al.); other outputs with the
mean squared error relative to the teacher's variance. With labels, ``label_weight`` adds
cross-entropy on the first classifier output; without a teacher it is plain fine-tuning.

A seeded held-out fold of the training samples (``val_fraction``) picks the checkpoint (epoch 0,
the untrained student, included: training never returns a student worse than it got on that fold)
and stops early after ``patience`` epochs without improvement; with ``checkpoint="last"`` the last
epoch is kept and the fold only reports. The evaluation split is never seen.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxprune.errors import DataError, ModelError, RecipeError, UsageError
from onnxprune.train import require_torch

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Options of one recovery training run (the CLI flags of ``finetune``)."""

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    temperature: float = 4.0
    label_weight: float = 0.0  # cross-entropy weight when labels exist (plain fine-tuning without a teacher)
    augment: bool = False
    val_fraction: float = 0.1
    patience: int | None = 5  # epochs without improvement on the held-out fold; None: never stop early
    weight_decay: float = 0.0
    seed: int = 0
    threads: int = 1  # 2 threads ran 10-25x slower than 1 on the shared 2-core machine (OpenMP spinning)
    progress: bool = True
    max_seconds: float | None = None  # stop after the epoch that passes this wall time (the cosine fits it)
    feature_weight: float = 0.0  # relative-MSE weight on the outputs of the rewritten layers (needs a teacher)
    train_layers: str = "all"  # "all" weights, or only the "rewritten" ones (those that differ from the teacher's)
    checkpoint: str = "auto"  # pick the epoch by "agreement" (or accuracy), by held-out output "loss", or "auto":
    #                           loss when the fold has fewer than SMALL_FOLD samples, agreement otherwise; "last":
    #                           keep the last epoch (the fold only reports: it stays an unbiased test)

    def __post_init__(self):
        def finite(value) -> bool:      # a real number (not a string or a bool) that is finite
            return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)

        for field, value, low in (("epochs", self.epochs, 1), ("batch_size", self.batch_size, 1),
                                  ("threads", self.threads, 1), ("seed", self.seed, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise RecipeError(f"--{field.replace('_', '-')}", f"must be an integer >= {low}, not {value!r}")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            raise RecipeError("--patience", f"must be an integer >= 1 (or None: never stop early), not {self.patience!r}")
        for field, value in (("lr", self.lr), ("temperature", self.temperature)):
            if not (finite(value) and value > 0):
                raise RecipeError(f"--{field}", f"must be a finite number > 0, not {value!r}")
        if self.max_seconds is not None and not (finite(self.max_seconds) and self.max_seconds > 0):
            raise RecipeError("--max-minutes", f"must be a finite time > 0, not {self.max_seconds!r} seconds")
        for field, value in (("label_weight", self.label_weight), ("feature_weight", self.feature_weight),
                             ("weight_decay", self.weight_decay)):
            if not (finite(value) and value >= 0):
                raise RecipeError(f"--{field.replace('_', '-')}", f"must be a finite number >= 0, not {value!r}")
        if self.train_layers not in ("all", "rewritten"):
            raise RecipeError("--train-layers", f"must be 'all' or 'rewritten', not {self.train_layers!r}")
        if self.checkpoint not in ("auto", "agreement", "loss", "last"):
            raise RecipeError("--checkpoint", f"must be 'auto', 'agreement', 'loss' or 'last', not {self.checkpoint!r}")
        if not (finite(self.val_fraction) and 0 < self.val_fraction < 1):
            raise RecipeError("--val-fraction", f"must be between 0 and 1, not {self.val_fraction!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_teacher_options(config: TrainConfig, *, teacher: bool) -> None:
    """UsageError (exit 2) for options that act only through a teacher, given without one."""
    if teacher:
        return
    if config.feature_weight > 0:
        raise UsageError("--feature-weight needs --teacher: the feature loss matches the teacher's outputs of the "
                         "rewritten layers")
    if config.train_layers == "rewritten":
        raise UsageError("--train-layers rewritten needs --teacher: the rewritten weights are those that differ "
                         "from the teacher's")


SMALL_FOLD = 100  # below this many held-out samples one sample moves top-1 agreement by more than 1 %
MIN_TRAIN_SAMPLES = 4  # fewer training samples (after the checkpoint fold) are refused


def fold_size(n: int, val_fraction: float) -> int:
    """Samples of ``n`` held out to pick the checkpoint: ``val_fraction`` of them, at least one."""
    return max(1, round(val_fraction * n))


def training_count(samples) -> str:
    """"N samples" of a training set, with the file's count when the set is a part of it (the
    --split that trains, less a checkpoint fold): what an error about too few samples names."""
    n, total = len(samples), samples.describe().get("source_count")
    return f"{n} samples" if not isinstance(total, int) or total == n else f"{n} training samples (of its {total})"


def shared_labels(samples, val_samples=None):
    """(labels, the set without labels): the training samples' labels when the checkpoint fold
    (``val_samples``, when given) has labels too, else None and the set that has none (None when
    both are labelled)."""
    labels = samples.labels
    unlabelled = None if labels is not None else samples
    if val_samples is not None and (labels is None) != (val_samples.labels is None):
        labels = None  # labels only where both sets have them
        unlabelled = unlabelled or val_samples
    return labels, unlabelled


def check_training_samples(samples, val_samples=None, *, teacher: bool, config: TrainConfig) -> None:
    """What recovery training refuses before any work (DataError, exit 1; UsageError, exit 2): no
    teacher and no labels, options that act only through a teacher, fewer than MIN_TRAIN_SAMPLES
    left to train once the checkpoint fold is held out. ``val_samples``: the checkpoint fold given
    apart (else ``config.val_fraction`` of ``samples``)."""
    labels, unlabelled = shared_labels(samples, val_samples)
    if not teacher and labels is None:
        if unlabelled is val_samples:
            raise DataError(val_samples.name, "has no labels and no teacher was given: without a teacher the "
                            "checkpoint fold (--val-data) is scored on labels",
                            "pass --teacher ORIGINAL.onnx, labelled --val-data, or drop --val-data "
                            "(--val-fraction of the training samples picks the checkpoint)")
        raise DataError(getattr(samples, "name", "samples"), "has no labels and no teacher was given",
                        "pass --teacher ORIGINAL.onnx (distillation) or labelled data (fine-tuning)")
    check_teacher_options(config, teacher=teacher)
    if len(samples) < MIN_TRAIN_SAMPLES:
        raise DataError(samples.name, f"has {training_count(samples)}; recovery training needs at least "
                        f"{MIN_TRAIN_SAMPLES}", "train on more samples")
    if val_samples is None:
        check_fold(samples, config.val_fraction)


def check_fold(samples, val_fraction: float, *, needs: str = "recovery training",
               hint: str = "lower --val-fraction, give the checkpoint samples apart (--val-data), or train on more "
                           "samples") -> None:
    """DataError unless ``samples`` keep MIN_TRAIN_SAMPLES to train once the checkpoint fold
    (``val_fraction`` of them) is held out; ``needs`` names who needs them, ``hint`` the remedy."""
    n = len(samples)
    left = n - fold_size(n, val_fraction)
    if left < MIN_TRAIN_SAMPLES:
        raise DataError(samples.name, f"leaves {max(0, left)} of {training_count(samples)} to train once "
                        f"--val-fraction {val_fraction:g} is held out to pick the checkpoint; {needs} needs at least "
                        f"{MIN_TRAIN_SAMPLES}", hint)


def load_arrays(samples, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Every sample of a SampleSet as preprocessed arrays {input name: (N, ...)}."""
    parts: dict[str, list[np.ndarray]] = {}
    for _, feeds in samples.batches(batch_size):
        for name, value in feeds.items():
            parts.setdefault(name, []).append(value)
    return {name: np.concatenate(values) for name, values in parts.items()}


def is_classifier(shape) -> bool:
    return len(shape) == 2 and shape[1] > 1


def teacher_outputs(teacher: onnx.ModelProto, arrays: dict[str, np.ndarray], batch_size: int) -> list[np.ndarray]:
    """The teacher's float outputs on every sample (onnxruntime, 2 threads)."""
    from onnxprune.plan.suffix import fixed_batch_of
    from onnxprune.runtime import make_session, run_arrays

    session = make_session(teacher, threads=2)
    return run_arrays(session, arrays, batch_size=batch_size, fixed_batch=fixed_batch_of(teacher))


def fill_indices(idx: np.ndarray, size: int | None) -> np.ndarray:
    """``idx`` with its last sample repeated up to ``size`` (a model's fixed batch; None: as it is).
    The model computes every sample alone (normalisation in inference form), so the copies' outputs
    are cut off and change nothing."""
    from onnxprune.runtime import fill_batch

    return idx if size is None else fill_batch({"i": idx}, size)["i"]


def same_model(student: onnx.ModelProto, teacher: onnx.ModelProto) -> bool:
    """Whether ``student`` is ``teacher`` itself: the same nodes and the same weights."""
    return list(student.graph.node) == list(teacher.graph.node) and not rewritten_weights(student, teacher) and \
        {t.name for t in student.graph.initializer} == {t.name for t in teacher.graph.initializer}


def rewritten_weights(student: onnx.ModelProto, teacher: onnx.ModelProto) -> set[str]:
    """Initializers of the student that the compression created or changed: absent from the
    teacher, or there with another shape or other values (pruned, low-rank factors, compensated)."""
    from onnx import numpy_helper

    theirs = {t.name: t for t in teacher.graph.initializer}
    changed = set()
    for t in student.graph.initializer:
        other = theirs.get(t.name)
        if other is None or list(other.dims) != list(t.dims) or other.data_type != t.data_type:
            changed.add(t.name)
        elif not np.array_equal(numpy_helper.to_array(t), numpy_helper.to_array(other)):
            changed.add(t.name)
    return changed


def feature_candidates(student: onnx.ModelProto, teacher: onnx.ModelProto) -> list[str]:
    """Outputs of the rewritten layers that the teacher computes under the same name: the outputs
    of student nodes with a rewritten weight (a low-rank pair's second factor keeps the original
    output name; a pruned layer's consumer keeps its own). Shapes are checked on a probe later."""
    changed = rewritten_weights(student, teacher)
    produced = {o for n in teacher.graph.node for o in n.output if o}
    graph_outputs = {o.name for o in student.graph.output}
    out: list[str] = []
    for node in student.graph.node:
        if node.op_type in MASKED_OPS and any(i in changed for i in node.input):
            out += [o for o in node.output if o and o in produced and o not in graph_outputs and o not in out]
    return out


MASKED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class Teacher:
    """The teacher's outputs (and ``taps``, intermediate tensors) on a batch, with onnxruntime
    (several times faster than the torch interpreter for inference)."""

    def __init__(self, model: onnx.ModelProto, taps: list[str], threads: int):
        from onnxprune.model import clone
        from onnxprune.plan.suffix import fixed_batch_of
        from onnxprune.runtime import make_session

        self.n_outputs = len(model.graph.output)
        self.taps = list(taps)
        self.fixed_batch = fixed_batch_of(model)
        if taps:
            model = clone(model)
            for name in taps:
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        self.session = make_session(model, threads=threads)

    def __call__(self, feeds: dict[str, np.ndarray]) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        from onnxprune.runtime import run_arrays

        n = len(next(iter(feeds.values())))
        res = run_arrays(self.session, feeds, batch_size=n, fixed_batch=self.fixed_batch)
        return res[:self.n_outputs], dict(zip(self.taps, res[self.n_outputs:]))


def augment_batch(torch, x, rng: np.random.Generator):
    """Random crop with replicate padding (1/8 of the side up to 64 px, 1/16 above) and, for
    3-channel images, a horizontal flip with probability 1/2. Non-image inputs pass unchanged."""
    if x.dim() != 4 or not x.is_floating_point():
        return x
    n, c, h, w = x.shape
    ph = max(1, h // 8 if h <= 64 else h // 16)
    pw = max(1, w // 8 if w <= 64 else w // 16)
    padded = torch.nn.functional.pad(x, (pw, pw, ph, ph), mode="replicate")
    dy = rng.integers(0, 2 * ph + 1, size=n)
    dx = rng.integers(0, 2 * pw + 1, size=n)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if c == 3:
        flip = torch.from_numpy(rng.random(n) < 0.5)
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out


def finetune(student: onnx.ModelProto, teacher: onnx.ModelProto | None, samples, *,
             config: TrainConfig = TrainConfig(), masks: dict[str, np.ndarray] | None = None,
             name: str = "student", val_samples=None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Train ``student`` on ``samples`` (a SampleSet for the student's inputs) to match ``teacher``.

    Returns ``(model, report)``: the student graph with new weights (names, shapes, opset and IR
    version unchanged) and a JSON-able report with the curve per epoch (train loss, held-out loss,
    agreement with the teacher and accuracy when labels exist), the chosen epoch and the time.
    ``teacher=None`` with labelled samples is plain fine-tuning on cross-entropy. ``val_samples``
    (optional) is the held-out fold itself, e.g. samples that did not calibrate the compression
    (a fold of calibration samples flatters the untrained student); by default a seeded
    ``val_fraction`` of ``samples``.
    """
    torch = require_torch()
    from onnxprune.embedding import output_kind
    from onnxprune.plan.suffix import fixed_batch_of
    from onnxprune.train.convert import to_onnx, to_torch, verify

    started = time.perf_counter()
    previous_rng = torch.random.get_rng_state()        # the caller's random stream goes on after training
    torch.manual_seed(config.seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        warnings: list[str] = []
        check_training_samples(samples, val_samples, teacher=teacher is not None, config=config)
        labels, unlabelled = shared_labels(samples, val_samples)
        if labels is None and config.label_weight > 0:
            warnings.append(f"--label-weight {config.label_weight:g}: {unlabelled.name} has no labels, so no "
                            "cross-entropy is added (distillation only)"
                            + (": labels count only where the checkpoint fold has them too"
                               if unlabelled is val_samples else ""))
            log.warning("%s", warnings[-1])
        if teacher is None and config.label_weight == 0:
            config = dataclasses.replace(config, label_weight=1.0)
        fixed = fixed_batch_of(student)   # a fixed batch dimension: every batch has exactly that many samples
        if fixed is not None and fixed != config.batch_size:
            log.info("%s takes batches of %d samples only: training in batches of %d (not %d)", name, fixed, fixed,
                     config.batch_size)
            config = dataclasses.replace(config, batch_size=fixed)
        n = len(samples)
        arrays = load_arrays(samples)
        n_train_given = n
        if val_samples is not None:
            extra = load_arrays(val_samples)
            arrays = {k: np.concatenate([v, extra[k]]) for k, v in arrays.items()}
            if labels is not None:
                labels = np.concatenate([labels, val_samples.labels])
            n = len(next(iter(arrays.values())))
        module = to_torch(student, name=name)
        feeds0 = {k: v[: min(8, n)] for k, v in arrays.items()}
        conversion_error = verify(student, module, feeds0)
        if masks:
            module.masks = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in masks.items()}
        taps: list[str] = []
        if teacher is not None and config.feature_weight > 0:
            taps = feature_candidates(student, teacher)
        per_step = teacher is not None and (config.augment or bool(taps))
        targets = teacher_outputs(teacher, arrays, 256) if teacher is not None and not per_step else None
        run_teacher = Teacher(teacher, taps, config.threads) if per_step else None
        module.taps = tuple(taps)
        first = fill_indices(np.arange(min(fixed or 2, n)), fixed)
        with torch.no_grad():
            probe = module(**{k: torch.from_numpy(v[first]) for k, v in arrays.items()})
        if taps:  # keep the tensors whose shapes agree (a pruned layer's own output has fewer channels)
            _, t_feats = run_teacher({k: v[first] for k, v in arrays.items()})
            taps = [t for t in taps if tuple(module.tapped[t].shape) == t_feats[t].shape]
            module.taps = tuple(taps)
            run_teacher = Teacher(teacher, taps, config.threads)
            log.info("feature distillation on %d tensors: %s", len(taps), ", ".join(taps))
            if not taps:
                log.warning("--feature-weight: no rewritten layer's output has the teacher's shape; outputs only")
        if config.train_layers == "rewritten":
            changed = rewritten_weights(student, teacher)
            for name, param in module.named_weights().items():
                param.requires_grad_(name in changed)
        kinds = ["kl" if is_classifier(o.shape) and o.is_floating_point() else "mse" for o in probe]
        floats = [i for i, o in enumerate(probe) if o.is_floating_point()]
        head = next((i for i in floats if kinds[i] == "kl"), floats[0] if floats else 0)
        if labels is not None and config.label_weight > 0 and kinds[head] != "kl":
            raise RecipeError("--label-weight", "needs a classifier output (N x classes) to apply cross-entropy")
        if labels is not None and config.label_weight > 0 and output_kind(student) == "embedding":
            # [N, 384] reads as scores of 384 classes: cross-entropy would train the embedding's width
            raise ModelError(name, "has no classifier output to train on labels: its output is a sentence embedding",
                             "distil it from its original (--teacher ORIGINAL.onnx) without --label-weight"
                             if teacher is not None else "give the original as --teacher (distillation needs no labels)")

        rng = np.random.default_rng(config.seed)
        if val_samples is not None:
            train_idx, val_idx = np.arange(n_train_given), np.arange(n_train_given, n)
        else:
            order = rng.permutation(n)
            n_val = fold_size(n, config.val_fraction)
            val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
        variances = None
        if targets is not None:
            variances = [float(np.var(t)) + 1e-12 if np.issubdtype(t.dtype, np.floating) else 1.0 for t in targets]

        def batch_inputs(idx, train: bool):
            feeds = {k: torch.from_numpy(v[idx]) for k, v in arrays.items()}
            if train and config.augment:
                feeds = {k: augment_batch(torch, x, rng) for k, x in feeds.items()}
            # channels-last images: the CPU convolutions run 25-60 % faster (same values)
            return {k: x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and x.is_floating_point()
                    else x for k, x in feeds.items()}

        def teacher_batch(idx, feeds):
            if targets is not None:
                return [torch.from_numpy(t[idx]) for t in targets], {}
            outs, feats = run_teacher({k: np.ascontiguousarray(v.numpy()) for k, v in feeds.items()})
            return [torch.from_numpy(o) for o in outs], {k: torch.from_numpy(v) for k, v in feats.items()}

        T = config.temperature

        def feature_loss(t_feats, real: int):
            total = torch.zeros(())
            for name in taps:
                s, t = module.tapped[name][:real], t_feats[name][:real]
                total = total + torch.mean((s - t) ** 2) / (float(t.var()) + 1e-12)
            return total / max(len(taps), 1)

        def distill_loss(outs, t_outs):
            total = torch.zeros(())
            for i in floats:
                s, t = outs[i], t_outs[i].to(outs[i].dtype)
                if kinds[i] == "kl":
                    log_p = torch.log_softmax(s / T, dim=1)
                    q = torch.softmax(t / T, dim=1)
                    total = total + torch.nn.functional.kl_div(log_p, q, reduction="batchmean") * T * T
                else:
                    var = variances[i] if variances is not None else float(t.var()) + 1e-12
                    total = total + torch.mean((s - t) ** 2) / var
            return total

        def batch_loss(idx, train: bool):
            real = len(idx)   # a fixed-batch model runs full batches: the copies filling one up are cut off
            idx = fill_indices(idx, fixed)
            feeds = batch_inputs(idx, train)
            outs = [o[:real] for o in module(**feeds)]
            loss = torch.zeros(())
            t_outs, features = None, None
            if teacher is not None:
                t_outs, t_feats = teacher_batch(idx, feeds)
                t_outs = [t[:real] for t in t_outs]
                loss = loss + distill_loss(outs, t_outs)
            if labels is not None and config.label_weight > 0:
                y = torch.from_numpy(labels[idx[:real]].astype(np.int64))
                loss = loss + config.label_weight * torch.nn.functional.cross_entropy(outs[head], y)
            if taps:
                features = config.feature_weight * feature_loss(t_feats, real)
            total = loss if features is None else loss + features
            return total, outs, t_outs, loss

        def evaluate() -> dict:
            module.eval()
            losses, output_losses, agree, correct, count = 0.0, 0.0, 0, 0, 0
            size = fixed or max(config.batch_size, 128)
            with torch.no_grad():
                for start in range(0, len(val_idx), size):
                    idx = val_idx[start:start + size]
                    loss, outs, t_outs, output_loss = batch_loss(idx, False)
                    losses += float(loss) * len(idx)
                    output_losses += float(output_loss) * len(idx)
                    count += len(idx)
                    if kinds[head] == "kl":
                        pred = outs[head].argmax(1).numpy()
                        if t_outs is not None:
                            agree += int((pred == t_outs[head].argmax(1).numpy()).sum())
                        if labels is not None:
                            correct += int((pred == labels[idx]).sum())
            row = {"val_loss": losses / count, "val_output_loss": output_losses / count}
            if kinds[head] == "kl" and teacher is not None:
                row["val_agreement"] = agree / count
            if kinds[head] == "kl" and labels is not None:
                row["val_accuracy"] = correct / count
            return row

        by_loss = config.checkpoint == "loss" or (config.checkpoint == "auto" and len(val_idx) < SMALL_FOLD)

        def score(row: dict) -> float:
            """Higher is better: top-1 agreement (accuracy without a teacher or with labels weighted),
            ties broken by the output loss; on a small fold (one sample = more than 1 %) the output
            loss alone, a far less coarse signal than a count of agreeing samples."""
            if by_loss:
                return -row["val_output_loss"]
            if "val_agreement" in row and config.label_weight == 0:
                return row["val_agreement"] - 1e-6 * row["val_output_loss"]
            if "val_accuracy" in row:
                return row["val_accuracy"] - 1e-6 * row["val_output_loss"]
            return -row["val_output_loss"]

        for p in module.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise RecipeError("--train-layers", "leaves no weight to train")
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
        steps_per_epoch = max(1, math.ceil(len(train_idx) / config.batch_size))
        total_steps = max(1, config.epochs * steps_per_epoch)
        step = 0

        def set_lr() -> None:
            """Cosine from lr to 0 over the epochs, or over max_seconds when that comes first."""
            done = step / total_steps
            if config.max_seconds is not None:
                done = max(done, (time.perf_counter() - started) / config.max_seconds)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))

        curve = [{"epoch": 0, "train_loss": None, "lr": config.lr, "seconds": 0.0, **evaluate()}]
        best_score, best_epoch = score(curve[0]), 0
        best_state = copy.deepcopy(module.state_dict())
        stale = 0
        stopped = "epochs"
        diverged = None  # the epoch in which a loss or a weight became NaN or inf
        bar = _progress(config.progress)
        for epoch in range(1, config.epochs + 1):
            module.train()
            perm = rng.permutation(train_idx)
            running, seen = 0.0, 0
            batches = [perm[i:i + config.batch_size] for i in range(0, len(perm), config.batch_size)]
            for idx in bar(batches, desc=f"epoch {epoch}/{config.epochs}"):
                set_lr()
                loss, _, _, _ = batch_loss(np.sort(idx), True)
                if not torch.isfinite(loss):
                    diverged = epoch
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                running += float(loss.detach()) * len(idx)
                seen += len(idx)
            if diverged is None and all(bool(torch.isfinite(p).all()) for p in params):
                row = {"epoch": epoch, "train_loss": running / max(seen, 1), "lr": optimizer.param_groups[0]["lr"],
                       "seconds": time.perf_counter() - started, **evaluate()}
                if not math.isfinite(row["val_loss"]):
                    diverged = epoch
            else:
                diverged = epoch
            if diverged is not None:   # the checkpoint so far (or the untrained student) is what is kept
                stopped = (f"diverged in epoch {epoch} (a loss or weight became NaN or inf; --lr {config.lr:g} may be "
                           f"too high): kept epoch {best_epoch}")
                warnings.append(f"training {stopped}" + (", the untrained student" if best_epoch == 0 else ""))
                log.warning("%s", warnings[-1])
                break
            curve.append(row)
            log.info("epoch %d: %s", epoch, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
            if config.checkpoint == "last" or score(row) > best_score:
                best_score, best_epoch, stale = score(row), epoch, 0
                # "last" copies every epoch too: a later epoch that diverges falls back to it
                best_state = copy.deepcopy(module.state_dict())
            else:
                stale += 1
            if config.patience is not None and stale >= config.patience:
                stopped = f"no improvement on the held-out fold for {config.patience} epochs"
                break
            if config.max_seconds is not None and time.perf_counter() - started > config.max_seconds:
                stopped = f"time limit {config.max_seconds:.0f} s"
                break
        module.load_state_dict(best_state)
        out_masks = None
        if masks:
            out_masks = {k: np.asarray(v, dtype=np.float32) for k, v in masks.items()}
        tuned = to_onnx(module, masks=out_masks)
        check = {k: v[: min(8, n)] for k, v in arrays.items()}
        module.masks = {}
        module.taps = ()
        if out_masks:
            for k, m in out_masks.items():
                with torch.no_grad():
                    module.weight(k).mul_(torch.from_numpy(m))
        export_error = verify(tuned, module, check)
        report = {
            "config": config.to_dict(),
            "teacher": teacher is not None,
            "labels": labels is not None,
            "losses": {"distillation": (f"KL(T={T:g}) on classifier outputs, relative MSE on others")
                       if teacher is not None else None,
                       "cross_entropy_weight": config.label_weight if labels is not None else 0.0},
            "train_samples": len(train_idx),
            "val_samples": len(val_idx),
            "data": samples.describe(),
            "val_data": None if val_samples is None else val_samples.describe(),
            "trainable_tensors": len(params),
            "trainable_weights": int(sum(p.numel() for p in params)),
            "feature_targets": list(taps),
            "curve": curve,
            "best_epoch": best_epoch,
            "checkpoint_by": "last epoch" if config.checkpoint == "last" else
                             "held-out output loss" if by_loss else "held-out agreement/accuracy",
            "stopped": stopped,
            "diverged": diverged,
            "seconds": time.perf_counter() - started,
            "conversion_error": conversion_error,
            "export_error": export_error,
            "warnings": warnings,
        }
        return tuned, report
    finally:
        torch.set_num_threads(previous_threads)
        torch.random.set_rng_state(previous_rng)


def _progress(enabled: bool):
    def wrap(items, desc: str):
        if not enabled:
            return items
        try:
            from tqdm import tqdm
        except ImportError:
            return items
        return tqdm(items, desc=desc, leave=False, unit="batch")
    return wrap


def plot_curve(report: dict, path: str | Path) -> Path | None:
    """Training curve PNG (loss and held-out agreement/accuracy per epoch); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no training-curve PNG (pip install matplotlib)")
        return None
    curve = report["curve"]
    epochs = [r["epoch"] for r in curve]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(epochs[1:], [r["train_loss"] for r in curve[1:]], "o-", label="train")
    ax1.plot(epochs, [r["val_loss"] for r in curve], "s-", label="held-out fold")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    for key, label in (("val_agreement", "agreement with teacher"), ("val_accuracy", "accuracy")):
        if key in curve[0]:
            ax2.plot(epochs, [100 * r[key] for r in curve], "o-", label=label)
    ax2.axvline(report["best_epoch"], color="gray", ls=":", label="chosen epoch")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("% on held-out fold")
    ax2.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
