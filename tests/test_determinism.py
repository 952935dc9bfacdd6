"""Determinism: the same inputs give the same bytes, whatever the hash seed, the thread
settings, the order a folder lists its files in, or the container of the same arrays; a saved
statistics file gives the model that calibrating in the run gives.

(Audited by hand on LeNet and ResNet-20: runs repeated, OMP_NUM_THREADS 1 / 2, PYTHONHASHSEED
0 / 1, image folders listed in reverse, .npz / .npy, recipe and --stats reruns all wrote the
same bytes. ONNXPRUNE_BLAS_THREADS=2 changes last digits, 8.6e-9 relative in LeNet's
weights, not what these tests pin.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from threadpoolctl import threadpool_limits

from onnxprune.calibration.moments import Moments
from onnxprune.cli import main
from onnxprune.data.samples import open_samples
from onnxprune.linalg import blas_threads
from onnxprune.model import load_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "lenet_caffe_mnist.onnx"
DATA = ROOT / "models" / "usps_test.npz"
FAST = ["--calib-size", "100", "--no-latency", "-q"]


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + result.stderr
    return result


def compress_in_process(out: Path, env: dict[str, str], *args) -> bytes:
    """``onnxprune compress`` in a fresh interpreter (the hash seed is fixed at its start)."""
    command = [sys.executable, "-c", "from onnxprune.launch import main; main()", "compress", *map(str, args),
               "-o", str(out)]
    done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return out.read_bytes()


def test_hash_seed_and_omp_threads_do_not_change_the_planned_model(tmp_path):
    """Set/dict order (PYTHONHASHSEED) and OMP_NUM_THREADS leak into nothing the planner decides."""
    args = [MODEL, "--target-data", DATA, "--method", "spectral", "--keep", "0.5", "--check-extra", "200", *FAST]
    first = compress_in_process(tmp_path / "a.onnx", {"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}, *args)
    second = compress_in_process(tmp_path / "b.onnx", {"PYTHONHASHSEED": "1", "OMP_NUM_THREADS": "2"}, *args)
    assert first == second
    reports = [json.loads((tmp_path / f"{n}.report.json").read_text()) for n in "ab"]
    assert reports[0]["plan"]["sensitivity"] == reports[1]["plan"]["sensitivity"]
    assert (tmp_path / "a.recipe.json").read_text() == (tmp_path / "b.recipe.json").read_text()


def _reversed_listing(monkeypatch):
    """os.listdir (Path.iterdir) and os.scandir (Path.rglob) list every folder in reverse."""
    listdir, scandir = os.listdir, os.scandir

    class Reversed:
        def __init__(self, path):
            with scandir(path) as entries:
                self.entries = list(entries)[::-1]

        def __iter__(self):
            return iter(self.entries)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

        def close(self):
            pass

    monkeypatch.setattr(os, "listdir", lambda path=".": listdir(path)[::-1])
    monkeypatch.setattr(os, "scandir", lambda path=".": Reversed(path))


def _read_all(source):
    samples = open_samples(source, load_model(MODEL))
    x = np.concatenate([feeds["data"] for _, feeds in samples.batches(32)])
    return x, samples.labels, samples.content_sha()


@pytest.mark.parametrize("layout", ["flat", "classes"])
def test_image_folders_read_the_same_whatever_order_the_folder_lists(tmp_path, monkeypatch, layout):
    """Samples, labels and content hash (hence the split, the statistics and the model) follow the
    sorted file names, not os.listdir's order (tmpfs lists newest first, ext4 by hash)."""
    data = np.load(DATA)
    x, y = data["x"][:48], data["y"][:48]
    folder = tmp_path / layout
    rows = ["file,class_index"]
    for i in range(len(x)):
        target = folder / (str(int(y[i])) if layout == "classes" else "") / f"{i:03d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(target)
        rows.append(f"{i:03d}.png,{int(y[i])}")
    if layout == "flat":
        (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    before = _read_all(folder)
    listed = os.listdir(folder)
    _reversed_listing(monkeypatch)
    assert os.listdir(folder) == listed[::-1] and [e.name for e in os.scandir(folder)] == listed[::-1]
    after = _read_all(folder)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    assert before[2] == after[2]
    if layout == "flat":          # the same pixels as the array file, in the same order
        np.testing.assert_array_equal(before[0], _read_all(DATA)[0][:48])


def test_npz_npy_and_key_order_give_the_same_model(tmp_path):
    data = np.load(DATA)
    np.save(tmp_path / "x.npy", data["x"])
    np.savez(tmp_path / "x.npz", x=data["x"])
    np.savez(tmp_path / "yx.npz", y=data["y"], x=data["x"])      # labels first
    flags = ["--method", "spectral", "--fraction", "0.5", *FAST]
    written = {}
    for name in ("x.npy", "x.npz", "yx.npz"):
        cli("compress", MODEL, "--target-data", tmp_path / name, "-o", tmp_path / f"{name}.onnx", *flags)
        written[name] = (tmp_path / f"{name}.onnx").read_bytes()
    cli("compress", MODEL, "--target-data", DATA, "-o", tmp_path / "xy.onnx", *flags)
    assert written["x.npy"] == written["x.npz"]
    assert written["yx.npz"] == (tmp_path / "xy.onnx").read_bytes()


def _moments_with_pending_work() -> Moments:
    """float32 products with shift corrections pending and small updates queued (patches of a
    Conv, a few rows per fold and batch), as ``collect`` leaves them."""
    m = Moments(500, products="float32")
    rng = np.random.default_rng(0)
    with blas_threads():                        # as collect folds its batches
        for _ in range(20):
            m.update(rng.random((16, 500), dtype=np.float32))
        for _ in range(3):
            m.update(rng.random((300, 500), dtype=np.float32))
    return m


def test_a_gram_read_outside_the_blas_setting_is_the_one_read_inside():
    """What is pending is folded under ``blas_threads`` wherever the Gram is read: ``calibrate``
    saved its file outside it, with BLAS at the machine's own thread count, and its Grams (so
    ``compress --stats``'s model) followed the cores and OMP_NUM_THREADS in their last digits."""
    inside = _moments_with_pending_work()
    with blas_threads():
        expected = inside.gram.copy()
    for threads in (2, 4):
        outside, other = _moments_with_pending_work(), _moments_with_pending_work()
        with threadpool_limits(threads, user_api="blas"):     # calibrate saving, merge-stats adding
            np.testing.assert_array_equal(outside.gram, expected)
            np.testing.assert_array_equal((other + _moments_with_pending_work()).gram, 2 * expected)


#: a recipe the planner wrote (LeNet, --max-drop 50): low rank, bias, and correct-drift, which
#: gathers statistics of the compressed model during the run
DRIFT_RECIPE = {
    "mode": "one-shot", "seed": 0, "calib_size": 100, "split": 0.5, "batch_size": 32, "folds": 4,
    "passes": [
        {"name": "low-rank-split", "method": "dalr", "ranks": {"ip1": 16}, "conv": "channel"},
        {"name": "low-rank-split", "method": "dalr", "ranks": {"conv2": 4}, "conv": "spatial"},
        {"name": "bias-compensate"},
        {"name": "correct-drift"},
    ],
}


def test_recipe_and_saved_statistics_reproduce_the_model_byte_for_byte(tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(DRIFT_RECIPE))
    run = ["--recipe", recipe, "--no-latency", "-q"]
    cli("compress", MODEL, "--target-data", DATA, "-o", tmp_path / "one.onnx", *run)
    one = (tmp_path / "one.onnx").read_bytes()
    cli("compress", MODEL, "--target-data", DATA, "-o", tmp_path / "again.onnx", "--recipe",
        tmp_path / "one.recipe.json", "--no-latency", "-q")
    assert (tmp_path / "again.onnx").read_bytes() == one
    with threadpool_limits(4, user_api="blas"):      # a machine whose BLAS runs 4 threads by default
        cli("calibrate", MODEL, "--target-data", DATA, "--recipe", recipe, "-q", "-o", tmp_path / "stats.npz")
    cli("compress", MODEL, "--target-data", DATA, "-o", tmp_path / "stats.onnx", "--stats", tmp_path / "stats.npz", *run)
    assert (tmp_path / "stats.onnx").read_bytes() == one
    report = json.loads((tmp_path / "one.report.json").read_text())
    assert [p["name"] for p in report["recipe"]["passes"]][-1] == "correct-drift"


@pytest.mark.real
@pytest.mark.slow
def test_resnet20_planned_spectral_is_the_same_across_hash_seeds_and_threads(tmp_path, shared):
    data = np.load(shared / "data" / "cifar10" / "cifar10_test_jpeg.npz")
    np.savez(tmp_path / "cifar1000.npz", x=data["x"][:1000], y=data["y"][:1000])
    args = [shared / "models" / "resnet20_cifar10.onnx", "--target-data", tmp_path / "cifar1000.npz",
            "--method", "spectral", "--flops", "0.6", "--calib-size", "200", "--no-latency", "-q",
            "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]
    first = compress_in_process(tmp_path / "a.onnx", {"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}, *args)
    second = compress_in_process(tmp_path / "b.onnx", {"PYTHONHASHSEED": "1", "OMP_NUM_THREADS": "2"}, *args)
    assert first == second
