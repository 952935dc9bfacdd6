"""Planner variants tried on ResNet-20 for `--max-drop 1` at 80 % of the MACs, and not kept.

Each row is the README's default ResNet-20 `onnxprune compress` (no budget: `--max-drop 1`) at a
split seed, with one change to the planner patched in for that run:
  drift-trials   every single-site sensitivity trial also runs `correct-drift`, so the chain orders
                 the sites by their damage after the correction;
  positions=N    the low-rank sites' patch statistics from N output positions a sample (0: all)
                 instead of 16.
The default rows, same seeds, are in planner_seeds.md. Writes bench/results/planner_variants.md.

    python bench/planner_variants.py [--runs drift-trials:0,drift-trials:3,positions=0:0,positions=64:0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, machine, markdown_table
from bench.planner import MODELS
from bench.planner_seeds import command
from onnxprune.cli import main as cli
from onnxprune.plan import planner as planner_module

RUNS = "drift-trials:0,drift-trials:3,positions=0:0,positions=64:0"


def patched(variant: str):
    """plan_passes with the variant's change, for planner_module.plan_passes."""
    original = planner_module.plan_passes
    if variant == "drift-trials":
        return lambda chosen, options, *, drift=None: original(chosen, options, drift=True)
    if variant.startswith("positions="):
        count = int(variant.split("=", 1)[1])

        def with_positions(chosen, options, *, drift=None):
            return [(name, {**opts, "positions": count} if name == "low-rank-split" else opts)
                    for name, opts in original(chosen, options, drift=drift)]
        return with_positions
    raise SystemExit(f"unknown variant {variant!r}")


def run(variant: str, seed: int) -> dict:
    spec = MODELS["resnet20"]
    original = planner_module.plan_passes
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "resnet20.onnx"
        args = command(spec, seed, output)[1:]           # the command line planner_seeds runs, in process
        planner_module.plan_passes = patched(variant)
        started = time.perf_counter()
        try:
            cli.main(args, standalone_mode=False)
        finally:
            planner_module.plan_passes = original
        seconds = time.perf_counter() - started
        report = json.loads((Path(tmp) / "resnet20.report.json").read_text())
    v, plan = report["validation"], report["plan"]
    return {"variant": variant, "seed": seed, "macs": 100 * v["macs_candidate"] / v["macs_reference"],
            "checked_drop": plan["check"]["drop"], "checked_se": plan["check"]["se"],
            "held_out_drop": 100 * (v["accuracy_reference"] - v["accuracy_candidate"]),
            "held_out_se": v.get("accuracy_drop_se"), "planning_seconds": sum(plan["seconds"].values()),
            "seconds": seconds}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=RUNS, help="variant:seed,...")
    args = ap.parse_args(argv)
    rows = []
    for item in args.runs.split(","):
        variant, seed = item.rsplit(":", 1)
        rows.append(run(variant, int(seed)))
        print(json.dumps(rows[-1]), flush=True)
    table = markdown_table(
        ["variant", "seed", "MACs", "checked drop", "held-out drop", "planning s"],
        [[r["variant"], r["seed"], f"{r['macs']:.1f}%", f"{r['checked_drop']:.2f} ± {r['checked_se']:.2f}",
          f"{r['held_out_drop']:.2f} ± {r['held_out_se']:.2f}", f"{r['planning_seconds']:.0f}"] for r in rows])
    text = "\n".join([
        "# Planner variants on ResNet-20, not kept", "",
        (f"`python bench/planner_variants.py --runs {args.runs}` on {machine()}, "
         f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. ResNet-20, JPEG CIFAR-10, `--calib-size 1000` "
         "(4000 more checked, 5000 held out), the default goal `--max-drop 1` at each split seed; the default "
         "planner's rows at the same seeds are in [planner_seeds.md](planner_seeds.md) (82.6 % at seed 0, "
         "81.9 % at seed 3)."), "", table, "",
        "<details><summary>raw numbers</summary>", "", "```json", json.dumps(rows, indent=1), "```", "", "</details>", ""])
    (RESULTS / "planner_variants.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
