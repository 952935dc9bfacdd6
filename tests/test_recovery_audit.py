"""Recovery training as a first-time user meets it (README "Recovery training and Co-Prune"): the
messages of `compress --finetune` and `finetune` say what the run did."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnxprune.api import plan_remedy
from onnxprune.cli import main, plan_lines

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "lenet_caffe_mnist.onnx"
USPS = ROOT / "models" / "usps_test.npz"


def usps_files(folder: Path, **parts: slice) -> None:
    """``name=slice`` of the bundled USPS digits (x and y) as folder/name.npz."""
    with np.load(USPS) as full:
        x, y = full["x"], full["y"]
    for name, rows in parts.items():
        np.savez(folder / f"{name}.npz", x=x[rows], y=y[rows])


def recovery_plan(chosen) -> dict:
    """A `compress --max-drop 1 --finetune 2` plan as the report holds it (LeNet on USPS, 2026-12-03):
    the plan without training at 29.7 %, one distilled candidate at 17.0 % that read 0.80 +- 0.63 on
    the 502-sample fold, with 0.77 in reserve."""
    trial = {"step": 6, "cost": 0.170, "predicted_damage": 0.017, "drop_before": 1.99, "se_before": 0.68,
             "drop": 0.80, "se": 0.63, "reserve": 0.77, "agreement": 0.978, "passed": chosen is not None,
             "epochs": 2, "best_epoch": 2, "seconds": 3.3}
    check = {"drop": 0.0, "se": 0.49, "samples": 502, "agreement": 0.98, "accuracy_reference": 0.747}
    return {"goal": {"max_drop": 1.0}, "objective": "macs", "cost": 0.297 if chosen is None else 0.170,
            "sites": [{}], "sites_considered": 8, "step": 6, "steps": 13, "margin": 1.0, "reserve": 0.60,
            "evaluated": 1003, "calibration_samples": 502, "checked_samples": 502, "seconds": {}, "check": check,
            "recovery": {"trials": [trial], "checkpoint_samples": 502, "margin": 1.0,
                         "reserve": None if chosen is None else 0.77, "chosen": chosen,
                         "without_training": {"step": 6, "cost": 0.297, "check": check}}}


def test_a_missed_drop_when_no_distilled_plan_passed_names_the_planners_margin():
    """No distilled candidate passed, so the output was the planner's own plan, distilled; the hint
    said a larger --finetune-margin keeps a less compressed plan, which it cannot: that margin only
    judges distilled candidates, and none was kept. The planner's --margin chose that plan."""
    hint = plan_remedy(recovery_plan(None))
    assert "--finetune-margin plays no part" in hint and "a larger --margin (now 1" in hint, hint
    assert "a larger --finetune-margin" not in hint
    # a distilled candidate was the output: its margin decided, as before
    assert plan_remedy(recovery_plan(6)).startswith("a larger --finetune-margin (now 1: ")


def test_each_distilled_plan_shows_the_reserve_it_was_judged_with():
    """'drop 1.99 -> 0.80 +- 0.63 after 2 epochs: missed' with --max-drop 1 read as a contradiction:
    the line left out the 0.77 points kept in reserve."""
    plan = recovery_plan(None)
    plan["recovery"]["fallback"] = {**plan["recovery"]["trials"][0], "cost": 0.297, "drop_before": -0.20,
                                    "drop": 1.20, "se": 0.69, "passed": False, "kept": "untrained"}
    lines = plan_lines({"plan": plan, "finetune": {"refit": False, "train_samples": 502}})
    trial = next(line for line in lines if "17.0% of the macs" in line)
    assert "0.80 +- 0.63 (+ 0.77 in reserve) after 2 epochs" in trial and trial.endswith("missed")
    # none passed: the fold read the plan without training before and after distilling it, and kept
    # the better; nothing is distilled again
    fallback = next(line for line in lines if "none met the goal" in line)
    assert "read -0.20 -> 1.20 +- 0.69 on the fold: the output is that plan untrained" in fallback, fallback
    assert not any("the output: that plan distilled again" in line for line in lines)
    lines = plan_lines({"plan": recovery_plan(6), "finetune": {"refit": True, "train_samples": 1004}})
    output = next(line for line in lines if "the output:" in line)
    assert "distilled again on 1004 samples" in output and "keep the search's weights" in output, output


def test_the_search_records_each_candidates_reserve():
    from onnxprune.api import as_model, as_samples
    from onnxprune.plan.planner import Check, Planner, PlanOptions
    from onnxprune.plan.recovery import RecoveryOptions, RecoverySearch, Trained

    model = as_model(MODEL)
    calib, _ = as_samples(USPS, model, None).split(0.5, seed=0)
    planner = Planner(model, calib.subset(np.arange(200)), options=PlanOptions(check_samples=32), evaluated=1003)
    search = RecoverySearch(planner, build=None, train=None, fold=calib.subset(np.arange(200, 240)),
                            options=RecoveryOptions(trials=1, margin=2.0))

    def attempt(path, t):
        check = Check(0.5, 0.4, 0.99, 0.7, 0.695, 0.0, 0.0, samples=40)
        return Trained(t, 0.5, 0.0, check, check, None, {}, None, {"curve": [{}], "best_epoch": 0}, 0.0)

    search.attempt = attempt
    check = Check(0.0, 0.0, 1.0, 0.7, 0.7, 0.0, 0.0)
    result, _ = search.run({"plan": {}, "step": 0, "cost": 1.0, "check": check.to_dict(),
                            "goal": {"max_drop": 1.0}}, 1.0)
    trial = result["recovery"]["trials"][0]
    assert trial["reserve"] == pytest.approx(2.0 * 0.4 * np.sqrt(1 + 40 / 1003))
    assert trial["passed"] is (trial["drop"] + trial["reserve"] <= 1.0)


def test_finetune_with_checkpoint_last_does_not_blame_the_fold(tmp_path):
    """--checkpoint last keeps the last epoch; the 'did not help' warning said the checkpoint fold
    picked it and suggested a larger fold, which plays no part in that choice."""
    pytest.importorskip("torch")
    usps_files(tmp_path, train=slice(0, 200), eval=slice(1500, 1700))
    out = tmp_path / "out.onnx"
    # plain fine-tuning of the original at a learning rate far too high: it gets worse
    result = CliRunner().invoke(main, ["finetune", str(MODEL), "--target-data", str(tmp_path / "train.npz"),
                                       "--eval-data", str(tmp_path / "eval.npz"), "--epochs", "1", "--lr", "10",
                                       "--checkpoint", "last", "--no-latency", "-o", str(out)])
    assert result.exit_code == 0, result.output
    warning = next(line for line in result.output.splitlines() if "training did not help" in line)
    assert "--checkpoint last" in warning and "checkpoint fold picked" not in warning, warning
    assert out.exists()


def test_a_checkpoint_fold_of_a_fraction_below_one_sample_holds_one(tmp_path):
    """--val-fraction 0.1 of 5 training samples: the check before any work counted a fold of one sample (4 left
    to train, enough), then the split rounded it to none and failed: "cannot split 5 samples at fraction 0.1".
    The fold is the one counted."""
    pytest.importorskip("torch")
    usps_files(tmp_path, train=slice(0, 5), eval=slice(100, 160))
    out = tmp_path / "o.onnx"
    result = CliRunner().invoke(main, [str(a) for a in (
        "compress", MODEL, "--target-data", tmp_path / "train.npz", "--eval-data", tmp_path / "eval.npz",
        "--method", "svd", "--rank", "2", "--finetune", "1", "--val-fraction", "0.1", "--no-latency", "-o", out)])
    assert result.exit_code == 0, result.output + result.stderr
    assert "(1 epoch in " in result.output
