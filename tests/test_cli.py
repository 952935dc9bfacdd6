"""The command line end to end on the bundled sample, and every bad input it must refuse.

Each user error exits 1 with one line naming the problem and no traceback, and leaves no
partial output behind.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnxprune.cli import main
from onnxprune.errors import InternalError

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "lenet_caffe_mnist.onnx"
DATA = ROOT / "models" / "usps_test.npz"
FAST = ["--calib-size", "200", "--no-latency", "-q"]


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def assert_user_error(result, *words, code=1):
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    message = result.stderr.strip()
    assert message.startswith("error: "), message
    assert "Traceback" not in result.output + result.stderr
    assert len(message.splitlines()) == 1, message
    for word in words:
        assert word.lower() in message.lower(), (word, message)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "lenet_small.onnx"
    result = cli("compress", MODEL, "--target-data", DATA, "-o", out, "--keep", "0.2", *FAST)
    assert result.exit_code == 0, result.output + result.stderr
    return out, result


def test_compress_writes_model_report_and_recipe(compressed):
    out, result = compressed
    assert out.exists()
    report = json.loads(out.with_name("lenet_small.report.json").read_text())
    recipe = json.loads(out.with_name("lenet_small.recipe.json").read_text())
    assert report["validation"]["params_candidate"] < 0.3 * report["validation"]["params_reference"]
    assert report["validation"]["accuracy_candidate"] > 0.5
    # the planner chose per site; the recipe written is the explicit plan, without "plan"
    assert recipe["passes"] and "plan" not in recipe and report["plan"]["goal"] == {"budget": 0.2}
    assert "top-1 accuracy" in result.output and "wrote" in result.output
    assert not list(out.parent.glob(".*"))  # no temporary files left


def test_recipe_reruns_to_the_same_model(compressed, tmp_path):
    out, _ = compressed
    again = tmp_path / "again.onnx"
    result = cli("compress", MODEL, "--target-data", DATA, "-o", again,
                 "--recipe", out.with_name("lenet_small.recipe.json"), "--no-latency", "-q")
    assert result.exit_code == 0, result.output + result.stderr
    assert again.read_bytes() == out.read_bytes()


def test_validate_model_against_itself_agrees_fully(tmp_path):
    result = cli("validate", MODEL, MODEL, "--data", DATA, "--no-latency", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["agreement"] == 1.0
    assert abs(report["accuracy_reference"] - 0.754) < 0.005


def test_validate_warns_when_the_candidate_calibrated_on_the_data_it_scores(compressed, tmp_path):
    """compress calibrated on part of DATA (its report says which file): validate --data DATA scores
    those samples too. Another file gets no warning."""
    out, _ = compressed
    report = json.loads(out.with_name("lenet_small.report.json").read_text())
    assert report["calibration"]["target"]["path"] == str(DATA.resolve())
    result = cli("validate", MODEL, out, "--data", DATA, "--no-latency")
    assert result.exit_code == 0, result.stderr
    assert "not held out" in result.stderr and "compress --eval-data" in result.stderr
    other = tmp_path / "other.npz"
    shutil.copy(DATA, other)
    result = cli("validate", MODEL, out, "--data", other, "--no-latency")
    assert result.exit_code == 0 and "not held out" not in result.stderr, result.stderr


def test_validate_threshold_miss_exits_3(compressed, tmp_path):
    out, _ = compressed
    held_out = tmp_path / "usps.npz"         # not the file that calibrated it: no warning before the error
    shutil.copy(DATA, held_out)
    result = cli("validate", MODEL, out, "--data", held_out, "--no-latency", "--min-agreement", "0.9999")
    assert_user_error(result, "agreement", code=3)
    # --json: the measurements with the verdict and its reason (they lacked both), then the one line
    result = cli("validate", MODEL, out, "--data", held_out, "--no-latency", "--min-agreement", "0.9999", "--json")
    assert result.exit_code == 3 and "agreement" in result.stderr
    document = json.loads(result.stdout)
    assert document["verdict"] == "failed" and "below min agreement" in document["reason"]
    result = cli("validate", MODEL, out, "--data", held_out, "--no-latency", "--min-agreement", "0.5", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["verdict"] == "passed"


def test_max_drop_miss_writes_the_failed_report_only(tmp_path):
    out = tmp_path / "tiny.onnx"
    result = cli("compress", MODEL, "--target-data", DATA, "-o", out, "--rank", "1", "--max-drop", "0.1", *FAST)
    assert_user_error(result, "accuracy", code=3)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.report.json"]  # no model, no recipe
    report = json.loads((tmp_path / "tiny.report.json").read_text())
    assert report["verdict"] == "failed" and "max drop 0.1" in report["failure"]


def test_inspect_json_lists_methods():
    result = cli("inspect", MODEL, "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["params"] == 431080 and info["macs"] == 2293000
    assert {g["name"] for g in info["channel_groups"] if not g["skip"]} == {"conv1", "conv2", "ip1"}
    assert sum(layer["splittable"] for layer in info["low_rank"]) == 4


def test_calibrate_then_compress_with_stats(tmp_path):
    stats = tmp_path / "stats.npz"
    result = cli("calibrate", MODEL, "--target-data", DATA, "-o", stats, "--calib-size", "200", "-q")
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "small.onnx"
    result = cli("compress", MODEL, "--target-data", DATA, "-o", out, "--stats", stats, "--keep", "0.3", *FAST)
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.with_name("small.report.json").read_text())
    assert report["calibration_runs"] == 0  # everything came from the saved statistics


def test_stats_without_method_flags_run_the_recipe_they_were_gathered_for(tmp_path):
    """No method flag: the file's recipe (not dalr-bc 0.25), its samples, and the default goal's check."""
    stats = tmp_path / "stats.npz"
    assert cli("calibrate", MODEL, "--target-data", DATA, "-o", stats, "--method", "spectral",
               "--calib-size", "150", "--seed", "3", "-q").exit_code == 0
    out = tmp_path / "small.onnx"
    result = cli("compress", MODEL, "--target-data", DATA, "-o", out, "--stats", stats, "--no-latency")
    assert result.exit_code in (0, 3), result.stderr
    assert "running the recipe the statistics were gathered for" in result.stderr
    report = json.loads(out.with_name("small.report.json").read_text())
    assert [p["name"] for p in report["recipe"]["passes"]] == ["select-nodes", "reconstruct-next-layer"]
    assert report["recipe"]["calib_size"] == 150 and report["recipe"]["seed"] == 3
    assert report["verdict"] in ("passed", "failed") and report["calibration_runs"] == 0


@pytest.mark.parametrize("flags, problem", [
    (["--mean", "0.5", "--std", "0.5"], "gathered with preprocessing"),
    (["--method", "spectral", "--keep", "0.5"], "holds no statistics for"),
    (["--calib-size", "120"], "gathered on other samples (200) than the 120"),
])
def test_stats_that_do_not_fit_the_run_are_refused(tmp_path, flags, problem):
    stats = tmp_path / "stats.npz"
    assert cli("calibrate", MODEL, "--target-data", DATA, "-o", stats, "--calib-size", "200", "-q").exit_code == 0
    out = tmp_path / "small.onnx"
    result = cli("compress", MODEL, "--target-data", DATA, "-o", out, "--stats", stats, "--no-latency", "-q", *flags)
    assert result.exit_code == 1 and problem in result.stderr, result.stderr
    assert not list(tmp_path.glob("small*"))


def relabelled(tmp_path, shift: int) -> Path:
    """The bundled digits with every label moved by ``shift`` (modulo 10 for shifts below 10)."""
    with np.load(DATA) as d:
        x, y = d["x"], d["y"]
    path = tmp_path / f"labels{shift}.npz"
    np.savez(path, x=x, y=(y + shift) % 10 if shift < 10 else y + shift)
    return path


def test_labels_the_model_cannot_answer_are_refused(tmp_path):
    out = tmp_path / "small.onnx"
    result = cli("compress", MODEL, "--target-data", relabelled(tmp_path, 100), "-o", out, *FAST)
    assert result.exit_code == 1 and "has labels 100..109, but the model answers with 10 classes" in result.stderr
    assert not list(tmp_path.glob("small*"))


def test_labels_the_original_scores_near_chance_on_are_set_aside(tmp_path):
    """Labels in another class order: the planner would see no drop at any size; agreement decides."""
    out = tmp_path / "small.onnx"
    result = cli("compress", MODEL, "--target-data", relabelled(tmp_path, 3), "-o", out, *FAST)
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.with_name("small.report.json").read_text())
    assert "than guessing" in report["warnings"][0] and "set aside" in report["warnings"][0]
    assert report["validation"]["accuracy_reference"] is None and report["validation"]["agreement"] > 0.97


@pytest.mark.parametrize("allocation, why", [("global", ""), ("plan", "the planner kept every site whole")])
def test_keep_everything_changes_nothing(tmp_path, allocation, why):
    """--keep 1.0 is the identity, also where 100 samples span fewer directions than a layer's input
    (low rank would otherwise split ip1 at the data's rank)."""
    out = tmp_path / "same.onnx"
    result = cli("compress", MODEL, "--target-data", DATA, "-o", out, "--keep", "1.0", "--allocation", allocation,
                 "--calib-size", "100", "--no-latency", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.with_name("same.report.json").read_text())
    assert report["changed"] is False and why in report["note"]
    assert report["params_after"] == report["params_before"]


def test_stats_for_another_model_are_refused(tmp_path):
    stats = tmp_path / "stats.npz"
    assert cli("calibrate", MODEL, "--target-data", DATA, "-o", stats, "-q").exit_code == 0
    other = tmp_path / "other.onnx"
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(MODEL))
    w = numpy_helper.to_array(model.graph.initializer[0]) * 2
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, model.graph.initializer[0].name))
    onnx.save(model, str(other))
    result = cli("compress", other, "--target-data", DATA, "-o", tmp_path / "x.onnx", "--stats", stats, *FAST)
    assert_user_error(result, "stats.npz")
    assert not (tmp_path / "x.onnx").exists()


# ---------------------------------------------------------------- bad input


def test_missing_model(tmp_path):
    assert_user_error(cli("inspect", tmp_path / "nope.onnx"), "no such file")


def test_corrupt_model(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(5000))
    assert_user_error(cli("inspect", bad), "bad.onnx")


def test_truncated_model(tmp_path):
    bad = tmp_path / "half.onnx"
    bad.write_bytes(MODEL.read_bytes()[: MODEL.stat().st_size // 2])
    assert_user_error(cli("compress", bad, "--target-data", DATA, "-o", tmp_path / "o.onnx", *FAST), "half.onnx")
    assert not (tmp_path / "o.onnx").exists()


def test_text_file_is_not_a_model(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("hello, I am not a model\n")
    assert_user_error(cli("inspect", bad), "notes.onnx")


def test_missing_data(tmp_path):
    result = cli("compress", MODEL, "--target-data", tmp_path / "none.npz", "-o", tmp_path / "o.onnx", *FAST)
    assert_user_error(result, "none.npz")


def test_empty_data(tmp_path):
    empty = tmp_path / "empty.npz"
    np.savez(empty, x=np.zeros((0, 28, 28), np.uint8))
    assert_user_error(cli("compress", MODEL, "--target-data", empty, "-o", tmp_path / "o.onnx", *FAST), "empty.npz")


def test_nan_data(tmp_path):
    nan = tmp_path / "nan.npy"
    x = np.random.default_rng(0).normal(size=(20, 1, 28, 28)).astype(np.float32)
    x[3, 0, 4, 4] = np.nan
    np.save(nan, x)
    assert_user_error(cli("compress", MODEL, "--target-data", nan, "-o", tmp_path / "o.onnx", *FAST), "nan")


def test_mismatched_data(tmp_path):
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((10, 3, 32, 32), np.float32))
    assert_user_error(cli("compress", MODEL, "--target-data", wrong, "-o", tmp_path / "o.onnx", *FAST), "wrong.npy")


def test_output_over_input_is_refused(tmp_path):
    copy = tmp_path / "model.onnx"
    shutil.copy(MODEL, copy)
    before = copy.read_bytes()
    assert_user_error(cli("compress", copy, "--target-data", DATA, "-o", copy, *FAST), "input model")
    assert copy.read_bytes() == before


def test_bad_recipe(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"passes": [{"name": "low-rank-split", "rnak": 3}]}))
    assert_user_error(cli("compress", MODEL, "--target-data", DATA, "-o", tmp_path / "o.onnx", "--recipe", recipe,
                          *FAST), "rnak")
    recipe.write_text(json.dumps({"passes": [{"name": "shrink-everything"}]}))
    assert_user_error(cli("compress", MODEL, "--target-data", DATA, "-o", tmp_path / "o.onnx", "--recipe", recipe,
                          *FAST), "shrink-everything")


def test_conflicting_budget_options(tmp_path):
    result = cli("compress", MODEL, "--target-data", DATA, "-o", tmp_path / "o.onnx", "--rank", "4", "--keep", "0.3", *FAST)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "give only one budget: --keep and --rank" in result.stderr


def test_momasp_without_source_data(tmp_path):
    result = cli("compress", MODEL, "--target-data", DATA, "-o", tmp_path / "o.onnx", "--method", "momasp-j", *FAST)
    assert_user_error(result, "source")


def test_cuda_unavailable_is_a_user_error(tmp_path):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    result = cli("validate", MODEL, MODEL, "--data", DATA, "--device", "cuda", "--no-latency")
    assert_user_error(result, "cuda")


# --------------------------------------------------------------------------- internal errors, logging

@pytest.mark.parametrize("exc, where", [
    (RuntimeError("boom\nsecond line"), "internal error in inspect (api.py:"),
    (InternalError("pass low-rank-split", "its output fails the check: boom"), "internal error in pass low-rank-split:"),
])
def test_internal_errors_exit_4_with_one_line_and_a_traceback_file(monkeypatch, tmp_path, exc, where):
    """A bug is not reported as a user error: one line naming where, the traceback in a file."""
    import tempfile

    from onnxprune import api

    def broken(model):
        raise exc
    monkeypatch.setattr(api, "find_linear_layers", broken)   # called inside api.inspect
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = cli("inspect", MODEL)
    assert result.exit_code == 4, (result.exit_code, result.output, result.stderr)
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and message.startswith(where), message
    assert "boom" in message and "Traceback" not in message and "please send it to us" in message
    logs = list(tmp_path.glob("onnxprune-internal-*.log"))
    assert len(logs) == 1 and str(logs[0]) in message
    text = logs[0].read_text()
    assert "Traceback (most recent call last)" in text and "boom" in text and "command inspect" in text


def test_verbose_logs_each_stage_on_stderr(tmp_path):
    out, data = tmp_path / "small.onnx", tmp_path / "few.npz"
    with np.load(DATA) as full:
        np.savez(data, x=full["x"][:160], y=full["y"][:160])
    args = ("compress", MODEL, "--target-data", data, "-o", out, "--method", "svd-bc", "--keep", "0.2", "--no-latency")
    quiet = cli(*args)
    assert quiet.exit_code == 0 and "INFO" not in quiet.stderr
    result = cli(*args, "-v")
    assert result.exit_code == 0, result.stderr
    log = result.stderr
    # the plan splits layers in both forms: one low-rank-split per form, then bias-compensate
    assert re.search(r"INFO: recipe: (low-rank-split -> )+bias-compensate", log), log
    for words in ("INFO: calibration:", "INFO: pass low-rank-split:",
                  "INFO: low-rank-split: ip1 Gemm 500x800 -> rank", "INFO: pass bias-compensate:"):
        assert words in log, (words, log)
    assert "DEBUG" not in log and "INFO" not in result.stdout
    assert "DEBUG: " in cli(*args, "-vv").stderr


def test_a_bad_option_value_inside_a_command_stays_a_usage_error(tmp_path):
    """click's BadParameter raised while a command runs is exit 2, not an internal error."""
    result = cli("compress", MODEL, "--target-data", DATA, "-o", tmp_path / "o.onnx", "--resize", "big")
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert "internal error" not in result.stderr and "is not a size" in result.stderr


def test_plan_flag_contradictions_are_usage_errors(tmp_path):
    """The plan table is built in onnxprune.recipes: flags that contradict each other there are
    usage errors (exit 2) naming the flags, not bugs."""
    result = cli("compress", MODEL, "--target-data", DATA, "-o", tmp_path / "o.onnx", "--flops", "0.5",
                 "--objective", "params", *FAST)
    assert result.exit_code == 2 and "--objective params contradicts --flops" in result.stderr, result.stderr
    result = cli("sweep", MODEL, "--target-data", DATA, "-o", tmp_path / "sweep", "--calib-size", "50")
    assert result.exit_code == 2 and "give one list of budgets: --flops" in result.stderr, result.stderr


def test_latency_aware_splits_flag_reports_per_layer_timings(tmp_path):
    out, data = tmp_path / "small.onnx", tmp_path / "few.npz"
    with np.load(DATA) as full:
        np.savez(data, x=full["x"][:64], y=full["y"][:64])
    result = cli("compress", MODEL, "--target-data", data, "-o", out, "--method", "svd", "--keep", "0.2",
                 "--latency-aware-splits", "--latency-batch", "2", "--no-latency", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.with_suffix(".report.json").read_text()) if out.with_suffix(".report.json").exists() \
        else json.loads(result.stdout)
    split = next(p for p in report["passes"] if p["pass"] == "low-rank-split") if "passes" in report else None
    assert split is not None and split["latency"], report.keys()
    for row in split["latency"]:
        assert row["batch"] == 2 and row["decision"] in ("kept", "shrunk", "skipped")
        assert {"ideal_mac_ratio", "ms_before", "ms_after", "realised"} <= set(row)
    skipped = {row["layer"] for row in split["skipped"]}
    assert {row["layer"] for row in split["latency"] if row["decision"] == "skipped"} <= skipped


def test_an_unmet_global_budget_is_warned_of_once_in_sequential_mode(tmp_path):
    """Each sequential round reran the pass object, which kept the first round's warning: the report listed
    'keep 0.001 cannot be met' once per channel group (3 on LeNet)."""
    out = tmp_path / "o.onnx"
    result = cli("compress", MODEL, "--target-data", DATA, "-o", out, "--method", "spectral", "--keep", "0.001",
                 "--mode", "sequential", "--allocation", "global", *FAST)
    assert result.exit_code == 0, result.output + result.stderr
    warnings = json.loads((tmp_path / "o.report.json").read_text())["warnings"]
    assert sum("cannot be met" in w for w in warnings) == 1, warnings
