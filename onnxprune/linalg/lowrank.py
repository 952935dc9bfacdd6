"""Low-rank splits W ~ A B: truncated SVD, DALR, affine DALR with a cross-validated ridge, and
how ranks are chosen (energy, one global threshold for a parameter budget).

A layer maps x (n) to y = W x + b with W (m x n); ``S = E[x x^T]`` is the uncentred second
moment of its inputs. Every ridge is relative: ``ridge`` means the shift ``ridge * trace(S) / n``.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg as sla

from onnxprune.linalg.common import (
    DEFAULT_RIDGE,
    _check_rank,
    _fix_signs,
    _matrix,
    _top_eigvecs,
)
from onnxprune.linalg.moments import SecondMoment, _as_moment


def truncated_svd(W, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-k approximation of W in Frobenius norm, from the weights alone.

    Parameters: W (m x n); rank k in [1, min(m, n)].
    Returns (A (m x k), B (k x n)), float64, with A = U_k (orthonormal columns, each with its
    largest-|.| entry positive) and B = diag(s_k) V_k^T, so W ~ A @ B.
    """
    W = _matrix(W, "weight")
    k = _check_rank(rank, *W.shape)
    try:
        U, s, Vt = sla.svd(W, full_matrices=False, check_finite=False)
    except sla.LinAlgError:
        U, s, Vt = sla.svd(W, full_matrices=False, check_finite=False, lapack_driver="gesvd")
    A = U[:, :k].copy()
    B = s[:k, None] * Vt[:k]
    _fix_signs(A, B)
    return A, B


def _dalr_basis(W: np.ndarray, stats: SecondMoment, k: int, shrink_to: str, lam: float) -> np.ndarray:
    if shrink_to == "weight":
        if math.isinf(lam):
            return truncated_svd(W, k)[0]
        M = stats.quad(W) + lam * (W @ W.T)
    elif stats.sample_space and k <= stats.count < W.shape[0]:
        # fewer samples than outputs: left singular vectors of Z = W X^T / sqrt(N) (m x N)
        # instead of an m x m eigenproblem
        Z = (W @ stats.rows.T) / math.sqrt(stats.count)
        try:
            U = sla.svd(Z, full_matrices=False, check_finite=False)[0]
        except sla.LinAlgError:
            U = sla.svd(Z, full_matrices=False, check_finite=False, lapack_driver="gesvd")[0]
        U = U[:, :k].copy()
        _fix_signs(U)
        return U
    else:
        M = stats.quad(W)
    return _top_eigvecs(M, k)[1]


def dalr(W, stats, rank: int, *, ridge: float = DEFAULT_RIDGE,
         shrink_to: str = "zero") -> tuple[np.ndarray, np.ndarray]:
    """Domain-adaptive low rank: W ~ A B minimising E||W x - A B x||^2 under S = E[x x^T].

    Parameters
    ----------
    W : (m x n) weight.
    stats : SecondMoment (or an n x n second-moment matrix) of the layer's inputs.
    rank : k in [1, min(m, n)].
    ridge : lam = ridge * trace(S) / n, >= 0.
    shrink_to : what the ridge pulls the approximation C = A B towards.
        "zero" (METHODS.md, DALR paper eq. 7-11): A = top-k eigenvectors of W S W^T,
        B = A^T W S (S + lam I)^-1. ridge=0 gives B = A^T W P with P the projector onto
        the span of the data (= A^T W when S is nonsingular).
        "weight": min tr((W - C)(S + lam I)(W - C)^T) over rank-k C, i.e. DALR under the
        second moment shrunk towards a multiple of I: A = top-k eigenvectors of
        W (S + lam I) W^T, B = A^T W. ridge=0 is DALR, ridge=inf the truncated SVD; in
        between it guards against over-fitting a small calibration set.

    Returns
    -------
    (A (m x k) with orthonormal, sign-fixed columns, B (k x n)), float64.
    """
    W = _matrix(W, "weight")
    stats = _as_moment(stats)
    m, n = W.shape
    if stats.n != n:
        raise ValueError(f"weight has {n} inputs but the second moment is {stats.n} wide")
    k = _check_rank(rank, m, n)
    if shrink_to not in ("zero", "weight"):
        raise ValueError(f"shrink_to={shrink_to!r} must be 'zero' or 'weight'")
    if not ridge >= 0 or (math.isinf(ridge) and shrink_to == "zero"):
        raise ValueError(f"ridge={ridge} must be >= 0 (and finite for shrink_to='zero')")
    lam = ridge * stats.scale
    A = _dalr_basis(W, stats, k, shrink_to, lam)
    if shrink_to == "weight":
        return A, A.T @ W
    return A, stats.smooth(A.T @ W, shift=lam)


def output_spectrum(W, stats=None) -> np.ndarray:
    """Energy per rank: the eigenvalues of W S W^T (or, with stats=None, of W W^T, i.e. the
    squared singular values), descending, clamped at 0, min(m, n) of them.

    spectrum[:k].sum() / spectrum.sum() is the fraction of E||W x||^2 (or ||W||_F^2) that the
    best rank-k DALR (SVD) approximation keeps.
    """
    W = _matrix(W, "weight")
    r = min(W.shape)
    if stats is None:
        s = sla.svd(W, compute_uv=False, check_finite=False)
        return s**2
    stats = _as_moment(stats)
    if stats.n != W.shape[1]:
        raise ValueError(f"weight has {W.shape[1]} inputs but the second moment is {stats.n} wide")
    if stats.sample_space and stats.count < W.shape[0]:
        Z = (W @ stats.rows.T) / math.sqrt(stats.count)              # (m x N), N < m
        values = sla.svd(Z, compute_uv=False, check_finite=False) ** 2
    else:
        values = sla.eigh(stats.quad(W), eigvals_only=True, check_finite=False)[::-1]
    out = np.zeros(r)
    take = min(r, values.size)
    out[:take] = np.maximum(values[:take], 0.0)
    return out


def reconstruction_error(W, A, B, stats, *, mean=None, bias_delta=None) -> float:
    """E||W x - A B x - delta||^2 / E||W x||^2 with the expectations under S.

    Parameters
    ----------
    W : (m x n); A : (m x k); B : (k x n); stats : SecondMoment (or n x n S).
    mean : (n,) input mean mu. Given without bias_delta, the bias is assumed compensated,
        delta = (W - A B) mu (``bias_correction``), which makes the error centred:
        tr(D C D^T) with D = W - A B and C = S - mu mu^T.
    bias_delta : (m,) a bias change delta applied to the approximation (needs ``mean``).

    Returns the relative error, >= 0 (0 when W x = 0 everywhere and so is the error, inf when
    only the error is nonzero). The numerator is tr(D S D^T) - 2 delta^T D mu + ||delta||^2.
    """
    W = _matrix(W, "weight")
    A = _matrix(A, "A")
    B = _matrix(B, "B")
    stats = _as_moment(stats)
    if A.shape[0] != W.shape[0] or B.shape[1] != W.shape[1] or A.shape[1] != B.shape[0]:
        raise ValueError(f"shapes do not chain: W {W.shape}, A {A.shape}, B {B.shape}")
    if stats.sample_space:
        X = stats.rows
        E = X @ W.T - (X @ B.T) @ A.T                     # (N x m): rows (D x_i)^T
        num = float(np.einsum("ij,ij->", E, E) / stats.count)
        den = stats.quad_trace(W)
    else:
        num = stats.quad_trace(W - A @ B)
        den = stats.quad_trace(W)
    if bias_delta is not None and mean is None:
        raise ValueError("bias_delta needs the input mean")
    if mean is not None:
        mu = _matrix(mean, "mean", ndim=1)
        d_mu = W @ mu - A @ (B @ mu)
        delta = d_mu if bias_delta is None else _matrix(bias_delta, "bias_delta", ndim=1)
        num += -2.0 * float(delta @ d_mu) + float(delta @ delta)
    num = max(num, 0.0)
    if den <= 0:
        return 0.0 if num <= 0 else math.inf
    return num / den


#: ridge "auto": relative ridges (lam / (trace(C) / n)) tried by cross-validation; inf is SVD + BC.
AUTO_GRID = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, math.inf)


#: ridge "auto": the largest ridge whose cross-validated error is within this fraction of the best.
AUTO_TOLERANCE = 0.05


def split_params(m: int, n: int, k: int) -> int:
    return k * (m + n)


def round_rank(k: int, multiple: int, limit: int) -> int:
    """``k`` rounded to the nearest multiple of ``multiple`` (at least one multiple), so the
    two factors' inner width fills whole SIMD channel blocks (onnxruntime's NCHWc convolutions
    work on 8 or 16 channels at a time); unchanged when ``multiple`` is 1 or the layer is
    narrower than one block, and never above ``limit`` (min(m, n))."""
    if multiple <= 1 or limit < multiple:
        return int(k)
    return int(min(limit, multiple * max(1, math.floor(k / multiple + 0.5))))   # halves round up


def rank_for_energy(spectrum: np.ndarray, energy: float) -> int:
    """Smallest k whose leading ``spectrum`` entries hold ``energy`` of the total."""
    total = spectrum.sum()
    if total <= 0:
        return 1
    cumulative = np.cumsum(spectrum) / total
    return int(min(np.searchsorted(cumulative, energy - 1e-12) + 1, len(spectrum)))


def global_ranks(spectra: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]], keep: float, *,
                 multiple: int = 1) -> dict[str, int]:
    """One energy threshold for all layers, the largest whose parameters fit ``keep`` of the total.

    A layer whose split would not save parameters stays dense (its full m n counts). With
    ``multiple`` the ranks are rounded (``round_rank``) before they are costed, so the
    rounded ranks fit the budget.
    """
    if keep >= 1:                      # everything kept: no layer is split (the data's rank is not a budget)
        return {name: min(shape) for name, shape in shapes.items()}
    budget = keep * sum(m * n for m, n in shapes.values())

    def cost(threshold: float) -> tuple[int, dict[str, int]]:
        ranks = {name: round_rank(rank_for_energy(s, threshold), multiple, min(shapes[name]))
                 for name, s in spectra.items()}
        total = sum(min(split_params(*shapes[name], k), shapes[name][0] * shapes[name][1])
                    for name, k in ranks.items())
        return total, ranks

    candidates = np.unique(np.concatenate(
        [np.cumsum(s) / max(s.sum(), 1e-300) for s in spectra.values()] + [np.array([0.0])]))
    lo, hi = 0, len(candidates) - 1
    best = cost(0.0)[1]
    while lo <= hi:
        mid = (lo + hi) // 2
        total, ranks = cost(float(candidates[mid]))
        if total <= budget:
            best, lo = ranks, mid + 1
        else:
            hi = mid - 1
    return best


def gated_metric(gram: np.ndarray, p: np.ndarray) -> np.ndarray:
    """E[D G D] for D = diag(g), g_i ~ Bernoulli(p_i) independent: the metric a downstream
    layer with W_next^T W_next = ``gram`` puts on errors that pass a gate (ReLU, clip) open
    with probability p: G o (p p^T) + diag(diag(G) (p - p^2))."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    M = gram * np.outer(p, p)
    M[np.diag_indices_from(M)] += np.diag(gram) * (p - p * p)
    return M


def open_probability(mean: np.ndarray, var: np.ndarray, low: float = 0.0, high: float = math.inf) -> np.ndarray:
    """P(low < y < high) for y ~ N(mean, var), per unit: the chance a ReLU (Clip) passes an error."""
    from scipy.special import ndtr

    sd = np.sqrt(np.maximum(var, 0.0))
    tiny = sd <= 1e-12 * np.maximum(np.abs(mean), 1.0)
    sd = np.where(tiny, 1.0, sd)
    upper = ndtr((high - mean) / sd) if math.isfinite(high) else 1.0
    p = upper - ndtr((low - mean) / sd)
    exact = ((mean > low) & (mean < high)).astype(np.float64)
    return np.where(tiny, exact, p)


def _top(K: np.ndarray, k: int) -> np.ndarray:
    """Top-k eigenvectors (r x k) of the symmetric r x r matrix K (any orthonormal basis of
    their span: only the subspace matters here)."""
    r = K.shape[0]
    if k >= r:
        return np.eye(r)
    K = 0.5 * (K + K.T)
    try:
        if 8 * k < r:      # a few vectors: MRRR on the subset; many: divide and conquer, all of them
            return sla.eigh(K, subset_by_index=[r - k, r - 1], driver="evr", check_finite=False)[1]
        return sla.eigh(K, driver="evd", check_finite=False)[1][:, r - k:]
    except (sla.LinAlgError, ValueError):
        return sla.eigh(K, driver="ev", check_finite=False)[1][:, r - k:]


def affine_low_rank(w: np.ndarray, rank: int, folds: list[tuple[SecondMoment, np.ndarray]], *,
                    metric=None, grid=AUTO_GRID, tolerance: float = AUTO_TOLERANCE
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Affine DALR, W x ~ A B x + delta, with its ridge chosen by cross-validation.

    For a ridge lam (relative to trace(C)/n, C the centred input covariance):
    A = top-k eigenvectors of W (C + lam I) W^T, B = A^T W, delta = (W - A B) mu. lam = 0
    minimises E||W x - A B x - delta||^2 on the data (centred DALR with its optimal bias);
    lam -> inf gives SVD + bias compensation; in between, C is shrunk towards a multiple
    of I, which guards against over-fitting few calibration samples.

    ``folds`` are (second moment, mean) of F >= 2 disjoint folds whose union is the whole
    calibration set. Each fold is held out once (the fit uses the others) and the pooled
    held-out error E||e||_M^2 / E||W x||_M^2, e = W x - A B x - delta, scores every ridge of
    ``grid``. ``metric`` M (m x m, PSD) weighs output errors by their effect downstream
    (see ``downstream_metric``), or is a function of (E[W x], Var[W x]) (m,) returning it;
    None is the identity, the plain output error.
    The choice is the largest ridge within ``tolerance`` (relative) of the best error: a
    less regularised fit must be clearly better to be taken. The factors are then refitted
    on all folds with that ridge scaled by N_fit / N (a fixed prior's relative weight falls
    like 1/N).

    Everything runs in an r = min(m, n) dimensional basis U of W's range (W = U P; U = I
    when m <= n): one r x r projection P S_f P^T per fold, one r x r eigenproblem per fold
    and ridge and one for the refit; no n x n factorisation.

    Returns (A (m x k), B (k x n), delta (m,), info).
    """
    m, n = w.shape
    if m <= n:
        U, P = None, w                                     # W = I W
    else:
        U, P = sla.qr(w, mode="economic", check_finite=False)          # W = U R, R (n x n)
    r = P.shape[0]
    k = min(int(rank), r)
    G = P @ P.T                                            # W W^T in the basis
    counts = np.array([moment.count for moment, _ in folds], dtype=np.float64)
    Ks = np.stack([moment.quad(P) for moment, _ in folds])          # E_f[(P x)(P x)^T]
    zs = np.stack([P @ mean for _, mean in folds])                   # E_f[P x]
    mus = np.stack([mean for _, mean in folds])
    traces = np.array([moment.trace for moment, _ in folds])         # E_f||x||^2
    F = len(folds)
    if callable(metric):
        z = counts @ zs / counts.sum()
        Kc = np.tensordot(counts, Ks, axes=1) / counts.sum() - np.outer(z, z)
        if U is None:
            metric = metric(z, np.maximum(np.diag(Kc), 0.0))
        else:
            metric = metric(U @ z, np.maximum(np.einsum("ij,jk,ik->i", U, Kc, U), 0.0))
    if metric is None:
        M = None
    else:
        M = metric if U is None else U.T @ metric @ U
        M = 0.5 * (M + M.T)

    def part(weights: np.ndarray):
        """(centred K, z, scale) of the union of the folds with weight 1."""
        c = weights * counts
        nc = c.sum()
        K = np.tensordot(c, Ks, axes=1) / nc
        z = c @ zs / nc
        mu = c @ mus / nc
        scale = max(float(c @ traces / nc - mu @ mu), 0.0) / n
        return K - np.outer(z, z), z, scale if scale > 0 else 1.0

    grid = [float(g) for g in grid]
    svd_basis = _top(G, k) if any(math.isinf(g) for g in grid) else None

    def basis(Kc: np.ndarray, lam: float) -> np.ndarray:
        return svd_basis if math.isinf(lam) else _top(Kc + lam * G, k)

    num = np.zeros(len(grid))
    den = 0.0
    for f in range(F):
        Kc, z_fit, scale = part(np.arange(F) != f)
        K_h, z_h = Ks[f], zs[f]
        energy = float(np.einsum("ij,ij->", K_h, M)) if M is not None else float(np.trace(K_h))
        den += counts[f] * energy
        for i, ridge in enumerate(grid):
            Q = basis(Kc, ridge * scale)
            z_perp = z_fit - Q @ (Q.T @ z_fit)            # delta, in the basis
            KQ = K_h @ Q
            if M is None:
                # E||(I - Q Q^T)(P x) - delta||^2
                err = (energy - np.einsum("ij,ij->", Q, KQ)
                       - 2.0 * float(z_perp @ z_h) + float(z_perp @ z_fit))
            else:
                # E||(I - Q Q^T)(P x) - delta||_M^2 with tr(M Pq K Pq) expanded, Pq = I - Q Q^T
                MQ = M @ Q
                Mz = M @ z_perp
                Mz_perp_q = Mz - Q @ (Q.T @ Mz)           # Pq M delta
                err = (energy - 2.0 * np.einsum("ij,ij->", MQ, KQ) + np.einsum("ij,ij->", Q.T @ MQ, Q.T @ KQ)
                       - 2.0 * float(Mz_perp_q @ z_h) + float(z_perp @ Mz))
            num[i] += counts[f] * max(err, 0.0)
    errors = num / den if den > 0 else np.zeros(len(grid))
    best = float(errors.min())
    chosen = max(i for i in range(len(grid)) if errors[i] <= best * (1.0 + tolerance) + 1e-15)
    ridge = grid[chosen] * (F - 1) / F

    Kc, z, scale = part(np.ones(F, dtype=bool))
    Q = basis(Kc, ridge * scale)
    B = Q.T @ P
    A = Q if U is None else U @ Q
    flip = A[np.argmax(np.abs(A), axis=0), np.arange(k)] < 0     # deterministic signs
    A[:, flip] *= -1.0
    B[flip] *= -1.0
    delta = z - Q @ (Q.T @ z)
    if U is not None:
        delta = U @ delta
    label = "svd+bias" if math.isinf(ridge) else f"dalr+bias (ridge {ridge:.6g})"
    # ridge inf (the SVD + bias limit) is null in JSON reports, with "chosen" saying so
    info = {"chosen": label, "ridge": float(ridge),
            "cv_error": float(errors[chosen]), "cv_best": best,
            "cv_errors": {("inf" if math.isinf(g) else f"{g:.6g}"): float(e) for g, e in zip(grid, errors)}}
    return A, B, delta, info
