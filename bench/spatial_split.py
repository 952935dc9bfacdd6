"""Low rank of k x k convolutions: the spatial form (k x 1 into r channels, then 1 x k) against
the channel form (k x k into r channels, then 1 x 1), at equal weights kept per layer.

Every k x k Conv of the model split by DALR + bias compensation at ``--fractions`` of its
weights (`low-rank-split` with `fraction`, `ops = ["Conv"]`, `conv` = channel | spatial); both
forms from the same statistics (calibration half), top-1 on the held-out half.

    python bench/spatial_split.py [--fractions 0.8,0.6,0.4] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from common import RESULTS, Bench, machine, markdown_table, write_result

TASKS = ("lenet/usps", "mnist_cnn/usps", "resnet20/cifar10-jpeg")
FORMS = ("channel", "spatial")


def passes(fraction: float, form: str):
    return [("low-rank-split", {"method": "dalr", "fraction": fraction, "ops": ("Conv",), "conv": form}),
            ("bias-compensate", {})]


def run(fractions, tasks=TASKS, command: str = "python bench/spatial_split.py") -> dict:
    out = {"command": command, "machine": machine(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tasks": {}}
    for name in tasks:
        bench = Bench(name, with_source=False)
        rows = []
        for fraction in fractions:
            for form in FORMS:
                result = bench.run(passes(fraction, form))
                split = result["report"]["passes"][0]["split"]
                rows.append({"fraction": fraction, "form": form, "accuracy": result["accuracy"],
                             "agreement": result["agreement"], "params_kept": result["params_kept"],
                             "macs_kept": result["macs_kept"], "seconds": result["seconds"],
                             "layers": [{"layer": r["layer"], "rank": r["rank"], "form": r["form"],
                                         "error": r["error"]} for r in split]})
                print(f"{name} {fraction} {form}: top-1 {100 * result['accuracy']:.2f} MACs "
                      f"{100 * result['macs_kept']:.1f} % ({result['seconds']:.1f} s)", flush=True)
        out["tasks"][name] = {"original": bench.accuracy, "calibration": len(bench.calib),
                              "evaluation": len(bench.eval), "rows": rows}
    return out


def _layer_error(row: dict) -> float:
    """Mean relative output error over the layers ``row`` split."""
    return float(np.mean([layer["error"] for layer in row["layers"]])) if row["layers"] else float("nan")


def _top1(row: dict, other: dict) -> str:
    """Top-1 % of ``row``, bold when above ``other``'s."""
    text = f"{100 * row['accuracy']:.2f}"
    return f"**{text}**" if row["accuracy"] > other["accuracy"] else text


def render(raw: dict) -> str:
    lines = ["# Low rank of k x k convolutions: spatial against channel form", "",
             f"`{raw['command']}` on {raw['machine']}, {raw['date']}. Every k x k Conv split by DALR + bias "
             "compensation at the same fraction of its weights in both forms (`low-rank-split` `fraction`, "
             "`ops = [\"Conv\"]`, `conv = \"channel\"` or `\"spatial\"`), from one calibration (first half of the "
             "target data), top-1 on the held-out half. 'layer error': the mean over the split layers of the "
             "relative output error E||W x - W_hat x||^2 / E||W x||^2 on the calibration statistics (after the "
             "bias's share). Channel form: a k x k Conv into r channels, then a 1 x 1 (r (C k^2 + M) weights); "
             "spatial: a k x 1 Conv into r channels, then a 1 x k (r (C k + M k) weights; `linalg/spatial.py`).", ""]
    for name, task in raw["tasks"].items():
        lines += [f"## {name} (original {100 * task['original']:.2f} %; {task['calibration']} calibration / "
                  f"{task['evaluation']} held-out samples)", ""]
        table = []
        by_key = {(r["fraction"], r["form"]): r for r in task["rows"]}
        for fraction in sorted({r["fraction"] for r in task["rows"]}, reverse=True):
            ch, sp = by_key[(fraction, "channel")], by_key[(fraction, "spatial")]
            table.append([f"{fraction:g}", f"{100 * ch['macs_kept']:.1f} %", _top1(ch, sp), f"{_layer_error(ch):.4f}",
                          f"{100 * sp['macs_kept']:.1f} %", _top1(sp, ch), f"{_layer_error(sp):.4f}",
                          f"{100 * (sp['accuracy'] - ch['accuracy']):+.2f}"])
        lines += [markdown_table(["weights kept per layer", "channel: MACs", "channel: top-1", "channel: layer error",
                                  "spatial: MACs", "spatial: top-1", "spatial: layer error", "spatial - channel"],
                                 table), ""]
    lines += ["The spatial form's rank is at most C k (C input channels, k the kernel height): a Conv reading one "
              "channel (LeNet's and mnist_cnn's first layers, 5 x 5 and 3 x 3) is cut to rank 1-3 at these "
              "fractions, which costs the digit models most of their accuracy where the form applies to every "
              "layer (as here). The planner offers both forms per layer and keeps the one that pays.", "",
              "<details><summary>raw numbers</summary>", "", "```json", json.dumps(raw, indent=1), "```", "",
              "</details>"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", type=lambda s: tuple(float(x) for x in s.split(",")), default=(0.8, 0.6, 0.4))
    parser.add_argument("--quick", action="store_true", help="one fraction (0.6), the digit models only")
    args = parser.parse_args(argv)
    if args.quick:
        raw = run((0.6,), TASKS[:2], "python bench/spatial_split.py --quick")
    else:
        raw = run(args.fractions)
    name = "spatial_split_quick" if args.quick else "spatial_split"
    (RESULTS / f"{name}.json").write_text(json.dumps(raw, indent=1) + "\n")
    print(write_result(name, render(raw)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
