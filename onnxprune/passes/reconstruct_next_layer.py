"""reconstruct-next-layer: drop the unselected channels and compensate their consumers.

Before:  producer(W: C rows) -> per-channel ops -> phi (C) -> consumer(M: .. x C)
After:   producer(W_J)       -> per-channel ops -> phi_J   -> consumer(M A_J)

    A_J = S_FJ (S_JJ + rho I)^-1     (C x |J|), S = E[phi phi^T] on the target set,
    rho = ridge * trace(S) / C (iterated twice, see linalg.reconstruction_matrix)

so that phi ~= A_J phi_J in the least-squares sense: exact when the removed channels are
dead or copies of kept ones. A Conv consumer gets M[:, :, h, w] A_J at every tap; through a
Flatten of [C, H, W] the columns of each spatial position are mapped alike. With
``reconstruct=False`` the consumer only loses the removed columns (the no-reconstruction
baseline).

ridge="auto" (default) picks rho on held-out calibration folds: A_J is fitted on all
folds but one and scored on the one left out, for every ridge of a grid, and the ridge
with the lowest held-out error is refitted on all folds. Wide sites seen at few spatial
positions (MobileNetV2's 960 channels at 7 x 7) otherwise overfit A_J badly.

Each report row gives ``error``, the relative reconstruction error at the site on the
calibration set, E||phi - A phi_J||^2 / E||phi||^2 (= 1 - retention with reconstruction,
the dropped energy without), and with ridge="auto" ``heldout_error``, the same on the
held-out folds for the chosen ridge.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx

from onnxprune import linalg
from onnxprune.graph.editor import GraphEditor
from onnxprune.graph.prune import prune_channels
from onnxprune.model import count_parameters
from onnxprune.passes.base import Pass, PassContext, PassResult, Selection, check_types, register

log = logging.getLogger(__name__)

# Ridges (relative to trace(S) / C) tried by ridge="auto".
RIDGE_GRID = (1e-6, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
REFINE = 2            # iterated-Tikhonov steps of linalg.reconstruction_matrix


@dataclasses.dataclass(frozen=True)
class ReconstructOptions:
    """reconstruct: compensate consumers with A_J (default) or just drop columns.

    ridge: rho relative to trace(S) / C, or "auto" (chosen on held-out calibration folds;
    falls back to 1e-6 with a single fold).
    """

    reconstruct: bool = True
    ridge: float | str = "auto"

    def __post_init__(self):
        check_types("reconstruct-next-layer", self)
        if isinstance(self.ridge, str):
            if self.ridge != "auto":
                raise ValueError(f"ridge={self.ridge!r} must be a number >= 0 or 'auto'")
        elif not self.ridge >= 0:
            raise ValueError(f"ridge={self.ridge} must be >= 0")


@register
class ReconstructNextLayer(Pass):
    """Producer keeps rows J; consumers get M A_J with A_J = S_FJ (S_JJ + rho I)^-1.

    Applies the selections select-nodes recorded; statistics are the ones the selection used
    (one-shot: all from the original graph; sequential: re-gathered on the partly pruned graph).
    rho is chosen on held-out calibration folds by default (ridge="auto").
    """

    name = "reconstruct-next-layer"
    Options = ReconstructOptions
    requires = (Selection,)

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        pending = {name: s for name, s in ctx.selections.items() if not s.applied}
        rows = []
        for name, selection in pending.items():
            group, keep = selection.group, np.asarray(selection.keep, dtype=np.int64)
            sigma = selection.sigma
            before = count_parameters(model)
            matrix = None
            row = {"group": name, "channels": group.channels, "kept": int(len(keep))}
            if self.options.reconstruct and len(keep) < group.channels:
                ridge, heldout, matrix = self._fit(selection, keep, ctx)
                row["ridge"] = ridge
                if heldout is not None:
                    row["heldout_error"] = heldout
            if len(keep) < group.channels:
                prune_channels(model, group, keep, matrix)
            selection.applied = True
            error = site_error(sigma, keep, matrix)
            row.update({"params_before": before, "params_after": count_parameters(model),
                        "retention": 1.0 - error, "error": error, "criterion": selection.criterion,
                        "reconstructed": matrix is not None})
            rows.append(row)
            log.info("reconstruct-next-layer: %s keeps %d of %d channels, %s, site error %.4f%s (params %d -> %d)",
                     name, row["kept"], row["channels"],
                     f"reconstructed (ridge {row['ridge']:.3g})" if matrix is not None else "columns dropped",
                     error, f", held-out {row['heldout_error']:.4f}" if "heldout_error" in row else "",
                     before, row["params_after"])
        if not pending:
            log.info("reconstruct-next-layer: no pending channel selection")
        GraphEditor(model).remove_unused()
        return PassResult(changed=bool(rows), report={"pruned": rows})

    def _fit(self, selection: Selection, keep: np.ndarray, ctx: PassContext) -> tuple[float, float | None, np.ndarray]:
        """(ridge, its held-out error or None, A_J) for ``selection``. Remembered in ``ctx.cache``
        for the statistics the selection was made on (the same objects: select-nodes caches its
        scores there), since the planner rebuilds the same selections in its trials and checks."""
        def fit():
            ridge, heldout = self._ridge(selection)
            matrix = linalg.reconstruction_matrix(selection.sigma, keep, ridge=ridge, refine=REFINE)
            matrix.flags.writeable = False          # shared by every model rebuilt from the cache
            return ridge, heldout, matrix
        return ctx.remembered((self.name, self.options, keep.tobytes()), fit, on=(selection.sigma, selection.folds))

    def _ridge(self, selection: Selection) -> tuple[float, float | None]:
        """The ridge to use and, when it was chosen on held-out folds, its held-out error."""
        if not isinstance(self.options.ridge, str):
            return float(self.options.ridge), None
        folds = selection.folds or []
        if len(folds) < 2:
            return linalg.SELECT_RIDGE, None
        return heldout_ridge(folds, selection.keep)


def site_error(sigma: np.ndarray, keep: np.ndarray, matrix: np.ndarray | None) -> float:
    """E||phi - A phi_J||^2 / E||phi||^2 under the second moment ``sigma`` (C x C).

    ``matrix`` None: A is the column selection (the removed channels become zero), so the
    error is the removed channels' share of the energy. 0 when nothing is removed.
    """
    S = np.asarray(sigma, dtype=np.float64)
    total = float(np.trace(S))
    if total <= 0 or len(keep) == S.shape[0]:
        return 0.0
    if matrix is None:
        return float(min(max(1.0 - S.diagonal()[keep].sum() / total, 0.0), 1.0))
    A = np.asarray(matrix, dtype=np.float64)
    cross = np.einsum("ij,ji->", A, S[keep])                      # tr(A S_JF)
    quad = np.einsum("ij,ij->", A @ S[np.ix_(keep, keep)], A)      # tr(A S_JJ A^T)
    return float(min(max((total - 2.0 * cross + quad) / total, 0.0), 1.0))


def heldout_ridge(folds: list[tuple[int, np.ndarray]], keep, *, grid=RIDGE_GRID,
                  refine: int = REFINE) -> tuple[float, float]:
    """The ridge of ``grid`` whose A_J, fitted on all folds but one, best predicts the removed
    channels of the fold left out (summed over folds); returns (ridge, its held-out error
    relative to the held-out energy).

    folds: [(sample count, second moment (C x C)), ...]. A_J = S_FJ (S_JJ + rho)^-1 iterated
    ``refine`` times has, along an eigenvector of S_JJ with eigenvalue mu, the filter
    (1 - (rho / (mu + rho))^(refine + 1)) / mu, so one eigendecomposition per fold scores
    every ridge. Ties go to the smaller ridge.
    """
    J = np.asarray(keep, dtype=np.int64)
    C = folds[0][1].shape[0]
    removed = np.setdiff1d(np.arange(C), J)
    total_count = sum(n for n, _ in folds)
    errors = np.zeros(len(grid))
    energy = 0.0
    for f, (n_test, S_test) in enumerate(folds):
        n_fit = total_count - n_test
        if n_fit <= 0 or n_test <= 0:
            continue
        S_fit = sum(n * S for i, (n, S) in enumerate(folds) if i != f) / n_fit
        unit = float(np.trace(S_fit)) / C
        if unit <= 0:
            continue
        K = S_fit[np.ix_(J, J)]
        mu, V = np.linalg.eigh(0.5 * (K + K.T))
        mu = np.maximum(mu, 0.0)
        P = V.T @ S_fit[np.ix_(J, removed)]            # (k x r) fit cross-moments, eigenbasis
        Q = V.T @ S_test[np.ix_(J, removed)]           # held-out cross-moments
        M = V.T @ S_test[np.ix_(J, J)] @ V             # held-out S_JJ, eigenbasis
        PP = P @ P.T
        PQ = np.einsum("ij,ij->i", P, Q)
        base = float(S_test.diagonal()[removed].sum())
        energy += n_test * float(np.trace(S_test))
        for g, ridge in enumerate(grid):
            rho = ridge * unit
            q = rho / (mu + rho)
            with np.errstate(divide="ignore", invalid="ignore"):
                d = np.where(mu > 1e-300, -np.expm1((refine + 1) * np.log(q)) / mu, (refine + 1) / rho)
            # held-out E||phi_R - A_R phi_J||^2 with A_R^T = V diag(d) P
            err = base - 2.0 * float(d @ PQ) + float(np.einsum("ij,ij->", M, (d[:, None] * PP) * d[None, :]))
            errors[g] += n_test * max(err, 0.0)
    if energy <= 0:
        return linalg.SELECT_RIDGE, 0.0
    best = int(np.flatnonzero(errors <= errors.min() + 1e-9 * energy)[0])
    return float(grid[best]), float(errors[best] / energy)
