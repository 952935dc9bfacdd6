"""Sentence encoder: paraphrase-MiniLM-L3 compressed for SST-2 and AG News (../shared/data/text).

Per domain, calibration and evaluation samples are disjoint:

- SST-2 (1821 sentences, L = 64): the first ``--sst2-calib`` (500) in file order calibrate,
  the other 1321 evaluate;
- AG News (7600, L = 128, stored in blocks of one class): a seeded permutation (seed 0) gives
  ``--ag-calib`` (500) calibration and ``--ag-eval`` (1000) evaluation sentences, each kept
  in file order (a subsample: the whole set takes minutes per model on this machine).

On the evaluation samples, in their order, the first half is the kNN index / probe training
half and the second half the queries / test half (k = 10, cosine; LogisticRegression(C=1,
max_iter=5000) on L2-normalised embeddings), for the original and for each compressed model;
cosine = mean cosine similarity of the compressed model's sentence embedding (output 461)
with the original's.

Rows, at 70 % and 50 % of the model's MACs (``--flops``; MACs per token of the whole encoder):

- ``spectral``: the planner restricted to FFN pruning (spectral selection + least-squares
  reconstruction of the second FFN matrix) = ``compress --method spectral --flops F``;
- ``wanda (no reconstruction)``: the same per-block unit counts, units ranked by structured
  Wanda and the second matrix only loses the pruned rows (what onnxsim's structured Wanda does);
  ``wanda + reconstruction``: the same ranking with the least-squares correction;
- ``dalr-bc``: the planner restricted to DALR low rank + bias compensation of the 18 projection
  and FFN MatMuls = ``compress --method dalr-bc --flops F``;
- ``auto``: the planner's mix of FFN pruning and low rank = ``compress --flops F``.

All planner rows come from one sensitivity run per domain (the family-restricted planners reuse
its curves: same sites, same statistics). Writes bench/results/text.md and text.json.

    python bench/text.py [--domains sst2,ag_news] [--budgets 0.7,0.5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, SHARED
from onnxprune.data.samples import open_samples
from onnxprune.model import jsonable, load_model, write_text_atomic
from onnxprune.pipeline import Recipe, run_pipeline
from onnxprune.plan.planner import FOLDS, Planner, PlanOptions
from onnxprune.validate import validate

MODEL = SHARED / "models" / "minilm_l3_paraphrase.onnx"
TEXT = SHARED / "data" / "text"


def splits(domain: str, args) -> tuple[dict, dict, str]:
    data = dict(np.load(TEXT / f"{domain}_test.npz"))
    n = len(data["y"])
    if domain == "sst2":
        calib, held = np.arange(args.sst2_calib), np.arange(args.sst2_calib, n)
        how = f"first {args.sst2_calib} calibrate, the other {n - args.sst2_calib} evaluate (file order)"
    else:
        order = np.random.default_rng(0).permutation(n)
        calib, held = np.sort(order[:args.ag_calib]), np.sort(order[args.ag_calib:args.ag_calib + args.ag_eval])
        how = (f"seeded permutation (seed 0): {args.ag_calib} calibrate, {args.ag_eval} evaluate, each in file "
               f"order (of {n})")
    pick = lambda rows: {k: v[rows] for k, v in data.items()}
    return pick(calib), pick(held), how


def row(name: str, budget: float, model, compressed, held, plan: dict | None, seconds: float) -> dict:
    v = validate(model, compressed, held, measure_latency=False)
    e = v.embedding
    return {"method": name, "budget": budget, "macs": v.macs_candidate / v.macs_reference,
            "params": v.params_candidate / v.params_reference, "cosine": e["cosine"], "cosine_p05": e["cosine_p05"],
            "knn_reference": e["knn_reference"], "knn": e["knn_candidate"],
            "probe_reference": e.get("probe_reference"), "probe": e.get("probe_candidate"),
            "sites": plan, "seconds": round(seconds, 1)}


def short(name: str) -> str:
    """``/model/.../encoder/layer.1/intermediate/dense/MatMul`` -> ``L1 intermediate``."""
    parts = name.split("/encoder/")[-1].split("/")
    layer = parts[0].replace("layer.", "L")
    return f"{layer} {'.'.join(p for p in parts[1:-1] if p not in ('dense', 'self'))}"


def composition(sites) -> str:
    """How many FFN blocks were pruned and layers split, from a planner row's sites."""
    if not isinstance(sites, list):
        return "the unit / head counts of the row above"
    pruned = [s.split(" prune ")[1] for s in sites if " prune " in s and "attention" not in s]
    heads = [s.split(" prune ")[1] for s in sites if " prune " in s and "attention" in s]
    split = [s for s in sites if " low-rank " in s]
    parts = []
    if pruned:
        parts.append("FFN units kept " + ", ".join(pruned))
    if heads:
        parts.append("heads kept " + ", ".join(f"{int(h.split('/')[0]) // 32}/{int(h.split('/')[1]) // 32}"
                                                for h in heads))
    if split:
        parts.append(f"{len(split)} MatMuls split")
    return "; ".join(parts) or "nothing"


def counts_of(passes) -> dict[str, int]:
    for name, opts in passes:
        if name == "select-nodes":
            return dict(opts.get("counts") or {})
    return {}


def planner_rows(label: str, planner: Planner, budget: float, auto: Planner, held, log) -> tuple[dict, tuple]:
    """One planner plan at ``budget``, run on all calibration statistics and validated."""
    t0 = time.perf_counter()
    result = planner.for_budget(budget)
    passes = tuple(result["passes"])
    recipe = Recipe(passes=passes or (("select-nodes", {"counts": {}}),), calib_size=None, folds=FOLDS)
    compressed, _ = run_pipeline(auto.original, recipe, auto.provider)
    sites = [f"{short(s['site'])} {s['family']} {s['size']}/{s['of']}" for s in result["sites"]]
    r = row(label, budget, auto.original, compressed, held, sites, time.perf_counter() - t0)
    r["budget_met"] = bool(result.get("budget_met", True))
    log(f"{label} {budget}: macs {r['macs']:.3f} cosine {r['cosine']:.4f} knn {r['knn']:.4f} "
        f"(met {r['budget_met']})")
    return r, (passes, compressed)


def run_domain(domain: str, args, log, *, keep_models: bool = False) -> tuple[list[dict], dict, dict]:
    model = load_model(MODEL)
    calib_data, held_data, how = splits(domain, args)
    calib, held = open_samples(calib_data, model, name=f"{domain} calibration"), \
        open_samples(held_data, model, name=f"{domain} evaluation")
    started = time.perf_counter()
    auto = Planner(model, calib, options=PlanOptions(), batch_size=32, seed=0)
    auto.sensitivity()
    sens_seconds = time.perf_counter() - started
    log(f"{domain}: sensitivity of {len(auto.sites)} sites in {sens_seconds:.0f} s")
    groups = [s for s in auto.sites if s.family == "prune"]
    ffn = tuple(s.name for s in groups if s.group.structure == "last-axis")
    heads = tuple(s.name for s in groups if s.group.structure == "heads")

    def restricted(**options) -> Planner:
        p = Planner(model, calib, options=PlanOptions(**options), batch_size=32, seed=0, provider=auto.provider)
        p.curves = {k: v for k, v in auto.curves.items() if k in {s.key for s in p.sites}}
        return p

    planners = {"FFN units: spectral + reconstruction": restricted(families=("prune",), sites=ffn),
                "heads: spectral + reconstruction": restricted(families=("prune",), sites=heads),
                "FFN units + heads (pruning planner)": restricted(families=("prune",)),
                "low rank: DALR + bias (low-rank planner)": restricted(families=("low-rank",)),
                "planner mix (compress default)": auto}
    rows, models = [], {}
    for budget in args.budgets:
        for label, planner in planners.items():
            r, (passes, compressed) = planner_rows(label, planner, budget, auto, held, log)
            rows.append(r)
            if keep_models:
                models[(label, budget)] = compressed
            if label.startswith(("FFN units:", "heads:")):
                counts = counts_of(passes)
                variants = (("wanda, no reconstruction", "wanda", False), ("wanda + reconstruction", "wanda", True)) \
                    if label.startswith("FFN") else (("spectral, no reconstruction", "spectral", False),)
                for name, criterion, reconstruct in variants:
                    t0 = time.perf_counter()
                    recipe = Recipe(passes=(("select-nodes", {"criterion": criterion, "counts": counts}),
                                            ("reconstruct-next-layer", {"reconstruct": reconstruct})),
                                    calib_size=None, folds=FOLDS)
                    compressed, _ = run_pipeline(auto.original, recipe, auto.provider)
                    rows.append(row(f"{label.split(':')[0]}: {name}", budget, auto.original, compressed, held,
                                    "same counts", time.perf_counter() - t0))
                    log(f"{rows[-1]['method']} {budget}: cosine {rows[-1]['cosine']:.4f} knn {rows[-1]['knn']:.4f}")
    info = {"split": how, "calibration": len(calib), "evaluation": len(held), "sensitivity_seconds": round(sens_seconds),
            "sites": len(auto.sites)}
    return rows, info, models


def macs_at(model, tokens: int) -> int:
    from onnxprune.cost import layer_costs

    return int(sum(c.macs for c in layer_costs(model, input_shapes={"input_ids": [1, tokens],
                                                                     "attention_mask": [1, tokens]})))


def fusion(models: dict, args, log) -> list[dict]:
    """onnxruntime's transformer optimizer on the original and every planner model: fused op
    counts, the optimised graph against the unoptimised one, latency at batch 1 and 32 (L = 128)."""
    import onnxruntime as ort
    from onnxruntime.transformers.optimizer import optimize_model

    from onnxprune.model import save_model

    tokens = 128
    rng = np.random.default_rng(0)
    feeds = {b: {"input_ids": np.concatenate([np.full((b, 1), 101), rng.integers(1000, 30000, (b, tokens - 2)),
                                              np.full((b, 1), 102)], axis=1).astype(np.int64),
                 "attention_mask": np.ones((b, tokens), dtype=np.int64)} for b in (1, 32)}
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    chosen = [("original", None, load_model(MODEL))] + [(label, budget, m) for (label, budget), m in models.items()
                                                         if "planner" in label or label.startswith(("FFN units:",
                                                                                                   "heads:"))]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for k, (label, budget, model) in enumerate(chosen):
            path = Path(tmp) / f"m{k}.onnx"
            save_model(model, path)
            optimised = optimize_model(str(path), model_type="bert", num_heads=12, hidden_size=384)
            fused = {op: n for op, n in optimised.get_fused_operator_statistics().items() if n}
            opt_path = Path(tmp) / f"m{k}_opt.onnx"
            optimised.save_model_to_file(str(opt_path))
            plain = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            fast = ort.InferenceSession(str(opt_path), options, providers=["CPUExecutionProvider"])
            a, b = (sess.run(["461"], feeds[1])[0] for sess in (plain, fast))
            sessions[k] = fast
            out.append({"method": label, "budget": budget, "fused": fused,
                        "optimised_error": float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)),
                        "macs_seq128": macs_at(model, tokens)})
            log(f"fusion {label} {budget}: {fused}")
        for batch, runs in ((1, args.latency_runs), (32, max(3, args.latency_runs // 4))):
            for sess in sessions.values():
                sess.run(["461"], feeds[batch])                     # warm-up
            times = {k: [] for k in sessions}
            for _ in range(runs):                                   # interleaved: every model once per round
                for k, sess in sessions.items():
                    t0 = time.perf_counter()
                    sess.run(["461"], feeds[batch])
                    times[k].append(time.perf_counter() - t0)
            for k, row_ in enumerate(out):
                row_[f"ms_batch{batch}"] = 1000 * float(np.median(times[k]))
    base = out[0]
    for row_ in out:
        row_["mac_ratio"] = row_["macs_seq128"] / base["macs_seq128"]
        for batch in (1, 32):
            row_[f"speedup_batch{batch}"] = base[f"ms_batch{batch}"] / row_[f"ms_batch{batch}"]
    return out


def fusion_table(rows: list[dict]) -> list[str]:
    lines = ["### onnxruntime transformer optimizer (SST-2 models)", "",
             "`optimize_model(path, model_type=\"bert\", num_heads=12, hidden_size=384)` on each model (onnxruntime "
             "detects pruned head counts per layer from the Reshape constants); latency of the optimised graphs, "
             "batch 1 and 32 at L = 128, interleaved medians, "
             "on the shared 2-core machine under load (ratios only). MACs at L = 128 include the attention products.",
             "",
             "| MACs budget | model | fused ops | optimised vs unoptimised (rel. max error) | MACs at L=128 % | "
             "batch 1 ms (speedup) | batch 32 ms (speedup) | speedup / MAC saving |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fused = ", ".join(f"{k} {v}" for k, v in sorted(r["fused"].items()))
        realised = min(r["speedup_batch1"], r["speedup_batch32"]) * r["mac_ratio"]
        budget = "-" if r["budget"] is None else f"{100 * r['budget']:.0f} %"
        lines.append(f"| {budget} | {r['method']} | {fused} | {r['optimised_error']:.1e} | {100 * r['mac_ratio']:.1f} | "
                     f"{r['ms_batch1']:.1f} ({r['speedup_batch1']:.2f}x) | {r['ms_batch32']:.0f} "
                     f"({r['speedup_batch32']:.2f}x) | {realised:.2f} |")
    return lines + ["", "Last column: the smaller speedup times the MAC ratio (1.0: the speedup the MAC "
                        "saving promises; the goal is at least 0.8).", ""]


def table(domain: str, rows: list[dict], info: dict) -> list[str]:
    ref = rows[0]
    probe_ref = "n/a" if ref["probe_reference"] is None else f"{100 * ref['probe_reference']:.1f}"
    lines = [f"### {domain}", "",
             f"{info['split']}; kNN index / queries = halves of the {info['evaluation']} evaluation sentences. "
             f"Original: kNN {100 * ref['knn_reference']:.1f} %, probe {probe_ref} %.", "",
             "| MACs budget | method | MACs % | params % | cosine (mean / 5th pct) | kNN % (orig) | probe % (orig) | plan |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        probe = "n/a" if r["probe"] is None else f"{100 * r['probe']:.1f} ({100 * r['probe_reference']:.1f})"
        method = r["method"] + ("" if r.get("budget_met", True) else " (budget not reachable: most compressed plan)")
        lines.append(f"| {100 * r['budget']:.0f} % | {method} | {100 * r['macs']:.1f} | {100 * r['params']:.1f} | "
                     f"{r['cosine']:.4f} / {r['cosine_p05']:.4f} | {100 * r['knn']:.1f} ({100 * r['knn_reference']:.1f}) | "
                     f"{probe} | {composition(r['sites'])} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", default="sst2,ag_news")
    parser.add_argument("--budgets", default="0.7,0.5")
    parser.add_argument("--sst2-calib", type=int, default=500)
    parser.add_argument("--ag-calib", type=int, default=500)
    parser.add_argument("--ag-eval", type=int, default=1000)
    parser.add_argument("--out", default="text")
    parser.add_argument("--no-fusion", dest="fusion", action="store_false",
                        help="skip the onnxruntime optimizer fusion and latency check (first domain's models)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads for the latency runs")
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument("--render", action="store_true", help="rewrite the .md from the .json only")
    args = parser.parse_args()
    args.budgets = [float(b) for b in args.budgets.split(",")]
    if args.render:
        results = json.loads((RESULTS / f"{args.out}.json").read_text())
        lines = [HEADER, ""]
        for domain, info in results.items():
            lines += table(domain, info["rows"], info)
            if info.get("fusion"):
                lines += fusion_table(info["fusion"])
        write_text_atomic(RESULTS / f"{args.out}.md", "\n".join(lines) + "\n")
        return

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results, lines = {}, [HEADER, ""]
    for domain in args.domains.split(","):
        first = domain == args.domains.split(",")[0]
        rows, info, models = run_domain(domain, args, log, keep_models=args.fusion and first)
        results[domain] = {"rows": rows, **info}
        lines += table(domain, rows, info)
        save(args, lines, results)
        if models:
            info["fusion"] = fusion(models, args, log)
            del models
            lines += fusion_table(info["fusion"])
            save(args, lines, results)


HEADER = ("# Sentence encoder: paraphrase-MiniLM-L3 on SST-2 and AG News\n\n"
          "Command: `python bench/text.py` (defaults: both domains, budgets 0.7 and 0.5 of the MACs); the splits "
          "and rows are described in the module docstring. Run before the correct-drift pass was merged (the "
          "planner rows have no drift correction).")


def save(args, lines: list[str], results: dict) -> None:
    write_text_atomic(RESULTS / f"{args.out}.md", "\n".join(lines) + "\n")
    write_text_atomic(RESULTS / f"{args.out}.json", json.dumps(jsonable(results), indent=2) + "\n")


if __name__ == "__main__":
    main()
