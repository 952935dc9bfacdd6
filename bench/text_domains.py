"""Does target-domain calibration beat calibrating on another domain? MiniLM-L3, SST-2 vs AG News.

For each evaluation domain (its evaluation split as in ``bench/text.py``: SST-2 rows 500..1820
in file order; AG News 1000 rows of a seeded permutation), the same fixed recipe is calibrated
once on that domain's own calibration split and once on the other domain's, and both models
are scored on the evaluation split (cosine to the original, kNN and probe accuracy, protocol
of ``../shared/README.md``). Calibration sets: SST-2 rows 0..499; AG News 500 rows of the
seeded permutation (disjoint from its evaluation rows).

Recipes (fixed, so the calibration data is the only difference):

- ``prune``: select-nodes spectral keeping 40 % of every FFN block's units and of every
  attention block's heads (whole heads) + reconstruct-next-layer;
- ``dalr-bc``: low-rank-split DALR keeping 35 % of each MatMul's parameters + bias-compensate.

    python bench/text_domains.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS
from bench.text import MODEL, TEXT
from onnxprune.data.samples import open_samples
from onnxprune.calibration.provider import StatsProvider
from onnxprune.model import jsonable, load_model, write_text_atomic
from onnxprune.pipeline import Recipe, run_pipeline
from onnxprune.recipes import method_passes
from onnxprune.validation import validate


RECIPES = {
    "prune": method_passes("spectral", fraction=0.4),
    "dalr-bc": method_passes("dalr-bc", fraction=0.35),
}


def splits(args) -> dict[str, tuple[dict, dict]]:
    out = {}
    sst = dict(np.load(TEXT / "sst2_test.npz"))
    out["sst2"] = ({k: v[:500] for k, v in sst.items()}, {k: v[500:] for k, v in sst.items()})
    ag = dict(np.load(TEXT / "ag_news_test.npz"))
    order = np.random.default_rng(0).permutation(len(ag["y"]))
    calib, held = np.sort(order[:500]), np.sort(order[500:500 + args.ag_eval])
    out["ag_news"] = ({k: v[calib] for k, v in ag.items()}, {k: v[held] for k, v in ag.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ag-eval", type=int, default=1000)
    args = parser.parse_args()
    model = load_model(MODEL)
    data = splits(args)
    rows = []
    providers = {}
    for calib_domain, (calib, _) in data.items():
        providers[calib_domain] = StatsProvider({"target": open_samples(calib, model, name=f"{calib_domain} calib")},
                                                batch_size=32, folds=2, progress=False, seed=0)
    for eval_domain, (_, held) in data.items():
        held_set = open_samples(held, model, name=f"{eval_domain} eval")
        for name, passes in RECIPES.items():
            for calib_domain in data:
                compressed, _ = run_pipeline(model, Recipe(passes=passes, calib_size=None), providers[calib_domain])
                v = validate(model, compressed, held_set, measure_latency=False)
                e = v.embedding
                rows.append({"evaluated on": eval_domain, "recipe": name, "calibrated on": calib_domain,
                             "macs": v.macs_candidate / v.macs_reference, "cosine": e["cosine"],
                             "knn_reference": e["knn_reference"], "knn": e["knn_candidate"],
                             "probe_reference": e.get("probe_reference"), "probe": e.get("probe_candidate")})
                print(json.dumps(jsonable(rows[-1])), file=sys.stderr, flush=True)
    lines = ["# Calibration domain: own domain vs the other (MiniLM-L3, SST-2 and AG News)", "",
             "Command: `python bench/text_domains.py --ag-eval 600`; splits and recipes in the module docstring.", "",
             "| evaluated on | recipe | calibrated on | MACs % | cosine | kNN % (orig) | probe % (orig) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        probe = "n/a" if r["probe"] is None else f"{100 * r['probe']:.1f} ({100 * r['probe_reference']:.1f})"
        lines.append(f"| {r['evaluated on']} | {r['recipe']} | {r['calibrated on']} | {100 * r['macs']:.1f} | "
                     f"{r['cosine']:.4f} | {100 * r['knn']:.1f} ({100 * r['knn_reference']:.1f}) | {probe} |")
    write_text_atomic(RESULTS / "text_domains.md", "\n".join(lines) + "\n")
    write_text_atomic(RESULTS / "text_domains.json", json.dumps(jsonable(rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
