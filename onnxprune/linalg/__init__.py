"""Pure numerics for onnxprune (no onnx): low-rank splits, spectral channel selection, PFA recipes.

A package in the scipy.linalg manner: the functions live in ``common`` (checks, ridge
defaults, ``blas_threads``), ``moments`` (``SecondMoment``), ``lowrank`` (splits and rank
choice), ``spatial`` (the spatial split of a 2-D Conv), ``selection`` (channel selection and reconstruction) and ``pfa``; this namespace
is their public API (``from onnxprune import linalg; linalg.dalr(...)``).

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
affine_low_rank         W x ~ A B x + delta with the ridge chosen by cross-validation (the pass's DALR)
rank_for_energy, global_ranks, round_rank, split_params: how ranks are chosen and costed
spatial_split           a kh x kw Conv as kh x 1 then 1 x kw, fitted on the patch covariance
spatial_params, spatial_rank_limit: its weights at a rank, its largest useful rank
spectral_select         greedy channel subset maximising the retained trace (spectral pruning)
momasp_select           the same with the MoMaSP source/target moment-matching regulariser
retention_ratio         Tr(Sigma_FJ (Sigma_JJ + rho I)^-1 Sigma_JF) / Tr(Sigma)
reconstruction_matrix   A_J with phi ~ A_J phi_J (to fold into the next layer)
block_spectral_select   the spectral greedy over whole blocks (attention heads)
pfa_spectrum, pfa_energy_count, pfa_kl_count, pfa_correlation_select: PFA recipes
domain_shift            how far a site's source statistics are from the target's
blas_threads            context manager: BLAS threads for the library's numerics (default 1)
"""

from onnxprune.linalg.common import BLAS_THREADS_ENV, DEFAULT_RIDGE, SELECT_RIDGE, blas_threads
from onnxprune.linalg.lowrank import (
    AUTO_GRID,
    AUTO_TOLERANCE,
    affine_low_rank,
    dalr,
    gated_metric,
    global_ranks,
    open_probability,
    output_spectrum,
    rank_for_energy,
    reconstruction_error,
    round_rank,
    split_params,
    truncated_svd,
)
from onnxprune.linalg.moments import SecondMoment
from onnxprune.linalg.spatial import spatial_params, spatial_rank_limit, spatial_split
from onnxprune.linalg.pfa import (
    domain_shift,
    pfa_correlation_select,
    pfa_energy_count,
    pfa_kl_count,
    pfa_spectrum,
)
from onnxprune.linalg.selection import (
    block_spectral_select,
    momasp_select,
    reconstruction_matrix,
    retention_ratio,
    spectral_select,
)

__all__ = [
    "AUTO_GRID", "AUTO_TOLERANCE", "BLAS_THREADS_ENV", "DEFAULT_RIDGE", "SELECT_RIDGE", "SecondMoment",
    "affine_low_rank", "blas_threads", "block_spectral_select", "dalr", "domain_shift", "gated_metric",
    "global_ranks", "momasp_select", "open_probability", "output_spectrum", "pfa_correlation_select",
    "pfa_energy_count", "pfa_kl_count", "pfa_spectrum", "rank_for_energy", "reconstruction_error",
    "reconstruction_matrix", "retention_ratio", "round_rank", "spatial_params", "spatial_rank_limit", "spatial_split",
    "spectral_select", "split_params", "truncated_svd",
]
