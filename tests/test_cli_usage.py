"""Bad flag values and combinations: exit 2 (usage) naming the flag, exit 1 for a bad file
(also a directory where a file belongs, a malformed recipe), 130 after Ctrl-C; no output in
any case. The README's "Exit codes (every command)" table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import click
import pytest
from click.testing import CliRunner

from onnxprune.cli import main, plan_lines
from onnxprune.errors import RecipeError
from onnxprune.passes.low_rank_split import LowRankOptions
from onnxprune.passes.select_nodes import SelectOptions
from onnxprune.recipes import OptionConflict, build_recipe

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "lenet_caffe_mnist.onnx"
DATA = ROOT / "models" / "usps_test.npz"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_usage_error(result, *words):
    """Exit 2, click's usage message naming ``words`` (the flag), no traceback: also for a usage error
    found past parsing (``onnxprune.errors.UsageError``), as the README's exit-code table says."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    assert "Traceback" not in result.output + result.stderr and "internal error" not in result.stderr
    assert result.stderr.startswith("Usage: ") and result.stderr.strip().splitlines()[-1].startswith("Error: "), \
        result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


def assert_one_line_error(result, *words, code=1):
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    message = result.stderr.strip()
    assert message.startswith("error: ") and len(message.splitlines()) == 1, message
    for word in words:
        assert word in message, (word, message)


def compress(tmp_path, *args):
    return cli("compress", MODEL, "--target-data", DATA, "-o", tmp_path / "o.onnx", "--no-latency", "-q", *args)


TRAIN = ("--target-data", DATA, "-o", "OUT")
COPRUNE = ("coprune", "--source-model", MODEL, "--target-model", MODEL, "--source-data", DATA, "--target-data", DATA,
           "-o", "OUT")


@pytest.mark.parametrize("args, flag", [
    (("finetune", MODEL, *TRAIN, "--split", "1.5"), "--split"),
    (("finetune", MODEL, *TRAIN, "--val-fraction", "1.5"), "--val-fraction"),
    (("finetune", MODEL, *TRAIN, "--lr", "0"), "--lr"),
    (("finetune", MODEL, *TRAIN, "--temperature", "0"), "--temperature"),
    (("finetune", MODEL, *TRAIN, "--max-drop", "-5"), "--max-drop"),
    (("finetune", MODEL, *TRAIN, "--min-agreement", "95"), "--min-agreement"),
    (("finetune", MODEL, *TRAIN, "--max-minutes", "-1"), "--max-minutes"),
    (("finetune", MODEL, *TRAIN, "--epochs", "0"), "--epochs"),      # would write the student untrained
    ((*COPRUNE, "--keep", "1.5"), "--keep"),
    ((*COPRUNE, "--keep", "0.5", "--alpha", "0.7,2"), "--alpha"),
    # nan compares false with every bound and inf passes a range open above: both refused, naming the flag
    (("finetune", MODEL, *TRAIN, "--lr", "nan"), "--lr"),
    (("finetune", MODEL, *TRAIN, "--lr", "inf"), "--lr"),
    (("finetune", MODEL, *TRAIN, "--temperature", "nan"), "--temperature"),
    (("finetune", MODEL, *TRAIN, "--temperature", "inf"), "--temperature"),
    (("finetune", MODEL, *TRAIN, "--label-weight", "nan"), "--label-weight"),
    (("finetune", MODEL, *TRAIN, "--label-weight", "inf"), "--label-weight"),
    (("finetune", MODEL, *TRAIN, "--feature-weight", "nan"), "--feature-weight"),
    (("finetune", MODEL, *TRAIN, "--max-minutes", "nan"), "--max-minutes"),
    (("finetune", MODEL, *TRAIN, "--val-fraction", "nan"), "--val-fraction"),
    (("finetune", MODEL, *TRAIN, "--max-drop", "nan"), "--max-drop"),
    (("compress", MODEL, *TRAIN, "--finetune", "1", "--lr", "nan"), "--lr"),
    ((*COPRUNE, "--keep", "0.5", "--lr", "nan"), "--lr"),
    ((*COPRUNE, "--keep", "nan"), "--keep"),
    ((*COPRUNE, "--keep", "0.5", "--alpha", "nan"), "--alpha"),
    ((*COPRUNE, "--keep", "0.5", "--layer-keep", "conv1_w=0"), "--layer-keep"),
    ((*COPRUNE, "--keep", "0.5", "--layer-keep", "conv1_w"), "--layer-keep"),
    (("sensitivity", MODEL, *TRAIN, "--seed", "-1"), "--seed"),
    (("sweep", MODEL, *TRAIN, "--flops", "0.5", "--split", "1.5"), "--split"),
    (("sweep", MODEL, *TRAIN, "--flops", "0.5", "--split", "0"), "--split"),
    (("sweep", MODEL, *TRAIN, "--flops", "0.5,1.2"), "--flops"),
    (("calibrate", MODEL, *TRAIN, "--shard", "0/3"), "--shard"),
    (("compress", MODEL, *TRAIN, "--split", "0"), "--split"),
    (("compress", MODEL, *TRAIN, "--std", "0"), "--std"),
    (("compress", MODEL, *TRAIN, "--std", "0.5,abc"), "--std"),
    (("compress", MODEL, *TRAIN, "--resize", "0"), "--resize"),
    (("compress", MODEL, *TRAIN, "--center-crop", "2x3x4"), "--center-crop"),
    (("compress", MODEL, *TRAIN, "--scale", "0"), "--scale"),
    (("compress", MODEL, *TRAIN, "--latency-runs", "0"), "--latency-runs"),
    (("validate", MODEL, MODEL, "--data", DATA, "--mean", "x"), "--mean"),
    (("validate", MODEL, MODEL, "--data", DATA, "--mean", "nan"), "--mean"),     # was exit 1, as preprocess.mean
    (("compress", MODEL, *TRAIN, "--mean", "0.5,inf"), "--mean"),
])
def test_a_value_out_of_range_is_a_usage_error_naming_the_flag(tmp_path, args, flag):
    out = tmp_path / "out"
    result = cli(*[out if a == "OUT" else a for a in args])
    assert_usage_error(result, f"'{flag}'")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("budgets", [(), ("--flops", "0.5", "--keep", "0.5")])
def test_sweep_needs_exactly_one_list_of_budgets(tmp_path, budgets):
    result = cli("sweep", MODEL, "--target-data", DATA, "-o", tmp_path / "sweep", *budgets)
    assert_usage_error(result, "give one list of budgets: --flops")
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("command", [("sensitivity", "-o", "s.json"), ("sweep", "--flops", "0.5", "-o", "sweep")])
def test_sensitivity_and_sweep_refuse_a_conv_split_with_a_pruning_criterion(tmp_path, command):
    """As compress does: the spectral plan splits nothing, so --conv-split did nothing (exit 0)."""
    name, *rest = command
    result = cli(name, MODEL, "--target-data", DATA, "--method", "spectral", "--conv-split", "spatial",
                 *[tmp_path / a if a in ("s.json", "sweep") else a for a in rest])
    assert_usage_error(result, "--conv-split applies to low rank (svd, svd-bc, dalr, dalr-bc), not --method spectral")
    assert not list(tmp_path.iterdir())


def test_budget_lists_take_a_trailing_comma_and_refuse_holes():
    from onnxprune.cli import BUDGETS

    assert BUDGETS.convert("0.9,0.8,", None, None) == (0.9, 0.8)
    for bad in ("0.5,,0.3", ",", ""):
        with pytest.raises(click.exceptions.BadParameter, match="is not a list of numbers"):
            BUDGETS.convert(bad, None, None)


def test_mean_and_std_of_different_lengths_are_a_usage_error(tmp_path):
    assert_usage_error(compress(tmp_path, "--mean", "0.5,0.5", "--std", "0.5"), "--mean has 2 values but --std has 1")


def test_an_objective_that_contradicts_the_budget_is_a_usage_error(tmp_path):
    """--flops is a budget of MACs: --objective params cannot be what it meets."""
    assert_usage_error(compress(tmp_path, "--objective", "params", "--flops", "0.5"),
                       "--objective params contradicts --flops")
    assert_usage_error(cli("sweep", MODEL, "--target-data", DATA, "-o", tmp_path / "s", "--keep", "0.5",
                           "--objective", "macs"), "--objective macs contradicts --keep")


def test_a_directory_where_a_file_belongs_is_a_user_error(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    assert_one_line_error(cli("compress", folder, "--target-data", DATA, "-o", tmp_path / "o.onnx"),
                          f"error: {folder} | is a directory", "MODEL")
    assert_one_line_error(cli("compress", MODEL, "--target-data", DATA, "-o", folder),
                          f"error: {folder} | is a directory", "--output")
    assert_one_line_error(cli("inspect", folder), "is a directory")
    assert list(tmp_path.iterdir()) == [folder] and not list(folder.iterdir())


@pytest.mark.parametrize("planner_flag", [("--margin", "2"), ("--check-extra", "10"), ("--no-correct-drift",),
                                          ("--correct-drift",), ("--objective", "params")])
@pytest.mark.parametrize("fixed", [("--rank", "5"), ("--allocation", "global", "--keep", "0.5"),
                                   ("--method", "svd", "--keep", "0.5", "--latency-aware-splits")])
def test_planner_flags_with_a_fixed_recipe_are_usage_errors(tmp_path, planner_flag, fixed):
    result = compress(tmp_path, *fixed, *planner_flag)
    assert_usage_error(result, f"{planner_flag[0]} applies only to planning", "makes compress run one fixed recipe")
    assert not list(tmp_path.iterdir())


def options(**given):
    base = dict(method="auto", seed=0, calib_size=100, split=0.5, batch_size=32, allocation="plan")
    return {**base, **given}


def test_planner_flags_still_reach_the_plan_where_it_plans():
    for goal in ({}, {"keep": 0.5}, {"max_drop": 2.0}):
        margin = {} if "keep" in goal else {"margin": 2.0}
        plan = build_recipe(options(check_extra=10, correct_drift=False, objective=None, **margin, **goal), {}).plan
        assert (plan["margin"], plan["check_extra"], plan["drift"]) == (margin.get("margin", 1.0), 10, False), plan
    flag = lambda k: "--" + k.replace("_", "-")    # noqa: E731
    with pytest.raises(OptionConflict, match="--margin applies only to planning, and --rank"):
        build_recipe(options(rank=5, margin=2.0), {}, flag=flag)
    # the reserve is the --max-drop search's: a budget has no use for it
    with pytest.raises(OptionConflict, match="--margin applies only to the search for the smallest model"):
        build_recipe(options(keep=0.5, margin=2.0), {}, flag=flag)


def test_finetune_search_flags_need_the_max_drop_search(tmp_path):
    """--finetune-trials/-margin/-refit steer the search of --finetune with --max-drop: with a
    budget there is no search, so they are refused (before torch is needed)."""
    result = compress(tmp_path, "--keep", "0.5", "--finetune", "1", "--finetune-margin", "1", "--finetune-trials", "2")
    assert_usage_error(result, "--finetune-trials, --finetune-margin apply only to --finetune's search")
    assert not list(tmp_path.iterdir())


def test_finetune_with_saved_statistics_is_a_usage_error(tmp_path):
    """--finetune sets its checkpoint fold aside from the calibration part before calibrating, so the samples
    of a statistics file never are this run's: refused before the file is read (it was refused after the
    statistics were loaded, with a hint to repeat calibrate's --split/--seed/--calib-size, which cannot help)."""
    stats = tmp_path / "stats.npz"
    stats.write_bytes(b"not read")
    result = compress(tmp_path, "--stats", stats, "--finetune", "1")
    assert_usage_error(result, "--stats cannot be combined with --finetune")
    assert sorted(tmp_path.iterdir()) == [stats]


def test_compress_help_names_no_option_it_lacks():
    """compress shares finetune's training options, but its teacher is always the original: its help must not
    point at a --teacher flag it does not have (--label-weight said "1 without --teacher")."""
    result = cli("compress", "--help")
    assert result.exit_code == 0 and "--label-weight" in result.output
    assert "--teacher" not in result.output
    assert "(1 without --teacher)" in " ".join(cli("finetune", "--help").output.split())


def test_compress_latency_runs_reaches_validation(tmp_path):
    data = tmp_path / "few.npz"
    with np.load(DATA) as full:
        np.savez(data, x=full["x"][:64], y=full["y"][:64])
    out = tmp_path / "o.onnx"
    result = cli("compress", MODEL, "--target-data", data, "-o", out, "--method", "svd", "--rank", "8",
                 "--latency-runs", "3", "--calib-size", "32", "-q")
    assert result.exit_code == 0, result.stderr
    spread = json.loads(out.with_suffix(".report.json").read_text())["validation"]["latency_ms"]["spread"]
    assert spread and {row["runs"] for row in spread.values()} == {3}


@pytest.mark.parametrize("text, words", [
    ("[1, 2, 3]", ("recipe.json | top level must be a table/object",)),
    ('{"passes": [{"name": "select-nodes", "keep": "half"}, {"name": "reconstruct-next-layer"}]}',
     ("select-nodes | keep must be a number, got 'half'",)),
    ('{"passes": [{"name": "select-nodes", "keep": true}, {"name": "reconstruct-next-layer"}]}',
     ("select-nodes | keep must be a number, got True",)),
    ('{"passes": [{"name": "low-rank-split", "rank": 2.5}]}', ("low-rank-split | rank must be an integer",)),
])
def test_a_malformed_recipe_is_one_line_naming_the_key(tmp_path, text, words):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(text)
    assert_one_line_error(compress(tmp_path, "--recipe", recipe), *words)
    assert list(tmp_path.iterdir()) == [recipe]


def test_pass_options_check_their_types():
    """One shared check, from the annotations: a bool is no number, a list is a tuple."""
    assert SelectOptions(keep=1, groups=["a"]).groups == ("a",)
    assert LowRankOptions(rank=np.int64(3), ridge="auto").rank == 3
    with pytest.raises(RecipeError, match="latency must be true or false, got 1"):
        LowRankOptions(latency=1)
    with pytest.raises(RecipeError, match="ridge must be a number or a string, got None"):
        LowRankOptions(ridge=None)


def test_ctrl_c_exits_130_with_one_line(monkeypatch):
    from onnxprune import api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "inspect", interrupted)
    result = cli("inspect", MODEL)
    assert result.exit_code == 130 and result.stderr.strip() == "interrupted", (result.exit_code, result.stderr)


def test_ctrl_c_while_the_command_line_loads_exits_130_with_one_line(monkeypatch, capsys):
    """The `onnxprune` script's entry point loads the command line (onnx, onnxruntime: seconds) where a Ctrl-C
    is caught: it printed a KeyboardInterrupt traceback of the imports. `import onnxprune` loads neither."""
    import subprocess
    import sys

    from onnxprune import launch

    class Interrupting:
        def find_spec(self, name, path=None, target=None):
            if name == "onnxprune.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "onnxprune.cli")
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    with pytest.raises(SystemExit) as exit_info:
        launch.main()
    assert exit_info.value.code == 130 and capsys.readouterr().err == "interrupted\n"
    loaded = subprocess.run([sys.executable, "-c", "import sys, onnxprune; print(sorted({'onnx', 'onnxruntime', "
                             "'numpy'} & set(sys.modules)))"], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_not_planned_rows_name_the_form_of_a_conv_offered_twice():
    """A k x k Conv is two planner sites (spatial and channel form): each row says which."""
    import onnx

    from onnxprune.plan.planner import Costs, PlanOptions, find_sites

    model = onnx.load(str(MODEL))
    _, skipped = find_sites(model, PlanOptions(min_share=1.0, families=("low-rank",)), Costs(model, "params"))
    rows = [row for row in skipped if row["site"] == "conv1"]
    assert sorted(row["form"] for row in rows) == ["channel", "spatial"]
    assert "form" not in next(row for row in skipped if row["site"] == "ip1")
    plan = {"goal": {"budget": 0.5}, "objective": "params", "check": {"drop": 0.1, "se": 0.1}, "sites": [], "cost": 0.5,
            "sites_considered": 0, "step": 0, "steps": 0, "calibration_samples": 10, "skipped": rows + skipped[:1]}
    lines = plan_lines({"plan": plan})
    assert any(line.startswith("  not planned: conv1 (low-rank, spatial): saves at most") for line in lines), lines
    assert any(line.startswith("  not planned: conv1 (low-rank, channel): saves at most") for line in lines), lines


def test_sites_not_planned_share_a_line_per_reason_and_only_the_first_few_show_without_verbose():
    """MobileNetV2 has 23 sites the planner cannot touch, MiniLM 24 with reasons of 600 characters:
    without -v a few shortened lines and a count of the rest, with -v every reason in full."""
    from onnxprune.cli import SKIPPED_SHOWN, SKIPPED_WIDTH

    rows = [{"site": f"MatMul_{i}", "family": "low-rank", "reason": "weight is not an initializer"} for i in range(3)]
    rows += [{"site": f"Conv_{i}", "family": "low-rank", "reason": f"grouped/depthwise Conv (group={i})"} for i in range(8)]
    rows += [{"site": "Gemm_9", "family": "prune", "reason": "x" * 600}]
    plan = {"goal": {"budget": 0.5}, "objective": "macs", "check": {"drop": 0.1, "se": 0.1}, "sites": [], "cost": 0.5,
            "sites_considered": 0, "step": 0, "steps": 0, "calibration_samples": 10, "skipped": rows}
    full = [line for line in plan_lines({"plan": plan}, verbose=1) if "not planned" in line]
    assert len(full) == 10, full            # the three sites with one reason share a line
    assert full[0] == "  not planned: MatMul_0, MatMul_1, MatMul_2 (low-rank): weight is not an initializer"
    assert full[-1].endswith("x" * 600)
    short = [line for line in plan_lines({"plan": plan}) if "not planned" in line]
    assert short[:SKIPPED_SHOWN] == full[:SKIPPED_SHOWN]
    assert len(short) == SKIPPED_SHOWN + 1 and all(len(line) <= SKIPPED_WIDTH for line in short[:-1])
    assert short[-1].startswith("  ... and 6 more sites not planned (-v"), short[-1]
    few = {**plan, "skipped": rows[:3] + rows[-1:]}      # two lines: all shown, the long one cut
    lines = [line for line in plan_lines({"plan": few}) if "not planned" in line]
    assert len(lines) == 2 and lines[1].endswith("...") and len(lines[1]) == SKIPPED_WIDTH


def test_the_plan_check_of_an_output_without_class_scores_names_what_it_measured():
    """A dense map (a segmentation head's N x C x H x W) or a regression value is checked by 100 x its
    relative squared error (planner.measure: no agreement), and the line says so, not "agreement drop"."""
    plan = {"goal": {"max_drop": 1.0}, "objective": "macs", "sites": [], "cost": 0.5, "sites_considered": 0,
            "step": 0, "steps": 0, "calibration_samples": 10, "skipped": [], "output_kind": "classes"}
    dense = {"drop": 0.95, "se": 0.0, "agreement": None, "accuracy_reference": None, "kl": None}
    line = next(line for line in plan_lines({"plan": {**plan, "check": dense}}) if line.startswith("plan check"))
    assert "): 100 x relative squared error 0.95 +- 0.00 points;" in line, line
    scores = {**dense, "agreement": 0.99}
    line = next(line for line in plan_lines({"plan": {**plan, "check": scores}}) if line.startswith("plan check"))
    assert "): agreement drop 0.95 +- 0.00 points;" in line, line


@pytest.mark.parametrize("fixed, words", [
    (("--allocation", "global"), ("--allocation global makes compress run one fixed recipe (dalr-bc), which needs a "
                                  "size: give one of --keep",)),
    (("--method", "dalr-bc", "--mode", "sequential"), ("--mode makes compress run one fixed recipe",)),
    (("--method", "spectral", "--no-reconstruct"), ("fixed recipe (spectral), which needs a size", "--alpha")),
])
def test_a_fixed_recipe_without_a_size_is_a_usage_error(tmp_path, fixed, words):
    """No hidden default budget: a fixed recipe is told how much to keep (pfa-kl has its own rule)."""
    assert_usage_error(compress(tmp_path, *fixed), *words)
    assert not list(tmp_path.iterdir())
    assert build_recipe(options(method="pfa-kl", allocation="global"), {}).passes[0][1]["criterion"] == "pfa-kl"


@pytest.mark.parametrize("flags, words", [
    (("--method", "spectral", "--tau", "0.9"), "--tau applies to --method pfa-en, not spectral"),
    (("--method", "pfa-en", "--alpha", "0.9"), "--alpha applies to --method spectral, momasp-J, momasp-j, not pfa-en"),
    (("--method", "spectral", "--alpha", "0.9", "--lam", "0.5"), "--lam applies to --method momasp-J, momasp-j, not"),
])
def test_an_option_the_criterion_does_not_read_is_a_usage_error(tmp_path, flags, words):
    assert_usage_error(compress(tmp_path, *flags), words)


def test_objective_latency_with_a_budget_or_the_spatial_form_is_a_usage_error(tmp_path):
    assert_usage_error(compress(tmp_path, "--objective", "latency", "--flops", "0.5"),
                       "--objective latency takes no budget", "drop --flops for the fastest model")
    assert_usage_error(compress(tmp_path, "--objective", "latency", "--conv-split", "spatial"),
                       "--objective latency times the channel form")


@pytest.mark.parametrize("planner_flag", [("--margin", "1"), ("--check-extra", "10"), ("--no-correct-drift",)])
def test_planner_flags_with_stats_and_no_method_flags_are_usage_errors(tmp_path, planner_flag):
    stats = tmp_path / "stats.npz"
    assert cli("calibrate", MODEL, "--target-data", DATA, "-o", stats, "--calib-size", "64", "-q").exit_code == 0
    result = compress(tmp_path, "--stats", stats, *planner_flag)
    assert_usage_error(result, f"{planner_flag[0]} applies only to planning, and --stats")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.npz"]


def test_validate_refuses_labels_outside_the_models_classes(tmp_path):
    data = tmp_path / "bad.npz"
    with np.load(DATA) as full:
        np.savez(data, x=full["x"][:40], y=full["y"][:40] % 10 + 5)
    assert_one_line_error(cli("validate", MODEL, MODEL, "--data", data, "--no-latency"),
                          "has labels 5..14, but the model answers with 10 classes")


@pytest.mark.parametrize("args, words", [
    (("finetune", MODEL, *TRAIN, "--feature-weight", "1"), ("--feature-weight needs --teacher",)),
    (("finetune", MODEL, *TRAIN, "--train-layers", "rewritten"), ("--train-layers rewritten needs --teacher",)),
    (("finetune", MODEL, *TRAIN, "--label-weight", "0"), ("--label-weight 0 needs --teacher",)),
    (("finetune", MODEL, *TRAIN, "--teacher", MODEL, "--checkpoint", "last", "--patience", "3"),
     ("--patience stops training early", "--checkpoint last")),
    (("compress", MODEL, *TRAIN, "--finetune", "1", "--patience", "3"), ("--patience stops training early",)),
    (("finetune", MODEL, *TRAIN, "--eval-data", MODEL.with_name("x.npz"), "--split", "0.3"),
     ("--split does not apply with --eval-data",)),
    (("finetune", MODEL, *TRAIN, "--val-data", MODEL.with_name("x.npz"), "--val-fraction", "0.2"),
     ("--val-fraction does not apply with --val-data",)),
    ((*COPRUNE, "--keep", "0.5", "--eval-data", MODEL.with_name("x.npz"), "--split", "0.3"),
     ("--split does not apply with --eval-data",)),
])
def test_training_flags_that_cannot_act_are_usage_errors(tmp_path, args, words):
    """A flag that would be ignored (no teacher to distil, no early stop when the last epoch is kept, no split
    or fold beside the samples given for it) is a usage error naming it, before any work."""
    pytest.importorskip("torch")
    result = cli(*[tmp_path / "out" if a == "OUT" else a for a in args])
    assert_usage_error(result, *words)
    assert not list(tmp_path.iterdir())


def test_calibrate_help_says_what_the_auto_engine_computes_in_graph():
    """auto reduces pooled responses in onnxruntime and takes features and patches by float32 BLAS
    (tests/calibration/test_ingraph.py::both); the help said patches went in-graph."""
    text = " ".join(cli("calibrate", "--help").output.split())
    assert "auto: pooled responses in-graph, features and patches by float32 BLAS" in text, text


def test_run_flags_that_cannot_act_are_usage_errors(tmp_path):
    assert_usage_error(compress(tmp_path, "--no-latency", "--latency-runs", "3", "--keep", "0.5"),
                       "--latency-runs does not apply with --no-latency")
    assert_usage_error(compress(tmp_path, "--eval-data", str(DATA), "--split", "0.3", "--keep", "0.5"),
                       "--split does not apply with --eval-data")


def test_source_data_for_a_recipe_that_reads_the_target_only_is_a_usage_error(tmp_path):
    assert_usage_error(compress(tmp_path, "--source-data", str(DATA)), "--source-data applies to methods that read "
                       "both domains")
    assert_usage_error(cli("sweep", MODEL, "--target-data", DATA, "--source-data", DATA, "--flops", "0.5",
                           "-o", tmp_path / "sw"), "--source-data applies")
    assert_usage_error(cli("calibrate", MODEL, "--target-data", DATA, "--source-data", DATA, "-o", tmp_path / "s.npz"),
                       "--source-data applies")
    assert not list(tmp_path.iterdir())
    result = compress(tmp_path, "--source-data", str(DATA), "--method", "momasp-J", "--keep", "0.5")
    assert result.exit_code == 0, result.output + result.stderr
