"""api.py, the Python API behind each subcommand: compress, calibrate + compress --stats,
validate and inspect on in-memory models and arrays (the CLI tests cover files and exit codes)."""

from __future__ import annotations

import graphs
import numpy as np
import pytest

import onnxprune
from onnxprune.calibration.stats import Statistics
from onnxprune.errors import DataError, ValidationFailed
from onnxprune.pipeline import Recipe
from onnxprune.recipes import method_passes


def data(model, n=400):
    return graphs.feeds(model, batch=n, seed=0)["x"]


def test_compress_validates_on_the_held_out_part_and_never_touches_the_input(tmp_path):
    model = graphs.gemm_chain()
    before = model.SerializeToString()
    recipe = Recipe(passes=method_passes("spectral", fraction=0.5), calib_size=150)
    result = onnxprune.compress(model, data(model), recipe=recipe, output=tmp_path / "out.onnx", progress=False,
                                measure_latency=False)
    assert model.SerializeToString() == before
    report = result.report
    assert report["calibration"]["target"]["count"] == 150                 # split 0.5 of 400, capped at 150
    assert report["validation"]["samples"] == 200                          # the other half
    assert report["params_after"] < report["params_before"]
    assert result.output == tmp_path / "out.onnx" and result.output.is_file()
    written = Recipe.load(tmp_path / "out.recipe.json")
    assert written.build()[0].options == recipe.build()[0].options and written.calib_size == 150


def test_a_corrupt_held_out_image_fails_compress_before_calibration(tmp_path, monkeypatch):
    from PIL import Image

    from onnxprune import api
    from onnxprune.data.samples import open_samples

    model = graphs.conv_bn_relu()
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    recipe = Recipe(passes=(), plan={"max_drop": 1.0})
    _, held_out = open_samples(tmp_path, model).split(recipe.split, seed=recipe.seed)
    corrupt = tmp_path / f"{held_out.source_indices[-1]:02d}.png"      # read by nothing before validation
    corrupt.write_bytes(corrupt.read_bytes()[:-30])                     # truncated
    monkeypatch.setattr(api, "plan_recipe", lambda *a, **k: pytest.fail("planned before the check"))
    with pytest.raises(DataError) as excinfo:
        onnxprune.compress(model, tmp_path, recipe=recipe, progress=False, measure_latency=False)
    assert str(excinfo.value).startswith(f"{corrupt} | cannot be decoded as an image")


def test_a_text_file_for_a_model_that_takes_no_tokens_is_refused_without_asking_for_a_tokenizer(tmp_path):
    from onnxprune.api import as_samples

    model = graphs.gemm_chain()
    (tmp_path / "s.txt").write_text("a sentence\n")
    for preprocess in (None, {}):        # the Python API, and the CLI's flags (none given)
        with pytest.raises(DataError) as excinfo:
            as_samples(tmp_path / "s.txt", model, preprocess)
        assert "is a text file, but the model takes x" in str(excinfo.value)
        assert "--tokenizer" not in str(excinfo.value)                 # it could not feed this model


def test_too_few_calibration_samples_for_the_planner_name_calib_size(tmp_path):
    model = graphs.gemm_chain()
    recipe = Recipe(passes=(), plan={"max_drop": 1.0}, calib_size=3)        # --calib-size 3
    with pytest.raises(onnxprune.errors.RecipeError) as excinfo:
        onnxprune.compress(model, data(model), recipe=recipe, progress=False, measure_latency=False)
    assert "3 samples are too few to plan and check" in str(excinfo.value)
    assert "--calib-size" in str(excinfo.value)


def test_calibrate_then_compress_with_the_statistics(tmp_path):
    model = graphs.gemm_chain()
    x = data(model)
    recipe = Recipe(passes=method_passes("dalr-bc", rank=2), calib_size=None)
    stats = onnxprune.calibrate(model, x, recipe=recipe, output=tmp_path / "s.npz", progress=False)
    assert isinstance(stats, Statistics) and Statistics.load(tmp_path / "s.npz", model=model).sets() == ["target"]
    direct = onnxprune.compress(model, x, recipe=recipe, progress=False, measure_latency=False)
    reused = onnxprune.compress(model, x, recipe=recipe, stats=tmp_path / "s.npz", progress=False,
                                measure_latency=False)
    assert reused.report["calibration_runs"] == 0
    assert reused.model.SerializeToString() == direct.model.SerializeToString()


def test_validate_and_its_thresholds():
    model = graphs.gemm_chain()
    x = data(model, 64)
    same = onnxprune.validate(model, model, x, measure_latency=False)
    assert same.agreement == 1.0
    broken = graphs.gemm_chain(seed=7)
    with pytest.raises(ValidationFailed) as failed:
        onnxprune.validate(model, broken, x, measure_latency=False, min_agreement=0.999)
    assert failed.value.report["verdict"] == "failed" and failed.value.report["agreement"] < 0.999   # as compress's
    with pytest.raises(DataError):
        onnxprune.validate(model, model, np.zeros((4, 3), np.float32), measure_latency=False)


def test_a_model_onnxruntime_cannot_run_is_a_one_line_data_error_with_labels_too(tmp_path):
    """torch exports Conv2d(padding="same", dilation=2) with auto_pad SAME_UPPER, which onnxruntime
    loads but refuses to run: the first run of the original (the labels' check) says so as
    calibration would, not as an internal error.

    x [N,2,8,8] -> Conv (4, 3x3, dilation 2, auto_pad SAME_UPPER) -> ReduceMean (2, 3) -> Gemm fc (5x4) -> y
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("conv.W", (4, 2, 3, 3)), ("fc.W", (5, 4)))]
    nodes = [helper.make_node("Conv", ["x", "conv.W"], ["h"], name="conv", kernel_shape=[3, 3], dilations=[2, 2],
                              auto_pad="SAME_UPPER"),
             helper.make_node("ReduceMean", ["h"], ["p"], name="pool", axes=[2, 3], keepdims=0),
             helper.make_node("Gemm", ["p", "fc.W"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "same_dilated", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=graphs.IR_VERSION)
    samples = {"x": rng.standard_normal((40, 2, 8, 8)).astype(np.float32), "y": rng.integers(0, 5, 40)}
    with pytest.raises(DataError, match="onnxruntime failed running the model on these samples: .*Dilation"):
        onnxprune.compress(model, samples, recipe=Recipe(passes=method_passes("svd", rank=2)),
                           output=tmp_path / "out.onnx", progress=False, measure_latency=False)
    assert not list(tmp_path.iterdir())


def test_inspect_lists_sites_and_passes():
    info = onnxprune.inspect(graphs.gemm_chain())
    assert info["passes"] == ["bias-compensate", "correct-drift", "low-rank-split", "reconstruct-next-layer",
                              "select-nodes"]
    assert [g["name"] for g in info["channel_groups"] if g["prunable"]] == ["fc1", "fc2", "fc3"]
    assert {row["layer"] for row in info["low_rank"]} >= {"fc1", "fc2", "fc3", "fc4"}
    assert info["params"] > 0 and info["macs"] > 0


def test_inspect_says_what_loading_folded(tmp_path):
    """Loading folds a BatchNormalization into the Conv before it (and Constant nodes into
    initializers): inspect listed the ops without it and did not say where it went."""
    import onnx
    from click.testing import CliRunner

    from onnxprune.cli import main

    model = graphs.conv_bn_relu()
    assert "BatchNormalization" in {n.op_type for n in model.graph.node}
    path = tmp_path / "cbr.onnx"
    onnx.save(model, path)
    info = onnxprune.inspect(path)
    assert info["folded"] == {"BatchNormalization": 1} and "BatchNormalization" not in info["ops"]
    assert onnxprune.inspect(model)["folded"] == {}          # a ModelProto is taken as it is
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0 and "  folded BatchNormalization 1 (on loading" in result.output


def test_a_recipe_may_be_a_dict_or_a_file_and_bad_ones_are_recipe_errors(tmp_path):
    """recipe= takes what a recipe file holds; malformed passes and plans are RecipeErrors naming what is wrong."""
    from onnxprune.errors import RecipeError

    model = graphs.gemm_chain()
    x = data(model)
    as_dict = {"passes": [{"name": "select-nodes", "criterion": "spectral", "fraction": 0.5},
                          {"name": "reconstruct-next-layer"}], "calib_size": 150}
    (tmp_path / "r.json").write_text(__import__("json").dumps(as_dict))
    by_dict = onnxprune.compress(model, x, recipe=as_dict, progress=False, measure_latency=False)
    by_file = onnxprune.compress(model, x, recipe=tmp_path / "r.json", progress=False, measure_latency=False)
    assert by_dict.model.SerializeToString() == by_file.model.SerializeToString()
    named = Recipe(passes=(("low-rank-split", {"rank": 2}), "bias-compensate", {"name": "correct-drift"}))
    assert named.passes[1:] == (("bias-compensate", {}), ("correct-drift", {}))
    with pytest.raises(RecipeError, match="is not \\(name, options\\)"):
        Recipe(passes=(("low-rank-split", 0.5, 1),))
    with pytest.raises(RecipeError, match="unknown key\\(s\\) budgt"):
        Recipe(passes=(), plan={"budgt": 0.5})
    with pytest.raises(RecipeError, match="max_drop=200"):
        Recipe(passes=(), plan={"max_drop": 200})
    with pytest.raises(RecipeError, match="must be a Recipe, a dict or a recipe file's path"):
        onnxprune.compress(model, x, recipe=3, progress=False)
    assert onnxprune.ValidationFailed is ValidationFailed and issubclass(DataError, onnxprune.OnnxPruneError)


def test_arguments_of_the_wrong_kind_are_onnxprune_errors(tmp_path):
    """Not a bare TypeError/AttributeError deep inside: one line naming the argument."""
    import onnx

    from onnxprune.errors import ModelError, OnnxPruneError, RecipeError

    model = graphs.gemm_chain()
    x = data(model, 64)
    recipe = Recipe(passes=method_passes("spectral", fraction=0.5))
    for bad in (None, b"model", 3):
        with pytest.raises(ModelError, match="not a model"):
            onnxprune.compress(bad, x, recipe=recipe, progress=False)
    with pytest.raises(RecipeError, match="max_drop .* must be a finite number"):
        onnxprune.compress(model, x, recipe=recipe, max_drop="1", progress=False)
    with pytest.raises(RecipeError, match="unknown preprocess key 'meen'"):
        Recipe(passes=method_passes("spectral", fraction=0.5), preprocess={"meen": [0.5]})
    assert Recipe(passes=(), plan={"max_drop": 1, "families": "prune"}).plan["families"] == ["prune"]
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    unloaded = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    with pytest.raises(ModelError, match="external data file that was not loaded"):
        onnxprune.compress(unloaded, x, recipe=recipe, progress=False)
    assert issubclass(ModelError, OnnxPruneError)


def test_merge_stats_takes_one_path_alone(tmp_path):
    model = graphs.gemm_chain()
    recipe = Recipe(passes=method_passes("dalr-bc", rank=2), calib_size=None)
    onnxprune.calibrate(model, data(model), recipe=recipe, output=tmp_path / "one.npz", shard="1/1", progress=False)
    merged = onnxprune.merge_stats(tmp_path / "one.npz", tmp_path / "merged.npz")
    assert merged.header["merged_shards"]["count"] == 1


def test_documented_arguments_of_the_wrong_type_are_one_onnxprune_error(tmp_path):
    """Every documented argument of the wrong type or value is an OnnxPruneError naming it, raised before
    any work and before anything is written: not a TypeError, IndexError or AttributeError from inside."""
    from onnxprune import api
    from onnxprune.errors import CalibrationError, OutputError, RecipeError, UsageError
    from onnxprune.plan.recovery import RecoveryOptions

    model = graphs.gemm_chain()
    x = data(model, 64)
    recipe = Recipe(passes=method_passes("dalr-bc", rank=2))
    quiet = dict(progress=False, measure_latency=False)
    for output in (3, b"out.onnx"):
        with pytest.raises(OutputError, match="not an output path"):
            onnxprune.compress(model, x, recipe=recipe, output=output, **quiet)
    with pytest.raises(OutputError, match="is a NoneType, not an output path"):
        onnxprune.calibrate(model, x, recipe=recipe, output=None, progress=False)
    with pytest.raises(RecipeError, match="stats .*path of a statistics file"):
        onnxprune.compress(model, x, recipe=recipe, stats=3, **quiet)
    with pytest.raises(RecipeError, match="recovery .*RecoveryOptions, not a dict"):
        onnxprune.compress(model, x, recipe=recipe, recovery={"trials": 1}, **quiet)
    with pytest.raises(RecipeError, match="--finetune-margin"):
        RecoveryOptions(margin="1")
    # recovery options without finetune's max_drop search were ignored; the command line refuses them
    with pytest.raises(UsageError, match="recovery options apply only to finetune's search") as caught:
        onnxprune.compress(model, x, recipe=recipe, recovery=RecoveryOptions(trials=1), **quiet)
    assert caught.value.exit_code == 2 and not list(tmp_path.iterdir())
    for runs in ("3", 0):           # --latency-runs takes integers >= 1: a usage error (exit 2)
        with pytest.raises(UsageError, match="latency_runs must be an integer >= 1") as caught:
            onnxprune.compress(model, x, recipe=recipe, latency_runs=runs, progress=False)
        assert caught.value.exit_code == 2
        with pytest.raises(UsageError, match="latency_runs"):
            onnxprune.validate(model, model, x, latency_runs=runs)
    with pytest.raises(RecipeError, match="unknown preprocess key 'meen'"):
        onnxprune.validate(model, model, x, preprocess={"meen": [0.5]}, measure_latency=False)
    out = tmp_path / "s.npz"
    for shard in ((1,), 2):
        with pytest.raises(RecipeError, match="shard .*must be \\(i, n\\)"):
            onnxprune.calibrate(model, x, recipe=recipe, output=out, shard=shard, progress=False)
    with pytest.raises(RecipeError, match="split .*must be a number in \\(0, 1\\], not '0.5'"):
        onnxprune.calibrate(model, x, recipe=recipe, output=out, split="0.5", progress=False)
    with pytest.raises(RecipeError, match="threads .*integer >= 1"):
        onnxprune.calibrate(model, x, recipe=recipe, output=out, threads="2", progress=False)
    with pytest.raises(RecipeError, match="workers .*integer >= 1, not 'two'"):     # before any cluster starts
        onnxprune.calibrate(model, x, recipe=recipe, output=out, workers="two", progress=False)
    with pytest.raises(RecipeError, match="client .*distributed.Client, not a str"):
        onnxprune.calibrate(model, x, recipe=recipe, output=out, client="tcp://localhost:8786", progress=False)
    with pytest.raises(CalibrationError, match="paths of the shard files"):
        onnxprune.merge_stats(3, out)
    plan = Recipe(passes=(), plan={"max_drop": 1.0})
    for budgets in ("0.5", 0.5, ["a"]):
        with pytest.raises(RecipeError, match="budgets must be a list of numbers"):
            api.sweep(model, x, budgets, recipe=plan, output_dir=tmp_path / "sweep", **quiet)
    with pytest.raises(OutputError, match="not an output folder"):
        api.sweep(model, x, [0.5], recipe=plan, output_dir=None, **quiet)
    assert not list(tmp_path.iterdir())


def test_compress_refuses_a_finetune_that_is_not_a_train_config(capfd):
    """compress(finetune=16), as the command line's --finetune EPOCHS: a RecipeError naming TrainConfig.
    With progress=False the training draws no progress bar either (it drew one per epoch on stderr)."""
    pytest.importorskip("torch")
    from onnxprune.errors import RecipeError
    from onnxprune.train.distill import TrainConfig

    model = graphs.gemm_chain()
    for finetune in (16, {"epochs": 16}):
        with pytest.raises(RecipeError, match="finetune .*TrainConfig"):
            onnxprune.compress(model, data(model, 64), recipe=Recipe(passes=(), plan={"max_drop": 1.0}),
                               finetune=finetune, progress=False)
    capfd.readouterr()
    onnxprune.compress(model, data(model, 200), recipe=Recipe(passes=method_passes("spectral", fraction=0.5)),
                       finetune=TrainConfig(epochs=1), progress=False, measure_latency=False)
    out, err = capfd.readouterr()
    assert out == "" and "epoch" not in err


def test_sweep_names_its_models_alike_for_a_str_and_a_pathlib_model(tmp_path):
    """A pathlib.Path model wrote chain.onnx_macs80.onnx where its str wrote chain_macs80.onnx. sweep and
    sensitivity are exported beside the other commands' functions (onnxprune.sweep was an AttributeError)."""
    import onnx

    model = graphs.gemm_chain()
    onnx.save(model, tmp_path / "chain.onnx")
    assert {"sensitivity", "sweep"} <= set(onnxprune.__all__)
    for name, given in (("str", str(tmp_path / "chain.onnx")), ("path", tmp_path / "chain.onnx")):
        onnxprune.sweep(given, data(model, 300), [0.8], recipe=Recipe(passes=(), plan={"max_drop": 1.0}, calib_size=100),
                  output_dir=tmp_path / name, progress=False, measure_latency=False)
        assert (tmp_path / name / "chain_macs80.onnx").is_file(), sorted(p.name for p in (tmp_path / name).iterdir())


def test_statistics_with_samples_in_memory_warn_without_asking_to_recalibrate(tmp_path, caplog):
    """calibrate and compress --stats on arrays: the held-out check cannot match files, and the warning
    says so instead of telling the user to recalibrate with `onnxprune calibrate` (which they did)."""
    model = graphs.gemm_chain()
    x = data(model)
    recipe = Recipe(passes=method_passes("dalr-bc", rank=2))
    onnxprune.calibrate(model, x, recipe=recipe, output=tmp_path / "s.npz", progress=False)
    with caplog.at_level("WARNING", logger="onnxprune"):
        onnxprune.compress(model, x, recipe=recipe, stats=tmp_path / "s.npz", progress=False, measure_latency=False)
    held_out = [r.getMessage() for r in caplog.records if "held out" in r.getMessage()]
    assert held_out and "given in memory" in held_out[0] and "recalibrate" not in held_out[0]


def test_a_sample_set_opened_for_another_model_or_preprocessing_is_a_data_error():
    """A SampleSet is data as it was opened: for another model's inputs compress raised an internal error
    (KeyError in the calibration) and validate onnxruntime's ValueError; with a recipe's preprocessing it
    did not open with, that preprocessing was silently not applied."""
    from pathlib import Path

    import onnx

    from onnxprune.data.preprocess import Preprocess
    from onnxprune.data.samples import open_samples

    root = Path(__file__).resolve().parents[1]
    chain = graphs.gemm_chain()
    lenet = onnx.load(root / "models/lenet_caffe_mnist.onnx")
    digits = np.load(root / "models/usps_test.npz")["x"][:200]
    recipe = Recipe(passes=method_passes("dalr-bc", keep=0.5))
    for_chain = open_samples(data(chain, 200), chain)
    with pytest.raises(DataError, match="SampleSet opened for other model inputs .*the model takes data"):
        onnxprune.compress(lenet, for_chain, recipe=recipe, progress=False, measure_latency=False)
    with pytest.raises(DataError, match="SampleSet opened for other model inputs"):
        onnxprune.validate(lenet, lenet, for_chain, measure_latency=False)
    plain = open_samples(digits, lenet)
    normalised = Recipe(passes=method_passes("dalr-bc", keep=0.5), preprocess={"mean": [0.5], "std": [0.5]})
    with pytest.raises(DataError, match="SampleSet opened with its own preprocessing"):
        onnxprune.compress(lenet, plain, recipe=normalised, progress=False, measure_latency=False)
    opened = open_samples(digits, lenet, preprocess=Preprocess(mean=(0.5,), std=(0.5,)))
    by_set = onnxprune.compress(lenet, opened, recipe=normalised, progress=False, measure_latency=False)
    by_array = onnxprune.compress(lenet, digits, recipe=normalised, progress=False, measure_latency=False)
    assert by_set.model.SerializeToString() == by_array.model.SerializeToString()


def test_source_data_a_recipe_does_not_read_and_a_planner_recipe_for_calibrate_are_refused(tmp_path):
    """compress/calibrate(source_data=...) with a target-only recipe opened the source samples and listed
    them as calibrating ("calibration": target, source) though nothing read them: the command line's usage
    error (exit 2). calibrate with a planner recipe said "no compressible layer" of a model that has some."""
    from onnxprune.errors import RecipeError, UsageError

    model = graphs.gemm_chain()
    x, other = data(model, 200), graphs.feeds(model, batch=200, seed=3)["x"]
    for recipe in (Recipe(passes=method_passes("spectral", fraction=0.5)), Recipe(passes=(), plan={"budget": 0.6})):
        with pytest.raises(UsageError, match="source_data applies to recipes that read both domains") as caught:
            onnxprune.compress(model, x, recipe=recipe, source_data=other, progress=False, measure_latency=False)
        assert caught.value.exit_code == 2
    with pytest.raises(UsageError, match="source_data applies"):
        onnxprune.calibrate(model, x, recipe=Recipe(passes=method_passes("spectral", fraction=0.5)),
                            source_data=other, output=tmp_path / "s.npz", progress=False)
    momasp = Recipe(passes=method_passes("momasp-J", fraction=0.5))
    assert "source" in onnxprune.compress(model, x, recipe=momasp, source_data=other, progress=False,
                                          measure_latency=False).report["calibration"]
    with pytest.raises(RecipeError, match="is a planner recipe") as caught:
        onnxprune.calibrate(model, x, recipe=Recipe(passes=(), plan={"max_drop": 1.0}), output=tmp_path / "s.npz",
                            progress=False)
    assert "no compressible layer" not in str(caught.value) and not list(tmp_path.iterdir())


def test_a_recipe_path_that_is_a_model_or_a_folder_is_a_recipe_error(tmp_path):
    """recipe= (or --recipe) naming the model or an .npz, arguments swapped: a UnicodeDecodeError (exit 4 on
    the command line) before; a folder read "no such recipe file"."""
    import onnx

    from onnxprune.errors import RecipeError

    model = graphs.gemm_chain()
    np.savez(tmp_path / "x.npz", x=data(model, 64))
    onnx.save(model, tmp_path / "m.onnx")
    for path in (tmp_path / "x.npz", tmp_path / "m.onnx"):
        with pytest.raises(RecipeError, match="is not a text file, so not a recipe") as caught:
            onnxprune.compress(model, tmp_path / "x.npz", recipe=path, progress=False)
        assert caught.value.exit_code == 1
    with pytest.raises(RecipeError, match="is a directory, not a file"):
        onnxprune.compress(model, tmp_path / "x.npz", recipe=tmp_path, progress=False)


def test_numpy_scalars_in_a_recipe_run_and_are_written_as_numbers(tmp_path):
    """Recipe(split=np.float32(0.5)) or an option np.float32(0.5) ran the whole compression, then failed
    writing OUT.recipe.json (TypeError: float32 is not JSON serializable); seed=np.int64(3) read "must be an
    integer >= 0"."""
    import json

    model = graphs.gemm_chain()
    x = data(model, 200)
    recipe = Recipe(passes=(("low-rank-split", {"keep": np.float32(0.5)}),), split=np.float32(0.5),
                    seed=np.int64(3), calib_size=np.int32(100))
    result = onnxprune.compress(model, x, recipe=recipe, output=tmp_path / "o.onnx", progress=False,
                                measure_latency=False)
    written = json.loads((tmp_path / "o.recipe.json").read_text())
    assert written["split"] == 0.5 and written["seed"] == 3 and written["passes"][0]["keep"] == 0.5
    assert json.dumps(result.report["recipe"]) and Recipe.load(tmp_path / "o.recipe.json").seed == 3


def test_the_packages_names_are_the_public_functions_whatever_was_imported_first():
    """``import onnxprune`` loads the API on first use; a submodule imported first does not take a public
    name (the module onnxprune/validate.py, once imported, was ``onnxprune.validate`` until the API bound it)."""
    import subprocess
    import sys

    code = ("import inspect, onnxprune, onnxprune.validation, onnxprune.cli; "
            "print(sorted(n for n in onnxprune.__all__[1:] if inspect.ismodule(getattr(onnxprune, n))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout
    assert callable(onnxprune.validate) and callable(onnxprune.compress)
