"""select-nodes: choose which channels of each prunable channel group to keep.

Before:  producer -> C channels -> per-channel ops -> consumers       (graph unchanged)
After:   the same; ``ctx.selections[group] = J`` for reconstruct-next-layer to apply

Criteria (METHODS.md):
    spectral   greedy retention: max Tr(S_FJ S_JJ^-1 S_JF) / Tr(S), S = E[phi phi^T] on the target set
    momasp-J   spectral + lambda * source/target moment-matching regulariser, Reg J (recomputed per step)
    momasp-j   the same with Reg j (per channel, computed once); both need --source-data
    pfa-en     PFA recipe: fewest channels whose pooled-response spectrum holds energy tau
    pfa-kl     PFA recipe, parameter-free: k = ceil(C (1 - KL(lambda || uniform) / ln C))
    mean       baseline: channels with the largest mean activation ("pruning (mean)" of DALR)
    l1         baseline: producer filters with the largest L1 norm

How many: per group (alpha, tau, fraction, or the pfa-kl rule), or one global threshold
searched so that the touched layers keep ``keep`` of their parameters or ``flops`` of their MACs.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import onnx

from onnxprune import cost, linalg
from onnxprune.calibration.stats import StatRequest
from onnxprune.errors import CalibrationError
from onnxprune.graph import ChannelGroup, find_channel_groups
from onnxprune.model import get_array
from onnxprune.passes.base import Pass, PassContext, PassResult, check_choice, check_fraction, register

CRITERIA = ("spectral", "momasp-J", "momasp-j", "pfa-en", "pfa-kl", "mean", "l1")
#: groups at least this wide keep a multiple of ``SelectOptions.multiple`` channels
WIDE_GROUP = 32


@dataclasses.dataclass(frozen=True)
class SelectOptions:
    """Which criterion, and how many channels: alpha | tau | fraction | keep | flops (pfa-kl needs none)."""

    criterion: str = "spectral"
    alpha: float | None = None        # retention ratio per group (spectral, momasp)
    tau: float | None = None          # PFA-En energy per group
    fraction: float | None = None     # keep this fraction of each group's channels
    keep: float | None = None         # global: touched layers keep this fraction of their parameters
    flops: float | None = None        # global: touched layers keep this fraction of their MACs
    lam: float = 1.0                  # MoMaSP regulariser weight
    ridge: float = 1e-6               # relative ridge for the greedy selection
    choose: str = "spectral"          # PFA: which channels, "spectral" or "correlation" (PFA's own rule)
    pool: str = "max"                 # PFA: spatial pooling of responses per sample
    groups: tuple[str, ...] = ()      # only these groups (names from `onnxprune inspect`); empty = all
    multiple: int = 8                 # kept counts of groups >= WIDE_GROUP channels round up to a multiple
    counts: dict | None = None        # per group: exactly this many channels (a plan); groups not named stay whole

    def __post_init__(self):
        check_choice("select-nodes", "criterion", self.criterion, CRITERIA)
        check_choice("select-nodes", "choose", self.choose, ("spectral", "correlation"))
        check_choice("select-nodes", "pool", self.pool, ("max", "mean"))
        given = [n for n in ("alpha", "tau", "fraction", "keep", "flops", "counts") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of alpha, tau, fraction, keep, flops, counts (got {', '.join(given)})")
        if not given and self.criterion != "pfa-kl":
            default = {"pfa-en": "tau"}.get(self.criterion, "keep")
            object.__setattr__(self, default, 0.9 if default == "tau" else 0.5)
        if self.alpha is not None and self.criterion not in ("spectral", "momasp-J", "momasp-j"):
            raise ValueError(f"alpha applies to spectral and momasp, not {self.criterion}")
        if self.tau is not None and self.criterion != "pfa-en":
            raise ValueError("tau applies to pfa-en only")
        for name in ("alpha", "tau", "fraction", "keep", "flops"):
            check_fraction("select-nodes", name, getattr(self, name))
        if int(self.multiple) < 1:
            raise ValueError(f"multiple={self.multiple} must be >= 1")
        if self.lam < 0 or self.ridge < 0:
            raise ValueError("lam and ridge must be >= 0")
        object.__setattr__(self, "groups", tuple(self.groups))
        if self.counts is not None:
            counts = dict(self.counts)
            if any(not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1 for v in counts.values()):
                raise ValueError(f"counts must map group names to channel counts >= 1, got {counts}")
            object.__setattr__(self, "counts", {str(k): int(v) for k, v in counts.items()})

    @property
    def needs_source(self) -> bool:
        return self.criterion.startswith("momasp")


def site_request(group: ChannelGroup) -> StatRequest:
    return StatRequest(group.site, kind="features", axis=1)


def pooled_request(group: ChannelGroup, pool: str) -> StatRequest:
    return StatRequest(group.site, kind="pooled", axis=1, pool=pool)


class Footprint:
    """Parameters and MACs of what a set of groups touches, as channel counts change.

    Parameters are counted per initializer: one that holds the output channels of group g
    (producer weights and biases, BN and depthwise parameters) and the input channels of
    group h (consumer weights) scales by (kept_g / C_g) (kept_h / C_h); a bias only by its
    own group's factor. MACs are counted per node: a node that produces group g and reads
    group h scales by both factors, a per-channel node (depthwise conv) by g's.
    """

    def __init__(self, model: onnx.ModelProto, groups: list[ChannelGroup]):
        costs = {c.name: c for c in cost.layer_costs(model)}
        sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer}
        self.channels = {g.name: g.channels for g in groups}
        self.params: dict[str, set[str]] = {}      # initializer -> groups along its axes
        self.nodes: dict[str, set[str]] = {}       # node -> groups it produces or reads
        self._sizes = sizes
        self._macs = {name: c.macs for name, c in costs.items()}
        for g in groups:
            for p in g.producers:
                self._add(self.nodes, p.node, g.name)
                for name in (p.weight, p.bias):
                    if name in sizes:
                        self._add(self.params, name, g.name)
            for op in g.path:
                if self._macs.get(op.node):
                    self._add(self.nodes, op.node, g.name)
                for name, _ in op.params:
                    if name in sizes:
                        self._add(self.params, name, g.name)
            for c in g.consumers:
                self._add(self.nodes, c.node, g.name)
                if c.weight in sizes:
                    self._add(self.params, c.weight, g.name)

    @staticmethod
    def _add(table, key, group):
        table.setdefault(key, set()).add(group)

    def _factor(self, groups: set[str], counts: dict[str, int]) -> float:
        factor = 1.0
        for g in groups:
            factor *= counts.get(g, self.channels[g]) / self.channels[g]
        return factor

    def __call__(self, counts: dict[str, int]) -> tuple[float, float]:
        params = sum(self._sizes[name] * self._factor(gs, counts) for name, gs in self.params.items())
        macs = sum(self._macs.get(name, 0) * self._factor(gs, counts) for name, gs in self.nodes.items())
        return params, macs

    def full(self) -> tuple[float, float]:
        return self(dict(self.channels))


@register
class SelectNodes(Pass):
    """Choose the kept channels J of each prunable group (graph unchanged).

    spectral: greedy max of the retention ratio Tr(S_FJ S_JJ^-1 S_JF)/Tr(S) with Schur-complement
    updates; momasp-J/j add the moment-matching regulariser; pfa-en/pfa-kl set how many; mean and
    l1 are baselines. The selection is applied by reconstruct-next-layer.
    """

    name = "select-nodes"
    Options = SelectOptions

    @property
    def needs_source(self) -> bool:
        return self.options.needs_source

    def groups(self, model: onnx.ModelProto) -> tuple[list[ChannelGroup], list[dict]]:
        chosen, skipped = [], []
        wanted = set(self.options.groups) | set(self.options.counts or ())
        found = set()
        for group in find_channel_groups(model):
            if wanted and group.name not in wanted:
                continue
            found.add(group.name)
            if group.skip:
                skipped.append({"group": group.name, "reason": group.skip})
            else:
                chosen.append(group)
        for name in sorted(wanted - found):
            skipped.append({"group": name, "reason": "no such channel group (see `onnxprune inspect`)"})
        return chosen, skipped

    def _requests(self, groups) -> list[tuple[StatRequest, tuple[str, ...]]]:
        opts = self.options
        sets = ("target", "source") if opts.needs_source else ("target",)
        out = []
        for g in groups:
            out.append((site_request(g), sets))
            if opts.criterion.startswith("pfa"):
                out.append((pooled_request(g, opts.pool), ("target",)))
        return out

    def requests(self, model):
        groups, _ = self.groups(model)
        return self._requests(groups)

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        opts = self.options
        groups, skipped = self.groups(model)
        groups = [g for g in groups if g.name not in ctx.selections]
        scope = [g for g in groups if ctx.only_group in (None, g.name)]
        if not scope:
            return PassResult(changed=False, report={"selected": [], "skipped": skipped})
        counts = ctx.notes.get("select-nodes/counts")
        if counts is None:
            # Counts come from every group at once (a global budget couples them), on this graph.
            scores = self._scores(model, groups, ctx)
            counts = self._counts(model, groups, scores)
            if ctx.only_group is not None:
                ctx.notes["select-nodes/counts"] = counts
        else:
            # Sequential mode: which channels, from statistics of the partly pruned graph.
            scores = self._scores(model, scope, ctx)
        groups = scope
        rows = []
        for g in groups:
            k = int(counts[g.name])
            keep = kept_channels(scores[g.name], k)
            sigma = scores[g.name]["sigma"]
            retention = float(linalg.retention_ratio(sigma, keep, ridge=opts.ridge))
            ctx.selections[g.name] = {"group": g, "keep": keep, "sigma": sigma, "applied": False,
                                      "criterion": opts.criterion, "retention": retention,
                                      "folds": scores[g.name]["folds"]}
            rows.append({"group": g.name, "channels": g.channels, "kept": k, "retention": retention,
                         "criterion": opts.criterion})
        return PassResult(changed=False, report={"selected": rows, "skipped": skipped})

    def _scores(self, model, groups: list[ChannelGroup], ctx: PassContext) -> dict[str, dict]:
        opts = self.options
        by_set: dict[str, list[StatRequest]] = {}
        for request, sets in self._requests(groups):
            for s in sets:
                by_set.setdefault(s, []).append(request)
        views = {s: ctx.statistics(model, reqs, (s,)) for s, reqs in by_set.items()}
        scores = {}
        for g in groups:
            # ctx.cache is shared by runs over the same statistics (the planner's trial
            # rewrites of the original graph); a lazy Ranking extends in place when reused.
            key = None if ctx.cache is None or ctx.mode != "one-shot" else (
                "select-nodes", opts.criterion, opts.lam, opts.ridge, opts.choose, opts.pool, g.name)
            if key is not None and key in ctx.cache:
                scores[g.name] = ctx.cache[key]
                continue
            scores[g.name] = self._score(model, g, views)
            scores[g.name]["folds"] = fold_moments(views["target"], g, ctx.folds)
            if key is not None:
                ctx.cache[key] = scores[g.name]
        return scores

    def _score(self, model, group: ChannelGroup, views) -> dict:
        """What ranks the group's channels: a lazy greedy ranking (spectral, momasp, PFA's
        spectral choice), a fixed order (mean, l1), and PFA's spectrum."""
        opts = self.options
        target = views["target"].moments(site_request(group), "target")
        sigma = target.second_moment
        c = group.channels
        out = {"sigma": sigma, "ranking": None}
        if opts.criterion == "spectral" or (opts.criterion.startswith("pfa") and opts.choose == "spectral"):
            out["ranking"] = Ranking(functools.partial(linalg.spectral_select, sigma, ridge=opts.ridge), c)
        elif opts.criterion.startswith("momasp"):
            source = views["source"].moments(site_request(group), "source")
            out["ranking"] = Ranking(functools.partial(
                linalg.momasp_select, sigma, mean_s=source.mean, mean_t=target.mean, cov_s=source.covariance,
                cov_t=target.covariance, reg=opts.criterion[-1], lam=opts.lam, ridge=opts.ridge), c)
        elif opts.criterion == "mean":
            out["order"] = np.argsort(-np.abs(target.mean), kind="stable")
        elif opts.criterion == "l1":
            norms = np.zeros(c)
            for p in group.producers:
                w = get_array(model, p.weight).astype(np.float64)
                w = np.moveaxis(w, p.axis, 0).reshape(c, -1)
                norms += np.abs(w).sum(axis=1)
            out["order"] = np.argsort(-norms, kind="stable")
        if opts.criterion.startswith("pfa"):
            pooled = views["target"].moments(pooled_request(group, opts.pool), "target")
            out["spectrum"] = linalg.pfa_spectrum(pooled.covariance)
            if opts.choose == "correlation":
                out["pooled_cov"] = pooled.covariance
        return out

    def _counts(self, model, groups: list[ChannelGroup], scores: dict) -> dict[str, int]:
        opts = self.options
        if opts.counts is not None:
            return {g.name: min(int(opts.counts[g.name]), g.channels) for g in groups}
        if opts.fraction is not None:
            counts = {g.name: max(1, math.ceil(opts.fraction * g.channels)) for g in groups}
        elif opts.alpha is not None:
            counts = {g.name: scores[g.name]["ranking"].count_for(opts.alpha) for g in groups}
        elif opts.criterion == "pfa-kl":
            counts = {g.name: linalg.pfa_kl_count(scores[g.name]["spectrum"]) for g in groups}
        elif opts.tau is not None:
            counts = {g.name: linalg.pfa_energy_count(scores[g.name]["spectrum"], opts.tau) for g in groups}
        else:
            return self._budget_counts(model, groups, scores)
        return {g.name: self._rounded(counts[g.name], g) for g in groups}

    def _rounded(self, count: int, group: ChannelGroup) -> int:
        """``count`` rounded up to a multiple of ``multiple`` in wide groups (at most all
        channels): onnxruntime's CPU convolutions work on blocks of 8 or 16 channels, and a
        MobileNetV2 whose expansions keep counts off those blocks runs slower than the
        original (bench/results/pruning.md, g)."""
        m = int(self.options.multiple)
        if m <= 1 or group.channels < WIDE_GROUP:
            return int(count)
        return int(min(group.channels, m * math.ceil(count / m)))

    def _budget_counts(self, model, groups: list[ChannelGroup], scores: dict) -> dict[str, int]:
        """Global budget: one threshold t for every group, the loosest whose counts fit.

        t is a retention ratio (spectral, momasp), a PFA energy (pfa-en, pfa-kl), or a
        fraction of channels (mean, l1). Greedy rankings are extended only as far as the
        search needs: a group whose ranking has not reached t yet counts as "more than
        computed" (a lower bound); when the budget is met even so, the ranking is extended
        and t tried again, so the result is exactly that of full rankings.
        """
        opts = self.options
        footprint = Footprint(model, groups)
        full_params, full_macs = footprint.full()
        index, budget = (0, opts.keep * full_params) if opts.keep is not None else (1, opts.flops * full_macs)
        by_ratio = opts.criterion in ("spectral", "momasp-J", "momasp-j")

        def counts_at(t: float) -> tuple[dict[str, int], list[Ranking]]:
            out, short = {}, []
            for g in groups:
                s = scores[g.name]
                if by_ratio:
                    count, exact = s["ranking"].count_at(t)
                    if not exact:
                        short.append(s["ranking"])
                elif opts.criterion.startswith("pfa"):
                    count = linalg.pfa_energy_count(s["spectrum"], t) if t > 0 else 1
                else:
                    count = max(1, math.ceil(t * g.channels))
                out[g.name] = self._rounded(count, g)
            return out, short

        def fits(t: float) -> tuple[bool, dict[str, int]]:
            while True:
                counts, short = counts_at(t)
                if footprint(counts)[index] > budget:
                    return False, counts         # lower bounds already exceed the budget
                if not short:
                    return True, counts
                for ranking in short:
                    ranking.extend_to(t)

        lo, hi = 0.0, 1.0
        best = fits(0.0)[1]
        for _ in range(40):
            mid = (lo + hi) / 2
            ok, counts = fits(mid)
            if ok:
                best, lo = counts, mid
            else:
                hi = mid
        ok, counts = fits(1.0)
        return counts if ok else best


class Ranking:
    """A greedy channel ranking computed lazily: ``select(alpha=..., count=...)`` returns
    (order, ratios) and is called again, further, only when more of it is needed.

    Greedy selection is deterministic, so a longer run extends a shorter one: a prefix
    computed with a small ``count`` or ``alpha`` is the start of the full ranking. A run
    with ``alpha`` stops early when no informative channel is left (``complete``). A
    global budget rarely needs more than 99 % retention, so wide groups (MobileNetV2's 960
    channels) are ranked only that far unless the budget asks for more.
    """

    def __init__(self, select, channels: int):
        self.select = select
        self.channels = channels
        self.order = np.zeros(0, dtype=np.int64)
        self.ratios = np.zeros(0)
        self.complete = False
        self.informative = channels          # channels ranked before the greedy ran out (when complete)

    def _run(self, **stop) -> tuple[int, float]:
        """Run the selection; keep the longer ranking; (channels ranked, last ratio) of this run."""
        order, ratios = self.select(**stop)
        if len(order) >= len(self.order):
            self.order, self.ratios = np.asarray(order, dtype=np.int64), np.asarray(ratios, dtype=np.float64)
        return len(order), float(ratios[-1]) if len(ratios) else 0.0

    def top(self, count: int) -> np.ndarray:
        """The first ``count`` channels of the ranking (forced picks past the informative ones)."""
        count = int(min(max(count, 1), self.channels))
        if len(self.order) < count:
            self._run(count=count)
        return self.order[:count]

    def reached(self, alpha: float) -> bool:
        return len(self.ratios) > 0 and self.ratios[-1] >= alpha - 1e-12

    def extend_to(self, alpha: float) -> None:
        """Rank until the retention ratio reaches ``alpha``: first to max(alpha, 0.99), then,
        if that is not enough, every informative channel (each run starts afresh, so few
        and long runs are cheaper than many short ones)."""
        if self.complete or self.reached(alpha):
            return
        goal = max(alpha, 0.99) if not len(self.ratios) else 1.0
        ranked, last = self._run(alpha=goal)
        if last < goal - 1e-12:              # stopped early: nothing informative left
            self.complete = True
            self.informative = ranked

    def count_at(self, alpha: float) -> tuple[int, bool]:
        """(channels needed for retention ``alpha``, whether that is exact rather than a lower bound)."""
        if self.reached(alpha):
            return count_for_ratio(self.ratios, alpha), True
        if self.complete:
            return max(self.informative, 1), True
        if len(self.order) >= self.channels:
            return self.channels, True
        return len(self.order) + 1, False

    def count_for(self, alpha: float) -> int:
        """Fewest channels reaching ``alpha`` (all informative ones when it cannot be reached)."""
        self.extend_to(alpha)
        return self.count_at(alpha)[0]


def fold_moments(view, group: ChannelGroup, folds: int) -> list[tuple[int, np.ndarray]]:
    """(sample count, second moment) of the site per calibration fold; [] when the
    statistics were gathered without folds (reconstruct-next-layer then uses a fixed ridge)."""
    if folds < 2:
        return []
    out = []
    try:
        for f in range(folds):
            m = view.moments(site_request(group), "target", fold=f)
            out.append((int(m.count), m.second_moment))
    except CalibrationError:
        return []
    return out


def kept_channels(score: dict, count: int) -> np.ndarray:
    """The ``count`` best channels, sorted; PFA's correlation rule when it was asked for."""
    if "pooled_cov" in score:
        return np.sort(np.asarray(linalg.pfa_correlation_select(score["pooled_cov"], count), dtype=np.int64))
    if score.get("ranking") is not None:
        return np.sort(score["ranking"].top(count))
    return np.sort(np.asarray(score["order"][:count], dtype=np.int64))


def count_for_ratio(ratios: np.ndarray, alpha: float) -> int:
    """Fewest channels whose retention ratio reaches ``alpha`` (ratios[i] = after i + 1 picks)."""
    reached = np.nonzero(np.asarray(ratios) >= alpha - 1e-12)[0]
    return int(reached[0] + 1) if len(reached) else len(ratios)
