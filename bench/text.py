"""Sentence encoder: paraphrase-MiniLM-L3 compressed for SST-2 and AG News (../shared/data/text).

Per domain, calibration and evaluation samples are disjoint:

- SST-2 (1821 sentences, L = 64): the first ``--sst2-calib`` (500) in file order calibrate,
  the other 1321 evaluate;
- AG News (7600, L = 128, stored in blocks of one class): a seeded permutation (seed 0) gives
  ``--ag-calib`` (500) calibration and ``--ag-eval`` (1000) evaluation sentences, each kept
  in file order (a subsample: the whole set takes minutes per model on this machine).

On the evaluation samples, in their order, the first half is the kNN index / probe training
half and the second half the queries / test half (k = 10, cosine; LogisticRegression(C=1,
max_iter=5000) on L2-normalised embeddings), for the original and for each compressed model;
cosine = mean cosine similarity of the compressed model's sentence embedding (output 461)
with the original's.

Rows, at 70 % and 50 % of the model's MACs (``--flops``; MACs per token of the whole encoder):

- ``spectral``: the planner restricted to FFN pruning (spectral selection + least-squares
  reconstruction of the second FFN matrix) = ``compress --method spectral --flops F``;
- ``wanda (no reconstruction)``: the same per-block unit counts, units ranked by structured
  Wanda and the second matrix only loses the pruned rows (what onnxsim's structured Wanda does);
  ``wanda + reconstruction``: the same ranking with the least-squares correction;
- ``dalr-bc``: the planner restricted to DALR low rank + bias compensation of the 18 projection
  and FFN MatMuls = ``compress --method dalr-bc --flops F``;
- ``auto``: the planner's mix of FFN pruning and low rank = ``compress --flops F``.

All planner rows come from one sensitivity run per domain (the family-restricted planners reuse
its curves: same sites, same statistics). Writes bench/results/text.md and text.json.

    python bench/text.py [--domains sst2,ag_news] [--budgets 0.7,0.5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxprune.calibration.readers import open_samples  # noqa: E402
from onnxprune.model import jsonable, load_model, write_text_atomic  # noqa: E402
from onnxprune.pipeline import Recipe, run_pipeline  # noqa: E402
from onnxprune.plan.planner import FOLDS, Planner, PlanOptions  # noqa: E402
from onnxprune.validate import validate  # noqa: E402

SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "bench" / "results"
MODEL = SHARED / "models" / "minilm_l3_paraphrase.onnx"
TEXT = SHARED / "data" / "text"


def splits(domain: str, args) -> tuple[dict, dict, str]:
    data = dict(np.load(TEXT / f"{domain}_test.npz"))
    n = len(data["y"])
    if domain == "sst2":
        calib, held = np.arange(args.sst2_calib), np.arange(args.sst2_calib, n)
        how = f"first {args.sst2_calib} calibrate, the other {n - args.sst2_calib} evaluate (file order)"
    else:
        order = np.random.default_rng(0).permutation(n)
        calib, held = np.sort(order[:args.ag_calib]), np.sort(order[args.ag_calib:args.ag_calib + args.ag_eval])
        how = (f"seeded permutation (seed 0): {args.ag_calib} calibrate, {args.ag_eval} evaluate, each in file "
               f"order (of {n})")
    pick = lambda rows: {k: v[rows] for k, v in data.items()}  # noqa: E731
    return pick(calib), pick(held), how


def row(name: str, budget: float, model, compressed, held, plan: dict | None, seconds: float) -> dict:
    v = validate(model, compressed, held, measure_latency=False)
    e = v.embedding
    return {"method": name, "budget": budget, "macs": v.macs_candidate / v.macs_reference,
            "params": v.params_candidate / v.params_reference, "cosine": e["cosine"], "cosine_p05": e["cosine_p05"],
            "knn_reference": e["knn_reference"], "knn": e["knn_candidate"],
            "probe_reference": e.get("probe_reference"), "probe": e.get("probe_candidate"),
            "sites": plan, "seconds": round(seconds, 1)}


def short(name: str) -> str:
    """``/model/.../encoder/layer.1/intermediate/dense/MatMul`` -> ``L1 intermediate``."""
    parts = name.split("/encoder/")[-1].split("/")
    layer = parts[0].replace("layer.", "L")
    return f"{layer} {'.'.join(p for p in parts[1:-1] if p not in ('dense', 'self'))}"


def composition(sites) -> str:
    """How many FFN blocks were pruned and layers split, from a planner row's sites."""
    if not isinstance(sites, list):
        return "same counts as spectral"
    pruned = [s.split(" prune ")[1] for s in sites if " prune " in s]
    split = [s for s in sites if " low-rank " in s]
    parts = []
    if pruned:
        parts.append("FFN units kept " + ", ".join(pruned))
    if split:
        parts.append(f"{len(split)} MatMuls split")
    return "; ".join(parts) or "nothing"


def counts_of(passes) -> dict[str, int]:
    for name, opts in passes:
        if name == "select-nodes":
            return dict(opts.get("counts") or {})
    return {}


def run_domain(domain: str, args, log) -> tuple[list[dict], dict]:
    model = load_model(MODEL)
    calib_data, held_data, how = splits(domain, args)
    calib, held = open_samples(calib_data, model, name=f"{domain} calibration"), \
        open_samples(held_data, model, name=f"{domain} evaluation")
    started = time.perf_counter()
    auto = Planner(model, calib, options=PlanOptions(), batch_size=32, seed=0)
    auto.sensitivity()
    sens_seconds = time.perf_counter() - started
    log(f"{domain}: sensitivity of {len(auto.sites)} sites in {sens_seconds:.0f} s")
    planners = {"auto": auto}
    for name, family in (("spectral", "prune"), ("dalr-bc", "low-rank")):
        p = Planner(model, calib, options=PlanOptions(families=(family,)), batch_size=32, seed=0,
                    provider=auto.provider)
        p.curves = {k: v for k, v in auto.curves.items() if k in {s.key for s in p.sites}}
        planners[name] = p
    rows = []
    base = Recipe(passes=(("select-nodes", {"counts": {}}),), calib_size=None, folds=FOLDS)
    for budget in args.budgets:
        for name in ("spectral", "dalr-bc", "auto"):
            t0 = time.perf_counter()
            result = planners[name].for_budget(budget)
            passes = tuple(result["passes"])
            recipe = dataclasses.replace(base, passes=passes)
            compressed, _ = run_pipeline(auto.original, recipe, auto.provider)
            sites = [f"{short(s['site'])} {s['family']} {s['size']}/{s['of']}" for s in result["sites"]]
            rows.append(row(name, budget, auto.original, compressed, held, sites, time.perf_counter() - t0))
            log(f"{domain} {name} {budget}: {json.dumps(jsonable({k: rows[-1][k] for k in ('macs', 'cosine', 'knn', 'probe')}))}")
            if name == "spectral":
                counts = counts_of(passes)
                for label, reconstruct in (("wanda (no reconstruction)", False), ("wanda + reconstruction", True)):
                    t0 = time.perf_counter()
                    recipe = dataclasses.replace(base, passes=(
                        ("select-nodes", {"criterion": "wanda", "counts": counts}),
                        ("reconstruct-next-layer", {"reconstruct": reconstruct})))
                    compressed, _ = run_pipeline(auto.original, recipe, auto.provider)
                    rows.append(row(label, budget, auto.original, compressed, held, {"counts": counts},
                                    time.perf_counter() - t0))
                    log(f"{domain} {label} {budget}: cosine {rows[-1]['cosine']:.4f} knn {rows[-1]['knn']:.4f}")
    info = {"split": how, "calibration": len(calib), "evaluation": len(held), "sensitivity_seconds": round(sens_seconds),
            "sites": len(auto.sites)}
    return rows, info


def table(domain: str, rows: list[dict], info: dict) -> list[str]:
    ref = rows[0]
    probe_ref = "n/a" if ref["probe_reference"] is None else f"{100 * ref['probe_reference']:.1f}"
    lines = [f"### {domain}", "",
             f"{info['split']}; kNN index / queries = halves of the {info['evaluation']} evaluation sentences. "
             f"Original: kNN {100 * ref['knn_reference']:.1f} %, probe {probe_ref} %.", "",
             "| MACs budget | method | MACs % | params % | cosine (mean / 5th pct) | kNN % (orig) | probe % (orig) | plan |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        probe = "n/a" if r["probe"] is None else f"{100 * r['probe']:.1f} ({100 * r['probe_reference']:.1f})"
        lines.append(f"| {100 * r['budget']:.0f} % | {r['method']} | {100 * r['macs']:.1f} | {100 * r['params']:.1f} | "
                     f"{r['cosine']:.4f} / {r['cosine_p05']:.4f} | {100 * r['knn']:.1f} ({100 * r['knn_reference']:.1f}) | "
                     f"{probe} | {composition(r['sites'])} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", default="sst2,ag_news")
    parser.add_argument("--budgets", default="0.7,0.5")
    parser.add_argument("--sst2-calib", type=int, default=500)
    parser.add_argument("--ag-calib", type=int, default=500)
    parser.add_argument("--ag-eval", type=int, default=1000)
    parser.add_argument("--out", default="text")
    args = parser.parse_args()
    args.budgets = [float(b) for b in args.budgets.split(",")]

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results, lines = {}, ["# Sentence encoder: paraphrase-MiniLM-L3 on SST-2 and AG News", "",
                          "Command: `python bench/text.py " + " ".join(sys.argv[1:]) + "`. See the module docstring for "
                          "the splits and rows.", ""]
    for domain in args.domains.split(","):
        rows, info = run_domain(domain, args, log)
        results[domain] = {"rows": rows, **info}
        lines += table(domain, rows, info)
        write_text_atomic(RESULTS / f"{args.out}.md", "\n".join(lines) + "\n")
        write_text_atomic(RESULTS / f"{args.out}.json", json.dumps(jsonable(results), indent=2) + "\n")


if __name__ == "__main__":
    main()
