"""plan/figures.py: the sensitivity table and heat map name the damage the planner measured."""

from __future__ import annotations

import pytest

from onnxprune.plan import figures

ROW = {"size": 8, "of": 16, "keep": 0.5, "saving": 0.1, "damage": 0.01, "relative_squared_error": 0.02}
CURVES = {
    "1 - cosine of the embeddings": {"ffn1": [{**ROW, "cosine": 0.99, "agreement": 0.99}]},
    "KL divergence of the softmax": {"fc1": [{**ROW, "kl": 0.01, "agreement": 0.98}]},
    "relative squared error": {"fc1": [dict(ROW)]},
}


@pytest.mark.parametrize("measure", list(CURVES))
def test_the_table_and_the_heat_map_name_the_damage_measured(measure, tmp_path, monkeypatch):
    curves = CURVES[measure]
    assert f"damage ({measure}) at each size kept" in figures.sensitivity_table(curves)[0]
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig) or path)
    figures.sensitivity_heatmap(curves, tmp_path / "sens.png")
    colour_bar = drawn[0].axes[-1]
    assert colour_bar.get_ylabel() == f"log10 damage ({measure}), site alone"
    assert ("KL" in colour_bar.get_ylabel()) == measure.startswith("KL")


def test_without_matplotlib_the_figures_are_left_out_and_the_rest_written(tmp_path, monkeypatch):
    """sensitivity and sweep write their JSON, tables and models and say which figures they drew:
    none, and an earlier run's at those paths is removed (it ended with exit 4 after all the work)."""
    import sys

    import numpy as np
    import onnx
    from click.testing import CliRunner

    from onnxprune.cli import main
    from tests import graphs

    model, data = tmp_path / "cbr.onnx", tmp_path / "x.npy"
    onnx.save(graphs.conv_bn_relu(), model)
    np.save(data, np.random.default_rng(0).standard_normal((200, 3, 8, 8)).astype(np.float32))
    (tmp_path / "sens.png").write_bytes(b"an earlier run's")
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "pareto.png").write_bytes(b"an earlier run's")
    monkeypatch.setitem(sys.modules, "matplotlib", None)            # import matplotlib raises ImportError
    sens = CliRunner().invoke(main, ["sensitivity", str(model), "--target-data", str(data),
                                     "-o", str(tmp_path / "sens.json")])
    assert sens.exit_code == 0, sens.output
    assert sens.stdout.strip().splitlines()[-1].startswith(f"wrote {tmp_path / 'sens.json'} (5 sites, ")
    assert "matplotlib cannot be imported" in sens.stderr and "no sensitivity heat map drawn" in sens.stderr
    assert (tmp_path / "sens.json").exists() and not (tmp_path / "sens.png").exists()
    sweep = CliRunner().invoke(main, ["sweep", str(model), "--target-data", str(data), "--flops", "0.8",
                                      "-o", f"{tmp_path / 'sweep'}/", "--no-latency"])
    assert sweep.exit_code == 0, sweep.output
    assert sweep.stdout.strip().endswith(f"wrote {tmp_path / 'sweep'}/ (models, reports, pareto.md, pareto.json)")
    assert not (tmp_path / "sweep" / "pareto.png").exists() and (tmp_path / "sweep" / "cbr_macs80.onnx").exists()


def test_sensitivity_without_source_data_flags_an_earlier_runs_shift_chart(tmp_path):
    """The shift chart beside the heat map comes from a run with --source-data only: one an earlier run left
    is named as not from this run (in the output and the JSON), not passed off as this run's."""
    import json

    import numpy as np
    import onnx
    from click.testing import CliRunner

    from onnxprune.cli import main
    from tests import graphs

    model, data = tmp_path / "cbr.onnx", tmp_path / "x.npy"
    onnx.save(graphs.conv_bn_relu(), model)
    np.save(data, np.random.default_rng(0).standard_normal((100, 3, 8, 8)).astype(np.float32))
    stale = tmp_path / "sens_shift.png"
    stale.write_bytes(b"an earlier run's")
    sens = CliRunner().invoke(main, ["sensitivity", str(model), "--target-data", str(data),
                                     "-o", str(tmp_path / "sens.json")])
    assert sens.exit_code == 0, sens.output
    assert sens.stdout.strip().splitlines()[-1] == f"left as it was, from an earlier run with --source-data: {stale}"
    assert json.loads((tmp_path / "sens.json").read_text())["not_from_this_run"] == [str(stale)]
    assert stale.read_bytes() == b"an earlier run's"
