"""Channel pruning without retraining on the real models in ../shared.

    python bench/pruning.py [--quick] [--only a b ...]

Writes bench/results/pruning.md and the plots bench/results/pruning_*.png:

a. Criteria on the digit models (MNIST source, USPS / MNIST-M target): target accuracy vs
   parameters and MACs kept at several global budgets (FC units and conv channels).
b. At equal parameters: spectral with reconstruction vs the same selection without it vs
   the mean-activation baseline (DALR's "pruning (mean)").
c. One-shot vs sequential mode.
d. MoMaSP Fig. 2 / Table 2 in miniature: the covariance from target only, target/source
   mix, target + source; target-only vs Reg J vs Reg j at rising compression.
e. PFA recipes on ResNet-20 for JPEG CIFAR-10 vs a 3-class and a 2-class subset.
f. ResNet-20 inner channels and MobileNetV2 expansion channels at MAC budgets; prune then
   low-rank on LeNet.
g. Latency on onnxruntime CPU, batch 1 and 32, next to the MAC ratio.
h. Greedy selection on a 4096-channel covariance keeping 1024.

Every number comes from held-out target samples (the calibration samples are never
scored). CIFAR-10 and the ImageNet samples are stored sorted by class, so their halves
are drawn by a seeded permutation (bench/common.py, ``Task.sorted_by_class``).
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")     # a threaded BLAS next to onnxruntime is many times slower here

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402
from common import TASKS, Bench, machine, markdown_table, pyplot, write_result  # noqa: E402

from onnxprune.calibration.provider import StatsProvider  # noqa: E402
from onnxprune.data.samples import open_samples  # noqa: E402
from onnxprune.graph.groups import find_channel_groups  # noqa: E402
from onnxprune.recipes import method_passes
from onnxprune.validation import validate  # noqa: E402

CRITERIA = ("spectral", "momasp-J", "momasp-j", "mean", "l1", "wanda")
PFA_TAUS = (0.8, 0.9, 0.95)
STYLE = {"spectral": ("C0", "o-"), "momasp-J": ("C1", "s--"), "momasp-j": ("C2", "^--"), "mean": ("C3", "v:"),
         "l1": ("C4", "d:"), "pfa-en": ("C5", "P"), "pfa-kl": ("C6", "X"), "wanda": ("C7", "*-.")}
LOG: list[str] = []


def log(*parts) -> None:
    line = " ".join(str(p) for p in parts)
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- benches

_BENCHES: dict = {}


def bench(name: str, *, max_calib=None, max_eval=None, source=True) -> Bench:
    key = (name, max_calib, max_eval, source)
    if key not in _BENCHES:
        task = TASKS[name]
        changes = {k: v for k, v in (("max_calib", max_calib), ("max_eval", max_eval)) if v is not None}
        task = dataclasses.replace(task, **changes)
        started = time.perf_counter()
        b = Bench(task, with_source=source)
        b.cache = {}
        log(f"[bench] {name}: calib {len(b.calib)}, eval {len(b.eval)}, accuracy {b.accuracy:.4f} "
            f"({time.perf_counter() - started:.0f} s)")
        _BENCHES[key] = b
    return _BENCHES[key]


def split_text(b: Bench) -> str:
    source = f" + {len(b.source)} MNIST source samples" if b.source is not None else ""
    return (f"`{b.task.name}`: calibration {len(b.calib)} target samples{source}, evaluation "
            f"{len(b.eval)} held-out target samples; original accuracy {100 * b.accuracy:.1f} %")


def run(b: Bench, passes, *, mode="one-shot") -> dict:
    """Bench.run with a per-bench cache (the same recipe is scored once)."""
    key = (repr(passes), mode)
    if key not in b.cache:
        r = b.run(passes, mode=mode)
        del r["model"]                   # keep memory flat; section g rebuilds the few models it times
        b.cache[key] = r
        log(f"  {b.task.name} {mode} {[(n, o) for n, o in passes if o]} -> acc {r['accuracy']:.4f} "
            f"params {r['params_kept']:.4f} macs {r['macs_kept']:.4f} ({r['seconds']:.1f} s)")
    return b.cache[key]


def select(criterion, *, reconstruct=True, groups=None, **how):
    return list(method_passes(criterion, reconstruct=reconstruct, layers=tuple(groups or ()), **how))


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def prunable(model, predicate=lambda g: True) -> tuple[str, ...]:
    return tuple(g.name for g in find_channel_groups(model) if g.skip is None and predicate(g))


def kept_counts(result) -> dict[str, int]:
    return {row["group"]: row["kept"] for p in result["report"]["passes"] for row in p.get("pruned", [])}


# --------------------------------------------------------------------------- a. criteria

def section_a(tasks, budgets) -> tuple[str, dict]:
    out = ["## a. Criteria on the digit models (global budgets over FC units and conv channels)\n"]
    curves = {}
    for name in tasks:
        b = bench(name)
        groups = prunable(b.model)
        out.append(f"### {name}\n\n{split_text(b)}. Groups pruned: {', '.join(groups)} (all of them).\n")
        rows, curve = [], {}
        for criterion in CRITERIA:
            for keep in budgets:
                r = run(b, select(criterion, keep=keep))
                rows.append([criterion, f"keep={keep}", pct(r["params_kept"]), pct(r["macs_kept"]),
                             pct(r["accuracy"]), pct(r["agreement"])])
                curve.setdefault(criterion, []).append((r["params_kept"], r["macs_kept"], r["accuracy"]))
        for tau in PFA_TAUS:
            r = run(b, select("pfa-en", tau=tau))
            rows.append(["pfa-en", f"tau={tau}", pct(r["params_kept"]), pct(r["macs_kept"]),
                         pct(r["accuracy"]), pct(r["agreement"])])
            curve.setdefault("pfa-en", []).append((r["params_kept"], r["macs_kept"], r["accuracy"]))
        r = run(b, select("pfa-kl"))
        rows.append(["pfa-kl", "-", pct(r["params_kept"]), pct(r["macs_kept"]), pct(r["accuracy"]),
                     pct(r["agreement"])])
        curve["pfa-kl"] = [(r["params_kept"], r["macs_kept"], r["accuracy"])]
        out.append(markdown_table(["criterion", "budget", "params kept %", "MACs kept %", "accuracy %",
                                   "agreement %"], rows) + "\n")
        curves[name] = (curve, b.accuracy)
    best = []
    for name in tasks:
        curve, _ = curves[name]
        wins = {}
        for i, keep in enumerate(budgets):
            acc = {c: curve[c][i][2] for c in CRITERIA}
            top = max(acc.values())
            wins[keep] = "/".join(c for c in CRITERIA if acc[c] >= top - 1e-9)
        best.append([name] + [wins[k] for k in budgets])
    out.append("Best criterion per budget (ties joined by /):\n")
    out.append(markdown_table(["task"] + [f"keep={k}" for k in budgets], best) + "\n")
    return "\n".join(out), curves


def plot_a(curves) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
    names = list(curves)
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 3.4 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        curve, base = curves[name]
        for col, (index, label) in enumerate(((0, "parameters kept"), (1, "MACs kept"))):
            ax = axes[row][col]
            for criterion, points in curve.items():
                color, style = STYLE[criterion]
                pts = sorted(points, key=lambda p: p[index])
                ax.plot([p[index] for p in pts], [100 * p[2] for p in pts], style, color=color,
                        label=criterion, markersize=5)
            ax.axhline(100 * base, color="gray", lw=0.8, ls="--", label="original")
            ax.set_xscale("log")
            ax.set_xlabel(f"fraction of {label} (log)")
            ax.set_ylabel("target accuracy %")
            ax.set_title(f"{name}: accuracy vs {label}")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = common.RESULTS / "pruning_criteria.png"
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


# --------------------------------------------------------------------------- b. reconstruction

def section_b(tasks, budgets) -> str:
    out = ["## b. Reconstruction at equal parameters\n",
           "The same spectral selection applied with and without the reconstruction A_J (same channels, so "
           "the same parameters), next to the mean-activation baseline (channels with the largest mean, "
           "columns just dropped, as DALR's \"pruning (mean)\") and that baseline with A_J.\n"]
    rows = []
    for name in tasks:
        b = bench(name)
        for keep in budgets:
            rec = run(b, select("spectral", keep=keep))
            drop = run(b, select("spectral", keep=keep, reconstruct=False))
            mean = run(b, select("mean", keep=keep, reconstruct=False))
            mean_rec = run(b, select("mean", keep=keep))
            rows.append([name, pct(rec["params_kept"]), pct(rec["accuracy"]), pct(drop["accuracy"]),
                         pct(mean["accuracy"]), pct(mean_rec["accuracy"]), pct(b.accuracy),
                         f"{100 * (rec['accuracy'] - max(drop['accuracy'], mean['accuracy'])):+.1f}"])
    out.append(markdown_table(["task", "params kept %", "spectral + A_J %", "spectral, no A_J %",
                               "mean, no A_J %", "mean + A_J %", "original %", "margin (points)"], rows))
    out.append("\nmargin = spectral with reconstruction minus the better of the two baselines without it.\n")
    return "\n".join(out)


# --------------------------------------------------------------------------- c. sequential

def section_c(cases) -> str:
    out = ["## c. One-shot vs sequential\n",
           "One-shot: every site's statistics from the original graph. Sequential: site by site, each "
           "selection and reconstruction sees statistics re-gathered on the graph pruned so far (the "
           "channel counts are fixed first from the global budget, so both modes keep the same counts).\n"]
    rows = []
    for name, budget, groups, kwargs in cases:
        b = bench(name, **kwargs)
        passes = select("spectral", groups=groups, **budget)
        one = run(b, passes)
        seq = run(b, passes, mode="sequential")
        winner = ("sequential" if seq["accuracy"] > one["accuracy"]
                  else "tie" if seq["accuracy"] == one["accuracy"] else "one-shot")
        rows.append([name, ", ".join(f"{k}={v}" for k, v in budget.items()), pct(one["params_kept"]),
                     pct(one["macs_kept"]), pct(one["accuracy"]), pct(seq["accuracy"]), pct(b.accuracy),
                     winner, f"{one['seconds']:.0f} / {seq['seconds']:.0f}"])
    out.append(markdown_table(["task", "budget", "params kept %", "MACs kept %", "one-shot %", "sequential %",
                               "original %", "wins", "seconds (one-shot / sequential)"], rows))
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- d. MoMaSP

def mixed_bench(b: Bench, setting: str) -> Bench:
    """A copy of ``b`` whose "target" statistics come from the paper's data settings:
    target (N target samples), target/source (N/2 + N/2), target+source (N + N/2)."""
    if setting == "target":
        return b
    name = next(iter(b.calib.batch(np.arange(1))))
    n = len(b.calib)
    target = b.calib.batch(np.arange(n))[name]
    source = b.source.batch(np.arange(len(b.source)))[name]
    if setting == "target/source":
        data = np.concatenate([target[: n // 2], source[: n - n // 2]])
    else:
        data = np.concatenate([target, source[: n // 2]])
    clone = copy.copy(b)
    clone.provider = StatsProvider({"target": open_samples({name: data}, b.model), "source": b.source},
                                   batch_size=b.batch_size, folds=b.folds, progress=False)
    clone.cache = {}
    clone.mixed = len(data)
    return clone


def section_d(tasks, budgets) -> tuple[str, dict]:
    out = ["## d. MoMaSP in miniature (Fig. 2 / Table 2)\n",
           "Spectral pruning (global `keep` over all groups, with reconstruction) with Sigma from: target "
           "only (N target samples), target/source (N/2 target + N/2 MNIST), target+source (N target + "
           "N/2 MNIST); then target-only Sigma with the MoMaSP regulariser Reg J and Reg j (lambda = 1). "
           "C.R. = 1 - parameters kept (whole model).\n"]
    curves = {}
    for name in tasks:
        b = bench(name)
        benches = {s: mixed_bench(b, s) for s in ("target", "target/source", "target+source")}
        out.append(f"### {name}\n\n{split_text(b)}; mixed sets: "
                   f"{getattr(benches['target/source'], 'mixed', 0)} and "
                   f"{getattr(benches['target+source'], 'mixed', 0)} samples.\n")
        rows, curve = [], {}
        for keep in budgets:
            res = {s: run(bb, select("spectral", keep=keep)) for s, bb in benches.items()}
            res["Reg J"] = run(b, select("momasp-J", keep=keep))
            res["Reg j"] = run(b, select("momasp-j", keep=keep))
            cr = 1 - res["target"]["params_kept"]
            rows.append([f"{100 * cr:.1f}"] + [pct(res[k]["accuracy"]) for k in res])
            for k, r in res.items():
                curve.setdefault(k, []).append((1 - r["params_kept"], r["accuracy"]))
        out.append(markdown_table(["C.R. %", "target %", "target/source %", "target+source %", "Reg J %",
                                   "Reg j %"], rows) + "\n")
        curves[name] = curve
    return "\n".join(out), curves


def plot_d(curves) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.8), squeeze=False)
    for ax, (name, curve) in zip(axes[0], curves.items()):
        for label, points in curve.items():
            ax.plot([100 * p[0] for p in points], [100 * p[1] for p in points],
                    "o-" if "Reg" not in label else "s--", label=label, markersize=4)
        ax.set_xlabel("compression rate % (1 - params kept)")
        ax.set_ylabel("target accuracy %")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = common.RESULTS / "pruning_momasp.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


# --------------------------------------------------------------------------- e. PFA

def class_subset(b: Bench, classes) -> Bench:
    """``b`` restricted to samples whose label is in ``classes`` (calibration and evaluation)."""
    calib_mask = np.isin(b.calib.labels, classes)
    eval_mask = np.isin(b.eval.labels, classes)
    sub = copy.copy(b)
    sub.calib = b.calib.subset(np.flatnonzero(calib_mask))
    sub.eval = b.eval.subset(np.flatnonzero(eval_mask))
    sub.reference = b.reference[eval_mask]
    sub.labels = b.labels[eval_mask]
    sub.accuracy = sub.score(sub.reference)
    sub.provider = StatsProvider({"target": sub.calib}, batch_size=b.batch_size, folds=b.folds,
                                 progress=False)
    sub.cache = {}
    return sub


def section_e(max_calib, max_eval) -> str:
    full = bench("resnet20/cifar10-jpeg", max_calib=max_calib, max_eval=max_eval)
    groups = prunable(full.model)
    targets = {"10 classes": full, "3 classes (airplane, automobile, bird)": class_subset(full, [0, 1, 2]),
               "2 classes (airplane, automobile)": class_subset(full, [0, 1])}
    recipes = [("pfa-kl", {}), ("pfa-en", {"tau": 0.9}), ("pfa-en", {"tau": 0.95})]
    out = ["## e. PFA recipes adapt to the target (ResNet-20, inner channels of each residual block)\n",
           f"{split_text(full)}. Subsets keep the samples of those classes from both halves: "
           + ", ".join(f"{k}: calibration {len(t.calib)}, evaluation {len(t.eval)}"
                       for k, t in targets.items())
           + ". Responses max-pooled per sample (PFA's default); channels chosen by the spectral greedy, "
             "then reconstruction. Accuracy is 10-way top-1 on the held-out samples of the subset.\n"]
    results = {(t, i): run(b, select(c, groups=groups, **o)) for t, b in targets.items()
               for i, (c, o) in enumerate(recipes)}
    header = ["group (C)"] + [f"{c} {' '.join(f'{k}={v}' for k, v in o.items())}: {t.split(' (')[0]}"
                              for i, (c, o) in enumerate(recipes) for t in targets]
    counts = {key: kept_counts(r) for key, r in results.items()}
    channels = {g.name: g.channels for g in find_channel_groups(full.model)}
    rows = []
    for g in groups:
        short = g.replace("/conv1/Conv", "").strip("/")
        rows.append([f"{short} ({channels[g]})"] + [counts[(t, i)].get(g, channels[g])
                                                     for i in range(len(recipes)) for t in targets])
    cells = [(t, i) for i in range(len(recipes)) for t in targets]
    rows.append(["**total kept**"] + [sum(counts[c].values()) for c in cells])
    rows.append(["MACs kept %"] + [pct(results[c]["macs_kept"]) for c in cells])
    rows.append(["accuracy % (original)"] + [f"{pct(results[c]['accuracy'])} ({pct(targets[c[0]].accuracy)})"
                                             for c in cells])
    out.append(markdown_table(header, rows))
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- f. big models

def section_f(resnet_flops, mobilenet_flops, resnet_kwargs, mobilenet_kwargs) -> tuple[str, list]:
    out = ["## f. MAC budgets on ResNet-20 and MobileNetV2\n"]
    models = []
    b = bench("resnet20/cifar10-jpeg", **resnet_kwargs)
    groups = prunable(b.model)
    out.append(f"### ResNet-20, inner channels of each residual block ({len(groups)} groups; the residual "
               f"streams are coupled through option-A shortcuts and left alone)\n\n{split_text(b)}. "
               "`flops` is the fraction of the touched layers' MACs kept; the columns give the whole "
               "model.\n")
    rows = []
    for flops in resnet_flops:
        res = {c: run(b, select(c, flops=flops, groups=groups)) for c in ("spectral", "pfa-en", "l1", "mean")}
        rows.append([flops, pct(res["spectral"]["macs_kept"]), pct(res["spectral"]["params_kept"])]
                    + [pct(res[c]["accuracy"]) for c in res] + [pct(b.accuracy)])
    out.append(markdown_table(["flops", "MACs kept %", "params kept %", "spectral %", "pfa-en (global tau) %",
                               "l1 %", "mean %", "original %"], rows) + "\n")
    models.append(("resnet20/cifar10-jpeg", b, select("spectral", flops=resnet_flops[-1], groups=groups)))

    if mobilenet_flops:
        mb = bench("mobilenetv2/imagenet", **mobilenet_kwargs)
        expansion = prunable(mb.model, lambda g: mb_expansion(mb.model, g))
        out.append(f"### MobileNetV2, expansion channels ({len(expansion)} groups: 1x1 expand -> ReLU6 -> "
                   f"depthwise -> ReLU6 -> 1x1 project)\n\n{split_text(mb)}. ImageNet sample images: one per "
                   "class, 500 classes; the evaluation images are of other classes than the calibration "
                   "ones.\n")
        rows = []
        for flops in mobilenet_flops:
            res = {c: run(mb, select(c, flops=flops, groups=expansion)) for c in ("spectral", "l1")}
            sel = next(p for p in res["spectral"]["report"]["passes"] if p["pass"] == "select-nodes")
            rec = next(p for p in res["spectral"]["report"]["passes"]
                       if p["pass"] == "reconstruct-next-layer")
            worst = max(rec["pruned"], key=lambda r: r.get("heldout_error", r["error"]))
            rows.append([flops, pct(res["spectral"]["macs_kept"]), pct(res["spectral"]["params_kept"]),
                         pct(res["spectral"]["accuracy"]), pct(res["spectral"]["agreement"]),
                         f"{pct(res['l1']['accuracy'])} / {pct(res['l1']['agreement'])}",
                         f"{worst['group']} {worst['kept']}/{worst['channels']}: "
                         f"{worst['error']:.3f} / {worst.get('heldout_error', float('nan')):.3f}",
                         f"{sel['seconds']:.1f}"])
        out.append(markdown_table(["flops", "MACs kept %", "params kept %", "spectral top-1 %", "agreement %",
                                   "l1 top-1 / agreement %", "worst site: error calib / held-out",
                                   "select-nodes s"], rows))
        out.append(f"\nOriginal top-1 on these evaluation images: {pct(mb.accuracy)} %.\n")
        models.append(("mobilenetv2/imagenet", mb,
                       select("spectral", flops=mobilenet_flops[-1], groups=expansion)))
    return "\n".join(out), models


def mb_expansion(model, group) -> bool:
    """A group whose path holds a depthwise conv and whose producer is a 1x1 conv (not the stem)."""
    from onnxprune.graph.index import GraphIndex
    ops = {n.name: n.op_type for n in model.graph.node}
    depthwise = any(ops.get(p.node) == "Conv" for p in group.path)
    return depthwise and GraphIndex(model).dims(group.producers[0].weight)[2:] == (1, 1)


def section_f_combined(budgets) -> str:
    b = bench("lenet/usps")
    out = ["### Prune, then low rank (LeNet, USPS)\n",
           f"{split_text(b)}. select-nodes (spectral, global keep) + reconstruct-next-layer, then "
           "low-rank-split (DALR, ridge chosen on held-out folds) on the remaining Gemm layers with a global "
           "`keep`; next to pruning alone and low rank alone at similar sizes.\n"]
    rows = []
    for keep in budgets["prune"]:
        r = run(b, select("spectral", keep=keep))
        rows.append(["prune", f"keep={keep}", pct(r["params_kept"]), pct(r["macs_kept"]), pct(r["accuracy"])])
    for keep in budgets["lowrank"]:
        r = run(b, [("low-rank-split", {"method": "dalr", "keep": keep, "ops": ("Gemm", "MatMul")})])
        rows.append(["low rank (DALR)", f"keep={keep}", pct(r["params_kept"]), pct(r["macs_kept"]),
                     pct(r["accuracy"])])
    for keep, lr in budgets["both"]:
        r = run(b, list(method_passes("spectral", keep=keep, then_low_rank=lr)))
        rows.append(["prune + low rank", f"keep={keep}, then {lr}", pct(r["params_kept"]),
                     pct(r["macs_kept"]), pct(r["accuracy"])])
    rows.sort(key=lambda row: -float(row[2]))
    out.append(markdown_table(["recipe", "budget", "params kept %", "MACs kept %", "accuracy %"], rows))
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- g. latency

def section_g(cases, runs: int) -> str:
    out = ["## g. Latency (onnxruntime CPU)\n",
           f"Original and compressed model run interleaved (A B A B), {runs} timed runs after 3 warm-ups, "
           "median milliseconds per run on random inputs; the machine is shared, so only the ratios within a "
           "row mean anything.\n"]
    rows = []
    for name, b, passes in cases:
        r = b.run(passes)
        samples = b.eval.subset(np.arange(min(32, len(b.eval))))
        n = runs if r["macs"] < 1e8 else max(5, runs // 5)       # MobileNetV2 at batch 32 is slow here
        report = validate(b.model, r["model"], samples, measure_latency=True, latency_runs=n)
        lat = report.latency_ms
        for key in ("batch1", "batch32"):
            if key in lat.get("reference", {}) and key in lat.get("candidate", {}):
                ref, cand = lat["reference"][key], lat["candidate"][key]
                budget = passes[0][1].get("keep", passes[0][1].get("flops"))
                rows.append([name, budget, key.replace("batch", ""), f"{ref:.3f}", f"{cand:.3f}",
                             f"{ref / cand:.2f}x", f"{1 / r['macs_kept']:.2f}x", pct(r["params_kept"])])
    out.append(markdown_table(["model", "budget", "batch", "original ms", "pruned ms", "speed-up",
                               "MAC reduction", "params kept %"], rows))
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- h. greedy timing

def section_h(widths) -> str:
    import bench_linalg  # the linalg benchmark's timer and covariance (F F^T / (C/4) + 0.01 I)

    from onnxprune import linalg
    rows = []
    for C in widths:
        rng = np.random.default_rng(C)
        F = rng.standard_normal((C, C // 4))
        sigma = F @ F.T / (C // 4) + 0.01 * np.eye(C)
        seconds = bench_linalg.timed(linalg.spectral_select, sigma, count=C // 4)
        rows.append([C, C // 4, f"{seconds:.2f}"])
        log(f"  greedy {C} -> {C // 4}: {seconds:.2f} s")
    return "\n".join(["## h. Greedy selection time\n",
                      "`linalg.spectral_select(sigma, count=C/4)` on the covariance of bench/bench_linalg.py "
                      "(rank C/4 plus 0.01 I), one BLAS thread:\n",
                      markdown_table(["C", "kept", "seconds"], rows)]) + "\n"


# --------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tasks and budgets (a few minutes)")
    parser.add_argument("--only", nargs="+", choices=list("abcdefgh"), help="run only these sections")
    args = parser.parse_args()
    quick = args.quick
    todo = set(args.only or "abcdefgh")
    started = time.perf_counter()

    digits = ["lenet/usps", "mnist_cnn/usps"] if quick else \
        ["lenet/usps", "lenet/mnist-m", "mnist_cnn/usps", "mnist_cnn/mnist-m"]
    budgets = (0.3, 0.1, 0.03) if quick else (0.3, 0.1, 0.03, 0.01)
    resnet = {"max_calib": 500, "max_eval": 1000} if quick else {"max_calib": 1000, "max_eval": 1000}
    mobilenet = {"max_calib": 128, "max_eval": 250}
    sections, timings = [], {}

    def timed_section(label, fn, *a):
        t = time.perf_counter()
        result = fn(*a)
        timings[label] = time.perf_counter() - t
        log(f"[section {label}] {timings[label]:.0f} s")
        return result

    plots = []
    if "a" in todo:
        text, curves = timed_section("a", section_a, digits, budgets)
        sections.append(text)
        plots.append(plot_a(curves))
    if "b" in todo:
        sections.append(timed_section("b", section_b, digits, (0.1, 0.03, 0.01)))
    if "c" in todo:
        cases = [("lenet/usps", {"keep": 0.1}, None, {}), ("lenet/usps", {"keep": 0.03}, None, {}),
                 ("mnist_cnn/usps", {"keep": 0.03}, None, {})]
        if not quick:
            cases += [("lenet/mnist-m", {"keep": 0.03}, None, {}),
                      ("mnist_cnn/mnist-m", {"keep": 0.03}, None, {}),
                      ("resnet20/cifar10-jpeg", {"flops": 0.7},
                       prunable(bench("resnet20/cifar10-jpeg", **resnet).model), resnet)]
        sections.append(timed_section("c", section_c, cases))
    if "d" in todo:
        rates = (0.1, 0.05, 0.03, 0.02, 0.015, 0.01)
        text, curves = timed_section("d", section_d, ["lenet/mnist-m"] if quick else
                                     ["lenet/mnist-m", "lenet/usps"], rates)
        sections.append(text)
        plots.append(plot_d(curves))
    if "e" in todo:
        sections.append(timed_section("e", section_e, resnet["max_calib"], resnet["max_eval"]))
    big_models = []
    if "f" in todo:
        text, big_models = timed_section("f", section_f,
                                         (0.9, 0.7, 0.5) if quick else (0.9, 0.8, 0.7, 0.6, 0.5),
                                         () if quick else (0.95, 0.9, 0.8), resnet, mobilenet)
        sections.append(text)
        sections.append(timed_section("f2", section_f_combined, {
            "prune": (0.3, 0.1, 0.05, 0.03), "lowrank": (0.3, 0.1),
            "both": ((0.5, 0.5), (0.3, 0.3)) if quick else ((0.5, 0.5), (0.3, 0.5), (0.3, 0.3), (0.2, 0.3))}))
    if "g" in todo:
        cases = [("lenet/usps", bench("lenet/usps"), select("spectral", keep=0.1)),
                 ("mnist_cnn/usps", bench("mnist_cnn/usps"), select("spectral", keep=0.1))]
        cases += [c for c in big_models]
        if "f" not in todo:
            b = bench("resnet20/cifar10-jpeg", **resnet)
            cases.append(("resnet20/cifar10-jpeg", b,
                          select("spectral", flops=0.5, groups=prunable(b.model))))
        sections.append(timed_section("g", section_g, cases, 20 if quick else 40))
    if "h" in todo:
        sections.append(timed_section("h", section_h, (1024, 2048) if quick else (1024, 2048, 4096)))

    total = time.perf_counter() - started
    spent = ", ".join(f"{k}: {v:.0f} s" for k, v in timings.items())
    head = ["# Channel pruning without retraining\n",
            f"Machine: {machine()}; `python bench/pruning.py{' --quick' if quick else ''}` took "
            f"{total / 60:.1f} min ({spent}; load average {os.getloadavg()[0]:.1f}). One BLAS thread "
            f"(OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}). All accuracies are top-1 on "
            "held-out target samples that did not calibrate the compression; budgets are global "
            "(`keep`: fraction of the touched layers' parameters, `flops`: of their MACs); "
            "reconstruct-next-layer runs with its default ridge (chosen on held-out calibration folds) "
            "unless a row says otherwise.\n"]
    head += [f"![{p}]({p})\n" for p in plots if p]
    path = write_result("pruning", "\n".join(head + sections))
    log(f"wrote {path} in {total:.0f} s")


if __name__ == "__main__":
    main()
