"""Raw text as model input: sentences tokenised with a Hugging Face ``tokenizer.json``.

``--tokenizer tokenizer.json`` (the ``tokenizers`` library, the ``text`` extra) turns a text
file into the token arrays a transformer encoder takes:

- ``.txt``: one sentence per line (empty lines are skipped), no labels;
- ``.tsv``: a header row with a ``text`` (or ``sentence``) column and optionally a ``label``
  column of integers, tab-separated, no quoting (the layout of ``../shared/data/text/*.tsv``);
  every row has as many columns as the header (a tab inside a sentence is an error, not a cut).

Files are UTF-8 (a leading byte-order mark is dropped); lines end at ``\n`` or ``\r\n`` only,
so the other characters Python counts as line breaks (U+2028, U+0085, form feed, ...) stay
inside their sentence.

Every sentence is encoded with the tokenizer's own normalisation and special tokens
(``[CLS] ... [SEP]`` for BERT), cut to ``max_length`` tokens and padded on the right to
``max_length`` with the tokenizer's padding id (its ``[PAD]`` token, else 0); the arrays are
named after the model's inputs: ``input_ids``, ``attention_mask`` (1 on real tokens) and
``token_type_ids`` when the model has them, in the inputs' integer dtype.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from onnxprune.errors import DataError
from onnxprune.model import input_specs

SUFFIXES = (".txt", ".tsv")
DEFAULT_MAX_LENGTH = 128
#: the longest --max-length taken from a model whose position table is not recognised (every row
#: is padded to it: 2**20 tokens is 8 MiB per sentence and input)
MAX_LENGTH_LIMIT = 1 << 20
TEXT_COLUMNS = ("text", "sentence")


def is_text_file(source) -> bool:
    """Whether ``source`` names a text file this module reads (by its suffix)."""
    return isinstance(source, (str, Path)) and Path(source).suffix.lower() in SUFFIXES


def read_text(path: str | Path) -> tuple[list[str], np.ndarray | None]:
    """(sentences, integer labels or None) of a ``.txt`` or ``.tsv`` file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "no such text file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(str(path), f"cannot be read as UTF-8 text ({exc})") from None
    lines = _lines(text)
    if path.suffix.lower() == ".txt":
        sentences = [line.strip() for line in lines if line.strip()]
        if not sentences:
            raise DataError(str(path), "holds no sentences")
        return sentences, None
    rows = [line.split("\t") for line in lines]
    if not rows:
        raise DataError(str(path), "is empty")
    header = [h.strip().lower() for h in rows[0]]
    column = next((header.index(c) for c in TEXT_COLUMNS if c in header), None)
    if column is None:
        raise DataError(str(path), f"has no 'text' column in its header {rows[0]}",
                        "the first row names the columns: text (or sentence) and optionally label")
    label = header.index("label") if "label" in header else None
    sentences, labels = [], []
    for number, row in enumerate(rows[1:], start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataError(str(path), f"line {number} has {len(row)} columns, the header {len(header)}",
                            "columns are separated by tabs and cannot hold one (there is no quoting): "
                            "replace tabs inside the text by spaces" if len(row) > len(header) else None)
        sentences.append(row[column])
        if label is not None:
            try:
                labels.append(int(row[label]))
            except ValueError:
                raise DataError(str(path), f"line {number}: label {row[label]!r} is not an integer") from None
    if not sentences:
        raise DataError(str(path), "holds no sentences")
    return sentences, (np.asarray(labels, dtype=np.int64) if label is not None else None)


def _lines(text: str) -> list[str]:
    """The lines of ``text``, split at ``\n`` and ``\r\n`` only (not at the other characters
    ``str.splitlines`` breaks at); no trailing empty line for a final line break."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def load_tokenizer(path: str | Path):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataError("--tokenizer", "needs the tokenizers library", 'pip install "onnxprune[text]"') from None
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "no such tokenizer file", "pass the model's tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:        # the library raises plain Exceptions for a bad file
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(str(path), f"is not a tokenizers tokenizer.json ({first})") from None


def tokenize(sentences: list[str], tokenizer_path: str | Path, model: onnx.ModelProto, *,
             max_length: int = DEFAULT_MAX_LENGTH) -> dict[str, np.ndarray]:
    """{input name: (N, max_length) array} for the model's token inputs (see the module docstring)."""
    from onnxprune.data.tokens import position_limit

    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)):
        raise DataError("--max-length", f"{max_length!r} is not a whole number of tokens")
    if max_length < 2:
        raise DataError("--max-length", f"{max_length} is too short for a sentence with its special tokens")
    limit = position_limit(model)
    if limit is not None and max_length > limit:        # before the tokenizer pads every row to it
        raise DataError("--max-length", f"{max_length} tokens is more than the model's {limit} positions (the rows "
                        "of its position-embedding table)", f"--max-length {limit} or less")
    if max_length > MAX_LENGTH_LIMIT:
        raise DataError("--max-length", f"{max_length} tokens is more than onnxprune pads a sentence to "
                        f"({MAX_LENGTH_LIMIT})", "give the length the model was trained at")
    tokenizer = load_tokenizer(tokenizer_path)
    pad = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_truncation(max_length=int(max_length))
    tokenizer.enable_padding(length=int(max_length), pad_id=0 if pad is None else pad,
                             pad_token="[PAD]" if pad is not None else "")
    encodings = tokenizer.encode_batch(sentences)
    values = {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings],
              "token_type_ids": [e.type_ids for e in encodings]}
    specs = {spec.name: spec for spec in input_specs(model)}
    unknown = sorted(set(specs) - set(values))
    if unknown:
        raise DataError(", ".join(unknown), "model inputs that a tokenizer does not give",
                        "token models take input_ids, attention_mask and token_type_ids")
    return {name: np.asarray(values[name]).astype(spec.dtype) for name, spec in specs.items()}


def open_text(path: str | Path, model: onnx.ModelProto, *, tokenizer: str | Path,
              max_length: int = DEFAULT_MAX_LENGTH) -> dict[str, np.ndarray]:
    """The token arrays of a text file, with its labels under ``y`` when it has them."""
    sentences, labels = read_text(path)
    arrays = tokenize(sentences, tokenizer, model, max_length=max_length)
    if labels is not None:
        arrays["y"] = labels
    return arrays
