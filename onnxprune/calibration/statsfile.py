"""The statistics file: one .npz written atomically, no pickled objects.

Arrays ``m{i}_*`` hold the i-th Moments (``Moments.to_arrays``); the array ``header`` holds
the Statistics header as JSON plus ``format`` and ``index`` (set, request key, fold and
array prefix of every Moments).
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from onnxprune.calibration.moments import Moments
from onnxprune.calibration.stats import Statistics
from onnxprune.errors import CalibrationError

#: version of the file layout
FORMAT = 1


def save(stats: Statistics, path: str | os.PathLike) -> Path:
    """Write ``stats`` to ``path`` (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    index = []
    for i, (key, m) in enumerate(sorted(stats._moments.items())):
        set_name, request_key, fold = key
        index.append({"set": set_name, "request": request_key, "fold": fold, "prefix": f"m{i}"})
        arrays.update(m.to_arrays(f"m{i}"))
    header = dict(stats.header, format=FORMAT, index=index)
    arrays["header"] = np.array(json.dumps(header, sort_keys=True))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | os.PathLike, *, model=None) -> Statistics:
    """Read statistics saved by ``save``; with ``model`` (a ModelProto or its hash), check
    that they were computed for it."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(str(path), "no such statistics file", "create it with `onnxprune calibrate`")
    try:
        arrays = _arrays(path)
        header = json.loads(str(arrays.pop("header")))
        if isinstance(header, dict) and not all(isinstance(header.get(k, t()), t) for k, t in
                                                (("sets", dict), ("requests", list), ("index", list))):
            raise ValueError("its header is not a statistics header")
        index = header.pop("index")
        moments = {(e["set"], e["request"], int(e["fold"])): Moments.from_arrays(arrays, e["prefix"])
                   for e in index}
        for e in index:
            _check_shapes(arrays, e["prefix"])
    except CalibrationError as exc:         # an array the index names is missing
        raise CalibrationError(str(path), f"not a statistics file ({exc.problem})",
                               "create it with `onnxprune calibrate`") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError, zipfile.BadZipFile,
            zlib.error) as exc:
        # numpy's own text for pickled data suggests loading it unsafely: never. It says "pickled"
        # for any file that is neither .npy nor .npz (a model, a text file), "Object arrays" for those
        detail = "it holds pickled objects, which are never loaded" if "Object arrays" in str(exc) else \
            "it starts with neither NumPy's header nor a zip archive's" if "pickle" in str(exc) else \
            f"{type(exc).__name__}: {exc}"
        raise CalibrationError(str(path), f"not a statistics file ({detail})",
                               "create it with `onnxprune calibrate`") from None
    if header.get("format", FORMAT) != FORMAT:
        raise CalibrationError(str(path), f"is a statistics file of format {header['format']!r}; this onnxprune "
                               f"reads format {FORMAT}", "recompute them with `onnxprune calibrate`")
    if model is not None:
        if isinstance(model, str):
            expected = model
        else:
            from onnxprune.model import model_hash
            expected = model_hash(model)
        if header.get("model_hash") != expected:
            raise CalibrationError(path.name, f"computed for model {header.get('model_hash')}, "
                                   f"not this model {expected}",
                                   "recompute them with `onnxprune calibrate` on this model")
    header.pop("format", None)
    return Statistics(header, moments)


def _check_shapes(arrays: dict[str, np.ndarray], prefix: str) -> None:
    """ValueError unless the arrays of one Moments fit together: a count, a sum of n features
    and an n x n Gram matrix (or rows of n features); a Gram matrix of another size would
    reach a pass, not this message."""
    total, count = arrays.get(f"{prefix}/sum"), arrays.get(f"{prefix}/count")
    if total is None or count is None:
        return                          # Moments.from_arrays names what is missing
    n = total.shape[0] if total.ndim == 1 else None
    gram, rows = arrays.get(f"{prefix}/gram"), arrays.get(f"{prefix}/rows")
    if n is None or count.ndim != 0 or (gram is not None and gram.shape != (n, n)) or \
            (rows is not None and (rows.ndim != 2 or rows.shape[1] != n)):
        shapes = ", ".join(f"{k} {arrays[k].shape}" for k in (f"{prefix}/count", f"{prefix}/sum",
                                                              f"{prefix}/gram", f"{prefix}/rows") if k in arrays)
        raise ValueError(f"arrays of shapes that do not fit together: {shapes}")


def _arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of the .npz at ``path``. A file that is no zip, a truncated one (BadZipFile,
    EOFError) or a single .npy array (ValueError) is not a statistics file: the caller says so."""
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError("one array, not an .npz archive of arrays")
    with data:
        return {name: data[name] for name in data.files}
