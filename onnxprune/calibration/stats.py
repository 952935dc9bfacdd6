"""Streaming, mergeable float64 statistics of activations.

A ``Moments`` accumulator keeps, for rows x_i (samples x dim) seen batch by batch,

    count = #rows,   sum = sum_i x_i  (dim,),   Gram = sum_i x_i x_i^T  (dim, dim)

in float64, so mean = sum / count, second moment S = Gram / count and covariance
C = S - mean mean^T. Accumulators merge by addition: statistics computed in shards (other
batches, other machines) combine to the same result. For very wide inputs with fewer
samples than features, ``keep_rows=True`` keeps the rows themselves instead of the
dim x dim Gram (a pass then works in sample space).

A ``StatRequest`` says what to gather at one tensor ("features", im2col "patches" of a
Conv input, or per-sample "pooled" responses); ``Statistics`` holds the Moments per sample
set, request and fold, with a JSON header that ties them to the model's hash.

numpy only: onnxruntime lives in ``collect.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from onnxprune.errors import CalibrationError

# Rows are cast to float64 in chunks of about this many bytes, so an update never holds
# more than one chunk of float64 copies besides the caller's batch.
CHUNK_BYTES = 32 * 2**20
# Below this many rows a chunk is not worth a BLAS call of its own.
MIN_CHUNK_ROWS = 1024
# Updates of fewer rows than this, on Grams at least this wide, are queued and folded in
# together: a product of a few rows costs little next to adding the dim^2 result.
QUEUE_ROWS = 256

KINDS = ("features", "patches", "pooled")
POOLS = ("max", "mean")


# --------------------------------------------------------------------------------------
# Moments


_local = threading.local()


def _scratch(shape: tuple[int, int]) -> np.ndarray:
    """A float64 work buffer of ``shape``, reused across updates in this thread: fresh
    32 MiB buffers would be mapped and faulted in anew for every chunk."""
    size = shape[0] * shape[1]
    buf = getattr(_local, "buffer", None)
    if buf is None or buf.size < size:
        buf = _local.buffer = np.empty(size, dtype=np.float64)
    return buf[:size].reshape(shape)


def _scratch32(shape: tuple[int, int]) -> np.ndarray:
    """The float32 counterpart of ``_scratch``."""
    size = shape[0] * shape[1]
    buf = getattr(_local, "buffer32", None)
    if buf is None or buf.size < size:
        buf = _local.buffer32 = np.empty(size, dtype=np.float32)
    return buf[:size].reshape(shape)


def release_buffers() -> None:
    """Drop this thread's work buffers (``collect`` calls it when done)."""
    _local.buffer = None
    _local.buffer32 = None



class Moments:
    """count, sum (dim,) and Gram (dim, dim) of rows (samples x dim), float64, merged by ``+``.

    With ``keep_rows=True`` the raw rows (float64) are held instead of the Gram, which is
    then computed on demand: cheaper when there are fewer samples than features.

    >>> m = Moments(3); m.update(np.ones((4, 3))); m.count, m.mean
    (4, array([1., 1., 1.]))
    """

    def __init__(self, dim: int, *, keep_rows: bool = False, products: str = "float64"):
        if int(dim) < 1:
            raise ValueError(f"dim={dim} must be >= 1")
        if products not in ("float64", "float32"):
            raise ValueError(f"products={products!r} must be 'float64' or 'float32'")
        self.dim = int(dim)
        self.keep_rows = bool(keep_rows)
        # "float32": float32 rows (updates of QUEUE_ROWS rows or more) are shifted by the mean of
        # their first rows and multiplied in float32 (BLAS ssyrk, about 3x faster than dsyrk);
        # each chunk's product is corrected for the shift exactly and accumulated in float64.
        # Relative accuracy ~1e-6 instead of ~1e-15. Queued small updates stay float64.
        self.products = products
        self.count = 0
        self.sum = np.zeros(self.dim, dtype=np.float64)
        self._gram = None if self.keep_rows else np.zeros((self.dim, self.dim), dtype=np.float64)
        self._chunks: list[np.ndarray] = []   # keep_rows: float64 row blocks, joined lazily
        self._gram_cache: np.ndarray | None = None
        self._queue: list[np.ndarray] = []    # small row blocks not yet in the Gram (sum has them)
        self._queued = 0

    # -- accumulation ------------------------------------------------------------------

    def update(self, rows: np.ndarray) -> None:
        """Fold ``rows`` (k, dim), of any real dtype and memory layout, into the accumulators.

        Rows are copied chunk by chunk (about ``CHUNK_BYTES`` each) into a float64 buffer
        with an extra column of ones, whose symmetric product (one BLAS syrk) gives the
        Gram and, in its last row, the sum. A transposed view such as one sample of an
        NCHW activation (``x[n].reshape(C, -1).T``) is copied along its contiguous axis.
        Updates of a few rows on a wide Gram (one row per sample of a flattened input) are
        queued and folded in ``QUEUE_ROWS`` at a time; the sum is always current.
        """
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"rows must have shape (k, {self.dim}), got {rows.shape}")
        k = rows.shape[0]
        if k == 0:
            return
        self.count += k
        if self.keep_rows:
            self._chunks.append(np.array(rows, dtype=np.float64, order="C"))
            self.sum += self._chunks[-1].sum(axis=0)
            self._gram_cache = None
            return
        if k < QUEUE_ROWS <= self.dim:
            block = np.array(rows, dtype=np.float64, order="C")      # queued: float64 products, exact
            self.sum += block.sum(axis=0)
            self._queue.append(block)
            self._queued += k
            if self._queued >= QUEUE_ROWS:
                self._flush()
            return
        self._fold(rows, with_sum=True)

    def _flush(self) -> None:
        """Fold the queued rows into the Gram."""
        if self._queue:
            rows = np.concatenate(self._queue)
            self._queue, self._queued = [], 0
            self._fold(rows, with_sum=False)

    def _single(self, rows: np.ndarray) -> bool:
        return self.products == "float32" and rows.dtype == np.float32

    def _fold(self, rows: np.ndarray, *, with_sum: bool) -> None:
        if self._single(rows):
            self._fold32(rows, with_sum=with_sum)
            return
        k, dim = rows.shape
        # samples contiguous in memory, features strided (e.g. channels of an NCHW sample)
        by_columns = k > 1 and dim > 1 and rows.strides[0] == rows.itemsize
        step = max(MIN_CHUNK_ROWS if dim < 4096 else 64, CHUNK_BYTES // (8 * (dim + 1)))
        for start in range(0, k, step):
            part = rows[start:start + step]
            n = part.shape[0]
            if by_columns:
                buf = _scratch((dim + 1, n))
                buf[:dim] = part.T
                buf[dim] = 1.0
                product = buf @ buf.T                     # numpy calls syrk for a @ a.T
            else:
                buf = _scratch((n, dim + 1))
                buf[:, :dim] = part
                buf[:, dim] = 1.0
                product = buf.T @ buf
            self._gram += product[:dim, :dim]
            if with_sum:
                self.sum += product[dim, :dim]

    def add_sums(self, count: int, total: np.ndarray, gram: np.ndarray) -> None:
        """Fold in ``count`` rows given by their sum (dim,) and Gram (dim, dim) (float64), as
        computed elsewhere (onnxruntime, another process)."""
        if self.keep_rows:
            raise ValueError("keep_rows Moments need the rows themselves")
        total = np.asarray(total, dtype=np.float64)
        gram = np.asarray(gram, dtype=np.float64)
        if total.shape != (self.dim,) or gram.shape != (self.dim, self.dim):
            raise ValueError(f"sums must have shapes ({self.dim},) and ({self.dim}, {self.dim}), "
                             f"got {total.shape} and {gram.shape}")
        self.count += int(count)
        self.sum += total
        self._gram += gram

    def _fold32(self, rows: np.ndarray, *, with_sum: bool) -> None:
        k, dim = rows.shape
        # the mean of this update's first rows: near the data (no cancellation in float32), and
        # a function of this update alone, so shards of a sample set fold each batch identically
        shift32 = np.asarray(rows[:QUEUE_ROWS], dtype=np.float64).mean(axis=0).astype(np.float32)
        shift = shift32.astype(np.float64)
        by_columns = k > 1 and dim > 1 and rows.strides[0] == rows.itemsize
        step = max(MIN_CHUNK_ROWS if dim < 4096 else 64, CHUNK_BYTES // (4 * dim))
        for start in range(0, k, step):
            part = rows[start:start + step]
            n = part.shape[0]
            if by_columns:
                buf = _scratch32((dim, n))
                np.subtract(part.T, shift32[:, None], out=buf)
                product = buf @ buf.T                     # ssyrk
                centred = buf.sum(axis=1, dtype=np.float64)
            else:
                buf = _scratch32((n, dim))
                np.subtract(part, shift32, out=buf)
                product = buf.T @ buf
                centred = buf.sum(axis=0, dtype=np.float64)
            cross = np.outer(shift, centred)
            self._gram += product
            self._gram += cross + cross.T + n * np.outer(shift, shift)
            if with_sum:
                self.sum += centred + n * shift

    def __add__(self, other: Moments) -> Moments:
        if not isinstance(other, Moments):
            return NotImplemented
        if other.dim != self.dim:
            raise ValueError(f"cannot add Moments of dim {self.dim} and {other.dim}")
        keep = self.keep_rows and other.keep_rows
        out = Moments(self.dim, keep_rows=keep)
        out.count = self.count + other.count
        out.sum = self.sum + other.sum
        if keep:
            out._chunks = [c for c in (self.rows, other.rows) if len(c)]
        else:
            out._gram = self.gram + other.gram
        return out

    def __radd__(self, other):
        if isinstance(other, int) and other == 0:   # sum([m1, m2, ...])
            return self.copy()
        return NotImplemented

    def copy(self) -> Moments:
        out = Moments(self.dim, keep_rows=self.keep_rows)
        out.count = self.count
        out.sum = self.sum.copy()
        if self.keep_rows:
            out._chunks = [self.rows.copy()] if self.count else []
        else:
            out._gram = self.gram.copy()
        return out

    # -- views -------------------------------------------------------------------------

    @property
    def rows(self) -> np.ndarray | None:
        """The rows seen so far (count, dim) when ``keep_rows``, else None."""
        if not self.keep_rows:
            return None
        if len(self._chunks) != 1:
            joined = np.concatenate(self._chunks) if self._chunks else np.zeros((0, self.dim))
            self._chunks = [joined]
        return self._chunks[0]

    @property
    def gram(self) -> np.ndarray:
        """sum_i x_i x_i^T (dim, dim); computed from the rows when ``keep_rows``."""
        if not self.keep_rows:
            self._flush()
            return self._gram
        if self._gram_cache is None:
            rows = self.rows
            self._gram_cache = rows.T @ rows
        return self._gram_cache

    def _need_samples(self) -> None:
        if self.count == 0:
            raise CalibrationError("statistics", "no samples were accumulated",
                                   "check that the sample set is not empty")

    @property
    def mean(self) -> np.ndarray:
        """sum / count, (dim,)."""
        self._need_samples()
        return self.sum / self.count

    @property
    def second_moment(self) -> np.ndarray:
        """E[x x^T] = Gram / count, (dim, dim), not centred."""
        self._need_samples()
        return self.gram / self.count

    @property
    def covariance(self) -> np.ndarray:
        """E[x x^T] - mean mean^T (dim, dim): the biased (1/count) covariance, symmetrised."""
        mean = self.mean
        cov = self.second_moment - np.outer(mean, mean)
        return (cov + cov.T) / 2

    @property
    def nbytes(self) -> int:
        big = self.rows.nbytes if self.keep_rows else self.gram.nbytes
        return big + self.sum.nbytes

    def __repr__(self) -> str:
        mode = "rows" if self.keep_rows else "gram"
        return f"Moments(dim={self.dim}, count={self.count}, {mode})"

    # -- serialisation -----------------------------------------------------------------

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """Plain arrays under ``{prefix}/count``, ``/sum`` and ``/gram`` or ``/rows``."""
        out = {f"{prefix}/count": np.array(self.count, dtype=np.int64), f"{prefix}/sum": self.sum}
        if self.keep_rows:
            out[f"{prefix}/rows"] = self.rows
        else:
            out[f"{prefix}/gram"] = self.gram
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str) -> Moments:
        """Inverse of ``to_arrays``; exact."""
        try:
            total = np.asarray(arrays[f"{prefix}/sum"], dtype=np.float64)
            count = int(arrays[f"{prefix}/count"])
        except KeyError as exc:
            raise CalibrationError(prefix, f"statistics are incomplete ({exc.args[0]} missing)") from None
        keep = f"{prefix}/rows" in arrays
        out = cls(total.shape[0], keep_rows=keep)
        out.count = count
        out.sum = total.copy()
        if keep:
            rows = np.asarray(arrays[f"{prefix}/rows"], dtype=np.float64)
            out._chunks = [rows.copy()] if len(rows) else []
        else:
            out._gram = np.array(arrays[f"{prefix}/gram"], dtype=np.float64)
        return out


# --------------------------------------------------------------------------------------
# What to gather


@dataclasses.dataclass(frozen=True)
class StatRequest:
    """What to gather at one tensor.

    kind:
      - "features": the feature axis is ``axis``, every other axis indexes samples
        (Conv activation [N, C, H, W], axis=1: N*H*W rows of C; Gemm/MatMul input [N, n]
        or [N, T, n], axis=-1: N or N*T rows of n).
      - "patches": im2col patches of a Conv input [N, C, *spatial]: features C*kh*kw in
        the order of ``W.reshape(M, C*kh*kw)`` (channel-major, then kh, kw), one row per
        output position; ``kernel`` required, ``strides``/``pads`` ([begins..., ends...],
        ONNX order)/``dilations`` default to 1/0/1. Only for group=1 convolutions.
      - "pooled": per-sample spatial pooling of [N, C, ...] -> N rows of C (``pool`` "max"
        or "mean"): the responses PFA reads.
    keep_rows: keep the raw rows instead of the Gram (wide inputs, few samples).
    positions: for "patches", use only this many output positions of each sample, drawn at
      random (seeded; 0: every position). Patch Grams cost positions x dim^2 per sample, far
      more than the convolution itself; a sample of positions estimates the same second
      moment (He et al. 2017 sample 10 positions per image for channel pruning).
    """

    tensor: str
    kind: str = "features"
    axis: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pool: str = "max"
    keep_rows: bool = False
    positions: int = 0

    def __post_init__(self):
        for name in ("kernel", "strides", "pads", "dilations"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        object.__setattr__(self, "axis", int(self.axis))
        object.__setattr__(self, "keep_rows", bool(self.keep_rows))
        object.__setattr__(self, "positions", int(self.positions))
        if self.positions < 0 or (self.positions and self.kind != "patches"):
            raise ValueError(f"positions={self.positions} must be 0, or positive for patches")
        if not self.tensor:
            raise ValueError("StatRequest needs a tensor name")
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} must be one of {', '.join(KINDS)}")
        if self.kind == "pooled" and self.pool not in POOLS:
            raise ValueError(f"pool={self.pool!r} must be one of {', '.join(POOLS)}")
        if self.kind == "patches":
            k = len(self.kernel)
            if k == 0 or any(v < 1 for v in self.kernel):
                raise ValueError(f"patches need a kernel of positive sizes, got {self.kernel}")
            if self.axis != 1:
                raise ValueError("patches are taken from an [N, C, *spatial] tensor: axis must be 1")
            if self.strides and (len(self.strides) != k or min(self.strides) < 1):
                raise ValueError(f"strides {self.strides} do not fit kernel {self.kernel}")
            if self.dilations and (len(self.dilations) != k or min(self.dilations) < 1):
                raise ValueError(f"dilations {self.dilations} do not fit kernel {self.kernel}")
            if self.pads and (len(self.pads) != 2 * k or min(self.pads) < 0):
                raise ValueError(f"pads {self.pads} do not fit kernel {self.kernel} (need {2 * k} values)")

    @property
    def key(self) -> str:
        """A stable string naming this request; distinct requests get distinct keys."""
        def dims(values):
            return "x".join(str(v) for v in values)

        if self.kind == "features":
            key = f"features:{self.tensor}:axis{self.axis}"
        elif self.kind == "pooled":
            key = f"pooled:{self.tensor}:axis{self.axis}:{self.pool}"
        else:
            n = len(self.kernel)
            key = (f"patches:{self.tensor}:k{dims(self.kernel)}:s{dims(self.strides or (1,) * n)}"
                   f":p{dims(self.pads or (0,) * 2 * n)}:d{dims(self.dilations or (1,) * n)}"
                   + (f":pos{self.positions}" if self.positions else ""))
        return key + (":rows" if self.keep_rows else "")

    def to_dict(self) -> dict:
        """JSON-native fields (lists, not tuples) plus the key."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        out["key"] = self.key
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> StatRequest:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    # -- turning an activation into rows ------------------------------------------------

    def rows(self, x: np.ndarray, rng: np.random.Generator | None = None) -> Iterator[np.ndarray]:
        """Row blocks (k, dim) of activation ``x`` (batch first) for this request.

        Blocks are views of ``x`` where the layout allows (no copy for "features"), and
        "patches" are built a few samples at a time, so memory stays near one batch.
        ``rng`` draws the positions of a "patches" request with ``positions`` set.
        """
        if self.kind == "pooled":
            yield pooled(x, pool=self.pool, axis=self.axis)
        elif self.kind == "patches":
            per_sample = math.prod(self.out_spatial(x.shape))
            take = self.positions if 0 < self.positions < per_sample else None
            # a few samples at a time: the im2col copy is kh*kw times their size
            group = max(1, MIN_CHUNK_ROWS // (take or per_sample))
            for n in range(0, x.shape[0], group):
                part = x[n:n + group]
                at = None
                if take:
                    rng = rng if rng is not None else np.random.default_rng(0)
                    at = sample_positions(rng, part.shape[0], per_sample, take)
                yield patches(part, kernel=self.kernel, strides=self.strides, pads=self.pads,
                              dilations=self.dilations, at=at)
        else:
            yield from feature_rows(x, self.axis)

    def out_spatial(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Output positions per spatial axis of a "patches" request on an input of ``shape``."""
        nd = len(self.kernel)
        strides = self.strides or (1,) * nd
        pads = self.pads or (0,) * (2 * nd)
        dilations = self.dilations or (1,) * nd
        return tuple((shape[2 + i] + pads[i] + pads[nd + i] - dilations[i] * (self.kernel[i] - 1) - 1)
                     // strides[i] + 1 for i in range(nd))

    def dim(self, shape: tuple[int, ...]) -> int:
        """The feature dimension this request gives for an activation of ``shape``."""
        if self.kind == "patches":
            return int(shape[1]) * math.prod(self.kernel)
        if self.kind == "pooled":
            return int(shape[self.axis]) if len(shape) > 1 else 1
        return int(shape[self.axis])

    def check(self, shape: tuple[int, ...]) -> str | None:
        """Why an activation of ``shape`` does not fit this request, or None."""
        rank = len(shape)
        if self.kind == "patches":
            if rank != 2 + len(self.kernel):
                return f"has shape {list(shape)}; patches of a {len(self.kernel)}-d kernel need rank {2 + len(self.kernel)}"
            if min(self.out_spatial(shape)) < 1:
                return f"has shape {list(shape)}; the kernel {list(self.kernel)} does not fit in it"
            return None
        if self.kind == "pooled":
            return None if rank >= 2 else f"has shape {list(shape)}; pooling needs [N, C, ...]"
        if rank < 2 or not -rank <= self.axis < rank or self.axis % rank == 0:
            return f"has shape {list(shape)}; feature axis {self.axis} must be a non-batch axis"
        return None


def sample_positions(rng: np.random.Generator, n: int, per_sample: int, take: int) -> np.ndarray:
    """(n, take) distinct output positions per sample, increasing: the ``take`` smallest of
    ``per_sample`` uniform draws per sample (a partial sort, O(per_sample))."""
    draws = rng.random((n, per_sample))
    return np.sort(np.argpartition(draws, take - 1, axis=1)[:, :take], axis=1)


def feature_rows(x: np.ndarray, axis: int) -> Iterator[np.ndarray]:
    """Yield (k, C) row blocks of ``x`` with features on ``axis`` and samples on every other.

    Features on the last axis: one view, no copy. Otherwise (NCHW: the N*H*W positions of
    C channels) one transposed view per leading index, ``x[n].reshape(C, H*W).T``, which
    ``Moments.update`` copies along its contiguous axis; small maps (H*W below
    ``MIN_CHUNK_ROWS``) are gathered over several samples into one small copy so each BLAS
    call sees enough rows.
    """
    axis = axis % x.ndim
    channels = x.shape[axis]
    lead = math.prod(x.shape[:axis])
    trail = math.prod(x.shape[axis + 1:])
    if trail == 1:
        yield x.reshape(lead, channels)
        return
    blocks = x.reshape(lead, channels, trail)
    group = max(1, MIN_CHUNK_ROWS // trail)
    if group == 1:
        for i in range(lead):
            yield blocks[i].T
        return
    for start in range(0, lead, group):
        yield blocks[start:start + group].transpose(0, 2, 1).reshape(-1, channels)


def pooled(x: np.ndarray, *, pool: str = "max", axis: int = 1) -> np.ndarray:
    """Per-sample pooling of [N, C, ...] over every axis after C -> (N, C); with ``axis`` the
    last axis ([N, T, ..., C], token features), over every axis between N and C."""
    if x.ndim == 2:
        return x
    axis = axis % x.ndim
    axes = tuple(a for a in range(1, x.ndim) if a != axis)
    if pool == "max":
        return x.max(axis=axes)
    if pool == "mean":
        return x.mean(axis=axes, dtype=np.float64)
    raise ValueError(f"pool={pool!r} must be 'max' or 'mean'")


def patches(x: np.ndarray, *, kernel, strides=(), pads=(), dilations=(), at: np.ndarray | None = None
            ) -> np.ndarray:
    """im2col of a Conv input: [N, C, *spatial] -> (N * prod(out_spatial), C * prod(kernel)).

    ``at`` (N, k): only these output positions (flat C-order indices) of each sample, giving
    (N * k, C * prod(kernel)) rows, sample by sample.

    Rows run over samples then output positions in C order (so ``patches @ W.reshape(M, -1).T``
    reshaped to (N, *out_spatial, M) and moved to channel-first is the Conv output); columns
    follow ``W.reshape(M, C * kh * kw)``: channel-major, then kernel taps. ``pads`` are in
    ONNX order (all begins, then all ends); group 1 only. Built with a sliding-window view,
    then one copy: no Python loop over positions.
    """
    kernel = tuple(int(k) for k in kernel)
    nd = len(kernel)
    if x.ndim != 2 + nd:
        raise ValueError(f"x has shape {x.shape}; a {nd}-d kernel needs rank {2 + nd}")
    strides = tuple(int(s) for s in strides) or (1,) * nd
    dilations = tuple(int(d) for d in dilations) or (1,) * nd
    pads = tuple(int(p) for p in pads) or (0,) * (2 * nd)
    if len(strides) != nd or len(dilations) != nd or len(pads) != 2 * nd:
        raise ValueError(f"strides {strides}, dilations {dilations}, pads {pads} do not fit kernel {kernel}")
    if any(pads):
        x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[nd + i]) for i in range(nd)])
    extent = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilations))
    if any(e > s for e, s in zip(extent, x.shape[2:])):
        raise ValueError(f"kernel {kernel} (dilated {extent}) is larger than the padded input {x.shape[2:]}")
    window = np.lib.stride_tricks.sliding_window_view(x, extent, axis=tuple(range(2, 2 + nd)))
    # window: (N, C, *positions, *extent) -> take every stride-th position and dilation-th tap
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) \
        + tuple(slice(None, None, d) for d in dilations)
    window = window[index]
    n, c = window.shape[:2]
    out_spatial = window.shape[2:2 + nd]
    # (N, *out_spatial, C, *kernel)
    order = (0,) + tuple(range(2, 2 + nd)) + (1,) + tuple(range(2 + nd, 2 + 2 * nd))
    window = window.transpose(order)
    if at is not None:
        at = np.asarray(at, dtype=np.int64)
        picked = window[(np.arange(n)[:, None],) + np.unravel_index(at, out_spatial)]   # (N, k, C, *kernel)
        return picked.reshape(n * at.shape[1], c * math.prod(kernel))
    return window.reshape(n * math.prod(out_spatial), c * math.prod(kernel))


# --------------------------------------------------------------------------------------
# Statistics


class Statistics:
    """Moments per (sample set, request key, fold), with a JSON-able header.

    header: {"model_hash", "sets": {name: samples.describe()}, "folds", "seed",
    "requests": [request dicts], "samples": {set: [samples per fold]}, "onnxprune_version"}.
    """

    FORMAT = 1

    def __init__(self, header: dict, moments: dict[tuple[str, str, int], Moments] | None = None):
        self.header = header
        self._moments: dict[tuple[str, str, int], Moments] = dict(moments or {})

    @property
    def folds(self) -> int:
        return int(self.header.get("folds", 1))

    @property
    def model_hash(self) -> str | None:
        return self.header.get("model_hash")

    def entries(self) -> list[tuple[str, str, int]]:
        """(set, request key, fold) of every Moments held."""
        return sorted(self._moments)

    def sets(self) -> list[str]:
        return sorted({s for s, _, _ in self._moments})

    def has(self, request: StatRequest | str, set: str = "target") -> bool:
        key = request if isinstance(request, str) else request.key
        return any(s == set and k == key for s, k, _ in self._moments)

    def moments(self, request: StatRequest | str, set: str = "target", fold: int | None = None) -> Moments:
        """The Moments of ``request`` on sample set ``set``; ``fold=None`` merges every fold
        (a new object; with ``keep_rows`` its rows come fold by fold)."""
        key = request if isinstance(request, str) else request.key
        parts = sorted((f, m) for (s, k, f), m in self._moments.items() if s == set and k == key)
        if not parts:
            sets = self.sets()
            if set not in sets:
                raise CalibrationError(set, f"no statistics for sample set {set!r} (have: {', '.join(sets) or 'none'})",
                                       "gather them with the corresponding data")
            raise CalibrationError(key, f"no {set} statistics for this request",
                                   "gather statistics with the recipe that needs them")
        if fold is None:
            return sum(m for _, m in parts)
        for f, m in parts:
            if f == fold:
                return m
        raise CalibrationError(key, f"no fold {fold} in {set} statistics (folds: {self.folds})",
                               "calibrate with more folds")

    def merge(self, other: Statistics) -> Statistics:
        """Combine with statistics of the same model: other sample sets, or other shards of a set."""
        if self.model_hash != other.model_hash:
            raise CalibrationError("statistics", f"cannot merge statistics of model {self.model_hash} "
                                   f"with those of model {other.model_hash}")
        if self.folds != other.folds:
            raise CalibrationError("statistics", f"cannot merge {self.folds}-fold with {other.folds}-fold statistics",
                                   "calibrate both with the same --folds")
        mine, theirs = set(self.sets()), set(other.sets())
        for name in mine & theirs:
            a = {k for s, k, _ in self._moments if s == name}
            b = {k for s, k, _ in other._moments if s == name}
            if a != b:
                raise CalibrationError(name, "shards of one sample set must hold the same requests "
                                       f"({len(a ^ b)} differ)")
        moments = {key: m.copy() for key, m in self._moments.items()}
        for key, m in other._moments.items():
            moments[key] = moments[key] + m if key in moments else m.copy()
        header = json.loads(json.dumps(self.header))
        sets = header.setdefault("sets", {})
        samples = header.setdefault("samples", {})
        for name, describe in other.header.get("sets", {}).items():
            if name in sets:
                sets[name] = _merged_description(sets[name], describe)
            else:
                sets[name] = describe
        for name, counts in other.header.get("samples", {}).items():
            if name in samples:
                samples[name] = [a + b for a, b in zip(samples[name], counts)]
            else:
                samples[name] = list(counts)
        requests = {r["key"]: r for r in header.get("requests", [])}
        for r in other.header.get("requests", []):
            requests.setdefault(r["key"], r)
        header["requests"] = list(requests.values())
        return Statistics(header, moments)

    __add__ = merge

    # -- files -------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write one .npz atomically (temporary file, then rename); no pickled objects."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        index = []
        for i, (key, m) in enumerate(sorted(self._moments.items())):
            set_name, request_key, fold = key
            index.append({"set": set_name, "request": request_key, "fold": fold, "prefix": f"m{i}"})
            arrays.update(m.to_arrays(f"m{i}"))
        header = dict(self.header, format=self.FORMAT, index=index)
        arrays["header"] = np.array(json.dumps(header, sort_keys=True))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, model=None) -> Statistics:
        """Read statistics saved by ``save``; with ``model`` (a ModelProto or its hash), check
        that they were computed for it."""
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(str(path), "no such statistics file", "create it with `onnxprune calibrate`")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
            header = json.loads(str(arrays.pop("header")))
            index = header.pop("index")
        except (OSError, ValueError, KeyError) as exc:
            raise CalibrationError(str(path), f"not a statistics file ({type(exc).__name__}: {exc})",
                                   "create it with `onnxprune calibrate`") from None
        if model is not None:
            if isinstance(model, str):
                expected = model
            else:
                from onnxprune.model import model_hash
                expected = model_hash(model)
            if header.get("model_hash") != expected:
                raise CalibrationError(path.name, f"computed for model {header.get('model_hash')}, "
                                       f"not this model {expected}",
                                       "recompute them with `onnxprune calibrate` on this model")
        header.pop("format", None)
        moments = {(e["set"], e["request"], int(e["fold"])): Moments.from_arrays(arrays, e["prefix"])
                   for e in index}
        return cls(header, moments)

    def __repr__(self) -> str:
        return (f"Statistics(model={self.model_hash}, sets={self.sets()}, "
                f"requests={len(self.header.get('requests', []))}, folds={self.folds})")


def _merged_description(a: dict, b: dict) -> dict:
    shards = (a.get("shards") or [a]) + (b.get("shards") or [b])
    out = {"shards": shards}
    counts = [s.get("count") for s in shards]
    if all(isinstance(c, int) for c in counts):
        out["count"] = sum(counts)
    return out
