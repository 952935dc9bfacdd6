"""Spatial low rank of a 2-D convolution: a kh x kw Conv as a kh x 1 Conv into k channels,
then a 1 x kw Conv (Tai et al. 2016, "Convolutional neural networks with low-rank
regularization"), fitted to the layer's outputs on the data rather than to its weights.

A Conv W (M, C, kh, kw) reads im2col patches x with columns (c, i, j). Ordered by the
horizontal tap j, x = (u_0, ..., u_{kw-1}) with u_j the vertical patch (c, i) at column j,
and the split computes

    y_hat = sum_j H_j V u_j = H (I_kw (x) V) x,    V (k, C kh),   H = [H_0 ... H_{kw-1}] (M, k kw)

i.e. the first Conv applies V at every column, the second mixes kw neighbouring columns of
its k channels. Parameters k (C kh + M kw) against k (C kh kw + M) for the channel split
(a kh x kw Conv into k channels, then a 1 x 1): for C = M and a 3 x 3 kernel the spatial
form keeps 10/6 times the rank at equal weights, and its output error on ResNet-20's
convolutions was about 3x lower at equal weights (bench/results/spatial_split.md; METHODS.md
has no section on it: the choice is ours).

Fit: minimise tr((W - H K) C (W - H K)^T), K = I (x) V, C the centred patch covariance (the
bias takes the mean: b += (W - H K) mu). No closed form (V is shared by every tap), so
alternating least squares from the weights' own spatial SVD: H given V is a ridge
regression on the k kw features K x; V given H solves sum_{j,l} H_j^T H_l V C_lj =
sum_j H_j^T (W C)_j, a symmetric positive definite system in V, by conjugate gradients
warm-started from the last V. Deterministic (no random start).
"""

from __future__ import annotations

import numpy as np
from scipy.sparse.linalg import LinearOperator, cg

#: alternating rounds and conjugate-gradient steps per V update: on ResNet-20's layers the held-out
#: error of 8 rounds x 15 steps was within 1 % of 40 x 100 (converged) at a twentieth of the time (by hand)
ROUNDS = 8
CG_STEPS = 15
#: ridge on both least-squares steps, relative to trace(C) / n (numerical guard only)
RIDGE = 1e-6


def spatial_rank_limit(channels: int, outputs: int, kernel: tuple[int, int]) -> int:
    """The largest useful k: the rank of W arranged as (C kh) x (M kw)."""
    return min(channels * kernel[0], outputs * kernel[1])


def spatial_params(channels: int, outputs: int, kernel: tuple[int, int], rank: int) -> int:
    """Weights of the split at ``rank``: k (C kh) + M (k kw)."""
    return int(rank) * (channels * kernel[0] + outputs * kernel[1])


def spatial_split(weight: np.ndarray, covariance: np.ndarray | None, rank: int, *, rounds: int = ROUNDS,
                  cg_steps: int = CG_STEPS) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Factor a Conv weight (M, C, kh, kw) as a (k, C, kh, 1) Conv followed by an (M, k, 1, kw)
    Conv, minimising the output error under ``covariance`` (n x n, n = C kh kw, columns in the
    weight's (c, i, j) order); ``covariance`` None: the weights' own spatial SVD (data-free).

    Returns the two Conv weights V (k, C, kh, 1) and H (M, k, 1, kw), and the approximation of
    the (M, n) weight matrix as a product A B, A = H (M, k kw), B = I_kw (x) V (k kw, n) with its
    columns in the weight's order, as ``low-rank-split`` takes a channel split's factors; float64.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 4:
        raise ValueError(f"a spatial split needs a 2-D Conv weight (M, C, kh, kw), got shape {w.shape}")
    m, c, kh, kw = w.shape
    k = int(rank)
    if not 1 <= k <= spatial_rank_limit(c, m, (kh, kw)):
        raise ValueError(f"rank {k} must be in [1, {spatial_rank_limit(c, m, (kh, kw))}]")
    block = c * kh
    # columns ordered (j, c, i): block j holds the vertical patch at horizontal tap j
    order = np.arange(c * kh * kw).reshape(c, kh, kw).transpose(2, 0, 1).reshape(-1)
    wj = w.reshape(m, -1)[:, order]
    # the weights' spatial SVD: W arranged (c i) x (j m)
    tall = np.concatenate([wj[:, j * block:(j + 1) * block].T for j in range(kw)], axis=1)
    u, s, vt = np.linalg.svd(tall, full_matrices=False)
    v = u[:, :k].T * np.sqrt(s[:k])[:, None]                                   # (k, C kh)
    h = np.concatenate([vt[:k, j * m:(j + 1) * m].T * np.sqrt(s[:k]) for j in range(kw)], axis=1)
    if covariance is not None:
        cov = np.asarray(covariance, dtype=np.float64)[np.ix_(order, order)]
        lam = RIDGE * max(float(np.trace(cov)) / len(cov), 1e-300)
        wc = wj @ cov
        blocks = [[cov[a * block:(a + 1) * block, b * block:(b + 1) * block] for b in range(kw)] for a in range(kw)]
        for _ in range(int(rounds)):
            h = _fit_h(v, cov, wc, kw, lam)
            v = _fit_v(v, h, wc, blocks, kw, lam, cg_steps)
        h = _fit_h(v, cov, wc, kw, lam)
    right = np.empty((k * kw, c * kh * kw))
    right[:, order] = _taps(v, kw)
    first = v.reshape(k, c, kh, 1)
    second = h.reshape(m, kw, k).transpose(0, 2, 1).reshape(m, k, 1, kw)
    return first, second, h, right


def _taps(v: np.ndarray, kw: int) -> np.ndarray:
    """K = I_kw (x) V: (k kw, C kh kw)."""
    k, block = v.shape
    out = np.zeros((k * kw, block * kw))
    for j in range(kw):
        out[j * k:(j + 1) * k, j * block:(j + 1) * block] = v
    return out


def _fit_h(v, cov, wc, kw: int, lam: float) -> np.ndarray:
    """H = W C K^T (K C K^T + lam I)^-1 (a solve, not an inverse)."""
    taps = _taps(v, kw)
    gram = taps @ cov @ taps.T
    gram[np.diag_indices_from(gram)] += lam
    return np.linalg.solve(gram, taps @ wc.T).T


def _fit_v(v, h, wc, blocks, kw: int, lam: float, steps: int) -> np.ndarray:
    """V solving sum_{j,l} H_j^T H_l V C_lj + lam V = sum_j H_j^T (W C)_j by conjugate gradients."""
    k, block = v.shape
    hs = [h[:, j * k:(j + 1) * k] for j in range(kw)]
    cross = [[hs[j].T @ hs[l] for l in range(kw)] for j in range(kw)]
    rhs = sum(hs[j].T @ wc[:, j * block:(j + 1) * block] for j in range(kw))

    def apply(x: np.ndarray) -> np.ndarray:
        x = x.reshape(k, block)
        out = lam * x
        for j in range(kw):
            for l in range(kw):
                out = out + cross[j][l] @ (x @ blocks[l][j])
        return out.reshape(-1)

    solution, _ = cg(LinearOperator((k * block, k * block), matvec=apply, dtype=np.float64), rhs.reshape(-1),
                     x0=v.reshape(-1), maxiter=int(steps), rtol=1e-12)
    return solution.reshape(k, block)
