"""Moments, StatRequest, patches and Statistics: streaming float64 statistics checked against numpy."""

from __future__ import annotations

import functools
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.calibration.moments import Moments
from onnxprune.calibration.requests import StatRequest, feature_rows, patches, pooled
from onnxprune.calibration.stats import Statistics
from onnxprune.errors import CalibrationError
from tests.conftest import run_model


def activations(n=500, dim=7, seed=0):
    """Correlated rows with a non-zero mean, in float32 like real activations."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((dim, dim))
    return (rng.standard_normal((n, dim)) @ mix + rng.uniform(-2, 2, dim)).astype(np.float32)


def rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-300))


# --------------------------------------------------------------------------------------
# Moments


@pytest.mark.parametrize("keep_rows", [False, True])
def test_moments_match_numpy(keep_rows):
    x = activations()
    m = Moments(7, keep_rows=keep_rows)
    for start in range(0, len(x), 64):
        m.update(x[start:start + 64])
    ref = x.astype(np.float64)
    assert m.count == len(x)
    assert rel(m.sum, ref.sum(0)) < 1e-12
    assert rel(m.mean, ref.mean(0)) < 1e-8
    assert rel(m.second_moment, ref.T @ ref / len(x)) < 1e-8
    assert rel(m.covariance, np.cov(ref, rowvar=False, bias=True)) < 1e-8
    assert m.gram.dtype == np.float64 and m.mean.dtype == np.float64
    assert (m.rows is not None) == keep_rows


def test_moments_accept_any_float_dtype_and_layout():
    x = activations(200, 5)
    ref = Moments(5)
    ref.update(x.astype(np.float64))
    for rows in (x.astype(np.float16).astype(np.float32), np.asfortranarray(x), x.T.copy().T, x[::1]):
        m = Moments(5)
        m.update(rows)
        assert rel(m.gram, rows.astype(np.float64).T @ rows.astype(np.float64)) < 1e-12
    half = Moments(5)
    half.update(x.astype(np.float16))
    assert half.gram.dtype == np.float64


@pytest.mark.parametrize("keep_rows", [False, True])
def test_shards_merged_in_any_order_give_the_same_result(keep_rows):
    x = activations(301)
    whole = Moments(7, keep_rows=keep_rows)
    whole.update(x)
    rng = np.random.default_rng(1)
    for trial in range(5):
        cuts = np.sort(rng.choice(np.arange(1, len(x)), size=trial + 2, replace=False))
        shards = []
        for chunk in np.split(x, cuts):
            m = Moments(7, keep_rows=keep_rows)
            m.update(chunk)
            shards.append(m)
        order = rng.permutation(len(shards))
        merged = sum(shards[i] for i in order)
        left = functools.reduce(lambda acc, m: acc + m, shards)              # ((a + b) + c) + ...
        right = functools.reduce(lambda acc, m: m + acc, shards[::-1])       # a + (b + (c + ...))
        for candidate in (merged, left, right):
            assert candidate.count == whole.count
            assert rel(candidate.sum, whole.sum) < 1e-12
            assert rel(candidate.gram, whole.gram) < 1e-12
            assert rel(candidate.covariance, whole.covariance) < 1e-10


def test_add_does_not_change_its_operands():
    a, b = Moments(3), Moments(3)
    a.update(np.ones((2, 3)))
    b.update(2 * np.ones((3, 3)))
    before = (a.gram.copy(), b.gram.copy())
    c = a + b
    c.update(np.ones((1, 3)))
    assert np.array_equal(a.gram, before[0]) and np.array_equal(b.gram, before[1])
    assert a.count == 2 and b.count == 3 and c.count == 6


def test_keep_rows_and_gram_modes_agree():
    x = activations(40, 100)     # fewer samples than features: where keep_rows pays
    g, r = Moments(100), Moments(100, keep_rows=True)
    for chunk in np.array_split(x, 3):
        g.update(chunk)
        r.update(chunk)
    assert np.array_equal(r.rows, x.astype(np.float64))
    assert r.count == g.count
    for name in ("sum", "gram", "mean", "second_moment", "covariance"):
        assert rel(getattr(r, name), getattr(g, name)) < 1e-12, name
    mixed = r + g                 # rows + Gram -> Gram
    assert mixed.rows is None and rel(mixed.gram, 2 * g.gram) < 1e-12
    assert r.nbytes < g.nbytes


def test_moments_errors():
    m = Moments(3)
    with pytest.raises(ValueError, match=r"\(k, 3\)"):
        m.update(np.zeros((2, 4)))
    with pytest.raises(CalibrationError, match="no samples"):
        _ = m.mean
    with pytest.raises(ValueError):
        Moments(3) + Moments(4)
    m.update(np.zeros((0, 3)))
    assert m.count == 0


@pytest.mark.parametrize("keep_rows", [False, True])
def test_to_arrays_from_arrays_round_trip_exactly(keep_rows):
    m = Moments(7, keep_rows=keep_rows)
    m.update(activations(33))
    arrays = m.to_arrays("site")
    assert all(k.startswith("site/") for k in arrays)
    back = Moments.from_arrays(arrays, "site")
    assert back.count == m.count and back.keep_rows == keep_rows
    assert np.array_equal(back.sum, m.sum) and np.array_equal(back.gram, m.gram)
    if keep_rows:
        assert np.array_equal(back.rows, m.rows)
    empty = Moments.from_arrays(Moments(4, keep_rows=keep_rows).to_arrays("e"), "e")
    assert empty.count == 0 and empty.dim == 4


# --------------------------------------------------------------------------------------
# Rows of an activation


def test_feature_rows():
    x = np.arange(2 * 3 * 40 * 30, dtype=np.float32).reshape(2, 3, 40, 30)
    blocks = list(feature_rows(x, 1))                                    # NCHW: one (N, H*W, C) view
    assert len(blocks) == 1 and blocks[0].shape == (2, 1200, 3) and np.shares_memory(blocks[0], x)
    assert np.array_equal(blocks[0].reshape(-1, 3), np.moveaxis(x, 1, -1).reshape(-1, 3))
    seq = x.reshape(2, 400, 9)                                           # [N, T, n], axis -1
    blocks = list(feature_rows(seq, -1))
    assert len(blocks) == 1 and np.shares_memory(blocks[0], seq)
    assert np.array_equal(blocks[0], seq.reshape(-1, 9))


@pytest.mark.parametrize("products", ["float64", "float32"])
@pytest.mark.parametrize("samples", [1, 3, 40])
def test_update_from_an_nchw_batch_view(products, samples, monkeypatch):
    """A whole NCHW batch as (N, H*W, C) rows gives the statistics of its rows taken one by one,
    also when the chunks split it (several samples per BLAS call, the last chunk shorter)."""
    import onnxprune.calibration.moments as moments_module

    monkeypatch.setattr(moments_module, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(moments_module, "MIN_CHUNK_ROWS", 64)            # chunks of 2-4 samples
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((samples, 5, 6, 7)) + 3).astype(np.float32)
    batch = next(feature_rows(x, 1))
    m = Moments(5, products=products)
    m.update(batch[::2])                                                 # a fold: strided samples
    rows = np.moveaxis(x[::2], 1, -1).reshape(-1, 5).astype(np.float64)
    assert m.count == len(rows)
    assert np.allclose(m.sum, rows.sum(axis=0), rtol=1e-6)
    assert np.allclose(m.gram, rows.T @ rows, rtol=1e-6)
    with pytest.raises(ValueError, match="must have shape"):
        m.update(batch[..., :4])


@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_update_from_either_memory_layout(layout, monkeypatch):
    from onnxprune.calibration import moments as stats

    monkeypatch.setattr(stats, "MIN_CHUNK_ROWS", 16)                     # several chunks
    monkeypatch.setattr(stats, "CHUNK_BYTES", 8 * 6 * 16)
    x = activations(100, 5)
    rows = x if layout == "rows" else np.asfortranarray(x)
    m = Moments(5)
    m.update(rows)
    ref = x.astype(np.float64)
    assert m.count == 100
    assert rel(m.gram, ref.T @ ref) < 1e-12 and rel(m.sum, ref.sum(0)) < 1e-12


def test_non_finite_rows_make_the_sum_non_finite():
    for bad in (np.nan, np.inf, -np.inf):
        x = activations(50, 4)
        x[7, 2] = bad
        for rows in (x, np.asfortranarray(x)):
            m = Moments(4)
            m.update(rows)
            assert not np.isfinite(m.sum[2])


def test_pooled():
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
    assert np.array_equal(pooled(x, pool="max"), x.max(axis=(2, 3)))
    assert np.allclose(pooled(x, pool="mean"), x.astype(np.float64).mean(axis=(2, 3)))
    assert pooled(x[:, :, 0, 0]).shape == (4, 3)


def naive_im2col(x, kernel, strides, pads, dilations):
    n, c, h, w = x.shape
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    xp = np.pad(x, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    oh = (h + pads[0] + pads[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pads[1] + pads[3] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for b in range(n):
        for i in range(oh):
            for j in range(ow):
                patch = np.empty((c, kh, kw), dtype=x.dtype)
                for p in range(kh):
                    for q in range(kw):
                        patch[:, p, q] = xp[b, :, i * sh + p * dh, j * sw + q * dw]
                rows.append(patch.reshape(-1))
    return np.array(rows), (oh, ow)


CONV_CASES = [
    dict(kernel=(3, 3), strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1)),
    dict(kernel=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1)),
    dict(kernel=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), dilations=(1, 1)),
    dict(kernel=(3, 2), strides=(2, 1), pads=(0, 1, 2, 0), dilations=(1, 1)),   # asymmetric pads
    dict(kernel=(3, 3), strides=(1, 1), pads=(2, 2, 2, 2), dilations=(2, 2)),
    dict(kernel=(2, 3), strides=(2, 2), pads=(1, 0, 0, 1), dilations=(2, 1)),
    dict(kernel=(1, 1), strides=(2, 2), pads=(0, 0, 0, 0), dilations=(1, 1)),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "k{kernel}s{strides}p{pads}d{dilations}".format(**c))
def test_patches_match_naive_loop(case):
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 8)).astype(np.float32)
    expected, _ = naive_im2col(x, **case)
    got = patches(x, **case)
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "k{kernel}s{strides}p{pads}d{dilations}".format(**c))
def test_patches_at_sampled_positions_are_rows_of_the_full_patches(case):
    x = np.random.default_rng(0).standard_normal((3, 3, 7, 8)).astype(np.float32)
    full = patches(x, **case)
    per_sample = full.shape[0] // 3
    at = np.random.default_rng(1).integers(0, per_sample, size=(3, 2))
    got = patches(x, **case, at=at)
    assert np.array_equal(got, np.concatenate([full[i * per_sample + at[i]] for i in range(3)]))


def test_sampled_positions_request():
    x = np.random.default_rng(0).standard_normal((5, 2, 6, 6)).astype(np.float32)
    base = dict(kind="patches", kernel=(3, 3), pads=(1, 1, 1, 1))
    sampled = StatRequest("x", positions=4, **base)
    assert sampled.key != StatRequest("x", **base).key and sampled.key.endswith(":pos4")
    rows = np.concatenate(list(sampled.rows(x, np.random.default_rng(3))))
    again = np.concatenate(list(sampled.rows(x, np.random.default_rng(3))))
    assert rows.shape == (5 * 4, 18) and np.array_equal(rows, again)       # seeded
    full = patches(x, **{k: v for k, v in base.items() if k != "kind"})
    per_sample = full.shape[0] // 5
    for i in range(5):                                     # distinct positions of sample i
        block = full[i * per_sample:(i + 1) * per_sample]
        hits = [np.flatnonzero((block == r).all(axis=1))[0] for r in rows[4 * i:4 * i + 4]]
        assert len(set(hits)) == 4
    everything = StatRequest("x", positions=36, **base)  # as many as there are: all, in order
    assert np.array_equal(np.concatenate(list(everything.rows(x))), full)
    with pytest.raises(ValueError, match="positions"):
        StatRequest("x", positions=4)


def conv_model(c_in, m, case, w):
    """x [N,c_in,H,W] -> Conv (W: m x c_in x kh x kw, no bias, ``case`` attributes) -> y"""
    node = helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=list(case["kernel"]),
                            strides=list(case["strides"]), pads=list(case["pads"]),
                            dilations=list(case["dilations"]))
    graph = helper.make_graph([node], "conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", m, "OH", "OW"])],
                              initializer=[numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "k{kernel}s{strides}p{pads}d{dilations}".format(**c))
def test_patches_times_weights_is_the_onnxruntime_conv(case):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 9, 10)).astype(np.float32)
    w = rng.standard_normal((4, 3, *case["kernel"])).astype(np.float32)
    (y,) = run_model(conv_model(3, 4, case, w), {"x": x})
    cols = patches(x, **case).astype(np.float64)
    out = cols @ w.reshape(4, -1).T.astype(np.float64)
    got = out.reshape(2, y.shape[2], y.shape[3], 4).transpose(0, 3, 1, 2)
    assert got.shape == y.shape
    assert rel(got, y) < 1e-5


def test_patches_1d_and_errors():
    x = np.arange(2 * 2 * 6, dtype=np.float32).reshape(2, 2, 6)
    cols = patches(x, kernel=(3,), strides=(2,), pads=(1, 0))
    assert cols.shape == (2 * 3, 2 * 3)     # (6 + 1 - 3) // 2 + 1 = 3 positions per sample
    assert np.array_equal(cols[0], [0, 0, 1, 0, 6, 7])
    with pytest.raises(ValueError, match="rank"):
        patches(x, kernel=(3, 3))
    with pytest.raises(ValueError, match="larger"):
        patches(x, kernel=(7,))


# --------------------------------------------------------------------------------------
# StatRequest


def test_request_keys_are_stable_and_distinct():
    requests = [
        StatRequest("t"),
        StatRequest("t", axis=-1),
        StatRequest("u"),
        StatRequest("t", keep_rows=True),
        StatRequest("t", kind="pooled"),
        StatRequest("t", kind="pooled", pool="mean"),
        StatRequest("t", kind="patches", kernel=(3, 3)),
        StatRequest("t", kind="patches", kernel=(3, 3), strides=(2, 2)),
        StatRequest("t", kind="patches", kernel=(3, 3), pads=(1, 1, 1, 1)),
        StatRequest("t", kind="patches", kernel=(3, 3), dilations=(2, 2)),
        StatRequest("t", kind="patches", kernel=(1, 3)),
    ]
    keys = [r.key for r in requests]
    assert len(set(keys)) == len(keys)
    assert requests[0].key == "features:t:axis1"
    # defaults spelled out or not give the same request key; lists become tuples
    assert StatRequest("t", kind="patches", kernel=[3, 3], strides=(1, 1), pads=(0,) * 4).key == requests[6].key
    assert StatRequest.from_dict(json.loads(json.dumps(requests[8].to_dict()))) == requests[8]
    assert hash(requests[8]) == hash(StatRequest("t", kind="patches", kernel=(3, 3), pads=(1, 1, 1, 1)))


def test_request_validation():
    with pytest.raises(ValueError, match="kind"):
        StatRequest("t", kind="nope")
    with pytest.raises(ValueError, match="pool"):
        StatRequest("t", kind="pooled", pool="median")
    with pytest.raises(ValueError, match="kernel"):
        StatRequest("t", kind="patches")
    with pytest.raises(ValueError, match="pads"):
        StatRequest("t", kind="patches", kernel=(3, 3), pads=(1, 1))
    assert StatRequest("t", axis=0).check((4, 3)) is not None
    assert StatRequest("t", axis=-1).check((4, 3)) is None
    assert StatRequest("t", kind="patches", kernel=(3, 3)).check((4, 3)) is not None
    assert StatRequest("t", kind="patches", kernel=(3, 3)).check((4, 3, 2, 5)) is not None
    assert StatRequest("t", kind="patches", kernel=(3, 3), pads=(1, 1, 1, 1)).check((4, 3, 2, 5)) is None
    assert StatRequest("t", kind="patches", kernel=(3, 3), strides=(2, 2)).out_spatial((1, 1, 7, 8)) == (3, 3)


# --------------------------------------------------------------------------------------
# Statistics


def small_statistics(model_hash="abc123", set_name="target", seed=0):
    rng = np.random.default_rng(seed)
    requests = [StatRequest("a"), StatRequest("b", axis=-1, keep_rows=True)]
    moments = {}
    for fold in range(2):
        for r, dim in zip(requests, (4, 6)):
            m = Moments(dim, keep_rows=r.keep_rows)
            m.update(rng.standard_normal((10 + fold, dim)))
            moments[(set_name, r.key, fold)] = m
    header = {"model_hash": model_hash, "sets": {set_name: {"kind": "arrays", "count": 21}}, "folds": 2,
              "seed": 0, "requests": [r.to_dict() for r in requests], "samples": {set_name: [11, 10]},
              "onnxprune_version": "0.1.0"}
    return Statistics(header, moments), requests


def test_statistics_moments_by_fold_and_merged():
    stats, (a, b) = small_statistics()
    f0, f1 = stats.moments(a, fold=0), stats.moments(a, fold=1)
    both = stats.moments(a)
    assert both.count == f0.count + f1.count
    assert rel(both.gram, f0.gram + f1.gram) < 1e-15
    assert stats.has(a) and stats.has(b.key) and not stats.has(a, "source")
    assert not stats.has(StatRequest("a", axis=-1))
    with pytest.raises(CalibrationError, match="source"):
        stats.moments(a, "source")
    with pytest.raises(CalibrationError, match="features:zzz:axis1"):
        stats.moments(StatRequest("zzz"))
    with pytest.raises(CalibrationError, match="fold 5"):
        stats.moments(a, fold=5)


def test_statistics_save_load_round_trip_exactly(tmp_path):
    stats, requests = small_statistics()
    path = stats.save(tmp_path / "stats.npz")
    assert path.exists() and not [p for p in tmp_path.iterdir() if p.name != "stats.npz"]  # no temp left
    with np.load(path, allow_pickle=False) as data:            # plain arrays only
        assert "header" in data.files
    back = Statistics.load(path, model="abc123")
    assert back.header == stats.header
    assert back.entries() == stats.entries()
    for key in stats.entries():
        m, n = stats._moments[key], back._moments[key]
        assert m.count == n.count and m.keep_rows == n.keep_rows
        assert np.array_equal(m.sum, n.sum) and np.array_equal(m.gram, n.gram)
    assert np.array_equal(back.moments(requests[1]).rows, stats.moments(requests[1]).rows)


def test_load_against_a_different_model_raises(tmp_path):
    stats, _ = small_statistics(model_hash="aaaa")
    stats.save(tmp_path / "stats.npz")
    with pytest.raises(CalibrationError, match="computed for model aaaa, not this model bbbb") as info:
        Statistics.load(tmp_path / "stats.npz", model="bbbb")
    assert info.value.hint
    model = conv_model(1, 1, CONV_CASES[0], np.ones((1, 1, 3, 3), np.float32))
    with pytest.raises(CalibrationError, match="computed for model aaaa"):
        Statistics.load(tmp_path / "stats.npz", model=model)
    with pytest.raises(CalibrationError, match="no such"):
        Statistics.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match="not a statistics file"):
        Statistics.load(tmp_path / "junk.npz")


@pytest.mark.parametrize("header, detail", [
    ("[1, 2]", "TypeError"),                                            # JSON, but not an object
    ('"text"', "AttributeError"),
    ('{"index": [{"set": "target"}]}', "KeyError: 'request'"),          # an index entry cut short
    ('{"index": [{"set": "target", "request": "r", "fold": 0, "prefix": "m0"}]}', "m0/sum missing"),
])
def test_a_damaged_header_or_index_is_not_a_statistics_file(tmp_path, header, detail):
    """An .npz whose header or index does not describe its arrays: one error naming the file, not a bug."""
    np.savez(tmp_path / "damaged.npz", header=np.array(header))
    with pytest.raises(CalibrationError, match="not a statistics file") as info:
        Statistics.load(tmp_path / "damaged.npz")
    assert info.value.thing == str(tmp_path / "damaged.npz") and detail in info.value.problem


def test_a_file_of_another_format_is_not_called_pickled(tmp_path):
    """numpy reads any file that is neither .npy nor .npz as a pickle: a model given as --stats
    is not "pickled objects"; an object array is."""
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")
    with pytest.raises(CalibrationError, match="neither NumPy's header nor a zip archive's"):
        Statistics.load(tmp_path / "model.onnx")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CalibrationError, match="pickled objects, which are never loaded"):
        Statistics.load(tmp_path / "objects.npy")


def test_merge_sets_and_shards():
    target, (a, b) = small_statistics(set_name="target", seed=0)
    source, _ = small_statistics(set_name="source", seed=1)
    both = target.merge(source)
    assert both.sets() == ["source", "target"]
    assert np.array_equal(both.moments(a, "source").gram, source.moments(a, "source").gram)
    shard, _ = small_statistics(set_name="target", seed=2)
    summed = target.merge(shard)
    assert summed.moments(a).count == target.moments(a).count + shard.moments(a).count
    assert rel(summed.moments(a, fold=1).gram, target.moments(a, fold=1).gram + shard.moments(a, fold=1).gram) < 1e-15
    assert summed.moments(b).rows.shape[0] == 42
    assert summed.header["samples"]["target"] == [22, 20]
    assert summed.header["sets"]["target"]["count"] == 42
    assert target.moments(a).count == 21                         # operands untouched
    other, _ = small_statistics(model_hash="zzz")
    with pytest.raises(CalibrationError, match="cannot merge"):
        target.merge(other)
