"""Recipe presets (onnxprune/recipes.py): one source for the CLI, bench/ and tests; options are
validated once, when the recipe is made."""

from __future__ import annotations

import dataclasses
import pytest

from onnxprune import criteria, recipes
from onnxprune.errors import RecipeError
from onnxprune.pipeline import Recipe
from onnxprune.recipes import OptionConflict, build_recipe, method_passes

#: the command line's keywords with every method option unset
BLANK = dict(method="auto", keep=None, rank=None, fraction=None, energy=None, alpha=None, tau=None, flops=None,
             lam=None, ridge=None, layers=None, mode=None, no_reconstruct=False, then_low_rank=None, seed=0,
             calib_size=200, split=0.5, batch_size=32, allocation="plan", stats=None, max_drop=None)


def options(**changes):
    return {**BLANK, **changes}


def test_presets_and_criteria_are_the_method_choices():
    assert recipes.method_names() == ["svd", "svd-bc", "dalr", "dalr-bc", *criteria.names()]
    assert recipes.method_names(auto=True)[0] == "auto"
    assert method_passes("dalr-bc", keep=0.25) == (("low-rank-split", {"method": "dalr", "keep": 0.25}),
                                                   ("bias-compensate", {}))
    assert method_passes("dalr", rank=4, layers=("fc1",), ridge=0.1) == (
        ("low-rank-split", {"method": "dalr", "rank": 4, "layers": ("fc1",), "ridge": 0.1}),)
    assert method_passes("l1", keep=0.5, layers=("conv1",), then_low_rank=0.3) == (
        ("select-nodes", {"criterion": "l1", "keep": 0.5, "groups": ("conv1",)}),
        ("reconstruct-next-layer", {"reconstruct": True}),
        ("low-rank-split", {"method": "dalr", "keep": 0.3, "ops": ("Gemm", "MatMul")}))
    # the presets are copied, never shared
    method_passes("dalr", keep=0.1)[0][1]["keep"] = 0.9
    assert recipes.METHODS["dalr"] == (("low-rank-split", {"method": "dalr"}),)


def test_unknown_method_and_options_of_the_other_family_are_errors():
    with pytest.raises(RecipeError, match="not a known method"):
        method_passes("prune-everything")
    with pytest.raises(OptionConflict, match="rank applies to low rank"):
        method_passes("spectral", rank=3)
    with pytest.raises(OptionConflict, match="alpha applies to channel pruning, not method dalr"):
        method_passes("dalr", alpha=0.9)
    with pytest.raises(OptionConflict, match="no_reconstruct applies to channel pruning"):
        method_passes("svd-bc", reconstruct=False)


def test_build_recipe_fixed_and_planned():
    fixed = build_recipe(options(method="svd-bc", rank=3, layers="fc1, fc2"), {})
    assert fixed.plan is None and fixed.mode == "one-shot"
    assert fixed.passes == (("low-rank-split", {"method": "svd", "rank": 3, "layers": ("fc1", "fc2")}),
                            ("bias-compensate", {}))
    auto = build_recipe(options(alpha=0.9, mode="sequential"), {"scale": 0.5})
    assert [name for name, _ in auto.passes] == ["select-nodes", "reconstruct-next-layer"]
    assert auto.mode == "sequential" and auto.preprocess == {"scale": 0.5}
    planned = build_recipe(options(method="dalr-bc", keep=0.4), {})
    assert planned.passes == () and planned.plan["budget"] == 0.4 and planned.plan["objective"] == "params"
    assert planned.plan["families"] == ["low-rank"] and planned.plan["bias"] is True
    assert build_recipe(options(), {}).plan["max_drop"] == 1.0
    glob = build_recipe(options(method="l1", keep=0.5, allocation="global"), {})
    assert glob.plan is None and glob.passes[0] == ("select-nodes", {"criterion": "l1", "keep": 0.5})


def test_a_macs_budget_plans_low_rank_too():
    """--method dalr-bc --flops 0.7 (README's MiniLM table): the planner meets a MAC budget with
    any method; only a fixed recipe's --flops is pruning's (low-rank-split has no MAC rule)."""
    planned = build_recipe(options(method="dalr-bc", flops=0.7), {})
    assert planned.plan["budget"] == 0.7 and planned.plan["objective"] == "macs"
    assert planned.plan["families"] == ["low-rank"]
    with pytest.raises(OptionConflict, match="flops with method svd is a budget for the planner, and "
                                             "allocation global makes compress run one fixed recipe"):
        build_recipe(options(method="svd", flops=0.7, allocation="global"), {})


@pytest.mark.parametrize("method", ["svd", "svd-bc"])
def test_a_ridge_with_svd_is_a_conflict(method):
    """SVD reads no ridge: --method svd --ridge 0.1 wrote the plain SVD model (exit 0)."""
    with pytest.raises(OptionConflict, match="ridge applies to method dalr, dalr-bc, not " + method):
        build_recipe(options(method=method, fraction=0.5, ridge=0.1), {})
    assert build_recipe(options(method="dalr", fraction=0.5, ridge=0.1), {}).passes[0][1]["ridge"] == 0.1


@pytest.mark.parametrize("budget", [{"keep": 0.5, "allocation": "global"}, {"energy": 0.9}])
def test_a_fixed_spatial_split_without_rank_or_fraction_is_a_conflict(budget):
    """--conv-split spatial --keep 0.5 --allocation global was exit 1 naming the recipe option
    (conv='spatial'), not the flags; --keep without --allocation global plans and stays valid."""
    with pytest.raises(OptionConflict, match="conv_split spatial in a fixed recipe takes rank or fraction, "
                                             "not " + next(iter(budget))):
        build_recipe(options(method="svd", conv_split="spatial", **budget), {})
    assert build_recipe(options(method="svd", conv_split="spatial", keep=0.5), {}).plan["conv"] == "spatial"


def test_method_auto_names_the_flags_its_fixed_recipe_does_not_read():
    """--lam 5 --fraction 0.5 (auto: spectral) said 'lam applies to method ...', not the flag."""
    with pytest.raises(OptionConflict, match="^--lam applies to --method momasp-J, momasp-j, not spectral"):
        build_recipe(options(lam=5.0, fraction=0.5), {}, flag=lambda k: "--" + k)
    with pytest.raises(OptionConflict, match="^--tau applies to --method pfa-en, not spectral"):
        build_recipe(options(tau=0.9), {}, flag=lambda k: "--" + k)


def test_pfa_kl_plans_a_budget_and_runs_its_own_rule_without_one():
    """--method pfa-kl --keep 0.1 ran pfa-kl's own rule and ignored the budget (exit 0 at 32 %
    of LeNet's parameters); a budget is now planned like any criterion's."""
    planned = build_recipe(options(method="pfa-kl", keep=0.1), {})
    assert planned.passes == () and planned.plan["budget"] == 0.1 and planned.plan["criterion"] == "pfa-kl"
    assert build_recipe(options(method="pfa-kl", flops=0.5), {}).plan["objective"] == "macs"
    own = build_recipe(options(method="pfa-kl"), {})
    assert own.plan is None and own.passes[0] == ("select-nodes", {"criterion": "pfa-kl"})


def test_build_recipe_conflicts_name_the_options_as_the_caller_spells_them():
    with pytest.raises(OptionConflict, match="give only one budget: --keep and --rank"):
        build_recipe(options(keep=0.3, rank=4), {}, flag=lambda k: "--" + k)
    with pytest.raises(OptionConflict, match="energy applies to low rank"):
        build_recipe(options(method="mean", energy=0.9), {})
    with pytest.raises(RecipeError, match="contradicts flops"):
        build_recipe(options(flops=0.5, objective="params"), {})
    with pytest.raises(RecipeError, match="only applies to objective latency"):
        build_recipe(options(latency_batch=4), {})


def test_pass_options_are_validated_when_the_recipe_is_made():
    with pytest.raises(RecipeError, match="rnak"):
        Recipe(passes=(("low-rank-split", {"rnak": 3}),))
    with pytest.raises(RecipeError, match="ridge"):
        build_recipe(options(method="dalr", rank=2, ridge=-1.0), {})
    recipe = Recipe(passes=method_passes("dalr-bc", keep=0.3))
    first, second = recipe.build(), recipe.build()
    assert [p.name for p in first] == ["low-rank-split", "bias-compensate"]
    assert first[0] is not second[0] and first[0].options == second[0].options


def test_latency_aware_splits_make_a_fixed_low_rank_recipe():
    recipe = build_recipe(options(method="dalr-bc", keep=0.25, latency_aware_splits=True, latency_batch=8), {})
    assert recipe.plan is None
    assert recipe.passes == (("low-rank-split", {"method": "dalr", "keep": 0.25, "latency": True, "latency_batch": 8}),
                             ("bias-compensate", {}))
    assert build_recipe(options(method="svd", rank=4, latency_aware_splits=True), {}).passes[0][1]["latency"] is True
    assert "latency" not in build_recipe(options(method="svd", rank=4), {}).passes[0][1]
    with pytest.raises(OptionConflict, match="latency_aware_splits applies to low rank"):
        build_recipe(options(method="l1", keep=0.5, latency_aware_splits=True), {})
    with pytest.raises(RecipeError, match="latency_batch.*only applies to objective latency or latency_aware_splits"):
        build_recipe(options(method="svd", rank=4, latency_batch=4), {})


def test_conv_split_reaches_the_planner_and_fixed_low_rank_recipes():
    from onnxprune.plan.planner import PlanOptions

    assert PlanOptions().conv == "spatial" and PlanOptions(objective="latency").conv_form == "channel"
    assert build_recipe(options(), {}).plan["conv"] == "spatial"            # the plan table, defaults filled in
    assert build_recipe(options(conv_split="channel"), {}).plan["conv"] == "channel"
    fixed = build_recipe(options(method="dalr-bc", fraction=0.5, conv_split="spatial"), {})
    assert fixed.passes[0] == ("low-rank-split", {"method": "dalr", "fraction": 0.5, "conv": "spatial"})
    with pytest.raises(OptionConflict, match="conv_split applies to low rank"):
        build_recipe(options(method="spectral", keep=0.5, conv_split="spatial"), {})
    with pytest.raises(OptionConflict, match="spatial in a fixed recipe takes rank or fraction, not keep"):
        build_recipe(options(method="dalr", keep=0.3, allocation="global", conv_split="spatial"), {})
    with pytest.raises(RecipeError, match="conv='diagonal'"):
        PlanOptions(conv="diagonal")


def test_recipes_compare_and_hash_by_what_they_run():
    plain = Recipe(passes=(("select-nodes", {"criterion": "spectral", "keep": 0.5}),), preprocess={"mean": [0.5]})
    spelled = Recipe(passes=(("select-nodes", {"criterion": "spectral", "keep": 0.5, "ridge": 1e-6}),),
                     preprocess={"mean": (0.5,)})
    assert plain == spelled and hash(plain) == hash(spelled) and len({plain, spelled}) == 1
    assert plain == Recipe.from_dict(plain.to_dict())
    assert plain != Recipe(passes=(("select-nodes", {"criterion": "spectral", "keep": 0.4}),), preprocess={"mean": [0.5]})
    assert plain != dataclasses.replace(plain, seed=1)
