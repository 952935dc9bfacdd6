"""What to gather at one tensor (``StatRequest``: "features", im2col "patches" of a Conv
input, or per-sample "pooled" responses) and how a batch of activations becomes rows."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping

import numpy as np

from onnxprune.calibration.moments import (
    MIN_CHUNK_ROWS,
)

KINDS = ("features", "patches", "pooled")


POOLS = ("max", "mean")


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
    """Yield the rows of ``x`` with features on ``axis`` and samples on every other.

    Features on the last axis: one (k, C) view, no copy. Otherwise (NCHW: the N*H*W
    positions of C channels) one (N, H*W, C) view ``x.reshape(N, C, H*W).transpose(0, 2, 1)``,
    which ``Moments.update`` copies along its contiguous axis, several samples per BLAS call.
    """
    axis = axis % x.ndim
    channels = x.shape[axis]
    lead = math.prod(x.shape[:axis])
    trail = math.prod(x.shape[axis + 1:])
    if trail == 1:
        yield x.reshape(lead, channels)
        return
    yield x.reshape(lead, channels, trail).transpose(0, 2, 1)


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
    then one copy: no Python loop over positions. Without ``at`` the copy is laid out feature by
    feature (the result is the transpose of a C-contiguous (C * prod(kernel), rows) array): each
    feature's values then come from one channel's contiguous rows, 3-6x faster than copying
    position by position, and ``Moments.update`` folds that layout as it folds NCHW features.
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
        padded = np.zeros(x.shape[:2] + tuple(x.shape[2 + i] + pads[i] + pads[nd + i] for i in range(nd)),
                          dtype=x.dtype)
        padded[(slice(None), slice(None)) + tuple(slice(pads[i], pads[i] + x.shape[2 + i]) for i in range(nd))] = x
        x = padded
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
    if at is not None:
        # (N, *out_spatial, C, *kernel)
        order = (0,) + tuple(range(2, 2 + nd)) + (1,) + tuple(range(2 + nd, 2 + 2 * nd))
        window = window.transpose(order)
        at = np.asarray(at, dtype=np.int64)
        picked = window[(np.arange(n)[:, None],) + np.unravel_index(at, out_spatial)]   # (N, k, C, *kernel)
        return picked.reshape(n * at.shape[1], c * math.prod(kernel))
    # (C, *kernel, N, *out_spatial): copied with the last spatial axis innermost, then transposed back
    order = (1,) + tuple(range(2 + nd, 2 + 2 * nd)) + (0,) + tuple(range(2, 2 + nd))
    return window.transpose(order).reshape(c * math.prod(kernel), n * math.prod(out_spatial)).T
