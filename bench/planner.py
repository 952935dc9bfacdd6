"""Accuracy-driven planning against one global threshold, on ResNet-20 and MobileNetV2.

For each model, from one calibration and one sensitivity run (exactly what `onnxprune
compress` and `onnxprune sweep` do with the flags printed in the results):
  (a) the default goal, --max-drop 1: MACs reached, drop on the held-out split;
  (b) a sweep of MAC budgets: the planned model against today's single global spectral
      threshold (select-nodes over every prunable group, reconstruct-next-layer) at the
      same whole-model MACs;
  (c) the planner's own cost against one plain (global-threshold) compress;
  (d) sensitivity heat maps.
Writes bench/results/planner.md and planner_*.png.

    python bench/planner.py [--only resnet20|mobilenetv2] [--quick | --budgets 0.8,0.75]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, SHARED, machine, markdown_table
from onnxprune.api import as_model, compress_samples, make_planner
from onnxprune.graph.groups import find_channel_groups
from onnxprune.passes.select_nodes import Footprint
from onnxprune.pipeline import Recipe, run_pipeline
from onnxprune.plan import figures
from onnxprune.plan.planner import FOLDS, Planner
from onnxprune.validation import validate

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
MODELS = {
    "resnet20": dict(
        model=SHARED / "models/resnet20_cifar10.onnx", data=SHARED / "data/cifar10/cifar10_test_jpeg.npz",
        preprocess=IMAGENET, calib_size=1000, budgets=(0.9, 0.8, 0.7, 0.6, 0.5),
        flags="--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --calib-size 1000"),
    "mobilenetv2": dict(
        model=SHARED / "models/mobilenetv2_imagenet_fp32.onnx", data=SHARED / "data/imagenet_samples",
        preprocess={"resize": 256, "center_crop": 224, **IMAGENET}, calib_size=None,
        budgets=(0.9, 0.85, 0.8, 0.75, 0.7),
        flags="--resize 256 --center-crop 224 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225"),
}


def accuracy(report) -> float:
    return 100 * report.accuracy_candidate


def global_threshold(planner: Planner, whole: float, drift: bool = False) -> Recipe:
    """Today's --allocation global at ``whole`` of the model's MACs: one spectral retention
    threshold over every prunable group, its budget set on the touched layers' MACs."""
    groups = [g for g in find_channel_groups(planner.original) if g.prunable]
    touched = Footprint(planner.original, groups).full()[1]
    total = planner.costs.total
    fraction = (whole * total - (total - touched)) / touched
    passes = (("select-nodes", {"criterion": "spectral", "flops": max(fraction, 1e-3)}), ("reconstruct-next-layer", {}))
    return Recipe(passes=passes + ((("correct-drift", {}),) if drift else ()), folds=2)


def run(name: str, spec: dict, quick: bool, budgets: tuple[float, ...] = ()) -> dict:
    model = as_model(spec["model"])
    recipe = Recipe(passes=(), plan={"max_drop": 1.0}, calib_size=spec["calib_size"], preprocess=spec["preprocess"])
    samples, held_out, _, calib, *_ = compress_samples(model, recipe, spec["data"])
    started = time.perf_counter()
    planner = make_planner(model, samples, recipe, uncapped=calib, progress=False,   # as compress plans
                           evaluated=len(held_out))
    out = {"name": name, "calibration": len(samples["target"]), "checked": len(planner.checked),
           "evaluation": len(held_out), "rows": [],
           "load": [round(os.getloadavg()[0], 1)]}

    def finish(result, label, budget=None):
        t0 = time.perf_counter()
        final = Recipe(passes=tuple(result["passes"]), folds=FOLDS)
        small, _ = run_pipeline(planner.original, final, planner.provider)
        v = validate(planner.original, small, held_out, measure_latency=False)
        return {"label": label, "budget": budget, "macs": v.macs_candidate / v.macs_reference,
                "accuracy": accuracy(v), "reference": 100 * v.accuracy_reference, "agreement": 100 * v.agreement,
                "checked_drop": result["check"]["drop"], "sites": len(result["sites"]),
                "seconds": time.perf_counter() - t0}

    result = planner.for_max_drop(1.0)
    out["plan_seconds"] = time.perf_counter() - started
    out["plan_timings"] = {k: round(v, 2) for k, v in planner.timings.items() if k != "search"}
    out["plan_trials"] = sum(len(rows) for rows in planner.curves.values())
    out["plan_checks"] = len(planner.checks)
    out["default"] = finish(result, "planned, --max-drop 1")
    out["default"]["families"] = sorted({s["family"] for s in result["sites"]})
    budgets = budgets or (spec["budgets"][:2] if quick else spec["budgets"])
    for b in budgets:
        out["rows"].append(finish(planner.for_budget(b), "planned", b))
        for label, drift in (("global threshold", False), ("global + correct-drift", True)):
            t0 = time.perf_counter()
            glob, _ = run_pipeline(planner.original, global_threshold(planner, b, drift), planner.provider)
            v = validate(planner.original, glob, held_out, measure_latency=False)
            out["rows"].append({"label": label, "budget": b, "macs": v.macs_candidate / v.macs_reference,
                                "accuracy": accuracy(v), "agreement": 100 * v.agreement, "sites": None,
                                "checked_drop": None, "seconds": time.perf_counter() - t0})
    out["planner"] = planner.report()
    out["plain_compress_seconds"] = next(r["seconds"] for r in out["rows"] if r["label"] == "global threshold") \
        + planner.timings.get("calibration", 0.0)
    planner.sensitivity()          # every ladder, for the heat map (the goals measured what they needed)
    heat = figures.sensitivity_heatmap(planner.curves, RESULTS / f"planner_{name}_sensitivity.png",
                                       title=f"{name}: damage of each site alone")
    pareto = figures.pareto_chart(
        {label: [(r["macs"], r["accuracy"]) for r in out["rows"] if r["label"] == label]
         for label in ("planned", "global threshold", "global + correct-drift")},
        RESULTS / f"planner_{name}_pareto.png", reference=out["default"]["reference"],
        title=f"{name}: top-1 on {len(held_out)} held-out samples")
    out["figures"] = [heat.name, pareto.name]
    out["load"].append(round(os.getloadavg()[0], 1))
    return out


def markdown(results: list[dict]) -> str:
    lines = ["# Planner: accuracy-driven compression against one global threshold", "",
             f"Machine: {machine()}. Calibration and evaluation samples are disjoint (the split of "
             "`compress`, seed 0); the planner checks itself on the calibration samples (cross-fitted "
             "halves) and on the samples of the calibration split that `--calib-size` left out "
             "(`--check-extra`, 4000 at most), never on the evaluation split. Regenerate: `python bench/planner.py` (`--only resnet20|mobilenetv2`). "
             "Times depend on what else runs: each model's section gives the load average seen at its start "
             "and end; only ratios within one run mean anything. The planned models include `correct-drift` "
             "(the planner's default); `global + correct-drift` adds that pass to the global threshold.", ""]
    for r in results:
        spec = MODELS[r["name"]]
        d = r["default"]
        measured = sorted({row["budget"] for row in r["rows"]}, reverse=True)
        load = "-".join(str(x) for x in r.get("load", []))
        extra = r.get("checked", r["calibration"]) - r["calibration"]
        lines += [f"## {r['name']} ({r['calibration']} calibration"
                  f"{f' + {extra} checked only' if extra else ''} / {r['evaluation']} evaluation samples, "
                  f"load average {load or 'not recorded'})", "",
                  f"- Default goal (`--max-drop 1`, no budget): **{100 * d['macs']:.1f}% of the MACs**, top-1 "
                  f"{d['reference']:.2f}% -> {d['accuracy']:.2f}% on the held-out split (drop "
                  f"{d['reference'] - d['accuracy']:.2f} points; the plan's own cross-fitted check said "
                  f"{d['checked_drop']:.2f}), {d['sites']} sites ({', '.join(d['families'])}).",
                  f"  `onnxprune compress ../{spec['model'].relative_to(SHARED.parent)} --target-data "
                  f"../{spec['data'].relative_to(SHARED.parent)} {spec['flags']} -o out.onnx`",
                  f"- Planner cost: {r['plan_seconds']:.0f} s for calibration + sensitivity + checks "
                  f"(seconds: {json.dumps(r.get('plan_timings', r['planner']['seconds']))}; "
                  f"{r.get('plan_trials', '?')} single-site trials, {r.get('plan_checks', '?')} checks) "
                  f"against {r['plain_compress_seconds']:.0f} s "
                  f"for one plain global-threshold compress (calibration + rewrite): "
                  f"**{r['plan_seconds'] / max(r['plain_compress_seconds'], 1e-9):.1f}x**.", "",
                  f"At equal MACs, `onnxprune sweep ... --flops {','.join(str(b) for b in measured)}` "
                  "against `--allocation global --method spectral` (top-1 % on the held-out split):", ""]
        rows = []
        for b in sorted({row["budget"] for row in r["rows"]}, reverse=True):
            p = next(x for x in r["rows"] if x["budget"] == b and x["label"] == "planned")
            g = next(x for x in r["rows"] if x["budget"] == b and x["label"] == "global threshold")
            gd = next((x for x in r["rows"] if x["budget"] == b and x["label"] == "global + correct-drift"),
                      {"accuracy": float("nan")})
            rows.append([f"{100 * b:.0f}%", f"{100 * p['macs']:.1f}%", f"**{p['accuracy']:.2f}**"
                         if p["accuracy"] >= g["accuracy"] else f"{p['accuracy']:.2f}", f"{p['checked_drop']:.2f}",
                         f"{100 * g['macs']:.1f}%", f"{g['accuracy']:.2f}", f"{gd['accuracy']:.2f}",
                         f"{p['accuracy'] - g['accuracy']:+.2f}"])
        lines += [markdown_table(["budget", "planned MACs", "planned top-1", "checked drop", "global MACs",
                                  "global top-1", "global + correct-drift", "planned - global"], rows), "",
                  f"Original: {d['reference']:.2f}%. Plots: " + ", ".join(f"[{f}]({f})" for f in r["figures"]), ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(MODELS))
    parser.add_argument("--quick", action="store_true", help="two budgets per model")
    parser.add_argument("--budgets", type=lambda s: tuple(float(x) for x in s.split(",")), default=(),
                        help="comma-separated MAC fractions instead of the model's list")
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    stored = RESULTS / "planner.json"
    # --only re-measures one model and keeps the other's stored rows
    results = json.loads(stored.read_text()) if args.only and stored.exists() else []
    with threadpool_limits(limits=1, user_api="blas"):
        for name, spec in MODELS.items():
            if args.only and name != args.only:
                continue
            fresh = run(name, spec, args.quick, args.budgets)
            if args.only and stored.exists():     # re-read: another run may have stored its model meanwhile
                results = json.loads(stored.read_text())
            results = [r for r in results if r["name"] != name] + [fresh]
            results.sort(key=lambda r: list(MODELS).index(r["name"]))
            stored.write_text(json.dumps(results, indent=2, default=str) + "\n")
            (RESULTS / "planner.md").write_text(markdown(results))
            print(markdown(results), flush=True)


if __name__ == "__main__":
    main()
