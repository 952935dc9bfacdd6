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

Rows, at 70 % and 50 % of the model's MACs (``--flops``; MACs per sentence of the whole encoder at the
rows' length L, attention products included, as ``compress`` counts them):

- ``spectral``: the planner restricted to FFN pruning (spectral selection + least-squares
  reconstruction of the second FFN matrix) = ``compress --method spectral --flops F``;
- ``wanda (no reconstruction)``: the same per-block unit counts, units ranked by structured
  Wanda and the second matrix only loses the pruned rows (what onnxsim's structured Wanda does);
  ``wanda + reconstruction``: the same ranking with the least-squares correction;
- ``dalr-bc``: the planner restricted to DALR low rank + bias compensation of the 18 projection
  and FFN MatMuls = ``compress --method dalr-bc --flops F``;
- ``auto``: the planner's mix = ``compress --flops F``: FFN units, heads, and low rank of the
  FFN MatMuls (the attention projections are left to head pruning: a split of Q, K, V or the
  output projection loses onnxruntime's Attention fusion); ``--no-correct-drift``: the same
  plan without the correct-drift pass, when the planner chose it;
- ``onnxsim``: onnxsim's structured pruning (L2 weight norm and structured Wanda, no
  reconstruction) of FFN units and of heads at the same totals as our rows, on the graph
  onnxruntime's optimizer fuses (the only form of this graph it prunes; see ``onnxsim_rows``);
- ``--max-drop 1`` (no budget, compress's default goal): the planner mix within 1 point of
  kNN accuracy (labels) or within 100 (1 - mean cosine) <= 1 (no labels), checked cross-fitted
  on the calibration samples.

All planner rows come from one sensitivity run per domain (the family-restricted planners reuse
its curves: same sites, same statistics). Writes bench/results/text.md and text.json.

    python bench/text.py [--domains sst2,ag_news] [--budgets 0.7,0.5]
"""

from __future__ import annotations

import argparse
import json
import re
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
from onnxprune.validation import validate

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
    if sites == "same counts":
        return "the unit / head counts of the row above"
    if not isinstance(sites, list):
        return str(sites)
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


def planner_rows(label: str, planner: Planner, budget: float | None, auto: Planner, held, log,
                 max_drop: float | None = None) -> tuple[dict, tuple]:
    """One planner plan at ``budget`` (or within ``max_drop``), run on all calibration
    statistics and validated."""
    t0 = time.perf_counter()
    result = planner.for_budget(budget) if max_drop is None else planner.for_max_drop(max_drop)
    passes = tuple(result["passes"])
    recipe = Recipe(passes=passes or (("select-nodes", {"counts": {}}),), calib_size=None, folds=FOLDS)
    compressed, _ = run_pipeline(auto.original, recipe, auto.provider)
    sites = [f"{short(s['site'])} {s['family']} {s['size']}/{s['of']}" for s in result["sites"]]
    r = row(label, budget, auto.original, compressed, held, sites, time.perf_counter() - t0)
    r["budget_met"] = bool(result.get("budget_met", True))
    r["drift"] = any(name == "correct-drift" for name, _ in passes)
    check = result.get("check") or {}
    r["check_drop"], r["check_drop_without_drift"] = check.get("drop"), check.get("drop_without_drift")
    if max_drop is not None:
        r["max_drop"] = max_drop
    log(f"{label} {budget}: macs {r['macs']:.3f} cosine {r['cosine']:.4f} knn {r['knn']:.4f} "
        f"(met {r['budget_met']}, drift {r['drift']})")
    return r, (passes, compressed)


def without_drift(label: str, budget: float, passes: tuple, auto: Planner, held, log) -> dict:
    """The same plan with ``--no-correct-drift`` (in budget mode the planner's plan does not depend
    on correct-drift: it is checked on the chosen plan and kept when it measures better)."""
    t0 = time.perf_counter()
    recipe = Recipe(passes=tuple(p for p in passes if p[0] != "correct-drift"), calib_size=None, folds=FOLDS)
    compressed, _ = run_pipeline(auto.original, recipe, auto.provider)
    r = row(f"{label}, --no-correct-drift", budget, auto.original, compressed, held, "same plan, no correct-drift",
            time.perf_counter() - t0)
    r["drift"] = False
    log(f"{r['method']} {budget}: cosine {r['cosine']:.4f} knn {r['knn']:.4f}")
    return r


def onnxsim_rows(budget: float, units: dict[str, int], total: dict[str, int], model, calib_data: dict, held,
                 log) -> list[dict]:
    """onnxsim's structured pruning at equal parameters, where it runs on this graph.

    onnxsim 0.8.1 (``onnxsim.pruning``) finds no chain in the PyTorch export (its FFN walker
    stops at the exported Erf-GELU pattern, whose input fans out to Div and Mul; its head pruning
    matches fused ``com.microsoft::Attention`` ops): it prunes nothing there. On the graph that
    onnxruntime's transformer optimizer fuses (Attention, BiasGelu, SkipLayerNormalization)
    it finds the 3 FFN chains (MatMul -> BiasGelu -> MatMul) and the 3 Attention ops. So these
    rows run onnxsim on the fused graph, with the same total of FFN units (``units``) or heads
    kept as our rows (``sparsity`` = 1 - kept / total; onnxsim cuts every block by the same
    fraction), L2 weight norms or structured Wanda (calibration: our calibration samples in
    batches of 32), no reconstruction. MACs: the fused original's minus what onnxsim removed
    (FFN: the cost model on the fused graphs; heads: 4 x 384 x 32 per head per token, the
    Q/K/V columns and output rows, and 2 x L x 32 per head per token, its attention products),
    over the unfused original's MACs, all at the rows' length L."""
    import onnxsim
    import onnxsim.pruning as osp
    from onnxruntime.transformers.optimizer import optimize_model

    fused = optimize_model(str(MODEL), model_type="bert", num_heads=12, hidden_size=384).model
    length = calib_data["input_ids"].shape[1]
    base = macs_at(model, length)
    batches = [{k: v[i:i + 32] for k, v in calib_data.items() if k != "y"} for i in range(0, len(calib_data["y"]), 32)]
    out = []
    for family, (structured, wanda) in (("FFN units", (osp.apply_structured_pruning, osp.apply_structured_wanda_pruning)),
                                        ("heads", (osp.apply_attention_head_pruning,
                                                   osp.apply_attention_head_wanda_pruning))):
        if family not in units:
            continue
        sparsity = 1 - units[family] / total[family]
        for name, fn, kwargs in (("L2 weight norm", structured, {}),
                                 ("Wanda", wanda, {"calibration_data": batches})):
            t0 = time.perf_counter()
            pruned = fn(fused, sparsity=sparsity, **kwargs)
            if family == "FFN units":
                macs = 1 - (macs_at(fused, length) - macs_at(pruned, length)) / base
                kept = sum(onnx_shape(pruned, n.input[1])[-1] for n in pruned.graph.node
                           if n.op_type == "BiasGelu")
            else:
                kept = sum(next(a.i for a in n.attribute if a.name == "num_heads") for n in pruned.graph.node
                           if n.op_type == "Attention")
                macs = 1 - (total[family] - kept) * (4 * 384 + 2 * length) * 32 * length / base
            r = row(f"{family}: onnxsim {onnxsim.__version__.lstrip('v')} {name} (fused graph, no reconstruction)", budget,
                    model, pruned, held, f"{kept}/{total[family]} {family.split()[0].lower()} kept",
                    time.perf_counter() - t0)
            r["macs"], r["kept"] = macs, kept
            out.append(r)
            log(f"{r['method']} {budget}: kept {kept} macs {macs:.3f} cosine {r['cosine']:.4f} knn {r['knn']:.4f}")
    return out


def onnx_shape(model, name: str) -> tuple[int, ...]:
    init = next(i for i in model.graph.initializer if i.name == name)
    return tuple(init.dims)


def run_domain(domain: str, args, log, *, fusion_models: bool = False, update=lambda rows, info: None
               ) -> tuple[list[dict], dict]:
    """All rows of one domain; ``update(rows, info)`` after every row (the results are saved as
    they come); with ``fusion_models``, the fusion and latency check of the budget rows' models
    runs right after them (info["fusion"])."""
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
        missing = tuple(s.name for s in p.sites if s.key not in p.curves)
        if missing:   # low rank alone is offered the attention projections the mix leaves to head pruning
            t0 = time.perf_counter()
            extra = Planner(model, calib, options=PlanOptions(**{**options, "sites": missing}), batch_size=32,
                            seed=0, provider=auto.provider)
            p.curves.update(extra.sensitivity())
            log(f"{domain}: sensitivity of {len(missing)} more sites ({options}) in {time.perf_counter() - t0:.0f} s")
        return p

    planners = {"FFN units: spectral + reconstruction": lambda: restricted(families=("prune",), sites=ffn),
                "heads: spectral + reconstruction": lambda: restricted(families=("prune",), sites=heads),
                "FFN units + heads (pruning planner)": lambda: restricted(families=("prune",)),
                "low rank: DALR + bias (low-rank planner)": lambda: restricted(families=("low-rank",)),
                "planner mix (compress default)": lambda: auto}
    if args.rows == "mix":
        planners = {k: v for k, v in planners.items() if k.startswith("planner mix")}
    planners = {k: make() for k, make in planners.items()}
    rows, models = [], {}
    info = {"split": how, "calibration": len(calib), "evaluation": len(held), "sensitivity_seconds": round(sens_seconds),
            "sites": len(auto.sites)}
    for budget in args.budgets:
        for label, planner in planners.items():
            r, (passes, compressed) = planner_rows(label, planner, budget, auto, held, log)
            rows.append(r)
            update(rows, info)
            if fusion_models:
                models[(label, budget)] = compressed
            if label.startswith("planner mix") and r["drift"]:
                rows.append(without_drift(label, budget, passes, auto, held, log))
                update(rows, info)
            if label.startswith(("FFN units:", "heads:")):
                counts = counts_of(passes)
                family = label.split(":")[0]
                kept = sum(counts.get(s.name, s.size) for s in groups if s.name in (ffn if family == "FFN units" else heads))
                unit = 1 if family == "FFN units" else 32
                if args.onnxsim:
                    rows += onnxsim_rows(budget, {family: kept // unit},
                                         {family: sum(s.size for s in groups if s.name in
                                                      (ffn if family == "FFN units" else heads)) // unit},
                                         auto.original, calib_data, held, log)
                    update(rows, info)
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
                    update(rows, info)
    if models:
        info["fusion"] = fusion(models, args, log)
        del models
        update(rows, info)
    # no budget: compress's default goal (--max-drop 1), with labels (kNN drop in points, cross-fitted
    # on the calibration samples) and without (100 (1 - mean cosine)); same sites and curves
    unlabelled = Planner(model, calib, options=PlanOptions(), batch_size=32, seed=0, provider=auto.provider)
    unlabelled.labels, unlabelled.curves = None, auto.curves
    for label, planner in (("planner mix, --max-drop 1 with labels (kNN drop)", auto),
                           ("planner mix, --max-drop 1 without labels (100 (1 - cosine))", unlabelled)):
        r, _ = planner_rows(label, planner, None, auto, held, log, max_drop=args.max_drop)
        rows.append(r)
        update(rows, info)
    return rows, info


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
                row_[f"ms_batch{batch}"] = 1000 * float(np.min(times[k]))
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
             "batch 1 and 32 at L = 128, interleaved runs, minimum time, "
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


def drift_text(r: dict) -> str:
    if "drift" not in r:
        return "-"
    if not r["drift"] or r.get("check_drop") is None or r.get("check_drop_without_drift") is None:
        return "yes" if r["drift"] else "no"
    return f"yes (check {r['check_drop_without_drift']:.2f} -> {r['check_drop']:.2f})"


def table(domain: str, rows: list[dict], info: dict) -> list[str]:
    ref = rows[0]
    probe_ref = "n/a" if ref["probe_reference"] is None else f"{100 * ref['probe_reference']:.1f}"
    lines = [f"### {domain}", "",
             f"{info['split']}; kNN index / queries = halves of the {info['evaluation']} evaluation sentences. "
             f"Original: kNN {100 * ref['knn_reference']:.1f} %, probe {probe_ref} %.", "",
             ("| MACs budget | method | MACs % | params % | cosine (mean / 5th pct) | kNN % (orig) | probe % (orig) | "
              "correct-drift | plan |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        probe = "n/a" if r["probe"] is None else f"{100 * r['probe']:.1f} ({100 * r['probe_reference']:.1f})"
        method = r["method"] + ("" if r.get("budget_met", True) else " (budget not reachable: most compressed plan)")
        budget = f"{100 * r['budget']:.0f} %" if r["budget"] is not None else f"--max-drop {r['max_drop']:g}"
        lines.append(f"| {budget} | {method} | {100 * r['macs']:.1f} | {100 * r['params']:.1f} | "
                     f"{r['cosine']:.4f} / {r['cosine_p05']:.4f} | {100 * r['knn']:.1f} ({100 * r['knn_reference']:.1f}) | "
                     f"{probe} | {drift_text(r)} | {composition(r['sites'])} |")
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
    parser.add_argument("--rows", choices=("all", "mix"), default="all",
                        help="mix: only the planner mix rows (budgets, --no-correct-drift, --max-drop)")
    parser.add_argument("--max-drop", type=float, default=1.0, help="the rows without a budget (compress's default)")
    parser.add_argument("--no-onnxsim", dest="onnxsim", action="store_false",
                        help="leave out onnxsim's structured pruning rows (needs onnxsim >= 0.8.1)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads for the latency runs")
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument("--render", action="store_true", help="rewrite the .md from the .json only")
    args = parser.parse_args()
    args.budgets = [float(b) for b in args.budgets.split(",")]
    if args.render:
        results = json.loads((RESULTS / f"{args.out}.json").read_text())
        # the command of the run that made the .json, as the .md it replaces names it
        before = RESULTS / f"{args.out}.md"
        ran = re.search(r"Command: `python bench/text\.py([^`]*)`", before.read_text()) if before.exists() else None
        lines = [HEADER.replace("@ARGS@", ran.group(1) if ran else " (command not recorded)"), ""]
        for domain, info in results.items():
            lines += table(domain, info["rows"], info)
            if info.get("fusion"):
                lines += fusion_table(info["fusion"])
        write_text_atomic(RESULTS / f"{args.out}.md", "\n".join(lines) + "\n")
        return

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results = {}

    def update(domain: str, rows: list[dict], info: dict) -> None:
        results[domain] = {"rows": rows, **info}
        lines = [HEADER.replace("@ARGS@", "".join(f" {a}" for a in sys.argv[1:])), ""]
        for name, got in results.items():
            lines += table(name, got["rows"], got)
            if got.get("fusion"):
                lines += fusion_table(got["fusion"])
        save(args, lines, results)

    for domain in args.domains.split(","):
        first = domain == args.domains.split(",")[0]
        run_domain(domain, args, log, fusion_models=args.fusion and first,
                   update=lambda rows, info, domain=domain: update(domain, rows, info))


HEADER = ("# Sentence encoder: paraphrase-MiniLM-L3 on SST-2 and AG News\n\n"
          "Command: `python bench/text.py@ARGS@` (default: both domains, budgets 0.7 and 0.5 of the MACs); the splits "
          "and rows are described in the module docstring. Planner rows as `compress` plans them now: the mix "
          "leaves the attention projections (Q/K/V and output) to head pruning, and correct-drift runs after a "
          "plan when the planner's cross-fitted check finds the outputs closer with it (mean 1 - cosine per "
          "sentence, paired; column correct-drift: the check's drop "
          "in points, 100 (1 - cosine) or kNN, without -> with).")


def save(args, lines: list[str], results: dict) -> None:
    write_text_atomic(RESULTS / f"{args.out}.md", "\n".join(lines) + "\n")
    write_text_atomic(RESULTS / f"{args.out}.json", json.dumps(jsonable(results), indent=2) + "\n")


if __name__ == "__main__":
    main()
