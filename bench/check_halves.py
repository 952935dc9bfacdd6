"""Is the planner's cross-fitted check biased by calibrating its models on half the samples?

    python bench/check_halves.py [--model resnet20] [--budget 0.8] [--out check_halves]   # bench/results/OUT.md

The plan for ``--budget`` (of the MACs) on the calibration split of bench/planner.py; each check
model (statistics of calibration half h, with and without correct-drift) is scored on the other
calibration half and on its share of the extra checked samples (together what ``Planner.check``
measures), and on the held-out split (samples that never calibrated anything), next to the final
model calibrated on every calibration sample.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np

from bench.common import RESULTS, machine, markdown_table
from bench.planner import MODELS
from onnxprune.api import as_model, compress_samples, make_planner
from onnxprune.pipeline import Recipe, run_pipeline
from onnxprune.plan.planner import FOLDS, measure
from onnxprune.validation import validate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="resnet20")
    ap.add_argument("--budget", type=float, default=0.8)
    ap.add_argument("--out", default="check_halves", help="bench/results/OUT.md")
    args = ap.parse_args(argv)
    spec = MODELS[args.model]
    model = as_model(spec["model"])
    recipe = Recipe(passes=(), plan={"budget": args.budget}, calib_size=spec["calib_size"],
                    preprocess=spec["preprocess"])
    samples, held_out, _, calib, *_ = compress_samples(model, recipe, spec["data"])
    planner = make_planner(model, samples, recipe, uncapped=calib, progress=False)
    n = len(planner.calib)
    result = planner.for_budget(args.budget)
    passes = [p for p in result["passes"] if p[0] != "correct-drift"]
    drift = [p for p in planner.passes_for(result["plan"]) if p[0] == "correct-drift"]
    reference = planner.reference_outputs()
    labels = np.asarray(planner.labels)

    def held_out_drop(candidate) -> float:
        v = validate(planner.original, candidate, held_out, measure_latency=False)
        return 100 * (v.accuracy_reference - v.accuracy_candidate)

    def check(outputs, positions) -> str:
        if not len(positions):
            return "-"
        c = measure(reference[positions], outputs[positions], labels[positions], planner.kind)
        return f"{c.drop:.2f} ± {c.se:.2f} (KL {c.kl:.4f})"

    calibration, extras = np.arange(n), np.arange(n, len(reference))
    kinds = ("without correct-drift", "with correct-drift")
    pooled = {label: np.empty_like(reference) for label in kinds}     # what Planner.check measures
    rows = []
    for h in (0, 1):
        scored = planner.scored[h]
        for label, candidate in zip(kinds, planner.apply(passes, half=h, then=drift)):
            pooled[label][scored] = planner._outputs(candidate, scored)
            rows.append([f"calibration half {h}", label, check(pooled[label], scored[scored < n]),
                         check(pooled[label], scored[scored >= n]), f"{held_out_drop(candidate):.2f}"])
    for label in kinds:
        rows.append(["both halves (the planner's check)", label, check(pooled[label], calibration),
                     check(pooled[label], extras), "-"])
    for label, chosen in (("without correct-drift", passes), ("with correct-drift", passes + drift)):
        final, _ = run_pipeline(planner.original, Recipe(passes=tuple(chosen), folds=FOLDS), planner.provider)
        rows.append(["every calibration sample (final)", label, "-", "-", f"{held_out_drop(final):.2f}"])
    original = validate(planner.original, planner.original, held_out, measure_latency=False)
    extra_score = (f" (the original: {100 * float(np.mean(reference[n:].argmax(1) == labels[n:])):.1f} %)"
                   if len(reference) > n else "")
    text = "\n".join([
        "# The planner's check against held-out data", "",
        f"`python bench/check_halves.py --model {args.model} --budget {args.budget} --out {args.out}` on {machine()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Plan for {100 * args.budget:g} % of the MACs "
        f"({100 * result['cost']:.1f} % reached), {n} calibration samples (the original scores "
        f"{100 * float(np.mean(reference[:n].argmax(1) == labels[:n])):.1f} % on them), {len(reference) - n} extra "
        f"checked samples{extra_score}, {len(held_out)} held-out (original {100 * original.accuracy_reference:.1f} %). "
        "Drops in accuracy points; "
        "'check' scores a model on the calibration half it did not see, and on its half of the extra samples "
        "(± standard error; KL: mean KL divergence from the original's outputs there), 'held out' on samples that "
        "calibrated nothing.", "",
        markdown_table(["model calibrated on", "", "check drop: calibration half", "check drop: extra samples",
                        "held-out drop"], rows), ""])
    (RESULTS / f"{args.out}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
