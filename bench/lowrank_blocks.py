"""Low rank rounded to onnxruntime's channel blocks, and latency-aware splits: realised
speedup against the MAC ratio.

    python bench/lowrank_blocks.py            # writes bench/results/lowrank_blocks.md

DALR + bias compensation (keep 0.25, the speed.md recipe) on MobileNetV2 and ResNet-20, with
``low-rank-split`` ranks as chosen (multiple 1) and rounded to multiples of 8 and 16, and
latency-aware (``latency = true``: each layer timed alone against its split, at batch 1 or
32, splits that do not save 5 % skipped or shrunk by a block) with multiple 1 and 8, from one
set of statistics per task. The original and the candidates run interleaved (A B C D A B C D
...) on the same random input, one onnxruntime thread each, full graph optimisation (NCHWc
included); minimum ms of the runs. 'realised' = measured speedup / MAC speedup (goal >= 0.8);
'split/shrunk/skipped': layers split at their rank, at a block less, left whole for latency;
'layer realised': each split layer's own measured speedup (timed alone) / its MAC ratio.
The CPU is shared with other jobs: minima approximate an unloaded run, ratios come from one
process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np
from common import RESULTS, Bench, interleaved_times, machine, markdown_table, no_options

#: (multiple, latency batch or None)
VARIANTS = ((1, None), (8, None), (16, None), (1, 1), (8, 1), (8, 32))
TASKS = ("mobilenetv2/imagenet", "resnet20/cifar10-jpeg")


def latency(models: list, feeds_like: dict, *, batch: int, runs: int, budget: float) -> list[dict]:
    from onnxprune.runtime import make_session

    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal((batch, *v.shape[1:])).astype(v.dtype) for k, v in feeds_like.items()}
    sessions = [make_session(m, threads=1) for m in models]
    for _ in range(3):
        for s in sessions:
            s.run(None, feeds)
    return interleaved_times(sessions, feeds, runs=runs, budget=budget)


def main() -> int:
    no_options(__doc__)
    os.environ.setdefault("ONNXPRUNE_BLAS_THREADS", "1")
    raw = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load": [os.getloadavg()[0]], "tasks": []}
    for name in TASKS:
        print(name, file=sys.stderr, flush=True)
        bench = Bench(name, batch_size=32, with_source=False)
        runs = []
        for multiple, batch in VARIANTS:
            split = {"method": "dalr", "keep": 0.25, "multiple": multiple}
            if batch is not None:
                split.update(latency=True, latency_batch=batch)
            started = time.perf_counter()
            r = bench.run([("low-rank-split", split), ("bias-compensate", {})])
            passes = r["report"]["passes"]
            ranks = [row["rank"] for p in passes for row in p.get("split", [])]
            timed = [row for p in passes for row in p.get("latency", [])]
            runs.append({"multiple": multiple, "latency_batch": batch, "model": r.pop("model"), "macs": r["macs"],
                         "params": r["params"], "accuracy": r["accuracy"], "agreement": r["agreement"],
                         "ranks": ranks, "seconds": time.perf_counter() - started,
                         "decisions": {d: sum(1 for t in timed if t["decision"] == d)
                                       for d in ("kept", "shrunk", "skipped")} if timed else None,
                         "layers": timed})
        feeds_like = bench.calib.batch(np.arange(1))
        models = [bench.model] + [r["model"] for r in runs]
        lat = {f"batch{b}": latency(models, feeds_like, batch=b, runs=60 if b == 1 else 10,
                                    budget=30 if b == 1 else 120) for b in (1, 32)}
        for r in runs:
            r.pop("model")
        raw["tasks"].append({"task": name, "macs": bench.macs, "params": bench.params, "accuracy": bench.accuracy,
                             "runs": runs, "latency": lat})
    raw["load"].append(os.getloadavg()[0])
    (RESULTS / "lowrank_blocks.json").write_text(json.dumps(raw, indent=1) + "\n")
    (RESULTS / "lowrank_blocks.md").write_text(render(raw))
    print(f"wrote {RESULTS / 'lowrank_blocks.md'}", file=sys.stderr)
    return 0


def render(raw: dict) -> str:
    lines = ["# Low rank rounded to channel blocks, and latency-aware splits", "",
             f"`python bench/lowrank_blocks.py` on {raw['machine']}; {raw['date']}; load average "
             f"{raw['load'][0]:.1f} at the start, {raw['load'][1]:.1f} at the end (**shared CPU**).", "",
             __doc__.split("\n\n", 2)[2].strip(), ""]
    rows = []
    for t in raw["tasks"]:
        for i, r in enumerate(t["runs"]):
            mac_speedup = t["macs"] / r["macs"]
            timed = r.get("latency_batch")
            decisions = r.get("decisions")
            layers = [row["realised"] for row in r.get("layers") or [] if row["decision"] != "skipped"]
            cells = [t["task"], r["multiple"], "off" if timed is None else f"batch {timed}",
                     "-" if not decisions else f"{decisions['kept']}/{decisions['shrunk']}/{decisions['skipped']}",
                     "-" if not layers else f"{np.median(layers):.2f} ({min(layers):.2f}-{max(layers):.2f})",
                     f"{r['params'] / t['params']:.2f}", f"{mac_speedup:.2f}x"]
            for b in ("batch1", "batch32"):
                ref, cand = t["latency"][b][0]["min"], t["latency"][b][i + 1]["min"]
                cells += [f"{ref:.2f} -> {cand:.2f}", f"{ref / cand / mac_speedup:.2f}"]
            multiples16 = sum(1 for k in r["ranks"] if k % 16 == 0)
            cells += [f"{multiples16} of {len(r['ranks'])}",
                      f"{100 * t['accuracy']:.1f} -> {100 * r['accuracy']:.1f} %"]
            rows.append(cells)
    lines.append(markdown_table(["task", "multiple", "latency-aware", "split/shrunk/skipped",
                                 "layer realised, median (range)", "params kept",
                                 "MAC speedup", "b1 ms (orig -> comp)",
                                 "b1 realised", "b32 ms (orig -> comp)", "b32 realised",
                                 "ranks multiple of 16", "top-1"], rows))
    lines += ["", "Raw numbers (per-layer timings and decisions of the latency-aware runs included): "
              "[lowrank_blocks.json](lowrank_blocks.json).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
