"""onnxprune.linalg against constructed truth: synthetic, seeded, no onnx."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from onnxprune import linalg
from onnxprune.errors import NumericalError
from onnxprune.linalg import SecondMoment


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def relu_samples(n: int, seed: int, *, decay: float = 0.5, offset: float = 0.3):
    """A sampler of post-ReLU-like inputs: correlated, decaying spectrum, nonzero mean."""
    g = rng(seed)
    basis = np.linalg.qr(g.standard_normal((n, n)))[0]
    factor = basis * np.sqrt(1.0 / np.arange(1, n + 1) ** decay)
    return lambda count: np.maximum(g.standard_normal((count, n)) @ factor.T + offset, 0.0)


def gram(X: np.ndarray) -> SecondMoment:
    return SecondMoment.from_gram(X.T @ X, len(X))


def sample_error(W, A, B, X, delta=None) -> float:
    """E||W x - A B x - delta||^2 / E||W x||^2 over the rows of X, computed directly."""
    E = X @ (W - A @ B).T - (0.0 if delta is None else delta)
    return float(np.sum(E**2) / np.sum((X @ W.T) ** 2))


def assert_finite(*arrays) -> None:
    for a in arrays:
        assert np.all(np.isfinite(a))


# ---------------------------------------------------------------- SecondMoment


def test_second_moment_sample_space_matches_gram():
    g = rng(1)
    X = g.standard_normal((30, 80)) @ g.standard_normal((80, 80))     # N < n: sample space
    rows, full = SecondMoment.from_rows(X), gram(X)
    assert rows.sample_space and not full.sample_space
    assert rows.n == full.n == 80 and rows.count == full.count == 30
    assert math.isclose(rows.trace, full.trace, rel_tol=1e-12)
    M = g.standard_normal((80, 5))
    P = g.standard_normal((7, 80))
    np.testing.assert_allclose(rows.matmul(M), full.matmul(M), rtol=1e-10, atol=1e-10 * full.trace)
    np.testing.assert_allclose(rows.quad(P), full.quad(P), rtol=1e-10)
    assert math.isclose(rows.quad_trace(P), full.quad_trace(P), rel_tol=1e-10)
    shift = 1e-2 * full.scale
    np.testing.assert_allclose(rows.solve(M, shift=shift), full.solve(M, shift=shift), rtol=1e-8, atol=1e-12)
    S = X.T @ X / 30
    direct = np.linalg.solve(S + shift * np.eye(80), M)
    np.testing.assert_allclose(full.solve(M, shift=shift), direct, rtol=1e-8)
    np.testing.assert_allclose(rows.smooth(P, shift=shift), full.smooth(P, shift=shift),
                               rtol=1e-8, atol=1e-10)
    with pytest.warns(RuntimeWarning, match="rank 30"):
        projected = rows.smooth(P, shift=0.0)
    with pytest.warns(RuntimeWarning, match="rank 30"):
        np.testing.assert_allclose(projected, full.smooth(P, shift=0.0), atol=1e-8)
    # the projector onto the row space of X
    np.testing.assert_allclose(projected @ X.T, P @ X.T, rtol=1e-8, atol=1e-8)


def test_second_moment_rejects_bad_input():
    with pytest.raises(NumericalError):
        SecondMoment.from_gram(np.full((3, 3), np.nan), 4)
    with pytest.raises(NumericalError):
        SecondMoment.from_rows(np.array([[1.0, np.inf]]))
    with pytest.raises(ValueError):
        SecondMoment.from_gram(np.eye(3), 0)
    with pytest.raises(ValueError):
        SecondMoment(matrix=np.eye(2), rows=np.eye(2))


# ---------------------------------------------------------------- low rank


def test_exact_rank_weight_splits_with_zero_error():
    g = rng(2)
    m, n, k = 24, 40, 5
    W = g.standard_normal((m, k)) @ g.standard_normal((k, n))
    X = relu_samples(n, 3)(200)
    for stats in (gram(X), SecondMoment.from_rows(X[:25])):          # Gram and sample space
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "second moment | singular", RuntimeWarning)
            exact = linalg.dalr(W, stats, k, ridge=0.0)                  # 25 samples: S is singular
        shrunk = linalg.dalr(W, stats, k, ridge=1e-4, shrink_to="weight")
        for A, B in (linalg.truncated_svd(W, k), exact, shrunk):
            assert A.shape == (m, k) and B.shape == (k, n)
            assert_finite(A, B)
            np.testing.assert_allclose(A.T @ A, np.eye(k), atol=1e-12)
            assert linalg.reconstruction_error(W, A, B, stats) < 1e-20
            np.testing.assert_allclose(X[:25] @ (A @ B).T, X[:25] @ W.T, rtol=1e-9, atol=1e-9)
    A, B = linalg.truncated_svd(W, k)
    np.testing.assert_allclose(A @ B, W, atol=1e-12)


def test_signs_are_fixed_and_results_deterministic():
    g = rng(4)
    W = g.standard_normal((30, 50))
    stats = gram(relu_samples(50, 5)(300))
    for A, B in (linalg.truncated_svd(W, 6), linalg.dalr(W, stats, 6)):
        pivot = np.argmax(np.abs(A), axis=0)
        assert np.all(A[pivot, np.arange(6)] > 0)
    A1, B1 = linalg.dalr(W, stats, 6)
    A2, B2 = linalg.dalr(W, stats, 6)
    assert np.array_equal(A1, A2) and np.array_equal(B1, B2)


def test_truncated_svd_is_optimal_for_frobenius():
    g = rng(6)
    W = g.standard_normal((20, 30))
    A, B = linalg.truncated_svd(W, 4)
    s = np.linalg.svd(W, compute_uv=False)
    assert math.isclose(np.sum((W - A @ B) ** 2), np.sum(s[4:] ** 2), rel_tol=1e-10)
    with pytest.raises(ValueError):
        linalg.truncated_svd(W, 0)
    with pytest.raises(ValueError):
        linalg.truncated_svd(W, 21)


def _fit_cases():
    g = rng(7)
    n = 40
    yield gram(relu_samples(n, 8)(500))                                   # correlated
    yield gram(relu_samples(n, 9, decay=3.0)(500))                        # low-rank-ish spectrum
    yield gram(g.standard_normal((25, n)) @ g.standard_normal((n, n)))   # singular S (N < n)
    yield SecondMoment.from_rows(relu_samples(n, 10)(30))                 # sample space
    yield gram(g.standard_normal((2000, n)))                              # nearly white


@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("rank", [1, 5, 15])
def test_dalr_never_worse_than_svd_on_the_fit(case, rank):
    stats = list(_fit_cases())[case]
    W = rng(100 + case).standard_normal((30, 40))
    svd_error = linalg.reconstruction_error(W, *linalg.truncated_svd(W, rank), stats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)                  # singular S with ridge=0
        exact = linalg.dalr(W, stats, rank, ridge=0.0)
    # ridge 0 is the optimum: the best rank-k error under S
    best = linalg.output_spectrum(W, stats)
    dalr_error = linalg.reconstruction_error(W, *exact, stats)
    assert dalr_error <= svd_error + 1e-12
    assert math.isclose(dalr_error, best[rank:].sum() / best.sum(), rel_tol=1e-8, abs_tol=1e-12)
    for ridge, shrink_to in ((linalg.DEFAULT_RIDGE, "zero"), (1e-4, "weight")):
        A, B = linalg.dalr(W, stats, rank, ridge=ridge, shrink_to=shrink_to)
        assert_finite(A, B)
        assert linalg.reconstruction_error(W, A, B, stats) <= svd_error + 1e-3


@pytest.mark.parametrize("m", [25, 50])                  # N > m, and N < m (SVD of W X^T)
@pytest.mark.parametrize("shrink_to", ["zero", "weight"])
@pytest.mark.parametrize("ridge", [0.0, 1e-3, 1.0])
def test_sample_space_and_gram_space_dalr_agree(shrink_to, ridge, m):
    X = relu_samples(90, 11)(35)                                        # N < n
    W = rng(12).standard_normal((m, 90))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        A1, B1 = linalg.dalr(W, gram(X), 6, ridge=ridge, shrink_to=shrink_to)
        A2, B2 = linalg.dalr(W, SecondMoment.from_rows(X), 6, ridge=ridge, shrink_to=shrink_to)
    scale = np.abs(A1 @ B1).max()
    np.testing.assert_allclose(A2, A1, atol=1e-8)
    np.testing.assert_allclose(B2, B1, atol=1e-8 * scale)
    # rows with N >= n are folded into S: same answer as the Gram matrix
    Y = relu_samples(30, 13)(100)
    W = W[:, :30]
    A3, B3 = linalg.dalr(W, SecondMoment.from_rows(Y), 6, ridge=1e-3, shrink_to=shrink_to)
    A4, B4 = linalg.dalr(W, gram(Y), 6, ridge=1e-3, shrink_to=shrink_to)
    np.testing.assert_allclose(A3 @ B3, A4 @ B4, atol=1e-10 * np.abs(A4 @ B4).max())


def test_weight_shrinkage_interpolates_dalr_and_svd():
    X = relu_samples(40, 14)(300)
    W = rng(15).standard_normal((20, 40))
    A, B = linalg.dalr(W, gram(X), 5, ridge=math.inf, shrink_to="weight")
    As, Bs = linalg.truncated_svd(W, 5)
    np.testing.assert_allclose(A @ B, As @ Bs, atol=1e-12)
    A, B = linalg.dalr(W, gram(X), 5, ridge=1e8, shrink_to="weight")
    np.testing.assert_allclose(A @ B, As @ Bs, atol=1e-6)
    A0, B0 = linalg.dalr(W, gram(X), 5, ridge=0.0, shrink_to="weight")
    A1, B1 = linalg.dalr(W, gram(X), 5, ridge=0.0, shrink_to="zero")
    np.testing.assert_allclose(A0 @ B0, A1 @ B1, atol=1e-9)


def test_reconstruction_error_matches_samples():
    X = relu_samples(30, 16)(400)
    W = rng(17).standard_normal((12, 30))
    A, B = linalg.truncated_svd(W, 3)
    mu = X.mean(axis=0)
    for stats in (gram(X), SecondMoment.from_rows(X)):
        assert math.isclose(linalg.reconstruction_error(W, A, B, stats), sample_error(W, A, B, X),
                            rel_tol=1e-10)
        delta = (W - A @ B) @ mu                    # bias compensation: the mean output exact
        centred = linalg.reconstruction_error(W, A, B, stats, mean=mu)
        assert math.isclose(centred, sample_error(W, A, B, X, delta), rel_tol=1e-10)
        assert math.isclose(linalg.reconstruction_error(W, A, B, stats, mean=mu, bias_delta=delta), centred,
                            rel_tol=1e-12)
        half = 0.5 * delta
        assert math.isclose(linalg.reconstruction_error(W, A, B, stats, mean=mu, bias_delta=half),
                            sample_error(W, A, B, X, half), rel_tol=1e-10)
        # compensation is never worse in expectation
        assert centred <= linalg.reconstruction_error(W, A, B, stats)
    assert linalg.reconstruction_error(np.zeros((2, 3)), np.zeros((2, 1)), np.zeros((1, 3)), np.eye(3)) == 0.0


def test_output_spectrum():
    X = relu_samples(30, 20)(200)
    W = rng(21).standard_normal((12, 30))
    stats = gram(X)
    spectrum = linalg.output_spectrum(W, stats)
    assert spectrum.shape == (12,) and np.all(np.diff(spectrum) <= 0) and np.all(spectrum >= 0)
    assert math.isclose(spectrum.sum(), stats.quad_trace(W), rel_tol=1e-10)
    np.testing.assert_allclose(linalg.output_spectrum(W), np.linalg.svd(W, compute_uv=False) ** 2, rtol=1e-10)
    narrow = linalg.output_spectrum(W, SecondMoment.from_rows(X[:5]))   # rank 5 < 12
    assert narrow.shape == (12,) and np.all(narrow[5:] == 0)
    np.testing.assert_allclose(narrow[:5], linalg.output_spectrum(W, gram(X[:5]))[:5], rtol=1e-10)


# ---------------------------------------------------------------- ridge selection


@pytest.mark.parametrize("seed", [0, 1])
def test_affine_low_rank_chooses_a_larger_ridge_for_a_tiny_fit_set_and_keeps_the_mean_exact(seed):
    n, m, k = 120, 60, 10
    sample = relu_samples(n, 30 + seed)
    W = rng(40 + seed).standard_normal((m, n)) / np.sqrt(n)

    def folds(count):
        rows = [sample(count // 2), sample(count - count // 2)]
        return rows, [(SecondMoment.from_rows(x), x.mean(axis=0)) for x in rows]

    (tiny_rows, tiny), (_, large) = folds(40), folds(4000)               # N < n, N >> n
    A, B, delta, info = linalg.affine_low_rank(W, k, tiny)
    _, _, _, info_large = linalg.affine_low_rank(W, k, large)
    assert_finite(A, B, delta)
    assert A.shape == (m, k) and B.shape == (k, n) and delta.shape == (m,)
    assert info["ridge"] > info_large["ridge"]
    # the choice is within the tolerance of the best held-out error, and never worse than SVD + bias
    assert info["cv_error"] <= info["cv_best"] * (1 + linalg.AUTO_TOLERANCE) + 1e-15
    assert info["cv_error"] <= info["cv_errors"]["inf"] * (1 + linalg.AUTO_TOLERANCE) + 1e-15
    # delta = (W - A B) mu: the mean output on the calibration rows is exact
    X = np.vstack(tiny_rows)
    np.testing.assert_allclose((X @ W.T - X @ (A @ B).T - delta).mean(axis=0), 0.0, atol=1e-10)


# ---------------------------------------------------------------- spectral selection


def channels_with_dead_and_duplicate(seed: int = 60, count: int = 2000, C: int = 10):
    """Channel samples (count x C): channel 3 is dead, channel 7 copies channel 2."""
    g = rng(seed)
    phi = np.maximum(g.standard_normal((count, C)) @ g.standard_normal((C, C)) + 0.5, 0.0)
    phi[:, 3] = 0.0
    phi[:, 7] = phi[:, 2]
    return phi


def brute_force_greedy(S: np.ndarray, count: int, ridge: float):
    """The textbook loop: explicit residual, rank-1 downdates."""
    C = len(S)
    total = np.trace(S)
    rho = ridge * total / C
    R = S.copy()
    keep, ratios, retained = [], [], 0.0
    for _ in range(count):
        res = np.diag(R).copy()
        eligible = res > rho + 1e-12 * total / C
        eligible[keep] = False
        gains = np.where(eligible, np.sum(R * R, axis=0) / (res + rho), -np.inf)
        j = int(np.argmax(gains))
        r = R[:, j].copy()
        retained += r @ r / (r[j] + rho)
        R -= np.outer(r, r) / (r[j] + rho)
        keep.append(j)
        ratios.append(retained / total)
    return keep, np.array(ratios)


@pytest.mark.parametrize("C,count", [(60, 40), (400, 8)])   # the S^2 path and the matvec path
def test_spectral_select_matches_the_textbook_greedy(C, count):
    g = rng(C)
    F = g.standard_normal((3 * C, C // 2)) @ g.standard_normal((C // 2, C))
    S = F.T @ F / len(F)
    keep, ratios = linalg.spectral_select(S, count=count)
    ref_keep, ref_ratios = brute_force_greedy(S, count, linalg.SELECT_RIDGE)
    assert keep.tolist() == ref_keep
    np.testing.assert_allclose(ratios, ref_ratios, rtol=1e-10)
    assert math.isclose(ratios[-1], linalg.retention_ratio(S, keep), rel_tol=1e-10)


def brute_force_readout_greedy(S, W, count, ridge):
    """The read-out greedy written out: gain ||W R[:, j]||^2 / (R_jj + rho) on the explicit residual."""
    C = len(S)
    rho = ridge * np.trace(S) / C
    R, M = S.copy(), W.T @ W
    total = np.trace(M @ S)
    keep, ratios, retained = [], [], 0.0
    for _ in range(count):
        res = np.diag(R).copy()
        eligible = res > rho + 1e-12 * np.trace(S) / C
        eligible[keep] = False
        gains = np.where(eligible, np.einsum("ij,ij->j", R, M @ R) / (res + rho), -np.inf)
        j = int(np.argmax(gains))
        r = R[:, j].copy()
        retained += r @ M @ r / (r[j] + rho)
        R -= np.outer(r, r) / (r[j] + rho)
        keep.append(j)
        ratios.append(retained / total)
    return keep, np.array(ratios)


@pytest.mark.parametrize("C,m,count", [(60, 12, 40), (50, 80, 30)])
def test_spectral_select_with_a_readout_matches_its_textbook_greedy(C, m, count):
    g = rng(C + m)
    F = g.standard_normal((3 * C, C // 2)) @ g.standard_normal((C // 2, C))
    S = F.T @ F / len(F)
    W = g.standard_normal((m, C))
    keep, ratios = linalg.spectral_select(S, count=count, readout=W)
    ref_keep, ref_ratios = brute_force_readout_greedy(S, W, count, linalg.SELECT_RIDGE)
    assert keep.tolist() == ref_keep
    np.testing.assert_allclose(ratios, ref_ratios, rtol=1e-9)
    # the identity read-out is the plain greedy, ratios included
    plain, plain_ratios = linalg.spectral_select(S, count=count)
    same, same_ratios = linalg.spectral_select(S, count=count, readout=np.eye(C))
    assert same.tolist() == plain.tolist()
    np.testing.assert_allclose(same_ratios, plain_ratios, rtol=1e-10)


def test_a_readout_keeps_the_channels_its_consumer_reads_first():
    """Independent channels, the loudest four unread (zero columns of W): the plain greedy keeps the
    loudest, the read-out greedy the four the consumer reads, and holds all of W's output with them."""
    scale = np.array([10.0, 9.0, 8.0, 7.0, 1.0, 1.5, 2.0, 2.5])
    S = np.diag(scale**2)
    W = np.zeros((3, 8))
    W[:, 4:] = rng(3).standard_normal((3, 4))
    assert sorted(linalg.spectral_select(S, count=4)[0].tolist()) == [0, 1, 2, 3]
    keep, ratios = linalg.spectral_select(S, count=4, readout=W)
    assert sorted(keep.tolist()) == [4, 5, 6, 7]
    assert ratios[-1] > 1 - 1e-4          # all but the ridge's share
    with pytest.raises(ValueError, match="readout"):
        linalg.spectral_select(S, count=4, readout=np.ones((3, 7)))


def test_dead_and_duplicate_channels_are_dropped_and_reconstructed_exactly():
    phi = channels_with_dead_and_duplicate()
    S = phi.T @ phi / len(phi)
    C = S.shape[0]
    keep, ratios = linalg.spectral_select(S, count=C - 2)
    assert set(range(C)) - set(keep.tolist()) == {3, 7}
    assert_finite(keep, ratios)
    assert ratios[-1] > 1 - 1e-5
    # alpha alone: stops once nothing informative is left
    keep_alpha, ratios_alpha = linalg.spectral_select(S, alpha=1.0)
    assert sorted(keep_alpha.tolist()) == sorted(keep.tolist())
    A = linalg.reconstruction_matrix(S, np.sort(keep))
    assert A.shape == (C, C - 2)
    assert_finite(A)
    J = np.sort(keep)
    np.testing.assert_array_equal(A[J], np.eye(C - 2))
    np.testing.assert_allclose(A[3], 0.0, atol=1e-12)
    np.testing.assert_allclose(A[7], A[2], atol=1e-10)
    residual = S - A @ S[np.ix_(J, J)] @ A.T
    assert np.abs(residual).max() < 1e-10 * np.abs(S).max()
    np.testing.assert_allclose(phi[:, J] @ A.T, phi, atol=1e-10 * np.abs(phi).max())
    # the plain ridge solution is exact up to O(ridge)
    A0 = linalg.reconstruction_matrix(S, J, refine=0)
    np.testing.assert_allclose(A0[7], A[7], atol=1e-4)
    assert np.abs(A0[7] - A[7]).max() > 1e-10
    # a count beyond the informative channels takes the rest deterministically, no NaN
    keep_all, ratios_all = linalg.spectral_select(S, count=C)
    assert sorted(keep_all.tolist()) == list(range(C)) and keep_all[-2:].tolist() == [3, 7]
    assert_finite(ratios_all)
    A_all = linalg.reconstruction_matrix(S, keep_all)
    assert_finite(A_all)


def test_retention_ratios_are_monotone_and_reach_one():
    g = rng(61)
    phi = np.maximum(g.standard_normal((500, 30)) @ g.standard_normal((30, 30)), 0.0)
    S = phi.T @ phi / 500
    keep, ratios = linalg.spectral_select(S, count=30)
    assert sorted(keep.tolist()) == list(range(30))
    assert np.all(np.diff(ratios) >= -1e-15)
    assert ratios[-1] == pytest.approx(1.0, abs=1e-4) and ratios[-1] <= 1.0
    for i in (0, 4, 17):
        assert math.isclose(ratios[i], linalg.retention_ratio(S, keep[: i + 1]), rel_tol=1e-9)
    # alpha: the first prefix that reaches it; both given: whichever first
    keep_a, ratios_a = linalg.spectral_select(S, alpha=0.9)
    assert ratios_a[-1] >= 0.9 and (len(ratios_a) == 1 or ratios_a[-2] < 0.9)
    assert keep_a.tolist() == keep[: len(keep_a)].tolist()
    assert len(linalg.spectral_select(S, alpha=0.9, count=2)[0]) == min(2, len(keep_a))
    # a fixed order is scored with the same ratios
    order = g.permutation(30)
    keep_o, ratios_o = linalg.spectral_select(S, count=6, order=order)
    assert keep_o.tolist() == order[:6].tolist()
    assert math.isclose(ratios_o[-1], linalg.retention_ratio(S, order[:6]), rel_tol=1e-9)
    assert ratios_o[-1] <= ratios[5] + 1e-12          # greedy beats a random order
    with pytest.raises(ValueError):
        linalg.spectral_select(S)
    with pytest.raises(ValueError):
        linalg.spectral_select(S, count=31)


def test_all_dead_channels_do_not_produce_nan():
    S = np.zeros((5, 5))
    keep, ratios = linalg.spectral_select(S, alpha=0.5)
    assert keep.tolist() == [0] and ratios.tolist() == [1.0]
    keep, ratios = linalg.spectral_select(S, count=3)
    assert keep.tolist() == [0, 1, 2]
    assert_finite(linalg.reconstruction_matrix(S, keep), ratios)
    assert linalg.retention_ratio(S, keep) == 1.0


# ---------------------------------------------------------------- MoMaSP


def planted_moments(C: int = 12, planted: int = 11, pair: tuple[int, int] = (9, 10)):
    """Independent target channels: 0-3 weak (variance 1), 4-11 nearly tied (about 2), the
    tie broken in favour of ``planted``, which has a large source/target mean shift; the
    channels of ``pair`` have a source/target covariance shift between them."""
    var = np.where(np.arange(C) < 4, 1.0, 2.0 + 0.001 * np.arange(C))
    var[planted] = var.max() + 0.01
    mean_t = np.zeros(C)
    mean_s = np.zeros(C)
    mean_s[planted] = 3.0
    cov_t = np.diag(var)
    cov_s = cov_t.copy()
    a, b = pair
    cov_s[a, b] = cov_s[b, a] = 2.0
    return np.diag(var), dict(mean_s=mean_s, mean_t=mean_t, cov_s=cov_s, cov_t=cov_t)


def test_momasp_with_zero_weight_is_spectral_select():
    phi = channels_with_dead_and_duplicate()
    S = phi.T @ phi / len(phi)
    g = rng(70)
    C = S.shape[0]
    moments = dict(mean_s=g.standard_normal(C), mean_t=phi.mean(0),
                   cov_s=np.cov(g.standard_normal((50, C)).T), cov_t=np.cov(phi.T))
    for kwargs in (dict(count=6), dict(alpha=0.95), dict(count=C)):
        expected = linalg.spectral_select(S, **kwargs)
        for reg in ("j", "J"):
            got = linalg.momasp_select(S, reg=reg, lam=0.0, **moments, **kwargs)
            assert got[0].tolist() == expected[0].tolist()
            np.testing.assert_array_equal(got[1], expected[1])


def test_momasp_regularisers_avoid_the_planted_channel():
    sigma, moments = planted_moments()
    plain, _ = linalg.spectral_select(sigma, count=4)
    assert plain.tolist() == [11, 10, 9, 8]                       # the most informative channels
    keep_j, ratios_j = linalg.momasp_select(sigma, reg="j", count=4, **moments)
    keep_big_j, _ = linalg.momasp_select(sigma, reg="J", count=4, **moments)
    assert_finite(ratios_j)
    assert 11 not in keep_j and 11 not in keep_big_j
    # Reg j penalises both channels of the shifted pair from the start; Reg J only once one
    # of them is kept, so it keeps one of them and the selections differ
    assert 9 not in keep_j and 10 not in keep_j
    assert len({9, 10} & set(keep_big_j.tolist())) == 1
    assert sorted(keep_j.tolist()) != sorted(keep_big_j.tolist())
    # the ratios stay the true retention of the chosen channels
    assert math.isclose(ratios_j[-1], linalg.retention_ratio(sigma, keep_j), rel_tol=1e-9)
    with pytest.raises(ValueError):
        linalg.momasp_select(sigma, reg="x", count=4, **moments)


def test_momasp_handles_dead_target_channels():
    phi = channels_with_dead_and_duplicate()
    S = phi.T @ phi / len(phi)
    C = S.shape[0]
    g = rng(71)
    source = np.maximum(g.standard_normal((300, C)) + 0.2, 0)
    for reg in ("j", "J"):
        keep, ratios = linalg.momasp_select(S, reg=reg, count=C, mean_s=source.mean(0), mean_t=phi.mean(0),
                                            cov_s=np.cov(source.T), cov_t=np.cov(phi.T))
        assert sorted(keep.tolist()) == list(range(C)) and keep[-2:].tolist() == [3, 7]
        assert_finite(ratios)


# ---------------------------------------------------------------- PFA


def test_pfa_counts_on_known_spectra():
    C = 16
    assert linalg.pfa_kl_count(np.full(C, 1.0 / C)) == C
    assert linalg.pfa_kl_count(np.eye(C)[0]) == 1
    assert linalg.pfa_kl_count(np.array([0.5, 0.5, 0.0, 0.0])) == 2        # KL = ln 2 = ln 4 / 2
    assert linalg.pfa_kl_count(np.array([3.0, 1.0])) == 2
    assert linalg.pfa_kl_count(np.zeros(4)) == 1
    spectrum = np.array([0.5, 0.3, 0.2])
    assert linalg.pfa_energy_count(spectrum, 0.8) == 2
    assert linalg.pfa_energy_count(spectrum, 0.81) == 3
    assert linalg.pfa_energy_count(spectrum, 1.0) == 3
    assert linalg.pfa_energy_count(np.array([1.0, 0.0, 0.0]), 1.0) == 1
    assert linalg.pfa_energy_count(spectrum, 0.1) == 1


def test_pfa_spectrum():
    g = rng(80)
    V = np.linalg.qr(g.standard_normal((5, 5)))[0]
    cov = V @ np.diag([3.0, 1.0, 0.0, 0.0, -1e-17]) @ V.T
    spectrum = linalg.pfa_spectrum(cov)
    np.testing.assert_allclose(spectrum, [0.75, 0.25, 0.0, 0.0, 0.0], atol=1e-12)
    assert np.all(spectrum >= 0) and math.isclose(spectrum.sum(), 1.0)
    assert np.all(linalg.pfa_spectrum(np.zeros((3, 3))) == 0)


def test_pfa_correlation_select_drops_dead_then_correlated():
    g = rng(81)
    C = 8
    responses = g.standard_normal((1000, C))
    responses[:, 0] = 1.0                                    # constant: inactive
    responses[:, 5] = 2.0 * responses[:, 3] + 1.0            # perfectly correlated with 3
    cov = np.cov(responses.T)
    assert linalg.pfa_correlation_select(cov, C - 1).tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert linalg.pfa_correlation_select(cov, C - 2).tolist() == [1, 2, 3, 4, 6, 7]
    kept = linalg.pfa_correlation_select(cov, 3)
    assert len(kept) == 3 and 0 not in kept and not {3, 5} <= set(kept.tolist())
    assert np.all(np.diff(kept) > 0)
    assert linalg.pfa_correlation_select(cov, C).tolist() == list(range(C))
    # exact ties: the higher index goes first
    assert linalg.pfa_correlation_select(np.eye(4), 2).tolist() == [0, 1]


def test_no_nan_on_degenerate_inputs():
    S = np.zeros((4, 4))
    W = np.ones((3, 4))
    A, B = linalg.dalr(W, S, 1)
    assert_finite(A, B)
    assert linalg.reconstruction_error(W, A, B, S) == 0.0
    with pytest.raises(NumericalError):
        linalg.truncated_svd(np.array([[np.nan, 1.0]]), 1)
    with pytest.raises(NumericalError):
        linalg.spectral_select(np.array([[np.nan]]), count=1)


def test_selection_survives_a_gram_indefinite_by_rounding():
    """A rank-deficient second moment whose float32 rounding puts eigenvalues below -rho
    (MobileNetV2 on 30 calibration images) made the greedy's residuals overflow and A_J's
    Cholesky fail; the ridge is raised until Sigma + rho I is definite."""
    rng = np.random.default_rng(0)
    C, r = 200, 120
    A = rng.standard_normal((C, r)) * np.exp(rng.normal(0, 1, (C, 1)))
    S = A @ A.T / r
    E = rng.standard_normal((C, C))
    E += E.T
    S += E * (3e-8 * np.trace(S) / np.linalg.norm(E, 2))            # rounding of float32 products
    assert np.linalg.eigvalsh(S).min() < -linalg.SELECT_RIDGE * np.trace(S) / C
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keep, ratios = linalg.spectral_select(S, count=C - 10)
        assert np.isfinite(ratios).all() and (np.diff(ratios) >= 0).all() and ratios[-1] > 0.9999
        assert linalg.retention_ratio(S, keep) == pytest.approx(ratios[-1], abs=1e-9)
        A_J = linalg.reconstruction_matrix(S, keep)
    assert np.isfinite(A_J).all() and np.abs(A_J).max() < 10
