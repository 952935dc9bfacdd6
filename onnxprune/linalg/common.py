"""Shared by the numerics: input checks, sign conventions, factorisations, ridge defaults and
the BLAS thread limit (``blas_threads``)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import warnings

import numpy as np
import scipy.linalg as sla

from onnxprune.errors import NumericalError

log = logging.getLogger(__name__)

#: DALR ridge relative to trace(S)/n. For the paper's form (``shrink_to="zero"``) the
#: held-out error only grows with the ridge, so this is a numerical safeguard: it bounds
#: cond(S + lam I) by 1 + n / ridge while changing B by O(ridge) in well-sampled directions.
DEFAULT_RIDGE = 1e-4


#: Ridge of the channel-selection solves, relative to trace(Sigma)/C.
SELECT_RIDGE = 1e-6


_EPS = np.finfo(np.float64).eps


_COND_WARN = 1e12          # warn when a factorised matrix is at least this ill-conditioned


_DEAD = 1e-12              # a residual variance below _DEAD * trace / C counts as zero


#: Rounding of the calibration statistics relative to their trace: the default engines form
#: Gram products in float32, so a rank-deficient second moment (few samples, dead or duplicate
#: channels) can have eigenvalues about this far below zero. A ridge under it does not make
#: Sigma + rho I definite (MobileNetV2, 30 calibration images: a 960-channel Gram with trace
#: 19.6 had eigenvalues down to -3.4e-7 against the selection's rho of 2e-8).
GRAM_ROUNDING = 1e-7


def lifted_ridges(rho: float, total: float):
    """``rho``, then the absolute ridges to retry with when Sigma + rho I proves indefinite:
    ``GRAM_ROUNDING * total`` (or 10 rho if larger), times 10 each, up to ``total``."""
    yield rho
    lifted = max(10.0 * rho, GRAM_ROUNDING * total)
    while lifted <= total:
        log.debug("Sigma + %.3g I is indefinite (rounding of the statistics): ridge raised to %.3g", rho, lifted)
        yield lifted
        lifted *= 10.0


#: environment variable overriding the BLAS thread count (0: leave BLAS as it is)
BLAS_THREADS_ENV = "ONNXPRUNE_BLAS_THREADS"


_blas_lock = threading.Lock()


_blas_state = {"depth": 0, "limiter": None, "controller": None, "ignored": False}


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
    thread count changes float rounding, and results must be reproducible). OpenBLAS 0.3.31
    ignores the setting from any other thread once the main thread has made one: then the
    numerics run at BLAS's own count, which changes the last digits, and a warning says so
    once (run such calls in processes, or all in threads, for bit-identical results).
    """
    if limit is None:
        text = os.environ.get(BLAS_THREADS_ENV, "1").strip()
        try:
            limit = int(text)
        except ValueError:
            limit = -1
        if limit < 0:
            raise NumericalError(BLAS_THREADS_ENV, f"must be an integer >= 0 (0: leave BLAS as it is), not {text!r}")
    if limit <= 0:
        yield
        return
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:             # an optional speed-up: without it BLAS keeps its own setting
        yield
        return
    with _blas_lock:
        if _blas_state["depth"] == 0:
            # finding the BLAS libraries (reading /proc/self/maps) took 1.4 ms a time, a tenth of a
            # LeNet calibration: they are found once (numpy and scipy load theirs on import)
            if _blas_state["controller"] is None:
                _blas_state["controller"] = ThreadpoolController()
            _blas_state["limiter"] = _blas_state["controller"].limit(limits=int(limit), user_api="blas")
            applied = [lib.get_num_threads() for lib in _blas_state["controller"].select(user_api="blas").lib_controllers]
            if any(n != int(limit) for n in applied) and not _blas_state["ignored"]:
                _blas_state["ignored"] = True
                log.warning("BLAS ignored the limit of %d thread(s) here (it runs %s; OpenBLAS takes the setting only "
                            "from the main thread once that has made one): numerics in this thread may differ in "
                            "their last digits from a run in the main thread; run them in processes for "
                            "bit-identical results", int(limit), applied)
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


def _cho_lifted(K: np.ndarray, rho: float, total: float, what: str):
    """(Cholesky factor of K + rho' I, rho') for the first rho' of ``lifted_ridges(rho, total)``
    that makes it definite; NumericalError when none does."""
    eye = np.diag_indices_from(K)
    for ridge in lifted_ridges(rho, total):
        shifted = K.copy()
        shifted[eye] += ridge
        try:
            return _cho(shifted, what), ridge
        except NumericalError as exc:
            failure = exc
    raise failure


def _check_rank(rank, m: int, n: int) -> int:
    k = int(rank)
    if k != rank or not 1 <= k <= min(m, n):
        raise ValueError(f"rank={rank} must be an integer in [1, min(m, n) = {min(m, n)}]")
    return k
