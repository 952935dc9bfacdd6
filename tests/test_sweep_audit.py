"""`onnxprune sweep` and `sensitivity` as a first-time user meets them: budgets in odd forms, the
Pareto table's budget column, the original's accuracy when no budget builds a model, the site count."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from onnxprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "lenet_caffe_mnist.onnx"
DATA = ROOT / "models" / "usps_test.npz"
QUICK = ["--calib-size", "200", "--no-latency"]


@pytest.mark.parametrize("budgets, words", [
    ("80%", "'80%' is a percentage: give fractions, e.g. 0.8 for 80%"),
    ("0.9,70%", "'70%' is a percentage: give fractions, e.g. 0.7 for 70%"),
    ("0.9 0.8", "'0.9 0.8' is not a list of numbers like 0.9,0.8,0.7 (commas between them)"),
])
def test_a_percentage_or_a_space_separated_budget_list_says_what_to_write(tmp_path, budgets, words):
    """Not click's "is not a valid float range": the message says how to write the budgets (exit 2,
    nothing written)."""
    from onnxprune.cli import BUDGETS

    with pytest.raises(click.exceptions.BadParameter, match=re.escape(words)):
        BUDGETS.convert(budgets, None, None)
    result = CliRunner().invoke(main, ["sweep", str(MODEL), "--target-data", str(DATA), "--flops", budgets,
                                       "-o", str(tmp_path / "sweep")])
    assert result.exit_code == 2 and words in result.stderr and "Traceback" not in result.output
    assert not list(tmp_path.iterdir())


def test_the_pareto_table_shows_each_budget_as_given():
    """0.004 and 0.125 are two decimals only where two decimals keep them (0.00 and 0.12 before)."""
    from onnxprune.api import pareto_lines

    rows = [{"budget": b, "status": "not reached"} for b in (0.9, 0.125, 0.004)]
    cells = [line.split(" | ")[0] for line in pareto_lines(rows)[2:]]
    assert cells == ["| 0.90", "| 0.125", "| 0.004"]


def test_sensitivity_counts_one_site_in_the_singular(tmp_path):
    result = CliRunner().invoke(main, ["sensitivity", str(MODEL), "--target-data", str(DATA), "--layers", "ip1",
                                       "--method", "spectral", "--calib-size", "200", "-o", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "s.json").read_text())["sensitivity"]) == 1
    assert result.stdout.strip().splitlines()[-1].startswith(f"wrote {tmp_path / 's.json'}, {tmp_path / 's.png'} "
                                                             "(1 site, ")


@pytest.mark.slow
def test_a_sweep_that_builds_no_model_still_prints_the_originals_accuracy(tmp_path):
    """README: sweep prints the sample counts and the original's accuracy; with every budget
    unreachable (or 1.0) no row has a model, and the original's held-out top-1 was left out. It is
    the one a sweep that builds a model reads on the same held-out samples."""
    run = ["sweep", str(MODEL), "--target-data", str(DATA), *QUICK]
    built = CliRunner().invoke(main, [*run, "--flops", "0.5", "-o", str(tmp_path / "built")])
    assert built.exit_code == 0, built.output
    row = json.loads((tmp_path / "built" / "pareto.json").read_text())["budgets"][0]
    none = CliRunner().invoke(main, [*run, "--flops", "1.0,0.01", "-o", str(tmp_path / "none")])
    assert none.exit_code == 0, none.output
    assert not list((tmp_path / "none").glob("*.onnx"))
    assert f"held-out samples (the original: {100 * row['accuracy_reference']:.2f}% top-1)" in none.stdout


def test_sensitivity_refuses_the_target_data_as_source_data(tmp_path):
    """The target file (or a copy) as --source-data: every shift read exactly 0, without a word."""
    import shutil

    copy = tmp_path / "copy.npz"
    shutil.copy(DATA, copy)
    for source, words in ((DATA, "is the --target-data file, so the domain shift would be 0 by construction"),
                          (copy, "holds the same samples as --target-data")):
        result = CliRunner().invoke(main, ["sensitivity", str(MODEL), "--target-data", str(DATA), "--source-data",
                                           str(source), "--calib-size", "100", "-o", str(tmp_path / "s.json")])
        assert result.exit_code == 1 and words in result.output and "Traceback" not in result.output
        assert not (tmp_path / "s.json").exists()
