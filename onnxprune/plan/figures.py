"""Tables and pictures of a plan: sensitivity heat maps, domain shift per site, Pareto fronts.

matplotlib draws off-screen (Agg); every figure is written atomically as PNG. Where matplotlib
cannot be imported, a figure is not drawn (a warning says so) and its function returns None.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from onnxprune.model import default_mode

log = logging.getLogger(__name__)


def _pyplot(what: str):
    """pyplot drawing off-screen, or None (with a warning naming ``what``) without matplotlib."""
    try:
        import matplotlib
    except ImportError as exc:
        log.warning("matplotlib cannot be imported (%s): no %s drawn (pip install matplotlib)", exc, what)
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.chmod(tmp, default_mode())          # mkstemp makes 0600; outputs get normal permissions
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def damage_measure(curves: dict[str, list[dict]]) -> str:
    """What the damage of these curves measures (``planner.damage``: its rows carry "cosine" for
    embeddings, "kl" for classifiers, only "relative_squared_error" otherwise)."""
    rows = [r for rows in curves.values() for r in rows]
    if any("cosine" in r for r in rows):
        return "1 - cosine of the embeddings"
    if any("kl" in r for r in rows):
        return "KL divergence of the softmax"
    return "relative squared error"


def sensitivity_table(curves: dict[str, list[dict]]) -> list[str]:
    """One line per site: damage at each ladder point, as 'size:damage' pairs."""
    if not curves:
        return ["no site to compress"]
    width = max(len(k) for k in curves)
    lines = [f"{'site':<{width}}  damage ({damage_measure(curves)}) at each size kept"]
    for key, rows in curves.items():
        cells = "  ".join(f"{r['size']}/{r['of']}:{r['damage']:.2g}" for r in rows)
        lines.append(f"{key:<{width}}  {cells}")
    return lines


def sensitivity_heatmap(curves: dict[str, list[dict]], path, *, title: str = "") -> Path | None:
    """Sites (rows) by fraction kept (columns), colour = log10 damage of that site alone."""
    import numpy as np

    plt = _pyplot("sensitivity heat map")
    if plt is None:
        return None
    keys = list(curves)
    fractions = sorted({r["keep"] for rows in curves.values() for r in rows}, reverse=True)
    grid = np.full((len(keys), len(fractions)), np.nan)
    for i, key in enumerate(keys):
        for r in curves[key]:
            grid[i, fractions.index(r["keep"])] = np.log10(max(r["damage"], 1e-6))
    fig, ax = plt.subplots(figsize=(2 + 0.35 * len(fractions), 1.5 + 0.22 * len(keys)))
    image = ax.imshow(grid, aspect="auto", cmap="magma_r", interpolation="nearest")
    ax.set_yticks(range(len(keys)), keys, fontsize=7)
    ax.set_xticks(range(len(fractions)), [f"{f:.2f}" for f in fractions], rotation=90, fontsize=7)
    ax.set_xlabel("fraction kept (channels pruned to; parameters of a low-rank split)")
    fig.colorbar(image, ax=ax, label=f"log10 damage ({damage_measure(curves)}), site alone")
    ax.set_title(title or "sensitivity per site", fontsize=9)
    out = _save(fig, path)
    plt.close(fig)
    return out


def shift_chart(shift: dict[str, dict], path, *, title: str = "") -> Path | None:
    """Per site: normalised mean shift and principal-subspace angle between source and target."""
    plt = _pyplot("domain-shift chart")
    if plt is None:
        return None
    keys = list(shift)
    fig, axes = plt.subplots(1, 2, figsize=(10, 1.5 + 0.22 * len(keys)), sharey=True)
    axes[0].barh(range(len(keys)), [shift[k]["mean_shift"] for k in keys], color="tab:orange")
    axes[0].set_xlabel("||mu_s - mu_t|| / sqrt(tr C_t)")
    axes[1].barh(range(len(keys)), [shift[k]["subspace_angle"] for k in keys], color="tab:blue")
    axes[1].set_xlabel("largest principal angle (deg), 90 % subspaces")
    axes[0].set_yticks(range(len(keys)), keys, fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle(title or "where the domains differ (source vs target statistics per site)", fontsize=9)
    out = _save(fig, path)
    plt.close(fig)
    return out


def pareto_chart(series: dict[str, list[tuple[float, float]]], path, *, reference: float | None = None,
                 xlabel: str = "MACs (fraction of the original)", ylabel: str = "top-1 accuracy (%)",
                 title: str = "") -> Path | None:
    """Accuracy (y) against cost (x) for each series of (cost, accuracy) points."""
    plt = _pyplot("Pareto plot")
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, points in series.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", linewidth=1, label="original")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    out = _save(fig, path)
    plt.close(fig)
    return out
