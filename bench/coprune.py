"""Co-Prune against target-only magnitude pruning (same STE training) on LeNet, MNIST -> USPS.

    python bench/coprune.py              # keep 5/2/1 %, seeds 0,1,2 -> bench/results/coprune.md
    python bench/coprune.py --quick      # one seed, 4 epochs per stage
    python bench/coprune.py --pool coprune coprune_keep1_seeds3to7 --out NAME   # stored runs, seeds pooled

Source: the Caffe LeNet (trained on MNIST) with the MNIST test set as labelled source data.
Target: the same LeNet fine-tuned on the first half of USPS with labels (plain fine-tuning,
the equivalent of ``onnxprune finetune lenet_caffe_mnist.onnx --target-data <USPS first half>
--eval-data <USPS second half> --epochs 15``); every accuracy is on the second half. Both methods
run ``onnxprune coprune`` with the same options; ``--alpha 0`` is the target-only baseline.
Needs the [train] extra.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import DIGITS, RESULTS, SHARED, halves, machine, markdown_table, predict, write_result

from onnxprune.data.preprocess import Preprocess
from onnxprune.data.samples import open_samples
from onnxprune.model import load_model
from onnxprune.train.coprune import CoPruneConfig, coprune, nonzero_parameters
from onnxprune.train.distill import TrainConfig, finetune

#: the two methods' names in the stored runs
COPRUNE, BASELINE = "co-prune", "target-only (alpha 0)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--keeps", default="0.05,0.02,0.01")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--max-epochs", type=int, default=8, help="epochs per alpha stage (cap)")
    ap.add_argument("--out", default="coprune", help="result name: bench/results/<out>.md and .json")
    ap.add_argument("--alphas", default="0.7,0.5,0.3", help="Co-Prune's stages (the baseline runs as many at 0)")
    ap.add_argument("--fusion", choices=["abs", "signed"], default="abs", help="Co-Prune's target-mask fusion")
    ap.add_argument("--allocation", choices=["global", "layer"], default="global")
    ap.add_argument("--skip-baseline", action="store_true", help="Co-Prune rows only (the alpha 0 rows do not "
                    "depend on --alphas values or --fusion, only on the number of stages)")
    ap.add_argument("--pool", nargs="+", metavar="NAME",
                    help="no training: pool the runs stored in bench/results/<NAME>.json (runs of the same "
                         "options with different seeds) into one table per keep, paired by seed")
    args = ap.parse_args(argv)
    if args.pool:
        return pool(args.pool, args.out, argv)
    keeps = [float(v) for v in args.keeps.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    max_epochs = args.max_epochs
    if args.quick:
        seeds, max_epochs = seeds[:1], 4
    started = time.perf_counter()
    source_model = load_model(SHARED / "models/lenet_caffe_mnist.onnx")
    usps = open_samples(DIGITS / "usps_test.npz", source_model, preprocess=Preprocess())
    train, evaluation = halves(usps, None, None)
    mnist = open_samples(DIGITS / "mnist_test.npz", source_model, preprocess=Preprocess())
    labels = evaluation.labels

    def accuracy(model) -> float:
        return float((predict(model, evaluation) == labels).mean())

    target_model, ft = finetune(source_model, None, train, config=TrainConfig(epochs=15, label_weight=1.0,
                                                                              progress=False))
    rows_dense = [["LeNet (MNIST), no adaptation", f"{100 * accuracy(source_model):.2f}"],
                  [f"LeNet fine-tuned on USPS first half (epoch {ft['best_epoch']} of {len(ft['curve']) - 1})",
                   f"{100 * accuracy(target_model):.2f}"]]
    alphas = tuple(float(a) for a in args.alphas.split(","))
    methods = [(COPRUNE, alphas)] + ([] if args.skip_baseline else [(BASELINE, (0.0,) * len(alphas))])
    results = []
    for keep in keeps:
        for seed in seeds:
            for method, schedule in methods:
                config = CoPruneConfig(keep=keep, alphas=schedule, max_epochs=max_epochs, seed=seed, progress=False,
                                       fusion=args.fusion, allocation=args.allocation)
                t0 = time.perf_counter()
                pruned, report = coprune(source_model, target_model, mnist, train, config=config)
                acc = accuracy(pruned)
                results.append({"keep": keep, "seed": seed, "method": method, "accuracy": acc,
                                "nonzero": nonzero_parameters(pruned), "kept_weights": report["kept_weights"],
                                "best": report["best"], "seconds": time.perf_counter() - t0})
                print(f"keep {keep:.2%} seed {seed} {method}: {100 * acc:.2f}% "
                      f"({results[-1]['seconds']:.0f} s)", flush=True)
    cmdline = "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    rows = []
    for keep in keeps:
        row = [f"{100 * keep:g} %"]
        stats = {}
        for method in (COPRUNE, BASELINE):
            accs = np.array([r["accuracy"] for r in results if r["keep"] == keep and r["method"] == method]) * 100
            stats[method] = accs
            if not len(accs):
                row += ["not run", ""]
                continue
            row.append(f"{accs.mean():.2f} ± {accs.std(ddof=1) if len(accs) > 1 else 0.0:.2f}")
            row.append(" / ".join(f"{a:.1f}" for a in accs))
        diff = stats[COPRUNE] - stats[BASELINE] if len(stats[BASELINE]) else None
        row.append("" if diff is None else f"{diff.mean():+.2f}")
        rows.append(row)
    nonzero = {keep: next(r["nonzero"] for r in results if r["keep"] == keep) for keep in keeps}
    text = f"""# Co-Prune against target-only magnitude pruning (LeNet, MNIST -> USPS)

`python bench/coprune.py{cmdline}` ({time.perf_counter() - started:.0f} s; {machine()}, shared with other jobs).

Source: Caffe LeNet trained on MNIST, MNIST test set (10000) as labelled source data. Target:
the same LeNet fine-tuned with labels on the first half of USPS (1003 images; plain fine-tuning,
as `onnxprune finetune lenet_caffe_mnist.onnx --target-data <first half> --epochs 15`); accuracy
on the second half (1004 images), never seen in training or checkpoint choice (the checkpoint is
picked on 10 % of the first half). Keep = fraction of the 430,500 Conv/Gemm weights left non-zero
(`--allocation {args.allocation}`: one magnitude threshold over all layers, or the keep ratio in every layer); both methods train with the straight-through
estimator, Adam 1e-3, lr / 10 after 3 epochs without a lower loss, at most {max_epochs} epochs per
stage, {len(alphas)} stages (alpha {", ".join(f"{a:g}" for a in alphas)} for Co-Prune, {args.fusion} fusion,
{args.allocation} allocation; as many stages at 0 for the baseline). Seeds change the held-out fold, batch
order and source batches.

{markdown_table(["model (dense)", "USPS accuracy %"], rows_dense)}

{markdown_table(["keep", "Co-Prune mean ± sd", "Co-Prune per seed", "alpha 0 mean ± sd", "alpha 0 per seed",
                 "Co-Prune − alpha 0"], rows)}

Non-zero parameters (weights + biases) after pruning: {", ".join(f"{100 * k:g} %: {v:,}" for k, v in nonzero.items())}
(431,080 dense). These are zeros in dense tensors: onnxruntime runs the pruned model no faster.
"""
    write_result(args.out, text)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"dense": rows_dense, "runs": results}, indent=2) + "\n")
    print(text)
    return 0


def pool(names: list[str], out: str, argv) -> int:
    """Runs of several result files, by keep: mean and spread per method over every seed, and
    the paired difference (same seed) with its standard error."""
    runs: dict[tuple, float] = {}
    for name in names:
        for r in json.loads((RESULTS / f"{name}.json").read_text())["runs"]:
            key = (r["keep"], r["method"], r["seed"])
            if key in runs:
                raise SystemExit(f"{name}: keep {r['keep']}, {r['method']}, seed {r['seed']} is already in an earlier file")
            runs[key] = 100 * r["accuracy"]
    rows = []
    for keep in sorted({k for k, _, _ in runs}, reverse=True):
        co = {s: a for (k, m, s), a in runs.items() if k == keep and m == COPRUNE}
        base = {s: a for (k, m, s), a in runs.items() if k == keep and m == BASELINE}
        seeds = sorted(set(co) & set(base))
        if len(seeds) < 2:
            continue
        c, b = np.array([co[s] for s in seeds]), np.array([base[s] for s in seeds])
        d = c - b
        rows.append([f"{100 * keep:g} %", ",".join(map(str, seeds)), f"{c.mean():.2f} ± {c.std(ddof=1):.2f}",
                     f"{b.mean():.2f} ± {b.std(ddof=1):.2f}",
                     f"{d.mean():+.2f} ± {d.std(ddof=1) / np.sqrt(len(d)):.2f}", f"{int((d > 0).sum())} of {len(d)}"])
    cmdline = "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    text = f"""# Co-Prune against target-only magnitude pruning, seeds pooled

`python bench/coprune.py{cmdline}`: the runs stored in {", ".join(f"[{n}.md]({n}.md)" for n in names)},
by keep; only seeds with both methods count. 'difference': Co-Prune − alpha 0 on the same seed, mean ±
standard error over the seeds.

{markdown_table(["keep", "seeds", "Co-Prune mean ± sd", "alpha 0 mean ± sd", "difference", "Co-Prune ahead"], rows)}
"""
    write_result(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
