"""First use without surprises (issue 14): every awkward input gives a documented exit code,
one clear line and no traceback; no input is ever overwritten; reports stay honest.

Tiny models built in code with small float data keep these fast; each test names the
issue item it reproduces.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main
from tests.graphs import conv_bn_relu, gemm_chain, wide_mlp

FAST = ["--no-latency", "-q"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *words, code=1):
    """Exit ``code``, one line on stderr naming the problem, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    assert "Traceback" not in result.output + result.stderr
    message = result.stderr.strip()
    if code == 2:  # click's usage error: usage lines, then one "Error: ..." line
        message = message.splitlines()[-1]
        assert message.startswith("Error: "), message
    else:
        assert message.startswith("error: ") and len(message.splitlines()) == 1, message
    for word in words:
        assert word.lower() in message.lower(), (word, message)
    return message


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def mlp_task(tmp_path: Path, n: int = 240, *, labels: bool = True, seed: int = 0):
    """wide_mlp (8 -> 100 -> 3) and float samples labelled by its own predictions (so the
    reference is accurate and compression can only lose)."""
    model = wide_mlp()
    x = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    from tests.conftest import run_model
    y = run_model(model, {"x": x})[0].argmax(axis=1)
    data = tmp_path / "data.npz"
    np.savez(data, **({"x": x, "y": y} if labels else {"x": x}))
    return save(model, tmp_path / "model.onnx"), data


def no_weights_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ 1. nothing to compress


@pytest.mark.parametrize("extra", [["--keep", "1.0"], ["--method", "spectral", "--keep", "1.0"]])
def test_compression_that_changes_nothing_exits_0_with_a_note(tmp_path, extra):
    model, data = mlp_task(tmp_path)
    out = tmp_path / "out" / "small.onnx"
    result = cli("compress", model, "--target-data", data, "-o", out, *extra, *FAST)
    assert result.exit_code == 0, result.output + result.stderr
    assert "Traceback" not in result.output
    assert "no layer changed" in result.output
    report = json.loads((out.parent / "small.report.json").read_text())
    assert report["changed"] is False and report["validation"]["identical"] is True
    assert report["validation"]["sqnr_db"] is None  # numeric JSON: null, never the string "inf"
    json.loads(json.dumps(report), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))


def test_model_without_weights_exits_0_with_a_note(tmp_path):
    model = save(no_weights_model(), tmp_path / "relu.onnx")
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32))
    out = tmp_path / "o.onnx"
    result = cli("compress", model, "--target-data", data, "-o", out, *FAST)
    assert result.exit_code == 0, result.output + result.stderr
    assert "no layer changed" in result.output and "SQNR inf dB (outputs identical)" in result.output


# ------------------------------------------------------------------ 2. outputs over inputs


def test_calibrate_refuses_to_overwrite_the_model(tmp_path):
    model, data = mlp_task(tmp_path)
    before = snapshot(tmp_path)
    one_line_error(cli("calibrate", model, "--target-data", data, "-o", model, "-q"), "input model")
    assert snapshot(tmp_path) == before


def test_compress_refuses_to_overwrite_the_target_data(tmp_path):
    model, data = mlp_task(tmp_path)
    before = snapshot(tmp_path)
    one_line_error(cli("compress", model, "--target-data", data, "-o", data, *FAST), "--target-data")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("spelling", ["hardlink", "symlink", "dotdot"])
def test_outputs_over_inputs_are_refused_however_spelled(tmp_path, spelling):
    model, data = mlp_task(tmp_path)
    (tmp_path / "sub").mkdir()
    if spelling == "hardlink":
        alias = tmp_path / "alias.onnx"
        os.link(model, alias)
    elif spelling == "symlink":
        alias = tmp_path / "alias.onnx"
        alias.symlink_to(model)
    else:
        alias = tmp_path / "sub" / ".." / "model.onnx"
    before = snapshot(tmp_path)
    one_line_error(cli("compress", model, "--target-data", data, "-o", alias, *FAST), "input model")
    one_line_error(cli("calibrate", model, "--target-data", data, "-o", alias, "-q"), "input model")
    assert snapshot(tmp_path) == before


def test_report_or_recipe_over_an_input_is_refused(tmp_path):
    model, data = mlp_task(tmp_path)
    recipe = tmp_path / "x.recipe.json"
    recipe.write_text(json.dumps({"passes": [{"name": "low-rank-split", "keep": 0.5}]}))
    stats = tmp_path / "x.report.json"
    stats.write_text("{}")
    before = snapshot(tmp_path)
    # -o x.onnx writes x.recipe.json and x.report.json: the recipe and the "statistics" given
    one_line_error(cli("compress", model, "--target-data", data, "-o", tmp_path / "x.onnx", "--recipe", recipe,
                       *FAST), "--recipe")
    one_line_error(cli("compress", model, "--target-data", data, "-o", tmp_path / "x.onnx", "--stats", stats,
                       *FAST), "--stats")
    assert snapshot(tmp_path) == before


def test_external_data_of_the_model_is_an_input(tmp_path):
    model = wide_mlp()
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="small.onnx.data",
              size_threshold=0)
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32))
    before = snapshot(tmp_path)
    # small.onnx would be written with small.onnx.data beside it when large: refused
    one_line_error(cli("compress", tmp_path / "m.onnx", "--target-data", data, "-o", tmp_path / "small.onnx",
                       *FAST), "external data")
    assert snapshot(tmp_path) == before


def test_output_inside_the_sample_folder_is_refused(tmp_path):
    model, _ = mlp_task(tmp_path)
    folder = tmp_path / "samples"
    folder.mkdir()
    np.save(folder / "a.npy", np.random.default_rng(0).standard_normal((30, 8)).astype(np.float32))
    before = snapshot(tmp_path)
    one_line_error(cli("compress", model, "--target-data", folder, "-o", folder / "out.onnx", *FAST),
                   "--target-data", "inside")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ 3. output location checked first


def test_output_under_a_regular_file_fails_before_any_work(tmp_path, monkeypatch):
    model, data = mlp_task(tmp_path)
    (tmp_path / "afile").write_text("x")
    import onnxprune.api

    def no_work(*args, **kwargs):
        raise AssertionError("the compression ran before the output location was checked")

    monkeypatch.setattr(onnxprune.api, "run_pipeline", no_work)
    monkeypatch.setattr(onnxprune.api, "collect", no_work)
    one_line_error(cli("compress", model, "--target-data", data, "-o", tmp_path / "afile" / "out.onnx", *FAST),
                   "afile", "not a folder")
    one_line_error(cli("calibrate", model, "--target-data", data, "-o", tmp_path / "afile" / "s.npz", "-q"),
                   "afile", "not a folder")


@pytest.mark.parametrize("output", ["", "newdir/"])
def test_empty_or_folder_output_paths_are_refused(tmp_path, monkeypatch, output):
    model, data = mlp_task(tmp_path, n=40)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    one_line_error(cli("compress", model, "--target-data", data, "-o", output, *FAST), "output" if not output
                   else "folder")
    one_line_error(cli("calibrate", model, "--target-data", data, "-o", output, "-q"), "output" if not output
                   else "folder")
    assert snapshot(tmp_path) == before


def test_calibrate_for_momasp_needs_source_data(tmp_path):
    model, data = mlp_task(tmp_path, n=40)
    one_line_error(cli("calibrate", model, "--target-data", data, "--method", "momasp-j", "-o", tmp_path / "s.npz",
                       "-q"), "--source-data")
    assert not (tmp_path / "s.npz").exists()


# ------------------------------------------------------------------ 4. validate, incompatible inputs


def test_validate_models_with_incompatible_inputs(tmp_path):
    ref = conv_bn_relu()
    cand = conv_bn_relu()
    for dim in cand.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_value = 16
    for dim in cand.graph.output[0].type.tensor_type.shape.dim[2:]:
        dim.dim_value = 16
    save(ref, tmp_path / "ref.onnx")
    save(cand, tmp_path / "cand.onnx")
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(0).standard_normal((10, 3, 8, 8)).astype(np.float32))
    one_line_error(cli("validate", tmp_path / "ref.onnx", tmp_path / "cand.onnx", "--data", data, *FAST),
                   "input 'x'", "16")


# ------------------------------------------------------------------ 5 and 12. option values at parse time


@pytest.mark.parametrize("args, flag", [
    (["--ridge", "abc"], "--ridge"),
    (["--ridge", "-1"], "--ridge"),
    (["--keep", "1.5"], "--keep"),
    (["--keep", "0"], "--keep"),
    (["--min-agreement", "95"], "--min-agreement"),
    (["--max-drop", "-1"], "--max-drop"),
    (["--split", "1"], "--split"),
    (["--calib-size", "0"], "--calib-size"),
    (["--calib-size", "lots"], "--calib-size"),
    (["--seed", "-1"], "--seed"),
    (["--keep", "0.5", "--flops", "0.8", "--method", "spectral"], "--flops"),
    (["--rank", "4", "--keep", "0.3"], "--rank"),
    (["--method", "dalr", "--alpha", "0.9"], "--alpha"),
    (["--method", "spectral", "--ridge", "0.1"], "--ridge"),
    (["--method", "spectral", "--rank", "3"], "--rank"),
])
def test_bad_option_values_are_usage_errors_naming_the_flag(tmp_path, monkeypatch, args, flag):
    import onnxprune.api

    monkeypatch.setattr(onnxprune.api, "run_pipeline", lambda *a, **k: pytest.fail("ran before checking options"))
    model, data = mlp_task(tmp_path, n=40)
    result = cli("compress", model, "--target-data", data, "-o", tmp_path / "o.onnx", *args, *FAST)
    one_line_error(result, flag, code=2)
    assert not (tmp_path / "o.onnx").exists()


def test_negative_seed_in_a_recipe_file_is_a_user_error(tmp_path):
    model, data = mlp_task(tmp_path, n=40)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"passes": [{"name": "low-rank-split"}], "seed": -1}))
    one_line_error(cli("compress", model, "--target-data", data, "-o", tmp_path / "o.onnx", "--recipe", recipe,
                       *FAST), "seed")


def test_threshold_out_of_range_in_the_api_fails_before_any_work(tmp_path, monkeypatch):
    import onnxprune
    import onnxprune.api
    from onnxprune.errors import RecipeError
    from onnxprune.pipeline import Recipe

    monkeypatch.setattr(onnxprune.api, "run_pipeline", lambda *a, **k: pytest.fail("ran before checking"))
    model, data = mlp_task(tmp_path, n=40)
    with pytest.raises(RecipeError, match="min_agreement"):
        onnxprune.compress(model, data, recipe=Recipe(passes=(("low-rank-split", {}),)), min_agreement=95)


# ------------------------------------------------------------------ 14. unknown layer names


@pytest.mark.parametrize("method", ["dalr", "spectral"])
def test_unknown_layer_name_exits_1_listing_the_valid_ones(tmp_path, method):
    model = save(gemm_chain(), tmp_path / "chain.onnx")
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32))
    result = cli("compress", model, "--target-data", data, "-o", tmp_path / "o.onnx", "--method", method,
                 "--layers", "fc1,fc9", *FAST)
    message = one_line_error(result, "fc9", "fc2", "fc3")
    assert "'fc1'" not in message  # only the missing name is named as missing
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("passes, words", [
    ([{"name": "low-rank-split", "ranks": {"fc1": 2, "features.3": 2}}, {"name": "bias-compensate"}],
     ["low-rank-split ranks", "'features.3'", "fc2", "fc3"]),
    ([{"name": "select-nodes", "counts": {"blocks.0": 4}}, {"name": "reconstruct-next-layer"}],
     ["select-nodes counts", "'blocks.0'", "fc1"]),
])
def test_a_recipe_written_for_another_model_exits_1_naming_its_sites(tmp_path, passes, words):
    """A plan's recipe names its sites in ranks/counts: re-run on a model without them it said
    'no layer changed' and wrote the unchanged model (exit 0), as --layers does not."""
    model = save(gemm_chain(), tmp_path / "chain.onnx")
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32))
    recipe = tmp_path / "other.recipe.json"
    recipe.write_text(json.dumps({"passes": passes}))
    result = cli("compress", model, "--target-data", data, "-o", tmp_path / "o.onnx", "--recipe", recipe, *FAST)
    one_line_error(result, *words)
    assert not (tmp_path / "o.onnx").exists()


# ------------------------------------------------------------------ 9. exit 3 keeps the report


def test_missed_accuracy_check_prints_the_table_and_writes_a_failed_report(tmp_path):
    model, data = mlp_task(tmp_path, n=400)
    out = tmp_path / "out" / "tiny.onnx"
    result = cli("compress", model, "--target-data", data, "-o", out, "--rank", "1", "--min-agreement", "0.999",
                 "--no-latency")
    assert result.exit_code == 3, result.output + result.stderr
    assert "rank 1" in result.output and "agreement" in result.output  # the per-layer table and the verdict
    assert result.stderr.strip().startswith("error: ")
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.report.json"]
    report = json.loads((out.parent / "tiny.report.json").read_text())
    assert report["verdict"] == "failed" and "agreement" in report["failure"]
    assert report["layers"][0]["kept"].startswith("rank 1")
    # a model left by an earlier, passing run is named as not this run's
    assert cli("compress", model, "--target-data", data, "-o", out, "--keep", "0.9", *FAST).exit_code == 0
    result = cli("compress", model, "--target-data", data, "-o", out, "--rank", "1", "--min-agreement", "0.999",
                 "--no-latency")
    assert result.exit_code == 3 and "from an earlier run" in result.output
    assert json.loads((out.parent / "tiny.report.json").read_text())["not_from_this_run"] == [
        str(out), str(out.parent / "tiny.recipe.json")]


# ------------------------------------------------------------------ 7. statistics and held-out samples


def test_stats_gathered_on_the_evaluation_samples_are_refused(tmp_path):
    model, data = mlp_task(tmp_path, n=200)
    stats = tmp_path / "all.npz"
    result = cli("calibrate", model, "--target-data", data, "-o", stats, "--split", "1", "-q")
    assert result.exit_code == 0, result.output + result.stderr
    assert "target: 200 samples" in result.output
    out = tmp_path / "o.onnx"
    one_line_error(cli("compress", model, "--target-data", data, "-o", out, "--stats", stats, *FAST),
                   "all.npz", "held out")
    assert not out.exists()


def test_stats_with_the_same_split_calibrate_disjoint_samples_and_are_recorded(tmp_path):
    model, data = mlp_task(tmp_path, n=200)
    stats = tmp_path / "half.npz"
    result = cli("calibrate", model, "--target-data", data, "-o", stats, "-q")
    assert result.exit_code == 0, result.output + result.stderr
    assert "target: 100 samples" in result.output
    from onnxprune.calibration.stats import Statistics
    header = Statistics.load(stats).header
    assert len(header["sets"]["target"]["rows"]) == 100
    assert header["sets"]["target"]["path"] == str(data.resolve())
    out = tmp_path / "o.onnx"
    # a budget: without one, the file's recipe is checked against the default goal (exit 3 on this toy)
    result = cli("compress", model, "--target-data", data, "-o", out, "--stats", stats, "--keep", "0.25", *FAST)
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report["statistics"]["file"] == str(stats)
    assert report["calibration_runs"] == 0 and report["calibration"]["target"]["count"] == 100
    assert "rows" not in json.dumps(report["statistics"])
    assert "from " + str(stats) in result.output


def test_eval_data_that_is_the_target_data_is_refused(tmp_path):
    model, data = mlp_task(tmp_path, n=100)
    alias = tmp_path / "same.npz"
    alias.symlink_to(data)
    one_line_error(cli("compress", model, "--target-data", data, "--eval-data", alias, "-o", tmp_path / "o.onnx",
                       *FAST), "--target-data", "held out")


def test_eval_data_that_copies_the_target_data_is_refused_and_an_overlap_is_warned_of(tmp_path):
    """A copy of the target data under another name is found by content (it calibrated in full, so
    its accuracy would not be held out); evaluation samples of which only some are in the target
    data are a warning in the log and the report."""
    model, data = mlp_task(tmp_path, n=100)
    with np.load(data) as arrays:
        x, y = arrays["x"], arrays["y"]
    copy = tmp_path / "copy.npz"
    np.savez(copy, x=x[::-1], y=y[::-1])
    one_line_error(cli("compress", model, "--target-data", data, "--eval-data", copy, "-o", tmp_path / "o.onnx",
                       *FAST), f"{copy} | holds the same samples as --target-data", "100 of 100", "would not be held out")
    assert not (tmp_path / "o.onnx").exists()
    fresh = np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32)
    partly = tmp_path / "partly.npz"
    np.savez(partly, x=np.concatenate([fresh, x[:10]]), y=np.concatenate([np.zeros(40, y.dtype), y[:10]]))
    result = cli("compress", model, "--target-data", data, "--eval-data", partly, "-o", tmp_path / "o.onnx",
                 "--keep", "0.5", "--no-latency")
    assert result.exit_code == 0, result.output + result.stderr
    warning = "10 of the 50 evaluation samples"
    assert warning in result.stderr
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert any(w.startswith(warning) for w in report["warnings"])


def test_recipe_settings_over_a_recipe_file_apply_and_are_recorded(tmp_path):
    model, data = mlp_task(tmp_path, n=300)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"passes": [{"name": "low-rank-split", "keep": 0.5}], "split": 0.5}))
    out = tmp_path / "o.onnx"
    result = cli("compress", model, "--target-data", data, "-o", out, "--recipe", recipe, "--calib-size", "50",
                 "--split", "0.4", *FAST)
    assert result.exit_code == 0, result.output + result.stderr
    saved = json.loads((tmp_path / "o.recipe.json").read_text())
    assert saved["calib_size"] == 50 and saved["split"] == 0.4
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report["calibration"]["target"]["count"] == 50 and report["evaluation"]["count"] == 180
    # a method flag cannot silently lose to the recipe
    one_line_error(cli("compress", model, "--target-data", data, "-o", out, "--recipe", recipe, "--keep", "0.2",
                       *FAST), "--recipe", "--keep", code=2)


@pytest.mark.parametrize("flag", [["--conv-split", "spatial"], ["--allocation", "global"], ["--latency-batch", "4"],
                                  ["--objective", "params"], ["--margin", "2"], ["--check-extra", "0"],
                                  ["--no-correct-drift"]])
def test_method_and_planner_flags_with_a_recipe_file_are_usage_errors(tmp_path, flag):
    """The recipe file fixes them (its passes, or its plan table): they were ignored, exit 0."""
    model, data = mlp_task(tmp_path, n=100)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"passes": [{"name": "low-rank-split", "keep": 0.5}]}))
    one_line_error(cli("compress", model, "--target-data", data, "-o", tmp_path / "o.onnx", "--recipe", recipe,
                       *flag, *FAST), "--recipe", flag[0], code=2)
    assert not (tmp_path / "o.onnx").exists()


# ------------------------------------------------------------------ 15. default calibration size


def test_calibration_is_capped_by_default_and_says_so(tmp_path):
    model, data = mlp_task(tmp_path, n=2400)
    out = tmp_path / "o.onnx"
    result = cli("compress", model, "--target-data", data, "-o", out, "--keep", "0.5", "--no-latency")
    assert result.exit_code == 0, result.output + result.stderr
    assert "calibrated on 1,000 target samples" in result.output
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report["calibration"]["target"]["count"] == 1000 and report["recipe"]["calib_size"] == 1000
    result = cli("compress", model, "--target-data", data, "-o", out, "--keep", "0.5", "--calib-size", "all", *FAST)
    assert result.exit_code == 0, result.output + result.stderr
    assert "calibrated on 1,200 target samples" in result.output
    assert json.loads((tmp_path / "o.recipe.json").read_text())["calib_size"] == "all"


def test_capped_calibration_draws_from_every_class_of_a_sorted_set():
    from onnxprune.api import cap
    from onnxprune.data.samples import open_samples
    from onnxprune.model import input_specs

    specs = input_specs(wide_mlp())
    x = np.zeros((1000, 8), np.float32)
    y = np.repeat(np.arange(10), 100)  # stored sorted by class, like the CIFAR-10 file
    samples = open_samples({"x": x, "y": y}, specs)
    capped = cap(samples, 100, seed=0)
    assert len(capped) == 100 and len(np.unique(capped.labels)) == 10


# ------------------------------------------------------------------ 8. reference near chance


def test_reference_near_chance_is_warned(tmp_path, caplog):
    model, _ = mlp_task(tmp_path)
    x = np.random.default_rng(1).standard_normal((300, 8)).astype(np.float32)
    from tests.conftest import run_model
    pred = run_model(wide_mlp(), {"x": x})[0].argmax(axis=1)
    data = tmp_path / "wrong_labels.npz"
    np.savez(data, x=x, y=(pred + 1) % 3)  # labels the model never gets right: wrong data or preprocessing
    with caplog.at_level("WARNING"):
        result = cli("validate", model, model, "--data", data, "--no-latency", "--json")
    assert result.exit_code == 0, result.stderr
    assert "near chance" in caplog.text
    assert any("near chance" in w for w in json.loads(result.stdout)["warnings"])
    caplog.clear()
    np.savez(data, x=x, y=pred)
    with caplog.at_level("WARNING"):
        assert cli("validate", model, model, "--data", data, "--no-latency").exit_code == 0
    assert "near chance" not in caplog.text
    # labels of one class have no guessing to compare with: one sample the model gets wrong read
    # "0.0%, near chance (100.0% for 1 classes)"
    caplog.clear()
    np.savez(data, x=x[:1], y=(pred[:1] + 1) % 3)
    with caplog.at_level("WARNING"):
        assert cli("validate", model, model, "--data", data, "--no-latency").exit_code == 0
    assert "near chance" not in caplog.text


# ------------------------------------------------------------------ 8b. preprocessing that misreads the images

BUNDLED = Path(__file__).resolve().parents[1] / "models"
IMAGENET_FLAGS = "--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225"


def test_compress_names_the_normalisation_under_which_the_original_scores_far_better(tmp_path):
    """LeNet reads pixels / 255: on USPS given --mean 0.5 --std 0.5 it scores about 20 points less
    (not near chance, so nothing else would say so); compress warns, naming the flags, records the
    line in the report's warnings and keeps the preprocessing given. As documented: no hint."""
    args = ["compress", BUNDLED / "lenet_caffe_mnist.onnx", "--target-data", BUNDLED / "usps_test.npz",
            "--method", "svd", "--rank", "8", "--calib-size", "200", "--no-latency"]
    result = cli(*args, "--mean", "0.5", "--std", "0.5", "-o", tmp_path / "a.onnx")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "a.report.json").read_text())
    hint = [w for w in report["warnings"] if "check how the model expects its input" in w]
    assert len(hint) == 1 and "(--mean 0.5 --std 0.5), but" in hint[0] and "with no --mean/--std" in hint[0], hint
    assert hint[0] in " ".join(result.stderr.split())
    assert report["recipe"]["preprocess"]["mean"] == [0.5]
    result = cli(*args, "-o", tmp_path / "b.onnx")
    assert result.exit_code == 0 and "check how the model expects its input" not in result.stderr
    # validate says so too, of the samples it scores
    lenet, usps = BUNDLED / "lenet_caffe_mnist.onnx", BUNDLED / "usps_test.npz"
    result = cli("validate", lenet, lenet, "--data", usps, "--mean", "0.5", "--std", "0.5", "--no-latency", "--json")
    assert result.exit_code == 0, result.stderr
    assert any("of these samples as preprocessed (--mean 0.5 --std 0.5)" in w and "(validate keeps" in w
               for w in json.loads(result.stdout)["warnings"])
    result = cli("validate", lenet, lenet, "--data", usps, "--no-latency", "--json")
    assert not any("check how the model expects" in w for w in json.loads(result.stdout)["warnings"])


@pytest.mark.real
@pytest.mark.parametrize("model, data, documented, wrong, named", [
    ("resnet20_cifar10.onnx", "cifar10/cifar10_test_jpeg.npz", {"mean": (0.485, 0.456, 0.406),
                                                                  "std": (0.229, 0.224, 0.225)}, {}, IMAGENET_FLAGS),
    ("mobilenetv2_imagenet_fp32.onnx", "imagenet_samples",
     {"resize": 256, "center_crop": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
     {"resize": 256, "center_crop": 224}, IMAGENET_FLAGS),
    ("mnist_cnn_fc3136.onnx", "digits/usps_test.npz", {"mean": (0.5,), "std": (0.5,)}, {}, "--mean 0.5 --std 0.5"),
    ("mnist_extdata/mnist.onnx", "digits/mnist_test.npz", {"mean": (0.5,), "std": (0.5,)}, {},
     "--mean 0.5 --std 0.5"),
    ("lenet_caffe_mnist.onnx", "digits/mnist_m_test.npz", {}, None, None),
    ("lenet_caffe_mnist.onnx", "digits/usps_test.npz", {}, {"mean": (0.5,), "std": (0.5,)}, "no --mean/--std"),
])
def test_the_preprocessing_hint_on_the_real_models(shared, model, data, documented, wrong, named):
    """With the documented preprocessing (../shared/README.md) no other convention scores 10 points
    more on the label probe; with a wrong one the hint names the documented normalisation."""
    from onnxprune.api import judge_labels
    from onnxprune.data.preprocess import Preprocess
    from onnxprune.data.samples import open_samples
    from onnxprune.model import load_model
    from onnxprune.pipeline import Recipe

    original = load_model(shared / "models" / model)
    recipe = Recipe(passes=(("low-rank-split", {"method": "svd", "keep": 0.5}),))
    for preprocess, expected in ((documented, None), (wrong, named))[:1 if wrong is None else 2]:
        calib, held_out = open_samples(shared / "data" / data, original,
                                       preprocess=Preprocess(**preprocess)).split(0.5, seed=0)
        note, hint = judge_labels(original, calib, held_out, recipe)
        assert note is None
        if expected is None:
            assert hint is None, hint
        else:
            assert hint is not None and hint.endswith(f"with {expected}: check how the model expects its input "
                                                      "(compress keeps the preprocessing given)"), hint


# ------------------------------------------------------------------ 10. one schema for the layer table


def test_layer_rows_share_one_schema_and_the_report_ridge(tmp_path):
    model = save(gemm_chain(), tmp_path / "chain.onnx")
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32))
    out = tmp_path / "o.onnx"
    for extra in (["--method", "spectral", "--keep", "0.5"], ["--method", "dalr", "--keep", "0.5"]):
        result = cli("compress", model, "--target-data", data, "-o", out, *extra, "--no-latency")
        assert result.exit_code == 0, result.output + result.stderr
        report = json.loads((tmp_path / "o.report.json").read_text())
        rows = report["layers"]
        assert rows and all(set(r) == {"name", "op", "kept", "params_removed", "retained", "error", "note"}
                            for r in rows)
        v = report["validation"]
        assert sum(r["params_removed"] for r in rows) == v["params_reference"] - v["params_candidate"]
        header = result.output.splitlines()[0]
        assert "params removed" in header and "retained" in header and "energy" not in header
        for p in report["passes"]:
            for row in p.get("split", []):
                if isinstance(row.get("ridge"), float):
                    assert f"ridge {row['ridge']:.6g}" in result.output


# ------------------------------------------------------------------ 18. permissions


def test_outputs_get_the_same_normal_permissions(tmp_path):
    model, data = mlp_task(tmp_path, n=100)
    out = tmp_path / "o.onnx"
    assert cli("compress", model, "--target-data", data, "-o", out, "--keep", "0.5", *FAST).exit_code == 0
    stats = tmp_path / "s.npz"
    assert cli("calibrate", model, "--target-data", data, "-o", stats, "-q").exit_code == 0
    umask = os.umask(0)
    os.umask(umask)
    for path in (out, tmp_path / "o.report.json", tmp_path / "o.recipe.json", stats):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


# ------------------------------------------------------------------ 17. inspect and help


def test_inspect_prints_plain_text_and_takes_no_dead_options(tmp_path):
    from tests.graphs import depthwise

    model = save(depthwise(), tmp_path / "dw.onnx")
    result = cli("inspect", model)
    assert result.exit_code == 0, result.stderr
    assert "opset ai.onnx 13" in result.output and "{" not in result.output
    assert "1 prunable channel group\n" in result.output or "prunable channel groups" in result.output
    layers = result.output.split("layers (params, MACs per sample):")[1].split("\n\n")[0]
    assert "Clip" not in layers  # scalar bounds are not a layer's weights
    for dead in (["--device", "cpu"], ["--batch-size", "4"]):
        assert cli("inspect", model, *dead).exit_code == 2
    assert cli("inspect", model, "-q").output == result.output     # -q/-v, as every command: logging only


def test_help_shows_whole_command_descriptions():
    result = cli("--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for command in main.commands.values():
        assert command.short_help and " ".join(command.short_help.split()) in text  # whole, not cut
    for command in ("compress", "calibrate", "inspect", "validate"):
        text = cli(command, "--help").output
        options = [line for line in text.splitlines() if line.strip().startswith("--") and "--help" not in line]
        bare = [line for line in options if len(line.split("  ")) < 2 or not line.split("  ", 1)[1].strip()]
        assert not [b for b in bare if b.strip().split()[0] not in ("--grayscale", "--color")], (command, bare)


# ------------------------------------------------------------------ 6. integer samples, fp16 weights


def test_int64_samples_for_a_float_input_are_refused(tmp_path):
    model, _ = mlp_task(tmp_path, n=40)
    data = tmp_path / "ints.npy"
    np.save(data, np.arange(40 * 8, dtype=np.int64).reshape(40, 8))
    one_line_error(cli("compress", model, "--target-data", data, "-o", tmp_path / "o.onnx", *FAST),
                   "int64", "float32")


def test_fp16_weights_are_reported_as_skipped_not_a_crash(tmp_path):
    """Every weight stored as fp16 behind a Cast: each layer is skipped with its reason, and
    the run ends as "no layer changed" (it used to crash like item 1)."""
    model = wide_mlp()
    graph = model.graph
    for name in ("fc1.W", "fc2.W"):
        w = next(t for t in graph.initializer if t.name == name)
        graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(w).astype(np.float16), name + "16"))
        graph.node.insert(0, helper.make_node("Cast", [name + "16"], [name], to=TensorProto.FLOAT, name=name + ".cast"))
        graph.initializer.remove(w)
    onnx.checker.check_model(model)
    path = save(model, tmp_path / "half.onnx")
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(0).standard_normal((60, 8)).astype(np.float32))
    for method in ("dalr", "spectral"):
        result = cli("compress", path, "--target-data", data, "-o", tmp_path / "o.onnx", "--method", method,
                     "--keep", "0.5", "--no-latency")
        assert result.exit_code == 0, result.output + result.stderr
        assert "Traceback" not in result.output
        assert "no layer changed" in result.output
        assert ("weight is not an initializer" if method == "dalr" else "no layer or channel group") in result.output


# ------------------------------------------------------------------ 11. latency with its spread


def test_latency_reports_the_spread_and_warns_when_too_noisy(monkeypatch):
    import sys

    from onnxprune.data.samples import open_samples
    from onnxprune.model import input_specs
    from tests.graphs import wide_mlp as model_of

    validate_module = sys.modules["onnxprune.validation"]
    model = model_of()
    samples = open_samples({"x": np.zeros((8, 8), np.float32)}, input_specs(model))
    ticks = iter(np.cumsum(np.random.default_rng(0).choice([1e-3, 9e-3], size=10_000)))
    monkeypatch.setattr(validate_module.time, "perf_counter", lambda: float(next(ticks)))
    report = validate_module.validate(model, model, samples, latency_runs=20, latency_batch=4)
    spread = report.latency_ms["spread"]
    assert set(spread) == {"batch1", "batch4"}
    low, high = spread["batch1"]["speedup"]
    assert low < high and spread["batch1"]["runs"] == 20
    assert any("too noisy to conclude" in w for w in report.warnings)
    assert any("interquartile" in line for line in report.summary_lines())
    quiet = {"spread": {"batch1": {"runs": 10, "speedup": [1.48, 1.52]}}}
    assert validate_module.latency_warnings(quiet) == []
    slower = {"spread": {"batch1": {"runs": 10, "speedup": [1.02, 1.10]},
                         "batch32": {"runs": 10, "speedup": [0.89, 0.98]}}}
    (warning,) = validate_module.latency_warnings(slower)
    assert "slower than the original at batch32" in warning and "--objective latency" in warning


# ------------------------------------------------------------------ 2/3 siblings: finetune and coprune


@pytest.mark.parametrize("command", ["finetune", "coprune"])
def test_training_commands_refuse_outputs_over_inputs_before_any_work(tmp_path, command):
    pytest.importorskip("torch")
    model, data = mlp_task(tmp_path, n=40)
    alias = tmp_path / "alias.npz"
    os.link(data, alias)  # a hard link to the target data
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    if command == "finetune":
        args = ["finetune", model, "--teacher", model, "--target-data", data]
    else:
        args = ["coprune", "--source-model", model, "--target-model", model, "--source-data", data,
                "--target-data", data, "--keep", "0.5"]
    one_line_error(cli(*args, "-o", alias, "-q"), "is one of the inputs", "data.npz")
    one_line_error(cli(*args, "-o", tmp_path / "afile" / "o.onnx", "-q"), "not a folder")
    assert snapshot(tmp_path) == before
