"""--max-drop with recovery training (plan/recovery.py): the search along the planner's chain
with distilled candidates, and `compress --max-drop --finetune` end to end on the bundled LeNet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxprune.api import as_model, as_samples
from onnxprune.cli import main
from onnxprune.cost import total_macs
from onnxprune.errors import RecipeError
from onnxprune.plan.planner import Check, Planner, PlanOptions
from onnxprune.plan.recovery import RecoveryOptions, RecoverySearch, Trained

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "lenet_caffe_mnist.onnx"
DATA = ROOT / "models" / "usps_test.npz"


@pytest.fixture(scope="module")
def planner():
    model = as_model(MODEL)
    calib, _ = as_samples(DATA, model, None).split(0.5, seed=0)
    return Planner(model, calib.subset(np.arange(300)), options=PlanOptions(check_samples=64)), calib


def identity_found() -> dict:
    check = Check(0.0, 0.0, 1.0, 0.7, 0.7, 0.0, 0.0)
    return {"plan": {}, "step": 0, "cost": 1.0, "check": check.to_dict(), "goal": {"max_drop": 1.0}}


def search_with(planner, calib, passes_up_to: int, trials: int) -> tuple[RecoverySearch, list[int]]:
    """A search whose distilled candidates meet the goal exactly up to step ``passes_up_to``."""
    search = RecoverySearch(planner, build=None, train=None, fold=calib.subset(np.arange(300, 340)),
                            options=RecoveryOptions(trials=trials))
    attempted = []

    def attempt(path, t):
        attempted.append(t)
        drop = 0.5 if t <= passes_up_to else 1.5
        check = Check(drop, 0.1, 0.99, 0.7, 0.7 - drop / 100, 0.0, 0.0)
        return Trained(t, planner.cost_of(path.plan(t)) / planner.costs.total, path.predicted(t)[1],
                       check, check, None, {}, None, {"curve": [{}], "best_epoch": 0}, 0.0)

    search.attempt = attempt
    return search, attempted


@pytest.mark.parametrize("boundary", [1, 3, 5])
def test_the_search_finds_the_last_step_that_passes_when_trials_allow(planner, boundary):
    planner, calib = planner
    search, attempted = search_with(planner, calib, boundary, trials=20)
    result, best = search.run(identity_found(), 1.0)
    assert best is not None and best.step == boundary
    assert result["recovery"]["chosen"] == boundary and result["step"] == boundary
    assert result["cost"] == pytest.approx(best.cost) and result["cost"] < 1.0
    # galloping: the steps tried grow while they pass; after a failure, only steps between the
    # last that passed and the first that failed (bisection)
    passed, failed = 0, None
    for t in attempted:
        assert t > passed and (failed is None or t < failed)
        passed, failed = (t, failed) if t <= boundary else (passed, t)
    assert [r["passed"] for r in result["recovery"]["trials"]] == [t <= boundary for t in attempted]


def test_the_search_stops_at_its_trials_and_keeps_the_best_that_passed(planner):
    planner, calib = planner
    search, attempted = search_with(planner, calib, 100, trials=2)
    result, best = search.run(identity_found(), 1.0)
    assert len(attempted) == 2 and best.step == max(attempted)
    search, attempted = search_with(planner, calib, 0, trials=3)   # nothing passes: no candidate
    result, best = search.run(identity_found(), 1.0)
    assert best is None and result["recovery"]["chosen"] is None and result["step"] == 0
    assert attempted == [1]                                          # failed at the first step: nothing between


@pytest.mark.parametrize("after, kept", [(0.3, "distilled"), (0.5, "distilled"), (1.2, "untrained")])
def test_when_no_distilled_plan_passes_the_fold_decides_whether_the_plan_without_training_is(planner, after, kept):
    """Every distilled candidate missed: the planner's own plan, which met the goal untrained, is
    distilled and scored on the fold before and after; the output is what the fold read better.
    It was distilled unchecked, and the bundled LeNet then missed a goal it had met untrained."""
    planner, calib = planner
    path = planner.path()
    plan = path.plan(3)
    step = len(plan)                                  # the chain from the plan reaches it in one step per site
    found = {"plan": plan, "step": step, "cost": 0.5, "goal": {"max_drop": 1.0},
             "check": Check(0.2, 0.1, 0.99, 0.7, 0.698, 0.0, 0.0).to_dict()}
    search = RecoverySearch(planner, build=None, train=None, fold=calib.subset(np.arange(300, 340)),
                            options=RecoveryOptions(trials=2))
    attempted = []

    def attempt(path, t):
        attempted.append(t)
        before = Check(0.5, 0.1, 0.99, 0.7, 0.695, 0.0, 0.0)
        drop = after if t == step else 3.0            # every step beyond the plan misses
        return Trained(t, 0.5, 0.0, before, Check(drop, 0.1, 0.97, 0.7, 0.7 - drop / 100, 0.0, 0.0), "compressed",
                       {}, "distilled", {"curve": [{}, {}], "best_epoch": 1}, 0.0)

    search.attempt = attempt
    result, trained = search.run(found, 1.0)
    assert attempted[-1] == step and all(t > step for t in attempted[:-1])      # the plan itself, last
    recovery = result["recovery"]
    assert recovery["chosen"] is None and result["step"] == step and len(recovery["trials"]) == len(attempted) - 1
    assert recovery["fallback"]["kept"] == kept and recovery["fallback"]["drop"] == after
    assert trained.output == ("compressed" if kept == "untrained" else "distilled")
    found.update(plan={}, step=0)                    # a plan that compresses nothing is not trained
    step = None
    attempted.clear()
    result, trained = search.run(found, 1.0)
    assert trained is None and "fallback" not in result["recovery"] and 0 not in attempted


def test_a_candidate_passes_with_its_margin_of_standard_errors_in_reserve(planner):
    planner, calib = planner
    fold = calib.subset(np.arange(300, 340))
    check = Check(0.5, 0.6, 0.95, 0.7, 0.695, 0.0, 0.0)       # 0.5 + 0.5 * 0.6 = 0.8, 0.5 + 1.0 * 0.6 = 1.1
    half = RecoveryOptions(margin=0.5)
    assert planner.options.margin == 1.0 and planner.evaluated is None     # the planner's margin, its check alone
    assert RecoverySearch(planner, build=None, train=None, fold=fold, options=half).ok(check, 1.0)
    assert not RecoverySearch(planner, build=None, train=None, fold=fold).ok(check, 1.0)
    assert RecoverySearch(planner, build=None, train=None, fold=fold).ok(check, 1.1)
    for options, flag in ((dict(trials=0), "--finetune-trials"), (dict(margin=-1.0), "--finetune-margin"),
                          (dict(margin=float("nan")), "--finetune-margin")):
        with pytest.raises(RecipeError, match=flag):
            RecoveryOptions(**options)


@pytest.mark.parametrize("refit", [True, False])
def test_compress_max_drop_with_finetune_distils_the_plans_it_checks(tmp_path, refit):
    pytest.importorskip("torch")
    out = tmp_path / "small.onnx"
    result = CliRunner().invoke(main, ["compress", str(MODEL), "--target-data", str(DATA), "--max-drop", "1",
                                       "--finetune", "2", "--finetune-trials", "2", "--no-latency", "-o", str(out)]
                                + ([] if refit else ["--no-finetune-refit"]))
    assert result.exit_code in (0, 3), result.output
    report = json.loads(out.with_name("small.report.json").read_text())
    plan, recovery = report["plan"], report["plan"]["recovery"]
    assert 1 <= len(recovery["trials"]) <= 2 and recovery["margin"] == 1.0     # the planner's margin
    evaluated, fold = report["validation"]["samples"], recovery["checkpoint_samples"]
    assert plan["evaluated"] == evaluated
    for trial in recovery["trials"]:     # one standard error of the fold's drop minus the evaluation's
        reserve = trial["se"] * (1 + fold / evaluated) ** 0.5
        assert trial["passed"] == (trial["drop"] + reserve <= 1.0)
        assert trial["cost"] < recovery["without_training"]["cost"]        # beyond the plan without training
    ft, ev = report["finetune"], report["evaluation"]
    # the fold that decides the plan: half of the calibration part by default, never evaluated on
    assert recovery["checkpoint_samples"] == ft["val_samples"] == round(0.5 * (ev["source_count"] - ev["count"]))
    assert ft["data"]["indices_sha"] != report["evaluation"]["indices_sha"]
    # the fold has decided a distilled plan: with refit the output is distilled on the training samples
    # and the fold; when none passed, the fallback's training (on the training samples) is the output's
    part = ev["source_count"] - ev["count"]
    refitted = refit and recovery["chosen"] is not None
    assert ft["refit"] is refitted
    assert ft["train_samples"] == (part if refitted else part - recovery["checkpoint_samples"])
    assert ("distilled again on" in result.output) is refitted
    assert ("fallback" in recovery) is (recovery["chosen"] is None)
    # the fold decides the plan, so it does not also pick the epoch: every distilled plan keeps its last
    assert all(t["best_epoch"] == t["epochs"] for t in recovery["trials"])
    assert ft["checkpoint_by"] == ("last epoch" if recovery.get("fallback", {}).get("kept") != "untrained"
                                   else "the checkpoint fold (before against after training)")
    if recovery["chosen"] is not None:
        chosen = next(t for t in recovery["trials"] if t["passed"] and t["cost"] == plan["cost"])
        assert chosen["epochs"] == len(ft["curve"]) - 1
    else:
        assert plan["cost"] == recovery["without_training"]["cost"]
        fallback = recovery["fallback"]
        assert fallback["cost"] == plan["cost"] and not fallback["passed"] or fallback["drop"] <= 1.0
        assert fallback["kept"] == ("untrained" if fallback["drop"] > fallback["drop_before"] else "distilled")
        assert ft["best_epoch"] == (0 if fallback["kept"] == "untrained" else fallback["epochs"])
        assert f"the output is that plan {fallback['kept']}" in result.output
    assert "distilled plans" in result.output
    if result.exit_code == 0:
        model = onnx.load(str(out))
        assert total_macs(model) == report["validation"]["macs_candidate"]
        assert report["validation"]["macs_candidate"] == pytest.approx(plan["cost"] * report["validation"]["macs_reference"],
                                                                       rel=1e-6)


def test_training_options_without_finetune_are_refused(tmp_path):
    result = CliRunner().invoke(main, ["compress", str(MODEL), "--target-data", str(DATA), "--augment",
                                       "--finetune-trials", "2", "--finetune-margin", "2", "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2
    assert "--augment, --finetune-trials, --finetune-margin: training options, given without --finetune EPOCHS" in result.output
    assert not list(tmp_path.iterdir())


def test_too_few_calibration_samples_name_where_they_went(tmp_path):
    """20 samples: the --split half calibrates, and --finetune's checkpoint fold takes half of that, so 5 plan;
    the hint names both (it asked for "at least 8 target samples", which the user had given)."""
    pytest.importorskip("torch")
    data = tmp_path / "few.npz"
    with np.load(DATA) as full:
        np.savez(data, x=full["x"][:20], y=full["y"][:20])
    result = CliRunner().invoke(main, ["compress", str(MODEL), "--target-data", str(data), "--finetune", "1",
                                       "--no-latency", "-o", str(tmp_path / "out" / "o.onnx")])
    assert result.exit_code == 1, result.output
    assert "5 samples are too few to plan and check" in result.output
    assert "the --split part of --target-data, less the checkpoint fold (--val-fraction)" in result.output
    assert not (tmp_path / "out").exists()
