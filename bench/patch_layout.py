"""im2col with every output position: the feature-by-feature copy `patches()` makes against the
position-by-position copy it made before (same values, rows x features either way).

(a) the copy alone: one ReLU'd batch half (16 samples) of each ResNet-20 3x3 input shape, one BLAS
thread, best of 30; (b) `collect()` of ResNet-20's 19 3x3 convolutions' patch statistics at
`positions = 0` (every position) on 256 calibration images, with `patches()` as it is and with the
position-by-position copy patched in, interleaved, best of 5, and the largest relative difference of
their Grams. Writes bench/results/patch_layout.md.

    python bench/patch_layout.py
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
from threadpoolctl import threadpool_limits

from bench.calibration_speed import TASKS, decoded_set
from bench.common import RESULTS, halves, machine, markdown_table, no_options
from onnxprune.calibration import requests as requests_module
from onnxprune.calibration.collect import collect
from onnxprune.data.samples import open_samples
from onnxprune.graph.layers import find_linear_layers
from onnxprune.model import load_model
from onnxprune.passes.low_rank_split import layer_request

current = requests_module.patches


def by_position(x, *, kernel, strides=(), pads=(), dilations=(), at=None):
    """The copy before: (N, *out_spatial, C, *kernel) laid out position by position."""
    if at is not None:
        return current(x, kernel=kernel, strides=strides, pads=pads, dilations=dilations, at=at)
    return _old_copy(x, kernel, strides, pads, dilations)


def _old_copy(x, kernel, strides, pads, dilations):
    nd = len(kernel)
    strides = tuple(strides) or (1,) * nd
    dilations = tuple(dilations) or (1,) * nd
    pads = tuple(pads) or (0,) * (2 * nd)
    if any(pads):
        padded = np.zeros(x.shape[:2] + tuple(x.shape[2 + i] + pads[i] + pads[nd + i] for i in range(nd)), x.dtype)
        padded[(slice(None), slice(None)) + tuple(slice(pads[i], pads[i] + x.shape[2 + i]) for i in range(nd))] = x
        x = padded
    extent = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilations))
    window = np.lib.stride_tricks.sliding_window_view(x, extent, axis=tuple(range(2, 2 + nd)))
    window = window[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
                    + tuple(slice(None, None, d) for d in dilations)]
    n, c = window.shape[:2]
    out = window.shape[2:2 + nd]
    order = (0,) + tuple(range(2, 2 + nd)) + (1,) + tuple(range(2 + nd, 2 + 2 * nd))
    return window.transpose(order).reshape(n * math.prod(out), c * math.prod(kernel))


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    no_options(__doc__)
    rng = np.random.default_rng(0)
    copy_rows = []
    with threadpool_limits(1):
        for channels, side in ((16, 32), (32, 16), (64, 8)):
            x = np.maximum(rng.standard_normal((16, channels, side, side), dtype=np.float32), 0)
            args = {"kernel": (3, 3), "pads": (1, 1, 1, 1)}
            assert np.array_equal(current(x, **args), _old_copy(x, (3, 3), (), (1, 1, 1, 1), ()))
            new = best(lambda x=x, args=args: current(x, **args), 30)
            old = best(lambda x=x: _old_copy(x, (3, 3), (), (1, 1, 1, 1), ()), 30)
            copy_rows.append([f"16 x {channels} x {side} x {side}", f"{1e3 * old:.2f}", f"{1e3 * new:.2f}",
                              f"{old / new:.1f}x"])

    task = TASKS["resnet20/cifar10-jpeg"]
    model = load_model(task.model)
    calib, _ = halves(open_samples(task.target, model, preprocess=task.preprocess), 256, None,
                      shuffle=task.sorted_by_class)
    data = decoded_set(model, calib)
    wanted = [layer_request(layer, 0) for layer in find_linear_layers(model)
              if layer.op == "Conv" and not layer.skip and max(layer.attrs.get("kernel_shape", [1])) > 1]

    def run():
        return collect(model, {"target": data}, wanted, batch_size=32, folds=2, progress=False)

    times = {"feature by feature (now)": [], "position by position (before)": []}
    stats = {}
    for _ in range(5):
        for label, seconds in times.items():
            requests_module.patches = current if label.startswith("feature") else by_position
            try:
                t = time.perf_counter()
                stats[label] = run()
                seconds.append(time.perf_counter() - t)
            finally:
                requests_module.patches = current
    a, b = stats.values()
    worst = max(float(np.abs(a.moments(r, "target", fold=f).gram - b.moments(r, "target", fold=f).gram).max()
                      / np.abs(b.moments(r, "target", fold=f).gram).max()) for r in wanted for f in (0, 1))
    collect_rows = [[label, f"{min(v):.2f}"] for label, v in times.items()]
    text = "\n".join([
        "# im2col layout: feature by feature against position by position", "",
        f"`python bench/patch_layout.py` on {machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "", "## The copy alone (one BLAS thread, best of 30, ms)", "",
        markdown_table(["ReLU'd batch half", "position by position", "feature by feature", "faster"], copy_rows), "",
        (f"## collect(): ResNet-20's {len(wanted)} 3x3 convolutions, every position, {len(data)} images "
         "(best of 5, interleaved, s)"), "",
        markdown_table(["patches() copy", "seconds"], collect_rows), "",
        (f"Largest relative difference of the Grams between the two: {worst:.1e} (float32 products summed in "
         "another order)."), ""])
    (RESULTS / "patch_layout.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
