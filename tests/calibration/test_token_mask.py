"""Token statistics: padded positions (attention_mask = 0) never enter the statistics."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.calibration.collect import collect, token_mask_input
from onnxprune.calibration.requests import StatRequest
from onnxprune.data.samples import open_samples
from onnxprune.errors import CalibrationError
from tests.graphs import token_feeds, token_ffn

SITE = "gelu.mul1.out"          # [N, T, 16] after the Erf GELU
REQUESTS = [StatRequest(SITE, kind="features", axis=-1), StatRequest("x", kind="features", axis=-1),
            StatRequest(SITE, kind="pooled", axis=-1, pool="mean"), StatRequest(SITE, kind="pooled", axis=-1, pool="max")]


def _padded(data: dict, extra: int, seed: int = 5) -> dict:
    """The same samples with ``extra`` padded token columns of random features appended."""
    rng = np.random.default_rng(seed)
    n, _, c = data["x"].shape
    x = np.concatenate([data["x"], rng.standard_normal((n, extra, c)).astype(np.float32) * 10], axis=1)
    mask = np.concatenate([data["attention_mask"], np.zeros((n, extra), dtype=np.int64)], axis=1)
    return {"x": x, "attention_mask": mask}


def _stats(model, data, **kw):
    return collect(model, {"target": open_samples(data, model)}, REQUESTS, batch_size=4, folds=2, progress=False, **kw)


@pytest.mark.parametrize("engine", ["auto", "numpy", "graph"])
def test_padding_never_enters_the_statistics(engine):
    model = token_ffn()
    data = token_feeds(batch=10, tokens=5)
    plain, padded = _stats(model, data, engine=engine), _stats(model, _padded(data, 3), engine=engine)
    real_tokens = int(data["attention_mask"].sum())
    assert plain.header["mask"] == "attention_mask"
    for request in REQUESTS:
        for fold in (0, 1, None):
            a, b = plain.moments(request, fold=fold), padded.moments(request, fold=fold)
            assert a.count == b.count
            np.testing.assert_allclose(a.sum, b.sum, rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(a.second_moment, b.second_moment, rtol=1e-6, atol=1e-9)
        if request.kind == "features":
            assert plain.moments(request).count == real_tokens
        else:
            assert plain.moments(request).count == 10


def test_without_the_mask_padding_counts():
    model = token_ffn()
    data = token_feeds(batch=10, tokens=5)
    a = _stats(model, data, mask=None).moments(REQUESTS[0])
    b = _stats(model, _padded(data, 3), mask=None).moments(REQUESTS[0])
    assert a.count == 50 and b.count == 80
    assert not np.allclose(a.second_moment, b.second_moment)


def test_masked_rows_equal_numpy_on_the_real_tokens():
    model = token_ffn()
    data = token_feeds(batch=7, tokens=6)
    stats = _stats(model, data, engine="numpy").moments(REQUESTS[1])
    rows = data["x"][data["attention_mask"] != 0].astype(np.float64)
    np.testing.assert_allclose(stats.mean, rows.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(stats.second_moment, rows.T @ rows / len(rows), rtol=1e-10)


def test_mask_input_by_name():
    model = token_ffn()
    assert token_mask_input(model) == "attention_mask"
    assert token_mask_input(model, "attention_mask") == "attention_mask"
    assert token_mask_input(model, None) is None and token_mask_input(model, "none") is None
    with pytest.raises(CalibrationError, match="not an input"):
        token_mask_input(model, "token_type_ids")
