"""Sharded calibration: one deterministic shard of each sample set, and merging shards back.

A sample set of N samples, fed in batches of B, is cut into n shards of whole batches:
shard k (0-based) holds batches ``floor(k * nb / n)`` up to ``floor((k + 1) * nb / n)``
of the ``nb = ceil(N / B)`` batches, so shards are contiguous, disjoint, complete and each
batch of a shard is exactly a batch of the single-process run. ``collect`` is told where
the shard starts (``offset``), so every sample lands in the same fold and sampled patch
positions are drawn from the same seeds as in one process: merged shards equal the
single-process statistics up to the order of float64 additions.

Each shard's header records ``"shard"``: its index, the shard count, the batch size and,
per sample set, the shard's range, the description of the *whole* set (its
``indices_sha`` names exactly which samples it holds) and a sha256 of its content. ``merge_shards`` checks that the
files come from the same model, requests, folds, seed, batch size and sample sets, and that
their indices are disjoint and complete, then adds them in a fixed tree order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import TypeVar

from onnxprune.calibration.stats import Statistics
from onnxprune.errors import CalibrationError

T = TypeVar("T")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (1-based, 1 <= i <= n) -> (i - 1, n); raises CalibrationError otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise CalibrationError("--shard", f"{text!r} is not of the form i/n (e.g. 1/4)")
    i, n = int(match.group(1)), int(match.group(2))
    if n < 1 or not 1 <= i <= n:
        raise CalibrationError("--shard", f"{text!r}: need 1 <= i <= n", "shards are numbered 1/n to n/n")
    return i - 1, n


def shard_ranges(total: int, shards: int, batch_size: int, *, name: str = "samples") -> list[tuple[int, int]]:
    """[(start, stop)] of each of ``shards`` shards of ``total`` samples, in whole batches."""
    batches = -(-int(total) // int(batch_size))
    if shards > batches:
        raise CalibrationError(name, f"cannot cut {total} samples (batches of {batch_size}: {batches}) "
                               f"into {shards} shards of whole batches",
                               "use fewer shards or a smaller --batch-size")
    bounds = [k * batches // shards for k in range(shards + 1)]
    return [(bounds[k] * batch_size, min(bounds[k + 1] * batch_size, total)) for k in range(shards)]


def tree_reduce(items: Sequence[T], combine: Callable[[T, T], T]) -> T:
    """Combine ``items`` pairwise in a fixed balanced tree ((0+1)+(2+3))+...: the result
    depends on the order of ``items`` only, never on which finished first."""
    level = list(items)
    if not level:
        raise ValueError("nothing to combine")
    while len(level) > 1:
        level = [combine(level[i], level[i + 1]) if i + 1 < len(level) else level[i]
                 for i in range(0, len(level), 2)]
    return level[0]


def shard_of(stats: Statistics) -> dict | None:
    """The ``"shard"`` record of a shard's header, or None for complete statistics."""
    return stats.header.get("shard")


# the header fields every shard of one calibration must share (engine and products: how each
# statistic was computed, in-graph or in numpy, from float32 or float64 products; shards of
# different engines agree only to float32 rounding, not to the 1e-10 of one run's shards)
SAME = ("model_hash", "folds", "seed", "requests", "engine", "products")


def merge_shards(parts: Sequence[Statistics], names: Sequence[str] | None = None) -> Statistics:
    """Merge the shards ``parts`` (any order) into the statistics of the whole sample sets.

    ``names`` label the parts in error messages (file names). Raises CalibrationError when
    they do not fit together: another model, recipe (requests), folds, seed, batch size or
    sample set, a repeated or missing shard, or a part that is not a shard.
    """
    names = list(names) if names is not None else [f"part {k + 1}" for k in range(len(parts))]
    if not parts:
        raise CalibrationError("merge-stats", "no statistics given")
    records = []
    for stats, name in zip(parts, names):
        record = shard_of(stats)
        if record is None:
            merged = stats.header.get("merged_shards")
            why = f"merged already, from {merged['count']} shards" if merged else "calibrated without --shard"
            raise CalibrationError(name, f"is not a shard (it was {why})",
                                   "merge the files written by `onnxprune calibrate --shard i/n`")
        records.append(record)
    first, first_name = parts[0], names[0]
    for stats, record, name in zip(parts[1:], records[1:], names[1:]):
        for field in SAME:
            if _canonical(stats.header.get(field)) != _canonical(first.header.get(field)):
                what = {"model_hash": "model", "requests": "recipe (requested statistics)",
                        "engine": "--engine", "products": "--engine (float32 or float64 products)"}.get(field, field)
                raise CalibrationError(name, f"has another {what} than {first_name}",
                                       "merge shards of one `onnxprune calibrate` run only")
        for field, what in (("count", "shard count"), ("batch_size", "batch size")):
            if record.get(field) != records[0].get(field):
                raise CalibrationError(name, f"{what} {record.get(field)} differs from {first_name}'s "
                                       f"{records[0].get(field)}", "merge shards of one calibration run")
        if _canonical(_whole_sets(record)) != _canonical(_whole_sets(records[0])):
            raise CalibrationError(name, f"was calibrated on another sample set than {first_name}",
                                   "give every shard the same data, preprocessing and split")
    count = int(records[0]["count"])
    seen: dict[int, str] = {}
    for record, name in zip(records, names):
        index = int(record["index"])
        if index in seen:
            raise CalibrationError(name, f"repeats shard {index + 1}/{count} (also in {seen[index]})",
                                   "give each shard once")
        seen[index] = name
    missing = sorted(set(range(count)) - set(seen))
    if missing:
        listed = ", ".join(f"{k + 1}/{count}" for k in missing[:8])
        raise CalibrationError("merge-stats", f"shards {listed} missing: the shards are not complete",
                               "calibrate and merge every shard")
    batch = int(records[0]["batch_size"])
    for record, name in zip(records, names):
        for set_name, info in record["sets"].items():
            expected = shard_ranges(int(info["set"]["count"]), count, batch, name=set_name)[int(record["index"])]
            if [int(info["start"]), int(info["stop"])] != list(expected):
                raise CalibrationError(name, f"{set_name} range {info['start']}:{info['stop']} is not shard "
                                       f"{int(record['index']) + 1}/{count} of {info['set']['count']} samples",
                                       "recalibrate the shard")
    order = sorted(range(len(parts)), key=lambda k: int(records[k]["index"]))
    merged = tree_reduce([parts[k] for k in order], _merge_pair)
    return complete(merged, records[0])


def _merge_pair(a: Statistics, b: Statistics) -> Statistics:
    header_a = {k: v for k, v in a.header.items() if k != "shard"}
    header_b = {k: v for k, v in b.header.items() if k != "shard"}
    return Statistics(header_a, a._moments).merge(Statistics(header_b, b._moments))


def complete(merged: Statistics, record: dict) -> Statistics:
    """Header of the whole sets after merging every shard: the sets' own descriptions (as a
    single-process run writes them) and the shard count it was merged from."""
    header = json.loads(json.dumps(merged.header))
    header.pop("shard", None)
    header["sets"] = {name: info["set"] for name, info in record["sets"].items()}
    header["merged_shards"] = {"count": int(record["count"]), "batch_size": int(record["batch_size"])}
    return Statistics(header, merged._moments)


def _whole_sets(record: dict) -> dict:
    """The whole sets' identity (their rows, counts, inputs and preprocessing), not the path
    each machine opened them at."""
    return {name: ({k: v for k, v in (info.get("set") or {}).items() if k not in ("name", "path")},
                   info.get("fingerprint"))
            for name, info in record.get("sets", {}).items()}


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)
