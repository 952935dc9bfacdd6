"""PFA recipes (how many channels: energy and KL rules; which: correlation greedy) and the
source/target domain-shift summary of a site."""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg as sla

from onnxprune.linalg.common import (
    _matrix,
    _symmetric,
)


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
