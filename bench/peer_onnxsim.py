"""Peer comparison: onnxsim's post-training structured pruning vs onnxprune, at equal parameter counts.

onnxsim (PyPI ``onnxsim``, >= 0.8.1; earlier releases have no ``pruning`` module) ships
``onnxsim.pruning.apply_structured_pruning`` (remove the output channels of a producer with
the smallest weight-row L2 norm, and the matching inputs of its consumer, Li et al. 2017)
and ``apply_structured_wanda_pruning`` (rank by ||W_row||_2 * ||X||_2 over calibration
batches, Wanda's metric on whole channels). Neither compensates the next layer. Install
it with ``pip install -e '.[bench]'``.

For each real task, two parameter budgets: on the digit models the size our spectral
pruning reaches at keep 0.5 and the size DALR + bias compensation reaches at keep 0.25, on
ResNet-20 (which no method keeps usable at half its size without retraining) the sizes of
spectral pruning at keep 0.9 and 0.75, on MobileNetV2 at keep 0.65 and 0.5 (above 0.71
spectral pruning keeps every informative channel and the size stops changing); all are
whole-model parameter counts. At each budget every method is tuned to that count (DALR, the expensive one, runs
only where it sets the budget): onnxsim's ``sparsity`` by
bisection (Wanda's with a 4-sample probe batch: the data changes which channels go, not
how many), our ``keep`` from the parameters of the layers a pass touches (one correction run
when the first lands more than 3 % off). Everything calibrates on the first half of the
target data, onnxsim's Wanda on the same batches, and is scored on the second half
(`bench/common.py`; each half capped by ``--samples``).

    python bench/peer_onnxsim.py [--quick] [--tasks lenet/usps ...] [--samples N]

Writes bench/results/peer.md and bench/results/peer.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

# One BLAS thread unless told otherwise: next to onnxruntime's pool on a small machine a
# multi-threaded BLAS is many times slower (see bench/speed.py).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

from common import RESULTS, TASKS, Bench, machine, markdown_table, predict, pyplot  # noqa: E402
from onnxprune.cost import total_macs  # noqa: E402
from onnxprune.model import clone, count_parameters  # noqa: E402
from onnxprune.recipes import method_passes

TASK_NAMES = ["lenet/usps", "mnist_cnn/usps", "resnet20/cifar10-jpeg", "mobilenetv2/imagenet"]
MIN_ONNXSIM = "0.8.1"


def spectral_passes(keep: float, criterion: str = "spectral"):
    return list(method_passes(criterion, keep=float(keep)))


def dalr_passes(keep: float):
    return list(method_passes("dalr-bc", keep=float(keep)))


OURS = {
    "ours: spectral + reconstruction": spectral_passes,
    "ours: L1 filters + reconstruction": lambda keep: spectral_passes(keep, "l1"),
    "ours: DALR + bias comp.": dalr_passes,
}


def onnxsim_status() -> tuple[bool, str]:
    """(usable, description) of the installed onnxsim."""
    try:
        from importlib.metadata import version
        ver = version("onnxsim")
    except Exception:  # noqa: BLE001
        return False, "onnxsim is not installed (pip install -e '.[bench]')"
    try:
        from onnxsim import pruning
    except ImportError as exc:
        return False, f"onnxsim {ver} has no usable onnxsim.pruning module ({exc}); needs >= {MIN_ONNXSIM}"
    missing = [f for f in ("apply_structured_pruning", "apply_structured_wanda_pruning") if not hasattr(pruning, f)]
    if missing:
        return False, f"onnxsim {ver}: onnxsim.pruning lacks {', '.join(missing)}"
    return True, f"onnxsim {ver}"


# --------------------------------------------------------------------------------------
# tuning to a parameter count


def touched_params(model, passes) -> int:
    """Parameters of the layers the first pass of ``passes`` can change (its budget's base)."""
    from onnxprune.passes import REGISTRY
    from onnxprune.passes.select_nodes import Footprint

    name, options = passes[0]
    p = REGISTRY[name](**options)
    if name == "select-nodes":
        groups, _ = p.groups(model)
        return int(Footprint(model, groups).full()[0])
    layers, _ = p.layers(model)
    return int(sum(layer.out_features * layer.in_features for layer in layers))


def run_ours(bench: Bench, make_passes, target: int | None, keep: float | None = None) -> dict:
    """Our method at ``keep``, or at the keep that lands on ``target`` parameters."""
    total = bench.params
    base = touched_params(bench.model, make_passes(0.5))
    if keep is None:
        keep = float(np.clip((target - (total - base)) / base, 0.01, 1.0))
    started = time.perf_counter()
    result = bench.run(make_passes(keep))
    best = (keep, result)
    if target is not None:
        # bisection on keep: kept counts move in steps (whole channels, multiples of 8), so one
        # linear correction can overshoot to keeping everything
        lo, hi = 0.01, 1.0
        for _ in range(6):
            if abs(result["params"] - target) <= 0.03 * target:
                break
            lo, hi = (keep, hi) if result["params"] < target else (lo, keep)
            keep = (lo + hi) / 2
            result = bench.run(make_passes(keep))
            if abs(result["params"] - target) < abs(best[1]["params"] - target):
                best = (keep, result)
    keep, result = best
    result["seconds"] = time.perf_counter() - started
    result["keep"] = keep
    return result


def weights_changed(original, model) -> int:
    """How many of the original's weight tensors (rank >= 2) changed shape or disappeared."""
    before = {t.name: tuple(t.dims) for t in original.graph.initializer if len(t.dims) >= 2}
    after = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return sum(1 for name, dims in before.items() if after.get(name) != dims)


def score(bench: Bench, model) -> dict:
    pred = predict(model, bench.eval, batch_size=bench.batch_size)
    params, macs = count_parameters(model), total_macs(model)
    return {"accuracy": bench.score(pred), "agreement": float((pred == bench.reference).mean()),
            "params": params, "params_kept": params / bench.params, "macs": macs, "macs_kept": macs / bench.macs,
            "weights_changed": weights_changed(bench.model, model)}


def bisect_sparsity(prune, target: int) -> float:
    """The sparsity whose ``prune(sparsity)`` model is closest to ``target`` parameters (the
    count falls with the sparsity in steps; 12 halvings of [0, 0.99])."""
    def count(s):
        return count_parameters(prune(s))

    lo, hi = 0.0, 0.99
    if count(hi) > target:          # cannot get that small: the smallest it reaches
        return hi
    for _ in range(12):             # invariant: count(lo) > target >= count(hi)
        mid = (lo + hi) / 2
        if count(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi if abs(count(hi) - target) <= abs(count(lo) - target) else lo


def onnxsim_at(model, target: int, kind: str, batches: list[dict]) -> tuple[float, object, float]:
    """onnxsim's L2 or Wanda structured pruning tuned to ``target`` parameters.

    Which channels Wanda keeps depends on the calibration data, how many does not, so its
    sparsity is searched with one 4-sample batch and the final run uses every batch.
    Returns (sparsity, model, seconds of the final call).
    """
    from onnxsim.pruning import apply_structured_pruning, apply_structured_wanda_pruning

    def prune(s, data=None):
        if kind == "l2":
            return apply_structured_pruning(clone(model), sparsity=float(s))
        probe = data or [{k: v[:4] for k, v in batches[0].items()}]
        return apply_structured_wanda_pruning(clone(model), calibration_data=probe, sparsity=float(s),
                                              providers=["CPUExecutionProvider"])

    sparsity = bisect_sparsity(prune, target)
    started = time.perf_counter()
    pruned = prune(sparsity, batches)
    return sparsity, pruned, time.perf_counter() - started


def calibration_batches(bench: Bench, batch_size: int = 32) -> list[dict]:
    return [feeds for _, feeds in bench.calib.batches(batch_size)]


def run_task(task: str, budgets: dict, methods: list[str], have_onnxsim: bool, samples: int | None) -> dict:
    """``budgets``: {name: (our method that sets the count, its keep, methods also run there)}."""
    import dataclasses

    t0 = time.perf_counter()
    spec = TASKS[task]
    if samples:
        spec = dataclasses.replace(spec, max_calib=min(spec.max_calib or samples, samples),
                                   max_eval=min(spec.max_eval or samples, samples))
    bench = Bench(spec, with_source=False)
    print(f"{task}: reference top-1 {100 * bench.accuracy:.2f} % on {len(bench.eval)} held-out samples, "
          f"{bench.params:,} params", file=sys.stderr, flush=True)
    out = {"task": task, "params": bench.params, "macs": bench.macs, "accuracy": bench.accuracy,
           "weights": sum(1 for t in bench.model.graph.initializer if len(t.dims) >= 2),
           "calib": len(bench.calib), "eval": len(bench.eval), "budgets": {}}
    anchors = {}
    for budget, (anchor_name, keep, _) in budgets.items():
        anchors[budget] = (anchor_name, run_ours(bench, OURS[anchor_name], None, keep=keep))
    batches = calibration_batches(bench) if have_onnxsim else None
    for budget, (anchor_name, anchor) in anchors.items():
        target = int(anchor["params"])
        rows = {}
        for name in [m for m in methods if m in budgets[budget][2] or m == anchor_name]:
            print(f"  {budget}: {name} ...", file=sys.stderr, flush=True)
            try:
                if name == anchor_name:
                    r = anchor
                elif name in OURS:
                    r = run_ours(bench, OURS[name], target)
                elif name.startswith("onnxsim"):
                    if not have_onnxsim:
                        continue
                    kind = "l2" if "L2" in name else "wanda"
                    sparsity, model, secs = onnxsim_at(bench.model, target, kind, batches)
                    r = {**score(bench, model), "seconds": secs, "sparsity": sparsity}
                else:
                    continue
            except Exception as exc:  # noqa: BLE001 - a peer failing on a model is a result
                r = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
            if "model" in r and "weights_changed" not in r:
                r["weights_changed"] = weights_changed(bench.model, r["model"])
            rows[name] = {k: v for k, v in r.items() if k not in ("report", "model")}
            if "report" in r:
                rows[name]["calibration_seconds"] = r["report"]["seconds"].get("calibration", 0.0)
            if "error" not in r:
                print(f"    top-1 {100 * r['accuracy']:.2f} %, agreement {100 * r['agreement']:.1f} %, "
                      f"params {r['params']:,}, {r['seconds']:.1f} s", file=sys.stderr, flush=True)
            else:
                print(f"    failed: {r['error']}", file=sys.stderr, flush=True)
        out["budgets"][budget] = {"target": target, "rows": rows}
    out["seconds"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------------------
# report


BUDGET_TEXT = {"spectral": "size of our spectral pruning", "dalr": "size of our DALR + bias compensation"}


def render(raw: dict) -> str:
    lines = [
        "# Peer: onnxsim post-training structured pruning",
        "",
        f"`{raw['command']}` on {raw['machine']}; {raw['date']}; total {raw['wall']:.0f} s "
        f"(load average {raw['load'][0]:.1f} -> {raw['load'][1]:.1f}).",
        "",
        "## What PyPI offers",
        "",
    ]
    lines += raw["findings"] + [""]
    if not raw["onnxsim_ok"]:
        lines += [f"**onnxsim could not be used here: {raw['onnxsim']}.** Only our own methods are listed.", ""]
    lines += [
        "## Method",
        "",
        "- **onnxsim: L2 filters** = `onnxsim.pruning.apply_structured_pruning(model, sparsity=s)`: in each "
        "producer -> consumer chain it recognises, drop the fraction s of output channels with the smallest "
        "weight-row L2 norm and the matching consumer inputs; nothing is compensated.",
        "- **onnxsim: Wanda filters** = `apply_structured_wanda_pruning(model, calibration_data=<our "
        "calibration batches of 32>, sparsity=s)`: channels ranked by ||W_row||_2 x ||X||_2; nothing is "
        "compensated.",
        "- **ours: spectral + reconstruction** = `select-nodes` (greedy retention of the target second "
        "moment) + `reconstruct-next-layer` (least-squares compensation of the consumers).",
        "- **ours: L1 filters + reconstruction** = our pipeline with the L1 filter-norm criterion: the same "
        "kind of ranking as onnxsim's, plus our compensation; separates 'which channels' from 'compensate "
        "or not'.",
        "- **ours: DALR + bias comp.** = `low-rank-split` (DALR, ridge chosen on held-out calibration data) "
        "+ `bias-compensate`: a different kind of compression at the same parameter count.",
        "",
        f"Samples: the harness's halves, each capped at {raw.get('samples') or 'no'} samples. "
        "Budgets are whole-model parameter counts. onnxsim's sparsity is bisected to the count for each "
        "of its two functions (its "
        "per-chain uniform mode, the default; chains it does not recognise are left whole, so reaching a "
        "count needs a higher sparsity on the chains it does prune). Accuracy is top-1 on the held-out "
        "half; agreement is top-1 agreement with the original model there. 'weights changed': weight tensors "
        "(rank >= 2) of the original whose shape changed or that were replaced. Seconds: the method's own "
        "run (ours include the statistics gathering when they were not yet cached, see "
        "'calibration (s)'; onnxsim Wanda includes its own calibration run).",
        "",
    ]
    summary = []
    for t in raw["tasks"]:
        lines += [f"## {t['task']}", "",
                  f"Original: {t['params']:,} parameters, {t['macs'] / 1e6:.1f} M MACs, top-1 "
                  f"{100 * t['accuracy']:.2f} % on {t['eval']} held-out samples (calibration: {t['calib']}).", ""]
        for budget, b in t["budgets"].items():
            kind, _, keep = budget.partition("-")
            lines += [f"Budget: {BUDGET_TEXT.get(kind, kind)} at keep {keep} = {b['target']:,} parameters "
                      f"({100 * b['target'] / t['params']:.1f} %).", ""]
            header = ["method", "params", "MACs kept", "weights changed", "top-1 (%)", "drop (points)",
                      "agreement (%)", "setting", "seconds", "calibration (s)"]
            rows = []
            for name, r in b["rows"].items():
                if "error" in r:
                    rows.append([name, "failed", "", "", "", "", "", r["error"], "", ""])
                    continue
                setting = f"sparsity {r['sparsity']:.3f}" if "sparsity" in r else f"keep {r.get('keep', 0):.3f}"
                rows.append([name, f"{r['params']:,}", f"{r['macs_kept']:.2f}",
                             f"{r.get('weights_changed', '?')} / {t.get('weights', '?')}", f"{100 * r['accuracy']:.2f}",
                             f"{100 * (t['accuracy'] - r['accuracy']):.2f}", f"{100 * r['agreement']:.1f}",
                             setting, f"{r['seconds']:.2f}" if r["seconds"] < 10 else f"{r['seconds']:.0f}",
                             f"{r['calibration_seconds']:.1f}" if "calibration_seconds" in r else "—"])
            lines += [markdown_table(header, rows), ""]
            ok = {k: v for k, v in b["rows"].items() if "error" not in v}
            peers = {k: v for k, v in ok.items() if k.startswith("onnxsim")}
            ours = {k: v for k, v in ok.items() if k.startswith("ours")}
            if peers and ours:
                def best(side, key):
                    name = max(side, key=lambda k: side[k][key])
                    return name, side[name][key]
                row = [t["task"], f"{b['target']:,}"]
                for key in ("accuracy", "agreement"):
                    (pn, pv), (on, ov) = best(peers, key), best(ours, key)
                    diff = 100 * (ov - pv)
                    row += [f"{100 * pv:.2f} ({pn.split(': ')[1]})", f"{100 * ov:.2f} ({on.split(': ')[1]})",
                            f"{diff:+.2f}"]
                summary.append(row)
    if summary:
        lines += ["## Summary", "",
                  "Best of each side per task and budget, on the held-out half (differences in points; positive: "
                  "ours ahead). Top-1 accuracy on a shifted target domain can rise above the original's; "
                  "agreement with the original model measures how faithfully the compressed model keeps its "
                  "behaviour.", "",
                  markdown_table(["task", "params", "top-1: best onnxsim", "top-1: best ours", "diff",
                                  "agreement: best onnxsim", "agreement: best ours", "diff"], summary), ""]
    lines += raw.get("notes", [])
    lines += ["", "Plot: [accuracy vs parameters](peer.png)", "",
              "<details><summary>raw numbers</summary>", "", "```json", json.dumps(raw, indent=1, default=str),
              "```", "", "</details>", ""]
    return "\n".join(lines)


def plot(raw: dict, path: Path) -> Path | None:
    plt = pyplot()
    tasks = raw["tasks"]
    if not tasks or plt is None:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 4), squeeze=False)
    style = {"ours: spectral + reconstruction": ("tab:blue", "o"), "ours: L1 filters + reconstruction":
             ("tab:cyan", "s"), "ours: DALR + bias comp.": ("tab:green", "D"),
             "onnxsim: L2 filters": ("tab:red", "v"), "onnxsim: Wanda filters": ("tab:orange", "^")}
    for ax, t in zip(axes[0], tasks):
        for name, (color, marker) in style.items():
            pts = [(b["rows"][name]["params"] / t["params"], 100 * b["rows"][name]["accuracy"])
                   for b in t["budgets"].values() if name in b["rows"] and "error" not in b["rows"][name]]
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker=marker, color=color, label=name, lw=1)
        ax.axhline(100 * t["accuracy"], color="k", ls=":", lw=1, label="original")
        ax.set_title(t["task"], fontsize=9)
        ax.set_xlabel("parameters kept (fraction)")
        ax.set_ylabel("top-1 on held-out half (%)")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def findings(ok: bool, status: str) -> list[str]:
    """What we found on PyPI (checked by hand when this script was written; the installed
    version is re-checked at run time)."""
    return [
        f"- Installed here: {status}.",
        "- `onnxsim.pruning` (0.8.1) provides `apply_structured_pruning(model, sparsity, importance_norm, "
        "global_sparsity)` and `apply_structured_wanda_pruning(model, calibration_data, num_samples, seed, "
        "sparsity, ...)`, besides quantisation and unstructured magnitude/Wanda/SparseGPT pruning. Older "
        "releases (0.4.x, 0.7.x) have no `pruning` module, so the `bench` extra pins `onnxsim>=0.8.1`.",
        "- onnxsim 0.8.1 needs Python >= 3.11 and depends only on `onnx` (onnxruntime for the Wanda "
        "calibration run, already a dependency of onnxprune). It runs on CPU and downloads nothing at run time "
        "when `calibration_data` is given.",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=TASK_NAMES)
    parser.add_argument("--quick", action="store_true", help="one budget (spectral keep 0.5), fewer methods")
    parser.add_argument("--samples", type=int, help="cap on calibration and evaluation samples per task "
                        "(default 1000, quick 256; 0: the harness's own splits)")
    parser.add_argument("--raw", type=Path, help="also dump the raw numbers as JSON here")
    parser.add_argument("--render", type=Path, help="only re-render from a --raw file or an earlier peer.md")
    parser.add_argument("--out", type=Path, default=RESULTS / "peer.md")
    args = parser.parse_args(argv)

    if args.render:
        text = args.render.read_text()
        if args.render.suffix == ".md":     # the raw numbers block of an earlier peer.md
            text = text.split("```json", 1)[1].split("```", 1)[0]
        raw = json.loads(text)
    else:
        ok, status = onnxsim_status()
        print(status, file=sys.stderr)
        methods = ["ours: spectral + reconstruction", "onnxsim: L2 filters", "onnxsim: Wanda filters",
                   "ours: L1 filters + reconstruction", "ours: DALR + bias comp."]
        spectral = "ours: spectral + reconstruction"
        dalr = "ours: DALR + bias comp."
        if args.quick:
            small = big = mobile = {"spectral-0.5": (spectral, 0.5, methods[:3])}
        else:   # DALR (one decomposition per task, the expensive part) only where it sets the budget
            small = {"spectral-0.5": (spectral, 0.5, methods[:4]), "dalr-0.25": (dalr, 0.25, methods)}
            # without retraining the CIFAR/ImageNet models lose most of their accuracy at
            # half their parameters, whoever prunes: compare them at milder budgets
            big = {"spectral-0.9": (spectral, 0.9, methods[:4]), "spectral-0.75": (spectral, 0.75, methods[:4])}
            # MobileNetV2: spectral's loosest threshold (every informative channel kept) already
            # lands at 71 % of the parameters, so any keep above that gives the same model
            mobile = {"spectral-0.65": (spectral, 0.65, methods[:4]), "spectral-0.5": (spectral, 0.5, methods[:4])}
        samples = args.samples if args.samples is not None else (256 if args.quick else 1000)
        started = time.perf_counter()
        raw = {"command": "python bench/peer_onnxsim.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": machine(), "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
               "onnxsim_ok": ok, "onnxsim": status, "findings": findings(ok, status), "tasks": [],
               "load": [os.getloadavg()[0], None], "samples": samples}
        for task in args.tasks:
            if not TASKS[task].model.exists():
                print(f"skip {task}: {TASKS[task].model} missing", file=sys.stderr)
                continue
            budgets = (mobile if task.startswith("mobilenetv2") else big if task.startswith("resnet20")
                       else small)
            raw["tasks"].append(run_task(task, budgets, methods, ok, samples or None))
            partial = dict(raw, wall=time.perf_counter() - started, load=[raw["load"][0], os.getloadavg()[0]])
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(render(partial) + "\n_Partial: written after each task; the run had not finished._\n")
        raw["load"][1] = os.getloadavg()[0]
        raw["wall"] = time.perf_counter() - started
        if args.raw:
            args.raw.write_text(json.dumps(raw, indent=1, default=str))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(raw))
    png = plot(raw, args.out.parent / "peer.png")
    print(f"wrote {args.out}" + (f" and {png}" if png else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
