"""Channel selection on a site's second moment Sigma (C x C): the spectral greedy (and its
MoMaSP-regularised and block forms), the retention ratio and the reconstruction A_J."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np
import scipy.linalg as sla

from onnxprune.errors import NumericalError
from onnxprune.linalg.common import (
    _DEAD,
    _EPS,
    SELECT_RIDGE,
    _cho_lifted,
    _finite,
    _matrix,
    _symmetric,
    lifted_ridges,
)


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


def _greedy(sigma, *, alpha, count, ridge, order=None, regulariser=None, lam=0.0, readout=None):
    """Greedy maximisation of the retained trace (see ``spectral_select``); with ``readout``
    (m x C), of the trace of the read-out, Tr(W Sigma_FJ Sigma_JJ^-1 Sigma_JF W^T)."""
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
    tiny = _DEAD * unit                      # residual variance that counts as zero
    steps = count if count is not None else C
    if order is not None:
        steps = min(steps, len(order))
    retainable = total                       # what the ratios are of: Tr(S), or Tr(W S W^T)
    if readout is not None:
        W = _matrix(readout, "readout", ndim=2)
        if W.shape[1] != C:
            raise ValueError(f"readout must be an (m x {C}) matrix, got shape {W.shape}")
        retainable = float(np.einsum("ij,ij->", W @ S, W))
    T = _square_of_symmetric(S) if steps * 32 >= C and readout is None else None
    # rho: noise variance added to kept channels; raised when S + rho I proves indefinite
    for rho in lifted_ridges(ridge * unit, total):
        Z = None if readout is None else np.asfortranarray(W @ S)     # Fortran order: dger updates it in place
        picked = _greedy_steps(S, T, diag, retainable, rho, tiny, steps=steps, alpha=alpha, count=count,
                               order=order, regulariser=copy.deepcopy(regulariser), lam=lam, Z=Z)
        if picked is not None:
            return picked
    raise NumericalError("channel second moment", "is indefinite beyond any ridge up to its trace",
                         hint="check the calibration data")


def _greedy_steps(S, T, diag, total, rho, tiny, *, steps, alpha, count, order, regulariser, lam, Z=None):
    """The greedy's steps at ridge rho (``_greedy``); None when a residual variance falls below
    -(rho + tiny), i.e. S + rho I is indefinite (the ridge is under the rounding of S). ``Z``:
    W S for a read-out W (m x C), updated in place as W R; the gains are then ||W R[:, j]||^2
    / (R_jj + rho) and the ratios of Tr(W S W^T)."""
    C = S.shape[0]
    # Residual R = S - L L^T, never formed; L (C x t) holds r / sqrt(d) of each pick.
    # gain_j = ||R[:, j]||^2 / (R_jj + rho); keeping j: R -= r r^T / d, r = R[:, j],
    # d = R_jj + rho. q tracks ||R[:, i]||^2 and res R_ii; updating q needs R r = S r - L w
    # with w = L^T r. S r is a C^2 matvec, or, when many picks are to come, T[j] - P L_j
    # with T = S^2 (one SYRK) and P = S L: every step then costs one pass over [L | P].
    use_T = T is not None
    LP = np.zeros((steps, 2 * C if use_T else C))   # rows: [L^T | P^T]
    G = np.zeros((steps, steps))                      # L^T L
    q = np.einsum("ij,ij->j", S, S) if Z is None else np.einsum("ij,ij->j", Z, Z)
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
        if Z is not None:           # read-out gains: only r (for R's diagonal and L) and W r
            r = S[j] - lj @ LP[:t]
            Wr = Z[:, j].copy()
        elif use_T:
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
            if Z is not None:       # W R -= (W r) (r / d)^T, and its column norms with it
                zz, s = float(Wr @ Wr), r / d
                retained += zz / d
                q -= 2.0 * s * (Z.T @ Wr) - s * s * zz
                np.maximum(q, 0.0, out=q)
                Z = sla.blas.dger(-1.0, Wr, s, a=Z, overwrite_a=True)
            else:
                rr = float(r @ r)
                retained += rr / d
                q -= 2.0 * r * Rr / d - r * r * (rr / d**2)
                np.maximum(q, 0.0, out=q)
            res -= r * r / d
            if res.min() < -(rho + tiny):
                return None
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
                    ridge: float = SELECT_RIDGE, order: Sequence[int] | None = None, readout=None
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
    readout : optional (m x C) matrix W that reads the channels (the consumers' weights):
        the channels J that retain the most of W's output instead, Tr(W Sigma_FJ (Sigma_JJ +
        rho I)^-1 Sigma_JF W^T): the error W (x - A_J x_J) that the consumers make after
        reconstruct-next-layer's compensation, not the error of x in every direction (which
        for an expansion read by a narrower projection counts directions no output sees).
        Gains ||W R[:, j]||^2 / (R_jj + rho), ratios of Tr(W Sigma W^T); O(C (m + t)) per step.

    Each step keeps the eligible channel with the largest gain ||R[:, j]||^2 / (R_jj + rho)
    (exact ties: lowest index). A channel is eligible while its residual variance R_jj
    exceeds rho + 1e-12 trace / C, so dead and duplicate channels are never chosen while an
    informative channel remains; if ``count`` forces more, the lowest remaining indices are
    taken. With alpha only, selection also stops when no channel is eligible (the ratio is
    then as high as the ridge allows, 1 - O(ridge)). When Sigma + rho I proves indefinite (the
    float32 rounding of a rank-deficient Sigma), the greedy reruns with rho raised
    (``linalg.common.lifted_ridges``), as ``retention_ratio`` and ``reconstruction_matrix`` do. O(C^2) per step; O(C t) per step
    after one C x C product when many channels are kept.

    Returns
    -------
    keep : (k,) int64 channel indices in the order chosen (not sorted).
    ratios : (k,) retention ratio after each pick; non-decreasing.
    """
    return _greedy(sigma, alpha=alpha, count=count, ridge=ridge, order=order, readout=readout)


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
    factor, _ = _cho_lifted(K, ridge * total / C, total, "Sigma_JJ + rho I")
    Y = sla.cho_solve(factor, G, check_finite=False)
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
    rho = ridge * (total / C if total > 0 else 1.0)
    if not (K.diagonal() + rho > 0).all():
        raise NumericalError("Sigma_JJ", "a kept channel has zero variance and ridge=0",
                             hint="use a ridge > 0 or drop dead channels")
    factor, _ = _cho_lifted(K, rho, total, "Sigma_JJ + rho I")
    At = sla.cho_solve(factor, G, check_finite=False)    # A^T (k x C)
    for _ in range(int(refine)):
        At += sla.cho_solve(factor, G - K @ At, check_finite=False)
    A = At.T.copy()
    A[J] = np.eye(J.size)
    return _finite(A, "reconstruction matrix")
