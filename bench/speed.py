"""Where `compress` spends its time and memory, and what the compressed models gain at run time.

For every real task (lenet/usps, mnist_cnn/usps, resnet20/cifar10-jpeg, mobilenetv2/imagenet)
and two recipes (DALR + bias compensation keeping 25 % of the splittable parameters;
spectral channel pruning keeping 50 % of the touched layers' parameters), one
``onnxprune.api.compress`` run in a fresh subprocess (the CLI's code path without click),
calibrating on the first half of the target data and validating on the second, measures

- wall time per stage: load (model + sample index), calibration and per-pass time from the
  report's "seconds", with the rewrite (``LowRankSplit._rewrite``, ``prune_channels``), the
  graph checks between passes, validation and saving timed by wrapping those functions
  from this script (the library is not modified);
- peak RSS of that process right after ``compress`` returned (``getrusage(RUSAGE_SELF)`` in
  the child, so runs do not see each other's peaks);
- calibration throughput: ``collect()`` with exactly the statistics the recipe requests vs
  plain onnxruntime inference over the same decoded calibration samples, interleaved;
- latency of compressed vs original at batch 1 and 32 (``onnxprune.validate``, which
  interleaves reference and candidate runs), next to the MAC ratio.

A further subprocess times greedy selection and DALR against layer width with
bench/bench_linalg.py's functions and shows the O(k C^2) / O(n^3) expectation next to them,
plus DALR of a 25088-wide layer from fewer samples than features (sample space).

BLAS runs single-threaded in every child by default (``--blas-threads``): on a small shared
machine a multi-threaded BLAS next to onnxruntime's own thread pool is many times slower.

    python bench/speed.py [--quick] [--tasks lenet/usps ...] [--methods dalr-bc spectral]

Writes bench/results/speed.md and speed_*.png.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from onnxprune.recipes import method_passes

TASK_NAMES = ["lenet/usps", "mnist_cnn/usps", "resnet20/cifar10-jpeg", "mobilenetv2/imagenet"]
METHODS = {
    "dalr-bc": {"label": "DALR + bias comp., keep 0.25",
                "passes": method_passes("dalr-bc", keep=0.25)},
    "spectral": {"label": "spectral pruning, keep 0.5",
                 "passes": method_passes("spectral", keep=0.5)},
}
# what each pass does, for the stage table (the rewrite and checks are split out)
PASS_STAGE = {"low-rank-split": "decomposition", "select-nodes": "selection",
              "reconstruct-next-layer": "reconstruction (A_J)", "bias-compensate": "bias compensation"}
STAGES = ["load", "calibration", "selection", "decomposition", "reconstruction (A_J)", "bias compensation",
          "rewrite", "graph checks", "validation", "latency (in validation)", "save", "other"]


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


def rss_now_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------------------
# child: one compress run


def install_timers(timers: dict) -> None:
    """Wrap the functions whose time the report does not separate (library untouched)."""
    import onnxprune.api as api
    import onnxprune.outputs as outputs
    import onnxprune.pipeline as pipeline
    from onnxprune.passes import low_rank_split, reconstruct_next_layer

    validate = sys.modules["onnxprune.validation"]

    def wrap(owner, attr, key_of):
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers[key_of(args, kwargs)] += time.perf_counter() - start
        setattr(owner, attr, wrapper)

    # check_graph(model, after="low-rank-split"): per pass
    wrap(pipeline, "check_graph", lambda a, k: ("check", k.get("after", "?")))
    wrap(low_rank_split.LowRankSplit, "_rewrite", lambda a, k: ("rewrite", "low-rank-split"))
    wrap(reconstruct_next_layer, "prune_channels", lambda a, k: ("rewrite", "reconstruct-next-layer"))
    wrap(api, "_validate", lambda a, k: ("validation", ""))
    wrap(validate, "_latency", lambda a, k: ("latency", ""))
    wrap(api, "save_model", lambda a, k: ("save", ""))
    wrap(outputs, "write_text_atomic", lambda a, k: ("save", ""))    # the report (api.write_outputs)
    wrap(api, "run_pipeline", lambda a, k: ("pipeline", ""))


def stage_seconds(report: dict, timers: dict, load: float, total: float) -> dict:
    out = dict.fromkeys(STAGES, 0.0)
    out["load"] = load
    out["calibration"] = report["seconds"].get("calibration", 0.0)
    for name, seconds in report["seconds"].items():
        if name == "calibration":
            continue
        inner = timers.get(("check", name), 0.0) + timers.get(("rewrite", name), 0.0)
        out[PASS_STAGE.get(name, name)] = out.get(PASS_STAGE.get(name, name), 0.0) + max(seconds - inner, 0.0)
        out["rewrite"] += timers.get(("rewrite", name), 0.0)
        out["graph checks"] += timers.get(("check", name), 0.0)
    out["latency (in validation)"] = timers.get(("latency", ""), 0.0)
    out["validation"] = timers.get(("validation", ""), 0.0) - out["latency (in validation)"]
    out["save"] = timers.get(("save", ""), 0.0)
    out["other"] = max(total - sum(v for k, v in out.items() if k != "load"), 0.0)
    out["total"] = load + total
    return out


def decoded_set(model, samples):
    """The same samples decoded once into memory (throughput runs exclude decoding)."""
    import numpy as np

    from onnxprune.data.samples import open_samples

    x = {name: [] for name in samples.input_names}
    for _, feeds in samples.batches(64):
        for name in x:
            x[name].append(feeds[name])
    arrays = {name: np.concatenate(parts) for name, parts in x.items()}
    if len(arrays) == 1:
        return open_samples(next(iter(arrays.values())), model)
    return open_samples(arrays, model)


def throughput(model, samples, passes, *, batch_size: int, folds: int, repeats: int) -> dict:
    """collect() for the recipe's requests vs plain inference, same decoded samples, interleaved."""
    from onnxprune.calibration.collect import collect, expose
    from onnxprune.passes import REGISTRY
    from onnxprune.runtime import make_session, run_batches

    requests = []
    for name, options in passes:
        for request, sets in REGISTRY[name](**options).requests(model):
            if "target" in sets:
                requests.append(request)
    requests = list(dict.fromkeys(requests))
    tensors = list(dict.fromkeys(r.tensor for r in requests))
    start = time.perf_counter()
    data = decoded_set(model, samples)
    decode = time.perf_counter() - start
    exposed, outputs = expose(model, tensors)

    def plain():
        session = make_session(model)
        for _ in run_batches(session, data, None, batch_size=batch_size):
            pass

    def exposed_only():
        session = make_session(exposed)
        for _ in run_batches(session, data, outputs, batch_size=batch_size):
            pass

    def calibrate():
        collect(model, {"target": data}, requests, batch_size=batch_size, folds=folds, progress=False)

    # multiply-adds of the Gram updates per sample (C^2 per row; the symmetric update does half)
    from onnxprune.cost import total_macs

    one = make_session(exposed).run(outputs, data.batch([0]))
    shapes = dict(zip(tensors, (a.shape for a in one)))   # outputs follow the order of tensors
    exposed_bytes = sum(a.nbytes for a in one)
    from common import gram_macs as count_gram_macs

    gram_macs = count_gram_macs(requests, shapes)
    del one

    plain()   # warm-up: page cache, thread pools
    wall = defaultdict(list)
    cpu = defaultdict(list)
    load = [os.getloadavg()[0]]
    # At least ``repeats`` repeats; cheap ones repeat until 20 s are spent (at most 7), since a
    # sub-second run on a busy machine is mostly noise; one that takes over 90 s is not repeated.
    started = time.perf_counter()
    for i in range(max(repeats, 7)):
        spent = time.perf_counter() - started
        if (i >= repeats and spent > 20) or (i >= 1 and spent > 90):
            break
        for key, fn in (("plain", plain), ("exposed", exposed_only), ("collect", calibrate)):
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[key].append(time.perf_counter() - t)
            cpu[key].append(time.process_time() - c)
            load.append(os.getloadavg()[0])
    kinds = defaultdict(int)
    for r in requests:
        kinds[r.kind] += 1
    return {"samples": len(data), "requests": len(requests), "tensors": len(tensors), "kinds": dict(kinds),
            "gram_macs_per_sample": gram_macs, "model_macs_per_sample": total_macs(model),
            "exposed_bytes_per_sample": exposed_bytes,
            "decode_seconds": decode, "wall": dict(wall), "cpu": dict(cpu), "load_average": load,
            "best": {k: min(v) for k, v in wall.items()}, "best_cpu": {k: min(v) for k, v in cpu.items()}}


def interleaved_latency(sessions, sample_feeds, *, runs: int, budget: float, batches=(1, 32), warmup: int = 3
                        ) -> dict:
    """ms per run of each session, A B A B interleaved on the same random input, per batch size.

    Keeps every time; stops early (after at least 5 pairs) once ``budget`` seconds are spent
    on a batch size. Returns {"reference"|"candidate": {"batch1": {"min", "median", "runs"}}}.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    out = {"reference": {}, "candidate": {}}
    for batch in batches:
        feeds = {k: rng.standard_normal((batch, *v.shape[1:])).astype(v.dtype) for k, v in sample_feeds.items()}
        for _ in range(warmup):
            for s in sessions:
                s.run(None, feeds)
        from common import interleaved_times

        for role, row in zip(("reference", "candidate"), interleaved_times(sessions, feeds, runs=runs, budget=budget)):
            out[role][f"batch{batch}"] = row
    return out


def channel_counts(report: dict) -> list[int]:
    """Kept channel counts of the pruned groups (empty for low-rank runs)."""
    out = []
    for p in report.get("passes", []):
        out += [int(row["kept"]) for row in p.get("pruned", [])]
        out += [int(row["rank"]) for row in p.get("split", [])]
    return out


def phase_compress(task_name: str, method: str, *, latency_runs: int, repeats: int,
                   latency_budget: float = 60.0, max_samples: int | None = None,
                   compress_latency: bool = True, throughput_samples: int = 256) -> dict:
    import numpy as np

    from common import TASKS, halves
    from onnxprune import api
    from onnxprune.data.samples import open_samples
    from onnxprune.model import load_model
    from onnxprune.pipeline import Recipe

    rss_imports = rss_now_bytes()
    task = TASKS[task_name]
    timers: dict = defaultdict(float)
    install_timers(timers)

    start = time.perf_counter()
    model = load_model(task.model)
    target = open_samples(task.target, model, preprocess=task.preprocess)
    def cap(*values):
        values = [v for v in values if v]
        return min(values) if values else None

    calib, held_out = halves(target, cap(task.max_calib, max_samples), cap(task.max_eval, max_samples),
                             shuffle=task.sorted_by_class)
    load = time.perf_counter() - start
    rss_loaded = rss_now_bytes()

    passes = METHODS[method]["passes"]
    recipe = Recipe(passes=tuple(passes), batch_size=32, folds=2)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = api.compress(model, calib, recipe=recipe, output=Path(tmp) / "out.onnx", eval_data=held_out,
                              progress=False, measure_latency=compress_latency)
        total = time.perf_counter() - start
        file_bytes = (Path(tmp) / "out.onnx").stat().st_size
    peak = max_rss_bytes()
    report = result.report
    stages = stage_seconds(report, timers, load, total)
    v = report["validation"]

    # Latency: original and compressed interleaved (A B A B ...) on the same random input, one
    # onnxruntime thread per session (stable on a shared machine); min and median kept.
    # compress's own validate() numbers (default thread pool, 10 runs, medians) are kept too.
    from onnxprune.runtime import make_session

    first = held_out.batch(np.arange(1))
    sessions = [make_session(model, threads=1), make_session(result.model, threads=1)]
    lat1 = interleaved_latency(sessions, first, runs=latency_runs, budget=latency_budget)
    # Diagnostic: the same at batch 32 without onnxruntime's layout optimisations (the NCHWc
    # blocked convolutions, which need channel counts that are multiples of the SIMD block).
    import onnxruntime as ort

    plain_layout = []
    for m in (model, result.model):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        plain_layout.append(ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"]))
    lat_ext = interleaved_latency(plain_layout, first, runs=max(5, latency_runs // 3), budget=latency_budget / 3,
                                  batches=(32,))
    del sessions, plain_layout
    # throughput is per sample: a prefix of the calibration half keeps this affordable
    tp = throughput(model, calib.subset(np.arange(min(len(calib), throughput_samples))), passes, batch_size=32,
                    folds=2, repeats=repeats)
    return {
        "task": task_name, "method": method, "calib": len(calib), "eval": len(held_out),
        "stages": stages, "pipeline_seconds": report["seconds"], "calibration_runs": report["calibration_runs"],
        "rss_imports": rss_imports, "rss_loaded": rss_loaded, "peak_rss": peak, "file_bytes": file_bytes,
        "params": [v["params_reference"], v["params_candidate"]], "macs": [v["macs_reference"], v["macs_candidate"]],
        "accuracy": [v["accuracy_reference"], v["accuracy_candidate"]], "agreement": v["agreement"],
        "validation_latency": v["latency_ms"], "latency": lat1, "latency_no_layout_opt": lat_ext,
        "channels": channel_counts(report),
        "latency_runs": latency_runs,
        "throughput": tp, "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
    }


def phase_linalg(widths: list[int], wide: dict) -> dict:
    import bench_linalg

    bench_linalg.time_width(128)   # warm-up: LAPACK first-call costs
    rows = []
    for C in widths:
        rows.append(bench_linalg.time_width(C))
        print(f"linalg C={C}: {rows[-1]}", file=sys.stderr, flush=True)
    big = bench_linalg.time_wide(**wide)
    print(f"linalg wide: {big}", file=sys.stderr, flush=True)
    return {"widths": rows, "wide": big, "load_average": os.getloadavg()[0]}


# --------------------------------------------------------------------------------------
# parent


def child_env(blas_threads: int) -> dict:
    env = dict(os.environ)
    if blas_threads:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(blas_threads)
    return env


def run_child(args: list[str], blas_threads: int, timeout: float | None = None) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--phase", *args], capture_output=True, text=True,
                          cwd=ROOT, env=child_env(blas_threads), timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"phase {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["child_wall"] = time.perf_counter() - started
    return out


def fit_power(xs, ys) -> tuple[float, float]:
    """Least-squares slope and intercept of log y = slope log x + b."""
    import numpy as np

    slope, intercept = np.polyfit(np.log(xs), np.log(ys), 1)
    return float(slope), float(intercept)


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def fmt_s(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def render(raw: dict) -> str:
    import numpy as np

    from common import markdown_table

    runs = [r for r in raw["runs"] if "error" not in r]
    failed = [r for r in raw["runs"] if "error" in r]
    lines = [
        "# Speed and memory of `compress`",
        "",
        f"`{raw['command']}` on {raw['machine']}; {raw['date']}; "
        f"load average {raw['load'][0]:.1f} at the start and {raw['load'][1]:.1f} at the end "
        f"(the machine is shared: absolute seconds are inflated, ratios are measured within one process, "
        f"interleaved). BLAS threads in every run: {raw['blas_threads'] or 'default'}. Total {raw['wall']:.0f} s.",
        "",
        "Each row is one `onnxprune.api.compress` run (the code path of `onnxprune compress`) in a fresh "
        "process: calibrate on the first half of the target data, validate on the second half "
        f"(`bench/common.py` splits, each capped at {raw.get('max_samples') or 'no'} samples here; calibration and "
        "validation time grow linearly with these counts, the other stages do not)"
        + ("" if raw.get("compress_latency", True) else ", with `measure_latency=False` (`--no-latency`)")
        + ". Recipes: " + "; ".join(f"**{k}** = {m['label']}" for k, m in METHODS.items())
        + ".",
        "",
        "## Time by stage (seconds)",
        "",
        "Calibration and per-pass seconds come from the report; rewrite (graph surgery), graph checks "
        "(ONNX checker + strict shape inference after each pass), validation (both models over the held-out "
        "half + 10 interleaved latency runs) and save are timed by wrapping those functions. MobileNetV2's "
        "JPEG decoding happens inside calibration and validation (the reader decodes batch by batch).",
        "",
    ]
    stage_cols = [s for s in STAGES if any(r["stages"].get(s, 0) > 0.005 for r in runs)]
    header = ["task", "method", "calib / eval"] + stage_cols + ["total"]
    rows = []
    for r in runs:
        st = r["stages"]
        rows.append([r["task"], r["method"], f"{r['calib']} / {r['eval']}"]
                    + [fmt_s(st.get(s, 0.0)) for s in stage_cols] + [fmt_s(st["total"])])
    lines += [markdown_table(header, rows), ""]
    if runs:
        worst = max(runs, key=lambda r: r["stages"]["total"])
        share = {s: worst["stages"].get(s, 0.0) / worst["stages"]["total"] for s in STAGES}
        top = sorted(share.items(), key=lambda kv: -kv[1])[:3]
        lines += [f"Slowest run: {worst['task']} {worst['method']} ({fmt_s(worst['stages']['total'])} s), "
                  + ", ".join(f"{k} {100 * v:.0f} %" for k, v in top) + ".", ""]
    if failed:
        lines += ["Failed runs: " + "; ".join(f"{r['task']} {r['method']}: {r['error']}" for r in failed), ""]

    # ---- calibration throughput
    lines += [
        "## Calibration throughput vs plain inference",
        "",
        f"The first {raw.get('throughput_samples', '?')} calibration samples (or all, when fewer), decoded once and "
        "held in memory "
        "for every run (decoding excluded), batch 32; "
        "`collect()` gathers exactly the statistics the recipe requests (float64 moments, 2 folds); "
        "'exposed' is onnxruntime with those tensors as extra outputs but no statistics. Best of several interleaved "
        f"repeats (at least {raw['repeats']}, more while under 20 s in all, up to 7; just one when a repeat takes over "
        "90 s; the count is in the raw numbers), each including session creation. Goal: calibration <= 1.5x "
        "plain inference.",
        "",
    ]
    header = ["task", "method", "requests (kinds)", "samples", "plain (s)", "exposed (s)", "collect (s)",
              "collect / plain", "CPU collect / plain", "Gram MACs / model MACs", "goal <= 1.5x"]
    rows = []
    for r in runs:
        tp = r["throughput"]
        b, c = tp["best"], tp["best_cpu"]
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(tp["kinds"].items()))
        ratio = b["collect"] / b["plain"]
        rows.append([r["task"], r["method"], f"{tp['requests']} ({kinds})", tp["samples"], fmt_s(b["plain"]),
                     fmt_s(b["exposed"]), fmt_s(b["collect"]), f"{ratio:.1f}x",
                     f"{c['collect'] / c['plain']:.1f}x",
                     f"{tp['gram_macs_per_sample'] / max(tp['model_macs_per_sample'], 1):.1f}",
                     "met" if ratio <= 1.5 else "not met"])
    lines += [markdown_table(header, rows), "",
              "'Gram MACs / model MACs': multiply-adds of the float64 Gram updates (rows x dim^2 per sample; "
              "the symmetric update does about half) over the float32 multiply-adds of the whole model. "
              "When it is above ~0.5 the statistics alone cost more than inference, whatever the "
              "implementation: a Gram grows with dim^2 where the layer grows with dim x outputs (and "
              "im2col patches multiply dim by the kernel size).", ""]

    # ---- linalg scaling
    lin = raw.get("linalg")
    if lin:
        w = lin["widths"]
        Cs = np.array([x["C"] for x in w], dtype=float)
        fits = {}
        expect = {}
        for key in ("select", "dalr_gram", "dalr_rows"):
            ys = np.array([x[key] for x in w])
            fits[key] = fit_power(Cs[Cs >= 512], ys[Cs >= 512]) if (Cs >= 512).sum() >= 2 else fit_power(Cs, ys)
            # expectation: cubic in C (k = C/4 picks x C^2, or n^3), anchored at the largest width
            expect[key] = ys[-1] * (Cs / Cs[-1]) ** 3
        lines += [
            "## Selection and decomposition time against layer width",
            "",
            "`bench/bench_linalg.py` (`time_width`): greedy spectral selection keeping C/4 of C channels, "
            "expected O(k C^2) = O(C^3) for k = C/4; DALR of a C x C layer at rank C/8 from an n x n second "
            "moment, expected O(n^3) (eigenproblem and Cholesky); DALR from N = n/4 samples in sample space, "
            "expected O(N^2 n + m N n) = O(n^3) here too, with a smaller constant. 'expected' scales the "
            "largest width's time by (C / C_max)^3; the slope is the least-squares exponent over C >= 512.",
            "",
        ]
        header = ["C = n", "select (s)", "expected", "dalr Gram (s)", "expected", "dalr samples (s)", "expected"]
        rows = []
        for i, x in enumerate(w):
            rows.append([x["C"], f"{x['select']:.3f}", f"{expect['select'][i]:.3f}", f"{x['dalr_gram']:.3f}",
                         f"{expect['dalr_gram'][i]:.3f}", f"{x['dalr_rows']:.3f}", f"{expect['dalr_rows'][i]:.3f}"])
        rows.append(["fitted exponent", f"{fits['select'][0]:.2f}", "3", f"{fits['dalr_gram'][0]:.2f}", "3",
                     f"{fits['dalr_rows'][0]:.2f}", "3"])
        lines += [markdown_table(header, rows), ""]
        big = lin["wide"]
        n, N, m, k = big["n"], big["N"], big["m"], big["rank"]
        gram_extrap = w[-1]["dalr_gram"] * (n / w[-1]["C"]) ** 3
        flops = N * N * n + 2 * m * N * n
        lines += [
            f"Wide input: DALR of a {m} x {n} layer (VGG-16 fc6 shape: 512 x 7 x 7 inputs) at rank {k} from "
            f"N = {N} < n samples, in sample space (Woodbury / push-through; no n x n matrix): "
            f"**{big['dalr_rows']:.1f} s**, about {flops / 1e9:.0f} G multiply-adds "
            f"(N^2 n + 2 m N n). The Gram-space route would hold a {n} x {n} float64 matrix "
            f"({n * n * 8 / 2**30:.1f} GiB) and, by the cubic fit above, take about {gram_extrap / 60:.0f} min "
            f"({w[-1]['dalr_gram']:.2f} s x ({n}/{w[-1]['C']})^3).",
            "",
        ]

    # ---- latency
    lines += [
        "## Inference latency vs MAC ratio",
        "",
        "Original and compressed interleaved (original, compressed, original, ...) on the same random input "
        "shaped like the data, after 3 warm-up runs, one onnxruntime thread per session; up to "
        f"{runs[0]['latency_runs'] if runs else '?'} pairs per batch size (fewer when a batch size exceeds "
        "its time budget; the count is in the raw numbers). Speedups use the **minimum** time of each "
        "model: on this oversubscribed machine a median is mostly scheduler noise (it is in the raw numbers), "
        "while the minimum approximates an unloaded run. 'default threads' is what `compress` itself "
        "reports (`validate()`: onnxruntime's default pool, median of 10) for comparison. "
        "'MAC speedup' = original MACs / compressed MACs, the speedup the MAC count promises; 'realised' "
        "= measured speedup / MAC speedup (goal >= 0.8). 'without NCHWc': batch 32 again with "
        "onnxruntime's graph optimisation at EXTENDED instead of ALL, i.e. without the NCHWc blocked "
        "layout its CPU convolutions use when channel counts are multiples of the SIMD block (16 with "
        "AVX-512, 8 with AVX2); 'kept widths': pruned channel counts / low-rank ranks that are multiples of 16.",
        "",
    ]
    header = ["task", "method", "params kept", "MAC speedup", "b1 ms (orig -> comp)", "b1 speedup",
              "b1 realised", "b32 ms (orig -> comp)", "b32 speedup", "b32 realised", "goal >= 0.8",
              "default threads b1 / b32", "b32 speedup without NCHWc", "kept widths multiple of 16"]
    rows = []
    for r in runs:
        lat = r["latency"]
        mac = r["macs"][0] / max(r["macs"][1], 1)
        row = [r["task"], r["method"], f"{r['params'][1] / r['params'][0]:.2f}", f"{mac:.2f}x"]
        ok = []
        for key in ("batch1", "batch32"):
            ref, cand = lat["reference"].get(key), lat["candidate"].get(key)
            if ref is None or cand is None:
                row += ["—", "—", "—"]
                ok.append(False)
                continue
            sp = ref["min"] / cand["min"]
            ok.append(sp / mac >= 0.8)
            row += [f"{ref['min']:.3f} -> {cand['min']:.3f}", f"{sp:.2f}x", f"{sp / mac:.2f}"]
        row.append("both" if all(ok) else "batch 32 only" if ok[1] else "batch 1 only" if ok[0] else "no")
        d = r.get("validation_latency") or {}
        try:
            sp_d = [d["reference"][k] / d["candidate"][k] for k in ("batch1", "batch32")]
            row.append(f"{sp_d[0]:.2f}x / {sp_d[1]:.2f}x")
        except (KeyError, ZeroDivisionError):
            row.append("—")
        e = (r.get("latency_no_layout_opt") or {})
        try:
            row.append(f"{e['reference']['batch32']['min'] / e['candidate']['batch32']['min']:.2f}x")
        except (KeyError, ZeroDivisionError):
            row.append("—")
        widths = r.get("channels") or []
        row.append(f"{sum(1 for c in widths if c % 16 == 0)} of {len(widths)}" if widths else "—")
        rows.append(row)
    lines += [markdown_table(header, rows), ""]

    # ---- memory and quality
    lines += [
        "## Peak memory and result of each run",
        "",
        "Peak RSS of the compress process (`getrusage(RUSAGE_SELF).ru_maxrss`, read in the child right after "
        "`compress` returned, before the latency and throughput measurements); 'after load' is the RSS "
        "with Python, onnxruntime, the model and the sample index loaded.",
        "",
    ]
    header = ["task", "method", "model file (MiB)", "RSS after load (MiB)", "peak RSS (MiB)", "params",
              "MACs", "top-1 orig -> comp", "agreement"]
    rows = []
    for r in runs:
        acc = r["accuracy"]
        acc_text = "—" if acc[0] is None else f"{100 * acc[0]:.1f} -> {100 * acc[1]:.1f} %"
        rows.append([r["task"], r["method"], f"{r['model_file'] / 2**20:.2f}", mib(r["rss_loaded"]),
                     mib(r["peak_rss"]), f"{r['params'][0]:,} -> {r['params'][1]:,}",
                     f"{r['macs'][0] / 1e6:.1f}M -> {r['macs'][1] / 1e6:.1f}M", acc_text,
                     f"{100 * r['agreement']:.1f} %"])
    lines += [markdown_table(header, rows), ""]

    lines += findings(raw, runs)
    lines += ["## Plots", ""]
    for name, what in (("speed_stages.png", "time by stage"), ("speed_linalg.png", "scaling with width"),
                       ("speed_latency.png", "speedup vs MAC ratio"), ("speed_memory.png", "peak RSS")):
        lines.append(f"- [{what}]({name})")
    lines += ["", "<details><summary>raw numbers</summary>", "", "```json", json.dumps(raw, indent=1), "```",
              "", "</details>", ""]
    return "\n".join(lines)


def findings(raw: dict, runs: list[dict]) -> list[str]:
    """What the numbers above say, computed from them (plus one measurement made once by hand)."""
    if not runs:
        return []
    out = ["## Findings", ""]
    tp = [(r, r["throughput"]["best"]["collect"] / r["throughput"]["best"]["plain"]) for r in runs]
    met = [f"{r['task'].split('/')[0]} {r['method']}" for r, x in tp if x <= 1.5]
    heavy = [(r, x) for r, x in tp if x > 1.5]
    out.append(f"- **Calibration <= 1.5x inference: met by {len(met)} of {len(tp)} runs**"
               + (f" ({', '.join(met)})" if met else "") + ". "
               + ("Where it is missed, " + "; ".join(
                   f"{r['task'].split('/')[0]} {r['method']} {x:.1f}x (Gram/model MACs "
                   f"{r['throughput']['gram_macs_per_sample'] / max(r['throughput']['model_macs_per_sample'], 1):.1f}, "
                   f"exposing the tensors alone {r['throughput']['best']['exposed'] / r['throughput']['best']['plain']:.1f}x)"
                   for r, x in heavy) + ". With Gram/model MACs near or above 1 the statistics cost about as much "
                  "as the whole inference by arithmetic alone: DALR on Conv layers gathers im2col patch Grams "
                  "((C k^2)^2 per output position), spectral pruning on MobileNetV2 gathers the Grams of its wide "
                  "expanded tensors. The default engine multiplies shifted float32 rows (BLAS ssyrk, one call per "
                  "batch, fold and tensor; a large batch's tensors in parallel threads) and accumulates in float64; "
                  "calibration_speed.md measures each row's floor (plain inference + the products alone, shared by "
                  "the cores) and how far each engine is from it. Beyond the floor is copying (im2col patches, "
                  "shifted rows) and per-batch work, which weighs most where the model itself takes milliseconds "
                  "(the digit models) or the Grams are many and small (ResNet-20's 19 patch Grams)." if heavy else ""))
    lat = []
    for r in runs:
        mac = r["macs"][0] / max(r["macs"][1], 1)
        b32 = r["latency"]["reference"]["batch32"]["min"] / r["latency"]["candidate"]["batch32"]["min"]
        e = r.get("latency_no_layout_opt", {})
        ext = (e["reference"]["batch32"]["min"] / e["candidate"]["batch32"]["min"]) if e else float("nan")
        lat.append((r, mac, b32, ext))
    good = [f"{r['task'].split('/')[0]} {r['method']}" for r, mac, b32, _ in lat if b32 / mac >= 0.8]
    out.append(f"- **Realised speedup >= 0.8 x MAC ratio at batch 32: {len(good)} of {len(lat)} runs**"
               + (f" ({', '.join(good)})" if good else "") + ". "
               + "Largest shortfalls: " + "; ".join(
                   f"{r['task'].split('/')[0]} {r['method']}: MAC ratio {mac:.2f}x, measured {b32:.2f}x"
                   + (f", {ext:.2f}x with onnxruntime's NCHWc layout disabled for both models" if ext == ext else "")
                   for r, mac, b32, ext in sorted(lat, key=lambda t: t[2] / t[1])[:3]) + ". "
               "onnxruntime runs convolutions in a blocked NCHWc layout (blocks of 8 or 16 channels); "
               "select-nodes therefore keeps a multiple of 8 channels in groups of 32 or more (its `multiple` "
               "option), which turned MobileNetV2's expansion pruning from 0.53x to 1.28x at batch 1 "
               "(pruning.md, g). The dalr-bc rows here keep low-rank-split's default `multiple` 1 (ranks as "
               "chosen), and every low-rank split adds a node (for a Conv, a 1x1 convolution over the full feature "
               "map), so low rank realises the least of its MAC ratio; ranks rounded to onnxruntime's channel "
               "blocks (`multiple` 8 or 16) realise more of a smaller MAC ratio (lowrank_blocks.md measures "
               "both on this machine).")
    worst = max(runs, key=lambda r: r["peak_rss"])
    per = worst["throughput"].get("exposed_bytes_per_sample")
    out.append(f"- **Peak memory**: at most {mib(worst['peak_rss'])} MiB ({worst['task']} {worst['method']}), "
               f"against {mib(worst['rss_loaded'])} MiB after loading"
               + (f"; one calibration batch of 32 exposes {mib(32 * per)} MiB of activations "
                  f"({per / 2**20:.1f} MiB per sample), which onnxruntime also holds in its arena" if per else "")
               + ". The peak follows the batch size, not the number of samples (calibration_memory.md).")
    stage_tot = defaultdict(float)
    for r in runs:
        for k in STAGES:
            stage_tot[k] += r["stages"].get(k, 0.0)
    total = sum(stage_tot.values()) or 1.0
    top = sorted(stage_tot.items(), key=lambda kv: -kv[1])[:4]
    out.append("- **Where the time goes** (all runs together): " + ", ".join(
        f"{k} {100 * v / total:.0f} %" for k, v in top) + ". Graph rewriting and checks are negligible; "
        "calibration, validation (decoding + running both models) and, for DALR on many layers, the held-out ridge "
        "search dominate. `compress` measures latency by default (10 interleaved runs at batch 1 and 32 with "
        "onnxruntime's full thread pool); on a busy machine that stage alone can take minutes for MobileNetV2 "
        "(`--no-latency` skips it).")
    out.append("- **BLAS threads** (measured once by hand on this machine at load ~10, not re-run here): the "
               "lenet/usps DALR pipeline took 197 s with OpenBLAS's default 2 threads and 35 s with "
               "`OPENBLAS_NUM_THREADS=1`; a 500 x 500 `eigh` took 2-5 s vs 0.07-0.3 s. The library therefore runs "
               "its numerics with one BLAS thread (threadpoolctl; `ONNXPRUNE_BLAS_THREADS` sets another count), "
               "as every run here does.")
    out.append("")
    return out


def plots(raw: dict, results: Path) -> list[Path]:
    import numpy as np
    from common import pyplot

    plt = pyplot()
    if plt is None:
        return []

    out = []
    runs = [r for r in raw["runs"] if "error" not in r]
    if runs:
        labels = [f"{r['task'].split('/')[0]}\n{r['method']}" for r in runs]
        fig, axes = plt.subplots(1, 2, figsize=(max(10, 2.2 * len(runs)), 4.8))
        cmap = plt.get_cmap("tab20")
        for ax, share in zip(axes, (False, True)):
            bottom = np.zeros(len(runs))
            for i, s in enumerate(STAGES):
                vals = np.array([r["stages"].get(s, 0.0) for r in runs])
                if share:
                    vals = vals / np.array([r["stages"]["total"] for r in runs])
                if vals.sum() <= 0:
                    continue
                ax.bar(labels, vals, bottom=bottom, label=s, color=cmap(i))
                bottom += vals
            ax.set_ylabel("share of the run" if share else "seconds (wall)")
            ax.set_title("compress: share of time by stage" if share else "compress: time by stage")
            ax.tick_params(axis="x", labelsize=7)
        axes[1].legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
        fig.tight_layout()
        out.append(results / "speed_stages.png")
        fig.savefig(out[-1], dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 4.5))
        for r, marker in zip(runs, "osD^v<>p*hX8"):
            mac = r["macs"][0] / max(r["macs"][1], 1)
            for key, color in (("batch1", "tab:blue"), ("batch32", "tab:orange")):
                ref, cand = r["latency"]["reference"].get(key), r["latency"]["candidate"].get(key)
                if ref and cand:
                    ax.scatter(mac, ref["min"] / cand["min"], color=color, marker=marker, s=40)
                    if key == "batch32":
                        ax.annotate(f"{r['task'].split('/')[0]} {r['method']}", (mac, ref["min"] / cand["min"]),
                                    fontsize=6)
        lim = max(max(r["macs"][0] / max(r["macs"][1], 1) for r in runs) * 1.1, 1.5)
        xs = np.linspace(0.8, lim, 10)
        ax.plot(xs, xs, "k-", lw=0.8, label="speedup = MAC ratio")
        ax.plot(xs, 0.8 * xs, "k--", lw=0.8, label="0.8 x MAC ratio (goal)")
        ax.scatter([], [], color="tab:blue", label="batch 1")
        ax.scatter([], [], color="tab:orange", label="batch 32")
        ax.set_xlabel("MAC ratio (original / compressed)")
        ax.set_ylabel("measured speedup")
        ax.set_title("latency speedup vs MAC ratio")
        ax.legend(fontsize=7)
        fig.tight_layout()
        out.append(results / "speed_latency.png")
        fig.savefig(out[-1], dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(runs)), 4))
        ax.bar(labels, [r["rss_loaded"] / 2**20 for r in runs], label="after load")
        ax.bar(labels, [(r["peak_rss"] - r["rss_loaded"]) / 2**20 for r in runs],
               bottom=[r["rss_loaded"] / 2**20 for r in runs], label="peak during compress")
        ax.set_ylabel("RSS (MiB)")
        ax.set_title("compress: peak memory")
        ax.legend(fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        fig.tight_layout()
        out.append(results / "speed_memory.png")
        fig.savefig(out[-1], dpi=110)
        plt.close(fig)

    lin = raw.get("linalg")
    if lin:
        w = lin["widths"]
        Cs = np.array([x["C"] for x in w], dtype=float)
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for key, label, color in (("select", "greedy selection C -> C/4", "tab:blue"),
                                  ("dalr_gram", "DALR, Gram space", "tab:orange"),
                                  ("dalr_rows", "DALR, sample space N = n/4", "tab:green")):
            ys = np.array([x[key] for x in w])
            ax.loglog(Cs, ys, "o-", color=color, label=label)
            ax.loglog(Cs, ys[-1] * (Cs / Cs[-1]) ** 3, ":", color=color, lw=1)
        big = lin["wide"]
        ax.loglog([big["n"]], [big["dalr_rows"]], "*", color="tab:red", ms=12,
                  label=f"DALR sample space, n={big['n']}, N={big['N']}, m={big['m']}")
        ax.loglog([big["n"]], [w[-1]["dalr_gram"] * (big["n"] / Cs[-1]) ** 3], "x", color="tab:orange", ms=10,
                  label="Gram space at n=25088 (extrapolated)")
        ax.plot([], [], "k:", label="C^3 expectation")
        ax.set_xlabel("layer width C = n")
        ax.set_ylabel("seconds")
        ax.set_title("selection / decomposition time vs width")
        ax.legend(fontsize=7)
        fig.tight_layout()
        out.append(results / "speed_linalg.png")
        fig.savefig(out[-1], dpi=110)
        plt.close(fig)
    return out


def load_raw(path: Path) -> dict:
    """Raw numbers from a --raw JSON file or from the json block of a speed.md it wrote."""
    text = path.read_text()
    if path.suffix == ".md":
        text = text.split("```json", 1)[1].split("```", 1)[0]
    return json.loads(text)


def write_partial(raw: dict, out: Path, started: float) -> None:
    """Keep the markdown current after every run, so an interrupted run still leaves results."""
    partial = dict(raw, wall=time.perf_counter() - started, load=[raw["load"][0], os.getloadavg()[0]])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(partial) + "\n_Partial: written after each run; the run had not finished._\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=TASK_NAMES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--quick", action="store_true",
                        help="fewer latency runs, one throughput repeat, widths up to 2048, smaller wide layer")
    parser.add_argument("--latency-runs", type=int)
    parser.add_argument("--samples", type=int,
                        help="cap on calibration and on evaluation samples per task (default 500, quick 128; 0: "
                             "the harness's own splits)")
    parser.add_argument("--repeats", type=int, help="interleaved throughput repeats (default 2, quick 1)")
    parser.add_argument("--widths", type=int, nargs="+")
    parser.add_argument("--skip-linalg", action="store_true")
    parser.add_argument("--blas-threads", type=int, default=1, help="0: the BLAS default")
    parser.add_argument("--raw", type=Path, help="also dump the raw numbers as JSON here")
    parser.add_argument("--update", action="store_true",
                        help="keep the runs (and linalg section) of the existing --out file that this call does "
                             "not redo")
    parser.add_argument("--render", type=Path,
                        help="only re-render the markdown and plots from a --raw file or an earlier speed.md")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "speed.md")
    parser.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.phase:
        kind, *rest = args.phase
        if kind == "compress":
            result = phase_compress(rest[0], rest[1], latency_runs=int(rest[2]), repeats=int(rest[3]),
                                    latency_budget=float(rest[4]), max_samples=int(rest[5]) or None,
                                    compress_latency=rest[6] == "1", throughput_samples=int(rest[7]))
        else:
            result = phase_linalg(json.loads(rest[0]), json.loads(rest[1]))
        print(json.dumps(result))
        return 0

    if args.render:
        raw = load_raw(args.render)
    else:
        from common import SHARED, TASKS, machine

        latency_runs = args.latency_runs or (10 if args.quick else 30)
        repeats = args.repeats or (1 if args.quick else 2)
        budget = 15.0 if args.quick else 45.0     # seconds of latency runs per batch size at most
        samples = args.samples if args.samples is not None else (128 if args.quick else 500)
        tp_samples = 64 if args.quick else 256
        widths = args.widths or ([256, 512, 1024, 2048] if args.quick else [256, 512, 1024, 2048, 4096])
        wide = {"n": 25088, "N": 250, "m": 1024, "rank": 128} if args.quick else \
            {"n": 25088, "N": 500, "m": 4096, "rank": 512}
        started = time.perf_counter()
        raw = {"command": "python bench/speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": machine(), "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
               "blas_threads": args.blas_threads, "repeats": repeats, "runs": [], "max_samples": samples,
               "throughput_samples": tp_samples, "compress_latency": not args.quick,
               "load": [os.getloadavg()[0], None]}
        if args.update and args.out.exists():
            try:
                old = load_raw(args.out)
                redo = {(t, m) for t in args.tasks for m in args.methods}
                raw["runs"] = [r for r in old.get("runs", []) if (r["task"], r["method"]) not in redo]
                if args.skip_linalg and old.get("linalg"):
                    raw["linalg"] = old["linalg"]
                raw["command"] += f" (updating runs from {old.get('date')})"
            except (ValueError, IndexError, KeyError) as exc:
                print(f"--update: cannot read {args.out} ({exc}); starting afresh", file=sys.stderr)
        for task in args.tasks:
            if not TASKS[task].model.exists():
                print(f"skip {task}: {TASKS[task].model} missing (needs {SHARED})", file=sys.stderr)
                continue
            for method in args.methods:
                print(f"compress {task} {method} ...", file=sys.stderr, flush=True)
                try:
                    r = run_child(["compress", task, method, str(latency_runs), str(repeats), str(budget),
                                   str(samples), "0" if args.quick else "1", str(tp_samples)], args.blas_threads)
                    r["model_file"] = TASKS[task].model.stat().st_size
                    print(f"  {r['stages']['total']:.1f} s, peak RSS {mib(r['peak_rss'])} MiB, "
                          f"collect/plain {r['throughput']['best']['collect'] / r['throughput']['best']['plain']:.2f}x",
                          file=sys.stderr, flush=True)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    print(f"  failed: {exc}", file=sys.stderr, flush=True)
                    r = {"task": task, "method": method, "error": str(exc).splitlines()[-1][:300]}
                raw["runs"].append(r)
                write_partial(raw, args.out, started)
        if not args.skip_linalg:
            print("linalg scaling ...", file=sys.stderr, flush=True)
            raw["linalg"] = run_child(["linalg", json.dumps(widths), json.dumps(wide)], args.blas_threads)
        order = {name: i for i, name in enumerate(TASK_NAMES)}
        raw["runs"].sort(key=lambda r: (order.get(r["task"], len(order)), list(METHODS).index(r["method"])))
        raw["load"][1] = os.getloadavg()[0]
        raw["wall"] = time.perf_counter() - started
        if args.raw:
            args.raw.write_text(json.dumps(raw, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(raw))
    for p in plots(raw, args.out.parent):
        print(f"wrote {p}", file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
