"""Where outputs may go: checked before any work, so a run never overwrites its inputs
and never fails at the end because the output location is unusable.

An output is refused when it is one of the inputs (the model, its external data files,
sample files or folders, the recipe, the statistics), spelled any way at all: through
symlinks, hard links or ``..``. It is also refused inside an input sample folder (writing
there would change that input), where a parent is a regular file or not writable (a file is
created and removed there to find out), and when two outputs are one file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from onnxprune.errors import OutputError


def model_files(model: str | os.PathLike) -> list[Path]:
    """The model file and every external data file it references (present or missing)."""
    path = Path(model)
    files = [path]
    if not path.is_file():
        return files
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001  (an unreadable model is reported by load_model, with its own message)
        return files
    tensors = list(proto.graph.initializer)
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
    for tensor in tensors:
        for entry in tensor.external_data:
            if entry.key == "location":
                data = path.parent / entry.value
                if data not in files:
                    files.append(data)
    return files


def same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` name the same file (links and ``..`` resolved)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _inside(path: Path, folder: Path) -> bool:
    try:
        return folder.is_dir() and path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def check_output_text(output: str | os.PathLike, *, flag: str = "-o") -> None:
    """The path as given names a file: a str or os.PathLike, not empty, no trailing separator (a folder)."""
    text = os.fspath(output) if isinstance(output, (str, os.PathLike)) else None
    if not isinstance(text, str):       # None, a number, bytes: the Python API's output= of the wrong type
        raise OutputError(repr(output)[:60], f"is a {type(output).__name__}, not an output path",
                          f"give a file path ({flag}) as a str or pathlib.Path")
    if not text.strip():
        raise OutputError(repr(text), "is an empty output path", f"give a file path ({flag})")
    if text.endswith((os.sep, "/")):
        raise OutputError(text, "ends with a path separator: that names a folder", f"give a file path ({flag})")


def check_outputs(outputs: Iterable[str | os.PathLike], inputs: Mapping[str, Iterable[str | os.PathLike] | None],
                  *, flag: str = "-o") -> None:
    """Raise OutputError when an output would overwrite or land inside an input, or its
    location cannot hold a file. ``inputs``: {label (e.g. "--target-data"): paths}; entries
    that are not paths (arrays, iterables) are ignored."""
    outs = [Path(o) for o in outputs]
    check_distinct(outs, flag=flag)
    for label, paths in inputs.items():
        if paths is None:
            continue
        for given in paths:
            if not isinstance(given, (str, os.PathLike)):
                continue
            given = Path(given)
            for out in outs:
                if same_file(out, given):
                    raise OutputError(str(out), f"is one of the inputs ({_describe(label)} {given}): writing it "
                                      "would destroy it", f"choose another output path ({flag})")
                if _inside(out, given):
                    raise OutputError(str(out), f"is inside the {label} folder {given}; writing there would "
                                      "change that input", f"choose an output path outside it ({flag})")
    for out in outs:              # last: its write probe creates (and removes) a file beside the output
        check_location(out, flag=flag)


def check_distinct(outs: list[Path], *, flag: str = "-o") -> None:
    """No two outputs are one file (spelled any way): the one written last would replace the other."""
    for i, out in enumerate(outs):
        for earlier in outs[:i]:
            if same_file(out, earlier):
                raise OutputError(str(out), f"is the same file as the other output {earlier}: one would "
                                  "overwrite the other", f"give the outputs different paths ({flag})")


def _describe(label: str) -> str:
    if label.startswith("-"):
        return f"the {label} file"
    return f"the input {label}"


def check_location(out: Path, *, flag: str = "-o") -> None:
    """The output's folder exists or can be created, and is writable; the output is not a folder."""
    if out.is_dir():
        raise OutputError(str(out), "is a folder", f"give a file path ({flag})")
    parent = out.parent if str(out.parent) else Path(".")
    ancestor = parent
    while not ancestor.exists():
        if ancestor.is_symlink():
            raise OutputError(str(out), f"{ancestor} is a broken symbolic link", f"choose another path ({flag})")
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise OutputError(str(out), f"{ancestor} is a file, not a folder", f"choose another output path ({flag})")
    if ancestor.exists():
        probe_writable(out, ancestor, flag=flag)


def probe_writable(out: Path, folder: Path, *, flag: str = "-o") -> None:
    """Create and remove a file in ``folder``: permission bits say nothing for root, nor about
    a read-only mount or a folder such as /proc, where the write would only fail at the end."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".onnxprune-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(str(out), f"folder {folder} is not writable ({exc.strerror or exc})",
                          f"choose another output path ({flag})") from None
