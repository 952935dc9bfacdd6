"""Load, check, fold, hash and save ONNX models.

Everything that touches a model file goes through here: external-data models and models
over 2 GB load and save transparently, ``Constant`` nodes are folded into initializers so
passes see plain weights, every node gets a unique name (``graph.index.name_nodes``: its own, or
``{op}_{index}`` for unnamed and duplicate names) so that nothing addresses a node by its
position, and outputs are written atomically (temporary name, then rename).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.errors import ModelError
from onnxprune.graph.index import FLOAT_TENSOR_TYPES, name_nodes, subgraph_inputs

# Protobuf refuses to serialise a message of 2 GiB or more; stay well clear of it.
PROTO_LIMIT = 2**31 - 2**26

# The newest IR version the onnxruntime we support accepts. Models we build ourselves
# are stamped with this (never with onnx.IR_VERSION, which may be newer).
MAX_IR_VERSION = 10


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One graph input: name, shape (int for fixed dims, str or None for symbolic) and dtype."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def symbolic_axes(self) -> list[int]:
        """The axes after the batch left symbolic (an exported dynamic height and width, or
        sequence length)."""
        return [axis for axis, d in enumerate(self.shape) if axis and not isinstance(d, int)]

    @property
    def fixed_batch(self) -> int | None:
        """The batch size when the first dimension is fixed, else None."""
        if self.shape and isinstance(self.shape[0], int):
            return self.shape[0]
        return None


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load ``path`` with its external data, check it, fold Constant nodes and inference-mode
    BatchNormalization nodes (``fold_batch_norms``) and name every node.

    Raises ModelError with a one-line message for a missing, unreadable, truncated,
    non-ONNX or invalid file.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(str(path), "no such file")
    if path.is_dir():
        raise ModelError(str(path), "is a directory, not an ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except PermissionError:
        raise ModelError(str(path), "cannot be read (permission denied)") from None
    except Exception as exc:  # protobuf raises DecodeError and friends; onnx a ValidationError for missing data
        missing = missing_external_data(path)
        if missing is not None:
            raise ModelError("", f"external data file {missing.name} not found next to {path}",
                             "keep the model's .data file(s) in its folder, under the names it gives them") from None
        raise ModelError(
            str(path), f"not a readable ONNX model ({type(exc).__name__})",
            "the file may be truncated or not an ONNX file",
        ) from None
    if len(model.graph.node) == 0 and len(model.graph.output) == 0:
        raise ModelError(str(path), "not an ONNX model (empty graph)", "the file may be truncated or not an ONNX file")
    check_model(model, name=str(path))
    fold_constants(model)
    fold_batch_norms(model)
    name_nodes(model)
    return model


def missing_external_data(path: Path) -> Path | None:
    """The first external data file the model at ``path`` names that does not exist, else None."""
    from onnxprune.paths import model_files

    return next((data for data in model_files(path)[1:] if not data.is_file()), None)


def check_model(model: onnx.ModelProto, *, name: str = "model") -> None:
    """Run the ONNX checker (by path for models too large for one protobuf)."""
    try:
        if model.ByteSize() < PROTO_LIMIT:
            onnx.checker.check_model(model)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                file = Path(tmp) / "model.onnx"
                onnx.save(model, str(file), save_as_external_data=True, location="model.onnx.data")
                onnx.checker.check_model(str(file))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
        raise ModelError(name, f"fails the ONNX checker: {first}") from None


def model_name(model, default: str = "model") -> str:
    """What errors call a model: its file, or ``default`` for a model given in memory."""
    return str(model) if isinstance(model, (str, os.PathLike)) else default


#: graph ops whose subgraphs the rewrites and the calibration graphs do not follow
CONTROL_FLOW = ("If", "Loop", "Scan")
#: tensor types the statistics and rewrites do not handle (they assume float32 activations)
HALF_TYPES = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}
#: the inputs of quantized ops that hold data (weights, activations, QLinearConv's int32 bias); the
#: others are scales and zero points, which configure the quantization
QUANTIZED_DATA_INPUTS = {"DequantizeLinear": {0}, "QuantizeLinear": {0}, "DynamicQuantizeLinear": {0},
                         "ConvInteger": {0, 1}, "MatMulInteger": {0, 1}, "QLinearConv": {0, 3, 8},
                         "QLinearMatMul": {0, 3}}
#: ops of a quantized model (integer layers, QDQ pairs): its weights are integers the passes do not rewrite
QUANTIZED_OPS = (*QUANTIZED_DATA_INPUTS, "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


def check_compressible(model: onnx.ModelProto, *, name: str = "model") -> None:
    """ModelError for what compression cannot handle yet (``inspect`` and ``validate`` still
    can): control flow with subgraphs, and float16/bfloat16 activations (calibration builds
    float32 graphs around them); half weights that a Cast turns into float32 are fine."""
    flow = sorted({node.op_type for node in model.graph.node if node.op_type in CONTROL_FLOW})
    if flow:
        raise ModelError(name, f"has control flow ({', '.join(flow)}) whose subgraphs onnxprune does not rewrite "
                         "or calibrate through", "export the model without it (e.g. trace one branch)")
    quantized = Counter(node.op_type for node in model.graph.node if node.op_type in QUANTIZED_OPS)
    if quantized:
        raise ModelError(name, f"is quantized ({', '.join(f'{n} {op}' for op, n in sorted(quantized.items()))}): "
                         "onnxprune compresses float models", "compress the float model, then quantize the result "
                         "(onnxruntime.quantization)")
    graph = model.graph
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for tensor in node.input:
            readers.setdefault(tensor, set()).add(node.op_type)
    # element types: of weights read by more than a Cast (half weights that only a Cast reads are
    # stored small and computed in float32: fine), of typed tensors, of constants, of Cast targets
    types = [t.data_type for t in graph.initializer if readers.get(t.name, set()) - {"Cast"}]
    types += [v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)]
    types += [a.t.data_type for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.HasField("t")]
    types += [a.i for n in graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
    half = sorted({HALF_TYPES[t] for t in types if t in HALF_TYPES})
    if half:
        raise ModelError(name, f"has {' and '.join(half)} tensors, which onnxprune does not compress yet",
                         "export the model in float32 (torch: model.float() before export), compress it, then "
                         "convert the result (onnxconverter_common.float16.convert_float_to_float16)")


#: an Identity of a stored tensor up to this many values becomes a tensor of its own when loading
IDENTITY_FOLD_SIZE = 4096


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn every tensor-valued ``Constant`` node into an initializer, in place; returns model.
    So is an ``Identity`` of a small stored tensor (at most ``IDENTITY_FOLD_SIZE`` values): torch
    exports parameters equal to another (a BatchNorm's zero mean and bias) as Identity(that one),
    which would hide a constant where the graph analysis needs one (larger ones, tied weights,
    stay shared). Not in IR version < 4 models, whose initializers are graph inputs too.
    A ``Transpose`` of a stored tensor that nothing else reads (torch's ``MatMul(x, Transpose(W))``
    without constant folding) becomes the transposed tensor, so the layer's weight is a constant."""
    graph = model.graph
    stored = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    listed = {i.name for i in graph.input}
    readers = _read_counts(graph)
    keep = []
    for node in graph.node:
        source = stored.get(node.input[0]) if node.op_type == "Transpose" and node.domain in ("", "ai.onnx") \
            and node.input else None
        if source is not None and model.ir_version >= 4 and readers[source.name] == 1 \
                and source.name not in listed | outputs and node.output[0] not in outputs and not _external(source):
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            tensor = numpy_helper.from_array(
                np.ascontiguousarray(np.transpose(numpy_helper.to_array(source), perm)), node.output[0])
            graph.initializer.remove(source)
            del stored[source.name]
            graph.initializer.append(tensor)
            stored[tensor.name] = tensor
            continue
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            tensor = _constant_value(node)
            if tensor is not None:
                tensor.name = node.output[0]
                graph.initializer.append(tensor)
                stored[tensor.name] = tensor
                if model.ir_version < 4:  # IR 3: every initializer is a graph input too
                    graph.input.append(onnx.helper.make_tensor_value_info(
                        tensor.name, tensor.data_type, list(tensor.dims)))
                continue
        source = stored.get(node.input[0]) if node.op_type == "Identity" and node.domain in ("", "ai.onnx") \
            and node.input else None
        if source is not None and model.ir_version >= 4 and node.output[0] not in outputs \
                and int(np.prod(source.dims)) <= IDENTITY_FOLD_SIZE and not _external(source):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(source)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            stored[tensor.name] = tensor
            continue
        keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)
    return model


def fold_batch_norms(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold each inference-mode ``BatchNormalization`` into the ``Conv`` or ``Gemm`` before it, in
    place; returns model. An export without BN folding (torch's ``do_constant_folding=False``, some
    TF/Caffe converters) leaves it there, and the layer's split would then be fitted and measured
    before the BN's per-channel scale.

    Conv(x, W, b) -> BatchNormalization(scale, B, mean, var)  =>  Conv(x, W', b') with, in float64,
    s = scale / sqrt(var + epsilon), W' = W * s along the output channels (axis 0 of a Conv's W, of a
    Gemm's B with transB=1, axis 1 with transB=0), b' = (b - mean) * s + B (b = 0 when absent;
    a Gemm's b = beta * C, and beta becomes 1), stored in W's dtype. The layer then writes the BN's
    output. Only when the BN is in the default domain with one output (inference form, ``spatial``
    and ``training_mode`` at their defaults), its four parameters are stored per-channel vectors,
    the layer's weight and bias are stored tensors no other node reads, and the layer's output is
    read by the BN alone and is no graph output. Stored means an initializer, not external data,
    and not a graph input (in IR version < 4 models, whose initializers are all graph inputs, the
    graph inputs follow: a new bias is listed, removed parameters are unlisted)."""
    graph = model.graph
    stored = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    listed = {i.name for i in graph.input}
    overridable = set() if model.ir_version < 4 else listed
    readers = _read_counts(graph)
    producer = {out: node for node in graph.node for out in node.output}

    def constant(name: str, *, own: bool) -> np.ndarray | None:
        tensor = stored.get(name)
        if tensor is None or name in overridable | outputs or _external(tensor) \
                or tensor.data_type not in FLOAT_TENSOR_TYPES or (own and readers[name] != 1):
            return None
        return numpy_helper.to_array(tensor)

    folded = []
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or len(bn.output) != 1 \
                or len(bn.input) != 5:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in bn.attribute}
        if attrs.get("spatial", 1) != 1 or attrs.get("training_mode", 0) != 0:
            continue
        layer = producer.get(bn.input[0])
        if layer is None or layer.op_type not in ("Conv", "Gemm") or layer.domain not in ("", "ai.onnx") \
                or layer.output[0] != bn.input[0] or readers[bn.input[0]] != 1 or bn.input[0] in outputs:
            continue
        params = [constant(name, own=False) for name in bn.input[1:]]
        weight = constant(layer.input[1], own=True) if len(layer.input) > 1 else None
        has_bias = len(layer.input) > 2 and layer.input[2] != ""
        bias = constant(layer.input[2], own=True) if has_bias else None
        if weight is None or any(p is None for p in params) or (has_bias and bias is None):
            continue
        layer_attrs = {a.name: onnx.helper.get_attribute_value(a) for a in layer.attribute}
        if layer.op_type == "Conv":
            axis = 0
        elif weight.ndim == 2 and layer_attrs.get("transA", 0) == 0:
            axis = 0 if layer_attrs.get("transB", 0) else 1
        else:
            continue
        channels = weight.shape[axis]
        if any(p.shape != (channels,) for p in params) or (has_bias and bias.shape != (channels,)):
            continue  # a broadcast Gemm C, a per-activation BN: left alone
        scale, shift, mean, var = (p.astype(np.float64) for p in params)
        s = scale / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
        b = np.zeros(channels) if bias is None else bias.astype(np.float64)
        if layer.op_type == "Gemm":
            b = b * float(layer_attrs.get("beta", 1.0))
        shape = [1] * weight.ndim
        shape[axis] = channels
        new_weight = (weight.astype(np.float64) * s.reshape(shape)).astype(weight.dtype)
        new_bias = ((b - mean) * s + shift).astype(weight.dtype)
        stored[layer.input[1]].CopyFrom(numpy_helper.from_array(new_weight, layer.input[1]))
        if has_bias:
            stored[layer.input[2]].CopyFrom(numpy_helper.from_array(new_bias, layer.input[2]))
        else:
            name = f"{layer.input[1]}/fold_batch_norm/bias"
            while name in stored or name in readers or name in producer:
                name += "_"
            tensor = numpy_helper.from_array(new_bias, name)
            graph.initializer.append(tensor)
            stored[name] = tensor
            if model.ir_version < 4:
                graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type,
                                                                      list(tensor.dims)))
            del layer.input[2:]
            layer.input.append(name)
        if layer.op_type == "Gemm" and "beta" in layer_attrs:
            next(a for a in layer.attribute if a.name == "beta").f = 1.0
        layer.output[0] = bn.output[0]
        producer[bn.output[0]] = layer
        readers.subtract(bn.input)
        folded.append(bn)
    if not folded:
        return model
    for bn in folded:
        graph.node.remove(bn)
    unused = {name for bn in folded for name in bn.input[1:] if readers[name] <= 0 and name not in outputs}
    keep = [t for t in graph.initializer if t.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if model.ir_version < 4:
        inputs = [i for i in graph.input if i.name not in unused]
        del graph.input[:]
        graph.input.extend(inputs)
    stale = {bn.input[0] for bn in folded}   # the layers' old outputs no longer exist
    infos = [v for v in graph.value_info if v.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    return model


def _read_counts(graph: onnx.GraphProto) -> Counter:
    """How many times each tensor is read: node inputs, and names used inside subgraphs."""
    readers = Counter(name for node in graph.node for name in node.input)
    readers.update(name for node in graph.node for name in subgraph_inputs(node))
    return readers


def _external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
            return tensor
        if attr.name == "value_float":
            return numpy_helper.from_array(np.array(attr.f, dtype=np.float32))
        if attr.name == "value_floats":
            return numpy_helper.from_array(np.array(list(attr.floats), dtype=np.float32))
        if attr.name == "value_int":
            return numpy_helper.from_array(np.array(attr.i, dtype=np.int64))
        if attr.name == "value_ints":
            return numpy_helper.from_array(np.array(list(attr.ints), dtype=np.int64))
    return None  # sparse or string constants stay as nodes


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that are not initializers, with shapes and numpy dtypes."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        ttype = value.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in ttype.shape.dim
        )
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        specs.append(InputSpec(value.name, dims, dtype))
    return specs


#: recurrent ops whose ``layout`` 0 (the default) reads X as [sequence, batch, features]
RECURRENT_OPS = ("RNN", "GRU", "LSTM")


def sequence_first_inputs(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """{graph input: the RNN/GRU/LSTM node that reads it as X in layout 0}: an input whose first
    axis is the sequence and whose second the batch (PyTorch's ``batch_first=False``)."""
    inputs = {spec.name for spec in input_specs(model)}
    found = {}
    for node in model.graph.node:
        layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
        if node.op_type in RECURRENT_OPS and node.domain in ("", "ai.onnx") and layout == 0 \
                and node.input and node.input[0] in inputs:
            found.setdefault(node.input[0], node)
    return found


def output_names(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


#: inputs that configure an op rather than weigh its data (attributes in earlier opsets, sizes,
#: thresholds): a float initializer read only there is no parameter (Resize's scales, Clip's bounds)
CONFIGURING_INPUTS = {"Resize": {1, 2, 3}, "Upsample": {1}, "Clip": {1, 2}, "Pad": {1, 2, 3}, "Dropout": {1, 2},
                      "NonMaxSuppression": {2, 3, 4}}


def weight_names(model: onnx.ModelProto) -> set[str]:
    """The model's weights: floating-point initializers that a node (or a subgraph) reads at an
    input other than one that configures it (``CONFIGURING_INPUTS``), and the integer weights of a
    quantized model (what its quantized ops read as data, ``QUANTIZED_DATA_INPUTS``: not their
    scales and zero points). Other integer tensors (shapes, axes, indices), unused initializers and
    a Resize's float scales are not."""
    stored = {t.name: t.data_type for t in model.graph.initializer}
    weights: set[str] = set()
    for node in model.graph.node:
        default = node.domain in ("", "ai.onnx")
        quantized = QUANTIZED_DATA_INPUTS.get(node.op_type) if default else None
        configuring = CONFIGURING_INPUTS.get(node.op_type, set()) if default else set()
        for i, name in enumerate(node.input):
            if quantized is not None:
                if i in quantized and name in stored:
                    weights.add(name)
            elif i not in configuring and stored.get(name) in FLOAT_TENSOR_TYPES:
                weights.add(name)
        weights |= {name for name in subgraph_inputs(node) if stored.get(name) in FLOAT_TENSOR_TYPES}
    return weights


def count_parameters(model: onnx.ModelProto) -> int:
    """Number of elements of the model's weights (``weight_names``)."""
    names = weight_names(model)
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer if t.name in names)


def model_hash(model: onnx.ModelProto) -> str:
    """A sha256 of the graph and its weights, independent of where the weights are stored."""
    digest = hashlib.sha256()
    graph = onnx.GraphProto()
    for field, value in model.graph.ListFields():      # every field but the weights, not copying them
        if field.name == "initializer":
            continue
        if field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED:
            getattr(graph, field.name).extend(value)
        elif field.message_type is not None:
            getattr(graph, field.name).CopyFrom(value)
        else:
            setattr(graph, field.name, value)
    digest.update(graph.SerializeToString(deterministic=True))
    for tensor in sorted(model.graph.initializer, key=lambda t: t.name):
        digest.update(tensor.name.encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()[:16]


#: element types whose raw_data (little-endian) are exactly the bytes numpy_helper.to_array gives
_RAW_AS_IS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64,
              onnx.TensorProto.INT32, onnx.TensorProto.INT8, onnx.TensorProto.UINT8}


def _tensor_bytes(tensor: onnx.TensorProto) -> bytes:
    """The tensor's values as ``numpy_helper.to_array(tensor).tobytes()`` gives them, without the
    conversion where its raw_data already are those bytes."""
    if (sys.byteorder == "little" and tensor.data_type in _RAW_AS_IS and tensor.HasField("raw_data")
            and tensor.data_location != onnx.TensorProto.EXTERNAL):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def clone(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def needs_external_data(model: onnx.ModelProto) -> bool:
    return model.ByteSize() >= PROTO_LIMIT


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically; large models (or ``external_data=True``) get a
    ``<name>.data`` file beside them. Nothing appears at ``path`` unless the write completed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = needs_external_data(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        data_name = path.name + ".data"
        if external_data:
            copy = clone(model)
            onnx.save(copy, str(tmp / path.name), save_as_external_data=True,
                      all_tensors_to_one_file=True, location=data_name, size_threshold=0)
            os.replace(tmp / data_name, path.parent / data_name)
        else:
            with open(tmp / path.name, "wb") as fh:
                fh.write(model.SerializeToString())
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialized size in bytes (weights included, wherever they are stored)."""
    if not needs_external_data(model):
        return model.ByteSize()
    return sum(t.ByteSize() for t in model.graph.initializer) + 4096


def opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    """The opset version ``model`` imports for ``domain`` ("" and "ai.onnx" are the default one)."""
    domains = ("", "ai.onnx") if domain in ("", "ai.onnx") else (domain,)
    return max((int(o.version) for o in model.opset_import if o.domain in domains), default=0)


def cone_hashes(model: onnx.ModelProto, tensors, *, memo: dict[str, str] | None = None) -> dict[str, str]:
    """For each tensor, a hash of the subgraph that computes it (nodes, attributes, weights).

    Two models give a tensor the same hash exactly when it is computed the same way from
    the same graph inputs, so statistics gathered on one stay valid on the other. ``memo``:
    the hashes of an earlier call on the same, unchanged model (filled in as they are found).
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    inits = {t.name: t for t in model.graph.initializer}
    memo = {} if memo is None else memo

    def tensor_hash(name: str) -> str:
        if name in memo:
            return memo[name]
        digest = hashlib.sha256()
        if name in inits:
            digest.update(b"init")
            digest.update(numpy_helper.to_array(inits[name]).tobytes())
        elif name in producer:
            node = producer[name]
            digest.update(node.op_type.encode() + node.domain.encode())
            for attr in node.attribute:
                digest.update(attr.SerializeToString(deterministic=True))
            for inp in node.input:
                digest.update(tensor_hash(inp).encode() if inp else b"-")
            digest.update(str(list(node.output).index(name)).encode())
        else:
            digest.update(b"input:" + name.encode())
        memo[name] = digest.hexdigest()
        return memo[name]

    import sys
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(model.graph.node) + 1000))
    try:
        return {t: tensor_hash(t) for t in tensors}
    finally:
        sys.setrecursionlimit(limit)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def default_mode() -> int:
    """The permissions a plain ``open(path, "w")`` would give (0666 less the umask): temporary
    files are created 0600, and every output gets the same, normal permissions."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def jsonable(value):
    """``value`` with numpy scalars/arrays as plain numbers/lists, tuples as lists, keys as
    strings and non-finite floats as null (strict JSON, numbers stay numbers: an infinite
    SQNR, for outputs that are identical, is null)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value
