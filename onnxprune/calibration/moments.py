"""Streaming, mergeable float64 moments of activation rows (the accumulator).

A ``Moments`` accumulator keeps, for rows x_i (samples x dim) seen batch by batch,

    count = #rows,   sum = sum_i x_i  (dim,),   Gram = sum_i x_i x_i^T  (dim, dim)

in float64, so mean = sum / count, second moment S = Gram / count and covariance
C = S - mean mean^T. Accumulators merge by addition: statistics computed in shards (other
batches, other machines) combine to the same result. For very wide inputs with fewer
samples than features, ``keep_rows=True`` keeps the rows themselves instead of the
dim x dim Gram (a pass then works in sample space). numpy only.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np

from onnxprune.errors import CalibrationError

# Rows are cast to float64 in chunks of about this many bytes, so an update never holds
# more than one chunk of float64 copies besides the caller's batch.
CHUNK_BYTES = 32 * 2**20


# Below this many rows a chunk is not worth a BLAS call of its own.
MIN_CHUNK_ROWS = 1024


# Shift corrections of float32 products wait until this many are pending (dim x SHIFTS each).
SHIFTS = 64


# Updates of fewer rows than this, on Grams at least this wide, are queued and folded in
# together: a product of a few rows costs little next to adding the dim^2 result.
QUEUE_ROWS = 256


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


def _as_rows(rows: np.ndarray, dim: int) -> np.ndarray:
    """``rows`` as (k, dim), or as (g, t, dim) when that is a view whose rows are strided
    and its t positions contiguous (an NCHW batch): flattening it would copy."""
    if rows.ndim not in (2, 3) or rows.shape[-1] != dim:
        raise ValueError(f"rows must have shape (k, {dim}) or (g, t, {dim}), got {rows.shape}")
    if rows.ndim == 2:
        return rows
    g, t, _ = rows.shape
    if g == 1 or t == 1 or rows.strides[0] == t * rows.strides[1]:
        return rows.reshape(-1, dim)                 # a view
    if rows.strides[1] == rows.itemsize:
        return rows
    return np.ascontiguousarray(rows).reshape(-1, dim)


def _by_columns(rows: np.ndarray) -> bool:
    """Whether the rows are strided and their features contiguous along the other axis
    (samples contiguous in memory, features strided, e.g. channels of NCHW)."""
    if rows.ndim == 3:
        return True
    return rows.shape[0] > 1 and rows.shape[1] > 1 and rows.strides[0] == rows.itemsize


def _chunks(rows: np.ndarray, step: int):
    """Pieces of ``rows`` of about ``step`` rows (whole blocks of a (g, t, dim) array)."""
    size = rows.shape[0]
    if rows.ndim == 3:
        step = max(1, step // max(rows.shape[1], 1))
    for start in range(0, size, step):
        yield rows[start:start + step]


def _columns(part: np.ndarray, buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The features-first view of a piece, (dim, n) or (dim, g, t), and ``buf`` (dim, n) shaped
    like it: copying the one into the other lays the piece out channel-major."""
    if part.ndim == 2:
        return part.T, buf
    return part.transpose(2, 0, 1), buf.reshape(buf.shape[0], part.shape[0], part.shape[1])


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
        self._shifts: list[np.ndarray] = []   # float32 products' shifts s and u = c + n s / 2, pending
        self._shifted: list[np.ndarray] = []

    # -- accumulation ------------------------------------------------------------------

    def update(self, rows: np.ndarray) -> None:
        """Fold ``rows`` (k, dim), of any real dtype and memory layout, into the accumulators.

        ``rows`` may also be (g, t, dim): g blocks of t rows, such as a whole NCHW batch seen
        as ``x.reshape(N, C, -1).transpose(0, 2, 1)`` (every position of every sample a row).
        Rows are copied chunk by chunk (about ``CHUNK_BYTES`` each) into a float64 buffer
        with an extra column of ones, whose symmetric product (one BLAS syrk) gives the
        Gram and, in its last row, the sum. A transposed view such as that NCHW batch is
        copied along its contiguous axis, several samples per chunk.
        Updates of a few rows on a wide Gram (one row per sample of a flattened input) are
        queued and folded in ``QUEUE_ROWS`` at a time; the sum is always current.
        """
        rows = _as_rows(np.asarray(rows), self.dim)
        k = rows.size // self.dim
        if k == 0:
            return
        self.count += k
        if self.keep_rows:
            self._chunks.append(np.array(rows, dtype=np.float64, order="C").reshape(k, self.dim))
            self.sum += self._chunks[-1].sum(axis=0)
            self._gram_cache = None
            return
        if k < QUEUE_ROWS <= self.dim:
            block = np.array(rows, dtype=np.float64, order="C").reshape(k, self.dim)   # queued: exact float64
            self.sum += block.sum(axis=0)
            self._queue.append(block)
            self._queued += k
            if self._queued >= QUEUE_ROWS:
                self._flush()
            return
        self._fold(rows, with_sum=True)

    def _flush(self) -> None:
        """Fold the queued rows and the pending shift corrections into the Gram."""
        if self._shifts:
            shifts, shifted = np.stack(self._shifts, axis=1), np.stack(self._shifted, axis=1)
            self._shifts, self._shifted = [], []
            correction = shifts @ shifted.T
            self._gram += correction
            self._gram += correction.T
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
        dim = self.dim
        by_columns = _by_columns(rows)
        step = max(MIN_CHUNK_ROWS if dim < 4096 else 64, CHUNK_BYTES // (8 * (dim + 1)))
        for part in _chunks(rows, step):
            n = part.size // dim
            if by_columns:
                buf = _scratch((dim + 1, n))
                source, target = _columns(part, buf[:dim])
                target[...] = source
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
        dim = self.dim
        # the mean of this update's first rows: near the data (no cancellation in float32), and
        # a function of this update alone, so shards of a sample set fold each batch identically
        first = rows[0] if rows.ndim == 3 else rows
        shift32 = np.asarray(first[:QUEUE_ROWS], dtype=np.float64).mean(axis=0).astype(np.float32)
        shift = shift32.astype(np.float64)
        by_columns = _by_columns(rows)
        step = max(MIN_CHUNK_ROWS if dim < 4096 else 64, CHUNK_BYTES // (4 * dim))
        for part in _chunks(rows, step):
            n = part.size // dim
            if by_columns:
                buf = _scratch32((dim, n))
                source, target = _columns(part, buf)
                np.subtract(source, shift32.reshape((dim,) + (1,) * (part.ndim - 1)), out=target)
                product = buf @ buf.T                     # ssyrk
                # along the contiguous axis numpy sums float32 pairwise: ~1e-9 of sum |x|, twice as
                # fast as converting to float64 as it goes
                centred = buf.sum(axis=1).astype(np.float64)
            else:
                buf = _scratch32((n, dim))
                np.subtract(part, shift32, out=buf)
                product = buf.T @ buf
                centred = buf.sum(axis=0, dtype=np.float64)
            self._gram += product
            # the shift's share, s c^T + c s^T + n s s^T = s u^T + u s^T with u = c + n s / 2,
            # is added for many chunks at once by ``_flush`` (one product instead of dim^2 work each)
            self._shifts.append(shift)
            self._shifted.append(centred + 0.5 * n * shift)
            if len(self._shifts) >= SHIFTS:
                self._flush()
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
        """sum_i x_i x_i^T (dim, dim); computed from the rows when ``keep_rows``.

        What is still pending (queued rows, shift corrections, the rows' product) is folded
        here under ``linalg.blas_threads``, as ``collect`` folds the rest: read outside it
        (``calibrate`` saving its file) BLAS ran at its own thread count and the last digits,
        and so ``compress --stats``'s model, followed the machine's cores and OMP_NUM_THREADS."""
        from onnxprune.linalg.common import blas_threads   # numpy only until a Gram is read

        with blas_threads():
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
