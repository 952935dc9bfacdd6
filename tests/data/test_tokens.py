"""Token data checks (data/tokens.py): rows longer than the model's positions, rows without a real
token, and preprocessing flags that would do nothing with the model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxprune.api import as_samples
from onnxprune.cli import main
from onnxprune.data.tokens import position_limit
from onnxprune.errors import DataError, UsageError
from tests.graphs import conv_bn_relu, gemm_chain, token_ffn


def positional(positions: int = 6, *, ids: str = "buffer") -> onnx.ModelProto:
    """A BERT-style embedding with learned positions and a masked-mean output::

        input_ids [N, T] -> Gather(words: 16 x 4) --+
        T = Shape(input_ids)[1]                      Add -> x [N, T, 4] -> mean over attention_mask
          position ids: Slice(position_ids [1, P] = 0..P-1, 0:T)   (``ids="buffer"``, the PyTorch export)
                        or Range(0, T, 1)                          (``ids="range"``)
          -> Gather(positions: P x 4) -------------+

    With T > P the buffer's Slice stops at P and the Add's broadcast fails in onnxruntime.
    """
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "words"),
             numpy_helper.from_array(rng.standard_normal((positions, 4)).astype(np.float32), "positions"),
             numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
             numpy_helper.from_array(np.array([0], dtype=np.int64), "zero1"),
             numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
             numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2")]
    nodes = [helper.make_node("Gather", ["words", "input_ids"], ["w"]),
             helper.make_node("Shape", ["input_ids"], ["shape"]),
             helper.make_node("Gather", ["shape", "one"], ["t"])]
    if ids == "buffer":
        inits.append(numpy_helper.from_array(np.arange(positions, dtype=np.int64)[None], "position_ids"))
        nodes += [helper.make_node("Unsqueeze", ["t", "zero1"], ["t1"]),
                  helper.make_node("Slice", ["position_ids", "zero1", "t1", "axis1"], ["pos_ids"])]
    else:
        nodes.append(helper.make_node("Range", ["zero", "t", "one"], ["pos_ids"]))
    nodes += [helper.make_node("Gather", ["positions", "pos_ids"], ["p"]),
              helper.make_node("Add", ["w", "p"], ["x"]),
              helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
              helper.make_node("Unsqueeze", ["m", "axis2"], ["m3"]),
              helper.make_node("Mul", ["x", "m3"], ["xm"]),
              helper.make_node("ReduceSum", ["xm", "axis1"], ["total"], keepdims=0),
              helper.make_node("ReduceSum", ["m3", "axis1"], ["count"], keepdims=0),
              helper.make_node("Div", ["total", "count"], ["sentence"])]
    graph = helper.make_graph(
        nodes, "positional",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "T"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "T"])],
        [helper.make_tensor_value_info("sentence", TensorProto.FLOAT, ["N", 4])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def token_arrays(n: int = 10, length: int = 6, *, empty: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    mask = np.ones((n, length), dtype=np.int64)
    mask[:, length // 2:] = rng.integers(0, 2, size=(n, length - length // 2))
    mask[:empty] = 0
    return {"input_ids": rng.integers(0, 16, size=(n, length)).astype(np.int64), "attention_mask": mask,
            "y": np.arange(n) % 2}


def test_the_position_limit_is_the_table_the_position_ids_index():
    assert position_limit(positional(6)) == 6
    assert position_limit(positional(5, ids="range")) == 5
    assert position_limit(token_ffn(vocab=16)) is None        # word embeddings only: nothing to check


def test_rows_longer_than_the_models_positions_are_refused_before_any_run(tmp_path):
    model = positional(6)
    as_samples(token_arrays(length=6), model, {})                 # exactly the table: fine
    with pytest.raises(DataError, match=r"rows are 7 tokens long, more than the model's 6 positions.*"
                                        r"at most 6 columns"):
        as_samples(token_arrays(length=7), model, {})
    path, data = tmp_path / "model.onnx", tmp_path / "long.npz"
    onnx.save(model, path)
    np.savez(data, **token_arrays(length=7))
    result = CliRunner().invoke(main, ["validate", str(path), str(path), "--data", str(data), "--no-latency"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "7 tokens long, more than the model's 6 positions" in lines[0], result.output


def test_samples_without_a_real_token_are_refused_with_their_count(tmp_path):
    model = token_ffn(vocab=16)
    as_samples(token_arrays(empty=0), model, {})
    with pytest.raises(DataError, match="3 of 10 samples have no real token"):
        as_samples(token_arrays(empty=3), model, {})
    as_samples(token_arrays(empty=3), model, {}, mask="none")     # no mask input: nothing marks padding
    path, data, out = tmp_path / "model.onnx", tmp_path / "zero.npz", tmp_path / "stats.npz"
    onnx.save(model, path)
    np.savez(data, **token_arrays(empty=10))
    result = CliRunner().invoke(main, ["calibrate", str(path), "--target-data", str(data), "-o", str(out)])
    assert result.exit_code == 1 and "10 of 10 samples have no real token" in result.output, result.output
    assert not out.exists()


def test_flags_that_do_nothing_with_the_model_are_usage_errors(tmp_path):
    tokens, image = token_ffn(vocab=16), gemm_chain()
    with pytest.raises(UsageError, match="--mean, --std apply to images"):
        as_samples(token_arrays(), tokens, {"mean": (0.5,), "std": (0.5,)})
    with pytest.raises(UsageError, match="--max-length applies only with --tokenizer"):
        as_samples(token_arrays(), tokens, {"max_length": 8})
    with pytest.raises(UsageError, match="--tokenizer applies to token models"):
        as_samples({"x": np.zeros((4, 8), dtype=np.float32)}, image, {"tokenizer": "tok.json"})
    path, data = tmp_path / "model.onnx", tmp_path / "tokens.npz"
    onnx.save(tokens, path)
    np.savez(data, **token_arrays())
    for flags, named in ((["--resize", "8"], "--resize"), (["--max-length", "8"], "--max-length")):
        result = CliRunner().invoke(main, ["validate", str(path), str(path), "--data", str(data), "--no-latency",
                                           *flags])
        assert result.exit_code == 2 and named in result.output, result.output


def test_image_flags_with_arrays_fed_as_they_are_are_usage_errors(tmp_path):
    """Float arrays are taken as preprocessed: --mean or --resize would do nothing to them (while
    the report recorded them), so they are refused; uint8 image arrays take them."""
    image = conv_bn_relu()
    floats = {"x": np.zeros((4, 3, 8, 8), dtype=np.float64)}
    with pytest.raises(UsageError, match="--resize, --mean apply to images .* holds float64 arrays") as excinfo:
        as_samples(floats, image, {"mean": (0.5,), "resize": 8})
    # images to calibrate, preprocessed arrays to evaluate: dropping the flags alone would break the images
    assert "give them all as images or all as preprocessed arrays" in str(excinfo.value)
    as_samples(floats, image, {})
    as_samples({"x": np.zeros((4, 8, 8, 3), dtype=np.uint8)}, image, {"mean": (0.5,)})
    path, data = tmp_path / "model.onnx", tmp_path / "floats.npz"
    onnx.save(image, path)
    np.savez(data, **floats)
    result = CliRunner().invoke(main, ["validate", str(path), str(path), "--data", str(data), "--no-latency",
                                       "--std", "0.5"])
    assert result.exit_code == 2 and "--std applies to images" in result.output, result.output


def test_the_report_records_no_image_preprocessing_for_token_data():
    samples = as_samples(token_arrays(), token_ffn(vocab=16), {})
    assert "preprocess" not in samples.describe()
    assert "preprocess" in as_samples({"x": np.zeros((4, 8), dtype=np.float32)}, gemm_chain(), {}).describe()


def test_an_onnxruntime_rejection_names_the_shapes_it_was_fed():
    """Where the positions are not recognised (or the model fails for another reason), the error
    still says how long the rows were."""
    from onnxprune.data.samples import open_samples
    from onnxprune.errors import ModelError
    from onnxprune.validation import validate

    model = positional(6)
    samples = open_samples(token_arrays(length=7), model)       # opened directly: no check before the run
    with pytest.raises(ModelError, match=r"rejected the samples \(input_ids 10x7, attention_mask 10x7\)"):
        validate(model, model, samples, measure_latency=False)


def test_a_mask_input_that_is_not_a_token_mask_is_refused(tmp_path):
    """--mask-input naming the token ids (or segment ids) was taken silently: input_ids != 0 happens to
    mark real tokens when [PAD] is 0, so nothing failed, but it is not a mask of any model."""
    from onnxprune.calibration.collect import token_mask_input
    from onnxprune.errors import CalibrationError

    model = token_ffn(vocab=16)
    assert token_mask_input(model, "attention_mask") == "attention_mask"
    with pytest.raises(CalibrationError, match=r"input_ids \| holds token ids, not a token mask.*attention_mask"):
        token_mask_input(model, "input_ids")
    path, data, out = tmp_path / "model.onnx", tmp_path / "tokens.npz", tmp_path / "stats.npz"
    onnx.save(model, path)
    np.savez(data, **token_arrays())
    result = CliRunner().invoke(main, ["calibrate", str(path), "--target-data", str(data), "-o", str(out),
                                       "--mask-input", "input_ids"])
    assert result.exit_code == 1 and "holds token ids, not a token mask" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_mask_values_other_than_0_and_1_are_refused(tmp_path):
    model = token_ffn(vocab=16)
    arrays = token_arrays()
    as_samples(arrays, model, {})
    arrays["attention_mask"] = arrays["attention_mask"] * 2
    with pytest.raises(DataError, match=r"attention_mask holds values other than 0 and 1 \(2 in 10 of 10"):
        as_samples(arrays, model, {})
    as_samples(arrays, model, {}, mask="none")          # no mask read: nothing to check


def test_token_ids_outside_the_vocabulary_are_refused_before_any_run(tmp_path):
    """Ids >= the embedding table's rows failed inside onnxruntime; negative ids were taken silently
    (Gather counts them from the end of the table)."""
    from onnxprune.data.tokens import index_limits

    model = token_ffn(vocab=16)
    assert index_limits(model) == {"input_ids": 16} and index_limits(positional(6)) == {"input_ids": 16}
    for bad, shown in ((16, "0..16"), (-1, "-1..15")):
        arrays = token_arrays()
        arrays["input_ids"][0, 0] = bad
        with pytest.raises(DataError, match=rf"input_ids holds ids {shown}, but the model's embedding table has 16 "
                                            r"rows \(ids 0..15\)"):
            as_samples(arrays, model, {})
    path, data = tmp_path / "model.onnx", tmp_path / "oov.npz"
    onnx.save(model, path)
    np.savez(data, **{**arrays, "input_ids": arrays["input_ids"].astype(np.int32)})
    result = CliRunner().invoke(main, ["validate", str(path), str(path), "--data", str(data), "--no-latency"])
    assert result.exit_code == 1 and "input_ids holds ids -1..15" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
