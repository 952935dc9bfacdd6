"""The spatial split of a 2-D Conv (linalg/spatial.py) against constructed truth."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import linalg

RNG = np.random.default_rng(0)


def output_error(w: np.ndarray, approx: np.ndarray, cov: np.ndarray) -> float:
    d = w.reshape(len(w), -1) - approx
    return float(np.trace(d @ cov @ d.T))


def spatially_low_rank(m, c, kh, kw, k):
    """W[m, c, i, j] = sum_r H_j[m, r] V[r, (c, i)]: exactly rank k in the spatial form."""
    v = RNG.normal(size=(k, c * kh))
    h = RNG.normal(size=(kw, m, k))
    return np.einsum("jmr,rn->mnj", h, v).reshape(m, c, kh, kw)


def test_a_spatially_low_rank_kernel_is_recovered_exactly():
    w = spatially_low_rank(6, 4, 3, 5, 3)
    cov = np.cov(RNG.normal(size=(4 * 15, 500)))
    for covariance, tol in ((None, 1e-10), (cov, 1e-5)):      # the fit's ridge (1e-6 relative) shrinks a little
        first, second, a, b = linalg.spatial_split(w, covariance, 3)
        approx = a @ b
        assert first.shape == (3, 4, 3, 1) and second.shape == (6, 3, 1, 5)
        assert np.abs(approx - w.reshape(6, -1)).max() < tol * np.abs(w).max()


def test_full_rank_is_the_weight_itself():
    w = RNG.normal(size=(5, 3, 3, 3))
    _, _, a, b = linalg.spatial_split(w, None, linalg.spatial_rank_limit(3, 5, (3, 3)))
    approx = a @ b
    assert np.abs(approx - w.reshape(5, -1)).max() < 1e-12


def test_the_two_convs_compute_the_approximation():
    """kh x 1 (vertical stride, pads, dilation) then 1 x kw (horizontal ones) equals the
    approximated kernel as one Conv, at uneven strides, pads and dilations."""
    m, c, kh, kw = 6, 4, 3, 5
    first, second, a, b = linalg.spatial_split(RNG.normal(size=(m, c, kh, kw)), None, 3)
    approx = a @ b
    x = RNG.normal(size=(2, c, 11, 13)).astype(np.float32)
    strides, pads, dilations = (2, 3), (1, 2, 0, 1), (1, 2)

    def run(nodes, weights):
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        return ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]

    whole = run([helper.make_node("Conv", ["x", "W"], ["y"], strides=strides, pads=pads, dilations=dilations)],
                {"W": approx.reshape(m, c, kh, kw)})
    split = run([helper.make_node("Conv", ["x", "V"], ["t"], kernel_shape=[kh, 1], strides=[strides[0], 1],
                                  pads=[pads[0], 0, pads[2], 0], dilations=[dilations[0], 1]),
                 helper.make_node("Conv", ["t", "H"], ["y"], kernel_shape=[1, kw], strides=[1, strides[1]],
                                  pads=[0, pads[1], 0, pads[3]], dilations=[1, dilations[1]])],
                {"V": first, "H": second})
    assert whole.shape == split.shape == (2, m, 5, 3)
    assert np.abs(whole - split).max() < 1e-4 * np.abs(whole).max()


def test_fitting_on_the_data_lowers_the_held_out_output_error():
    """Inputs with a few strong directions: the fit on one sample's covariance beats the
    weights' own spatial SVD on another sample of the same distribution, at every rank."""
    m, c, kh, kw = 8, 6, 3, 3
    w = RNG.normal(size=(m, c, kh, kw))
    n = c * kh * kw
    mix = RNG.normal(size=(n, 5)) @ RNG.normal(size=(5, n)) + 0.1 * RNG.normal(size=(n, n))

    def sample():
        return np.cov(mix @ RNG.normal(size=(n, 4000)))

    fit, held_out = sample(), sample()
    for k in (2, 4, 6):
        plain = np.matmul(*linalg.spatial_split(w, None, k)[2:])
        fitted = np.matmul(*linalg.spatial_split(w, fit, k)[2:])
        assert output_error(w, fitted, held_out) < 0.8 * output_error(w, plain, held_out)


def test_costs_and_bounds():
    assert linalg.spatial_params(16, 32, (3, 3), 4) == 4 * (16 * 3 + 32 * 3)
    assert linalg.spatial_rank_limit(16, 32, (3, 5)) == 48
    w = RNG.normal(size=(4, 2, 3, 3))
    for k in (0, 7):
        with pytest.raises(ValueError):
            linalg.spatial_split(w, None, k)
    with pytest.raises(ValueError):
        linalg.spatial_split(RNG.normal(size=(4, 18)), None, 2)


def test_deterministic():
    w = RNG.normal(size=(8, 4, 3, 3))
    cov = np.cov(RNG.normal(size=(36, 300)))
    a = linalg.spatial_split(w, cov, 5)
    b = linalg.spatial_split(w.copy(), cov.copy(), 5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
