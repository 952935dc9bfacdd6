"""ONNX -> PyTorch -> ONNX round trip for training.

``to_torch(model)`` builds an ``OnnxModule``: a torch module that interprets the ONNX graph node
by node, with the weight initializers (Conv/Gemm/MatMul/normalisation weights and biases) as
``nn.Parameter``s and everything else (shape constants, Clip bounds, ...) as fixed tensors.
``to_onnx(module)`` writes the trained parameters back into a copy of the original graph's
initializers, by name. The exported graph is the input graph, node for node, with new weight
values: same input/output names, dynamic axes, opset, IR version and pruned shapes, no masks and
no extra ops (a Co-Prune mask is applied by writing zeros).

Why not onnx2torch + torch.onnx.export: onnx2torch 1.5 imports torchvision at load time, and the
torchvision wheels on PyPI are built against the CUDA torch of the same release (with the CPU
torch 2.13.0 build, torchvision 0.28.0 fails with "operator torchvision::nms does not exist",
and an unpinned install pulls a multi-GB CUDA torch); and ``torch.onnx.export`` re-traces the
graph, renaming nodes and initializers, adding Identity/Constant nodes and stamping its own
opset/IR. Copying weights back by name is exact by construction and needs torch alone.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.errors import ModelError
from onnxprune.graph.editor import GraphEditor
from onnxprune.model import clone
from onnxprune.train import require_torch

log = logging.getLogger(__name__)

torch = require_torch()
F = torch.nn.functional

# Inputs of these ops (by position) that hold trainable weights when they are initializers.
WEIGHT_INPUTS = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2), "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2),
    "PRelu": (1,), "Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1),
}
# Ops whose weights Co-Prune masks (the multiplicative weights, not biases).
MASKABLE = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}

TORCH_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool, onnx.TensorProto.INT16: torch.int16,
}


def _key(name: str) -> str:
    return "w_" + re.sub(r"[^0-9A-Za-z_]", "_", name)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class OnnxModule(torch.nn.Module):
    """Runs an ONNX graph with torch ops; weight initializers are parameters.

    ``masks`` ({initializer name: 0/1 tensor}) apply a straight-through mask in ``forward``:
    the value used is ``W * M``, the gradient reaches all of ``W`` (pruned weights may return).
    """

    def __init__(self, model: onnx.ModelProto, *, name: str = "model"):
        super().__init__()
        self.model = model
        self.name = name
        graph = model.graph
        opset = {d.domain or "": d.version for d in model.opset_import}
        self.opset = opset.get("", opset.get("ai.onnx", 13))
        init = {t.name: t for t in graph.initializer}
        unsupported = sorted({n.op_type for n in graph.node if n.domain not in ("", "ai.onnx") or n.op_type not in OPS})
        if unsupported:
            raise ModelError(name, f"op(s) {', '.join(unsupported)} are not supported by the training converter",
                             "recovery training covers CNN/MLP/transformer ops used by the models onnxprune compresses")
        trainable: set[str] = set()
        for node in graph.node:
            for pos in WEIGHT_INPUTS.get(node.op_type, ()):
                if pos < len(node.input) and node.input[pos] in init:
                    t = init[node.input[pos]]
                    if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE) and int(np.prod(t.dims)) > 1:
                        trainable.add(t.name)
        self.maskable = sorted({node.input[pos] for node in graph.node
                                for op, pos in MASKABLE.items() if node.op_type == op
                                and pos < len(node.input) and node.input[pos] in trainable})
        self.params = torch.nn.ParameterDict()
        self.keys: dict[str, str] = {}
        self.consts: dict[str, torch.Tensor] = {}
        for t in graph.initializer:
            array = numpy_helper.to_array(t)
            if t.name in trainable:
                self.keys[t.name] = _key(t.name)
                self.params[_key(t.name)] = torch.nn.Parameter(torch.from_numpy(np.array(array, dtype=np.float32)))
            else:
                self.consts[t.name] = torch.from_numpy(np.array(array))
        for node in graph.node:
            if node.op_type == "Constant":
                self.consts[node.output[0]] = torch.from_numpy(np.array(_constant(node)))
        self.input_names = [i.name for i in graph.input if i.name not in init]
        self.output_names = [o.name for o in graph.output]
        self.nodes = [n for n in graph.node if n.op_type != "Constant"]
        self.node_attrs = [_attrs(n) for n in self.nodes]
        self.masks: dict[str, torch.Tensor] = {}
        self.taps: tuple[str, ...] = ()  # intermediate tensors kept by forward in ``tapped`` (feature distillation)
        self.tapped: dict[str, torch.Tensor] = {}

    def weight(self, name: str):
        return self.params[self.keys[name]]

    def named_weights(self):
        return {name: self.params[key] for name, key in self.keys.items()}

    def forward(self, *args, **kwargs):
        env: dict[str, object] = dict(self.consts)
        for name, key in self.keys.items():
            w = self.params[key]
            mask = self.masks.get(name)
            env[name] = w if mask is None else w - (w * (1 - mask)).detach()
        for name, value in zip(self.input_names, args):
            env[name] = value
        env.update(kwargs)
        env[""] = None
        for node, attrs in zip(self.nodes, self.node_attrs):
            ins = [env[i] for i in node.input]
            try:
                outs = OPS[node.op_type](self, node, ins, attrs)
            except (RuntimeError, ValueError, IndexError) as exc:
                raise ModelError(self.name, f"node {node.name or node.op_type} ({node.op_type}) failed in torch: "
                                 f"{str(exc).splitlines()[0]}") from None
            if not isinstance(outs, (tuple, list)):
                outs = (outs,)
            for name, value in zip(node.output, outs):
                if name:
                    env[name] = value
        self.tapped = {name: env[name] for name in self.taps}
        return tuple(env[name] for name in self.output_names)


def _constant(node: onnx.NodeProto) -> np.ndarray:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_int"):
            return np.array(onnx.helper.get_attribute_value(a), dtype=np.float32 if a.name == "value_float" else np.int64)
        if a.name in ("value_floats", "value_ints"):
            return np.array(onnx.helper.get_attribute_value(a), dtype=np.float32 if a.name == "value_floats" else np.int64)
    raise ModelError("Constant", f"node {node.name} has no supported value attribute")


def _ints(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value]


# ------------------------------------------------------------------ ops


def _pad_pairs(pads: list[int]) -> list[int]:
    """ONNX [b1..bn, e1..en] -> torch (bn, en, ..., b1, e1)."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


def _spatial_pads(x, a, kernel, strides, dilations):
    rank = x.dim() - 2
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        return list(a.get("pads", [0] * (2 * rank)))
    if auto == "VALID":
        return [0] * (2 * rank)
    begin, end = [], []
    for i in range(rank):
        size = x.shape[2 + i]
        out = -(-size // strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
        small, big = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else big)
        end.append(big if auto == "SAME_UPPER" else small)
    return begin + end


def _conv(m, node, ins, a):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    rank = x.dim() - 2
    kernel = list(a.get("kernel_shape", w.shape[2:]))
    strides = list(a.get("strides", [1] * rank))
    dilations = list(a.get("dilations", [1] * rank))
    pads = _spatial_pads(x, a, kernel, strides, dilations)
    sym = pads[:rank] == pads[rank:]
    if not sym:
        x = F.pad(x, _pad_pairs(pads))
    conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    return conv(x, w, b, stride=strides, padding=pads[:rank] if sym else 0, dilation=dilations,
                groups=a.get("group", 1))


def _pool(kind):
    def run(m, node, ins, a):
        x = ins[0]
        rank = x.dim() - 2
        kernel = list(a["kernel_shape"])
        strides = list(a.get("strides", [1] * rank))
        dilations = list(a.get("dilations", [1] * rank))
        pads = _spatial_pads(x, a, kernel, strides, dilations)
        ceil = bool(a.get("ceil_mode", 0))
        sym = pads[:rank] == pads[rank:] and all(p <= k // 2 for p, k in zip(pads[:rank], kernel))
        if kind == "max":
            if not sym:
                x = F.pad(x, _pad_pairs(pads), value=float("-inf"))
            pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[rank - 1]
            return pool(x, kernel, strides, pads[:rank] if sym else 0, dilations, ceil_mode=ceil)
        include = bool(a.get("count_include_pad", 0))
        if not sym:
            if not include and any(pads):
                raise ValueError("asymmetric AveragePool padding without count_include_pad")
            x = F.pad(x, _pad_pairs(pads))
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[rank - 1]
        return pool(x, kernel, strides, pads[:rank] if sym else 0, ceil_mode=ceil, count_include_pad=include)
    return run


def _gemm(m, node, ins, a):
    x, w = ins[0], ins[1]
    if a.get("transA", 0):
        x = x.t()
    if a.get("transB", 0):
        w = w.t()
    y = a.get("alpha", 1.0) * (x @ w)
    if len(ins) > 2 and ins[2] is not None:
        y = y + a.get("beta", 1.0) * ins[2]
    return y


def _reshape(m, node, ins, a):
    x, shape = ins[0], _ints(ins[1])
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _flatten(m, node, ins, a):
    x = ins[0]
    axis = a.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _shape(m, node, ins, a):
    dims = list(ins[0].shape)
    start, end = a.get("start", 0), a.get("end", None)
    return torch.tensor(dims[start:end], dtype=torch.int64)


def _gather(m, node, ins, a):
    x, idx = ins
    axis = a.get("axis", 0)
    axis = axis + x.dim() if axis < 0 else axis
    idx = idx.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape(list(x.shape[:axis]) + list(idx.shape) + list(x.shape[axis + 1:]))


def _axes(m, ins, a, pos=1):
    if "axes" in a:
        return list(a["axes"])
    if len(ins) > pos and ins[pos] is not None:
        return _ints(ins[pos])
    return None


def _unsqueeze(m, node, ins, a):
    x = ins[0]
    axes = sorted(ax + x.dim() + len(_axes(m, ins, a)) if ax < 0 else ax for ax in _axes(m, ins, a))
    for ax in axes:
        x = x.unsqueeze(ax)
    return x


def _squeeze(m, node, ins, a):
    x = ins[0]
    axes = _axes(m, ins, a)
    if axes is None:
        return x.squeeze()
    for ax in sorted((ax + x.dim() if ax < 0 else ax for ax in axes), reverse=True):
        x = x.squeeze(ax)
    return x


def _slice(m, node, ins, a):
    x = ins[0]
    if len(ins) > 1:
        starts, ends = _ints(ins[1]), _ints(ins[2])
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
        steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    else:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes = list(a.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st == 0:
            raise ValueError("Slice with step 0")
        ax = ax + x.dim() if ax < 0 else ax
        size = x.shape[ax]
        s = s + size if s < 0 else s
        e = e + size if e < 0 else e
        if st > 0:
            index[ax] = slice(max(0, min(size, s)), max(0, min(size, e)), st)
        else:  # negative step: explicit indices (torch slicing has no negative steps)
            s, e = max(-1, min(size - 1, s)), max(-1, min(size - 1, e))
            x = torch.index_select(x, ax, torch.arange(s, e, st, dtype=torch.int64))
    return x[tuple(index)]


def _pad(m, node, ins, a):
    x = ins[0]
    if len(ins) > 1:
        pads = _ints(ins[1])
        value = float(ins[2].reshape(-1)[0]) if len(ins) > 2 and ins[2] is not None else 0.0
        if len(ins) > 3 and ins[3] is not None:
            axes = [ax + x.dim() if ax < 0 else ax for ax in _ints(ins[3])]
            full = [0] * (2 * x.dim())
            for i, ax in enumerate(axes):
                full[ax], full[ax + x.dim()] = pads[i], pads[i + len(axes)]
            pads = full
    else:
        pads, value = list(a["pads"]), a.get("value", 0.0)
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pairs = _pad_pairs(pads)
    while len(pairs) > 2 and pairs[-1] == 0 and pairs[-2] == 0:
        pairs = pairs[:-2]
    if mode == "constant":
        return F.pad(x, pairs, value=value)
    return F.pad(x, pairs, mode={"reflect": "reflect", "edge": "replicate"}[mode])


def _clip(m, node, ins, a):
    x = ins[0]
    lo = ins[1] if len(ins) > 1 and ins[1] is not None else a.get("min")
    hi = ins[2] if len(ins) > 2 and ins[2] is not None else a.get("max")
    lo = float(lo) if lo is not None else None
    hi = float(hi) if hi is not None else None
    return torch.clamp(x, lo, hi)


def _softmax(kind):
    def run(m, node, ins, a):
        x = ins[0]
        if m.opset >= 13:
            axis = a.get("axis", -1)
            return torch.softmax(x, axis) if kind == "softmax" else torch.log_softmax(x, axis)
        axis = a.get("axis", 1)
        axis = axis + x.dim() if axis < 0 else axis
        flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
        y = torch.softmax(flat, 1) if kind == "softmax" else torch.log_softmax(flat, 1)
        return y.reshape(x.shape)
    return run


def _reduce(fn):
    def run(m, node, ins, a):
        x = ins[0]
        axes = _axes(m, ins, a)
        keep = bool(a.get("keepdims", 1))
        if axes is None or len(axes) == 0:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, dim=axes, keepdim=keep)
    return run


def _div(m, node, ins, a):
    x, y = ins
    if not x.is_floating_point():
        return torch.div(x, y, rounding_mode="trunc")
    return x / y


def _cast(m, node, ins, a):
    return ins[0].to(TORCH_DTYPES[a["to"]])


def _constant_of_shape(m, node, ins, a):
    value = a.get("value")
    array = numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
    return torch.full(_ints(ins[0]), torch.from_numpy(np.array(array)).reshape(-1)[0].item(),
                      dtype=torch.from_numpy(np.array(array)).dtype)


def _layer_norm(m, node, ins, a):
    x = ins[0]
    axis = a.get("axis", -1)
    axis = axis + x.dim() if axis < 0 else axis
    shape = list(x.shape[axis:])
    b = ins[2] if len(ins) > 2 else None
    return F.layer_norm(x, shape, ins[1], b, a.get("epsilon", 1e-5))


def _batch_norm(m, node, ins, a):
    x, scale, bias, mean, var = ins[:5]
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, a.get("epsilon", 1e-5))


def _expand(m, node, ins, a):
    x, shape = ins[0], _ints(ins[1])
    ones = torch.ones(shape, dtype=x.dtype)
    return x * ones if x.dtype != torch.bool else (x & ones.bool())


def _concat(m, node, ins, a):
    tensors = [t for t in ins if t is not None and t.numel() > 0] or [ins[0]]
    return torch.cat(tensors, a["axis"])


OPS = {
    "Conv": _conv, "Gemm": _gemm, "MatMul": lambda m, n, i, a: torch.matmul(i[0], i[1]),
    "Add": lambda m, n, i, a: i[0] + i[1], "Sub": lambda m, n, i, a: i[0] - i[1],
    "Mul": lambda m, n, i, a: i[0] * i[1], "Div": _div,
    "Pow": lambda m, n, i, a: torch.pow(i[0], i[1]), "Sqrt": lambda m, n, i, a: torch.sqrt(i[0]),
    "Exp": lambda m, n, i, a: torch.exp(i[0]), "Neg": lambda m, n, i, a: -i[0],
    "Erf": lambda m, n, i, a: torch.erf(i[0]), "Tanh": lambda m, n, i, a: torch.tanh(i[0]),
    "Relu": lambda m, n, i, a: F.relu(i[0]), "Sigmoid": lambda m, n, i, a: torch.sigmoid(i[0]),
    "LeakyRelu": lambda m, n, i, a: F.leaky_relu(i[0], a.get("alpha", 0.01)),
    "HardSigmoid": lambda m, n, i, a: torch.clamp(a.get("alpha", 0.2) * i[0] + a.get("beta", 0.5), 0, 1),
    "HardSwish": lambda m, n, i, a: F.hardswish(i[0]),
    "PRelu": lambda m, n, i, a: torch.where(i[0] >= 0, i[0], i[0] * i[1]),
    "Clip": _clip, "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda m, n, i, a: i[0].mean(dim=tuple(range(2, i[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda m, n, i, a: i[0].amax(dim=tuple(range(2, i[0].dim())), keepdim=True),
    "Flatten": _flatten, "Reshape": _reshape, "Shape": _shape, "Gather": _gather,
    "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Slice": _slice, "Pad": _pad, "Concat": _concat,
    "Transpose": lambda m, n, i, a: i[0].permute(a["perm"]) if "perm" in a else i[0].permute(
        list(reversed(range(i[0].dim())))),
    "Cast": _cast, "ConstantOfShape": _constant_of_shape, "Constant": None,
    "Identity": lambda m, n, i, a: i[0], "Dropout": lambda m, n, i, a: i[0],
    "Softmax": _softmax("softmax"), "LogSoftmax": _softmax("log"),
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(lambda x, dim, keepdim: torch.amax(x, dim=dim, keepdim=keepdim)),
    "Equal": lambda m, n, i, a: torch.eq(i[0], i[1]), "Where": lambda m, n, i, a: torch.where(i[0], i[1], i[2]),
    "Not": lambda m, n, i, a: torch.logical_not(i[0]),
    "Expand": _expand, "LayerNormalization": _layer_norm, "BatchNormalization": _batch_norm,
}


# ------------------------------------------------------------------ round trip


def to_torch(model: onnx.ModelProto, *, name: str = "model") -> OnnxModule:
    """An ``OnnxModule`` for ``model`` (raises ModelError on an op the converter lacks)."""
    module = OnnxModule(model, name=name)
    log.info("%s: %d trainable tensors (%d weights) of %d initializers", name, len(module.keys),
             sum(p.numel() for p in module.params.values()), len(model.graph.initializer))
    return module


def to_onnx(module: OnnxModule, *, masks: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A copy of the module's source graph with the trained weights written into its initializers.

    ``masks`` zero the pruned weights (Co-Prune). Dtypes of the original initializers are kept.
    """
    out = clone(module.model)
    graph = GraphEditor(out)
    dtypes = {t.name: numpy_helper.to_array(t).dtype if t.data_location != onnx.TensorProto.EXTERNAL else None
              for t in module.model.graph.initializer}
    for name, param in module.named_weights().items():
        value = param.detach().cpu().contiguous().numpy()
        if masks and name in masks:
            value = value * masks[name]
        dtype = dtypes.get(name) or np.float32
        graph.set_array(name, value.astype(dtype))
    return out


def verify(model: onnx.ModelProto, module: OnnxModule, feeds: dict[str, np.ndarray], *, tol: float = 1e-4) -> float:
    """Max relative error of ``module`` against onnxruntime on ``feeds``; ModelError above ``tol``.
    A model with a fixed batch size is checked on that many of them (the last repeated when fewer)."""
    from onnxprune.plan.suffix import fixed_batch_of
    from onnxprune.runtime import fill_batch, make_session

    fixed = fixed_batch_of(model)
    if fixed is not None:
        feeds = fill_batch({k: v[:fixed] for k, v in feeds.items()}, fixed)
    session = make_session(model, threads=2)
    ref = session.run(None, feeds)
    with torch.no_grad():
        out = module(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()})
    worst = 0.0
    for name, r, o in zip(module.output_names, ref, out):
        o = o.detach().cpu().numpy()
        if r.shape != o.shape:
            raise ModelError(module.name, f"output {name}: torch shape {o.shape} != onnxruntime {r.shape}")
        if not np.issubdtype(r.dtype, np.floating):
            if not np.array_equal(r, o):
                raise ModelError(module.name, f"output {name} differs between torch and onnxruntime")
            continue
        if not np.isfinite(r).all():   # NaN compares false with every bound: never a passing difference
            raise ModelError(module.name, f"output {name} is NaN or inf in onnxruntime on the training samples",
                             "check the model's weights and the data's preprocessing (--mean, --std, --scale)")
        if not np.isfinite(o).all():
            raise ModelError(module.name, f"output {name} is NaN or inf in the torch conversion, finite in "
                             "onnxruntime", "please report this model: an op is converted incorrectly")
        scale = max(float(np.abs(r).max()), 1e-6)
        worst = max(worst, float(np.abs(r.astype(np.float64) - o).max()) / scale)
    if worst > tol:
        raise ModelError(module.name, f"the torch conversion differs from onnxruntime by {worst:.3g} (> {tol})",
                         "please report this model: an op is converted incorrectly")
    return worst
