"""Models exported with a dynamic height and width (or sequence length) count their MACs at the
size of their samples, not with those dimensions at 1: budgets, plans and reports equal those of
the same model with the dimensions fixed, and the output keeps them dynamic."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxprune import cost
from onnxprune.cli import main
from onnxprune.graph.groups import find_channel_groups
from onnxprune.model import clone, input_specs, load_model
from onnxprune.passes.select_nodes import Footprint

from conftest import run_model


def dynamic(model: onnx.ModelProto, axes: dict[int, str]) -> onnx.ModelProto:
    """``model`` with its first input's dimensions at ``axes`` made symbolic (as a dynamic-axes export)."""
    out = clone(model)
    dims = out.graph.input[0].type.tensor_type.shape.dim
    for axis, name in axes.items():
        dims[axis].dim_param = name
    del out.graph.value_info[:]
    return out


def strided_convs(size: int = 16) -> onnx.ModelProto:
    """x [N,3,H,W] -> Conv 3->8 (stride 1) -> Relu -> Conv 8->8 (stride 2) -> Relu -> Conv 8->4 (stride 2):
    at 16 x 16 the first two Convs cost 16x and 4x the MACs per weight of the last; at 1 x 1 all alike."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in [("w1", (8, 3, 3, 3)), ("w2", (8, 8, 3, 3)), ("w3", (4, 8, 3, 3))]]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ra"], name="r1"),
             helper.make_node("Conv", ["ra", "w2"], ["b"], name="c2", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["b"], ["rb"], name="r2"),
             helper.make_node("Conv", ["rb", "w3"], ["y"], name="c3", pads=[1, 1, 1, 1], strides=[2, 2])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "h", "w"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_sample_shapes_only_for_dynamic_dims():
    fixed = strided_convs()
    free = dynamic(fixed, {2: "H", 3: "W"})
    feeds = {"x": np.zeros((5, 3, 16, 16), np.float32)}
    assert cost.sample_shapes(fixed, feeds) == {}                  # only the batch is symbolic
    assert cost.sample_shapes(free, feeds) == {"x": (1, 3, 16, 16)}
    assert [c.macs for c in cost.layer_costs(free, input_shapes=cost.sample_shapes(free, feeds))] == \
        [c.macs for c in cost.layer_costs(fixed)]
    assert [c.macs for c in cost.layer_costs(free)] != [c.macs for c in cost.layer_costs(fixed)]   # at 1 x 1


def test_footprint_counts_at_the_data_size():
    """A MAC budget's footprint (select-nodes' --flops) weighs the layers as at the data's size."""
    fixed = strided_convs()
    free = dynamic(fixed, {2: "H", 3: "W"})
    shapes = {"x": (1, 3, 16, 16)}
    full = [Footprint(m, find_channel_groups(m), input_shapes=s) for m, s in [(fixed, None), (free, shapes)]]
    counts = {g.name: 2 for g in find_channel_groups(fixed)}
    assert full[0].full() == full[1].full() and full[0](counts) == full[1](counts)
    at_one = Footprint(free, find_channel_groups(free))
    assert at_one.full()[1] != full[0].full()[1]


def test_compress_budget_as_with_fixed_dims(tmp_path):
    """``--flops`` on the dynamic model prunes as on the fixed one, and keeps H and W dynamic."""
    fixed = strided_convs()
    free = dynamic(fixed, {2: "H", 3: "W"})
    x = np.random.default_rng(1).standard_normal((96, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    reports = []
    for name, model in [("fixed", fixed), ("free", free)]:
        onnx.save(model, tmp_path / f"{name}.onnx")
        result = CliRunner().invoke(main, ["compress", str(tmp_path / f"{name}.onnx"), "--target-data",
                                           str(tmp_path / "x.npz"), "--method", "spectral", "--flops", "0.6",
                                           "--allocation", "global", "--no-latency", "-o", str(tmp_path / f"{name}.small.onnx")])
        assert result.exit_code == 0, result.output
        reports.append(json.loads((tmp_path / f"{name}.small.report.json").read_text()))
    kept = [[row["kept"] for p in r["passes"] for row in p.get("selected", [])] for r in reports]
    assert kept[0] == kept[1]
    assert reports[0]["validation"]["macs_candidate"] == reports[1]["validation"]["macs_candidate"]
    assert reports[1]["validation"]["macs_reference"] == cost.total_macs(fixed)
    small = load_model(tmp_path / "free.small.onnx")
    assert input_specs(small)[0].shape[2:] == ("H", "W")
    (out,) = run_model(small, {"x": x[:2, :, :8, :12]})                      # still runs at another size
    assert out.shape == (2, 4, 2, 3)


@pytest.mark.real
def test_resnet20_with_dynamic_height_and_width(shared, tmp_path):
    """ResNet-20 exported with a dynamic H x W: a MAC budget gives the model of the fixed export
    (at 1 x 1, layer3's Convs looked 16x dearer than layer1's), reported at 32 x 32's MACs."""
    fixed = load_model(shared / "models" / "resnet20_cifar10.onnx")
    onnx.save(dynamic(fixed, {2: "H", 3: "W"}), tmp_path / "dyn.onnx")
    data = shared / "data" / "cifar10" / "cifar10_test_jpeg.npz"
    outputs = []
    for name, path in [("fixed", shared / "models" / "resnet20_cifar10.onnx"), ("dyn", tmp_path / "dyn.onnx")]:
        result = CliRunner().invoke(main, ["compress", str(path), "--target-data", str(data), "--mean",
                                           "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--method", "spectral",
                                           "--flops", "0.7", "--allocation", "global", "--calib-size", "128",
                                           "--no-latency", "-o", str(tmp_path / f"{name}.small.onnx")])
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / f"{name}.small.report.json").read_text())
        assert report["validation"]["macs_reference"] == 40_551_040
        outputs.append((report["validation"]["macs_candidate"],
                        run_model(load_model(tmp_path / f"{name}.small.onnx"),
                                  {"input": np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)})))
    assert outputs[0][0] == outputs[1][0] < 0.71 * 40_551_040
    np.testing.assert_allclose(outputs[0][1][0], outputs[1][1][0], rtol=1e-5, atol=1e-5)


@pytest.mark.real
def test_minilm_macs_at_the_sequence_length(shared):
    """The sentence encoder's MACs count at the token rows' length (64 in ../shared), attention
    scores (T^2) included, not at length 1."""
    from onnxprune.data.samples import open_samples
    from onnxprune.validation import validate

    model = load_model(shared / "models" / "minilm_l3_paraphrase.onnx")
    samples = open_samples(shared / "data" / "text" / "sst2_test.npz", model).subset(np.arange(8))
    shapes = cost.sample_shapes(model, samples.batch(np.arange(2)))
    assert shapes == {"input_ids": (1, 64), "attention_mask": (1, 64)}
    costs = {c.name: c.macs for c in cost.layer_costs(model, input_shapes=shapes)}
    at_one = {c.name: c.macs for c in cost.layer_costs(model)}
    scores = [name for name in costs if name.endswith("attention/self/MatMul")]
    assert len(scores) == 3 and all(costs[n] == 64 * 64 * 384 and at_one[n] == 384 for n in scores)
    report = validate(model, model, samples, measure_latency=False)
    assert report.macs_reference == sum(costs.values()) > 64 * sum(at_one.values())


def test_planner_costs_at_the_data_size(tmp_path):
    """The planner's MAC objective (sites' savings, whole-model total) as for the fixed model."""
    from onnxprune.data.samples import open_samples
    from onnxprune.plan.planner import Planner

    fixed = strided_convs()
    free = dynamic(fixed, {2: "H", 3: "W"})
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(1).standard_normal((16, 3, 16, 16)).astype(np.float32))
    planners = [Planner(m, open_samples(tmp_path / "x.npz", m)) for m in (fixed, free)]
    assert planners[1].input_shapes == {"x": (1, 3, 16, 16)} and planners[0].input_shapes == {}
    assert planners[0].costs.total == planners[1].costs.total == cost.total_macs(fixed)
    savings = [[p.costs.saving(site, 4) for site in p.sites if site.family == "prune"] for p in planners]
    assert savings[0] == savings[1] and len(savings[0]) == 2
