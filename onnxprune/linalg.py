"""Pure numerics for onnxprune: low-rank splits, spectral channel selection, PFA recipes.

scipy.linalg style: pure functions, arrays in and arrays out, float64 inside, options
keyword-only. Solves use ``cho_solve``/``eigh``/``svd``, never an explicit inverse. Every
ridge is scale-free: a ``ridge`` argument means the shift ``ridge * trace(S) / n``.
Results are deterministic: eigen- and singular vectors have their largest-magnitude entry
positive (the first such entry on exact ties), and greedy selections break exact ties
towards the lowest channel index. Ill-conditioning either raises ``NumericalError`` or
warns (``RuntimeWarning``) with the condition number; no function returns NaN.

Notation (METHODS.md): a layer maps x (n) to y = W x + b with W (m x n). ``S = E[x x^T]``
is the uncentred second moment of the inputs; ``Sigma = E[phi phi^T]`` that of a site's
channels (C of them).

Contents
--------
SecondMoment            S as an n x n matrix or as sample rows X (N x n), S = X^T X / N
truncated_svd           W ~ A B from the weights alone
dalr                    W ~ A B minimising E||W x - A B x||^2 under S (DALR)
output_spectrum         eigenvalues of W S W^T (or W W^T): the energy curve that picks ranks
reconstruction_error    E||W x - A B x - delta||^2 / E||W x||^2
select_ridge            the DALR ridge with the lowest held-out error
best_low_rank           DALR (ridge chosen on held-out data) or SVD, whichever generalises
bias_correction         (W - A B) mean: keeps the mean output exact
spectral_select         greedy channel subset maximising the retained trace (spectral pruning)
momasp_select           the same with the MoMaSP source/target moment-matching regulariser
retention_ratio         Tr(Sigma_FJ (Sigma_JJ + rho I)^-1 Sigma_JF) / Tr(Sigma)
reconstruction_matrix   A_J with phi ~ A_J phi_J (to fold into the next layer)
pfa_spectrum, pfa_energy_count, pfa_kl_count, pfa_correlation_select: PFA recipes
blas_threads            context manager: BLAS threads for the library's numerics (default 1)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import threading
import warnings
from collections.abc import Sequence

import numpy as np
import scipy.linalg as sla

from onnxprune.errors import NumericalError

__all__ = [
    "DEFAULT_RIDGE",
    "DEFAULT_RIDGE_GRID",
    "SELECT_RIDGE",
    "SecondMoment",
    "best_low_rank",
    "bias_correction",
    "dalr",
    "momasp_select",
    "output_spectrum",
    "pfa_correlation_select",
    "pfa_energy_count",
    "pfa_kl_count",
    "pfa_spectrum",
    "reconstruction_error",
    "reconstruction_matrix",
    "retention_ratio",
    "select_ridge",
    "spectral_select",
    "truncated_svd",
]

#: DALR ridge relative to trace(S)/n. For the paper's form (``shrink_to="zero"``) the
#: held-out error only grows with the ridge, so this is a numerical safeguard: it bounds
#: cond(S + lam I) by 1 + n / ridge while changing B by O(ridge) in well-sampled directions.
DEFAULT_RIDGE = 1e-4

#: Ridges (relative to trace(S)/n) tried by ``select_ridge``. The last, very large value
#: makes ``shrink_to="weight"`` DALR indistinguishable from the truncated SVD.
DEFAULT_RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 100.0, 1e8)

#: Ridge of the channel-selection solves, relative to trace(Sigma)/C.
SELECT_RIDGE = 1e-6

_EPS = np.finfo(np.float64).eps
_COND_WARN = 1e12          # warn when a factorised matrix is at least this ill-conditioned
_DEAD = 1e-12              # a residual variance below _DEAD * trace / C counts as zero


# --------------------------------------------------------------------------------------
# small helpers


#: environment variable overriding the BLAS thread count (0: leave BLAS as it is)
BLAS_THREADS_ENV = "ONNXPRUNE_BLAS_THREADS"


_blas_lock = threading.Lock()
_blas_state = {"depth": 0, "limiter": None}


@contextlib.contextmanager
def blas_threads(limit: int | None = None):
    """Run the enclosed numerics with ``limit`` BLAS threads (default: ``$ONNXPRUNE_BLAS_THREADS``,
    else 1; 0 leaves BLAS untouched), via threadpoolctl.

    One thread is the default because it was measured to pay on a shared CPU: on 2 cores
    with other work running, eigh + Cholesky solve + product of a 512 x 512 matrix took
    0.23 s with one OpenBLAS thread and 7.6 s with two (2048: 5.8 s against 28 s), and the
    LeNet DALR compress 7 s against 28 s; OpenBLAS's spinning threads lose whenever the cores
    are not idle. On a dedicated many-core machine set ONNXPRUNE_BLAS_THREADS to the core count.

    BLAS's thread count is process-wide: the limit is set when the first of any concurrent
    users (threads, e.g. Dask workers in one process) enters and restored when the last one
    leaves, so no computation ever runs with the setting changing under it (a changing
    thread count changes float rounding, and results must be reproducible).
    """
    if limit is None:
        text = os.environ.get(BLAS_THREADS_ENV, "1").strip()
        try:
            limit = int(text)
        except ValueError:
            raise NumericalError(BLAS_THREADS_ENV, f"must be an integer, not {text!r}") from None
    if limit <= 0:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:             # an optional speed-up: without it BLAS keeps its own setting
        yield
        return
    with _blas_lock:
        if _blas_state["depth"] == 0:
            _blas_state["limiter"] = threadpool_limits(limits=int(limit), user_api="blas")
        _blas_state["depth"] += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_state["depth"] -= 1
            if _blas_state["depth"] == 0:
                _blas_state["limiter"].restore_original_limits()
                _blas_state["limiter"] = None


def _matrix(a, name: str, *, ndim: int = 2) -> np.ndarray:
    """``a`` as a finite float64 array of ``ndim`` dimensions (no copy when it already is)."""
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise NumericalError(name, "contains NaN or Inf", hint="check the model weights and calibration data")
    return arr


def _symmetric(a, name: str) -> np.ndarray:
    arr = _matrix(a, name)
    if arr.shape[0] != arr.shape[1]:
        raise ValueError(f"{name} must be square, got shape {arr.shape}")
    return 0.5 * (arr + arr.T)


def _finite(arr: np.ndarray, name: str) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise NumericalError(name, "came out non-finite (the problem is too ill-conditioned)",
                             hint="increase the ridge or collect more calibration samples")
    return arr


def _fix_signs(U: np.ndarray, *others: np.ndarray) -> None:
    """In place: flip columns of U so each has its largest-|.| entry positive; flip the
    matching rows of every array in ``others`` (which keeps U @ other unchanged)."""
    if U.size == 0:
        return
    pivot = np.argmax(np.abs(U), axis=0)
    flip = U[pivot, np.arange(U.shape[1])] < 0
    U[:, flip] *= -1.0
    for other in others:
        other[flip] *= -1.0


def _top_eigvecs(M: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(values (k,) descending, vectors (m x k) sign-fixed) of the symmetric matrix M."""
    m = M.shape[0]
    if k == 0:
        return np.zeros(0), np.zeros((m, 0))
    try:
        vals, vecs = sla.eigh(M, subset_by_index=[m - k, m - 1], check_finite=False)
    except (sla.LinAlgError, ValueError):
        vals, vecs = sla.eigh(M, driver="ev", check_finite=False)
        vals, vecs = vals[m - k:], vecs[:, m - k:]
    vals, vecs = vals[::-1].copy(), vecs[:, ::-1].copy()
    _fix_signs(vecs)
    return vals, vecs


def _cho(M: np.ndarray, what: str):
    """Cholesky factor of the SPD matrix M; NumericalError if it is not, a warning with
    (a lower bound of) the condition number if it is nearly singular."""
    try:
        factor = sla.cho_factor(M, lower=True, check_finite=False)
    except sla.LinAlgError as exc:
        raise NumericalError(what, "is not positive definite (the ridge is below its rounding errors)",
                             hint="increase the ridge") from exc
    diag = np.abs(np.diag(factor[0]))
    cond = (diag.max() / diag.min()) ** 2 if diag.size and diag.min() > 0 else math.inf
    if cond > _COND_WARN:
        warnings.warn(f"{what} | ill-conditioned, condition number >= {cond:.3g}; the solve may be "
                      f"inaccurate. Hint: increase the ridge", RuntimeWarning, stacklevel=3)
    return factor


def _check_rank(rank, m: int, n: int) -> int:
    k = int(rank)
    if k != rank or not 1 <= k <= min(m, n):
        raise ValueError(f"rank={rank} must be an integer in [1, min(m, n) = {min(m, n)}]")
    return k


# --------------------------------------------------------------------------------------
# second moment


@dataclasses.dataclass(frozen=True, eq=False)
class SecondMoment:
    """The uncentred second moment S = E[x x^T] (n x n) of a layer's inputs.

    Held either as the matrix S itself (``matrix``) or, for inputs wider than the number of
    samples, as the raw samples X (N x n) with S = X^T X / N (``rows``; sample space). The
    methods never form an n x n matrix in sample space when N < n; with N >= n rows are
    folded into S on first use, which is cheaper.

    Build with ``SecondMoment.from_gram(gram, count)`` or ``SecondMoment.from_rows(X)``.
    """

    matrix: np.ndarray | None = None     # S (n x n), symmetric
    rows: np.ndarray | None = None       # X (N x n), S = X^T X / N
    count: float = 1.0                   # number of samples behind S

    def __post_init__(self):
        if (self.matrix is None) == (self.rows is None):
            raise ValueError("SecondMoment needs exactly one of matrix and rows")
        if self.matrix is not None:
            object.__setattr__(self, "matrix", _symmetric(self.matrix, "second moment"))
        else:
            rows = _matrix(self.rows, "calibration rows")
            if rows.shape[0] < 1:
                raise ValueError("SecondMoment.from_rows needs at least one sample")
            object.__setattr__(self, "rows", rows)
            object.__setattr__(self, "count", float(rows.shape[0]))
        if not self.count > 0:
            raise ValueError(f"count={self.count} must be positive")

    @classmethod
    def from_gram(cls, gram, count) -> SecondMoment:
        """S = gram / count from an accumulated Gram matrix sum_i x_i x_i^T (n x n)."""
        if not count > 0:
            raise ValueError(f"count={count} must be positive")
        return cls(matrix=_matrix(gram, "Gram matrix") / float(count), count=float(count))

    @classmethod
    def from_rows(cls, rows) -> SecondMoment:
        """S = X^T X / N from the samples X (N x n), kept as they are (sample space)."""
        return cls(rows=rows)

    @property
    def n(self) -> int:
        """Number of features."""
        return (self.matrix if self.matrix is not None else self.rows).shape[1]

    @property
    def sample_space(self) -> bool:
        """True when computations run on the N x n samples (N < n) instead of S."""
        return self.rows is not None and self.rows.shape[0] < self.rows.shape[1]

    @functools.cached_property
    def _S(self) -> np.ndarray:
        if self.matrix is not None:
            return self.matrix
        if self.sample_space:
            raise AssertionError("an n x n matrix is never formed in sample space")
        return (self.rows.T @ self.rows) / self.count

    @functools.cached_property
    def trace(self) -> float:
        """trace(S) = E||x||^2."""
        if self.rows is not None:
            return float(np.einsum("ij,ij->", self.rows, self.rows) / self.count)
        return float(np.trace(self.matrix))

    @property
    def scale(self) -> float:
        """trace(S) / n: the unit that ridges are measured in (1 when S is zero)."""
        value = self.trace / self.n
        return value if value > 0 else 1.0

    def matmul(self, M) -> np.ndarray:
        """S @ M for M (n,) or (n x p)."""
        M = np.asarray(M, dtype=np.float64)
        if self.sample_space:
            return self.rows.T @ (self.rows @ M) / self.count
        return self._S @ M

    def quad(self, M) -> np.ndarray:
        """M S M^T (p x p) for M (p x n)."""
        M = np.asarray(M, dtype=np.float64)
        if self.sample_space:
            Z = M @ self.rows.T
            out = Z @ Z.T / self.count
        else:
            out = M @ self._S @ M.T
        return 0.5 * (out + out.T)

    def quad_trace(self, M) -> float:
        """tr(M S M^T) = E||M x||^2 for M (p x n)."""
        M = np.asarray(M, dtype=np.float64)
        if self.sample_space:
            Z = self.rows @ M.T
            return float(np.einsum("ij,ij->", Z, Z) / self.count)
        return float(np.einsum("ij,ij->", M @ self._S, M))

    def solve(self, Y, *, shift: float) -> np.ndarray:
        """(S + shift I)^-1 Y for Y (n,) or (n x p), shift > 0 (Woodbury in sample space:
        (S + lam I)^-1 = (I - X^T (X X^T + N lam I)^-1 X) / lam)."""
        if not shift > 0:
            raise ValueError(f"shift={shift} must be positive")
        Y = np.asarray(Y, dtype=np.float64)
        if self.sample_space:
            X = self.rows
            K = X @ X.T
            K[np.diag_indices_from(K)] += self.count * shift
            inner = sla.cho_solve(_cho(K, "X X^T + N lam I"), X @ Y, check_finite=False)
            return _finite((Y - X.T @ inner) / shift, "(S + lam I)^-1 Y")
        K = self._S.copy()
        K[np.diag_indices_from(K)] += shift
        return _finite(sla.cho_solve(_cho(K, "S + lam I"), Y, check_finite=False), "(S + lam I)^-1 Y")

    def smooth(self, M, *, shift: float) -> np.ndarray:
        """M S (S + shift I)^-1 for M (p x n): the ridge-regression map of DALR's B.

        Sample space uses the push-through identity S (S + lam I)^-1 = X^T (X X^T +
        N lam I)^-1 X. ``shift=0`` gives M P with P the orthogonal projector onto the span
        of the data (pseudo-inverse, eigenvalues below ~1e-12 of the largest count as
        zero); a warning names the rank when S is singular.
        """
        M = np.asarray(M, dtype=np.float64)
        if shift < 0:
            raise ValueError(f"shift={shift} must be >= 0")
        if shift == 0:
            return self._project(M)
        if self.sample_space:
            X = self.rows
            K = X @ X.T
            K[np.diag_indices_from(K)] += self.count * shift
            out = (M @ X.T) @ sla.cho_solve(_cho(K, "X X^T + N lam I"), X, check_finite=False)
            return _finite(out, "M S (S + lam I)^-1")
        K = self._S.copy()
        K[np.diag_indices_from(K)] += shift
        # M S (S + lam I)^-1 = M - lam M (S + lam I)^-1: exact as lam -> 0 for full-rank S
        out = M - shift * sla.cho_solve(_cho(K, "S + lam I"), M.T, check_finite=False).T
        return _finite(out, "M S (S + lam I)^-1")

    def _project(self, M: np.ndarray) -> np.ndarray:
        n = self.n
        if self.sample_space:
            _, s, Vt = sla.svd(self.rows, full_matrices=False, check_finite=False)
            values, basis = s**2 / self.count, Vt.T
        else:
            values, basis = sla.eigh(self._S, check_finite=False)
        top = values.max(initial=0.0)
        keep = values > max(1e-12, 100 * n * _EPS) * top
        rank = int(keep.sum())
        if rank < n:
            cond = top / values[keep].min() if rank else math.inf
            warnings.warn(f"second moment | singular: rank {rank} < n = {n} (condition number of the "
                          f"kept part {cond:.3g}); with ridge=0 the factor ignores the directions the "
                          f"calibration data never visits. Hint: use a ridge > 0 or more samples",
                          RuntimeWarning, stacklevel=4)
        Q = basis[:, keep]
        return (M @ Q) @ Q.T


def _as_moment(stats) -> SecondMoment:
    if isinstance(stats, SecondMoment):
        return stats
    return SecondMoment(matrix=stats)


# --------------------------------------------------------------------------------------
# low rank


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


def _heldout_errors(W, held_out: SecondMoment, candidates) -> list[float]:
    """Relative held-out errors of (A, E = A^T W - B or None) pairs, A orthonormal:
    E||W x - A B x||^2 = tr(H) - tr(A^T H A) + tr(E S_h E^T) with H = W S_h W^T."""
    H = held_out.quad(W)
    den = float(np.trace(H))
    out = []
    for A, E in candidates:
        num = den - float(np.einsum("ij,ij->", A, H @ A))
        if E is not None:
            num += held_out.quad_trace(E)
        num = max(num, 0.0)
        out.append(num / den if den > 0 else (0.0 if num <= 0 else math.inf))
    return out


def _ridge_curve(W, rank, fit, held_out, grid, shrink_to) -> list[float]:
    W = _matrix(W, "weight")
    fit, held_out = _as_moment(fit), _as_moment(held_out)
    m, n = W.shape
    if fit.n != n or held_out.n != n:
        raise ValueError(f"weight has {n} inputs but the second moments are {fit.n} and {held_out.n} wide")
    k = _check_rank(rank, m, n)
    grid = [float(r) for r in grid]
    if not grid or any(not r >= 0 for r in grid):
        raise ValueError(f"grid={grid} must be a non-empty sequence of ridges >= 0")
    if shrink_to == "zero":
        if any(math.isinf(r) for r in grid):
            raise ValueError("an infinite ridge is only meaningful with shrink_to='weight'")
        A = _dalr_basis(W, fit, k, "zero", 0.0)
        AW = A.T @ W
        cands = [(A, AW - fit.smooth(AW, shift=r * fit.scale)) for r in grid]
    elif shrink_to == "weight":
        cands = [(_dalr_basis(W, fit, k, "weight", r * fit.scale), None) for r in grid]
    else:
        raise ValueError(f"shrink_to={shrink_to!r} must be 'zero' or 'weight'")
    return _heldout_errors(W, held_out, cands)


def select_ridge(W, rank: int, fit, held_out, *, grid: Sequence[float] = DEFAULT_RIDGE_GRID,
                 shrink_to: str = "zero") -> float:
    """The ridge (relative to trace(S)/n) whose DALR, fitted on ``fit``, has the lowest
    reconstruction error on ``held_out``.

    Parameters: W (m x n); rank k; fit, held_out: SecondMoment of two disjoint sample sets;
    grid: candidate ridges (>= 0; inf allowed with shrink_to="weight" and means SVD);
    shrink_to: as in ``dalr``. Exact ties go to the larger ridge.

    With shrink_to="zero" (the paper's ridge) the held-out error practically only grows with
    the ridge, so the smallest ridge wins; over-fitting a small calibration set is then
    guarded by ``best_low_rank`` falling back to the SVD. With shrink_to="weight" the ridge
    interpolates between DALR and SVD and grows as the fit set shrinks.
    """
    errors = _ridge_curve(W, rank, fit, held_out, grid, shrink_to)
    grid = [float(r) for r in grid]
    best = min(range(len(grid)), key=lambda i: (errors[i], -grid[i]))
    return grid[best]


_LOW_RANK_METHODS = {"dalr": "zero", "dalr-weight": "weight", "svd": None}


def best_low_rank(W, rank: int, fit, held_out, *, methods: Sequence[str] = ("dalr", "svd"),
                  grid: Sequence[float] = DEFAULT_RIDGE_GRID) -> tuple[np.ndarray, np.ndarray, dict]:
    """The rank-k factorisation, among ``methods``, with the lowest held-out error.

    Parameters: W (m x n); rank k; fit, held_out: SecondMoment of disjoint sample sets;
    methods: any of "dalr" (``dalr`` with shrink_to="zero", ridge chosen on held_out),
    "dalr-weight" (shrink_to="weight", ridge chosen on held_out) and "svd"; grid: ridges.

    Returns (A (m x k), B (k x n), info) with A, B fitted on ``fit`` and info =
    {"method": the winner, "ridge": its ridge (None for svd), "shrink_to": "zero" |
    "weight" | None, "held_out_error": its error, "errors": {method: held-out error}}.
    Exact ties go to the method listed first. Refit the winner on all the data with
    ``dalr(W, stats, k, ridge=info["ridge"], shrink_to=info["shrink_to"])``.
    """
    if not methods or any(m not in _LOW_RANK_METHODS for m in methods):
        raise ValueError(f"methods={tuple(methods)} must be a non-empty subset of {tuple(_LOW_RANK_METHODS)}")
    W = _matrix(W, "weight")
    fit, held_out = _as_moment(fit), _as_moment(held_out)
    grid = [float(r) for r in grid]
    results = {}
    for method in dict.fromkeys(methods):
        shrink_to = _LOW_RANK_METHODS[method]
        if shrink_to is None:
            A, B = truncated_svd(W, rank)
            err = _heldout_errors(W, held_out, [(A, A.T @ W - B)])[0]
            results[method] = (err, None)
        else:
            usable = [r for r in grid if not (math.isinf(r) and shrink_to == "zero")]
            curve = _ridge_curve(W, rank, fit, held_out, usable, shrink_to)
            i = min(range(len(usable)), key=lambda j: (curve[j], -usable[j]))
            results[method] = (curve[i], usable[i])
    winner = min(results, key=lambda name: results[name][0])
    err, ridge = results[winner]
    shrink_to = _LOW_RANK_METHODS[winner]
    if shrink_to is None:
        A, B = truncated_svd(W, rank)
    else:
        A, B = dalr(W, fit, rank, ridge=ridge, shrink_to=shrink_to)
    info = {"method": winner, "ridge": ridge, "shrink_to": shrink_to, "held_out_error": err,
            "errors": {name: value[0] for name, value in results.items()}}
    return A, B, info


def bias_correction(W, A, B, mean) -> np.ndarray:
    """delta_b (m,) = (W - A B) mean, so b_hat = b + delta_b makes the approximated layer's
    mean output exact (SVD + BC of the DALR paper, eq. 4). W (m x n), A (m x k), B (k x n),
    mean (n,)."""
    W = _matrix(W, "weight")
    mu = _matrix(mean, "mean", ndim=1)
    return W @ mu - _matrix(A, "A") @ (_matrix(B, "B") @ mu)


# --------------------------------------------------------------------------------------
# spectral channel selection


def _check_stop(alpha, count, C: int) -> tuple[float | None, int | None]:
    if alpha is None and count is None:
        raise ValueError("give alpha (retention target), count (channels to keep), or both")
    if alpha is not None and not 0 < alpha <= 1:
        raise ValueError(f"alpha={alpha} must be in (0, 1]")
    if count is not None:
        if int(count) != count or not 1 <= count <= C:
            raise ValueError(f"count={count} must be an integer in [1, {C}]")
        count = int(count)
    return alpha, count


class _MomentMatching:
    """MoMaSP regulariser R for every candidate; ``add`` updates it when a channel is kept."""

    def __init__(self, mean_s, mean_t, cov_s, cov_t, reg: str, C: int):
        mu_s, mu_t = _matrix(mean_s, "mean_s", ndim=1), _matrix(mean_t, "mean_t", ndim=1)
        cs, ct = _symmetric(cov_s, "cov_s"), _symmetric(cov_t, "cov_t")
        if not (mu_s.shape == mu_t.shape == (C,) and cs.shape == ct.shape == (C, C)):
            raise ValueError(f"source/target moments must be ({C},) and ({C}, {C})")
        var = np.maximum(np.diag(ct), 0.0)
        floor = _DEAD * (var.mean() if var.mean() > 0 else 1.0)
        s = np.maximum(var, floor) ** -0.25                 # S_ij = s_i s_j = (Ct_ii Ct_jj)^(-1/4)
        scaled = (s[:, None] * (cs - ct)) * s[None, :]
        self.reg = reg
        self.dmu2 = (mu_s - mu_t) ** 2
        if reg == "j":                                       # eq. 4, once
            self.fixed = np.sqrt(self.dmu2) + np.sqrt(np.einsum("ij,ij->i", scaled, scaled))
        elif reg == "J":                                     # eq. 3, per candidate J + {j}
            self.E = scaled**2
            self.mean_part = 0.0                             # sum_{i in J} dmu_i^2
            self.block = 0.0                                 # ||M_JJ||_F^2
            self.cross = np.zeros(C)                         # sum_{i in J} M_ij^2
        else:
            raise ValueError(f"reg={reg!r} must be 'J' or 'j'")

    def values(self) -> np.ndarray:
        if self.reg == "j":
            return self.fixed
        return (np.sqrt(self.mean_part + self.dmu2)
                + np.sqrt(np.maximum(self.block + 2.0 * self.cross + np.diag(self.E), 0.0)))

    def add(self, j: int) -> None:
        if self.reg == "J":
            self.mean_part += self.dmu2[j]
            self.block += 2.0 * self.cross[j] + self.E[j, j]
            self.cross += self.E[j]


def _square(a, name: str) -> np.ndarray:
    """``a`` as a square float64 array, not copied, not symmetrised (only rows are read)."""
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {arr.shape}")
    return arr


def _square_of_symmetric(S: np.ndarray) -> np.ndarray:
    """T = S @ S for symmetric S (C x C): one SYRK (half a GEMM), then the lower triangle
    is filled block by block, so T[:, j] (= row j) is contiguous."""
    T = sla.blas.dsyrk(1.0, S, trans=1)          # Fortran-ordered upper triangle of S^T S
    C, block = T.shape[0], 256
    for i in range(0, C, block):
        diag = T[i:i + block, i:i + block]
        diag[...] = np.triu(diag) + np.triu(diag, 1).T
        for j in range(i + block, C, block):
            T[j:j + block, i:i + block] = T[i:i + block, j:j + block].T
    return T


def _greedy(sigma, *, alpha, count, ridge, order=None, regulariser=None, lam=0.0):
    """Greedy maximisation of the retained trace (see ``spectral_select``)."""
    S = _square(sigma, "channel second moment")
    if not np.isfinite(S).all():
        raise NumericalError("channel second moment", "contains NaN or Inf",
                             hint="check the calibration data")
    C = S.shape[0]
    alpha, count = _check_stop(alpha, count, C)
    if not ridge >= 0:
        raise ValueError(f"ridge={ridge} must be >= 0")
    if order is not None:
        order = [int(j) for j in order]
        if len(set(order)) != len(order) or any(not 0 <= j < C for j in order):
            raise ValueError("order must list distinct channel indices")
    diag = np.diag(S).copy()
    total = float(diag.sum())
    unit = total / C if total > 0 else 1.0
    rho = ridge * unit                       # noise variance added to kept channels
    tiny = _DEAD * unit                      # residual variance that counts as zero
    steps = count if count is not None else C
    if order is not None:
        steps = min(steps, len(order))
    # Residual R = S - L L^T, never formed; L (C x t) holds r / sqrt(d) of each pick.
    # gain_j = ||R[:, j]||^2 / (R_jj + rho); keeping j: R -= r r^T / d, r = R[:, j],
    # d = R_jj + rho. q tracks ||R[:, i]||^2 and res R_ii; updating q needs R r = S r - L w
    # with w = L^T r. S r is a C^2 matvec, or, when many picks are to come, T[j] - P L_j
    # with T = S^2 (one SYRK) and P = S L: every step then costs one pass over [L | P].
    use_T = steps * 32 >= C
    if use_T:
        T = _square_of_symmetric(S)
    LP = np.zeros((steps, 2 * C if use_T else C))   # rows: [L^T | P^T]
    G = np.zeros((steps, steps))                      # L^T L
    q = np.einsum("ij,ij->j", S, S)
    res = diag.copy()
    chosen = np.zeros(C, dtype=bool)
    keep, ratios = [], []
    retained = 0.0
    t = 0                                             # columns of L so far
    for step in range(steps):
        if order is not None:
            j = order[step]
        else:
            eligible = ~chosen & (res > rho + tiny)
            if eligible.any():
                gains = np.where(eligible, q / (res + rho), -np.inf)
                if regulariser is not None and lam != 0:
                    idx = np.flatnonzero(eligible)
                    V = (retained + gains[idx]) / (total if total > 0 else 1.0)
                    R = regulariser.values()[idx]
                    rmax = R.max()
                    score = V - lam * V.std() * (R / rmax if rmax > 0 else 0.0)
                    j = int(idx[np.argmax(score)])
                else:
                    j = int(np.argmax(gains))
            elif count is None and keep:
                break                         # nothing informative left: alpha is as good as it gets
            else:
                j = int(np.flatnonzero(~chosen)[0])   # forced by count: lowest remaining index
        lj = LP[:t, j]
        if use_T:
            w = LP[:t, C + j] - G[:t, :t] @ lj
            Y = np.stack((lj, w)) @ LP[:t]
            r = S[j] - Y[0, :C]
            Sr = T[:, j] - Y[0, C:]
            Rr = Sr - Y[1, :C]
        else:
            r = S[j] - lj @ LP[:t]
            w = LP[:t] @ r
            Rr = S @ r - w @ LP[:t]
        d = max(r[j], 0.0) + rho
        if d > tiny * _EPS:
            rr = float(r @ r)
            retained += rr / d
            q -= 2.0 * r * Rr / d - r * r * (rr / d**2)
            np.maximum(q, 0.0, out=q)
            res -= r * r / d
            np.maximum(res, 0.0, out=res)
            sqd = math.sqrt(d)
            LP[t, :C] = r / sqd
            if use_T:
                LP[t, C:] = Sr / sqd
            G[t, :t] = G[:t, t] = w / sqd
            G[t, t] = rr / d
            t += 1
        chosen[j] = True
        keep.append(j)
        if regulariser is not None:
            regulariser.add(j)
        ratio = min(retained / total, 1.0) if total > 0 else 1.0
        ratios.append(ratio)
        if alpha is not None and ratio >= alpha:
            break
    return np.asarray(keep, dtype=np.int64), np.asarray(ratios, dtype=np.float64)


def spectral_select(sigma, *, alpha: float | None = None, count: int | None = None,
                    ridge: float = SELECT_RIDGE, order: Sequence[int] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Greedy spectral pruning (MoMaSP paper 3.1): the channels J that retain the most of
    Sigma's trace, Tr(Sigma_FJ (Sigma_JJ + rho I)^-1 Sigma_JF), rho = ridge * trace / C.

    Parameters
    ----------
    sigma : (C x C) uncentred second moment E[phi phi^T] of the site's channels.
    alpha : stop once the retention ratio reaches alpha (in (0, 1]).
    count : stop once ``count`` channels are kept. Give alpha, count or both (first wins).
    ridge : relative ridge; the residual update is R -= R[:, j] R[j, :] / (R[j, j] + rho).
    order : optional fixed sequence of channels to add instead of the greedy choice (to
        score another ranking with the same ratios and stopping rule).

    Each step keeps the eligible channel with the largest gain ||R[:, j]||^2 / (R_jj + rho)
    (exact ties: lowest index). A channel is eligible while its residual variance R_jj
    exceeds rho + 1e-12 trace / C, so dead and duplicate channels are never chosen while an
    informative channel remains; if ``count`` forces more, the lowest remaining indices are
    taken. With alpha only, selection also stops when no channel is eligible (the ratio is
    then as high as the ridge allows, 1 - O(ridge)). O(C^2) per step; O(C t) per step
    after one C x C product when many channels are kept.

    Returns
    -------
    keep : (k,) int64 channel indices in the order chosen (not sorted).
    ratios : (k,) retention ratio after each pick; non-decreasing.
    """
    return _greedy(sigma, alpha=alpha, count=count, ridge=ridge, order=order)


def block_spectral_select(sigma, unit: int, *, count: int, ridge: float = SELECT_RIDGE,
                          prefer: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Greedy spectral selection of whole blocks of ``unit`` consecutive channels (attention
    heads: block b = channels b*unit .. (b+1)*unit - 1).

    Each step adds the block B with the largest retained trace Tr(R_FB (R_BB + rho I)^-1 R_BF)
    of the residual R (Schur complement of the blocks kept so far), then updates
    R -= R_FB (R_BB + rho I)^-1 R_BF; rho = ridge * trace(sigma) / C. Exact ties: the block
    with the larger ``prefer`` score, then the lower index. Solves, no inverses.

    Returns (blocks (count,) in the order chosen, ratios (count,) retention after each pick).
    """
    S = np.asarray(sigma, dtype=np.float64)
    C = S.shape[0]
    if S.ndim != 2 or C != S.shape[1] or unit < 1 or C % unit:
        raise ValueError(f"sigma of shape {S.shape} is not square with whole blocks of {unit}")
    blocks = C // unit
    if not 1 <= count <= blocks:
        raise ValueError(f"count={count} must be in [1, {blocks}]")
    total = float(np.trace(S))
    rho = ridge * total / C if total > 0 else ridge
    R = 0.5 * (S + S.T)
    chosen: list[int] = []
    ratios = []
    tie = np.zeros(blocks) if prefer is None else np.asarray(prefer, dtype=np.float64)
    for _ in range(count):
        best, best_gain, best_solve = -1, -np.inf, None
        for b in range(blocks):
            if b in chosen:
                continue
            idx = slice(b * unit, (b + 1) * unit)
            RB = R[:, idx]
            K = R[idx, idx] + rho * np.eye(unit)
            try:
                solved = sla.solve(K, RB.T, assume_a="pos")
            except (np.linalg.LinAlgError, sla.LinAlgError):
                solved = sla.lstsq(K, RB.T)[0]
            gain = float(np.einsum("ij,ji->", RB, solved))
            if gain > best_gain + 1e-12 * max(total, 1e-300) or (
                    abs(gain - best_gain) <= 1e-12 * max(total, 1e-300) and best >= 0 and tie[b] > tie[best]):
                best, best_gain, best_solve = b, gain, solved
        idx = slice(best * unit, (best + 1) * unit)
        R = R - R[:, idx] @ best_solve
        R = 0.5 * (R + R.T)
        chosen.append(best)
        ratios.append(1.0 - float(np.trace(R)) / total if total > 0 else 1.0)
    return np.asarray(chosen, dtype=np.int64), np.maximum.accumulate(np.asarray(ratios))


def momasp_select(sigma_t, *, mean_s, mean_t, cov_s, cov_t, reg: str = "j", lam: float = 1.0,
                  alpha: float | None = None, count: int | None = None,
                  ridge: float = SELECT_RIDGE) -> tuple[np.ndarray, np.ndarray]:
    """Spectral pruning with the MoMaSP moment-matching regulariser (paper 3.2, 3.4).

    Parameters
    ----------
    sigma_t : (C x C) target second moment (Sigma comes from target data alone).
    mean_s, mean_t : (C,) source and target channel means.
    cov_s, cov_t : (C x C) source and target (centred) covariances.
    reg : "j" (eq. 4, R_j = |dmu_j| + ||S_jF * dC_jF||, computed once) or "J" (eq. 3,
        R = ||dmu_{J+j}|| + ||S * dC||_F over (J+j) x (J+j), recomputed for every candidate
        at every step in O(C)). S_ij = (Ct_ii Ct_jj)^(-1/4), target variances floored at
        1e-12 of their mean.
    lam : weight of the regulariser; 0 gives exactly ``spectral_select``.
    alpha, count, ridge : as in ``spectral_select``.

    Each step keeps argmax_j V_j - lam * std(V) * R_j / max(R) over the eligible channels,
    V_j the retention ratio with j added.

    Returns (keep (k,) in the order chosen, ratios (k,)).
    """
    S = np.asarray(sigma_t)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"sigma_t must be square, got shape {S.shape}")
    if not lam >= 0:
        raise ValueError(f"lam={lam} must be >= 0")
    regulariser = _MomentMatching(mean_s, mean_t, cov_s, cov_t, reg, S.shape[0])
    if lam == 0:
        regulariser = None
    return _greedy(S, alpha=alpha, count=count, ridge=ridge, regulariser=regulariser, lam=lam)


def _kept(keep, C: int) -> np.ndarray:
    J = np.asarray(keep, dtype=np.int64).reshape(-1)
    if len(np.unique(J)) != len(J) or (J.size and (J.min() < 0 or J.max() >= C)):
        raise ValueError(f"keep must hold distinct channel indices in [0, {C})")
    return J


def retention_ratio(sigma, keep, *, ridge: float = SELECT_RIDGE) -> float:
    """Tr(Sigma_FJ (Sigma_JJ + rho I)^-1 Sigma_JF) / Tr(Sigma), rho = ridge * trace(Sigma) / C.

    sigma (C x C), keep (k,) channel indices. 1 when Sigma is zero, 0 for an empty keep.
    Matches the last ratio ``spectral_select`` reports for the same channels and ridge.
    """
    S = _square(sigma, "channel second moment")
    C = S.shape[0]
    J = _kept(keep, C)
    total = float(np.trace(S))
    if not math.isfinite(total):
        raise NumericalError("channel second moment", "contains NaN or Inf",
                             hint="check the calibration data")
    if total <= 0:
        return 1.0
    if J.size == 0:
        return 0.0
    G = _matrix(S[J], "Sigma_JF")                        # (k x C)
    K = 0.5 * (G[:, J] + G[:, J].T)
    K[np.diag_indices_from(K)] += ridge * total / C
    Y = sla.cho_solve(_cho(K, "Sigma_JJ + rho I"), G, check_finite=False)
    return float(min(max(np.einsum("ij,ij->", G, _finite(Y, "retention")) / total, 0.0), 1.0))


def reconstruction_matrix(sigma, keep, *, ridge: float = SELECT_RIDGE, refine: int = 2) -> np.ndarray:
    """A_J (C x k) with phi ~ A_J phi_J: Sigma_FJ (Sigma_JJ + rho I)^-1 via cho_solve.

    Parameters
    ----------
    sigma : (C x C) uncentred second moment of the site's channels.
    keep : (k,) kept channels in any order; A_J's columns follow it.
    ridge : rho = ridge * trace(Sigma) / C, the same ridge as the selection.
    refine : iterated-Tikhonov steps A <- A + (Sigma_FJ - A Sigma_JJ)(Sigma_JJ + rho I)^-1.
        Each multiplies the ridge's bias along an eigenvalue mu of Sigma_JJ by
        rho / (mu + rho): well-determined directions become exact, ill-determined ones stay
        damped (never amplified). 0 gives the plain ridge solution.

    Rows of kept channels are the identity exactly (they pass through). A removed channel
    that is dead gets a zero row, one that duplicates (or is a combination of) kept channels
    copies them, to rounding. Fold into the next layer as W_next <- W_next A_J.
    """
    S = _square(sigma, "channel second moment")
    C = S.shape[0]
    J = _kept(keep, C)
    if int(refine) != refine or refine < 0:
        raise ValueError(f"refine={refine} must be a non-negative integer")
    if J.size == 0:
        return np.zeros((C, 0))
    total = float(np.trace(S))
    G = _matrix(S[J], "Sigma_JF")                        # (k x C)
    K = 0.5 * (G[:, J] + G[:, J].T)
    shifted = K.copy()
    shifted[np.diag_indices_from(K)] += ridge * (total / C if total > 0 else 1.0)
    if not (shifted.diagonal() > 0).all():
        raise NumericalError("Sigma_JJ", "a kept channel has zero variance and ridge=0",
                             hint="use a ridge > 0 or drop dead channels")
    factor = _cho(shifted, "Sigma_JJ + rho I")
    At = sla.cho_solve(factor, G, check_finite=False)    # A^T (k x C)
    for _ in range(int(refine)):
        At += sla.cho_solve(factor, G - K @ At, check_finite=False)
    A = At.T.copy()
    A[J] = np.eye(J.size)
    return _finite(A, "reconstruction matrix")


# --------------------------------------------------------------------------------------
# PFA


def pfa_spectrum(cov) -> np.ndarray:
    """PFA's lambda: eigenvalues of the (centred) response covariance cov (C x C), clamped at
    0, sorted descending and normalised to sum 1 (all zeros when cov is zero)."""
    S = _symmetric(cov, "response covariance")
    values = np.maximum(sla.eigh(S, eigvals_only=True, check_finite=False)[::-1], 0.0)
    total = values.sum()
    return values / total if total > 0 else values


def pfa_energy_count(spectrum, tau: float) -> int:
    """PFA-En: the smallest k whose k largest entries of ``spectrum`` hold a fraction >= tau
    of its sum (tau in (0, 1]; 1e-12 slack against rounding). 1 for a zero spectrum."""
    lam = np.sort(np.maximum(_matrix(spectrum, "spectrum", ndim=1), 0.0))[::-1]
    if not 0 < tau <= 1:
        raise ValueError(f"tau={tau} must be in (0, 1]")
    total = lam.sum()
    if lam.size == 0 or total <= 0:
        return 1
    cumulative = np.cumsum(lam) / total
    return int(min(np.searchsorted(cumulative, tau - 1e-12) + 1, lam.size))


def pfa_kl_count(spectrum) -> int:
    """PFA-KL: k = ceil(C (1 - KL(lambda || uniform) / ln C)), clamped to [1, C].

    KL = sum_i lambda_i ln(C lambda_i) with 0 ln 0 = 0 (spectrum renormalised to sum 1; a
    1e-9 slack keeps rounding from adding a channel). Uniform -> C, one-hot -> 1.
    """
    lam = np.maximum(_matrix(spectrum, "spectrum", ndim=1), 0.0)
    C = lam.size
    total = lam.sum()
    if C <= 1 or total <= 0:
        return 1
    p = lam / total
    nz = p > 0
    kl = float(np.sum(p[nz] * np.log(C * p[nz])))
    k = math.ceil(C * (1.0 - kl / math.log(C)) - 1e-9)
    return int(min(max(k, 1), C))


def pfa_correlation_select(cov, count: int) -> np.ndarray:
    """PFA filter selection: which ``count`` channels to keep, sorted ascending.

    cov (C x C) centred response covariance. Inactive channels (variance < 1e-8 of the
    largest) are dropped first, lowest variance first. Then the channel with the largest sum
    of |Pearson correlation| with the remaining others is dropped, repeatedly (O(C) per
    drop). Ties (within 1e-12 relative): the larger single |correlation| with a remaining
    channel (the paper's rule), then the highest index, so the first of two identical
    channels is the one kept.
    """
    S = _symmetric(cov, "response covariance")
    C = S.shape[0]
    if int(count) != count or not 1 <= count <= C:
        raise ValueError(f"count={count} must be an integer in [1, {C}]")
    to_drop = C - int(count)
    var = np.maximum(np.diag(S), 0.0)
    alive = np.ones(C, dtype=bool)
    inactive = np.flatnonzero(var < 1e-8 * var.max()) if var.max() > 0 else np.arange(C)
    # lowest variance first, then highest index
    for j in sorted(inactive.tolist(), key=lambda i: (var[i], -i))[:to_drop]:
        alive[j] = False
    to_drop -= C - int(alive.sum())
    if to_drop > 0:
        active = np.flatnonzero(var >= 1e-8 * var.max())
        sd = np.sqrt(var)
        corr = np.zeros((C, C))
        sub = np.abs(S[np.ix_(active, active)]) / np.outer(sd[active], sd[active])
        corr[np.ix_(active, active)] = np.minimum(sub, 1.0)
        np.fill_diagonal(corr, 0.0)
        corr[~alive] = 0.0
        corr[:, ~alive] = 0.0
        score = corr.sum(axis=1)
        for _ in range(to_drop):
            cand = np.flatnonzero(alive)
            top = score[cand].max()
            tied = cand[score[cand] >= top - 1e-12 * max(top, 1.0)]
            if tied.size > 1:
                peak = corr[tied].max(axis=1)
                tied = tied[peak >= peak.max() - 1e-12]
            j = int(tied.max())
            alive[j] = False
            score -= corr[:, j]
            corr[:, j] = 0.0
            corr[j] = 0.0
    return np.flatnonzero(alive).astype(np.int64)


def domain_shift(mean_s, cov_s, mean_t, cov_t, *, energy: float = 0.9) -> dict[str, float]:
    """How far the source statistics of a site are from the target's (C channels).

    mean_shift: ||mu_s - mu_t|| / sqrt(tr(C_t)), the mean moved in units of the target's spread.
    moment_mean, moment_cov: MoMaSP's moment-matching terms over every channel (eq. 3 with
      J = all): ||mu_s - mu_t|| and ||S * (C_s - C_t)||_F with S_ij = (C_t[i,i] C_t[j,j])^(-1/4).
    subspace_angle: the largest principal angle (degrees) between the target's and the
      source's principal subspaces, each of the smallest dimension k holding ``energy`` of the
      target's variance (k from the target, used for both).
    """
    mu_s = np.asarray(mean_s, dtype=np.float64)
    mu_t = np.asarray(mean_t, dtype=np.float64)
    Cs = _symmetric(cov_s, "cov_s")
    Ct = _symmetric(cov_t, "cov_t")
    dmu = mu_s - mu_t
    spread = float(np.trace(Ct))
    d = np.sqrt(np.maximum(np.diag(Ct), 1e-12 * max(spread / len(Ct), 1e-300)))
    scale = 1.0 / np.sqrt(np.outer(d, d))
    wt, Ut = sla.eigh(Ct, check_finite=False)
    ws, Us = sla.eigh(Cs, check_finite=False)
    wt, Ut, Us = wt[::-1], Ut[:, ::-1], Us[:, ::-1]
    total = max(float(np.clip(wt, 0, None).sum()), 1e-300)
    k = int(min(np.searchsorted(np.cumsum(np.clip(wt, 0, None)) / total, energy - 1e-12) + 1, len(wt)))
    cosines = sla.svdvals(Ut[:, :k].T @ Us[:, :k], check_finite=False)
    angle = float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))
    return {
        "mean_shift": float(np.linalg.norm(dmu) / np.sqrt(max(spread, 1e-300))),
        "moment_mean": float(np.linalg.norm(dmu)),
        "moment_cov": float(np.linalg.norm(scale * (Cs - Ct))),
        "subspace_angle": angle,
        "subspace_dim": k,
    }
