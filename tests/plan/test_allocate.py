"""Allocation on constructed sensitivity curves whose optimum is known by brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxprune.plan.allocate import Option, Path, greedy_path, hull, search


def concave_site(name: str, rng: np.random.Generator, n: int = 4) -> list[Option]:
    """Options whose saving is a concave function of damage (every option on the hull)."""
    gains = np.sort(rng.uniform(0.5, 5.0, n))[::-1]          # falling efficiency
    steps = rng.uniform(0.1, 1.0, n)
    damage = np.cumsum(steps)
    saving = np.cumsum(steps * gains)
    return [Option(name, "prune", n - i, float(s), float(d)) for i, (s, d) in enumerate(zip(saving, damage))]


def brute_force_best(sites: dict[str, list[Option]], limit: float) -> float:
    best = 0.0
    choices = [[None] + opts for opts in sites.values()]
    for combo in itertools.product(*choices):
        chosen = [o for o in combo if o is not None]
        if sum(o.damage for o in chosen) <= limit + 1e-12:
            best = max(best, sum(o.saving for o in chosen))
    return best


def test_hull_drops_dominated_and_non_concave_options():
    a = Option("s", "prune", 8, saving=1.0, damage=1.0)
    b = Option("s", "prune", 6, saving=1.5, damage=3.0)   # below the segment a -> c: not on the hull
    c = Option("s", "prune", 4, saving=3.0, damage=4.0)
    d = Option("s", "prune", 2, saving=2.0, damage=5.0)   # dominated: more damage, less saving
    assert hull([d, c, b, a]) == [a, c]


def test_zero_damage_options_come_first():
    free = Option("s", "prune", 8, saving=1.0, damage=0.0)
    costly = Option("t", "prune", 8, saving=100.0, damage=1.0)
    path = greedy_path({"s": [free], "t": [costly]})
    assert path.steps[0] is free


@pytest.mark.parametrize("seed", range(6))
def test_every_plan_on_the_path_is_optimal_for_its_damage(seed):
    rng = np.random.default_rng(seed)
    sites = {f"s{i}": concave_site(f"s{i}", rng, n=3) for i in range(4)}
    path = greedy_path(sites)
    assert len(path) == 1 + sum(len(v) for v in sites.values())
    savings = [path.predicted(t)[0] for t in range(len(path))]
    damages = [path.predicted(t)[1] for t in range(len(path))]
    assert np.all(np.diff(savings) > 0) and np.all(np.diff(damages) > 0)
    for t in range(len(path)):
        assert savings[t] == pytest.approx(brute_force_best(sites, damages[t]))


def test_conflicting_sites_are_not_both_compressed():
    prune = Option("prune:g", "prune", 4, saving=10.0, damage=1.0, layers=frozenset({"conv1", "conv2"}))
    split = Option("low-rank:conv2", "low-rank", 2, saving=5.0, damage=1.0, layers=frozenset({"conv2"}))
    path = greedy_path({"prune:g": [prune], "low-rank:conv2": [split]})
    assert [o.site for o in path.steps] == ["prune:g"]


def test_search_finds_the_last_true_of_a_monotone_predicate():
    path = Path([Option(f"s{i}", "prune", 1, 1.0, 1.0) for i in range(20)])
    calls = []

    def ok(t):
        calls.append(t)
        return t <= 13
    assert search(path, ok) == 13
    assert len(calls) <= 7
    assert search(path, lambda t: True) == 20
    assert search(path, lambda t: t == 0) == 0


def test_search_with_few_calls_returns_the_largest_step_known_to_pass():
    path = Path([Option(f"s{i}", "prune", 1, 1.0, 1.0) for i in range(20)])
    calls = []

    def ok(t):
        calls.append(t)
        return t <= 13
    found = search(path, ok, lo=4, calls=2)
    assert len(calls) == 2 and ok(found) and found >= 4
    assert found == max([4] + [t for t in calls[:2] if t <= 13])
    assert search(path, ok, lo=4, calls=0) == 4
    assert search(path, ok, lo=4, calls=10) == 13
