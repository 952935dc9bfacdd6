"""Choosing one option per site from sensitivity curves: a multiple-choice knapsack.

Each site (a channel group, a linear layer) offers options, each with the cost it saves
(MACs or parameters) and the damage it does alone (the increase of an additive output
divergence, measured by ``sensitivity``). Damages of different sites are taken to add up;
the true total is always measured afterwards.

The solution is the greedy over convex hulls (the optimum of the LP relaxation, and of
the Lagrangian ``max saving - lambda * damage`` for every lambda): per site keep the
options on the upper concave hull of (damage, saving) starting at (0, 0), cut the hull
into increments, and take increments from all sites in order of decreasing efficiency
(saving per damage). Taking the first ``t`` increments gives a chain of plans
``path[0] (nothing) ... path[-1] (every site at its most aggressive hull point)``, each one
a superset in aggressiveness of the previous, along which the saving grows and the
predicted damage grows. Budgets and damage limits are then met by searching t.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping


@dataclasses.dataclass(frozen=True)
class Option:
    """Compress ``site`` with ``family`` to ``size`` (channels kept, or rank)."""

    site: str
    family: str               # "prune" | "low-rank"
    size: int
    saving: float             # objective units saved when this site alone is compressed
    damage: float             # predicted damage (additive divergence) of this site alone
    layers: frozenset = frozenset()   # nodes it rewrites (two options touching one node conflict)


def hull(options: Iterable[Option]) -> list[Option]:
    """The options on the upper concave hull of (damage, saving) from the origin, in order of
    increasing damage; dominated options (more damage, no more saving) are dropped."""
    points = sorted((o for o in options if o.saving > 0), key=lambda o: (max(o.damage, 0.0), -o.saving))
    frontier: list[Option] = []
    for o in points:                      # Pareto: strictly more saving for more damage
        if not frontier or o.saving > frontier[-1].saving:
            frontier.append(o)
    out: list[Option] = []
    for o in frontier:                    # concavity: efficiencies must decrease
        while out:
            prev = out[-1]
            before = out[-2] if len(out) > 1 else None
            if _efficiency(before, prev) <= _efficiency(before, o):
                out.pop()
            else:
                break
        out.append(o)
    return out


def _efficiency(a: Option | None, b: Option) -> float:
    """Saving gained per damage added going from a (None: the origin) to b."""
    ds = b.saving - (a.saving if a else 0.0)
    dd = max(b.damage, 0.0) - (max(a.damage, 0.0) if a else 0.0)
    if dd <= 0:
        return math.inf if ds > 0 else 0.0
    return ds / dd


@dataclasses.dataclass
class Path:
    """Plans of growing aggressiveness: ``plan(t)`` applies the first t increments."""

    steps: list[Option]                  # the option a site moves to at each step

    def __len__(self) -> int:
        return len(self.steps) + 1

    def plan(self, t: int) -> dict[str, Option]:
        chosen: dict[str, Option] = {}
        for option in self.steps[:t]:
            chosen[option.site] = option
        return chosen

    def predicted(self, t: int) -> tuple[float, float]:
        """(sum of savings, sum of damages) of plan(t) as the sites were measured alone."""
        plan = self.plan(t)
        return sum(o.saving for o in plan.values()), sum(max(o.damage, 0.0) for o in plan.values())


def greedy_path(options: Mapping[str, list[Option]]) -> Path:
    """Increments of every site's hull taken in order of decreasing efficiency.

    A site whose option would rewrite a node that another site's chosen option already
    rewrites (pruning a group and splitting its consumer, say) is frozen where it is.
    Ties are broken by site name, so the path is deterministic.
    """
    increments = []
    for site in sorted(options):
        prev = None
        for rank, o in enumerate(hull(options[site])):
            increments.append((-_efficiency(prev, o), site, rank, o))
            prev = o
    increments.sort(key=lambda item: (item[0], item[1], item[2]))
    return Path(without_clashes(option for _, _, _, option in increments))


def without_clashes(options: Iterable[Option], owner: dict[str, str] | None = None) -> list[Option]:
    """``options`` in order, less each whose nodes another site already rewrites (``owner``: node ->
    site, from options taken before, filled in as it goes); such a site is frozen: its later options
    are left out too."""
    owner = {} if owner is None else owner
    kept: list[Option] = []
    frozen: set[str] = set()
    for option in options:
        if option.site in frozen:
            continue
        if any(owner.get(n, option.site) != option.site for n in option.layers):
            frozen.add(option.site)
            continue
        owner.update(dict.fromkeys(option.layers, option.site))
        kept.append(option)
    return kept


def search(path: Path, ok: Callable[[int], bool], *, lo: int = 0, hi: int | None = None,
           calls: int | None = None) -> int:
    """The largest t in [lo, hi] with ok(t), assuming ok is monotone (true, then false);
    ``lo`` must satisfy ok. Bisection: about log2(hi - lo) calls (hi itself is not tried
    first: a whole chain rarely passes, and bisection reaches it as well); with ``calls``,
    at most that many, returning the largest t known to pass."""
    fail = (len(path) - 1 if hi is None else hi) + 1          # treated as failing
    while fail - lo > 1 and (calls is None or calls > 0):
        calls = None if calls is None else calls - 1
        mid = (lo + fail) // 2
        if ok(mid):
            lo = mid
        else:
            fail = mid
    return lo
