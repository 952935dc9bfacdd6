"""--judge-output: a model with several outputs is judged (validation, the planner's damage and
checks) on the output the user names, not on its first float output."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxprune import api
from onnxprune.cli import main
from onnxprune.errors import RecipeError
from onnxprune.model import clone
from onnxprune.plan.planner import Planner

from conftest import run_model
from tests.graphs import get_init, gemm_chain, set_init


def hidden_and_logits() -> onnx.ModelProto:
    """gemm_chain with its fc1 activations exposed as a first output: [hidden (N x 16), y (N x 2)]."""
    model = gemm_chain()
    hidden = next(n for n in model.graph.node if n.name == "relu1").output[0]
    outputs = list(model.graph.output)
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(hidden, onnx.TensorProto.FLOAT, ["N", 16]))
    model.graph.output.extend(outputs)
    return model


def data(model, n=400):
    x = np.random.default_rng(3).standard_normal((n, 8)).astype(np.float32)
    y = run_model(model, {"x": x})[1].argmax(axis=1)          # labels the original gets right
    return {"x": x, "y": y}


def test_validate_judges_the_named_output():
    model = hidden_and_logits()
    broken = clone(model)
    set_init(broken, "fc4.W", -get_init(broken, "fc4.W"))          # logits flipped, hidden untouched
    samples = data(model)
    default = api.validate(model, broken, samples, measure_latency=False)
    judged = api.validate(model, broken, samples, measure_latency=False, judge_output=model.graph.output[1].name)
    assert default.judged == model.graph.output[0].name
    assert default.agreement == 1.0                                 # the hidden output did not change
    assert judged.judged == model.graph.output[1].name
    assert judged.accuracy_reference == 1.0 and judged.accuracy_candidate < 0.2 and judged.agreement < 0.2
    assert judged.relative_error > 1.0 and default.relative_error == 0.0
    with pytest.raises(RecipeError, match="'nope' is not an output of the model"):
        api.validate(model, broken, samples, measure_latency=False, judge_output="nope")


def test_planner_damage_is_measured_on_the_named_output():
    model = hidden_and_logits()
    samples = api.as_samples(data(model, 64), model, {})
    logits = model.graph.output[1].name
    planners = {judge: Planner(model, samples, judge=judge) for judge in (None, logits)}
    assert planners[None].judge is None and planners[logits].judge == logits
    assert planners[logits].reference_outputs().shape == (64, 2)
    assert planners[None].reference_outputs().shape == (64, 16)


def test_compress_judges_and_records_the_output(tmp_path):
    model = hidden_and_logits()
    path, npz, out = tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "small.onnx"
    onnx.save(model, path)
    np.savez(npz, **data(model))
    logits = model.graph.output[1].name
    result = CliRunner().invoke(main, ["compress", str(path), "--target-data", str(npz), "--judge-output", logits,
                                       "--max-drop", "2", "--no-latency", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "small.report.json").read_text())
    assert report["validation"]["judged"] == logits and report["recipe"]["judge_output"] == logits
    assert report["validation"]["accuracy_drop"] <= 2.0
    bad = CliRunner().invoke(main, ["compress", str(path), "--target-data", str(npz), "--judge-output", "nope",
                                    "-o", str(tmp_path / "bad.onnx")])
    assert bad.exit_code == 1 and "'nope' is not an output of the model" in bad.output
    assert not (tmp_path / "bad.onnx").exists()


def test_an_integer_output_cannot_be_judged(tmp_path):
    """MiniLM's export echoes input_ids as an int64 output: judged, it read as an embedding with
    cosine 1.0 after any compression, so every goal passed (and the planner saw no damage)."""
    model = hidden_and_logits()
    logits = model.graph.output[1].name
    model.graph.node.append(onnx.helper.make_node("ArgMax", [logits], ["predicted"], axis=1, keepdims=0))
    model.graph.output.append(onnx.helper.make_tensor_value_info("predicted", onnx.TensorProto.INT64, ["N"]))
    onnx.checker.check_model(model)
    with pytest.raises(RecipeError, match=r"'predicted' is an output of dtype int64, not class scores or an "
                                          r"embedding.*float outputs are"):
        api.validate(model, model, data(model, 40), measure_latency=False, judge_output="predicted")
    path, npz, out = tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "small.onnx"
    onnx.save(model, path)
    np.savez(npz, **data(model))
    result = CliRunner().invoke(main, ["compress", str(path), "--target-data", str(npz), "--judge-output",
                                       "predicted", "-o", str(out)])
    assert result.exit_code == 1 and "'predicted' is an output of dtype int64" in result.output, result.output
    assert not out.exists()
