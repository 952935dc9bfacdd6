"""Calibration memory and throughput on MobileNetV2 over 500 ImageNet images.

Requests "features" statistics (count, sum, Gram in float64) at the input of every Conv
and of the final MatMul, then reports

- peak RSS (resource.getrusage) and the tracemalloc peak (numpy reports its buffers to
  tracemalloc) of a process that only calibrates, next to one that only runs plain
  onnxruntime inference, and the bytes it would take to hold all those activations for
  the 500 images;
- wall time of calibration vs plain onnxruntime inference over the same preprocessed
  samples (decoding excluded from both), split into "onnxruntime with the tensors
  exposed" and "folding into the statistics".

Each measurement runs in a fresh subprocess so peaks do not leak between them. Writes
``bench/calibration_memory.md``.

    python bench/bench_calibration_memory.py [--batch-size 32 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "mobilenetv2_imagenet_fp32.onnx"
IMAGES = SHARED / "data" / "imagenet_samples"

sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------------------
# Samples: onnxprune's reader (Pillow, decoded one batch at a time)


def open_images(model, count: int):
    """The first ``count`` images: shorter side 256 (bilinear), center crop 224, /255, ImageNet mean/std."""
    from onnxprune.data.preprocess import Preprocess
    from onnxprune.data.samples import open_samples

    pre = Preprocess(resize=256, center_crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    samples = open_samples(IMAGES, model, preprocess=pre)
    return samples.subset(np.arange(min(count, len(samples))))


def decoded(model, samples):
    """The same samples decoded up front (for timing onnxruntime and statistics only)."""
    from onnxprune.data.samples import open_samples

    x = np.concatenate([feeds[samples.input_names[0]] for _, feeds in samples.batches(50)])
    return open_samples(x, model)


def requests_for(model):
    """"features" at the input of every Conv (channel axis 1) and of the MatMul (last axis)."""
    from onnxprune.calibration.requests import StatRequest

    out = {}
    for node in model.graph.node:
        if node.op_type == "Conv":
            out.setdefault(node.input[0], StatRequest(node.input[0], kind="features", axis=1))
        elif node.op_type in ("MatMul", "Gemm"):
            out.setdefault(node.input[0], StatRequest(node.input[0], kind="features", axis=-1))
    return list(out.values())


# --------------------------------------------------------------------------------------
# Phases (each in its own process)


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB


def rss_now_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def phase_memory(kind: str, batch_size: int, count: int) -> dict:
    from onnxprune.calibration.collect import collect
    from onnxprune.model import load_model
    from onnxprune.runtime import make_session, run_batches

    model = load_model(MODEL)
    samples = open_images(model, count)
    requests = requests_for(model)
    base_rss = rss_now_bytes()
    tracemalloc.start()
    start = time.perf_counter()
    stats_bytes = 0
    if kind == "collect":
        stats = collect(model, {"target": samples}, requests, batch_size=batch_size, progress=False)
        stats_bytes = sum(stats.moments(r).nbytes for r in requests)
    else:
        session = make_session(model)
        for _ in run_batches(session, samples, None, batch_size=batch_size):
            pass
    seconds = time.perf_counter() - start
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"kind": kind, "batch_size": batch_size, "samples": len(samples), "requests": len(requests),
            "base_rss": base_rss, "peak_rss": rss_peak_bytes(), "traced_peak": traced_peak,
            "stats_bytes": stats_bytes, "seconds": seconds}


def phase_speed(batch_size: int, count: int, repeats: int) -> dict:
    from onnxprune.calibration.collect import collect, expose
    from onnxprune.model import load_model
    from onnxprune.runtime import make_session, run_batches

    model = load_model(MODEL)
    start = time.perf_counter()
    samples = decoded(model, open_images(model, count))
    decode = time.perf_counter() - start
    requests = requests_for(model)
    tensors = list(dict.fromkeys(r.tensor for r in requests))

    # activation bytes: one sample through the exposed model gives every tensor's size per sample
    exposed, outputs = expose(model, tensors)
    one = make_session(exposed).run(outputs, samples.batch([0]))
    per_sample = sum(a.nbytes for a in one)
    gram_macs = sum(r.dim(a.shape) ** 2 * (a.size // a.shape[0] // r.dim(a.shape))
                    for r, a in zip(requests, one))     # C^2 * (rows per sample), requests 1:1 with tensors
    del one

    def plain():
        session = make_session(model)
        for _ in run_batches(session, samples, None, batch_size=batch_size):
            pass

    def exposed_only():
        session = make_session(exposed)
        for _ in run_batches(session, samples, outputs, batch_size=batch_size):
            pass

    def calibrate():
        collect(model, {"target": samples}, requests, batch_size=batch_size, progress=False)

    plain()   # warm-up (page cache, thread pools)
    times = {"plain": [], "exposed": [], "collect": []}
    cpu = {"plain": [], "exposed": [], "collect": []}
    load = [os.getloadavg()[0]]
    for _ in range(repeats):
        for key, fn in (("plain", plain), ("exposed", exposed_only), ("collect", calibrate)):
            t, c = time.perf_counter(), time.process_time()
            fn()
            times[key].append(time.perf_counter() - t)
            cpu[key].append(time.process_time() - c)
            load.append(os.getloadavg()[0])
    return {"cpu_times": cpu, "best_cpu": {k: min(v) for k, v in cpu.items()}, "load_average": load,
            "batch_size": batch_size, "samples": len(samples), "requests": len(requests),
            "tensors": len(tensors), "activation_bytes_per_sample": per_sample, "gram_macs_per_sample": gram_macs,
            "activation_bytes_total": per_sample * len(samples), "decode_seconds": decode,
            "times": times, "best": {k: min(v) for k, v in times.items()}}


def run_phase(*args: str, blas_threads: int | None = None) -> dict:
    env = dict(os.environ)
    if blas_threads:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(blas_threads)
    out = subprocess.run([sys.executable, __file__, "--phase", *args], check=True, capture_output=True,
                         text=True, cwd=ROOT, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# Report


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_report(path: Path, memory: list[dict], speed: dict, plain_mem: dict) -> str:
    import numpy
    import onnxruntime

    act = speed["activation_bytes_total"]
    best = speed["best"]
    lines = [
        "# Calibration memory and throughput (MobileNetV2, 500 ImageNet images)",
        "",
        "`python bench/bench_calibration_memory.py` — statistics: count, sum and float64 Gram",
        f"(\"features\", channel axis) at the input of every Conv and of the final MatMul of "
        f"`mobilenetv2_imagenet_fp32.onnx`: {speed['requests']} requests on {speed['tensors']} distinct tensors, "
        f"over the {speed['samples']} images of `imagenet_samples` (resize 256, center crop 224, /255, ImageNet "
        "mean/std). Each measurement runs in a fresh process.",
        "",
        f"Machine: {os.cpu_count()}-core CPU ({cpu_name()}), Python {platform.python_version()}, "
        f"onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}.",
        "",
        "## Memory",
        "",
        f"Holding all those activations for {speed['samples']} images would take **{gib(act)}** in float32 "
        f"({mib(speed['activation_bytes_per_sample'])} per image; twice that in float64).",
        "",
        "| run | batch | peak RSS | RSS before the run | tracemalloc peak (numpy) | statistics held | "
        "peak RSS / activation bytes |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in memory + [plain_mem]:
        what = "calibrate (collect)" if m["kind"] == "collect" else "plain inference"
        lines.append(f"| {what} | {m['batch_size']} | {mib(m['peak_rss'])} | {mib(m['base_rss'])} | "
                     f"{mib(m['traced_peak'])} | {mib(m['stats_bytes']) if m['stats_bytes'] else '-'} | "
                     f"{m['peak_rss'] / act:.1%} |")
    lines += [
        "",
        "Images are decoded batch by batch in these runs. The peak grows with the batch size, not with "
        "the number of samples: it is about "
        f"{(memory[0]['peak_rss'] - memory[0]['base_rss']) / (memory[0]['batch_size'] * speed['activation_bytes_per_sample']):.1f}"
        " batches of exposed activations (onnxruntime's own output buffers, the numpy arrays it returns, "
        "its arena) plus the statistics. tracemalloc sees only numpy buffers allocated in Python (the "
        "statistics and onnxprune's float64 work buffer), not onnxruntime's allocations.",
        "",
        "## Throughput",
        "",
        f"Same preprocessed samples in memory for every run (decoding, {speed['decode_seconds']:.1f} s, "
        f"excluded); batch {speed['batch_size']}; best of {len(speed['times']['plain'])} interleaved runs, "
        "each including session creation.",
        "",
        f"Load average on the (shared) machine during the timed runs: "
        f"{min(speed['load_average']):.1f} to {max(speed['load_average']):.1f}; BLAS threads for the "
        f"statistics: {speed.get('blas_threads', 'default')} (onnxruntime uses its default pool).",
        "",
        "| run | wall time | vs plain | CPU time (all threads) | vs plain | images/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    cpu = speed["best_cpu"]
    for key, label in (("plain", "plain onnxruntime inference (logits only)"),
                       ("exposed", "onnxruntime with all requested tensors as outputs"),
                       ("collect", "calibration: `collect()` (onnxruntime + float64 statistics)")):
        lines.append(f"| {label} | {best[key]:.1f} s | {best[key] / best['plain']:.2f}x | {cpu[key]:.1f} s | "
                     f"{cpu[key] / cpu['plain']:.2f}x | {speed['samples'] / best[key]:.1f} |")
    ratio = best["collect"] / best["plain"]
    stats_share = max(best["collect"] - best["exposed"], 0.0)
    lines += [
        "",
        f"**Calibration / plain inference = {ratio:.2f}x wall time** ({cpu['collect'] / cpu['plain']:.2f}x CPU "
        f"time); goal <= 1.5x: {'met' if ratio <= 1.5 else 'not met'}. About {stats_share:.0f} s of the "
        "calibration is folding activations into the float64 accumulators; the rest is onnxruntime "
        "with the tensors exposed.",
        "",
        "Where the time goes:",
        "",
        f"- Exposing {speed['tensors']} tensors costs onnxruntime itself "
        f"{best['exposed'] / best['plain']:.1f}x: its CPU provider runs these convolutions in the blocked "
        "NCHWc layout, and every exposed tensor needs a ReorderOutput back to NCHW (52 instead of 11 "
        f"in the optimized graph) plus a copy into numpy, {mib(speed['activation_bytes_per_sample'])} "
        "per image.",
        f"- The Grams cost sum(C^2 * positions) = {speed['gram_macs_per_sample'] / 1e9:.2f} G multiply-adds "
        "per image (half of that with the symmetric rank-k update numpy uses), in float64, against "
        "about 0.3 GMAC for the whole network in float32: the expanded tensors of the inverted "
        "residuals (C = 96 ... 960) are wide, and a Gram grows with C^2 where a depthwise conv grows "
        "with C.",
        "- The goal is within reach for fewer or narrower sites (a Gemm input, a few Conv layers); "
        "for every Conv input of MobileNetV2 in float64 it is not, on 2 cores.",
        "",
        "Raw numbers:",
        "",
        "```json",
        json.dumps({"memory": memory + [plain_mem], "speed": speed}, indent=1),
        "```",
        "",
    ]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[32, 8],
                        help="batch sizes for the memory runs; the first one is used for timing")
    parser.add_argument("--count", type=int, default=500, help="number of images")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="BLAS threads for the statistics (0: the BLAS default). onnxruntime already "
                             "uses every core; on a small or shared machine one BLAS thread avoids "
                             "oversubscription")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "calibration_memory.md")
    parser.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.phase:
        kind, *rest = args.phase
        if kind in ("collect", "plain"):
            result = phase_memory(kind, int(rest[0]), int(rest[1]))
        else:
            result = phase_speed(int(rest[0]), int(rest[1]), int(rest[2]))
        print(json.dumps(result))
        return 0

    if not MODEL.exists() or not IMAGES.is_dir():
        print(f"needs {MODEL} and {IMAGES}", file=sys.stderr)
        return 1
    memory = []
    for bs in args.batch_size:
        memory.append(run_phase("collect", str(bs), str(args.count), blas_threads=args.blas_threads))
        print(f"collect batch {bs}: peak RSS {mib(memory[-1]['peak_rss'])}", file=sys.stderr)
    plain_mem = run_phase("plain", str(args.batch_size[0]), str(args.count), blas_threads=args.blas_threads)
    print(f"plain batch {args.batch_size[0]}: peak RSS {mib(plain_mem['peak_rss'])}", file=sys.stderr)
    speed = run_phase("speed", str(args.batch_size[0]), str(args.count), str(args.repeats),
                      blas_threads=args.blas_threads)
    speed["blas_threads"] = args.blas_threads or "default"
    print(f"speed: {speed['best']}", file=sys.stderr)
    print(write_report(args.out, memory, speed, plain_mem))
    return 0


if __name__ == "__main__":
    sys.exit(main())
