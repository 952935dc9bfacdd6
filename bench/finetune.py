"""Recovery training: compressed models before and after distillation from the original ("w/ FT").

    python bench/finetune.py                   # everything -> bench/results/finetune.md (about an hour here)
    python bench/finetune.py --only digits     # or resnet20, mobilenetv2 (repeatable)
    python bench/finetune.py --quick           # fewer epochs

Each row runs the two CLI commands through the same functions (``onnxprune compress`` then
``onnxprune finetune --teacher ORIGINAL``) on disjoint splits written to a temporary folder:
a tenth of the training split is set aside as the checkpoint fold (``--val-data``: agreement with
the teacher; it neither calibrates nor trains, since a fold of calibration samples flatters the
untrained student), compression calibrates on (part of) the rest, distillation trains on the
rest WITHOUT labels (the teacher's outputs only) and every accuracy is on the evaluation split.

- ResNet-20 / JPEG CIFAR-10: a seeded permutation (seed 0) splits the 10000 images into 4500
  training + 500 checkpoint-fold + 5000 evaluation images; the accuracy-driven planner
  (`compress --flops 0.5`, the default `--allocation plan`) calibrated on the first 1000 training
  images; distillation with --augment, patience off, at most 12.5 minutes of training (the
  issue's 15-minute budget, validation included).
- MobileNetV2 / 500 ImageNet samples: 225 training + 25 checkpoint fold / 250 evaluation
  (seeded permutation); the planner at `--flops 0.7` calibrated on the 225; three distillations
  on the same 225 (--augment, lr 2e-4, batch 32, 6 epochs each, the checkpoint picked by the held-out
  output loss, as `--checkpoint auto` does on a fold under 100 samples): outputs only,
  + feature distillation at the rewritten layers (--feature-weight 1), and the same training only
  the rewritten layers (--train-layers rewritten).
- Digits (LeNet, MNIST CNN on USPS and MNIST-M): the bench's usual halves (first half trains,
  second evaluates; MNIST-M capped at 2000 + 2000), DALR + bias compensation keeping 2 % of the
  parameters, and spectral pruning to 50 % of the MACs, both with one global threshold
  (`--allocation global`); 15 epochs.
Needs the [train] extra.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from click.testing import CliRunner

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import DIGITS, RESULTS, SHARED, machine, markdown_table, pyplot, write_result

from onnxprune.cli import main as cli

IMAGENET = ["--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]
MOBILENET = ["--resize", "256", "--center-crop", "224", *IMAGENET]
MNIST_CNN = ["--mean", "0.5", "--std", "0.5"]


def run(args: list[str]) -> None:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    if result.exit_code != 0:
        raise RuntimeError(f"onnxprune {' '.join(args)} failed: {result.output}")


def report_of(path: Path) -> dict:
    return json.loads(path.with_name(path.stem + ".report.json").read_text())


def row(task: str, method: str, model: Path, train: Path, val: Path, calib: Path, evaluation: Path, pre: list[str],
        work: Path, compress_budget: list[str], variants: list[tuple[str, list[str]]]) -> list[dict]:
    """Compress once, then one distillation per variant (name, finetune options): one result row each."""
    stem = f"{task.replace('/', '_')}_{method}"
    small = work / f"{stem}.onnx"
    t0 = time.perf_counter()
    if small.exists() and report_of(small).get("recipe"):  # kept by an earlier run with --work DIR
        print(f"reusing {small}", flush=True)
        compress_seconds = json.loads(small.with_name(small.stem + ".seconds.json").read_text())["seconds"]
    else:
        run(["compress", str(model), "--target-data", str(calib), "--eval-data", str(evaluation), *compress_budget,
             *pre, "--no-latency", "-q", "-o", str(small)])
        compress_seconds = time.perf_counter() - t0
        small.with_name(small.stem + ".seconds.json").write_text(json.dumps({"seconds": compress_seconds}))
    c = report_of(small)
    rows = []
    for variant, ft in variants:
        tuned = work / f"{stem}_{variant.replace(' ', '_').replace(',', '')}_ft.onnx"
        timing = tuned.with_name(tuned.stem + ".seconds.json")
        if tuned.exists() and timing.exists() and json.loads(timing.read_text())["finetune"] == ft:
            print(f"reusing {tuned}", flush=True)  # kept by an earlier run with --work DIR
            kept = json.loads(timing.read_text())
            load_before, t1, t2, load_after = kept["load_average"], 0.0, kept["seconds"], kept["load_average_after"]
        else:
            load_before = os.getloadavg()
            t1 = time.perf_counter()
            run(["finetune", str(small), "--teacher", str(model), "--target-data", str(train), "--val-data", str(val),
                 "--eval-data", str(evaluation), *ft, *pre, "--no-latency", "-q", "-o", str(tuned)])
            t2 = time.perf_counter()
            load_after = os.getloadavg()
            timing.write_text(json.dumps({"finetune": ft, "seconds": t2 - t1, "load_average": load_before,
                                          "load_average_after": load_after}))
        f = report_of(tuned)
        v, b = f["validation"], f["validation_before"]
        out = {"task": task, "method": method, "variant": variant, "compress": " ".join(compress_budget),
               "finetune": " ".join(ft),
               "params_kept": v["params_candidate"] / v["params_reference"],
               "macs_kept": v["macs_candidate"] / v["macs_reference"],
               "accuracy_original": v["accuracy_reference"], "accuracy_compressed": b["accuracy_candidate"],
               "accuracy_finetuned": v["accuracy_candidate"], "agreement_compressed": b["agreement"],
               "agreement_finetuned": v["agreement"], "train_samples": f["finetune"]["train_samples"],
               "val_samples": f["finetune"]["val_samples"], "eval_samples": v["samples"],
               "epochs": len(f["finetune"]["curve"]) - 1, "best_epoch": f["finetune"]["best_epoch"],
               "stopped": f["finetune"]["stopped"], "train_seconds": f["finetune"]["seconds"],
               "feature_targets": len(f["finetune"].get("feature_targets", [])),
               "trainable_weights": f["finetune"]["trainable_weights"],
               "finetune_command_seconds": t2 - t1, "compress_seconds": compress_seconds,
               "load_average": [round(x, 2) for x in load_before], "load_average_after": [round(x, 2) for x in load_after],
               "curve": f["finetune"]["curve"], "compress_report_accuracy": c["validation"]["accuracy_candidate"]}
        print(f"{task} {method} {variant}: {100 * out['accuracy_original']:.2f} -> {100 * out['accuracy_compressed']:.2f} -> "
              f"{100 * out['accuracy_finetuned']:.2f} ({out['epochs']} epochs, {out['train_seconds']:.0f} s, "
              f"command {t2 - t1:.0f} s, load {out['load_average'][0]:.1f})", flush=True)
        rows.append(out)
    return rows


def cifar(work: Path, quick: bool) -> list[dict]:
    d = np.load(SHARED / "data/cifar10/cifar10_test_jpeg.npz")
    order = np.random.default_rng(0).permutation(len(d["y"]))
    # the file is sorted by class: every part is drawn from the permutation, then sorted
    tr, val, ev = np.sort(order[:4500]), np.sort(order[4500:5000]), np.sort(order[5000:])
    np.savez(work / "cifar_train_nolabels.npz", x=d["x"][tr])  # distillation never sees labels
    np.savez(work / "cifar_val_nolabels.npz", x=d["x"][val])  # the checkpoint fold, never calibrates
    np.savez(work / "cifar_calib.npz", x=d["x"][np.sort(order[:1000])])
    np.savez(work / "cifar_eval.npz", x=d["x"][ev], y=d["y"][ev])
    ft = ["--epochs", "200", "--augment", "--patience", "50", "--max-minutes", "2" if quick else "12.5"]
    return row("resnet20/cifar10-jpeg", "plan", SHARED / "models/resnet20_cifar10.onnx",
               work / "cifar_train_nolabels.npz", work / "cifar_val_nolabels.npz", work / "cifar_calib.npz",
               work / "cifar_eval.npz", IMAGENET, work, ["--flops", "0.5"], [("outputs", ft)])


def imagenet(work: Path, quick: bool) -> list[dict]:
    folder = SHARED / "data/imagenet_samples"
    with open(folder / "labels.csv") as fh:
        rows = list(csv.reader(fh))
    header, rows = rows[0], rows[1:]
    order = np.random.default_rng(0).permutation(len(rows))
    parts = (("imagenet_train", order[:225]), ("imagenet_val", order[225:250]), ("imagenet_eval", order[250:]))
    for name, part in parts:
        sub = work / name
        sub.mkdir(exist_ok=True)
        with open(sub / "labels.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            for i in sorted(part):
                writer.writerow(rows[i])
                link = sub / rows[i][0]
                if not link.exists():
                    link.symlink_to(folder / rows[i][0])
    ft = ["--epochs", "1" if quick else "6", "--augment", "--lr", "2e-4", "--batch-size", "32", "--patience", "50"]
    variants = [("outputs", ft), ("features", ft + ["--feature-weight", "1"]),
                ("features, rewritten layers only", ft + ["--feature-weight", "1", "--train-layers", "rewritten"])]
    return row("mobilenetv2/imagenet", "plan", SHARED / "models/mobilenetv2_imagenet_fp32.onnx",
               work / "imagenet_train", work / "imagenet_val", work / "imagenet_train", work / "imagenet_eval",
               MOBILENET, work, ["--flops", "0.7"], variants)


def digits(work: Path, quick: bool) -> list[dict]:
    out = []
    ft = ["--epochs", "3" if quick else "15"]
    for model_name, pre in (("lenet_caffe_mnist", []), ("mnist_cnn_fc3136", MNIST_CNN)):
        for domain, cap in (("usps", None), ("mnist_m", 2000)):
            d = np.load(DIGITS / f"{domain}_test.npz")
            n = len(d["y"])
            first, second = np.arange(n // 2)[:cap], np.arange(n // 2, n)[:cap]
            cut = len(first) - len(first) // 10  # the last tenth of the first half: the checkpoint fold
            train, val, evaluation = (work / f"{domain}_train.npz", work / f"{domain}_val.npz",
                                      work / f"{domain}_eval.npz")
            np.savez(train, x=d["x"][first[:cut]])
            np.savez(val, x=d["x"][first[cut:]])
            np.savez(evaluation, x=d["x"][second], y=d["y"][second])
            model = SHARED / "models" / f"{model_name}.onnx"
            task = f"{model_name.split('_')[0] if model_name.startswith('lenet') else 'mnist_cnn'}/{domain}"
            for method, budget in (("dalr-bc", ["--method", "dalr-bc", "--allocation", "global", "--keep", "0.02"]),
                                   ("spectral", ["--method", "spectral", "--allocation", "global", "--flops", "0.5"])):
                out += row(task, method, model, train, val, train, evaluation, pre, work, budget, [("outputs", ft)])
    return out


def plot(rows: list[dict], path: Path) -> str:
    """The markdown line for the curves of the big models (agreement per training minute)."""
    big = [r for r in rows if not r["task"].startswith(("lenet", "mnist_cnn"))]
    if not big:
        return ""
    plt = pyplot()
    if plt is None:
        return "(no plot: matplotlib is not installed)"
    fig, axes = plt.subplots(1, len(big), figsize=(4.6 * len(big), 3.4), squeeze=False)
    for ax, r in zip(axes[0], big):
        curve = r["curve"]
        ax.plot([c["seconds"] / 60 for c in curve], [100 * c["val_agreement"] for c in curve], "o-",
                label="agreement (held-out training fold)")
        ax.axhline(100 * r["agreement_compressed"], color="gray", ls=":", label="evaluation split, before")
        ax.axhline(100 * r["agreement_finetuned"], color="C1", ls="--", label="evaluation split, after")
        ax.set_title(f"{r['task']} ({100 * r['macs_kept']:.0f} % MACs)\n{r.get('variant', 'outputs')}", fontsize=9)
        ax.set_xlabel("training minutes")
        ax.set_ylabel("% top-1 agreement with the original")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"![curves]({path.name})"


def write(rows: list[dict], seconds: float) -> None:
    table = []
    for r in rows:
        table.append([r["task"], r["method"], r["compress"], r.get("variant", "outputs"), f"{100 * r['macs_kept']:.1f}",
                      f"{100 * r['params_kept']:.1f}",
                      f"{100 * r['accuracy_original']:.2f}", f"{100 * r['accuracy_compressed']:.2f}",
                      f"{100 * r['accuracy_finetuned']:.2f}",
                      f"{100 * (r['accuracy_finetuned'] - r['accuracy_original']):+.2f}",
                      f"{100 * r['agreement_compressed']:.1f} → {100 * r['agreement_finetuned']:.1f}",
                      f"{r['epochs']} ({r['best_epoch']})", f"{r['train_seconds']:.0f}",
                      f"{r['finetune_command_seconds']:.0f}" if "finetune_command_seconds" in r else "",
                      " / ".join(f"{x:.1f}" for x in r["load_average"]) if "load_average" in r else "not recorded"])
    png = plot(rows, RESULTS / "finetune_curves.png")
    text = f"""# Recovery training: no-training rows against distilled ("w/ FT") rows

`python bench/finetune.py` (about 50 min; {machine()}; torch CPU, 1 thread, on a 2-core machine shared
with other agents' jobs: the load average at each row's start is in the table; the time-capped rows
(ResNet-20, MobileNetV2) get fewer epochs the higher it is).

Every row: `onnxprune compress ORIGINAL --target-data CALIB --eval-data EVAL <budget>` then
`onnxprune finetune SMALL --teacher ORIGINAL --target-data TRAIN --eval-data EVAL <options>`;
TRAIN has no labels (KL to the teacher's softened logits, T = 4), the checkpoint is picked on VAL
(`--val-data`, a tenth of the training split that neither calibrates nor trains) by agreement with
the teacher, or by the output loss on VAL when it has fewer than 100 samples (MobileNetV2's 25:
`--checkpoint auto`), and accuracies are on EVAL, disjoint from all of them. Digit rows: from the
run before the planner became the default (their budgets ran with one global threshold, as
`--allocation global` now asks).
Splits and options are in the script's docstring.

{markdown_table(["task", "method", "budget", "distillation", "MACs %", "params %", "original %", "compressed %",
                 "w/ FT %", "FT − original", "agreement % (before → after)", "epochs (chosen)", "train s",
                 "finetune command s", "load average 1/5/15 min at start"], table)}

{png}
"""
    write_result("finetune", text)
    print(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", choices=["resnet20", "mobilenetv2", "digits"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--stitch-only", action="store_true", help="rebuild finetune.md from the per-step JSON files")
    ap.add_argument("--work", help="keep the splits, models and reports in this folder and reuse the compressed "
                    "and distilled models found there (same options) instead of recomputing them")
    args = ap.parse_args(argv)
    steps = [] if args.stitch_only else args.only or ["resnet20", "mobilenetv2", "digits"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxprune-finetune-") as tmp:
        work = Path(tmp) if args.work is None else Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        for step, fn in (("resnet20", cifar), ("mobilenetv2", imagenet), ("digits", digits)):
            if step in steps:  # one JSON per step, so steps can run in parallel and be re-run alone
                step_rows = fn(work, args.quick)
                (RESULTS / f"finetune_{step}.json").write_text(json.dumps(step_rows, indent=2) + "\n")
    rows = []
    for step in ("resnet20", "mobilenetv2", "digits"):
        path = RESULTS / f"finetune_{step}.json"
        if path.exists():
            rows += json.loads(path.read_text())
    write(rows, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
