"""Recovery training ([train] extra): ONNX <-> torch round trip, distillation, Co-Prune."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main
from tests.conftest import run_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def mlp(seed: int, *, hidden: int = 16, classes: int = 4, features: int = 8, noise: float = 0.0,
        base: int | None = None) -> onnx.ModelProto:
    """x[N,8] -> Gemm -> Relu -> Gemm -> logits[N,4], opset 13, IR 8; weights from ``base``'s seed
    plus ``noise`` (a perturbed copy of the same network)."""
    rng = np.random.default_rng(seed if base is None else base)
    w1 = rng.standard_normal((hidden, features)).astype(np.float32) / np.sqrt(features)
    b1 = rng.standard_normal(hidden).astype(np.float32) * 0.1
    w2 = rng.standard_normal((classes, hidden)).astype(np.float32) / np.sqrt(hidden)
    b2 = np.zeros(classes, np.float32)
    if noise:
        r2 = np.random.default_rng(seed)
        w1 = w1 + noise * r2.standard_normal(w1.shape).astype(np.float32) / np.sqrt(features)
        w2 = w2 + noise * r2.standard_normal(w2.shape).astype(np.float32) / np.sqrt(hidden)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], transB=1, name="fc2")],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(a.astype(np.float32), n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def shared_models():
    names = ["lenet_caffe_mnist.onnx", "mnist_cnn_fc3136.onnx", "mnist_extdata/mnist.onnx",
             "resnet20_cifar10.onnx", "mobilenetv2_imagenet_fp32.onnx", "minilm_l3_paraphrase.onnx"]
    return [pytest.param(n, marks=[pytest.mark.real] + ([pytest.mark.slow] if "minilm" in n or "mobilenet" in n
                                                         else [])) for n in names]


def random_feeds(model, rng, batch=3):
    from onnxprune.model import input_specs

    feeds = {}
    for spec in input_specs(model):
        shape = [batch] + [d if isinstance(d, int) and d > 0 else 12 for d in spec.shape[1:]]
        if np.issubdtype(spec.dtype, np.integer):
            feeds[spec.name] = (rng.integers(1, 1000, size=shape) if "ids" in spec.name
                                else np.ones(shape)).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def assert_round_trip(model: onnx.ModelProto, feeds):
    torch = pytest.importorskip("torch")
    from onnxprune.train.convert import to_onnx, to_torch, verify

    module = to_torch(model)
    assert verify(model, module, feeds) < 1e-4
    back = to_onnx(module)
    # unchanged weights: the same graph, byte for byte where the weights are stored inline
    assert [n.SerializeToString() for n in back.graph.node] == [n.SerializeToString() for n in model.graph.node]
    for a, b in zip(run_model(model, feeds), run_model(back, feeds)):
        np.testing.assert_array_equal(a, b)
    # trained weights: the exported ONNX computes what the torch module computes
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(1.01).add_(0.001)
    back = to_onnx(module)
    assert back.ir_version == model.ir_version and list(back.opset_import) == list(model.opset_import)
    assert [i.name for i in back.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in back.graph.output] == [o.name for o in model.graph.output]
    assert [n.op_type for n in back.graph.node] == [n.op_type for n in model.graph.node]
    if back.ByteSize() < 2 ** 31:
        onnx.checker.check_model(back, full_check=True)
    assert verify(back, module, feeds) < 1e-4


def test_round_trip_tiny_model():
    pytest.importorskip("torch")
    assert_round_trip(mlp(0), {"x": np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)})


@pytest.mark.parametrize("name", shared_models())
def test_round_trip_preserves_outputs_on_shared_models(name, shared):
    pytest.importorskip("torch")
    from onnxprune.model import load_model

    model = load_model(shared / "models" / name)
    assert_round_trip(model, random_feeds(model, np.random.default_rng(0)))


@pytest.mark.real
@pytest.mark.parametrize("method,budget", [("dalr-bc", ["--keep", "0.05"]), ("spectral", ["--flops", "0.5"])])
def test_round_trip_on_compressed_models(method, budget, shared, tmp_path):
    """Low-rank split graphs (two thin layers per FC) and channel-pruned graphs convert and export."""
    pytest.importorskip("torch")
    from onnxprune.model import load_model

    out = tmp_path / "small.onnx"
    result = CliRunner().invoke(main, ["compress", str(shared / "models/mnist_cnn_fc3136.onnx"), "--target-data",
                                       str(shared / "data/digits/usps_test.npz"), "--calib-size", "200",
                                       "--method", method, *budget, "--mean", "0.5", "--std", "0.5",
                                       "--no-latency", "-q", "-o", str(out)])
    assert result.exit_code == 0, result.output
    model = load_model(out)
    assert_round_trip(model, random_feeds(model, np.random.default_rng(1)))


def test_distillation_recovers_a_known_teacher():
    """A perturbed copy of a small network, distilled on unlabelled inputs, comes back to its teacher."""
    pytest.importorskip("torch")
    from onnxprune.data.samples import open_samples
    from onnxprune.train.distill import TrainConfig, finetune

    teacher, student = mlp(0), mlp(1, noise=1.5, base=0)
    x = np.random.default_rng(2).standard_normal((600, 8)).astype(np.float32)
    samples = open_samples({"x": x[:400]}, student)
    held = {"x": x[400:]}
    t_out = run_model(teacher, held)[0]

    def agreement(model):
        return float((run_model(model, held)[0].argmax(1) == t_out.argmax(1)).mean())

    def error(model):
        return float(np.linalg.norm(run_model(model, held)[0] - t_out) / np.linalg.norm(t_out))

    before_agreement, before_error = agreement(student), error(student)
    tuned, report = finetune(student, teacher, samples, config=TrainConfig(epochs=40, lr=3e-2, batch_size=32,
                                                                           temperature=2.0, patience=None,
                                                                           progress=False))
    assert before_agreement < 0.6
    assert agreement(tuned) > 0.88 and agreement(tuned) > before_agreement + 0.3
    assert error(tuned) < 0.5 * before_error
    assert report["curve"][-1]["val_agreement"] >= report["curve"][0]["val_agreement"]
    assert report["best_epoch"] > 0 and report["export_error"] < 1e-4
    # the graph is the student's, only the weights changed
    assert [n.SerializeToString() for n in tuned.graph.node] == [n.SerializeToString() for n in student.graph.node]


def test_training_leaves_the_callers_torch_random_stream_and_threads_as_they_were():
    """finetune and coprune seed torch for their own run; the caller's global random state (a notebook's
    torch.manual_seed) and thread count are what they were before, as for BLAS's threads."""
    torch = pytest.importorskip("torch")
    from onnxprune.data.samples import open_samples
    from onnxprune.train.coprune import CoPruneConfig, coprune
    from onnxprune.train.distill import TrainConfig, finetune

    teacher, student = mlp(0), mlp(1, noise=0.5, base=0)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    labelled = open_samples({"x": x, "y": rng.integers(0, 4, 64)}, student)
    torch.manual_seed(123)
    state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    finetune(student, teacher, open_samples({"x": x}, student), config=TrainConfig(epochs=1, progress=False))
    assert torch.equal(torch.random.get_rng_state(), state) and torch.get_num_threads() == threads
    coprune(teacher, student, labelled, labelled, config=CoPruneConfig(keep=0.5, alphas=(0.5,), max_epochs=1,
                                                                       progress=False))
    assert torch.equal(torch.random.get_rng_state(), state) and torch.get_num_threads() == threads


def test_plain_finetuning_needs_labels_or_teacher(tmp_path):
    pytest.importorskip("torch")
    onnx.save(mlp(0), str(tmp_path / "m.onnx"))
    np.save(tmp_path / "x.npy", np.zeros((20, 8), np.float32))
    result = CliRunner().invoke(main, ["finetune", str(tmp_path / "m.onnx"), "--target-data", str(tmp_path / "x.npy"),
                                       "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code == 1
    assert "no labels and no teacher" in result.output
    assert not (tmp_path / "out.onnx").exists()


def test_a_student_that_is_its_teacher_is_refused_unless_labels_train_it(tmp_path):
    pytest.importorskip("torch")
    onnx.save(mlp(0), str(tmp_path / "m.onnx"))
    onnx.save(mlp(0), str(tmp_path / "copy.onnx"))
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32))
    args = ["finetune", str(tmp_path / "m.onnx"), "--teacher", str(tmp_path / "copy.onnx"), "--epochs", "1",
            "-o", str(tmp_path / "out.onnx")]
    result = CliRunner().invoke(main, args + ["--target-data", str(tmp_path / "x.npy")])
    assert result.exit_code == 1, result.output
    assert "is the teacher" in result.output and "copy.onnx" in result.output
    assert not (tmp_path / "out.onnx").exists()
    # with labels and --label-weight the original is fine-tuned, the teacher keeping it close
    np.savez(tmp_path / "xy.npz", x=np.load(tmp_path / "x.npy"), labels=np.arange(40) % 4)
    result = CliRunner().invoke(main, args + ["--target-data", str(tmp_path / "xy.npz"), "--label-weight", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.onnx").exists()


def test_commands_name_the_extra_when_torch_is_missing(tmp_path, monkeypatch):
    onnx.save(mlp(0), str(tmp_path / "m.onnx"))
    np.save(tmp_path / "x.npy", np.zeros((20, 8), np.float32))
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    for args in (["finetune", str(tmp_path / "m.onnx"), "--teacher", str(tmp_path / "m.onnx")],
                 ["coprune", "--source-model", str(tmp_path / "m.onnx"), "--target-model", str(tmp_path / "m.onnx"),
                  "--source-data", str(tmp_path / "x.npy"), "--keep", "0.1"],
                 ["compress", str(tmp_path / "m.onnx"), "--finetune", "1", "--keep", "0.5"]):
        result = CliRunner().invoke(main, args + ["--target-data", str(tmp_path / "x.npy"),
                                                  "-o", str(tmp_path / "out.onnx")])
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and '.[train]' in lines[0], result.output
        assert not (tmp_path / "out.onnx").exists()


def test_coprune_mask_rule_on_constructed_weights():
    torch = pytest.importorskip("torch")
    from onnxprune.train.coprune import CoPruneConfig, cooperative_masks, keep_counts, masks_from

    w_s = {"a": torch.tensor([[4.0, 0.1, 3.0, 0.2]]), "b": torch.tensor([0.5, 0.4, 0.3, 0.05])}
    w_t = {"a": torch.tensor([[0.1, 5.0, 0.2, 2.0]]), "b": torch.tensor([-0.05, 0.1, -0.6, 0.7])}
    # per layer, keep 2 of 4: source mask from |W_s| alone; target from 0.5|W_s| + 0.5|W_t|
    counts = keep_counts({"a": 4, "b": 4}, CoPruneConfig(keep=0.5, allocation="layer"))
    assert counts == {"a": 2, "b": 2}
    m_s, m_t = cooperative_masks(torch, w_s, w_t, 0.5, counts)
    assert m_s["a"].tolist() == [[1, 0, 1, 0]] and m_s["b"].tolist() == [1, 1, 0, 0]
    # fused a: [2.05, 2.55, 1.6, 1.1] -> keep positions 0, 1; fused b: [0.275, 0.25, 0.45, 0.375] -> 2, 3
    assert m_t["a"].tolist() == [[1, 1, 0, 0]] and m_t["b"].tolist() == [0, 0, 1, 1]
    # alpha 0: the target's own magnitudes (the baseline); alpha 1: the source mask
    _, m0 = cooperative_masks(torch, w_s, w_t, 0.0, counts)
    assert m0["a"].tolist() == [[0, 1, 0, 1]] and m0["b"].tolist() == [0, 0, 1, 1]
    _, m1 = cooperative_masks(torch, w_s, w_t, 1.0, counts)
    assert all(torch.equal(m1[k], m_s[k]) for k in m_s)
    # one global threshold: the 4 largest of all 8 fused values, wherever they are
    total = keep_counts({"a": 4, "b": 4}, CoPruneConfig(keep=0.5))
    assert total == 4
    g = masks_from(torch, {k: 0.5 * w_s[k].abs() + 0.5 * w_t[k].abs() for k in w_s}, total)
    assert g["a"].tolist() == [[1, 1, 1, 1]] and g["b"].tolist() == [0, 0, 0, 0]
    # a fixed layer ratio, the rest under one threshold
    mixed = keep_counts({"a": 4, "b": 4}, CoPruneConfig(keep=0.5, layer_keep=(("b", 0.25),)))
    assert mixed == {"b": 1, "__global__": 3}
    m = masks_from(torch, {k: w_t[k].abs() for k in w_t}, mixed)
    assert m["b"].tolist() == [0, 0, 0, 1] and m["a"].tolist() == [[0, 1, 1, 1]]
    # signed fusion (the paper's eq. 4), |0.5 W_s + 0.5 W_t|: b's position 2 flipped sign in fine-tuning
    # (0.3 -> -0.6) and scores |-0.15| = 0.15 instead of 0.45: b [0.225, 0.25, 0.15, 0.375] keeps 1, 3
    _, m_signed = cooperative_masks(torch, w_s, w_t, 0.5, counts, "signed")
    assert m_signed["b"].tolist() == [0, 1, 0, 1] and m_signed["a"].tolist() == [[1, 1, 0, 0]]
    with pytest.raises(Exception, match="--fusion"):
        CoPruneConfig(keep=0.5, fusion="mean")


def test_straight_through_mask_passes_dense_gradients():
    torch = pytest.importorskip("torch")
    from onnxprune.train.convert import to_torch

    module = to_torch(mlp(0))
    w1 = module.weight("w1")
    mask = torch.zeros_like(w1)
    mask[:, :4] = 1
    module.masks = {"w1": mask}
    x = torch.randn(5, 8)
    out = module(x)[0]
    ref = torch.relu(x @ (w1 * mask).T + module.weight("b1")) @ module.weight("w2").T + module.params["w_b2"]
    assert torch.allclose(out, ref, atol=1e-6)
    out.sum().backward()
    assert (w1.grad[:, 4:] != 0).any()  # pruned weights still receive gradient


def test_coprune_cli_writes_a_sparse_target(tmp_path):
    pytest.importorskip("torch")
    source, target = mlp(0), mlp(1, noise=0.3, base=0)
    onnx.save(source, str(tmp_path / "s.onnx"))
    onnx.save(target, str(tmp_path / "t.onnx"))
    rng = np.random.default_rng(3)
    xs, xt = rng.standard_normal((200, 8)).astype(np.float32), rng.standard_normal((200, 8)).astype(np.float32) + 0.5
    np.savez(tmp_path / "src.npz", x=xs, y=run_model(source, {"x": xs})[0].argmax(1))
    np.savez(tmp_path / "tgt.npz", x=xt, y=run_model(target, {"x": xt})[0].argmax(1))
    out = tmp_path / "pruned.onnx"
    for alpha in ("0.7,0.5,0.3", "0"):
        result = CliRunner().invoke(main, ["coprune", "--source-model", str(tmp_path / "s.onnx"), "--target-model",
                                           str(tmp_path / "t.onnx"), "--source-data", str(tmp_path / "src.npz"),
                                           "--target-data", str(tmp_path / "tgt.npz"), "--keep", "0.25",
                                           "--alpha", alpha, "--max-epochs", "2", "--no-latency", "-o", str(out)])
        assert result.exit_code == 0, result.output
        pruned = onnx.load(str(out))
        w = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
        assert np.count_nonzero(w["w1"]) + np.count_nonzero(w["w2"]) == round(0.25 * (128 + 64))
        assert [n.SerializeToString() for n in pruned.graph.node] == [n.SerializeToString() for n in target.graph.node]
        report = json.loads(out.with_name("pruned.report.json").read_text())
        assert report["coprune"]["method"].startswith("co-prune" if alpha != "0" else "target-only")
        assert len({row["stage"] for row in report["coprune"]["curve"][1:]}) == 3
        assert "no faster" in report["coprune"]["note"]


def test_compress_then_finetune_on_the_bundled_sample(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "small.onnx"
    result = CliRunner().invoke(main, ["compress", str(ROOT / "models/lenet_caffe_mnist.onnx"), "--target-data",
                                       str(ROOT / "models/usps_test.npz"), "--keep", "0.03", "--allocation", "global",
                                       "--calib-size", "150", "--finetune", "2",
                                       "--no-latency", "-q", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_name("small.report.json").read_text())
    before, after = report["validation_before_finetune"], report["validation"]
    # trains on the whole calibration half (--calib-size only caps the statistics), never on the evaluation half
    ev = report["evaluation"]
    assert report["finetune"]["train_samples"] + report["finetune"]["val_samples"] == ev["source_count"] - ev["count"]
    assert report["finetune"]["val_samples"] == round(0.1 * (ev["source_count"] - ev["count"]))  # a budget: a tenth
    assert report["finetune"]["data"]["indices_sha"] != report["evaluation"]["indices_sha"]
    assert after["agreement"] >= before["agreement"] - 0.02
    assert after["params_candidate"] == before["params_candidate"]


def test_finetune_cli_with_an_explicit_checkpoint_fold(tmp_path):
    """--val-data: the checkpoint fold is exactly those samples (e.g. ones that did not calibrate)."""
    pytest.importorskip("torch")
    teacher, student = mlp(0), mlp(1, noise=1.0, base=0)
    onnx.save(teacher, str(tmp_path / "t.onnx"))
    onnx.save(student, str(tmp_path / "s.onnx"))
    x = np.random.default_rng(4).standard_normal((130, 8)).astype(np.float32)
    y = run_model(teacher, {"x": x})[0].argmax(1)
    np.save(tmp_path / "train.npy", x[:80])
    np.save(tmp_path / "val.npy", x[80:100])
    np.savez(tmp_path / "eval.npz", x=x[100:], y=y[100:])
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["finetune", str(tmp_path / "s.onnx"), "--teacher", str(tmp_path / "t.onnx"),
                                       "--target-data", str(tmp_path / "train.npy"), "--val-data",
                                       str(tmp_path / "val.npy"), "--eval-data", str(tmp_path / "eval.npz"),
                                       "--epochs", "2", "--no-latency", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_name("out.report.json").read_text())
    assert report["finetune"]["train_samples"] == 80 and report["finetune"]["val_samples"] == 20
    assert report["validation"]["samples"] == 30 and "accuracy_reference" in report["validation"]


def deep_mlp(w1_noise: float = 0.0) -> onnx.ModelProto:
    """x[N,8] -> fc1 -> Relu -> fc2 -> Relu -> fc3 -> logits[N,4]; ``w1_noise`` perturbs fc1's weight only
    (a student whose one rewritten layer is fc1)."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((16, 8)) / np.sqrt(8)).astype(np.float32)
    w2 = rng.standard_normal((16, 16)).astype(np.float32) / 4
    w3 = rng.standard_normal((4, 16)).astype(np.float32) / 4
    if w1_noise:
        w1 = (w1 + w1_noise * np.random.default_rng(1).standard_normal(w1.shape) / np.sqrt(8)).astype(np.float32)
    zeros = [np.zeros(16, np.float32), np.zeros(16, np.float32) + 0.1, np.zeros(4, np.float32)]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], transB=1, name="fc1"),
         helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
         helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], transB=1, name="fc2"),
         helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
         helper.make_node("Gemm", ["r2", "w3", "b3"], ["logits"], transB=1, name="fc3")],
        "deep_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (zeros[0], "b1"), (w2, "w2"), (zeros[1], "b2"),
                                                    (w3, "w3"), (zeros[2], "b3"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_feature_targets_are_the_rewritten_layers_outputs():
    """Only the weight that differs from the teacher is rewritten; its layer's output is the feature target."""
    pytest.importorskip("torch")
    from onnxprune.train.distill import feature_candidates, rewritten_weights

    teacher, student = deep_mlp(), deep_mlp(w1_noise=1.0)
    assert rewritten_weights(student, teacher) == {"w1"}
    assert feature_candidates(student, teacher) == ["h1"]
    assert rewritten_weights(teacher, teacher) == set() and feature_candidates(teacher, teacher) == []


def test_feature_distillation_of_the_rewritten_layer_only():
    """--train-layers rewritten --feature-weight: only fc1 trains, its output comes back to the teacher's,
    the other weights are bit-identical, and the feature loss beats output-only distillation on fc1's output."""
    pytest.importorskip("torch")
    from onnxprune.data.samples import open_samples
    from onnxprune.train.distill import TrainConfig, finetune

    teacher, student = deep_mlp(), deep_mlp(w1_noise=1.0)
    x = np.random.default_rng(2).standard_normal((400, 8)).astype(np.float32)
    samples = open_samples({"x": x[:300]}, student)
    held = {"x": x[300:]}

    def hidden_error(model):
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.append(helper.make_tensor_value_info("h1", TensorProto.FLOAT, None))
        ref = run_model(teacher_probe, held)[1]
        return float(np.linalg.norm(run_model(probe, held)[1] - ref) / np.linalg.norm(ref))

    teacher_probe = onnx.ModelProto()
    teacher_probe.CopyFrom(teacher)
    teacher_probe.graph.output.append(helper.make_tensor_value_info("h1", TensorProto.FLOAT, None))
    base = dict(epochs=15, lr=2e-2, batch_size=32, patience=None, progress=False, train_layers="rewritten")
    feat, report = finetune(student, teacher, samples, config=TrainConfig(feature_weight=10.0, **base))
    plain, _ = finetune(student, teacher, samples, config=TrainConfig(feature_weight=0.0, **base))
    assert report["feature_targets"] == ["h1"] and report["trainable_tensors"] == 1
    before = hidden_error(student)
    assert hidden_error(feat) < 0.2 * before
    assert hidden_error(feat) < hidden_error(plain)
    weights = {t.name: numpy_helper.to_array(t) for t in feat.graph.initializer}
    for t in student.graph.initializer:
        if t.name != "w1":
            assert np.array_equal(weights[t.name], numpy_helper.to_array(t)), t.name
    assert not np.array_equal(weights["w1"], numpy_helper.to_array(student.graph.initializer[0]))


def test_finetune_cli_feature_weight_and_rewritten_layers(tmp_path):
    """The flags reach the training: the report names the feature target and counts only fc1's weight."""
    pytest.importorskip("torch")
    onnx.save(deep_mlp(), str(tmp_path / "t.onnx"))
    onnx.save(deep_mlp(w1_noise=1.0), str(tmp_path / "s.onnx"))
    x = np.random.default_rng(5).standard_normal((120, 8)).astype(np.float32)
    np.save(tmp_path / "train.npy", x[:80])
    np.save(tmp_path / "eval.npy", x[80:])
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["finetune", str(tmp_path / "s.onnx"), "--teacher", str(tmp_path / "t.onnx"),
                                       "--target-data", str(tmp_path / "train.npy"), "--eval-data",
                                       str(tmp_path / "eval.npy"), "--epochs", "2", "--feature-weight", "2",
                                       "--train-layers", "rewritten", "--no-latency", "-q", "-o", str(out)])
    assert result.exit_code == 0, result.output
    ft = json.loads(out.with_name("out.report.json").read_text())["finetune"]
    assert ft["feature_targets"] == ["h1"] and ft["trainable_weights"] == 16 * 8
    assert ft["config"]["feature_weight"] == 2.0 and ft["config"]["train_layers"] == "rewritten"
    bad = CliRunner().invoke(main, ["finetune", str(tmp_path / "s.onnx"), "--target-data", str(tmp_path / "train.npy"),
                                    "--feature-weight", "-1", "-o", str(tmp_path / "bad.onnx")])
    assert bad.exit_code == 2 and not (tmp_path / "bad.onnx").exists()


def test_checkpoint_rule_follows_the_fold_size():
    """auto: a fold under 100 samples picks the epoch by held-out output loss (the chosen epoch has the
    lowest one), a larger fold by agreement; the report says which."""
    pytest.importorskip("torch")
    from onnxprune.data.samples import open_samples
    from onnxprune.train.distill import SMALL_FOLD, TrainConfig, finetune

    teacher, student = mlp(0), mlp(1, noise=1.5, base=0)
    x = np.random.default_rng(3).standard_normal((300, 8)).astype(np.float32)
    config = dict(epochs=4, lr=1e-2, batch_size=32, patience=None, progress=False)
    _, small = finetune(student, teacher, open_samples({"x": x[:200]}, student), config=TrainConfig(**config))
    assert small["val_samples"] < SMALL_FOLD and small["checkpoint_by"] == "held-out output loss"
    losses = [row["val_output_loss"] for row in small["curve"]]
    assert small["best_epoch"] == int(np.argmin(losses))
    _, forced = finetune(student, teacher, open_samples({"x": x[:200]}, student),
                         config=TrainConfig(checkpoint="agreement", **config))
    assert forced["checkpoint_by"] == "held-out agreement/accuracy"
    best = max(row["val_agreement"] for row in forced["curve"])
    assert forced["curve"][forced["best_epoch"]]["val_agreement"] == best
    # last: the fold only reports (compress --max-drop --finetune decides its plan on it)
    last_model, last = finetune(student, teacher, open_samples({"x": x[:200]}, student),
                                config=TrainConfig(checkpoint="last", **config))
    assert last["checkpoint_by"] == "last epoch" and last["best_epoch"] == 4 == len(last["curve"]) - 1
    assert forced["best_epoch"] != 4 or forced["curve"][4]["val_agreement"] == best


@pytest.mark.parametrize("options, flag", [
    (dict(patience=0), "--patience"), (dict(max_seconds=-5.0), "--max-minutes"),
    (dict(max_seconds=float("nan")), "--max-minutes"), (dict(lr=float("inf")), "--lr"),
    (dict(temperature=float("nan")), "--temperature"), (dict(label_weight=float("nan")), "--label-weight"),
    (dict(feature_weight=float("inf")), "--feature-weight"), (dict(epochs=0), "--epochs"),
    # of the wrong type: one RecipeError too, not a TypeError from math.isfinite or a late one from numpy
    (dict(lr="1e-3"), "--lr"), (dict(val_fraction="0.1"), "--val-fraction"), (dict(seed="0"), "--seed"),
    (dict(max_seconds="60"), "--max-minutes"), (dict(label_weight=True), "--label-weight"),
])
def test_train_config_refuses_values_out_of_range(options, flag):
    """The Python API's options fail as the flags do: onnxprune's RecipeError naming the flag."""
    from onnxprune.errors import RecipeError
    from onnxprune.train.distill import TrainConfig

    with pytest.raises(RecipeError, match=flag):
        TrainConfig(**options)


def test_coprune_config_refuses_a_learning_rate_that_is_not_finite():
    from onnxprune.errors import RecipeError
    from onnxprune.train.coprune import CoPruneConfig

    for lr in (float("nan"), float("inf"), 0.0, "1e-3"):
        with pytest.raises(RecipeError, match="--lr"):
            CoPruneConfig(keep=0.5, lr=lr)
    for options, flag in ((dict(keep="0.1"), "--keep"), (dict(alphas=0.5), "--alpha"),
                          (dict(patience="3"), "--patience"), (dict(seed=-1), "--seed"),
                          (dict(val_fraction="0.1"), "--val-fraction")):
        with pytest.raises(RecipeError, match=flag):
            CoPruneConfig(**{"keep": 0.5, **options})


def test_training_entry_points_refuse_a_config_of_the_wrong_type(tmp_path):
    """finetune_files / coprune_files with a dict or a number as config: one RecipeError naming config,
    not an AttributeError from inside the training."""
    pytest.importorskip("torch")
    from onnxprune.errors import RecipeError
    from onnxprune.train.api import coprune_files, finetune_files

    model = mlp(0)
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    for config in ({"epochs": 1}, 3):
        with pytest.raises(RecipeError, match="config .*must be an onnxprune.train.distill.TrainConfig"):
            finetune_files(model, tmp_path / "out.onnx", x, teacher=model, config=config, progress=False)
    with pytest.raises(RecipeError, match="config .*must be an onnxprune.train.coprune.CoPruneConfig"):
        coprune_files(model, model, x, x, tmp_path / "out.onnx", config={"keep": 0.5})
    assert not list(tmp_path.iterdir())


LENET = ROOT / "models/lenet_caffe_mnist.onnx"
USPS = ROOT / "models/usps_test.npz"


def usps_files(folder: Path, **parts) -> dict[str, Path]:
    """Small .npz files of the bundled USPS digits: ``name=(start, stop)`` for x and y, ``name=(start, stop,
    "nolabels")`` for x alone, ``name=(start, stop, bad)`` with label 12 at row ``bad`` (LeNet has 10 classes)."""
    with np.load(USPS) as full:
        x, y = full["x"], full["y"]
    files = {}
    for name, (start, stop, *how) in parts.items():
        path = folder / f"{name}.npz"
        labels = y[start:stop].copy()
        if how and how[0] == "nolabels":
            np.savez(path, x=x[start:stop])
        else:
            if how:
                labels[how[0]] = 12
            np.savez(path, x=x[start:stop], y=labels)
        files[name] = path
    return files


def one_line_error(result, *words, code=1):
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("where", ["target", "target+teacher", "eval", "val", "coprune target", "coprune source",
                                   "coprune eval"])
def test_labels_outside_the_models_classes_are_a_data_error(tmp_path, where):
    """compress's check: labels outside 0..classes-1 anywhere a training reads or is scored are one line naming
    the file, exit 1, nothing written (not an IndexError in the loss, nor misses in the accuracy)."""
    pytest.importorskip("torch")
    f = usps_files(tmp_path, good=(0, 60), other=(60, 120), bad=(120, 180, 7))
    target = f["bad"] if where in ("target", "target+teacher", "coprune target") else f["good"]
    out = tmp_path / "out" / "o.onnx"
    if where.startswith("coprune"):
        args = ["coprune", "--source-model", LENET, "--target-model", LENET, "--keep", "0.5", "--max-epochs", "1",
                "--source-data", f["bad"] if where == "coprune source" else f["other"], "--target-data", target]
        args += ["--eval-data", f["bad"]] if where == "coprune eval" else []
    else:
        args = ["finetune", LENET, "--target-data", target, "--epochs", "1"]
        args += ["--teacher", LENET] if where != "target" else []
        args += {"eval": ["--eval-data", f["bad"]], "val": ["--val-data", f["bad"]]}.get(where, [])
    result = CliRunner().invoke(main, [str(a) for a in args] + ["--no-latency", "-q", "-o", str(out)])
    one_line_error(result, f"{f['bad']} | has labels 0..12, but the model answers with 10 classes")
    assert not out.parent.exists()


@pytest.mark.parametrize("command, flags, words", [
    ("finetune", ("--eval-data", "TARGET"), "is the --target-data file, which trains in full"),
    ("finetune", ("--val-data", "TARGET"), "is the --target-data file, which trains: a checkpoint picked on it"),
    ("finetune", ("--val-data", "OTHER", "--eval-data", "OTHER"), "is the --eval-data file, so the checkpoint"),
    ("coprune", ("--eval-data", "TARGET"), "is the --target-data file, which trains in full"),
    ("finetune", ("--eval-data", "COPY"), "holds the same samples as --target-data"),
    ("coprune", ("--eval-data", "COPY"), "holds the same samples as --target-data"),
    ("coprune", ("--eval-data", "SOURCE_COPY"), "holds the same samples as --source-data"),
    ("finetune", ("--val-data", "COPY", "--eval-data", "OTHER"), "holds the same samples as --target-data"),
    ("finetune", ("--val-data", "SOURCE_COPY", "--eval-data", "OTHER"), "holds the same samples as --eval-data"),
])
def test_held_out_data_that_is_the_training_file_is_refused(tmp_path, command, flags, words):
    """As compress refuses --eval-data equal to --target-data: evaluating (or picking the checkpoint) on samples
    that trained is not held out. The same file under another spelling too, and a copy of it (found by content)."""
    pytest.importorskip("torch")
    f = usps_files(tmp_path, target=(0, 60), other=(60, 120), copy=(0, 60), source_copy=(60, 120))
    spelled = {"TARGET": tmp_path / ".." / tmp_path.name / "target.npz", "OTHER": f["other"], "COPY": f["copy"],
               "SOURCE_COPY": f["source_copy"]}
    out = tmp_path / "out" / "o.onnx"
    if command == "finetune":
        args = ["finetune", LENET, "--teacher", LENET, "--epochs", "1"]
    else:
        args = ["coprune", "--source-model", LENET, "--target-model", LENET, "--source-data", f["other"], "--keep",
                "0.5", "--max-epochs", "1"]
    args += ["--target-data", f["target"], *[spelled.get(a, a) for a in flags], "--no-latency", "-q", "-o", out]
    one_line_error(CliRunner().invoke(main, [str(a) for a in args]), words)
    assert not out.parent.exists()


@pytest.mark.parametrize("command", ["finetune", "coprune", "compress"])
@pytest.mark.parametrize("held_out", ["eval-data", "split"])
def test_too_few_samples_left_to_train_after_the_checkpoint_fold_are_refused(tmp_path, monkeypatch, command,
                                                                              held_out):
    """--val-fraction 0.9 of 4 samples leaves none to train: refused with the minimum the whole set must meet,
    before any validation, calibration or planning. When --split takes part of the file, the message tells the
    training samples from the file's (it said "has 3 samples" of a file of 6)."""
    pytest.importorskip("torch")
    import onnxprune.api

    def no_work(*args, **kwargs):
        raise AssertionError("validated or calibrated before the samples were checked")

    monkeypatch.setattr(sys.modules["onnxprune.validation"], "validate", no_work)
    monkeypatch.setattr(onnxprune.api, "judge_labels", no_work)
    f = usps_files(tmp_path, tiny=(0, 4), eight=(0, 8), other=(60, 120), source=(120, 180))
    out = tmp_path / "out" / "o.onnx"
    if command == "finetune":
        args = ["finetune", LENET, "--teacher", LENET, "--epochs", "1", "--no-latency"]
    elif command == "coprune":
        args = ["coprune", "--source-model", LENET, "--target-model", LENET, "--source-data", f["source"], "--keep",
                "0.5", "--max-epochs", "1", "--no-latency"]
    else:
        args = ["compress", LENET, "--method", "svd", "--rank", "2", "--finetune", "1", "--no-latency"]
    if held_out == "eval-data":
        data, counted = ["--target-data", f["tiny"], "--eval-data", f["other"]], "4 samples"
    else:   # --split 0.5 of 8: 4 train (compress: calibrate)
        data, counted = ["--target-data", f["eight"]], "4 training samples (of its 8)"
    result = CliRunner().invoke(main, [str(a) for a in args + data] + ["--val-fraction", "0.9", "-q", "-o", str(out)])
    name = f["tiny"] if held_out == "eval-data" else f["eight"]
    one_line_error(result, f"{name} | leaves 0 of {counted} to train once --val-fraction 0.9 is held out",
                   "needs at least 4")
    assert not out.parent.exists()


def test_reports_name_models_given_in_memory(tmp_path):
    """The Python API takes ModelProtos: the reports call them "model" (they held the whole model as text, a
    6 MB report for LeNet), as the student already was."""
    pytest.importorskip("torch")
    from onnxprune.train.api import coprune_files, finetune_files
    from onnxprune.train.coprune import CoPruneConfig
    from onnxprune.train.distill import TrainConfig

    teacher, student = mlp(0), mlp(1, noise=0.3, base=0)
    x = np.random.default_rng(5).standard_normal((60, 8)).astype(np.float32)
    data = {"x": x, "y": run_model(teacher, {"x": x})[0].argmax(1)}
    result = finetune_files(student, tmp_path / "ft.onnx", data, teacher=teacher, measure_latency=False,
                            progress=False, config=TrainConfig(epochs=1, progress=False))
    assert (result.report["student"], result.report["teacher"]) == ("model", "model")
    x_source = np.random.default_rng(6).standard_normal((60, 8)).astype(np.float32)
    source = {"x": x_source, "y": run_model(teacher, {"x": x_source})[0].argmax(1)}   # not the held-out samples
    result = coprune_files(teacher, student, source, data, tmp_path / "cp.onnx", measure_latency=False,
                           config=CoPruneConfig(keep=0.5, alphas=(0.5,), max_epochs=1, progress=False))
    assert (result.report["source_model"], result.report["target_model"]) == ("model", "model")
    for name in ("ft.report.json", "cp.report.json"):
        assert (tmp_path / name).stat().st_size < 20_000


def ir3(model: onnx.ModelProto, rename: dict[str, str] | None = None) -> onnx.ModelProto:
    """``model`` in the IR 3 / opset 7 form (initializers listed as graph inputs), with tensors renamed
    (``rename``: a compression's new factors, which the original does not have, or another input)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for t in model.graph.initializer:
        t.name = (rename or {}).get(t.name, t.name)
    for node in model.graph.node:
        node.input[:] = [(rename or {}).get(i, i) for i in node.input]
    for value in model.graph.input:
        value.name = (rename or {}).get(value.name, value.name)
    model.graph.input.extend([helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                              for t in model.graph.initializer])
    model.opset_import[0].version, model.ir_version = 7, 3
    return model


def test_the_teacher_check_compares_data_inputs_and_outputs_only(tmp_path):
    """An IR 3 student lists its new weights as graph inputs, which the teacher lacks: it trains (it was
    refused as "--teacher | has other inputs or outputs"); a teacher with other inputs or outputs is named
    by its file with both models' names; a student larger than its teacher (the two swapped) is a warning."""
    pytest.importorskip("torch")
    teacher, student = ir3(mlp(0)), ir3(mlp(1, noise=0.3, base=0), {"w1": "fc1/new_weight"})
    x = np.random.default_rng(6).standard_normal((80, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    paths = {}
    for name, model in (("t", teacher), ("s", student), ("other", mlp(0, classes=3)), ("big", mlp(0, hidden=32)),
                        ("small", mlp(0))):
        paths[name] = tmp_path / f"{name}.onnx"
        onnx.save(model, str(paths[name]))

    def run(student_file, teacher_file):
        return CliRunner().invoke(main, ["finetune", str(student_file), "--teacher", str(teacher_file), "--target-data",
                                         str(tmp_path / "x.npy"), "--epochs", "1", "--no-latency", "-o",
                                         str(tmp_path / "out" / "o.onnx")])

    result = run(paths["s"], paths["t"])
    assert result.exit_code == 0, result.output
    tuned = onnx.load(str(tmp_path / "out" / "o.onnx"))
    assert tuned.ir_version == 3 and [i.name for i in tuned.graph.input] == [i.name for i in student.graph.input]
    renamed = ir3(mlp(0), {"x": "image"})
    onnx.save(renamed, str(paths["t"]))
    one_line_error(run(paths["s"], paths["t"]), f"{paths['t']} | has other inputs or outputs than the student "
                   f"{paths['s']} (inputs image; outputs logits; the student's: x; logits)")
    result = run(paths["big"], paths["other"])
    assert result.exit_code == 1 and "outputs logits" not in result.output   # same names: the shapes differ
    result = run(paths["big"], paths["small"])
    assert result.exit_code == 0, result.output
    warning = f"the student {paths['big']} has more parameters (420) than the teacher"
    assert warning in result.stderr
    report = json.loads((tmp_path / "out" / "o.report.json").read_text())
    assert report["warnings"][0].startswith(warning)


def test_api_compress_with_training_checks_torch_and_statistics_before_any_work(tmp_path, monkeypatch):
    """onnxprune.compress(finetune=...) without torch named the [train] extra only once compressed (minutes of
    planning); with stats= it failed on the statistics' samples, which the checkpoint fold always changes."""
    import onnxprune
    import onnxprune.api
    from onnxprune.errors import UsageError
    from onnxprune.train import MissingExtra
    from onnxprune.train.distill import TrainConfig

    def no_work(*args, **kwargs):
        raise AssertionError("the model was opened before the check")

    monkeypatch.setattr(onnxprune.api, "as_model", no_work)
    recipe = {"passes": [{"name": "low-rank-split", "method": "svd", "rank": 2}]}
    with pytest.raises(UsageError, match="--stats cannot be combined with --finetune"):
        onnxprune.compress(LENET, USPS, recipe=recipe, stats=tmp_path / "stats.npz", finetune=TrainConfig(),
                           output=tmp_path / "o.onnx")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(MissingExtra, match=r"\.\[train\]"):
        onnxprune.compress(LENET, USPS, recipe=recipe, finetune=TrainConfig(), output=tmp_path / "o.onnx")
    assert not list(tmp_path.iterdir())


def test_unlabelled_checkpoint_samples_are_named(tmp_path):
    """Without a teacher the labels are all there is: an unlabelled --val-data is the file named (not the labelled
    --target-data); with a teacher, --label-weight on samples without labels is a warning in the output and report."""
    pytest.importorskip("torch")
    f = usps_files(tmp_path, train=(0, 60), val=(60, 90, "nolabels"), other=(90, 150))
    out = tmp_path / "out" / "o.onnx"
    base = ["finetune", str(LENET), "--target-data", str(f["train"]), "--val-data", str(f["val"]), "--eval-data",
            str(f["other"]), "--epochs", "1", "--no-latency", "-o", str(out)]
    one_line_error(CliRunner().invoke(main, base + ["-q"]), f"{f['val']} | has no labels and no teacher was given")
    assert not out.parent.exists()
    teacher = onnx.load(str(LENET))      # another model than the student: distillation alone has work to do
    bias = next(t for t in teacher.graph.initializer if t.name == teacher.graph.node[-1].input[2])
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 0.5, bias.name))
    onnx.save(teacher, str(tmp_path / "teacher.onnx"))
    result = CliRunner().invoke(main, base + ["--teacher", str(tmp_path / "teacher.onnx"), "--label-weight", "1"])
    assert result.exit_code == 0, result.output
    warning = f"--label-weight 1: {f['val']} has no labels, so no cross-entropy is added"
    assert warning in result.stderr
    report = json.loads(out.with_name("o.report.json").read_text())
    assert any(w.startswith(warning) for w in report["warnings"]) and report["finetune"]["labels"] is False


@pytest.mark.parametrize("checkpoint", ["last", "auto"])
def test_training_that_diverges_keeps_the_last_finite_weights(monkeypatch, checkpoint):
    """A weight turned NaN in epoch 2 (the first step of it, here by hand) stops training there: the result is the
    checkpoint so far (epoch 1 with "last"), finite, and the report and a warning say what happened."""
    torch = pytest.importorskip("torch")
    from onnxprune.data.samples import open_samples
    from onnxprune.train.distill import TrainConfig, finetune

    teacher, student = mlp(0), mlp(1, noise=1.0, base=0)
    x = np.random.default_rng(2).standard_normal((100, 8)).astype(np.float32)   # 90 train: 6 steps of 16
    adam_step, steps = torch.optim.Adam.step, []

    def step(self, *args, **kwargs):
        result = adam_step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 7:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    tuned, report = finetune(student, teacher, open_samples({"x": x}, student),
                             config=TrainConfig(epochs=4, lr=1e-2, batch_size=16, patience=None, progress=False,
                                                checkpoint=checkpoint))
    assert report["diverged"] == 2 and len(report["curve"]) == 2 and len(steps) == 7
    assert report["stopped"].startswith("diverged in epoch 2") and report["warnings"][0].startswith("training diverged")
    if checkpoint == "last":
        assert report["best_epoch"] == 1
    weights = [numpy_helper.to_array(t) for t in tuned.graph.initializer]
    assert all(np.isfinite(w).all() for w in weights)
    assert np.isfinite(run_model(tuned, {"x": x})[0]).all()


def test_a_diverged_finetune_writes_the_untrained_student_and_says_so(tmp_path):
    """--lr 1e30: the first steps overflow; the output is the student as it came (finite), with a warning in the
    output and the report instead of an all-NaN model that verify let through (max(0.0, nan) is 0.0)."""
    pytest.importorskip("torch")
    teacher, student = mlp(0), mlp(1, noise=1.0, base=0)
    onnx.save(teacher, str(tmp_path / "t.onnx"))
    onnx.save(student, str(tmp_path / "s.onnx"))
    x = np.random.default_rng(4).standard_normal((130, 8)).astype(np.float32)
    np.save(tmp_path / "train.npy", x[:100])
    np.save(tmp_path / "eval.npy", x[100:])
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["finetune", str(tmp_path / "s.onnx"), "--teacher", str(tmp_path / "t.onnx"),
                                       "--target-data", str(tmp_path / "train.npy"), "--eval-data",
                                       str(tmp_path / "eval.npy"), "--epochs", "2", "--lr", "1e30", "--checkpoint",
                                       "last", "--no-latency", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "WARNING: training diverged in epoch 1" in result.stderr and "stopped: diverged in epoch 1" in result.stdout
    report = json.loads(out.with_name("out.report.json").read_text())
    assert report["finetune"]["diverged"] == 1 and report["warnings"][0].startswith("training diverged in epoch 1")
    tuned = onnx.load(str(out))
    for a, b in zip(tuned.graph.initializer, student.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def test_verify_fails_on_outputs_that_are_not_finite():
    """NaN differences are failures, not 0 (max(0.0, nan) is 0.0): in onnxruntime (the model) or in torch only."""
    torch = pytest.importorskip("torch")
    from onnxprune.errors import ModelError
    from onnxprune.train.convert import to_torch, verify

    feeds = {"x": np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)}
    model = mlp(0)
    module = to_torch(model)
    with torch.no_grad():
        module.weight("w2").fill_(float("nan"))
    with pytest.raises(ModelError, match="NaN or inf in the torch conversion"):
        verify(model, module, feeds)
    broken = mlp(0)
    broken.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.full((4, 16), np.nan, np.float32), "w2"))
    with pytest.raises(ModelError, match="NaN or inf in onnxruntime"):
        verify(broken, to_torch(broken), feeds)


def test_a_diverged_coprune_stops_and_says_so(tmp_path):
    """Co-Prune at --lr 1e30: the weights overflow within two epochs; training stops there, keeps the checkpoint so
    far and warns, instead of training every stage on NaN weights."""
    pytest.importorskip("torch")
    source, target = mlp(0), mlp(1, noise=0.3, base=0)
    onnx.save(source, str(tmp_path / "s.onnx"))
    onnx.save(target, str(tmp_path / "t.onnx"))
    rng = np.random.default_rng(3)
    xs, xt = rng.standard_normal((100, 8)).astype(np.float32), rng.standard_normal((100, 8)).astype(np.float32)
    np.savez(tmp_path / "src.npz", x=xs, y=run_model(source, {"x": xs})[0].argmax(1))
    np.savez(tmp_path / "tgt.npz", x=xt, y=run_model(target, {"x": xt})[0].argmax(1))
    out = tmp_path / "pruned.onnx"
    result = CliRunner().invoke(main, ["coprune", "--source-model", str(tmp_path / "s.onnx"), "--target-model",
                                       str(tmp_path / "t.onnx"), "--source-data", str(tmp_path / "src.npz"),
                                       "--target-data", str(tmp_path / "tgt.npz"), "--keep", "0.25", "--lr", "1e30",
                                       "--max-epochs", "2", "--no-latency", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "WARNING: training diverged in epoch" in result.stderr
    report = json.loads(out.with_name("pruned.report.json").read_text())
    diverged = report["coprune"]["diverged"]
    assert diverged and len(report["coprune"]["curve"]) == diverged    # epochs 0 .. diverged - 1
    assert report["warnings"][0].startswith(f"training diverged in epoch {diverged}")
    assert all(np.isfinite(numpy_helper.to_array(t)).all() for t in onnx.load(str(out)).graph.initializer)


def with_fixed_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """``model`` with its batch dimension (inputs and outputs) fixed at ``batch``, as some exporters write it."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in [*fixed.graph.input, *fixed.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = batch
    return fixed


def test_a_fixed_batch_model_trains_in_batches_of_its_size():
    """A model whose batch dimension is fixed (3 here) trains, and is checked, in batches of 3: the last one filled
    up by repeating a sample whose copies are cut off, so the result is the free-batch model's at --batch-size 3."""
    pytest.importorskip("torch")
    from onnxprune.data.samples import open_samples
    from onnxprune.train.distill import TrainConfig, finetune

    teacher, student = mlp(0), mlp(1, noise=1.0, base=0)
    x = np.random.default_rng(2).standard_normal((41, 8)).astype(np.float32)    # 37 train, 4 in the fold: 1 left over
    config = dict(epochs=2, lr=1e-2, patience=None, progress=False, checkpoint="last", augment=True)
    free, free_report = finetune(student, teacher, open_samples({"x": x}, student),
                                 config=TrainConfig(batch_size=3, **config))
    fixed_student = with_fixed_batch(student, 3)
    fixed, report = finetune(fixed_student, with_fixed_batch(teacher, 3), open_samples({"x": x}, fixed_student),
                             config=TrainConfig(**config))
    assert report["config"]["batch_size"] == 3 and report["train_samples"] == 37
    for a, b in zip(fixed.graph.initializer, free.graph.initializer):
        np.testing.assert_allclose(numpy_helper.to_array(a), numpy_helper.to_array(b), rtol=1e-5, atol=1e-6)
    assert fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    assert [row["val_agreement"] for row in report["curve"]] == [row["val_agreement"] for row in free_report["curve"]]


@pytest.mark.parametrize("command", ["finetune", "coprune"])
def test_fixed_batch_lenet_trains_from_the_command_line(tmp_path, command):
    """LeNet exported with input [1, 1, 28, 28]: the conversion check and the training run one sample a batch
    (an internal error before: the check fed 8)."""
    pytest.importorskip("torch")
    model = tmp_path / "lenet_b1.onnx"
    onnx.save(with_fixed_batch(onnx.load(str(LENET)), 1), str(model))
    f = usps_files(tmp_path, train=(0, 20), other=(20, 40), source=(40, 60))
    out = tmp_path / "o.onnx"
    if command == "finetune":
        # the model is its own teacher: labels train it (distillation alone would have nothing to do)
        args = ["finetune", model, "--teacher", model, "--epochs", "1", "--label-weight", "1"]
    else:
        args = ["coprune", "--source-model", model, "--target-model", model, "--source-data", f["source"],
                "--keep", "0.5", "--max-epochs", "1", "--alpha", "0.5"]
    result = CliRunner().invoke(main, [str(a) for a in args] + ["--target-data", str(f["train"]), "--eval-data",
                                                                 str(f["other"]), "--no-latency", "-q", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_name("o.report.json").read_text())
    assert report[command]["config"]["batch_size"] == 1 and report["validation"]["samples"] == 20


def test_training_that_ends_below_the_untrained_model_is_a_warning(tmp_path):
    """compress --finetune whose distilled model scores below the untrained plan on the held-out samples says so
    (here an --lr of 1 wrecks the weights); the output stays the distilled model: the held-out samples only judge."""
    pytest.importorskip("torch")
    from onnxprune.train.api import worse_after_training

    assert worse_after_training({"accuracy_candidate": 0.75, "agreement": 0.99}, {"accuracy_candidate": 0.74,
                                "agreement": 0.995, "samples": 100}, "R").startswith(
        "training did not help on the 100 held-out samples: top-1 accuracy 74.00% after, 75.00% before it; R")
    assert worse_after_training({"accuracy_candidate": None, "agreement": 0.9},
                                {"accuracy_candidate": None, "agreement": 0.9, "samples": 100}, "R") is None
    # agreement with the untrained student itself (finetune without a teacher) is 100 % before by definition
    assert worse_after_training({"accuracy_candidate": None, "agreement": 1.0},
                                {"accuracy_candidate": None, "agreement": 0.8, "samples": 100}, "R",
                                agreement=False) is None
    f = usps_files(tmp_path, data=(0, 300))
    out = tmp_path / "small.onnx"
    result = CliRunner().invoke(main, ["compress", str(LENET), "--target-data", str(f["data"]), "--keep", "0.5",
                                       "--allocation", "global", "--calib-size", "100", "--finetune", "1", "--lr", "1",
                                       "--checkpoint", "last", "--no-latency", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "WARNING: training did not help on the 150 held-out samples: top-1 accuracy" in result.stderr
    report = json.loads(out.with_name("small.report.json").read_text())
    assert any(w.startswith("training did not help") for w in report["warnings"])
    assert report["validation"]["accuracy_candidate"] < report["validation_before_finetune"]["accuracy_candidate"]


def with_softplus(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with Relu replaced by Softplus, an op the training converter lacks."""
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    for node in changed.graph.node:
        if node.op_type == "Relu":
            node.op_type = "Softplus"
    return changed


def test_finetune_report_exit_3_and_unsupported_ops_name_what_the_user_gave(tmp_path):
    """The written report holds curve_png; exit 3 prints the training summary and a training hint (not compress's);
    an op the converter lacks is named with the model file, not "student"/"source"."""
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    teacher, student = mlp(0), mlp(1, noise=1.0, base=0)
    for name, model in (("t", teacher), ("s", student), ("soft", with_softplus(student))):
        onnx.save(model, str(tmp_path / f"{name}.onnx"))
    x = np.random.default_rng(4).standard_normal((130, 8)).astype(np.float32)
    np.savez(tmp_path / "train.npz", x=x[:100], y=run_model(teacher, {"x": x[:100]})[0].argmax(1))
    np.savez(tmp_path / "eval.npz", x=x[100:], y=run_model(teacher, {"x": x[100:]})[0].argmax(1))
    out = tmp_path / "out" / "o.onnx"

    def finetune(model, *flags):
        return CliRunner().invoke(main, ["finetune", str(tmp_path / model), "--teacher", str(tmp_path / "t.onnx"),
                                         "--target-data", str(tmp_path / "train.npz"), "--eval-data",
                                         str(tmp_path / "eval.npz"), "--epochs", "1", "--no-latency", "-o", str(out),
                                         *flags])

    result = finetune("s.onnx")
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_name("o.report.json").read_text())
    assert report["curve_png"] == str(out.with_name("o.curve.png")) and out.with_name("o.curve.png").exists()
    missed = finetune("s.onnx", "--max-drop", "0", "-o", str(tmp_path / "missed.onnx"))
    assert missed.exit_code == 3, missed.output
    assert missed.stdout.startswith("trained 1 epoch in ") and "top-1 accuracy on 30 evaluation samples" in missed.stdout
    assert "Hint: train longer (--epochs)" in missed.stderr and "compress less aggressively" not in missed.stderr
    assert not list(tmp_path.glob("missed*"))
    one_line_error(finetune("soft.onnx", "-q", "-o", str(tmp_path / "soft_out.onnx")),
                   f"{tmp_path / 'soft.onnx'} | op(s) Softplus are not supported by the training converter")
    coprune = CliRunner().invoke(main, ["coprune", "--source-model", str(tmp_path / "soft.onnx"), "--target-model",
                                        str(tmp_path / "soft.onnx"), "--source-data", str(tmp_path / "eval.npz"),
                                        "--target-data", str(tmp_path / "train.npz"), "--keep", "0.5", "-q",
                                        "-o", str(tmp_path / "soft_out.onnx")])
    one_line_error(coprune, f"{tmp_path / 'soft.onnx'} | op(s) Softplus are not supported")
    assert not list(tmp_path.glob("soft_out*"))


def coprune_cli(tmp_path, source, target, *flags, source_data="src.npz", target_data="tgt.npz"):
    """``onnxprune coprune`` on the models and data files named in ``tmp_path``, 1 epoch a stage, -o out/o.onnx."""
    return CliRunner().invoke(main, ["coprune", "--source-model", str(tmp_path / source), "--target-model",
                                     str(tmp_path / target), "--source-data", str(tmp_path / source_data),
                                     "--target-data", str(tmp_path / target_data), "--keep", "0.5", "--max-epochs",
                                     "1", "--no-latency", "-q", "-o", str(tmp_path / "out" / "o.onnx"), *flags])


def test_coprune_refuses_a_model_without_class_scores(tmp_path):
    """x[N,2,8] -> MatMul(w[8,4]) -> y[N,2,4]: no [N, classes] output for the cross-entropy on labels (MiniLM's
    token embeddings are the real case). One line naming the model, exit 1 (an internal error before: the loss
    failed on the shapes in torch)."""
    pytest.importorskip("torch")
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "seq",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "m.onnx"))
    x = np.random.default_rng(1).standard_normal((60, 2, 8)).astype(np.float32)
    np.savez(tmp_path / "src.npz", x=x[:30], y=np.arange(30) % 4)
    np.savez(tmp_path / "tgt.npz", x=x[30:], y=np.arange(30) % 4)
    one_line_error(coprune_cli(tmp_path, "m.onnx", "m.onnx"),
                   f"{tmp_path / 'm.onnx'} | has no classifier output to train on labels: its output 'y' is float32 "
                   "[N, 2, 4], not class scores [N, classes]")
    assert not (tmp_path / "out").exists()


def test_coprune_runs_a_fixed_batch_source_in_batches_of_its_size(tmp_path):
    """The source exported with batch 1, its Reshape holding [1, 16]; the target (the same network) with a free
    batch. The source trains in one-sample pieces of each batch, as its export demands (exit 1 before:
    "node reshape (Reshape) failed in torch")."""
    pytest.importorskip("torch")

    def with_reshape(model, shape):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        relu = next(n for n in out.graph.node if n.op_type == "Relu")
        relu.output[0] = "r0"
        out.graph.node.insert(2, helper.make_node("Reshape", ["r0", "shape"], ["r"], name="reshape"))
        out.graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), "shape"))
        return out

    source = with_fixed_batch(with_reshape(mlp(0), [1, 16]), 1)
    target = with_reshape(mlp(1, noise=0.3, base=0), [-1, 16])
    onnx.save(source, str(tmp_path / "s.onnx"))
    onnx.save(target, str(tmp_path / "t.onnx"))
    x = np.random.default_rng(3).standard_normal((80, 8)).astype(np.float32)
    np.savez(tmp_path / "src.npz", x=x[:40], y=run_model(mlp(0), {"x": x[:40]})[0].argmax(1))
    np.savez(tmp_path / "tgt.npz", x=x[40:], y=run_model(target, {"x": x[40:]})[0].argmax(1))
    result = coprune_cli(tmp_path, "s.onnx", "t.onnx", "--batch-size", "8")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "o.report.json").read_text())
    assert report["coprune"]["config"]["batch_size"] == 8 and report["coprune"]["source_samples"] == 40


def test_coprune_source_data_that_is_evaluated_is_refused(tmp_path):
    """The source network's weights help choose the target's mask, so the samples it trains on must not be the
    ones scored: --eval-data that is the --source-data file, or (without --eval-data) --source-data that is the
    --target-data file, whose --split part evaluates. Fine with --alpha 0 (the source network does not train)
    and when --eval-data holds other samples."""
    pytest.importorskip("torch")
    model = mlp(0)
    onnx.save(model, str(tmp_path / "m.onnx"))
    x = np.random.default_rng(3).standard_normal((120, 8)).astype(np.float32)
    for name, part in (("src.npz", x[:40]), ("tgt.npz", x[40:80]), ("eval.npz", x[80:])):
        np.savez(tmp_path / name, x=part, y=run_model(model, {"x": part})[0].argmax(1))
    one_line_error(coprune_cli(tmp_path, "m.onnx", "m.onnx", "--eval-data", str(tmp_path / "src.npz")),
                   f"{tmp_path / 'src.npz'} | is the --source-data file, which trains the source network")
    one_line_error(coprune_cli(tmp_path, "m.onnx", "m.onnx", source_data="tgt.npz"),
                   f"{tmp_path / 'tgt.npz'} | is the --target-data file, so the part --split holds out")
    assert not (tmp_path / "out").exists()
    for flags in (("--alpha", "0"), ("--eval-data", str(tmp_path / "eval.npz"))):
        result = coprune_cli(tmp_path, "m.onnx", "m.onnx", *flags, source_data="tgt.npz")
        assert result.exit_code == 0, result.output


def test_coprune_with_unlabelled_eval_data_reports_agreement(tmp_path):
    """--eval-data without labels: no accuracy, so the output says how often the pruned model agrees with the
    dense target (it printed no verdict on the pruned model at all before)."""
    pytest.importorskip("torch")
    model = mlp(0)
    onnx.save(model, str(tmp_path / "m.onnx"))
    x = np.random.default_rng(3).standard_normal((120, 8)).astype(np.float32)
    for name, part in (("src.npz", x[:40]), ("tgt.npz", x[40:80])):
        np.savez(tmp_path / name, x=part, y=run_model(model, {"x": part})[0].argmax(1))
    np.savez(tmp_path / "eval.npz", x=x[80:])
    result = coprune_cli(tmp_path, "m.onnx", "m.onnx", "--eval-data", str(tmp_path / "eval.npz"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "o.report.json").read_text())
    assert (f"top-1 agreement with the dense target on 40 held-out target samples (no labels): "
            f"{100 * report['validation']['agreement']:.2f}%") in result.stdout


def test_coprune_layer_keep_beyond_the_keep_budget_is_a_usage_error(tmp_path):
    """--keep 0.01 with --layer-keep ip1_w=0.5: the fixed layer alone takes more than the whole budget, and the
    other layers were left one weight in all (LeNet at 8 %, exit 0, before). Exit 2 naming both flags."""
    pytest.importorskip("torch")
    from onnxprune.errors import UsageError
    from onnxprune.train.coprune import CoPruneConfig, keep_counts

    sizes = {"a": 100, "b": 100, "c": 100}
    assert keep_counts(sizes, CoPruneConfig(keep=0.5, layer_keep=(("a", 0.9),))) == {"a": 90, "__global__": 60}
    with pytest.raises(UsageError, match="leaves 0 of the 30 that --keep 0.1 allows for the 2 other layers"):
        keep_counts(sizes, CoPruneConfig(keep=0.1, layer_keep=(("a", 0.5),)))
    assert keep_counts(sizes, CoPruneConfig(keep=0.01, layer_keep=(("a", 0.5), ("b", 1), ("c", 1)))) == \
        {"a": 50, "b": 100, "c": 100, "__global__": 0}     # every layer named: nothing shares the rest
    model = mlp(0)
    onnx.save(model, str(tmp_path / "m.onnx"))
    x = np.random.default_rng(3).standard_normal((80, 8)).astype(np.float32)
    for name, part in (("src.npz", x[:40]), ("tgt.npz", x[40:])):
        np.savez(tmp_path / name, x=part, y=run_model(model, {"x": part})[0].argmax(1))
    result = coprune_cli(tmp_path, "m.onnx", "m.onnx", "--keep", "0.05", "--layer-keep", "w1=0.5")
    assert result.exit_code == 2, result.output
    assert "--layer-keep keeps 64 weights in w1" in result.output and "--keep 0.05" in result.output
    assert not (tmp_path / "out").exists()


def test_coprune_names_the_weights_that_differ_between_source_and_target(tmp_path):
    """A source of another architecture (hidden 12 against 16): one line naming the source file, the target file
    and the weights whose shapes differ (it named neither file nor weight before)."""
    pytest.importorskip("torch")
    onnx.save(mlp(0, hidden=12), str(tmp_path / "s.onnx"))
    onnx.save(mlp(0), str(tmp_path / "t.onnx"))
    x = np.random.default_rng(3).standard_normal((80, 8)).astype(np.float32)
    for name, part in (("src.npz", x[:40]), ("tgt.npz", x[40:])):
        np.savez(tmp_path / name, x=part, y=run_model(mlp(0), {"x": part})[0].argmax(1))
    one_line_error(coprune_cli(tmp_path, "s.onnx", "t.onnx"),
                   f"{tmp_path / 's.onnx'} | does not have the architecture of the target model {tmp_path / 't.onnx'}: "
                   "its Conv/Gemm/MatMul weights differ (w1 [12, 8] against [16, 8]; w2 [4, 12] against [4, 16])")
    assert not (tmp_path / "out").exists()


def test_plain_finetuning_of_a_sentence_embedding_model_is_refused(tmp_path):
    """A token model whose output is a 64-wide sentence embedding: labels cannot train it by cross-entropy
    (it read the embedding's width as 64 classes and exited 0); distillation from the original can."""
    pytest.importorskip("torch")
    from graphs import token_feeds, token_ffn

    from onnxprune.errors import ModelError
    from onnxprune.train.api import finetune_files
    from onnxprune.train.distill import TrainConfig

    model = token_ffn(features=64, hidden=16)
    data = token_feeds(batch=60, tokens=5, features=64, seed=2)
    data["y"] = (data["x"][:, 0, 0] > 0).astype(np.int64)
    with pytest.raises(ModelError, match="has no classifier output to train on labels: its output is a sentence "
                                         "embedding. Hint: give the original as --teacher"):
        finetune_files(model, tmp_path / "out.onnx", data, config=TrainConfig(epochs=1), progress=False,
                       measure_latency=False)
    assert not list(tmp_path.iterdir())
