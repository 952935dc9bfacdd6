"""Latency of MiniLM-L3 pruned to the structures bench/text.py's planner rows chose, on
onnxruntime's optimised (fused) graphs: more interleaved runs than bench/text.py's fusion check.

Latency depends on the structure only (unit and head counts per layer), so each model is the
original with the plan's counts kept by plain column selection (the first k units / heads):
same shapes, same graph, same fused ops as the compressed model. Original and every model run
interleaved (every model once per round), minimum time, batch 1 and 32, L = 128.

    python bench/text_latency.py [--results text_mix] [--rounds 60]

Writes bench/results/{results}_latency.md.
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

from bench.common import RESULTS  # noqa: E402
from bench.text import MODEL, macs_at  # noqa: E402
from onnxprune.graph.groups import find_channel_groups  # noqa: E402
from onnxprune.graph.prune import prune_channels  # noqa: E402
from onnxprune.model import clone, load_model, save_model, write_text_atomic  # noqa: E402


def structure(original, sites: list[str]):
    """The original with the counts of ``sites`` ("L1 intermediate prune 544/1536") kept."""
    model = clone(original)
    for site in sites:
        layer, part, counts = site.split(" ")[0][1:], site.split(" ")[1], site.split(" ")[-1]
        kept = int(counts.split("/")[0])
        kind = "intermediate/dense/MatMul" if part == "intermediate" else "attention/output/dense/MatMul/heads"
        group = next(g for g in find_channel_groups(model) if g.name.endswith(f"layer.{layer}/{kind}"))
        prune_channels(model, group, np.arange(kept))
    return model


def main() -> None:
    import onnxruntime as ort
    from onnxruntime.transformers.optimizer import optimize_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="text_mix")
    parser.add_argument("--domain", default="sst2")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = [r for r in json.loads((RESULTS / f"{args.results}.json").read_text())[args.domain]["rows"]
            if isinstance(r["sites"], list)]
    original = load_model(MODEL)
    models = [("original", None, original)] + [(r["method"], r["budget"], structure(original, r["sites"])) for r in rows]
    rng = np.random.default_rng(0)
    tokens = 128
    feeds = {b: {"input_ids": np.concatenate([np.full((b, 1), 101), rng.integers(1000, 30000, (b, tokens - 2)),
                                              np.full((b, 1), 102)], axis=1).astype(np.int64),
                 "attention_mask": np.ones((b, tokens), dtype=np.int64)} for b in (1, 32)}
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        sessions = []
        for k, (label, budget, model) in enumerate(models):
            path = Path(tmp) / f"m{k}.onnx"
            save_model(model, path)
            optimised = optimize_model(str(path), model_type="bert", num_heads=12, hidden_size=384)
            fused = {op: n for op, n in optimised.get_fused_operator_statistics().items() if n}
            optimised.save_model_to_file(str(Path(tmp) / f"m{k}_opt.onnx"))
            sessions.append(ort.InferenceSession(str(Path(tmp) / f"m{k}_opt.onnx"), options,
                                                 providers=["CPUExecutionProvider"]))
            out.append({"method": label, "budget": budget, "fused": fused, "macs_seq128": macs_at(model, tokens)})
        for batch, rounds in ((1, args.rounds), (32, max(5, args.rounds // 6))):
            times = [[] for _ in sessions]
            for sess in sessions:
                sess.run(["461"], feeds[batch])
            for _ in range(rounds):
                for k, sess in enumerate(sessions):
                    t0 = time.perf_counter()
                    sess.run(["461"], feeds[batch])
                    times[k].append(time.perf_counter() - t0)
            for k, r in enumerate(out):
                r[f"ms_batch{batch}"] = 1000 * min(times[k])
                r[f"rounds_batch{batch}"] = rounds
    lines = [f"# MiniLM-L3 latency of the {args.results} planner structures ({args.domain})", "",
             f"Command: `python bench/text_latency.py --results {args.results} --rounds {args.rounds} --threads {args.threads}`; "
             "optimised graphs, interleaved, minimum time, onnxruntime "
             f"{ort.__version__}, {args.threads} thread{'s' if args.threads != 1 else ''}, on the shared 2-core machine under load.", "",
             "| budget | model | fused ops | MACs at L=128 % | batch 1 ms (speedup) | batch 32 ms (speedup) | "
             "speedup / MAC saving (batch 1, batch 32) |", "|---|---|---|---|---|---|---|"]
    base = out[0]
    for r in out:
        ratio = r["macs_seq128"] / base["macs_seq128"]
        s1, s32 = base["ms_batch1"] / r["ms_batch1"], base["ms_batch32"] / r["ms_batch32"]
        budget = "-" if r["budget"] is None else f"{100 * r['budget']:.0f} %"
        fused = ", ".join(f"{k} {v}" for k, v in sorted(r["fused"].items()))
        lines.append(f"| {budget} | {r['method']} | {fused} | {100 * ratio:.1f} | {r['ms_batch1']:.1f} ({s1:.2f}x) | "
                     f"{r['ms_batch32']:.0f} ({s32:.2f}x) | {s1 * ratio:.2f}, {s32 * ratio:.2f} |")
    write_text_atomic(RESULTS / f"{args.results}_latency.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
