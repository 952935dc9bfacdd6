"""Shared benchmark harness: real tasks from ../shared, disjoint splits, cached statistics.

Every task calibrates on the first half of its target data and evaluates on the second
half (never on calibration samples). One ``Bench`` per task keeps a StatsProvider, so all
methods run against statistics gathered once on the original model, and caches the
reference model's predictions on the evaluation half.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from pathlib import Path

import numpy as np

from onnxprune.calibration.provider import StatsProvider
from onnxprune.cost import total_macs
from onnxprune.data.preprocess import Preprocess
from onnxprune.data.samples import SampleSet, open_samples
from onnxprune.model import count_parameters, load_model
from onnxprune.pipeline import Recipe, run_pipeline
from onnxprune.runtime import batch_size_for, make_session, run_batches

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "bench" / "results"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DIGITS = SHARED / "data" / "digits"


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    model: Path
    target: Path
    preprocess: Preprocess
    source: Path | None = None
    max_calib: int | None = None      # cap on calibration samples (first half of the target data)
    max_eval: int | None = None       # cap on evaluation samples (second half)
    sorted_by_class: bool = False     # stored sorted by class: halves come from a seeded permutation


MNIST_CNN = Preprocess(mean=(0.5,), std=(0.5,))
TASKS = {t.name: t for t in [
    Task("lenet/usps", SHARED / "models/lenet_caffe_mnist.onnx", DIGITS / "usps_test.npz", Preprocess(),
         DIGITS / "mnist_test.npz"),
    Task("lenet/mnist-m", SHARED / "models/lenet_caffe_mnist.onnx", DIGITS / "mnist_m_test.npz", Preprocess(),
         DIGITS / "mnist_test.npz", max_calib=2000, max_eval=2000),
    Task("mnist_cnn/usps", SHARED / "models/mnist_cnn_fc3136.onnx", DIGITS / "usps_test.npz", MNIST_CNN,
         DIGITS / "mnist_test.npz"),
    Task("mnist_cnn/mnist-m", SHARED / "models/mnist_cnn_fc3136.onnx", DIGITS / "mnist_m_test.npz", MNIST_CNN,
         DIGITS / "mnist_test.npz", max_calib=2000, max_eval=2000),
    Task("resnet20/cifar10-jpeg", SHARED / "models/resnet20_cifar10.onnx", SHARED / "data/cifar10/cifar10_test_jpeg.npz",
         Preprocess(mean=IMAGENET_MEAN, std=IMAGENET_STD), max_calib=2000, max_eval=2000, sorted_by_class=True),
    Task("mobilenetv2/imagenet", SHARED / "models/mobilenetv2_imagenet_fp32.onnx", SHARED / "data/imagenet_samples",
         Preprocess(resize=256, center_crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD), sorted_by_class=True),
]}


def machine() -> str:
    """One line naming the machine the numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, no GPU, onnxruntime CPU"


def halves(samples: SampleSet, max_calib: int | None, max_eval: int | None, *,
           shuffle: bool = False) -> tuple[SampleSet, SampleSet]:
    """First half calibrates, second half evaluates (each capped); disjoint by construction.
    ``shuffle``: the halves of a seeded permutation instead (for sets sorted by class, whose
    plain halves would calibrate and evaluate on different classes)."""
    n = len(samples)
    order = np.random.default_rng(0).permutation(n) if shuffle else np.arange(n)
    calib, evaluation = order[:n // 2][:max_calib or None], order[n // 2:][:max_eval or None]
    return samples.subset(np.sort(calib)), samples.subset(np.sort(evaluation))


def predict(model, samples: SampleSet, *, batch_size: int = 64) -> np.ndarray:
    """Top-1 class of the first output for every sample."""
    session = make_session(model)
    fixed = batch_size_for(model, batch_size)
    out = np.empty(len(samples), dtype=np.int64)
    pos = 0
    for _, outputs in run_batches(session, samples, batch_size=batch_size,
                                  fixed_batch=fixed if fixed != batch_size else None):
        logits = outputs[0].reshape(len(outputs[0]), -1)
        out[pos:pos + len(logits)] = logits.argmax(axis=1)
        pos += len(logits)
    return out


class Bench:
    """One task: the model, its calibration/evaluation halves, cached statistics and predictions."""

    def __init__(self, task: str | Task, *, folds: int = 2, batch_size: int = 64, with_source: bool = True):
        self.task = TASKS[task] if isinstance(task, str) else task
        t = self.task
        self.model = load_model(t.model)
        target = open_samples(t.target, self.model, preprocess=t.preprocess)
        self.calib, self.eval = halves(target, t.max_calib, t.max_eval, shuffle=t.sorted_by_class)
        samples = {"target": self.calib}
        self.source = None
        if with_source and t.source is not None:
            source = open_samples(t.source, self.model, preprocess=t.preprocess)
            self.source = source.subset(np.arange(min(len(source), len(self.calib))))
            samples["source"] = self.source
        self.batch_size = batch_size
        self.folds = folds
        self.provider = StatsProvider(samples, batch_size=batch_size, folds=folds, progress=False)
        self.params = count_parameters(self.model)
        self.macs = total_macs(self.model)
        self.reference = predict(self.model, self.eval, batch_size=batch_size)
        self.labels = self.eval.labels
        self.accuracy = self.score(self.reference)

    def score(self, predictions: np.ndarray) -> float:
        return float((predictions == self.labels).mean()) if self.labels is not None else float("nan")

    def run(self, passes, *, mode: str = "one-shot", **recipe) -> dict:
        """Compress with ``passes`` [(name, options), ...]; accuracy, agreement, params and MACs kept."""
        recipe = Recipe(passes=tuple(passes), mode=mode, folds=self.folds, batch_size=self.batch_size, **recipe)
        started = time.perf_counter()
        model, report = run_pipeline(self.model, recipe, self.provider)
        seconds = time.perf_counter() - started
        pred = predict(model, self.eval, batch_size=self.batch_size)
        params, macs = count_parameters(model), total_macs(model)
        return {
            "accuracy": self.score(pred), "agreement": float((pred == self.reference).mean()),
            "params": params, "params_kept": params / self.params, "macs": macs, "macs_kept": macs / self.macs,
            "seconds": seconds, "report": report, "model": model,
        }


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or None without matplotlib
    (the ``bench`` extra installs it): plots are then skipped."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "—" if np.isnan(v) else f"{v:.2f}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, text: str) -> Path:
    """Write ``bench/results/<name>.md`` (the run_all command stitches these into RESULTS.md)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(text.rstrip() + "\n")
    return path


def rows_per_sample(request, shape) -> int:
    """Rows one sample adds to ``request``'s Gram, given its tensor's shape for one sample
    (sampled patch positions counted as the library samples them)."""
    import math

    if request.kind == "patches":
        rows = math.prod(request.out_spatial(shape))
        return min(rows, request.positions) if request.positions else rows
    if request.kind == "pooled":
        return 1
    return math.prod(shape[1:]) // request.dim(shape)


def gram_macs(requests, shapes: dict) -> int:
    """Multiply-adds per sample of the Gram updates of ``requests`` (rows x dim^2), given the
    shape of each request's tensor for one sample; raw rows (keep_rows) cost none."""
    return sum(0 if r.keep_rows else rows_per_sample(r, shapes[r.tensor]) * r.dim(shapes[r.tensor]) ** 2
               for r in requests)


def interleaved_times(sessions, feeds: dict, *, runs: int, budget: float) -> list[dict]:
    """ms per run of each session, A B A B ... on the same ``feeds``; stops early (after at
    least 5 rounds) once ``budget`` seconds are spent. [{"min", "median", "runs"}] per session."""
    times = [[] for _ in sessions]
    start = time.perf_counter()
    for i in range(runs):
        for which, s in enumerate(sessions):
            t = time.perf_counter()
            s.run(None, feeds)
            times[which].append(1e3 * (time.perf_counter() - t))
        if i >= 4 and time.perf_counter() - start > budget:
            break
    return [{"min": float(np.min(t)), "median": float(np.median(t)), "runs": len(t)} for t in times]


def no_options(doc: str | None) -> None:
    """The command line of a bench that takes no options: ``-h``/``--help`` prints ``doc`` and
    exits (instead of starting a run that writes into bench/results/)."""
    argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
