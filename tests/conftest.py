"""Shared fixtures: the ../shared folder of real models and data, and the equivalence oracle."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from onnxprune.calibration.provider import StatsProvider
from onnxprune.cost import total_macs
from onnxprune.data.preprocess import Preprocess
from onnxprune.data.samples import open_samples
from onnxprune.model import count_parameters, load_model
from onnxprune.pipeline import Recipe, run_pipeline
from onnxprune.runtime import make_session, run_batches

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def pytest_collection_modifyitems(config, items):
    if SHARED.is_dir():
        return
    skip = pytest.mark.skip(reason="../shared (real models and data) is absent")
    for item in items:
        if "real" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_onnxprune_logger():
    """A command run in a test sets the onnxprune logger's level (-q: ERROR) and its stderr
    handler; a later test reading warnings with caplog must not depend on which ran before."""
    logger = logging.getLogger("onnxprune")
    level, handlers = logger.level, list(logger.handlers)
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers


@pytest.fixture(scope="session")
def shared() -> Path:
    """Path to ../shared; tests using it must also be marked ``real``."""
    if not SHARED.is_dir():
        pytest.skip("../shared is absent")
    return SHARED


def run_model(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_equivalent(reference, candidate, feeds: dict[str, np.ndarray], tol: float = 1e-4) -> None:
    """The one oracle: both models run in onnxruntime and agree to relative ``tol``."""
    ref = run_model(reference, feeds)
    out = run_model(candidate, feeds)
    assert len(ref) == len(out)
    for r, c in zip(ref, out):
        assert r.shape == c.shape
        scale = max(float(np.abs(r).max()), 1e-6)
        err = float(np.abs(r - c).max()) / scale
        assert err <= tol, f"relative error {err:.3g} > {tol}"


# ------------------------------------------------------------------ real tasks (../shared)

#: the ImageNet normalisation of the real MobileNetV2 tests
IMAGENET = Preprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def predict(model, samples) -> np.ndarray:
    """Top-1 class of every sample, batched through onnxruntime."""
    session = make_session(model)
    out = []
    for _, outputs in run_batches(session, samples, batch_size=64):
        out.append(outputs[0].reshape(len(outputs[0]), -1).argmax(axis=1))
    return np.concatenate(out)


def split(samples, n_calib: int, n_eval: int, *, shuffle: bool):
    """Disjoint calibration (first half) and evaluation (second half) subsets; ``shuffle``
    draws the halves by a seeded permutation (for sets stored sorted by class)."""
    n = len(samples)
    order = np.random.default_rng(0).permutation(n) if shuffle else np.arange(n)
    return samples.subset(np.sort(order[:n // 2][:n_calib])), samples.subset(np.sort(order[n // 2:][:n_eval]))


class RealTask:
    """A real model with disjoint calibration/evaluation samples and cached statistics."""

    def __init__(self, model_path, data_path, preprocess, n_calib, n_eval, *, shuffle):
        self.model = load_model(model_path)
        samples = open_samples(data_path, self.model, preprocess=preprocess)
        self.calib, self.eval = split(samples, n_calib, n_eval, shuffle=shuffle)
        self.provider = StatsProvider({"target": self.calib}, batch_size=32, folds=2, progress=False)
        self.reference = predict(self.model, self.eval)
        self.accuracy = float((self.reference == self.eval.labels).mean())

    def run(self, passes) -> dict:
        model, report = run_pipeline(self.model, Recipe(passes=tuple(passes), batch_size=32), self.provider)
        pred = predict(model, self.eval)
        return {"accuracy": float((pred == self.eval.labels).mean()),
                "agreement": float((pred == self.reference).mean()),
                "params": count_parameters(model) / count_parameters(self.model),
                "macs": total_macs(model) / total_macs(self.model), "report": report, "model": model}
