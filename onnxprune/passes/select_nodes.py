"""select-nodes: choose which channels of each prunable channel group to keep.

Before:  producer -> C channels -> per-channel ops -> consumers       (graph unchanged)
After:   the same; ``ctx.selections[group] = Selection(J, ...)`` for reconstruct-next-layer to apply

Criteria are classes registered by name in ``onnxprune.criteria`` (the built-in ones of
METHODS.md in ``criteria/builtin.py``: spectral, momasp-J, momasp-j, pfa-en, pfa-kl, mean,
l1; one module each for the others, e.g. ``criteria/wanda.py``). Each says what statistics
it needs and ranks a group's channels; everything below is the same for all of them.

How many: per group (alpha, tau, fraction, or the pfa-kl rule), or one global threshold
searched so that the touched layers keep ``keep`` of their parameters or ``flops`` of their MACs.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx

from onnxprune import cost, criteria, linalg
from onnxprune.calibration.requests import StatRequest
from onnxprune.criteria import Ranking, count_for_ratio, pooled_request, site_request  # noqa: F401  (re-exported)
from onnxprune.errors import CalibrationError
from onnxprune.graph.groups import ChannelGroup, find_channel_groups
from onnxprune.graph.index import name_nodes
from onnxprune.passes.base import (
    Pass,
    PassContext,
    PassResult,
    Selection,
    check_choice,
    check_fraction,
    check_types,
    register,
)

log = logging.getLogger(__name__)

#: every registered criterion (``onnxprune.criteria``), built-in ones first
CRITERIA = criteria.names()
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
    readout: bool = False             # spectral: rank by what the consumers read (``criteria.readout_matrix``)

    def __post_init__(self):
        check_types("select-nodes", self)
        check_choice("select-nodes", "criterion", self.criterion, CRITERIA)
        check_choice("select-nodes", "choose", self.choose, ("spectral", "correlation"))
        check_choice("select-nodes", "pool", self.pool, ("max", "mean"))
        given = [n for n in ("alpha", "tau", "fraction", "keep", "flops", "counts") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of alpha, tau, fraction, keep, flops, counts (got {', '.join(given)})")
        kind = criteria.get(self.criterion)
        if not given and kind.default is not None:
            object.__setattr__(self, *kind.default)
        for option in ("alpha", "tau"):
            if getattr(self, option) is not None and option not in kind.per_group:
                accepting = [name for name, c in criteria.registry().items() if option in c.per_group]
                raise ValueError(f"{option} applies to {', '.join(accepting)} only, not {self.criterion}")
        for name in ("alpha", "tau", "fraction", "keep", "flops"):
            check_fraction("select-nodes", name, getattr(self, name))
        if self.multiple < 1:
            raise ValueError(f"multiple={self.multiple} must be >= 1")
        if self.lam < 0 or self.ridge < 0:
            raise ValueError("lam and ridge must be >= 0")
        if self.readout and self.criterion != "spectral":
            raise ValueError(f"readout applies to the spectral criterion only, not {self.criterion}")
        object.__setattr__(self, "groups", tuple(self.groups))
        if self.counts is not None:
            counts = dict(self.counts)
            if any(not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1 for v in counts.values()):
                raise ValueError(f"counts must map group names to channel counts >= 1, got {counts}")
            object.__setattr__(self, "counts", {str(k): int(v) for k, v in counts.items()})

    @property
    def needs_source(self) -> bool:
        return criteria.get(self.criterion).needs_source()


class Footprint:
    """Parameters and MACs of what a set of groups touches, as channel counts change.

    Parameters are counted per initializer: one that holds the output channels of group g
    (producer weights and biases, BN and depthwise parameters) and the input channels of
    group h (consumer weights) scales by (kept_g / C_g) (kept_h / C_h); a bias only by its
    own group's factor. MACs are counted per node: a node that produces group g and reads
    group h scales by both factors, a per-channel node (depthwise conv) by g's.
    """

    def __init__(self, model: onnx.ModelProto, groups: list[ChannelGroup], *,
                 layer_costs: dict[str, cost.LayerCost] | None = None, input_shapes: dict | None = None):
        """``layer_costs``: ``cost.layer_costs(model, input_shapes=input_shapes)`` by name, when the
        caller has it already (it runs shape inference)."""
        costs = layer_costs if layer_costs is not None else {
            c.name: c for c in cost.layer_costs(model, input_shapes=input_shapes)}
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
    produces = (Selection,)

    def __init__(self, options=None, **kwargs):
        super().__init__(options, **kwargs)
        self.criterion = criteria.get(self.options.criterion)(self.options)

    @property
    def needs_source(self) -> bool:
        return self.options.needs_source

    def groups(self, model: onnx.ModelProto) -> tuple[list[ChannelGroup], list[dict]]:
        chosen, skipped = [], []
        wanted = set(self.options.groups) | set(self.options.counts or ())
        restricted = bool(wanted) or self.options.counts is not None     # counts {}: no group at all
        found = set()
        for group in find_channel_groups(model):
            if restricted and group.name not in wanted:
                continue
            found.add(group.name)
            if group.skip:
                skipped.append({"group": group.name, "reason": group.skip})
            else:
                chosen.append(group)
        for name in sorted(wanted - found):
            skipped.append({"group": name, "reason": "no such channel group (see `onnxprune inspect`)"})
        return chosen, skipped

    def sites(self, model: onnx.ModelProto) -> list[str]:
        """Sequential mode: one round per channel group to prune."""
        return [g.name for g in self.groups(model)[0]]

    def _requests(self, groups) -> list[tuple[StatRequest, tuple[str, ...]]]:
        return [request for g in groups for request in self.criterion.requests(g)]

    def requests(self, model):
        groups, _ = self.groups(model)
        return self._requests(groups)

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        opts = self.options
        name_nodes(model)       # a no-op in the pipeline (named on entry); groups name their nodes
        groups, skipped = self.groups(model)
        groups = [g for g in groups if g.name not in ctx.selections]
        scope = [g for g in groups if ctx.only_group in (None, g.name)]
        if ctx.only_group is None or ctx.counts is None:
            log.info("select-nodes: %d prunable channel group(s) (%s), %d skipped; criterion %s", len(groups),
                     ", ".join(g.name for g in groups) or "none", len(skipped), opts.criterion)
            for row in skipped:
                log.info("select-nodes: skip %s: %s", row["group"], row["reason"])
        if not scope:
            return PassResult(changed=False, report={"selected": [], "skipped": skipped})
        counts, warnings = ctx.counts, []
        if counts is None:
            # Counts come from every group at once (a global budget couples them), on this graph.
            scores = self._scores(model, groups, ctx)
            counts = self._counts(model, groups, scores, ctx.input_shapes, warnings)
            if ctx.only_group is not None:
                ctx.counts = counts
        else:
            # Sequential mode: which channels, from statistics of the partly pruned graph.
            scores = self._scores(model, scope, ctx)
        groups = scope
        rows = []
        for g in groups:
            k = int(counts[g.name])
            keep = kept_channels(scores[g.name], k, group=g, ridge=opts.ridge)
            sigma = scores[g.name]["sigma"]
            retention = ctx.remembered((self.name, "retention", opts.ridge, np.asarray(keep).tobytes()),
                                       lambda: float(linalg.retention_ratio(sigma, keep, ridge=opts.ridge)), on=(sigma,))
            ctx.selections[g.name] = Selection(group=g, keep=keep, sigma=sigma, criterion=opts.criterion,
                                               retention=retention, folds=scores[g.name]["folds"])
            rows.append({"group": g.name, "channels": g.channels, "kept": k, "retention": retention,
                         "criterion": opts.criterion})
            log.info("select-nodes: %s keeps %d of %d channels (retention %.4f, %s)", g.name, k, g.channels,
                     retention, opts.criterion)
        report = {"selected": rows, "skipped": skipped}
        if warnings:        # once: sequential rounds after the first reuse the counts (ctx.counts)
            report["warnings"] = warnings
        return PassResult(changed=False, report=report)

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
                "select-nodes", opts.criterion, opts.lam, opts.ridge, opts.choose, opts.pool, opts.readout, g.name)
            if key is not None and key in ctx.cache:
                scores[g.name] = ctx.cache[key]
                continue
            scores[g.name] = self._score(model, g, views)
            scores[g.name]["folds"] = fold_moments(views["target"], g, ctx.folds)
            if key is not None:
                ctx.cache[key] = scores[g.name]
        return scores

    def _score(self, model, group: ChannelGroup, views) -> dict:
        """What ranks the group's channels (see ``onnxprune.criteria.Criterion.score``)."""
        return self.criterion.score(model, group, views)

    def _counts(self, model, groups: list[ChannelGroup], scores: dict, input_shapes: dict,
                warnings: list[str]) -> dict[str, int]:
        """Channels to keep per group; a budget that cannot be met adds its line to ``warnings``."""
        opts = self.options
        if opts.counts is not None:
            return {g.name: _whole_units(min(int(opts.counts[g.name]), g.channels), g) for g in groups}
        if opts.fraction is not None:
            counts = {g.name: max(1, math.ceil(opts.fraction * g.channels)) for g in groups}
        elif opts.alpha is not None:
            counts = {g.name: scores[g.name]["ranking"].count_for(opts.alpha) for g in groups}
        elif opts.keep is None and opts.flops is None and groups and \
                self.criterion.count(groups[0], scores[groups[0].name]) is not None:    # pfa-kl's own rule
            counts = {g.name: self.criterion.count(g, scores[g.name]) for g in groups}
        else:
            return self._budget_counts(model, groups, scores, input_shapes, warnings)
        return {g.name: self._rounded(counts[g.name], g) for g in groups}

    def _rounded(self, count: int, group: ChannelGroup) -> int:
        """``count`` rounded up to a multiple of ``multiple`` in wide groups (at most all
        channels): onnxruntime's CPU convolutions work on blocks of 8 or 16 channels, and a
        MobileNetV2 whose expansions keep counts off those blocks runs slower than the
        original (bench/results/pruning.md, g)."""
        m = int(self.options.multiple)
        if group.unit > 1:
            return _whole_units(count, group)
        if m <= 1 or group.channels < WIDE_GROUP:
            return int(count)
        return int(min(group.channels, m * math.ceil(count / m)))

    def _budget_counts(self, model, groups: list[ChannelGroup], scores: dict, input_shapes: dict,
                       warnings: list[str]) -> dict[str, int]:
        """Global budget: one threshold t for every group, the loosest whose counts fit.

        t is a retention ratio (spectral, momasp), a PFA energy (pfa-en, pfa-kl), or a
        fraction of channels (mean, l1). Greedy rankings are extended only as far as the
        search needs: a group whose ranking has not reached t yet counts as "more than
        computed" (a lower bound); when the budget is met even so, the ranking is extended
        and t tried again, so the result is exactly that of full rankings.
        """
        opts = self.options
        footprint = Footprint(model, groups, input_shapes=input_shapes)
        full_params, full_macs = footprint.full()
        index, budget = (0, opts.keep * full_params) if opts.keep is not None else (1, opts.flops * full_macs)
        threshold = self.criterion.threshold

        def counts_at(t: float) -> tuple[dict[str, int], list[Ranking]]:
            out, short = {}, []
            for g in groups:
                s = scores[g.name]
                if threshold == "retention":
                    count, exact = s["ranking"].count_at(t)
                    if not exact:
                        short.append(s["ranking"])
                elif threshold == "energy":
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
        reachable, best = fits(0.0)
        if not reachable:       # even the fewest channels (multiples of `multiple` in wide groups) exceed it
            name, what = ("keep", "parameters") if index == 0 else ("flops", "MACs")
            least = footprint(best)[index] / (full_params, full_macs)[index]
            warnings.append(f"select-nodes: {name} {getattr(opts, name):g} cannot be met: the fewest channels "
                            f"the {len(groups)} group(s) can keep leave {least:.1%} of their layers' {what} "
                            f"(wide groups keep a multiple of {opts.multiple})")
            log.warning("%s", warnings[-1])
        for _ in range(40):
            mid = (lo + hi) / 2
            ok, counts = fits(mid)
            if ok:
                best, lo = counts, mid
            else:
                hi = mid
        ok, counts = fits(1.0)
        chosen = counts if ok else best
        log.debug("select-nodes: global %s budget %.4g of %.4g met at threshold %.4f: %s",
                  "parameter" if index == 0 else "MAC", budget, full_params if index == 0 else full_macs,
                  1.0 if ok else lo, footprint(chosen)[index])
        return chosen


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


def _whole_units(count: int, group: ChannelGroup) -> int:
    """``count`` rounded up to whole units (attention heads) of ``group``; at least one."""
    unit = max(int(getattr(group, "unit", 1)), 1)
    return int(min(group.channels, unit * max(1, math.ceil(count / unit))))


def kept_units(score: dict, count: int, group: ChannelGroup, *, ridge: float) -> np.ndarray:
    """The ``count`` channels of the best ``count / unit`` whole units, sorted: units chosen by
    block spectral retention of the site's second moment when the criterion ranks by retention
    or energy (spectral, MoMaSP, PFA), else by the sum of the criterion's channel ranks."""
    unit, blocks = group.unit, group.channels // group.unit
    n = max(1, count // unit)
    if score.get("ranking") is not None or "spectrum" in score or "pooled_cov" in score:
        chosen = linalg.block_spectral_select(score["sigma"], unit, count=n, ridge=ridge)[0]
    else:
        points = np.empty(group.channels)
        points[np.asarray(score["order"], dtype=np.int64)] = np.arange(group.channels, 0, -1)
        totals = points.reshape(blocks, unit).sum(axis=1)
        chosen = np.argsort(-totals, kind="stable")[:n]
    chosen = np.sort(chosen)
    return (chosen[:, None] * unit + np.arange(unit)[None, :]).reshape(-1).astype(np.int64)


def kept_channels(score: dict, count: int, group: ChannelGroup | None = None,
                  ridge: float = linalg.SELECT_RIDGE) -> np.ndarray:
    """The ``count`` best channels, sorted; PFA's correlation rule when it was asked for;
    whole units (``kept_units``) in a group of units (attention heads)."""
    if group is not None and getattr(group, "unit", 1) > 1:
        return kept_units(score, count, group, ridge=ridge)
    if "pooled_cov" in score:
        return np.sort(np.asarray(linalg.pfa_correlation_select(score["pooled_cov"], count), dtype=np.int64))
    if score.get("ranking") is not None:
        return np.sort(score["ranking"].top(count))
    return np.sort(np.asarray(score["order"][:count], dtype=np.int64))
