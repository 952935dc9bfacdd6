"""Timing and held-out quality of onnxprune.linalg on synthetic data.

Table 1: wall time vs width C = n (256 .. 4096) of
- ``spectral_select`` keeping C/4 channels of a C x C second moment,
- ``dalr`` (Gram space, W: C x C, rank C/8, default ridge),
- ``dalr`` in sample space (N = C/4 rows, same W and rank).

Table 2: held-out relative reconstruction error E||W x - A B x - delta||^2 / E||W x||^2 on
post-ReLU-like correlated inputs (n = 512, m = 256, rank 32) for truncated SVD (without and
with bias compensation), DALR with the default ridge, and ``affine_low_rank`` (what
low-rank-split runs: affine DALR, its ridge chosen by 2-fold cross-validation on the
calibration set), as the calibration set grows. Errors are measured on a third, independent
sample set.

Prints markdown on stdout (and writes it to ``--out`` when given). ``time_width`` and
``time_wide`` (DALR of a 25088-wide layer from fewer samples than features, in sample
space) return the raw seconds; bench/speed.py plots them against the expected scaling.

    python bench/bench_linalg.py [--widths 256 512 1024 2048 4096] [--skip-quality] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxprune import linalg  # noqa: E402
from onnxprune.linalg import SecondMoment  # noqa: E402


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def relu_sampler(n: int, seed: int, decay: float = 0.5):
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((n, n)))[0]
    factor = basis * np.sqrt(1.0 / np.arange(1, n + 1) ** decay)
    return lambda count: np.maximum(rng.standard_normal((count, n)) @ factor.T + 0.3, 0.0)


def time_width(C: int) -> dict:
    """Seconds for one width C = n: greedy selection C -> C/4, DALR in Gram space and in sample space."""
    rng = np.random.default_rng(C)
    F = rng.standard_normal((C, C // 4))
    sigma = F @ F.T / (C // 4) + 0.01 * np.eye(C)
    t_select = timed(linalg.spectral_select, sigma, count=C // 4)
    X = np.maximum(rng.standard_normal((C // 4, C)), 0.0)
    W = rng.standard_normal((C, C)) / np.sqrt(C)
    t_gram = timed(linalg.dalr, W, SecondMoment(matrix=sigma), C // 8)
    t_rows = timed(linalg.dalr, W, SecondMoment.from_rows(X), C // 8)
    return {"C": C, "select": t_select, "dalr_gram": t_gram, "dalr_rows": t_rows}


def time_wide(n: int = 25088, N: int = 1000, m: int = 4096, rank: int = 512, seed: int = 0) -> dict:
    """DALR of an m x n layer from N < n samples, in sample space (no n x n matrix is formed).

    25088 = 512 x 7 x 7 is the input of VGG-16's first FC layer (m = 4096).
    """
    rng = np.random.default_rng(seed)
    X = np.maximum(rng.standard_normal((N, n), dtype=np.float32), 0.0).astype(np.float64)
    W = rng.standard_normal((m, n), dtype=np.float32).astype(np.float64) / np.sqrt(n)
    stats = SecondMoment.from_rows(X)
    assert stats.sample_space
    seconds = timed(linalg.dalr, W, stats, rank)
    return {"n": n, "N": N, "m": m, "rank": rank, "dalr_rows": seconds}


def timing_table(widths) -> list[str]:
    lines = ["| C = n | spectral_select C -> C/4 (s) | dalr Gram, rank n/8 (s) "
             "| dalr sample space, N = n/4 (s) |", "|---:|---:|---:|---:|"]
    for C in widths:
        t = time_width(C)
        lines.append(f"| {C} | {t['select']:.2f} | {t['dalr_gram']:.2f} | {t['dalr_rows']:.2f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def quality_table(n: int = 512, m: int = 256, rank: int = 32, seeds=(0, 1, 2)) -> list[str]:
    lines = [f"| calibration N (n = {n}) | svd | svd + bias | dalr (ridge {linalg.DEFAULT_RIDGE:g}) "
             "| affine dalr, ridge by 2-fold CV (the pass) | chosen ridge |",
             "|---:|---:|---:|---:|---:|---:|"]
    for N in (n // 4, n, 4 * n, 16 * n):
        rows = []
        for seed in seeds:
            sample = relu_sampler(n, seed)
            W = np.random.default_rng(100 + seed).standard_normal((m, n)) / np.sqrt(n)
            fit_x, held_x, test_x = sample(N // 2), sample(N - N // 2), sample(4000)
            test = SecondMoment.from_rows(test_x)
            mean = test_x.mean(axis=0)
            total = SecondMoment.from_rows(np.vstack([fit_x, held_x]))
            calib_mean = np.vstack([fit_x, held_x]).mean(axis=0)
            err = lambda ab, delta=None, mean=mean: linalg.reconstruction_error(  # noqa: E731
                W, *ab, test, **({} if delta is None else {"mean": mean, "bias_delta": delta}))
            svd = linalg.truncated_svd(W, rank)
            folds = [(SecondMoment.from_rows(x), x.mean(axis=0)) for x in (fit_x, held_x)]
            A, B, delta, info = linalg.affine_low_rank(W, rank, folds)
            rows.append((err(svd), err(svd, (W - svd[0] @ svd[1]) @ calib_mean),
                         err(linalg.dalr(W, total, rank)), err((A, B), delta), info["ridge"]))
        mean_err = np.mean([r[:4] for r in rows], axis=0)
        ridges = ", ".join("svd" if math.isinf(r[4]) else f"{r[4]:g}" for r in rows)
        lines.append(f"| {N} | {mean_err[0]:.4f} | {mean_err[1]:.4f} | {mean_err[2]:.4f} | {mean_err[3]:.4f} "
                     f"| {ridges} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the markdown to this file")
    args = parser.parse_args()
    lines = ["## onnxprune.linalg", "",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}; "
             f"load average at start {os.getloadavg()[0]:.1f}", ""]
    lines += timing_table(args.widths)
    if not args.skip_quality:
        lines += ["", "Held-out relative reconstruction error (mean of 3 seeds; lower is better):", ""]
        lines += quality_table()
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
