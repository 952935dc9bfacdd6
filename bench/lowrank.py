"""Low-rank benchmark: the DALR paper's Tables 3-8 in miniature, on real models and data.

    python bench/lowrank.py [--quick]

Writes bench/results/lowrank.md and one plot per task, bench/results/lowrank_<task>.png
(accuracy on the evaluation half against the FC layer's parameters kept).

(a) LeNet ip1 (800->500) and mnist_cnn fc1 (3136->128) on USPS and MNIST-M: SVD, SVD+BC,
    DALR in the paper's form at fixed ridges (the default 1e-4, and what the reference
    code's lam=1000 on the unnormalised sum amounts to), DALR with ridge "auto" (+BC), and
    the pruning baselines (select-nodes mean / spectral / momasp-j on the layer's output
    units with as many parameters as the rank, then reconstruct-next-layer).
(b) MobileNetV2 classifier MatMul (1280->1000) at 10..50 % of its parameters: accuracy and
    agreement. Only the classifier changes, so the evaluation runs the compressed graph's
    tail (classifier input -> logits) on penultimate features of the evaluation images
    computed once; a full-model run of one configuration checks that this is identical.
(c) onnxruntime CPU latency (1 thread, batch 1 and 32, reference/candidate interleaved,
    medians) next to the MAC ratio.
(d) MobileNetV2: every non-grouped Conv and the classifier split per layer under one global
    --keep budget.

Every compression calibrates on the first half of the target set; every number is measured
on the second half. BLAS runs single-threaded (OPENBLAS_NUM_THREADS=1 unless set): on a small
shared machine a multi-threaded BLAS spends most of its time waiting.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, Bench, machine, markdown_table, pyplot, write_result  # noqa: E402
from onnxprune import linalg  # noqa: E402
from onnxprune.cost import total_macs  # noqa: E402
from onnxprune.graph.layers import find_linear_layers  # noqa: E402
from onnxprune.model import count_parameters  # noqa: E402
from onnxprune.passes.low_rank_split import layer_request  # noqa: E402
from onnxprune.pipeline import Recipe, run_pipeline  # noqa: E402
from onnxprune.runtime import make_session  # noqa: E402

warnings.filterwarnings("ignore", category=RuntimeWarning)

FC = {"lenet": "ip1", "mnist_cnn": "/fc1/Gemm"}
RANKS = (4, 8, 16, 32, 64, 128, 256)
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)
PAPER_RIDGE = linalg.DEFAULT_RIDGE


# ------------------------------------------------------------------------------ helpers


class Evaluator:
    """A Bench with its evaluation inputs decoded once (the harness re-reads them per run)."""

    def __init__(self, bench: Bench, batch: int = 250):
        self.bench = bench
        self.feeds = [feeds for _, feeds in bench.eval.batches(batch)]

    def predict(self, model: onnx.ModelProto, feeds=None) -> np.ndarray:
        session = make_session(model)
        out = [session.run(None, f)[0] for f in (feeds or self.feeds)]
        return np.concatenate([o.reshape(len(o), -1) for o in out]).argmax(axis=1)

    def compress(self, passes, **recipe):
        b = self.bench
        recipe = Recipe(passes=tuple(passes), folds=b.folds, batch_size=b.batch_size, **recipe)
        started = time.perf_counter()
        model, report = run_pipeline(b.model, recipe, b.provider)
        return model, report, time.perf_counter() - started

    def run(self, passes, *, predict=None, **recipe) -> dict:
        model, report, seconds = self.compress(passes, **recipe)
        pred = (predict or self.predict)(model)
        b = self.bench
        return {"accuracy": b.score(pred), "agreement": float((pred == b.reference).mean()),
                "params_kept": count_parameters(model) / b.params, "macs_kept": total_macs(model) / b.macs,
                "seconds": seconds, "report": report, "model": model}


def split_row(result) -> dict:
    """The low-rank-split report row of the (single) split layer."""
    for p in result["report"]["passes"]:
        if p["pass"] == "low-rank-split" and p["split"]:
            return p["split"][0]
    return {}


def pct(x: float) -> float:
    return 100.0 * x


def layer_of(model, name):
    return next(layer for layer in find_linear_layers(model) if layer.name == name)


def reference_ridge(bench: Bench, layer) -> float:
    """The reference code's lam = 1000 on X X^T (a sum over samples), as a relative ridge:
    lam / N / (trace(S) / n) with S = X X^T / N."""
    request = layer_request(layer)
    moments = bench.provider(bench.model, [request], ("target",)).moments(request, "target")
    trace = float(np.trace(moments.gram)) / moments.count
    return 1000.0 / moments.count / (trace / layer.in_features)


def lowrank_methods(layer: str, rank: int, lam1000: float) -> dict[str, list]:
    split = lambda **o: ("low-rank-split", {"rank": rank, "layers": (layer,), **o})  # noqa: E731
    bc = ("bias-compensate", {})
    return {
        "SVD": [split(method="svd")],
        "SVD+BC": [split(method="svd"), bc],
        f"DALR paper form, ridge {PAPER_RIDGE:g}": [split(method="dalr", ridge=PAPER_RIDGE)],
        f"DALR paper form, lam=1000 (ridge {lam1000:.3g})": [split(method="dalr", ridge=lam1000)],
        "DALR (ridge auto)": [split(method="dalr")],
    }


def pruning_methods(layer: str, fraction: float) -> dict[str, list]:
    rec = ("reconstruct-next-layer", {})
    sel = lambda c: ("select-nodes", {"criterion": c, "fraction": fraction, "groups": (layer,)})  # noqa: E731
    return {"pruning (mean)": [sel("mean"), rec], "spectral": [sel("spectral"), rec],
            "MoMaSP (momasp-j)": [sel("momasp-j"), rec]}


def plot(path: Path, title: str, xs: dict, ys: dict, original: float, xlabel: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in ys:
        style = "-o" if "DALR (ridge auto)" == name else ("--." if "paper" in name or "prun" in name.lower()
                                                            or "spectral" in name or "MoMaSP" in name else "-.")
        ax.plot(xs[name], ys[name], style, label=name, markersize=4)
    ax.axhline(original, color="k", lw=0.8, ls=":", label=f"original {original:.1f}")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy on the evaluation half (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def split_note(bench: Bench) -> str:
    t = bench.task
    return (f"model `{t.model.name}`, target `{t.target.name}`; calibration = first half of the target set "
            f"({len(bench.calib)} samples, 2 interleaved folds for the auto ridge), evaluation = second half "
            f"({len(bench.eval)} samples); machine: {machine()}")


# ------------------------------------------------------------------------------ (a)


def part_a(tasks, ranks, out: list[str], checks: list[str]) -> None:
    out.append("## (a) FC layer compression on digit domain shifts (DALR paper Tables 3-8 in miniature)\n")
    out.append("Cells: top-1 accuracy (%) on the evaluation half. Columns: dims kept k, and the FC layer's "
               "parameters kept, k(m+n)/(mn). Pruning rows keep c = k(m+n)/n output units of the layer "
               "(the same FC parameters), chosen by select-nodes, then reconstruct-next-layer. "
               "`+BC` = bias-compensate after the split. Paper form = B = A^T W S (S + lam I)^-1 on the "
               "uncentred S at a fixed relative ridge; ridge auto = the pass's default (affine DALR, "
               "cross-validated ridge, see the notes; its bias is already compensated, so `+BC` after it "
               "changes nothing and has no row).\n")
    for task in tasks:
        started = time.perf_counter()
        bench = Bench(task)
        ev = Evaluator(bench)
        fc = FC[task.split("/")[0]]
        layer = layer_of(bench.model, fc)
        m, n = layer.out_features, layer.in_features
        ks = [k for k in ranks if k * (m + n) < m * n]
        lam1000 = reference_ridge(bench, layer)
        acc: dict[str, list[float]] = {}
        agr: dict[str, list[float]] = {}
        chosen = []
        for k in ks:
            methods = {**lowrank_methods(fc, k, lam1000),
                       **pruning_methods(fc, k * (m + n) / (n * m))}
            for name, passes in methods.items():
                r = ev.run(passes)
                acc.setdefault(name, []).append(pct(r["accuracy"]))
                agr.setdefault(name, []).append(pct(r["agreement"]))
                if name == "DALR (ridge auto)":
                    chosen.append(split_row(r).get("chosen", "?"))
        kept = [pct(k * (m + n) / (m * n)) for k in ks]
        header = ["method"] + [f"k={k} ({p:.1f}%)" for k, p in zip(ks, kept)]
        rows = [[name] + vals for name, vals in acc.items()]
        out.append(f"### {task}: `{fc}` ({n}->{m}), original accuracy {pct(bench.accuracy):.2f} %\n")
        out.append(split_note(bench) + "\n")
        out.append(markdown_table(header, rows) + "\n")
        out.append("Top-1 agreement with the original model (%):\n")
        out.append(markdown_table(header, [[name] + vals for name, vals in agr.items()
                                           if name in ("SVD", "SVD+BC", "DALR (ridge auto)")]) + "\n")
        out.append("What ridge auto chose per rank: " + ", ".join(f"k={k}: {c}" for k, c in zip(ks, chosen)) + "\n")
        gap = [a - s for a, s in zip(acc["DALR (ridge auto)"], acc["SVD+BC"])]
        gain = [a - s for a, s in zip(acc["DALR (ridge auto)"], acc["SVD"])]
        checks.append(f"| {task} | {min(gap):+.2f} | {gain[0]:+.2f} (k={ks[0]}) | {gain[1]:+.2f} (k={ks[1]}) | "
                      f"{max(a - b for a, b in zip(acc['DALR (ridge auto)'], acc[next(x for x in acc if 'lam=1000' in x)])):+.2f} / "
                      f"{min(a - b for a, b in zip(acc['DALR (ridge auto)'], acc[next(x for x in acc if 'lam=1000' in x)])):+.2f} |")
        name = task.replace("/", "_")
        plot(RESULTS / f"lowrank_{name}.png", f"{task}: {fc} ({n}->{m}); calib {len(bench.calib)}, eval {len(bench.eval)}",
             {k: kept for k in acc}, acc, pct(bench.accuracy), "FC parameters kept (%)")
        out.append(f"![{task}](lowrank_{name}.png)\n")
        out.append(f"({time.perf_counter() - started:.0f} s for this task)\n")
        print(f"[a] {task} done in {time.perf_counter() - started:.0f} s", flush=True)


# ------------------------------------------------------------------------------ (b)


def tail_model(model: onnx.ModelProto, tensor: str, width: int) -> onnx.ModelProto:
    """The subgraph from ``tensor`` ([N, width]) to the graph outputs."""
    from onnx import helper

    reached, nodes = {tensor}, []
    for node in model.graph.node:
        if any(i in reached for i in node.input):
            nodes.append(node)
            reached.update(node.output)
    inits = {t.name: t for t in model.graph.initializer}
    for node in nodes:
        missing = [i for i in node.input if i and i not in reached and i not in inits]
        if missing:
            raise ValueError(f"tail node {node.name} reads {missing} from before {tensor}")
    used = {i for node in nodes for i in node.input}
    graph = helper.make_graph(nodes, "tail", [helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, ["N", width])],
                              list(model.graph.output), [inits[n] for n in used if n in inits])
    tail = helper.make_model(graph, opset_imports=model.opset_import)
    tail.ir_version = model.ir_version
    return tail


def part_b(task, fractions, out: list[str], checks: list[str], calib=None, evals=None) -> Bench:
    from bench.common import TASKS
    import dataclasses

    started = time.perf_counter()
    t = TASKS[task]
    if calib or evals:
        t = dataclasses.replace(t, max_calib=calib, max_eval=evals)
    bench = Bench(t, with_source=False)
    ev = Evaluator(bench, batch=50)
    layer = next(lay for lay in find_linear_layers(bench.model) if lay.op == "MatMul")
    m, n = layer.out_features, layer.in_features
    # penultimate features of the evaluation half, once (the compressed models share the prefix)
    probe = onnx.ModelProto()
    probe.CopyFrom(bench.model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(layer.input, onnx.TensorProto.FLOAT, None))
    session = make_session(probe)
    feats = [session.run([layer.input], f)[0] for f in ev.feeds]
    name_in = layer.input
    tail_predict = lambda model: ev.predict(tail_model(model, name_in, n), [{name_in: x} for x in feats])  # noqa: E731
    assert (tail_predict(bench.model) == bench.reference).all()

    rows_acc, rows_agr, chosen = {}, {}, []
    fixed_small = 1e-4
    for frac in fractions:
        k = max(1, math.floor(frac * m * n / (m + n)))
        split = lambda **o: ("low-rank-split", {"rank": k, "layers": (layer.name,), **o})  # noqa: E731
        bc = ("bias-compensate", {})
        methods = {"SVD": [split(method="svd")], "SVD+BC": [split(method="svd"), bc],
                   "DALR (ridge auto)": [split(method="dalr")],
                   f"DALR paper form, fixed ridge {fixed_small:g}": [split(method="dalr", ridge=fixed_small)],
                   f"DALR paper form, fixed ridge {fixed_small:g} +BC": [split(method="dalr", ridge=fixed_small), bc]}
        for name, passes in methods.items():
            r = ev.run(passes, predict=tail_predict)
            rows_acc.setdefault(name, []).append(pct(r["accuracy"]))
            rows_agr.setdefault(name, []).append(pct(r["agreement"]))
            if name == "DALR (ridge auto)":
                chosen.append(f"{split_row(r).get('chosen')}")
                last_auto = r
    # one full-model run: the tail evaluation is exact
    full = ev.predict(last_auto["model"])
    tail = tail_predict(last_auto["model"])
    same = bool((full == tail).all())

    ks = [max(1, math.floor(f * m * n / (m + n))) for f in fractions]
    header = ["method"] + [f"{int(100 * f)} % (k={k})" for f, k in zip(fractions, ks)]
    out.append(f"## (b) {task}: classifier `{layer.name}` ({n}->{m}) alone, original accuracy "
               f"{pct(bench.accuracy):.2f} %\n")
    out.append(split_note(bench) + "\n")
    out.append("Accuracy (%) on the evaluation half (the model's own top-1 on these training-split images "
               "is high; agreement is the cleaner fidelity measure):\n")
    out.append(markdown_table(header, [[k] + v for k, v in rows_acc.items()]) + "\n")
    out.append("Top-1 agreement with the original model (%):\n")
    out.append(markdown_table(header, [[k] + v for k, v in rows_agr.items()]) + "\n")
    out.append("What ridge auto chose: " + ", ".join(f"{int(100 * f)} %: {c}" for f, c in zip(fractions, chosen)) + "\n")
    out.append(f"The tail evaluation (classifier input -> logits on cached penultimate features) matched the "
               f"full model's predictions for the last configuration: {same}.\n")
    gap = [a - s for a, s in zip(rows_acc["DALR (ridge auto)"], rows_acc["SVD+BC"])]
    gap_agr = [a - s for a, s in zip(rows_agr["DALR (ridge auto)"], rows_agr["SVD+BC"])]
    checks.append(f"| {task} (classifier) | {min(gap):+.2f} (agreement {min(gap_agr):+.2f}) | — | — | — |")
    plot(RESULTS / f"lowrank_{task.replace('/', '_')}.png",
         f"{task}: classifier {n}->{m}; calib {len(bench.calib)}, eval {len(bench.eval)}",
         {k: [pct(f) for f in fractions] for k in rows_acc}, rows_acc, pct(bench.accuracy),
         "classifier parameters kept (%)")
    out.append(f"![{task}](lowrank_{task.replace('/', '_')}.png)\n")
    out.append(f"({time.perf_counter() - started:.0f} s for this part)\n")
    print(f"[b] {task} done in {time.perf_counter() - started:.0f} s", flush=True)
    bench.evaluator = ev
    return bench


# ------------------------------------------------------------------------------ (c), (d)


def latency(reference, candidate, shape, *, batch: int, rounds: int) -> tuple[float, float]:
    """Median ms of reference and candidate, runs interleaved (A B A B ...) after a warm-up."""
    sessions = [make_session(reference, threads=1), make_session(candidate, threads=1)]
    name = reference.graph.input[0].name
    x = np.random.default_rng(0).normal(size=(batch, *shape)).astype(np.float32)
    for s in sessions:
        for _ in range(3):
            s.run(None, {name: x})
    times = ([], [])
    for _ in range(rounds):
        for i, s in enumerate(sessions):
            t = time.perf_counter()
            s.run(None, {name: x})
            times[i].append(1000 * (time.perf_counter() - t))
    return float(np.median(times[0])), float(np.median(times[1]))


def part_d(bench: Bench, keep: float, out: list[str]) -> list:
    started = time.perf_counter()
    ev = bench.evaluator
    rows, models = [], []
    for label, passes in (("DALR (ridge auto)", [("low-rank-split", {"method": "dalr", "keep": keep})]),):
        r = ev.run(passes)
        split = next(p for p in r["report"]["passes"] if p["pass"] == "low-rank-split")
        n_split = len(split["split"])
        chose = {}
        for row in split["split"]:
            key = row.get("chosen", row.get("method", "?")).split(" (")[0]
            chose[key] = chose.get(key, 0) + 1
        rows.append([label, n_split, len(split["skipped"]), pct(r["params_kept"]), pct(r["macs_kept"]),
                     pct(r["accuracy"]), pct(r["agreement"]), f"{r['seconds']:.0f}",
                     ", ".join(f"{v}x {k}" for k, v in chose.items()) if label.startswith("DALR") else "—"])
        models.append((label, r["model"]))
        print(f"[d] {label} {time.perf_counter() - started:.0f} s", flush=True)
    out.append(f"## (d) {bench.task.name}: per-layer split of every non-grouped Conv and the classifier, "
               f"global keep={keep}\n")
    out.append(split_note(bench) + f". Original accuracy {pct(bench.accuracy):.2f} %. Depthwise convs are skipped "
               "(grouped); a layer whose rank would not save parameters stays dense. Params/MACs kept are of "
               "the whole model.\n")
    out.append(markdown_table(["method", "layers split", "skipped", "params kept %", "MACs kept %", "accuracy %",
                               "agreement %", "compress s", "auto choices"], rows) + "\n")
    return models


def part_c(entries, out: list[str], rounds: int) -> None:
    started = time.perf_counter()
    rows = []
    for label, reference, candidate, shape in entries:
        macs = total_macs(candidate) / total_macs(reference)
        cells = [label, f"{pct(macs):.1f}"]
        for batch in (1, 32):
            r, c = latency(reference, candidate, shape, batch=batch, rounds=rounds if batch == 1 else max(rounds // 4, 5))
            cells += [f"{r:.3f}", f"{c:.3f}", f"{r / c:.2f}x"]
        speed = [float(cells[4][:-1]), float(cells[7][:-1])]
        cells.append(f"{speed[0] * macs:.2f} / {speed[1] * macs:.2f}")
        rows.append(cells)
    out.append("## (c) Latency: onnxruntime CPU, 1 intra-op thread, reference and candidate interleaved, medians\n")
    out.append(f"machine: {machine()} (shared with other jobs: absolute times drift, the ratios are what counts). "
               "realised/ideal = speedup x MAC ratio (1.0 = the speedup the MAC reduction promises).\n")
    out.append(markdown_table(["model", "MACs kept %", "ref ms b1", "cand ms b1", "speedup b1", "ref ms b32",
                               "cand ms b32", "speedup b32", "realised/ideal b1 / b32"], rows) + "\n")
    print(f"[c] done in {time.perf_counter() - started:.0f} s", flush=True)


# ------------------------------------------------------------------------------ main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tasks and ranks, small MobileNet subset")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out = [f"# Low-rank compression benchmark{' (quick)' if args.quick else ''}\n",
           f"`python bench/lowrank.py{' --quick' if args.quick else ''}`; machine: {machine()}.\n"]
    checks = ["| task | min over ranks of DALR(auto) - SVD+BC (points) | DALR(auto) - SVD, highest compression | "
              "next rank | DALR(auto) - DALR lam=1000: max / min |", "|---|---|---|---|---|"]
    if args.quick:
        tasks, ranks, fractions = ["lenet/usps", "mnist_cnn/usps"], (4, 16, 64), (0.1, 0.3, 0.5)
    else:
        tasks, ranks, fractions = ["lenet/usps", "lenet/mnist-m", "mnist_cnn/usps", "mnist_cnn/mnist-m"], RANKS, FRACTIONS
    body: list[str] = []
    part_a(tasks, ranks, body, checks)
    mobile = part_b("mobilenetv2/imagenet", fractions, body, checks,
                    calib=100 if args.quick else None, evals=100 if args.quick else None)
    lat = []
    lenet = Bench("lenet/usps", with_source=False)
    lev = Evaluator(lenet)
    for keep in (0.1, 0.25):
        r = lev.run([("low-rank-split", {"method": "dalr", "keep": keep})])
        lat.append((f"LeNet, all layers, dalr keep {keep} (acc {pct(r['accuracy']):.1f} %)", lenet.model, r["model"],
                    (1, 28, 28)))
    if not args.quick:
        cnn = Bench("mnist_cnn/usps", with_source=False)
        r = Evaluator(cnn).run([("low-rank-split", {"method": "dalr", "rank": 16, "layers": ("/fc1/Gemm",)})])
        lat.append((f"mnist_cnn fc1 rank 16 (acc {pct(r['accuracy']):.1f} %)", cnn.model, r["model"], (1, 28, 28)))
        models = part_d(mobile, 0.9, body)
        lat += [(f"MobileNetV2 all 1x1 convs + classifier, keep 0.9, {label}", mobile.model, model, (3, 224, 224))
                for label, model in models]
    part_c(lat, body, rounds=30 if args.quick else 60)

    out.append("## Summary checks\n")
    out.append("\n".join(checks) + "\n")
    out.append(NOTES)
    out += body
    out.append(f"\nTotal wall time: {time.perf_counter() - started:.0f} s.\n")
    path = write_result("lowrank_quick" if args.quick else "lowrank", "\n".join(out))
    print(f"wrote {path} in {time.perf_counter() - started:.0f} s")


NOTES = """
### How ridge "auto" works (low-rank-split, method dalr, the default)

* **Affine DALR.** The factorisation gets a free output bias: W x ~ A B x + delta. The optimum
  is A = top-k eigenvectors of W (C + lam I) W^T with C the *centred* input covariance,
  B = A^T W and delta = (W - A B) E[x]: lam = 0 is DALR on the covariance with its optimal
  bias, lam -> inf is exactly SVD + bias compensation. So the candidate path always contains
  SVD+BC, and in between the ridge shrinks the covariance towards a multiple of I, which is
  what protects a fit from ~250 calibration images in 1280 dimensions (the paper's
  B = A^T W S (S + lam I)^-1 projects the input onto the data's span instead and over-fits
  there: see the fixed-ridge rows of (b)).
* **Cross-validation in both directions.** Each calibration fold is held out once (fit on the
  others); pooled held-out errors over 8 ridges pick the ridge; the refit on all folds scales
  it by N_fit/N.
* **Downstream-weighted error.** The held-out error is measured where it matters: through the
  gate (ReLU/Clip, open with the Gaussian probability of each unit's pre-activation) and the
  next linear layer, E||W_next D e||^2, when the layer feeds one; otherwise (a graph output,
  a residual branch) the plain output error. On MNIST-M the plain output error preferred DALR
  while the logits preferred SVD+BC (DALR spends rank on high-energy background features the
  classifier ignores); weighting by the next layer fixes that choice.
* **Prefer the conservative fit.** The chosen ridge is the largest whose error is within 5 %
  of the best, so DALR replaces SVD+BC only when it is clearly better on held-out data.
* In one-shot mode the bias is already compensated, so `+BC` after ridge auto changes nothing
  (bias-compensate only adds the difference, which matters in sequential mode).
"""


if __name__ == "__main__":
    main()
