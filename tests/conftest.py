"""Shared fixtures: the ../shared folder of real models and data, and the equivalence oracle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def pytest_collection_modifyitems(config, items):
    if SHARED.is_dir():
        return
    skip = pytest.mark.skip(reason="../shared (real models and data) is absent")
    for item in items:
        if "real" in item.keywords:
            item.add_marker(skip)


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
