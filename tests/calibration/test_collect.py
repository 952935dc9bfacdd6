"""collect(): one onnxruntime run per sample set, statistics equal to numpy on all activations."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.calibration.collect import collect as _collect
from onnxprune.calibration.collect import expose
from onnxprune.calibration.requests import StatRequest, patches
from onnxprune.calibration.stats import Statistics
from onnxprune.errors import CalibrationError
from onnxprune.model import model_hash
from tests.conftest import run_model

from onnxprune.data.samples import open_samples


# Every test runs on both engines: "numpy" (activations exposed, folded in float64: exact to
# 1e-8) and "graph" (onnxruntime reduces each request to float32 sums and Grams of centred
# rows, accumulated in float64: exact to float32 rounding).
ENGINE = {"name": "auto"}
TOLERANCE = {"numpy": 1e-8, "graph": 2e-6, "auto": 2e-6}


@pytest.fixture(autouse=True, params=["numpy", "graph", "auto"])
def engine(request):
    ENGINE["name"] = request.param
    yield request.param
    ENGINE["name"] = "auto"


def collect(*args, **kwargs):
    kwargs.setdefault("engine", ENGINE["name"])
    return _collect(*args, **kwargs)


class ArraySamples:
    """Stand-in SampleSet over in-memory arrays, iterated in ``order`` (the real SampleSet always
    iterates in index order and refuses to be empty; these tests need both)."""

    def __init__(self, feeds: dict[str, np.ndarray], order=None, labels=None):
        self.feeds = feeds
        n = len(next(iter(feeds.values())))
        self.order = np.arange(n) if order is None else np.asarray(order)
        self.labels = labels

    def __len__(self):
        return len(self.order)

    def batches(self, batch_size):
        for start in range(0, len(self.order), batch_size):
            idx = self.order[start:start + batch_size]
            yield idx, {k: v[idx] for k, v in self.feeds.items()}

    def describe(self):
        return {"kind": "arrays", "count": len(self)}

    def subset(self, indices):
        return ArraySamples(self.feeds, self.order[np.asarray(indices)], self.labels)


def real(model, x: np.ndarray):
    """The real SampleSet over already-preprocessed float samples."""
    return open_samples(x, model)


def conv_relu_gemm(batch="N", seed=0) -> onnx.ModelProto:
    """
    x [N,2,6,6] -> Conv conv (3, 3x3, pads 1) -> conv.out -> Relu -> relu.out [N,3,6,6]
                -> Flatten -> flat.out [N,108] -> Gemm fc (4) -> y [N,4]
    """
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "conv.W"),
        numpy_helper.from_array(rng.standard_normal(3).astype(np.float32) * 0.1, "conv.B"),
        numpy_helper.from_array(rng.standard_normal((4, 108)).astype(np.float32) * 0.1, "fc.W"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32) * 0.1, "fc.B"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.W", "conv.B"], ["conv.out"], name="conv", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv.out"], ["relu.out"], name="relu"),
        helper.make_node("Flatten", ["relu.out"], ["flat.out"], name="flat", axis=1),
        helper.make_node("Gemm", ["flat.out", "fc.W", "fc.B"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "conv_relu_gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 2, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    onnx.checker.check_model(model)
    return model


TENSORS = ["x", "conv.out", "relu.out", "flat.out", "y"]


def all_activations(model, x) -> dict[str, np.ndarray]:
    """Every tensor of ``model`` on ``x``, from a copy that outputs them all (built by hand)."""
    full = onnx.ModelProto()
    full.CopyFrom(model)
    del full.graph.output[:]
    full.graph.node.append(helper.make_node("Identity", ["x"], ["x.copy"]))
    for name in ["x.copy", *TENSORS[1:]]:
        full.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    outs = run_model(full, {"x": x})
    return dict(zip(TENSORS, outs))


def numpy_rows(request: StatRequest, act: np.ndarray) -> np.ndarray:
    """The rows a request should see, computed independently with plain numpy."""
    if request.kind == "features":
        return np.moveaxis(act, request.axis, -1).reshape(-1, act.shape[request.axis]).astype(np.float64)
    if request.kind == "pooled":
        op = np.max if request.pool == "max" else np.mean
        return op(act.astype(np.float64), axis=tuple(range(2, act.ndim)))
    return patches(act, kernel=request.kernel, strides=request.strides, pads=request.pads,
                   dilations=request.dilations).astype(np.float64)


def assert_matches(moments, rows):
    """Relative to the size of the values compared (the mean relative to the rows' RMS: a mean
    near zero has no relative accuracy in float32)."""
    tol = TOLERANCE[ENGINE["name"]]
    rel = lambda a, b, scale=None: np.abs(a - b).max() / max(scale or np.abs(b).max(), 1e-300)  # noqa: E731
    assert moments.count == len(rows)
    rms = float(np.sqrt((rows ** 2).mean(0).max()))
    assert rel(moments.mean, rows.mean(0), rms if ENGINE["name"] != "numpy" else None) < tol
    assert rel(moments.second_moment, rows.T @ rows / len(rows)) < tol
    assert rel(moments.covariance, np.cov(rows, rowvar=False, bias=True)) < tol


REQUESTS = [
    StatRequest("x"),                                                         # a graph input
    StatRequest("x", kind="patches", kernel=(3, 3), pads=(1, 1, 1, 1)),      # the Conv's patches
    StatRequest("conv.out"),
    StatRequest("relu.out"),                                                  # NCHW: N*H*W rows of 3
    StatRequest("relu.out", kind="pooled"),
    StatRequest("relu.out", kind="pooled", pool="mean"),
    StatRequest("relu.out", kind="patches", kernel=(2, 2), strides=(2, 2), dilations=(1, 1)),
    StatRequest("flat.out", axis=-1),                                         # the Gemm input
    StatRequest("flat.out", axis=-1, keep_rows=True),
    StatRequest("y", axis=-1),                                                # already a graph output
]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((23, 2, 6, 6)).astype(np.float32)


def test_collect_equals_numpy_on_all_activations(data):
    model = conv_relu_gemm()
    before = model.SerializeToString()
    stats = collect(model, {"target": real(model, data)}, REQUESTS, batch_size=5, progress=False)
    assert model.SerializeToString() == before                    # the caller's model is untouched
    acts = all_activations(model, data)
    for request in REQUESTS:
        m = stats.moments(request)
        assert m.keep_rows == request.keep_rows
        assert_matches(m, numpy_rows(request, acts[request.tensor]))
    assert stats.header["model_hash"] == model_hash(model)
    assert stats.header["sets"] == {"target": real(model, data).describe()}
    assert stats.header["folds"] == 1 and stats.header["samples"] == {"target": [23]}
    assert [r["key"] for r in stats.header["requests"]] == [r.key for r in REQUESTS]


def test_several_sets_and_a_save_load_round_trip(data, tmp_path):
    model = conv_relu_gemm()
    samples = {"target": real(model, data[:10]), "source": real(model, data[10:])}
    requests = [StatRequest("relu.out"), StatRequest("flat.out", axis=-1)]
    stats = collect(model, samples, requests, batch_size=4, progress=False)
    acts = all_activations(model, data)
    for set_name, part in (("target", slice(0, 10)), ("source", slice(10, None))):
        for request in requests:
            assert_matches(stats.moments(request, set_name), numpy_rows(request, acts[request.tensor][part]))
    stats.save(tmp_path / "stats.npz")
    back = Statistics.load(tmp_path / "stats.npz", model=model)
    assert np.array_equal(back.moments(requests[0], "source").gram, stats.moments(requests[0], "source").gram)
    with pytest.raises(CalibrationError, match="not this model"):
        Statistics.load(tmp_path / "stats.npz", model=conv_relu_gemm(seed=1))


def test_folds_partition_the_samples_in_iteration_order(data):
    model = conv_relu_gemm()
    order = np.random.default_rng(3).permutation(len(data))      # iteration order != index order
    requests = [StatRequest("relu.out"), StatRequest("relu.out", kind="pooled"), StatRequest("flat.out", axis=-1)]
    stats = collect(model, {"target": ArraySamples({"x": data}, order)}, requests, batch_size=4, folds=3,
                    progress=False)
    acts = all_activations(model, data)
    assert stats.header["samples"]["target"] == [8, 8, 7]
    for request in requests:
        total = 0
        for fold in range(3):
            members = order[fold::3]                                 # position % folds == fold
            m = stats.moments(request, fold=fold)
            assert_matches(m, numpy_rows(request, acts[request.tensor][members]))
            total += m.count
        merged = stats.moments(request)
        assert merged.count == total
        assert_matches(merged, numpy_rows(request, acts[request.tensor]))


@pytest.mark.parametrize("n", [10, 12, 3])
def test_fixed_batch_model_with_a_partial_last_batch(data, n):
    fixed = conv_relu_gemm(batch=4)
    requests = [StatRequest("relu.out"), StatRequest("flat.out", axis=-1), StatRequest("x", kind="pooled")]
    stats = collect(fixed, {"target": real(fixed, data[:n])}, requests, batch_size=32, folds=2,
                    progress=False)
    acts = all_activations(conv_relu_gemm(), data[:n])            # same weights, dynamic batch
    for request in requests:
        assert_matches(stats.moments(request), numpy_rows(request, acts[request.tensor]))
    assert sum(stats.header["samples"]["target"]) == n


def test_parallel_folding_gives_the_same_statistics_bit_for_bit(data, monkeypatch, engine):
    """Folding a batch's tensors in threads (large batches) changes neither a value nor the order."""
    import onnxprune.calibration.collect as collect_module

    model = conv_relu_gemm()
    requests = [StatRequest("relu.out"), StatRequest("conv.out"), StatRequest("flat.out", axis=-1),
                StatRequest("relu.out", kind="pooled")]
    samples = {"target": real(model, data[:12]), "source": real(model, data[12:])}
    alone = collect(model, samples, requests, batch_size=4, folds=2, threads=1, progress=False)
    monkeypatch.setattr(collect_module, "PARALLEL_BYTES", 0)
    pools = []

    class Pool(collect_module.ThreadPoolExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self)

    monkeypatch.setattr(collect_module, "ThreadPoolExecutor", Pool)
    threaded = collect(model, samples, requests, batch_size=4, folds=2, threads=3, progress=False)
    if engine != "graph":                       # the graph engine exposes nothing to fold
        assert len(pools) == 2 and all(p._max_workers == 3 and p._shutdown for p in pools)   # one per set
    assert list(threaded.entries()) == list(alone.entries())
    for set_name, key, fold in alone.entries():
        a, b = alone.moments(key, set_name, fold), threaded.moments(key, set_name, fold)
        assert a.count == b.count and np.array_equal(a.sum, b.sum) and np.array_equal(a.gram, b.gram)
    x = data[:6].copy()
    x[4, 0, 2, 2] = np.inf
    with pytest.raises(CalibrationError, match=r"non-finite activation .* \[4\]"):
        collect(model, {"target": ArraySamples({"x": x})}, requests, batch_size=4, threads=3, progress=False)


def test_exposed_model_keeps_versions_and_exposes_each_tensor_once():
    model = conv_relu_gemm()
    model.opset_import[0].version = 13
    exposed, outputs = expose(model, ["relu.out", "y", "x", "flat.out"])
    assert exposed.ir_version == 10 and [(o.domain, o.version) for o in exposed.opset_import] == [("", 13)]
    names = [o.name for o in exposed.graph.output]
    assert len(names) == len(set(names))
    assert outputs[0] == "relu.out" and outputs[1] == "y" and outputs[3] == "flat.out"
    assert outputs[2] != "x" and outputs[2] in names                 # the input comes through an Identity
    typed = {o.name: o for o in exposed.graph.output}["relu.out"]
    assert typed.type.tensor_type.elem_type == TensorProto.FLOAT
    assert len(typed.type.tensor_type.shape.dim) == 4                 # from shape inference
    # the same tensor under several requests is fetched once
    requests = [StatRequest("relu.out"), StatRequest("relu.out", kind="pooled"), StatRequest("relu.out")]
    stats = collect(model, {"target": ArraySamples({"x": np.ones((2, 2, 6, 6), np.float32)})}, requests,
                    progress=False)
    assert len(stats.header["requests"]) == 2


def test_tensor_without_inferred_type_is_exposed_as_float():
    model = conv_relu_gemm()
    # a custom-domain op hides everything after it from shape inference
    model.graph.node[1].domain = "custom.unknown"
    exposed, outputs = expose(model, ["flat.out"])
    out = {o.name: o for o in exposed.graph.output}["flat.out"]
    assert out.type.tensor_type.elem_type == TensorProto.FLOAT and not out.type.tensor_type.HasField("shape")


def test_a_linear_layers_input_is_typed_by_its_weight_without_shape_inference(monkeypatch):
    model = conv_relu_gemm()
    expected = collect(model, {"target": ArraySamples({"x": np.ones((2, 2, 6, 6), np.float32)})},
                       [StatRequest("flat.out")], progress=False)

    def refused(*args, **kwargs):
        raise AssertionError("shape inference ran")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", refused)
    exposed, _ = expose(model, ["flat.out"])                     # read by the Gemm: its weight's type
    out = {o.name: o for o in exposed.graph.output}["flat.out"]
    assert out.type.tensor_type.elem_type == TensorProto.FLOAT
    stats = collect(model, {"target": ArraySamples({"x": np.ones((2, 2, 6, 6), np.float32)})},
                    [StatRequest("flat.out")], progress=False)
    key = StatRequest("flat.out").key
    assert np.array_equal(stats.moments(key, "target", fold=0).gram, expected.moments(key, "target", fold=0).gram)


def test_unknown_tensor_lists_valid_names():
    model = conv_relu_gemm()
    with pytest.raises(CalibrationError, match=r"relu\.outt \| no such tensor.*relu\.out") as info:
        collect(model, {"target": ArraySamples({"x": np.ones((2, 2, 6, 6), np.float32)})},
                [StatRequest("relu.outt")], progress=False)
    assert "valid tensors include" in info.value.hint
    with pytest.raises(CalibrationError, match="weight"):
        collect(model, {"target": ArraySamples({"x": np.ones((2, 2, 6, 6), np.float32)})},
                [StatRequest("fc.W")], progress=False)


def test_non_finite_activation_names_the_tensor(data):
    model = conv_relu_gemm()
    x = data[:6].copy()
    x[4, 0, 2, 2] = np.inf                      # Conv of +inf with mixed-sign weights: NaN/Inf downstream
    with pytest.raises(CalibrationError, match=r"conv\.out \| non-finite activation .* \[4\]"):
        collect(model, {"target": ArraySamples({"x": x})}, [StatRequest("conv.out")], batch_size=4,
                progress=False)


def test_empty_sample_set_and_bad_options(data):
    model = conv_relu_gemm()
    with pytest.raises(CalibrationError, match="target | sample set is empty"):
        collect(model, {"target": ArraySamples({"x": data[:0]})}, [StatRequest("relu.out")], progress=False)
    with pytest.raises(CalibrationError, match="folds"):
        collect(model, {"target": ArraySamples({"x": data})}, [StatRequest("relu.out")], folds=0, progress=False)
    with pytest.raises(CalibrationError, match="rank"):
        collect(model, {"target": ArraySamples({"x": data})},
                [StatRequest("flat.out", kind="patches", kernel=(3, 3))], progress=False)


def relu_only() -> onnx.ModelProto:
    """x [N,8,32,32] -> Relu -> r -> Relu -> y"""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Relu", ["r"], ["y"])]
    graph = helper.make_graph(nodes, "relu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 32, 32])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)


def test_memory_is_bounded_by_one_batch_not_the_sample_count():
    import tracemalloc

    model = relu_only()
    x = np.random.default_rng(0).standard_normal((300, 8, 32, 32)).astype(np.float32)   # 9.4 MiB of "r"
    samples = ArraySamples({"x": x})
    requests = [StatRequest("r"), StatRequest("r", kind="pooled"), StatRequest("y", kind="patches", kernel=(3, 3))]
    tracemalloc.start()
    try:
        collect(model, {"target": samples}, requests, batch_size=10, folds=2, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    batch_bytes = 10 * x[0].nbytes
    assert peak < 0.25 * x.nbytes                    # far below all activations of one tensor
    assert peak < 12 * batch_bytes + 4 * 2**20      # a few batches' worth of buffers at most


def test_progress_bar_is_off_when_stderr_is_not_a_tty(data, capsys):
    collect(conv_relu_gemm(), {"target": ArraySamples({"x": data})}, [StatRequest("relu.out")], progress=True)
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------------------
# Real model


@pytest.mark.real
def test_lenet_flatten_input_over_1000_mnist_samples(shared):
    from onnxprune.model import load_model

    model = load_model(shared / "models" / "lenet_caffe_mnist.onnx")
    flatten = next(n for n in model.graph.node if n.op_type == "Flatten")
    digits = np.load(shared / "data" / "digits" / "mnist_test.npz")
    x = (digits["x"][:1000].astype(np.float32) / 255.0)[:, None]
    samples = real(model, x)
    requests = [StatRequest(flatten.input[0]),                                  # [N,50,4,4]: 16 N rows of 50
                StatRequest(flatten.output[0], axis=-1),                        # [N,800]: the Gemm input
                StatRequest(flatten.output[0], axis=-1, keep_rows=True)]
    stats = collect(model, {"target": samples}, requests, batch_size=64, folds=2, progress=False)

    full = onnx.ModelProto()
    full.CopyFrom(model)
    for name in (flatten.input[0], flatten.output[0]):
        full.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    _, before, after = run_model(full, {"data": x})
    assert_matches(stats.moments(requests[0]), numpy_rows(requests[0], before))
    assert_matches(stats.moments(requests[1]), numpy_rows(requests[1], after))
    in_fold_order = np.concatenate([after[0::2], after[1::2]]).astype(np.float64)  # folds merge in order
    assert np.array_equal(stats.moments(requests[2]).rows, in_fold_order)
    assert stats.moments(requests[1], fold=0).count == 500


def test_sampled_patch_positions_are_seeded_and_independent_of_other_requests(data):
    model = conv_relu_gemm()
    sampled = StatRequest("relu.out", kind="patches", kernel=(3, 3), pads=(1, 1, 1, 1), positions=5)
    alone = collect(model, {"target": real(model, data)}, [sampled], batch_size=5, progress=False, folds=2)
    mixed = collect(model, {"target": real(model, data)}, [StatRequest("x"), sampled], batch_size=5,
                    progress=False, folds=2)
    other_seed = collect(model, {"target": real(model, data)}, [sampled], batch_size=5, progress=False,
                         folds=2, seed=1)
    for fold in (0, 1):
        assert np.array_equal(alone.moments(sampled, fold=fold).gram, mixed.moments(sampled, fold=fold).gram)
    assert alone.moments(sampled).count == len(data) * 5
    assert not np.array_equal(alone.moments(sampled).gram, other_seed.moments(sampled).gram)
    # an estimate of the full patch statistics: close in mean over 23 x 5 of 36 positions
    full = numpy_rows(StatRequest("relu.out", kind="patches", kernel=(3, 3), pads=(1, 1, 1, 1)),
                      all_activations(model, data)["relu.out"])
    spread = full.std(axis=0) / np.sqrt(len(data) * 5)
    assert (np.abs(alone.moments(sampled).mean - full.mean(axis=0)) < 5 * spread + 1e-9).all()
