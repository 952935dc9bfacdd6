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
