"""Sample readers: user data in, model-ready batches out.

``open_samples(source, model)`` accepts

- a ``.npy`` file (one array, N x ...; single-input models),
- a ``.npz`` file: one array, or arrays keyed by input name; an optional ``y`` or
  ``labels`` array holds integer labels; keys that are not numeric or clearly not an
  input (``classes`` names, a 1-D vector for an image model) are ignored,
- a directory of ``.npy``/``.npz`` files, concatenated in sorted file-name order,
- an image folder: ImageFolder layout (one subfolder per class; sorted subfolder names
  give the class index) or a flat folder of images with an optional ``labels.csv``
  (header row, then ``file,class_index[,...]``, or columns a header names ``file`` and
  ``class_index``; extra columns ignored). Images are
  decoded with Pillow one batch at a time,
- an in-memory ``np.ndarray`` or ``{name: array}`` mapping (as for .npy / .npz),
- a Python iterable of ``{input_name: array}`` batches, or an onnxruntime
  ``CalibrationDataReader``-like object (``get_next()`` returning a dict, then None);
  both are drained once and concatenated.

and returns a ``SampleSet``: a finite, indexable set of samples with optional labels that
yields ``{input_name: array}`` feeds in the model's dtype, layout and shape.

What the arrays mean
--------------------
- ``uint8`` arrays going to a floating-point input are images: rank 3 is (N, H, W)
  grayscale, rank 4 is (N, H, W, C) when the last dim is 1, 3 or 4 (alpha is dropped),
  else (N, C, H, W) when the second is. Decoded image files are (H, W, C) alike. They run
  through the image pipeline below; they stay uint8 in memory until a batch is asked for.
- Anything else numeric (float arrays, other integer arrays) is taken as already
  preprocessed: it is cast to the model dtype; when its rank is one less than the
  input's and the input's channel dim is 1, that axis is added. ``Preprocess`` does not
  touch it.

Preprocessing (images: channels, resize, crop, normalise) is ``preprocess.py``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import os
import unicodedata
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from PIL import Image

from onnxprune.data.preprocess import Preprocess, dims_text, is_image_batch, is_int, prepare
from onnxprune.errors import DataError
from onnxprune.model import InputSpec, input_specs, sequence_first_inputs

log = logging.getLogger(__name__)

LABEL_KEYS = ("y", "labels")
ARRAY_SUFFIXES = (".npy", ".npz")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
LABELS_CSV = "labels.csv"


class _ArrayStore:
    """Arrays in memory, one per input, all with the same first dimension."""

    def __init__(self, arrays: dict[str, np.ndarray], kind: str):
        self.arrays = arrays
        self.kind = kind
        self.count = len(next(iter(arrays.values())))

    def fetch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {name: array[rows] for name, array in self.arrays.items()}


class _ImageStore:
    """Image files for a single input, decoded on demand."""

    kind = "image folder"

    def __init__(self, files: list[Path], input_name: str):
        self.files = files
        self.input_name = input_name
        self.count = len(files)

        self.transparent = 0          # images decoded so far whose alpha channel was not opaque

    def fetch(self, rows: np.ndarray) -> dict[str, list[np.ndarray]]:
        images = []
        for row in rows:
            image, transparent = _decode_image(self.files[row])
            images.append(image)
            if transparent and not self.transparent:
                log.warning("%s has transparent pixels: images are read without their alpha channel (the "
                            "colour under it, as Pillow's convert('RGB') gives it); flatten them onto the "
                            "background the model saw if that is not it", self.files[row])
            self.transparent += transparent
        return {self.input_name: images}


#: Pillow modes of one-channel 16-bit images (PNG, TIFF); "I" (32-bit integers) is read by its values
_GRAY16 = ("I;16", "I;16B", "I;16L", "I;16N")


def _decode_image(path: Path) -> tuple[np.ndarray, bool]:
    """One image file as (H, W, 1) or (H, W, 3) uint8, and whether it had a non-opaque alpha
    channel (dropped). 16-bit gray images are scaled to 8 bits (value / 257, rounded; Pillow's
    convert would clip them at 255), 32-bit integer ones too unless their values fit in 8 bits;
    floating-point images, whose range is not known, are refused."""
    try:
        with Image.open(path) as image:
            if image.mode == "F":
                raise DataError(str(path), "is a 32-bit floating-point image: its value range is unknown",
                                "save it as an 8- or 16-bit image, or give the preprocessed arrays in a .npz")
            if image.mode in _GRAY16 or image.mode == "I":
                wide = np.asarray(image, dtype=np.float64)
                if wide.min() < 0 or wide.max() > 65535:
                    raise DataError(str(path), f"holds values {wide.min():g}..{wide.max():g}, outside 16 bits")
                eight = image.mode == "I" and wide.max() <= 255
                return np.rint(wide if eight else wide / 257.0).astype(np.uint8)[..., None], False
            alpha = "A" in image.getbands() and image.mode != "LAB"       # LAB's "A" is its a* colour axis
            transparent = alpha and image.getchannel("A").getextrema()[0] < 255
            if image.mode == "P" and "transparency" in image.info:
                transparent = image.convert("RGBA").getchannel("A").getextrema()[0] < 255
            gray = image.mode in ("1", "L", "LA")
            array = np.asarray(image.convert("L" if gray else "RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(str(path), f"cannot be decoded as an image ({type(exc).__name__}: {exc})") from None
    return (array[..., None] if array.ndim == 2 else array), bool(transparent)


def _bytes_per_sample(feeds: dict[str, np.ndarray]) -> float:
    return sum(v.nbytes for v in feeds.values()) / len(next(iter(feeds.values())))


#: ``SampleSet.in_memory`` holds at most this many bytes of decoded samples
IN_MEMORY_BYTES = 1 << 30


class SampleSet:
    """A finite set of model input samples with optional integer labels.

    Built by ``open_samples``. Positions 0..len-1 address the samples; ``batch`` turns
    positions into feeds ``{input name: array (n, ...)}`` that are preprocessed, in the
    model's dtype and checked against its input shapes. ``subset`` and ``split`` give new
    sets over the same storage; labels follow.
    """

    def __init__(self, *, name: str, store, specs: Sequence[InputSpec], preprocess: Preprocess,
                 labels: np.ndarray | None, rows: np.ndarray, classes: tuple[str, ...] | None = None):
        self.name = name
        self.input_names = tuple(spec.name for spec in specs)
        self._store = store
        self._specs = tuple(specs)
        self._preprocess = preprocess
        self._all_labels = labels
        self._rows = rows
        self._classes = classes
        self.labels = None if labels is None else labels[rows]
        self._content: str | None = None           # content_sha, once computed
        if len(rows) == 0:
            raise DataError(name, "has 0 samples")

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def specs(self) -> tuple[InputSpec, ...]:
        """The model inputs this set was opened for (what ``batch`` checks and casts to)."""
        return self._specs

    @property
    def preprocess(self) -> Preprocess:
        """The image preprocessing this set applies in ``batch``."""
        return self._preprocess

    def __repr__(self) -> str:
        labelled = "labelled" if self.labels is not None else "unlabelled"
        return f"SampleSet({self.name!r}, {len(self)} samples, {labelled})"

    @property
    def source_indices(self) -> np.ndarray:
        """(N,) int64: the row of each sample in the original source."""
        return self._rows.copy()

    def batch(self, indices) -> dict[str, np.ndarray]:
        """Feeds for the samples at ``indices`` (positions in this set): {name: (n, ...) array}."""
        positions = self._positions(indices)
        raw = self._store.fetch(self._rows[positions])
        return {spec.name: prepare(raw[spec.name], spec, self._preprocess, self.name)
                for spec in self._specs}

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Yield ``(indices, feeds)`` over the whole set in order, ``batch_size`` samples at a
        time (the last batch may be smaller; fixed-batch padding is the runtime's job)."""
        if not is_int(batch_size) or batch_size <= 0:
            raise DataError("batch_size", f"must be a positive integer, not {batch_size!r}")
        for start in range(0, len(self), batch_size):
            indices = np.arange(start, min(start + batch_size, len(self)), dtype=np.int64)
            yield indices, self.batch(indices)

    def subset(self, indices) -> SampleSet:
        """The samples at ``indices`` (positions, a boolean mask or a slice), labels included."""
        positions = self._positions(indices)
        return SampleSet(name=self.name, store=self._store, specs=self._specs, preprocess=self._preprocess,
                         labels=self._all_labels, rows=self._rows[positions], classes=self._classes)

    def join(self, other: SampleSet) -> SampleSet:
        """This set's samples followed by ``other``'s; both must be sets over one storage
        (``subset``/``split`` of one opened set)."""
        if other._store is not self._store or other._specs != self._specs or other._preprocess != self._preprocess:
            raise DataError(self.name, f"cannot join {other.name!r}: not a part of the same opened samples")
        return SampleSet(name=self.name, store=self._store, specs=self._specs, preprocess=self._preprocess,
                         labels=self._all_labels, rows=np.concatenate([self._rows, other._rows]),
                         classes=self._classes)

    def stored(self, name: str) -> np.ndarray | None:
        """The array of input ``name`` as stored (before preprocessing), one row per sample of this
        set, when the samples are arrays in memory; None for image files or another input."""
        if isinstance(self._store, _ArrayStore) and name in self._store.arrays:
            return self._store.arrays[name][self._rows]
        return None

    @property
    def images(self) -> bool:
        """Whether preprocessing transforms these samples: image files, or uint8 image arrays
        for a float input (``preprocess.is_image_batch``); other arrays are fed as they are."""
        if isinstance(self._store, _ImageStore):
            return True
        return any(is_image_batch(self._store.arrays[spec.name], spec) for spec in self._specs
                   if spec.name in self._store.arrays)

    def bytes_per_sample(self) -> float:
        """Bytes one sample takes as the model's input (decoded and preprocessed)."""
        return _bytes_per_sample(self.batch(np.arange(min(len(self), 8))))

    def in_memory(self, max_bytes: int = IN_MEMORY_BYTES, batch_size: int = 64) -> SampleSet:
        """The same samples (labels and order too), decoded and preprocessed once and held as
        arrays: for a set that is read many times (the planner's checks). ``self`` when they
        are already arrays in the model's form, or would take more than ``max_bytes``."""
        first = self.batch(np.arange(min(len(self), batch_size)))
        if isinstance(self._store, _ArrayStore) and all(
                self._store.arrays[k].dtype == v.dtype for k, v in first.items() if k in self._store.arrays):
            return self
        if _bytes_per_sample(first) * len(self) > max_bytes:
            return self
        parts = [first] + [self.batch(np.arange(start, min(start + batch_size, len(self))))
                           for start in range(batch_size, len(self), batch_size)]
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in self.input_names}
        labels = None if self.labels is None else self.labels.copy()
        return SampleSet(name=self.name, store=_ArrayStore(arrays, f"{self._store.kind} (decoded)"),
                         specs=self._specs, preprocess=Preprocess(layout=self._preprocess.layout), labels=labels,
                         rows=np.arange(len(self), dtype=np.int64), classes=self._classes)

    def check_files(self, batch_size: int = 32) -> None:
        """Decode and prepare every image file of this set once, keeping nothing (one batch at a time):
        a file that cannot be decoded (corrupt, truncated) or prepared raises its DataError now, not
        when a later stage first reads the set. Arrays were checked when they were opened."""
        if isinstance(self._store, _ImageStore):
            for _ in self.batches(batch_size):
                pass

    def with_preprocess(self, preprocess: Preprocess) -> SampleSet:
        """The same samples (labels and order too) through another image ``preprocess``."""
        return SampleSet(name=self.name, store=self._store, specs=self._specs, preprocess=preprocess,
                         labels=self._all_labels, rows=self._rows, classes=self._classes)

    def without_labels(self) -> SampleSet:
        """The same samples, unlabelled (labels that do not fit the model are set aside)."""
        return SampleSet(name=self.name, store=self._store, specs=self._specs, preprocess=self._preprocess,
                         labels=None, rows=self._rows, classes=self._classes)

    def split(self, fraction: float = 0.5, *, seed: int = 0) -> tuple[SampleSet, SampleSet]:
        """Disjoint (calibration, evaluation) sets from a permutation seeded with ``seed``.

        The first holds ``round(fraction * N)`` samples, the second the rest; each keeps the
        source order. Raises DataError unless both are non-empty.
        """
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.number)) \
                or not 0 < fraction < 1:
            raise DataError("split", f"fraction must be between 0 and 1, not {fraction!r}")
        n = len(self)
        first = int(round(fraction * n))
        if first == 0 or first == n:
            raise DataError(self.name,
                            f"cannot split {n} sample{'s' if n != 1 else ''} at fraction {fraction}: one part "
                            "would be empty", "use more samples" + (" or a fraction nearer 0.5" if fraction != 0.5 else ""))
        order = np.random.default_rng(seed).permutation(n)
        return self.subset(np.sort(order[:first])), self.subset(np.sort(order[first:]))

    def content_sha(self) -> str:
        """A sha256 (16 hex digits) of what the samples hold as stored, before preprocessing: the
        input arrays' rows (dtype included), or the bytes of each image file. Two data files of the
        same shape, or a file edited between two runs, tell apart by it (labels are not included:
        statistics do not read them)."""
        if self._content is None:
            digest = hashlib.sha256()
            if isinstance(self._store, _ImageStore):
                for row in self._rows:
                    try:
                        digest.update(Path(self._store.files[row]).read_bytes())
                    except OSError as exc:
                        raise DataError(str(self._store.files[row]), f"cannot be read ({exc.strerror or exc})") from None
            else:
                for name in sorted(self._store.arrays):
                    array = self._store.arrays[name]
                    digest.update(f"{name}:{array.dtype}".encode())
                    for start in range(0, len(self._rows), 1024):
                        digest.update(np.ascontiguousarray(array[self._rows[start:start + 1024]]).tobytes())
            self._content = digest.hexdigest()[:16]
        return self._content

    def shared_with(self, other: SampleSet) -> int:
        """How many of these samples are stored exactly as one of ``other``'s: the same bytes of an
        image file, or the same row of every input array (dtype and shape included); labels aside.
        An --eval-data folder that copies --target-data under another name shares all of them.
        Image files are compared by size first: ``other``'s are read only where a size matches."""
        if type(self._store) is not type(other._store):
            return 0
        mine = self._digests()
        theirs = set(other._digests(sizes={size for size, _ in mine}))
        return sum(key in theirs for key in mine)

    def _digests(self, sizes: set[int] | None = None) -> list[tuple[int, bytes]]:
        """(size in bytes, sha256) of each sample as stored, in order; with ``sizes``, of the
        samples of those sizes only."""
        if isinstance(self._store, _ImageStore):
            digests = []
            for row in self._rows:
                path = Path(self._store.files[row])
                try:
                    size = path.stat().st_size
                    if sizes is None or size in sizes:
                        digests.append((size, hashlib.sha256(path.read_bytes()).digest()))
                except OSError as exc:
                    raise DataError(str(path), f"cannot be read ({exc.strerror or exc})") from None
            return digests
        names = sorted(self._store.arrays)
        arrays = [self._store.arrays[name] for name in names]
        size = sum(array[:1].nbytes for array in arrays)
        if sizes is not None and size not in sizes:
            return []
        header = "".join(f"{name}:{array.dtype}:{array.shape[1:]};" for name, array in zip(names, arrays)).encode()
        digests = []
        for start in range(0, len(self._rows), 1024):
            chunks = [np.ascontiguousarray(array[self._rows[start:start + 1024]]) for array in arrays]
            for i in range(len(chunks[0])):
                digest = hashlib.sha256(header)
                for chunk in chunks:
                    digest.update(chunk[i].tobytes())
                digests.append((size, digest.digest()))
        return digests

    def describe(self) -> dict:
        """A JSON-able summary; ``indices_sha`` identifies exactly which source rows are in the set
        (what they hold, ``content_sha``, is recorded where statistics are saved: it reads them all)."""
        info = {
            "name": self.name,
            "count": len(self),
            "labelled": self.labels is not None,
            "indices_sha": hashlib.sha256(self._rows.astype("<i8").tobytes()).hexdigest()[:16],
            "kind": self._store.kind,
            "source_count": self._store.count,
            "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": str(s.dtype)} for s in self._specs],
        }
        if any(np.issubdtype(s.dtype, np.floating) for s in self._specs):   # image preprocessing: never for token ids
            info["preprocess"] = dataclasses.asdict(self._preprocess)
        if self.labels is not None:
            info["num_classes_seen"] = int(len(np.unique(self.labels)))
        if self._classes is not None:
            info["classes"] = list(self._classes)
        return info

    def _positions(self, indices) -> np.ndarray:
        n = len(self)
        if isinstance(indices, slice):
            return np.arange(n, dtype=np.int64)[indices]
        positions = np.asarray(indices)
        if positions.dtype == bool:
            if positions.shape != (n,):
                raise DataError(self.name, f"boolean mask has shape {positions.shape}, not ({n},)")
            return np.flatnonzero(positions)
        if positions.ndim == 0:
            positions = positions[None]
        if positions.ndim != 1 or (positions.size and positions.dtype.kind not in "iu"):
            raise DataError(self.name, "indices must be a 1-D integer array, "
                                       f"not {positions.dtype} {positions.shape}")
        positions = positions.astype(np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= n):
            raise DataError(self.name, f"index out of range for {n} samples "
                                       f"(got {positions.min()}..{positions.max()})")
        return positions


class Parts:
    """Rows of several arrays (the batches of one run, in order) addressed as one, without
    joining them: rows within one part come back as a view of it, no copy."""

    def __init__(self, parts: Sequence[np.ndarray]):
        if not parts:
            raise ValueError("Parts needs at least one array")
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.shape = (int(self.starts[-1]),) + tuple(self.parts[0].shape[1:])
        self.dtype = self.parts[0].dtype
        self.nbytes = sum(p.nbytes for p in self.parts)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self.rows(0, len(self))
        return whole if dtype is None else whole.astype(dtype)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start`` to ``stop`` (exclusive): a view when one part holds them all."""
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        last = int(np.searchsorted(self.starts, stop, side="left")) - 1
        if first == last:
            offset = self.starts[first]
            return self.parts[first][start - offset:stop - offset]
        return np.concatenate([self.parts[k][max(start - self.starts[k], 0):stop - self.starts[k]]
                               for k in range(first, last + 1)])


class Feeds:
    """Model inputs already in the model's form, e.g. activations an earlier run computed
    (``calibration/provider.py``'s store), read batch by batch as views: no decoding, copy
    or re-check. Offers what ``collect`` reads of a SampleSet (``len``, ``batches``,
    ``describe``)."""

    def __init__(self, arrays: Mapping[str, np.ndarray | Parts], name: str):
        counts = {len(a) for a in arrays.values()}
        if len(counts) != 1:
            raise DataError(name, f"inputs have different sample counts {sorted(counts)}")
        self.arrays = dict(arrays)
        self.name = name

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def describe(self) -> dict:
        return {"name": self.name, "count": len(self), "labelled": False, "kind": "stored activations",
                "inputs": [{"name": k, "shape": ["N", *a.shape[1:]], "dtype": str(a.dtype)}
                           for k, a in self.arrays.items()]}

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            yield (np.arange(start, stop, dtype=np.int64),
                   {k: a.rows(start, stop) if isinstance(a, Parts) else a[start:stop] for k, a in self.arrays.items()})


def open_samples(source, model_or_specs, *, preprocess: Preprocess | None = None,
                 name: str | None = None) -> SampleSet:
    """Open ``source`` as a SampleSet for the inputs of ``model_or_specs``.

    source: a path (.npy, .npz, a directory of them, an image folder), an ndarray, a
        mapping {name: array}, an iterable of {input_name: array} batches, or an object
        with ``get_next()`` (onnxruntime CalibrationDataReader).
    model_or_specs: an onnx ModelProto or a list of InputSpec.
    preprocess: how uint8 images become model input (default: ``Preprocess()``).
    name: description used in messages and reports (default: the path or the kind).

    Every problem (missing or corrupt file, no samples, shape, dtype, NaN, labels) raises
    DataError with a one-line message; the first sample is prepared here so mismatches
    show up at once, not mid-run.
    """
    specs = _specs_of(model_or_specs)
    preprocess = Preprocess() if preprocess is None else preprocess
    if not isinstance(preprocess, Preprocess):
        raise DataError("preprocess", f"must be a Preprocess, not {type(preprocess).__name__}")
    classes = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = name or str(path)
        store, labels, classes = _open_path(path, specs)
    elif isinstance(source, np.ndarray):
        name = name or "numpy array"
        store, labels = _array_store(_pick_arrays({"x": source}, specs, name, single=True), "array")
    elif isinstance(source, Mapping):
        name = name or "dict of arrays"
        arrays = {str(k): np.asarray(v) for k, v in source.items()}
        store, labels = _array_store(_pick_arrays(arrays, specs, name), "arrays")
    elif callable(getattr(source, "get_next", None)):
        name = name or "calibration data reader"
        store, labels = _array_store(_concat_batches(iter(source.get_next, None), specs, name), "reader")
    elif isinstance(source, Iterable) and not isinstance(source, (bytes, bytearray)):
        name = name or "python iterable"
        store, labels = _array_store(_concat_batches(source, specs, name), "iterable")
    else:
        raise DataError(type(source).__name__, "is not a sample source",
                        "pass a path (.npy, .npz, folder), an array, "
                        "or an iterable of {input: array} batches")

    if isinstance(store, _ArrayStore):
        _check_counts(store.arrays, name)
    if store.count == 0:
        raise DataError(name, "has 0 samples")
    if labels is not None:
        labels = _check_labels(labels, store.count, name)
    if isinstance(store, _ArrayStore):
        for key, array in store.arrays.items():
            _check_finite(array, name, key)
    samples = SampleSet(name=name, store=store, specs=specs, preprocess=preprocess, labels=labels,
                        rows=np.arange(store.count, dtype=np.int64), classes=classes)
    samples.batch(np.array([0]))
    return samples


def _specs_of(model_or_specs) -> list[InputSpec]:
    if isinstance(model_or_specs, onnx.ModelProto):
        specs = input_specs(model_or_specs)
        for name, node in sequence_first_inputs(model_or_specs).items():
            dims = next(dims_text(s.shape) for s in specs if s.name == name)
            raise DataError(name, f"is the sequence-first input {dims} of {node.op_type} {node.name or '(unnamed)'!r} "
                            "(layout 0: [sequence, batch, features]), but onnxprune reads one sample per entry of "
                            "an input's first axis",
                            "export the model batch-first (PyTorch: batch_first=True, or transpose the input inside "
                            "forward)")
    else:
        specs = list(model_or_specs)
        if not all(isinstance(s, InputSpec) for s in specs):
            raise DataError("model_or_specs", "must be an onnx ModelProto or a list of InputSpec")
    if not specs:
        raise DataError("model", "has no inputs to feed")
    return specs


def _open_path(path: Path, specs: list[InputSpec]):
    """(store, labels or None, class names or None) for a file or folder."""
    if not path.exists():
        raise DataError(str(path), "no such file or directory")
    if path.is_dir():
        return _open_directory(path, specs)
    suffix = path.suffix.lower()
    if suffix in ARRAY_SUFFIXES:
        arrays = _load_array_file(path)
        picked = _pick_arrays(arrays, specs, str(path), single=suffix == ".npy")
        store, labels = _array_store(picked, suffix[1:])
        return store, labels, None
    if suffix in IMAGE_SUFFIXES:
        return _image_store([path], None, specs, path), None, None
    if path.name.lower() == LABELS_CSV:
        raise DataError(str(path), "is the labels file of an image folder, not samples",
                        f"give the folder that holds it and its images: {path.parent}")
    raise DataError(str(path), f"unknown file type {path.suffix or '(no suffix)'!r}",
                    "use .npy, .npz, an image, or a folder of them; for a token model also text, with "
                    "--tokenizer: .txt (a sentence a line) or .tsv (text and label columns)")


def _open_directory(path: Path, specs: list[InputSpec]):
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    arrays = [p for p in entries if p.suffix.lower() in ARRAY_SUFFIXES and _is_file(p)]
    images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and _is_file(p)]
    subdirs = [p for p in entries if p.is_dir() and p.name not in NOT_CLASSES]
    under = {d: _folder_images(d) for d in subdirs}
    class_dirs = [d for d in subdirs if under[d]]
    kinds = [k for k, found in (("array files", arrays), ("images", images), ("class subfolders", class_dirs))
             if found]
    if not kinds:
        raise DataError(str(path), "has 0 samples",
                        "expected .npy/.npz files, images, or class subfolders of images")
    if len(kinds) > 1:
        raise DataError(str(path), f"mixes {' and '.join(kinds)}", "keep one kind of sample per folder")
    if arrays:
        store, labels = _array_store(_concat_files(arrays, specs, path), "array directory")
        return store, labels, None
    if images:
        csv_path = path / LABELS_CSV
        labels = _read_labels_csv(csv_path, images) if csv_path.is_file() else None
        other = next((p.name for p in entries if p.suffix.lower() == ".csv" and p != csv_path), None)
        if labels is None and other is not None:      # Labels.CSV, train_labels.csv: no accuracy, and no word
            log.warning("%s: the images are unlabelled: labels are read from %s only, not from %s", path,
                        LABELS_CSV, other)
        return _image_store(images, labels, specs, path), labels, None
    # ImageFolder: every subfolder is a class, in sorted order, or by number when every name is
    # one (its label is then that number: "10" is not class 2 of 0..10, and folders 3 and 7 alone
    # stay classes 3 and 7); a class folder without images would shift the ones after it.
    numbered = all(d.name.isdigit() for d in subdirs)
    empty = [d.name for d in subdirs if d not in class_dirs]
    if empty and not numbered:
        also = f" (as are {', '.join(empty[1:4])})" if len(empty) > 1 else ""
        raise DataError(str(path / empty[0]), f"is a class folder without images{also}", "remove it or add its "
                        "images: class indices are the folders' positions in sorted order")
    if numbered:
        subdirs = sorted(class_dirs, key=lambda d: int(d.name))
    files, labels = [], []
    for index, folder in enumerate(subdirs):
        found = under[folder]
        files += found
        labels += [int(folder.name) if numbered else index] * len(found)
    store = _image_store(files, None, specs, path)
    return store, np.asarray(labels, dtype=np.int64), tuple(d.name for d in subdirs)


#: folders that are never a class: archivers' metadata
NOT_CLASSES = ("__MACOSX",)


def _folder_images(folder: Path) -> list[Path]:
    """The images under ``folder`` at any depth, sorted, none inside a hidden folder
    (``.ipynb_checkpoints``) or hidden themselves."""
    return sorted(f for f in folder.rglob("*")
                  if not any(part.startswith(".") for part in f.relative_to(folder).parts) and _is_image(f))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and _is_file(path)


def _is_file(path: Path) -> bool:
    """Whether ``path`` is a file; a symbolic link to nothing (its target moved) is a DataError
    rather than a sample left out without a word."""
    if path.is_symlink() and not path.exists():
        raise DataError(str(path), f"is a symbolic link to {os.readlink(path)}, which does not exist",
                        "restore its target or remove the link")
    return path.is_file()


def _image_store(files: list[Path], labels, specs: list[InputSpec], path: Path) -> _ImageStore:
    if len(specs) != 1:
        raise DataError(str(path), f"images can feed one input, but the model has {len(specs)}: "
                                   f"{[s.name for s in specs]}", "use a .npz keyed by input name")
    if not np.issubdtype(specs[0].dtype, np.floating):
        raise DataError(str(path), f"images need a floating-point input, "
                                   f"but '{specs[0].name}' is {specs[0].dtype}")
    return _ImageStore(files, specs[0].name)


def _read_labels_csv(csv_path: Path, images: list[Path]) -> np.ndarray:
    """Labels for ``images`` (in order) from a csv with columns file, class index (after a header
    row, which may name them ``file`` and ``class_index`` in other columns)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            rows = [(i, row) for i, row in enumerate(csv.reader(fh), start=1) if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(str(csv_path), f"cannot be read ({type(exc).__name__}: {exc})") from None
    columns = (0, 1)
    if rows and len(rows[0][1]) >= 2 and not _parses_as_int(rows[0][1][1]):
        header = [c.strip().lower() for c in rows[0][1]]
        if "file" in header and "class_index" in header:    # named columns (pandas writes its index first)
            columns = (header.index("file"), header.index("class_index"))
        rows = rows[1:]  # the header
    by_file: dict[str, int] = {}
    for line, row in rows:
        if len(row) <= max(columns):
            raise DataError(f"{csv_path}:{line}", "needs two columns: file, class index" if columns == (0, 1) else
                            f"has {len(row)} columns, but the header names file and class_index in columns "
                            f"{columns[0] + 1} and {columns[1] + 1}")
        file, value = _file_key(row[columns[0]]), row[columns[1]].strip()
        if not _parses_as_int(value):
            raise DataError(f"{csv_path}:{line}", f"class index {value!r} is not an integer")
        if file in by_file:
            raise DataError(f"{csv_path}:{line}", f"lists {file!r} twice")
        by_file[file] = int(value)
    names = [_file_key(p.name) for p in images]
    missing = [n for n in names if n not in by_file]
    unknown = sorted(set(by_file) - set(names))
    if missing:
        also = f" (its rows name {len(unknown)} file(s) not in the folder, e.g. {unknown[0]!r})" if unknown else ""
        raise DataError(str(csv_path), f"has no row for {len(missing)} image(s), e.g. {missing[0]!r}{also}")
    if unknown:      # a subset of a labelled folder, copied with its labels.csv
        log.warning("%s lists %d file(s) not in the folder (e.g. %r): their rows are not used", csv_path,
                    len(unknown), unknown[0])
    return np.asarray([by_file[n] for n in names], dtype=np.int64)


def _file_key(name: str) -> str:
    """A file name as labels.csv is matched on: ``./`` dropped, Unicode in composed form (macOS
    writes names decomposed, most editors composed)."""
    name = name.strip()
    return unicodedata.normalize("NFC", name[2:] if name.startswith("./") else name)


def _parses_as_int(text: str) -> bool:
    try:
        int(text.strip())
    except ValueError:
        return False
    return True


def _load_array_file(path: Path) -> dict[str, np.ndarray]:
    """The arrays in a .npy ({"x": array}) or .npz file, never unpickling anything."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return {"x": loaded}
        with loaded:
            members = set(loaded.zip.namelist())      # numpy reads a member that is not a .npy as bytes
            arrays = {key: loaded[key] for key in loaded.files if f"{key}.npy" in members}
    except ValueError as exc:
        if "Object arrays" in str(exc):
            raise DataError(str(path), "holds an object array, which is never unpickled",
                            "save plain numeric arrays") from None
        if "pickled" in str(exc):        # neither NumPy's header nor a zip archive: numpy would unpickle it
            raise DataError(str(path), f"is not a {path.suffix} file: it starts with neither NumPy's header "
                            "nor a zip archive's (a pickle or another format, which is never unpickled)",
                            "save the arrays with numpy.save or numpy.savez") from None
        raise DataError(str(path), f"is not a readable {path.suffix} file ({_first_line(exc)})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as exc:
        raise DataError(str(path), f"is not a readable {path.suffix} file ({type(exc).__name__}: "
                                   f"{_first_line(exc)})") from None
    if members and not arrays:
        raise DataError(str(path), f"is a zip archive without NumPy arrays (it holds {sorted(members)[:3]})",
                        "save the arrays with numpy.savez")
    return arrays


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _as_array(value, name: str, key: str) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim == 0:
        raise DataError(name, f"'{key}' is a scalar, not a batch of samples")
    return array


def _pick_arrays(arrays: dict[str, np.ndarray], specs: list[InputSpec], name: str, *,
                 single: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Split the arrays of one file into ({input name: array}, labels or None).

    single: the source holds exactly one unnamed array (.npy, ndarray).
    """
    names = [s.name for s in specs]
    if single:
        if len(specs) != 1:
            raise DataError(name, f"holds one array but the model has {len(specs)} inputs {names}",
                            "use a .npz keyed by input name")
        return {names[0]: _as_array(arrays["x"], name, "x")}, None
    label_keys = [k for k in LABEL_KEYS if k in arrays and k not in names]
    if len(label_keys) > 1:
        raise DataError(name, "has both 'y' and 'labels'; which are the labels?", "keep one")
    labels = arrays[label_keys[0]] if label_keys else None
    if len(specs) == 1:
        key = _single_input_key(arrays, specs[0], label_keys, name)
        picked, read = {names[0]: _as_array(arrays[key], name, names[0])}, {key}
    else:
        missing = [n for n in names if n not in arrays]
        if missing:
            raise DataError(name, f"has arrays {sorted(arrays)} but the model's inputs are {names} "
                                  f"(missing {missing})", "key the arrays by input name")
        picked, read = {n: _as_array(arrays[n], name, n) for n in names}, set(names)
    if labels is None:
        _warn_unread_labels({k: a for k, a in arrays.items() if k not in read}, len(next(iter(picked.values()))), name)
    return picked, labels


def _warn_unread_labels(unread: dict[str, np.ndarray], count: int, name: str) -> None:
    """A warning for an unread array that looks like labels under another name (one whole number
    for each of the ``count`` samples, such as 'label' or 'targets'): without labels there is no
    accuracy to measure."""
    for key, array in unread.items():
        if np.ndim(array) != 1 or len(array) != count or array.dtype.kind not in "biuf":
            continue
        if array.dtype.kind == "f" and not np.all(np.mod(array, 1) == 0):
            continue
        log.warning("%s: array '%s' looks like labels but is not read as them (only %s are): rename it to 'y' "
                    "to measure accuracy", name, key, " or ".join(f"'{k}'" for k in LABEL_KEYS))


def _single_input_key(arrays: dict[str, np.ndarray], spec: InputSpec, label_keys: list[str],
                      name: str) -> str:
    """Which array feeds a single-input model: its name, else 'x', else the one plausible array."""
    for key in (spec.name, "x"):
        if key in arrays and key not in label_keys:
            return key
    rest = [k for k in arrays if k not in label_keys]
    min_rank = max(1, spec.rank - 1)
    plausible = [k for k in rest if arrays[k].dtype.kind in "biuf" and arrays[k].ndim >= min_rank]
    if len(plausible) == 1:
        return plausible[0]
    if not plausible and len(rest) == 1:
        return rest[0]  # the dtype check will say what is wrong with it
    if not rest:
        raise DataError(name, f"holds no input array (only {sorted(arrays)})")
    raise DataError(name, f"cannot tell which of {sorted(plausible or rest)} is input '{spec.name}'",
                    f"name the array '{spec.name}' or 'x'")


def _array_store(picked, kind: str) -> tuple[_ArrayStore, np.ndarray | None]:
    arrays, labels = picked
    return _ArrayStore(arrays, kind), labels


def _check_counts(arrays: dict[str, np.ndarray], name: str) -> None:
    counts = {k: len(a) for k, a in arrays.items()}
    if len(set(counts.values())) > 1:
        raise DataError(name, f"inputs have different sample counts {counts}")


def _concat_files(files: list[Path], specs: list[InputSpec], folder: Path):
    """Concatenate the inputs (and labels) of .npy/.npz files in the given order."""
    parts, label_parts = [], []
    for file in files:
        arrays = _load_array_file(file)
        picked, labels = _pick_arrays(arrays, specs, str(file), single=file.suffix.lower() == ".npy")
        _check_counts(picked, str(file))
        parts.append((file, picked))
        label_parts.append(labels)
    labelled = [labels is not None for labels in label_parts]
    if any(labelled) and not all(labelled):
        with_, without = files[labelled.index(True)].name, files[labelled.index(False)].name
        raise DataError(str(folder), f"{with_} has labels but {without} has none", "label every file or none")
    arrays = {s.name: _concat([(str(f), p[s.name]) for f, p in parts], str(folder), s.name) for s in specs}
    labels = None
    if all(labelled):
        for (file, picked), part in zip(parts, label_parts):
            _check_labels(part, len(picked[specs[0].name]), str(file))
        labels = np.concatenate([np.asarray(p) for p in label_parts])
    return arrays, labels


def _concat(pieces: list[tuple[str, np.ndarray]], name: str, key: str) -> np.ndarray:
    """Concatenate (where, array) pieces along axis 0; shapes after it and dtypes must agree."""
    first_where, first = pieces[0]
    for where, array in pieces[1:]:
        if array.shape[1:] != first.shape[1:] or array.dtype != first.dtype:
            raise DataError(name, f"'{key}' is {array.dtype} {dims_text(array.shape[1:])} per sample in {where} "
                                  f"but {first.dtype} {dims_text(first.shape[1:])} in {first_where}")
    return pieces[0][1] if len(pieces) == 1 else np.concatenate([a for _, a in pieces])


def _concat_batches(batches: Iterable, specs: list[InputSpec], name: str):
    """Materialise an iterable of {input_name: array} batches into ({name: array}, labels)."""
    names = [s.name for s in specs]
    allowed = set(names) | set(LABEL_KEYS)
    pieces: dict[str, list[tuple[str, np.ndarray]]] = {}
    first_keys = None
    for i, item in enumerate(batches):
        if isinstance(item, np.ndarray) and len(names) == 1:
            item = {names[0]: item}
        if not isinstance(item, Mapping):
            raise DataError(name, f"batch {i} is a {type(item).__name__}, not a dict {{input name: array}}")
        keys = sorted(str(k) for k in item)
        if first_keys is None:
            first_keys = keys
            unknown = [k for k in keys if k not in allowed]
            missing = [n for n in names if n not in keys]
            if unknown or missing:
                raise DataError(name, f"batch 0 has keys {keys} but the model's inputs are {names}",
                                "key each batch by input name")
            if len([k for k in keys if k in LABEL_KEYS and k not in names]) > 1:
                raise DataError(name, "batches have both 'y' and 'labels'", "keep one")
        elif keys != first_keys:
            raise DataError(name, f"batch {i} has keys {keys} but batch 0 has {first_keys}")
        arrays = {str(k): _as_array(v, name, str(k)) for k, v in item.items()}
        _check_counts(arrays, f"{name} batch {i}")
        for key, array in arrays.items():
            pieces.setdefault(key, []).append((f"batch {i}", array))
    if first_keys is None:
        raise DataError(name, "has 0 samples")
    arrays = {n: _concat(pieces[n], name, n) for n in names}
    label_key = next((k for k in first_keys if k in LABEL_KEYS and k not in names), None)
    labels = None if label_key is None else _concat(pieces[label_key], name, label_key)
    return arrays, labels


def _check_labels(labels, count: int, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise DataError(name, f"labels are {labels.dtype}, not integers",
                        "store class indices as an integer array")
    if labels.ndim != 1:
        raise DataError(name, f"labels have shape {labels.shape}, not (N,)")
    if len(labels) != count:
        raise DataError(name, f"has {len(labels)} labels for {count} samples")
    return labels.astype(np.int64)


def _check_finite(array: np.ndarray, name: str, key: str) -> None:
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise DataError(name, f"'{key}' has {bad} NaN or inf value(s)", "clean the data before calibrating")
