"""Calibration cost against plain inference, in-graph statistics against the numpy path, and
calibration on a local Dask cluster of 1 and 2 workers.

    python bench/calibration_speed.py                 # everything, writes bench/results/calibration_speed.md
    python bench/calibration_speed.py --quick         # fewer samples and repeats (a smoke run)

For each task and recipe (the rows of bench/results/speed.md) the first calibration samples
are decoded once into memory; then, interleaved and repeated, plain inference over them,
``collect(engine="numpy")`` (every requested tensor exposed and folded in float64) and
``collect(engine="graph")`` (onnxruntime reduces each request to channel sums and a Gram
in-graph), each including session creation. Best of the repeats (the CPU is shared with other
work: ratios within one run are what counts). The graph engine's statistics are compared
with the numpy path's: the largest relative error over every request and fold of the
mean (relative to the rows' RMS), the second moment and the covariance.

The Dask phase calibrates one task with ``onnxprune.calibrate(..., workers=N)`` (local
cluster, worker processes) for N = 1 and 2, timing the calibration and reading each
worker's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import numpy as np
from common import RESULTS, TASKS, halves, machine, markdown_table
from common import gram_macs, rows_per_sample
from speed import METHODS, TASK_NAMES, decoded_set


GOAL = 1.5            # calibration / plain inference
FLOOR_SLACK = 1.25    # "floor reached": calibration within this factor of plain + products / cores


def requests_of(model, passes):
    from onnxprune.passes import REGISTRY

    out = []
    for name, options in passes:
        for request, sets in REGISTRY[name](**options).requests(model):
            if "target" in sets:
                out.append(request)
    return list(dict.fromkeys(out))


def tensor_shapes(model, requests, data) -> dict:
    """The shape of each requested tensor for one sample (one run of the exposed model)."""
    from onnxprune.calibration.collect import expose
    from onnxprune.runtime import make_session

    tensors = list(dict.fromkeys(r.tensor for r in requests))
    exposed, outputs = expose(model, tensors)
    return dict(zip(tensors, (a.shape for a in make_session(exposed).run(outputs, data.batch([0])))))


def products_seconds(requests, shapes: dict, samples: int, *, batch_size: int) -> float:
    """Seconds of the Gram arithmetic alone, one BLAS thread: for each request folded in numpy
    ("features", "patches"), one float32 ssyrk (``a @ a.T``) per batch on a random (dim, rows)
    array shaped like that batch's rows (``rows_per_sample``; at least ``QUEUE_ROWS`` rows, as
    the library queues narrow batches), no copies or conversions. Pooled requests (N x C rows)
    cost next to nothing."""
    from onnxprune.calibration.moments import QUEUE_ROWS
    from onnxprune.linalg import blas_threads

    rng = np.random.default_rng(0)
    total = 0.0
    with blas_threads(1):
        for r in requests:
            if r.kind == "pooled" or r.keep_rows:
                continue
            dim, rows = r.dim(shapes[r.tensor]), rows_per_sample(r, shapes[r.tensor])
            per_call = max(rows * batch_size, QUEUE_ROWS)
            for start in range(0, rows * samples, per_call):
                a = rng.standard_normal((dim, min(per_call, rows * samples - start)), dtype=np.float32)
                t = time.perf_counter()
                a @ a.T
                total += time.perf_counter() - t
    return total


def accuracy(reference, candidate) -> dict:
    """Largest relative errors of the graph engine's statistics against the numpy path's."""
    worst = {"mean": 0.0, "second_moment": 0.0, "covariance": 0.0}
    for set_name, key, fold in reference.entries():
        a, b = reference.moments(key, set_name, fold), candidate.moments(key, set_name, fold)
        if a.keep_rows:
            continue
        rms = math.sqrt(max(float(np.diag(a.second_moment).max()), 1e-300))
        worst["mean"] = max(worst["mean"], float(np.abs(a.mean - b.mean).max()) / rms)
        for name in ("second_moment", "covariance"):
            x, y = getattr(a, name), getattr(b, name)
            worst[name] = max(worst[name], float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-300)))
    return worst


def phase_speed(task_name: str, method: str, *, samples: int, repeats: int, batch_size: int, folds: int,
                device: str = "cpu") -> dict:
    from onnxprune.calibration.collect import collect
    from onnxprune.cost import total_macs
    from onnxprune.data.samples import open_samples
    from onnxprune.model import load_model
    from onnxprune.runtime import make_session, run_batches

    task = TASKS[task_name]
    model = load_model(task.model)
    calib, _ = halves(open_samples(task.target, model, preprocess=task.preprocess), samples, None,
                      shuffle=task.sorted_by_class)
    data = decoded_set(model, calib)
    requests = requests_of(model, METHODS[method]["passes"])
    kinds = defaultdict(int)
    for r in requests:
        kinds[r.kind] += 1

    def plain():
        session = make_session(model, device=device)
        for _ in run_batches(session, data, None, batch_size=batch_size):
            pass

    results = {}

    def engine(name):
        def run():
            results[name] = collect(model, {"target": data}, requests, batch_size=batch_size, folds=folds,
                                    progress=False, engine=name, device=device)
        return run

    plain()
    shapes = tensor_shapes(model, requests, data)
    products = [products_seconds(requests, shapes, len(data), batch_size=batch_size) for _ in range(2)]
    wall, cpu = defaultdict(list), defaultdict(list)
    load = [os.getloadavg()[0]]
    started = time.perf_counter()
    for i in range(max(repeats, 7)):
        spent = time.perf_counter() - started
        if (i >= repeats and spent > 20) or (i >= 1 and spent > 120):
            break
        for key, fn in (("plain", plain), ("auto", engine("auto")), ("graph", engine("graph")),
                        ("numpy", engine("numpy"))):
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[key].append(time.perf_counter() - t)
            cpu[key].append(time.process_time() - c)
        load.append(os.getloadavg()[0])
    return {"task": task_name, "method": method, "samples": len(data), "requests": len(requests),
            "kinds": dict(kinds), "engine": {k: results[k].header.get("engine") for k in ("auto", "graph")},
            "gram_macs_per_sample": gram_macs(requests, shapes), "model_macs_per_sample": total_macs(model),
            "products": min(products), "cores": os.cpu_count(),
            "wall": dict(wall), "cpu": dict(cpu), "load_average": load,
            "best": {k: min(v) for k, v in wall.items()}, "best_cpu": {k: min(v) for k, v in cpu.items()},
            "accuracy": {k: accuracy(results["numpy"], results[k]) for k in ("auto", "graph")}}


def phase_dask(task_name: str, method: str, *, samples: int, workers: list[int]) -> dict:
    import onnxprune
    from onnxprune.calibration.cluster import local_client
    from onnxprune.data.samples import open_samples
    from onnxprune.model import load_model
    from onnxprune.pipeline import Recipe

    task = TASKS[task_name]
    model = load_model(task.model)
    calib, _ = halves(open_samples(task.target, model, preprocess=task.preprocess), samples, None,
                      shuffle=task.sorted_by_class)
    recipe = Recipe(passes=tuple((n, dict(o)) for n, o in METHODS[method]["passes"]), preprocess=dict(
        {k: v for k, v in task.preprocess.__dict__.items() if v is not None}))
    out = {"task": task_name, "method": method, "samples": len(calib), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        # the calibration half as its own file: workers open it by path, as on a shared file system
        raw = np.load(task.target)
        rows = calib.source_indices
        data = Path(tmp) / "calib.npz"
        np.savez(data, x=raw["x"][rows], y=raw["y"][rows])
        start = time.perf_counter()
        onnxprune.calibrate(model, str(data), recipe=recipe, output=Path(tmp) / "one.npz", progress=False)
        out["in_process"] = time.perf_counter() - start
        for n in workers:
            start = time.perf_counter()
            client = local_client(n)
            started = time.perf_counter() - start
            try:
                client.run(_reset_peak_rss)
                t = time.perf_counter()
                onnxprune.calibrate(str(task.model), str(data), recipe=recipe, output=Path(tmp) / f"w{n}.npz",
                                    client=client, threads=1, progress=False)
                seconds = time.perf_counter() - t
                rss = client.run(_peak_rss)
            finally:
                client.close()
                client.cluster.close()
            out["runs"].append({"workers": n, "cluster_start": started, "calibrate": seconds,
                                "peak_rss_per_worker": sorted(rss.values()), "load": os.getloadavg()[0]})
    return out


def _reset_peak_rss() -> None:
    """Reset this process's peak RSS (VmHWM): a worker forked from a big parent starts high."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def render(raw: dict) -> str:
    lines = ["# Calibration speed: in-graph statistics, and Dask workers", "",
             f"`{raw['command']}` on {raw['machine']}; {raw['date']}; load average {raw['load'][0]:.1f} at the "
             f"start and {raw['load'][1]:.1f} at the end. **The CPU is shared** (other jobs were running): "
             "absolute seconds are inflated and noisy, ratios are measured within one process, interleaved, "
             "best of the repeats. BLAS threads: 1 (the library's default, `ONNXPRUNE_BLAS_THREADS`).", "",
             "## Calibration / plain inference", "",
             f"The first {raw['samples']} calibration samples of each task (the calibration half, as in "
             "speed.md), decoded once and held in memory; batch 32, 2 folds; each run includes session "
             "creation. **plain**: the model alone. **numpy**: `collect(engine=\"numpy\")`, every requested "
             "tensor exposed and folded in float64 numpy (the path speed.md measured). **graph**: "
             "`collect(engine=\"graph\")`: onnxruntime computes each request's channel sums and Gram of "
             "shifted rows in-graph (Gemm), im2col patches by an in-graph Gather; only C + C^2 values per "
             "request leave the session. **auto** (the default): pooled requests in-graph; features and "
             "patches exposed and multiplied as shifted float32 rows by BLAS ssyrk, accumulated in float64. "
             "Goal: auto / plain <= 1.5. 'rel. error': the largest relative error of the second moment or "
             "covariance over every request and fold against the float64 numpy path.", ""]
    rows = []
    met = reached = 0
    for r in raw["speed"]:
        b = r["best"]
        ratio = b["auto"] / b["plain"]
        macs = r["gram_macs_per_sample"] / r["model_macs_per_sample"]
        floor = b["plain"] + r["products"] / r["cores"]
        verdict = "met" if ratio <= GOAL else (
            f"floor {floor / b['plain']:.2f}x reached" if floor / b["plain"] > GOAL and b["auto"] <= FLOOR_SLACK * floor
            else "not met")
        met += verdict == "met"
        reached += verdict.endswith("reached")
        kinds = ", ".join(f"{v} {k}" for k, v in r["kinds"].items())
        acc = r["accuracy"]
        rows.append([r["task"], r["method"], f"{r['requests']} ({kinds})", r["samples"], f"{b['plain']:.3f}",
                     f"{b['auto']:.3f}", f"{b['graph']:.3f}", f"{b['numpy']:.3f}", f"**{ratio:.2f}x**",
                     f"{b['graph'] / b['plain']:.2f}x", f"{b['numpy'] / b['plain']:.2f}x",
                     f"{r['best_cpu']['auto'] / r['best_cpu']['plain']:.2f}x", f"{macs:.2f}",
                     f"{r['products']:.3f}", f"{floor:.3f}", f"{b['auto'] / floor:.2f}", verdict,
                     f"{max(acc['auto']['covariance'], acc['auto']['second_moment']):.1e} / "
                     f"{max(acc['graph']['covariance'], acc['graph']['second_moment']):.1e}"])
    lines.append(markdown_table(
        ["task", "method", "requests (kinds)", "samples", "plain (s)", "auto (s)", "graph (s)", "numpy (s)",
         "auto / plain", "graph / plain", "numpy / plain", "CPU auto / plain", "Gram MACs / model MACs",
         "products (s)", "floor (s)", "auto / floor", "goal <= 1.5x", "rel. error vs float64: auto / graph"],
        rows))
    lines += ["", f"**{met} of {len(raw['speed'])} rows meet 1.5x; {reached} more reach their arithmetic floor** "
              f"(auto within {FLOOR_SLACK}x of it, where the floor itself is above 1.5x plain).", "",
              "'Gram MACs / model MACs': multiply-adds of the Gram products (rows x dim^2 per sample) "
              "over the model's own. 'products': the seconds of those products alone, on one BLAS thread: one "
              "float32 ssyrk per request and batch on a random array of that batch's shape (no copies, "
              "conversions or onnxruntime; `products_seconds`). 'floor' = plain + products / cores: inference, "
              "then the products shared by every core, which no implementation that multiplies the rows "
              "can beat on this machine (the in-graph engine's Gemm does twice the multiply-adds). Where "
              "the floor is above 1.5x plain the goal cannot be met by arithmetic, and the row counts as done "
              f"when auto is within {FLOOR_SLACK}x of its floor.", ""]
    if raw.get("dask"):
        d = raw["dask"]
        lines += ["## Calibration on a local Dask cluster", "",
                  f"{d['task']}, {d['method']}, {d['samples']} calibration samples written to one .npz that each "
                  "worker opens by path (as on a shared file system), the model by path too, `onnxprune.calibrate(..., "
                  "client=local_client(N), threads=1)` (what `calibrate --workers N` does): N single-threaded worker "
                  "processes with one onnxruntime thread each, one shard per worker, merged "
                  "in a fixed tree. 'calibrate' excludes starting the cluster (its own column). In one "
                  f"process, without Dask: {d['in_process']:.1f} s. Peak RSS per worker: VmHWM, reset before "
                  "the calibration (a worker forked from this large process would otherwise start at its size). "
                  "With 2 cores shared by other jobs, two workers cannot be expected to halve the time."
                  + (f" (This phase re-run with `{raw['dask_command']}`.)" if raw.get("dask_command") else ""), ""]
        rows = [[r["workers"], f"{r['cluster_start']:.1f}", f"{r['calibrate']:.1f}",
                 ", ".join(f"{v / 2**20:.0f}" for v in r["peak_rss_per_worker"]), f"{r['load']:.1f}"]
                for r in d["runs"]]
        lines.append(markdown_table(["workers", "cluster start (s)", "calibrate (s)", "peak RSS per worker (MiB)",
                                     "load average after"], rows))
        lines.append("")
    lines += ["<details><summary>raw numbers</summary>", "", "```json", json.dumps(raw, indent=1), "```", "",
              "</details>", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 samples, 1 repeat, no Dask phase")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tasks", default=",".join(TASK_NAMES))
    parser.add_argument("--no-dask", action="store_true")
    parser.add_argument("--dask-only", action="store_true",
                        help="re-run only the Dask phase, keeping the other numbers of --out")
    parser.add_argument("--out", default=str(RESULTS / "calibration_speed.md"))
    args = parser.parse_args(argv)
    os.environ.setdefault("ONNXPRUNE_BLAS_THREADS", "1")
    samples, repeats = (64, 1) if args.quick else (args.samples, args.repeats)
    raw = {"command": "python bench/calibration_speed.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
           "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "samples": samples, "load": [os.getloadavg()[0]], "speed": []}
    if args.dask_only:
        text = Path(args.out).read_text()
        previous = json.loads(text.split("```json\n", 1)[1].split("\n```", 1)[0])
        raw["speed"], raw["date"], raw["load"] = previous["speed"], previous["date"], previous["load"][:1]
        raw["command"] = previous["command"]
        raw["dask_command"] = "python bench/calibration_speed.py --dask-only"
    for task in ([] if args.dask_only else args.tasks.split(",")):
        for method in METHODS:
            print(f"{task} {method} ...", file=sys.stderr, flush=True)
            raw["speed"].append(phase_speed(task, method, samples=samples, repeats=repeats, batch_size=32, folds=2))
            r = raw["speed"][-1]
            print(f"  plain {r['best']['plain']:.3f} graph {r['best']['graph']:.3f} numpy {r['best']['numpy']:.3f}"
                  f" acc {r['accuracy']}", file=sys.stderr, flush=True)
    if not (args.quick or args.no_dask):
        try:
            import distributed  # noqa: F401
            print("dask ...", file=sys.stderr, flush=True)
            raw["dask"] = phase_dask("resnet20/cifar10-jpeg", "dalr-bc", samples=1000, workers=[1, 2])
        except ImportError:
            print("dask not installed: no Dask phase", file=sys.stderr)
    raw["load"].append(os.getloadavg()[0])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(raw))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
