"""How much the default goal's result depends on which samples calibrate, check and evaluate.

`onnxprune compress` with no budget (`--max-drop 1`) run once per `--seed` (the seed of the
calibration / evaluation split, of the --calib-size cap and of the sampling): each run plans on
its own calibration samples and is evaluated on its own held-out split. The spread of the MACs
reached and of the held-out drop is what the planner's check (a finite sample) cannot know.
Writes bench/results/planner_seeds.md and .json (every model by default: about 30 minutes here; the
digit models on USPS take seconds each, ResNet-20 and MobileNetV2 minutes).

    python bench/planner_seeds.py [--only lenet|mnist_cnn|mnist_extdata|resnet20|mobilenetv2 ...] [--seeds 0,1,2,3]
                                  [--flags "--margin 1" --out NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, SHARED, machine, markdown_table
from bench.planner import MODELS

USPS = SHARED / "data/digits/usps_test.npz"
#: the digit models of the README's table (USPS target), then bench/planner.py's
SEEDED = {
    "lenet": dict(model=SHARED / "models/lenet_caffe_mnist.onnx", data=USPS, flags=""),
    "mnist_cnn": dict(model=SHARED / "models/mnist_cnn_fc3136.onnx", data=USPS, flags="--mean 0.5 --std 0.5"),
    "mnist_extdata": dict(model=SHARED / "models/mnist_extdata/mnist.onnx", data=USPS, flags="--mean 0.5 --std 0.5"),
    **MODELS,
}


def command(spec: dict, seed: int, output: Path, flags: str = "") -> list[str]:
    """The user's command: the README's default compress of this model, at ``seed``, plus ``flags``."""
    return (["onnxprune", "compress", str(spec["model"]), "--target-data", str(spec["data"])]
            + shlex.split(spec["flags"]) + shlex.split(flags)
            + ["--seed", str(seed), "--no-latency", "--quiet", "-o", str(output)])


def run(name: str, spec: dict, seed: int, flags: str = "") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / f"{name}.onnx"
        started = time.perf_counter()
        done = subprocess.run(command(spec, seed, output, flags), capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
        report_file = Path(tmp) / f"{name}.report.json"
        if not report_file.exists():
            raise RuntimeError(f"{name} seed {seed}: no report (exit {done.returncode}): {done.stderr[-2000:]}")
        report = json.loads(report_file.read_text())
    plan, validation = report["plan"], report["validation"]
    reference, candidate = 100 * validation["accuracy_reference"], 100 * validation["accuracy_candidate"]
    return {"seed": seed, "exit": done.returncode, "verdict": report.get("verdict"),
            "macs": 100 * validation["macs_candidate"] / validation["macs_reference"],
            "params": 100 * validation["params_candidate"] / validation["params_reference"],
            "sites": len(plan["sites"]), "checked_drop": plan["check"]["drop"], "checked_se": plan["check"]["se"],
            "reserve": plan.get("reserve"),
            "drift": plan["check"].get("drift"), "reference": reference, "candidate": candidate,
            "held_out_drop": reference - candidate, "held_out_se": validation.get("accuracy_drop_se"),
            "untrained_macs": 100 * plan["recovery"]["without_training"]["cost"] if plan.get("recovery") else None,
            "recovery": ({k: plan["recovery"][k] for k in ("trials", "margin", "chosen", "checkpoint_samples")
                          if k in plan["recovery"]} if plan.get("recovery") else None),
            "calibration": plan["calibration_samples"],
            "checked": plan["checked_samples"], "evaluated": validation["samples"], "seconds": seconds}


def markdown(results: dict, argv: list[str], flags: str) -> str:
    extra = f"{flags} " if flags else ""
    lines = [f"# Planner: the default goal across split seeds{f' ({flags})' if flags else ''}", "",
             (f"`python bench/planner_seeds.py {shlex.join(argv)}` on {machine()}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Each row is one "
             f"`onnxprune compress MODEL --target-data DATA <preprocessing> {extra}--seed S --no-latency -o OUT` "
             "(no budget: `--max-drop 1`); the seed draws the calibration / evaluation split, the "
             "--calib-size cap and the samples the checks score, so every row plans, checks and is "
             "evaluated on different samples (calibration and evaluation disjoint in each). 'checked "
             "drop': the planner's cross-fitted check, which with 'reserve' "
             "added must stay within 1 point (`--margin` standard errors, default 1, of the difference between the "
             "check and the evaluation on the held-out samples; before 2026-12-01 half a standard error of the check "
             "alone); 'held-out drop': the final model on the "
             "evaluation split (± its paired standard error); 'seconds': the whole command's wall time "
             "on a shared machine (other jobs may run alongside)."
             + (" With `--finetune`, 'checked drop' is the chosen distilled plan's drop on the checkpoint fold "
                "(calibration-part samples that neither calibrate nor train), 'MACs without training' where the "
                "planner's own search stopped, 'distilled plans' how many were trained."
                if "--finetune" in flags else "")), ""]
    for name, rows in results.items():
        first = rows[0]
        lines += [(f"## {name} ({first['calibration']} calibration samples, {first['checked']} checked, "
                   f"{first['evaluated']} evaluated)"), ""]
        trained = any(r.get("untrained_macs") is not None for r in rows)
        table = [[r["seed"], f"{r['macs']:.1f}%", f"{r['params']:.1f}%", r["sites"],
                  f"{r['checked_drop']:.2f} ± {r['checked_se']:.2f}",
                  "" if r.get("reserve") is None else f"{r['reserve']:.2f}", f"{r['reference']:.2f} -> {r['candidate']:.2f}",
                  f"{r['held_out_drop']:.2f}" + (f" ± {r['held_out_se']:.2f}" if r.get("held_out_se") is not None else ""),
                  r["verdict"], f"{r['seconds']:.0f}"]
                 + ([f"{r['untrained_macs']:.1f}%", len(r["recovery"]["trials"])] if trained else []) for r in rows]
        lines += [markdown_table(["seed", "MACs", "params", "sites", "checked drop", "reserve", "held-out top-1 %",
                                  "held-out drop", "verdict", "seconds"]
                                 + (["MACs without training", "distilled plans"] if trained else []), table), ""]
        macs = [r["macs"] for r in rows]
        checked = statistics.mean(r["checked_drop"] for r in rows)
        held = statistics.mean(r["held_out_drop"] for r in rows)
        lines += [(f"MACs reached {min(macs):.1f}-{max(macs):.1f}% (mean {statistics.mean(macs):.1f}%); "
                   f"mean checked drop {checked:.2f} against mean held-out drop {held:.2f} points; "
                   f"{sum(r['verdict'] == 'passed' for r in rows)} of {len(rows)} passed."), ""]
    lines += ["<details><summary>raw numbers</summary>", "", "```json",
              json.dumps(results, indent=1), "```", "", "</details>", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(SEEDED), action="append")
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--flags", default="", help="more compress flags, e.g. '--margin 1'")
    ap.add_argument("--out", default="planner_seeds", help="bench/results/OUT.md and .json")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    for name in args.only or list(SEEDED):
        results[name] = []
        for seed in seeds:
            row = run(name, SEEDED[name], seed, args.flags)
            print(f"{name} seed {seed}: {row['macs']:.1f}% MACs, checked {row['checked_drop']:.2f} ± "
                  f"{row['checked_se']:.2f}, held out {row['held_out_drop']:.2f} ({row['seconds']:.0f} s, "
                  f"load {os.getloadavg()[0]:.1f})", flush=True)
            results[name].append(row)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(results, argv, args.flags))
    print(f"wrote {RESULTS / args.out}.md")


if __name__ == "__main__":
    main()
