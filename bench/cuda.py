"""`--device cuda` against the CPU on one GPU machine: calibration cost over plain inference,
and the whole `onnxprune compress` wall time.

    python bench/cuda.py                       # needs onnxruntime-gpu and a GPU; writes bench/results/cuda.md

Phase 1 (calibration): ``calibration_speed.phase_speed`` with ``device="cuda"``: plain
inference, ``collect`` with the default engine (on CUDA every request it can take is reduced
in-graph: Gram and sums on the GPU, only C + C^2 values copied back), the in-graph engine
named, and the numpy path (every activation copied to the host), interleaved, best of the
repeats, session creation included; the statistics' largest relative error against the float64
numpy path. Phase 2 (compress): ``onnxprune compress`` in a fresh process per run, CPU then
CUDA, the same recipe and samples, wall time of the whole command (latency measurement
included) with the held-out accuracy and MACs of each result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from calibration_speed import phase_speed
from common import RESULTS, TASKS, machine, markdown_table

CALIBRATION = [("resnet20/cifar10-jpeg", "dalr-bc"), ("resnet20/cifar10-jpeg", "spectral"),
               ("mobilenetv2/imagenet", "dalr-bc"), ("mobilenetv2/imagenet", "spectral")]
COMPRESS = {"dalr-bc": ["--method", "dalr-bc", "--keep", "0.25", "--allocation", "global"],
            "spectral": ["--method", "spectral", "--keep", "0.5", "--allocation", "global"]}


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return out or "unknown GPU"


def compress_run(task_name: str, method: str, device: str, samples: int, work: Path) -> dict:
    task = TASKS[task_name]
    out = work / f"{task_name.split('/')[0]}_{method}_{device}.onnx"
    pre = task.preprocess
    flags = []
    if pre.resize:
        flags += ["--resize", str(pre.resize)]
    if pre.center_crop:
        flags += ["--center-crop", str(pre.center_crop)]
    flags += ["--mean", ",".join(map(str, pre.mean)), "--std", ",".join(map(str, pre.std))]
    command = [sys.executable, "-m", "onnxprune.cli", "compress", str(task.model), "--target-data", str(task.target),
               "-o", str(out), *COMPRESS[method], "--calib-size", str(samples), *flags, "--device", device, "-q"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"task": task_name, "method": method, "device": device, "error": done.stderr.strip()[-500:]}
    v = json.loads(out.with_name(out.stem + ".report.json").read_text())["validation"]
    return {"task": task_name, "method": method, "device": device, "wall": wall, "samples": v["samples"],
            "accuracy": [v["accuracy_reference"], v["accuracy_candidate"]],
            "macs": v["macs_candidate"] / v["macs_reference"], "latency_ms": v["latency_ms"]}


def render(raw: dict) -> str:
    lines = ["# `--device cuda`: calibration and compress on a GPU", "",
             f"`python bench/cuda.py` on {raw['machine']}, GPU: {raw['gpu']}; onnxruntime-gpu {raw['ort']}; "
             f"{raw['date']}. CUDA execution provider with TF32 off (onnxprune's setting).", "",
             "## Calibration / plain inference on the GPU", "",
             "Calibration half of each task (first samples), batch 32, 2 folds, session creation included, best of "
             "the repeats. **auto** = the default engine, which on CUDA reduces every request in-graph; **numpy** = "
             "every activation copied to the host and folded in float64. 'rel. error': largest relative error of the "
             "second moment or covariance against the float64 numpy path.", ""]
    rows = []
    for r in raw["speed"]:
        b = r["best"]
        rows.append([r["task"], r["method"], r["requests"], r["samples"], f"{b['plain']:.3f}", f"{b['auto']:.3f}",
                     f"{b['numpy']:.3f}", f"**{b['auto'] / b['plain']:.2f}x**", f"{b['numpy'] / b['plain']:.2f}x",
                     f"{r['accuracy']['auto']['second_moment']:.1e} / {r['accuracy']['auto']['covariance']:.1e}"])
    lines += [markdown_table(["task", "method", "requests", "samples", "plain (s)", "auto (s)", "numpy (s)",
                             "auto / plain", "numpy / plain", "rel. error (2nd moment / cov.)"], rows)]
    lines += ["", "## `onnxprune compress`, CPU against CUDA", "",
              f"One fresh process per run, {raw['compress_samples']} calibration samples and the rest of the task's "
              "samples held out (compress's seeded split), `--allocation global` recipes as in speed.md, latency "
              "measured (batch 1 and 32) as compress does by default.", ""]
    rows = []
    for r in raw["compress"]:
        if "error" in r:
            rows.append([r["task"], r["method"], r["device"], "failed: " + r["error"], "", "", ""])
            continue
        lat = r["latency_ms"]["candidate"] if r.get("latency_ms") else {}
        rows.append([r["task"], r["method"], r["device"], f"{r['wall']:.1f}",
                     f"{100 * r['accuracy'][0]:.2f} -> {100 * r['accuracy'][1]:.2f}", f"{100 * r['macs']:.1f} %",
                     " / ".join(f"{lat[k]:.2f}" for k in ("batch1", "batch32") if k in lat)])
    lines += [markdown_table(["task", "method", "device", "wall (s)", "held-out top-1 (%)", "MACs kept",
                             "compressed latency b1 / b32 (ms)"], rows)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256, help="calibration samples (phase 1)")
    parser.add_argument("--compress-samples", type=int, default=100, help="compress --calib-size (phase 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "cuda.md"))
    args = parser.parse_args(argv)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("onnxruntime has no CUDA execution provider here (pip install 'onnxprune[gpu]' on a GPU machine)",
              file=sys.stderr)
        return 1
    raw = {"machine": machine(), "gpu": gpu_name(), "ort": ort.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "compress_samples": args.compress_samples,
           "speed": [], "compress": []}
    for task, method in CALIBRATION:
        raw["speed"].append(phase_speed(task, method, samples=args.samples, repeats=args.repeats, batch_size=32,
                                        folds=2, device="cuda"))
        print(json.dumps({k: raw["speed"][-1][k] for k in ("task", "method", "best", "accuracy")}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for method in COMPRESS:
            for device in ("cpu", "cuda"):
                raw["compress"].append(compress_run("mobilenetv2/imagenet", method, device, args.compress_samples,
                                                    Path(tmp)))
                print(json.dumps(raw["compress"][-1], default=str), flush=True)
    out = Path(args.out)
    out.write_text(render(raw))
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
    print(render(raw))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
