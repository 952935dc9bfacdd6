"""Is the planner's cross-fitted check biased for a plan chosen elsewhere?

    python bench/check_bias.py [--model lenet|mnist_cnn] [--seeds 16] [--out check_bias]   # bench/results/OUT.md

The default goal's plan at split seed 0 (`compress`'s planner), then at split seeds 1..N that one
fixed recipe built by the planner's two cross-fitted halves (statistics of calibration half h) and
scored as ``Planner.check`` scores it (each half's model on the other half) and on the held-out
split. A check that is unbiased reads the same drop as the held-out samples on average; the plans
the search picks on its own samples read lower (bench/results/planner_seeds_reserve*.md, README
"Across split seeds"): this separates the two.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np

from bench.common import RESULTS, machine, markdown_table
from bench.planner_seeds import SEEDED, USPS
from onnxprune.api import as_model, compress_samples, make_planner, plan_recipe
from onnxprune.pipeline import Recipe
from onnxprune.plan.planner import measure, model_outputs

#: planner_seeds' digit models, with their --mean/--std flags as a recipe's preprocessing
MODELS = {
    "lenet": dict(model=SEEDED["lenet"]["model"], preprocess={}),
    "mnist_cnn": dict(model=SEEDED["mnist_cnn"]["model"], preprocess={"mean": [0.5], "std": [0.5]}),
}


def recipe_at(spec: dict, seed: int, passes=(), plan=None) -> Recipe:
    return Recipe(passes=tuple(passes), plan=plan, seed=seed, preprocess=spec["preprocess"])


def check_and_held_out(original, spec: dict, passes, seed: int) -> tuple[float, float]:
    """(drop on the check's samples, mean drop of the two half models on the held-out split)."""
    recipe = recipe_at(spec, seed, passes)
    samples, held_out, *_ = compress_samples(original, recipe, USPS)
    planner = make_planner(original, samples, recipe, progress=False)
    planner.gather()
    reference, labels = planner.reference_outputs(), np.asarray(planner.labels)
    held_reference = model_outputs(planner.original, held_out)
    candidate, held = np.empty_like(reference), []
    for h in (0, 1):
        model = planner.apply(list(passes), half=h)
        other = planner.scored[h]
        candidate[other] = model_outputs(model, planner.checked.subset(other))
        held.append(measure(held_reference, model_outputs(model, held_out), np.asarray(held_out.labels)).drop)
    return measure(reference, candidate, labels).drop, statistics.mean(held)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="lenet")
    ap.add_argument("--seeds", type=int, default=16, help="split seeds 1..N (N >= 2: the spread needs two)")
    ap.add_argument("--out", default="check_bias", help="bench/results/OUT.md")
    args = ap.parse_args(argv)
    if args.seeds < 2:
        ap.error("--seeds must be at least 2 (the standard error of the differences needs two)")
    spec = MODELS[args.model]
    started = time.perf_counter()
    original = as_model(spec["model"])
    recipe = recipe_at(spec, 0, plan={"max_drop": 1.0})
    samples, held_out, *_ = compress_samples(original, recipe, USPS)
    named, planned, *_ = plan_recipe(original, samples, recipe, progress=False, evaluated=len(held_out))
    passes = [p for p in planned.passes]
    rows, differences = [], []
    for seed in range(1, args.seeds + 1):
        check, held = check_and_held_out(named, spec, passes, seed)
        differences.append(held - check)
        rows.append([seed, f"{check:.2f}", f"{held:.2f}", f"{held - check:+.2f}"])
        print(f"seed {seed}: check {check:.2f}, held out {held:.2f}", flush=True)
    mean = statistics.mean(differences)
    se = statistics.stdev(differences) / len(differences) ** 0.5
    text = "\n".join([
        f"# Is the check biased for a fixed plan? ({args.model}, USPS)", "",
        f"`{' '.join(['python bench/check_bias.py', *(sys.argv[1:] if argv is None else argv)])}` on {machine()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.perf_counter() - started:.0f} s. The default goal's "
        f"plan at split seed 0 ({', '.join(name for name, _ in passes)}), built at each split seed below by the "
        "planner's cross-fitted halves: 'check' is its drop as `Planner.check` measures it (each half's model on "
        "the other half), 'held out' the two half models' mean drop on the evaluation split (top-1 points).", "",
        markdown_table(["seed", "check", "held out", "held out - check"], rows), "",
        f"Held out minus check: **{mean:+.2f} +- {se:.2f}** points (mean +- its standard error over {len(rows)} "
        "seeds).", ""])
    (RESULTS / f"{args.out}.md").write_text(text)
    print(f"wrote {RESULTS / args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
