"""Token data for transformer encoders: checks made when the samples are opened, before any run.

- **Positions.** A BERT-style export looks up one position embedding per token: a Gather from
  a [P, hidden] table with the indices 0, 1, ..., T-1 (the exported ``position_ids`` buffer
  sliced to the sequence length, or a ``Range``). Rows longer than P tokens (``--max-length
  600`` on MiniLM, P = 512) would fail inside onnxruntime with an unrelated message ("invalid
  expand shape"); ``position_limit`` finds P in the graph and ``check_token_samples`` refuses
  such rows first. Models whose positions this does not recognise are not checked here.
- **Vocabulary.** Token ids index an embedding table (a Gather from a [V, hidden] constant whose
  indices are the input, ``index_limits``); an id outside 0..V-1 would fail inside onnxruntime
  (ids >= V) or, negative, silently read a row from the end of the table. Both are refused.
- **Mask values.** The mask (``attention_mask``, or ``--mask-input``) must be 1 on real tokens
  and 0 on padding: any other value means another input (token ids, segment ids) or a mask of
  another convention (an additive 0 / -10000 one), which the statistics would misread.
- **Empty rows.** A sample whose mask (``attention_mask``, or ``--mask-input``) is 0 everywhere
  has no real token: it adds nothing to the token statistics, and its masked-mean embedding is
  0 / 0. Such rows are refused, with their count.
- **Flags.** Image preprocessing (``--mean``, ``--resize``, ...) does nothing to token ids, and
  ``--tokenizer`` / ``--max-length`` nothing to an image model: ``check_flags`` makes each a
  usage error naming the flag, as ``--max-length`` without ``--tokenizer`` (token arrays keep
  their length), and ``check_image_flags`` image flags given with samples that are not images
  (float arrays are fed as they are).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.errors import DataError, UsageError
from onnxprune.model import input_specs

#: the inputs a tokenizer gives (``text.tokenize``)
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: the preprocessing keys (``Preprocess`` fields) that apply to images only
IMAGE_KEYS = ("resize", "center_crop", "grayscale", "scale", "mean", "std", "layout")
#: the preprocessing keys that apply to text files only
TEXT_KEYS = ("tokenizer", "max_length")
#: ops that carry position ids from their buffer (or Range) to the embedding Gather unchanged
_CARRIERS = {"Slice", "Expand", "Unsqueeze", "Squeeze", "Cast", "Reshape", "Identity", "Tile", "Flatten"}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _flags(keys: list[str]) -> str:
    return ", ".join(_flag(k) for k in keys) + (" applies" if len(keys) == 1 else " apply")


def check_flags(model: onnx.ModelProto, preprocess: dict) -> None:
    """UsageError for preprocessing flags (a ``preprocess`` dict: the flags given, or a recipe's)
    that would do nothing: image flags for a model without a float input, text flags for a
    model with inputs a tokenizer does not give, ``--max-length`` without ``--tokenizer``."""
    specs = input_specs(model)
    names = ", ".join(spec.name for spec in specs)
    image = [k for k in IMAGE_KEYS if preprocess.get(k) is not None]
    if image and not any(np.issubdtype(spec.dtype, np.floating) for spec in specs):
        raise UsageError(f"{_flags(image)} to images, but the model takes no float input ({names}): token "
                         "data is read as it is", "drop the image flags (text files: --tokenizer, --max-length)")
    text = [k for k in TEXT_KEYS if preprocess.get(k) is not None]
    if text and not all(spec.name in TOKEN_INPUTS for spec in specs):
        raise UsageError(f"{_flags(text)} to token models (inputs {', '.join(TOKEN_INPUTS)}), but the model "
                         f"takes {names}", "drop the text flags")
    if preprocess.get("max_length") is not None and preprocess.get("tokenizer") is None:
        raise UsageError("--max-length applies only with --tokenizer (it cuts and pads tokenised text files); "
                         "token arrays (.npz) are fed at their own length",
                         "give --tokenizer with .txt/.tsv data, or cut the arrays themselves")


def check_text_model(path, model: onnx.ModelProto) -> None:
    """DataError for a text file (.txt/.tsv) given to a model with inputs a tokenizer does not give
    (before asking for a ``--tokenizer`` that could not feed it)."""
    specs = input_specs(model)
    if not all(spec.name in TOKEN_INPUTS for spec in specs):
        raise DataError(str(path), f"is a text file, but the model takes {', '.join(spec.name for spec in specs)}: "
                        f"only token models (inputs {', '.join(TOKEN_INPUTS)}) read text",
                        "give this model's samples (images, .npy/.npz arrays)")


def check_image_flags(samples, preprocess: dict) -> None:
    """UsageError for image preprocessing flags (a ``preprocess`` dict) given with samples the
    image pipeline does not touch (``SampleSet.images`` false: float or other non-uint8 arrays,
    taken as already preprocessed), where the report would record preprocessing that never ran."""
    image = [k for k in IMAGE_KEYS if preprocess.get(k) is not None]
    if image and not samples.images:
        kinds = ", ".join(sorted({str(samples.stored(name).dtype) for name in samples.input_names
                                  if samples.stored(name) is not None})) or "non-image"
        raise UsageError(f"{_flags(image)} to images (image files, uint8 arrays), but {samples.name} holds "
                         f"{kinds} arrays, which are fed as they are (taken as preprocessed already)",
                         "drop the image flags, or give the images (image files, or uint8 arrays); the flags "
                         "apply to every data option of a run, so give them all as images or all as "
                         "preprocessed arrays")


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    out = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.HasField("t"):
                    out[node.output[0]] = attribute.t
    return out


def _array(tensor: onnx.TensorProto | None) -> np.ndarray | None:
    if tensor is None:
        return None
    try:
        return numpy_helper.to_array(tensor)
    except Exception:  # noqa: BLE001 - external data not loaded, an odd dtype: not a position buffer
        return None


def position_limit(model: onnx.ModelProto) -> int | None:
    """The most tokens per sample the model's position embeddings cover, or None when no position
    embedding is recognised: the rows of a 2-D table that a Gather reads at indices carried (Slice,
    Expand, Unsqueeze, Cast, ...) from a constant 0, 1, 2, ... buffer (then also at most its
    length) or from a Range; the smallest, when several do."""
    constants = _constants(model)
    producer = {out: node for node in model.graph.node for out in node.output}
    limits = []
    for node in model.graph.node:
        table = constants.get(node.input[0]) if node.op_type == "Gather" and len(node.input) == 2 else None
        if table is None or len(table.dims) != 2:
            continue
        name, hops = node.input[1], 0
        while name in producer and producer[name].op_type in _CARRIERS and producer[name].input and hops < 16:
            name, hops = producer[name].input[0], hops + 1
        if name in producer and producer[name].op_type == "Range":
            limits.append(int(table.dims[0]))
            continue
        buffer = _array(constants.get(name))
        if buffer is not None and buffer.size >= 2 and buffer.dtype.kind in "iu" and \
                np.array_equal(buffer.reshape(-1), np.arange(buffer.size)):
            limits.append(min(int(table.dims[0]), int(buffer.size)))
    return min(limits) if limits else None


def index_limits(model: onnx.ModelProto) -> dict[str, int]:
    """{graph input: the rows of the embedding table it indexes}: the 2-D constant tables that a
    Gather reads at indices carried (Cast, Unsqueeze, ...) from the input (the smallest, when
    several do). MiniLM: ``{"input_ids": 30522}``."""
    constants = _constants(model)
    inputs = {spec.name for spec in input_specs(model)}
    producer = {out: node for node in model.graph.node for out in node.output}
    limits: dict[str, int] = {}
    for node in model.graph.node:
        table = constants.get(node.input[0]) if node.op_type == "Gather" and len(node.input) == 2 else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is None or len(table.dims) != 2 or axis not in (0, -2):
            continue
        name, hops = node.input[1], 0
        while name in producer and producer[name].op_type in _CARRIERS and producer[name].input and hops < 16:
            name, hops = producer[name].input[0], hops + 1
        if name in inputs and name not in producer:
            limits[name] = min(limits.get(name, int(table.dims[0])), int(table.dims[0]))
    return limits


def check_token_samples(samples, model: onnx.ModelProto, *, mask: str | None = "auto", text: bool = False) -> None:
    """DataError for token samples the model cannot take (see the module docstring): rows longer
    than its positions, rows without a real token. ``samples``: a SampleSet; ``mask``: the
    recipe's ``mask_input`` ("auto", "none" or an input name); ``text``: the samples were
    tokenised from a text file (the hint names --max-length)."""
    from onnxprune.calibration.collect import token_mask_input

    specs = [spec for spec in input_specs(model) if spec.dtype.kind in "iu" and spec.rank == 2]
    if not specs:
        return
    widths = {spec.name: stored.shape[1] for spec in specs if (stored := samples.stored(spec.name)) is not None}
    if widths:
        limit = position_limit(model)
        width = max(widths.values())
        if limit is not None and width > limit:
            hint = (f"--max-length {limit} or less" if text else
                    f"cut the token arrays to at most {limit} columns (their padding first)")
            raise DataError(samples.name, f"its rows are {width} tokens long, more than the model's {limit} "
                            "positions (the rows of its position-embedding table)", hint)
    for name, rows in index_limits(model).items():
        ids = samples.stored(name)
        if ids is None or not ids.size or ids.dtype.kind not in "iu":
            continue
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= rows:
            raise DataError(samples.name, f"{name} holds ids {low}..{high}, but the model's embedding table has "
                            f"{rows} rows (ids 0..{rows - 1})",
                            "tokenise with the model's own tokenizer (vocabulary and special tokens)")
    name = token_mask_input(model, mask if mask is not None else "none")
    stored = None if name is None else samples.stored(name)
    if stored is None or stored.ndim != 2:
        return
    odd = (stored != 0) & (stored != 1)
    if odd.any():
        raise DataError(samples.name, f"{name} holds values other than 0 and 1 ({stored[odd].flat[0].item()} in "
                        f"{np.count_nonzero(odd.any(axis=1))} of {len(stored)} samples), "
                        "so it is not a token mask (1 on real tokens, 0 on padding)",
                        "--mask-input names the mask input, or none to mask nothing" if mask not in (None, "auto")
                        else f"give {name} as the tokenizer makes it: 1 on real tokens, 0 on padding")
    empty = int(np.count_nonzero(~np.any(stored != 0, axis=1)))
    if empty:
        raise DataError(samples.name, f"{empty} of {len(stored)} samples have no real token ({name} is 0 "
                        "everywhere in them)", f"drop those rows, or check {name}: 1 on real tokens, 0 on padding")
