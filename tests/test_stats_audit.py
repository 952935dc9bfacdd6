"""`calibrate` then `compress --stats`, as a first-time user meets it: statistics that do not fit
the run (all of the data where the run holds part out, or the reverse) and statistics files
that are broken inside a valid zip are one line naming the problem, exit 1, nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_cli import DATA, MODEL, assert_user_error, cli

FAST = ["--calib-size", "64", "-q"]


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    """The bundled USPS digits cut in two files: one calibrates, the other is --eval-data."""
    folder = tmp_path_factory.mktemp("halves")
    with np.load(DATA) as d:
        np.savez(folder / "a.npz", x=d["x"][:600], y=d["y"][:600])
        np.savez(folder / "b.npz", x=d["x"][600:900], y=d["y"][600:900])
    return folder


def compress_with(stats, target, out, *extra):
    return cli("compress", MODEL, "--target-data", target, "--stats", stats, "--keep", "0.5", "--no-latency",
               "-o", out, "-q", *extra)


def test_split_one_statistics_ask_for_eval_data(halves, tmp_path):
    """`calibrate --split 1` (README: then evaluate with `compress --eval-data`) and a compress
    without --eval-data: the hint says so, instead of asking for a --split compress cannot take."""
    stats = tmp_path / "all.npz"
    assert cli("calibrate", MODEL, "--target-data", halves / "a.npz", "--split", "1", "-o", stats,
               *FAST).exit_code == 0
    result = compress_with(stats, halves / "a.npz", tmp_path / "c.onnx")
    assert_user_error(result, "the file: --split 1", "--eval-data")
    assert not list(tmp_path.glob("c.*"))
    # and with it, the file serves
    assert compress_with(stats, halves / "a.npz", tmp_path / "c.onnx", "--eval-data", halves / "b.npz").exit_code == 0


def test_part_statistics_with_eval_data_ask_for_split_one(halves, tmp_path):
    stats = tmp_path / "half.npz"
    assert cli("calibrate", MODEL, "--target-data", halves / "a.npz", "-o", stats, *FAST).exit_code == 0
    result = compress_with(stats, halves / "a.npz", tmp_path / "c.onnx", "--eval-data", halves / "b.npz")
    assert_user_error(result, "the file: --split 0.5", "calibrate with --split 1")
    assert not list(tmp_path.glob("c.*"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    stats = tmp_path_factory.mktemp("saved") / "stats.npz"
    assert cli("calibrate", MODEL, "--target-data", DATA, "-o", stats, *FAST).exit_code == 0
    with np.load(stats) as d:
        return {k: d[k] for k in d.files}


def _edit_header(arrays, **fields):
    header = json.loads(str(arrays["header"]))
    header.update(fields)
    return {**arrays, "header": np.array(json.dumps(header))}


def _small_gram(arrays):
    key = next(k for k in arrays if k.endswith("/gram"))
    return {**arrays, key: arrays[key][:3, :3]}


@pytest.mark.parametrize("broken, words", [
    (lambda a: _edit_header(a, format=2), ("format 2", "reads format 1")),
    (lambda a: _edit_header(a, sets=5), ("not a statistics file", "header")),
    (_small_gram, ("not a statistics file", "(3, 3)")),
], ids=["newer-format", "header-field", "gram-shape"])
def test_a_broken_statistics_file_is_one_line(saved, tmp_path, broken, words):
    """A zip that holds statistics arrays but not ones that fit (hand-edited, another version's
    layout) is a user error before any work, not a traceback from a pass (exit 4)."""
    path = tmp_path / "broken.npz"
    np.savez(path, **broken(saved))
    before = path.read_bytes()
    result = compress_with(path, DATA, tmp_path / "c.onnx", "--allocation", "global", "--calib-size", "64")
    assert_user_error(result, *words)
    assert path.read_bytes() == before and not list(tmp_path.glob("c.*"))
