"""Reference vs candidate: accuracy, agreement, output error, size, MACs and latency.

Both models run in onnxruntime on the same batches, read once from the sample set. Only
running sums are kept (counts of correct and agreeing top-1 predictions, float64 sums of
squares per output), so a sample set of any size streams through in constant memory.

Latency is measured in the same process, interleaving reference and candidate runs
(A B A B ...) on the same random input after a warm-up, and reported as medians, so that
the ratio stays meaningful on a noisy machine even when absolute times drift.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator

import numpy as np
import onnx

from onnxprune import embedding as emb
from onnxprune.cost import sample_shapes, total_macs
from onnxprune.errors import DataError, ModelError, RecipeError, UsageError, ValidationFailed
from onnxprune.model import count_parameters, input_specs, jsonable, model_bytes
from onnxprune.runtime import make_session, run_batches

# Slack when comparing percentages with thresholds, so 90.0 - 89.0 is not "more than 1.0".
_THRESHOLD_EPS = 1e-9
#: a missed --max-drop within this many standard errors of the drop is said to be within its noise
NOISE_SE = 2.0


@dataclasses.dataclass
class OutputError:
    """Error of one graph output of the candidate against the reference."""

    name: str
    relative_error: float  # ||y_c - y_r|| / ||y_r|| over all samples
    sqnr_db: float  # 10 log10(||y_r||^2 / ||y_c - y_r||^2); inf when identical


@dataclasses.dataclass
class ValidationReport:
    """What ``validate`` measured. Fractions in [0, 1]; ``to_dict`` is JSON-able."""

    samples: int
    accuracy_reference: float | None  # top-1 of the judged output; None without labels
    accuracy_candidate: float | None
    agreement: float  # top-1 agreement of candidate with reference
    relative_error: float  # of the judged output
    sqnr_db: float  # of the judged output
    params_reference: int
    params_candidate: int
    macs_reference: int  # per sample
    macs_candidate: int
    bytes_reference: int
    bytes_candidate: int
    latency_ms: dict = dataclasses.field(default_factory=dict)  # {"reference": {"batch1": ms, ...}, ...}
    outputs: list[OutputError] = dataclasses.field(default_factory=list)  # every output, first first
    warnings: list[str] = dataclasses.field(default_factory=list)  # e.g. a reference accuracy near chance
    # embedding outputs (``onnxprune.embedding``): cosine, kNN and probe accuracy; None for class scores.
    # Then accuracy_* are the kNN accuracies and agreement is the mean cosine similarity.
    embedding: dict | None = None
    # standard error of ``accuracy_drop`` (points) over the paired samples: what the drop's
    # sample alone makes it vary by (MobileNetV2 planned on 250 images, 250 held out: 1.2-1.5 points)
    accuracy_drop_se: float | None = None
    # the output accuracy, agreement and the errors above are measured on (``--judge-output``, or
    # ``embedding.measured_output``'s default: the first float output, a token model's embedding)
    judged: str | None = None
    # whether the judged output holds class scores, one row per sample (N x C, C >= 2: the planner's
    # classifier). Otherwise (a regression value, a dense map such as N x C x H x W) a --max-drop
    # without labels is judged as the planner judges it: 100 x the relative squared error, in points
    classifier: bool = True

    @property
    def identical(self) -> bool:
        """Every output of the candidate equals the reference's exactly (zero error)."""
        return bool(self.outputs) and all(out.relative_error == 0 for out in self.outputs)

    @property
    def accuracy_drop(self) -> float | None:
        """Reference minus candidate top-1 accuracy, in percentage points."""
        if self.accuracy_reference is None or self.accuracy_candidate is None:
            return None
        return 100.0 * (self.accuracy_reference - self.accuracy_candidate)

    def speedup(self) -> dict[str, float]:
        """Reference / candidate median latency per batch size measured by both."""
        ref = self.latency_ms.get("reference", {})
        cand = self.latency_ms.get("candidate", {})
        return {key: _ratio(ref[key], cand[key]) for key in ref if key in cand}

    def ratios(self) -> dict:
        """Candidate / reference for params, MACs and bytes, and the latency speedups."""
        return {
            "params": _ratio(self.params_candidate, self.params_reference),
            "macs": _ratio(self.macs_candidate, self.macs_reference),
            "bytes": _ratio(self.bytes_candidate, self.bytes_reference),
            "speedup": self.speedup(),
        }

    def to_dict(self) -> dict:
        """Plain types only; non-finite floats become null (SQNR of identical outputs:
        null with ``identical`` true)."""
        data = dataclasses.asdict(self)
        data["identical"] = self.identical
        data["accuracy_drop"] = self.accuracy_drop
        data["ratios"] = self.ratios()
        return jsonable(data)

    def summary_lines(self) -> list[str]:
        """Human-readable lines, one metric each, reference -> candidate."""
        lines = [f"samples      {self.samples}"]
        if self.embedding is not None:
            e = self.embedding
            lines.append(f"cosine       {e['cosine']:.4f} mean, {e['cosine_p05']:.4f} 5th percentile, "
                         f"{e['cosine_min']:.4f} min (embedding {e['output']} against the reference)")
            if "knn_reference" in e:
                lines.append(f"kNN          {100 * e['knn_reference']:.2f}% -> {100 * e['knn_candidate']:.2f}% "
                             f"({100 * (e['knn_candidate'] - e['knn_reference']):+.2f} points; k={e['k']}, "
                             f"index {e['index']}, queries {e['queries']})")
            if e.get("probe_reference") is not None:
                lines.append(f"probe        {100 * e['probe_reference']:.2f}% -> {100 * e['probe_candidate']:.2f}% "
                             f"({100 * (e['probe_candidate'] - e['probe_reference']):+.2f} points, logistic regression)")
            return lines + self._size_lines()
        if self.accuracy_drop is not None:
            ref, cand = 100 * self.accuracy_reference, 100 * self.accuracy_candidate
            noise = f" +- {self.accuracy_drop_se:.2f}" if self.accuracy_drop_se is not None else ""
            lines.append(f"accuracy     {ref:.2f}% -> {cand:.2f}% ({cand - ref:+.2f}{noise} points)")
        judged = f" (output {self.judged})" if len(self.outputs) > 1 and self.judged else ""
        if self.agreement == self.agreement:
            lines.append(f"agreement    {100 * self.agreement:.2f}% top-1 with the reference{judged}")
        else:
            lines.append(f"agreement    n/a: the judged output{judged} holds no [N, classes] scores (its error below)")
        return lines + self._size_lines()

    def _size_lines(self) -> list[str]:
        lines = []
        for out in self.outputs if len(self.outputs) > 1 else self.outputs[:1]:
            label = f"error [{out.name}]" if len(self.outputs) > 1 else "error"
            lines.append(f"{label:<12} relative {out.relative_error:.4g}, SQNR {_db(out.sqnr_db)}")
        ratios = self.ratios()
        for label, ref, cand, ratio in (
            ("params", _count(self.params_reference), _count(self.params_candidate), ratios["params"]),
            ("MACs", _count(self.macs_reference), _count(self.macs_candidate), ratios["macs"]),
            ("size", f"{self.bytes_reference / 1e6:.2f} MB", f"{self.bytes_candidate / 1e6:.2f} MB",
             ratios["bytes"]),
        ):
            lines.append(f"{label:<12} {ref} -> {cand} ({_times(ratio)})")
        ref_ms = self.latency_ms.get("reference", {})
        cand_ms = self.latency_ms.get("candidate", {})
        spread = self.latency_ms.get("spread", {})
        for key, speed in ratios["speedup"].items():
            quartiles = spread.get(key, {}).get("speedup")
            between = f", {quartiles[0]:.2f}-{quartiles[1]:.2f}x interquartile" if quartiles else ""
            lines.append(f"latency      {key}: {ref_ms[key]:.3f} ms -> {cand_ms[key]:.3f} ms"
                         f" ({speed:.2f}x speedup{between})")
        return lines


def validate(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    samples,
    *,
    batch_size: int = 32,
    latency_runs: int = 10,
    latency_batch: int = 32,
    device: str = "cpu",
    measure_latency: bool = True,
    progress: bool = False,
    metric: str = "auto",
    judge: str | None = None,
) -> ValidationReport:
    """Run ``reference`` and ``candidate`` over ``samples`` (a SampleSet) and compare them.

    The judged output is ``judge`` (``--judge-output``) or ``embedding.measured_output``'s default
    (the first float output; a token model's sentence embedding). Top-1 is the argmax over its
    last axis of [N, C >= 2] class scores (agreement is NaN for any other shape: a regression value,
    a dense map, whose last axis need not hold classes; the planner and ``check_thresholds`` judge
    those by their relative squared error); accuracy needs ``samples.labels`` and one prediction
    per sample there. Raises
    ModelError when the models' inputs or outputs do not match, DataError for an empty
    sample set or labels that do not fit the outputs.

    ``metric``: "auto", "classes" or "embedding" (``onnxprune.embedding.output_kind``). For an
    embedding output (a sentence encoder's) the report's ``embedding`` holds the cosine
    similarity to the reference and, with labels, kNN and linear-probe accuracy of both;
    ``accuracy_*`` are then the kNN accuracies and ``agreement`` the mean cosine.
    """
    _check_compatible(reference, candidate)
    n = len(samples)
    if n == 0:
        raise DataError(_describe(samples), "no samples to validate on")
    labels = getattr(samples, "labels", None)
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) != n:
            raise DataError(_describe(samples), f"{len(labels)} labels for {n} samples")

    sessions = [make_session(reference, device=device), make_session(candidate, device=device)]
    fixed = [_fixed_batch(reference), _fixed_batch(candidate)]
    names = [o.name for o in reference.graph.output]
    step = fixed[0] if fixed[0] and fixed[0] == fixed[1] else batch_size
    measured = names.index(emb.measured_output(reference, judge))
    kind = None
    classifier = True
    vectors: tuple[list, list] = ([], [])

    sum_ref = np.zeros(len(names))  # sum of y_r^2 per output, float64
    sum_err = np.zeros(len(names))  # sum of (y_c - y_r)^2 per output
    agree = compared = 0
    correct = [0, 0]
    flips = [0, 0]          # samples the candidate gets wrong where the reference is right, and the reverse
    seen = 0
    first_feeds = None
    classes = None
    for indices, feeds in _progress(samples.batches(step), n, progress):
        if first_feeds is None:
            first_feeds = feeds
        ref_out, cand_out = (_run_checked(session, feeds, f, role)
                             for session, f, role in zip(sessions, fixed, ("reference", "candidate")))
        for k, (r, c) in enumerate(zip(ref_out, cand_out)):
            if r.shape != c.shape:
                raise ModelError(names[k], f"output shape differs: reference {r.shape}, candidate {c.shape}")
            r64 = r.astype(np.float64, copy=False)
            sum_ref[k] += float(np.sum(r64 * r64))
            diff = c.astype(np.float64) - r64
            sum_err[k] += float(np.sum(diff * diff))
        seen += len(indices)
        if kind is None:
            kind = emb.output_kind(reference, ref_out[measured], metric, judge)
            classifier = kind != "embedding" and ref_out[measured].ndim == 2 and ref_out[measured].shape[1] >= 2
        if kind == "embedding":
            vectors[0].append(np.asarray(ref_out[measured]).reshape(len(indices), -1))
            vectors[1].append(np.asarray(cand_out[measured]).reshape(len(indices), -1))
            continue
        if not classifier:  # no [N, C >= 2] class scores (a regression value, a dense map): errors only
            if labels is not None:
                raise DataError(_describe(samples),
                                f"has labels but the judged output {names[measured]} has shape {ref_out[measured].shape}",
                                "accuracy needs class scores on the last axis of the judged output (--judge-output)")
            continue
        if classes is None and labels is not None and ref_out[measured].ndim == 2:    # once: the classes are known
            check_labels_fit(labels, ref_out[measured].shape[1], _describe(samples))
        classes = ref_out[measured].shape[-1]
        top_ref = _top1(ref_out[measured])
        top_cand = _top1(cand_out[measured])
        agree += int(np.sum(top_ref == top_cand))
        compared += top_ref.size
        if labels is not None:
            batch_labels = labels[np.asarray(indices)]
            if top_ref.shape != batch_labels.shape:
                raise DataError(_describe(samples),
                                f"one label per sample does not fit predictions of shape {top_ref.shape[1:]}"
                                " per sample", "accuracy needs one class per sample from the first output")
            right_ref, right_cand = top_ref == batch_labels, top_cand == batch_labels
            correct[0] += int(np.sum(right_ref))
            correct[1] += int(np.sum(right_cand))
            flips[0] += int(np.sum(right_ref & ~right_cand))
            flips[1] += int(np.sum(right_cand & ~right_ref))

    errors = [OutputError(name, _relative_error(r, e), _sqnr_db(r, e))
              for name, r, e in zip(names, sum_ref, sum_err)]
    latency = {}
    if measure_latency and latency_runs > 0:
        latency = _latency(sessions, fixed, first_feeds, runs=latency_runs, batch=latency_batch)
    shapes = sample_shapes(reference, first_feeds)      # MACs at the data's dynamic H x W or sequence length
    macs_reference = total_macs(reference, input_shapes=shapes)
    accuracy_reference = correct[0] / seen if labels is not None else None
    accuracy_candidate = correct[1] / seen if labels is not None else None
    drop_se = paired_standard_error(*flips, seen) if labels is not None and compared else None
    agreement = agree / compared if compared else float("nan")
    main = errors[measured]
    embedding = None
    label_notes = []
    if kind == "embedding":
        if labels is not None and len(np.unique(labels)) < 2:     # every kNN vote right: nothing measured
            label_notes.append(f"the labels of {_describe(samples)} hold one class only: kNN accuracy on them is "
                               "100% whatever the embeddings, so they are left out (judged by the cosine)")
            labels = None
        embedding = emb.embedding_metrics(np.concatenate(vectors[0]), np.concatenate(vectors[1]), labels,
                                          output=names[measured])
        accuracy_reference, accuracy_candidate = embedding.get("knn_reference"), embedding.get("knn_candidate")
        agreement = embedding["cosine"]
    warnings = label_notes + reference_warnings(accuracy_reference, labels, classes, flags=data_flags(reference)) + \
        output_warnings(errors, measured) + latency_warnings(latency)
    return ValidationReport(
        samples=seen,
        accuracy_reference=accuracy_reference,
        accuracy_candidate=accuracy_candidate,
        agreement=agreement,
        relative_error=main.relative_error,
        sqnr_db=main.sqnr_db,
        params_reference=count_parameters(reference),
        params_candidate=count_parameters(candidate),
        macs_reference=macs_reference,
        macs_candidate=macs_reference if candidate is reference else total_macs(candidate, input_shapes=shapes),
        bytes_reference=model_bytes(reference),
        bytes_candidate=model_bytes(candidate),
        latency_ms=latency,
        outputs=errors,
        warnings=warnings,
        embedding=embedding,
        accuracy_drop_se=None if kind == "embedding" else drop_se,
        judged=names[measured],
        classifier=classifier,
    )


#: another output whose relative error exceeds this (and the judged output's) is warned about
OTHER_OUTPUT_ERROR = 0.05


def output_warnings(errors: list[OutputError], measured: int) -> list[str]:
    """A line for each output other than the judged one (``measured``) that changed more than it
    and more than ``OTHER_OUTPUT_ERROR``: goals, the planner's checks and agreement read only the
    judged output, so damage elsewhere would pass unseen."""
    judged = errors[measured]
    return [f"only output {judged.name} is judged (goals, checks, agreement), but output {other.name} changed "
            f"more: relative error {other.relative_error:.3f} against {judged.relative_error:.3f} (every output "
            "is listed under validation.outputs in the report)"
            for k, other in enumerate(errors)
            if k != measured and other.relative_error > max(OTHER_OUTPUT_ERROR, judged.relative_error)]


def check_labels_fit(labels: np.ndarray, classes: int, name: str) -> None:
    """A DataError naming ``name`` when ``labels`` lie outside 0..classes-1: no answer of the model
    can match them."""
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(name, f"has labels {int(labels.min())}..{int(labels.max())}, but the model answers with "
                        f"{classes} classes (0..{classes - 1})",
                        "check the labels (y, labels.csv, class folders), or leave them out to measure agreement "
                        "with the original")


def paired_standard_error(lost: int, gained: int, n: int) -> float | None:
    """Standard error (points) of an accuracy drop measured on ``n`` paired samples, of which
    the candidate got ``lost`` wrong where the reference was right and ``gained`` the reverse:
    of the mean of per-sample differences in {-1, 0, 1} (None below 2 samples)."""
    if n < 2:
        return None
    mean = (lost - gained) / n
    variance = max((lost + gained - n * mean * mean) / (n - 1), 0.0)
    return 100.0 * math.sqrt(variance / n)


#: the reference is "near chance" below this multiple of the chance accuracy
NEAR_CHANCE = 2.0


#: what to check when the original scores near chance: the flags that turn data into model input
IMAGE_FLAGS = "--mean, --std, --scale, --resize, --layout"
TOKEN_FLAGS = "--tokenizer, --max-length, and the labels: the .tsv's label column or the y array"


def data_flags(model: onnx.ModelProto) -> str:
    """The flags that decide how the data reaches ``model``: image preprocessing, or for a model of
    integer (token id) inputs the tokenisation and the labels' source."""
    if any(spec.dtype.kind in "iu" for spec in input_specs(model)):
        return TOKEN_FLAGS
    return IMAGE_FLAGS


def reference_warnings(accuracy: float | None, labels: np.ndarray | None, classes: int | None, *,
                       flags: str = IMAGE_FLAGS) -> list[str]:
    """Signs that the data, the labels or the preprocessing do not fit the model: the original
    model itself near chance, or labels the model cannot predict. One sentence each; ``flags``:
    what to check (``data_flags``)."""
    if accuracy is None or labels is None or labels.size == 0:
        return []
    warnings = []
    values = np.unique(labels)
    if classes is not None and (values.min() < 0 or values.max() >= classes):
        warnings.append(f"labels range {int(values.min())}..{int(values.max())} but the model has {classes} classes"
                        " (0..{}): check the labels file".format(classes - 1))
    if near_chance(accuracy, labels):
        warnings.append(f"the original model scores {100 * accuracy:.1f}% on these samples, near chance "
                        f"({100 * chance_accuracy(labels):.1f}% for {len(values)} classes): check the data and the "
                        f"preprocessing ({flags})")
    return warnings


def chance_accuracy(labels: np.ndarray) -> float:
    """The accuracy of guessing: one class of several, or always the most frequent one."""
    values, counts = np.unique(labels, return_counts=True)
    return max(1.0 / len(values), float(counts.max()) / labels.size)


def near_chance(accuracy: float, labels: np.ndarray) -> bool:
    """Whether ``accuracy`` on ``labels`` is too close to guessing to measure anything by. Labels of
    one class have no guessing to compare with (always answering it scores 100%): never."""
    if len(np.unique(labels)) < 2:
        return False
    return accuracy < min(NEAR_CHANCE * chance_accuracy(labels), 0.5)


#: what to do about a missed threshold, unless the caller knows better (``check_thresholds(remedy=)``)
REMEDY = "compress less aggressively or calibrate on more target samples"


def check_thresholds(report: ValidationReport, *, max_drop: float | None = None,
                     min_agreement: float | None = None, remedy: str = REMEDY) -> None:
    """Raise ValidationFailed (exit code 3) when ``report`` misses a threshold.

    ``max_drop`` is in percentage points: of top-1 accuracy when the report has labels,
    otherwise of agreement (``100 - agreement%``). ``min_agreement`` is a fraction in
    [0, 1] like ``report.agreement`` (0.99 means 99 %). For embeddings the accuracy is kNN's and
    the agreement the mean cosine, and the messages say so. A threshold exactly met passes;
    NaN metrics fail. Raises RecipeError for a threshold out of range. ``remedy`` is the
    error's first hint.
    """
    check_threshold_values(max_drop=max_drop, min_agreement=min_agreement)
    failures = []
    hints = []
    agreement = 100.0 * report.agreement
    embedding = report.embedding is not None    # accuracy: kNN; agreement: the mean cosine
    if max_drop is not None:
        drop = report.accuracy_drop
        if drop is not None:
            if not drop <= max_drop + _THRESHOLD_EPS:
                ref, cand = 100 * report.accuracy_reference, 100 * report.accuracy_candidate
                se = report.accuracy_drop_se
                noise = f" +- {se:.2f}" if se is not None else ""
                problem = (f"dropped {drop:.2f}{noise} points ({ref:.2f}% -> {cand:.2f}% on {report.samples} samples),"
                           f" more than max drop {max_drop:g}")
                failures.append(("kNN accuracy" if embedding else "accuracy", problem))
                if se is not None and drop - max_drop <= NOISE_SE * se:
                    hints.append(f"the excess is within {NOISE_SE:g} standard errors of the drop on these "
                                 f"{report.samples} samples, so it may be their noise: evaluate on more samples "
                                 "(--eval-data) to tell")
        elif not embedding and not report.classifier:
            points = 100.0 * report.relative_error ** 2
            if not points <= max_drop + _THRESHOLD_EPS:
                judged = f"the judged output {report.judged}" if report.judged else "the judged output"
                failures.append(("relative error", f"{judged} has no class scores to agree on: its relative "
                                 f"squared error {report.relative_error ** 2:.4f} reads as {points:.2f} points (as "
                                 f"the planner reads it), more than max drop {max_drop:g}"))
        elif not 100.0 - agreement <= max_drop + _THRESHOLD_EPS:
            if embedding:
                problem = (f"mean {report.agreement:.4f} to the reference's embeddings: 100 (1 - cosine) = "
                           f"{100 - agreement:.2f} points (no labels), more than max drop {max_drop:g}")
            else:
                problem = (f"{agreement:.2f}% is {100 - agreement:.2f} points below the reference (no labels),"
                           f" more than max drop {max_drop:g}")
            failures.append(("cosine" if embedding else "agreement", problem))
    if min_agreement is not None and agreement != agreement:
        failures.append(("agreement", "the judged output holds no [N, classes] scores to agree on, so --min-agreement "
                                      "cannot be met; --max-drop reads its relative squared error"))
    elif min_agreement is not None and not agreement >= 100.0 * min_agreement - _THRESHOLD_EPS:
        if embedding:
            failures.append(("cosine", f"mean {report.agreement:.4f} to the reference's embeddings is below min "
                                       f"agreement {min_agreement:g} (for embeddings a minimum mean cosine)"))
        else:
            failures.append(("agreement", f"{agreement:.2f}% is below min agreement {100 * min_agreement:.2f}%"))
    if failures:
        thing = " and ".join(dict.fromkeys(metric for metric, _ in failures))
        raise ValidationFailed(thing, "; ".join(problem for _, problem in failures),
                               "; ".join([remedy, *hints]))


def check_threshold_values(*, max_drop: float | None = None, min_agreement: float | None = None) -> None:
    """RecipeError for a threshold out of range or not a number; called before any work is done."""
    for name, value in (("max_drop", max_drop), ("min_agreement", min_agreement)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                                  or not math.isfinite(value)):
            raise RecipeError(name, f"must be a finite number, not {value!r}")
    if max_drop is not None and not 0 <= max_drop <= 100:
        raise RecipeError("max_drop", f"{max_drop} is not a number of percentage points in [0, 100]")
    if min_agreement is not None and not 0 <= min_agreement <= 1:
        raise RecipeError("min_agreement", f"{min_agreement} is not a fraction in [0, 1]",
                          "give it as a fraction, e.g. 0.99 for 99 %")


def check_latency_runs(latency_runs) -> None:
    """UsageError for a ``latency_runs`` that is not an integer >= 1 (the command line's
    ``--latency-runs`` range; ``measure_latency=False`` measures none); called before any work."""
    if isinstance(latency_runs, bool) or not isinstance(latency_runs, (int, np.integer)) or latency_runs < 1:
        raise UsageError(f"latency_runs must be an integer >= 1, not {latency_runs!r}",
                         "measure_latency=False measures no latency")


# --------------------------------------------------------------------------- checks

def _check_compatible(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> None:
    ref_specs = {spec.name: spec for spec in input_specs(reference)}
    cand_specs = {spec.name: spec for spec in input_specs(candidate)}
    if set(ref_specs) != set(cand_specs):
        problem = f"inputs {sorted(cand_specs)} differ from the reference's {sorted(ref_specs)}"
        raise ModelError("candidate", problem, "compare a compressed model with the model it came from")
    for name, ref in ref_specs.items():
        cand = cand_specs[name]
        # the batch dimension may differ (a fixed-batch export of the same model); the rest may not
        fixed_differ = any(isinstance(a, int) and isinstance(b, int) and a != b
                           for a, b in zip(ref.shape[1:], cand.shape[1:]))
        if ref.rank != cand.rank or fixed_differ or ref.dtype != cand.dtype:
            raise ModelError("candidate", f"input {name!r} is {_spec_text(cand)}, the reference's is "
                             f"{_spec_text(ref)}", "compare a compressed model with the model it came from")
    ref_out, cand_out = reference.graph.output, candidate.graph.output
    if len(ref_out) != len(cand_out):
        raise ModelError("candidate", f"{len(cand_out)} outputs, the reference has {len(ref_out)}")
    ref_names, cand_names = [o.name for o in ref_out], [o.name for o in cand_out]
    if ref_names != cand_names:      # outputs are compared in order: another name is another output
        problem = "are the reference's in another order" if sorted(ref_names) == sorted(cand_names) else \
            "differ from the reference's"
        raise ModelError("candidate", f"outputs {cand_names} {problem} {ref_names}",
                         "compare a compressed model with the model it came from")
    for r, c in zip(ref_out, cand_out):
        rs, cs = _dims(r), _dims(c)
        if rs is None or cs is None:
            continue
        fixed_differ = any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(rs, cs))
        if len(rs) != len(cs) or fixed_differ:
            raise ModelError(c.name, f"output shape {_shape_text(cs)} differs from the reference's"
                                     f" {_shape_text(rs)}")


def _spec_text(spec) -> str:
    return _shape_text(tuple("?" if d is None else d for d in spec.shape)) + f" {spec.dtype}"


def _dims(value: onnx.ValueInfoProto) -> tuple | None:
    ttype = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not ttype.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in ttype.shape.dim)


def _shape_text(dims: tuple) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def _fixed_batch(model: onnx.ModelProto) -> int | None:
    fixed = {spec.fixed_batch for spec in input_specs(model)} - {None}
    return fixed.pop() if len(fixed) == 1 else None


# --------------------------------------------------------------------------- running

class _InMemory:
    """One batch of feeds with the ``batches`` interface of a SampleSet, so the same
    batch read once from the sample set can go through ``run_batches`` for each model."""

    def __init__(self, feeds: dict[str, np.ndarray]):
        self.feeds = feeds
        self.n = len(next(iter(feeds.values())))

    def batches(self, size: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        for start in range(0, self.n, size):
            stop = min(start + size, self.n)
            yield np.arange(start, stop), {k: v[start:stop] for k, v in self.feeds.items()}


def _run(session, feeds: dict[str, np.ndarray], *, fixed_batch: int | None) -> list[np.ndarray]:
    """All outputs of ``session`` on ``feeds``, in chunks of the model's fixed batch if any."""
    data = _InMemory(feeds)
    size = fixed_batch or data.n
    parts = [outputs for _, outputs in run_batches(session, data, batch_size=size, fixed_batch=fixed_batch)]
    if len(parts) == 1:
        return parts[0]
    return [np.concatenate(chunk) for chunk in zip(*parts)]


def _run_checked(session, feeds: dict[str, np.ndarray], fixed_batch: int | None, role: str) -> list[np.ndarray]:
    """``_run`` with onnxruntime's errors (a shape or type the model refuses) as one line."""
    from onnxprune.runtime import ORT_ERRORS, error_line, feeds_text, free_size_hint

    try:
        return _run(session, feeds, fixed_batch=fixed_batch)
    except ORT_ERRORS as exc:
        first = error_line(exc)
        raise ModelError(role, f"onnxruntime rejected the samples ({feeds_text(feeds)}): {first}",
                         "check that the data and both models have the same inputs (and, for token ids, "
                         "that the rows are no longer than the model's positions)"
                         + free_size_hint([(i.name, i.shape) for i in session.get_inputs()], feeds)) from None


def _top1(output: np.ndarray) -> np.ndarray:
    """Argmax over the last axis, one row per sample: shape (N,) or (N, positions)."""
    top = np.argmax(output, axis=-1).reshape(len(output), -1)
    return top[:, 0] if top.shape[1] == 1 else top


def _relative_error(sum_ref: float, sum_err: float) -> float:
    if sum_err == 0:
        return 0.0
    return math.sqrt(sum_err / sum_ref) if sum_ref > 0 else math.inf


def _sqnr_db(sum_ref: float, sum_err: float) -> float:
    if sum_err == 0:
        return math.inf
    if not np.isfinite(sum_err):
        return math.nan
    return 10.0 * math.log10(sum_ref / sum_err) if sum_ref > 0 else -math.inf


def _latency(sessions, fixed, sample_feeds, *, runs: int, batch: int, warmup: int = 3) -> dict:
    """Median ms per run at batch 1 and ``batch`` (or the fixed batch), A B A B interleaved, and
    under "spread" the quartiles of each model's times and of the pairwise speedups."""
    rng = np.random.default_rng(0)
    result = {"reference": {}, "candidate": {}, "spread": {}}
    # a fixed-batch model runs at its own batch only
    for per_model in dict.fromkeys((fixed[0] or size, fixed[1] or size) for size in (1, batch)):
        feeds = [_random_feeds(sample_feeds, b, rng) for b in per_model]
        if per_model[0] == per_model[1]:
            feeds[1] = feeds[0]  # the very same input for both
        times = [[], []]
        for _ in range(warmup):
            for session, f in zip(sessions, feeds):
                session.run(None, f)
        for _ in range(runs):
            for which, (session, f) in enumerate(zip(sessions, feeds)):
                start = time.perf_counter()
                session.run(None, f)
                times[which].append(1e3 * (time.perf_counter() - start))
        for which, role in enumerate(("reference", "candidate")):
            result[role][f"batch{per_model[which]}"] = float(np.median(times[which]))
        # the speedup of each interleaved pair: its quartiles say whether the medians can be trusted
        ratios = np.asarray(times[0]) / np.maximum(np.asarray(times[1]), 1e-9)
        key = f"batch{per_model[1]}" if per_model[0] == per_model[1] else f"batch{per_model[0]}/{per_model[1]}"
        result["spread"][key] = {
            "runs": runs,
            "reference_ms": [float(q) for q in np.percentile(times[0], [25, 75])],
            "candidate_ms": [float(q) for q in np.percentile(times[1], [25, 75])],
            "speedup": [float(q) for q in np.percentile(ratios, [25, 75])],
        }
    return result


#: the interquartile range of the pairwise speedups wider than this ratio is too noisy to conclude
NOISY_SPREAD = 1.3


def latency_warnings(latency: dict) -> list[str]:
    """One warning per batch size whose interleaved speedups spread too much to conclude, and
    one where the compressed model was slower in most runs (the upper quartile below 1)."""
    warnings = []
    for key, spread in (latency.get("spread") or {}).items():
        low, high = spread["speedup"]
        if low > 0 and high / low > NOISY_SPREAD:
            warnings.append(f"latency at {key} is too noisy to conclude: the speedup of interleaved runs ranges "
                            f"{low:.2f}x to {high:.2f}x (interquartile, {spread['runs']} runs); rerun on a quiet "
                            "machine or with more runs (--latency-runs)")
        if 0 < high < 1:
            warnings.append(f"the compressed model ran slower than the original at {key} (speedup {low:.2f}x to "
                            f"{high:.2f}x, interquartile, {spread['runs']} runs): fewer MACs or parameters are not "
                            "less time on this runtime (widths off its channel blocks, the extra node of a "
                            "low-rank split); --objective latency plans for measured time")
    return warnings


def _random_feeds(sample_feeds: dict[str, np.ndarray], batch: int, rng: np.random.Generator
                  ) -> dict[str, np.ndarray]:
    """Random float inputs shaped like the samples (integer inputs repeat a real sample)."""
    feeds = {}
    for name, value in sample_feeds.items():
        shape = (batch, *value.shape[1:])
        if np.issubdtype(value.dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(value.dtype)
        else:
            feeds[name] = np.repeat(value[:1], batch, axis=0)
    return feeds


def _progress(batches, total: int, enabled: bool):
    if not enabled:
        yield from batches
        return
    try:
        from tqdm import tqdm
    except ImportError:  # progress is cosmetic
        yield from batches
        return
    with tqdm(total=total, desc="validate", unit="sample") as bar:
        for indices, feeds in batches:
            yield indices, feeds
            bar.update(len(indices))


def _describe(samples) -> str:
    """The sample set's name for messages."""
    name = getattr(samples, "name", None)
    return str(name) if name else "samples"


# --------------------------------------------------------------------------- formatting

def _ratio(num: float, den: float) -> float:
    if den == 0:
        return math.nan if num == 0 else math.inf
    return num / den


def _count(value: int) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}"
    return str(value)


def _times(ratio: float) -> str:
    return f"{ratio:.2f}x" if math.isfinite(ratio) else "n/a"


def _db(value: float) -> str:
    return f"{value:.1f} dB" if math.isfinite(value) else str(value)
