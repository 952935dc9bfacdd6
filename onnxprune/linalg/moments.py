"""``SecondMoment``: S = E[x x^T] as an n x n matrix or as sample rows X (N x n), S = X^T X / N."""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import numpy as np
import scipy.linalg as sla

from onnxprune.linalg.common import (
    _EPS,
    _cho,
    _finite,
    _matrix,
    _symmetric,
)


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
