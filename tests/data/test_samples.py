"""Sample readers: every source kind, every data error, and the measured accuracies in ../shared."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from onnxprune.data.preprocess import Preprocess
from onnxprune.data.samples import Feeds, Parts, SampleSet, open_samples
from onnxprune.errors import DataError
from onnxprune.model import InputSpec, load_model
from onnxprune.runtime import make_session, run_batches

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


# --------------------------------------------------------------------------- tiny models
#
#   flatten:   x [N, C, H, W] --Flatten--> y [N, C*H*W]        (feeds come back verbatim)
#   add_pair:  a [N, 3], b [N, 3] --Add--> y [N, 3]


def flatten_model(shape=("N", 1, 4, 4), name="x", elem=TensorProto.FLOAT) -> onnx.ModelProto:
    x = helper.make_tensor_value_info(name, elem, list(shape))
    y = helper.make_tensor_value_info("y", elem, None)
    graph = helper.make_graph([helper.make_node("Flatten", [name], ["y"], axis=1)], "flatten", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)


def add_pair_model() -> onnx.ModelProto:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "add_pair", [a, b], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)


def spec(shape=("N", 1, 4, 4), name="x", dtype=np.float32) -> list[InputSpec]:
    return [InputSpec(name, tuple(shape), np.dtype(dtype))]


def floats(n=6, shape=(1, 4, 4), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def pixels(n=6, shape=(4, 4), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def save_png(path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def one_line_error(excinfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --------------------------------------------------------------------------- Preprocess


def test_preprocess_normalises_values():
    pre = Preprocess(resize=[8, 6], center_crop=4, mean=0.5, std=[0.5])
    assert pre.resize == (8, 6) and pre.center_crop == 4
    assert pre.mean == (0.5,) and pre.std == (0.5,)


@pytest.mark.parametrize("options, fragment", [
    ({"resize": 0}, "resize"),
    ({"resize": (4,)}, "resize"),
    ({"resize": True}, "resize"),
    ({"center_crop": (4, -1)}, "center_crop"),
    ({"scale": 0}, "scale"),
    ({"scale": float("nan")}, "scale"),
    ({"mean": (0.1, 0.2), "std": (0.3,)}, "mean has 2 values but std has 1"),
    ({"std": (0.0,)}, "std"),
    ({"mean": ()}, "mean"),
    ({"layout": "CHW"}, "layout"),
    ({"grayscale": "yes"}, "grayscale"),
])
def test_preprocess_rejects_bad_options(options, fragment):
    with pytest.raises(DataError) as excinfo:
        Preprocess(**options)
    one_line_error(excinfo, fragment)


# --------------------------------------------------------------------------- array sources


def test_npy_float_is_taken_as_preprocessed(tmp_path):
    data = floats(5)
    np.save(tmp_path / "x.npy", data.astype(np.float64))
    samples = open_samples(tmp_path / "x.npy", flatten_model(), preprocess=Preprocess(mean=(9.0,)))
    assert isinstance(samples, SampleSet)
    assert len(samples) == 5 and samples.labels is None and samples.input_names == ("x",)
    feed = samples.batch(np.array([3, 1]))["x"]
    assert feed.dtype == np.float32
    np.testing.assert_array_equal(feed, data[[3, 1]])


def test_float_without_unit_channel_axis_gets_it(tmp_path):
    data = floats(3, (4, 4))
    np.save(tmp_path / "x.npy", data)
    feed = open_samples(tmp_path / "x.npy", spec()).batch([0, 1, 2])["x"]
    np.testing.assert_array_equal(feed, data[:, None])
    nhwc = open_samples(data, spec(("N", 4, 4, 1)), preprocess=Preprocess(layout="NHWC")).batch([0])["x"]
    np.testing.assert_array_equal(nhwc, data[:1, :, :, None])


def test_uint8_gray_is_scaled_and_normalised():
    data = pixels(4)
    samples = open_samples(data, spec(), preprocess=Preprocess(mean=(0.5,), std=(0.25,)))
    assert samples.name == "numpy array"
    expected = ((data.astype(np.float32) / 255 - 0.5) / 0.25)[:, None]
    np.testing.assert_allclose(samples.batch(np.arange(4))["x"], expected, rtol=1e-6, atol=1e-6)


def test_npz_with_labels_ignores_class_names(tmp_path):
    data, labels = floats(4), np.array([3, 1, 0, 2])
    np.savez(tmp_path / "d.npz", x=data, y=labels, classes=np.array(["a", "b", "c", "d"]))
    samples = open_samples(tmp_path / "d.npz", flatten_model())
    np.testing.assert_array_equal(samples.labels, labels)
    assert samples.labels.dtype == np.int64


@pytest.mark.parametrize("key", ["label", "targets"])
def test_labels_under_another_name_are_warned_about(tmp_path, caplog, key):
    caplog.set_level(logging.WARNING, logger="onnxprune")
    np.savez(tmp_path / "d.npz", x=floats(4), **{key: np.array([3, 1, 0, 2])})
    samples = open_samples(tmp_path / "d.npz", flatten_model())
    assert samples.labels is None
    assert f"array '{key}' looks like labels" in caplog.text


def test_npz_picks_the_only_plausible_array(tmp_path):
    data = floats(4)
    np.savez(tmp_path / "d.npz", images=data, labels=np.arange(4), weights=np.ones(4))
    samples = open_samples(tmp_path / "d.npz", flatten_model())
    np.testing.assert_array_equal(samples.batch([2])["x"], data[2:3])
    np.testing.assert_array_equal(samples.labels, np.arange(4))


def test_npz_keyed_by_input_name_for_two_inputs(tmp_path):
    a, b = floats(5, (3,), seed=1), floats(5, (3,), seed=2)
    np.savez(tmp_path / "pair.npz", b=b, a=a, labels=np.arange(5))
    samples = open_samples(tmp_path / "pair.npz", add_pair_model())
    feeds = samples.batch([4, 0])
    np.testing.assert_array_equal(feeds["a"], a[[4, 0]])
    np.testing.assert_array_equal(feeds["b"], b[[4, 0]])
    session = make_session(add_pair_model())
    (_, (out,)), = run_batches(session, samples, batch_size=8)
    np.testing.assert_allclose(out, a + b, rtol=1e-6)


def test_directory_of_arrays_concatenates_in_sorted_order(tmp_path):
    first, second = floats(2, seed=1), floats(3, seed=2)
    np.savez(tmp_path / "b.npz", x=second, y=np.array([5, 6, 7]))
    np.savez(tmp_path / "a.npz", x=first, y=np.array([1, 2]))
    (tmp_path / "notes.txt").write_text("ignored")
    samples = open_samples(tmp_path, flatten_model())
    assert len(samples) == 5
    np.testing.assert_array_equal(samples.labels, [1, 2, 5, 6, 7])
    np.testing.assert_array_equal(samples.batch(np.arange(5))["x"], np.concatenate([first, second]))


def test_directory_of_npy_is_unlabelled(tmp_path):
    np.save(tmp_path / "0.npy", floats(2))
    np.save(tmp_path / "1.npy", floats(2, seed=3))
    samples = open_samples(tmp_path, spec())
    assert len(samples) == 4 and samples.labels is None


def test_mapping_source():
    data = floats(3)
    samples = open_samples({"x": data, "y": np.array([0, 1, 1]), "version": 2}, spec())
    assert samples.name == "dict of arrays"
    np.testing.assert_array_equal(samples.labels, [0, 1, 1])


def test_iterable_of_batches_is_concatenated():
    parts = [floats(2, seed=1), floats(3, seed=2)]
    batches = ({"x": p, "y": np.arange(len(p))} for p in parts)
    samples = open_samples(batches, flatten_model())
    assert samples.name == "python iterable" and len(samples) == 5
    np.testing.assert_array_equal(samples.labels, [0, 1, 0, 1, 2])
    np.testing.assert_array_equal(samples.batch(np.arange(5))["x"], np.concatenate(parts))


class FakeCalibrationDataReader:
    """Quacks like onnxruntime.quantization.CalibrationDataReader."""

    def __init__(self, batches):
        self._batches = iter(batches)

    def get_next(self):
        return next(self._batches, None)


def test_calibration_data_reader_is_drained():
    parts = [floats(1, seed=i) for i in range(4)]
    samples = open_samples(FakeCalibrationDataReader([{"x": p} for p in parts]), spec(), name="ort reader")
    assert samples.name == "ort reader" and len(samples) == 4
    np.testing.assert_array_equal(samples.batch([3])["x"], parts[3])


# --------------------------------------------------------------------------- image sources


def test_image_folder_classes_follow_sorted_subfolders(tmp_path):
    rgb = pixels(3, (6, 6, 3))
    save_png(tmp_path / "dog" / "a.png", rgb[0])
    save_png(tmp_path / "cat" / "b.png", rgb[1])
    save_png(tmp_path / "cat" / "nested" / "c.png", rgb[2])
    samples = open_samples(tmp_path, spec(("N", 1, 6, 6)))  # 1 channel: gray = mean of RGB
    np.testing.assert_array_equal(samples.labels, [0, 0, 1])
    assert samples.describe()["classes"] == ["cat", "dog"]
    feed = samples.batch(np.arange(3))["x"]
    gray = rgb[[1, 2, 0]].astype(np.float32).mean(-1) / 255
    np.testing.assert_allclose(feed[:, 0], gray, rtol=1e-6)


def test_flat_folder_with_labels_csv(tmp_path):
    for i, name in enumerate(["b.png", "a.png", "c.png"]):
        save_png(tmp_path / name, pixels(1, (4, 4), seed=i)[0])
    (tmp_path / "labels.csv").write_text(
        "file,class_index,wnid,name\nc.png,7,n3,c\na.png,5,n1,a\nb.png,6,n2,b\n")
    samples = open_samples(tmp_path, spec())
    np.testing.assert_array_equal(samples.labels, [5, 6, 7])  # sorted file order: a, b, c


def test_flat_folder_without_labels_csv_is_unlabelled(tmp_path):
    for i in range(3):
        save_png(tmp_path / f"{i}.png", pixels(1, (4, 4), seed=i)[0])
    samples = open_samples(tmp_path, spec())
    assert len(samples) == 3 and samples.labels is None and samples.describe()["kind"] == "image folder"


def test_image_folder_decodes_lazily(tmp_path):
    save_png(tmp_path / "a.png", pixels(1)[0])
    (tmp_path / "b.png").write_bytes(b"not a png")
    samples = open_samples(tmp_path, spec())  # only the first sample is prepared on open
    with pytest.raises(DataError) as excinfo:
        samples.batch([1])
    one_line_error(excinfo, "b.png", "cannot be decoded")


def test_shorter_side_resize_then_center_crop(tmp_path):
    image = pixels(1, (10, 20, 3))[0]
    save_png(tmp_path / "im.png", image)
    pre = Preprocess(resize=8, center_crop=6, **IMAGENET)
    feed = open_samples(tmp_path, spec(("N", 3, 6, 6)), preprocess=pre).batch([0])["x"]
    resized = bilinear(image, 8, 16)[1:7, 5:11].astype(np.float32) / 255
    expected = ((resized - IMAGENET["mean"]) / IMAGENET["std"]).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(feed, expected, rtol=1e-5, atol=1e-6)


def test_auto_resize_to_the_model_dims_in_uint8():
    data = pixels(3, (16, 16))
    feed = open_samples(data, spec(("N", 1, 28, 28))).batch(np.arange(3))["x"]
    expected = np.stack([bilinear(d, 28, 28) for d in data]).astype(np.float32) / 255
    np.testing.assert_allclose(feed[:, 0], expected, rtol=1e-6, atol=1e-6)


def test_gray_from_rgb_is_resized_as_float():
    data = pixels(2, (8, 8, 3))
    feed = open_samples(data, spec(("N", 1, 4, 4))).batch([0, 1])["x"]
    gray = data.astype(np.float32).mean(-1)
    expected = np.stack([np.asarray(Image.fromarray(g).resize((4, 4), Image.Resampling.BILINEAR))
                         for g in gray])
    np.testing.assert_allclose(feed[:, 0], expected / 255, rtol=1e-5)


def test_nhwc_layout_rgba_and_chw_uint8():
    rgba = pixels(2, (4, 4, 4))
    nhwc = open_samples(rgba, spec(("N", 4, 4, 3)), preprocess=Preprocess(layout="NHWC")).batch([0, 1])["x"]
    np.testing.assert_allclose(nhwc, rgba[..., :3] / np.float32(255), rtol=1e-6)
    chw = rgba[..., :3].transpose(0, 3, 1, 2).copy()
    nchw = open_samples(chw, spec(("N", 3, 4, 4))).batch([0, 1])["x"]
    np.testing.assert_allclose(nchw, chw / np.float32(255), rtol=1e-6)


def test_gray_images_repeat_into_three_channels(tmp_path):
    save_png(tmp_path / "g.png", pixels(1)[0])
    feed = open_samples(tmp_path / "g.png", spec(("N", 3, 4, 4))).batch([0])["x"]
    np.testing.assert_array_equal(feed[0, 0], feed[0, 2])


# --------------------------------------------------------------------------- the set itself


def test_batches_subset_split_describe():
    data, labels = floats(10), np.arange(10) % 3
    samples = open_samples({"x": data, "labels": labels}, spec())
    seen = [indices for indices, _ in samples.batches(4)]
    assert [list(i) for i in seen] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]

    sub = samples.subset([7, 2])
    np.testing.assert_array_equal(sub.labels, labels[[7, 2]])
    np.testing.assert_array_equal(sub.batch([0])["x"], data[7:8])
    assert len(samples.subset(np.arange(10) < 3)) == 3

    calibration, evaluation = samples.split(0.3, seed=1)
    assert (len(calibration), len(evaluation)) == (3, 7)
    rows = np.concatenate([calibration.source_indices, evaluation.source_indices])
    assert sorted(rows) == list(range(10))
    np.testing.assert_array_equal(calibration.labels, labels[calibration.source_indices])
    again, _ = samples.split(0.3, seed=1)
    other, _ = samples.split(0.3, seed=2)
    assert again.describe() == calibration.describe()
    assert other.describe()["indices_sha"] != calibration.describe()["indices_sha"]

    info = json.loads(json.dumps(samples.describe()))
    assert info["name"] == "dict of arrays" and info["count"] == 10 and info["labelled"] is True
    assert len(info["indices_sha"]) == 16


def test_run_batches_pads_a_fixed_batch_model():
    data = floats(5)
    model = flatten_model(shape=(4, 1, 4, 4))
    samples = open_samples(data, model)
    outputs = np.concatenate([out for _, (out,) in run_batches(make_session(model), samples, fixed_batch=4)])
    np.testing.assert_array_equal(outputs, data.reshape(5, -1))


def test_split_and_index_errors():
    samples = open_samples(floats(1), spec())
    with pytest.raises(DataError) as excinfo:
        samples.split(0.5)
    one_line_error(excinfo, "one part would be empty")
    with pytest.raises(DataError):
        open_samples(floats(4), spec()).split(1.5)
    with pytest.raises(DataError) as excinfo:
        open_samples(floats(4), spec()).batch([4])
    one_line_error(excinfo, "out of range")
    with pytest.raises(DataError):
        open_samples(floats(4), spec()).subset([])
    with pytest.raises(DataError):
        next(open_samples(floats(4), spec()).batches(0))


# --------------------------------------------------------------------------- data errors


def test_missing_path(tmp_path):
    with pytest.raises(DataError) as excinfo:
        open_samples(tmp_path / "nope.npz", spec())
    one_line_error(excinfo, "nope.npz", "no such file")


@pytest.mark.parametrize("make", ["empty_npy", "empty_dir", "empty_iterable", "empty_reader"])
def test_empty_sets(tmp_path, make):
    np.save(tmp_path / "e.npy", np.zeros((0, 1, 4, 4), np.float32))
    (tmp_path / "empty").mkdir()
    source = {
        "empty_npy": tmp_path / "e.npy",
        "empty_dir": tmp_path / "empty",
        "empty_iterable": [],
        "empty_reader": FakeCalibrationDataReader([]),
    }[make]
    with pytest.raises(DataError) as excinfo:
        open_samples(source, spec())
    one_line_error(excinfo, "has 0 samples")


def test_unknown_file_type_and_source(tmp_path):
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(DataError) as excinfo:
        open_samples(tmp_path / "data.csv", spec())
    one_line_error(excinfo, "unknown file type '.csv'")
    (tmp_path / "labels.csv").write_text("file,class_index\na.png,1\n")      # the folder's labels, not the folder
    with pytest.raises(DataError) as excinfo:
        open_samples(tmp_path / "labels.csv", spec())
    one_line_error(excinfo, "is the labels file of an image folder",
                   f"give the folder that holds it and its images: {tmp_path}")
    with pytest.raises(DataError) as excinfo:
        open_samples(42, spec())
    one_line_error(excinfo, "int", "not a sample source")


@pytest.mark.parametrize("file, content, fragment", [
    ("bad.npy", b"\x93NUMPY garbage", "not a readable .npy"),
    ("bad.npz", b"PK\x03\x04 truncated", "not a readable .npz"),
    ("bad.png", b"\x89PNG\r\n\x1a\n truncated", "cannot be decoded as an image"),
])
def test_corrupt_files(tmp_path, file, content, fragment):
    (tmp_path / file).write_bytes(content)
    with pytest.raises(DataError) as excinfo:
        open_samples(tmp_path / file, spec())
    one_line_error(excinfo, file, fragment)


def test_a_file_that_is_no_numpy_file_is_named_without_numpys_unpickling_advice(tmp_path):
    import pickle
    import zipfile

    (tmp_path / "text.npy").write_text("hello")              # numpy's own text: "load it unsafely"
    (tmp_path / "pickled.npz").write_bytes(pickle.dumps({"x": 1}))
    with zipfile.ZipFile(tmp_path / "docs.npz", "w") as archive:    # its members came back as bytes: a bug
        archive.writestr("notes.txt", "hello")
    for file, fragment in (("text.npy", "is not a .npy file"), ("pickled.npz", "is not a .npz file"),
                           ("docs.npz", "zip archive without NumPy arrays")):
        with pytest.raises(DataError) as excinfo:
            open_samples(tmp_path / file, spec())
        one_line_error(excinfo, file, fragment)
        assert "allow_pickle" not in str(excinfo.value)


def test_object_arrays_are_never_unpickled(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError) as excinfo:
        open_samples(tmp_path / "o.npy", spec())
    one_line_error(excinfo, "object array")


def test_npz_keys_must_name_the_inputs_of_a_multi_input_model(tmp_path):
    np.savez(tmp_path / "pair.npz", a=floats(2, (3,)), c=floats(2, (3,)))
    with pytest.raises(DataError) as excinfo:
        open_samples(tmp_path / "pair.npz", add_pair_model())
    one_line_error(excinfo, "missing ['b']")
    np.save(tmp_path / "one.npy", floats(2, (3,)))
    with pytest.raises(DataError) as excinfo:
        open_samples(tmp_path / "one.npy", add_pair_model())
    one_line_error(excinfo, "holds one array but the model has 2 inputs")


def test_inputs_with_different_sample_counts(tmp_path):
    np.savez(tmp_path / "pair.npz", a=floats(2, (3,)), b=floats(3, (3,)))
    with pytest.raises(DataError) as excinfo:
        open_samples(tmp_path / "pair.npz", add_pair_model())
    one_line_error(excinfo, "different sample counts {'a': 2, 'b': 3}")


def test_ambiguous_npz_for_a_single_input(tmp_path):
    np.savez(tmp_path / "two.npz", p=floats(2), q=floats(2))
    with pytest.raises(DataError) as excinfo:
        open_samples(tmp_path / "two.npz", spec())
    one_line_error(excinfo, "cannot tell which of ['p', 'q']")


def test_rank_mismatch():
    with pytest.raises(DataError) as excinfo:
        open_samples(floats(3, (16,)), spec())
    one_line_error(excinfo, "rank 2", "rank 4")


def test_fixed_dimension_mismatch_names_both_shapes():
    with pytest.raises(DataError) as excinfo:
        open_samples(floats(3, (1, 28, 28)), spec(("N", 3, 32, 32)))
    one_line_error(excinfo, "1x28x28", "3x32x32")


def test_nhwc_model_hint():
    with pytest.raises(DataError) as excinfo:
        open_samples(pixels(2, (8, 8, 3)), spec(("N", 8, 8, 3)))
    one_line_error(excinfo, "layout='NHWC'")


@pytest.mark.parametrize("data, input_dtype", [
    (np.array([["a", "b"], ["c", "d"]]), np.float32),
    (np.ones((2, 2), dtype=np.complex64), np.float32),
    (np.ones((2, 2), dtype=np.float32), np.int64),
])
def test_dtype_that_cannot_be_cast(tmp_path, data, input_dtype):
    np.savez(tmp_path / "d.npz", x=data)
    with pytest.raises(DataError) as excinfo:
        open_samples(tmp_path / "d.npz", spec(("N", 2), dtype=input_dtype))
    one_line_error(excinfo, "cannot be cast")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_float_data(bad):
    data = floats(4)
    data[3, 0, 1, 2] = bad
    with pytest.raises(DataError) as excinfo:
        open_samples(data, spec())
    one_line_error(excinfo, "NaN or inf")


@pytest.mark.parametrize("labels, fragment", [
    (np.arange(3), "has 3 labels for 4 samples"),
    (np.array([0.0, 1.0, 1.0, 0.0]), "not integers"),
    (np.zeros((4, 2), dtype=np.int64), "not (N,)"),
])
def test_bad_labels(tmp_path, labels, fragment):
    np.savez(tmp_path / "d.npz", x=floats(4), y=labels)
    with pytest.raises(DataError) as excinfo:
        open_samples(tmp_path / "d.npz", spec())
    one_line_error(excinfo, fragment)


def test_directory_with_labels_in_some_files_only(tmp_path):
    np.savez(tmp_path / "a.npz", x=floats(2), y=np.arange(2))
    np.savez(tmp_path / "b.npz", x=floats(2))
    with pytest.raises(DataError) as excinfo:
        open_samples(tmp_path, spec())
    one_line_error(excinfo, "a.npz has labels but b.npz has none")


@pytest.mark.parametrize("batches, fragment", [
    ([{"x": floats(2)}, {"x": floats(2), "y": np.arange(2)}],
     "batch 1 has keys ['x', 'y'] but batch 0 has ['x']"),
    ([{"z": floats(2)}], "the model's inputs are ['x']"),
    ([floats(2)[0].tolist()], "not a dict"),
    ([{"x": floats(2)}, {"x": floats(2, (1, 5, 5))}], "1x5x5 per sample in batch 1"),
])
def test_bad_iterables(batches, fragment):
    with pytest.raises(DataError) as excinfo:
        open_samples(batches, spec())
    one_line_error(excinfo, fragment)


def test_labels_csv_problems(tmp_path):
    save_png(tmp_path / "a.png", pixels(1)[0])
    save_png(tmp_path / "b.png", pixels(1, seed=1)[0])
    (tmp_path / "labels.csv").write_text("file,class_index\na.png,1\n")
    with pytest.raises(DataError) as excinfo:
        open_samples(tmp_path, spec())
    one_line_error(excinfo, "no row for 1 image(s), e.g. 'b.png'")
    (tmp_path / "labels.csv").write_text("file,class_index\na.png,1\nb.png,cat\n")
    with pytest.raises(DataError) as excinfo:
        open_samples(tmp_path, spec())
    one_line_error(excinfo, "labels.csv:3", "'cat' is not an integer")
    (tmp_path / "labels.csv").write_text("file,class_index\nimages/a.png,1\nimages/b.png,2\n")
    with pytest.raises(DataError) as excinfo:
        open_samples(tmp_path, spec())
    one_line_error(excinfo, "no row for 2 image(s)",
                   "its rows name 2 file(s) not in the folder, e.g. 'images/a.png'")


def test_a_symbolic_link_to_nothing_is_named_not_skipped(tmp_path):
    """A link whose target moved was left out without a word (with a labels.csv: "lists 1 file(s)
    not in the folder", though it is there)."""
    save_png(tmp_path / "flat" / "a.png", pixels(1)[0])
    (tmp_path / "flat" / "b.png").symlink_to(tmp_path / "moved.png")
    save_png(tmp_path / "classes" / "cat" / "a.png", pixels(1)[0])
    (tmp_path / "classes" / "cat" / "b.png").symlink_to(tmp_path / "moved.png")
    (tmp_path / "arrays").mkdir()
    np.save(tmp_path / "arrays" / "a.npy", floats(2))
    (tmp_path / "arrays" / "b.npy").symlink_to(tmp_path / "moved.npy")
    for folder, link in (("flat", "b.png"), ("classes", "cat/b.png"), ("arrays", "b.npy")):
        with pytest.raises(DataError) as excinfo:
            open_samples(tmp_path / folder, spec())
        one_line_error(excinfo, f"{folder}/{link} | is a symbolic link to {tmp_path}/moved",
                       "which does not exist")
    (tmp_path / "flat" / "b.png").unlink()
    (tmp_path / "flat" / "b.png").symlink_to(tmp_path / "flat" / "a.png")        # a link to an image is one
    assert len(open_samples(tmp_path / "flat", spec())) == 2


def test_a_labels_file_under_another_name_is_warned_about(tmp_path, caplog):
    save_png(tmp_path / "a.png", pixels(1)[0])
    (tmp_path / "Labels.CSV").write_text("file,class_index\na.png,1\n")
    with caplog.at_level(logging.WARNING):
        assert open_samples(tmp_path, spec()).labels is None
    warned = [r.getMessage() for r in caplog.records]
    assert any("labels are read from labels.csv only, not from Labels.CSV" in w for w in warned)


def test_labels_csv_columns_named_by_its_header(tmp_path):
    """A header naming file and class_index finds them in any column: pandas' to_csv writes its
    index first, which read as file, class index said "class index 'a.png' is not an integer"."""
    save_png(tmp_path / "a.png", pixels(1)[0])
    save_png(tmp_path / "b.png", pixels(1, seed=1)[0])
    for text in (",file,class_index\n0,a.png,3\n1,b.png,5\n", "Class_Index,File\n3,a.png\n5,b.png\n"):
        (tmp_path / "labels.csv").write_text(text)
        np.testing.assert_array_equal(open_samples(tmp_path, spec()).labels, [3, 5])
    (tmp_path / "labels.csv").write_text("name,class_index,file\nx,3,a.png\nx,5\n")
    with pytest.raises(DataError) as excinfo:
        open_samples(tmp_path, spec())
    one_line_error(excinfo, "labels.csv:3", "header names file and class_index in columns 3 and 2")


def test_image_problems(tmp_path):
    with pytest.raises(DataError) as excinfo:
        open_samples(pixels(2, (4, 4, 3)), spec(), preprocess=Preprocess(grayscale=False))
    one_line_error(excinfo, "3 channels but the input wants 1", "drop --color (preprocess grayscale=False)")
    with pytest.raises(DataError) as excinfo:
        open_samples(pixels(2, (4, 4)), spec(("N", 1, 8, 8)), preprocess=Preprocess(layout="NHWC"))
    one_line_error(excinfo, "1 channel but the input wants 8", "the input looks NCHW: drop --layout NHWC")
    with pytest.raises(DataError) as excinfo:
        open_samples(pixels(2, (16,)), spec()).batch([0])                # flat uint8 rows: not images
    one_line_error(excinfo, "uint8 samples of shape 16", "read as images (N, H, W)", "reshape them to images")
    with pytest.raises(DataError) as excinfo:
        open_samples(pixels(2, (4, 4)), spec(("N", 1, 8, 8)), preprocess=Preprocess(center_crop=8))
    one_line_error(excinfo, "4x4 is smaller than center_crop 8x8")
    with pytest.raises(DataError) as excinfo:
        open_samples(pixels(2, (4, 4, 3)), spec(("N", 3, 4, 4)), preprocess=Preprocess(mean=(0.1, 0.2)))
    one_line_error(excinfo, "mean has 2 values for 3-channel images", "give 1 or 3 values")
    with pytest.raises(DataError) as excinfo:
        open_samples(pixels(2, (4, 4)), spec(), preprocess=Preprocess(std=(0.1, 0.2)))
    one_line_error(excinfo, "std has 2 values for 1-channel images", "give 1 value (")      # not "1 or 1 values"
    save_png(tmp_path / "mixed" / "a.png", pixels(1)[0])
    np.save(tmp_path / "mixed" / "b.npy", floats(1))
    with pytest.raises(DataError) as excinfo:
        open_samples(tmp_path / "mixed", spec())
    one_line_error(excinfo, "mixes array files and images")


def test_image_modes_beyond_8_bits(tmp_path):
    """16-bit gray images are scaled to 8 bits (Pillow's convert clips them at 255), 32-bit integer
    ones holding 8-bit values are taken as they are, floating-point ones are refused."""
    values = np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369            # 0 .. 65535
    Image.fromarray(values).save(tmp_path / "wide.png")
    assert Image.open(tmp_path / "wide.png").mode == "I;16"
    feed = open_samples(tmp_path / "wide.png", spec()).batch([0])["x"]
    np.testing.assert_allclose(feed[0, 0], np.rint(values / 257) / 255, atol=1e-7)
    Image.fromarray(values.astype(np.int32) // 257).save(tmp_path / "int.tif")
    assert Image.open(tmp_path / "int.tif").mode == "I"
    np.testing.assert_allclose(open_samples(tmp_path / "int.tif", spec()).batch([0])["x"][0, 0],
                               (values // 257) / 255, atol=1e-7)
    Image.fromarray(values.astype(np.float32) / 65535).save(tmp_path / "float.tif")
    with pytest.raises(DataError) as excinfo:
        open_samples(tmp_path / "float.tif", spec()).batch([0])
    one_line_error(excinfo, "float.tif", "32-bit floating-point image")


def test_transparency_is_dropped_with_a_warning(tmp_path, caplog):
    """Alpha is dropped (as Pillow's convert('RGB')); a set with transparent pixels says so once."""
    drawn = np.zeros((4, 4, 4), np.uint8)
    drawn[..., 3] = pixels(1)[0]                     # a digit drawn in the alpha channel only
    for i in range(3):
        save_png(tmp_path / "drawn" / f"{i}.png", drawn)
    save_png(tmp_path / "opaque" / "a.png", np.full((4, 4, 4), 255, np.uint8))
    with caplog.at_level(logging.WARNING):
        open_samples(tmp_path / "opaque", spec()).batch([0])
        assert not caplog.records
        open_samples(tmp_path / "drawn", spec()).batch([0, 1, 2])
    warned = [r.getMessage() for r in caplog.records if "transparent pixels" in r.getMessage()]
    assert len(warned) == 1 and "0.png" in warned[0]


def test_a_resize_beyond_pillows_image_limit_is_refused_before_allocating(tmp_path, monkeypatch):
    """--resize 100000 made a 10 GB image of each sample (the process was killed); the limit is
    Pillow's MAX_IMAGE_PIXELS, made small here so that the resize before the fix is cheap."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    save_png(tmp_path / "digits" / "a.png", pixels(1)[0])
    with pytest.raises(DataError) as excinfo:
        open_samples(tmp_path / "digits", spec(), preprocess=Preprocess(resize=100))
    one_line_error(excinfo, "resizing to 100x100 makes images of 10000 pixels", "--resize")
    open_samples(tmp_path / "digits", spec(), preprocess=Preprocess(resize=4))        # within it


def test_a_lab_image_has_no_alpha_channel(tmp_path, caplog):
    """LAB's bands are L, A, B: its A (the a* colour axis) is not an alpha channel."""
    (tmp_path / "lab").mkdir()
    Image.fromarray(pixels(1, (4, 4, 3))[0]).convert("LAB").save(tmp_path / "lab" / "a.tif")
    with caplog.at_level(logging.WARNING):
        open_samples(tmp_path / "lab", spec(("N", 3, 4, 4))).batch([0])
    assert not [r for r in caplog.records if "transparent" in r.getMessage()]


def test_automatic_resize_that_squashes_is_warned_about_once(tmp_path, caplog):
    from onnxprune.data import preprocess

    preprocess._SQUEEZED.clear()
    for i in range(3):
        save_png(tmp_path / "wide" / f"{i}.png", pixels(1, (6, 12), seed=i)[0])
        save_png(tmp_path / "square" / f"{i}.png", pixels(1, (6, 6), seed=i)[0])
    with caplog.at_level(logging.WARNING):
        open_samples(tmp_path / "square", spec(("N", 1, 4, 4))).batch([0, 1, 2])
        assert not caplog.records                               # same aspect ratio: no word
        open_samples(tmp_path / "wide", spec(("N", 1, 4, 4))).batch([0, 1, 2])
        open_samples(tmp_path / "wide", spec(("N", 1, 4, 4)), preprocess=Preprocess(resize=4, center_crop=4)).batch([0])
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "6x12 are resized to the model's 4x4" in warned[0] and "--center-crop 4" in warned[0]


def test_image_folder_classes_by_number_hidden_and_empty_folders(tmp_path, caplog):
    for name in ["3", "7", "10"]:
        save_png(tmp_path / "digits" / name / "a.png", pixels(1)[0])
    save_png(tmp_path / "digits" / "3" / ".ipynb_checkpoints" / "b.png", pixels(1)[0])   # hidden: skipped
    save_png(tmp_path / "digits" / "__MACOSX" / "7" / "c.png", pixels(1)[0])             # not a class
    (tmp_path / "digits" / "5").mkdir()                                                   # empty: label 5 unused
    samples = open_samples(tmp_path / "digits", spec())
    np.testing.assert_array_equal(samples.labels, [3, 7, 10])       # by number: "10" is not class 0 or 2
    assert samples.describe()["classes"] == ["3", "7", "10"]
    for name in ["cat", "dog"]:
        save_png(tmp_path / "pets" / name / "a.png", pixels(1)[0])
    (tmp_path / "pets" / "cache").mkdir()
    with pytest.raises(DataError) as excinfo:
        open_samples(tmp_path / "pets", spec())
    one_line_error(excinfo, "pets/cache", "class folder without images", "sorted order")


def test_labels_csv_matches_names_loosely_and_ignores_extra_rows(tmp_path, caplog):
    save_png(tmp_path / "\u00e4.png", pixels(1)[0])                     # composed a-umlaut on disk
    save_png(tmp_path / "b.png", pixels(1, seed=1)[0])
    (tmp_path / "labels.csv").write_text("file,class_index\na\u0308.png,4\n./b.png,2\ngone.png,1\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        samples = open_samples(tmp_path, spec())
    np.testing.assert_array_equal(samples.labels, [2, 4])           # sorted: b.png, then a-umlaut
    assert any("lists 1 file(s) not in the folder" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- real data
#
# The accuracies measured in ../shared/README.md, reproduced through open_samples,
# make_session and run_batches.

DIGITS = Preprocess()
DIGITS_CENTRED = Preprocess(mean=(0.5,), std=(0.5,))

REAL_CASES = [
    ("lenet_caffe_mnist.onnx", "digits/mnist_test.npz", DIGITS, 99.07),
    ("lenet_caffe_mnist.onnx", "digits/usps_test.npz", DIGITS, 75.4),
    ("lenet_caffe_mnist.onnx", "digits/mnist_m_test.npz", DIGITS, 51.3),
    ("mnist_cnn_fc3136.onnx", "digits/mnist_test.npz", DIGITS_CENTRED, 98.77),
    ("mnist_cnn_fc3136.onnx", "digits/usps_test.npz", DIGITS_CENTRED, 78.4),
    ("mnist_cnn_fc3136.onnx", "digits/mnist_m_test.npz", DIGITS_CENTRED, 53.8),
    ("mnist_extdata/mnist.onnx", "digits/usps_test.npz", DIGITS_CENTRED, 45.9),
    pytest.param("resnet20_cifar10.onnx", "cifar10/cifar10_test_jpeg.npz", Preprocess(**IMAGENET), 81.0,
                 marks=pytest.mark.slow),
    pytest.param("mobilenetv2_imagenet_fp32.onnx", "imagenet_samples",
                 Preprocess(resize=256, center_crop=224, **IMAGENET), 82.6, marks=pytest.mark.slow),
]


def top1(model: onnx.ModelProto, samples: SampleSet, *, batch_size: int) -> float:
    predictions = np.empty(len(samples), dtype=np.int64)
    for indices, (logits,) in run_batches(make_session(model), samples, batch_size=batch_size):
        predictions[indices] = logits.argmax(axis=1)
    return 100.0 * float(np.mean(predictions == samples.labels))


@pytest.mark.real
@pytest.mark.parametrize("model_file, data, preprocess, measured", REAL_CASES)
def test_measured_accuracy_reproduces(shared, model_file, data, preprocess, measured):
    model = load_model(shared / "models" / model_file)
    samples = open_samples(shared / "data" / data, model, preprocess=preprocess)
    assert samples.labels is not None
    accuracy = top1(model, samples, batch_size=16 if "mobilenet" in model_file else 256)
    assert abs(accuracy - measured) <= 0.5, f"{model_file} on {data}: {accuracy:.2f} % vs {measured} %"


@pytest.mark.real
def test_real_split_is_disjoint_and_labelled(shared):
    model = load_model(shared / "models" / "lenet_caffe_mnist.onnx")
    samples = open_samples(shared / "data" / "digits" / "usps_test.npz", model)
    calibration, evaluation = samples.split(0.5, seed=0)
    assert len(calibration) + len(evaluation) == 2007
    assert not set(calibration.source_indices) & set(evaluation.source_indices)
    assert calibration.describe()["indices_sha"] != evaluation.describe()["indices_sha"]
    assert calibration.batch([0])["data"].shape == (1, 1, 28, 28)


def test_parts_read_rows_as_one_array_and_views_within_a_part():
    rng = np.random.default_rng(0)
    whole = rng.normal(size=(70, 3, 2)).astype(np.float32)
    parts = Parts([whole[:32], whole[32:64], whole[64:]])
    assert len(parts) == 70 and parts.shape == whole.shape and parts.nbytes == whole.nbytes
    inside = parts.rows(32, 64)
    assert np.shares_memory(inside, parts.parts[1])
    np.testing.assert_array_equal(inside, whole[32:64])
    np.testing.assert_array_equal(parts.rows(10, 69), whole[10:69])      # across all three parts
    np.testing.assert_array_equal(np.asarray(parts), whole)


def test_feeds_batches_follow_the_stored_order():
    a = np.arange(50, dtype=np.float32).reshape(25, 2)
    parts = Parts([a[:10], a[10:20], a[20:]])
    feeds = Feeds({"x": parts, "y": a * 2}, name="stored")
    assert len(feeds) == 25 and feeds.describe()["count"] == 25
    seen = list(feeds.batches(10))
    assert [list(i) for i, _ in seen] == [list(range(0, 10)), list(range(10, 20)), list(range(20, 25))]
    np.testing.assert_array_equal(np.concatenate([f["x"] for _, f in seen]), a)
    np.testing.assert_array_equal(np.concatenate([f["y"] for _, f in seen]), a * 2)
    with pytest.raises(DataError, match="different sample counts"):
        Feeds({"x": a, "y": a[:3]}, name="bad")


@pytest.mark.parametrize("layout", [0, 1])
def test_a_sequence_first_recurrent_input_is_refused(layout):
    """An LSTM reading the graph input as [sequence, batch, features] (layout 0, PyTorch's
    batch_first=False) would get samples cut along its time axis: refused, naming the input."""
    hidden, features, steps = 3, 4, 5
    shape = [steps, "N", features] if layout == 0 else ["N", steps, features]
    model = helper.make_model(helper.make_graph(
        [helper.make_node("LSTM", ["x", "W", "R"], ["y"], name="lstm", hidden_size=hidden, layout=layout)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.ones((1, 4 * hidden, features), np.float32), "W"),
         onnx.numpy_helper.from_array(np.ones((1, 4 * hidden, hidden), np.float32), "R")]),
        opset_imports=[helper.make_opsetid("", 14)])
    data = np.zeros((8, steps, features), np.float32)
    if layout == 1:
        assert len(open_samples(data, model)) == 8
        return
    with pytest.raises(DataError, match=r"x \| is the sequence-first input 5xNx4 of LSTM 'lstm' .*batch_first=True"):
        open_samples(data, model)


def test_shared_samples_are_counted_by_content_not_by_name(tmp_path):
    """An --eval-data that copies the target data under other names: image files by their bytes,
    array rows by every input's values and dtype (labels aside); a re-encoded image is not shared."""
    images = pixels(4, (4, 4), seed=1)
    for i, image in enumerate(images):
        save_png(tmp_path / "target" / f"{i}.png", image)
    for i, image in enumerate(images[:2]):
        save_png(tmp_path / "copy" / f"renamed_{i}.png", image)
    Image.fromarray(images[2]).save(tmp_path / "copy" / "other.bmp")        # same pixels, other bytes
    save_png(tmp_path / "copy" / "new.png", pixels(1, (4, 4), seed=9)[0])
    target, copy = (open_samples(tmp_path / name, spec()) for name in ("target", "copy"))
    assert copy.shared_with(target) == 2 and target.shared_with(copy) == 2
    assert copy.subset([0]).shared_with(target.subset([0])) == 0        # other.bmp against 0.png

    x = floats(5)
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(5))
    np.savez(tmp_path / "b.npz", x=x[[4, 0]], y=np.zeros(2, np.int64))              # other labels: still shared
    np.save(tmp_path / "c.npy", x[:2].astype(np.float64))                            # other dtype: not
    a, b, c = (open_samples(tmp_path / name, spec()) for name in ("a.npz", "b.npz", "c.npy"))
    assert b.shared_with(a) == 2 and a.shared_with(b) == 2 and c.shared_with(a) == 0
    assert a.split(0.6, seed=0)[1].shared_with(a.split(0.6, seed=0)[0]) == 0
    assert a.shared_with(copy) == 0                                                 # arrays against images
