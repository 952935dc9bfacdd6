"""Writing the output files of one command all-or-nothing.

A command writes several files (a model with its external data, its report and recipe; a
JSON and its figures; a folder of models). A failure part-way (a full disk, a quota, a
read-only mount) must not leave some of them new and some old or missing: each is written
under its own name into a temporary folder beside its destination, and only when every one
is complete are they all renamed into place. An OSError is the user's to fix (OutputError,
exit 1: "cannot write PATH: REASON"), not a bug; the temporary folders are removed and the
files already at those paths stay as they were.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from onnxprune.errors import OutputError
from onnxprune.model import default_mode, write_text_atomic

#: writes one file's content at the path it is given (in a temporary folder); files it writes
#: beside that path (a model's external data) are moved into place with it
Writer = Callable[[Path], object]


def text(content: str) -> Writer:
    """A Writer of ``content`` as a text file."""
    return lambda path: write_text_atomic(path, content)


def write_all(files: Iterable[tuple[str | os.PathLike, Writer]]) -> list[Path]:
    """Write every (destination, writer) pair, then move them all into place; returns the files
    now in place. A writer may write none (a figure without matplotlib): a file an earlier run
    left at its destination is then removed, since it would not match the files beside it.
    Raises OutputError naming the destination on an OSError, leaving every destination as it was."""
    staging: dict[Path, Path] = {}          # destination folder -> its temporary folder
    unwritten = []
    try:
        for destination, write in files:
            destination = Path(destination)
            staged = _staging_folder(staging, destination.parent) / destination.name
            _write(write, staged, destination)
            if not staged.exists():
                unwritten.append(destination)
        placed = _move_into_place(staging)
        for stale in unwritten:
            if stale.is_file():
                stale.unlink()
        return placed
    finally:
        for tmp in staging.values():
            shutil.rmtree(tmp, ignore_errors=True)


def _staging_folder(staging: dict[Path, Path], folder: Path) -> Path:
    """The temporary folder inside ``folder`` (created with it on first use): a rename from it
    into ``folder`` stays on one file system."""
    if folder not in staging:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            staging[folder] = Path(tempfile.mkdtemp(prefix=".onnxprune-", dir=folder))
        except OSError as exc:
            raise cannot_write(folder, exc) from None
    return staging[folder]


def _write(write: Writer, tmp: Path, destination: Path) -> None:
    try:
        write(tmp)
    except OSError as exc:
        raise cannot_write(destination, exc) from None


def _move_into_place(staging: dict[Path, Path]) -> list[Path]:
    """Rename every staged file over its destination (one rename each: a reader sees the old
    file or the new, never a part), with the usual permissions (0666 less the umask)."""
    placed = []
    for folder, tmp in staging.items():
        for staged in sorted(tmp.iterdir()):
            destination = folder / staged.name
            try:
                os.chmod(staged, default_mode())
                os.replace(staged, destination)
            except OSError as exc:
                raise cannot_write(destination, exc) from None
            placed.append(destination)
    return placed


def cannot_write(path: Path, exc: OSError) -> OutputError:
    """The one-line error of a failed write: "cannot write PATH: REASON"."""
    return OutputError("", f"cannot write {path}: {exc.strerror or exc}")
