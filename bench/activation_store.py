"""correct-drift with and without the statistics provider's activation store.

    python bench/activation_store.py        # writes bench/results/activation_store.md

ResNet-20 and MobileNetV2 (the calibration split and preprocessing of bench/planner.py),
the recipe spectral --flops 0.7 + reconstruct-next-layer + correct-drift run twice through
``run_pipeline``: with ``StatsProvider(activation_bytes=0)`` (every correct-drift stage runs
the model prefix again) and with the default store (each stage runs only the layers since
the last). Wall time of the whole pipeline, calibration passes, and the largest relative
difference of the resulting weights.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
from onnx import numpy_helper

from bench.common import RESULTS, machine, markdown_table, no_options
from bench.planner import MODELS
from onnxprune.api import as_model, compress_samples
from onnxprune.calibration.provider import ACTIVATION_BYTES, StatsProvider
from onnxprune.pipeline import Recipe, run_pipeline

PASSES = (("select-nodes", {"criterion": "spectral", "flops": 0.7}), ("reconstruct-next-layer", {}),
          ("correct-drift", {}))


def run(name: str) -> list:
    spec = MODELS[name]
    model = as_model(spec["model"])
    recipe = Recipe(passes=(), plan={"max_drop": 1.0}, calib_size=spec["calib_size"], preprocess=spec["preprocess"])
    samples, *_ = compress_samples(model, recipe, spec["data"])
    calib = samples["target"].in_memory()
    weights, row = {}, [name, len(calib)]
    for budget in (0, ACTIVATION_BYTES):
        provider = StatsProvider({"target": calib}, batch_size=32, folds=2, progress=False, activation_bytes=budget)
        started = time.perf_counter()
        compressed, _ = run_pipeline(model, Recipe(passes=PASSES, folds=2), provider)
        row += [f"{time.perf_counter() - started:.1f}", provider.collections]
        weights[budget] = {t.name: numpy_helper.to_array(t) for t in compressed.graph.initializer}
    a, b = weights[0], weights[ACTIVATION_BYTES]
    worst = max(float(np.abs(a[k].astype(np.float64) - b[k]).max() / max(float(np.abs(a[k]).max()), 1e-30))
                for k in a if a[k].dtype.kind == "f" and a[k].size)
    return row + ["identical" if worst == 0 else f"{worst:.1e}"]


def main() -> None:
    no_options(__doc__)
    rows = [run(name) for name in ("resnet20", "mobilenetv2")]
    text = "\n".join([
        "# correct-drift with the activation store", "",
        f"`python bench/activation_store.py` on {machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        "Recipe: spectral --flops 0.7 (global threshold) + reconstruct-next-layer + correct-drift, on the "
        "calibration split of bench/planner.py; 'passes' = calibration runs the provider made.", "",
        markdown_table(["model", "calibration samples", "no store (s)", "passes", "store (s)", "passes",
                        "weights: largest relative difference"], rows), ""])
    (RESULTS / "activation_store.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
