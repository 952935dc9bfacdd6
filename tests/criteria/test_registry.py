"""The criteria registry: every select-nodes criterion is a registered class, and the CLI
choices and select_nodes.CRITERIA are exactly the registry."""

from __future__ import annotations

import pytest

from onnxprune import criteria
from onnxprune.errors import RecipeError
from onnxprune.passes.select_nodes import CRITERIA
from onnxprune.pipeline import Recipe
from onnxprune.recipes import PRUNING_CRITERIA

BUILTIN = ("spectral", "momasp-J", "momasp-j", "pfa-en", "pfa-kl", "mean", "l1")


def test_registry_lists_the_builtin_criteria_first_then_the_other_modules():
    names = criteria.names()
    assert names[:len(BUILTIN)] == BUILTIN
    assert "wanda" in names[len(BUILTIN):]
    assert CRITERIA == names and PRUNING_CRITERIA == names


def test_every_criterion_declares_what_it_needs():
    for name, cls in criteria.registry().items():
        assert cls.name == name and (cls.__doc__ or "").strip()
        assert cls.threshold in ("retention", "energy", "fraction")
        assert set(cls.per_group) <= {"alpha", "tau"}
        if cls.threshold == "retention" or "alpha" in cls.per_group:
            assert cls.threshold == "retention"      # alpha and a retention budget need a greedy ranking
    assert criteria.get("momasp-J").needs_source() and not criteria.get("spectral").needs_source()


def test_a_criterion_is_registered_once_and_needs_a_docstring():
    class Nameless(criteria.Criterion):
        name = "spectral"

    with pytest.raises(TypeError, match="docstring"):
        criteria.register(Nameless)
    Nameless.__doc__ = "A second spectral."
    with pytest.raises(TypeError, match="twice"):
        criteria.register(Nameless)


@pytest.mark.parametrize("options, words", [
    ({"criterion": "mean", "alpha": 0.9}, "alpha applies to spectral, momasp-J, momasp-j only, not mean"),
    ({"criterion": "wanda", "tau": 0.9}, "tau applies to pfa-en only, not wanda"),
])
def test_options_a_criterion_does_not_take_are_refused(options, words):
    with pytest.raises(RecipeError, match=words):
        Recipe(passes=(("select-nodes", options),))
