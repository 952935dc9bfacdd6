"""runtime.py: sessions for in-memory models and batched runs (fixed-batch padding)."""

from __future__ import annotations

import graphs
import numpy as np
import onnx
import pytest
from conftest import run_model

from onnxprune.data.samples import open_samples
from onnxprune.errors import ModelError
from onnxprune.runtime import batch_size_for, make_session, providers_for, run_batches


def fixed_batch(model, batch):
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in list(fixed.graph.input) + list(fixed.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = batch
    return fixed


def test_batches_cover_every_sample_once_in_order():
    model = graphs.gemm_chain()
    x = graphs.feeds(model, batch=10, seed=0)["x"]
    session = make_session(model)
    got = list(run_batches(session, open_samples([{"x": x}], model), batch_size=4))
    assert [list(i) for i, _ in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    np.testing.assert_allclose(np.concatenate([out[0] for _, out in got]), run_model(model, {"x": x})[0], rtol=1e-6)


def test_a_fixed_batch_model_sees_full_batches_and_callers_one_row_per_sample():
    model = fixed_batch(graphs.gemm_chain(), 4)
    assert batch_size_for(model, 32) == 4 and batch_size_for(graphs.gemm_chain(), 32) == 32
    x = graphs.feeds(graphs.gemm_chain(), batch=6, seed=1)["x"]
    session = make_session(model)
    rows = [out[0] for _, out in run_batches(session, open_samples([{"x": x}], model), batch_size=4, fixed_batch=4)]
    assert [len(r) for r in rows] == [4, 2]
    np.testing.assert_allclose(np.concatenate(rows), run_model(graphs.gemm_chain(), {"x": x})[0], rtol=1e-6)


def test_unknown_devices_and_broken_models_are_model_errors():
    with pytest.raises(ModelError, match="unknown device"):
        providers_for("tpu")
    for device in (None, 0):        # the Python API's device=None: the message names it (it read "unknown device")
        with pytest.raises(ModelError, match=f"^device \\| unknown device {device}"):
            providers_for(device)
    assert providers_for("cpu") == ["CPUExecutionProvider"]
    broken = graphs.gemm_chain()
    broken.graph.node[0].input[1] = "missing.W"
    with pytest.raises(ModelError, match="cannot load the model"):
        make_session(broken)


def test_onnxruntime_logs_nothing_of_its_own_when_a_run_fails(capfd):
    """A kernel that fails on a batch raises (onnxprune reports it in one line); onnxruntime's own
    coloured '[E:onnxruntime:...]' log line must not come before that line on stderr."""
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    from onnxprune.runtime import ORT_ERRORS

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    shape = onnx.numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "shape")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Expand", ["x", "shape"], ["y"])], "expand", [x], [y],
                                   initializer=[shape])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    model.ir_version = 8
    session = make_session(model)
    capfd.readouterr()
    with pytest.raises(ORT_ERRORS) as info:
        session.run(None, {"x": np.zeros((5, 3), dtype=np.float32)})
    assert isinstance(info.value, InvalidArgument)
    assert "onnxruntime" not in capfd.readouterr().err
